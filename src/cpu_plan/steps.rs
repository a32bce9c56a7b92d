//! Rule 3: the steps that even out the busiest shared pCPU against the freest one.

use super::cores::Scope;
use super::paying::{
    MIN_SHIFT, gap_worth_working, max_paying_shift, min_swap_difference, pays, steps_worth_keeping,
};
use super::placement::Placement;

/// Rounding a spread may gain over a step that does not change it, in points.
const SPREAD_TOLERANCE: f64 = 1e-9;

/// One balancing step: the (vCPU, from, to) relocations it makes, by pCPU index.
type Step = Vec<(usize, usize, usize)>;

/// Choose the next step within `scope` between its busiest shared pCPU and the freest one, if one
/// pays.
fn next_step(s: &mut Placement, scope: Scope, threshold: f64) -> Option<Step> {
    let (src, dst) = s.busiest_shared(scope)?;
    step_between(s, src, dst, threshold)
}

/// The step that best evens pCPUs `src` and `dst`, if one pays: the single move that best evens
/// the pair, else the best swap (two changes).
fn step_between(s: &mut Placement, src: usize, dst: usize, threshold: f64) -> Option<Step> {
    // Rule 10: effective loads; a vCPU moved between siblings shifts only part of its load.
    let gap = s.eff(src) - s.eff(dst);
    let k = s.shift_factor(src, dst);
    let swing = (s.eff_variance(src) + s.eff_variance(dst)).sqrt();
    // Rule 2 (balanced) and rule 4 (a gap the loads' swings explain moves nothing).
    if !gap_worth_working(gap, swing, threshold) {
        return None;
    }
    // Rule 4: only shifts that pay (`hi` in shifted points, divided by `k` in vCPU load).
    let hi = max_paying_shift(gap, threshold);
    s.members[src].sort();
    let s = &*s;
    // Rule 5: vCPUs of unknown load count 0, under MIN_SHIFT: they are never chosen.
    let target = gap / 2.0 / k;
    if let Some(v) = s.closest(src, dst, target, MIN_SHIFT / k, hi / k) {
        // Rule 10: not onto a vCPU of its own guest where another about as good may go.
        let v = match s.apart_from_guest(v, src, dst, target, threshold / 2.0 / k) {
            Some(w) if pays(gap, k * s.vcpu_load[w], threshold) => w,
            _ => v,
        };
        debug_assert!(s.movable[v] && pays(gap, k * s.vcpu_load[v], threshold));
        return Some(vec![(v, src, dst)]);
    }
    // A swap of v (on src) with w (on dst) shifts load[v] - load[w]; for each w, the best v has
    // load closest to load[w] + gap / 2. The choice depends only on the placement, never on the
    // current pins, so re-planning from a plan's result retraces the same path (stability).
    let mut best: Option<(f64, usize, usize)> = None;
    // Rule 9: each may go where the other was.
    for w in s.members[dst]
        .iter()
        .map(|&(_, w)| w)
        .filter(|&w| s.reach.may(w, src))
    {
        let uw = s.vcpu_load[w];
        // Rule 4: a swap's two vCPUs must differ enough.
        let lo = uw + min_swap_difference(threshold);
        let Some(v) = s.closest(src, dst, uw + gap / 2.0 / k, lo, uw + hi / k) else {
            continue;
        };
        let shift = k * (s.vcpu_load[v] - uw);
        if !pays(gap, shift, threshold) {
            continue;
        }
        let cand = ((gap - 2.0 * shift).abs(), v, w);
        let better = best.is_none_or(|b| {
            cand.0
                .total_cmp(&b.0)
                .then((cand.1, cand.2).cmp(&(b.1, b.2)))
                .is_lt()
        });
        if better {
            best = Some(cand);
        }
    }
    best.map(|(_, v, w)| vec![(v, src, dst), (w, dst, src)])
}

fn relocate(s: &mut Placement, step: &Step, forward: bool) {
    for &(v, _, _) in step {
        s.take(v);
    }
    for &(v, from, to) in step {
        s.put(v, if forward { to } else { from });
    }
}

/// Most rounds over the scopes one plan makes: a step across nodes can leave a node to balance
/// again, and a node's steps can open a gap across nodes; real plans settle in two or three.
const MAX_ROUNDS: usize = 8;

/// Rule 9: balance each NUMA node on its own, then the nodes against each other where vCPUs may
/// leave their node, round after round until a round keeps no step (so the plan is one the next
/// decision leaves alone).
pub(super) fn even_out(s: &mut Placement, threshold: f64, max_steps: usize, max_changes: usize) {
    let mut steps_left = max_steps;
    for _ in 0..MAX_ROUNDS {
        let mut kept = 0;
        for scope in s.scopes() {
            kept += even_out_in(s, scope, threshold, &mut steps_left, max_changes);
        }
        if kept == 0 {
            break;
        }
    }
}

/// Take steps within `scope` until it is balanced, no step pays, `steps_left` runs out or the next
/// step would make more than `max_changes` pin changes, then keep only the steps worth their pin
/// changes. Returns how many were kept.
fn even_out_in(
    s: &mut Placement,
    scope: Scope,
    threshold: f64,
    steps_left: &mut usize,
    max_changes: usize,
) -> usize {
    let start = s.fixable_in(scope);
    let mut steps = Vec::new();
    let mut after = Vec::new();
    while *steps_left > 0 {
        let Some(step) = next_step(s, scope, threshold) else {
            break;
        };
        *steps_left -= 1;
        let spread = s.spread();
        relocate(s, &step, true);
        // Rule 8: never past the change budget. Rule 3: never a wider spread (rule 10: moving
        // load off or onto a pCPU also moves its siblings' effective loads).
        if s.changes > max_changes || s.spread() > spread + SPREAD_TOLERANCE {
            relocate(s, &step, false);
            break;
        }
        steps.push(step);
        after.push(s.fixable_in(scope));
    }
    // Rule 4: the steps must pay together.
    let keep = steps_worth_keeping(start, &after, threshold);
    for step in steps[keep..].iter().rev() {
        relocate(s, step, false);
    }
    keep
}
