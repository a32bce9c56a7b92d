//! vCPU policy quality on seeded scenarios (ours against the seed's policy, each run with the real
//! scheduler cycle on the same simulated host), and stability under changing demand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::sim::{Rng, SimHost};
use vmbalance::cpu_plan::{CpuPlan, CpuPolicy, PinMove, plan};
use vmbalance::sampling::{CpuSnapshot, VcpuLoad, pcpu_usage};
use vmbalance::scheduler::{Scheduler, SchedulerConfig};

/// The seed's policy, for comparison: pin unpinned vCPUs round-robin; then, when the busiest and
/// the freest pCPU differ by more than the threshold, move the one vCPU from the busiest to the
/// freest that best evens the two, if that narrows their gap. One move per period.
fn seed_plan(s: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    let mut moves = Vec::new();
    let unpinned: Vec<&VcpuLoad> = s
        .vcpus
        .iter()
        .filter(|v| v.pinned.is_none() && v.usage.is_some())
        .collect();
    if !unpinned.is_empty() {
        for (i, v) in unpinned.iter().enumerate() {
            let to = s.pcpus[i % s.pcpus.len()];
            moves.push(PinMove {
                key: v.key,
                from: None,
                to,
                load: v.usage.unwrap_or(0.0),
            });
        }
        return CpuPlan {
            moves,
            ..CpuPlan::default()
        };
    }
    let usage = pcpu_usage(s);
    let (&busy, &bu) = usage.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
    let (&free, &fu) = usage.iter().min_by(|a, b| a.1.total_cmp(b.1)).unwrap();
    let gap = bu - fu;
    if gap <= policy.threshold {
        return CpuPlan::default();
    }
    let best = s
        .vcpus
        .iter()
        .filter(|v| v.pinned == Some(busy) && v.usage.is_some())
        .map(|v| ((gap - 2.0 * v.usage.unwrap()).abs(), v))
        .filter(|(new_gap, _)| *new_gap < gap)
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, v)) = best {
        moves.push(PinMove {
            key: v.key,
            from: Some(busy),
            to: free,
            load: v.usage.unwrap(),
        });
    }
    CpuPlan {
        moves,
        ..CpuPlan::default()
    }
}

/// The real scheduler cycle with our planner.
pub(crate) fn ours() -> Scheduler {
    Scheduler::new(SchedulerConfig::default())
}

/// The real scheduler cycle with the seed's planner, deciding in every cycle as the seed did.
fn seed() -> Scheduler {
    Scheduler::new(SchedulerConfig {
        window: 1,
        ..SchedulerConfig::default()
    })
    .with_planner(seed_plan)
    .without_settling()
}

/// Ours with `--max-changes 1`.
fn ours_one_change_a_cycle() -> Scheduler {
    Scheduler::new(SchedulerConfig {
        policy: CpuPolicy {
            max_changes: Some(1),
            ..CpuPolicy::default()
        },
        ..SchedulerConfig::default()
    })
}

/// Ours with `--window 5`.
fn ours_window_5() -> Scheduler {
    Scheduler::new(SchedulerConfig {
        window: 5,
        ..SchedulerConfig::default()
    })
}

/// Ours with `--threshold 20`.
fn ours_threshold_20() -> Scheduler {
    Scheduler::new(SchedulerConfig {
        policy: CpuPolicy {
            threshold: 20.0,
            ..CpuPolicy::default()
        },
        ..SchedulerConfig::default()
    })
}

/// Pin changes [`budgeted_plan`] may still make, over all its cycles.
static BUDGET: AtomicUsize = AtomicUsize::new(0);

/// Our planner under a total budget of pin changes: each plan gets what is left of [`BUDGET`].
fn budgeted_plan(s: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    let left = BUDGET.load(Ordering::Relaxed);
    let p = plan(
        s,
        &CpuPolicy {
            max_changes: Some(left),
            ..*policy
        },
    );
    BUDGET.store(left - p.moves.len(), Ordering::Relaxed);
    p
}

/// The real scheduler cycle with our planner limited to `BUDGET` pin changes in all.
fn ours_budgeted() -> Scheduler {
    Scheduler::new(SchedulerConfig::default()).with_planner(budgeted_plan)
}

