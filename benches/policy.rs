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

#[path = "../tests/common/sim.rs"]
#[allow(dead_code)]
mod sim;

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sim::{Rng, SimHost, SimMemory, smt_capabilities};
use vmbalance::coordinator::Coordinator;
use vmbalance::cpu_plan::{CpuPlan, CpuPolicy, PinMove, plan};
use vmbalance::host::{DomainId, HostMemory};
use vmbalance::mem_plan::{self, MemPlan, MemPolicy, MemSnapshot};
use vmbalance::report::GuestState;
use vmbalance::sampling::{Allowed, CpuSnapshot, GuestMemory, VcpuKey, VcpuLoad, pcpu_usage};
use vmbalance::scheduler::Scheduler;

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
fn ours() -> Scheduler {
    Scheduler::new(CpuPolicy::default(), false)
}

/// The real scheduler cycle with the seed's planner, deciding in every cycle as the seed did.
fn seed() -> Scheduler {
    Scheduler::with_planner(CpuPolicy::default(), false, seed_plan)
        .with_window(1)
        .without_settling()
}

/// Ours with `--max-changes 1`.
fn ours_one_change_a_cycle() -> Scheduler {
    Scheduler::new(
        CpuPolicy {
            max_changes: Some(1),
            ..CpuPolicy::default()
        },
        false,
    )
}

/// Ours with `--window 5`.
fn ours_window_5() -> Scheduler {
    Scheduler::new(CpuPolicy::default(), false).with_window(5)
}

