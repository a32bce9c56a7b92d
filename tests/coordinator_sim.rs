//! The memory coordinator's whole cycle on a simulated host whose guests really run out of memory.

mod common;

use std::time::Duration;

use common::sim::{SimDomain, SimHost, SimMemory};
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

/// The lab's hog (1) alone, on a host only ~200 MiB above its 5 % reserve: no idle guest to take
/// from.
fn short_lab() -> SimHost {
    let mut host = lab();
    host.domains.truncate(1);
    host.host_used = host.host_total - 1024 * MIB - 610 * MIB;
    host
}

/// The host's reserve under `policy()`, KiB.
fn reserve(host: &SimHost) -> u64 {
    (host.host_total as f64 * policy().host_reserve_pct / 100.0) as u64
}

/// Every guest's pages all touched: the host backs its whole balloon (a guest that has run a
/// while, its page cache full), so only grants can make the host back more.
fn all_touched(host: &mut SimHost) {
    for d in &mut host.domains {
        d.mem.resident = d.mem.actual as f64;
    }
}

/// Run `cycles` cycles one PERIOD apart, checking the host reserve at every instant; the last
/// cycle's report line.
fn run(host: &mut SimHost, c: &mut Coordinator, cycles: usize) -> String {
    let reserve = reserve(host);
    let mut line = String::new();
    for _ in 0..cycles {
        host.advance(PERIOD);
        line = c
            .cycle(host)
            .unwrap()
            .expect("domains are running")
            .to_string();
        assert!(
            host.host_low >= reserve,
            "host under its reserve: {} KiB",
            host.host_low
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
    line
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
    let mut host = short_lab();
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
    use vmbalance::exclusions::{ExcludePattern, Exclusions};
    // Guest 2 idles with 85 % free: it would be shrunk, but it is excluded (and guest 3 opts out
    // in its metadata). Not even its statistics period is set.
    let mut host = lab();
    host.domains[2].facts.opted_out = true;
    let mut c = Coordinator::new(policy(), false).with_exclusions(Exclusions::new(vec![
        ExcludePattern::parse("dom2").unwrap(),
    ]));
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
    host.domains[1].facts.memory_held = Some("backed by hugepages");
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

/// The lab's first `guests` guests with the host just `spare_mib` above its reserve, every guest
/// fully touched.
fn tight_lab(spare_mib: u64, guests: usize) -> SimHost {
    let mut host = lab();
    host.domains.truncate(guests);
    all_touched(&mut host);
    host.host_used = 0;
    host.host_used = host.host_free() - reserve(&host) - spare_mib * MIB;
    host
}

#[test]
fn a_shrink_that_frees_nothing_on_the_host_funds_no_grant() {
    // Guest 2 idles with 85 % free, but its balloon frees nothing on the host (passthrough
    // memory libvirt does not announce). The host is 100 MiB above its reserve; the hog starves.
    // Paying the hog with what guest 2 was asked to give would push the host under its reserve:
    // `run` checks it never goes there.
    let mut host = tight_lab(100, 2);
    host.domains[1].mem.frees_nothing = true;
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    let before = host.domains[0].mem.actual;
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    let mut peak = before;
    for _ in 0..60 {
        run(&mut host, &mut c, 1);
        peak = peak.max(host.domains[0].mem.actual);
    }
    assert!(host.domains[1].mem.actual < 600 * MIB, "guest 2 was asked");
    // The hog got what the host had to spare, no more: it ran out (the host comes first).
    assert!(
        peak - before <= 100 * MIB,
        "the hog got {} MiB",
        (peak - before) / MIB
    );
    assert!(
        peak - before >= 90 * MIB,
        "the hog got {} MiB",
        (peak - before) / MIB
    );
    assert_eq!(host.domains[0].mem.ooms, 1);
}

#[test]
fn memory_a_shrink_frees_feeds_the_hog_once_the_host_shows_it() {
    // The same, with a balloon that does free memory: the hog is fed from it, a cycle later.
    let mut host = tight_lab(100, 2);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 1500 * MIB);
    run(&mut host, &mut c, 60);
    assert_eq!(host.domains[0].mem.ooms, 0);
    assert!(host.domains[0].mem.actual > 1500 * MIB);
}

#[test]
fn a_guest_that_keeps_its_actual_fixed_gets_one_grant_and_honest_hogs_are_served() {
    // Guest 1 reports 1024 MiB whatever its balloon and consumes fast; guests 2 and 3 are honest
    // hogs. The host spares 1500 MiB.
    let mut host = tight_lab(1500, 3);
    host.domains[0].mem.claims_actual = Some(1024 * MIB);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 2000 * MIB);
    host.domains[1].mem.work(10.0 * 1024.0, 1500 * MIB);
    host.domains[2].mem.work(10.0 * 1024.0, 1500 * MIB);
    let mut behind = 0;
    for _ in 0..150 {
        let line = run(&mut host, &mut c, 1);
        if line.contains("dom1 1024 MiB") && line.contains("STARVING (balloon behind)") {
            behind += 1;
        }
    }
    let liar = &host.domains[0].mem;
    assert!(
        liar.actual <= 1024 * MIB + policy().max_step_kib,
        "the liar got {} MiB",
        liar.actual / MIB
    );
    for honest in &host.domains[1..] {
        assert_eq!(honest.mem.ooms, 0, "{} ran out", honest.name);
        assert!(honest.mem.used >= 1500.0 * 1024.0 - 1.0, "{}", honest.name);
    }
    assert!(behind > 0, "never said the liar's balloon is behind");
    // Its balloon is not set again and again to a size it does not report reaching.
    let resizes = host.resizes;
    run(&mut host, &mut c, 20);
    assert!(
        host.resizes <= resizes + 2,
        "{} resizes in 20 cycles",
        host.resizes - resizes
    );
}

#[test]
fn two_guests_starving_alike_are_fed_alike() {
    // Two identical hogs; the host spares 600 MiB, far less than they want in all.
    let mut host = tight_lab(600, 2);
    host.domains[1].mem = host.domains[0].mem.clone();
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    let before = host.domains[0].mem.actual;
    host.domains[0].mem.work(20.0 * 1024.0, 2000 * MIB);
    host.domains[1].mem.work(20.0 * 1024.0, 2000 * MIB);
    let mut peak = before;
    for _ in 0..80 {
        run(&mut host, &mut c, 1);
        peak = peak.max(host.domains[0].mem.actual);
        let (a, b) = (host.domains[0].mem.actual, host.domains[1].mem.actual);
        assert!(
            a.abs_diff(b) <= MIB,
            "one is served before the other: {} vs {} MiB",
            a / MIB,
            b / MIB
        );
    }
    // Between them they got all the host could spare: 600 MiB.
    assert!(peak - before >= 290 * MIB, "{} MiB", (peak - before) / MIB);
}

#[test]
fn no_guest_is_shrunk_under_the_minimum_its_metadata_guarantees() {
    let mut host = lab();
    host.domains[1].facts.guaranteed_kib = 900 * MIB;
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 80);
    assert_eq!(host.domains[1].mem.actual, 900 * MIB);
    assert!(host.domains[2].mem.actual < 600 * MIB);
}

