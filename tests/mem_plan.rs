//! The memory planner, rule by rule, and its hard limits over random snapshots.

use proptest::prelude::*;
use vmbalance::host::{DomainId, HostMemory};
use vmbalance::mem_plan::{MemPlan, MemPolicy, MemSnapshot, MemStatus, plan, violations};
use vmbalance::sampling::GuestMemory;

const MIB: u64 = 1024;

fn guest(n: u8, actual_mib: u64, unused_mib: u64, rate_mib_s: f64) -> GuestMemory {
    GuestMemory {
        id: DomainId([n; 16]),
        actual_kib: actual_mib * MIB,
        max_kib: 4096 * MIB,
        free_kib: unused_mib * MIB,
        rate_kib_s: rate_mib_s * 1024.0,
    }
}

fn host(total_mib: u64, free_mib: u64) -> Option<HostMemory> {
    Some(HostMemory {
        total_kib: total_mib * MIB,
        available_kib: free_mib * MIB,
    })
}

fn policy() -> MemPolicy {
    MemPolicy::default()
}

fn plan_for(guests: Vec<GuestMemory>, host: Option<HostMemory>) -> (MemSnapshot, MemPlan) {
    let s = MemSnapshot { guests, host };
    let p = plan(&s, &policy());
    assert!(
        violations(&s, &p, &policy()).is_empty(),
        "{:?}",
        violations(&s, &p, &policy())
    );
    (s, p)
}

/// New size of guest `n` under the plan (its current size when unchanged).
fn size_mib(s: &MemSnapshot, p: &MemPlan, n: u8) -> u64 {
    let id = DomainId([n; 16]);
    let now = s.guests.iter().find(|g| g.id == id).unwrap().actual_kib;
    p.changes
        .iter()
        .find(|c| c.id == id)
        .map_or(now, |c| c.to_kib)
        / MIB
}

#[test]
fn statuses_follow_the_thresholds() {
    let p = policy();
    assert_eq!(p.status(&guest(1, 1000, 100, 5.0)), MemStatus::Starving);
    // Short of memory but not consuming: nothing to feed.
    assert_eq!(p.status(&guest(1, 1000, 100, 0.0)), MemStatus::Balanced);
    assert_eq!(p.status(&guest(1, 1000, 600, 0.0)), MemStatus::Wasting);
    // Lots unused but consuming fast: not wasting.
    assert_eq!(p.status(&guest(1, 1000, 600, 5.0)), MemStatus::Balanced);
    assert_eq!(p.status(&guest(1, 1000, 300, 0.0)), MemStatus::Balanced);
    // 30 % unused, but at 20 MiB/s its 60 MiB last 3 s, under 3 periods of 3 s: starving already.
    assert_eq!(p.status(&guest(1, 200, 60, 20.0)), MemStatus::Starving);
    assert_eq!(p.status(&guest(1, 200, 60, 2.0)), MemStatus::Balanced);
}

#[test]
fn a_starving_guest_is_fed_from_a_wasting_one_first() {
    // Guest 1 consumes 20 MiB/s with 50 MiB left; guest 2 idles with 800 of 1000 MiB unused.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 800, 0.0)],
        host(16384, 8000),
    );
    // At 20 MiB/s it eats 60 MiB per 3 s period: it gets twice that (120 MiB) plus the 130 MiB it
    // lacks of 3 periods' worth free (180 MiB): 250 MiB, all from guest 2.
    assert_eq!(size_mib(&s, &p, 1), 1250);
    assert_eq!(size_mib(&s, &p, 2), 750);
    assert_eq!((p.from_host_kib, p.to_host_kib), (0, 0));
    // Shrinks come first, so the memory is free before it is handed out.
    assert!(p.changes[0].shrinks() && !p.changes[1].shrinks());
}

#[test]
fn a_starving_guest_with_no_wasting_peer_is_fed_by_the_host() {
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 300, 0.0)],
        host(16384, 8000),
    );
    assert_eq!(size_mib(&s, &p, 1), 1250);
    assert_eq!(size_mib(&s, &p, 2), 1000);
    assert_eq!(p.from_host_kib, 250 * MIB);
}

#[test]
fn a_guest_with_plenty_of_runway_gets_twice_its_consumption() {
    // 12 % free of 2000 MiB = 240 MiB, 4 periods at 20 MiB/s: twice a period's use, 120 MiB.
    let (s, p) = plan_for(vec![guest(1, 2000, 240, 20.0)], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 2120);
}

