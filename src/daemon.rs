//! What both daemons share: command-line conventions, logging, the stop signal and the exit path.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::exclusions::{ExcludePattern, Exclusions};
use crate::host::{Host, HostError, HostResult};
use crate::metrics::{Endpoint, Export, Metrics, WebConfig};
use crate::report::Report;
use crate::service::Service;

/// The URI used when neither `--connect` nor `LIBVIRT_DEFAULT_URI` names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// Longest PERIOD accepted: a day. Anything longer is almost certainly a unit mistake.
pub const MAX_PERIOD_SECS: f64 = 86_400.0;

/// Shortest PERIOD accepted: a tenth of a second. Shorter would hammer the libvirt daemon (a
/// PERIOD of 1e-300 ran 20,000 cycles in 0.4 s) and measure rates over intervals that the time
/// to read the host already spans.
pub const MIN_PERIOD_SECS: f64 = 0.1;

/// Options every daemon takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// libvirt URI to manage [default: $LIBVIRT_DEFAULT_URI, else qemu:///system]
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    pub connect: Option<String>,

    /// Log what would change, but change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Stop after N cycles (the first cycle only samples) [default: run until stopped]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub cycles: Option<u64>,

    /// More log output (-v debug, -vv trace); RUST_LOG also works
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output (-q warnings only, -qq errors only)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub quiet: u8,

    /// Also print one JSON object per cycle on stdout, for log shippers (logs stay on stderr)
    #[arg(long)]
    pub json: bool,

    /// Keep running when a cycle finds no active domain, waiting for domains to start, instead of
    /// exiting (for running under systemd)
    #[arg(long)]
    pub wait: bool,

    /// Leave a domain alone: read, never changed (repeatable). PATTERN is a domain UUID or a
    /// glob over domain names (`rt-*`). A domain also opts out in its own metadata (see
    /// docs/vcpu_scheduler.md)
    #[arg(long = "exclude", value_name = "PATTERN", value_parser = ExcludePattern::parse)]
    pub exclude: Vec<ExcludePattern>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9841 (a host name,
    /// [IPv6]:PORT, or :PORT for every interface) [default: off]
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::metrics::parse_listen_address)]
    pub metrics_address: Option<SocketAddr>,

    /// Read options from this TOML file first: `period` and the long option names as keys (e.g.
    /// `threshold = 15`, `exclude = ["rt-*"]`); the command line wins over it. SIGHUP (systemctl
    /// reload) re-reads it and applies it from the next cycle, keeping what the daemon knows
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Serve the metrics over TLS and/or with basic authentication, as this file says: the web
    /// configuration format of node_exporter (tls_server_config, basic_auth_users with bcrypt
    /// hashes, http_server_config.headers); see docs/metrics.md
    #[arg(long, value_name = "FILE", requires = "metrics_address", value_parser = crate::metrics::parse_web_config_file)]
    pub web_config_file: Option<Arc<WebConfig>>,
}