#[test]
fn a_guest_whose_reports_show_its_resizes_at_once_is_fed_every_cycle() {
    // The same hog twice: 20 MiB/s from 120 MiB up to 1600 MiB. One reports a MemTotal that
    // follows its balloon, as Linux's balloon driver does; the other keeps its MemTotal
    // (deflate-on-oom), so a report cannot show that it was taken after a resize.
    let grow = |fixed_total: Option<u64>| {
        let mut host = lab();
        host.domains[0].mem.fixed_total = fixed_total;
        let mut c = Coordinator::new(policy(), false);
        run(&mut host, &mut c, 4);
        host.domains[0].mem.work(20.0 * 1024.0, 1600 * MIB);
        let (mut settling, mut low) = (0, f64::MAX);
        for _ in 0..90 {
            let line = run(&mut host, &mut c, 1);
            let hog_line = line.split("; ").find(|l| l.starts_with("dom1 ")).unwrap();
            settling += usize::from(hog_line.contains("settling"));
            let hog = &host.domains[0].mem;
            if hog.used < 1600.0 * 1024.0 {
                low = low.min(hog.actual as f64 - hog.used);
            }
        }
        let hog = &host.domains[0].mem;
        assert_eq!(hog.ooms, 0, "the hog ran out of memory");
        assert!(hog.used >= 1600.0 * 1024.0 - 1.0);
        (settling, low / 1024.0)
    };
    let (settling, low_prompt) = grow(None);
    assert_eq!(settling, 0, "a report taken after a resize is used at once");
    let (settling, low_slow) = grow(Some(1024 * MIB));
    eprintln!("lowest free while growing: {low_prompt:.0} MiB when prompt, {low_slow:.0} when not");
    assert!(settling >= 3, "every resize waits a cycle: {settling}");
    // Fed every cycle instead of every other one, the prompt hog keeps at least as much free at
    // its lowest (its runway covers a libvirt restart, so both keep most of what they had).
    assert!(
        low_prompt >= low_slow,
        "{low_prompt:.0} MiB free at the lowest while growing, against {low_slow:.0}"
    );
}

