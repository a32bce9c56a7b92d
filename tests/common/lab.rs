//! The real-guest lab (lab/lab.sh), seen from a test: define guests, change their workloads, run
//! the daemons against them, and read what libvirt itself reports (through `virsh`, not through
//! the code under test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The lab directory `make e2e` set up, from `VMB_LAB_DIR`.
pub fn lab_dir() -> PathBuf {
    let dir = std::env::var("VMB_LAB_DIR")
        .expect("VMB_LAB_DIR is not set: run the end-to-end tests with `make e2e`");
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("accel").exists(),
        "{} is not a set-up lab",
        dir.display()
    );
    dir
}

fn lab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/lab.sh")
}

/// Run `cmd`, failing the test when it fails; its standard output.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> String {
    run(Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

/// A guest's spec for [`Lab::guests`].
pub struct Spec<'a> {
    pub name: &'a str,
    pub vcpus: u32,
    pub cur_mib: u64,
    pub max_mib: u64,
    /// pCPU per vCPU, e.g. "0,0"; "-" for unpinned.
    pub pins: &'a str,
    /// First workload, commas for spaces, e.g. "cpu,1,100".
    pub work: &'a str,
}

/// Guests defined by one test; destroyed and undefined when dropped.
pub struct Lab {
    pub dir: PathBuf,
    names: Vec<String>,
}

impl Lab {
    /// Define and start `specs`, and wait until every guest has booted.
    pub fn guests(specs: &[Spec]) -> Self {
        let dir = lab_dir();
        let mut lab = Lab {
            dir,
            names: Vec::new(),
        };
        for s in specs {
            run(Command::new(lab_sh()).arg("define").arg(&lab.dir).args([
                s.name,
                &s.vcpus.to_string(),
                &s.cur_mib.to_string(),
                &s.max_mib.to_string(),
                s.pins,
                s.work,
            ]));
            lab.names.push(s.name.to_string());
        }
        let started = Instant::now();
        for s in specs {
            lab.wait_for_console(s.name, "vmb: ready", Duration::from_secs(120));
        }
        eprintln!(
            "lab: {} guests booted in {:.1} s",
            specs.len(),
            started.elapsed().as_secs_f64()
        );
        lab
    }

    /// libvirt's name of a lab guest.
    pub fn domain(name: &str) -> String {
        format!("vmblab-{name}")
    }

    /// The guest's console log.
    pub fn console(&self, name: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .join("log")
                .join(format!("{}.log", Self::domain(name))),
        )
        .unwrap_or_default()
    }

    /// Wait until the guest's console shows `text`.
    pub fn wait_for_console(&self, name: &str, text: &str, limit: Duration) {
        assert!(
            self.console_shows_within(name, text, limit),
            "{name}: no '{text}' on the console after {limit:?}:\n{}",
            self.console(name)
        );
    }

    /// Wait up to `limit` for the guest's console to show `text`; false if it did not.
    pub fn console_shows_within(&self, name: &str, text: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while !self.console(name).contains(text) {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }

    /// Change a guest's workload ("cpu 1 100", "mem 15 600 20", "idle").
    pub fn send(&self, name: &str, command: &str) {
        run(Command::new(lab_sh())
            .arg("send")
            .arg(&self.dir)
            .args([name, command]));
    }

    /// Destroy and undefine one guest now.
    pub fn remove(&mut self, name: &str) {
        run(Command::new(lab_sh())
            .arg("remove")
            .arg(&self.dir)
            .arg(name));
        self.names.retain(|n| n != name);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new(lab_sh())
                .arg("remove")
                .arg(&self.dir)
                .arg(name)
                .output();
        }
    }
}

