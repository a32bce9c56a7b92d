//! `vmbalance_plot` on runs recorded from real guests (`tests/data/run-*.jsonl`, the `--json`
//! output of each daemon): the SVG parses, has one line per pCPU or guest with one point per
//! cycle, and one marker per change. The data is checked, not the pixels.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const PLOT: &str = env!("CARGO_BIN_EXE_vmbalance_plot");

fn reports(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Run the tool on `file` and parse the SVG it writes.
fn plot(file: &str) -> (String, String) {
    let input = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let out =
        std::env::temp_dir().join(format!("vmbalance-plot-{}-{file}.svg", std::process::id()));
    let o = Command::new(PLOT)
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    (svg, String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The polylines of `svg` drawn `width` wide with more than two points (legend samples have
/// two): the data series, as their point counts.
fn series(doc: &roxmltree::Document, width: &str) -> Vec<usize> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some(width))
        .map(|n| n.attribute("points").unwrap().split_whitespace().count())
        .filter(|&points| points > 2)
        .collect()
}

#[test]
fn a_scheduler_run_has_a_line_per_pcpu_and_a_marker_per_pin_change() {
    let runs = reports("run-vcpu_scheduler.jsonl");
    let (svg, said) = plot("run-vcpu_scheduler.jsonl");
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let pcpus: BTreeSet<u64> = runs
        .iter()
        .flat_map(|r| r["pcpus"].as_array().unwrap().iter())
        .map(|p| p["pcpu"].as_u64().unwrap())
        .collect();
    // Each pCPU's line has a point for every cycle that measured it.
    let cycles = runs
        .iter()
        .filter(|r| !r["pcpus"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(series(&doc, "2"), vec![cycles; pcpus.len()], "{svg}");
    let moves: usize = runs
        .iter()
        .map(|r| r["moves"].as_array().unwrap().len())
        .sum();
    assert!(moves > 0);
    let markers = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("r") == Some("6"))
        .count();
    assert_eq!(markers, moves);
    // Axes and legend say what is drawn.
    let text: Vec<&str> = doc
        .descendants()
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for label in [
        "time since start (s)",
        "pCPU demand (% of one pCPU)",
        "pCPU 0",
        "pCPU 1",
    ] {
        assert!(text.contains(&label), "no '{label}' in {text:?}");
    }
    assert!(
        said.contains(&format!("{} changes marked", moves)),
        "{said}"
    );
}

#[test]
fn a_coordinator_run_has_a_balloon_per_guest_a_marker_per_resize_and_the_host() {
    let runs = reports("run-memory_coordinator.jsonl");
    let (svg, _) = plot("run-memory_coordinator.jsonl");
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let guests: BTreeSet<&str> = runs
        .iter()
        .flat_map(|r| r["guests"].as_array().unwrap().iter())
        .map(|g| g["domain"].as_str().unwrap())
        .collect();
    // One balloon line per guest, a point per cycle.
    assert_eq!(series(&doc, "3"), vec![runs.len(); guests.len()], "{svg}");
    let resizes: usize = runs
        .iter()
        .map(|r| r["changes"].as_array().unwrap().len())
        .sum();
    let grown: usize = runs
        .iter()
        .flat_map(|r| r["changes"].as_array().unwrap().iter())
        .filter(|c| c["why"] == "starving")
        .count();
    assert!(grown > 0 && resizes > grown);
    let marks = |mark: &str| {
        doc.descendants()
            .filter(|n| n.has_tag_name("text") && n.text().map(str::trim) == Some(mark))
            .count()
    };
    assert_eq!(marks("\u{25b2}"), grown);
    assert_eq!(marks("\u{25bc}"), resizes - grown);
    let text: Vec<&str> = doc
        .descendants()
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for g in &guests {
        assert!(text.contains(&format!("{g}: balloon").as_str()), "{text:?}");
    }
    for label in ["available", "reserve", "MiB", "time since start (s)"] {
        assert!(text.contains(&label), "no '{label}' in {text:?}");
    }
}

#[test]
fn no_report_is_one_line_and_exit_1() {
    let o = Command::new(PLOT)
        .args(["/dev/null", "-o", "/tmp/never.svg"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no report to draw"), "{err}");
}
