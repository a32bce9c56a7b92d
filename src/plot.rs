//! A picture of a run: a daemon's `--json` stream as an SVG timeline (the `vmbalance_plot` tool).
//!
//! - `vcpu_scheduler`: each pCPU's load over time (demand where the hypervisor reports it, usage
//!   otherwise), one line per pCPU, with a marker on the line of the pCPU a vCPU was pinned to at
//!   each pin change.
//! - `memory_coordinator`: above, each guest's balloon size (solid) and free memory (thin) over
//!   time, with a marker at the new size of every resize; below, the host's available memory
//!   against its reserve (when the host reports its memory).
//!
//! Only reports are read, so any recorded run can be drawn again later.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

use crate::report::{CpuReport, Daemon, GuestState, MemReport, ResizeWhy};

/// What a picture shows, counted (the tests check the picture against it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drawn {
    /// Which daemon's run.
    pub daemon: String,
    /// One line per pCPU, or per guest (balloon and free memory count as one guest).
    pub series: usize,
    /// One marker per change.
    pub markers: usize,
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One cycle's report as `--json` prints it: the report, and the time it was printed.
#[derive(Clone, Debug, Deserialize)]
pub struct Stamped<R> {
    /// Unix seconds.
    #[serde(default)]
    pub time: f64,
    /// The report.
    #[serde(flatten)]
    pub report: R,
}

/// A run of one daemon, read back from its `--json` stream.
#[derive(Clone, Debug)]
pub enum Run {
    /// A `vcpu_scheduler` run.
    Cpu(Vec<Stamped<CpuReport>>),
    /// A `memory_coordinator` run.
    Mem(Vec<Stamped<MemReport>>),
}

/// Just the daemon of a report line.
#[derive(Deserialize)]
struct Header {
    daemon: Daemon,
}

/// Read a `--json` stream: one report per line. Lines that are not JSON objects naming a daemon
/// are skipped (a log mixed in), and reports of another daemon than the first one's are ignored;
/// a report that does not read as its daemon's is an error naming its line.
pub fn read_run(text: &str) -> anyhow::Result<Run> {
    let mut run: Option<Run> = None;
    for (n, line) in text.lines().enumerate() {
        let Ok(header) = serde_json::from_str::<Header>(line.trim()) else {
            continue;
        };
        let bad = || format!("line {}: not a {} report", n + 1, header.daemon);
        match (&mut run, header.daemon) {
            (None | Some(Run::Cpu(_)), Daemon::VcpuScheduler) => {
                let report = serde_json::from_str(line).with_context(bad)?;
                match run.get_or_insert_with(|| Run::Cpu(Vec::new())) {
                    Run::Cpu(reports) => reports.push(report),
                    Run::Mem(_) => unreachable!("matched above"),
                }
            }
            (None | Some(Run::Mem(_)), Daemon::MemoryCoordinator) => {
                let report = serde_json::from_str(line).with_context(bad)?;
                match run.get_or_insert_with(|| Run::Mem(Vec::new())) {
                    Run::Mem(reports) => reports.push(report),
                    Run::Cpu(_) => unreachable!("matched above"),
                }
            }
            // Another daemon's report, after the first one's.
            _ => {}
        }
    }
    run.context("no report to draw: give the --json output of vcpu_scheduler or memory_coordinator")
}

/// Draw `run` into the SVG file `out`.
pub fn draw(run: &Run, out: &Path) -> anyhow::Result<Drawn> {
    let drawn = match run {
        Run::Cpu(reports) => draw_cpu(reports, out),
        Run::Mem(reports) => draw_mem(reports, out),
    };
    drawn.with_context(|| format!("drawing {}", out.display()))
}

/// Seconds since the first report of `reports`, for each report.
fn times<R>(reports: &[Stamped<R>]) -> impl Iterator<Item = (f64, &R)> {
    let start = reports.first().map_or(0.0, |r| r.time);
    reports.iter().map(move |r| (r.time - start, &r.report))
}

/// The end of the time axis (at least one second).
fn span<R>(reports: &[Stamped<R>]) -> f64 {
    times(reports).last().map_or(1.0, |(t, _)| t).max(1.0)
}

