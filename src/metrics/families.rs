//! How metric families are made and kept: registered once, and gauge series that follow what
//! runs (a series not set in a cycle is removed at its end).

use std::collections::HashSet;

use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, Opts, Registry};

/// A gauge family whose series are those set in the last cycle: a series not set again is
/// removed when the cycle ends (its domain, vCPU or pCPU is gone). Series set again are updated
/// in place, which costs far less than building every series anew each cycle.
pub struct Series {
    family: GaugeVec,
    previous: HashSet<Vec<String>>,
    current: HashSet<Vec<String>>,
}

impl Series {
    /// A gauge family named `name`, labelled `labels`, registered in `registry`.
    pub fn new(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Self {
        Self {
            family: register(
                registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric name"),
            ),
            previous: HashSet::new(),
            current: HashSet::new(),
        }
    }

    /// Set the series labelled `labels` to `value` this cycle.
    pub fn set(&mut self, labels: &[&str], value: f64) {
        self.family.with_label_values(labels).set(value);
        self.current
            .insert(labels.iter().map(|l| l.to_string()).collect());
    }

    /// End the cycle: drop the series not set in it.
    pub fn end_cycle(&mut self) {
        for gone in self.previous.difference(&self.current) {
            let labels: Vec<&str> = gone.iter().map(String::as_str).collect();
            let _ = self.family.remove_label_values(&labels);
        }
        self.previous = std::mem::take(&mut self.current);
    }
}

/// A gauge without labels that is absent until its value is known, and absent again when it
/// no longer is: a figure the daemon cannot tell is not shown as a made-up 0.
pub struct Known(GaugeVec);

impl Known {
    /// A gauge named `name`, registered in `registry`, absent for now.
    pub fn new(registry: &Registry, name: &str, help: &str) -> Self {
        Self(register(
            registry,
            GaugeVec::new(Opts::new(name, help), &[]).expect("a valid metric name"),
        ))
    }

    /// Show `value`, or nothing when it is `None`.
    pub fn set(&self, value: Option<f64>) {
        match value {
            Some(v) => self.0.with_label_values(&[] as &[&str]).set(v),
            None => {
                let _ = self.0.remove_label_values(&[] as &[&str]);
            }
        }
    }
}

/// Register `collector` in `registry` and hand it back.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("each family is registered once");
    collector
}

/// A gauge named `name`, registered in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(
        registry,
        Gauge::new(name, help).expect("a valid metric name"),
    )
}

/// A counter named `name` (ending in `_total`), registered in `registry`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("a valid metric name"),
    )
}

/// A counter family named `name`, labelled `labels`, registered in `registry`.
pub fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name"),
    )
}

/// Count in `family` one for each reason in `made`, every reason of `all` shown from the start
/// (at 0 until something is counted for it).
pub fn count_by_reason(
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

/// `text` as a snake_case label value: lower case, each run of other characters one `_`
/// (`STARVING (balloon behind)` is `starving_balloon_behind`).
pub fn snake_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_become_snake_case() {
        assert_eq!(
            snake_case("STARVING (balloon behind)"),
            "starving_balloon_behind"
        );
        assert_eq!(snake_case("waiting for stats"), "waiting_for_stats");
        assert_eq!(snake_case("WASTING"), "wasting");
    }

    #[test]
    fn a_known_gauge_is_absent_until_set_and_after_cleared() {
        let r = Registry::new();
        let g = Known::new(&r, "x_ratio", "x");
        let shown = || {
            r.gather()
                .iter()
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        assert_eq!(shown(), 0);
        g.set(Some(0.5));
        assert_eq!(shown(), 1);
        g.set(None);
        assert_eq!(shown(), 0);
    }
}
