//! What the memory coordinator knows of each guest across cycles: what the host may still have to
//! back for it, whether its balloon follows what it is given, whether it is being reclaimed.
//!
//! The host budget and the fairness rules of [`crate::mem_plan`] rest on it:
//! - **Unbacked memory.** The host backs a guest's page only once the guest touches it; a page a
//!   balloon gives back is untouched again. So every guest can, at any time, make the host back
//!   more: at most its free memory, since every page it never touched is free (MemFree). The host's
//!   own figure does not show that debt, so the budget leaves it out (rule 6). A guest's free
//!   memory is known at its last consistent report; since then its balloon may have moved (a grant
//!   adds to it, a shrink takes from it): what the guest has touched is its balloon size minus its
//!   free memory at that report, and is what the host backs at least. A guest that never reported
//!   may touch all of its balloon. The balloon size is what the guest says, or what it was last
//!   set to if that is more: a guest that under-reports its balloon must not hide a grant.
//! - **Host figures bound the claims.** Every figure above is the guest's own. The host's own
//!   figure for a guest is the memory its QEMU process has resident (RSS): the guest may still
//!   make the host back at least its balloon minus that, whatever it reports, so no report of a
//!   guest's can enlarge the host's budget. A guest whose report cannot be true, or whose balloon
//!   deflates on its own (deflate-on-oom), may grow to its max memory: it counts at its max
//!   ([`at_max_kib`]).
//! - **Balloons that do not follow.** A guest writes its own `actual`. One whose `actual` stays
//!   under the size it was last given (a broken or lying driver) gets no more until it catches
//!   up (rule 3); the operator is told once.
//! - **Reclaiming.** A guest found wasting stays so until it is brought to its target (rule 2).

use log::warn;

use crate::mem_plan::{BalloonChange, MemStatus, Standing};
use crate::sampling::GuestMemory;

/// How far under the size it was given a balloon may stay and still count as following it:
/// 1 MiB, or 1 % of the size, whichever is more.
fn slack_kib(size_kib: u64) -> u64 {
    (size_kib / 100).max(1024)
}

/// What a guest whose balloon is `balloon_kib` may still make the host back by the host's own
/// figure: its balloon minus what its QEMU process has resident (`rss_kib`; nothing where the
/// host does not report it).
pub fn host_floor_kib(balloon_kib: u64, rss_kib: Option<u64>) -> u64 {
    rss_kib.map_or(0, |rss| balloon_kib.saturating_sub(rss))
}

/// What a guest that may grow to its max memory `max_kib` on its own (its report cannot be
/// true, or its balloon deflates on its own) may still make the host back: its max minus what
/// its QEMU process has resident (`rss_kib`), all of it where the host does not report that.
pub fn at_max_kib(max_kib: u64, rss_kib: Option<u64>) -> u64 {
    max_kib.saturating_sub(rss_kib.unwrap_or(0))
}

/// How many fresh reports' rates a grant is sized on.
const RATES_KEPT: usize = 3;

/// What the coordinator asked of one guest, and what it knows from that: memory the guest may
/// still make the host back, whether its balloon lags, whether it is being reclaimed. Kept in the
/// coordinator's record of the guest's domain run.
#[derive(Clone, Debug, Default)]
pub struct GuestLedger {
    /// Memory it had touched at its last consistent report (balloon size minus MemFree), KiB.
    touched_kib: Option<u64>,
    /// The size of its last grant, until its balloon reaches it.
    asked_kib: Option<u64>,
    /// The size its balloon was last set to.
    set_kib: Option<u64>,
    /// Its balloon has been seen at that size since.
    reached: bool,
    /// Told the operator its balloon lags.
    warned: bool,
    /// Wasting when last judged.
    reclaiming: bool,
    /// Its consumption at its last few fresh reports, newest last, KiB/s.
    rates: Vec<f64>,
}

