//! [`MemoryHistory`]: one guest's balloon reports in, [`MemoryReading`]s (with its consumption
//! rate) out.

use std::time::Instant;

use super::RateSeries;
use crate::host::{BalloonStats, DomainId};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuestMemory {
    /// Which domain.
    pub id: DomainId,
    /// Balloon size now.
    pub actual_kib: u64,
    /// Largest size the balloon may reach.
    pub max_kib: u64,
    /// Memory the guest can still use ([`BalloonStats::free_kib`]).
    pub free_kib: u64,
    /// Memory the guest does not use at all (MemFree): every page it never touched is in here.
    pub unused_kib: u64,
    /// Consumption: growth of the memory the guest uses (actual − free), in KiB/s, over the
    /// measured interval since its report two reports back. Positive = consuming. A balloon
    /// change does not count as consumption.
    pub rate_kib_s: f64,
    /// Consumption over the last interval alone, KiB/s: a burst shows here a report before it
    /// shows in `rate_kib_s`.
    pub latest_rate_kib_s: f64,
}

impl GuestMemory {
    /// Memory the guest uses: its balloon size minus what it can still use.
    pub fn used_kib(&self) -> u64 {
        self.actual_kib.saturating_sub(self.free_kib)
    }

    /// The pace the planner judges the guest on, KiB/s: its rate, or, when its consumption
    /// jumped (the last interval at more than twice its rate), the last interval's: a burst is
    /// fed a report sooner. (A guest that stalls and catches up is then read at up to twice its
    /// rate for one report.)
    pub fn pace_kib_s(&self) -> f64 {
        if self.latest_rate_kib_s > 2.0 * self.rate_kib_s.max(0.0) {
            self.latest_rate_kib_s
        } else {
            self.rate_kib_s
        }
    }

    /// Free memory as a percentage of the balloon size.
    pub fn free_pct(&self) -> f64 {
        if self.actual_kib == 0 {
            0.0
        } else {
            100.0 * self.free_kib as f64 / self.actual_kib as f64
        }
    }
}

/// What a balloon report is worth this cycle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryReading {
    /// A new, consistent report with a consumption rate: the planner may act on it.
    Fresh(GuestMemory),
    /// A new, consistent report, but the first one: no rate yet.
    First,
    /// The guest has not posted a report since the last one we saw (or since we first saw it,
    /// when the figures may predate the stats period): not facts yet.
    Stale,
    /// The balloon moved since the previous read: the report may predate the move, so balloon
    /// size and free memory cannot be compared yet.
    Settling,
    /// The report cannot be true (see [`Implausible`]): ignored, and the guest is not to be
    /// trusted this cycle.
    Inconsistent(Implausible),
    /// The domain reports no guest figures at all: no balloon device or no guest driver.
    NoStats,
}

/// Why a guest's report cannot be true. The balloon size (`actual`) and every guest figure are
/// written by the guest; the domain's max memory is the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implausible {
    /// Its balloon size is over the domain's max memory.
    ActualOverMax,
    /// Its MemTotal is over the domain's max memory.
    TotalOverMax,
    /// It reports more free memory than its balloon holds.
    FreeOverActual,
    /// It reports an empty balloon, or no memory at all.
    Empty,
    /// Its MemTotal moved by more than its balloon did since the last report taken at its
    /// balloon's size (a guest's kernel lowers and raises it with the balloon, page for page).
    TotalJumped,
}

impl std::fmt::Display for Implausible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Implausible::ActualOverMax => "its balloon size is over its max memory",
            Implausible::TotalOverMax => "its MemTotal is over its max memory",
            Implausible::FreeOverActual => "it reports more free memory than its balloon holds",
            Implausible::Empty => "it reports an empty balloon or no memory at all",
            Implausible::TotalJumped => "its MemTotal moved by more than its balloon did",
        })
    }
}

impl Implausible {
    /// What cannot be true of a report: its balloon `actual_kib` of max `max_kib`, MemTotal
    /// `total_kib`, MemFree `unused_kib` and free memory `free_kib`.
    fn of(
        actual_kib: u64,
        max_kib: u64,
        total_kib: u64,
        unused_kib: u64,
        free_kib: u64,
    ) -> Option<Self> {
        if actual_kib == 0 || total_kib == 0 {
            Some(Implausible::Empty)
        } else if actual_kib > max_kib {
            Some(Implausible::ActualOverMax)
        } else if total_kib > max_kib {
            Some(Implausible::TotalOverMax)
        } else if unused_kib > actual_kib || free_kib > actual_kib {
            Some(Implausible::FreeOverActual)
        } else {
            None
        }
    }
}

