//! The configuration files shipped in dist/ (installed in /etc/vmbalance): each one is read as
//! it is by its daemon, names every option, and shows each default as `--help` has it.

mod common;

use std::process::Command;

/// The `--help` of `bin`: each long option and its default where it shows one.
fn options(bin: &str) -> Vec<(String, Option<String>)> {
    let help = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut found: Vec<(String, Option<String>)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let long = trimmed
            .split(", ")
            .last()
            .and_then(|t| t.strip_prefix("--"))
            .map(|t| t.split([' ', '.']).next().unwrap().to_string());
        if trimmed.starts_with('-')
            && let Some(long) = long
        {
            found.push((long, None));
        } else if let (Some(last), Some(default)) = (
            found.last_mut(),
            line.split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next()),
        ) {
            last.1.get_or_insert_with(|| default.to_string());
        }
    }
    found
        .into_iter()
        .filter(|(l, _)| !["config", "help", "version"].contains(&l.as_str()))
        .collect()
}

fn check(bin: &str, file: &str) {
    let path = format!("{}/dist/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    // Every `key = value` line, commented out or not.
    let set: Vec<(String, String)> = text
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once(" = "))
        .filter(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    for (long, default) in options(bin) {
        let shown = set.iter().find(|(k, _)| *k == long);
        assert!(shown.is_some(), "{file} does not show '{long}'");
        if let (Some(default), Some((_, value))) = (default, shown)
            && let (Ok(d), Ok(v)) = (default.parse::<f64>(), value.parse::<f64>())
        {
            assert_eq!(
                d, v,
                "{file}: '{long}' shows {value}, its default is {default}"
            );
        }
    }
    // And the daemon reads it as shipped.
    let uri = common::test_uri("node.xml");
    let o = Command::new(bin)
        .args(["-c", &uri, "--config", &path, "--cycles", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_shipped_scheduler_file_is_whole_and_right() {
    check(env!("CARGO_BIN_EXE_vcpu_scheduler"), "vcpu_scheduler.toml");
}

#[test]
fn the_shipped_coordinator_file_is_whole_and_right() {
    check(
        env!("CARGO_BIN_EXE_memory_coordinator"),
        "memory_coordinator.toml",
    );
}