#[test]
fn slow_starvation_still_gets_the_minimum_step() {
    let (s, p) = plan_for(vec![guest(1, 1000, 50, 1.5)], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 1000 + policy().min_step_kib / MIB);
}

#[test]
fn a_host_at_its_reserve_gives_nothing_more() {
    // 5 % of 16 GiB is 819.2 MiB; the host has 820 MiB available: under 1 MiB to spare.
    let (s, p) = plan_for(vec![guest(1, 1000, 50, 20.0)], host(16384, 820));
    assert!(size_mib(&s, &p, 1) - 1000 <= 1);
    let (_, p) = plan_for(vec![guest(1, 1000, 50, 20.0)], host(16384, 700));
    assert!(p.changes.is_empty());
    // And when the host cannot tell its memory, nothing is taken from it.
    let (_, p) = plan_for(vec![guest(1, 1000, 50, 20.0)], None);
    assert!(p.changes.is_empty());
}

#[test]
fn the_host_gives_only_down_to_its_reserve() {
    // 919 MiB available, reserve ~819: at most ~100 of the 250 MiB wanted.
    let (s, p) = plan_for(vec![guest(1, 1000, 50, 20.0)], host(16384, 919));
    let grant = size_mib(&s, &p, 1) - 1000;
    assert!((99..=100).contains(&grant), "{grant}");
}

#[test]
fn wasting_guests_return_memory_gradually_when_nobody_starves() {
    let mut g = guest(1, 2000, 1800, 0.0);
    let mut sizes = vec![g.actual_kib / MIB];
    for _ in 0..40 {
        let (s, p) = plan_for(vec![g], host(16384, 8000));
        let next = size_mib(&s, &p, 1);
        if next == g.actual_kib / MIB {
            break;
        }
        // The guest's used memory (200 MiB) stays; only unused memory goes.
        g.free_kib -= g.actual_kib - next * MIB;
        g.actual_kib = next * MIB;
        sizes.push(next);
    }
    // First step: a quarter of the excess over a comfortable size, not all of it.
    assert!(sizes[1] > 1500 && sizes[1] < 2000, "{sizes:?}");
    assert!(sizes.windows(2).all(|w| w[1] < w[0]), "{sizes:?}");
    // It stops once no longer wasting (at most half unused), well above its 200 MiB in use.
    let last = *sizes.last().unwrap();
    assert!((300..=400).contains(&last), "{sizes:?}");
    assert_eq!(policy().status(&g), MemStatus::Balanced);
    assert!(sizes.len() > 5, "returned in steps, not at once: {sizes:?}");
}

#[test]
fn a_host_under_its_reserve_gets_excess_back_faster() {
    let (s, p) = plan_for(vec![guest(1, 2000, 1800, 0.0)], host(16384, 400));
    let (s2, p2) = plan_for(vec![guest(1, 2000, 1800, 0.0)], host(16384, 8000));
    assert!(size_mib(&s, &p, 1) < size_mib(&s2, &p2, 1));
}

#[test]
fn balanced_guests_get_no_change() {
    let (_, p) = plan_for(
        vec![
            guest(1, 1000, 300, 0.0),
            guest(2, 1000, 400, 3.0),
            guest(3, 1000, 100, 0.0),
        ],
        host(16384, 8000),
    );
    assert!(p.changes.is_empty());
}

#[test]
fn several_starving_guests_are_fed_most_starved_first() {
    // Guest 1 (100 MiB free) wants 120 + 80 = 200 MiB, guest 2 (20 MiB free) 120 + 160 = 280 MiB;
    // the host spares 310.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 100, 20.0), guest(2, 1000, 20, 20.0)],
        host(16384, 820 + 310),
    );
    let (g1, g2) = (size_mib(&s, &p, 1) - 1000, size_mib(&s, &p, 2) - 1000);
    assert_eq!(g2, 280, "most starved is served in full");
    assert!((29..=30).contains(&g1), "{g1}");
}

#[test]
fn never_above_max_memory() {
    let mut g = guest(1, 1000, 20, 50.0);
    g.max_kib = 1050 * MIB;
    let (s, p) = plan_for(vec![g], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 1050);
}

