//! Decide: which vCPUs to re-pin so pCPU load is balanced, with as few pin changes as possible.
//!
//! Pure: a [`CpuSnapshot`] in, a [`CpuPlan`] out, no I/O. This is the one statement of the vCPU
//! scheduler's rules; docs/vcpu_scheduler.md's "How it decides" tells them to the user under the
//! same numbers and names (a test keeps the two lists in step), and every place in the code that
//! implements a rule says `rule N`.
//!
//! 1. **Pinning.** Every vCPU whose affinity is not exactly one online pCPU (libvirt's default
//!    spans them all) is pinned to one, heaviest first onto the least-loaded pCPU, once its load
//!    reaches half the threshold: an idle vCPU that floats unbalances nothing, and the kernel
//!    places it well, so pinning it would only cost pin changes (on a host of idle guests, one
//!    per vCPU at once).
//! 2. **Balance.** The host is balanced when the busiest pCPU that runs two or more vCPUs is at
//!    most `threshold` points above the freest pCPU. A pCPU running a single vCPU cannot be made
//!    less busy by moving that vCPU (it would only make another pCPU as busy), so it never counts
//!    as the busiest. A balanced host gets no move.
//! 3. **Steps.** Otherwise the planner repeatedly takes the busiest such pCPU and the freest pCPU
//!    and moves the one vCPU that best evens the pair; only when no single move helps does it swap
//!    two vCPUs (two changes). Every step narrows the pair's gap and never widens the host's
//!    spread. All steps are taken in one decision (`steps.rs`).
//! 4. **Paying.** A step must pay for itself, which is what keeps the daemon stable under
//!    sampling noise; every part of this rule lives in `paying.rs`. A step that leaves the busier
//!    pCPU the busier one (it shifts at most half the gap) always narrows the gap and can never
//!    invite the reverse step, so it pays if it shifts at least half a point. A step that
//!    overshoots, making the other pCPU the busier one, pays only if it closes at least
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
//!    [`crate::sampling::RateSeries`]; swings of different vCPUs add as independent). Steady loads have
//!    no swing, and the rule is the threshold alone.
//! 5. **Unknown loads.** vCPUs whose load is not known yet (first sample) are neither moved nor
//!    pinned; nothing is ever pinned to an offline pCPU. A pCPU charged with such a vCPU has a
//!    load nobody measured: nothing is moved onto it or off it (`unknown.rs`). A domain that did
//!    not answer this cycle keeps its last figures where it was, never moved, never counted as
//!    idle (that lives in [`crate::scheduler`], which remembers them; rule 5).
//! 6. **Demand.** Loads are demands (used plus waited for, see [`Basis`]) when the hypervisor
//!    reports run-queue delay, usages otherwise; the rules are the same.
//! 7. **Settling.** After a cycle that changed pins, the next cycle only observes: its interval
//!    straddles the change and mixes the old placement with the new. This rule belongs to the
//!    cycle, not to a snapshot, so it lives in [`crate::scheduler`].
//! 8. **Budget.** With a change budget ([`CpuPolicy::max_changes`]) a plan the budget affords is
//!    made as it is; a larger one is cut short: the heaviest unpinned vCPUs are pinned first, then
//!    steps are taken in the order above until the next one would exceed the budget. The rest
//!    waits for a later decision.
//! 9. **Allowed pCPUs.** Each vCPU may only be pinned to the pCPUs of its allowed set
//!    ([`VcpuLoad::allowed`], worked out with [`allowed`]: what its admin's persistent
//!    configuration, the NUMA node its memory is bound to or it runs on, the host's pool and the
//!    online pCPUs leave it). Each NUMA node ([`CpuSnapshot::nodes`]) is balanced on its own:
//!    rules 2-4 run within each node in turn, so a busy node never hides an unbalanced one; then,
//!    where vCPUs may use pCPUs of two nodes (`--cross-node`), across nodes: the busiest pCPU
//!    with such a vCPU against the freest pCPU of another node it may use; round after round
//!    until a round keeps no step (`steps.rs`). Rule 1 pins a vCPU onto the least-loaded pCPU of
//!    its set (in the node it last ran on, unless a pCPU elsewhere is more than `threshold`
//!    freer), and also re-pins one found pinned outside its set; a vCPU whose set is a single pCPU it is pinned to,
//!    or is empty (its domain is excluded), is never moved, but counts as load where it runs. The
//!    steps of rule 3 work on the busiest pCPU that has a vCPU which may go elsewhere, against the
//!    freest pCPU one of its vCPUs may go to; a move only takes a vCPU to a pCPU of its set, a swap
//!    only exchanges two vCPUs each allowed where the other was.
//! 10. **Cores.** Hyperthread siblings share a core ([`CpuSnapshot::cores`]), so a pCPU's load as
//!     every rule above reads it is its *effective* load: its own plus half of its siblings' (see
//!     `placement::SIBLING_SHARE`). Busy vCPUs therefore go to idle cores before they double up on
//!     the siblings of busy ones, and a core running two busy vCPUs on its two threads is relieved
//!     like a pCPU running two: rule 2's "two or more vCPUs" counts on the pCPU's whole core. A
//!     vCPU moved between two siblings shifts only half its load between them, and no step is taken
//!     that would widen the host's spread through a sibling. A guest's vCPUs are kept apart where
//!     balance allows (stacked vCPUs of one guest wait for each other: one holding a lock inside
//!     the guest is preempted by one spinning for it): rule 1 pins a vCPU on a pCPU running no
//!     other vCPU of its guest when one is within half the threshold of the freest, and a step
//!     moves, instead of a vCPU that would join its guest's, another whose load is within half
//!     the threshold as good and whose move pays. On a host without SMT, or one that does not
//!     describe its topology, this rule changes nothing but that.
//!
//! The plan is the difference between the final placement and the current pins, so a vCPU
//! moved and moved back costs nothing, and one moved twice costs one change.