#[test]
fn idle_guests_settle_at_their_target_free_share_and_stay_there() {
    let mut host = lab();
    // No cushion: the share alone says where they stop.
    let no_cushion = MemPolicy {
        cushion_kib: 0,
        ..policy()
    };
    let mut c = Coordinator::new(no_cushion, false);
    let mut sizes = Vec::new();
    for _ in 0..200 {
        run(&mut host, &mut c, 1);
        sizes.push(
            host.domains
                .iter()
                .map(|d| d.mem.actual)
                .collect::<Vec<_>>(),
        );
    }
    let last = sizes.last().unwrap().clone();
    let settled = sizes.iter().position(|s| *s == last).unwrap();
    assert!(settled < 60, "still moving at cycle {settled}");
    for d in &host.domains {
        let free_pct = 100.0 * (1.0 - d.mem.used / d.mem.actual as f64);
        assert!(
            (27.5..=37.5).contains(&free_pct),
            "{} ended with {free_pct:.1} % free",
            d.name
        );
    }
}

#[test]
fn in_host_pressure_mode_idle_memory_stays_until_the_host_is_short() {
    let pressure = MemPolicy {
        host_target_pct: Some(20.0),
        ..policy()
    };
    let mut host = lab();
    let mut c = Coordinator::new(pressure, false);
    run(&mut host, &mut c, 30);
    assert!(host.domains.iter().all(|d| d.mem.actual == 1024 * MIB));
    // The host itself needs memory: available falls under 20 %.
    host.host_used = host.host_total - host.host_free() - host.host_used;
    host.host_used = host.host_total - host.host_used - 1200 * MIB;
    run(&mut host, &mut c, 30);
    assert!(host.domains.iter().all(|d| d.mem.actual < 1024 * MIB));
}

mod traces {
    //! Random multi-cycle traces with guests that lie in their reports: the hard limits hold at
    //! every instant, across cycles, and no change is dropped for breaking one.

    use super::*;
    use proptest::prelude::*;

    /// How a guest lies in its reports.
    #[derive(Clone, Copy, Debug)]
    enum Lie {
        Honest,
        /// Its balloon size stays at its first one whatever it is given.
        FixedActual,
        /// Its balloon size is four times its max.
        ActualOverMax,
        /// It reports nothing free.
        NothingFree,
        /// It reports more free than its max.
        FreeOverMax,
        /// Honest, but its balloon deflates on its own when it runs short (deflate-on-oom).
        Autodeflate,
    }

    /// One guest: (balloon MiB, headroom to max MiB, used MiB, guarantee MiB, frees nothing,
    /// how it lies, workloads: (start cycle, rate MiB/s, goal MiB), cycles it does not answer
    /// (first, count), the NUMA node its memory is bound to).
    type GuestSpec = (
        u64,
        u64,
        u64,
        u64,
        bool,
        Lie,
        Vec<(usize, f64, u64)>,
        Option<(usize, usize)>,
        Option<u32>,
    );

