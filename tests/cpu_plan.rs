//! The vCPU planner, rule by rule, and its invariants over random hosts.

use proptest::prelude::*;
use vmbalance::cpu_plan::{Basis, CpuPlan, CpuPolicy, allowed, plan};
use vmbalance::host::DomainId;
use vmbalance::sampling::{Allowed, CpuSnapshot, VcpuKey, VcpuLoad, pcpu_usage};

/// Where a test vCPU sits.
#[derive(Clone, Copy, Debug)]
enum Pin {
    /// Pinned to exactly this pCPU.
    On(u32),
    /// Affinity spans several pCPUs; last ran on this one.
    Spans(u32),
}

fn key(domain: u8, vcpu: u32) -> VcpuKey {
    VcpuKey {
        domain: DomainId([domain; 16]),
        vcpu,
    }
}

/// A snapshot from (usage, pin) per vCPU; vCPU i belongs to domain i / 4.
fn snapshot(pcpus: &[u32], vcpus: &[(Option<f64>, Pin)]) -> CpuSnapshot {
    CpuSnapshot {
        pcpus: pcpus.to_vec(),
        vcpus: vcpus
            .iter()
            .enumerate()
            .map(|(i, &(usage, pin))| {
                let (pinned, last) = match pin {
                    Pin::On(p) => (pcpus.contains(&p).then_some(p), Some(p)),
                    Pin::Spans(p) => (None, Some(p)),
                };
                VcpuLoad {
                    usage,
                    pinned,
                    last_pcpu: last.filter(|p| pcpus.contains(p)),
                    ..VcpuLoad::unknown(key((i / 4) as u8, (i % 4) as u32))
                }
            })
            .collect(),
        cores: Vec::new(),
        nodes: Vec::new(),
    }
}

fn on(p: u32, usage: f64) -> (Option<f64>, Pin) {
    (Some(usage), Pin::On(p))
}

/// A snapshot like [`snapshot`] where each vCPU also has a demand.
fn with_demand(pcpus: &[u32], vcpus: &[(f64, f64, u32)]) -> CpuSnapshot {
    let plain: Vec<_> = vcpus.iter().map(|&(usage, _, p)| on(p, usage)).collect();
    let mut s = snapshot(pcpus, &plain);
    for (v, &(_, demand, _)) in s.vcpus.iter_mut().zip(vcpus) {
        v.demand = Some(demand);
    }
    s
}

fn default_plan(s: &CpuSnapshot) -> CpuPlan {
    plan(s, &CpuPolicy::default())
}

/// The snapshot after a plan is applied: every moved vCPU pinned where the plan put it.
fn apply(s: &CpuSnapshot, p: &CpuPlan) -> CpuSnapshot {
    let mut out = s.clone();
    for m in &p.moves {
        let v = out.vcpus.iter_mut().find(|v| v.key == m.key).unwrap();
        v.pinned = Some(m.to);
        v.last_pcpu = Some(m.to);
    }
    out
}

fn spread(s: &CpuSnapshot) -> f64 {
    vmbalance::report::spread(pcpu_usage(s).into_values())
}

#[test]
fn balanced_host_gets_no_move() {
    let s = snapshot(
        &[0, 1, 2],
        &[on(0, 40.0), on(1, 35.0), on(1, 10.0), on(2, 48.0)],
    );
    let p = default_plan(&s);
    assert!(p.moves.is_empty(), "{:?}", p.moves);
}

#[test]
fn all_vcpus_on_one_pcpu_are_spread_in_one_plan_with_the_fewest_moves() {
    let s = snapshot(
        &[0, 1, 2, 3],
        &[on(0, 25.0), on(0, 25.0), on(0, 25.0), on(0, 25.0)],
    );
    let p = default_plan(&s);
    // Three vCPUs must leave pCPU 0: one per other pCPU.
    assert_eq!(p.moves.len(), 3);
    let after = apply(&s, &p);
    assert_eq!(spread(&after), 0.0);
    let mut targets: Vec<u32> = p.moves.iter().map(|m| m.to).collect();
    targets.sort();
    assert_eq!(targets, vec![1, 2, 3]);
}

#[test]
fn many_small_vcpus_crowded_on_one_pcpu_are_spread_too() {
    // 48 busy vCPUs share pCPU 0 of 8: each reads only ~2 %, yet together they are the imbalance.
    // (Found by the policy benchmark: a rule judging each move alone refused every one of them.)
    let vcpus: Vec<_> = (0..48).map(|_| on(0, 100.0 / 48.0)).collect();
    let s = snapshot(&[0, 1, 2, 3, 4, 5, 6, 7], &vcpus);
    let p = default_plan(&s);
    assert!(spread(&apply(&s, &p)) <= 10.0, "{:?}", p.after);
    // 42 must leave pCPU 0 for all eight to carry six; within the threshold a few fewer will do.
    assert!(p.moves.len() <= 42, "{}", p.moves.len());
}

#[test]
fn uneven_vcpus_on_one_pcpu_need_only_as_many_moves_as_the_balance_needs() {
    // 30+30+20+20 on pCPU 0 of 2: moving one 30 and one 20 gives 50/50.
    let s = snapshot(
        &[0, 1],
        &[on(0, 30.0), on(0, 30.0), on(0, 20.0), on(0, 20.0)],
    );
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 2);
    assert_eq!(spread(&apply(&s, &p)), 0.0);
}

