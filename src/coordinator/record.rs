//! What the memory coordinator remembers about one domain run: [`GuestRecord`], kept in a
//! [`crate::tracker::Tracker`], so that everything it knows of a guest is in one place, forgotten
//! in one place, and a restarted guest starts fresh.

use log::warn;

use crate::ledger::GuestLedger;
use crate::sampling::{MemoryHistory, MemoryReading};

/// Stale reports in a row after which the stats period is set again (the domain may have
/// restarted, which resets it) and the operator is warned once.
pub const STALE_CYCLES_BEFORE_REARM: u32 = 5;

/// Where a domain's balloon statistics stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stats {
    /// Not switched on yet: first sight, or switched on again after going stale.
    Off,
    /// Switched on; `stale_cycles` cycles in a row without a usable report since.
    On { stale_cycles: u32 },
    /// The domain has no balloon device: it is left alone.
    NoBalloon,
    /// Its memory is held (hugepages, locked, VFIO): shrinking its balloon would free nothing on
    /// the host, so it is left alone.
    Held,
    /// A dry run: statistics are not switched on; the domain is judged on what it reports anyway.
    Watched,
}

/// What the operator has been told about a domain whose statistics go stale: told once, with a
/// hint about the guest driver when no report ever came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StaleNotice {
    /// Not told; no usable report came yet.
    NeverFresh,
    /// Not told; reports came before.
    WasFresh,
    /// Told.
    Given,
}

/// Everything the coordinator remembers about one domain run.
#[derive(Debug, Default)]
pub struct GuestRecord {
    /// It was left alone (`--exclude`, its metadata) at its last sight: said when that begins.
    pub excluded: bool,
    /// What is known of it while it is followed; `None` while it is left alone.
    pub followed: Option<Followed>,
}

/// A guest the coordinator follows (not excluded).
#[derive(Debug)]
pub struct Followed {
    /// Where its balloon statistics stand.
    pub stats: Stats,
    notice: StaleNotice,
    /// Its earlier reports, for its consumption rate.
    pub history: MemoryHistory,
    /// What it was asked, and what that tells.
    pub ledger: GuestLedger,
    /// Told the operator its reports cannot be true (until one can again).
    pub implausible_said: bool,
    /// The host's figures at its last read, for when it does not answer.
    pub last_read: Option<LastFigures>,
}

/// The host's own figures of a guest at its last read.
#[derive(Clone, Copy, Debug)]
pub struct LastFigures {
    /// Its max memory, KiB.
    pub max_kib: u64,
    /// What its QEMU process had resident, KiB, where reported.
    pub rss_kib: Option<u64>,
}

impl Default for Followed {
    fn default() -> Self {
        Self {
            stats: Stats::Off,
            notice: StaleNotice::NeverFresh,
            history: MemoryHistory::new(),
            ledger: GuestLedger::new(),
            implausible_said: false,
            last_read: None,
        }
    }
}

impl Followed {
    /// Follow how long the domain's reports have been stale: after
    /// [`STALE_CYCLES_BEFORE_REARM`] cycles, switch its statistics on again and tell the operator
    /// (once).
    pub fn track_staleness(&mut self, reading: &MemoryReading, name: &str) {
        let reporting = matches!(
            reading,
            MemoryReading::Fresh(_) | MemoryReading::First | MemoryReading::Settling
        );
        if reporting {
            self.stats = Stats::On { stale_cycles: 0 };
            if self.notice == StaleNotice::NeverFresh {
                self.notice = StaleNotice::WasFresh;
            }
            return;
        }
        let Stats::On { stale_cycles } = &mut self.stats else {
            return;
        };
        *stale_cycles += 1;
        if *stale_cycles < STALE_CYCLES_BEFORE_REARM {
            return;
        }
        self.stats = Stats::Off;
        if self.notice != StaleNotice::Given {
            warn!(
                "domain {name}: no fresh balloon statistics for {STALE_CYCLES_BEFORE_REARM} cycles{}; it is left alone until they come",
                if self.notice == StaleNotice::WasFresh {
                    ""
                } else {
                    " (is the virtio_balloon driver loaded in the guest?)"
                }
            );
            self.notice = StaleNotice::Given;
        }
    }
}
