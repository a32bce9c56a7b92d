//! Prometheus metrics of both daemons (`--metrics-address`), and the endpoint that serves them.
//!
//! Each cycle's report is exported into a registry ([`Export`]) and the
//! registry encoded once; scrapes read the last encoding, so a scrape never waits for a cycle and
//! a cycle never waits for a scrape. Names follow Prometheus conventions: a `vmbalance_` prefix,
//! base units (`_seconds`, `_bytes`, `_ratio`), counters ending in `_total`. Series of domains
//! that are gone are dropped: a per-domain or per-vCPU series not set in a cycle is removed at its
//! end, so label sets stay bounded by what runs. The encoding is the `prometheus` crate's (the
//! classic text format, which every Prometheus version and `promtool` read). The process's own
//! figures (`process_*`) are read at the same time, once a cycle. Every family is listed in
//! docs/metrics.md, which a test keeps in step with the code.

mod cpu;
mod endpoint;
mod families;
mod mem;
mod web_config;

pub use endpoint::{Endpoint, MAX_CONNECTIONS, parse_listen_address};
pub use web_config::{WebConfig, parse_web_config_file};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, Registry, TextEncoder};

use crate::report::{CpuReport, Daemon, MemReport};
use cpu::CpuFamilies;
use families::{counter, gauge, register};
use mem::MemFamilies;

/// A cycle report the metrics know how to export.
pub trait Export: Default {
    /// The daemon whose report it is.
    const DAEMON: Daemon;

    /// The number of libvirt calls, changes skipped, decision time (where a decision was made)
    /// and domains of this cycle, for the families both daemons share.
    fn run_figures(&self) -> RunFigures;

    /// Export this report into `metrics`.
    fn export_into(&self, metrics: &mut Metrics);
}

/// The figures of one cycle every daemon exports.
pub struct RunFigures {
    /// libvirt calls made.
    pub libvirt_calls: u64,
    /// Changes skipped.
    pub skipped: usize,
    /// Time deciding took, where a decision was made.
    pub decision_secs: Option<f64>,
    /// Active domains seen (those not answering included).
    pub domains: usize,
    /// Domains that did not answer in time.
    pub not_answering: usize,
}

impl Export for CpuReport {
    const DAEMON: Daemon = Daemon::VcpuScheduler;

    fn run_figures(&self) -> RunFigures {
        RunFigures {
            libvirt_calls: self.libvirt_calls,
            skipped: self.skipped,
            decision_secs: self.decision_secs,
            domains: self.domains + self.not_answering.len(),
            not_answering: self.not_answering.len(),
        }
    }

    fn export_into(&self, metrics: &mut Metrics) {
        if let Some(cpu) = &mut metrics.cpu {
            cpu.export(self);
        }
    }
}

impl Export for MemReport {
    const DAEMON: Daemon = Daemon::MemoryCoordinator;

    fn run_figures(&self) -> RunFigures {
        RunFigures {
            libvirt_calls: self.libvirt_calls,
            skipped: self.skipped,
            decision_secs: self.decision_secs,
            domains: self.guests.len() + self.without_balloon + self.not_answering.len(),
            not_answering: self.not_answering.len(),
        }
    }

    fn export_into(&self, metrics: &mut Metrics) {
        if let Some(mem) = &mut metrics.mem {
            mem.export(self);
        }
    }
}

/// One daemon's metrics: the families every daemon exports, its own, and the process's.
pub struct Metrics {
    registry: Registry,
    run: RunFamilies,
    cpu: Option<CpuFamilies>,
    mem: Option<MemFamilies>,
    /// Whether the connection to libvirt was up at the last turn.
    connected: bool,
}

/// The families every daemon exports.
struct RunFamilies {
    cycles: IntCounter,
    cycles_without_decision: IntCounter,
    last_cycle: Gauge,
    decision_seconds: Histogram,
    libvirt_calls: IntCounter,
    connected: Gauge,
    disconnections: IntCounter,
    reconnects: IntCounter,
    cycle_failures: IntCounter,
    changes_skipped: IntCounter,
    domains: Gauge,
    not_answering: Gauge,
    period: Gauge,
}

/// `vmbalance_build_info` of `daemon`: 1, labelled with the daemon and its version.
fn build_info(r: &Registry, daemon: Daemon) {
    let info = register(
        r,
        prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "vmbalance_build_info",
                "1, labelled with the daemon and its version.",
            ),
            &["daemon", "version"],
        )
        .expect("a valid metric name"),
    );
    info.with_label_values(&[daemon.as_str(), env!("CARGO_PKG_VERSION")])
        .set(1.0);
}

/// `vmbalance_decision_duration_seconds`: time one decision took, from 1 µs up.
fn decision_histogram(r: &Registry) -> Histogram {
    register(
        r,
        Histogram::with_opts(
            HistogramOpts::new(
                "vmbalance_decision_duration_seconds",
                "Time one decision (planning, not reading or applying) took.",
            )
            .buckets(prometheus::exponential_buckets(1e-6, 4.0, 12).expect("valid buckets")),
        )
        .expect("a valid metric name"),
    )
}

