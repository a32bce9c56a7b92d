//! Opening a connection to libvirt, bounded in time.
//!
//! `virConnectOpen` waits as long as the daemon does not answer: a libvirtd that is stopped
//! (SIGSTOP, a debugger) or hung accepts the socket and never replies. An open therefore runs on a
//! thread of its own and is waited for at most a deadline; an open still running then is kept,
//! and the next attempt takes its answer instead of opening again, so a daemon that thaws gets
//! one connection, not one per attempt.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use virt::connect::Connect;

/// How often a wait looks whether the daemon was asked to stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// How long an open is waited for: longer than a call's deadline, since a socket-activated
/// daemon may be starting; short enough for systemd's start timeout and watchdog.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(15);

/// An open running on its own thread.
pub struct Opening {
    uri: String,
    answer: mpsc::Receiver<anyhow::Result<Connect>>,
}

/// Why an open gave no connection.
#[derive(Debug)]
pub enum NotOpened {
    /// libvirt refused or failed (the message says why).
    Failed(anyhow::Error),
    /// It did not answer within the deadline; it goes on, and the next attempt takes its answer.
    Late,
    /// The daemon is stopping.
    Stopping,
}

impl Opening {
    /// Start opening `uri` with `open`.
    pub fn start(uri: &str, open: fn(&str) -> anyhow::Result<Connect>) -> Self {
        let (tx, answer) = mpsc::channel();
        let owned = uri.to_string();
        let spawned = std::thread::Builder::new()
            .name("libvirt-open".into())
            .spawn(move || {
                // Nobody may wait any more: then the connection is closed.
                let _ = tx.send(open(&owned));
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread to open a connection to libvirt ({e})");
        }
        Self {
            uri: uri.to_string(),
            answer,
        }
    }

    /// Wait at most `deadline` for the connection (less when `stop` says the daemon is
    /// stopping).
    pub fn wait(&self, deadline: Duration, stop: impl Fn() -> bool) -> Result<Connect, NotOpened> {
        let until = Instant::now() + deadline;
        loop {
            if stop() {
                return Err(NotOpened::Stopping);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotOpened::Late);
            }
            match self.answer.recv_timeout(left.min(STOP_CHECK)) {
                Ok(answer) => return answer.map_err(NotOpened::Failed),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(NotOpened::Failed(anyhow::anyhow!(
                        "the thread opening the connection to {} ended without an answer",
                        self.uri
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(_: &str) -> anyhow::Result<Connect> {
        std::thread::sleep(Duration::from_millis(400));
        Connect::open(Some("test:///default")).map_err(|e| anyhow::anyhow!("{e}"))
    }

    #[test]
    fn an_open_past_its_deadline_is_answered_at_the_next_attempt() {
        let opening = Opening::start("test:///default", slow);
        assert!(matches!(
            opening.wait(Duration::from_millis(50), || false),
            Err(NotOpened::Late)
        ));
        // The same open, waited for again, gives its connection.
        let conn = opening.wait(Duration::from_secs(5), || false);
        assert!(conn.is_ok_and(|c| c.is_alive().unwrap_or(false)));
    }

    #[test]
    fn a_stop_ends_the_wait_for_an_open() {
        let opening = Opening::start("test:///default", slow);
        let started = Instant::now();
        assert!(matches!(
            opening.wait(Duration::from_secs(10), || true),
            Err(NotOpened::Stopping)
        ));
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn a_refused_open_says_why() {
        let opening = Opening::start("nowhere:///x", |uri| {
            Connect::open(Some(uri)).map_err(|e| anyhow::anyhow!("{}", e.message()))
        });
        match opening.wait(Duration::from_secs(5), || false) {
            Err(NotOpened::Failed(e)) => assert!(!e.to_string().is_empty()),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