/// Stop (`-STOP`) or resume (`-CONT`) guest `name`'s QEMU process, as a QEMU hung on its storage
/// is: its monitor does not answer.
pub fn signal_qemu(name: &str, signal: &str) {
    let pidfile = format!("/run/libvirt/qemu/{}.pid", Lab::domain(name));
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{pidfile}: {e}"));
    let sent = Command::new("kill")
        .args([signal, pid.trim()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// `virsh domstats --raw` of one domain, as key → value.
pub fn domstats(domain: &str, groups: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["domstats", "--raw"];
    args.extend(groups);
    args.push(domain);
    virsh(&args)
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The pCPU each vCPU of a guest is pinned to (`None` when it spans several), from `virsh vcpupin`.
pub fn pins(name: &str) -> Vec<Option<u32>> {
    virsh(&["vcpupin", &Lab::domain(name)])
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            parts.next()?.parse::<u32>().ok()?;
            let cpus = parts.next()?;
            Some(cpus.parse::<u32>().ok())
        })
        .collect()
}

/// Cumulative CPU time of each vCPU of a guest, ns.
pub fn vcpu_times(name: &str) -> Vec<u64> {
    let stats = domstats(&Lab::domain(name), &["--vcpu"]);
    let n: usize = stats["vcpu.current"].parse().unwrap();
    (0..n)
        .map(|i| stats[&format!("vcpu.{i}.time")].parse().unwrap())
        .collect()
}

/// Usage of each pCPU over `window`, from the guests' vCPU times and pins, in percent.
pub fn pcpu_usage(names: &[&str], pcpus: u32, window: Duration) -> Vec<f64> {
    let before: Vec<Vec<u64>> = names.iter().map(|n| vcpu_times(n)).collect();
    let start = Instant::now();
    std::thread::sleep(window);
    let after: Vec<Vec<u64>> = names.iter().map(|n| vcpu_times(n)).collect();
    let secs = start.elapsed().as_secs_f64();
    let mut usage = vec![0.0; pcpus as usize];
    for (i, name) in names.iter().enumerate() {
        for (v, pin) in pins(name).into_iter().enumerate() {
            let pcpu = pin.expect("every vCPU is pinned");
            let delta = after[i][v].saturating_sub(before[i][v]) as f64;
            usage[pcpu as usize] += delta / 1e9 / secs * 100.0;
        }
    }
    usage
}

/// Balloon size, unused memory (MemFree) and usable memory (MemAvailable) of a guest, KiB.
pub fn balloon(name: &str) -> (u64, Option<u64>, Option<u64>) {
    let stats = domstats(&Lab::domain(name), &["--balloon"]);
    let get = |k: &str| stats.get(k).and_then(|v| v.parse().ok());
    (
        get("balloon.current").unwrap(),
        get("balloon.unused"),
        get("balloon.usable"),
    )
}

/// A daemon running against the lab with `--json`: its log (stderr) and its reports (stdout, one
/// JSON object per cycle) captured in files.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    json: PathBuf,
}

/// How a daemon's run ended: exit code, log, and one JSON report per cycle.
pub struct Ended {
    pub code: Option<i32>,
    pub log: String,
    pub reports: Vec<serde_json::Value>,
}

impl Daemon {
    /// Start `bin --json` with `args` against qemu:///system.
    pub fn start(bin: &str, args: &[&str]) -> Self {
        Self::start_with_env(bin, args, &[])
    }

    /// [`Daemon::start`] with the environment variables `env` set.
    pub fn start_with_env(bin: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let file = |ext: &str| {
            std::env::temp_dir().join(format!(
                "vmb-e2e-{}-{}.{ext}",
                Path::new(bin).file_name().unwrap().to_string_lossy(),
                std::process::id()
            ))
        };
        let (log, json) = (file("log"), file("json"));
        let child = Command::new(bin)
            .args(["--connect", "qemu:///system", "--json"])
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&json).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("daemon starts");
        Daemon { child, log, json }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The cycle reports so far (complete lines only).
    pub fn reports(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.json).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Cycles reported so far.
    pub fn cycles(&self) -> usize {
        self.reports().len()
    }

    /// Wait until `n` cycles have been reported.
    pub fn wait_cycles(&mut self, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.cycles() < n {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited early ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < limit,
                "only {} cycles after {limit:?}:\n{}",
                self.cycles(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the daemon runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, wait, and return how it ended.
    pub fn stop(mut self) -> Ended {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let ended = Ended {
            code: status.code(),
            log: self.log(),
            reports: self.reports(),
        };
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.json);
        ended
    }
}
