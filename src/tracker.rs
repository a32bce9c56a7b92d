//! What a daemon remembers about each domain: one record per domain run, the record's one owner.
//!
//! A daemon keeps a [`Tracker`] of its own record type. Each cycle it calls
//! [`Tracker::begin_cycle`], then [`Tracker::see`] for every domain it read, and
//! [`Tracker::end_cycle`], which forgets every domain not seen in the cycle (it stopped, or could
//! not be read). A domain that runs anew under the same UUID (destroyed and started again, even
//! within one period) has a new run ([`DomainRef::run`]: libvirt's domain ID, new at every start),
//! and gets a fresh record by construction: nothing of the old run (rates, ledger, affinities,
//! what was said) carries over.

use std::collections::HashMap;

use crate::host::{DomainId, DomainRef};

/// How a domain stands against what the tracker knew of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sight {
    /// Not known before: a fresh record.
    New,
    /// The same run as before: its record.
    Known,
    /// Known under an earlier run (it restarted): a fresh record.
    Restarted,
}

/// One domain's record, with the run it is about and the cycle it was last seen in.
#[derive(Debug)]
struct Entry<R> {
    run: Option<u32>,
    seen: u64,
    record: R,
}

/// Records of type `R`, one per domain run, keyed by UUID.
#[derive(Debug)]
pub struct Tracker<R> {
    entries: HashMap<DomainId, Entry<R>>,
    cycle: u64,
}

impl<R> Default for Tracker<R> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            cycle: 0,
        }
    }
}

impl<R> Tracker<R> {
    /// No domain known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record, in no order.
    pub fn records_mut(&mut self) -> impl Iterator<Item = &mut R> {
        self.entries.values_mut().map(|e| &mut e.record)
    }

    /// Start a cycle.
    pub fn begin_cycle(&mut self) {
        self.cycle += 1;
    }

    /// The record of `domain`, seen this cycle: `fresh()` on first sight and when the domain runs
    /// anew (a new run under the same UUID), else the record kept.
    pub fn see(&mut self, domain: &DomainRef, fresh: impl FnOnce() -> R) -> (Sight, &mut R) {
        self.see_run(domain.id, domain.run, fresh)
    }

    /// The record of run `run` of domain `id`, seen this cycle (see [`Tracker::see`]).
    pub fn see_run(
        &mut self,
        id: DomainId,
        run: Option<u32>,
        fresh: impl FnOnce() -> R,
    ) -> (Sight, &mut R) {
        let cycle = self.cycle;
        let sight = match self.entries.get(&id) {
            None => Sight::New,
            Some(e) if e.run != run => Sight::Restarted,
            Some(_) => Sight::Known,
        };
        if sight != Sight::Known {
            self.entries.insert(
                id,
                Entry {
                    run,
                    seen: cycle,
                    record: fresh(),
                },
            );
        }
        let entry = self.entries.get_mut(&id).expect("inserted above");
        entry.seen = cycle;
        (sight, &mut entry.record)
    }

    /// The record of domain `id`, if known.
    pub fn get(&self, id: &DomainId) -> Option<&R> {
        self.entries.get(id).map(|e| &e.record)
    }

    /// The record of domain `id`, to change, if known.
    pub fn get_mut(&mut self, id: &DomainId) -> Option<&mut R> {
        self.entries.get_mut(id).map(|e| &mut e.record)
    }

    /// End a cycle: forget every domain not seen in it.
    pub fn end_cycle(&mut self) {
        let cycle = self.cycle;
        self.entries.retain(|_, e| e.seen == cycle);
    }

    /// Every record, in UUID order.
    pub fn sorted(&self) -> Vec<(DomainId, &R)> {
        self.sorted_runs()
            .into_iter()
            .map(|(id, _, record)| (id, record))
            .collect()
    }

    /// Every record with its domain and the run it is about, in UUID order.
    pub fn sorted_runs(&self) -> Vec<(DomainId, Option<u32>, &R)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .map(|(id, e)| (*id, e.run, &e.record))
            .collect();
        all.sort_by_key(|(id, ..)| *id);
        all
    }

    /// Domains known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No domain known?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(n: u8, run: u32) -> DomainRef {
        DomainRef {
            run: Some(run),
            ..DomainRef::new(DomainId([n; 16]), "d")
        }
    }

    #[test]
    fn a_record_lives_while_its_run_is_seen() {
        let mut t: Tracker<Vec<u32>> = Tracker::new();
        t.begin_cycle();
        let (sight, r) = t.see(&domain(1, 7), Vec::new);
        assert_eq!(sight, Sight::New);
        r.push(1);
        t.see(&domain(2, 3), Vec::new);
        t.end_cycle();
        // Seen again in the same run: the same record.
        t.begin_cycle();
        let (sight, r) = t.see(&domain(1, 7), Vec::new);
        assert_eq!((sight, r.as_slice()), (Sight::Known, [1].as_slice()));
        t.end_cycle();
        // Domain 2 was not seen: forgotten.
        assert_eq!(t.len(), 1);
        assert!(t.get(&DomainId([2; 16])).is_none());
    }

    #[test]
    fn a_new_run_under_the_same_uuid_is_a_fresh_record() {
        let mut t: Tracker<Vec<u32>> = Tracker::new();
        t.begin_cycle();
        t.see(&domain(1, 7), Vec::new).1.push(1);
        t.end_cycle();
        // Destroyed and started again within a period: seen in the next cycle, under a new run.
        t.begin_cycle();
        let (sight, r) = t.see(&domain(1, 8), Vec::new);
        assert_eq!((sight, r.len()), (Sight::Restarted, 0));
        t.end_cycle();
        assert_eq!(t.sorted().len(), 1);
    }
}