/// What the history remembers of a guest's previous read.
#[derive(Clone, Copy, Debug)]
struct LastRead {
    update: u64,
    actual_kib: u64,
    /// Balloon size minus the guest's total memory (MemTotal) in the last report known to be
    /// taken at the balloon size read with it: what the guest's kernel keeps for itself.
    offset_kib: Option<i64>,
}

/// Turns one guest's successive balloon reports into [`MemoryReading`]s. The coordinator keeps it
/// in its record of the guest's domain run, so it goes when the domain vanishes or restarts.
///
/// A report is used only when it is new (the guest posted it after our previous read) and it was
/// taken with the balloon at the size read now, so that "used = actual − free" is a consistent
/// figure. Two things show that: the balloon did not move between our previous read and this one;
/// or it moved, and the guest's total memory (MemTotal, which a Linux balloon driver lowers and
/// raises page by page as it inflates and deflates) moved with it exactly, so the report postdates
/// the move. The second lets a resized guest be decided on again one read after the resize instead
/// of two. A guest whose MemTotal does not follow its balloon (Linux keeps it when virtio-balloon's
/// `deflate-on-oom` is negotiated) is simply judged by the first.
///
/// A guest's consumption is its growth over its last two reports (`RATE_INTERVALS`): a guest that
/// stalls for a report and catches up in the next (seen on real guests after a grant: a rate of
/// 0, then twice the true one, and grants sized on that 2×) is read at most 1.5 times its rate,
/// and never as idle while it consumes.
#[derive(Clone, Debug)]
pub struct MemoryHistory {
    used: RateSeries,
    last: Option<LastRead>,
}

/// How far a guest's MemTotal may move, KiB, while its balloon stays put (the kernel's own
/// reservations shift a little).
const TOTAL_JUMP_KIB: i64 = 4 * 1024;

/// Intervals between reports a consumption rate covers.
const RATE_INTERVALS: usize = 2;

impl Default for MemoryHistory {
    fn default() -> Self {
        Self {
            used: RateSeries::with_window(RATE_INTERVALS),
            last: None,
        }
    }
}

