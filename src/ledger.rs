//! What the memory coordinator asked of each guest, and what the guest did with it.
//!
//! The host budget and the fairness rules of [`crate::mem_plan`] rest on it:
//! - **Outstanding grants.** A balloon that grows frees pages inside the guest; the host backs
//!   them only once the guest touches them. Until then the grant is outstanding: the host's own
//!   figure does not show it, yet the guest may use it at any moment, so the budget leaves it out
//!   (rule 6). Which of a guest's free pages the host backs is unknown, so a grant counts as
//!   outstanding for as long as the guest has that much memory free: it is taken up only as the
//!   guest's free memory falls under it (by use, or by a shrink), never by a guest reusing pages
//!   it had touched before.
//! - **Balloons that do not follow.** A guest writes its own `actual`. One whose `actual` stays
//!   under the size it was last given (a broken or lying driver) gets no more until it catches
//!   up (rule 3); the operator is told once.
//! - **Reclaiming.** A guest found wasting stays so until it is brought to its target (rule 2).

use std::collections::HashMap;

use log::warn;

use crate::host::DomainId;
use crate::mem_plan::{BalloonChange, MemStatus, Standing};
use crate::sampling::GuestMemory;

/// How far under the size it was given a balloon may stay and still count as following it:
/// 1 MiB, or 1 % of the size, whichever is more.
fn slack_kib(size_kib: u64) -> u64 {
    (size_kib / 100).max(1024)
}

/// What is known of one guest.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// Granted and not used yet, KiB.
    outstanding_kib: u64,
    /// The size of its last grant, until its balloon reaches it.
    asked_kib: Option<u64>,
    /// Told the operator its balloon lags.
    warned: bool,
    /// Wasting when last judged.
    reclaiming: bool,
}

/// Grants outstanding, balloons lagging, guests being reclaimed: per guest, across cycles.
#[derive(Default)]
pub struct Ledger {
    guests: HashMap<DomainId, Entry>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh report of guest `g` (named `name`): what is left outstanding of its grants (no
    /// more than it has free), and whether its balloon reached the size it was last given.
    pub fn observe(&mut self, g: &GuestMemory, name: &str) {
        let e = self.guests.entry(g.id).or_default();
        e.outstanding_kib = e.outstanding_kib.min(g.free_kib);
        if let Some(asked) = e.asked_kib {
            if g.actual_kib + slack_kib(asked) >= asked {
                e.asked_kib = None;
                e.warned = false;
            } else if !std::mem::replace(&mut e.warned, true) {
                warn!(
                    "domain {name}: its balloon stays at {} MiB although it was given {} MiB; it gets no more memory until it follows",
                    g.actual_kib / 1024,
                    asked / 1024
                );
            }
        }
    }

    /// The standing of guest `id`, whose metadata guarantees it `guaranteed_kib`.
    pub fn standing(&self, id: &DomainId, guaranteed_kib: u64) -> Standing {
        let e = self.guests.get(id);
        Standing {
            guaranteed_kib,
            reclaiming: e.is_some_and(|e| e.reclaiming),
            behind: e.is_some_and(|e| e.asked_kib.is_some() && e.warned),
        }
    }

    /// Guest `id` was judged `status` this cycle.
    pub fn judged(&mut self, id: &DomainId, status: MemStatus) {
        self.guests.entry(*id).or_default().reclaiming = status == MemStatus::Wasting;
    }

    /// Change `c` was made: a grant is outstanding until used; a shrink cancels what is left of
    /// the last grant's wait.
    pub fn resized(&mut self, c: &BalloonChange) {
        let e = self.guests.entry(c.id).or_default();
        if c.shrinks() {
            e.asked_kib = None;
            e.warned = false;
        } else {
            e.outstanding_kib += c.to_kib - c.from_kib;
            e.asked_kib = Some(c.to_kib);
        }
    }

    /// All grants outstanding, KiB.
    pub fn outstanding_kib(&self) -> u64 {
        self.guests.values().map(|e| e.outstanding_kib).sum()
    }

    /// Forget guest `id`: it vanished or restarted (its memory went back to the host with it).
    pub fn forget(&mut self, id: &DomainId) {
        self.guests.remove(id);
    }

    /// Keep only the guests `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&DomainId) -> bool) {
        self.guests.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024;

    fn guest(actual_mib: u64, free_mib: u64) -> GuestMemory {
        GuestMemory {
            id: DomainId([1; 16]),
            actual_kib: actual_mib * MIB,
            max_kib: 4096 * MIB,
            free_kib: free_mib * MIB,
            rate_kib_s: 0.0,
        }
    }

    fn grow(from_mib: u64, to_mib: u64) -> BalloonChange {
        BalloonChange {
            id: DomainId([1; 16]),
            from_kib: from_mib * MIB,
            to_kib: to_mib * MIB,
        }
    }

    #[test]
    fn a_grant_is_outstanding_until_the_guest_has_less_free() {
        let mut l = Ledger::new();
        l.observe(&guest(500, 50), "g");
        l.resized(&grow(500, 600));
        assert_eq!(l.outstanding_kib(), 100 * MIB);
        // The balloon grew: free memory too, used memory not.
        l.observe(&guest(600, 150), "g");
        assert_eq!(l.outstanding_kib(), 100 * MIB);
        // Its first 50 MiB of use may be pages the host backs already.
        l.observe(&guest(600, 100), "g");
        assert_eq!(l.outstanding_kib(), 100 * MIB);
        l.observe(&guest(600, 60), "g");
        assert_eq!(l.outstanding_kib(), 60 * MIB);
        // Memory it frees again was touched: it stays taken.
        l.observe(&guest(600, 200), "g");
        assert_eq!(l.outstanding_kib(), 60 * MIB);
        l.observe(&guest(600, 10), "g");
        assert_eq!(l.outstanding_kib(), 10 * MIB);
    }

    #[test]
    fn a_shrink_gives_an_unused_grant_back() {
        let mut l = Ledger::new();
        l.observe(&guest(500, 50), "g");
        l.resized(&grow(500, 600));
        l.observe(&guest(600, 150), "g");
        l.resized(&grow(600, 510));
        l.observe(&guest(510, 60), "g");
        assert_eq!(l.outstanding_kib(), 60 * MIB);
        l.forget(&DomainId([1; 16]));
        assert_eq!(l.outstanding_kib(), 0);
    }

    #[test]
    fn a_balloon_that_does_not_follow_its_grant_is_behind_until_it_does() {
        let mut l = Ledger::new();
        let id = DomainId([1; 16]);
        l.observe(&guest(500, 50), "g");
        l.resized(&grow(500, 600));
        assert!(!l.standing(&id, 0).behind, "not judged before a report");
        l.observe(&guest(500, 40), "g");
        assert!(l.standing(&id, 0).behind);
        l.observe(&guest(599, 130), "g");
        assert!(!l.standing(&id, 0).behind);
    }

    #[test]
    fn a_wasting_guest_is_reclaiming_until_judged_otherwise() {
        let mut l = Ledger::new();
        let id = DomainId([1; 16]);
        l.judged(&id, MemStatus::Wasting);
        assert!(l.standing(&id, 7).reclaiming);
        assert_eq!(l.standing(&id, 7).guaranteed_kib, 7);
        l.judged(&id, MemStatus::Balanced);
        assert!(!l.standing(&id, 0).reclaiming);
    }
}
