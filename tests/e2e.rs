//! End-to-end: the real daemons against real QEMU guests under libvirt (the lab).
//!
//! Run by `make e2e` (and so by `make test` and CI), which sets the lab up, runs these one at a time,
//! and tears it down. Outcomes are read from libvirt's own view (`virsh`), never from the code under
//! test, and judged over steady windows with margins that survive a noisy 2-core machine.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::{Daemon, Ended, Lab, Spec, balloon, pcpu_usage, pins, run, signal_qemu, virsh};
use serde_json::Value;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");
const COORDINATOR: &str = env!("CARGO_BIN_EXE_memory_coordinator");
const MIB: u64 = 1024;

fn online_pcpus() -> u32 {
    let info = virsh(&["nodeinfo"]);
    let line = info.lines().find(|l| l.starts_with("CPU(s):")).unwrap();
    line.split_whitespace().last().unwrap().parse().unwrap()
}

fn busy<'a>(name: &'a str, pin: &'a str) -> Spec<'a> {
    Spec {
        name,
        vcpus: 1,
        cur_mib: 192,
        max_mib: 192,
        pins: pin,
        work: "cpu,1,100",
    }
}

/// An idle one-vCPU guest of 512 MiB (its max too) on pCPU 1.
fn idle(name: &str) -> Spec<'_> {
    Spec {
        name,
        vcpus: 1,
        cur_mib: 512,
        max_mib: 512,
        pins: "1",
        work: "idle",
    }
}

fn spread(usage: &[f64]) -> f64 {
    vmbalance::report::spread(usage.iter().copied())
}

/// Changes (pins or resizes) a daemon made, per cycle, from its `--json` reports.
fn changes_per_cycle(reports: &[Value]) -> Vec<usize> {
    reports
        .iter()
        .map(|r| {
            r.get("moves")
                .or_else(|| r.get("changes"))
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .collect()
}

/// libvirt calls per cycle, from the `--json` reports.
fn calls_per_cycle(reports: &[Value]) -> Vec<u64> {
    reports
        .iter()
        .map(|r| r["libvirt_calls"].as_u64().unwrap())
        .collect()
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_spreads_busy_vcpus_crowded_on_one_pcpu_and_then_stays_put() {
    let p = online_pcpus();
    let names: Vec<String> = (0..2 * p).map(|i| format!("crowd{i}")).collect();
    let specs: Vec<Spec> = names.iter().map(|n| busy(n, "0")).collect();
    let _lab = Lab::guests(&specs);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let before = pcpu_usage(&names, p, Duration::from_secs(4));
    eprintln!("before: pCPU usage {before:.1?}");

    let started = Instant::now();
    let mut d = Daemon::start(SCHEDULER, &["--metrics-address", "127.0.0.1:0", "2"]);
    d.wait_cycles(2, Duration::from_secs(60));
    let time_to_balance = started.elapsed();
    d.wait_cycles(12, Duration::from_secs(120));
    let after = pcpu_usage(&names, p, Duration::from_secs(6));
    let metrics = scrape(&d.log());
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    let moves = changes_per_cycle(&reports);
    eprintln!(
        "after: pCPU usage {after:.1?} (spread {:.1}); pin changes per cycle {moves:?}; balanced {:.1} s after start",
        spread(&after),
        time_to_balance.as_secs_f64()
    );
    assert_eq!(code, Some(0));
    // Every pCPU runs two of the busy vCPUs: 2P - 2 must leave pCPU 0, all in one decision.
    assert_eq!(moves[1], (2 * p - 2) as usize, "{moves:?}");
    assert!(
        moves.iter().skip(2).all(|&m| m == 0),
        "moved again after balancing: {moves:?}"
    );
    let mut per_pcpu = vec![0; p as usize];
    for n in &names {
        per_pcpu[pins(n)[0].unwrap() as usize] += 1;
    }
    assert!(per_pcpu.iter().all(|&c| c == 2), "{per_pcpu:?}");
    assert!(spread(&before) > 80.0);
    assert!(spread(&after) < 20.0, "{after:?}");
    // The metrics tell the same story: every pin change counted, each vCPU where virsh has it.
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("vmbalance_pin_changes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(counted as usize, moves.iter().sum::<usize>(), "{metrics}");
    for n in &names {
        let pcpu = pins(n)[0].unwrap();
        let domain = Lab::domain(n);
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("vmbalance_vcpu_pcpu{")
                    && l.contains(&format!("domain=\"{domain}\""))
                    && l.ends_with(&format!(" {pcpu}"))),
            "{domain} on pCPU {pcpu}:\n{metrics}"
        );
    }
}

/// Scrape the metrics of the daemon whose log is `log` (it serves them where its log says).
fn scrape(log: &str) -> String {
    let url = log
        .lines()
        .find_map(|l| l.split("serving metrics at ").nth(1))
        .expect("the daemon serves metrics")
        .trim()
        .to_string();
    ureq::get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_leaves_a_balanced_host_alone_however_its_usage_swings() {
    // Two half-busy guests per pCPU. Beside QEMU's own threads their usage swings by tens of points
    // from one second to the next, while their demand holds: balancing usage made 16 pin changes in
    // 40 cycles here; balancing demand must make none.
    let p = online_pcpus();
    let names: Vec<String> = (0..2 * p).map(|i| format!("even{i}")).collect();
    let pin_of = ["0", "1", "2", "3", "4", "5", "6", "7"];
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Spec {
            work: "cpu,1,50",
            ..busy(n, pin_of[i % p as usize % 8])
        })
        .collect();
    let _lab = Lab::guests(&specs);
    let pins_before: Vec<_> = names.iter().map(|n| pins(n)).collect();
    let mut d = Daemon::start(SCHEDULER, &["1"]);
    d.wait_cycles(25, Duration::from_secs(90));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0));
    assert!(changes_per_cycle(&reports).iter().all(|&m| m == 0), "{log}");
    let pins_after: Vec<_> = names.iter().map(|n| pins(n)).collect();
    assert_eq!(pins_before, pins_after);
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_follows_pin_changes_made_by_others_without_polling_pins() {
    // One busy guest per pCPU: balanced. Then someone else pins the second guest onto the first
    // one's pCPU. libvirt announces the change; the daemon sees it in its next sample and moves one
    // of the two back, and in no cycle does it re-read pins (2 libvirt calls per cycle).
    let p = online_pcpus();
    let names: Vec<String> = (0..p).map(|i| format!("own{i}")).collect();
    let pin_of = ["0", "1", "2", "3", "4", "5", "6", "7"];
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| busy(n, pin_of[i % 8]))
        .collect();
    let _lab = Lab::guests(&specs);
    let mut d = Daemon::start(SCHEDULER, &["-v", "1"]);
    d.wait_cycles(4, Duration::from_secs(60));
    virsh(&["vcpupin", &Lab::domain("own1"), "0", "0"]);
    let changed_after = d.cycles();
    d.wait_cycles(changed_after + 14, Duration::from_secs(90));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0));
    let moves = changes_per_cycle(&reports);
    let calls = calls_per_cycle(&reports);
    eprintln!(
        "external pin change after cycle {changed_after}; pin changes per cycle {moves:?}; libvirt calls per cycle {calls:?}"
    );
    assert_eq!(moves.len(), calls.len(), "{log}");
    assert!(
        log.contains("following vCPU pin changes through libvirt events"),
        "{log}"
    );
    assert_eq!(moves[..changed_after].iter().sum::<usize>(), 0, "{moves:?}");
    let after = &moves[changed_after..];
    assert_eq!(after.iter().sum::<usize>(), 1, "{moves:?}");
    let seen_in = after.iter().position(|&m| m > 0).unwrap() + 1;
    assert!(
        seen_in <= 2,
        "fixed only {seen_in} cycles after the change: {moves:?}"
    );
    for (cycle, (&m, &c)) in moves.iter().zip(&calls).enumerate().skip(1) {
        if m == 0 {
            assert_eq!(c, 2, "cycle {}: {c} libvirt calls: {calls:?}", cycle + 1);
        }
    }
    let mut per_pcpu = vec![0; p as usize];
    for n in &names {
        per_pcpu[pins(n)[0].unwrap() as usize] += 1;
    }
    assert!(per_pcpu.iter().all(|&k| k == 1), "pins end {per_pcpu:?}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_mixes_heavy_and_light_guests_and_survives_a_guest_destroyed_mid_run() {
    let specs = [
        Spec {
            name: "heavy0",
            vcpus: 1,
            cur_mib: 192,
            max_mib: 192,
            pins: "0",
            work: "cpu,1,90",
        },
        Spec {
            name: "heavy1",
            vcpus: 1,
            cur_mib: 192,
            max_mib: 192,
            pins: "0",
            work: "cpu,1,90",
        },
        Spec {
            name: "light0",
            vcpus: 1,
            cur_mib: 192,
            max_mib: 192,
            pins: "1",
            work: "cpu,1,20",
        },
        Spec {
            name: "light1",
            vcpus: 1,
            cur_mib: 192,
            max_mib: 192,
            pins: "1",
            work: "cpu,1,20",
        },
    ];
    let mut lab = Lab::guests(&specs);
    let mut d = Daemon::start(SCHEDULER, &["--metrics-address", "127.0.0.1:0", "2"]);
    d.wait_cycles(6, Duration::from_secs(60));
    let gone = format!("domain=\"{}\"", Lab::domain("light1"));
    assert!(scrape(&d.log()).contains(&gone));
    let pinned: Vec<u32> = ["heavy0", "heavy1", "light0", "light1"]
        .iter()
        .map(|n| pins(n)[0].unwrap())
        .collect();
    eprintln!("pins heavy0 heavy1 light0 light1: {pinned:?}");
    assert_ne!(pinned[0], pinned[1], "the heavy guests share a pCPU");
    assert_ne!(pinned[2], pinned[3], "the light guests share a pCPU");

    // A guest vanishes under the daemon: it carries on.
    lab.remove("light1");
    let seen = d.cycles();
    d.wait_cycles(seen + 3, Duration::from_secs(30));
    assert!(d.running());
    // Its series are gone from the metrics; the others are still there.
    let metrics = scrape(&d.log());
    assert!(!metrics.contains(&gone), "{metrics}");
    assert!(metrics.contains(&format!("domain=\"{}\"", Lab::domain("light0"))));
    let Ended { code, log, .. } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
}