impl MemoryHistory {
    /// No report seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Judge the report `stats` of guest `id`, read at `at`. A guest that reports no figures
    /// starts again: its next report is a first sight.
    pub fn record(&mut self, id: DomainId, at: Instant, stats: &BalloonStats) -> MemoryReading {
        let (Some(unused), Some(free), Some(available), Some(update)) = (
            stats.unused_kib,
            stats.free_kib(),
            stats.mem_total_kib,
            stats.last_update,
        ) else {
            *self = Self::new();
            return MemoryReading::NoStats;
        };
        let offset = stats.actual_kib as i64 - available as i64;
        let previous = self.last;
        let moved = previous.is_some_and(|p| p.actual_kib != stats.actual_kib);
        let fresh = previous.is_some_and(|p| update > p.update);
        // The balloon stayed put, yet MemTotal moved (memory hot-plugged into the guest, or a
        // report made up): this report is not trusted, and the new figure is the baseline from
        // the next one on.
        let jumped = fresh
            && !moved
            && previous
                .and_then(|p| p.offset_kib)
                .is_some_and(|known| (known - offset).abs() > TOTAL_JUMP_KIB);
        let implausible = Implausible::of(stats.actual_kib, stats.max_kib, available, unused, free)
            .or(jumped.then_some(Implausible::TotalJumped));
        let sane = implausible.is_none() || jumped;
        // Taken at the balloon size read now: the balloon stayed put, or MemTotal moved with it.
        let at_this_size = !moved || previous.is_some_and(|p| p.offset_kib == Some(offset));
        let known_offset = if fresh && at_this_size && sane {
            Some(offset)
        } else {
            previous.and_then(|p| p.offset_kib)
        };
        self.last = Some(LastRead {
            update,
            actual_kib: stats.actual_kib,
            offset_kib: known_offset,
        });
        if previous.is_none() || !fresh {
            return MemoryReading::Stale;
        }
        if !at_this_size {
            return MemoryReading::Settling;
        }
        if let Some(why) = implausible {
            return MemoryReading::Inconsistent(why);
        }
        let used = stats.actual_kib - free;
        match self.used.gauge(used as f64, at) {
            None => MemoryReading::First,
            Some(rate_kib_s) => MemoryReading::Fresh(GuestMemory {
                latest_rate_kib_s: self.used.last_interval_rate().unwrap_or(rate_kib_s),
                id,
                actual_kib: stats.actual_kib,
                max_kib: stats.max_kib,
                free_kib: free,
                unused_kib: unused,
                rate_kib_s,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dom(n: u8) -> DomainId {
        DomainId([n; 16])
    }

    fn stats(actual: u64, unused: u64, update: u64) -> BalloonStats {
        BalloonStats {
            actual_kib: actual,
            max_kib: 4 * actual,
            unused_kib: Some(unused),
            mem_total_kib: Some(actual),
            mem_available_kib: Some(unused),
            last_update: Some(update),
            rss_kib: None,
        }
    }

    /// Domain 1's report (actual, unused, last update), read `secs` after `t0`.
    fn cycle(
        m: &mut MemoryHistory,
        t0: Instant,
        secs: u64,
        (actual, unused, update): (u64, u64, u64),
    ) -> MemoryReading {
        m.record(
            dom(1),
            t0 + Duration::from_secs(secs),
            &stats(actual, unused, update),
        )
    }

    fn fresh_rate(reading: MemoryReading) -> f64 {
        match reading {
            MemoryReading::Fresh(g) => g.rate_kib_s,
            other => panic!("expected a fresh reading, not {other:?}"),
        }
    }

    #[test]
    fn memory_needs_an_advanced_report_then_a_second_one_for_a_rate() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        // First sight: the report may predate the stats period. The same report again: still stale.
        assert_eq!(cycle(&mut m, t0, 0, (1000, 900, 10)), MemoryReading::Stale);
        assert_eq!(cycle(&mut m, t0, 2, (1000, 900, 10)), MemoryReading::Stale);
        assert_eq!(cycle(&mut m, t0, 4, (1000, 800, 12)), MemoryReading::First);
        // Used grew by 200 KiB over 2 s: consuming 100 KiB/s.
        let reading = cycle(&mut m, t0, 6, (1000, 600, 14));
        assert!((fresh_rate(reading) - 100.0).abs() < 1e-9);
        let MemoryReading::Fresh(g) = reading else {
            unreachable!()
        };
        assert_eq!((g.used_kib(), g.free_pct()), (400, 60.0));
        // The balloon grew by 500 KiB and the next report predates the move (the guest's total
        // memory is still the old one), so it waits...
        let before_the_move = BalloonStats {
            mem_total_kib: Some(1000),
            ..stats(1500, 1100, 16)
        };
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(8), &before_the_move),
            MemoryReading::Settling
        );
        // ...and once the balloon stayed put, the memory given is not mistaken for memory released:
        // over its last two intervals the guest used 200 KiB more, in 6 s.
        assert!((fresh_rate(cycle(&mut m, t0, 10, (1500, 1100, 18))) - 200.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn a_guest_that_stalls_and_catches_up_is_never_read_idle_nor_at_twice_its_rate() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        cycle(&mut m, t0, 0, (100_000, 90_000, 1));
        cycle(&mut m, t0, 2, (100_000, 90_000, 3));
        // 1000 KiB/s, then nothing for an interval, then 2000 KiB/s to catch up, then 1000 again.
        // One interval at a time reads 0 then 2000; over two, 500, 1000, 1500: never idle, and
        // at most 1.5 times its true rate.
        let mut rates = Vec::new();
        for (n, unused) in [88_000, 86_000, 86_000, 82_000, 80_000]
            .into_iter()
            .enumerate()
        {
            let secs = 4 + 2 * n as u64;
            rates.push(fresh_rate(cycle(
                &mut m,
                t0,
                secs,
                (100_000, unused, secs + 1),
            )));
        }
        assert_eq!(rates, [1000.0, 1000.0, 500.0, 1000.0, 1500.0]);
    }

    #[test]
    fn a_memtotal_that_moves_while_the_balloon_stays_is_not_trusted_once() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        let report = |total: u64, unused: u64, update| BalloonStats {
            mem_total_kib: Some(total),
            ..stats(100_000, unused, update)
        };
        let read = |m: &mut MemoryHistory, secs, r: &BalloonStats| {
            m.record(dom(1), t0 + Duration::from_secs(secs), r)
        };
        read(&mut m, 0, &report(99_000, 90_000, 1));
        read(&mut m, 2, &report(99_000, 90_000, 3));
        assert!(matches!(
            read(&mut m, 4, &report(99_000, 89_000, 5)),
            MemoryReading::Fresh(_)
        ));
        // A little drift is the kernel's own.
        assert!(matches!(
            read(&mut m, 6, &report(98_000, 89_000, 7)),
            MemoryReading::Fresh(_)
        ));
        // MemTotal 20 MiB lower with the balloon put: not trusted, then the new baseline.
        assert_eq!(
            read(&mut m, 8, &report(78_000, 69_000, 9)),
            MemoryReading::Inconsistent(Implausible::TotalJumped)
        );
        assert!(matches!(
            read(&mut m, 10, &report(78_000, 69_000, 11)),
            MemoryReading::Fresh(_)
        ));
    }

    #[test]
    fn a_jump_shows_in_the_latest_rate_a_report_before_the_rate() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        cycle(&mut m, t0, 0, (100_000, 90_000, 1));
        cycle(&mut m, t0, 2, (100_000, 90_000, 3));
        cycle(&mut m, t0, 4, (100_000, 88_000, 5));
        // 1000 KiB/s, then 5000 KiB/s over the last interval.
        let reading = cycle(&mut m, t0, 6, (100_000, 78_000, 7));
        let MemoryReading::Fresh(g) = reading else {
            panic!("{reading:?}")
        };
        assert_eq!((g.rate_kib_s, g.latest_rate_kib_s), (3000.0, 5000.0));
        assert_eq!(g.pace_kib_s(), 3000.0, "not twice its rate: the rate");
        let reading = cycle(&mut m, t0, 8, (100_000, 58_000, 9));
        let MemoryReading::Fresh(g) = reading else {
            panic!("{reading:?}")
        };
        assert_eq!((g.rate_kib_s, g.latest_rate_kib_s), (7500.0, 10000.0));
        let steady = GuestMemory {
            latest_rate_kib_s: 20_000.0,
            ..g
        };
        assert_eq!(steady.pace_kib_s(), 20_000.0, "a jump: the latest");
    }

    #[test]
    fn a_report_whose_total_moved_with_the_balloon_is_used_at_once() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        // The guest's kernel keeps 64 KiB: its total is its balloon minus 64.
        let report = |actual: u64, unused: u64, update| BalloonStats {
            mem_total_kib: Some(actual - 64),
            ..stats(actual, unused, update)
        };
        let read = |m: &mut MemoryHistory, secs, r: &BalloonStats| {
            m.record(dom(1), t0 + Duration::from_secs(secs), r)
        };
        read(&mut m, 0, &report(1000, 900, 1));
        read(&mut m, 2, &report(1000, 900, 3));
        assert_eq!(fresh_rate(read(&mut m, 4, &report(1000, 800, 5))), 50.0);
        // Grown by 500 and the report shows a total 500 larger: taken after the move, used at
        // once; the 500 given is not consumption.
        let grown = read(&mut m, 6, &report(1500, 1200, 7));
        assert_eq!(fresh_rate(grown), 50.0);
        // Shrunk by 300, but the total moved by 200 only: taken mid-move, it waits.
        let mid_move = BalloonStats {
            mem_total_kib: Some(1500 - 64 - 200),
            ..stats(1200, 900, 9)
        };
        assert_eq!(read(&mut m, 8, &mid_move), MemoryReading::Settling);
        assert_eq!(fresh_rate(read(&mut m, 10, &report(1200, 700, 11))), 50.0);
        // A guest whose total does not follow its balloon (deflate-on-oom) waits a read after
        // every move, as before, and its rate is right.
        let fixed = |actual: u64, unused: u64, update| BalloonStats {
            mem_total_kib: Some(936),
            ..stats(actual, unused, update)
        };
        read(&mut m, 20, &fixed(1000, 900, 21));
        read(&mut m, 22, &fixed(1000, 900, 23));
        assert_eq!(
            read(&mut m, 24, &fixed(1400, 1300, 25)),
            MemoryReading::Settling
        );
        assert_eq!(fresh_rate(read(&mut m, 26, &fixed(1400, 1300, 27))), 0.0);
        assert_eq!(
            read(&mut m, 28, &fixed(1000, 880, 29)),
            MemoryReading::Settling
        );
    }