#[test]
fn heavy_and_light_vcpus_end_one_heavy_with_one_light_per_pcpu() {
    let s = snapshot(
        &[0, 1, 2, 3],
        &[
            on(0, 40.0),
            on(0, 40.0),
            on(1, 40.0),
            on(1, 40.0),
            on(2, 10.0),
            on(2, 10.0),
            on(3, 10.0),
            on(3, 10.0),
        ],
    );
    let p = default_plan(&s);
    let after = apply(&s, &p);
    for pcpu in 0..4 {
        let mut on_it: Vec<f64> = after
            .vcpus
            .iter()
            .filter(|v| v.pinned == Some(pcpu))
            .map(|v| v.usage.unwrap())
            .collect();
        on_it.sort_by(f64::total_cmp);
        assert_eq!(on_it, vec![10.0, 40.0], "pCPU {pcpu}");
    }
    // Each pCPU must give or take one vCPU: four changes is the minimum.
    assert_eq!(p.moves.len(), 4);
}

#[test]
fn unpinned_vcpus_are_each_pinned_once_and_then_left_alone() {
    let s = snapshot(
        &[0, 1],
        &[
            (Some(60.0), Pin::Spans(0)),
            (Some(50.0), Pin::Spans(0)),
            (Some(10.0), Pin::Spans(1)),
        ],
    );
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 3);
    assert!(p.moves.iter().all(|m| m.from.is_none()));
    let after = apply(&s, &p);
    // 60 | 50+10: balanced within the threshold.
    assert!(spread(&after) <= 10.0);
    assert!(default_plan(&after).moves.is_empty());
}

#[test]
fn more_pcpus_than_vcpus_gives_each_busy_vcpu_its_own_pcpu() {
    let s = snapshot(
        &[0, 1, 2, 3, 4, 5, 6, 7],
        &[on(3, 30.0), on(3, 30.0), on(3, 30.0)],
    );
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 2);
    let after = apply(&s, &p);
    let mut used: Vec<u32> = after.vcpus.iter().map(|v| v.pinned.unwrap()).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3);
}

#[test]
fn a_pcpu_running_a_single_vcpu_is_not_fixed_by_moving_it() {
    // One vCPU saturates pCPU 0; moving it would only make pCPU 1 as busy.
    let s = snapshot(&[0, 1], &[on(0, 100.0)]);
    assert!(default_plan(&s).moves.is_empty());
    // Same with small company elsewhere.
    let s = snapshot(&[0, 1, 2], &[on(0, 100.0), on(1, 4.0), on(1, 4.0)]);
    assert!(default_plan(&s).moves.is_empty());
    // The lone busy vCPU does not hide the imbalance the planner can fix: 30+30 | nothing.
    let s = snapshot(&[0, 1, 2], &[on(0, 100.0), on(1, 30.0), on(1, 30.0)]);
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 1);
    assert_eq!((p.moves[0].to, p.after.fixable_spread), (2, 0.0));
}

#[test]
fn sampling_noise_causes_no_move() {
    // Three equal vCPUs on two pCPUs cannot be balanced: moving one only swaps which pCPU is
    // busier. With a few points of noise, the planner must still leave them alone.
    for (a, b, c) in [(40.0, 40.0, 40.0), (41.0, 41.0, 38.0), (38.0, 39.0, 43.0)] {
        let s = snapshot(&[0, 1], &[on(0, a), on(0, b), on(1, c)]);
        let p = default_plan(&s);
        assert!(p.moves.is_empty(), "{a} {b} {c}: {:?}", p.moves);
    }
    // A balanced host whose readings jitter by a few points.
    for jitter in [-4.0, -2.0, 0.0, 3.0, 4.5] {
        let s = snapshot(
            &[0, 1],
            &[
                on(0, 30.0 + jitter),
                on(0, 20.0),
                on(1, 30.0 - jitter),
                on(1, 20.0),
            ],
        );
        assert!(default_plan(&s).moves.is_empty(), "jitter {jitter}");
    }
}

#[test]
fn swaps_when_no_single_move_helps() {
    // 50+50 | 30+30: moving a 50 overshoots (60 → 40 the other way); swapping 50 with 30 gives 80/80.
    let s = snapshot(
        &[0, 1],
        &[on(0, 50.0), on(0, 50.0), on(1, 30.0), on(1, 30.0)],
    );
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 2);
    assert_eq!(spread(&apply(&s, &p)), 0.0);
}

#[test]
fn never_pins_to_an_offline_pcpu() {
    // pCPU 1 is offline; the vCPU pinned there must be re-pinned to an online one.
    let s = snapshot(
        &[0, 2, 3],
        &[on(1, 20.0), on(0, 10.0), (Some(5.0), Pin::Spans(2))],
    );
    let p = default_plan(&s);
    assert!(p.moves.iter().all(|m| [0, 2, 3].contains(&m.to)));
    assert!(p.moves.iter().any(|m| m.key == key(0, 0)));
}

/// vCPU `v`'s load as the planner reads it in `s`: its demand where the host reports delay, else
/// its usage (rule 6); `None` without a usage (rule 5).
fn load_of(s: &CpuSnapshot, v: &VcpuLoad) -> Option<f64> {
    v.usage?;
    if s.reports_delay() {
        v.demand_or_usage()
    } else {
        v.usage
    }
}

/// The online pCPUs charged with a vCPU of unknown usage (rule 5), worked out here on its own.
fn unknown_pcpus(s: &CpuSnapshot) -> std::collections::BTreeSet<u32> {
    s.vcpus
        .iter()
        .filter(|v| v.usage.is_none())
        .filter_map(VcpuLoad::charged_pcpu)
        .filter(|p| s.pcpus.contains(p))
        .collect()
}

#[test]
fn vcpus_without_a_usage_yet_are_not_touched() {
    let s = snapshot(
        &[0, 1, 2],
        &[(None, Pin::Spans(9)), on(1, 50.0), on(1, 50.0)],
    );
    let p = default_plan(&s);
    assert!(p.moves.iter().all(|m| m.key != key(0, 0)));
    assert_eq!(p.moves.len(), 1);
}

