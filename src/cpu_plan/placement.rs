//! The planner's working state: where every vCPU sits and what each pCPU carries, kept ordered
//! so the busiest and the freest pCPU are found at once.
//!
//! pCPUs are ordered by their effective load (rule 10): a hyperthread shares its core with its
//! siblings, so what they run slows what it runs. On a host without SMT, or where the topology is
//! not known, every core has one pCPU and the effective load is the load.

use std::collections::BTreeSet;

use super::Balance;
use super::cores::{Cores, SIBLING_SHARE, Scope};
use super::members::Members;
use super::reach::{PcpuSet, Reach};

/// Working state: where every vCPU sits and what each pCPU carries.
pub(super) struct Placement {
    /// Where each vCPU may go.
    pub(super) reach: Reach,
    /// Per vCPU: its pCPU index now (None = not placed on a single online pCPU).
    pub(super) at: Vec<Option<usize>>,
    /// Per vCPU: its pCPU index in the current pins (None = not pinned to one online pCPU).
    pub(super) original: Vec<Option<usize>>,
    /// Per vCPU: its load (usage or demand, per the basis), 0 when unknown.
    pub(super) vcpu_load: Vec<f64>,
    /// Per vCPU: the variance of its load from one sample to the next.
    pub(super) variance: Vec<f64>,
    /// Per vCPU: may the planner move it?
    pub(super) movable: Vec<bool>,
    /// Per vCPU: its guest, as a number (vCPUs of one domain share it).
    pub(super) guest: Vec<u32>,
    /// Which pCPUs share a core.
    pub(super) cores: Cores,
    /// May some movable vCPU use pCPUs of two NUMA nodes (so nodes are balanced against each
    /// other too)?
    spans_nodes: bool,
    /// Per core: summed load, variance and number of vCPUs of its pCPUs.
    core_load: Vec<f64>,
    core_variance: Vec<f64>,
    core_count: Vec<usize>,
    /// Movable vCPUs placed elsewhere than their current pin: the plan's pin changes so far.
    pub(super) changes: usize,
    /// Per pCPU: summed load of its vCPUs.
    pub(super) pcpu_load: Vec<f64>,
    /// Per pCPU: summed variance of its vCPUs' loads (swings of different vCPUs are independent).
    pub(super) pcpu_variance: Vec<f64>,
    /// Per pCPU: the movable vCPUs on it, as (load, index) keys (see [`key`]), sorted once a step
    /// looks at them.
    pub(super) members: Vec<Members>,
    /// Every pCPU ordered by (effective load, number of vCPUs on its core, index), for the
    /// freest and busiest at once.
    pub(super) by_load: BTreeSet<(u64, usize, usize)>,
    /// Per pCPU: its current key in `by_load`.
    pub(super) load_key: Vec<(u64, usize, usize)>,
}

/// What the planner knows of each vCPU, by index.
pub(super) struct VcpuFacts {
    /// Its load (usage or demand, per the basis), 0 when unknown.
    pub(super) load: Vec<f64>,
    /// The variance of its load from one sample to the next.
    pub(super) variance: Vec<f64>,
    /// May the planner move it?
    pub(super) movable: Vec<bool>,
    /// Its guest, as a number.
    pub(super) guest: Vec<u32>,
}

/// A vCPU's place in a member set: its load's bits (ordered like the load itself, since loads are
/// non-negative) and its index.
fn key(load: f64, v: usize) -> (u64, usize) {
    (load.to_bits(), v)
}

