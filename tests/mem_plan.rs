//! The memory planner, rule by rule, and its hard limits over random snapshots.

use std::collections::HashMap;

use proptest::prelude::*;
use vmbalance::host::{DomainId, HostMemory, NodeMemory};
use vmbalance::mem_plan::{
    MemPlan, MemPolicy, MemSnapshot, MemStatus, PlannedGuest, Standing, plan, violations,
};
use vmbalance::sampling::GuestMemory;

const MIB: u64 = 1024;

fn guest(n: u8, actual_mib: u64, unused_mib: u64, rate_mib_s: f64) -> GuestMemory {
    GuestMemory {
        id: DomainId([n; 16]),
        actual_kib: actual_mib * MIB,
        max_kib: 4096 * MIB,
        free_kib: unused_mib * MIB,
        unused_kib: unused_mib * MIB,
        rate_kib_s: rate_mib_s * 1024.0,
        latest_rate_kib_s: rate_mib_s * 1024.0,
    }
}

fn host(total_mib: u64, free_mib: u64) -> Option<HostMemory> {
    Some(HostMemory::new(total_mib * MIB, free_mib * MIB))
}

/// The default policy without the blind margin, so each rule's arithmetic shows plainly; the
/// margin has a test of its own.
fn policy() -> MemPolicy {
    MemPolicy {
        blind_secs: 0.0,
        ..MemPolicy::default()
    }
}

fn snapshot(guests: Vec<GuestMemory>, host: Option<HostMemory>) -> MemSnapshot {
    MemSnapshot {
        guests: guests.into_iter().map(PlannedGuest::from).collect(),
        host,
        ..MemSnapshot::default()
    }
}

/// Guest `id` of `s` has `standing`.
fn set_standing(s: &mut MemSnapshot, id: DomainId, standing: Standing) {
    s.guest_mut(&id)
        .expect("the guest is in the snapshot")
        .standing = standing;
}

/// Guest `n`'s memory is strictly bound to NUMA node `node`.
fn bind(s: &mut MemSnapshot, n: u8, node: u32) {
    let g = s
        .guest_mut(&DomainId([n; 16]))
        .expect("the guest is in the snapshot");
    g.nodes = Some(vec![node]);
}

/// The NUMA nodes guest `id` of `s` is bound to.
fn nodes_of(s: &MemSnapshot, id: DomainId) -> Option<&Vec<u32>> {
    s.guest(&id).and_then(|g| g.nodes.as_ref())
}

fn checked(s: MemSnapshot, pol: &MemPolicy) -> (MemSnapshot, MemPlan) {
    let p = plan(&s, pol);
    let problems = violations(&s, &p, pol);
    assert!(problems.is_empty(), "{problems:?}");
    (s, p)
}

fn plan_for(guests: Vec<GuestMemory>, host: Option<HostMemory>) -> (MemSnapshot, MemPlan) {
    checked(snapshot(guests, host), &policy())
}

fn status(g: &GuestMemory) -> MemStatus {
    policy().status(g, &Standing::default())
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
    assert_eq!(status(&guest(1, 1000, 100, 5.0)), MemStatus::Starving);
    // Short of memory but not consuming: nothing to feed.
    assert_eq!(status(&guest(1, 1000, 100, 0.0)), MemStatus::Balanced);
    assert_eq!(status(&guest(1, 1000, 600, 0.0)), MemStatus::Wasting);
    // Lots unused but consuming fast: not wasting.
    assert_eq!(status(&guest(1, 1000, 600, 5.0)), MemStatus::Balanced);
    assert_eq!(status(&guest(1, 1000, 300, 0.0)), MemStatus::Balanced);
    // 30 % unused, but at 20 MiB/s its 60 MiB last 3 s, under 3 periods of 3 s: starving already.
    assert_eq!(status(&guest(1, 200, 60, 20.0)), MemStatus::Starving);
    assert_eq!(status(&guest(1, 200, 60, 2.0)), MemStatus::Balanced);
}

#[test]
fn a_guest_being_reclaimed_stays_wasting_until_it_reaches_its_target() {
    let reclaiming = Standing {
        reclaiming: true,
        ..Standing::default()
    };
    // 45 % free: under the waste line, so a guest seen here first is balanced...
    let g = guest(1, 1000, 450, 0.0);
    assert_eq!(status(&g), MemStatus::Balanced);
    // ...but one being brought down is wasting until it has 32.5 % free.
    assert_eq!(policy().status(&g, &reclaiming), MemStatus::Wasting);
    assert_eq!(
        policy().status(&guest(1, 1000, 325, 0.0), &reclaiming),
        MemStatus::Balanced
    );
    // Consuming again: not wasting, whatever it was.
    assert_eq!(
        policy().status(&guest(1, 1000, 450, 5.0), &reclaiming),
        MemStatus::Balanced
    );
}

