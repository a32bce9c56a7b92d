//! vCPU placement on a 2-socket x 16-core x 2-thread host (one NUMA node per socket): the
//! topology-aware scheduler against the flat one of before, in work served and vCPUs away from
//! their memory.

use std::time::Duration;

use crate::sim::{Rng, SimHost, smt_capabilities};

use crate::vcpu::{mixed_demand, ours};
use vmbalance::scheduler::{Scheduler, SchedulerConfig};

/// A topology scenario: how many vCPUs per pCPU, and where they start.
struct TopoScenario {
    name: &'static str,
    vcpus_per_pcpu: f64,
    /// Every vCPU starts on the first pCPU of its domain's node (else on a random pCPU of it).
    crowded: bool,
    /// Every domain's memory is on node 0 (else on a random node).
    lopsided: bool,
}

/// A 2 x 16 x 2 host (64 pCPUs, node = socket) with domains of 1-8 vCPUs of mixed demand (as in
/// [`build`]), each
/// with its memory on a random node (a third of them strictly bound there), started on that node.
fn topo_host(sc: &TopoScenario, seed: u64) -> SimHost {
    let xml = smt_capabilities(2, 16, 2);
    let topology = vmbalance::topology::Topology::from_capabilities(&xml).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut host = SimHost::new(64);
    host.reports_delay = true;
    let target = (64.0 * sc.vcpus_per_pcpu) as usize;
    let mut n = 0;
    let mut dom = 1u8;
    while n < target {
        let k = (1 + rng.below(8) as usize).min(target - n);
        let node = if sc.lopsided { 0 } else { rng.below(2) as u32 };
        let cpus = topology.cpus_of_node(node).to_vec();
        let vcpus: Vec<(f64, Vec<u32>)> = (0..k)
            .map(|_| {
                let demand = mixed_demand(&mut rng);
                let p = if sc.crowded {
                    cpus[0]
                } else {
                    cpus[rng.below(cpus.len() as u64) as usize]
                };
                (demand, vec![p])
            })
            .collect();
        let spec: Vec<(f64, &[u32])> = vcpus.iter().map(|(d, p)| (*d, p.as_slice())).collect();
        host.add(dom, &spec);
        let d = host.domains.last_mut().unwrap();
        d.home_node = Some(node);
        if rng.below(3) == 0 {
            d.facts.memory_nodes = Some(vec![node]);
        }
        dom += 1;
        n += k;
    }
    host.topology = Some(topology);
    host
}

/// What a topology run ends with: work served (% of wanted), vCPUs away from their memory (%),
/// pin changes.
struct TopoOutcome {
    served: f64,
    remote: f64,
    changes: usize,
}

/// Who places the vCPUs in a topology run.
#[derive(Clone, Copy)]
enum TopoRunner {
    /// Our scheduler, told the topology.
    Aware,
    /// The same with `--cross-node`.
    CrossNode,
    /// Our scheduler not told the topology: the flat planner of before.
    Flat,
    /// No scheduler: the vCPUs stay where they started.
    Nobody,
}

impl TopoRunner {
    fn label(self) -> &'static str {
        match self {
            TopoRunner::Aware => "topology-aware (default)",
            TopoRunner::CrossNode => "topology-aware, --cross-node",
            TopoRunner::Flat => "flat (not told the topology)",
            TopoRunner::Nobody => "none (no scheduler)",
        }
    }
}

/// Run 20 cycles of `runner` on the scenario; the work is counted on the real topology
/// whatever the scheduler was told.
fn topo_run(sc: &TopoScenario, seed: u64, runner: TopoRunner) -> TopoOutcome {
    let mut host = topo_host(sc, seed);
    let topology = host.topology.take();
    let mut sched = match runner {
        TopoRunner::Aware | TopoRunner::Flat => Some(ours()),
        TopoRunner::CrossNode => Some(Scheduler::new(SchedulerConfig {
            cross_node: true,
            ..SchedulerConfig::default()
        })),
        TopoRunner::Nobody => None,
    };
    if !matches!(runner, TopoRunner::Flat) {
        host.topology = topology.clone();
    }
    for _ in 0..20 {
        if let Some(sched) = &mut sched {
            sched.cycle(&mut host).unwrap();
        }
        host.advance(Duration::from_secs(3));
    }
    host.topology = topology;
    let (wanted, done) = host.work();
    let (remote, all) = host.remote_vcpus();
    TopoOutcome {
        served: 100.0 * done / wanted,
        remote: 100.0 * remote as f64 / all as f64,
        changes: host.pins,
    }
}

pub(crate) fn vcpu_topology() {
    println!(
        "## vCPU placement on a 2-socket x 16-core x 2-thread host (64 pCPUs, a NUMA node per socket)\n"
    );
    println!(
        "Work served: what the vCPUs get done, in % of what they want, where a thread with a busy sibling runs at 60 % and a vCPU away from its memory's node at 75 %. Mean of 5 seeds after 20 cycles.\n"
    );
    println!("| scenario | scheduler | work served | vCPUs away from their memory | pin changes |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let scenarios = [
        TopoScenario {
            name: "0.5 vCPU per pCPU, random start",
            vcpus_per_pcpu: 0.5,
            crowded: false,
            lopsided: false,
        },
        TopoScenario {
            name: "0.5 vCPU per pCPU, crowded start",
            vcpus_per_pcpu: 0.5,
            crowded: true,
            lopsided: false,
        },
        TopoScenario {
            name: "1 vCPU per pCPU, random start",
            vcpus_per_pcpu: 1.0,
            crowded: false,
            lopsided: false,
        },
        TopoScenario {
            name: "1.5 vCPUs per pCPU, random start",
            vcpus_per_pcpu: 1.5,
            crowded: false,
            lopsided: false,
        },
        TopoScenario {
            name: "0.75 vCPU per pCPU, every guest's memory on node 0",
            vcpus_per_pcpu: 0.75,
            crowded: false,
            lopsided: true,
        },
    ];
    for sc in &scenarios {
        for runner in [
            TopoRunner::Aware,
            TopoRunner::CrossNode,
            TopoRunner::Flat,
            TopoRunner::Nobody,
        ] {
            let outs: Vec<TopoOutcome> =
                (1..=5u64).map(|seed| topo_run(sc, seed, runner)).collect();
            let n = outs.len() as f64;
            println!(
                "| {} | {} | {:.1} % | {:.1} % | {:.1} |",
                sc.name,
                runner.label(),
                outs.iter().map(|o| o.served).sum::<f64>() / n,
                outs.iter().map(|o| o.remote).sum::<f64>() / n,
                outs.iter().map(|o| o.changes as f64).sum::<f64>() / n,
            );
        }
    }
    println!();
}