    #[test]
    fn a_stale_cycle_does_not_lose_the_rate_history() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        cycle(&mut m, t0, 0, (1000, 900, 1));
        cycle(&mut m, t0, 1, (1000, 900, 2));
        assert_eq!(cycle(&mut m, t0, 2, (1000, 900, 2)), MemoryReading::Stale);
        assert!((fresh_rate(cycle(&mut m, t0, 3, (1000, 700, 3))) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn inconsistent_or_missing_memory_reports_are_not_facts() {
        let mut m = MemoryHistory::new();
        let t0 = Instant::now();
        m.record(dom(1), t0, &stats(1000, 900, 1));
        // More free than its balloon holds, the balloon not having moved: cannot be true.
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(1), &stats(1000, 1200, 2)),
            MemoryReading::Inconsistent(Implausible::FreeOverActual)
        );
        // A balloon, or a MemTotal, over the domain's max memory: cannot be true either.
        let over = |actual: u64, total: u64, update| BalloonStats {
            max_kib: 1000,
            mem_total_kib: Some(total),
            ..stats(actual, 100, update)
        };
        let mut m = MemoryHistory::new();
        m.record(dom(1), t0, &over(1000, 900, 1));
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(1), &over(1000, 1100, 2)),
            MemoryReading::Inconsistent(Implausible::TotalOverMax)
        );
        let mut m = MemoryHistory::new();
        m.record(dom(1), t0, &over(9000, 900, 1));
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(1), &over(9000, 900, 2)),
            MemoryReading::Inconsistent(Implausible::ActualOverMax)
        );
        let no_driver = BalloonStats {
            actual_kib: 1000,
            max_kib: 1000,
            ..BalloonStats::default()
        };
        assert_eq!(m.record(dom(1), t0, &no_driver), MemoryReading::NoStats);
    }

    #[test]
    fn a_guest_that_stops_reporting_starts_over() {
        let (mut m, t0) = (MemoryHistory::new(), Instant::now());
        cycle(&mut m, t0, 0, (1000, 900, 1));
        cycle(&mut m, t0, 1, (1000, 900, 2));
        let silent = BalloonStats {
            actual_kib: 1000,
            max_kib: 1000,
            ..BalloonStats::default()
        };
        assert_eq!(m.record(dom(1), t0, &silent), MemoryReading::NoStats);
        // Back with a new report: first sight again, not a rate against old figures.
        assert_eq!(cycle(&mut m, t0, 9, (1000, 100, 50)), MemoryReading::Stale);
    }

    #[test]
    fn free_memory_is_what_the_guest_can_still_use() {
        let mut m = MemoryHistory::new();
        let t0 = Instant::now();
        // A ballooned-down guest: 57 MiB free by MemFree, nothing available by MemAvailable.
        let report = |update| BalloonStats {
            mem_available_kib: Some(0),
            ..stats(160 * 1024, 57 * 1024, update)
        };
        m.record(dom(1), t0, &report(1));
        m.record(dom(1), t0 + Duration::from_secs(1), &report(2));
        let MemoryReading::Fresh(g) = m.record(dom(1), t0 + Duration::from_secs(2), &report(3))
        else {
            panic!("expected a fresh reading");
        };
        assert_eq!((g.free_kib, g.used_kib()), (0, 160 * 1024));
        // Without MemAvailable, MemFree is all there is.
        let plain = |update| BalloonStats {
            mem_available_kib: None,
            ..stats(1000, 300, update)
        };
        let mut m = MemoryHistory::new();
        m.record(dom(2), t0, &plain(1));
        m.record(dom(2), t0 + Duration::from_secs(1), &plain(2));
        let MemoryReading::Fresh(g) = m.record(dom(2), t0 + Duration::from_secs(2), &plain(3))
        else {
            panic!("expected a fresh reading");
        };
        assert_eq!(g.free_kib, 300);
    }
}