    fn lie() -> impl Strategy<Value = Lie> {
        prop_oneof![
            6 => Just(Lie::Honest),
            1 => Just(Lie::FixedActual),
            1 => Just(Lie::ActualOverMax),
            1 => Just(Lie::NothingFree),
            1 => Just(Lie::FreeOverMax),
            1 => Just(Lie::Autodeflate),
        ]
    }

    fn guest_spec() -> impl Strategy<Value = GuestSpec> {
        (
            256u64..2048,
            0u64..2048,
            0u64..100,
            prop::option::weighted(0.3, 0u64..2048),
            prop::bool::weighted(0.15),
            lie(),
            prop::collection::vec((0usize..60, -80.0f64..80.0, 50u64..3000), 0..4),
            // Stuck once it has been read (a domain never read is not known to the daemon).
            prop::option::weighted(0.2, (3usize..70, 1usize..20)),
            prop::option::weighted(0.4, 0u32..2),
        )
            .prop_map(
                |(
                    actual,
                    headroom,
                    used_pct,
                    guarantee,
                    frees_nothing,
                    lies,
                    work,
                    stuck,
                    node,
                )| {
                    let used = (actual * used_pct / 100).max(40);
                    (
                        actual,
                        headroom,
                        used,
                        guarantee.unwrap_or(0),
                        frees_nothing,
                        lies,
                        work,
                        stuck,
                        node,
                    )
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn the_host_never_goes_under_its_reserve_and_no_guest_under_its_floor_whatever_guests_say(
            guests in prop::collection::vec((guest_spec(), 0u64..=100), 1..6),
            spare_mib in 0u64..3000,
        ) {
            // Each guest has touched a random share of its free memory: the rest the host does
            // not back yet, and must be able to, as guests may touch it at any time.
            let (guests, touched_pct): (Vec<GuestSpec>, Vec<u64>) = guests.into_iter().unzip();
            let mut host = SimHost::new(2);
            host.host_total = 32768 * MIB;
            for (n, (actual, headroom, used, guarantee, frees_nothing, lies, _, _, node)) in
                guests.iter().enumerate()
            {
                let mut mem = SimMemory::new(actual * MIB, (actual + headroom) * MIB, used * MIB);
                mem.frees_nothing = *frees_nothing;
                let max = (actual + headroom) * MIB;
                match lies {
                    Lie::Honest => {}
                    Lie::FixedActual => mem.claims_actual = Some(actual * MIB),
                    Lie::ActualOverMax => mem.claims_actual = Some(4 * max),
                    Lie::NothingFree => mem.claims_free = Some(0),
                    Lie::FreeOverMax => mem.claims_free = Some(4 * max),
                    Lie::Autodeflate => mem.autodeflate = true,
                }
                host.add_guest(n as u8 + 1, mem);
                host.domains[n].facts.guaranteed_kib = guarantee * MIB;
                host.domains[n].facts.memory_nodes = node.map(|n| vec![n]);
            }
            for (d, pct) in host.domains.iter_mut().zip(&touched_pct) {
                let m = &mut d.mem;
                m.resident = m.used + (m.actual as f64 - m.used) * *pct as f64 / 100.0;
            }
            // The host can back every guest's whole balloon (all of its max where it deflates on
            // its own), and has `spare_mib` more above its reserve.
            let untouched = |d: &SimDomain| {
                let most = if d.mem.autodeflate { d.mem.max } else { d.mem.actual };
                most - d.mem.resident as u64
            };
            let all_untouched: u64 = host.domains.iter().map(untouched).sum();
            host.host_used = 0;
            host.host_used = host.host_free() - reserve(&host) - all_untouched - spare_mib * MIB;
            // Two NUMA nodes, each able to back the whole balloons of the guests bound to it
            // above its 5 % share of the reserve, with `spare_mib` (node 0) or twice that (node
            // 1) more.
            host.mem_nodes = (0..2u32)
                .map(|node| {
                    let bound: u64 = host
                        .domains
                        .iter()
                        .filter(|d| d.facts.memory_nodes == Some(vec![node]))
                        .map(|d| d.mem.resident as u64 + untouched(d))
                        .sum();
                    let others = 512 * MIB;
                    let spare = u64::from(node + 1) * spare_mib * MIB;
                    let total = ((others + bound + spare) as f64 / 0.95).ceil() as u64 + MIB;
                    (node, total, others)
                })
                .collect();
            let node_reserve: Vec<u64> = host
                .mem_nodes
                .iter()
                .map(|&(_, total, _)| (total as f64 * 0.05).ceil() as u64)
                .collect();
            let floors: Vec<u64> = host
                .domains
                .iter()
                .map(|d| d.mem.actual.min(policy().min_guest_kib.max(d.facts.guaranteed_kib)))
                .collect();
            let mut c = Coordinator::new(policy(), false);
            for cycle in 0..90 {
                for (d, spec) in host.domains.iter_mut().zip(&guests) {
                    for &(start, rate, goal) in &spec.6 {
                        if start == cycle {
                            d.mem.work(rate * 1024.0, goal * MIB);
                        }
                    }
                }
                host.stuck = host
                    .domains
                    .iter()
                    .zip(&guests)
                    .filter(|(_, spec)| {
                        spec.7.is_some_and(|(from, len)| (from..from + len).contains(&cycle))
                    })
                    .map(|(d, _)| d.id)
                    .collect();
                host.advance(PERIOD);
                let report = c.cycle(&mut host).unwrap().expect("guests run");
                // No change is ever dropped for breaking a limit, whatever the liars say.
                prop_assert_eq!(report.skipped, 0, "cycle {}: {}", cycle, report);
                prop_assert!(
                    host.host_low >= reserve(&host),
                    "cycle {}: host down to {} MiB, reserve {} MiB",
                    cycle, host.host_low / MIB, reserve(&host) / MIB
                );
                for (node, low) in &host.node_low {
                    prop_assert!(
                        *low >= node_reserve[*node as usize],
                        "cycle {}: node {} down to {} MiB, its reserve {} MiB",
                        cycle, node, low / MIB, node_reserve[*node as usize] / MIB
                    );
                }
                for (d, floor) in host.domains.iter().zip(&floors) {
                    prop_assert!(d.mem.actual <= d.mem.max, "{} over its max", d.name);
                    prop_assert!(d.mem.actual >= *floor, "{} under its floor", d.name);
                    prop_assert!(d.mem.actual as f64 >= d.mem.used, "{} under its use", d.name);
                }
            }
            // Guests that never grew never ran out.
            for (d, spec) in host.domains.iter().zip(&guests) {
                if spec.6.iter().all(|&(_, rate, _)| rate <= 0.0) {
                    prop_assert_eq!(d.mem.ooms, 0, "{} ran out", &d.name);
                }
            }
        }
    }
}

#[test]
fn a_guest_restarted_under_the_same_uuid_carries_no_ledger_over() {
    // Guest 1's driver reports a fixed balloon size: after a grant it reads as behind it, and
    // gets no more.
    let mut host = tight_lab(1500, 2);
    host.domains[0].mem.claims_actual = Some(1024 * MIB);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 2000 * MIB);
    let behind = (0..30).any(|_| run(&mut host, &mut c, 1).contains("STARVING (balloon behind)"));
    assert!(behind, "never read as behind its grant");
    // It restarts under the same UUID, now with an honest driver, and consumes again: its new
    // run owes nothing to the old one's grants, so it is fed, never read as behind.
    let d = &mut host.domains[0];
    d.run += 1;
    d.mem.claims_actual = None;
    d.mem.restart(200 * MIB);
    d.mem.stats_period = 1;
    d.mem.work(20.0 * 1024.0, 1800 * MIB);
    let start = d.mem.actual;
    for _ in 0..60 {
        let line = run(&mut host, &mut c, 1);
        assert!(!line.contains("balloon behind"), "{line}");
    }
    assert_eq!(host.domains[0].mem.ooms, 0);
    assert!(
        host.domains[0].mem.actual > start,
        "never fed after its restart"
    );
}

#[test]
fn a_guest_claiming_a_balloon_over_its_max_blocks_no_grant() {
    // Guest 2's driver claims a 9 GiB balloon, its max being 2 GiB: it reads as 90 % free and not
    // consuming. Taken at its word it is wasting, its shrink target above its max, and a plan
    // holding that shrink broke a limit: every plan was refused and the hog starved.
    let mut host = tight_lab(1500, 2);
    host.domains[1].mem.claims_actual = Some(9 * 1024 * MIB);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(20.0 * 1024.0, 1300 * MIB);
    let mut said = false;
    for _ in 0..60 {
        let line = run(&mut host, &mut c, 1);
        said |= line.contains("dom2 9216 MiB") && line.contains("inconsistent stats");
    }
    let hog = &host.domains[0].mem;
    assert_eq!(hog.ooms, 0, "the hog ran out");
    assert!(
        hog.used >= 1300.0 * 1024.0 - 1.0,
        "the hog got {} MiB",
        hog.actual / MIB
    );
    assert!(said, "the liar was never read as inconsistent");
    assert_eq!(
        host.domains[1].mem.actual,
        1024 * MIB,
        "the liar was resized"
    );
}

#[test]
fn a_guest_hiding_its_free_memory_cannot_enlarge_the_host_budget() {
    // Guest 2 has touched 100 MiB of its 1 GiB balloon but reports nothing free. By its word it
    // has touched it all; by the host's own figure (its QEMU process's RSS) it may still make the
    // host back 924 MiB. Granting that to a hog would take the host under its reserve the moment
    // guest 2 touches its memory; `run` checks the reserve at every instant.
    let mut host = tight_lab(400, 2);
    let liar = &mut host.domains[1].mem;
    liar.resident = 100.0 * 1024.0;
    liar.used = 100.0 * 1024.0;
    liar.baseline = liar.used;
    liar.claims_free = Some(0);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    run(&mut host, &mut c, 40);
    host.domains[1].mem.work(200.0 * 1024.0, 1000 * MIB);
    run(&mut host, &mut c, 10);
    assert!(host.domains[1].mem.resident >= 1000.0 * 1024.0 - 1.0);
}

#[test]
fn a_guest_that_does_not_answer_stalls_no_other_and_counts_at_its_max() {
    let mut host = tight_lab(1500, 2);
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 3);
    // Guest 2's QEMU stops answering (stopped, or hung on its storage) while guest 1 grows.
    let frozen = host.domains[1].id;
    host.stuck.push(frozen);
    host.domains[0].mem.work(20.0 * 1024.0, 1100 * MIB);
    let mut grants = 0;
    for _ in 0..60 {
        let line = run(&mut host, &mut c, 1);
        assert!(line.contains("not answering, skipped: dom2"), "{line}");
        grants += line.matches("(starving:").count();
        // While it does not answer it counts at its max, less what the host backs of it.
        let report = c.cycle(&mut host).unwrap().unwrap();
        let unbacked = report.host.unwrap().unbacked_mib;
        assert!(
            unbacked >= 1024.0,
            "counted {unbacked} MiB for a 2 GiB guest backed at 1 GiB"
        );
    }
    let hog = &host.domains[0].mem;
    assert_eq!(hog.ooms, 0, "the hog ran out");
    assert!(grants > 0, "the hog was never fed");
    assert!(
        hog.used >= 1100.0 * 1024.0 - 1.0,
        "the hog got {} MiB",
        hog.actual / MIB
    );
    // It answers again, its record kept: judged at once, not taken for a new guest.
    host.stuck.clear();
    let line = run(&mut host, &mut c, 1);
    assert!(!line.contains("not answering"), "{line}");
    assert!(!line.contains("dom2 1024 MiB free 0 waiting"), "{line}");
}

