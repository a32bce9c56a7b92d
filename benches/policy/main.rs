//! `cargo bench --bench policy`: how good and how cheap the policies are, on a simulated host.
//!
//! 1. vCPU policy quality on seeded scenarios: ours against a reference implementation of the seed's
//!    policy (one move from the busiest to the freest pCPU per period), each run with the real
//!    scheduler cycle on the same simulated host.
//! 2. Memory policy on simulated traces: OOMs, waits, memory returned, reserve violations.
//! 3. Decision cost of both planners as the host grows.
//! 4. vCPU placement on a 2-socket x 16-core x 2-thread host (one NUMA node per socket): the
//!    topology-aware scheduler against the flat one of before (the same scheduler, not told the
//!    topology), in work served and vCPUs away from their memory.
//!
//! Everything is deterministic but the timings. Results are recorded in BENCHMARKS.md.

#[path = "../../tests/common/sim.rs"]
#[allow(dead_code)]
mod sim;

mod cost;
mod memory;
mod topology;
mod vcpu;

use cost::decision_cost;
use memory::memory_quality;
use topology::vcpu_topology;
use vcpu::{smoke_run, vcpu_quality, vcpu_stability};

fn main() {
    // `cargo bench` passes --bench. `cargo test --all-targets` also runs this binary, unoptimized:
    // there it only checks that one scenario runs, so the test suite stays quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "policy bench smoke run: 4 pCPUs crowded, {} pin changes; run `cargo bench --bench policy` for the figures",
            smoke_run()
        );
        return;
    }
    // `cargo bench --bench policy -- memory` runs only the sections whose name contains "memory".
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let sections: [(&str, fn()); 6] = [
        ("vcpu_quality_delay", || vcpu_quality(true)),
        ("vcpu_quality_usage", || vcpu_quality(false)),
        ("vcpu_stability", vcpu_stability),
        ("memory_quality", memory_quality),
        ("decision_cost", decision_cost),
        ("vcpu_topology", vcpu_topology),
    ];
    for (name, section) in sections {
        if only.is_empty() || only.iter().any(|o| name.contains(o.as_str())) {
            section();
        }
    }
}
