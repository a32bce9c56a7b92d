//! The daemons' loop: a turn every period, reconnection with a growing delay, what each turn
//! says (log, JSON, metrics, systemd), and the run's totals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::host::{Host, HostError, HostResult};
use crate::metrics::{Endpoint, Export, Metrics, WebConfig};
use crate::report::Report;
use crate::service::Service;

use super::signals::StopSignal;

/// How a daemon's loop runs.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Time between cycles.
    pub period: Duration,
    /// Stop after this many cycles.
    pub cycles: Option<u64>,
    /// Print each cycle as JSON on stdout.
    pub json: bool,
    /// Keep running when there is no active domain.
    pub wait: bool,
    /// Serve metrics on this address.
    pub metrics: Option<SocketAddr>,
    /// With TLS and authentication as this says.
    pub web: Option<Arc<WebConfig>>,
    /// How often a quiet run sums up in the log (see [`crate::logging::CycleLog`]).
    pub summary_every: Duration,
}

/// Totals over a daemon's run, logged when it ends.
#[derive(Default)]
struct Totals {
    cycles: u64,
    changes: usize,
    skipped: usize,
}

impl Totals {
    fn summary(&self, why: &str) {
        log::info!(
            "{why}: {} cycles, {} changes, {} skipped",
            self.cycles,
            self.changes,
            self.skipped
        );
    }
}

/// What one turn of a daemon's loop produced.
pub enum Turn<R> {
    /// A cycle ran.
    Report(R),
    /// The host has no active domain.
    NoDomain,
    /// The connection to the hypervisor is down (the message says why); try again later.
    Disconnected(String),
    /// The cycle failed in a way that may pass (the message says how); try again later, with
    /// the daemon's state kept.
    Failed(String),
}

/// Longest wait between two reconnection attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(60);

/// The wait before the next reconnection attempt, after waiting `previous` (zero at first): one
/// period, then twice as long each time, at most [`MAX_RECONNECT_DELAY`].
pub fn reconnect_delay(previous: Duration, period: Duration) -> Duration {
    (previous * 2).clamp(period, MAX_RECONNECT_DELAY.max(period))
}

/// What a loop turns: one turn of a daemon against its host, and a reload on SIGHUP. A closure
/// giving turns is one (it never reloads).
pub trait Turns {
    /// What a cycle reports.
    type Report: Report + Export;

    /// Run one turn.
    fn turn(&mut self) -> anyhow::Result<Turn<Self::Report>>;

    /// SIGHUP: re-read the daemon's configuration; the period to run at from now on, or `None`
    /// to keep the running one.
    fn reload(&mut self) -> Option<Duration> {
        None
    }
}

impl<R: Report + Export, F: FnMut() -> anyhow::Result<Turn<R>>> Turns for F {
    type Report = R;

    fn turn(&mut self) -> anyhow::Result<Turn<R>> {
        self()
    }
}

/// The daemons' main loop: a turn at once, then every period, until the cycle limit, a cycle
/// that finds no active domain (with `wait`, it waits for domains instead), or Ctrl-C/SIGTERM;
/// on SIGHUP it reloads before the next turn. Each cycle's report is logged as one info line, and
/// with `json` also printed on stdout as one JSON object with its cycle number and time (Unix
/// seconds). While the connection is down it retries with a doubling delay (at most
/// [`MAX_RECONNECT_DELAY`]), saying so once. The end is logged with the run's totals. Any other
/// error ends the loop and is returned.
pub fn run_cycles<T: Turns>(uri: &str, options: LoopOptions, mut turns: T) -> anyhow::Result<()> {
    let mut stop = StopSignal::install()?;
    let exporter = options
        .metrics
        .map(|address| Exporter::start::<T::Report>(address, options.web.clone(), options.period))
        .transpose()?;
    let cycle_log = crate::logging::CycleLog::for_stderr(options.period, options.summary_every);
    let mut run = Run {
        uri,
        options,
        totals: Totals::default(),
        idle: false,
        delay: Duration::ZERO,
        failing: Duration::ZERO,
        exporter,
        cycle_log,
        service: Service::from_env(),
    };
    loop {
        let wait = run.options.period.max(run.delay).max(run.failing);
        if run.started() && run.sleep(&mut stop, wait) {
            return run.end("stopping on signal");
        }
        if StopSignal::reload_requested()
            && let Some(new) = turns.reload()
            && new != run.options.period
        {
            run.options.period = new;
            run.cycle_log.set_period(new, run.options.summary_every);
            if let Some(e) = &mut run.exporter {
                e.metrics.set_period(new);
            }
        }
        let turn = turns
            .turn()
            .inspect_err(|_| run.totals.summary("stopping on error"))?;
        let go_on = match turn {
            Turn::Disconnected(why) => {
                run.lost(&why);
                continue;
            }
            Turn::Failed(why) => {
                run.failed(&why);
                continue;
            }
            Turn::NoDomain => run.no_domain::<T::Report>(),
            Turn::Report(report) => {
                run.report(&report)?;
                true
            }
        };
        if !go_on || run.options.cycles.is_some_and(|n| run.totals.cycles >= n) {
            return run.end("done");
        }
        if stop.requested() {
            return run.end("stopping on signal");
        }
    }
}

