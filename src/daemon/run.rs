//! The daemons' loop: a turn every period (reconnecting or retrying included), what each turn
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
/// seconds). While the connection is down, or cycles fail in a way that may pass, it tries again
/// every period, saying so once: it acts in the first cycle after libvirt is back (a period is
/// a few calls, cheap for libvirt; a longer wait would leave the guests unwatched longer). The
/// end is logged with the run's totals. Any other error ends the loop and is returned.
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
        disconnected: false,
        failing: false,
        exporter,
        cycle_log,
        service: Service::from_env(),
    };
    loop {
        if run.started() && run.sleep(&mut stop, run.options.period) {
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
            // Cut short by the stop (its calls stopped waiting): not a failure to report.
            Turn::Disconnected(_) | Turn::Failed(_) if stop.requested() => {
                return run.end("stopping on signal");
            }
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
    /// The connection is down (said), and no cycle has run since.
    disconnected: bool,
    /// A cycle failed (said), and none has succeeded since.
    failing: bool,
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
        self.totals.cycles > 0 || self.disconnected || self.failing
    }

    /// A cycle failed in a way that may pass: say so once; the next period tries again. The
    /// daemon's state (rates, ledger, first affinities) is kept.
    fn failed(&mut self, why: &str) {
        if !std::mem::replace(&mut self.failing, true) {
            log::warn!(
                "a cycle failed: {why}; trying again every period, keeping what the daemon knows"
            );
        } else {
            log::debug!("a cycle failed again: {why}");
        }
        self.service
            .turn(false, &format!("a cycle failed: {why}; trying again"));
        if let Some(e) = &self.exporter {
            e.metrics.cycle_failed();
            e.publish();
        }
    }

    /// The connection is down: say so once; the next period tries again.
    fn lost(&mut self, why: &str) {
        if !std::mem::replace(&mut self.disconnected, true) {
            log::warn!(
                "lost the connection to {} ({why}); reconnecting every period",
                self.uri
            );
        } else {
            log::debug!("still no connection to {}: {why}", self.uri);
        }
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
        if std::mem::take(&mut self.disconnected) {
            log::info!("reconnected to {}", self.uri);
        }
        if std::mem::take(&mut self.failing) {
            log::info!("cycles succeed again");
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
    host.begin_cycle();
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
        Err(HostError::NotAnswering(why)) => Ok(Turn::Failed(why)),
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
