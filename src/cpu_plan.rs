//! Decide: which vCPUs to re-pin so pCPU load is balanced, with as few pin changes as possible.
//!
//! Pure: a [`CpuSnapshot`] in, a [`CpuPlan`] out, no I/O. The rules, in order:
//!
//! 1. Every vCPU whose affinity is not exactly one online pCPU (libvirt's default spans them all)
//!    is pinned to one, heaviest first onto the least-loaded pCPU.
//! 2. The host is balanced when the busiest pCPU that runs two or more vCPUs is at most
//!    `threshold` points above the freest pCPU. A pCPU running a single vCPU cannot be made less
//!    busy by moving that vCPU (it would only make another pCPU as busy), so it never counts as the
//!    busiest. A balanced host gets no move.
//! 3. Otherwise the planner repeatedly takes the busiest such pCPU and the freest pCPU and moves
//!    the one vCPU that best evens the pair; only when no single move helps does it swap two vCPUs
//!    (two changes). Every step narrows the pair's gap and never widens the host's spread.
//! 4. A step must pay for itself, which is what keeps the daemon stable under sampling noise. A step
//!    that leaves the busier pCPU the busier one (it shifts at most half the gap) always narrows
//!    the gap and can never invite the reverse step, so it pays if it shifts at least half a point.
//!    A step that overshoots, making the other pCPU the busier one, pays only if it closes at least
//!    `threshold` points of the gap, or brings the pair within `threshold` while closing at least
//!    half of it. So a vCPU about as large as the gap, which would only trade which pCPU is busier,
//!    is never moved, and noise cannot make it ping-pong. A swap also needs its two vCPUs to
//!    differ by at least `threshold`: exchanging near-equal vCPUs only bets on noise. The steps
//!    must also pay together: when they cannot reach balance, they are kept only if together they
//!    narrow the fixable spread by at least `threshold`, and only as far as they make real
//!    progress; a few points of noise on a host that cannot be balanced therefore move nothing.
//!    Loads that swing from one sample to the next make gaps that no pin change fixes for good:
//!    a pair is only worked on when its gap exceeds `threshold` plus three standard deviations of
//!    the gap's own swing (each vCPU's swing is measured by the sampler, see
//!    [`crate::sampling::Rates`]; swings of different vCPUs add as independent). Steady loads have
//!    no swing, and the rule is the threshold alone.
//! 5. vCPUs whose usage is not known yet (first sample) are neither moved nor pinned.
//! 6. Loads are demands (used plus waited for, see [`Basis`]) when the hypervisor reports run-queue
//!    delay, usages otherwise; the rules are the same.
//! 7. With a change budget ([`CpuPolicy::max_changes`]) the plan is cut short: the heaviest
//!    unpinned vCPUs are pinned first, then steps are taken in the order above until the next one
//!    would exceed the budget. The rest waits for a later decision.
//!
//! The plan is the difference between the final placement and the current pins, so a vCPU
//! moved and moved back costs nothing, and one moved twice costs one change.

use std::collections::{BTreeMap, BTreeSet};

use crate::sampling::{CpuSnapshot, VcpuKey, VcpuLoad};

/// Tuning of the vCPU planner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuPolicy {
    /// Largest allowed gap, in percentage points, between the busiest and the freest pCPU.
    pub threshold: f64,
    /// Most pin changes one plan may make (`None`: as many as balance needs).
    pub max_changes: Option<usize>,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        Self {
            threshold: 10.0,
            max_changes: None,
        }
    }
}

/// One pin change: put vCPU `key` on pCPU `to`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PinMove {
    /// The vCPU.
    pub key: VcpuKey,
    /// Its pCPU before: `None` when its affinity spanned several pCPUs (or an offline one).
    pub from: Option<u32>,
    /// The single pCPU it is pinned to.
    pub to: u32,
    /// Its load (usage or demand, per the plan's basis), in percent of one pCPU.
    pub load: f64,
}

/// How uneven the pCPU loads are.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Balance {
    /// Busiest pCPU minus freest pCPU, in points.
    pub spread: f64,
    /// Busiest pCPU running two or more vCPUs minus freest pCPU (0 when none runs two): the part
    /// of the spread that moving vCPUs can reduce. The host is balanced when this is within the
    /// threshold.
    pub fixable_spread: f64,
}

