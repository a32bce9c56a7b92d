//! `--config FILE`: options from a TOML file under the command line, a bad file refused at start
//! with its line, and SIGHUP re-reading it into a running daemon without losing what it knows.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");
const COORDINATOR: &str = env!("CARGO_BIN_EXE_memory_coordinator");

/// A configuration file holding `text`, at a fresh path.
fn config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmb-config-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// The log lines after the first one containing `mark`.
fn after(log: &str, mark: &str) -> Vec<String> {
    log.lines()
        .skip_while(|l| !l.contains(mark))
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn options_come_from_the_file_and_the_command_line_wins() {
    let uri = common::test_uri("node.xml");
    let file = config(
        "start",
        "period = 0.2\nthreshold = 15\nmax-changes = 2\ncycles = 2\n",
    );
    let o = Command::new(SCHEDULER)
        .args([
            "-c",
            &uri,
            "--config",
            file.to_str().unwrap(),
            "--threshold",
            "30",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("period 200ms, threshold 30 points") && log.contains("at most 2 pin changes"),
        "{log}"
    );
    assert!(log.contains("done: 2 cycles"), "{log}");
}

#[test]
fn a_bad_file_at_start_is_one_line_naming_it_and_exit_2() {
    let uri = common::test_uri("node.xml");
    for (text, says) in [
        (
            "period = 1\ntreshold = 5\n",
            "line 2: unknown key 'treshold'",
        ),
        ("period = 1\n\nthreshold = -4\n", "line 3:"),
        ("period = [1\n", "line 1:"),
        (
            "period = 1\nwait = 'yes'\n",
            "line 2: 'wait' takes true or false",
        ),
    ] {
        let file = config("bad", text);
        let o = Command::new(SCHEDULER)
            .args(["-c", &uri, "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(file.to_str().unwrap()) && err.contains(says),
            "{text}: {err}"
        );
    }
}

#[test]
fn sighup_applies_a_new_threshold_at_once_keeping_the_rates_and_a_bad_file_changes_nothing() {
    let uri = common::test_uri("node.xml");
    let file = config("reload", "period = 0.2\nthreshold = 10\n");
    let d = Daemon::start(
        SCHEDULER,
        &["-c", &uri, "--config", file.to_str().unwrap(), "-v"],
    );
    d.wait_for("cycle 4:");
    std::fs::write(&file, "period = 0.3\nthreshold = 25\n").unwrap();
    d.send("-HUP");
    let said = d.wait_for("reloaded ");
    assert!(
        said.contains("PERIOD 0.2 -> 0.3") && said.contains("--threshold 10 -> 25"),
        "{said}"
    );
    // The very next cycle decides: the rates were kept (no "first sample").
    std::thread::sleep(Duration::from_millis(900));
    let next = after(&d.log(), "reloaded ");
    let cycle = next
        .iter()
        .find(|l| l.contains("] cycle "))
        .expect("a cycle after the reload");
    assert!(!cycle.contains("first sample"), "{cycle}");
    assert!(cycle.contains("pCPU usage"), "{cycle}");

    // A bad file: one error naming its line; the daemon goes on with what it had.
    std::fs::write(&file, "period = 0.3\nthreshold = 'high'\n").unwrap();
    d.send("-HUP");
    let error = d.wait_for("reload: ");
    assert!(
        error.contains("ERROR") && error.contains("line 2"),
        "{error}"
    );
    assert!(
        error.contains("the running configuration is kept"),
        "{error}"
    );
    std::thread::sleep(Duration::from_millis(800));
    let log = d.log();
    assert!(
        after(&log, "reload: ")
            .iter()
            .any(|l| l.contains("] cycle ")),
        "no cycle after a bad reload:\n{log}"
    );
    assert_eq!(log.matches("reloaded ").count(), 1, "{log}");
    // The deadline of each call follows the new period (half of it, at least 1 s).
    std::fs::write(&file, "period = 4\nthreshold = 25\n").unwrap();
    d.send("-HUP");
    d.wait_for("PERIOD 0.3 -> 4");
    d.wait_for("waited for at most 2.0 s");
}

#[test]
fn the_coordinator_reloads_its_policy_too() {
    let uri = common::test_uri("node.xml");
    let file = config("mem", "period = 0.2\nstarve-pct = 15\n");
    let d = Daemon::start(
        COORDINATOR,
        &["-c", &uri, "--config", file.to_str().unwrap()],
    );
    d.wait_for("cycle 2:");
    // Inconsistent options are refused like a bad file.
    std::fs::write(&file, "period = 0.2\nstarve-pct = 60\n").unwrap();
    d.send("-HUP");
    let error = d.wait_for("reload: ");
    assert!(
        error.contains("--starve-pct (60) must be below --waste-pct"),
        "{error}"
    );
    std::fs::write(
        &file,
        "period = 0.2\nstarve-pct = 10\nhost-reserve-pct = 8\nwait = true\n",
    )
    .unwrap();
    d.send("-HUP");
    let said = d.wait_for("reloaded ");
    // In the user's words, as the scheduler says it; a change only a restart applies is said
    // apart.
    assert!(
        said.contains("--starve-pct 15 -> 10") && said.contains("--host-reserve-pct 5 -> 8"),
        "{said}"
    );
    assert!(!said.contains("--wait"), "{said}");
    let log = d.log();
    assert!(
        log.contains("reload: --wait changes at the next restart (false -> true)"),
        "{log}"
    );
}