/// The first phase of the scenario (40 cycles, no shake) with our planner limited to `budget`
/// pin changes in all.
fn ours_within(sc: &Scenario, budget: usize) -> Outcome {
    BUDGET.store(budget, Ordering::Relaxed);
    let (first, _) = run(sc, ours_budgeted, 41, 40);
    first
}

#[derive(Clone, Copy, Debug)]
enum Start {
    /// Every vCPU pinned to pCPU 0.
    Crowded,
    /// Every vCPU pinned to a random pCPU.
    Random,
    /// No vCPU pinned (libvirt's default).
    Unpinned,
}

struct Scenario {
    pcpus: u32,
    start: Start,
    seed: u64,
    /// Does the simulated hypervisor report run-queue delay (as QEMU does)?
    delay: bool,
}

/// Build the scenario's host: domains of 1-8 vCPUs with mixed demands, about 1.5 vCPUs per pCPU.
fn build(sc: &Scenario) -> SimHost {
    let mut rng = Rng(sc.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut host = SimHost::new(sc.pcpus);
    host.reports_delay = sc.delay;
    let target = (sc.pcpus as usize * 3).div_ceil(2).max(2);
    let all: Vec<u32> = (0..sc.pcpus).collect();
    let mut n = 0usize;
    let mut dom = 1u8;
    while n < target {
        let k = (1 + rng.below(8) as usize).min(target - n);
        let vcpus: Vec<(f64, Vec<u32>)> = (0..k)
            .map(|_| {
                let demand = mixed_demand(&mut rng);
                let pins = match sc.start {
                    Start::Crowded => vec![0],
                    Start::Random => vec![rng.below(u64::from(sc.pcpus)) as u32],
                    Start::Unpinned => all.clone(),
                };
                (demand, pins)
            })
            .collect();
        let spec: Vec<(f64, &[u32])> = vcpus.iter().map(|(d, p)| (*d, p.as_slice())).collect();
        host.add(dom, &spec);
        dom = dom.wrapping_add(1).max(1);
        n += k;
    }
    host
}

/// A vCPU's demand in the scenarios' mix: 3 in 10 busy (60-100 %), 4 in 10 half busy (20-60 %),
/// the rest light (0-20 %).
pub(crate) fn mixed_demand(rng: &mut Rng) -> f64 {
    match rng.below(10) {
        0..=2 => rng.range(60.0, 100.0),
        3..=6 => rng.range(20.0, 60.0),
        _ => rng.range(0.0, 20.0),
    }
}

/// Redraw the demand of about a fifth of the vCPUs.
fn shake(host: &mut SimHost, seed: u64) {
    let mut rng = Rng(seed ^ 0xABCD_EF01_2345_6789);
    for v in host.domains.iter_mut().flat_map(|d| &mut d.vcpus) {
        if rng.below(5) == 0 {
            v.demand = rng.range(0.0, 100.0);
        }
    }
}

fn spread(u: &[f64]) -> f64 {
    vmbalance::report::spread(u.iter().copied())
}

fn cv(u: &[f64]) -> f64 {
    let mean = u.iter().sum::<f64>() / u.len() as f64;
    let var = u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / u.len() as f64;
    if mean > 0.0 { var.sqrt() / mean } else { 0.0 }
}

/// The best partition we can find offline: longest-processing-time first on the demands, pCPU
/// usage capped at 100 %. Returns its usage spread.
fn offline_best(host: &SimHost) -> f64 {
    let mut demands: Vec<f64> = host
        .domains
        .iter()
        .flat_map(|d| d.vcpus.iter().map(|v| v.demand))
        .collect();
    demands.sort_by(|a, b| b.total_cmp(a));
    let mut load = vec![0.0f64; host.present as usize];
    for d in demands {
        let p = (0..load.len())
            .min_by(|&a, &b| load[a].total_cmp(&load[b]))
            .unwrap();
        load[p] += d;
    }
    spread(&load.iter().map(|l: &f64| l.min(100.0)).collect::<Vec<_>>())
}

/// Lower bound on pin changes from the starting layout: every unpinned vCPU once; otherwise, with
/// demands as the truth and a fair share of mean + threshold/2 per pCPU, every over-full pCPU must
/// shed at least as many vCPUs as it takes (largest first) to fit, and every pCPU under mean −
/// threshold/2 must receive at least one.
fn change_lower_bound(host: &SimHost, threshold: f64) -> usize {
    let unpinned = host
        .domains
        .iter()
        .flat_map(|d| &d.vcpus)
        .filter(|v| v.affinity.len() > 1)
        .count();
    if unpinned > 0 {
        return unpinned;
    }
    let mut on: Vec<Vec<f64>> = vec![Vec::new(); host.present as usize];
    for v in host.domains.iter().flat_map(|d| &d.vcpus) {
        on[v.affinity[0] as usize].push(v.demand);
    }
    let loads: Vec<f64> = on
        .iter()
        .map(|d| d.iter().sum::<f64>().min(100.0))
        .collect();
    let total: f64 = on.iter().flatten().sum();
    let fair = (total / on.len() as f64).min(100.0);
    let mut shed = 0;
    for demands in &mut on {
        demands.sort_by(|a, b| b.total_cmp(a));
        let mut sum: f64 = demands.iter().sum();
        for d in demands.iter() {
            if sum.min(100.0) <= fair + threshold / 2.0 || sum <= fair + threshold / 2.0 {
                break;
            }
            sum -= d;
            shed += 1;
        }
    }
    let under = loads
        .iter()
        .filter(|&&l| l < fair - threshold / 2.0)
        .count();
    shed.max(under)
}

/// Is `a` at least as balanced as `b`: spread and stdev/mean both no larger (to rounding)?
fn as_balanced(a: &Outcome, b: &Outcome) -> bool {
    a.spread <= b.spread + 0.05 && a.cv <= b.cv + 0.0005
}

struct Outcome {
    cycles_to_settle: usize,
    changes: usize,
    spread: f64,
    cv: f64,
    /// Share of the demand served at the end, in percent.
    served: f64,
}

/// Run `cycles` cycles of `planner` on the scenario; demands change at cycle `shake_at`.
/// Settling = the last cycle that changed a pin, before the shake.
fn run(
    sc: &Scenario,
    make: fn() -> Scheduler,
    cycles: usize,
    shake_at: usize,
) -> (Outcome, Outcome) {
    let mut host = build(sc);
    let mut s = make();
    let period = Duration::from_secs(3);
    let mut phase = [(0usize, 0usize), (0, 0)];
    let mut first = None;
    for c in 0..cycles {
        if c == shake_at {
            first = Some(outcome(&host, phase[0]));
            shake(&mut host, sc.seed);
        }
        let i = usize::from(c >= shake_at);
        let before = host.pins;
        s.cycle(&mut host).unwrap();
        let changed = host.pins - before;
        if changed > 0 {
            phase[i].0 = c + 1 - if i == 1 { shake_at } else { 0 };
            phase[i].1 += changed;
        }
        host.advance(period);
    }
    (first.unwrap(), outcome(&host, phase[1]))
}

fn outcome(host: &SimHost, (settle, changes): (usize, usize)) -> Outcome {
    let u = host.pcpu_usage();
    Outcome {
        cycles_to_settle: settle,
        changes,
        spread: spread(&u),
        cv: cv(&u),
        served: served(host),
    }
}

/// The share of the CPU time the vCPUs want that they get, in percent: what balancing is for.
fn served(host: &SimHost) -> f64 {
    let wanted: f64 = host
        .domains
        .iter()
        .flat_map(|d| d.vcpus.iter().map(|v| v.demand))
        .sum();
    let got: f64 = host.pcpu_usage().iter().sum();
    if wanted > 0.0 {
        100.0 * got / wanted
    } else {
        100.0
    }
}

pub(crate) fn vcpu_quality(delay: bool) {
    let what = if delay {
        "run-queue delay reported, as QEMU does"
    } else {
        "usage only, no delay reported"
    };
    println!(
        "## vCPU policy: ours vs the baseline's, on the simulated host ({what}; threshold 10)\n"
    );
    println!(
        "Each scenario runs 80 cycles; at cycle 40 a fifth of the vCPUs change demand. `settle` is the"
    );
    println!(
        "cycle of the last pin change in that phase (1 = the first cycle, which only samples);"
    );
    println!(
        "`spread` and `cv` are the pCPU usage spread (points) and stdev/mean at the end of the phase;"
    );
    println!(
        "`best` is the spread of the best partition found offline (LPT on demands); `lb` is a lower"
    );
    println!("bound on the pin changes needed from the starting layout.\n");
    println!(
        "| pCPUs | start | lb | ours: settle / changes / spread / cv | baseline: settle / changes / spread / cv | best | after shake, ours | after shake, baseline |"
    );
    println!("| ---: | --- | ---: | --- | --- | ---: | --- | --- |");
    let (mut slower, mut dearer, mut dearer_but_better) = (Vec::new(), Vec::new(), Vec::new());
    let (mut equal_rows, mut worse_at_equal, mut dearer_to_match) =
        (Vec::new(), Vec::new(), Vec::new());
    for &pcpus in &[2u32, 4, 8, 16, 32, 64] {
        for (k, start) in [Start::Crowded, Start::Random, Start::Unpinned]
            .into_iter()
            .enumerate()
        {
            let sc = Scenario {
                pcpus,
                start,
                seed: u64::from(pcpus) * 31 + k as u64,
                delay,
            };
            let host = build(&sc);
            let lb = change_lower_bound(&host, 10.0);
            let best = offline_best(&host);
            let (o1, o2) = run(&sc, ours, 80, 40);
            let (s1, s2) = run(&sc, seed, 80, 40);
            let cell = |o: &Outcome| {
                format!(
                    "{} / {} / {:.1} / {:.3}",
                    o.cycles_to_settle, o.changes, o.spread, o.cv
                )
            };
            println!(
                "| {pcpus} | {start:?} | {lb} | {} | {} | {best:.1} | {} | {} |",
                cell(&o1),
                cell(&s1),
                cell(&o2),
                cell(&s2)
            );
            if o1.cycles_to_settle > s1.cycles_to_settle {
                slower.push(format!("{pcpus} pCPUs {start:?}"));
            }
            // Pin changes against balance: ours held to the seed's number of changes, and the
            // fewest changes with which ours gets at least as balanced as the seed ends.
            let within = ours_within(&sc, s1.changes);
            let to_match = (0..=o1.changes.max(s1.changes))
                .find(|&k| as_balanced(&ours_within(&sc, k), &s1))
                .map_or("never".to_string(), |k| k.to_string());
            equal_rows.push(format!(
                "| {pcpus} | {start:?} | {} / {:.1} / {:.3} / {:.1} | {} / {:.1} / {:.3} / {:.1} | {to_match} | {} / {:.1} |",
                s1.changes,
                s1.spread,
                s1.cv,
                s1.served,
                within.changes,
                within.spread,
                within.cv,
                within.served,
                o1.changes,
                o1.served
            ));
            if !as_balanced(&within, &s1) {
                worse_at_equal.push(format!(
                    "{pcpus} pCPUs {start:?} ({:.1} / {:.3} vs {:.1} / {:.3})",
                    within.spread, within.cv, s1.spread, s1.cv
                ));
            }
            if to_match.parse::<usize>().map_or(true, |k| k > s1.changes) {
                dearer_to_match.push(format!(
                    "{pcpus} pCPUs {start:?} ({to_match} vs {})",
                    s1.changes
                ));
            }
            if o1.changes > s1.changes {
                let what = if as_balanced(&o1, &s1) {
                    &mut dearer_but_better
                } else {
                    &mut dearer
                };
                what.push(format!(
                    "{pcpus} pCPUs {start:?} ({} vs {})",
                    o1.changes, s1.changes
                ));
            }
        }
    }
    let list = |v: &Vec<String>| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!("\nFirst phase, ours against the baseline's:");
    println!("- settled later: {}", list(&slower));
    println!(
        "- more pin changes, ending less balanced (spread or cv): {}",
        list(&dearer)
    );
    println!(
        "- more pin changes, ending at least as balanced (spread and cv): {}\n",
        list(&dearer_but_better)
    );
    println!(
        "Pin changes for the same balance (first phase): ours run again with a total budget of pin"
    );
    println!(
        "changes (`--max-changes`, summed over the cycles): held to the baseline's number of changes, and"
    );
    println!(
        "with the fewest changes that end at least as balanced as the baseline (spread and cv no larger).\n"
    );
    println!("`served` is the share of the CPU time the vCPUs want that they get, in percent.\n");
    println!(
        "| pCPUs | start | baseline: changes / spread / cv / served | ours within the baseline's changes: changes / spread / cv / served | ours: fewest changes to be as balanced as the baseline | ours unlimited: changes / served |"
    );
    println!("| ---: | --- | --- | --- | ---: | --- |");
    for row in &equal_rows {
        println!("{row}");
    }
    println!();
    println!(
        "- ours less balanced than the baseline with the baseline's changes: {}",
        list(&worse_at_equal)
    );
    println!(
        "- ours needs more changes than the baseline to be as balanced: {}\n",
        list(&dearer_to_match)
    );
}

/// How demand moves over time in [`vcpu_stability`].
#[derive(Clone, Copy, Debug)]
enum Trace {
    /// Demands never change; only the sampler's view of them moves.
    Constant,
    /// Demands hold their level, but each period every vCPU wants up to ±10 points more or less.
    Swinging,
    /// A third of the vCPUs alternate between busy and idle every 10 cycles.
    OnOff,
    /// Every vCPU's demand takes a random step of up to ±5 points each cycle.
    RandomWalk,
}

/// Cycles before demand starts changing in [`vcpu_stability`]: enough for every policy to settle,
/// even one pin change every other cycle.
const WARM_UP: usize = 100;

/// Pin changes and balance over 200 cycles of changing demand, ours (default, with a change
/// budget, with a larger threshold) against the seed's, on a 16-pCPU host that starts unpinned
/// and is given [`WARM_UP`] cycles of steady demand to settle.
pub(crate) fn vcpu_stability() {
    println!(
        "## vCPU policy under changing demand (16 pCPUs, delay reported, 200 cycles after settling)\n"
    );
    println!(
        "`changes` counts pin changes over the 200 cycles; `spread` is the mean pCPU usage spread over them;"
    );
    println!("`served` the mean share of the CPU time the vCPUs want that they get, in percent.\n");
    println!(
        "| demand trace | ours: changes / spread / served | ours, `--window 5` | ours, `--max-changes 1` | ours, `--threshold 20` | baseline: changes / spread / served |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for trace in [
        Trace::Constant,
        Trace::Swinging,
        Trace::OnOff,
        Trace::RandomWalk,
    ] {
        let cell = |make: fn() -> Scheduler| {
            let sc = Scenario {
                pcpus: 16,
                start: Start::Unpinned,
                seed: 77,
                delay: true,
            };
            let mut host = build(&sc);
            let mut rng = Rng(991);
            let base: Vec<f64> = host
                .domains
                .iter()
                .flat_map(|d| d.vcpus.iter().map(|v| v.demand))
                .collect();
            let mut s = make();
            let (mut changes, mut spread_sum, mut served_sum) = (0usize, 0.0, 0.0);
            for c in 0..300 {
                if c == WARM_UP && matches!(trace, Trace::Swinging) {
                    host.jitter = 10.0;
                }
                if c >= WARM_UP {
                    for (i, v) in host
                        .domains
                        .iter_mut()
                        .flat_map(|d| &mut d.vcpus)
                        .enumerate()
                    {
                        match trace {
                            Trace::Constant => {}
                            Trace::Swinging => {}
                            Trace::OnOff if i % 3 == 0 => {
                                v.demand = if (c / 10) % 2 == 0 { base[i] } else { 0.0 };
                            }
                            Trace::OnOff => {}
                            Trace::RandomWalk => {
                                v.demand = (v.demand + rng.range(-5.0, 5.0)).clamp(0.0, 100.0);
                            }
                        }
                    }
                }
                let before = host.pins;
                s.cycle(&mut host).unwrap();
                host.advance(Duration::from_secs(3));
                if c >= WARM_UP {
                    changes += host.pins - before;
                    spread_sum += spread(&host.pcpu_usage());
                    served_sum += served(&host);
                }
            }
            format!(
                "{changes} / {:.1} / {:.1}",
                spread_sum / 200.0,
                served_sum / 200.0
            )
        };
        println!(
            "| {trace:?} | {} | {} | {} | {} | {} |",
            cell(ours),
            cell(ours_window_5),
            cell(ours_one_change_a_cycle),
            cell(ours_threshold_20),
            cell(seed)
        );
    }
    println!();
}

/// One short scenario (4 pCPUs, every vCPU crowded on one): the pin changes ours makes. `cargo
/// test` runs it, unoptimized, to check the bench still runs.
pub(crate) fn smoke_run() -> usize {
    let sc = Scenario {
        pcpus: 4,
        start: Start::Crowded,
        seed: 1,
        delay: true,
    };
    run(&sc, ours, 10, 5).0.changes
}