#[test]
fn a_pcpu_whose_load_is_partly_unknown_is_left_alone() {
    // pCPU 0 runs two 50 % vCPUs and two whose load nobody measured (their domain did not
    // answer): it may be far busier than 100 %, or not. pCPU 1 is crowded too, pCPUs 2 and 3 free.
    let s = snapshot(
        &[0, 1, 2, 3],
        &[
            (None, Pin::Spans(0)),
            (None, Pin::On(0)),
            on(0, 50.0),
            on(0, 50.0),
            on(1, 60.0),
            on(1, 60.0),
            (Some(40.0), Pin::Spans(2)),
        ],
    );
    let p = default_plan(&s);
    // Nothing leaves pCPU 0 and nothing goes there; pCPU 1 is relieved, the floating vCPU pinned.
    assert!(
        p.moves.iter().all(|m| m.from != Some(0) && m.to != 0),
        "{:?}",
        p.moves
    );
    assert!(p.moves.iter().any(|m| m.from == Some(1)), "{:?}", p.moves);
    assert!(p.moves.iter().any(|m| m.key == key(1, 2)), "{:?}", p.moves);
    // Once its loads are known, pCPU 0 is relieved too.
    let mut known = s.clone();
    for v in &mut known.vcpus[..2] {
        v.usage = Some(5.0);
    }
    let p = default_plan(&known);
    assert!(p.moves.iter().any(|m| m.from == Some(0)), "{:?}", p.moves);
}

#[test]
fn threshold_is_respected() {
    // A 20-point gap: unbalanced at threshold 10, balanced at threshold 25.
    let s = snapshot(&[0, 1], &[on(0, 30.0), on(0, 10.0), on(1, 20.0)]);
    assert_eq!(default_plan(&s).moves.len(), 1);
    assert!(
        plan(
            &s,
            &CpuPolicy {
                threshold: 25.0,
                ..CpuPolicy::default()
            }
        )
        .moves
        .is_empty()
    );
}

#[test]
fn no_pcpu_no_plan() {
    let s = snapshot(&[], &[(Some(10.0), Pin::Spans(0))]);
    assert!(default_plan(&s).moves.is_empty());
}

fn arb_host() -> impl Strategy<Value = CpuSnapshot> {
    (1u32..12, 0usize..40).prop_flat_map(|(npcpu, nvcpu)| {
        // pCPUs 0..npcpu+2 exist; two random ones may be offline.
        let present = npcpu + 2;
        let vcpu = (
            prop::option::weighted(0.9, 0u32..=100),
            0u32..present,
            prop::bool::weighted(0.8),
        );
        (
            prop::collection::btree_set(0..present, 1..=present as usize),
            prop::collection::vec(vcpu, nvcpu),
            // Threads per core: no SMT, SMT2 (most x86 servers), SMT4 (POWER).
            prop::sample::select(vec![1usize, 2, 2, 4]),
            // NUMA nodes: none described, or 1-3.
            0usize..4,
        )
            .prop_map(|(online, vcpus, threads, nodes)| {
                let pcpus: Vec<u32> = online.into_iter().collect();
                let vcpus: Vec<(Option<f64>, Pin)> = vcpus
                    .into_iter()
                    .map(|(u, p, pinned)| {
                        (
                            u.map(f64::from),
                            if pinned { Pin::On(p) } else { Pin::Spans(p) },
                        )
                    })
                    .collect();
                let mut s = snapshot(&pcpus, &vcpus);
                s.cores = smt_cores(&pcpus, threads);
                s.nodes = numa_nodes(&pcpus, nodes);
                s
            })
    })
}

/// The online pCPUs split into `nodes` runs of consecutive ones (none: no nodes described).
fn numa_nodes(pcpus: &[u32], nodes: usize) -> Vec<Vec<u32>> {
    if nodes == 0 {
        return Vec::new();
    }
    pcpus
        .chunks(pcpus.len().div_ceil(nodes))
        .map(<[u32]>::to_vec)
        .collect()
}