mod cores;
mod members;
mod paying;
mod placement;
mod pressure;
mod reach;
mod steps;
mod unknown;

use std::collections::BTreeMap;

use crate::sampling::{Allowed, CpuSnapshot, VcpuKey, VcpuLoad};
use cores::Cores;
use placement::{Placement, VcpuFacts};
pub use pressure::unserved_share;
use reach::{Reach, SetInterner};
use steps::even_out;

/// Rule 9's set of one vCPU: `online` ∩ each of the other sets given (sorted): its persistent
/// configuration's affinity, the pCPUs of the NUMA nodes it may use, the host's pool.
pub fn allowed(online: &[u32], limits: &[Option<&[u32]>]) -> Vec<u32> {
    online
        .iter()
        .copied()
        .filter(|p| {
            limits
                .iter()
                .flatten()
                .all(|set| set.binary_search(p).is_ok())
        })
        .collect()
}

/// Tuning of the vCPU planner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuPolicy {
    /// Largest allowed gap, in percentage points, between the busiest and the freest pCPU.
    pub threshold: f64,
    /// Most pin changes one plan may make (`None`: as many as balance needs).
    pub max_changes: Option<usize>,
}

impl CpuPolicy {
    /// The defaults, written once: `--help`, the man page and the daemon take them from here.
    pub const DEFAULT: CpuPolicy = CpuPolicy {
        threshold: 10.0,
        max_changes: None,
    };
}