#[test]
fn a_guest_busy_when_its_statistics_are_switched_on_is_armed_once_it_answers() {
    // Setting guest 2's statistics period does not answer in time for 3 cycles (a job holds the
    // domain): it is tried again, not taken for a guest without a balloon.
    let mut host = lab();
    let busy = host.domains[1].id;
    host.stuck_on_stats_period.push(busy);
    let mut c = Coordinator::new(policy(), false);
    let line = run(&mut host, &mut c, 3);
    assert!(!line.contains("without balloon"), "{line}");
    assert_eq!(host.domains[1].mem.stats_period, 0);
    host.stuck_on_stats_period.clear();
    let line = run(&mut host, &mut c, 1);
    assert!(!line.contains("without balloon"), "{line}");
    assert_eq!(host.domains[1].mem.stats_period, 1);
}

/// A host of two NUMA nodes (16 GiB in all): node 0 has 4 GiB, 3000 MiB of it taken by others;
/// node 1 has 12 GiB, 500 MiB taken. Guest 1's memory is bound to node 0, guest 2's to node 1;
/// both start at 512 of 2048 MiB using 200, then allocate 20 MiB/s up to 1500.
fn two_node_host(reports_nodes: bool) -> SimHost {
    let mut host = SimHost::new(2);
    host.host_total = 16384 * MIB;
    host.host_used = 3500 * MIB;
    host.mem_nodes = vec![(0, 4096 * MIB, 3000 * MIB), (1, 12288 * MIB, 500 * MIB)];
    host.reports_nodes = reports_nodes;
    for (n, node) in [(1, 0), (2, 1)] {
        host.add_guest(n, SimMemory::new(512 * MIB, 2048 * MIB, 200 * MIB));
        host.domains[usize::from(n) - 1].facts.memory_nodes = Some(vec![node]);
    }
    host
}