/// Which figure a plan balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// CPU time used: the rule when the hypervisor reports no run-queue delay.
    #[default]
    Usage,
    /// Demand: CPU time used plus time spent waiting for a pCPU, the rule when the hypervisor
    /// reports run-queue delay. Usage saturates at 100 % per pCPU and cannot show that one pCPU
    /// has three CPU-bound vCPUs and another one; and where other host threads take turns on a
    /// pCPU, a vCPU's usage swings with them while its demand holds (seen on real guests: usage
    /// read 93 against 76 % where demand read 102.7 against 102.9, and balancing usage swapped
    /// vCPUs back and forth every few cycles).
    Demand,
}

impl std::fmt::Display for Basis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Basis::Usage => "usage",
            Basis::Demand => "demand",
        })
    }
}

impl Basis {
    /// The figure of `v` this basis balances.
    fn load(self, v: &VcpuLoad) -> Option<f64> {
        match self {
            Basis::Usage => v.usage,
            Basis::Demand => v.demand_or_usage(),
        }
    }

    /// How much that figure swings from one sample to the next (0 when not known).
    fn swing(self, v: &VcpuLoad) -> f64 {
        match self {
            Basis::Usage => v.usage_swing,
            Basis::Demand => v.demand_swing.or(v.usage_swing),
        }
        .unwrap_or(0.0)
    }
}

/// A pair of pCPUs must be further apart than the threshold plus this many standard deviations of
/// their gap's swing before a step is taken between them: the busiest and the freest of many
/// pCPUs are the extremes of many swinging loads, and a gap that swings alone explain moves
/// nothing for good.
const SWING_SIGMAS: f64 = 3.0;

/// The planner's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuPlan {
    /// Pin changes to make, sorted by vCPU.
    pub moves: Vec<PinMove>,
    /// The balance before the plan.
    pub before: Balance,
    /// The balance the plan predicts, with loads as measured.
    pub after: Balance,
    /// Predicted load (usage or demand, per `basis`) of each online pCPU after the plan.
    pub predicted: BTreeMap<u32, f64>,
    /// What the plan balanced.
    pub basis: Basis,
}

/// Working state: where every vCPU sits and what each pCPU carries.
struct Placement {
    /// Per vCPU: its pCPU index now (None = not placed on a single online pCPU).
    at: Vec<Option<usize>>,
    /// Per vCPU: its pCPU index in the current pins (None = not pinned to one online pCPU).
    original: Vec<Option<usize>>,
    /// Per vCPU: its load (usage or demand, per the basis), 0 when unknown.
    vcpu_load: Vec<f64>,
    /// Per vCPU: the variance of its load from one sample to the next.
    variance: Vec<f64>,
    /// Per vCPU: may the planner move it?
    movable: Vec<bool>,
    /// Movable vCPUs placed elsewhere than their current pin: the plan's pin changes so far.
    changes: usize,
    /// Per pCPU: summed load of its vCPUs.
    pcpu_load: Vec<f64>,
    /// Per pCPU: summed variance of its vCPUs' loads (swings of different vCPUs are independent).
    pcpu_variance: Vec<f64>,
    /// Per pCPU: the number of vCPUs on it, movable or not.
    count: Vec<usize>,
    /// Per pCPU: the movable vCPUs on it, ordered by load then index (see [`key`]).
    members: Vec<BTreeSet<(u64, usize)>>,
    /// Every pCPU ordered by (load, number of vCPUs, index), for the freest and busiest at once.
    by_load: BTreeSet<(u64, usize, usize)>,
    /// Per pCPU: its current key in `by_load`.
    load_key: Vec<(u64, usize, usize)>,
}

/// A vCPU's place in a member set: its load's bits (ordered like the load itself, since loads are
/// non-negative) and its index.
fn key(load: f64, v: usize) -> (u64, usize) {
    (load.to_bits(), v)
}