impl RunFamilies {
    fn new(r: &Registry, daemon: Daemon, period: Duration) -> Self {
        build_info(r, daemon);
        let period_gauge = gauge(
            r,
            "vmbalance_period_seconds",
            "The daemon's PERIOD: time between two cycles.",
        );
        period_gauge.set(period.as_secs_f64());
        let connected = gauge(
            r,
            "vmbalance_libvirt_connected",
            "1 while the connection to libvirt is up, 0 while the daemon is reconnecting.",
        );
        connected.set(1.0);
        Self {
            cycles: counter(r, "vmbalance_cycles_total", "Cycles run."),
            cycles_without_decision: counter(
                r,
                "vmbalance_cycles_without_decision_total",
                "Cycles that made no decision: first sample, settling after changes, no domain.",
            ),
            last_cycle: gauge(
                r,
                "vmbalance_last_cycle_timestamp_seconds",
                "When the last cycle ended (Unix time): a daemon whose value stops moving is stalled or disconnected.",
            ),
            decision_seconds: decision_histogram(r),
            libvirt_calls: counter(
                r,
                "vmbalance_libvirt_calls_total",
                "libvirt API calls made.",
            ),
            connected,
            disconnections: counter(
                r,
                "vmbalance_disconnections_total",
                "Times the connection to libvirt was found lost.",
            ),
            reconnects: counter(
                r,
                "vmbalance_reconnects_total",
                "Times the connection to libvirt was made again after it was lost.",
            ),
            cycle_failures: counter(
                r,
                "vmbalance_cycle_failures_total",
                "Cycles that failed in a way that may pass (each followed by a later try, the daemon's state kept).",
            ),
            changes_skipped: counter(
                r,
                "vmbalance_changes_skipped_total",
                "Changes not made because their libvirt call failed or their domain vanished.",
            ),
            domains: gauge(
                r,
                "vmbalance_domains",
                "Active domains the last cycle saw, those not answering included.",
            ),
            not_answering: gauge(
                r,
                "vmbalance_domains_not_answering",
                "Domains left out of the last cycle because they did not answer in time (busy in a libvirt job, or their QEMU stopped or hung).",
            ),
            period: period_gauge,
        }
    }
}