/// The scheduler's fleet gauge, read `reads` times a cycle apart from the daemon `d`.
fn cpu_pressure_reads(d: &mut Daemon, reads: usize) -> Vec<f64> {
    let mut seen = d.cycles();
    (0..reads)
        .map(|_| {
            seen += 1;
            d.wait_cycles(seen, Duration::from_secs(30));
            let text = scrape(&d.log());
            text.lines()
                .find_map(|l| l.strip_prefix("vmbalance_cpu_pressure_ratio "))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no CPU pressure read:\n{text}"))
        })
        .collect()
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn the_fleet_gauge_reads_demand_two_pcpus_cannot_serve_and_zero_once_they_can() {
    // Four CPU-bound vCPUs on two pCPUs: however they are pinned, half their demand waits.
    if online_pcpus() != 2 {
        eprintln!("skipped: needs exactly two online pCPUs");
        return;
    }
    let names = ["press0", "press1", "press2", "press3"];
    let specs: Vec<Spec> = names.iter().map(|n| busy(n, "0-1")).collect();
    let mut lab = Lab::guests(&specs);
    let mut d = Daemon::start(SCHEDULER, &["--metrics-address", "127.0.0.1:0", "2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    let over = cpu_pressure_reads(&mut d, 6);
    eprintln!("four busy vCPUs on two pCPUs: CPU pressure {over:.3?}");
    // Above zero, and stable: a cluster scheduler acts on it without chasing noise.
    assert!(over.iter().all(|&p| p > 0.3 && p <= 1.0), "{over:?}");
    let (lo, hi) = over
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    assert!(hi - lo < 0.2, "{over:?}");
    // Two of them go (moved elsewhere, say): two busy vCPUs fit two pCPUs.
    lab.remove("press2");
    lab.remove("press3");
    let seen = d.cycles();
    d.wait_cycles(seen + 4, Duration::from_secs(60));
    let fits = cpu_pressure_reads(&mut d, 4);
    eprintln!("two busy vCPUs on two pCPUs: CPU pressure {fits:.3?}");
    let Ended { code, log, .. } = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(fits.iter().all(|&p| p == 0.0), "{fits:?}\n{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_sees_contention_that_usage_hides_and_fixes_it_in_one_move() {
    // Four CPU-bound guests pinned 3 + 1 on two pCPUs read ~100 % usage on both: "balanced" by
    // usage, while three vCPUs share one pCPU. Their run-queue delay shows it.
    if online_pcpus() != 2 {
        eprintln!(
            "this layout is for a 2-pCPU host; skipped on {} pCPUs",
            online_pcpus()
        );
        return;
    }
    let specs = [
        busy("cont0", "0"),
        busy("cont1", "0"),
        busy("cont2", "0"),
        busy("cont3", "1"),
    ];
    let _lab = Lab::guests(&specs);
    let names = ["cont0", "cont1", "cont2", "cont3"];
    let before = pcpu_usage(&names, 2, Duration::from_secs(4));
    let mut d = Daemon::start(SCHEDULER, &["2"]);
    d.wait_cycles(10, Duration::from_secs(90));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0));
    let moves = changes_per_cycle(&reports);
    eprintln!(
        "before: pCPU usage {before:.1?} (spread {:.1}); pin changes per cycle {moves:?}",
        spread(&before)
    );
    assert!(
        spread(&before) < 20.0,
        "usage should look balanced: {before:?}"
    );
    assert_eq!(reports[1]["basis"], "demand", "{}", reports[1]);
    assert_eq!(moves.iter().sum::<usize>(), 1, "{moves:?}");
    let mut per_pcpu = [0; 2];
    for n in names {
        per_pcpu[pins(n)[0].unwrap() as usize] += 1;
    }
    assert_eq!(per_pcpu, [2, 2]);
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn daemons_reconnect_when_libvirtd_restarts() {
    let _lab = Lab::guests(&[busy("phoenix", "0")]);
    let mut sched = Daemon::start(SCHEDULER, &["-v", "1"]);
    let mut coord = Daemon::start(COORDINATOR, &["-v", "1"]);
    sched.wait_cycles(3, Duration::from_secs(30));
    coord.wait_cycles(3, Duration::from_secs(30));
    // Steady cycles before the outage: the scheduler makes 2 libvirt calls (CPU map, bulk
    // statistics), the coordinator 2 when it resizes nothing (bulk statistics, host memory).
    for (d, what) in [(&sched, "scheduler"), (&coord, "coordinator")] {
        let reports = d.reports();
        let calls = calls_per_cycle(&reports);
        let changes = changes_per_cycle(&reports);
        for cycle in (1..3).filter(|&c| changes[c] == 0 && reports[c]["skipped"] == 0) {
            assert_eq!(calls[cycle], 2, "{what} cycle {}: {calls:?}", cycle + 1);
        }
    }
    let lab_sh = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/lab.sh");
    let restarted = std::process::Command::new(lab_sh)
        .args([
            "restart-libvirtd",
            common::lab::lab_dir().to_str().unwrap(),
            "3",
        ])
        .status()
        .unwrap();
    assert!(restarted.success());
    for d in [&mut sched, &mut coord] {
        let start = Instant::now();
        while !d.log().contains("reconnected to qemu:///system") {
            assert!(d.running(), "daemon exited:\n{}", d.log());
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no reconnection:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let seen = d.cycles();
        d.wait_cycles(seen + 2, Duration::from_secs(30));
    }
    for d in [sched, coord] {
        let Ended { code, log, .. } = d.stop();
        eprintln!("{log}");
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(log.matches("lost the connection").count(), 1, "{log}");
    }
}

/// Poll every `every` for `total`: (seconds, balloon size per guest in MiB, the first guest's
/// usable memory in MiB).
fn watch(names: &[&str], every: Duration, total: Duration) -> Vec<(f64, Vec<u64>, u64)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < total {
        let sizes = names.iter().map(|n| balloon(n).0 / MIB).collect();
        let usable = balloon(names[0]).2.unwrap_or(0) / MIB;
        out.push((start.elapsed().as_secs_f64(), sizes, usable));
        std::thread::sleep(every);
    }
    out
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_feeds_a_hog_shrinks_idle_guests_and_returns_memory_to_the_host() {
    let specs = [
        Spec {
            name: "hog",
            vcpus: 1,
            cur_mib: 256,
            max_mib: 1024,
            pins: "0",
            work: "idle",
        },
        idle("idle0"),
        idle("idle1"),
    ];
    let lab = Lab::guests(&specs);
    let names = ["hog", "idle0", "idle1"];
    let mut d = Daemon::start(COORDINATOR, &["2"]);
    // Stats are switched on in cycle 1; decisions start once two fresh reports are in.
    d.wait_cycles(4, Duration::from_secs(60));

    // 10 MiB/s up to 500 MiB: far past the hog's 256 MiB; hold 20 s, then free it all.
    lab.send("hog", "mem 10 500 20");
    let grow = watch(&names, Duration::from_secs(2), Duration::from_secs(70));
    let freed = lab.console_shows_within("hog", "workload: freed", Duration::from_secs(60));
    let shrink = watch(&names, Duration::from_secs(2), Duration::from_secs(40));
    let Ended { code, log, .. } = d.stop();
    eprintln!("{log}");
    for (t, sizes, usable) in grow.iter().chain(&shrink) {
        eprintln!(
            "t={t:5.1}s  hog {} MiB ({usable} MiB usable)  idle0 {} MiB  idle1 {} MiB",
            sizes[0], sizes[1], sizes[2]
        );
    }
    let tightest = grow.iter().map(|(_, _, usable)| *usable).min().unwrap();
    eprintln!("the hog's usable memory never fell under {tightest} MiB while it grew");
    let console = lab.console("hog");
    assert_eq!(code, Some(0));
    assert!(
        !console.contains("Out of memory") && !console.contains("Killed process"),
        "hog OOM:\n{console}"
    );
    assert!(
        console.contains("workload: reached 500 MiB") && freed,
        "{console}"
    );
    let peak = grow.iter().map(|(_, s, _)| s[0]).max().unwrap();
    assert!(peak >= 500, "hog peaked at {peak} MiB");
    let last = &shrink.last().unwrap().1;
    assert!(
        last[0] + 150 < peak,
        "hog kept its memory after freeing it: peak {peak}, now {}",
        last[0]
    );
    for (i, idle) in ["idle0", "idle1"].iter().enumerate() {
        let min = grow
            .iter()
            .chain(&shrink)
            .map(|(_, s, _)| s[i + 1])
            .min()
            .unwrap();
        // Down to what it uses (about 160 MiB) and its 256 MiB cushion.
        assert!(min < 450, "{idle} never shrank (min {min} MiB)");
        // The floor, and what the guest uses, hold.
        assert!(min >= 50, "{idle} under the floor: {min} MiB");
        let (actual, unused, _) = balloon(idle);
        assert!(
            unused.is_none_or(|u| u <= actual),
            "{idle}: unused {unused:?} > actual {actual}"
        );
    }
    assert!(!log.contains("breaks a limit"), "{log}");
}

/// Host memory the kernel can hand out (MemAvailable), KiB.
fn host_available_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Host physical memory, KiB.
fn host_total_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn guest_spec(name: &str) -> Spec<'_> {
    Spec {
        name,
        vcpus: 1,
        cur_mib: 512,
        max_mib: 1024,
        pins: "0-1",
        work: "idle",
    }
}

/// Every `every` for `total`: per guest (balloon size, usable memory), MiB, and the host's
/// available memory, KiB.
type Sample = (Vec<(u64, u64)>, u64);

fn sample_memory(names: &[&str], every: Duration, total: Duration) -> Vec<Sample> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < total {
        let guests = names
            .iter()
            .map(|n| {
                let (actual, _, usable) = balloon(n);
                (actual / MIB, usable.unwrap_or(0) / MIB)
            })
            .collect();
        out.push((guests, host_available_kib()));
        std::thread::sleep(every);
    }
    out
}

/// A guest's available memory in % of its balloon, from its (balloon size, usable memory).
fn avail_pct((actual, usable): (u64, u64)) -> f64 {
    100.0 * usable as f64 / actual.max(1) as f64
}

/// The least available share guest `i` of `run` had, in %.
fn lowest_avail(run: &[Sample], i: usize) -> f64 {
    run.iter()
        .map(|(g, _)| avail_pct(g[i]))
        .fold(100.0, f64::min)
}

/// Print each sample of `run`: every guest's balloon and available share.
fn print_memory_run(names: &[&str], run: &[Sample]) {
    for (guests, _) in run {
        let line: Vec<String> = names
            .iter()
            .zip(guests)
            .map(|(n, &g)| format!("{n} {} MiB ({:.0} % avail)", g.0, avail_pct(g)))
            .collect();
        eprintln!("{}", line.join("  "));
    }
}

fn assert_no_oom(lab: &Lab, name: &str) {
    let console = lab.console(name);
    assert!(
        !console.contains("Out of memory") && !console.contains("Killed process"),
        "{name} OOM:\n{console}"
    );
}

/// Guest `name`'s line in each cycle report that has one, in order.
fn guest_lines<'a>(reports: &'a [Value], name: &str) -> impl Iterator<Item = &'a Value> {
    let domain = Lab::domain(name);
    reports
        .iter()
        .flat_map(|r| r["guests"].as_array().unwrap().iter())
        .filter(move |g| g["domain"] == domain.as_str())
}