impl GuestLedger {
    /// Nothing asked or known yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh report `g` of the guest (named `name`): what it has touched, and whether its
    /// balloon reached the size it was last given.
    pub fn observe(&mut self, g: &GuestMemory, name: &str) {
        self.touched_kib = Some(g.actual_kib.saturating_sub(g.unused_kib));
        if self.rates.len() == RATES_KEPT {
            self.rates.remove(0);
        }
        self.rates.push(g.rate_kib_s);
        if let Some(set) = self.set_kib {
            self.reached |= g.actual_kib.abs_diff(set) <= slack_kib(set);
        }
        if let Some(asked) = self.asked_kib {
            if g.actual_kib + slack_kib(asked) >= asked {
                self.asked_kib = None;
                self.warned = false;
            } else if !std::mem::replace(&mut self.warned, true) {
                warn!(
                    "domain {name}: its balloon stays at {} MiB although it was given {} MiB; it gets no more memory until it follows",
                    g.actual_kib / 1024,
                    asked / 1024
                );
            }
        }
    }

    /// What the guest, whose balloon reads `actual_kib` now and whose QEMU process has
    /// `rss_kib` resident, may still make the host back: its balloon (as read, or as last set if
    /// that is more) minus what it had touched at its last report (all of it before any report);
    /// never less than the host's own figure says ([`host_floor_kib`]).
    pub fn unbacked_kib(&self, actual_kib: u64, rss_kib: Option<u64>) -> u64 {
        let touched = self.touched_kib.unwrap_or(0);
        let balloon = actual_kib.max(self.set_kib.unwrap_or(0));
        balloon
            .saturating_sub(touched)
            .max(host_floor_kib(balloon, rss_kib))
    }

    /// The guest's standing, its metadata guaranteeing it `guaranteed_kib`.
    pub fn standing(&self, guaranteed_kib: u64) -> Standing {
        Standing {
            guaranteed_kib,
            reclaiming: self.reclaiming,
            behind: self.asked_kib.is_some() && self.warned,
            peak_rate_kib_s: self.rates.iter().copied().fold(0.0, f64::max),
            self_deflates: false,
        }
    }

    /// The guest was judged `status` this cycle.
    pub fn judged(&mut self, status: MemStatus) {
        self.reclaiming = status == MemStatus::Wasting;
    }

    /// Was the balloon last set to `kib`, and has it not been seen there since? (Asking again
    /// changes nothing: a balloon that did not get there will not for being asked twice. One that
    /// got there and moved away on its own may be asked again.)
    pub fn already_set(&self, kib: u64) -> bool {
        self.set_kib == Some(kib) && !self.reached
    }

