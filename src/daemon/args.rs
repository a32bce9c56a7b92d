//! The command line both daemons share: its options, the checks of their values, the exit path.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use clap::builder::TypedValueParser as _;

use crate::exclusions::{ExcludePattern, Exclusions};
use crate::metrics::WebConfig;

use super::run::LoopOptions;
use crate::given::Given;

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
    /// Seconds between two samples, from 0.1 to 86400 (a day), e.g. 3 or 0.5
    #[arg(value_name = "PERIOD", value_parser = parse_period)]
    pub period: Duration,

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

    /// Most calls the daemon has running in libvirt at once: each holds one of libvirtd's worker
    /// threads (20 by default, for every client) until it returns, and a call to a hung QEMU may
    /// never return. Calls on domains leave one to the host-wide reads; past it, domains are not
    /// read until some return
    #[arg(long, value_name = "N", default_value_t = crate::libvirt::DEFAULT_CALL_BUDGET, value_parser = clap::value_parser!(u64).range(1..=64).map(|n| n as usize))]
    pub max_libvirt_calls: usize,

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

    /// The loop options these arguments ask for.
    pub fn loop_options(&self) -> LoopOptions {
        LoopOptions {
            period: self.period,
            cycles: self.cycles,
            json: self.json,
            wait: self.wait,
            metrics: self.metrics_address,
            web: self.web_config_file.clone(),
            summary_every: crate::logging::SUMMARY_EVERY,
        }
    }

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

/// Parse the command line and the configuration file it names (`--config`), with each option as
/// the user gave it; on bad input print one line to stderr and exit with status 2.
/// `--help` and `--version` print as usual and exit 0.
pub fn parse_args<T: Parser>() -> (T, Given) {
    print_man_page_if_asked::<T>();
    crate::config::parse_or_exit::<T>()
}

/// Re-read the options of `T` from this process's command line and the configuration file it
/// names (on SIGHUP); an error is one line naming the file and the line.
pub fn reparse_args<T: Parser>() -> Result<(T, Given), String> {
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
    fn non_negative_numbers() {
        assert_eq!(parse_non_negative("10"), Ok(10.0));
        assert_eq!(parse_non_negative("0"), Ok(0.0));
        assert!(parse_non_negative("-1").is_err());
        assert!(parse_non_negative("x").is_err());
    }
}