/// The fastest consumption the coordinator reported for guest `name` over the run, MiB/s.
fn fastest_rate(reports: &[Value], name: &str) -> f64 {
    guest_lines(reports, name)
        .filter_map(|g| g["rate_mib_s"].as_f64())
        .fold(0.0f64, f64::max)
}

/// How many times guest `name` was read with its balloon still settling after its first decision.
fn settling_reads(reports: &[Value], name: &str) -> usize {
    let states: Vec<&str> = guest_lines(reports, name)
        .filter_map(|g| g["state"].as_str())
        .collect();
    let decided = states
        .iter()
        .position(|s| s.chars().all(|c| c.is_ascii_uppercase()));
    decided.map_or(0, |first| {
        states[first..]
            .iter()
            .filter(|s| s.contains("settling"))
            .count()
    })
}

/// A guest that grew and stopped was lent what it needed, no more: at the end it holds free at
/// most its headroom (3 periods and the blind margin of its consumption, or 8 % of its balloon)
/// plus 2 periods of its consumption, at the fastest rate it was fed at, and a step of slack.
/// `end` is its (balloon size, usable memory) in MiB; the coordinator ran with a 2 s period.
fn assert_lent_no_more_than_needed(reports: &[Value], name: &str, (size, free): (u64, u64)) {
    let fastest = fastest_rate(reports, name);
    let runway = (3.0 * 2.0 + vmbalance::mem_plan::BLIND_SECS) * fastest;
    let lent_at_most = runway.max(0.08 * size as f64) + 2.0 * 2.0 * fastest + 8.0;
    eprintln!(
        "{name} ends with {free} MiB free; its fastest rate {fastest:.1} MiB/s allows {lent_at_most:.0}; read {} times with its balloon settling",
        settling_reads(reports, name)
    );
    assert!(
        (free as f64) <= lent_at_most,
        "{name} holds {free} MiB free, more than the {lent_at_most:.0} MiB it needs"
    );
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_keeps_the_footprint_small_idle_guests_at_their_target_and_a_hog_fed() {
    // Four guests at 512 of 1024 MiB; one allocates 600 MiB at 10 MiB/s and keeps it, three idle
    // (the scenario of issue #16): two minutes of `memory_coordinator 2`.
    let names = ["hog", "idle0", "idle1", "idle2"];
    let lab = Lab::guests(&names.map(guest_spec));
    // Other settings can be measured on the same scenario (BENCHMARKS.md), e.g.
    // VMB_E2E_FOOTPRINT_ARGS="--headroom-pct 5".
    let extra = std::env::var("VMB_E2E_FOOTPRINT_ARGS").unwrap_or_default();
    let mut args: Vec<&str> = extra.split_whitespace().collect();
    args.extend(["--metrics-address", "127.0.0.1:0", "2"]);
    let mut d = Daemon::start(COORDINATOR, &args);
    d.wait_cycles(4, Duration::from_secs(60));
    lab.send("hog", "mem 10 600 0");
    let run = sample_memory(&names, Duration::from_secs(2), Duration::from_secs(120));
    let metrics = scrape(&d.log());
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    print_memory_run(&names, &run);
    let footprint = |guests: &Vec<(u64, u64)>| guests.iter().map(|g| g.0).sum::<u64>();
    let (last, _) = run.last().unwrap();
    let peak = run.iter().map(|(g, _)| footprint(g)).max().unwrap();
    let hog_low = lowest_avail(&run, 0);
    eprintln!(
        "footprint: {} MiB at the end (hog {} MiB), {peak} MiB at peak; the hog's available memory never under {hog_low:.1} %",
        footprint(last),
        last[0].0
    );
    assert_eq!(code, Some(0));
    for n in names {
        assert_no_oom(&lab, n);
    }
    assert!(
        lab.console("hog").contains("workload: reached 600 MiB"),
        "{}",
        lab.console("hog")
    );
    assert!(hog_low >= 5.0, "the hog fell to {hog_low:.1} % available");
    for (i, n) in names.iter().enumerate().skip(1) {
        let low = lowest_avail(&run, i);
        assert!(low >= 25.0, "{n} fell to {low:.1} % available");
        // Its target: the 256 MiB cushion, more than its 32.5 % share of about 240 MiB.
        let end = last[i].1;
        assert!(
            (240..=300).contains(&end),
            "{n} ended with {end} MiB available, not its 256 MiB cushion"
        );
    }
    // The hog is lent what it needs, no more (the idle guests' part is their target, asserted
    // above). Measured (BENCHMARKS.md): 1604-1652 MiB in all at the end without the cushion,
    // 1885 before targets and need-sized grants; the issue hoped for 1600. The cushion costs
    // about 180 MiB per idle guest here.
    assert_lent_no_more_than_needed(&reports, "hog", last[0]);
    assert!(!log.contains("breaks a limit"), "{log}");
    // The metrics: each guest's balloon gauge is its size, every resize counted by reason.
    for n in names {
        let domain = Lab::domain(n);
        let bytes: f64 = metrics
            .lines()
            .find(|l| {
                l.starts_with("vmbalance_guest_balloon_bytes{")
                    && l.contains(&format!("domain=\"{domain}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no balloon gauge for {domain}:\n{metrics}"));
        assert_eq!(bytes as u64 / 1024, balloon(n).0, "{domain}");
    }
    let resizes: usize = changes_per_cycle(&reports).iter().sum();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("vmbalance_balloon_resizes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(counted as usize, resizes, "{metrics}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_feeds_every_guest_when_all_consume_at_once() {
    // Four guests at 512 of 1024 MiB all allocate 450 MiB at 10 MiB/s and keep it: nobody is
    // wasting, so everything they get comes from the host (`memory_coordinator 2`, 100 s).
    let names = ["hog0", "hog1", "hog2", "hog3"];
    let lab = Lab::guests(&names.map(guest_spec));
    let mut d = Daemon::start(COORDINATOR, &["2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    for n in names {
        lab.send(n, "mem 10 450 0");
    }
    let run = sample_memory(&names, Duration::from_secs(2), Duration::from_secs(100));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    print_memory_run(&names, &run);
    assert_eq!(code, Some(0));
    let (last, _) = run.last().unwrap();
    for (i, n) in names.iter().enumerate() {
        assert_no_oom(&lab, n);
        assert!(
            lab.console(n).contains("workload: reached 450 MiB"),
            "{}",
            lab.console(n)
        );
        let low = lowest_avail(&run, i);
        eprintln!("{n}: never under {low:.1} % available");
        assert!(low >= 5.0, "{n} fell to {low:.1} % available");
        assert!(last[i].0 > 512, "{n} was never fed: {} MiB", last[i].0);
        assert_lent_no_more_than_needed(&reports, n, last[i]);
    }
    assert!(!log.contains("breaks a limit"), "{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_never_takes_the_host_under_its_reserve() {
    // The reserve is set just under what the host has now, so the host is 800 MiB above it. Every
    // page a guest touches takes real host memory (its QEMU process backs it), and a fresh guest
    // has touched little of its 512 MiB: together they could take more than the 700 MiB by
    // themselves (the budget leaves what they hold free out). The host's MemAvailable must never go under the reserve; no idle guest is
    // OOM-killed (the hog may be: the host comes first).
    let names = ["hog", "idle0", "idle1"];
    let lab = Lab::guests(&names.map(guest_spec));
    let total = host_total_kib();
    let reserve_kib = host_available_kib().saturating_sub(800 * MIB);
    let reserve_pct = 100.0 * reserve_kib as f64 / total as f64;
    let reserve_kib = (total as f64 * reserve_pct / 100.0).ceil() as u64;
    let pct_arg = format!("{reserve_pct:.4}");
    let mut d = Daemon::start(COORDINATOR, &["--host-reserve-pct", &pct_arg, "2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    // 900 MiB at 10 MiB/s: more than the host can give above its reserve.
    lab.send("hog", "mem 10 900 0");
    let run = sample_memory(&names, Duration::from_millis(500), Duration::from_secs(110));
    let Ended { code, log, .. } = d.stop();
    eprintln!("{log}");
    let host_low = run.iter().map(|(_, h)| *h).min().unwrap();
    let hog_peak = run.iter().map(|(g, _)| g[0].0).max().unwrap();
    eprintln!(
        "host available never under {} MiB (reserve {} MiB); the hog peaked at {hog_peak} MiB",
        host_low / MIB,
        reserve_kib / MIB
    );
    assert_eq!(code, Some(0));
    assert!(
        host_low >= reserve_kib,
        "the host fell to {} MiB, under its {} MiB reserve",
        host_low / MIB,
        reserve_kib / MIB
    );
    for n in ["idle0", "idle1"] {
        assert_no_oom(&lab, n);
        let min = run.iter().map(|(g, _)| g[1].0).min().unwrap();
        assert!(min < 400, "{n} never shrank to feed the hog");
    }
    assert!(hog_peak > 512 + 100, "the hog was not fed: {hog_peak} MiB");
    assert!(!log.contains("breaks a limit"), "{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_dry_run_changes_no_stats_period_and_no_balloon() {
    let names = ["hog", "idle0"];
    let lab = Lab::guests(&names.map(guest_spec));
    let period = |n: &str| {
        let out = virsh(&["dommemstat", &Lab::domain(n)]);
        out.lines()
            .find_map(|l| l.strip_prefix("last_update "))
            .map(str::to_string)
    };
    // The balloon reaches its boot size a moment after the guest is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while names.iter().any(|n| balloon(n).0 != 512 * MIB) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let before: Vec<_> = names.iter().map(|n| (balloon(n).0, period(n))).collect();
    let mut d = Daemon::start(COORDINATOR, &["--dry-run", "2"]);
    lab.send("hog", "mem 20 300 0");
    d.wait_cycles(10, Duration::from_secs(60));
    let Ended { code, log, .. } = d.stop();
    let after: Vec<_> = names.iter().map(|n| (balloon(n).0, period(n))).collect();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(before, after, "{log}");
    assert!(log.contains("statistics are not switched on"), "{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_keeps_admin_pins_and_balances_the_others() {
    // Four busy guests on pCPU 0; the first two are pinned there in their persistent configuration
    // (`<vcpupin>`, as `virsh vcpupin --config`, an admin or OpenStack would), the other two only
    // live. The two free ones must go; the restricted ones stay, whatever the balance.
    let specs = [
        busy("adm0", "0!"),
        busy("adm1", "0!"),
        busy("free0", "0"),
        busy("free1", "0"),
    ];
    let _lab = Lab::guests(&specs);
    let mut d = Daemon::start(SCHEDULER, &["2"]);
    d.wait_cycles(8, Duration::from_secs(90));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0));
    eprintln!("pin changes per cycle {:?}", changes_per_cycle(&reports));
    assert_eq!(pins("adm0"), [Some(0)]);
    assert_eq!(pins("adm1"), [Some(0)]);
    let last = online_pcpus() - 1;
    for free in ["free0", "free1"] {
        let pin = pins(free)[0].unwrap();
        assert!(pin != 0 && pin <= last, "{free} on pCPU {pin}");
    }
    // Nothing moved the admin's guests at any point.
    for r in &reports {
        for m in r["moves"].as_array().unwrap() {
            let domain = m["domain"].as_str().unwrap();
            assert!(domain.contains("free"), "{m}");
        }
    }
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_keeps_a_guests_vcpus_apart_where_balance_allows() {
    // Two guests with one CPU-bound vCPU per pCPU each, every vCPU on pCPU 0. Any two vCPUs per
    // pCPU balance the host; rule 10 picks the layout where no guest has two vCPUs on one pCPU
    // (stacked vCPUs of one guest wait for each other inside it).
    let p = online_pcpus();
    let pinned = vec!["0"; p as usize].join(",");
    // Twice as many busy threads as vCPUs: every vCPU stays busy whatever the guest's scheduler does.
    let work = format!("cpu,{},100", 2 * p);
    let spec = |name| Spec {
        name,
        vcpus: p,
        cur_mib: 192,
        max_mib: 192,
        pins: &pinned,
        work: &work,
    };
    let names = ["apart0", "apart1"];
    let _lab = Lab::guests(&[spec(names[0]), spec(names[1])]);
    let mut d = Daemon::start(SCHEDULER, &["2"]);
    d.wait_cycles(8, Duration::from_secs(90));
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0), "{log}");
    let moves = changes_per_cycle(&reports);
    let layout: Vec<Vec<Option<u32>>> = names.iter().map(|n| pins(n)).collect();
    eprintln!("pin changes per cycle {moves:?}; pins {layout:?}");
    // Balanced: two vCPUs per pCPU, in the first decision, and nothing moved since.
    let mut per_pcpu = vec![0; p as usize];
    for pin in layout.iter().flatten() {
        per_pcpu[pin.unwrap() as usize] += 1;
    }
    assert!(per_pcpu.iter().all(|&c| c == 2), "{per_pcpu:?}");
    assert!(moves.iter().skip(2).all(|&m| m == 0), "{moves:?}");
    // Apart: each guest has one vCPU on every pCPU.
    for (name, guest) in names.iter().zip(&layout) {
        let mut on: Vec<u32> = guest.iter().map(|pin| pin.unwrap()).collect();
        on.sort();
        on.dedup();
        assert_eq!(
            on.len(),
            p as usize,
            "{name}'s vCPUs share a pCPU: {guest:?}"
        );
    }
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_stays_in_its_pool_leaves_excluded_guests_alone_and_survives_sighup() {
    // Four busy guests on pCPU 0. With --cpus 1 every pin the daemon makes is on pCPU 1; one guest
    // is excluded by --exclude, one by its own metadata: both stay on pCPU 0, never re-pinned.
    let specs = [
        busy("xflag", "0"),
        busy("xmeta", "0"),
        busy("pool0", "0"),
        busy("pool1", "0"),
    ];
    let _lab = Lab::guests(&specs);
    virsh(&[
        "metadata",
        &Lab::domain("xmeta"),
        "--uri",
        vmbalance::domain_xml::METADATA_URI,
        "--key",
        "vmbalance",
        "--set",
        "<policy exclude=\"yes\"/>",
        "--live",
    ]);
    let flag = Lab::domain("xflag");
    let mut d = Daemon::start(SCHEDULER, &["--cpus", "1", "--exclude", &flag, "2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    // An operator's SIGHUP: re-read, keep running.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let seen = d.cycles();
    d.wait_cycles(seen + 3, Duration::from_secs(30));
    assert!(d.running(), "the daemon ended on SIGHUP");
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("SIGHUP: re-reading"), "{log}");
    assert!(log.contains("excluded by --exclude"), "{log}");
    assert!(log.contains("asks to be left alone"), "{log}");
    assert_eq!(pins("xflag"), [Some(0)]);
    assert_eq!(pins("xmeta"), [Some(0)]);
    assert_eq!(pins("pool0"), [Some(1)]);
    assert_eq!(pins("pool1"), [Some(1)]);
    for r in &reports {
        for m in r["moves"].as_array().unwrap() {
            assert_eq!(m["to"], 1, "{m}");
            assert!(m["domain"].as_str().unwrap().contains("pool"), "{m}");
        }
    }
}

/// A system user for the unprivileged runs, created if missing, in `groups` (comma-separated,
/// or none).
fn system_user(name: &str, groups: &str) {
    if Command::new("id")
        .arg(name)
        .output()
        .unwrap()
        .status
        .success()
    {
        return;
    }
    let mut useradd = Command::new("useradd");
    useradd.args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
    ]);
    if !groups.is_empty() {
        useradd.args(["--groups", groups]);
    }
    assert!(
        useradd.arg(name).status().unwrap().success(),
        "useradd {name}"
    );
}

/// `bin` copied where any user may run it (the build tree may be private to root).
fn runnable_copy(bin: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("vmbalance-e2e-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(std::path::Path::new(bin).file_name().unwrap());
    std::fs::copy(bin, &copy).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Run `bin args` as `user` with `groups` and nothing else, the way the systemd units run the
/// daemons: no capabilities (none inheritable, an empty bounding set), no new privileges.
fn run_as(user: &str, groups: &str, bin: &str, args: &[&str]) -> std::process::Output {
    let mut setpriv = Command::new("setpriv");
    setpriv.args([
        &format!("--reuid={user}"),
        &format!("--regid={user}"),
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]);
    if groups.is_empty() {
        setpriv.arg("--clear-groups");
    } else {
        setpriv.arg(format!("--groups={groups}"));
    }
    setpriv
        .arg("--")
        .arg(runnable_copy(bin))
        .args(["--connect", "qemu:///system"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Run `bin` with `args` as a system user in the `libvirt` group; it must end with status 0. Its
/// log (printed too).
fn run_in_group_ok(bin: &str, args: &[&str]) -> String {
    let o = run_as("vmbalance-e2e", "libvirt", bin, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    err
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn both_daemons_run_unprivileged_in_the_libvirt_group_and_say_which_group_outside_it() {
    // The units run the daemons as a dynamic user in the 'libvirt' group, with no capability.
    system_user("vmbalance-e2e", "libvirt");
    system_user("vmbalance-e2e-outsider", "");
    let specs = [
        busy("unpriv0", "0"),
        busy("unpriv1", "0"),
        idle("unpriv-idle"),
    ];
    let _lab = Lab::guests(&specs);
    run_in_group_ok(SCHEDULER, &["--cycles", "3", "2"]);
    let on: Vec<u32> = ["unpriv0", "unpriv1"]
        .iter()
        .map(|n| pins(n)[0].unwrap())
        .collect();
    assert_ne!(
        on[0], on[1],
        "the two busy guests still share pCPU {}",
        on[0]
    );
    let before = balloon("unpriv-idle").0 / MIB;
    let err = run_in_group_ok(COORDINATOR, &["--cycles", "8", "1"]);
    let after = balloon("unpriv-idle").0 / MIB;
    assert!(
        after < before,
        "the idle guest kept {after} of {before} MiB:\n{err}"
    );
    // Outside the group: one line that names the group, exit 1.
    for bin in [SCHEDULER, COORDINATOR] {
        let o = run_as("vmbalance-e2e-outsider", "", bin, &["2"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("'libvirt' group"), "{err}");
    }
}

/// The times (Unix seconds) of the reports' cycles.
fn cycle_times(reports: &[Value]) -> Vec<f64> {
    reports.iter().filter_map(|r| r["time"].as_f64()).collect()
}

/// The longest gap between two cycles, s.
fn longest_gap(times: &[f64]) -> f64 {
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn coordinator_feeds_a_grower_while_another_guests_qemu_is_stopped() {
    // One guest's QEMU is stopped for 30 s while another allocates 600 MiB at 10 MiB/s. Before,
    // the coordinator waited on the stopped guest's monitor and made no cycle for 32 s, and the
    // grower was OOM-killed at 397 MiB.
    let names = ["grower", "frozen"];
    let lab = Lab::guests(&names.map(guest_spec));
    let mut d = Daemon::start(COORDINATOR, &["2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    lab.send("grower", "mem 10 600 0");
    signal_qemu("frozen", "-STOP");
    let frozen_at = Instant::now();
    let during = sample_memory(&["grower"], Duration::from_secs(2), Duration::from_secs(30));
    signal_qemu("frozen", "-CONT");
    let thawed_after = frozen_at.elapsed();
    let after = sample_memory(&["grower"], Duration::from_secs(2), Duration::from_secs(40));
    let stop_asked = Instant::now();
    let Ended { code, log, reports } = d.stop();
    let stopped_in = stop_asked.elapsed();
    eprintln!("{log}");
    print_memory_run(&["grower"], &during);
    print_memory_run(&["grower"], &after);
    let gap = longest_gap(&cycle_times(&reports));
    eprintln!(
        "frozen for {:.1} s; longest gap between cycles {gap:.1} s; stopped {:.2} s after SIGTERM",
        thawed_after.as_secs_f64(),
        stopped_in.as_secs_f64()
    );
    assert_eq!(code, Some(0));
    assert_no_oom(&lab, "grower");
    assert!(
        lab.console("grower").contains("workload: reached 600 MiB"),
        "{}",
        lab.console("grower")
    );
    // A cycle every period, give or take the deadline a stuck call is waited for.
    assert!(gap < 2.0 + 2.0 + 1.0, "a gap of {gap:.1} s between cycles");
    // The stopped guest is reported as not answering while it is stopped (its own read stuck;
    // or left alone without a call, another call of ours already waiting on its QEMU, or its
    // QEMU not having run since the last look), and read again once it runs.
    let not_answering =
        |r: &serde_json::Value| r["not_answering"].to_string().contains("vmblab-frozen");
    assert!(reports.iter().any(not_answering), "{log}");
    let last = reports.last().expect("cycles ran");
    assert!(
        !not_answering(last) && last["guests"].to_string().contains("vmblab-frozen"),
        "{last}"
    );
    assert!(stopped_in < Duration::from_secs(2), "{stopped_in:?}");
    assert!(!log.contains("breaks a limit"), "{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn scheduler_balances_the_others_while_a_guests_qemu_is_stopped() {
    // Busy guests crowded on pCPU 0 beside an idle guest whose QEMU is stopped. Before, the first
    // read waited 39.8 s on the stopped guest and nothing was balanced until it thawed; the cycle
    // after read pCPU 0 at 1081 % usage.
    let p = online_pcpus();
    let busy_names: Vec<String> = (0..2 * p).map(|i| format!("busy{i}")).collect();
    let mut specs: Vec<Spec> = busy_names.iter().map(|n| busy(n, "0")).collect();
    specs.push(Spec {
        name: "frozen",
        vcpus: 1,
        cur_mib: 256,
        max_mib: 256,
        pins: "0",
        work: "idle",
    });
    let _lab = Lab::guests(&specs);
    signal_qemu("frozen", "-STOP");
    let mut d = Daemon::start(SCHEDULER, &["2"]);
    d.wait_cycles(4, Duration::from_secs(60));
    let names: Vec<&str> = busy_names.iter().map(String::as_str).collect();
    let after = pcpu_usage(&names, p, Duration::from_secs(4));
    signal_qemu("frozen", "-CONT");
    let Ended { code, log, reports } = d.stop();
    eprintln!("{log}");
    eprintln!("busy guests' pCPU usage while frozen: {after:.1?}");
    assert_eq!(code, Some(0));
    let mut per_pcpu = vec![0; p as usize];
    for n in &names {
        per_pcpu[pins(n)[0].unwrap() as usize] += 1;
    }
    assert!(per_pcpu.iter().all(|&c| c == 2), "{per_pcpu:?}");
    // The guests that answer keep their run-queue delay while one is stuck: every decision
    // balances demand, none falls back to usage.
    let bases: Vec<&str> = reports
        .iter()
        .filter(|r| r["decision"] == "planned")
        .filter_map(|r| r["basis"].as_str())
        .collect();
    assert!(
        !bases.is_empty() && bases.iter().all(|b| *b == "demand"),
        "{bases:?}"
    );
    // No figure beyond what an interval allows: at most 110 % per vCPU, 2 vCPUs per pCPU.
    for r in &reports {
        for pcpu in r["pcpus"].as_array().into_iter().flatten() {
            let usage = pcpu["usage"].as_f64().unwrap();
            assert!(usage <= 2.0 * 110.0, "{pcpu} in {r}");
        }
    }
}

/// The largest amount workload `name` held, from its console: `reached N` or its last
/// `holding N` line.
fn largest_held_mib(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            l.split("workload: reached ")
                .nth(1)
                .or_else(|| l.split("workload: holding ").nth(1))
        })
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn a_service_starting_in_a_guest_shrunk_to_its_target_is_not_oom_killed() {
    // An idle guest of 512 MiB is shrunk to its target by `memory_coordinator 3` (defaults);
    // then a service starts in it and allocates 600 MiB at 50 MiB/s. Before the cushion, such a
    // guest held 79 MiB free and was OOM-killed 52 MiB into a 250 MiB burst. Other bursts can be
    // measured the same way, e.g. VMB_E2E_BURST="100 600" (MiB/s, MiB).
    let burst = std::env::var("VMB_E2E_BURST").unwrap_or_else(|_| "50 600".into());
    let (rate, size) = burst
        .split_once(' ')
        .expect("VMB_E2E_BURST is \"RATE_MIB_S SIZE_MIB\"");
    let lab = Lab::guests(&[guest_spec("bursty")]);
    let mut d = Daemon::start(COORDINATOR, &["3"]);
    d.wait_cycles(4, Duration::from_secs(60));
    // Settled: the same balloon size over four reads 3 s apart.
    let start = Instant::now();
    let mut sizes: Vec<u64> = Vec::new();
    while start.elapsed() < Duration::from_secs(180) {
        sizes.push(balloon("bursty").0);
        if sizes.len() >= 4 && sizes[sizes.len() - 4..].windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let (settled, _, usable) = balloon("bursty");
    let usable = usable.unwrap_or(0);
    lab.send("bursty", &format!("mem {rate} {size} 0"));
    let run = sample_memory(&["bursty"], Duration::from_secs(1), Duration::from_secs(30));
    let Ended { code, log, .. } = d.stop();
    eprintln!("{log}");
    print_memory_run(&["bursty"], &run);
    let console = lab.console("bursty");
    let held = largest_held_mib(&console);
    eprintln!(
        "settled at {} MiB with {} MiB available (of 512 before); a burst at {rate} MiB/s held {held} of {size} MiB; lowest available {:.1} %",
        settled / MIB,
        usable / MIB,
        lowest_avail(&run, 0)
    );
    assert_eq!(code, Some(0));
    assert!(settled < 512 * MIB, "never shrunk: {sizes:?}");
    assert_no_oom(&lab, "bursty");
    assert!(
        console.contains(&format!("workload: reached {size} MiB")),
        "{console}"
    );
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn a_device_hot_plugged_into_a_guest_has_its_xml_read_again() {
    // A USB tablet hot-plugged into, then unplugged from, a running guest: libvirt announces
    // both, and the coordinator reads the domain's XML again at its next cycle (where a VFIO or
    // vDPA device, which the lab has none of, would show its memory held). Before, a hot-plug was
    // seen only on SIGHUP.
    let lab = Lab::guests(&[guest_spec("plug")]);
    let mut d = Daemon::start(COORDINATOR, &["-v", "1"]);
    d.wait_cycles(2, Duration::from_secs(30));
    let tablet = lab.dir.join("tablet.xml");
    std::fs::write(&tablet, "<input type='tablet' bus='usb'/>").unwrap();
    let domain = Lab::domain("plug");
    let said = |d: &Daemon| {
        d.log()
            .matches(&format!("domain {domain}: a device was added or removed"))
            .count()
    };
    let wait_said = |d: &Daemon, n: usize| {
        let start = Instant::now();
        while said(d) < n && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(200));
        }
        said(d)
    };
    let tablet = tablet.to_str().unwrap();
    virsh(&["attach-device", &domain, tablet, "--live"]);
    let after_plug = wait_said(&d, 1);
    virsh(&["detach-device", &domain, tablet, "--live"]);
    let after_unplug = wait_said(&d, 2);
    let Ended { code, log, .. } = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!((after_plug, after_unplug), (1, 2), "{log}");
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn both_daemons_go_on_while_a_guest_is_busy_in_a_long_dump() {
    // `virsh dump --memory-only` of one guest into a FIFO nobody reads for 30 s: libvirt's dump
    // job, and the guest's QEMU monitor, stay busy until it is read (a slow dump target, as a
    // dump or a migration over a slow link is). Beside it, under both daemons at once, a guest
    // grows by 250 MiB at 10 MiB/s and two busy guests are crowded on pCPU 0.
    let p = online_pcpus();
    let busy_names: Vec<String> = (0..p).map(|i| format!("busy{i}")).collect();
    let mut specs: Vec<Spec> = busy_names.iter().map(|n| busy(n, "0")).collect();
    specs.push(guest_spec("grower"));
    specs.push(guest_spec("dumped"));
    let lab = Lab::guests(&specs);
    let mut coordinator = Daemon::start(COORDINATOR, &["2"]);
    let mut scheduler = Daemon::start(SCHEDULER, &["2"]);
    coordinator.wait_cycles(4, Duration::from_secs(60));
    scheduler.wait_cycles(2, Duration::from_secs(60));
    let fifo = lab.dir.join("dump.fifo");
    let _ = std::fs::remove_file(&fifo);
    run(Command::new("mkfifo").args(["-m", "666"]).arg(&fifo));
    let mut dump = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "dump", "--memory-only"])
        .arg(Lab::domain("dumped"))
        .arg(&fifo)
        .spawn()
        .expect("virsh dump starts");
    std::thread::sleep(Duration::from_secs(2));
    lab.send("grower", "mem 10 250 0");
    let during = sample_memory(&["grower"], Duration::from_secs(2), Duration::from_secs(30));
    // Read the FIFO: the dump finishes.
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' > /dev/null", fifo.display()))
        .spawn()
        .expect("a reader starts");
    let after = sample_memory(&["grower"], Duration::from_secs(2), Duration::from_secs(20));
    let dumped = dump.wait().expect("virsh dump ends");
    let _ = reader.wait();
    // The busy guests leave the grower little CPU: it may need longer than 25 s.
    let reached = lab.console_shows_within(
        "grower",
        "workload: reached 250 MiB",
        Duration::from_secs(60),
    );
    let busy: Vec<&str> = busy_names.iter().map(String::as_str).collect();
    let placed: Vec<u32> = busy.iter().map(|n| pins(n)[0].unwrap()).collect();
    let mem = coordinator.stop();
    let cpu = scheduler.stop();
    eprintln!("{}\n{}", mem.log, cpu.log);
    print_memory_run(&["grower"], &during);
    print_memory_run(&["grower"], &after);
    let (mem_gap, cpu_gap) = (
        longest_gap(&cycle_times(&mem.reports)),
        longest_gap(&cycle_times(&cpu.reports)),
    );
    eprintln!(
        "dump ended {dumped:?}; longest gap between cycles: coordinator {mem_gap:.1} s, scheduler {cpu_gap:.1} s; busy guests on pCPUs {placed:?}"
    );
    assert_eq!((mem.code, cpu.code), (Some(0), Some(0)));
    assert!(dumped.success(), "the dump finished once read");
    assert_no_oom(&lab, "grower");
    assert!(reached, "{}", lab.console("grower"));
    // A cycle every period, but for the one in which the domain first blocks: it waits a
    // deadline (1 s) on the bulk read, one on the listing and one on the domain's own read, and
    // later ones skip it at once. Before, both daemons made no cycle for 33 s.
    assert!(
        mem_gap < 2.0 + 3.0 + 1.0,
        "coordinator: a gap of {mem_gap:.1} s"
    );
    assert!(
        cpu_gap < 2.0 + 3.0 + 1.0,
        "scheduler: a gap of {cpu_gap:.1} s"
    );
    assert!(
        mem.log.contains("listing the domains did not answer"),
        "{}",
        mem.log
    );
    assert!(mem.log.contains("answers again"), "{}", mem.log);
    let mut sorted = placed.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        placed.len(),
        "busy guests still share a pCPU: {placed:?}"
    );
    assert!(!mem.log.contains("breaks a limit"), "{}", mem.log);
}

/// Send `signal` to the libvirtd the lab started.
fn signal_libvirtd(signal: &str) {
    let pidfile = common::lab::lab_dir().join("libvirtd.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{pidfile:?}: {e}"));
    let sent = Command::new("kill")
        .args([signal, pid.trim()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Continues a stopped libvirtd when dropped, so a failed assertion leaves the lab usable.
struct ThawOnDrop;

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        signal_libvirtd("-CONT");
    }
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn both_daemons_live_through_a_hung_libvirtd_and_resume_when_it_thaws() {
    // libvirtd itself stopped (SIGSTOP) for 20 s, as a hung daemon is. Before, each daemon's next
    // host-wide call (the CPU map, the host's memory) blocked its main thread until libvirtd
    // came back: no watchdog ping (systemd would have killed it), no exit on SIGTERM.
    let _lab = Lab::guests(&[busy("stall0", "0"), busy("stall1", "0")]);
    // A turn may wait 5 s on a host-wide call (HOST_DEADLINE) before giving up on libvirtd.
    let watchdog = Duration::from_secs(12);
    let usec = watchdog.as_micros().to_string();
    let mut daemons = Vec::new();
    for (bin, name) in [(SCHEDULER, "sched"), (COORDINATOR, "coord")] {
        let (socket, messages) = common::notify::fake_systemd(name);
        let env = [
            ("NOTIFY_SOCKET", socket.as_os_str()),
            ("WATCHDOG_USEC", std::ffi::OsStr::new(&usec)),
        ];
        let mut d = Daemon::start_with_env(bin, &["2"], &env);
        d.wait_cycles(3, Duration::from_secs(60));
        daemons.push((d, messages));
    }
    let (mut coord, coord_messages) = daemons.pop().unwrap();
    let (sched, sched_messages) = daemons.pop().unwrap();
    signal_libvirtd("-STOP");
    let thaw = ThawOnDrop;
    let frozen_at = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let cycles_frozen = coord.cycles();
    let during: Vec<_> = coord_messages.try_iter().collect();
    // The scheduler is asked to stop while libvirtd is still stopped.
    let asked = Instant::now();
    let Ended { code, log, .. } = sched.stop();
    let stopped_in = asked.elapsed();
    let sched_during: Vec<_> = sched_messages.try_iter().collect();
    drop(thaw);
    let thawed_at = Instant::now();
    coord.wait_cycles(cycles_frozen + 2, Duration::from_secs(30));
    let resumed_in = thawed_at.elapsed();
    let coord_end = coord.stop();
    eprintln!("scheduler:\n{log}\ncoordinator:\n{}", coord_end.log);
    eprintln!(
        "libvirtd stopped {:.1} s; scheduler stopped {:.2} s after SIGTERM; coordinator cycling again {:.1} s after libvirtd thawed; longest watchdog silence {:.1} s (scheduler), {:.1} s (coordinator)",
        (thawed_at - frozen_at).as_secs_f64(),
        stopped_in.as_secs_f64(),
        resumed_in.as_secs_f64(),
        common::notify::longest_silence(&sched_during).as_secs_f64(),
        common::notify::longest_silence(&during).as_secs_f64(),
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(stopped_in < Duration::from_secs(2), "{stopped_in:?}");
    for (what, messages) in [("scheduler", &sched_during), ("coordinator", &during)] {
        let silence = common::notify::longest_silence(messages);
        assert!(
            silence < watchdog,
            "{what}: {silence:?} without a watchdog ping"
        );
    }
    for (what, log) in [("scheduler", &log), ("coordinator", &coord_end.log)] {
        assert_eq!(
            log.matches("a cycle failed").count(),
            1,
            "{what} says it once:\n{log}"
        );
        assert!(log.contains("did not answer within"), "{what}:\n{log}");
    }
    assert!(
        coord_end.log.contains("cycles succeed again"),
        "{}",
        coord_end.log
    );
    assert_eq!(coord_end.code, Some(0));
    // Back within a period and a deadline of libvirtd's return, and a margin.
    assert!(resumed_in < Duration::from_secs(12), "{resumed_in:?}");
}

/// The unit's `ExecStart=` with `$VAR`s expanded from its `EnvironmentFile=`, if it has one (as
/// systemd does: each `$VAR` splits into words), and its `SupplementaryGroups=`.
fn unit_command(unit: &str) -> (Vec<String>, String) {
    let text = std::fs::read_to_string(format!("/usr/lib/systemd/system/{unit}.service")).unwrap();
    let setting = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{unit} has no {key}="))
            .to_string()
    };
    let env_text = text
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .and_then(|f| std::fs::read_to_string(f.trim_start_matches('-')).ok())
        .unwrap_or_default();
    let vars: std::collections::HashMap<String, String> = env_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    let words = setting("ExecStart")
        .split_whitespace()
        .flat_map(|w| match w.strip_prefix('$') {
            Some(var) => vars
                .get(var)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            None => vec![w.to_string()],
        })
        .collect();
    (words, setting("SupplementaryGroups"))
}

/// Start `command` the way its unit would, as a system user in `groups` with no capability and
/// no new privileges, telling the fake systemd at `notify` (its stderr to a file, returned).
fn start_as_unit(
    command: &[String],
    groups: &str,
    notify: &std::path::Path,
) -> (std::process::Child, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!(
        "vmbalance-unit-{}.log",
        std::path::Path::new(&command[0])
            .file_name()
            .unwrap()
            .to_string_lossy()
    ));
    let child = Command::new("setpriv")
        .args([
            "--reuid=vmbalance-e2e",
            "--regid=vmbalance-e2e",
            &format!("--groups={groups}"),
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .args(command)
        .env("NOTIFY_SOCKET", notify)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

#[test]
#[ignore = "needs the real-guest lab: run `make e2e`"]
fn the_package_installs_runs_its_units_balances_the_guests_and_purges_clean() {
    // Build the package as `make deb` does, and install it.
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        Command::new("make")
            .args(["-s", "-C", root, "deb"])
            .status()
            .unwrap()
            .success()
    );
    let version = env!("CARGO_PKG_VERSION");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let deb = format!(
        "{root}/target/debian/vmbalance_{version}_{}.deb",
        arch.trim()
    );
    let _ = Command::new("dpkg").args(["--purge", "vmbalance"]).status();
    let installed = Command::new("dpkg").args(["-i", &deb]).output().unwrap();
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let files: Vec<String> = run(Command::new("dpkg").args(["-L", "vmbalance"]))
        .lines()
        .map(str::to_string)
        .collect();
    for f in [
        "/usr/bin/vcpu_scheduler",
        "/usr/bin/memory_coordinator",
        "/usr/bin/vmbalance_plot",
        "/usr/share/man/man1/vcpu_scheduler.1.gz",
        "/usr/lib/systemd/system/memory-coordinator.service",
        "/etc/vmbalance/vcpu_scheduler.toml",
        "/usr/share/vmbalance/grafana-dashboard.json",
        "/usr/share/vmbalance/vmbalance-alerts.yml",
        "/usr/share/doc/vmbalance/copyright",
    ] {
        assert!(
            files.iter().any(|l| l == f),
            "{f} not in the package:\n{files:?}"
        );
    }
    // Installing enabled nothing.
    let wants = std::path::Path::new("/etc/systemd/system/multi-user.target.wants");
    for unit in ["vcpu-scheduler", "memory-coordinator"] {
        assert!(
            !wants.join(format!("{unit}.service")).exists(),
            "{unit} enabled"
        );
    }

    // Run both units' own command lines, user and settings, against the lab's guests.
    system_user("vmbalance-e2e", "libvirt");
    let specs = [busy("pkg0", "0"), busy("pkg1", "0"), idle("pkg-idle")];
    let _lab = Lab::guests(&specs);
    let notify = std::env::temp_dir().join("vmbalance-pkg-notify");
    let _ = std::fs::remove_file(&notify);
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o777)).unwrap();
    let before = balloon("pkg-idle").0 / MIB;
    let mut daemons = Vec::new();
    for unit in ["vcpu-scheduler", "memory-coordinator"] {
        let (command, groups) = unit_command(unit);
        eprintln!("{unit}: {}", command.join(" "));
        assert!(command[0].starts_with("/usr/bin/"), "{command:?}");
        daemons.push(start_as_unit(&command, &groups, &notify));
    }
    // Both say READY once their first cycle ran.
    let mut ready = 0;
    let mut buf = [0u8; 4096];
    while ready < 2 {
        let n = systemd
            .recv(&mut buf)
            .expect("READY=1 from both daemons within a minute");
        ready += usize::from(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    }
    // PERIOD 3 from the settings file: a few cycles to pin, settle, shrink.
    let deadline = Instant::now() + Duration::from_secs(90);
    let balanced = || {
        let on: Vec<Option<u32>> = ["pkg0", "pkg1"].iter().map(|n| pins(n)[0]).collect();
        on[0].is_some() && on[1].is_some() && on[0] != on[1]
    };
    while !(balanced() && balloon("pkg-idle").0 / MIB < before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
    }
    for (child, _) in &daemons {
        let _ = Command::new("kill").arg(child.id().to_string()).status();
    }
    let mut logs = String::new();
    for (mut child, log) in daemons {
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        logs.push_str(&text);
        assert!(status.success(), "{status}: {text}");
    }
    eprintln!("{logs}");
    assert!(balanced(), "the busy guests still share a pCPU:\n{logs}");
    let after = balloon("pkg-idle").0 / MIB;
    assert!(
        after < before,
        "the idle guest kept {after} of {before} MiB:\n{logs}"
    );

    // Purged: not one of its files is left.
    let purged = Command::new("dpkg")
        .args(["--purge", "vmbalance"])
        .output()
        .unwrap();
    assert!(
        purged.status.success(),
        "{}",
        String::from_utf8_lossy(&purged.stderr)
    );
    let left: Vec<&String> = files
        .iter()
        .filter(|f| {
            let p = std::path::Path::new(f.as_str());
            p.exists() && !p.is_dir()
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for dir in [
        "/usr/share/vmbalance",
        "/usr/share/doc/vmbalance",
        "/etc/vmbalance",
    ] {
        assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    }
}