#[test]
fn a_wasting_guest_is_never_shrunk_under_its_floor_or_what_it_uses() {
    // Tiny guest: 80 MiB with 60 unused: the 50 MiB floor holds.
    let (s, p) = plan_for(
        vec![guest(1, 80, 60, 0.0), guest(2, 1000, 10, 30.0)],
        host(16384, 820),
    );
    assert!(size_mib(&s, &p, 1) >= 52, "{}", size_mib(&s, &p, 1));
    // Big user: shrinks stop above its used memory plus a margin.
    let (s, p) = plan_for(
        vec![guest(1, 4000, 2100, 0.0), guest(2, 1000, 10, 300.0)],
        host(16384, 820),
    );
    assert!(size_mib(&s, &p, 1) >= 1900 + 32);
}

#[test]
fn violations_catch_unsafe_plans() {
    let s = MemSnapshot {
        guests: vec![guest(1, 1000, 500, 0.0)],
        host: host(16384, 900),
    };
    let bad = |to_mib: u64, from_host_mib: u64| MemPlan {
        changes: vec![vmbalance::mem_plan::BalloonChange {
            id: DomainId([1; 16]),
            from_kib: 1000 * MIB,
            to_kib: to_mib * MIB,
        }],
        from_host_kib: from_host_mib * MIB,
        to_host_kib: 0,
    };
    assert!(
        violations(&s, &bad(5000, 0), &policy())
            .iter()
            .any(|v| v.contains("above max"))
    );
    assert!(
        violations(&s, &bad(510, 0), &policy())
            .iter()
            .any(|v| v.contains("floor"))
    );
    assert!(
        violations(&s, &bad(1300, 300), &policy())
            .iter()
            .any(|v| v.contains("reserve"))
    );
    assert!(
        violations(&s, &bad(1600, 0), &policy())
            .iter()
            .any(|v| v.contains("step"))
    );
    assert!(violations(&s, &bad(900, 0), &policy()).is_empty());
}

fn arb_guest(n: u8) -> impl Strategy<Value = GuestMemory> {
    (40u64..8192, 0u64..=100, -50.0f64..200.0, 0u64..4096).prop_map(
        move |(actual, unused_pct, rate, extra)| GuestMemory {
            id: DomainId([n; 16]),
            actual_kib: actual * MIB,
            max_kib: (actual + extra) * MIB,
            free_kib: actual * MIB * unused_pct / 100,
            rate_kib_s: rate * 1024.0,
        },
    )
}

fn arb_snapshot() -> impl Strategy<Value = MemSnapshot> {
    (
        (0u8..12).prop_flat_map(|n| (0..n).map(arb_guest).collect::<Vec<_>>()),
        prop::option::weighted(0.9, (1024u64..65536, 0u64..=100)),
    )
        .prop_map(|(guests, host)| MemSnapshot {
            guests,
            host: host.map(|(total, free_pct)| HostMemory {
                total_kib: total * MIB,
                available_kib: total * MIB * free_pct / 100,
            }),
        })
}

proptest! {
    #[test]
    fn plans_respect_every_hard_limit(s in arb_snapshot()) {
        let pol = policy();
        let p = plan(&s, &pol);
        prop_assert!(violations(&s, &p, &pol).is_empty(), "{:?}", violations(&s, &p, &pol));
        let mut grown = 0i128;
        for c in &p.changes {
            let g = s.guests.iter().find(|g| g.id == c.id).unwrap();
            prop_assert_eq!(c.from_kib, g.actual_kib);
            prop_assert_ne!(c.from_kib, c.to_kib);
            prop_assert!(c.to_kib <= g.max_kib);
            if c.shrinks() {
                prop_assert!(c.to_kib >= pol.min_guest_kib);
                prop_assert!(c.to_kib >= g.used_kib() + pol.min_step_kib);
                prop_assert_eq!(pol.status(g), MemStatus::Wasting, "only wasting guests shrink");
            } else {
                prop_assert_eq!(pol.status(g), MemStatus::Starving, "only starving guests grow");
            }
            grown += i128::from(c.to_kib) - i128::from(c.from_kib);
        }
        // Memory is conserved: what guests gain in all is what the host gave minus what it got.
        prop_assert_eq!(grown, i128::from(p.from_host_kib) - i128::from(p.to_host_kib));
        // The host stays at or above its reserve, or is not drawn on at all.
        if let Some(h) = s.host {
            if p.from_host_kib > 0 {
                prop_assert!(h.available_kib - p.from_host_kib >= pol.reserve_kib(h));
            }
        } else {
            prop_assert_eq!(p.from_host_kib, 0);
        }
        // Nobody starving: memory only flows back to the host.
        if s.guests.iter().all(|g| pol.status(g) != MemStatus::Starving) {
            prop_assert_eq!(p.from_host_kib, 0);
        }
    }
}