#[test]
fn grants_come_from_the_host_and_a_wasting_guest_gives_as_much_back() {
    // Guest 1 consumes 20 MiB/s with 50 MiB left; guest 2 idles with 800 of 1000 MiB unused.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 800, 0.0)],
        host(16384, 8000),
    );
    // At 20 MiB/s it eats 60 MiB per 3 s period: it gets twice that (120 MiB) plus the 130 MiB it
    // lacks of 3 periods' worth free (180 MiB): 250 MiB, from the host; guest 2 gives as much
    // back, which the host's figure shows in the next cycles.
    assert_eq!(size_mib(&s, &p, 1), 1250);
    assert_eq!(size_mib(&s, &p, 2), 750);
    assert_eq!((p.from_host_kib, p.to_host_kib), (250 * MIB, 250 * MIB));
    assert!(p.changes[0].shrinks() && !p.changes[1].shrinks());
}

#[test]
fn a_shrink_does_not_fund_a_grant_in_the_same_cycle() {
    // The host is at its reserve: the wasting guest gives back, the starving one waits for the
    // host's figure to show it.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 800, 0.0)],
        host(16384, 819),
    );
    assert_eq!(size_mib(&s, &p, 1), 1000);
    // 250 MiB back (the hog's want), and the fraction of a MiB the host is under its reserve.
    assert!((749..=750).contains(&size_mib(&s, &p, 2)));
}

#[test]
fn memory_guests_may_still_touch_is_not_the_hosts_to_give() {
    // 1019 MiB available, reserve ~819: 200 to spare, but guests hold 150 MiB they never touched.
    let mut s = snapshot(vec![guest(1, 1000, 50, 20.0)], host(16384, 1019));
    s.unbacked_kib = 150 * MIB;
    let (s, p) = checked(s, &policy());
    let grant = size_mib(&s, &p, 1) - 1000;
    assert!((49..=50).contains(&grant), "{grant}");
}

/// Guest `n`'s balloon did not follow its last grant.
fn mark_behind(s: &mut MemSnapshot, n: u8) {
    set_standing(
        s,
        DomainId([n; 16]),
        Standing {
            behind: true,
            ..Standing::default()
        },
    );
}

#[test]
fn a_guest_whose_balloon_did_not_follow_gets_nothing_more() {
    let mut s = snapshot(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 50, 20.0)],
        host(16384, 8000),
    );
    mark_behind(&mut s, 1);
    let (s, p) = checked(s, &policy());
    assert_eq!(size_mib(&s, &p, 1), 1000);
    assert_eq!(size_mib(&s, &p, 2), 1250);
}

#[test]
fn a_guest_behind_its_balloon_does_not_hold_up_idle_memory_going_back() {
    // Alone and starving but behind: nothing for it, and the idle guest still gives back (rule 4).
    let mut s = snapshot(
        vec![guest(1, 1000, 50, 20.0), guest(2, 2000, 1800, 0.0)],
        host(16384, 8000),
    );
    mark_behind(&mut s, 1);
    let (s, p) = checked(s, &policy());
    assert_eq!(size_mib(&s, &p, 1), 1000);
    assert!(size_mib(&s, &p, 2) < 2000, "{p:?}");
    let c = &p.changes[0];
    assert_eq!(p.to_host_kib, c.from_kib - c.to_kib, "{p:?}");
}

#[test]
fn equal_needs_get_equal_shares_of_a_short_budget() {
    // Both want 250 MiB; the host spares 200.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 50, 20.0)],
        host(16384, 820 + 200),
    );
    let (g1, g2) = (size_mib(&s, &p, 1) - 1000, size_mib(&s, &p, 2) - 1000);
    assert_eq!(g1, g2);
    assert!((99..=100).contains(&g1), "{g1}");
}

