//! Is numad running on this machine? numad places processes on NUMA nodes by re-pinning them,
//! QEMU's included; two tools pinning the same vCPUs would undo each other's work.
//!
//! Its pid file (`/run/numad.pid`) names the process; whether it lives is asked with `kill(pid,
//! 0)`, which answers even where the daemon cannot see other users' processes in /proc (the
//! units' `ProtectProc=invisible`): `EPERM` means it lives. Without a pid file, /proc is searched
//! for a process named `numad`.

use std::time::{Duration, Instant};

/// How long an answer holds before it is asked again.
const FRESH_FOR: Duration = Duration::from_secs(60);

/// numad's state as last seen.
#[derive(Debug, Default)]
pub struct Numad {
    seen: Option<(Instant, bool)>,
}

impl Numad {
    /// Does numad run on this machine? Asked at most once a minute.
    pub fn running(&mut self) -> bool {
        match self.seen {
            Some((at, running)) if at.elapsed() < FRESH_FOR => running,
            _ => {
                let running = running_now();
                self.seen = Some((Instant::now(), running));
                running
            }
        }
    }
}

/// Does numad run now?
fn running_now() -> bool {
    for pidfile in ["/run/numad.pid", "/var/run/numad.pid"] {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|&pid| pid > 0)
        {
            return alive_named(pid, "numad");
        }
    }
    named_process_exists("numad")
}

/// Is process `pid` alive, and (where /proc shows it) named `name`? A stale pid file may name a
/// pid reused by another process.
fn alive_named(pid: i32, name: &str) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or(true, |comm| comm.trim() == name)
}

/// Does /proc show a process named `name`?
fn named_process_exists(name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_found_by_pid_and_by_name() {
        let me = std::process::id() as i32;
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let comm = comm.trim();
        assert!(alive_named(me, comm));
        assert!(!alive_named(me, "not-this-one"));
        assert!(named_process_exists(comm));
        assert!(!named_process_exists("no-such-process-name"));
    }
}