impl Placement {
    /// vCPUs with `vcpu_load` (and its `variance`) placed on `pcpus` pCPUs as `at` says, built in
    /// bulk; `original` is where their pins put them now.
    fn new(
        vcpu_load: Vec<f64>,
        variance: Vec<f64>,
        movable: Vec<bool>,
        pcpus: usize,
        at: Vec<Option<usize>>,
        original: Vec<Option<usize>>,
    ) -> Self {
        let mut pcpu_load = vec![0.0; pcpus];
        let mut pcpu_variance = vec![0.0; pcpus];
        let mut count = vec![0; pcpus];
        let mut lists = vec![Vec::new(); pcpus];
        for (v, p) in at.iter().enumerate() {
            if let Some(p) = *p {
                pcpu_load[p] += vcpu_load[v];
                pcpu_variance[p] += variance[v];
                count[p] += 1;
                if movable[v] {
                    lists[p].push(key(vcpu_load[v], v));
                }
            }
        }
        let members: Vec<BTreeSet<_>> = lists.into_iter().map(BTreeSet::from_iter).collect();
        let load_key: Vec<_> = (0..pcpus)
            .map(|p| (pcpu_load[p].max(0.0f64).to_bits(), count[p], p))
            .collect();
        let changes = (0..at.len())
            .filter(|&v| movable[v] && at[v] != original[v])
            .count();
        Self {
            at,
            original,
            vcpu_load,
            variance,
            movable,
            changes,
            pcpu_load,
            pcpu_variance,
            count,
            members,
            by_load: load_key.iter().copied().collect(),
            load_key,
        }
    }

    /// Re-file pCPU `p` in `by_load` after its load or membership changed.
    fn refile(&mut self, p: usize) {
        self.by_load.remove(&self.load_key[p]);
        // Loads are sums of non-negative vCPU loads; clamp rounding residue so the bits stay ordered.
        self.load_key[p] = (self.pcpu_load[p].max(0.0).to_bits(), self.count[p], p);
        self.by_load.insert(self.load_key[p]);
    }

    /// Record that vCPU `v` now sits on `to`, keeping the change count.
    fn set_at(&mut self, v: usize, to: Option<usize>) {
        if self.movable[v] {
            let differs = |at: Option<usize>| usize::from(at != self.original[v]);
            self.changes = self.changes - differs(self.at[v]) + differs(to);
        }
        self.at[v] = to;
    }

    fn put(&mut self, v: usize, p: usize) {
        self.set_at(v, Some(p));
        self.pcpu_load[p] += self.vcpu_load[v];
        self.pcpu_variance[p] += self.variance[v];
        self.count[p] += 1;
        if self.movable[v] {
            self.members[p].insert(key(self.vcpu_load[v], v));
        }
        self.refile(p);
    }

    fn take(&mut self, v: usize) {
        if let Some(p) = self.at[v] {
            self.set_at(v, None);
            self.pcpu_load[p] -= self.vcpu_load[v];
            self.pcpu_variance[p] = (self.pcpu_variance[p] - self.variance[v]).max(0.0);
            self.count[p] -= 1;
            self.members[p].remove(&key(self.vcpu_load[v], v));
            self.refile(p);
        }
    }

    /// The vCPU on `p` whose load is closest to `target`, among loads in `[lo, hi]`; on a tie,
    /// the smaller load, then the lower index.
    fn closest(&self, p: usize, target: f64, lo: f64, hi: f64) -> Option<usize> {
        let m = &self.members[p];
        let at = key(target.max(0.0), 0);
        // The lowest-index vCPU of the load just below `target`, and the first one at or above it.
        let below = m
            .range(..at)
            .next_back()
            .and_then(|&(bits, _)| m.range((bits, 0)..).next())
            .map(|&(_, v)| v);
        let above = m.range(at..).next().map(|&(_, v)| v);
        [below, above]
            .into_iter()
            .flatten()
            .filter(|&v| (lo..=hi).contains(&self.vcpu_load[v]))
            .min_by(|&a, &b| {
                let (da, db) = (
                    (self.vcpu_load[a] - target).abs(),
                    (self.vcpu_load[b] - target).abs(),
                );
                da.total_cmp(&db)
                    .then(self.vcpu_load[a].total_cmp(&self.vcpu_load[b]))
            })
    }

    /// The least-loaded pCPU (among equals, the one running fewest vCPUs).
    fn freest(&self) -> usize {
        self.by_load.first().expect("at least one pCPU").2
    }