#[test]
fn a_short_budget_is_shared_by_need() {
    // Guest 1 (100 MiB free) wants 120 + 80 = 200 MiB, guest 2 (20 MiB free) 120 + 160 = 280 MiB;
    // the host spares 240: half of each want.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 100, 20.0), guest(2, 1000, 20, 20.0)],
        host(16384, 819 + 240),
    );
    let (g1, g2) = (size_mib(&s, &p, 1) - 1000, size_mib(&s, &p, 2) - 1000);
    assert!((99..=100).contains(&g1), "{g1}");
    assert!((139..=140).contains(&g2), "{g2}");
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
fn a_growing_guest_keeps_free_what_a_blind_spell_of_the_coordinator_would_eat() {
    // 300 MiB free at 20 MiB/s: 15 s of runway. With 9 s of runway periods it is not starving,
    // but a libvirt restart may leave the coordinator blind for 10 s more: it is starving, and
    // fed so that two periods ahead it still has 19 s of its consumption (380 MiB) free.
    let g = guest(1, 2000, 300, 20.0);
    let blind = MemPolicy::default();
    assert_eq!(blind.blind_secs, vmbalance::mem_plan::BLIND_SECS);
    let (s, p) = plan_for(vec![g], host(16384, 8000));
    assert_eq!(
        size_mib(&s, &p, 1),
        2000,
        "without the margin it has enough"
    );
    let s = snapshot(vec![g], host(16384, 8000));
    let p = plan(&s, &blind);
    assert_eq!(size_mib(&s, &p, 1), 2000 + 120 + 380 - 300);
}

#[test]
fn a_guest_is_given_what_it_lacks_of_its_runway_two_periods_ahead() {
    // 12 % free of 2000 MiB = 240 MiB: at 20 MiB/s it eats 120 MiB in the two periods until its
    // next decision, and wants 180 MiB (3 periods) left then: 60 MiB.
    let (s, p) = plan_for(vec![guest(1, 2000, 240, 20.0)], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 2060);
    // With 290 MiB free it lacks 10 MiB.
    let (s, p) = plan_for(vec![guest(1, 2000, 290, 20.0)], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 2010);
    // At 10 MiB/s, 250 MiB free lack nothing (60 MiB consumed, 100 MiB of headroom kept):
    // starving (under 15 %), but fed only when it needs it.
    let (s, p) = plan_for(vec![guest(1, 2000, 250, 10.0)], host(16384, 8000));
    assert_eq!(status(&s.guests[0]), MemStatus::Starving);
    assert!(p.changes.is_empty());
}