/// How long a libvirt call that may wait on one domain's QEMU is waited for, with `period`: half
/// the period, at least 1 s (a busy host's QEMU may take a few hundred milliseconds) and at most
/// 10 s. Past it the domain is skipped until it answers.
pub fn call_deadline(period: Duration) -> Duration {
    (period / 2).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// A mistake in the command line found only once connected (say, a pCPU the host does not have):
/// reported like a parse error, with exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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

impl CommonArgs {
    /// The domains to leave alone (`--exclude`, and each domain's own metadata).
    pub fn exclusions(&self) -> Exclusions {
        Exclusions::new(self.exclude.clone())
    }

    /// What the start-up line adds for `--dry-run` (nothing without it).
    pub fn dry_run_note(&self) -> &'static str {
        if self.dry_run {
            ", dry run (no change is made)"
        } else {
            ""
        }
    }

    /// Run a daemon with these options: `cycle` on `host` every `period` (see [`run_cycles`]),
    /// reconnecting the host when its connection drops (see [`host_turn`]). On SIGHUP the host
    /// re-reads every domain's configuration, and `reload` re-reads the daemon's (its new
    /// period, or `None` to keep the running one).
    pub fn serve<H: Host, R: Report + Export>(
        &self,
        uri: &str,
        period: Duration,
        host: &mut H,
        mut cycle: impl FnMut(&mut H) -> HostResult<Option<R>>,
        mut reload: impl FnMut() -> Option<Duration>,
    ) -> anyhow::Result<()> {
        let host = std::cell::RefCell::new(host);
        run_cycles_reloading(
            uri,
            self.loop_options(period),
            || host_turn(&mut **host.borrow_mut(), &mut cycle),
            || {
                log::info!(
                    "SIGHUP: re-reading every domain's configured affinity, metadata and pins"
                );
                host.borrow_mut().reload();
                reload()
            },
        )
    }

    /// The loop options these arguments ask for, with `period`.
    pub fn loop_options(&self, period: Duration) -> LoopOptions {
        LoopOptions {
            period,
            cycles: self.cycles,
            json: self.json,
            wait: self.wait,
            metrics: self.metrics_address,
            web: self.web_config_file.clone(),
            summary_every: crate::logging::SUMMARY_EVERY,
        }
    }
}

/// SIGHUP: the options of `T` re-read from the command line and the `--config` file `config`
/// names, with that file's path; `None`, said in the log, when there is no file or it has a
/// mistake (the running configuration is then kept).
pub fn reload_args<T: Parser>(config: Option<&std::path::Path>) -> Option<(T, std::path::PathBuf)> {
    let Some(path) = config else {
        log::info!("SIGHUP: no --config file to re-read");
        return None;
    };
    match reparse_args::<T>() {
        Ok(new) => Some((new, path.to_path_buf())),
        Err(e) => {
            log::error!("reload: {e}; the running configuration is kept");
            None
        }
    }
}

/// Say that the configuration file at `path` was reloaded, and what `changed`.
pub fn say_reloaded(path: &std::path::Path, changed: &[String]) {
    log::info!(
        "reloaded {}: {}",
        path.display(),
        if changed.is_empty() {
            "nothing changed".to_string()
        } else {
            changed.join(", ")
        }
    );
}