#[test]
fn a_guest_bound_to_a_nearly_full_numa_node_is_never_fed_past_that_nodes_reserve() {
    let node_reserve = |total_mib: u64| (total_mib as f64 * 1024.0 * 0.05).ceil() as u64;
    // Guest 1's largest balloon.
    let grow = |host: &mut SimHost| {
        let mut c = Coordinator::new(policy(), false);
        run(host, &mut c, 4);
        for d in &mut host.domains {
            d.mem.work(20.0 * 1024.0, 1500 * MIB);
        }
        (0..80)
            .map(|_| {
                run(host, &mut c, 1);
                host.domains[0].mem.actual
            })
            .max()
            .unwrap()
    };
    let mut host = two_node_host(true);
    let peak = grow(&mut host);
    let low0 = host.node_low[&0];
    eprintln!(
        "node 0 low {} MiB (reserve {}), guest 1 peaked at {} MiB, guest 2 at {} MiB",
        low0 / MIB,
        node_reserve(4096) / MIB,
        peak / MIB,
        host.domains[1].mem.actual / MIB
    );
    // Node 0 keeps its share of the reserve; the guest bound to it gets what node 0 can spare
    // (node 0's 1096 MiB less its 205 MiB reserve) and runs out inside itself, not the node.
    // Node 1's guest is fed in full.
    assert!(
        low0 >= node_reserve(4096),
        "node 0 fell to {} MiB",
        low0 / MIB
    );
    assert!(
        peak > 800 * MIB,
        "guest 1 was fed what node 0 had: {} MiB",
        peak / MIB
    );
    assert!(host.domains[0].mem.ooms >= 1);
    assert_eq!(host.domains[1].mem.ooms, 0);
    assert!(host.domains[1].mem.used >= 1500.0 * 1024.0 - 1.0);
    // Blind to the nodes, the coordinator feeds guest 1 from the host's whole budget, and node
    // 0 runs out.
    let mut blind = two_node_host(false);
    grow(&mut blind);
    assert!(
        blind.node_low[&0] < node_reserve(4096),
        "{:?}",
        blind.node_low
    );
}