/// Consecutive online pCPUs grouped `threads` to a core (no group for a core left with one).
fn smt_cores(pcpus: &[u32], threads: usize) -> Vec<Vec<u32>> {
    pcpus
        .chunks(threads)
        .filter(|c| c.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}

/// Like [`arb_host`], with each vCPU's load swinging by a random amount (or not known to).
fn arb_swinging_host() -> impl Strategy<Value = CpuSnapshot> {
    arb_host().prop_flat_map(|s| {
        let n = s.vcpus.len();
        prop::collection::vec(prop::option::weighted(0.7, 0u32..=15), n).prop_map(move |swings| {
            let mut s = s.clone();
            for (v, swing) in s.vcpus.iter_mut().zip(swings) {
                v.usage_swing = swing.map(f64::from);
            }
            s
        })
    })
}

proptest! {
    #[test]
    fn plans_obey_the_rules(s in arb_swinging_host(), threshold in 0u32..30) {
        let policy = CpuPolicy { threshold: f64::from(threshold), ..CpuPolicy::default() };
        let p = plan(&s, &policy);
        let unknown = unknown_pcpus(&s);
        for m in &p.moves {
            let v = s.vcpus.iter().find(|v| v.key == m.key).unwrap();
            prop_assert!(s.pcpus.contains(&m.to), "pinned to offline pCPU {}", m.to);
            prop_assert!(v.usage.is_some(), "moved a vCPU of unknown usage");
            prop_assert_ne!(v.pinned, Some(m.to), "no-op move");
            // Rule 5: nothing onto or off a pCPU whose load is partly unknown.
            prop_assert!(!unknown.contains(&m.to), "moved onto pCPU {} of unknown load", m.to);
            let from = v.charged_pcpu();
            prop_assert!(from.is_none_or(|f| !unknown.contains(&f)), "moved off pCPU {from:?} of unknown load");
        }
        // Every vCPU with a usage of at least half the threshold and no single online pin gets
        // pinned, unless it runs on a pCPU of unknown load or every pCPU's load is partly unknown.
        let some_known = s.pcpus.iter().any(|p| !unknown.contains(p));
        let on_known = |v: &&VcpuLoad| {
            some_known && v.charged_pcpu().is_none_or(|p| !unknown.contains(&p))
        };
        let worth = |v: &&VcpuLoad| load_of(&s, v).is_some_and(|l| l >= policy.threshold / 2.0);
        for v in s.vcpus.iter().filter(|v| v.pinned.is_none()).filter(worth).filter(on_known) {
            prop_assert!(p.moves.iter().any(|m| m.key == v.key), "{:?} left unpinned", v.key);
        }
        let unplaced = s.vcpus.iter().any(|v| v.pinned.is_none());
        if !unplaced {
            // Moves never make the host worse, and a balanced host is left alone.
            prop_assert!(p.after.spread <= p.before.spread + 1e-6);
            prop_assert!(p.after.fixable_spread <= p.before.fixable_spread + 1e-6);
            if p.before.fixable_spread <= policy.threshold {
                prop_assert!(p.moves.is_empty());
            }
        }
        // Stable: once applied, the next plan on the same loads changes nothing.
        let after = apply(&s, &p);
        let again = plan(&after, &policy);
        prop_assert!(again.moves.is_empty(), "second plan moved {:?}", again.moves);
    }
}

proptest! {
    #[test]
    fn a_change_budget_caps_every_plan_and_changes_nothing_it_can_afford(
        s in arb_swinging_host(),
        budget in 1usize..6,
    ) {
        let capped = CpuPolicy { max_changes: Some(budget), ..CpuPolicy::default() };
        // A plan the budget affords is made as it is.
        let unlimited = plan(&s, &CpuPolicy::default());
        let first = plan(&s, &capped);
        if unlimited.moves.len() <= budget {
            prop_assert_eq!(&first.moves, &unlimited.moves);
        }
        // Otherwise plans are capped, and applied one after the other they settle.
        let mut now = s.clone();
        let mut rounds = 0;
        loop {
            let p = plan(&now, &capped);
            prop_assert!(p.moves.len() <= budget, "{} changes over a budget of {budget}", p.moves.len());
            if p.moves.is_empty() {
                break;
            }
            if now.vcpus.iter().all(|v| v.pinned.is_some()) {
                prop_assert!(p.after.fixable_spread <= p.before.fixable_spread + 1e-6);
            }
            now = apply(&now, &p);
            rounds += 1;
            prop_assert!(rounds <= 4 * s.vcpus.len() + 16, "budgeted plans never settle");
        }
        // Every vCPU with a usage of at least half the threshold ends pinned, but on a pCPU of
        // unknown load (rule 5).
        let unknown = unknown_pcpus(&s);
        let some_known = s.pcpus.iter().any(|p| !unknown.contains(p));
        let on_known = |v: &&VcpuLoad| {
            some_known && v.charged_pcpu().is_none_or(|p| !unknown.contains(&p))
        };
        let threshold = CpuPolicy::default().threshold;
        let worth = |v: &&VcpuLoad| load_of(&s, v).is_some_and(|l| l >= threshold / 2.0);
        for v in now.vcpus.iter().filter(worth).filter(on_known) {
            prop_assert!(v.pinned.is_some(), "{:?} left unpinned", v.key);
        }
    }
}

#[test]
fn a_change_budget_pins_the_heaviest_unpinned_vcpus_first() {
    let s = snapshot(
        &[0, 1, 2, 3],
        &[
            (Some(10.0), Pin::Spans(0)),
            (Some(90.0), Pin::Spans(0)),
            (Some(50.0), Pin::Spans(1)),
            (Some(70.0), Pin::Spans(1)),
        ],
    );
    let policy = CpuPolicy {
        max_changes: Some(2),
        ..CpuPolicy::default()
    };
    let p = plan(&s, &policy);
    let mut pinned: Vec<f64> = p.moves.iter().map(|m| m.load).collect();
    pinned.sort_by(f64::total_cmp);
    assert_eq!(pinned, [70.0, 90.0]);
    assert_ne!(p.moves[0].to, p.moves[1].to, "both heavy vCPUs on one pCPU");
}

#[test]
fn a_change_budget_takes_the_largest_gains_first() {
    // Six 50 % vCPUs crowded on pCPU 0 of 3: unlimited, four move (two to each free pCPU). With a
    // budget of two, each free pCPU gets one, which narrows the spread from 300 to 200 points.
    let crowded: Vec<_> = (0..6).map(|_| on(0, 50.0)).collect();
    let s = snapshot(&[0, 1, 2], &crowded);
    assert_eq!(default_plan(&s).moves.len(), 4);
    let policy = CpuPolicy {
        max_changes: Some(2),
        ..CpuPolicy::default()
    };
    let p = plan(&s, &policy);
    assert_eq!(p.moves.len(), 2);
    let mut to: Vec<u32> = p.moves.iter().map(|m| m.to).collect();
    to.sort();
    assert_eq!(to, [1, 2]);
    assert!((spread(&apply(&s, &p)) - 150.0).abs() < 1e-9);
    // The next plan finishes the job within the same budget.
    let next = plan(&apply(&s, &p), &policy);
    assert_eq!(next.moves.len(), 2);
    assert!(spread(&apply(&apply(&s, &p), &next)) < 1e-9);
}

#[test]
fn threshold_zero_is_stable_too() {
    // Found by the property test: with a zero threshold, steps that no longer narrowed the spread
    // were kept, and each re-plan found more of them.
    let data: &[(Option<f64>, Pin)] = &[
        (Some(55.0), Pin::Spans(0)),
        (Some(2.0), Pin::On(0)),
        (Some(96.0), Pin::Spans(0)),
        (Some(58.0), Pin::Spans(3)),
        (Some(80.0), Pin::On(0)),
        (Some(63.0), Pin::On(5)),
        (Some(9.0), Pin::On(5)),
        (Some(7.0), Pin::Spans(6)),
        (Some(51.0), Pin::On(0)),
        (Some(51.0), Pin::On(6)),
        (Some(92.0), Pin::On(2)),
        (None, Pin::On(0)),
        (Some(0.0), Pin::Spans(0)),
        (Some(74.0), Pin::On(0)),
        (Some(8.0), Pin::On(1)),
        (Some(2.0), Pin::On(0)),
        (Some(0.0), Pin::On(6)),
        (Some(96.0), Pin::On(2)),
        (Some(96.0), Pin::Spans(6)),
        (Some(86.0), Pin::Spans(3)),
        (Some(91.0), Pin::On(6)),
        (Some(17.0), Pin::On(2)),
    ];
    let s = snapshot(&[0, 1, 2, 5, 6], data);
    let policy = CpuPolicy {
        threshold: 0.0,
        ..CpuPolicy::default()
    };
    let p = plan(&s, &policy);
    let again = plan(&apply(&s, &p), &policy);
    assert!(again.moves.is_empty(), "{:?}", again.moves);
}

#[test]
fn a_contended_pcpu_is_seen_by_demand_and_fixed_in_one_move() {
    // Measured on a real 2-pCPU host: three CPU-bound vCPUs on pCPU 0 each get a third of it
    // (usage 33, run-queue wait 59), the lone one on pCPU 1 gets 88 and waits 4. Usage reads
    // 99 against 88: "balanced". Demand reads 276 against 92.
    let s = with_demand(
        &[0, 1],
        &[
            (33.0, 92.0, 0),
            (33.0, 92.0, 0),
            (33.0, 92.0, 0),
            (88.0, 92.0, 1),
        ],
    );
    let p = default_plan(&s);
    assert_eq!(p.basis, Basis::Demand);
    assert_eq!(p.moves.len(), 1, "{:?}", p.moves);
    assert_eq!((p.moves[0].from, p.moves[0].to), (Some(0), 1));
    // Two on each pCPU: balanced by demand, and stable.
    let after = apply(&s, &p);
    assert!(default_plan(&after).moves.is_empty());
    // Without delay figures the same host looks balanced, and nothing moves.
    let blind = snapshot(
        &[0, 1],
        &[on(0, 33.0), on(0, 33.0), on(0, 33.0), on(1, 88.0)],
    );
    assert!(default_plan(&blind).moves.is_empty());
}

#[test]
fn without_contention_demand_makes_the_usage_plan() {
    // Every pCPU under 100 % demand: the small waits of an uncontended host change no decision.
    let usage_only = snapshot(
        &[0, 1],
        &[on(0, 30.0), on(0, 30.0), on(0, 20.0), on(1, 10.0)],
    );
    let with_waits = with_demand(
        &[0, 1],
        &[
            (30.0, 34.0, 0),
            (30.0, 33.0, 0),
            (20.0, 24.0, 0),
            (10.0, 10.5, 1),
        ],
    );
    let (a, b) = (default_plan(&usage_only), default_plan(&with_waits));
    assert_eq!(a.basis, Basis::Usage);
    assert_eq!(b.basis, Basis::Demand);
    let placed = |p: &CpuPlan| p.moves.iter().map(|m| (m.key, m.to)).collect::<Vec<_>>();
    assert_eq!(placed(&a), placed(&b));
    assert!(!a.moves.is_empty());
}

#[test]
fn usage_swinging_with_other_host_threads_moves_nothing_when_demand_holds() {
    // Seen on real guests: four half-busy vCPUs two per pCPU, beside QEMU's own threads. Usage read
    // 93 against 76 % (and the next samples the other way round), demand 102.7 against 102.9;
    // balancing usage swapped vCPUs every few cycles.
    let s = with_demand(
        &[0, 1],
        &[
            (52.0, 51.5, 0),
            (41.3, 51.2, 0),
            (30.1, 51.0, 1),
            (46.3, 51.9, 1),
        ],
    );
    let p = default_plan(&s);
    assert_eq!(p.basis, Basis::Demand);
    assert!(p.moves.is_empty(), "{:?}", p.moves);
    // The same usages without delay figures do move (a usage-only driver cannot tell).
    let blind = snapshot(
        &[0, 1],
        &[on(0, 52.0), on(0, 41.3), on(1, 30.1), on(1, 46.3)],
    );
    assert!(!default_plan(&blind).moves.is_empty());
}

#[test]
fn noise_in_delay_moves_nothing() {
    // Four CPU-bound vCPUs, two per pCPU: contended and balanced; the waits jitter by a few points.
    for jitter in [-4.5, -3.0, 0.0, 2.0, 4.5] {
        let s = with_demand(
            &[0, 1],
            &[
                (50.0, 100.0 + jitter, 0),
                (50.0, 100.0, 0),
                (50.0, 100.0 - jitter, 1),
                (50.0, 100.0, 1),
            ],
        );
        let p = default_plan(&s);
        assert_eq!(p.basis, Basis::Demand);
        assert!(p.moves.is_empty(), "jitter {jitter}: {:?}", p.moves);
    }
}

#[test]
fn near_equal_vcpus_are_not_swapped_on_a_noisy_gap() {
    // Seen on real guests: four CPU-bound vCPUs two per pCPU, one sample read 199.6 against 185.4
    // demand; swapping a 100 with a 93 "fixed" it, for nothing.
    let s = with_demand(
        &[0, 1],
        &[
            (50.0, 100.0, 0),
            (50.0, 99.6, 0),
            (46.0, 92.8, 1),
            (46.0, 92.6, 1),
        ],
    );
    let p = default_plan(&s);
    assert_eq!(p.basis, Basis::Demand);
    assert!(p.moves.is_empty(), "{:?}", p.moves);
}

#[test]
fn a_gap_the_loads_own_swings_explain_moves_nothing() {
    // 60 + 30 against 20 + 40: 30 points apart, over the threshold. Steady loads: one step evens it.
    let loads = [on(0, 60.0), on(0, 30.0), on(1, 20.0), on(1, 40.0)];
    let steady = snapshot(&[0, 1], &loads);
    assert!(!default_plan(&steady).moves.is_empty());
    // The same figures from loads that swing by 5 points (σ) each: the gap's swing is 10 points,
    // and 30 is within the threshold plus three of those. Nothing moves.
    let mut swinging = steady.clone();
    for v in &mut swinging.vcpus {
        v.usage_swing = Some(5.0);
    }
    assert!(default_plan(&swinging).moves.is_empty());
    // A gap well beyond the swings is still fixed.
    let far = [on(0, 90.0), on(0, 60.0), on(1, 10.0), on(1, 0.5)];
    let mut swinging_far = snapshot(&[0, 1], &far);
    for v in &mut swinging_far.vcpus {
        v.usage_swing = Some(5.0);
    }
    assert!(!default_plan(&swinging_far).moves.is_empty());
}

// Rule 9: allowed pCPUs.

fn only(pcpus: &[u32]) -> Allowed {
    Allowed::Only(pcpus.to_vec().into())
}

#[test]
fn vcpus_restricted_by_their_admin_stay_inside_their_set() {
    // Four busy vCPUs on pCPU 0; the first two may only use pCPU 0 (as `virsh vcpupin --config`
    // says), the other two anything. The two free ones are spread; the restricted ones stay.
    let mut s = snapshot(
        &[0, 1, 2],
        &[on(0, 90.0), on(0, 90.0), on(0, 90.0), on(0, 90.0)],
    );
    s.vcpus[0].allowed = only(&[0]);
    s.vcpus[1].allowed = only(&[0]);
    let p = default_plan(&s);
    let moved: Vec<u32> = p.moves.iter().map(|m| m.key.vcpu).collect();
    assert_eq!(moved, [2, 3], "{p:?}");
    assert_ne!(p.moves[0].to, p.moves[1].to);
    assert!(p.moves.iter().all(|m| m.to != 0));
}

#[test]
fn a_busiest_pcpu_of_fixed_vcpus_does_not_stop_the_rest_being_balanced() {
    // pCPU 0: three fixed vCPUs (270 %). pCPU 1: two free ones (160 %). pCPU 2: idle. Only the
    // pair 1/2 can be evened out.
    let mut s = snapshot(
        &[0, 1, 2],
        &[
            on(0, 90.0),
            on(0, 90.0),
            on(0, 90.0),
            on(1, 80.0),
            on(1, 80.0),
        ],
    );
    for v in &mut s.vcpus[..3] {
        v.allowed = only(&[0]);
    }
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 1, "{p:?}");
    assert_eq!((p.moves[0].from, p.moves[0].to), (Some(1), 2));
}

