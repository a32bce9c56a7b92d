//! The movable vCPUs on one pCPU, for the planner's working state.

/// The movable vCPUs on one pCPU as (load bits, index) keys: a few dozen at most on real hosts,
/// so a vector beats a tree (no allocation per node). It is sorted only when a step looks for a
/// vCPU of a given load on its pCPU: most pCPUs of a large host never take part in a step, and
/// sorting them all was a fifth of a decision at 10 000 vCPUs.
pub(super) struct Members {
    keys: Vec<(u64, usize)>,
    sorted: bool,
}

impl Members {
    pub(super) fn new(keys: Vec<(u64, usize)>) -> Self {
        Self {
            keys,
            sorted: false,
        }
    }

    pub(super) fn insert(&mut self, k: (u64, usize)) {
        if !self.sorted {
            self.keys.push(k);
        } else if let Err(i) = self.keys.binary_search(&k) {
            self.keys.insert(i, k);
        }
    }

    pub(super) fn remove(&mut self, k: (u64, usize)) {
        if self.sorted {
            if let Ok(i) = self.keys.binary_search(&k) {
                self.keys.remove(i);
            }
        } else if let Some(i) = self.keys.iter().position(|&e| e == k) {
            self.keys.swap_remove(i);
        }
    }

    /// Sort them, for [`Placement::closest`].
    pub(super) fn sort(&mut self) {
        if !self.sorted {
            self.keys.sort_unstable();
            self.sorted = true;
        }
    }

    /// Every key, in no particular order unless sorted.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, (u64, usize)> {
        self.keys.iter()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys below `k`, ascending (sorted only).
    pub(super) fn below(&self, k: (u64, usize)) -> std::slice::Iter<'_, (u64, usize)> {
        debug_assert!(self.sorted);
        self.keys[..self.keys.partition_point(|e| *e < k)].iter()
    }

    /// The keys from `k` up, ascending (sorted only).
    pub(super) fn from(&self, k: (u64, usize)) -> std::slice::Iter<'_, (u64, usize)> {
        debug_assert!(self.sorted);
        self.keys[self.keys.partition_point(|e| *e < k)..].iter()
    }

    /// Up to `n` keys on each side of `k`: those nearest it (sorted only).
    pub(super) fn around(&self, k: (u64, usize), n: usize) -> &[(u64, usize)] {
        debug_assert!(self.sorted);
        let at = self.keys.partition_point(|e| *e < k);
        &self.keys[at.saturating_sub(n)..(at + n).min(self.keys.len())]
    }

    /// The keys of load bits `bits`, by index (sorted only).
    pub(super) fn with_bits(&self, bits: u64) -> impl Iterator<Item = &(u64, usize)> {
        self.from((bits, 0)).take_while(move |e| e.0 == bits)
    }
}
