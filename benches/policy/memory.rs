//! Memory policy on simulated traces: ours against the seed's policy and no coordinator (OOMs,
//! waits, memory returned, reserve violations, footprint).

use std::time::Duration;

use crate::sim::{SimHost, SimMemory};
use vmbalance::coordinator::Coordinator;
use vmbalance::mem_plan::{self, MemPlan, MemPolicy, MemSnapshot};
use vmbalance::report::GuestState;
use vmbalance::sampling::GuestMemory;

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

pub(crate) fn memory_quality() {
    println!("## Memory policy on simulated traces (period 2 s)\n");
    println!(
        "Ours against a reference implementation of the baseline policy and against no coordinator at"
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
            (MemRunner::Seed, "baseline"),
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