#[test]
fn unpinned_vcpus_are_pinned_within_their_set_and_a_vcpu_outside_it_is_brought_back() {
    // A NUMA-like host: pCPUs 0-1 and 2-3. vCPU 0 spans everything but may only use 2-3; vCPU 1
    // was pinned (by someone) to pCPU 0 although it may only use 2-3.
    let mut s = snapshot(
        &[0, 1, 2, 3],
        &[(Some(50.0), Pin::Spans(0)), on(0, 40.0), on(1, 60.0)],
    );
    s.vcpus[0].allowed = only(&[2, 3]);
    s.vcpus[1].allowed = only(&[2, 3]);
    let p = default_plan(&s);
    for m in &p.moves {
        let v = s.vcpus.iter().find(|v| v.key == m.key).unwrap();
        assert!(v.allowed.contains(m.to), "{m:?} outside {:?}", v.allowed);
    }
    let moved: Vec<u32> = p.moves.iter().map(|m| m.key.vcpu).collect();
    assert_eq!(moved, [0, 1], "{p:?}");
    assert_ne!(p.moves[0].to, p.moves[1].to, "both on one pCPU of the pair");
}

#[test]
fn an_excluded_domains_vcpus_count_as_load_and_never_move() {
    // pCPU 0 runs an excluded domain's two busy vCPUs and one free vCPU; pCPU 1 is idle.
    let mut s = snapshot(&[0, 1], &[on(0, 90.0), on(0, 90.0), on(0, 30.0)]);
    s.vcpus[0].allowed = only(&[]);
    s.vcpus[1].allowed = only(&[]);
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 1, "{p:?}");
    assert_eq!((p.moves[0].key.vcpu, p.moves[0].to), (2, 1));
    // The excluded load is counted: pCPU 0 ends at 180, pCPU 1 at 30.
    assert_eq!(p.predicted[&0], 180.0);
}