/// Where a daemon's loop stands.
struct Run<'a> {
    uri: &'a str,
    options: LoopOptions,
    totals: Totals,
    /// Said that there is no active domain, and still none since.
    idle: bool,
    /// The wait before the next reconnection attempt; zero while connected.
    delay: Duration,
    /// The wait before the next try after a failed cycle; zero while cycles succeed.
    failing: Duration,
    /// Where metrics go, with `--metrics-address`.
    exporter: Option<Exporter>,
    /// The pacing of the per-cycle log.
    cycle_log: crate::logging::CycleLog,
    /// systemd's notify protocol (nothing outside systemd).
    service: Service,
}

/// The metrics of a run and the endpoint serving them.
struct Exporter {
    metrics: Metrics,
    endpoint: Endpoint,
}

impl Exporter {
    /// Listen on `address` for the metrics of `R`'s daemon, run every `period`, saying where.
    fn start<R: Export>(
        address: SocketAddr,
        web: Option<Arc<WebConfig>>,
        period: Duration,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::start(address, web)?;
        log::info!("serving metrics at {}", endpoint.url());
        let exporter = Self {
            metrics: Metrics::new(R::DAEMON, period),
            endpoint,
        };
        exporter.publish();
        Ok(exporter)
    }

    /// Serve the metrics as they are now.
    fn publish(&self) {
        self.endpoint.publish(self.metrics.encode());
    }
}

impl Run<'_> {
    /// Sleep `wait`, pinging systemd's watchdog as often as it asks; true when a stop was
    /// requested.
    fn sleep(&self, stop: &mut StopSignal, wait: Duration) -> bool {
        let Some(every) = self.service.ping_every() else {
            return stop.sleep(wait);
        };
        let mut left = wait;
        while !left.is_zero() {
            let step = left.min(every);
            if stop.sleep(step) {
                return true;
            }
            self.service.alive();
            left -= step;
        }
        false
    }

    /// Has a turn run yet (so the next one waits)?
    fn started(&self) -> bool {
        self.totals.cycles > 0 || !self.delay.is_zero() || !self.failing.is_zero()
    }

    /// A cycle failed in a way that may pass: say so once, and wait longer before each try. The
    /// daemon's state (rates, ledger, first affinities) is kept.
    fn failed(&mut self, why: &str) {
        if self.failing.is_zero() {
            log::warn!(
                "a cycle failed: {why}; trying again with a growing delay (at most {} s), keeping what the daemon knows",
                MAX_RECONNECT_DELAY.as_secs()
            );
        } else {
            log::debug!("a cycle failed again: {why}");
        }
        self.failing = reconnect_delay(self.failing, self.options.period);
        self.service
            .turn(false, &format!("a cycle failed: {why}; trying again"));
        if let Some(e) = &self.exporter {
            e.metrics.cycle_failed();
            e.publish();
        }
    }

    /// The connection is down: say so once, and wait longer before each attempt.
    fn lost(&mut self, why: &str) {
        if self.delay.is_zero() {
            log::warn!("lost the connection to {} ({why}); reconnecting", self.uri);
        }
        self.delay = reconnect_delay(self.delay, self.options.period);
        self.service.turn(
            false,
            &format!("lost the connection to {} ({why}); reconnecting", self.uri),
        );
        if let Some(e) = &mut self.exporter {
            e.metrics.disconnected();
            e.publish();
        }
    }

    /// A cycle ran: count it, saying so if it ran on a new connection.
    fn cycled(&mut self) {
        if !self.delay.is_zero() {
            log::info!("reconnected to {}", self.uri);
            self.delay = Duration::ZERO;
        }
        if !self.failing.is_zero() {
            log::info!("cycles succeed again");
            self.failing = Duration::ZERO;
        }
        self.totals.cycles += 1;
    }

    /// A cycle found no active domain: go on only with `--wait` (saying so once).
    fn no_domain<R: Export>(&mut self) -> bool {
        self.cycled();
        self.service.turn(
            true,
            &format!("cycle {}: no active domain", self.totals.cycles),
        );
        if let Some(e) = &mut self.exporter {
            e.metrics.no_domain::<R>();
            e.publish();
        }
        if !self.options.wait {
            log::info!("no active domain on {}: nothing to do, exiting", self.uri);
            return false;
        }
        if !std::mem::replace(&mut self.idle, true) {
            log::info!("no active domain on {}: waiting for domains", self.uri);
        }
        true
    }

    /// A cycle ran: count what it did, log it, and print it with `--json`.
    fn report<R: Report + Export>(&mut self, report: &R) -> anyhow::Result<()> {
        self.cycled();
        self.idle = false;
        self.totals.changes += report.changes();
        self.totals.skipped += report.skipped();
        for (level, line) in self.cycle_log.lines(self.totals.cycles, report) {
            log::log!(level, "{line}");
        }
        self.service.turn(true, &self.status(report));
        if self.options.json {
            print_json(report, self.totals.cycles)?;
        }
        if let Some(e) = &mut self.exporter {
            e.metrics.export(report);
            e.publish();
        }
        Ok(())
    }

    /// The one-line status systemd shows after a cycle that produced `report`.
    fn status<R: Report + Export>(&self, report: &R) -> String {
        let t = &self.totals;
        format!(
            "cycle {}: {} domains; {} changes, {} skipped since start; {}",
            t.cycles,
            report.run_figures().domains,
            t.changes,
            t.skipped,
            self.cycle_log.trouble().unwrap_or("nothing wrong")
        )
    }

    /// End the loop, logging the run's totals.
    fn end(&self, why: &str) -> anyhow::Result<()> {
        self.service.stopping(why);
        self.totals.summary(why);
        Ok(())
    }
}

