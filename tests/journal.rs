//! Logs made for journald: under `JOURNAL_STREAM` (stderr being the journal's stream) every line
//! carries its syslog priority and no timestamp of its own, and quiet cycles stay out of the log;
//! a `JOURNAL_STREAM` that names another stream changes nothing.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");

/// The stderr of the scheduler run for 30 cycles on the test driver, through a pipe; with
/// `JOURNAL_STREAM` naming that pipe when `journal`, else naming something else.
fn run(journal: bool) -> String {
    let (mut reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let stream = if journal {
        format!("{}:{}", meta.dev(), meta.ino())
    } else {
        format!("{}:{}", meta.dev(), meta.ino() + 1)
    };
    let uri = common::test_uri("node.xml");
    let mut child = Command::new(SCHEDULER)
        .args(["-c", &uri, "--cycles", "30", "0.1"])
        .env("JOURNAL_STREAM", stream)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut log = String::new();
    reader.read_to_string(&mut log).unwrap();
    assert!(child.wait().unwrap().success(), "{log}");
    log
}

#[test]
fn under_the_journal_each_line_has_a_priority_and_quiet_cycles_stay_out() {
    let log = run(true);
    for line in log.lines() {
        let prio = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .and_then(|(p, _)| p.parse::<u8>().ok());
        assert!(prio.is_some_and(|p| (3..=7).contains(&p)), "{line}\n{log}");
        assert!(!line.contains("[20"), "a second timestamp: {line}");
    }
    assert!(log.contains("<6>cycle 1:"), "{log}");
    // Cycle 2 pins the test driver's vCPUs: a change, said.
    assert!(log.contains("<6>cycle 2:"), "{log}");
    // The host is quiet after: no line per cycle.
    let cycle_lines = log.lines().filter(|l| l.contains("cycle ")).count();
    assert!(cycle_lines <= 4, "{log}");
    assert!(log.contains("<6>done: 30 cycles"), "{log}");
}

#[test]
fn a_journal_stream_that_is_not_stderr_changes_nothing() {
    let log = run(false);
    assert!(!log.contains("<6>"), "{log}");
    // On a terminal or in a file every cycle is said, with its timestamp.
    assert_eq!(log.matches("] cycle ").count(), 30, "{log}");
}
