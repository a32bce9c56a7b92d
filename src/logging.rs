//! Where the daemons' log goes and how it looks: on a terminal or a file, env_logger's lines with
//! their timestamp; under systemd's journal (`JOURNAL_STREAM` names stderr), one message per line
//! with its syslog priority as a `<N>` prefix and no timestamp of its own, so `journalctl -p
//! warning` filters it and the journal's own timestamp is the only one.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

/// Set up logging to stderr at `level`, `RUST_LOG` over the default (info) unless `level` is
/// given (by `-v`/`-q`).
pub fn init(level: Option<log::LevelFilter>) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    builder.parse_env(env_logger::Env::default());
    if let Some(level) = level {
        builder.filter_level(level);
    }
    if stderr_is_the_journal() {
        builder
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
        builder.format_target(false);
    }
    builder.init();
}

/// The syslog priority of a log level: error 3, warning 4, info 6, debug and trace 7.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Is stderr the journal's stream? systemd sets `JOURNAL_STREAM` to its `DEVICE:INODE`; a child
/// that inherited the variable but writes elsewhere (a pipe, a file) must not be taken for it.
pub fn stderr_is_the_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    stream == format!("{}:{}", meta.dev(), meta.ino())
}

/// How often a quiet daemon says how it is doing.
pub const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Paces the per-cycle log so a quiet host costs the journal a few lines an hour, not a line a
/// cycle: under the journal a cycle's line is INFO when it changed or skipped something (and for
/// the first two cycles, so a start is visible), DEBUG otherwise (on a terminal or in a file,
/// where someone watches, every cycle's line is INFO); a trouble (a guest starving, a host that
/// cannot be balanced, a domain not answering) is a WARN line when it begins or changes and an
/// INFO line when it ends; and every [`SUMMARY_EVERY`] of cycles an INFO line sums them up.
#[derive(Debug)]
pub struct CycleLog {
    /// Cycles between two summaries.
    summary_cycles: u64,
    /// Minutes between two summaries, for the summary's words.
    summary_minutes: u64,
    since: Counts,
    trouble: Option<String>,
    /// Every cycle's line at INFO (not under the journal).
    every_cycle: bool,
}

/// What the cycles since the last summary did.
#[derive(Debug, Default)]
struct Counts {
    cycles: u64,
    changes: usize,
    skipped: usize,
}

impl CycleLog {
    /// The pacing of a daemon run every `period`, summing up every `summary_every`, for the
    /// journal when stderr is the journal's stream.
    pub fn for_stderr(period: std::time::Duration, summary_every: std::time::Duration) -> Self {
        Self {
            every_cycle: !stderr_is_the_journal(),
            ..Self::new(period, summary_every)
        }
    }

    /// The pacing of a daemon run every `period`, summing up every `summary_every`, for the
    /// journal.
    pub fn new(period: std::time::Duration, summary_every: std::time::Duration) -> Self {
        let mut log = Self {
            summary_cycles: 1,
            summary_minutes: 1,
            since: Counts::default(),
            trouble: None,
            every_cycle: false,
        };
        log.set_period(period, summary_every);
        log
    }

    /// The daemon now runs every `period` (a configuration reloaded): sum up every
    /// `summary_every` of its cycles, keeping the counts and the trouble said so far.
    pub fn set_period(&mut self, period: std::time::Duration, summary_every: std::time::Duration) {
        let period = period.as_secs_f64().max(1e-3);
        self.summary_cycles = ((summary_every.as_secs_f64() / period).round() as u64).max(1);
        self.summary_minutes = (summary_every.as_secs() / 60).max(1);
    }

    /// The trouble of the last cycle, as [`crate::report::Report::trouble`] said it.
    pub fn trouble(&self) -> Option<&str> {
        self.trouble.as_deref()
    }

    /// The lines to log for cycle number `cycle`, whose report is `report`.
    pub fn lines<R: crate::report::Report>(
        &mut self,
        cycle: u64,
        report: &R,
    ) -> Vec<(log::Level, String)> {
        let mut lines = Vec::new();
        let busy = report.changes() > 0 || report.skipped() > 0;
        let level = if busy || cycle <= 2 || self.every_cycle {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        lines.push((level, format!("cycle {cycle}: {report}")));
        let trouble = report.trouble();
        if trouble != self.trouble {
            match (&trouble, &self.trouble) {
                (Some(now), _) => lines.push((log::Level::Warn, format!("cycle {cycle}: {now}"))),
                (None, Some(was)) => {
                    lines.push((log::Level::Info, format!("cycle {cycle}: no longer {was}")))
                }
                (None, None) => {}
            }
            self.trouble = trouble;
        }
        self.since.cycles += 1;
        self.since.changes += report.changes();
        self.since.skipped += report.skipped();
        if self.since.cycles >= self.summary_cycles {
            let Counts {
                cycles,
                changes,
                skipped,
            } = std::mem::take(&mut self.since);
            let still = self
                .trouble
                .as_ref()
                .map_or(String::new(), |t| format!("; still {t}"));
            lines.push((
                log::Level::Info,
                format!(
                    "last {} min: {cycles} cycles, {changes} changes, {skipped} skipped{still}; now {report}",
                    self.summary_minutes
                ),
            ));
        }
        lines
    }
}

#[cfg(test)]
mod pacing {
    use super::*;

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Debug), 7);
    }

    use crate::report::{CpuReport, Decision, GuestLine, GuestState, MemReport};
    use std::time::Duration;

    /// Lines at INFO or above over `cycles` cycles of `report` at PERIOD 3.
    fn loud_lines<R: crate::report::Report>(cycles: u64, report: impl Fn(u64) -> R) -> usize {
        let mut log = CycleLog::new(Duration::from_secs(3), SUMMARY_EVERY);
        (1..=cycles)
            .flat_map(|n| log.lines(n, &report(n)))
            .filter(|(level, _)| *level <= log::Level::Info)
            .count()
    }

    /// A day at PERIOD 3.
    const DAY: u64 = 86_400 / 3;

    #[test]
    fn a_quiet_host_logs_under_two_hundred_lines_a_day() {
        let quiet = |_| CpuReport {
            decision: Decision::Planned,
            balanced: true,
            domains: 4,
            ..CpuReport::default()
        };
        let lines = loud_lines(DAY, quiet);
        // Two first cycles, then a summary every 10 minutes: 144.
        assert_eq!(lines, 2 + 144);
    }

    #[test]
    fn a_lasting_trouble_is_said_once_and_in_the_summaries() {
        let starving = |_| MemReport {
            guests: vec![GuestLine {
                domain: "web".into(),
                uuid: crate::host::DomainId([1; 16]),
                actual_mib: 512.0,
                free_mib: Some(10.0),
                rate_mib_s: Some(5.0),
                state: GuestState::Starving,
            }],
            ..MemReport::default()
        };
        let mut log = CycleLog::new(Duration::from_secs(3), SUMMARY_EVERY);
        let warnings: Vec<String> = (1..=DAY)
            .flat_map(|n| log.lines(n, &starving(n)))
            .filter(|(level, _)| *level == log::Level::Warn)
            .map(|(_, line)| line)
            .collect();
        assert_eq!(warnings, ["cycle 1: starving: web"]);
        assert!(loud_lines(DAY, starving) < 1000);
        // It ends: said once more.
        let lines = log.lines(DAY + 1, &MemReport::default());
        assert!(
            lines
                .iter()
                .any(|(l, t)| *l == log::Level::Info && t.ends_with("no longer starving: web")),
            "{lines:?}"
        );
    }
}