/// One turn of a daemon against a host: run `cycle` and count its hypervisor calls (logged at
/// debug level, kept in the report); when it fails because the connection is down, try to
/// reconnect and report the turn as [`Turn::Disconnected`]; when it fails in a way that may pass
/// (libvirt restarting, a read of the host failing), report [`Turn::Failed`]. The daemon's own
/// state lives outside the host, so it is kept either way. Only a refused call (the daemon's user
/// lost its rights) or a call the driver lacks ends the daemon.
pub fn host_turn<H: Host + ?Sized, R: Report>(
    host: &mut H,
    cycle: impl FnOnce(&mut H) -> HostResult<Option<R>>,
) -> anyhow::Result<Turn<R>> {
    let before = host.api_calls();
    match cycle(host) {
        Ok(Some(mut report)) => {
            let calls = host.api_calls() - before;
            log::debug!("{calls} libvirt calls this cycle");
            report.set_api_calls(calls);
            Ok(Turn::Report(report))
        }
        Ok(None) => Ok(Turn::NoDomain),
        Err(HostError::Disconnected(why)) => {
            // Whether this attempt works or not, the next turn tells: it runs a cycle on the new
            // connection, or finds it down again and retries after a longer delay.
            if let Err(e) = host.reconnect() {
                log::debug!("reconnecting failed: {e}");
            }
            Ok(Turn::Disconnected(why))
        }
        Err(HostError::Other(e)) => Ok(Turn::Failed(format!("{e:#}"))),
        Err(e @ (HostError::Vanished(_) | HostError::Stuck(_))) => Ok(Turn::Failed(e.to_string())),
        Err(e @ (HostError::Denied(_) | HostError::Unsupported(_))) => Err(e.into_anyhow()),
    }
}

fn print_json<R: Report>(report: &R, cycle: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut value = serde_json::to_value(report).context("encoding the JSON report")?;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if let Some(object) = value.as_object_mut() {
        object.insert("cycle".into(), cycle.into());
        object.insert("time".into(), ((time * 1000.0).round() / 1000.0).into());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
        .and_then(|()| out.flush())
        .context("writing the JSON report to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_waits_double_up_to_a_minute() {
        let period = Duration::from_secs(3);
        let mut delay = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..7 {
            delay = reconnect_delay(delay, period);
            waits.push(delay.as_secs());
        }
        assert_eq!(waits, [3, 6, 12, 24, 48, 60, 60]);
        // A period longer than the cap is waited out, not cut short.
        let hour = Duration::from_secs(3600);
        assert_eq!(reconnect_delay(Duration::ZERO, hour), hour);
    }
}
