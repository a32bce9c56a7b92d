//! The memory coordinator's whole cycle on a simulated host whose guests really run out of memory.

mod common;

use std::time::Duration;

use common::sim::{SimHost, SimMemory};
use vmbalance::coordinator::Coordinator;
use vmbalance::mem_plan::MemPolicy;

const MIB: u64 = 1024;
const PERIOD: Duration = Duration::from_secs(1);

fn policy() -> MemPolicy {
    MemPolicy {
        period_secs: PERIOD.as_secs_f64(),
        ..MemPolicy::default()
    }
}

/// A host with a hog guest (1) and two idle guests (2, 3), each 1 GiB of 2 GiB max.
fn lab() -> SimHost {
    let mut host = SimHost::new(2);
    host.host_total = 8192 * MIB;
    host.host_used = 1024 * MIB;
    host.add_guest(1, SimMemory::new(1024 * MIB, 2048 * MIB, 120 * MIB));
    host.add_guest(2, SimMemory::new(1024 * MIB, 2048 * MIB, 150 * MIB));
    host.add_guest(3, SimMemory::new(1024 * MIB, 2048 * MIB, 100 * MIB));
    host
}

/// Run `cycles` cycles one PERIOD apart, checking the host reserve after each.
fn run(host: &mut SimHost, c: &mut Coordinator, cycles: usize) {
    let reserve = (host.host_total as f64 * policy().host_reserve_pct / 100.0) as u64;
    for _ in 0..cycles {
        host.advance(PERIOD);
        c.cycle(host).unwrap().expect("domains are running");
        assert!(
            host.host_free() >= reserve,
            "host under its reserve: {} KiB",
            host.host_free()
        );
        for d in &host.domains {
            assert!(
                d.mem.actual >= policy().min_guest_kib,
                "{} under the floor",
                d.name
            );
            assert!(d.mem.actual <= d.mem.max, "{} over max", d.name);
        }
    }
}

#[test]
fn a_hog_is_fed_without_an_oom_while_idle_guests_shrink_then_memory_returns() {
    let mut host = lab();
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 4);
    // The hog starts allocating 40 MiB/s up to 1800 MiB: more than its 1 GiB.
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    run(&mut host, &mut c, 60);
    let hog = &host.domains[0].mem;
    assert_eq!(hog.ooms, 0, "the hog ran out of memory");
    assert!(
        hog.used >= 1800.0 * 1024.0 - 1.0,
        "hog reached its goal: {}",
        hog.used / 1024.0
    );
    assert!(hog.actual > 1800 * MIB);
    for idle in &host.domains[1..] {
        assert!(
            idle.mem.actual < 600 * MIB,
            "{} kept {} MiB",
            idle.name,
            idle.mem.actual / MIB
        );
    }
    // The hog frees its memory; its excess goes back to the host, step by step.
    host.domains[0].mem.work(-200.0 * 1024.0, 120 * MIB);
    let free_before = host.host_free();
    run(&mut host, &mut c, 40);
    assert!(
        host.domains[0].mem.actual < 400 * MIB,
        "{}",
        host.domains[0].mem.actual / MIB
    );
    assert!(host.host_free() > free_before + 1200 * MIB);
}

#[test]
fn a_host_short_of_memory_keeps_its_reserve_and_the_hog_is_limited() {
    let mut host = lab();
    // Only ~200 MiB above the 5 % reserve, and no idle guest to take from.
    host.domains.truncate(1);
    host.host_used = host.host_total - 1024 * MIB - 610 * MIB;
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    // `run` asserts the reserve after every cycle.
    run(&mut host, &mut c, 40);
    assert!(host.domains[0].mem.actual <= 1024 * MIB + 210 * MIB);
}

#[test]
fn guests_without_balloon_or_driver_are_left_alone() {
    let mut host = lab();
    host.domains[1].mem.balloon = false;
    host.domains[2].mem.driver = false;
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 20);
    assert_eq!(host.domains[1].mem.actual, 1024 * MIB);
    assert_eq!(host.domains[2].mem.actual, 1024 * MIB);
    let report = c.cycle(&mut host).unwrap().unwrap();
    let line = report.to_string();
    assert!(
        !line.contains("dom2"),
        "a domain without balloon is not read: {line}"
    );
    assert!(line.contains("1 without balloon left alone"), "{line}");
    assert!(line.contains("dom3 1024 MiB no guest stats"), "{line}");
}

#[test]
fn dry_run_reports_but_changes_nothing() {
    let mut host = lab();
    // The guests already report (their statistics period was set before: a dry run sets none).
    for d in &mut host.domains {
        d.mem.stats_period = 1;
    }
    let mut c = Coordinator::new(policy(), true);
    run(&mut host, &mut c, 6);
    assert_eq!(host.resizes, 0);
    host.advance(PERIOD);
    let report = c.cycle(&mut host).unwrap().unwrap();
    assert!(report.to_string().contains("would resize"), "{report}");
}