/// Ours with `--threshold 20`.
fn ours_threshold_20() -> Scheduler {
    Scheduler::new(
        CpuPolicy {
            threshold: 20.0,
            ..CpuPolicy::default()
        },
        false,
    )
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
    Scheduler::with_planner(CpuPolicy::default(), false, budgeted_plan)
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
fn mixed_demand(rng: &mut Rng) -> f64 {
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

fn vcpu_quality(delay: bool) {
    let what = if delay {
        "run-queue delay reported, as QEMU does"
    } else {
        "usage only, no delay reported"
    };
    println!("## vCPU policy: ours vs the seed's, on the simulated host ({what}; threshold 10)\n");
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
        "| pCPUs | start | lb | ours: settle / changes / spread / cv | seed: settle / changes / spread / cv | best | after shake, ours | after shake, seed |"
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
    println!("\nFirst phase, ours against the seed's:");
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
        "changes (`--max-changes`, summed over the cycles): held to the seed's number of changes, and"
    );
    println!(
        "with the fewest changes that end at least as balanced as the seed (spread and cv no larger).\n"
    );
    println!("`served` is the share of the CPU time the vCPUs want that they get, in percent.\n");
    println!(
        "| pCPUs | start | seed: changes / spread / cv / served | ours within the seed's changes: changes / spread / cv / served | ours: fewest changes to be as balanced as the seed | ours unlimited: changes / served |"
    );
    println!("| ---: | --- | --- | --- | ---: | --- |");
    for row in &equal_rows {
        println!("{row}");
    }
    println!();
    println!(
        "- ours less balanced than the seed with the seed's changes: {}",
        list(&worse_at_equal)
    );
    println!(
        "- ours needs more changes than the seed to be as balanced: {}\n",
        list(&dearer_to_match)
    );
}

/// The seed's memory planner, for comparison (a reference implementation of its rules): a guest
/// is starving under 15 % MemFree while consuming, wasting over 50 % while not; starving guests,
/// most starved first, get twice a period's consumption (at least one minimum step), from wasting
/// guests first and then from the host down to its reserve, in the same cycle; with nobody
/// starving, wasting guests give a quarter of their excess back until they are no longer wasting.
/// No account of what guests may still touch, of balloons that do not follow or free nothing.
fn seed_mem_plan(s: &MemSnapshot, p: &MemPolicy) -> (MemPlan, Vec<String>) {
    let guests = &s.guests;
    let unused_pct = |g: &GuestMemory| 100.0 * g.unused_kib as f64 / g.actual_kib.max(1) as f64;
    let used = |g: &GuestMemory| g.actual_kib.saturating_sub(g.unused_kib);
    let keep = |g: &GuestMemory| {
        let frac = (p.starve_pct + p.waste_pct) / 200.0;
        let floor = p.min_guest_kib.max(used(g) + p.min_step_kib);
        floor.max((used(g) as f64 / (1.0 - frac)).ceil() as u64)
    };
    let consuming = |g: &GuestMemory| g.rate_kib_s > p.consuming_kib_s;
    let starving = |g: &GuestMemory| consuming(g) && unused_pct(g) < p.starve_pct;
    let wasting = |g: &GuestMemory| !consuming(g) && unused_pct(g) > p.waste_pct;
    let mut target: Vec<u64> = guests.iter().map(|g| g.actual_kib).collect();
    let mut givers: Vec<(usize, u64)> = (0..guests.len())
        .filter(|&i| wasting(&guests[i]))
        .map(|i| {
            let g = &guests[i];
            (i, g.actual_kib.saturating_sub(keep(g)).min(p.max_step_kib))
        })
        .collect();
    givers.sort_by(|a, b| unused_pct(&guests[b.0]).total_cmp(&unused_pct(&guests[a.0])));
    let mut hungry: Vec<usize> = (0..guests.len())
        .filter(|&i| starving(&guests[i]))
        .collect();
    hungry.sort_by(|&a, &b| unused_pct(&guests[a]).total_cmp(&unused_pct(&guests[b])));
    let mut budget = p.host_budget_kib(s.host, 0);
    for &i in &hungry {
        let g = &guests[i];
        let mut want = ((g.rate_kib_s * p.period_secs * 2.0).ceil() as u64)
            .max(p.min_step_kib)
            .min(p.max_step_kib)
            .min(g.max_kib.saturating_sub(g.actual_kib));
        for (giver, can) in givers.iter_mut() {
            let take = want.min(*can);
            *can -= take;
            target[*giver] -= take;
            target[i] += take;
            want -= take;
        }
        let from_host = want.min(budget);
        budget -= from_host;
        target[i] += from_host;
    }
    if hungry.is_empty() {
        for &(i, can) in &givers {
            let excess = guests[i].actual_kib.saturating_sub(keep(&guests[i]));
            let step = ((excess as f64 * p.return_fraction).ceil() as u64)
                .max(p.min_step_kib)
                .min(can);
            if step >= 1024 {
                target[i] -= step;
            }
        }
    }
    (
        MemPlan {
            changes: mem_plan::changes_to(guests, &target),
            ..MemPlan::default()
        },
        Vec::new(),
    )
}

/// Who decides the balloons in a memory trace.
#[derive(Clone, Copy, PartialEq)]
enum MemRunner {
    Ours,
    Seed,
    Nobody,
}

/// One memory trace: a host, the guests that grow ("hogs", the first `hogs` guests) and when.
struct MemTrace {
    name: &'static str,
    host: fn() -> SimHost,
    hogs: usize,
    /// Workloads started at a cycle: (cycle, guest, rate MiB/s, goal MiB of use).
    work: &'static [(usize, usize, f64, u64)],
    cycles: usize,
}

const MIB_KIB: u64 = 1024;

/// Guests of `sizes` (balloon, max, used MiB) on a 8 GiB host, with `spare_mib` above what backing
/// every guest's whole balloon and the reserve would leave (`None`: 1 GiB for the host itself).
fn mem_host(sizes: &[(u64, u64, u64)], touched: bool, spare_mib: Option<u64>) -> SimHost {
    let mut host = SimHost::new(2);
    host.host_total = 8192 * MIB_KIB;
    for (i, &(actual, max, used)) in sizes.iter().enumerate() {
        host.add_guest(
            i as u8 + 1,
            SimMemory::new(actual * MIB_KIB, max * MIB_KIB, used * MIB_KIB),
        );
        if touched {
            host.domains[i].mem.resident = (actual * MIB_KIB) as f64;
        }
    }
    host.host_used = match spare_mib {
        None => 1024 * MIB_KIB,
        Some(spare) => {
            let balloons: u64 = host.domains.iter().map(|d| d.mem.actual).sum();
            let reserve = host.host_total / 20;
            host.host_total - balloons - reserve - spare * MIB_KIB
        }
    };
    host
}

/// What one policy did on one trace.
#[derive(Default)]
struct MemOutcome {
    ooms: u32,
    host_low_over_reserve_mib: i64,
    footprint_end: u64,
    footprint_peak: u64,
    used_end: u64,
    used_peak: u64,
    hog_low_free_pct: f64,
    hog_ahead: u64,
    hog_got: Vec<u64>,
    longest_wait: Vec<usize>,
}

fn run_mem_trace(t: &MemTrace, runner: MemRunner) -> MemOutcome {
    let mut host = (t.host)();
    let policy = MemPolicy {
        period_secs: 2.0,
        ..MemPolicy::default()
    };
    let mut c = Coordinator::new(policy, false);
    if runner == MemRunner::Seed {
        c = c.with_planner(seed_mem_plan);
    }
    let reserve = (host.host_total as f64 * policy.host_reserve_pct / 100.0) as u64;
    let start: Vec<u64> = host.domains.iter().map(|d| d.mem.actual).collect();
    let mut o = MemOutcome {
        hog_low_free_pct: 100.0,
        hog_got: vec![0; t.hogs],
        longest_wait: vec![0; t.hogs],
        ..MemOutcome::default()
    };
    let mut wait = vec![0; t.hogs];
    for cycle in 0..t.cycles {
        for &(at, guest, rate, goal) in t.work {
            if at == cycle {
                host.domains[guest].mem.work(rate * 1024.0, goal * MIB_KIB);
            }
        }
        let before: Vec<u64> = host.domains.iter().map(|d| d.mem.actual).collect();
        if runner != MemRunner::Nobody {
            let report = c.cycle(&mut host).unwrap().unwrap();
            for h in 0..t.hogs {
                let starving = matches!(
                    report.guests[h].state,
                    GuestState::Starving | GuestState::StarvingBehind
                );
                if host.domains[h].mem.actual > before[h] {
                    wait[h] = 0;
                } else if starving {
                    wait[h] += 1;
                    o.longest_wait[h] = o.longest_wait[h].max(wait[h]);
                }
            }
        }
        host.advance(Duration::from_secs(2));
        let footprint: u64 = host.domains.iter().map(|d| d.mem.actual).sum();
        let used: u64 = host.domains.iter().map(|d| d.mem.used as u64).sum();
        o.footprint_peak = o.footprint_peak.max(footprint);
        o.used_peak = o.used_peak.max(used);
        o.footprint_end = footprint;
        o.used_end = used;
        for ((d, &was), got) in host.domains.iter().zip(&start).zip(&mut o.hog_got) {
            let m = &d.mem;
            if m.rate > 0.0 && m.used < m.goal {
                let free = 100.0 * (1.0 - m.used / m.actual as f64);
                o.hog_low_free_pct = o.hog_low_free_pct.min(free);
                if m.actual > was {
                    o.hog_ahead = o.hog_ahead.max(m.actual.saturating_sub(m.used as u64));
                }
            }
            *got = (*got).max(m.actual.saturating_sub(was));
        }
    }
    o.ooms = host.domains.iter().map(|d| d.mem.ooms).sum();
    o.host_low_over_reserve_mib = (host.host_low as i64 - reserve as i64) / 1024;
    o
}

fn memory_quality() {
    println!("## Memory policy on simulated traces (period 2 s)\n");
    println!(
        "Ours against a reference implementation of the seed's policy and against no coordinator at"
    );
    println!(
        "all, each run with the real coordinator cycle on the same simulated host, whose guests are"
    );
    println!(
        "OOM-killed when their use outgrows their balloon and whose host backs only the pages guests"
    );
    println!("touched. `host low` is the least the host had above its reserve, at any instant");
    println!(
        "(negative: under it); `footprint` what all guests hold, against what they `use`, at the end"
    );
    println!(
        "and at the peak; `hog low` the least free share of a growing guest while it grows, `ahead`"
    );
    println!("the most its balloon ran ahead of its use while it lived on grants; `got`");
    println!(
        "what each hog was given at most; `wait` the longest run of cycles each hog stayed STARVING"
    );
    println!("without being given memory. Sizes in MiB.\n");
    println!(
        "| trace | policy | OOM kills | host low | footprint end / peak | use end / peak | hog low | ahead | got | wait |"
    );
    println!("| --- | --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |");
    let traces = [
        MemTrace {
            name: "issue #16: four guests at 512 of 1024, one grows by 600 at 10 MiB/s (120 s)",
            host: || mem_host(&[(512, 1024, 160); 4], false, None),
            hogs: 1,
            work: &[(5, 0, 10.0, 760)],
            cycles: 65,
        },
        MemTrace {
            name: "one hog 40 MiB/s to 1.8 GiB from the start beside two idle, frees it at cycle 140",
            host: || mem_host(&[(512, 2048, 100); 3], false, None),
            hogs: 1,
            work: &[(2, 0, 40.0, 1843), (140, 0, -200.0, 100)],
            cycles: 240,
        },
        MemTrace {
            name: "a guest idle at its target bursts at 40 MiB/s to 1 GiB (cycle 40) beside two idle",
            host: || mem_host(&[(512, 2048, 100); 3], false, None),
            hogs: 1,
            work: &[(40, 0, 40.0, 1024)],
            cycles: 100,
        },
        MemTrace {
            name: "a wasting guest whose balloon frees nothing; host 100 above its reserve",
            host: || {
                let mut h = mem_host(&[(1024, 2048, 120), (1024, 2048, 150)], true, Some(100));
                h.domains[1].mem.frees_nothing = true;
                h
            },
            hogs: 1,
            work: &[(3, 0, 40.0, 1800)],
            cycles: 60,
        },
        MemTrace {
            name: "a guest keeping its `actual` fixed beside two honest hogs; host 1.5 GiB spare",
            host: || {
                let mut h = mem_host(&[(1024, 2048, 120); 3], true, Some(1536));
                h.domains[2].mem.claims_actual = Some(1024 * MIB_KIB);
                h
            },
            hogs: 3,
            work: &[(3, 0, 10.0, 1500), (3, 1, 10.0, 1500), (3, 2, 40.0, 2000)],
            cycles: 150,
        },
        MemTrace {
            name: "two hogs with equal need; host 600 spare",
            host: || mem_host(&[(1024, 2048, 120); 2], true, Some(600)),
            hogs: 2,
            work: &[(3, 0, 20.0, 2000), (3, 1, 20.0, 2000)],
            cycles: 80,
        },
        MemTrace {
            name: "host near its reserve: fresh guests could take 1.2 GiB more, host has 300",
            host: || {
                let mut h = mem_host(&[(512, 2048, 100); 3], false, Some(300));
                h.host_used += (3 * 412 - 300) * MIB_KIB;
                h
            },
            hogs: 1,
            work: &[(3, 0, 20.0, 1500)],
            cycles: 80,
        },
    ];
    for t in &traces {
        for (runner, label) in [
            (MemRunner::Ours, "ours"),
            (MemRunner::Seed, "seed"),
            (MemRunner::Nobody, "none"),
        ] {
            let o = run_mem_trace(t, runner);
            let list = |v: &[u64]| {
                v.iter()
                    .map(|x| (x / MIB_KIB).to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let waits = o
                .longest_wait
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join(" / ");
            println!(
                "| {} | {label} | {} | {} | {} / {} | {} / {} | {:.1} % | {} | {} | {} |",
                t.name,
                o.ooms,
                o.host_low_over_reserve_mib,
                o.footprint_end / MIB_KIB,
                o.footprint_peak / MIB_KIB,
                o.used_end / MIB_KIB,
                o.used_peak / MIB_KIB,
                o.hog_low_free_pct,
                o.hog_ahead / MIB_KIB,
                list(&o.hog_got),
                if runner == MemRunner::Nobody {
                    "-".into()
                } else {
                    waits
                }
            );
        }
    }
    println!();
}

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
                    key: VcpuKey {
                        domain: DomainId([(i / 4 % 251) as u8; 16]),
                        vcpu: i as u32,
                    },
                    usage: Some(
                        rng.range(0.0, 100.0 * f64::from(pcpus) / vcpus as f64 * 2.0)
                            .min(100.0),
                    ),
                    demand: None,
                    pinned: Some(p),
                    last_pcpu: Some(p),
                    usage_swing: None,
                    demand_swing: None,
                    allowed: Allowed::Any,
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
                }
            })
            .collect(),
        host: Some(HostMemory {
            total_kib: 1 << 30,
            available_kib: 1 << 28,
        }),
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

