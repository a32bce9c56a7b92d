//! systemd's service protocol (`Type=notify`), through the `sd-notify` crate: READY once the
//! first cycle has run on a live connection, `WATCHDOG=1` after every turn and while sleeping
//! between cycles, so that a cycle stuck (in libvirt, say) past `WatchdogSec=` gets the daemon
//! killed and restarted, and a one-line `STATUS=` that `systemctl status` shows. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! systemd drops a notification of 4 KiB or more whole, and a status can grow with the host (it
//! names the domains not answering): the status goes in a datagram of its own, cut to
//! [`MAX_STATUS_BYTES`], so that READY and the watchdog's pings always arrive.

use std::time::Duration;

use sd_notify::NotifyState;

/// The longest status sent, in bytes: far under the 4 KiB systemd accepts in one datagram, and
/// more than `systemctl status` shows on a line.
pub const MAX_STATUS_BYTES: usize = 1024;

/// `status`, cut at a character boundary to at most [`MAX_STATUS_BYTES`] bytes (marked `…`),
/// on one line.
pub fn status_line(status: &str) -> String {
    let one_line = status.replace('\n', " ");
    if one_line.len() <= MAX_STATUS_BYTES {
        return one_line;
    }
    let ellipsis = "…";
    let mut end = MAX_STATUS_BYTES - ellipsis.len();
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &one_line[..end])
}

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

    /// A turn of the loop ended: say `status` (cut to [`MAX_STATUS_BYTES`], in a datagram of
    /// its own), then ping the watchdog and, the first time `up` (a cycle ran on a live
    /// connection), say that the daemon is ready.
    pub fn turn(&mut self, up: bool, status: &str) {
        self.send(&[NotifyState::Status(&status_line(status))]);
        let mut states = Vec::new();
        if self.ping_every.is_some() {
            states.push(NotifyState::Watchdog);
        }
        if up && !self.ready {
            self.ready = true;
            states.push(NotifyState::Ready);
        }
        if !states.is_empty() {
            self.send(&states);
        }
    }

    /// Still alive, between cycles.
    pub fn alive(&self) {
        if self.ping_every.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// Stopping, saying why.
    pub fn stopping(&self, why: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&status_line(why)),
        ]);
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("telling systemd failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_status_is_cut_to_fit_one_datagram_at_a_character_boundary() {
        assert_eq!(status_line("cycle 3: 2 domains"), "cycle 3: 2 domains");
        assert_eq!(status_line("two\nlines"), "two lines");
        // Hundreds of domains not answering, with names of several bytes a character.
        let names: Vec<String> = (0..400).map(|n| format!("gäst-{n}")).collect();
        let long = format!("cycle 9: not answering: {}", names.join(" "));
        let cut = status_line(&long);
        assert!(cut.len() <= MAX_STATUS_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }
}
