//! systemd's service protocol (`Type=notify`), through the `sd-notify` crate: READY once the
//! first cycle has run on a live connection, `WATCHDOG=1` after every turn and while sleeping
//! between cycles, so that a cycle stuck (in libvirt, say) past `WatchdogSec=` gets the daemon
//! killed and restarted, and a one-line `STATUS=` that `systemctl status` shows. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// The daemon's side of the protocol.
#[derive(Debug, Clone)]
pub struct Service {
    /// How often to ping the watchdog: half its timeout, when it is on.
    ping_every: Option<Duration>,
    ready: bool,
}

impl Service {
    /// The protocol as the environment sets it up (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        Self {
            ping_every: sd_notify::watchdog_enabled().map(|timeout| timeout / 2),
            ready: false,
        }
    }

    /// How long the daemon may sleep before it must ping the watchdog again (`None`: no
    /// watchdog).
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// A turn of the loop ended: ping the watchdog, say `status`, and, the first time `up`
    /// (a cycle ran on a live connection), that the daemon is ready.
    pub fn turn(&mut self, up: bool, status: &str) {
        let mut states = vec![NotifyState::Status(status)];
        if self.ping_every.is_some() {
            states.push(NotifyState::Watchdog);
        }
        if up && !self.ready {
            self.ready = true;
            states.push(NotifyState::Ready);
        }
        self.send(&states);
    }

    /// Still alive, between cycles.
    pub fn alive(&self) {
        if self.ping_every.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// Stopping, saying why.
    pub fn stopping(&self, why: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(why)]);
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("telling systemd failed: {e}");
        }
    }
}
