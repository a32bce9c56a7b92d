//! A fake service manager: what systemd's notify socket receives, with the time it came.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A datagram socket at a fresh path named after `name`, and a thread collecting what it
/// receives with the time it came.
pub fn fake_systemd(name: &str) -> (PathBuf, mpsc::Receiver<(Instant, String)>) {
    let path = std::env::temp_dir().join(format!("vmb-notify-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if tx.send((Instant::now(), text)).is_err() {
                break;
            }
        }
    });
    (path, rx)
}

/// The longest gap between two watchdog pings in `messages`.
pub fn longest_silence(messages: &[(Instant, String)]) -> Duration {
    let pings: Vec<Instant> = messages
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(pings.len() >= 2, "{messages:?}");
    pings.windows(2).map(|w| w[1] - w[0]).max().unwrap()
}