impl Default for CpuPolicy {
    fn default() -> Self {
        Self::DEFAULT
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Most steps one plan may take, for `vcpus` vCPUs: a bound that real plans never reach (each
/// step narrows a gap), kept so that no input can make the planner loop.
fn max_steps(vcpus: usize) -> usize {
    4 * vcpus + 16
}

/// Plan the pin changes for one snapshot.
pub fn plan(snapshot: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    // Rule 5: pCPUs whose load is partly unknown are left alone.
    match unknown::leaving_alone(snapshot, &unknown::unknown_pcpus(snapshot)) {
        Some(known) => plan_known(&known, policy),
        None => plan_known(snapshot, policy),
    }
}

/// Plan the pin changes for a snapshot whose pCPUs that may be changed have known loads.
fn plan_known(snapshot: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    // Rule 8: a plan the budget affords is made as it is. Cutting the steps short where their
    // count of changes first exceeds the budget is not enough: a plan may pass through more
    // changes than it ends with (a vCPU moved on and back, a node balanced again after a step
    // across nodes).
    if let Some(budget) = policy.max_changes {
        let whole = plan_within(
            snapshot,
            &CpuPolicy {
                max_changes: None,
                ..*policy
            },
        );
        if whole.moves.len() <= budget {
            return whole;
        }
    }
    plan_within(snapshot, policy)
}

/// The plan for one snapshot, its steps cut short where they would make more pin changes than
/// `policy.max_changes`.
fn plan_within(snapshot: &CpuSnapshot, policy: &CpuPolicy) -> CpuPlan {
    let threshold = policy.threshold.max(0.0);
    let pcpus = &snapshot.pcpus;
    if pcpus.is_empty() {
        return CpuPlan::default();
    }
    // Rule 6: demand where the hypervisor reports delay.
    let basis = if snapshot.reports_delay() {
        Basis::Demand
    } else {
        Basis::Usage
    };
    let max_changes = policy.max_changes.unwrap_or(usize::MAX);
    let (mut s, unplaced) = placement(snapshot, basis, max_changes, threshold / 2.0);
    let before = s.balance();
    // Rule 1: pin the unpinned (rule 9: and those pinned outside their set), heaviest first, onto
    // the least-loaded pCPU each may use (rule 10: away from its guest's other vCPUs where one
    // about as free allows).
    // Where each ran last: the node it stays in where it may leave its node (rule 9).
    let last: Vec<Option<usize>> = unplaced.iter().map(|&v| s.at[v]).collect();
    for &v in &unplaced {
        s.take(v);
    }
    for (v, last) in unplaced.into_iter().zip(last) {
        let p = s
            .freest_for(v, threshold / 2.0, last)
            .expect("only vCPUs with somewhere to go are placed");
        s.put(v, p);
    }
    // Rules 2-4: even out the busiest shared pCPU against the freest one, step by step.
    even_out(
        &mut s,
        threshold,
        max_steps(snapshot.vcpus.len()),
        max_changes,
    );

    let moves = (0..snapshot.vcpus.len())
        .filter_map(|v| {
            let to = s.at[v]?;
            (s.movable[v] && s.original[v] != Some(to)).then(|| PinMove {
                key: snapshot.vcpus[v].key,
                from: snapshot.vcpus[v].pinned,
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

/// The snapshot as the planner's working state, with every vCPU where it runs now, and the
/// vCPUs rule 1 is to place (unpinned, or pinned outside their allowed set), heaviest first, as
/// many as `max_changes` affords (rule 8: the others stay where they run, unmoved, for a later
/// decision).
fn placement(
    snapshot: &CpuSnapshot,
    basis: Basis,
    max_changes: usize,
    idle_under: f64,
) -> (Placement, Vec<usize>) {
    let pcpus = &snapshot.pcpus;
    let index = PcpuIndex::new(pcpus);
    let index_of = |p: u32| index.of(p);
    let vcpus = &snapshot.vcpus;
    let n = vcpus.len();
    let mut reach = Reach::anywhere(n);
    let mut sets = SetInterner::default();
    let mut facts = VcpuFacts {
        load: Vec::with_capacity(n),
        variance: Vec::with_capacity(n),
        movable: Vec::with_capacity(n),
        guest: Vec::with_capacity(n),
    };
    let mut original = Vec::with_capacity(n);
    let mut charged = Vec::with_capacity(n);
    let mut unplaced = Vec::new();
    let mut guest = 0;
    // One pass over the vCPUs: at 10 000 vCPUs, each pass over the snapshot costs more than the
    // planning itself.
    for (v, load) in vcpus.iter().enumerate() {
        // Non-negative (and not -0.0), which the member ordering relies on.
        let figure = basis.load(load).filter(|u| *u > 0.0).unwrap_or(0.0);
        facts.load.push(figure);
        facts.variance.push(basis.swing(load).powi(2));
        // Rule 10: the vCPUs of one domain are listed together.
        if v > 0 && vcpus[v - 1].key.domain != load.key.domain {
            guest += 1;
        }
        facts.guest.push(guest);
        // Rule 9: where it may go.
        let options = match &load.allowed {
            Allowed::Any => pcpus.len(),
            Allowed::Only(set) => {
                let (i, size) = sets.intern(set, pcpus.len(), index_of, &mut reach);
                reach.set_of[v] = i;
                size
            }
        };
        // Where it sits now: its single pin, if its set allows it. Unpinned vCPUs are charged to
        // their last pCPU for the "before" picture, then taken off to be placed.
        let at = load.pinned.and_then(index_of).filter(|&p| reach.may(v, p));
        original.push(at);
        charged.push(load.charged_pcpu().and_then(index_of));
        // Rule 5: a vCPU without a load yet is not moved. Rule 9: nor one with nowhere to go, or
        // pinned to the one pCPU it may use. Rule 1: nor an idle one that floats.
        let idle_floating = load.pinned.is_none() && figure < idle_under;
        let movable = load.usage.is_some()
            && options > 0
            && !(options == 1 && at.is_some())
            && !idle_floating;
        facts.movable.push(movable);
        if movable && at.is_none() {
            unplaced.push(v);
        }
    }
    let vcpu_load = &facts.load;
    unplaced.sort_by(|&a, &b| vcpu_load[b].total_cmp(&vcpu_load[a]).then(a.cmp(&b)));
    for &v in unplaced.iter().skip(max_changes) {
        facts.movable[v] = false;
    }
    unplaced.truncate(max_changes);
    let s = Placement::new(facts, reach, Cores::of(snapshot, &index), charged, original);
    (s, unplaced)
}

/// A pCPU's index among the online pCPUs, from its number: by table (a binary search per vCPU was
/// a third of a decision at 10 000 vCPUs).
pub(super) struct PcpuIndex<'a> {
    pcpus: &'a [u32],
    /// Per pCPU number, its index (`usize::MAX`: not online); empty for a numbering too sparse
    /// for a table, which is searched instead (real hosts number their pCPUs densely from 0).
    table: Vec<usize>,
}

impl<'a> PcpuIndex<'a> {
    /// Longest table worth building.
    const MAX_TABLE: usize = 1 << 16;

    /// The index of `pcpus` (online pCPUs, ascending).
    fn new(pcpus: &'a [u32]) -> Self {
        let len = pcpus.last().map_or(0, |&p| p as usize + 1);
        let mut table = vec![usize::MAX; if len <= Self::MAX_TABLE { len } else { 0 }];
        for (i, &p) in pcpus.iter().enumerate() {
            if let Some(slot) = table.get_mut(p as usize) {
                *slot = i;
            }
        }
        Self { pcpus, table }
    }

    /// The index of pCPU `p`, if it is online.
    pub(super) fn of(&self, p: u32) -> Option<usize> {
        if self.table.is_empty() {
            self.pcpus.binary_search(&p).ok()
        } else {
            self.table
                .get(p as usize)
                .copied()
                .filter(|&i| i != usize::MAX)
        }
    }
}