#[test]
fn a_swap_only_exchanges_vcpus_allowed_where_the_other_was() {
    // Threshold 30. pCPU 0: 60 + 50; pCPU 1: 30 + 20 (gap 60). No single move pays (the 50 would
    // leave a 40-point gap, the 60 all of it). The best swap, 60 <-> 30, needs the 30 to leave
    // pCPU 1, which it may not: 50 <-> 20 evens the pair as well.
    let mut s = snapshot(
        &[0, 1],
        &[on(0, 60.0), on(0, 50.0), on(1, 30.0), on(1, 20.0)],
    );
    let policy = CpuPolicy {
        threshold: 30.0,
        ..CpuPolicy::default()
    };
    let free = plan(&s, &policy);
    assert_eq!(free.moves.len(), 2, "a swap: {free:?}");
    s.vcpus[2].allowed = only(&[1]);
    let p = plan(&s, &policy);
    let swapped: Vec<(u32, u32)> = p.moves.iter().map(|m| (m.key.vcpu, m.to)).collect();
    assert_eq!(swapped, [(1, 1), (3, 0)], "{p:?}");
}

/// Like [`arb_swinging_host`], with random allowed sets: most vCPUs free, some restricted to a
/// random subset of the present pCPUs (one pCPU, or none, included).
fn arb_constrained_host() -> impl Strategy<Value = CpuSnapshot> {
    arb_swinging_host().prop_flat_map(|s| {
        let n = s.vcpus.len();
        let present = s.pcpus.iter().max().map_or(1, |m| m + 3);
        let set = prop::option::weighted(
            0.4,
            prop::collection::btree_set(0..present, 0..=present as usize),
        );
        prop::collection::vec(set, n).prop_map(move |sets| {
            let mut s = s.clone();
            for (v, set) in s.vcpus.iter_mut().zip(sets) {
                if let Some(set) = set {
                    v.allowed = Allowed::Only(set.into_iter().collect::<Vec<_>>().into());
                }
            }
            s
        })
    })
}