impl Placement {
    /// The `vcpus` placed on the pCPUs of `cores` as `at` says, built in bulk; `original` is where
    /// their pins put them now.
    pub(super) fn new(
        vcpus: VcpuFacts,
        reach: Reach,
        cores: Cores,
        at: Vec<Option<usize>>,
        original: Vec<Option<usize>>,
    ) -> Self {
        let VcpuFacts {
            load: vcpu_load,
            variance,
            movable,
            guest,
        } = vcpus;
        let pcpus = cores.core_of.len();
        let mut pcpu_load = vec![0.0; pcpus];
        let mut pcpu_variance = vec![0.0; pcpus];
        let mut count = vec![0; pcpus];
        for (v, p) in at.iter().enumerate() {
            if let Some(p) = *p {
                pcpu_load[p] += vcpu_load[v];
                pcpu_variance[p] += variance[v];
                count[p] += 1;
            }
        }
        // Sized at once: a pCPU never gets more than it has now but for a few moves.
        let mut lists: Vec<Vec<(u64, usize)>> =
            count.iter().map(|&n| Vec::with_capacity(n + 4)).collect();
        for (v, p) in at.iter().enumerate() {
            if let (Some(p), true) = (*p, movable[v]) {
                lists[p].push(key(vcpu_load[v], v));
            }
        }
        let members: Vec<Members> = lists.into_iter().map(Members::new).collect();
        let mut core_load = pcpu_load.clone();
        let mut core_variance = pcpu_variance.clone();
        let mut core_count = count.clone();
        for threads in cores.threads.iter().filter(|t| !t.is_empty()) {
            let c = threads[0];
            core_load[c] = threads.iter().map(|&p| pcpu_load[p]).sum();
            core_variance[c] = threads.iter().map(|&p| pcpu_variance[p]).sum();
            core_count[c] = threads.iter().map(|&p| count[p]).sum();
        }
        let changes = (0..at.len())
            .filter(|&v| movable[v] && at[v] != original[v])
            .count();
        let mut s = Self {
            reach,
            at,
            original,
            vcpu_load,
            variance,
            movable,
            guest,
            cores,
            spans_nodes: false,
            core_load,
            core_variance,
            core_count,
            changes,
            pcpu_load,
            pcpu_variance,
            members,
            by_load: BTreeSet::new(),
            load_key: Vec::new(),
        };
        s.spans_nodes = s.find_spans_nodes();
        s.load_key = (0..pcpus).map(|p| s.key_of(p)).collect();
        s.by_load = s.load_key.iter().copied().collect();
        s
    }

    /// pCPU `p`'s key in `by_load`.
    fn key_of(&self, p: usize) -> (u64, usize, usize) {
        // Loads are sums of non-negative vCPU loads; clamp rounding residue so the bits stay
        // ordered.
        let c = self.cores.core_of[p];
        (self.eff(p).max(0.0).to_bits(), self.core_count[c], p)
    }

    /// pCPU `p`'s effective load (rule 10): its own load plus [`SIBLING_SHARE`] of its siblings'.
    pub(super) fn eff(&self, p: usize) -> f64 {
        let c = self.cores.core_of[p];
        if self.cores.threads[c].is_empty() {
            return self.pcpu_load[p];
        }
        self.pcpu_load[p] + SIBLING_SHARE * (self.core_load[c] - self.pcpu_load[p])
    }

    /// The variance of pCPU `p`'s effective load from one sample to the next.
    pub(super) fn eff_variance(&self, p: usize) -> f64 {
        let c = self.cores.core_of[p];
        if self.cores.threads[c].is_empty() {
            return self.pcpu_variance[p];
        }
        let siblings = (self.core_variance[c] - self.pcpu_variance[p]).max(0.0);
        self.pcpu_variance[p] + SIBLING_SHARE * SIBLING_SHARE * siblings
    }

    /// How much of a vCPU's load moving it from `from` to `to` shifts between the two pCPUs'
    /// effective loads: all of it, but between two siblings of one core, which already count part
    /// of each other's load.
    pub(super) fn shift_factor(&self, from: usize, to: usize) -> f64 {
        if self.cores.core_of[from] == self.cores.core_of[to] {
            1.0 - SIBLING_SHARE
        } else {
            1.0
        }
    }

    /// Re-file pCPU `p`, and its siblings (whose effective loads count it), in `by_load` after
    /// its load or membership changed.
    fn refile(&mut self, p: usize) {
        let c = self.cores.core_of[p];
        let n = self.cores.threads[c].len();
        if n == 0 {
            self.refile_one(p);
        }
        for i in 0..n {
            self.refile_one(self.cores.threads[c][i]);
        }
    }