#[test]
fn a_domain_that_cannot_be_read_counts_at_its_max_memory_even_if_never_read() {
    // Guest 3 (1 GiB of 2 GiB max) cannot be read from the start, then once it is known, then
    // can be read again.
    let mut host = lab();
    host.unreadable = vec![host.domains[2].id];
    let mut c = Coordinator::new(policy(), false);
    let unbacked = |host: &mut SimHost, c: &mut Coordinator| {
        host.advance(PERIOD);
        let report = c.cycle(host).unwrap().unwrap();
        (report.host.unwrap().unbacked_mib, report.not_answering)
    };
    // Never read: all of its 2048 MiB max (from its definition) may still land on the host,
    // where a guest read but not yet reported on counts its 1024 MiB balloon.
    let (never_read, said) = unbacked(&mut host, &mut c);
    let (mut twin, mut twin_c) = (lab(), Coordinator::new(policy(), false));
    let (all_read, _) = unbacked(&mut twin, &mut twin_c);
    assert!(
        never_read >= all_read + 1024.0 - 1.0,
        "{never_read} MiB, {all_read} when all are read"
    );
    assert_eq!(said, ["dom3"]);
    host.unreadable.clear();
    for _ in 0..4 {
        unbacked(&mut host, &mut c);
    }
    let (readable, said) = unbacked(&mut host, &mut c);
    assert!(said.is_empty());
    assert!(readable < never_read - 1000.0, "{readable} MiB once read");
    // Its read fails again: at its max less what its QEMU had resident at its last read.
    host.unreadable = vec![host.domains[2].id];
    let (failed, _) = unbacked(&mut host, &mut c);
    let resident = host.domains[2].mem.resident / 1024.0;
    assert!(
        failed >= readable + (2048.0 - resident) - 1024.0 - 1.0,
        "{failed} MiB, {readable} before, {resident} resident"
    );
}

