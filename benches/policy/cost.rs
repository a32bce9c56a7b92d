//! Decision cost of both planners as the host grows.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::sim::Rng;
use vmbalance::cpu_plan::{CpuPolicy, plan};
use vmbalance::host::{DomainId, HostMemory};
use vmbalance::mem_plan::{self, MemPolicy, MemSnapshot};
use vmbalance::sampling::{Allowed, CpuSnapshot, GuestMemory, VcpuKey, VcpuLoad};

/// A host of `vcpus` vCPUs with random usage on `pcpus` pCPUs, randomly pinned (or all on pCPU 0).
fn cpu_snapshot(pcpus: u32, vcpus: usize, crowded: bool, seed: u64) -> CpuSnapshot {
    let mut rng = Rng(seed | 1);
    CpuSnapshot {
        pcpus: (0..pcpus).collect(),
        vcpus: (0..vcpus)
            .map(|i| {
                let p = if crowded {
                    0
                } else {
                    rng.below(u64::from(pcpus)) as u32
                };
                VcpuLoad {
                    usage: Some(
                        rng.range(0.0, 100.0 * f64::from(pcpus) / vcpus as f64 * 2.0)
                            .min(100.0),
                    ),
                    pinned: Some(p),
                    last_pcpu: Some(p),
                    ..VcpuLoad::unknown(VcpuKey {
                        domain: DomainId([(i / 4 % 251) as u8; 16]),
                        vcpu: i as u32,
                    })
                }
            })
            .collect(),
        cores: Vec::new(),
        nodes: Vec::new(),
    }
}

/// The median cost of one decision on `random` (pins at random: "unbalanced") and on the host it
/// becomes once that decision is applied, re-planned ("balanced").
fn balanced_and_unbalanced(random: CpuSnapshot, policy: &CpuPolicy) -> (Duration, Duration) {
    let mut balanced = random.clone();
    for m in plan(&random, policy).moves {
        let v = balanced.vcpus.iter_mut().find(|v| v.key == m.key).unwrap();
        v.pinned = Some(m.to);
        v.last_pcpu = Some(m.to);
    }
    let tb = time(Duration::from_secs(1), || {
        black_box(plan(black_box(&balanced), policy));
    });
    let tu = time(Duration::from_secs(1), || {
        black_box(plan(black_box(&random), policy));
    });
    (tb, tu)
}

/// `s` (on 256 pCPUs) laid out as 2 sockets x 64 cores x 2 threads, numbered as Linux numbers
/// them (pCPU `p` and `p + 128` are siblings; node 0 holds 0-63 and 128-191).
fn smt_256(mut s: CpuSnapshot) -> CpuSnapshot {
    assert_eq!(s.pcpus.len(), 256);
    s.cores = (0..128).map(|p| vec![p, p + 128]).collect();
    s
}

/// `s` on [`smt_256`]'s host, where every vCPU may only use its NUMA node's pCPUs, and every
/// tenth only the pCPU it is pinned to.
fn numa_constrained(s: CpuSnapshot) -> CpuSnapshot {
    let mut s = smt_256(s);
    let node_of = |p: u32| (p % 128) / 64;
    let nodes: [std::sync::Arc<[u32]>; 2] = [0, 1].map(|n| {
        s.pcpus
            .iter()
            .copied()
            .filter(|&p| node_of(p) == n)
            .collect::<Vec<u32>>()
            .into()
    });
    for (i, v) in s.vcpus.iter_mut().enumerate() {
        let p = v.pinned.unwrap();
        v.allowed = if i % 10 == 0 {
            Allowed::Only(vec![p].into())
        } else {
            Allowed::Only(nodes[node_of(p) as usize].clone())
        };
    }
    s
}

fn mem_snapshot(guests: usize, seed: u64) -> MemSnapshot {
    let mut rng = Rng(seed | 1);
    MemSnapshot {
        guests: (0..guests)
            .map(|i| {
                let actual = (512 + rng.below(4096)) << 10;
                GuestMemory {
                    id: DomainId([(i % 251) as u8; 16]),
                    actual_kib: actual,
                    max_kib: actual * 2,
                    free_kib: actual * rng.below(100) / 100,
                    unused_kib: actual / 10,
                    rate_kib_s: rng.range(-20.0, 40.0) * 1024.0,
                    latest_rate_kib_s: 0.0,
                }
                .into()
            })
            .collect(),
        host: Some(HostMemory::new(1 << 30, 1 << 28)),
        ..MemSnapshot::default()
    }
}

/// Median time of `f` over enough runs to fill about `budget`.
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 5 || (start.elapsed() < budget && samples.len() < 1000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

pub(crate) fn decision_cost() {
    println!("## Decision cost (median wall time of one decision, this machine)\n");
    println!("| planner | size | balanced host | unbalanced host |");
    println!("| --- | --- | ---: | ---: |");
    let policy = CpuPolicy::default();
    for (pcpus, vcpus) in [(16u32, 100usize), (64, 1000), (256, 10_000), (1024, 40_000)] {
        let (tb, tu) = balanced_and_unbalanced(cpu_snapshot(pcpus, vcpus, false, 7), &policy);
        println!("| vCPU | {vcpus} vCPUs on {pcpus} pCPUs | {tb:.2?} | {tu:.2?} |");
    }
    let crowded = cpu_snapshot(256, 10_000, true, 9);
    let tc = time(Duration::from_secs(2), || {
        black_box(plan(black_box(&crowded), &policy));
    });
    println!("| vCPU | 10000 vCPUs all on one of 256 pCPUs | | {tc:.2?} |");
    // Rule 10 at scale: 2 sockets x 64 cores x 2 threads, siblings known.
    let (tb, tu) = balanced_and_unbalanced(smt_256(cpu_snapshot(256, 10_000, false, 7)), &policy);
    println!(
        "| vCPU | 10000 vCPUs on 256 pCPUs as 2 sockets x 64 cores x 2 threads | {tb:.2?} | {tu:.2?} |"
    );
    // Rule 9 as well: a NUMA node per socket; every vCPU held to the node it runs on, one in
    // ten pinned by its admin to the pCPU it runs on.
    let (tb, tu) = balanced_and_unbalanced(
        numa_constrained(cpu_snapshot(256, 10_000, false, 7)),
        &policy,
    );
    println!(
        "| vCPU | the same, each vCPU held to its NUMA node, 10 % admin-pinned | {tb:.2?} | {tu:.2?} |"
    );
    let mpolicy = MemPolicy::default();
    for guests in [10usize, 100, 1000, 10_000] {
        let s = mem_snapshot(guests, 3);
        let t = time(Duration::from_secs(1), || {
            black_box(mem_plan::plan(black_box(&s), &mpolicy));
        });
        println!("| memory | {guests} guests | {t:.2?} | |");
    }
    println!();
}