    /// Change `c` was made: a grant is watched until the balloon reaches it; a shrink ends that.
    pub fn resized(&mut self, c: &BalloonChange) {
        self.asked_kib = (!c.shrinks()).then_some(c.to_kib);
        self.set_kib = Some(c.to_kib);
        self.reached = false;
        self.warned = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::DomainId;

    const MIB: u64 = 1024;
    const ID: DomainId = DomainId([1; 16]);

    fn guest(actual_mib: u64, unused_mib: u64) -> GuestMemory {
        GuestMemory {
            id: ID,
            actual_kib: actual_mib * MIB,
            max_kib: 4096 * MIB,
            free_kib: unused_mib * MIB,
            unused_kib: unused_mib * MIB,
            rate_kib_s: 0.0,
            latest_rate_kib_s: 0.0,
        }
    }

    fn resize(from_mib: u64, to_mib: u64) -> BalloonChange {
        BalloonChange {
            id: ID,
            from_kib: from_mib * MIB,
            to_kib: to_mib * MIB,
        }
    }

    #[test]
    fn a_guest_may_touch_its_free_memory_and_what_its_balloon_gained_since() {
        let mut l = GuestLedger::new();
        // Never reported: all of its balloon.
        assert_eq!(l.unbacked_kib(500 * MIB, None), 500 * MIB);
        l.observe(&guest(500, 50), "g");
        assert_eq!(l.unbacked_kib(500 * MIB, None), 50 * MIB);
        // Given 100 MiB, not reported since: those too.
        assert_eq!(l.unbacked_kib(600 * MIB, None), 150 * MIB);
        // Shrunk by 30 MiB: the balloon took free pages.
        assert_eq!(l.unbacked_kib(470 * MIB, None), 20 * MIB);
        // Set to 600 MiB, it reads 500 still: it may have the 600 MiB it was given.
        l.resized(&resize(500, 600));
        assert_eq!(l.unbacked_kib(500 * MIB, None), 150 * MIB);
        // It used 40 MiB more: 110 MiB left to touch.
        l.observe(&guest(600, 110), "g");
        assert_eq!(l.unbacked_kib(600 * MIB, None), 110 * MIB);
        // A guest of which nothing is known may touch all of its balloon.
        assert_eq!(GuestLedger::new().unbacked_kib(600 * MIB, None), 600 * MIB);
    }

    #[test]
    fn no_report_makes_a_guest_owe_less_than_the_host_sees() {
        let mut l = GuestLedger::new();
        // It claims to have touched all of its 500 MiB (no MemFree), but its QEMU process has
        // only 200 MiB resident: it may still make the host back 300.
        l.observe(&guest(500, 0), "g");
        assert_eq!(l.unbacked_kib(500 * MIB, None), 0);
        assert_eq!(l.unbacked_kib(500 * MIB, Some(200 * MIB)), 300 * MIB);
        // An honest report says more than the host's floor: the report stands.
        l.observe(&guest(500, 350), "g");
        assert_eq!(l.unbacked_kib(500 * MIB, Some(200 * MIB)), 350 * MIB);
        // A guest that may grow to its max counts at its max, less what the host backs.
        assert_eq!(at_max_kib(1024 * MIB, Some(200 * MIB)), 824 * MIB);
        assert_eq!(at_max_kib(1024 * MIB, None), 1024 * MIB);
    }

    #[test]
    fn a_balloon_that_does_not_follow_its_grant_is_behind_until_it_does() {
        let mut l = GuestLedger::new();
        l.observe(&guest(500, 50), "g");
        l.resized(&resize(500, 600));
        assert!(!l.standing(0).behind, "not judged before a report");
        l.observe(&guest(500, 40), "g");
        assert!(l.standing(0).behind);
        l.observe(&guest(599, 130), "g");
        assert!(!l.standing(0).behind);
        // A shrink ends the wait.
        l.resized(&resize(599, 700));
        l.observe(&guest(599, 130), "g");
        l.resized(&resize(599, 550));
        assert!(!l.standing(0).behind);
    }

    #[test]
    fn a_size_is_not_asked_twice_until_the_balloon_got_there_once() {
        let mut l = GuestLedger::new();
        l.resized(&resize(500, 400));
        assert!(l.already_set(400 * MIB));
        assert!(!l.already_set(390 * MIB));
        // It stays at 500 (a balloon that does not follow): not asked again.
        l.observe(&guest(500, 300), "g");
        assert!(l.already_set(400 * MIB));
        // It got there, then grew back on its own (deflate on OOM): it may be asked again.
        l.observe(&guest(400, 200), "g");
        l.observe(&guest(450, 220), "g");
        assert!(!l.already_set(400 * MIB));
    }

    #[test]
    fn grants_are_sized_on_the_fastest_of_the_last_three_rates() {
        let mut l = GuestLedger::new();
        for rate in [12.0, 8.0, 9.0, 7.0] {
            let mut g = guest(500, 50);
            g.rate_kib_s = rate * 1024.0;
            l.observe(&g, "g");
        }
        // 12 has left the window; 9 is the fastest of 8, 9, 7.
        assert_eq!(l.standing(0).peak_rate_kib_s, 9.0 * 1024.0);
    }

    #[test]
    fn a_wasting_guest_is_reclaiming_until_judged_otherwise() {
        let mut l = GuestLedger::new();
        l.judged(MemStatus::Wasting);
        assert!(l.standing(7).reclaiming);
        assert_eq!(l.standing(7).guaranteed_kib, 7);
        l.judged(MemStatus::Balanced);
        assert!(!l.standing(0).reclaiming);
    }
}