#[test]
fn a_guest_partly_backed_by_hugepages_is_never_shrunk_into_them() {
    // Guests 2 and 3 are idle alike; hugepages hold 800 MiB of guest 3 (one of its NUMA cells).
    let mut host = lab();
    host.domains[2].facts.held_kib = 800 * MIB;
    let mut c = Coordinator::new(policy(), false);
    run(&mut host, &mut c, 60);
    let (free, held) = (host.domains[1].mem.actual, host.domains[2].mem.actual);
    assert!(
        free < 500 * MIB,
        "the other idle guest shrank: {} MiB",
        free / MIB
    );
    assert!(held >= 800 * MIB, "{} MiB", held / MIB);
    assert!(
        held < 1024 * MIB,
        "it still gave back what is not held: {} MiB",
        held / MIB
    );
}

/// The fleet signal of each of `cycles` cycles one PERIOD apart.
fn pressures(host: &mut SimHost, c: &mut Coordinator, cycles: usize) -> Vec<Option<f64>> {
    (0..cycles)
        .map(|_| {
            host.advance(PERIOD);
            c.cycle(host)
                .unwrap()
                .expect("domains are running")
                .unmet_share
        })
        .collect()
}

#[test]
fn a_host_that_cannot_feed_its_hog_says_so_and_one_that_can_says_zero() {
    // The hog wants 800 MiB more than the host has above its reserve.
    let mut host = short_lab();
    let mut c = Coordinator::new(policy(), false);
    pressures(&mut host, &mut c, 3);
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    let read: Vec<f64> = pressures(&mut host, &mut c, 40)
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(read.len(), 40);
    assert!(read.iter().all(|&s| (0.0..=1.0).contains(&s)), "{read:?}");
    // Once the host's budget is spent, the hog's need goes unmet, more each cycle, until the
    // hog runs out of memory (its workload killed, it consumes no more).
    let unmet: Vec<f64> = read
        .split(|&s| s == 0.0)
        .max_by_key(|run| run.len())
        .unwrap_or_default()
        .to_vec();
    assert!(unmet.len() >= 3, "{read:?}");
    assert!(unmet.windows(2).all(|w| w[1] >= w[0]), "{read:?}");
    assert!(unmet.last() > unmet.first(), "{read:?}");
    // The lab with idle guests to take from feeds the same hog: nothing left unmet.
    let mut host = lab();
    let mut c = Coordinator::new(policy(), false);
    pressures(&mut host, &mut c, 4);
    host.domains[0].mem.work(40.0 * 1024.0, 1800 * MIB);
    let read: Vec<f64> = pressures(&mut host, &mut c, 60)
        .into_iter()
        .flatten()
        .collect();
    assert!(read.iter().all(|&s| s == 0.0), "{read:?}");
}