proptest! {
    #[test]
    fn plans_respect_every_allowed_set(s in arb_constrained_host(), threshold in 0u32..30, budget in prop::option::of(1usize..6)) {
        let policy = CpuPolicy { threshold: f64::from(threshold), max_changes: budget };
        let p = plan(&s, &policy);
        for m in &p.moves {
            let v = s.vcpus.iter().find(|v| v.key == m.key).unwrap();
            prop_assert!(v.allowed.contains(m.to), "{m:?} outside {:?}", v.allowed);
            prop_assert!(s.pcpus.contains(&m.to), "pinned to offline pCPU {}", m.to);
            prop_assert!(v.usage.is_some(), "moved a vCPU of unknown usage");
            prop_assert!(!v.allowed.is_none(), "moved a vCPU that may go nowhere");
            let single = match &v.allowed {
                Allowed::Only(set) => set.iter().filter(|p| s.pcpus.contains(p)).count() == 1,
                Allowed::Any => s.pcpus.len() == 1,
            };
            prop_assert!(!(single && v.pinned.is_some_and(|p| v.allowed.contains(p))),
                "moved a vCPU pinned to the one pCPU it may use");
        }
        if let Some(budget) = budget {
            prop_assert!(p.moves.len() <= budget);
        }
        // Stable: once applied, the next plan on the same loads changes nothing.
        if budget.is_none() {
            let again = plan(&apply(&s, &p), &policy);
            prop_assert!(again.moves.is_empty(), "second plan moved {:?}", again.moves);
        }
        // Never worse where everything is pinned inside its set.
        let inside = s.vcpus.iter().all(|v| v.pinned.is_some_and(|p| v.allowed.contains(p)));
        if inside {
            prop_assert!(p.after.fixable_spread <= p.before.fixable_spread + 1e-6);
        }
    }
}

/// Rule 10 on a host of two cores of two threads: pCPUs 0 and 1 share core A, 2 and 3 core B.
fn two_smt_cores(vcpus: &[(Option<f64>, Pin)]) -> CpuSnapshot {
    let mut s = snapshot(&[0, 1, 2, 3], vcpus);
    s.cores = vec![vec![0, 1], vec![2, 3]];
    s
}

fn core_of(p: u32) -> u32 {
    p / 2
}

#[test]
fn busy_vcpus_go_to_an_idle_core_before_a_busy_pcpus_sibling() {
    // Two busy vCPUs crowded on pCPU 0: the one moved goes to core B, not to pCPU 0's sibling.
    let s = two_smt_cores(&[on(0, 90.0), on(0, 90.0)]);
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 1, "{p:?}");
    assert_eq!(core_of(p.moves[0].to), 1, "{p:?}");
    // The flat planner (no topology) would have taken the sibling, the lowest free pCPU.
    let flat = default_plan(&snapshot(&[0, 1, 2, 3], &[on(0, 90.0), on(0, 90.0)]));
    assert_eq!(flat.moves[0].to, 1, "{flat:?}");
}

#[test]
fn two_busy_siblings_are_split_over_two_cores_although_each_runs_alone() {
    // One busy vCPU on each thread of core A, core B idle: each pCPU runs one vCPU, but their
    // core runs two, and moving one to core B relieves both.
    let s = two_smt_cores(&[on(0, 90.0), on(1, 90.0)]);
    let p = default_plan(&s);
    assert_eq!(p.moves.len(), 1, "{p:?}");
    assert_eq!(core_of(p.moves[0].to), 1, "{p:?}");
    assert!(p.after.spread < p.before.spread, "{p:?}");
    // Applied, it is left alone; a flat host would never have moved either.
    assert!(default_plan(&apply(&s, &p)).moves.is_empty());
    assert!(
        default_plan(&snapshot(&[0, 1, 2, 3], &[on(0, 90.0), on(1, 90.0)]))
            .moves
            .is_empty()
    );
}

#[test]
fn a_full_smt_host_one_busy_vcpu_per_thread_is_balanced() {
    let s = two_smt_cores(&[on(0, 90.0), on(1, 90.0), on(2, 90.0), on(3, 90.0)]);
    let p = default_plan(&s);
    assert!(p.moves.is_empty(), "{p:?}");
    assert!(p.before.spread < 1e-9, "{p:?}");
}

#[test]
fn two_vcpus_on_one_thread_are_split_onto_its_idle_sibling_when_no_core_is_free() {
    // Core B is busy on both threads; core A runs two vCPUs on pCPU 0 and none on pCPU 1.
    let s = two_smt_cores(&[on(0, 80.0), on(0, 80.0), on(2, 85.0), on(3, 85.0)]);
    let p = default_plan(&s);
    let moved: Vec<u32> = p.moves.iter().map(|m| m.to).collect();
    assert_eq!(moved, [1], "{p:?}");
}

