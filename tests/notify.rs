//! systemd's notify protocol against a fake `NOTIFY_SOCKET`: READY once the first cycle ran,
//! STATUS after each, WATCHDOG pings often enough while the daemon sleeps between cycles, STOPPING
//! at the end; and a cycle that hangs misses the watchdog, which is what gets a stuck daemon
//! restarted.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::notify::{fake_systemd, longest_silence};
use vmbalance::daemon::{LoopOptions, Turn, run_cycles};
use vmbalance::report::CpuReport;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");
/// The watchdog timeout the tests give: pings are due every half of it.
const WATCHDOG: Duration = Duration::from_millis(400);

#[test]
fn the_daemon_says_ready_status_and_stopping_and_feeds_the_watchdog() {
    let (path, rx) = fake_systemd("binary");
    let uri = common::test_uri("node.xml");
    // The test driver's vCPUs are idle: at threshold 0 they are pinned all the same (rule 1).
    let out = Command::new(SCHEDULER)
        .args(["-c", &uri, "--threshold", "0", "--cycles", "4", "1"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    let messages: Vec<(Instant, String)> = rx.try_iter().collect();
    let all: Vec<&str> = messages.iter().flat_map(|(_, m)| m.lines()).collect();
    assert_eq!(
        all.iter().filter(|l| **l == "READY=1").count(),
        1,
        "{all:?}"
    );
    // Ready after the first cycle, its status said just before, in a datagram of its own (a
    // long status cannot make systemd drop READY or a watchdog ping with it).
    let ready = messages
        .iter()
        .position(|(_, m)| m.contains("READY=1"))
        .unwrap();
    assert!(!messages[ready].1.contains("STATUS="), "{messages:?}");
    let status = &messages[ready - 1].1;
    assert!(status.starts_with("STATUS=cycle 1: 3 domains"), "{status}");
    assert!(messages.iter().all(|(_, m)| m.len() < 4096), "{messages:?}");
    assert!(
        all.iter()
            .any(|l| l.starts_with("STATUS=cycle 4: 3 domains; 6 changes")),
        "{all:?}"
    );
    // Three sleeps of a second between four cycles, yet never a silence the watchdog would punish.
    let silence = longest_silence(&messages);
    assert!(silence < WATCHDOG, "{silence:?}");
    assert!(messages.last().unwrap().1.contains("STOPPING=1"), "{all:?}");
}

#[test]
fn a_cycle_that_hangs_misses_the_watchdog() {
    let (path, rx) = fake_systemd("hang");
    // The loop reads the protocol from its environment, as under systemd. This is the only test
    // of this binary that runs in-process.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    }
    let options = LoopOptions {
        period: Duration::from_millis(50),
        cycles: Some(8),
        json: false,
        wait: false,
        metrics: None,
        web: None,
        summary_every: Duration::from_secs(600),
    };
    let mut turn = 0;
    let hung = Duration::from_millis(1000);
    run_cycles("test:///", options, || {
        turn += 1;
        if turn == 4 {
            // Stuck inside a call that never returns in time.
            std::thread::sleep(hung);
        }
        Ok(Turn::Report(CpuReport::new(false)))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let messages: Vec<(Instant, String)> = rx.try_iter().collect();
    // The hung cycle leaves the watchdog unfed past its timeout: systemd would kill and restart
    // the daemon. Elsewhere pings come every cycle.
    assert!(
        longest_silence(&messages) >= hung.min(WATCHDOG * 2),
        "{messages:?}"
    );
    let pings = messages
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 8, "{messages:?}");
}