fn decision_cost() {
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
fn vcpu_stability() {
    println!(
        "## vCPU policy under changing demand (16 pCPUs, delay reported, 200 cycles after settling)\n"
    );
    println!(
        "`changes` counts pin changes over the 200 cycles; `spread` is the mean pCPU usage spread over them;"
    );
    println!("`served` the mean share of the CPU time the vCPUs want that they get, in percent.\n");
    println!(
        "| demand trace | ours: changes / spread / served | ours, `--window 5` | ours, `--max-changes 1` | ours, `--threshold 20` | seed: changes / spread / served |"
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
            d.memory_nodes = Some(vec![node]);
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
        TopoRunner::CrossNode => Some(ours().with_limits(None, true)),
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

fn vcpu_topology() {
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

fn main() {
    // `cargo bench` passes --bench. `cargo test --all-targets` also runs this binary, unoptimized:
    // there it only checks that one scenario runs, so the test suite stays quick.
    if !std::env::args().any(|a| a == "--bench") {
        let sc = Scenario {
            pcpus: 4,
            start: Start::Crowded,
            seed: 1,
            delay: true,
        };
        let (first, _) = run(&sc, ours, 10, 5);
        println!(
            "policy bench smoke run: 4 pCPUs crowded, {} pin changes; run `cargo bench --bench policy` for the figures",
            first.changes
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
