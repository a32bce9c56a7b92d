//! Prometheus metrics of both daemons (`--metrics-address`), and the endpoint that serves them.
//!
//! Each cycle's report is exported into a registry ([`Export`]) and the
//! registry encoded once; scrapes read the last encoding, so a scrape never waits for a cycle and
//! a cycle never waits for a scrape. Names follow Prometheus conventions: a `vmbalance_` prefix,
//! base units (`_seconds`, `_bytes`, `_ratio`), counters ending in `_total`. Series of domains
//! that are gone are dropped: a per-domain or per-vCPU series not set in a cycle is removed at its
//! end, so label sets stay bounded by what runs. The encoding is the `prometheus` crate's (the
//! classic text format, which every Prometheus version and `promtool` read).

mod endpoint;

pub use endpoint::{Endpoint, MAX_CONNECTIONS, parse_listen_address};

use std::collections::HashSet;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::report::{CpuReport, MemReport, PinWhy, ResizeWhy};

const MIB: f64 = 1024.0 * 1024.0;

/// A cycle report the metrics know how to export.
pub trait Export {
    /// Export this report into `metrics`.
    fn export_into(&self, metrics: &mut Metrics);
}

impl Export for CpuReport {
    fn export_into(&self, metrics: &mut Metrics) {
        metrics.export_cpu(self);
    }
}

impl Export for MemReport {
    fn export_into(&self, metrics: &mut Metrics) {
        metrics.export_mem(self);
    }
}

/// Every metric either daemon exports. Families a daemon never fills are left out of its scrape.
pub struct Metrics {
    registry: Registry,
    cycles: IntCounter,
    cycles_without_decision: IntCounter,
    decision_seconds: Histogram,
    libvirt_calls: IntCounter,
    changes_skipped: IntCounter,
    disconnections: IntCounter,
    cycle_failures: IntCounter,
    not_answering: prometheus::IntGauge,
    pcpu_usage: Series,
    pcpu_demand: Series,
    vcpu_usage: Series,
    vcpu_demand: Series,
    node_spread: Series,
    pin_changes: IntCounterVec,
    guest_balloon: Series,
    guest_free: Series,
    guest_rate: Series,
    guest_state: Series,
    host_memory: Series,
    resizes: IntCounterVec,
}

/// A gauge family whose series are those set in the last cycle: a series not set again is
/// removed when the cycle ends (its domain, vCPU or pCPU is gone). Series set again are updated
/// in place, which costs far less than building every series anew each cycle.
struct Series {
    family: GaugeVec,
    previous: HashSet<Vec<String>>,
    current: HashSet<Vec<String>>,
}

impl Series {
    fn new(family: GaugeVec) -> Self {
        Self {
            family,
            previous: HashSet::new(),
            current: HashSet::new(),
        }
    }

    /// Set the series labelled `labels` to `value` this cycle.
    fn set(&mut self, labels: &[&str], value: f64) {
        self.family.with_label_values(labels).set(value);
        self.current
            .insert(labels.iter().map(|l| l.to_string()).collect());
    }

    /// End the cycle: drop the series not set in it.
    fn end_cycle(&mut self) {
        for gone in self.previous.difference(&self.current) {
            let labels: Vec<&str> = gone.iter().map(String::as_str).collect();
            let _ = self.family.remove_label_values(&labels);
        }
        self.previous = std::mem::take(&mut self.current);
    }
}

/// A gauge family named `name`, labelled `labels`, registered in `registry`.
fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let family = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric name");
    registry
        .register(Box::new(family.clone()))
        .expect("registered once");
    family
}

/// A counter named `name` (ending in `_total`), registered in `registry`.
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("a valid metric name");
    registry
        .register(Box::new(counter.clone()))
        .expect("registered once");
    counter
}