    /// The busiest pCPU running at least two vCPUs.
    fn busiest_shared(&self) -> Option<usize> {
        self.by_load
            .iter()
            .rev()
            .find(|&&(_, count, _)| count >= 2)
            .map(|&(_, _, p)| p)
    }

    fn balance(&self) -> Balance {
        let min = self.pcpu_load[self.freest()];
        let max = self.pcpu_load[self.by_load.last().expect("at least one pCPU").2];
        let fixable = self
            .busiest_shared()
            .map_or(0.0, |p| (self.pcpu_load[p] - min).max(0.0));
        Balance {
            spread: max - min,
            fixable_spread: fixable,
        }
    }
}

/// Smallest load, in points, worth a pin change: moving a vCPU that uses nothing changes nothing.
const MIN_SHIFT: f64 = 0.5;

/// Does shifting `shift` points of load across a pair `gap` points apart pay for a pin change?
/// See the module docs, rule 4.
fn pays(gap: f64, shift: f64, threshold: f64) -> bool {
    if shift < MIN_SHIFT || shift >= gap {
        return false;
    }
    if 2.0 * shift <= gap {
        return true;
    }
    let new_gap = 2.0 * shift - gap;
    let gain = gap - new_gap;
    gain >= threshold || (new_gap <= threshold && gain >= threshold / 2.0)
}

/// One balancing step: the (vCPU, from, to) relocations it makes, by pCPU index.
type Step = Vec<(usize, usize, usize)>;

/// The largest shift of load across a pair `gap` points apart that pays (see [`pays`]): the
/// paying shifts form the interval `[MIN_SHIFT, max_paying_shift]`.
fn max_paying_shift(gap: f64, threshold: f64) -> f64 {
    let by_gain = gap - threshold / 2.0;
    let by_landing = ((gap + threshold) / 2.0).min(gap - threshold / 4.0);
    (gap / 2.0)
        .max(by_gain)
        .max(by_landing)
        .min(gap.next_down())
}