#[test]
fn a_slow_consumer_is_kept_at_its_headroom_share() {
    // 1.5 MiB/s: 9 MiB in two periods, a runway of 13.5 MiB; 8 % of 1000 MiB is more: 80 MiB.
    let (s, p) = plan_for(vec![guest(1, 1000, 30, 1.5)], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 1059);
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

/// Plan cycle after cycle for one guest whose used memory stays, carrying its standing over as
/// the coordinator does; the sizes it goes through.
fn reclaim(mut g: GuestMemory, pol: &MemPolicy, host_mib: (u64, u64)) -> Vec<u64> {
    let mut sizes = vec![g.actual_kib / MIB];
    let mut standing = Standing::default();
    for _ in 0..200 {
        let status = pol.status(&g, &standing);
        let mut s = snapshot(vec![g], host(host_mib.0, host_mib.1));
        s.guests[0].standing = standing;
        let (s, p) = checked(s, pol);
        standing.reclaiming = status == MemStatus::Wasting;
        let next = size_mib(&s, &p, 1);
        // The guest's used memory stays; only unused memory goes.
        g.free_kib -= g.actual_kib - next * MIB;
        g.actual_kib = next * MIB;
        sizes.push(next);
    }
    sizes
}

#[test]
fn wasting_guests_return_memory_in_steps_down_to_their_target_and_stay_there() {
    let sizes = reclaim(guest(1, 2000, 1800, 0.0), &policy(), (16384, 8000));
    // First step: a quarter of the excess over its target size, not all of it.
    assert!(sizes[1] > 1500 && sizes[1] < 2000, "{sizes:?}");
    let moves = sizes.windows(2).filter(|w| w[1] != w[0]).count();
    assert!(moves > 5, "returned in steps, not at once: {sizes:?}");
    assert!(
        sizes.windows(2).all(|w| w[1] <= w[0]),
        "never grown back: {sizes:?}"
    );
    // It ends with its 256 MiB cushion free above its 200 MiB in use (its 32.5 % target share
    // would leave it 96), not just under the waste line, and stays there for the rest of the 200
    // cycles.
    let last = *sizes.last().unwrap();
    assert_eq!(last, 456, "{sizes:?}");
    let settled = sizes.iter().position(|&s| s == last).unwrap();
    assert!(settled < 40, "took {settled} cycles: {sizes:?}");
}

#[test]
fn the_target_free_share_can_be_set() {
    let pol = MemPolicy {
        target_free_pct: 20.0,
        cushion_kib: 0,
        ..policy()
    };
    let last = *reclaim(guest(1, 2000, 1800, 0.0), &pol, (16384, 8000))
        .last()
        .unwrap();
    assert_eq!(last, 250, "200 MiB used are 80 %");
}

#[test]
fn a_host_stalling_on_memory_takes_all_idle_excess_back_at_once() {
    let idle = guest(1, 2000, 1800, 0.0);
    let returned = |stalled_pct: Option<f64>| {
        let h = HostMemory {
            stalled_pct,
            ..host(16384, 8000).unwrap()
        };
        let (_, p) = checked(snapshot(vec![idle], Some(h)), &policy());
        p.to_host_kib / MIB
    };
    // Plenty available and no stall: a quarter of its excess (2000 - 456) per cycle.
    assert_eq!(returned(None), 386);
    assert_eq!(returned(Some(2.0)), 386);
    // Stalling 10 % of the time or more: all of it (one step, 512 MiB), whatever MemAvailable says.
    assert_eq!(returned(Some(10.0)), 512);
    // In host-pressure mode, a stalling host takes idle memory back although it has its target.
    let pressure_mode = MemPolicy {
        host_target_pct: Some(20.0),
        ..policy()
    };
    let h = |stalled_pct| HostMemory {
        stalled_pct,
        ..host(16384, 8000).unwrap()
    };
    let (_, calm) = checked(snapshot(vec![idle], Some(h(None))), &pressure_mode);
    assert!(calm.changes.is_empty(), "{calm:?}");
    let (_, pressed) = checked(snapshot(vec![idle], Some(h(Some(25.0)))), &pressure_mode);
    assert_eq!(pressed.to_host_kib / MIB, 512);
}

/// A two-node host: node 0 (8 GiB) has `free0_mib` free, node 1 (8 GiB) 6000 MiB.
fn two_nodes(free0_mib: u64) -> Vec<NodeMemory> {
    [(0, free0_mib), (1, 6000)]
        .map(|(node, free)| NodeMemory {
            node,
            total_kib: 8192 * MIB,
            free_kib: free * MIB,
        })
        .to_vec()
}

#[test]
fn a_guest_bound_to_a_full_numa_node_is_fed_only_from_that_node() {
    // Three starving guests, each wanting about 300 MiB: guest 1 bound to node 0, which has
    // 600 MiB free of which 410 are its share of the 5 % reserve; guest 2 bound to node 1; guest
    // 3 unbound. The host as a whole has plenty.
    let starving = |n| guest(n, 1000, 50, 20.0);
    let mut s = snapshot(
        vec![starving(1), starving(2), starving(3)],
        host(16384, 6600),
    );
    s.nodes = two_nodes(600);
    bind(&mut s, 1, 0);
    bind(&mut s, 2, 1);
    let (_, p) = checked(s.clone(), &policy());
    let grant = |p: &MemPlan, n: u8| {
        p.changes
            .iter()
            .find(|c| c.id == DomainId([n; 16]))
            .map_or(0, |c| (c.to_kib - c.from_kib) / MIB)
    };
    let (want, node0_spare) = (grant(&p, 3), 600 - 410);
    assert!(want > node0_spare, "each wants {want} MiB");
    assert_eq!(grant(&p, 1), node0_spare, "{p:?}");
    assert_eq!(grant(&p, 2), want);
    // What guests bound to node 0 may still touch comes off its budget too.
    s.node_unbacked_kib = HashMap::from([(0, 150 * MIB)]);
    let (_, p) = checked(s.clone(), &policy());
    assert_eq!(grant(&p, 1), node0_spare - 150);
    // Two guests bound to the same full node share it in proportion to their wants.
    s.node_unbacked_kib.clear();
    bind(&mut s, 3, 0);
    let (_, p) = checked(s.clone(), &policy());
    assert!(grant(&p, 1).abs_diff(grant(&p, 3)) <= 1, "{p:?}");
    assert!(grant(&p, 1) + grant(&p, 3) <= node0_spare);
    // Without node figures (one node), the host's budget alone.
    s.nodes.clear();
    let (_, p) = checked(s, &policy());
    assert_eq!(grant(&p, 1), want);
    // A change another planner makes beyond the node is dropped alone.
    let mut s = snapshot(vec![starving(1), starving(2)], host(16384, 6600));
    s.nodes = two_nodes(600);
    bind(&mut s, 1, 0);
    let greedy = MemPlan {
        changes: [1, 2]
            .map(|n| vmbalance::mem_plan::BalloonChange {
                id: DomainId([n; 16]),
                from_kib: 1000 * MIB,
                to_kib: 1300 * MIB,
            })
            .to_vec(),
        from_host_kib: 600 * MIB,
        ..MemPlan::default()
    };
    assert_eq!(violations(&s, &greedy, &policy()).len(), 1);
    let (safe, dropped) = vmbalance::mem_plan::safe_part(&s, greedy, &policy());
    assert_eq!(safe.changes.len(), 1, "{dropped:?}");
    assert_eq!(safe.changes[0].id, DomainId([2; 16]));
    assert!(dropped[0].contains("NUMA node 0"), "{dropped:?}");
}

#[test]
fn a_jump_in_consumption_is_fed_at_the_latest_pace() {
    // 10 MiB/s over its last two reports, but 40 MiB/s over the last one: a burst starting.
    let steady = guest(1, 1000, 150, 10.0);
    let jumping = GuestMemory {
        latest_rate_kib_s: 40.0 * 1024.0,
        ..steady
    };
    let grant = |g: GuestMemory| {
        let (_, p) = checked(snapshot(vec![g], host(16384, 8000)), &policy());
        p.from_host_kib / MIB
    };
    // Steady, 150 MiB free lasts 15 s: balanced. Jumping, it lasts under 4 s: fed at once, for
    // its runway and two periods at 40 MiB/s.
    assert_eq!(grant(steady), 0);
    let fed = grant(jumping);
    assert!(fed >= 5 * 3 * 40 - 150, "{fed} MiB");
    // A slower last interval changes nothing.
    let slowing = GuestMemory {
        latest_rate_kib_s: 5.0 * 1024.0,
        ..steady
    };
    assert_eq!(grant(slowing), 0);
}

#[test]
fn idle_guests_give_from_their_cushion_when_the_host_cannot_feed_a_starving_guest() {
    // Two idle guests at their cushion (200 MiB used, 456 held) beside a starving one.
    let idle = |n| guest(n, 456, 256, 0.0);
    let starving = guest(3, 1000, 40, 20.0);
    let cushion_given = |host_free_mib: u64| {
        let (_, p) = checked(
            snapshot(vec![idle(1), idle(2), starving], host(16384, host_free_mib)),
            &policy(),
        );
        let shrunk: Vec<u64> = p
            .changes
            .iter()
            .filter(|c| c.shrinks())
            .map(|c| c.to_kib / MIB)
            .collect();
        (p.from_host_kib / MIB, shrunk)
    };
    // The host can pay: cushions are kept.
    let (granted, shrunk) = cushion_given(8000);
    assert!(granted > 0 && shrunk.is_empty(), "{granted} {shrunk:?}");
    // The host is at its reserve: the idle guests give from their cushions, never under their
    // 32.5 % share (200 MiB used: 297 MiB).
    let (granted, shrunk) = cushion_given(800);
    assert_eq!(granted, 0);
    assert!(!shrunk.is_empty(), "nobody gave");
    assert!(
        shrunk.iter().all(|&s| (296..456).contains(&s)),
        "{shrunk:?}"
    );
    // Far under its reserve, the host's deficit comes back from the cushions too: both give all
    // they can in one cycle.
    let (_, shrunk) = cushion_given(200);
    assert_eq!(shrunk.len(), 2, "{shrunk:?}");
    assert!(
        shrunk.iter().all(|&s| (296..=297).contains(&s)),
        "{shrunk:?}"
    );
}

#[test]
fn an_idle_guest_keeps_the_larger_of_its_cushion_and_its_target_share_free() {
    let end = |g: GuestMemory, cushion_mib: u64| {
        let pol = MemPolicy {
            cushion_kib: cushion_mib * MIB,
            ..policy()
        };
        *reclaim(g, &pol, (16384, 8000)).last().unwrap()
    };
    // 200 MiB used: the share would leave 96 MiB free, the cushion leaves 128.
    assert_eq!(end(guest(1, 2000, 1800, 0.0), 128), 328);
    // 1000 MiB used: the share leaves 481 MiB free, more than the cushion.
    assert!((1481..=1482).contains(&end(guest(1, 4000, 3000, 0.0), 128)));
    // A guest whose balloon deflates on its own keeps no cushion: its share alone.
    let pol = policy();
    let g = guest(1, 2000, 1800, 0.0);
    let self_deflating = Standing {
        self_deflates: true,
        ..Standing::default()
    };
    let share = (g.used_kib() as f64 / (1.0 - pol.target_free_pct / 100.0)).ceil() as u64;
    assert_eq!(pol.keep_kib(&g, &self_deflating), share);
    assert_eq!(
        pol.keep_kib(&g, &Standing::default()),
        g.used_kib() + pol.cushion_kib
    );
    // A guest already within its cushion is not wasting, whatever its free share: left alone.
    let small = guest(1, 300, 250, 0.0);
    let (_, p) = checked(snapshot(vec![small], host(16384, 8000)), &policy());
    assert!(p.changes.is_empty(), "{p:?}");
}

#[test]
fn host_pressure_mode_takes_idle_memory_back_only_under_pressure() {
    let pol = MemPolicy {
        host_target_pct: Some(20.0),
        ..policy()
    };
    // Plenty on the host (8000 of 16384 MiB): idle memory stays where it is, even to feed.
    let (s, p) = checked(
        snapshot(
            vec![guest(1, 2000, 1800, 0.0), guest(2, 1000, 50, 20.0)],
            host(16384, 8000),
        ),
        &pol,
    );
    assert_eq!(size_mib(&s, &p, 1), 2000);
    assert_eq!(size_mib(&s, &p, 2), 1250);
    // Under 20 % available: it is taken back.
    let (s, p) = checked(
        snapshot(vec![guest(1, 2000, 1800, 0.0)], host(16384, 3000)),
        &pol,
    );
    assert!(size_mib(&s, &p, 1) < 2000);
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
fn never_above_max_memory() {
    let mut g = guest(1, 1000, 20, 50.0);
    g.max_kib = 1050 * MIB;
    let (s, p) = plan_for(vec![g], host(16384, 8000));
    assert_eq!(size_mib(&s, &p, 1), 1050);
}

#[test]
fn a_wasting_guest_is_never_shrunk_under_its_floor_what_it_uses_or_its_guarantee() {
    // Tiny guest: 80 MiB with 60 unused: the 50 MiB floor holds.
    let (s, p) = plan_for(
        vec![guest(1, 80, 60, 0.0), guest(2, 1000, 10, 30.0)],
        host(16384, 8000),
    );
    assert!(size_mib(&s, &p, 1) >= 52, "{}", size_mib(&s, &p, 1));
    // Big user: shrinks stop above its used memory plus a margin.
    let (s, p) = plan_for(
        vec![guest(1, 4000, 2100, 0.0), guest(2, 1000, 10, 300.0)],
        host(16384, 8000),
    );
    assert!(size_mib(&s, &p, 1) >= 1900 + 32);
    // Its metadata guarantees it 1900 MiB: it gives only down to that.
    let mut s = snapshot(
        vec![guest(1, 2000, 1800, 0.0), guest(2, 1000, 10, 300.0)],
        host(16384, 8000),
    );
    set_standing(
        &mut s,
        DomainId([1; 16]),
        Standing {
            guaranteed_kib: 1900 * MIB,
            ..Standing::default()
        },
    );
    let (s, p) = checked(s, &policy());
    assert_eq!(size_mib(&s, &p, 1), 1900);
}

#[test]
fn violations_catch_unsafe_plans() {
    let mut s = snapshot(vec![guest(1, 1000, 500, 0.0)], host(16384, 1100));
    let bad = |to_mib: u64| MemPlan {
        changes: vec![vmbalance::mem_plan::BalloonChange {
            id: DomainId([1; 16]),
            from_kib: 1000 * MIB,
            to_kib: to_mib * MIB,
        }],
        ..MemPlan::default()
    };
    let found = |s: &MemSnapshot, to_mib: u64, what: &str| {
        violations(s, &bad(to_mib), &policy())
            .iter()
            .any(|v| v.contains(what))
    };
    assert!(found(&s, 5000, "above max"));
    assert!(found(&s, 510, "floor"));
    assert!(found(&s, 1300, "reserve"));
    assert!(found(&s, 1600, "step"));
    assert!(violations(&s, &bad(900), &policy()).is_empty());
    assert!(violations(&s, &bad(1250), &policy()).is_empty());
    // What earlier grants left unused is not the host's to give again.
    s.unbacked_kib = 100 * MIB;
    assert!(found(&s, 1250, "may still touch"));
    // Nor is a guarantee to be shrunk under.
    set_standing(
        &mut s,
        DomainId([1; 16]),
        Standing {
            guaranteed_kib: 950 * MIB,
            ..Standing::default()
        },
    );
    assert!(found(&s, 900, "floor"));
}

fn arb_guest(n: u8) -> impl Strategy<Value = (GuestMemory, Standing)> {
    (
        (40u64..8192, 0u64..=100, -50.0f64..200.0, 0u64..4096),
        (0u64..8192, any::<bool>(), any::<bool>()),
    )
        .prop_map(
            move |((actual, unused_pct, rate, extra), (guaranteed, reclaiming, behind))| {
                let g = GuestMemory {
                    id: DomainId([n; 16]),
                    actual_kib: actual * MIB,
                    max_kib: (actual + extra) * MIB,
                    free_kib: actual * MIB * unused_pct / 100,
                    unused_kib: actual * MIB * unused_pct / 100,
                    rate_kib_s: rate * 1024.0,
                    // Sometimes a jump.
                    latest_rate_kib_s: rate * 1024.0 * (1 + guaranteed % 4) as f64,
                };
                let standing = Standing {
                    guaranteed_kib: guaranteed * MIB,
                    reclaiming,
                    behind,
                    // A faster recent rate than the last one, sometimes.
                    peak_rate_kib_s: rate.max(0.0) * 1024.0 * (guaranteed % 3) as f64,
                    self_deflates: extra % 5 == 0,
                };
                (g, standing)
            },
        )
}

/// A host of two to four NUMA nodes (total, free, what guests bound to it may touch, MiB), or
/// one node (no node figures), and the nodes each guest is strictly bound to (0: none).
fn arb_nodes() -> impl Strategy<Value = (Vec<(u64, u64, u64)>, Vec<u8>)> {
    (
        prop::collection::vec((512u64..16384, 0u64..=100, 0u64..2048), 0..=4),
        prop::collection::vec(0u8..16, 12),
    )
        .prop_map(|(nodes, bindings)| {
            let nodes = if nodes.len() == 1 { Vec::new() } else { nodes };
            let nodes = nodes
                .into_iter()
                .map(|(total, free_pct, unbacked)| (total, total * free_pct / 100, unbacked))
                .collect();
            (nodes, bindings)
        })
}

fn arb_snapshot() -> impl Strategy<Value = (MemSnapshot, MemPolicy)> {
    (
        (0u8..12).prop_flat_map(|n| (0..n).map(arb_guest).collect::<Vec<_>>()),
        prop::option::weighted(0.9, (1024u64..65536, 0u64..=100)),
        0u64..4096,
        prop::option::of(10.0f64..90.0),
        arb_nodes(),
    )
        .prop_map(
            |(guests, host, unbacked_mib, host_target_pct, (nodes, bindings))| {
                let node_count = nodes.len();
                // Guest i is bound to the nodes whose bit is set in bindings[i] (nodes the host
                // has or not: a node it does not describe grants nothing).
                let bound: HashMap<DomainId, Vec<u32>> = guests
                    .iter()
                    .zip(&bindings)
                    .filter(|&(_, &bits)| bits != 0 && node_count > 0)
                    .map(|((g, _), &bits)| {
                        let set: Vec<u32> = (0..4).filter(|b| bits & (1 << b) != 0).collect();
                        (g.id, set)
                    })
                    .collect();
                let s = MemSnapshot {
                    guests: guests
                        .into_iter()
                        .map(|(memory, standing)| PlannedGuest {
                            nodes: bound.get(&memory.id).cloned(),
                            memory,
                            standing,
                        })
                        .collect(),
                    host: host.map(|(total, free_pct)| {
                        HostMemory::new(total * MIB, total * MIB * free_pct / 100)
                    }),
                    unbacked_kib: unbacked_mib * MIB,
                    node_unbacked_kib: nodes
                        .iter()
                        .enumerate()
                        .map(|(n, &(_, _, unbacked))| (n as u32, unbacked * MIB))
                        .collect(),
                    nodes: nodes
                        .iter()
                        .enumerate()
                        .map(|(n, &(total, free, _))| NodeMemory {
                            node: n as u32,
                            total_kib: total * MIB,
                            free_kib: free * MIB,
                        })
                        .collect(),
                };
                let pol = MemPolicy {
                    host_target_pct,
                    ..policy()
                };
                (s, pol)
            },
        )
}

proptest! {
    #[test]
    fn plans_respect_every_hard_limit((s, pol) in arb_snapshot()) {
        let p = plan(&s, &pol);
        prop_assert!(violations(&s, &p, &pol).is_empty(), "{:?}", violations(&s, &p, &pol));
        let mut grown = 0i128;
        for c in &p.changes {
            let g = s.guests.iter().find(|g| g.id == c.id).unwrap();
            let st = s.standing(&c.id);
            prop_assert_eq!(c.from_kib, g.actual_kib);
            prop_assert_ne!(c.from_kib, c.to_kib);
            prop_assert!(c.to_kib <= g.max_kib);
            if c.shrinks() {
                prop_assert!(c.to_kib >= pol.min_guest_kib);
                prop_assert!(c.to_kib >= g.used_kib() + pol.min_step_kib);
                prop_assert!(c.to_kib >= st.guaranteed_kib);
                // Wasting guests, and idle ones giving from their cushion to a starving guest.
                let status = pol.status(g, &st);
                let someone_starves = s
                    .guests
                    .iter()
                    .any(|o| pol.status(o, &s.standing(&o.id)) == MemStatus::Starving);
                let idle = status != MemStatus::Starving && g.pace_kib_s() <= pol.consuming_kib_s;
                prop_assert!(
                    status == MemStatus::Wasting || (idle && someone_starves),
                    "only wasting guests shrink, and idle ones feeding a starving guest"
                );
                prop_assert!(c.to_kib >= pol.share_keep_kib(g, &st), "never under its share");
            } else {
                prop_assert_eq!(pol.status(g, &st), MemStatus::Starving, "only starving guests grow");
                prop_assert!(!st.behind, "a guest behind its balloon gets nothing");
            }
            grown += i128::from(c.to_kib) - i128::from(c.from_kib);
        }
        // Memory is conserved: what guests gain in all is what the host gave minus what it got.
        prop_assert_eq!(grown, i128::from(p.from_host_kib) - i128::from(p.to_host_kib));
        // Grants fit in what the host has above its reserve and what guests may still touch.
        match s.host {
            Some(h) => prop_assert!(
                p.from_host_kib + pol.reserve_kib(h) + s.unbacked_kib <= h.available_kib
                    || p.from_host_kib == 0
            ),
            None => prop_assert_eq!(p.from_host_kib, 0),
        }
        // Nobody starving: memory only flows back to the host.
        if s.guests.iter().all(|g| pol.status(g, &s.standing(&g.id)) != MemStatus::Starving) {
            prop_assert_eq!(p.from_host_kib, 0);
        }
        // Guests bound to one NUMA node are granted no more in all than that node has free
        // above its share of the reserve and what the guests bound to it may touch; guests bound
        // to a node the host does not describe get nothing.
        if !s.nodes.is_empty() {
            for n in &s.nodes {
                let reserve = (n.total_kib as f64 * pol.host_reserve_pct / 100.0).ceil() as u64;
                let unbacked = s.node_unbacked_kib.get(&n.node).copied().unwrap_or(0);
                let spare = n.free_kib.saturating_sub(reserve + unbacked);
                let granted: u64 = p
                    .changes
                    .iter()
                    .filter(|c| !c.shrinks() && nodes_of(&s, c.id) == Some(&vec![n.node]))
                    .map(|c| c.to_kib - c.from_kib)
                    .sum();
                prop_assert!(granted <= spare, "node {}: {granted} > {spare}", n.node);
            }
            for c in p.changes.iter().filter(|c| !c.shrinks()) {
                if let Some(nodes) = nodes_of(&s, c.id) {
                    prop_assert!(
                        nodes.iter().any(|&b| s.nodes.iter().any(|n| n.node == b)),
                        "granted from nodes {nodes:?} the host does not describe"
                    );
                }
            }
        }
    }
}

/// The fleet signal: a host whose guests' needs it cannot meet says by how much; one that meets
/// them reads zero.
#[test]
fn memory_need_left_unmet_is_what_neither_host_nor_guests_could_give() {
    // Two guests starving on a host at its reserve, nobody idle to give: all they ask is unmet.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 50, 20.0)],
        host(16384, 16384 / 20),
    );
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert!(p.unmet_kib > 0);
    let share = policy().unmet_share(p.unmet_kib, s.host).unwrap();
    assert!(share > 0.0 && share <= 1.0, "{share}");
    // The same guests on a host with room: fed, nothing unmet.
    let (s, p) = plan_for(
        vec![guest(1, 1000, 50, 20.0), guest(2, 1000, 50, 20.0)],
        host(16384, 8192),
    );
    assert_eq!(p.changes.len(), 2, "{:?}", p.changes);
    assert_eq!(p.unmet_kib, 0);
    assert_eq!(policy().unmet_share(p.unmet_kib, s.host), Some(0.0));
    // A host under its reserve with nothing to take back lacks the difference.
    let (s, p) = plan_for(vec![guest(1, 1000, 300, 0.0)], host(10000, 100));
    assert_eq!(p.unmet_kib, (500 - 100) * MIB);
    assert_eq!(policy().unmet_share(p.unmet_kib, None), None);
    let _ = s;
}