/// A counter family named `name`, labelled `labels`, registered in `registry`.
fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name");
    registry
        .register(Box::new(family.clone()))
        .expect("registered once");
    family
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered and empty.
    pub fn new() -> Self {
        let r = Registry::new();
        let decision_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "vmbalance_decision_duration_seconds",
                "Time one decision (planning, not reading or applying) took.",
            )
            .buckets(prometheus::exponential_buckets(1e-6, 4.0, 12).expect("valid buckets")),
        )
        .expect("a valid metric name");
        r.register(Box::new(decision_seconds.clone()))
            .expect("registered once");
        let domain_vcpu = ["domain", "uuid", "vcpu", "pcpu"];
        Self {
            cycles: counter(&r, "vmbalance_cycles_total", "Cycles run."),
            cycles_without_decision: counter(
                &r,
                "vmbalance_cycles_without_decision_total",
                "Cycles that made no decision: first sample, settling after changes, sampling too slow.",
            ),
            decision_seconds,
            libvirt_calls: counter(
                &r,
                "vmbalance_libvirt_calls_total",
                "libvirt API calls made.",
            ),
            changes_skipped: counter(
                &r,
                "vmbalance_changes_skipped_total",
                "Changes not made because their libvirt call failed or their domain vanished.",
            ),
            disconnections: counter(
                &r,
                "vmbalance_disconnections_total",
                "Cycles that found the libvirt connection down (each followed by a reconnection attempt).",
            ),
            cycle_failures: counter(
                &r,
                "vmbalance_cycle_failures_total",
                "Cycles that failed in a way that may pass (each followed by a later try, the daemon's state kept).",
            ),
            not_answering: {
                let g = prometheus::IntGauge::new(
                    "vmbalance_domains_not_answering",
                    "Domains left out of the last cycle because they did not answer in time (busy in a libvirt job, or their QEMU stopped or hung).",
                )
                .expect("a valid metric name");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            pcpu_usage: Series::new(gauges(
                &r,
                "vmbalance_pcpu_usage_ratio",
                "CPU time the vCPUs on a pCPU used over the last period, as a share of the pCPU.",
                &["pcpu"],
            )),
            pcpu_demand: Series::new(gauges(
                &r,
                "vmbalance_pcpu_demand_ratio",
                "CPU time the vCPUs on a pCPU wanted (used plus waited for) over the last period.",
                &["pcpu"],
            )),
            vcpu_usage: Series::new(gauges(
                &r,
                "vmbalance_vcpu_usage_ratio",
                "CPU time a vCPU used over the last period, as a share of one pCPU.",
                &domain_vcpu,
            )),
            vcpu_demand: Series::new(gauges(
                &r,
                "vmbalance_vcpu_demand_ratio",
                "CPU time a vCPU wanted (used plus waited for) over the last period.",
                &domain_vcpu,
            )),
            node_spread: Series::new(gauges(
                &r,
                "vmbalance_node_spread_ratio",
                "Busiest minus freest pCPU of a NUMA node, in the figure balanced.",
                &["node"],
            )),
            pin_changes: counters(
                &r,
                "vmbalance_pin_changes_total",
                "vCPU pin changes made, by reason.",
                &["reason"],
            ),
            guest_balloon: Series::new(gauges(
                &r,
                "vmbalance_guest_balloon_bytes",
                "A guest's balloon size (the memory it has).",
                &["domain", "uuid"],
            )),
            guest_free: Series::new(gauges(
                &r,
                "vmbalance_guest_free_bytes",
                "Memory a guest can still use (MemAvailable, else MemFree), as it last reported.",
                &["domain", "uuid"],
            )),
            guest_rate: Series::new(gauges(
                &r,
                "vmbalance_guest_consumption_bytes_per_second",
                "How fast a guest's used memory grows (negative: shrinks).",
                &["domain", "uuid"],
            )),
            guest_state: Series::new(gauges(
                &r,
                "vmbalance_guest_state",
                "1 for a guest's state this cycle (starving, wasting, balanced, or why it is not judged).",
                &["domain", "uuid", "state"],
            )),
            host_memory: Series::new(gauges(
                &r,
                "vmbalance_host_memory_bytes",
                "The host's memory: total, available (what the kernel can hand out), reserve (kept available), unbacked (what guests hold free and may still touch).",
                &["kind"],
            )),
            resizes: counters(
                &r,
                "vmbalance_balloon_resizes_total",
                "Balloon resizes made, by reason.",
                &["reason"],
            ),
            registry: r,
        }
    }

    /// A cycle ran: count it, and its libvirt calls, skipped changes and decision time.
    fn cycle(&self, libvirt_calls: u64, skipped: usize, decision_secs: Option<f64>) {
        self.cycles.inc();
        self.libvirt_calls.inc_by(libvirt_calls);
        self.changes_skipped.inc_by(skipped as u64);
        match decision_secs {
            Some(secs) => self.decision_seconds.observe(secs),
            None => self.cycles_without_decision.inc(),
        }
    }

    /// A cycle found the connection down.
    pub fn disconnected(&self) {
        self.disconnections.inc();
    }

    /// A cycle failed in a way that may pass.
    pub fn cycle_failed(&self) {
        self.cycle_failures.inc();
    }

    /// Count in `family` a change for each reason in `made`, every reason of `all` shown from
    /// the start (at 0 until a change is made for it).
    fn count_changes(
        family: &IntCounterVec,
        all: impl IntoIterator<Item = &'static str>,
        made: impl IntoIterator<Item = &'static str>,
    ) {
        for reason in all {
            family.with_label_values(&[reason]);
        }
        for reason in made {
            family.with_label_values(&[reason]).inc();
        }
    }

    /// Export a vCPU scheduler cycle.
    pub fn export_cpu(&mut self, r: &CpuReport) {
        self.cycle(r.libvirt_calls, r.skipped, r.decision_secs);
        self.not_answering.set(r.not_answering.len() as i64);
        Self::count_changes(
            &self.pin_changes,
            PinWhy::ALL.iter().map(|w| w.as_str()),
            r.moves.iter().map(|m| m.why.as_str()),
        );
        for p in &r.pcpus {
            let pcpu = p.pcpu.to_string();
            self.pcpu_usage.set(&[&pcpu], p.usage / 100.0);
            if let Some(demand) = p.demand {
                self.pcpu_demand.set(&[&pcpu], demand / 100.0);
            }
        }
        for v in &r.vcpu_lines {
            let uuid = v.uuid.to_string();
            let vcpu = v.vcpu.to_string();
            let pcpu = v.pcpu.map_or(String::new(), |p| p.to_string());
            let labels = [v.domain.as_str(), &uuid, &vcpu, &pcpu];
            self.vcpu_usage.set(&labels, v.usage / 100.0);
            if let Some(demand) = v.demand {
                self.vcpu_demand.set(&labels, demand / 100.0);
            }
        }
        for n in &r.nodes {
            self.node_spread
                .set(&[&n.node.to_string()], n.spread / 100.0);
        }
        for series in [
            &mut self.pcpu_usage,
            &mut self.pcpu_demand,
            &mut self.vcpu_usage,
            &mut self.vcpu_demand,
            &mut self.node_spread,
        ] {
            series.end_cycle();
        }
    }

    /// Export a memory coordinator cycle.
    pub fn export_mem(&mut self, r: &MemReport) {
        self.cycle(r.libvirt_calls, r.skipped, r.decision_secs);
        self.not_answering.set(r.not_answering.len() as i64);
        Self::count_changes(
            &self.resizes,
            ResizeWhy::ALL.iter().map(|w| w.as_str()),
            r.changes.iter().map(|c| c.why.as_str()),
        );
        for g in &r.guests {
            let uuid = g.uuid.to_string();
            let labels = [g.domain.as_str(), &uuid];
            self.guest_balloon.set(&labels, g.actual_mib * MIB);
            if let Some(free) = g.free_mib {
                self.guest_free.set(&labels, free * MIB);
            }
            if let Some(rate) = g.rate_mib_s {
                self.guest_rate.set(&labels, rate * MIB);
            }
            // The state's name in lower case: a fixed, bounded set of label values.
            let state = g.state.as_str().to_lowercase();
            self.guest_state
                .set(&[g.domain.as_str(), &uuid, &state], 1.0);
        }
        if let Some(h) = &r.host {
            for (kind, mib) in [
                ("total", h.total_mib),
                ("available", h.available_mib),
                ("reserve", h.reserve_mib),
                ("unbacked", h.unbacked_mib),
            ] {
                self.host_memory.set(&[kind], mib * MIB);
            }
        }
        for series in [
            &mut self.guest_balloon,
            &mut self.guest_free,
            &mut self.guest_rate,
            &mut self.guest_state,
            &mut self.host_memory,
        ] {
            series.end_cycle();
        }
    }

    /// Export one cycle's report.
    pub fn export<R: Export>(&mut self, report: &R) {
        report.export_into(self);
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
    use crate::report::{GuestLine, GuestState, ResizeLine};

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
        let mut m = Metrics::new();
        let mut r = MemReport::new(false);
        r.guests = vec![guest("a", 1), guest("b", 2)];
        r.changes = vec![ResizeLine {
            domain: "a".into(),
            from_mib: 512.0,
            to_mib: 600.0,
            why: ResizeWhy::Starving,
            reason: String::new(),
        }];
        m.export_mem(&r);
        let text = m.encode();
        assert!(text.contains("domain=\"b\""), "{text}");
        assert!(text.contains("vmbalance_guest_balloon_bytes{domain=\"a\",uuid=\"01010101-0101-0101-0101-010101010101\"} 536870912"), "{text}");
        assert!(
            text.contains("vmbalance_guest_state{domain=\"a\",state=\"starving\""),
            "{text}"
        );
        r.guests.truncate(1);
        m.export_mem(&r);
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
        let mut m = Metrics::new();
        m.export_cpu(&CpuReport::new(false));
        let text = m.encode();
        assert!(
            text.contains("vmbalance_pin_changes_total{reason=\"balance\"} 0"),
            "{text}"
        );
        assert!(!text.contains("vmbalance_balloon_resizes_total"), "{text}");
        assert!(!text.contains("vmbalance_guest_"), "{text}");
    }
}