/// Choose the next step between the busiest shared pCPU and the freest one, if one pays: the single
/// move that best evens the pair, else the best swap (two changes).
fn next_step(s: &Placement, threshold: f64) -> Option<Step> {
    let src = s.busiest_shared()?;
    let dst = s.freest();
    let gap = s.pcpu_load[src] - s.pcpu_load[dst];
    let swing = (s.pcpu_variance[src] + s.pcpu_variance[dst]).sqrt();
    if src == dst || gap <= threshold + SWING_SIGMAS * swing {
        return None;
    }
    let hi = max_paying_shift(gap, threshold);
    // vCPUs of unknown load count 0, under MIN_SHIFT: they are never chosen.
    if let Some(v) = s.closest(src, gap / 2.0, MIN_SHIFT, hi) {
        debug_assert!(s.movable[v] && pays(gap, s.vcpu_load[v], threshold));
        return Some(vec![(v, src, dst)]);
    }
    // A swap of v (on src) with w (on dst) shifts load[v] - load[w]; for each w, the best v has
    // load closest to load[w] + gap / 2. The choice depends only on the placement, never on the
    // current pins, so re-planning from a plan's result retraces the same path (stability).
    let mut best: Option<(f64, usize, usize)> = None;
    for w in s.members[dst].iter().map(|&(_, w)| w) {
        let uw = s.vcpu_load[w];
        // A swap of two vCPUs that differ by less than the threshold only bets on noise (seen on
        // real guests: two CPU-bound vCPUs measured 100 and 93 % demand were swapped).
        let lo = uw + threshold.max(MIN_SHIFT);
        let Some(v) = s.closest(src, uw + gap / 2.0, lo, uw + hi) else {
            continue;
        };
        let shift = s.vcpu_load[v] - uw;
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

/// Take steps until balanced, no step pays or the next one would make more than `max_changes`
/// pin changes, then keep only the steps worth their pin changes.
fn even_out(s: &mut Placement, threshold: f64, max_steps: usize, max_changes: usize) {
    let start = s.balance().fixable_spread;
    let mut steps = Vec::new();
    let mut after = Vec::new();
    while steps.len() < max_steps {
        let Some(step) = next_step(s, threshold) else {
            break;
        };
        relocate(s, &step, true);
        if s.changes > max_changes {
            relocate(s, &step, false);
            break;
        }
        steps.push(step);
        after.push(s.balance().fixable_spread);
    }
    let keep = steps_worth_keeping(start, &after, threshold);
    for step in steps[keep..].iter().rev() {
        relocate(s, step, false);
    }
}

/// How many steps to keep (rule 4): all of them when they reach balance; when they cannot, none
/// unless together they narrow the fixable spread by at least `threshold` (and by anything at
/// all), and then only as many as it takes to get within half a threshold of where all of them
/// would end.
fn steps_worth_keeping(start: f64, after: &[f64], threshold: f64) -> usize {
    let Some(&end) = after.last() else {
        return 0;
    };
    if end <= threshold {
        return after.len();
    }
    if start - end < threshold.max(MIN_SHIFT) {
        return 0;
    }
    after
        .iter()
        .position(|&f| f <= end + threshold / 2.0)
        .map_or(after.len(), |i| i + 1)
}

/// Plan the pin changes for one snapshot.
pub fn plan(snapshot: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    let threshold = policy.threshold.max(0.0);
    let pcpus = &snapshot.pcpus;
    if pcpus.is_empty() {
        return CpuPlan::default();
    }
    let index_of = |p: u32| pcpus.binary_search(&p).ok();
    let n = snapshot.vcpus.len();
    let basis = if snapshot.reports_delay() {
        Basis::Demand
    } else {
        Basis::Usage
    };
    // Non-negative (and not -0.0), which the member ordering relies on.
    let vcpu_load: Vec<f64> = snapshot
        .vcpus
        .iter()
        .map(|v| basis.load(v).filter(|u| *u > 0.0).unwrap_or(0.0))
        .collect();
    let variance: Vec<f64> = snapshot
        .vcpus
        .iter()
        .map(|v| basis.swing(v).powi(2))
        .collect();
    let mut movable: Vec<bool> = snapshot.vcpus.iter().map(|v| v.usage.is_some()).collect();
    // Where each vCPU sits now: its single pin. Unpinned vCPUs are charged to their last pCPU for
    // the "before" picture, then taken off to be placed.
    let original: Vec<Option<usize>> = snapshot
        .vcpus
        .iter()
        .map(|v| v.pinned.and_then(index_of))
        .collect();
    let charged = snapshot
        .vcpus
        .iter()
        .map(|v| v.charged_pcpu().and_then(index_of))
        .collect();
    // Rule 1 places the unpinned heaviest first; under a change budget (rule 7) the ones it cannot
    // afford stay where they run, unmoved, for a later decision.
    let max_changes = policy.max_changes.unwrap_or(usize::MAX);
    let mut unplaced: Vec<usize> = (0..n)
        .filter(|&v| original[v].is_none() && movable[v])
        .collect();
    unplaced.sort_by(|&a, &b| vcpu_load[b].total_cmp(&vcpu_load[a]).then(a.cmp(&b)));
    for &v in unplaced.iter().skip(max_changes) {
        movable[v] = false;
    }
    unplaced.truncate(max_changes);
    let mut s = Placement::new(vcpu_load, variance, movable, pcpus.len(), charged, original);
    let before = s.balance();

    // Rule 1: pin the unpinned, heaviest first, onto the least-loaded pCPU.
    for &v in &unplaced {
        s.take(v);
    }
    for v in unplaced {
        let p = s.freest();
        s.put(v, p);
    }

    // Rules 2-4: even out the busiest shared pCPU against the freest one, step by step.
    even_out(&mut s, threshold, 4 * n + 16, max_changes);

    let moves = snapshot
        .vcpus
        .iter()
        .enumerate()
        .filter_map(|(v, load)| {
            let to = s.at[v]?;
            (s.movable[v] && s.original[v] != Some(to)).then(|| PinMove {
                key: load.key,
                from: load.pinned,
                to: pcpus[to],
                load: s.vcpu_load[v],
            })
        })
        .collect();
    CpuPlan {
        moves,
        before,
        after: s.balance(),
        predicted: pcpus
            .iter()
            .copied()
            .zip(s.pcpu_load.iter().copied())
            .collect(),
        basis,
    }
}
