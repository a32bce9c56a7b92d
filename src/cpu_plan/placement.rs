//! The planner's working state: where every vCPU sits and what each pCPU carries, kept ordered
//! so the busiest and the freest pCPU are found at once.

use std::collections::BTreeSet;

use super::Balance;

/// Where each vCPU may go (rule 9), by pCPU index.
#[derive(Default)]
pub(super) struct Reach {
    /// Per vCPU: `None` when it may go to any pCPU, else the index of its set in `sets`.
    pub(super) set_of: Vec<Option<usize>>,
    /// The distinct sets, each a flag per pCPU.
    pub(super) sets: Vec<Vec<bool>>,
}

impl Reach {
    /// No vCPU constrained: every vCPU may go anywhere.
    pub(super) fn anywhere(vcpus: usize) -> Self {
        Self {
            set_of: vec![None; vcpus],
            sets: Vec::new(),
        }
    }

    /// May vCPU `v` be pinned to pCPU `p`?
    pub(super) fn may(&self, v: usize, p: usize) -> bool {
        self.set_of[v].is_none_or(|i| self.sets[i][p])
    }
}

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
    /// Movable vCPUs placed elsewhere than their current pin: the plan's pin changes so far.
    pub(super) changes: usize,
    /// Per pCPU: summed load of its vCPUs.
    pub(super) pcpu_load: Vec<f64>,
    /// Per pCPU: summed variance of its vCPUs' loads (swings of different vCPUs are independent).
    pub(super) pcpu_variance: Vec<f64>,
    /// Per pCPU: the number of vCPUs on it, movable or not.
    pub(super) count: Vec<usize>,
    /// Per pCPU: the movable vCPUs on it, ordered by load then index (see [`key`]).
    pub(super) members: Vec<BTreeSet<(u64, usize)>>,
    /// Every pCPU ordered by (load, number of vCPUs, index), for the freest and busiest at once.
    pub(super) by_load: BTreeSet<(u64, usize, usize)>,
    /// Per pCPU: its current key in `by_load`.
    pub(super) load_key: Vec<(u64, usize, usize)>,
}

/// A vCPU's place in a member set: its load's bits (ordered like the load itself, since loads are
/// non-negative) and its index.
fn key(load: f64, v: usize) -> (u64, usize) {
    (load.to_bits(), v)
}

impl Placement {
    /// vCPUs with `vcpu_load` (and its `variance`) placed on `pcpus` pCPUs as `at` says, built in
    /// bulk; `original` is where their pins put them now.
    pub(super) fn new(
        vcpu_load: Vec<f64>,
        variance: Vec<f64>,
        movable: Vec<bool>,
        reach: Reach,
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
            reach,
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

    pub(super) fn put(&mut self, v: usize, p: usize) {
        self.set_at(v, Some(p));
        self.pcpu_load[p] += self.vcpu_load[v];
        self.pcpu_variance[p] += self.variance[v];
        self.count[p] += 1;
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
            self.count[p] -= 1;
            self.members[p].remove(&key(self.vcpu_load[v], v));
            self.refile(p);
        }
    }

    /// The vCPU on `p` that may go to pCPU `to` whose load is closest to `target`, among loads in
    /// `[lo, hi]`; on a tie, the smaller load, then the lower index.
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
            .range(..at)
            .rev()
            .find(may)
            .and_then(|&(bits, _)| m.range((bits, 0)..(bits + 1, 0)).find(may))
            .map(|&(_, v)| v);
        let above = m.range(at..).find(may).map(|&(_, v)| v);
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

    /// The least-loaded pCPU vCPU `v` may go to (among equals, the one running fewest vCPUs,
    /// then the lowest); `None` when it may go nowhere.
    pub(super) fn freest_for(&self, v: usize) -> Option<usize> {
        match self.reach.set_of[v] {
            None => Some(self.freest()),
            Some(i) => (0..self.load_key.len())
                .filter(|&p| self.reach.sets[i][p])
                .min_by_key(|&p| self.load_key[p]),
        }
    }

    /// The least-loaded pCPU, other than `src`, that one of the movable vCPUs on `src` may go to
    /// (rule 9: a pCPU none of them may use is no target).
    pub(super) fn freest_reachable_from(&self, src: usize) -> Option<usize> {
        // The distinct sets of the vCPUs on `src` (usually one or two): a pCPU is a target when one
        // of them allows it.
        let mut sets: Vec<usize> = Vec::new();
        for &(_, v) in &self.members[src] {
            match self.reach.set_of[v] {
                None => {
                    return self.by_load.iter().map(|&(_, _, p)| p).find(|&p| p != src);
                }
                Some(i) if !sets.contains(&i) => sets.push(i),
                Some(_) => {}
            }
        }
        self.by_load
            .iter()
            .map(|&(_, _, p)| p)
            .filter(|&p| p != src)
            .find(|&p| sets.iter().any(|&i| self.reach.sets[i][p]))
    }

    /// The least-loaded pCPU (among equals, the one running fewest vCPUs).
    pub(super) fn freest(&self) -> usize {
        self.by_load.first().expect("at least one pCPU").2
    }

    /// The busiest pCPU running at least two vCPUs (rule 2: a lone vCPU is never "fixed") that a
    /// step can relieve, with the freest pCPU one of its movable vCPUs may go to (rule 9).
    pub(super) fn busiest_shared(&self) -> Option<(usize, usize)> {
        self.by_load
            .iter()
            .rev()
            .filter(|&&(_, count, _)| count >= 2)
            .find_map(|&(_, _, src)| Some((src, self.freest_reachable_from(src)?)))
    }

    pub(super) fn balance(&self) -> Balance {
        let min = self.pcpu_load[self.freest()];
        let max = self.pcpu_load[self.by_load.last().expect("at least one pCPU").2];
        let fixable = self.busiest_shared().map_or(0.0, |(src, dst)| {
            (self.pcpu_load[src] - self.pcpu_load[dst]).max(0.0)
        });
        Balance {
            spread: max - min,
            fixable_spread: fixable,
        }
    }
}
