//! The metrics endpoint of both daemons against libvirt's test driver: scraped with a real HTTP
//! client, linted by `promtool check metrics`, values checked; and the endpoint's limits: only
//! GET /metrics and an index, oversized and stalled requests refused or dropped while cycles keep
//! their period.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");
const COORDINATOR: &str = env!("CARGO_BIN_EXE_memory_coordinator");

/// A daemon running with `--metrics-address 127.0.0.1:0`, its log collected as it comes.
struct Running {
    daemon: Daemon,
    address: String,
}

impl Running {
    fn start(bin: &str, args: &[&str]) -> Self {
        let mut all = vec!["--metrics-address", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let daemon = Daemon::start(bin, &all);
        let line = daemon.wait_for("serving metrics at http://");
        let address = line
            .split("http://")
            .nth(1)
            .unwrap()
            .trim_end_matches("/metrics")
            .to_string();
        Self { daemon, address }
    }

    fn log(&self) -> String {
        self.daemon.log()
    }

    fn wait_for(&self, text: &str) -> String {
        self.daemon.wait_for(text)
    }

    fn cycles(&self) -> usize {
        self.log().matches("] cycle ").count()
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = ureq::get(&format!("http://{}{path}", self.address))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    fn scrape(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The value of the sample whose line starts with `series` (name and labels), if any.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promtool check metrics` on `text`: no problem found.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `make test-deps` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scheduler_exports_its_pins_loads_and_cycles() {
    let uri = common::test_uri("node.xml");
    // The test driver's vCPUs are idle: at threshold 0 they are pinned all the same (rule 1).
    let d = Running::start(SCHEDULER, &["-c", &uri, "--threshold", "0", "0.2"]);
    d.wait_for("cycle 4:");
    let text = d.scrape();
    promtool_accepts(&text);
    let log = d.log();
    // The test driver's six vCPUs span every pCPU: cycle 2 pins each of them.
    assert!(log.contains("moved 6:"), "{log}");
    assert_eq!(
        value(&text, "vmbalance_pin_changes_total{reason=\"unpinned\"}"),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "vmbalance_pin_changes_total{reason=\"balance\"}"),
        Some(0.0)
    );
    assert!(value(&text, "vmbalance_cycles_total").unwrap() >= 4.0);
    assert!(value(&text, "vmbalance_decision_duration_seconds_count").unwrap() >= 1.0);
    assert!(value(&text, "vmbalance_libvirt_calls_total").unwrap() >= 4.0);
    assert!(
        value(&text, "vmbalance_pcpu_usage_ratio{pcpu=\"0\"}").is_some(),
        "{text}"
    );
    // One usage series per vCPU the cycle line counts.
    let line = d.wait_for("cycle 4:");
    let counted: usize = line
        .split(" vCPUs")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let vcpus = text
        .lines()
        .filter(|l| l.starts_with("vmbalance_vcpu_usage_ratio{"))
        .count();
    assert_eq!(vcpus, counted, "{line}\n{text}");
    // The reason of each change is in the log line too.
    assert!(log.contains("(not pinned to one pCPU;"), "{log}");
}

#[test]
fn the_coordinator_exports_each_guest_and_its_state() {
    let uri = common::test_uri("node.xml");
    let d = Running::start(COORDINATOR, &["-c", &uri, "0.2"]);
    d.wait_for("cycle 3:");
    let text = d.scrape();
    promtool_accepts(&text);
    let balloons: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vmbalance_guest_balloon_bytes{"))
        .collect();
    // Every guest of the cycle line has its balloon, in bytes, and its state.
    let line = d.wait_for("cycle 3:");
    let guests = line.matches(" MiB ").count();
    assert!(guests >= 2, "{line}");
    assert_eq!(balloons.len(), guests, "{line}\n{text}");
    for series in &balloons {
        let bytes: f64 = series.rsplit(' ').next().unwrap().parse().unwrap();
        let domain = series.split('"').nth(1).unwrap();
        let mib = bytes / 1048576.0;
        assert!(
            line.contains(&format!("{domain} {mib:.0} MiB")),
            "{series}\n{line}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("vmbalance_guest_state{")
                && l.contains("state=\"waiting_for_stats\"")
                && l.ends_with(" 1"))
            .count(),
        guests,
        "{text}"
    );
    // The test driver does not report host memory: no host series rather than made-up ones.
    assert!(!text.contains("vmbalance_host_memory_"), "{text}");
    assert_eq!(
        value(
            &text,
            "vmbalance_balloon_resizes_total{reason=\"starving\"}"
        ),
        Some(0.0)
    );
}

/// Send `request` on a new connection and read the status line of the answer.
fn status_of(address: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or("").to_string()
}

#[test]
fn idle_and_half_sent_connections_do_not_blind_a_scrape() {
    // Before, one connection was served at a time: a scrape beside 8 idle connections took
    // 16.4 s, beyond Prometheus' default 10 s timeout.
    let uri = common::test_uri("node.xml");
    let d = Running::start(SCHEDULER, &["-c", &uri, "1"]);
    d.wait_for("cycle 1:");
    let mut crowd: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&d.address).unwrap())
        .collect();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&d.address).unwrap();
        s.write_all(b"GET /metr").unwrap();
        crowd.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let text = d.scrape();
    let took = started.elapsed();
    eprintln!("a scrape beside 40 idle or half-sent connections took {took:?}");
    assert!(text.contains("vmbalance_cycles_total"), "{text}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Past the limit a connection is told 503 at once, not kept waiting.
    drop(crowd);
    std::thread::sleep(Duration::from_millis(300));
    let limit = vmbalance::metrics::MAX_CONNECTIONS;
    let mut crowd: Vec<TcpStream> = (0..limit + 8)
        .map(|_| TcpStream::connect(&d.address).unwrap())
        .collect();
    // The first `limit` stay open (each holds a slot) while the late ones are read.
    for late in crowd.iter_mut().skip(limit) {
        late.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut answer = String::new();
        let _ = late.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    }
    // Once the crowd leaves, scrapes are served again.
    drop(crowd);
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.scrape().contains("vmbalance_cycles_total"));
}

#[test]
fn the_endpoint_answers_only_what_it_serves_and_a_stalled_scrape_delays_no_cycle() {
    let uri = common::test_uri("node.xml");
    let d = Running::start(SCHEDULER, &["-c", &uri, "0.2"]);
    d.wait_for("cycle 2:");
    let (status, index) = d.get("/");
    assert_eq!(status, 200);
    assert!(index.contains("/metrics"), "{index}");
    assert_eq!(d.get("/nope").0, 404);
    assert_eq!(
        status_of(&d.address, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    assert_eq!(
        status_of(&d.address, huge.as_bytes()),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(
        status_of(&d.address, b"not http at all\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    // Three clients connect and send nothing, and the endpoint drops each after its time limit
    // (2 s): a scrape beside them is answered at once, and the daemon's cycles go on at their
    // period meanwhile.
    let before = d.cycles();
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&d.address).unwrap())
        .collect();
    let text = d.scrape();
    assert!(text.contains("vmbalance_cycles_total"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Dropped after their time limit: their reads end.
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "dropped after {waited:?}");
    // At 0.2 s a cycle, the cycles ran at their pace while the stalled clients were dropped.
    let cycles = d.cycles() - before;
    let expected = waited.as_secs_f64() / 0.2;
    assert!(
        cycles as f64 >= expected * 0.6,
        "{cycles} cycles in {waited:?} (expected about {expected:.0})"
    );
}

#[test]
fn a_bad_or_taken_metrics_address_is_one_line_and_a_non_zero_exit() {
    let uri = common::test_uri("node.xml");
    let o = Command::new(SCHEDULER)
        .args(["-c", &uri, "--metrics-address", "localhost", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--metrics-address"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let o = Command::new(COORDINATOR)
        .args(["-c", &uri, "--metrics-address", &address, "1"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("cannot listen on") && errors[0].contains(&address),
        "{err}"
    );
}

/// The families in an exposition.
fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// Every family either daemon exports, each filled once.
fn every_family() -> std::collections::BTreeSet<String> {
    use std::time::Duration;
    use vmbalance::host::DomainId;
    use vmbalance::metrics::Metrics;
    use vmbalance::report::*;
    let mut m = Metrics::new(Daemon::VcpuScheduler, Duration::from_secs(3));
    let mut cpu = CpuReport::new(false);
    cpu.pcpus = vec![PcpuLine {
        pcpu: 0,
        usage: 50.0,
        demand: Some(60.0),
    }];
    cpu.nodes = vec![NodeLine {
        node: 0,
        spread: 5.0,
    }];
    cpu.vcpu_lines = vec![VcpuLine {
        domain: "d".into(),
        uuid: DomainId([1; 16]),
        vcpu: 0,
        pcpu: Some(0),
        usage: 50.0,
        demand: Some(60.0),
    }];
    cpu.decision_secs = Some(0.001);
    cpu.decision = Decision::Planned;
    cpu.unserved_share = Some(0.0);
    m.export(&cpu);
    m.disconnected();
    let mut all = families(&m.encode());
    let mut m = Metrics::new(Daemon::MemoryCoordinator, Duration::from_secs(3));
    let mut mem = MemReport::new(false);
    mem.host = Some(HostLine {
        total_mib: 1000.0,
        available_mib: 500.0,
        reserve_mib: 50.0,
        unbacked_mib: 10.0,
        stalled_pct: Some(1.0),
    });
    mem.guests = vec![GuestLine {
        domain: "d".into(),
        uuid: DomainId([1; 16]),
        actual_mib: 100.0,
        free_mib: Some(10.0),
        rate_mib_s: Some(1.0),
        state: GuestState::Starving,
    }];
    mem.unmet_share = Some(0.0);
    m.export(&mem);
    all.extend(families(&m.encode()));
    all
}

/// The metrics docs/metrics.md documents: the first column of its tables, in backquotes.
fn documented_metrics() -> std::collections::BTreeSet<String> {
    include_str!("../docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("vmbalance_") || name.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_documented_metrics_are_exactly_those_exported() {
    let exported = every_family();
    let documented = documented_metrics();
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let gone: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && gone.is_empty(),
        "docs/metrics.md lacks {undocumented:?} and documents {gone:?}, which no daemon exports"
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let exported = every_family();
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../dist/grafana-dashboard.json")).unwrap();
    let mut queried = Vec::new();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let Some(targets) = panel["targets"].as_array() else {
            assert_eq!(panel["type"], "row", "{panel}");
            continue;
        };
        for target in targets {
            exprs.push(target["expr"].as_str().unwrap().to_string());
            // A fleet dashboard: every line says which host it is.
            let legend = target["legendFormat"].as_str().unwrap_or("");
            assert!(legend.contains("{{instance}}"), "{target}");
        }
    }
    for a in dashboard["annotations"]["list"].as_array().unwrap() {
        exprs.push(a["expr"].as_str().unwrap().to_string());
    }
    // Each daemon's decision time on its own panel, told apart by its build_info.
    for daemon in ["vcpu_scheduler", "memory_coordinator"] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("vmbalance_decision_duration_seconds_bucket")
                    && e.contains(&format!("daemon=\"{daemon}\""))),
            "{daemon}"
        );
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("vmbalance_") {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|base| exported.contains(*base))
                    .unwrap_or(word);
                queried.push(family.to_string());
            }
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    for name in &queried {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which no daemon exports ({exported:?})"
        );
    }
    // And the dashboard shows what the issue asks for: per-pCPU demand, pin changes by reason,
    // guest memory, host memory against the reserve.
    for needed in [
        "vmbalance_pcpu_demand_ratio",
        "vmbalance_pin_changes_total",
        "vmbalance_guest_balloon_bytes",
        "vmbalance_host_memory_available_bytes",
        "vmbalance_host_memory_reserve_bytes",
        "vmbalance_cpu_pressure_ratio",
        "vmbalance_memory_pressure_ratio",
    ] {
        assert!(queried.iter().any(|q| q == needed), "{needed}");
    }
}

#[test]
fn a_scrape_never_sees_half_of_one_cycle_and_half_of_another() {
    // Each cycle's page is published whole; scrapes racing with publications must each get one
    // page entire. Pages of 40,000 lines take many writes to send, so a torn read would show.
    use vmbalance::metrics::Endpoint;
    let endpoint =
        std::sync::Arc::new(Endpoint::start("127.0.0.1:0".parse().unwrap(), None).unwrap());
    let page = |k: usize| format!("vmbalance_cycles_total {k}\n").repeat(40_000);
    endpoint.publish(page(0));
    let publisher = {
        let endpoint = endpoint.clone();
        std::thread::spawn(move || {
            for k in 1..=200 {
                endpoint.publish(page(k));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    while !publisher.is_finished() {
        let mut s = TcpStream::connect(endpoint.address()).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let lines: std::collections::BTreeSet<&str> = body.lines().collect();
        assert_eq!(lines.len(), 1, "a page mixing cycles: {lines:?}");
        assert_eq!(body.lines().count(), 40_000);
        seen.insert(lines.into_iter().next().unwrap().to_string());
    }
    publisher.join().unwrap();
    // The scrapes did race with the publications: they saw several cycles.
    assert!(seen.len() > 3, "{seen:?}");
}
