//! The daemon loop against a simulated host whose connection drops: reconnection every period,
//! state kept across it. Uses the real `run_cycles` and `host_turn` the binaries use.

mod common;

use std::cell::RefCell;
use std::time::Duration;

use common::sim::SimHost;
use vmbalance::coordinator::Coordinator;
use vmbalance::daemon::{LoopOptions, Turn, host_turn, run_cycles};
use vmbalance::mem_plan::MemPolicy;
use vmbalance::report::{CpuReport, Decision};
use vmbalance::scheduler::{Scheduler, SchedulerConfig};

/// Simulated time per turn; the loop itself waits only a millisecond between turns.
const PERIOD: Duration = Duration::from_secs(3);

fn options(cycles: u64) -> LoopOptions {
    LoopOptions {
        period: Duration::from_millis(1),
        cycles: Some(cycles),
        json: false,
        wait: false,
        metrics: None,
        web: None,
        summary_every: Duration::from_secs(600),
    }
}

/// What each turn of the loop came to: `Some(report)` for a cycle, `None` while disconnected.
type Turns = RefCell<Vec<Option<CpuReport>>>;

/// Run the scheduler in the daemon loop for `cycles` cycles; `before_turn` may change the host
/// before each turn (numbered from 0).
fn run_scheduler(
    host: &mut SimHost,
    cycles: u64,
    mut before_turn: impl FnMut(usize, &mut SimHost),
) -> (anyhow::Result<()>, Vec<Option<CpuReport>>) {
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let turns: Turns = RefCell::new(Vec::new());
    let result = run_cycles("sim:///", options(cycles), || {
        before_turn(turns.borrow().len(), host);
        host.advance(PERIOD);
        let turn = host_turn(host, |h| scheduler.cycle(h))?;
        turns.borrow_mut().push(match &turn {
            Turn::Report(r) => Some(r.clone()),
            _ => None,
        });
        Ok(turn)
    });
    (result, turns.into_inner())
}

#[test]
fn a_connection_lost_mid_cycle_is_reopened_and_the_state_is_kept() {
    let mut host = SimHost::new(2);
    host.add(1, &[(60.0, &[0]), (60.0, &[0])]);
    host.add(2, &[(10.0, &[1])]);
    let (result, turns) = run_scheduler(&mut host, 4, |turn, host| {
        if turn == 1 {
            // The first decision wants a pin change: the connection drops as it is made, and the
            // next two attempts to reconnect fail.
            host.drop_connection_at_next_pin = true;
            host.failing_reconnects = 2;
        }
    });
    result.expect("a lost connection is not an error");
    // Turn 1 lost the connection, turns 2 and 3 found it down (the reconnections that failed),
    // turn 4 runs on the third reconnection.
    assert_eq!(host.reconnects, 3);
    let shape: Vec<bool> = turns.iter().map(Option::is_some).collect();
    assert_eq!(shape, [true, false, false, false, true, true, true]);
    // The scheduler kept its history across the reconnection: the first cycle after it decides
    // at once (a scheduler that started over would only take a first sample), and balances.
    let after = turns[4].as_ref().unwrap();
    assert_eq!(after.decision, Decision::Planned);
    assert_eq!(after.moves.len(), 1, "{after}");
    assert_eq!(host.pins, 1);
}

#[test]
fn a_connection_that_never_comes_back_keeps_the_daemon_retrying_not_failing() {
    let mut host = SimHost::new(2);
    host.add(1, &[(50.0, &[0])]);
    let (result, turns) = run_scheduler(&mut host, 2, |turn, host| {
        if turn == 1 {
            host.connected = false;
            host.failing_reconnects = 5;
        }
        if turn == 7 {
            // An operator's attention, at last.
            host.failing_reconnects = 0;
        }
    });
    result.unwrap();
    assert_eq!(host.reconnects, 6);
    assert_eq!(turns.iter().filter(|t| t.is_some()).count(), 2);
    assert_eq!(turns.len(), 8);
}

#[test]
fn the_memory_coordinator_reconnects_too() {
    let mut host = SimHost::new(1);
    host.add(1, &[(1.0, &[0])]);
    let mut coordinator = Coordinator::new(MemPolicy::default(), false);
    let mut turn = 0;
    let result = run_cycles("sim:///", options(3), || {
        turn += 1;
        if turn == 2 {
            host.connected = false;
            host.failing_reconnects = 1;
        }
        host.advance(PERIOD);
        host_turn(&mut host, |h| coordinator.cycle(h))
    });
    result.unwrap();
    assert_eq!(turn, 5, "3 cycles and 2 turns without a connection");
    assert_eq!(host.reconnects, 2);
    // Statistics were switched on (at first sight, before the connection dropped).
    assert_eq!(
        host.domains[0].mem.stats_period,
        vmbalance::coordinator::STATS_PERIOD_SECS
    );
}

#[test]
fn an_error_that_may_pass_is_retried_and_the_state_is_kept() {
    let mut host = SimHost::new(2);
    host.add(1, &[(60.0, &[0]), (60.0, &[0])]);
    host.add(2, &[(10.0, &[1])]);
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let mut turns: Vec<Option<CpuReport>> = Vec::new();
    let result = run_cycles("sim:///", options(3), || {
        host.advance(PERIOD);
        // Turns 2 to 4 fail as a read of the host does while libvirt restarts.
        let failing = (1..4).contains(&turns.len());
        let turn = host_turn(&mut host, |h| {
            if failing {
                return Err(anyhow::anyhow!(
                    "reading the host's memory statistics: internal error"
                )
                .into());
            }
            scheduler.cycle(h)
        })?;
        turns.push(match &turn {
            Turn::Report(r) => Some(r.clone()),
            _ => None,
        });
        Ok(turn)
    });
    result.expect("an error that may pass does not end the daemon");
    let shape: Vec<bool> = turns.iter().map(Option::is_some).collect();
    assert_eq!(shape, [true, false, false, false, true, true]);
    // The first sample was kept across the failures: the next cycle decides at once.
    let after = turns[4].as_ref().unwrap();
    assert_eq!(after.decision, Decision::Planned, "{after}");
    assert_eq!(host.reconnects, 0);
}

#[test]
fn a_refused_call_ends_the_loop_with_it() {
    let mut host = SimHost::new(1);
    host.add(1, &[(1.0, &[0])]);
    let result = run_cycles("sim:///", options(3), || {
        host_turn(
            &mut host,
            |_| -> vmbalance::host::HostResult<Option<CpuReport>> {
                Err(vmbalance::host::HostError::Denied(
                    "listing the active domains: access denied".into(),
                ))
            },
        )
    });
    let err = result.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "listing the active domains: access denied"
    );
    assert_eq!(host.reconnects, 0);
}
