//! Ctrl-C, SIGTERM and SIGHUP, as a loop sees them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

struct StopFlag {
    stopped: Mutex<bool>,
    wake: Condvar,
}

static STOP: StopFlag = StopFlag {
    stopped: Mutex::new(false),
    wake: Condvar::new(),
};

/// Ctrl-C and SIGTERM, as something a loop can sleep on, and SIGHUP as a request to re-read
/// each domain's configuration. The handler is installed once per process; every `StopSignal`
/// sees the same signals.
pub struct StopSignal(());

/// Set by SIGHUP, taken by [`StopSignal::reload_requested`].
static RELOAD: AtomicBool = AtomicBool::new(false);

impl StopSignal {
    /// Handle SIGINT, SIGTERM and SIGHUP (the first call installs the handler: a thread that
    /// waits for them). signal-hook rather than ctrlc, because SIGHUP must not stop the daemon.
    pub fn install() -> anyhow::Result<Self> {
        static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
        INSTALLED
            .get_or_init(|| {
                let mut signals =
                    Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| e.to_string())?;
                std::thread::Builder::new()
                    .name("signals".into())
                    .spawn(move || {
                        for signal in signals.forever() {
                            if signal == SIGHUP {
                                RELOAD.store(true, Ordering::SeqCst);
                                continue;
                            }
                            *STOP.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
                            STOP.wake.notify_all();
                        }
                    })
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(anyhow::Error::msg)
            .context("installing the Ctrl-C/SIGTERM/SIGHUP handler")?;
        Ok(Self(()))
    }

    /// Was SIGHUP received since the last call?
    pub fn reload_requested() -> bool {
        RELOAD.swap(false, Ordering::SeqCst)
    }

    /// Sleep for `period`, waking at once on a signal. Returns true when a stop was requested.
    pub fn sleep(&mut self, period: Duration) -> bool {
        let stopped = STOP.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = STOP
            .wake
            .wait_timeout_while(stopped, period, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    /// True when a stop was requested, without sleeping.
    pub fn requested(&mut self) -> bool {
        Self::stop_requested()
    }

    /// Was a stop requested (Ctrl-C, SIGTERM)? For waits outside the loop, such as a libvirt call
    /// bounded in time, so that the daemon stops within a second whatever libvirt does.
    pub fn stop_requested() -> bool {
        *STOP.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }
}