#[test]
fn a_guests_vcpus_are_pinned_apart_where_a_pcpu_about_as_free_allows() {
    // dom0's vCPU0 runs on pCPU 0 (30 %), dom1's on pCPU 1 (33 %); dom0's vCPU1 (30 %) is
    // unpinned. pCPU 0 is the freest, but pCPU 1 is within half the threshold and runs no dom0
    // vCPU.
    let host = |dom1: f64| {
        let mut s = snapshot(&[0, 1], &[on(0, 30.0), (Some(30.0), Pin::Spans(0))]);
        s.vcpus.push(VcpuLoad {
            key: key(1, 0),
            usage: Some(dom1),
            pinned: Some(1),
            last_pcpu: Some(1),
            ..s.vcpus[0].clone()
        });
        s
    };
    let p = default_plan(&host(33.0));
    let moves: Vec<(VcpuKey, u32)> = p.moves.iter().map(|m| (m.key, m.to)).collect();
    assert_eq!(moves, [(key(0, 1), 1)], "{p:?}");
    // Further apart than half the threshold, balance comes first.
    let p = default_plan(&host(40.0));
    let moves: Vec<(VcpuKey, u32)> = p.moves.iter().map(|m| (m.key, m.to)).collect();
    assert_eq!(moves, [(key(0, 1), 0)], "{p:?}");
}

#[test]
fn a_busy_node_does_not_hide_an_unbalanced_one() {
    // Node 0 (pCPUs 0-1) runs two 75 % vCPUs on each pCPU: busier than anything on node 1, and
    // balanced. Node 1 runs two 70 % vCPUs on pCPU 2 and none on pCPU 3. Every vCPU is held to
    // its node.
    let mut s = snapshot(
        &[0, 1, 2, 3],
        &[
            on(0, 75.0),
            on(0, 75.0),
            on(1, 75.0),
            on(1, 75.0),
            on(2, 70.0),
            on(2, 70.0),
        ],
    );
    s.nodes = vec![vec![0, 1], vec![2, 3]];
    for v in &mut s.vcpus {
        v.allowed = if v.pinned.unwrap() < 2 {
            only(&[0, 1])
        } else {
            only(&[2, 3])
        };
    }
    let p = default_plan(&s);
    let moves: Vec<(u32, u32)> = p.moves.iter().map(|m| (m.from.unwrap(), m.to)).collect();
    assert_eq!(moves, [(2, 3)], "{p:?}");
    assert!(p.before.fixable_spread > 100.0, "{p:?}");
    assert!(default_plan(&apply(&s, &p)).moves.is_empty());
}

#[test]
fn across_nodes_only_once_each_node_is_balanced_within_itself() {
    // Node 0 holds four busy vCPUs on its two pCPUs, node 1 is idle, and the vCPUs may use
    // either node (--cross-node): each node first, then the nodes against each other.
    let mut s = snapshot(
        &[0, 1, 2, 3],
        &[on(0, 90.0), on(0, 90.0), on(0, 90.0), on(0, 90.0)],
    );
    s.nodes = vec![vec![0, 1], vec![2, 3]];
    let p = default_plan(&s);
    let mut to: Vec<u32> = p.moves.iter().map(|m| m.to).collect();
    to.sort();
    assert_eq!(to, [1, 2, 3], "{p:?}");
    assert!(default_plan(&apply(&s, &p)).moves.is_empty());
    // Held to node 0, the same vCPUs end two per pCPU there.
    for v in &mut s.vcpus {
        v.allowed = only(&[0, 1]);
    }
    let p = default_plan(&s);
    let to: Vec<u32> = p.moves.iter().map(|m| m.to).collect();
    assert_eq!(to, [1, 1], "{p:?}");
}

#[test]
fn a_step_moves_a_vcpu_away_from_its_guests_other_vcpus_where_one_about_as_good_may_go() {
    // pCPU 0 runs dom0 vCPU0 (22 %), dom1 (26 %) and dom2 (12 %); pCPU 1 runs dom0 vCPU1 (20 %).
    // The move that best evens them is dom0 vCPU0 (22, against a target of 20), onto its own
    // guest's vCPU; dom1 (26) is within half the threshold of it and pays too.
    let mut s = snapshot(&[0, 1], &[on(0, 22.0), on(1, 20.0)]);
    for (domain, load) in [(1u8, 26.0), (2, 12.0)] {
        s.vcpus.push(VcpuLoad {
            key: key(domain, 0),
            usage: Some(load),
            ..s.vcpus[0].clone()
        });
    }
    let p = default_plan(&s);
    let moves: Vec<(VcpuKey, u32)> = p.moves.iter().map(|m| (m.key, m.to)).collect();
    assert_eq!(moves, [(key(1, 0), 1)], "{p:?}");
    assert!(default_plan(&apply(&s, &p)).moves.is_empty());
    // With dom1 further from the target than that, balance comes first.
    s.vcpus[2].usage = Some(30.0);
    let p = default_plan(&s);
    let moves: Vec<(VcpuKey, u32)> = p.moves.iter().map(|m| (m.key, m.to)).collect();
    assert_eq!(moves, [(key(0, 0), 1)], "{p:?}");
}

#[test]
fn the_set_is_configuration_and_pool_and_online() {
    let online = [0, 1, 2, 3, 5];
    assert_eq!(allowed(&online, &[None, None]), online);
    assert_eq!(allowed(&online, &[Some(&[1, 2, 4]), None]), [1, 2]);
    assert_eq!(allowed(&online, &[Some(&[1, 2, 4]), Some(&[2, 3])]), [2]);
    assert_eq!(allowed(&online, &[None, Some(&[3, 4, 5])]), [3, 5]);
    assert!(allowed(&online, &[Some(&[4]), None]).is_empty());
}