#[test]
fn vanishing_domains_do_not_stop_the_coordinator() {
    let mut host = lab();
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    let gone = host.domains[1].id;
    host.vanish_after_listing.push(gone);
    run(&mut host, &mut c, 3);
    assert_eq!(host.domains.len(), 2);
    host.domains.clear();
    assert!(c.cycle(&mut host).unwrap().is_none());
}

#[test]
fn no_decision_before_fresh_stats() {
    let mut host = lab();
    let mut c = Coordinator::new(policy(), false);
    // Cycle 1 switches stats on; the guests' first reports are not facts yet, and a rate needs two.
    for _ in 0..2 {
        host.advance(PERIOD);
        c.cycle(&mut host).unwrap();
        assert_eq!(host.resizes, 0);
    }
    run(&mut host, &mut c, 10);
    assert!(
        host.resizes > 0,
        "idle guests are shrunk once stats are fresh"
    );
}

#[test]
fn an_excluded_guest_is_never_touched() {
    use vmbalance::exclusions::Exclusions;
    // Guest 2 idles with 85 % free: it would be shrunk, but it is excluded (and guest 3 opts out
    // in its metadata). Not even its statistics period is set.
    let mut host = lab();
    host.domains[2].opted_out = true;
    let mut c = Coordinator::new(policy(), false)
        .with_exclusions(Exclusions::new(&["dom2".into()]).unwrap());
    run(&mut host, &mut c, 20);
    for d in &host.domains[1..] {
        assert_eq!(d.mem.actual, 1024 * MIB, "{} resized", d.name);
        assert_eq!(d.mem.stats_period, 0, "{} touched", d.name);
    }
    let report = c.cycle(&mut host).unwrap().unwrap();
    assert!(
        report.to_string().contains("dom2 1024 MiB excluded"),
        "{report}"
    );
    // The one guest not excluded is managed as usual.
    assert!(host.domains[0].mem.actual < 1024 * MIB);
}

#[test]
fn a_guest_whose_memory_is_held_is_never_shrunk_to_feed_others() {
    // Guest 2 idles with 85 % free, but its memory is backed by hugepages: shrinking its balloon
    // would free nothing on the host. It is left alone, even while the hog starves.
    let mut host = lab();
    host.domains[1].memory_held = Some("backed by hugepages");
    host.domain_mut(&vmbalance::host::DomainId([1; 16]))
        .mem
        .work(20.0 * MIB as f64, 1900 * MIB);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 40);
    assert_eq!(host.domains[1].mem.actual, 1024 * MIB);
    assert_eq!(host.domains[1].mem.stats_period, 0);
    let report = c.cycle(&mut host).unwrap().unwrap();
    assert!(
        report.to_string().contains("dom2 1024 MiB memory held"),
        "{report}"
    );
}

#[test]
fn a_dry_run_sets_no_statistics_period() {
    let mut host = lab();
    let mut c = Coordinator::new(policy(), true);
    run(&mut host, &mut c, 5);
    assert!(host.domains.iter().all(|d| d.mem.stats_period == 0));
    assert_eq!(host.resizes, 0);
    // A guest that already reports is still judged.
    host.domains[0].mem.stats_period = 1;
    run(&mut host, &mut c, 4);
    let report = c.cycle(&mut host).unwrap().unwrap();
    assert!(
        report.to_string().contains("dom1 1024 MiB free"),
        "{report}"
    );
    assert_eq!(host.resizes, 0);
}

#[test]
fn a_guest_restarted_under_the_same_uuid_starts_a_new_series() {
    // Guest 1 idles at 120 MiB used, then restarts and uses 900 MiB of its 1024 at once. Compared
    // with its previous run, that would read as consuming 780 MiB in a period with 12 % free: a
    // false STARVING. As a new run it is first sight again: no rate, nothing given.
    let mut host = lab();
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 6);
    let before = host.domains[0].mem.actual;
    host.domains[0].run += 1;
    host.domains[0].mem.restart(900 * MIB);
    host.domains[0].mem.actual = before.max(1024 * MIB);
    // Its configuration sets a statistics period, so it reports from its first second.
    host.domains[0].mem.stats_period = 1;
    let actual = host.domains[0].mem.actual;
    for _ in 0..2 {
        host.advance(PERIOD);
        let report = c.cycle(&mut host).unwrap().unwrap();
        assert!(
            !report.to_string().contains("dom1 1024 MiB free 124 rate"),
            "{report}"
        );
        assert!(
            !report.changes.iter().any(|ch| ch.domain == "dom1"),
            "{report}"
        );
    }
    assert_eq!(host.domains[0].mem.actual, actual);
}