/// On a reload, warn about each option that `new` changes and that only a restart applies: the
/// connection, the metrics endpoint, the log level, the run's shape.
pub fn warn_fixed_on_reload(old: &CommonArgs, new: &CommonArgs) {
    let fixed = [
        (
            "connect",
            format!("{:?}", old.connect),
            format!("{:?}", new.connect),
        ),
        (
            "metrics-address",
            format!("{:?}", old.metrics_address),
            format!("{:?}", new.metrics_address),
        ),
        (
            "web-config-file",
            format!("{:?}", old.web_config_file.is_some()),
            format!("{:?}", new.web_config_file.is_some()),
        ),
        (
            "cycles",
            format!("{:?}", old.cycles),
            format!("{:?}", new.cycles),
        ),
        ("json", old.json.to_string(), new.json.to_string()),
        ("wait", old.wait.to_string(), new.wait.to_string()),
        ("verbose", old.verbose.to_string(), new.verbose.to_string()),
        ("quiet", old.quiet.to_string(), new.quiet.to_string()),
    ];
    for (name, was, now) in fixed {
        if was != now {
            log::warn!("reload: {name} changes at the next restart ({was} -> {now})");
        }
    }
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

impl CommonArgs {
    /// The URI to connect to: `--connect`, else `LIBVIRT_DEFAULT_URI`, else [`DEFAULT_URI`].
    pub fn uri(&self) -> String {
        self.connect
            .clone()
            .or_else(|| {
                std::env::var("LIBVIRT_DEFAULT_URI")
                    .ok()
                    .filter(|u| !u.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_URI.to_string())
    }

    /// Set up logging to stderr (see [`crate::logging`]): info by default, `RUST_LOG` if set,
    /// `-v`/`-q` over both.
    pub fn init_logging(&self) {
        let level = match (self.verbose, self.quiet) {
            (0, 0) => None,
            (1, _) => Some(log::LevelFilter::Debug),
            (v, _) if v >= 2 => Some(log::LevelFilter::Trace),
            (_, 1) => Some(log::LevelFilter::Warn),
            _ => Some(log::LevelFilter::Error),
        };
        crate::logging::init(level);
    }
}

/// Parse PERIOD: a finite number of seconds, from [`MIN_PERIOD_SECS`] to a day.
pub fn parse_period(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!(
            "PERIOD must be a positive number of seconds, not {text}"
        ));
    }
    if secs < MIN_PERIOD_SECS {
        return Err(format!(
            "PERIOD {text} is shorter than {MIN_PERIOD_SECS} s, which would hammer the libvirt daemon"
        ));
    }
    if secs > MAX_PERIOD_SECS {
        return Err(format!(
            "PERIOD {text} is longer than a day ({MAX_PERIOD_SECS} s)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a non-negative, finite number (thresholds, percentages).
pub fn parse_non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a non-negative number")),
    }
}

/// Parse a whole number of at least 1 (counts such as a change budget).
pub fn parse_positive_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{text}' is not a whole number of at least 1")),
    }
}

/// Parse the command line and the configuration file it names (`--config`); on bad input print
/// one line to stderr and exit with status 2.
/// `--help` and `--version` print as usual and exit 0.
pub fn parse_args<T: Parser>() -> T {
    print_man_page_if_asked::<T>();
    crate::config::parse_or_exit::<T>()
}

/// Re-read the options of `T` from this process's command line and the configuration file it
/// names (on SIGHUP); an error is one line naming the file and the line.
pub fn reparse_args<T: Parser>() -> Result<T, String> {
    crate::config::parse::<T>(&crate::config::process_argv()).map_err(|p| p.to_string())
}

/// With `--man` as the only argument, print the man page generated from the command-line
/// definition (see [`crate::manual`]) and exit: `make install` installs it, so it never drifts
/// from `--help`.
fn print_man_page_if_asked<T: clap::CommandFactory>() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("--man") || args.next().is_some() {
        return;
    }
    let code = match crate::manual::render(T::command()) {
        Ok(page) => {
            print!("{page}");
            0
        }
        Err(e) => {
            eprintln!("error: writing the man page: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Run a daemon's body: an error becomes one line on stderr and exit status 1 (2 for a
/// [`UsageError`]).
pub fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::logger().flush();
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("error: {e:#} (see --help)");
                return ExitCode::from(2);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A list of pCPUs given on the command line, sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<u32>);

/// Parse a list of pCPUs in cpuset syntax (`2-15,18`, `^` to leave one out).
pub fn parse_cpus(text: &str) -> Result<CpuList, String> {
    crate::cpuset::parse(text)
        .map(CpuList)
        .ok_or_else(|| format!("'{text}' is not a list of pCPUs such as 2-15,18"))
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

/// The daemons' main loop: run `cycle` at once, then every period, until the cycle limit, a cycle
/// that finds no active domain (with `wait`, it waits for domains instead), or Ctrl-C/SIGTERM.
/// Each cycle's report is logged as one info line, and with `json` also printed on stdout as one
/// JSON object with its cycle number and time (Unix seconds). While the connection is down it
/// retries with a doubling delay (at most [`MAX_RECONNECT_DELAY`]), saying so once. The end is
/// logged with the run's totals. Any other error ends the loop and is returned.
pub fn run_cycles<R: Report + Export>(
    uri: &str,
    options: LoopOptions,
    cycle: impl FnMut() -> anyhow::Result<Turn<R>>,
) -> anyhow::Result<()> {
    run_cycles_reloading(uri, options, cycle, || None)
}

/// [`run_cycles`], calling `reload` on SIGHUP before the next turn: it re-reads the daemon's
/// configuration and gives its new period (`None`: keep the running one).
pub fn run_cycles_reloading<R: Report + Export>(
    uri: &str,
    options: LoopOptions,
    mut cycle: impl FnMut() -> anyhow::Result<Turn<R>>,
    mut reload: impl FnMut() -> Option<Duration>,
) -> anyhow::Result<()> {
    let mut stop = StopSignal::install()?;
    let exporter = options
        .metrics
        .map(|address| Exporter::start::<R>(address, options.web.clone(), options.period))
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
            && let Some(new) = reload()
            && new != run.options.period
        {
            run.options.period = new;
            run.cycle_log.set_period(new, run.options.summary_every);
            if let Some(e) = &mut run.exporter {
                e.metrics.set_period(new);
            }
        }
        let turn = cycle().inspect_err(|_| run.totals.summary("stopping on error"))?;
        let go_on = match turn {
            Turn::Disconnected(why) => {
                run.lost(&why);
                continue;
            }
            Turn::Failed(why) => {
                run.failed(&why);
                continue;
            }
            Turn::NoDomain => run.no_domain::<R>(),
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

/// Set by the signal handler; sleepers wait on it.
struct StopFlag {
    stopped: Mutex<bool>,
    wake: Condvar,
}

static STOP: StopFlag = StopFlag {
    stopped: Mutex::new(false),
    wake: Condvar::new(),
};

/// Ctrl-C and SIGTERM, as something a loop can sleep on, and SIGHUP as a request to re-read
/// each domain's configuration. The handler is installed once per process; every `StopSignal`
/// sees the same signals.
pub struct StopSignal(());

/// Set by SIGHUP, taken by [`StopSignal::reload_requested`].
static RELOAD: AtomicBool = AtomicBool::new(false);

impl StopSignal {
    /// Handle SIGINT, SIGTERM and SIGHUP (the first call installs the handler: a thread that
    /// waits for them). signal-hook rather than ctrlc, because SIGHUP must not stop the daemon.
    pub fn install() -> anyhow::Result<Self> {
        static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
        INSTALLED
            .get_or_init(|| {
                let mut signals =
                    Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| e.to_string())?;
                std::thread::Builder::new()
                    .name("signals".into())
                    .spawn(move || {
                        for signal in signals.forever() {
                            if signal == SIGHUP {
                                RELOAD.store(true, Ordering::SeqCst);
                                continue;
                            }
                            *STOP.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
                            STOP.wake.notify_all();
                        }
                    })
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(anyhow::Error::msg)
            .context("installing the Ctrl-C/SIGTERM/SIGHUP handler")?;
        Ok(Self(()))
    }

    /// Was SIGHUP received since the last call?
    pub fn reload_requested() -> bool {
        RELOAD.swap(false, Ordering::SeqCst)
    }

    /// Sleep for `period`, waking at once on a signal. Returns true when a stop was requested.
    pub fn sleep(&mut self, period: Duration) -> bool {
        let stopped = STOP.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = STOP
            .wake
            .wait_timeout_while(stopped, period, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    /// True when a stop was requested, without sleeping.
    pub fn requested(&mut self) -> bool {
        Self::stop_requested()
    }

    /// Was a stop requested (Ctrl-C, SIGTERM)? For waits outside the loop, such as a libvirt call
    /// bounded in time, so that the daemon stops within a second whatever libvirt does.
    pub fn stop_requested() -> bool {
        *STOP.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_accepts_positive_seconds() {
        assert_eq!(parse_period("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_period("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_period("0.1"), Ok(Duration::from_millis(100)));
    }

    #[test]
    fn period_refuses_zero_negative_garbage_and_absurd_values() {
        for bad in [
            "0", "-1", "abc", "", "nan", "inf", "1e9", "3s", "1e-300", "0.05",
        ] {
            assert!(parse_period(bad).is_err(), "{bad} accepted");
        }
    }

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

    #[test]
    fn non_negative_numbers() {
        assert_eq!(parse_non_negative("10"), Ok(10.0));
        assert_eq!(parse_non_negative("0"), Ok(0.0));
        assert!(parse_non_negative("-1").is_err());
        assert!(parse_non_negative("x").is_err());
    }
}
