//! The man pages (`--man`): clap's page from the same definitions as `--help`, with the sections
//! an operator looks for in a daemon's manual: EXIT STATUS, SIGNALS, FILES, ENVIRONMENT, and the
//! domain METADATA each daemon reads.

use crate::domain_xml::METADATA_URI;

/// The man page of command `command` (named `name`), in roff.
pub fn render(command: clap::Command) -> std::io::Result<String> {
    let name = command.get_name().to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    let page = String::from_utf8_lossy(&page).into_owned();
    let extra = sections(&name);
    // Before VERSION, where man pages keep them; at the end where clap wrote no VERSION.
    Ok(match page.find(".SH VERSION") {
        Some(at) => format!("{}{extra}{}", &page[..at], &page[at..]),
        None => format!("{page}{extra}"),
    })
}

/// A section: its title and paragraphs of (tag, text); an empty tag is a plain paragraph.
fn section(title: &str, items: &[(&str, String)]) -> String {
    let mut out = format!(".SH \"{title}\"\n");
    for (tag, text) in items {
        if tag.is_empty() {
            out.push_str(&format!(".PP\n{}\n", escape(text)));
        } else {
            out.push_str(&format!(".TP\n{}\n{}\n", escape(tag), escape(text)));
        }
    }
    out
}

/// `text` safe in roff: backslashes and leading dots or quotes escaped, dashes as minus signs.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\\\").replace('-', "\\-");
    text.lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The extra sections of the daemon `name`.
fn sections(name: &str) -> String {
    if name != "vcpu_scheduler" && name != "memory_coordinator" {
        return String::new();
    }
    let scheduler = name == "vcpu_scheduler";
    let unit = if scheduler {
        "vcpu-scheduler"
    } else {
        "memory-coordinator"
    };
    [
        exit_status(),
        signals(scheduler, unit),
        files(name, scheduler, unit),
        environment(),
        metadata(scheduler),
    ]
    .concat()
}

/// EXIT STATUS: what each status means.
fn exit_status() -> String {
    section(
        "EXIT STATUS",
        &[
            (
                "0",
                "A cycle found no active domain (without --wait), --cycles cycles ran, or SIGINT or SIGTERM stopped the daemon.".into(),
            ),
            (
                "1",
                "An error the daemon cannot get past: libvirt cannot be reached at start, the daemon's user may not use it (join the libvirt group), the metrics address cannot be listened on. One line on stderr says what to do.".into(),
            ),
            (
                "2",
                "A usage error: a bad option or PERIOD, a configuration or web configuration file with a mistake (the line is named), options that contradict each other. One line on stderr.".into(),
            ),
        ],
    )
}

/// SIGNALS: what each signal does to the scheduler (`scheduler`) or the coordinator, run by `unit`.
fn signals(scheduler: bool, unit: &str) -> String {
    let stop = if scheduler {
        "Stop after the current cycle, with exit status 0. With --restore-on-exit, every vCPU the daemon re-pinned is put back to the affinity it had when first seen, unless someone else pinned it since."
    } else {
        "Stop after the current cycle, with exit status 0. Balloons stay where they are."
    };
    section(
        "SIGNALS",
        &[
            ("SIGINT, SIGTERM", stop.into()),
            (
                "SIGHUP",
                format!(
                    "Re-read the --config file and apply it from the next cycle, keeping what the daemon knows (rates, first-seen affinities, the memory ledger); a file with a mistake is refused with one error naming its line, and the running values stay. Also re-read every domain's configured affinity and vmbalance metadata. systemctl reload {unit} sends it."
                ),
            ),
        ],
    )
}

/// FILES: what the daemon `name` reads and its package installs.
fn files(name: &str, scheduler: bool, unit: &str) -> String {
    let mut files = vec![
        (
            format!("/etc/vmbalance/{name}.toml"),
            "The configuration file the unit passes with --config (TOML; keys: period and the long options).".to_string(),
        ),
        (
            format!("/usr/lib/systemd/system/{unit}.service"),
            "The systemd unit: Type=notify with a watchdog, a dynamic user in the libvirt group, no capabilities.".into(),
        ),
        (
            "/usr/share/vmbalance/".into(),
            "grafana-dashboard.json, vmbalance-alerts.yml (Prometheus alert rules) and vmbalance-fleet-rules.yml (recording rules for the Kubernetes descheduler and OpenStack Watcher).".into(),
        ),
    ];
    if scheduler {
        files.push((
            "/run/numad.pid".into(),
            "Whether numad runs on the host (its vCPUs are then left alone; see --override-numad)."
                .into(),
        ));
    } else {
        files.push((
            "/proc/meminfo, /proc/pressure/memory".into(),
            "The host's available memory and memory pressure, where the host is this machine."
                .into(),
        ));
    }
    let files: Vec<(&str, String)> = files.iter().map(|(f, t)| (f.as_str(), t.clone())).collect();
    section("FILES", &files)
}

/// ENVIRONMENT: the variables the daemons read.
fn environment() -> String {
    section(
        "ENVIRONMENT",
        &[
            ("LIBVIRT_DEFAULT_URI", "The libvirt URI when --connect is not given (else qemu:///system).".into()),
            ("RUST_LOG", "The log level (error, warn, info, debug, trace) when neither -v nor -q is given.".into()),
            ("JOURNAL_STREAM", "Set by systemd: when it names stderr, each log line carries its syslog priority and no timestamp, and quiet cycles log at debug level.".into()),
            ("NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID", "Set by systemd for Type=notify: READY, STATUS, STOPPING and watchdog pings go there.".into()),
        ],
    )
}

/// METADATA: what a domain may ask in its own metadata.
fn metadata(scheduler: bool) -> String {
    let mut metadata = vec![
        (
            "",
            format!(
                "A domain speaks to vmbalance in its own libvirt metadata, under the namespace {METADATA_URI}, read once per domain run (SIGHUP re-reads it):"
            ),
        ),
        (
            "",
            format!(
                "virsh metadata DOMAIN --uri {METADATA_URI} --key vmbalance --set '<policy exclude=\"yes\"/>' --live --config"
            ),
        ),
        (
            "<policy exclude=\"yes\"/>",
            if scheduler {
                "Leave the domain alone: read, never re-pinned.".to_string()
            } else {
                "Leave the domain alone: its balloon is never touched.".to_string()
            },
        ),
    ];
    if !scheduler {
        metadata.push((
            "<policy guaranteed-mib=\"1024\"/>",
            "No shrink takes the domain under 1024 MiB (its guaranteed minimum).".into(),
        ));
    }
    section("METADATA", &metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_special_starts_and_dashes_are_escaped() {
        assert_eq!(escape(".TH x\n'y --a"), "\\&.TH x\n\\&'y \\-\\-a");
    }
}
