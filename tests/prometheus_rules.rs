//! The alert and recording rules in dist/, checked and unit-tested by `promtool` (Debian's
//! `prometheus` package; `make test-deps` installs it).

use std::path::Path;
use std::process::Command;

const ALERTS: &str = "dist/vmbalance-alerts.yml";
const FLEET: &str = "dist/vmbalance-fleet-rules.yml";

/// Run `promtool ARGS` in the crate's directory; its output when it fails.
fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("promtool (Debian's prometheus package; `make test-deps` installs it)");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_are_valid() {
    promtool(&["check", "rules", ALERTS, FLEET]);
}

#[test]
fn the_alerts_fire_when_they_should_and_only_then() {
    promtool(&["test", "rules", "tests/prometheus/alerts.test.yml"]);
}

#[test]
fn the_fleet_rules_give_each_scheduler_its_labels_and_range() {
    promtool(&["test", "rules", "tests/prometheus/fleet.test.yml"]);
}

#[test]
fn every_alert_has_a_case_that_fires_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join(ALERTS)).unwrap();
    let cases = std::fs::read_to_string(root.join("tests/prometheus/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in alerts {
        // A case for it that expects it firing: its name, then expected alerts before the next case.
        let fires = cases.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_alerts:")
        });
        assert!(
            fires,
            "no case of tests/prometheus/alerts.test.yml fires {alert}"
        );
    }
}