fn draw_cpu(reports: &[Stamped<CpuReport>], out: &Path) -> anyhow::Result<Drawn> {
    let demand = reports
        .iter()
        .any(|r| r.report.pcpus.iter().any(|p| p.demand.is_some()));
    let figure = if demand { "demand" } else { "usage" };
    // (time, load) per pCPU, and each pCPU's load by cycle time for the markers.
    let mut lines: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    let mut markers = Vec::new();
    for (t, r) in times(reports) {
        let mut load_now = BTreeMap::new();
        for p in &r.pcpus {
            let load = if demand {
                p.demand.unwrap_or(p.usage)
            } else {
                p.usage
            };
            lines.entry(p.pcpu).or_default().push((t, load));
            load_now.insert(p.pcpu, load);
        }
        for m in &r.moves {
            markers.push((t, load_now.get(&m.to).copied().unwrap_or(0.0), m.to));
        }
    }
    let top = lines
        .values()
        .flatten()
        .map(|&(_, y)| y)
        .fold(100.0f64, f64::max)
        * 1.25;
    let root = SVGBackend::new(out, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("vcpu_scheduler: pCPU {figure} over time (\u{25cf} pin change)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..span(reports), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(format!("pCPU {figure} (% of one pCPU)"))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let index: BTreeMap<u32, usize> = lines.keys().enumerate().map(|(i, &p)| (p, i)).collect();
    for (&pcpu, points) in &lines {
        line(
            &mut chart,
            points,
            color(index[&pcpu]),
            2,
            format!("pCPU {pcpu}"),
        )?;
    }
    if !markers.is_empty() {
        chart
            .draw_series(markers.iter().map(|&(t, y, to)| {
                let c = index.get(&to).map_or(BLACK, |&i| color(i));
                Circle::new((t, y), 6, c.filled())
            }))?
            .label("pin change (on the pCPU it went to, at its load then)")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, BLACK.filled()));
        // Several changes to one pCPU in one cycle share a marker: say how many.
        let mut stacked: BTreeMap<(u64, u32), usize> = BTreeMap::new();
        for &(t, _, to) in &markers {
            *stacked.entry(((t * 1000.0) as u64, to)).or_default() += 1;
        }
        chart.draw_series(
            stacked
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(&(ms, to), n)| {
                    let t = ms as f64 / 1000.0;
                    let y = markers
                        .iter()
                        .find(|m| (m.0 * 1000.0) as u64 == ms && m.2 == to)
                        .map_or(0.0, |m| m.1);
                    Text::new(format!("  \u{d7}{n}"), (t, y), ("sans-serif", 14))
                }),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(Drawn {
        daemon: "vcpu_scheduler".into(),
        series: lines.len(),
        markers: markers.len(),
    })
}

/// A chart over time.
type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draw `points` as a line `width` wide in `c`, with `label` in the legend.
fn line(
    chart: &mut Chart,
    points: &[(f64, f64)],
    c: RGBColor,
    width: u32,
    label: String,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            c.stroke_width(width),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width)));
    Ok(())
}

/// Draw `chart`'s legend at `position`, over a light background.
fn legend(chart: &mut Chart, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()?;
    Ok(())
}

/// One guest's lines: (time, balloon MiB) and (time, free MiB).
#[derive(Default)]
struct GuestLines {
    balloon: Vec<(f64, f64)>,
    free: Vec<(f64, f64)>,
}

fn draw_mem(reports: &[Stamped<MemReport>], out: &Path) -> anyhow::Result<Drawn> {
    let mut guests: BTreeMap<String, GuestLines> = BTreeMap::new();
    let mut markers = Vec::new();
    let mut available = Vec::new();
    let mut reserve = Vec::new();
    let mut budget = Vec::new();
    for (t, r) in times(reports) {
        for g in &r.guests {
            let lines = guests.entry(g.domain.clone()).or_default();
            lines.balloon.push((t, g.actual_mib));
            // Figures of a report that is not fresh may predate the stats period.
            let judged = !matches!(
                g.state,
                GuestState::WaitingForStats
                    | GuestState::InconsistentStats
                    | GuestState::FirstReport
            );
            if let (Some(free), true) = (g.free_mib, judged) {
                lines.free.push((t, free));
            }
        }
        for c in &r.changes {
            markers.push((t, c.to_mib, c.domain.clone(), c.why == ResizeWhy::Starving));
        }
        if let Some(h) = &r.host {
            available.push((t, h.available_mib));
            reserve.push((t, h.reserve_mib));
            budget.push((t, (h.available_mib - h.unbacked_mib).max(0.0)));
        }
    }
    let host_known = !available.is_empty();
    let height = if host_known { 820 } else { 560 };
    let root = SVGBackend::new(out, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = if host_known {
        let (u, l) = root.split_vertically(540);
        (u, Some(l))
    } else {
        (root.clone(), None)
    };
    let top = guests
        .values()
        .flat_map(|g| g.balloon.iter().chain(&g.free))
        .map(|&(_, y)| y)
        .fold(1.0f64, f64::max)
        * 1.4;
    let x_end = span(reports);
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            "memory_coordinator: guests' balloons (thick) and free memory (thin); \u{25b2} grown, \u{25bc} shrunk",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("MiB")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let index: BTreeMap<String, usize> = guests
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    for (name, lines) in &guests {
        let c = color(index[name]);
        line(&mut chart, &lines.balloon, c, 3, format!("{name}: balloon"))?;
        line(&mut chart, &lines.free, c, 1, format!("{name}: free"))?;
    }
    chart.draw_series(markers.iter().map(|(t, to, name, grown)| {
        let c = index.get(name).map_or(BLACK, |&i| color(i));
        let mark = if *grown { "\u{25b2}" } else { "\u{25bc}" };
        let style = ("sans-serif", 16)
            .into_font()
            .color(&c)
            .pos(Pos::new(HPos::Center, VPos::Center));
        Text::new(mark, (*t, *to), style)
    }))?;
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    if let Some(lower) = lower {
        let top = available
            .iter()
            .chain(&reserve)
            .map(|&(_, y)| y)
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut host = ChartBuilder::on(&lower)
            .caption(
                "host: available memory against its reserve",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_end, 0.0..top)?;
        host.configure_mesh()
            .x_desc("time since start (s)")
            .y_desc("MiB")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        line(&mut host, &available, BLUE, 2, "available".into())?;
        line(
            &mut host,
            &budget,
            BLUE,
            1,
            "available minus what guests may still touch".into(),
        )?;
        line(&mut host, &reserve, RED, 2, "reserve".into())?;
        legend(&mut host, SeriesLabelPosition::LowerRight)?;
    }
    root.present()?;
    Ok(Drawn {
        daemon: "memory_coordinator".into(),
        series: guests.len(),
        markers: markers.len(),
    })
}