    fn refile_one(&mut self, p: usize) {
        self.by_load.remove(&self.load_key[p]);
        self.load_key[p] = self.key_of(p);
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

    pub(super) fn put(&mut self, v: usize, p: usize) {
        self.set_at(v, Some(p));
        self.pcpu_load[p] += self.vcpu_load[v];
        self.pcpu_variance[p] += self.variance[v];
        let c = self.cores.core_of[p];
        self.core_load[c] += self.vcpu_load[v];
        self.core_variance[c] += self.variance[v];
        self.core_count[c] += 1;
        if self.movable[v] {
            self.members[p].insert(key(self.vcpu_load[v], v));
        }
        self.refile(p);
    }

    pub(super) fn take(&mut self, v: usize) {
        if let Some(p) = self.at[v] {
            self.set_at(v, None);
            self.pcpu_load[p] -= self.vcpu_load[v];
            self.pcpu_variance[p] = (self.pcpu_variance[p] - self.variance[v]).max(0.0);
            let c = self.cores.core_of[p];
            self.core_load[c] -= self.vcpu_load[v];
            self.core_variance[c] = (self.core_variance[c] - self.variance[v]).max(0.0);
            self.core_count[c] -= 1;
            self.members[p].remove(key(self.vcpu_load[v], v));
            self.refile(p);
        }
    }

    /// The vCPU on `p` (whose members are sorted) that may go to pCPU `to` whose load is closest
    /// to `target`, among loads in `[lo, hi]`; on a tie, the smaller load, then the lower index.
    pub(super) fn closest(
        &self,
        p: usize,
        to: usize,
        target: f64,
        lo: f64,
        hi: f64,
    ) -> Option<usize> {
        let m = &self.members[p];
        let may = |&&(_, v): &&(u64, usize)| self.reach.may(v, to);
        let at = key(target.max(0.0), 0);
        // The lowest-index vCPU of the load just below `target`, and the first one at or above it.
        let below = m
            .below(at)
            .rev()
            .find(may)
            .and_then(|&(bits, _)| m.with_bits(bits).find(may))
            .map(|&(_, v)| v);
        let above = m.from(at).find(may).map(|&(_, v)| v);
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

    /// The pCPU rule 1 pins vCPU `v` to: the least-loaded (effective load) pCPU it may go to,
    /// among equals the one whose core runs fewest vCPUs, then the lowest; but where a pCPU
    /// within `near` points of that one runs no other vCPU of `v`'s guest while that one does, the
    /// first such pCPU (a guest's vCPUs stacked on one pCPU wait for each other: a vCPU holding a
    /// lock inside the guest is preempted by one spinning for it). `None` when it may go nowhere.
    pub(super) fn freest_for(&self, v: usize, near: f64, home: Option<usize>) -> Option<usize> {
        /// How many pCPUs past the freest are looked at for one without the guest.
        const LOOK_AHEAD: usize = 8;
        let mut candidates = self
            .by_load
            .iter()
            .map(|&(_, _, p)| p)
            .filter(|&p| self.reach.may(v, p));
        let mut first = candidates.next()?;
        // Rule 9: where it may leave its node, it stays there unless a pCPU elsewhere is freer by
        // more than twice `near` (the threshold).
        if let Some(home) = home {
            let node = self.cores.node_of[home];
            if self.cores.node_of[first] != node {
                let limit = self.eff(first) + 2.0 * near;
                if let Some(local) = self
                    .by_load
                    .iter()
                    .map(|&(_, _, p)| p)
                    .take_while(|&p| self.eff(p) <= limit)
                    .find(|&p| self.cores.node_of[p] == node && self.reach.may(v, p))
                {
                    first = local;
                }
            }
        }
        let node = self.cores.node_of[first];
        let candidates = candidates.filter(|&p| self.cores.node_of[p] == node);
        if !self.hosts_guest_of(first, v) {
            return Some(first);
        }
        let limit = self.eff(first) + near;
        let other = candidates
            .take(LOOK_AHEAD)
            .take_while(|&p| self.eff(p) <= limit)
            .find(|&p| !self.hosts_guest_of(p, v));
        Some(other.unwrap_or(first))
    }

    /// Rule 10 for a move of `v` from `src` (whose members are sorted) to `dst` chosen for its
    /// load's closeness to `target`: when `dst` runs a vCPU of `v`'s guest, the vCPU on `src`
    /// whose guest has none there, that may go there, and whose load is at most `near` further
    /// from `target` than `v`'s (the closest such, then the smaller load, then the lower index),
    /// among the few nearest `target` (a bound on the work: a crowded pCPU runs thousands).
    /// `None` when there is no conflict or no such vCPU. Whether its move pays is the caller's to
    /// check.
    pub(super) fn apart_from_guest(
        &self,
        v: usize,
        src: usize,
        dst: usize,
        target: f64,
        near: f64,
    ) -> Option<usize> {
        if !self.hosts_guest_of(dst, v) {
            return None;
        }
        /// How many vCPUs of `src` on each side of `target` are looked at.
        const LOOK_AROUND: usize = 8;
        let limit = (self.vcpu_load[v] - target).abs() + near;
        self.members[src]
            .around(key(target.max(0.0), 0), LOOK_AROUND)
            .iter()
            .map(|&(_, w)| w)
            .filter(|&w| {
                w != v
                    && self.reach.may(w, dst)
                    && (self.vcpu_load[w] - target).abs() <= limit
                    && !self.hosts_guest_of(dst, w)
            })
            .min_by(|&a, &b| {
                let d = |w: usize| (self.vcpu_load[w] - target).abs();
                d(a).total_cmp(&d(b))
                    .then(self.vcpu_load[a].total_cmp(&self.vcpu_load[b]))
                    .then(a.cmp(&b))
            })
    }

    /// Does pCPU `p` run a movable vCPU of `v`'s guest (other than `v`)?
    fn hosts_guest_of(&self, p: usize, v: usize) -> bool {
        let g = self.guest[v];
        self.members[p]
            .iter()
            .any(|&(_, w)| w != v && self.guest[w] == g)
    }

    /// The least-loaded pCPU, other than `src`, that one of the movable vCPUs on `src` may go to
    /// (rule 9: a pCPU none of them may use is no target), within `scope`.
    pub(super) fn freest_reachable_from(&self, src: usize, scope: Scope) -> Option<usize> {
        if self.members[src].is_empty() {
            return None;
        }
        let node = self.cores.node_of[src];
        let in_scope = |p: usize| {
            p != src
                && match scope {
                    Scope::Node(_) => self.cores.node_of[p] == node,
                    Scope::Across => self.cores.node_of[p] != node,
                }
        };
        // The distinct sets of the vCPUs on `src` (usually one or two): a pCPU is a target when one
        // of them allows it.
        let mut sets: Vec<usize> = Vec::new();
        for &(_, v) in self.members[src].iter() {
            match self.reach.set_of[v] {
                None => {
                    return self
                        .by_load
                        .iter()
                        .map(|&(_, _, p)| p)
                        .find(|&p| in_scope(p));
                }
                Some(i) if !sets.contains(&i) => sets.push(i),
                Some(_) => {}
            }
        }
        self.by_load
            .iter()
            .map(|&(_, _, p)| p)
            .filter(|&p| in_scope(p))
            .find(|&p| sets.iter().any(|&i| self.reach.allows(i, p)))
    }

    /// The scopes to balance in, in order: each NUMA node, then across nodes where a movable
    /// vCPU may use pCPUs of more than one node.
    pub(super) fn scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = (0..self.cores.nodes).map(Scope::Node).collect();
        if self.spans_nodes {
            scopes.push(Scope::Across);
        }
        scopes
    }

    /// May some movable vCPU use pCPUs of two NUMA nodes?
    fn find_spans_nodes(&self) -> bool {
        if self.cores.nodes < 2 {
            return false;
        }
        let node_of = &self.cores.node_of;
        let spans = |set: &PcpuSet| {
            let mut nodes = set.iter().map(|p| node_of[p]);
            nodes.next().is_some_and(|first| nodes.any(|n| n != first))
        };
        let mut used = vec![false; self.reach.sets.len()];
        for v in (0..self.movable.len()).filter(|&v| self.movable[v]) {
            match self.reach.set_of[v] {
                None => return true,
                Some(i) => used[i] = true,
            }
        }
        self.reach
            .sets
            .iter()
            .zip(used)
            .any(|(set, used)| used && spans(set))
    }

    /// The least-loaded pCPU (among equals, the one running fewest vCPUs).
    pub(super) fn freest(&self) -> usize {
        self.by_load.first().expect("at least one pCPU").2
    }

    /// The busiest pCPU whose core runs at least two vCPUs (rule 2: a lone vCPU is never
    /// "fixed"; rule 10: on its core) that a step can relieve, with the freest pCPU one of its
    /// movable vCPUs may go to (rule 9).
    pub(super) fn busiest_shared(&self, scope: Scope) -> Option<(usize, usize)> {
        self.by_load
            .iter()
            .rev()
            .filter(|&&(_, count, src)| {
                count >= 2
                    && match scope {
                        Scope::Node(n) => self.cores.node_of[src] == n,
                        Scope::Across => true,
                    }
            })
            .find_map(|&(_, _, src)| Some((src, self.freest_reachable_from(src, scope)?)))
    }

    /// Rule 2's gap within `scope`: its busiest shared pCPU against the freest pCPU one of its
    /// vCPUs may go to (0 when there is none).
    pub(super) fn fixable_in(&self, scope: Scope) -> f64 {
        self.busiest_shared(scope)
            .map_or(0.0, |(src, dst)| (self.eff(src) - self.eff(dst)).max(0.0))
    }

    /// The busiest pCPU's effective load minus the freest's.
    pub(super) fn spread(&self) -> f64 {
        let max = self.eff(self.by_load.last().expect("at least one pCPU").2);
        max - self.eff(self.freest())
    }

    /// How uneven the effective loads are: the fixable spread is the largest of the scopes'.
    pub(super) fn balance(&self) -> Balance {
        let fixable = self
            .scopes()
            .into_iter()
            .map(|scope| self.fixable_in(scope))
            .fold(0.0, f64::max);
        Balance {
            spread: self.spread(),
            fixable_spread: fixable,
        }
    }
}