impl Metrics {
    /// The metrics of `daemon`, run every `period`: its families registered, with the
    /// process's own (CPU time, memory, file descriptors, start time).
    pub fn new(daemon: Daemon, period: Duration) -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        Self {
            run: RunFamilies::new(&registry, daemon, period),
            cpu: (daemon == Daemon::VcpuScheduler).then(|| CpuFamilies::new(&registry)),
            mem: (daemon == Daemon::MemoryCoordinator).then(|| MemFamilies::new(&registry)),
            registry,
            connected: true,
        }
    }

    /// Export one cycle's report.
    pub fn export<R: Export>(&mut self, report: &R) {
        let f = report.run_figures();
        let run = &self.run;
        run.cycles.inc();
        run.libvirt_calls.inc_by(f.libvirt_calls);
        run.changes_skipped.inc_by(f.skipped as u64);
        match f.decision_secs {
            Some(secs) => run.decision_seconds.observe(secs),
            None => run.cycles_without_decision.inc(),
        }
        run.domains.set(f.domains as f64);
        run.not_answering.set(f.not_answering as f64);
        self.connection(true);
        report.export_into(self);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.run.last_cycle.set(now.as_secs_f64());
    }

    /// A cycle found no active domain: exported as an empty report of `R`'s daemon.
    pub fn no_domain<R: Export>(&mut self) {
        self.export(&R::default());
    }

    /// The period changed (a configuration reloaded).
    pub fn set_period(&self, period: Duration) {
        self.run.period.set(period.as_secs_f64());
    }

    /// A turn found the connection down (counted once per loss).
    pub fn disconnected(&mut self) {
        self.connection(false);
    }

    /// A cycle failed in a way that may pass.
    pub fn cycle_failed(&self) {
        self.run.cycle_failures.inc();
    }

    /// The connection is `up` this turn: count a loss or a return.
    fn connection(&mut self, up: bool) {
        if up != self.connected {
            if up {
                self.run.reconnects.inc();
            } else {
                self.run.disconnections.inc();
            }
            self.connected = up;
        }
        self.run.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// The exposition of every metric, in Prometheus's text format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::DomainId;
    use crate::report::{GuestLine, GuestState, ResizeLine, ResizeWhy, VcpuLine};

    fn guest(name: &str, n: u8) -> GuestLine {
        GuestLine {
            domain: name.into(),
            uuid: DomainId([n; 16]),
            actual_mib: 512.0,
            free_mib: Some(128.0),
            rate_mib_s: Some(2.0),
            state: GuestState::Starving,
        }
    }

    #[test]
    fn a_vanished_guest_leaves_no_series_and_counters_keep_counting() {
        let mut m = Metrics::new(Daemon::MemoryCoordinator, Duration::from_secs(3));
        let mut r = MemReport::new(false);
        r.guests = vec![guest("a", 1), guest("b", 2)];
        r.changes = vec![ResizeLine {
            domain: "a".into(),
            from_mib: 512.0,
            to_mib: 600.0,
            why: ResizeWhy::Starving,
            reason: String::new(),
        }];
        m.export(&r);
        let text = m.encode();
        assert!(text.contains("domain=\"b\""), "{text}");
        assert!(text.contains("vmbalance_guest_balloon_bytes{domain=\"a\",uuid=\"01010101-0101-0101-0101-010101010101\"} 536870912"), "{text}");
        assert!(
            text.contains("vmbalance_guest_state{domain=\"a\",state=\"starving\",uuid=\"01010101-0101-0101-0101-010101010101\"} 1"),
            "{text}"
        );
        r.guests.truncate(1);
        m.export(&r);
        let text = m.encode();
        assert!(!text.contains("domain=\"b\""), "{text}");
        assert!(
            text.contains("vmbalance_balloon_resizes_total{reason=\"starving\"} 2"),
            "{text}"
        );
        assert!(text.contains("vmbalance_cycles_total 2"), "{text}");
    }

    #[test]
    fn a_daemon_shows_only_its_own_families() {
        let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
        m.export(&CpuReport::new(false));
        let text = m.encode();
        assert!(
            text.contains("vmbalance_pin_changes_total{reason=\"balance\"} 0"),
            "{text}"
        );
        assert!(!text.contains("vmbalance_balloon_resizes_total"), "{text}");
        assert!(!text.contains("vmbalance_guest_"), "{text}");
    }

    #[test]
    fn every_state_of_a_guest_is_a_series_and_each_state_is_counted() {
        let mut m = Metrics::new(Daemon::MemoryCoordinator, Duration::from_secs(3));
        let mut r = MemReport::new(false);
        r.guests = vec![guest("a", 1)];
        m.export(&r);
        let text = m.encode();
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vmbalance_guest_state{"))
            .collect();
        assert_eq!(states.len(), GuestState::ALL.len(), "{text}");
        assert_eq!(states.iter().filter(|l| l.ends_with(" 1")).count(), 1);
        assert!(
            text.contains("vmbalance_guests{state=\"starving\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vmbalance_guests{state=\"wasting\"} 0"),
            "{text}"
        );
        assert!(text.contains("state=\"starving_balloon_behind\""), "{text}");
    }

    #[test]
    fn a_repin_keeps_a_vcpus_series_and_changes_its_pcpu_value() {
        let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
        let mut r = CpuReport::new(false);
        let line = |pcpu| VcpuLine {
            domain: "a".into(),
            uuid: DomainId([1; 16]),
            vcpu: 0,
            pcpu: Some(pcpu),
            usage: 50.0,
            demand: None,
        };
        let series = "vmbalance_vcpu_pcpu{domain=\"a\",uuid=\"01010101-0101-0101-0101-010101010101\",vcpu=\"0\"}";
        r.vcpu_lines = vec![line(0)];
        m.export(&r);
        assert!(m.encode().contains(&format!("{series} 0")));
        r.vcpu_lines = vec![line(3)];
        m.export(&r);
        let text = m.encode();
        assert!(text.contains(&format!("{series} 3")), "{text}");
        assert!(!text.contains("pcpu=\""), "{text}");
    }

    #[test]
    fn losses_and_returns_of_the_connection_are_counted_once_each() {
        let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
        let r = CpuReport::new(false);
        m.export(&r);
        m.disconnected();
        m.disconnected();
        m.disconnected();
        let text = m.encode();
        assert!(text.contains("vmbalance_disconnections_total 1"), "{text}");
        assert!(text.contains("vmbalance_libvirt_connected 0"), "{text}");
        assert!(text.contains("vmbalance_reconnects_total 0"), "{text}");
        m.export(&r);
        let text = m.encode();
        assert!(text.contains("vmbalance_reconnects_total 1"), "{text}");
        assert!(text.contains("vmbalance_libvirt_connected 1"), "{text}");
        assert!(
            text.contains("vmbalance_build_info{daemon=\"vcpu_scheduler\",version="),
            "{text}"
        );
        assert!(text.contains("vmbalance_period_seconds 3"), "{text}");
        let stamp: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("vmbalance_last_cycle_timestamp_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(stamp > 1.7e9, "{stamp}");
    }

    #[test]
    fn a_host_with_no_domain_reads_balanced_and_unpressed() {
        let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
        m.no_domain::<CpuReport>();
        let text = m.encode();
        assert!(text.contains("vmbalance_cpu_balanced 1"), "{text}");
        assert!(text.contains("vmbalance_cpu_pressure_ratio 0"), "{text}");
        assert!(text.contains("vmbalance_domains 0"), "{text}");
        // Before any decision the pressure is unknown, not 0.
        let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
        let mut r = CpuReport::new(false);
        r.domains = 1;
        m.export(&r);
        assert!(!m.encode().contains("vmbalance_cpu_pressure_ratio "));
    }
}
