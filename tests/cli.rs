//! The binaries as an operator runs them: bad input, unreachable hosts, test-driver runs, signals.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::daemon::Daemon;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure an operator can read: the given status, one line on stderr, no panic or backtrace.
fn assert_one_line_error(o: &Output, status: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(status), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_period_is_refused_with_one_line() {
    let uri = common::test_uri("node.xml");
    for (args, needle) in [
        (vec![], "PERIOD"),
        (vec!["0"], "positive"),
        (vec!["-1"], "positive"),
        (vec!["-0.5"], "positive"),
        (vec!["abc"], "not a number"),
        (vec!["3s"], "not a number"),
        (vec!["1e-300"], "shorter than 0.1 s"),
        (vec!["0.05"], "shorter than 0.1 s"),
        (vec!["1e12"], "longer than a day"),
    ] {
        let mut all = vec!["--connect", uri.as_str()];
        all.extend(args.iter().copied());
        assert_one_line_error(&run(SCHEDULER, &all), 2, needle);
    }
}

#[test]
fn bad_options_are_refused_with_one_line() {
    assert_one_line_error(&run(SCHEDULER, &["--bogus", "1"]), 2, "--bogus");
    assert_one_line_error(
        &run(SCHEDULER, &["--threshold", "-5", "1"]),
        2,
        "--threshold",
    );
    assert_one_line_error(
        &run(SCHEDULER, &["--threshold", "x", "1"]),
        2,
        "--threshold",
    );
    assert_one_line_error(&run(SCHEDULER, &["--cycles", "0", "1"]), 2, "--cycles");
    for option in ["--max-changes", "--window"] {
        for bad in ["0", "-1", "x", "1.5"] {
            assert_one_line_error(&run(SCHEDULER, &[option, bad, "1"]), 2, option);
        }
    }
    assert_one_line_error(&run(SCHEDULER, &["1", "2"]), 2, "'2'");
}

#[test]
fn help_describes_every_option() {
    let o = run(SCHEDULER, &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for option in [
        "PERIOD",
        "--connect",
        "--threshold",
        "--max-changes",
        "--window",
        "--dry-run",
        "--cycles",
        "--verbose",
        "--quiet",
    ] {
        assert!(help.contains(option), "--help lacks {option}");
    }
}

#[test]
fn unreachable_uri_exits_1_with_the_uri_and_a_hint() {
    let o = run(SCHEDULER, &["--connect", "test:///no/such/node.xml", "1"]);
    assert_one_line_error(&o, 1, "test:///no/such/node.xml");
    // A qemu URI whose daemon socket does not exist names the daemon as the likely cause.
    let o = Command::new(SCHEDULER)
        .args([
            "--connect",
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            "1",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&o, 1, "daemon");
}

#[test]
fn default_uri_comes_from_the_environment() {
    let o = Command::new(SCHEDULER)
        .args(["--cycles", "1", "0.1"])
        .env("LIBVIRT_DEFAULT_URI", common::test_uri("node.xml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("tests/data/node.xml"));
}

#[test]
fn dry_run_logs_the_plan() {
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &[
            "--connect",
            &uri,
            "--dry-run",
            "--threshold",
            "0",
            "--cycles",
            "2",
            "0.2",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("dry run"), "{err}");
    assert!(
        err.contains("cycle 1: 3 domains, 7 vCPUs; first sample"),
        "{err}"
    );
    // The test driver's vCPUs span several pCPUs: the plan pins the six unpinned ones.
    assert!(
        err.contains("cycle 2:") && err.contains("would move 6:"),
        "{err}"
    );
    assert!(
        err.contains("done: 2 cycles, 6 changes, 0 skipped"),
        "{err}"
    );
}

#[test]
fn a_real_run_pins_then_stays_put() {
    let uri = common::test_uri("node.xml");
    // The test driver's vCPUs are idle: at threshold 0 even those are pinned (rule 1).
    let o = run(
        SCHEDULER,
        &["-c", &uri, "--threshold", "0", "--cycles", "5", "0.2"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("cycle 2:") && err.contains("moved 6:"),
        "{err}"
    );
    let line = |cycle: u32| {
        err.lines()
            .find(|l| l.contains(&format!("cycle {cycle}:")))
            .unwrap()
            .to_string()
    };
    // The interval after a pin change straddles it: that cycle only observes.
    assert!(
        line(3).ends_with("settling after the last pin changes, no decision"),
        "{err}"
    );
    // The pins took: the next cycles see every vCPU pinned and change nothing.
    for cycle in [4, 5] {
        assert!(line(cycle).ends_with(", no change"), "{}", line(cycle));
    }
}

#[test]
fn idle_vcpus_that_float_are_left_floating() {
    // The test driver's vCPUs use no CPU time: at the default threshold none is worth a pin.
    let uri = common::test_uri("node.xml");
    let o = run(SCHEDULER, &["-c", &uri, "--cycles", "3", "0.2"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("done: 3 cycles, 0 changes, 0 skipped"),
        "{err}"
    );
}

#[test]
fn a_change_budget_spreads_the_pinning_over_cycles() {
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &[
            "-c",
            &uri,
            "--threshold",
            "0",
            "--max-changes",
            "4",
            "--cycles",
            "6",
            "0.2",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("at most 4 pin changes a cycle"), "{err}");
    let line = |cycle: u32| {
        err.lines()
            .find(|l| l.contains(&format!("cycle {cycle}:")))
            .unwrap()
            .to_string()
    };
    // Six vCPUs to pin, four a cycle: four, an observing cycle, the last two, then nothing.
    assert!(line(2).contains("moved 4:"), "{}", line(2));
    assert!(line(3).ends_with("no decision"), "{}", line(3));
    assert!(line(4).contains("moved 2:"), "{}", line(4));
    assert!(line(6).ends_with(", no change"), "{}", line(6));
    assert!(err.contains("done: 6 cycles, 6 changes"), "{err}");
}

#[test]
fn no_active_domain_exits_0_on_the_first_cycle() {
    let uri = common::test_uri("empty-node.xml");
    let o = run(SCHEDULER, &["--connect", &uri, "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("no active domain"));
}

#[test]
fn quiet_silences_info() {
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &["-q", "--connect", &uri, "--cycles", "2", "0.1"],
    );
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stderr(&o), "");
}

/// Start the daemon with a long PERIOD, wait for its first cycle, send `signal`, and expect a clean
/// exit long before the PERIOD is over.
fn stops_cleanly_on(signal: &str) {
    let uri = common::test_uri("node.xml");
    let mut d = Daemon::start(SCHEDULER, &["--connect", &uri, "3600"]);
    // The first cycle runs at once; give it a moment to be in its sleep.
    std::thread::sleep(Duration::from_millis(500));
    d.send(signal);
    let (status, log) = d.exit_within(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("stopping on signal"), "{log}");
}

#[test]
fn sigterm_stops_without_waiting_out_the_period() {
    stops_cleanly_on("-TERM");
}

#[test]
fn sigint_stops_without_waiting_out_the_period() {
    stops_cleanly_on("-INT");
}

const COORDINATOR: &str = env!("CARGO_BIN_EXE_memory_coordinator");

#[test]
fn coordinator_refuses_bad_input_with_one_line() {
    let uri = common::test_uri("node.xml");
    let c = ["--connect", uri.as_str()];
    for (args, status, needle) in [
        (vec![], 2, "PERIOD"),
        (vec!["0"], 2, "positive"),
        (vec!["-2"], 2, "positive"),
        (vec!["x"], 2, "not a number"),
        (vec!["--starve-pct", "60", "1"], 2, "--starve-pct"),
        (vec!["--waste-pct", "101", "1"], 2, "--waste-pct"),
        // Sizes whose KiB would wrap, and runways or rates no host needs.
        (
            vec!["--max-step-mib", "18014398509481984", "1"],
            2,
            "--max-step-mib",
        ),
        (
            vec!["--min-guest-mib", "18014398509481984", "1"],
            2,
            "--min-guest-mib",
        ),
        (
            vec!["--runway-periods", "1e300", "1"],
            2,
            "--runway-periods",
        ),
        (
            vec!["--consuming-mib-s", "inf", "1"],
            2,
            "--consuming-mib-s",
        ),
        (
            vec!["--host-reserve-pct", "100", "1"],
            2,
            "--host-reserve-pct",
        ),
        (vec!["--min-step-mib", "0", "1"], 2, "--min-step-mib"),
        (vec!["--min-step-mib", "600", "1"], 2, "--max-step-mib"),
        (vec!["--return-pct", "0", "1"], 2, "--return-pct"),
        (vec!["--min-guest-mib", "-1", "1"], 2, "--min-guest-mib"),
        (vec!["--target-free-pct", "10", "1"], 2, "--target-free-pct"),
        (vec!["--target-free-pct", "55", "1"], 2, "--target-free-pct"),
        (
            vec!["--target-free-pct", "nan", "1"],
            2,
            "--target-free-pct",
        ),
        (vec!["--host-target-pct", "4", "1"], 2, "--host-target-pct"),
        (
            vec!["--host-target-pct", "101", "1"],
            2,
            "--host-target-pct",
        ),
        (vec!["--nope", "1"], 2, "--nope"),
    ] {
        let mut all = c.to_vec();
        all.extend(args.iter().copied());
        assert_one_line_error(&run(COORDINATOR, &all), status, needle);
    }
    assert_one_line_error(
        &run(COORDINATOR, &["-c", "test:///no/such.xml", "1"]),
        1,
        "test:///no/such.xml",
    );
}

#[test]
fn coordinator_help_describes_every_option() {
    let o = run(COORDINATOR, &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for option in [
        "PERIOD",
        "--connect",
        "--dry-run",
        "--cycles",
        "--starve-pct",
        "--waste-pct",
        "--host-reserve-pct",
        "--target-free-pct",
        "--host-target-pct",
        "--min-guest-mib",
        "--consuming-mib-s",
        "--min-step-mib",
        "--max-step-mib",
        "--return-pct",
    ] {
        assert!(help.contains(option), "--help lacks {option}");
    }
}

#[test]
fn coordinator_dry_run_on_the_test_driver() {
    let uri = common::test_uri("node.xml");
    let o = run(
        COORDINATOR,
        &["--connect", &uri, "--dry-run", "--cycles", "7", "0.1"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // The test driver's stats never advance: every cycle waits for them and changes nothing.
    assert_eq!(err.matches("waiting for stats").count(), 2 * 7, "{err}");
    assert_eq!(err.matches("; no change").count(), 7, "{err}");
    // A dry run does not even set the statistics period; it says so once per domain.
    assert_eq!(
        err.matches("statistics are not switched on").count(),
        3,
        "{err}"
    );
    assert!(!err.contains("domain batch:"), "{err}");
    assert_eq!(
        err.matches("does not report host memory").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("done: 7 cycles, 0 changes, 0 skipped"),
        "{err}"
    );
}

#[test]
fn coordinator_exits_0_with_no_active_domain() {
    let uri = common::test_uri("empty-node.xml");
    let o = run(COORDINATOR, &["--connect", &uri, "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("no active domain"));
}

/// The JSON objects a run printed on stdout, one per line.
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn scheduler_json_has_one_object_per_cycle_with_the_documented_fields() {
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &[
            "-q",
            "--json",
            "-c",
            &uri,
            "--threshold",
            "0",
            "--cycles",
            "3",
            "0.1",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let cycles = json_lines(&o);
    assert_eq!(cycles.len(), 3);
    for (i, c) in cycles.iter().enumerate() {
        assert_eq!(c["daemon"], "vcpu_scheduler");
        assert_eq!(c["cycle"], i as u64 + 1);
        assert!(c["time"].as_f64().unwrap() > 1.7e9);
        assert_eq!(
            (c["domains"].as_u64(), c["vcpus"].as_u64()),
            (Some(3), Some(7))
        );
        assert!(c["libvirt_calls"].as_u64().unwrap() > 0);
    }
    assert_eq!(cycles[0]["decision"], "first_sample");
    let second = &cycles[1];
    assert_eq!(second["decision"], "planned");
    assert_eq!(second["basis"], "usage");
    let pcpus = second["pcpus"].as_array().unwrap();
    assert_eq!(pcpus.len(), 3);
    assert!(
        pcpus
            .iter()
            .all(|p| p["usage"].is_f64() && p["demand"].is_null())
    );
    let moves = second["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 6);
    assert!(
        moves
            .iter()
            .all(|m| m["domain"].is_string() && m["to"].is_u64() && m["vcpu"].is_u64())
    );
    assert_eq!(cycles[2]["decision"], "settling");
}

#[test]
fn coordinator_json_has_one_object_per_cycle_with_the_documented_fields() {
    let uri = common::test_uri("node.xml");
    let o = run(
        COORDINATOR,
        &["-q", "--json", "-c", &uri, "--cycles", "2", "0.1"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let cycles = json_lines(&o);
    assert_eq!(cycles.len(), 2);
    for c in &cycles {
        assert_eq!(c["daemon"], "memory_coordinator");
        assert!(
            c["host"].is_null(),
            "the test driver reports no host memory"
        );
        assert_eq!(c["without_balloon"], 1);
        let guests = c["guests"].as_array().unwrap();
        assert_eq!(guests.len(), 2);
        for g in guests {
            assert!(g["domain"].is_string() && g["actual_mib"].is_f64() && g["state"].is_string());
        }
        assert_eq!(c["changes"].as_array().unwrap().len(), 0);
    }
}

#[test]
fn wait_keeps_running_without_domains() {
    let uri = common::test_uri("empty-node.xml");
    for bin in [SCHEDULER, COORDINATOR] {
        let o = run(bin, &["--wait", "--connect", &uri, "--cycles", "3", "0.1"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert_eq!(err.matches("waiting for domains").count(), 1, "{err}");
        assert!(
            err.contains("done: 3 cycles, 0 changes, 0 skipped"),
            "{err}"
        );
    }
}

#[test]
fn a_bad_pool_or_exclusion_is_refused_with_one_line() {
    let uri = common::test_uri("node.xml");
    let uri = uri.as_str();
    for bad in ["", "x", "3-1", "1,"] {
        assert_one_line_error(
            &run(SCHEDULER, &["--connect", uri, "--cpus", bad, "1"]),
            2,
            "--cpus",
        );
    }
    // The test driver's online pCPUs are 0, 2 and 4: pCPU 1 is offline, 9 absent.
    for absent in ["1", "0,9"] {
        assert_one_line_error(
            &run(SCHEDULER, &["--connect", uri, "--cpus", absent, "1"]),
            2,
            "not online",
        );
    }
    for bin in [SCHEDULER, env!("CARGO_BIN_EXE_memory_coordinator")] {
        assert_one_line_error(
            &run(bin, &["--connect", uri, "--exclude", "web-[", "1"]),
            2,
            "--exclude",
        );
    }
}

#[test]
fn pins_stay_in_the_pool_and_excluded_domains_are_left_alone() {
    let uri = common::test_uri("node.xml");
    // web's two vCPUs span every pCPU; db's vCPU 0 is configured on pCPU 2; batch is excluded.
    let o = run(
        SCHEDULER,
        &[
            "--connect",
            &uri,
            "--cpus",
            "2,4",
            "--exclude",
            "batch",
            "--threshold",
            "0",
            "--cycles",
            "2",
            "--json",
            "0.1",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("domain batch is excluded by --exclude 'batch'"),
        "{}",
        stderr(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let moves = last["moves"].as_array().unwrap();
    assert!(!moves.is_empty(), "{last}");
    for m in moves {
        assert!(m["to"] == 2 || m["to"] == 4, "{m}");
        assert_ne!(m["domain"], "batch", "{m}");
    }
}

#[test]
fn sighup_rereads_the_configuration_and_keeps_running() {
    let uri = common::test_uri("node.xml");
    for bin in [SCHEDULER, COORDINATOR] {
        let mut d = Daemon::start(bin, &["--connect", &uri, "0.2"]);
        std::thread::sleep(Duration::from_millis(600));
        d.send("-HUP");
        std::thread::sleep(Duration::from_millis(800));
        assert!(d.running(), "{bin} ended on SIGHUP");
        d.send("-TERM");
        let (status, log) = d.exit_within(Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "{log}");
        assert!(log.contains("SIGHUP: re-reading"), "{log}");
        assert!(log.contains("stopping on signal"), "{log}");
    }
}

#[test]
fn restore_on_exit_puts_the_pins_back_when_the_daemon_ends() {
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &[
            "--connect",
            &uri,
            "--restore-on-exit",
            "--threshold",
            "0",
            "--cycles",
            "2",
            "0.1",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Six vCPUs spanning several pCPUs (web's two, db's three unpinned ones, batch's) were pinned
    // in cycle 2, then restored.
    assert!(stderr(&o).contains("moved 6:"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("restored 6 vCPUs to the affinity they had when first seen"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn coordinator_warns_once_per_domain_without_a_balloon() {
    let uri = common::test_uri("node.xml");
    let o = run(COORDINATOR, &["--connect", &uri, "--cycles", "5", "0.1"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // batch has no balloon device: one warning, then "without balloon" in every cycle line.
    assert_eq!(err.matches("domain batch:").count(), 1, "{err}");
    assert_eq!(
        err.matches("1 without balloon left alone").count(),
        5,
        "{err}"
    );
}

/// The long options a daemon's page (docs/DAEMON.md) names in its option table (`--name` in its
/// first column).
fn readme_options(daemon: &str) -> std::collections::BTreeSet<String> {
    let page = std::fs::read_to_string(format!("{}/docs/{daemon}.md", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let section = page.split("\n## ").next().unwrap().to_string();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(long_options)
        .collect()
}

/// Every `--long-option` in `text`.
fn long_options(text: &str) -> Vec<String> {
    text.match_indices("--")
        .filter_map(|(i, _)| {
            let name: String = text[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

#[test]
fn readme_and_help_name_the_same_options() {
    for (bin, daemon) in [
        (SCHEDULER, "vcpu_scheduler"),
        (COORDINATOR, "memory_coordinator"),
    ] {
        let help = String::from_utf8_lossy(&run(bin, &["--help"]).stdout).into_owned();
        let in_help: std::collections::BTreeSet<String> = help
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .flat_map(|l| {
                long_options(
                    l.split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ")
                        .as_str(),
                )
            })
            .filter(|o| o != "--help" && o != "--version")
            .collect();
        let in_readme = readme_options(daemon);
        assert_eq!(
            in_readme, in_help,
            "{daemon}: docs/{daemon}.md's table and --help differ"
        );
    }
}

#[test]
fn the_host_topology_is_said_once() {
    // libvirt's built-in test host has two NUMA nodes of 8 pCPUs; the host of node.xml describes
    // none.
    let o = run(
        SCHEDULER,
        &[
            "--connect",
            "test:///default",
            "--dry-run",
            "--cycles",
            "3",
            "0.2",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        err.matches("host topology: 2 NUMA nodes, 2 sockets, 16 cores, 16 pCPUs; each NUMA node is balanced on its own")
            .count(),
        1,
        "{err}"
    );
    let uri = common::test_uri("node.xml");
    let o = run(
        SCHEDULER,
        &["--connect", &uri, "--dry-run", "--cycles", "2", "0.2"],
    );
    let err = stderr(&o);
    assert!(err.contains("the host describes no CPU topology"), "{err}");
}
