//! `make install` / `make uninstall`: what lands where, the units systemd accepts, man pages that
//! come from the same definitions as `--help`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `make` runs one at a time: two installs would copy and run the same binaries at once.
static MAKE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn make(args: &[&str]) {
    let _one_at_a_time = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("make")
        .arg("-s")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("make runs");
    assert!(
        out.status.success(),
        "make {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmb-install-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const FILES: [&str; 13] = [
    "usr/bin/vcpu_scheduler",
    "usr/bin/memory_coordinator",
    "usr/share/man/man1/vcpu_scheduler.1",
    "usr/share/man/man1/memory_coordinator.1",
    "usr/bin/vmbalance_plot",
    "usr/share/man/man1/vmbalance_plot.1",
    "usr/share/vmbalance/grafana-dashboard.json",
    "usr/share/vmbalance/vmbalance-alerts.yml",
    "usr/share/vmbalance/vmbalance-fleet-rules.yml",
    "usr/lib/systemd/system/vcpu-scheduler.service",
    "usr/lib/systemd/system/memory-coordinator.service",
    "etc/vmbalance/vcpu_scheduler.toml",
    "etc/vmbalance/memory_coordinator.toml",
];

#[test]
fn install_into_destdir_then_uninstall() {
    let root = scratch("destdir");
    let destdir = format!("DESTDIR={}", root.display());
    make(&["install", &destdir, "PREFIX=/usr"]);
    for f in FILES {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let unit = read(&root.join("usr/lib/systemd/system/vcpu-scheduler.service"));
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/vcpu_scheduler --wait --config /etc/vmbalance/vcpu_scheduler.toml"
        ),
        "{unit}"
    );
    let settings = read(&root.join("etc/vmbalance/memory_coordinator.toml"));
    assert!(settings.contains("\nperiod = 3\n"), "{settings}");
    // The man pages are generated from the same definitions as --help: every option is there.
    let man = read(&root.join("usr/share/man/man1/memory_coordinator.1"));
    assert!(man.contains(".TH memory_coordinator 1"));
    for option in [
        "starve\\-pct",
        "host\\-reserve\\-pct",
        "runway\\-periods",
        "\\-\\-wait",
        "\\-\\-json",
    ] {
        assert!(man.contains(option), "man page lacks {option}");
    }
    // And the sections an operator looks for in a daemon's manual.
    for daemon in ["vcpu_scheduler", "memory_coordinator"] {
        let man = read(&root.join(format!("usr/share/man/man1/{daemon}.1")));
        for section in ["EXIT STATUS", "SIGNALS", "FILES", "ENVIRONMENT", "METADATA"] {
            assert!(
                man.contains(&format!(".SH \"{section}\"")),
                "{daemon}.1 lacks {section}"
            );
        }
        assert!(
            man.contains("SIGHUP") && man.contains("JOURNAL_STREAM"),
            "{daemon}.1"
        );
    }
    // Settings an operator edited survive a reinstall.
    std::fs::write(
        root.join("etc/vmbalance/vcpu_scheduler.toml"),
        "period = 7\n",
    )
    .unwrap();
    make(&["install", &destdir, "PREFIX=/usr"]);
    assert_eq!(
        read(&root.join("etc/vmbalance/vcpu_scheduler.toml")),
        "period = 7\n"
    );

    make(&["uninstall", &destdir, "PREFIX=/usr"]);
    for f in FILES {
        assert!(!root.join(f).exists(), "{f} left behind");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn systemd_accepts_the_units() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: units not verified");
        return;
    }
    // Installed for real under a scratch prefix, so ExecStart names an existing binary.
    let root = scratch("units");
    let prefix = format!("PREFIX={}/usr", root.display());
    let sysconf = format!("SYSCONFDIR={}/etc", root.display());
    make(&["install", &prefix, &sysconf]);
    let units = root.join("usr/lib/systemd/system");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("vcpu-scheduler.service"))
        .arg(units.join("memory-coordinator.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn install_never_installs_packages() {
    // `make -n` prints every command a target would run without running it: no apt-get among them.
    let out = Command::new("make")
        .args(["-n", "install", "DESTDIR=/nonexistent"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("make runs");
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && plan.contains("cargo build"),
        "{plan}"
    );
    assert!(
        !plan.contains("apt-get"),
        "make install would run apt-get:\n{plan}"
    );
}

#[test]
fn binaries_are_replaced_while_a_daemon_runs_from_bin() {
    make(&["binaries"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (bin, built) = (
        root.join("bin/vcpu_scheduler"),
        root.join("target/release/vcpu_scheduler"),
    );
    // Run the daemon from a bin/ file that differs from the build (a byte more at the end), so
    // the next `make` has to replace it.
    let mut older = std::fs::read(&built).unwrap();
    older.push(0);
    let staged = root.join("bin/.vcpu_scheduler.test");
    std::fs::write(&staged, &older).unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &bin).unwrap();
    let mut daemon = KillOnDrop(
        Command::new(&bin)
            .args(["--connect", "test:///default", "--wait", "-q", "1"])
            .spawn()
            .expect("the built daemon starts"),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A copy over the running binary fails with "Text file busy"; a rename over it does not.
    make(&["binaries"]);
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon died while its binary was replaced"
    );
    assert!(
        std::fs::read(&bin).unwrap() == std::fs::read(&built).unwrap(),
        "bin/vcpu_scheduler was not replaced by the new build"
    );
}

/// A child process killed when the test ends, whether it passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_installed_units_are_sandboxed() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: units not scored");
        return;
    }
    let root = scratch("security");
    let prefix = format!("PREFIX={}/usr", root.display());
    let sysconf = format!("SYSCONFDIR={}/etc", root.display());
    make(&["install", &prefix, &sysconf]);
    for unit in ["vcpu-scheduler", "memory-coordinator"] {
        let path = root.join(format!("usr/lib/systemd/system/{unit}.service"));
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let exposure: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|score| score.split_whitespace().next())
            .and_then(|score| score.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level for {unit}:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(exposure <= 2.5, "{unit}: exposure {exposure}\n{text}");
        // No root, no capability, the libvirt socket through the group.
        let unit_text = read(&path);
        for setting in [
            "DynamicUser=yes",
            "SupplementaryGroups=libvirt",
            "CapabilityBoundingSet=\n",
            // The notify protocol, and a watchdog for a daemon stuck in a cycle.
            "Type=notify\n",
            "WatchdogSec=",
            // A configuration error (exit 2) is not retried for ever.
            "RestartPreventExitStatus=2\n",
            // Ordered after libvirt in every layout, sockets included...
            "After=libvirtd.service libvirtd.socket virtqemud.service virtqemud.socket\n",
        ] {
            assert!(unit_text.contains(setting), "{unit} lacks {setting:?}");
        }
        // ...without pulling in either daemon: their units conflict with each other.
        for pull in ["Wants=", "Requires=", "BindsTo=", "Requisite="] {
            assert!(
                !unit_text
                    .lines()
                    .any(|l| l.starts_with(pull) && l.contains("virt")),
                "{unit} pulls libvirt in with {pull}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
