//! `vmbalance_plot`: draw a daemon's `--json` stream as an SVG timeline.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmbalance::daemon::{exit_with, parse_args};
use vmbalance::plot::{draw, read_run};

/// Draw a run of vcpu_scheduler or memory_coordinator as an SVG timeline.
///
/// Reads the one-JSON-object-per-cycle output of `--json` (a file, or standard input for `-`)
/// and writes one picture: for vcpu_scheduler, each pCPU's load over time with every pin change
/// marked; for memory_coordinator, each guest's balloon and free memory over time with every
/// resize marked, and the host's available memory against its reserve.
#[derive(Parser, Debug)]
#[command(name = "vmbalance_plot", version)]
struct Args {
    /// The --json output of a daemon; - for standard input
    #[arg(value_name = "JSON")]
    input: PathBuf,

    /// The SVG file to write
    #[arg(short, long, value_name = "SVG")]
    output: PathBuf,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let mut text = String::new();
    if args.input.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?;
    }
    let drawn = draw(&read_run(&text)?, &args.output)?;
    println!(
        "{}: {} run, {} series, {} changes marked",
        args.output.display(),
        drawn.daemon,
        drawn.series,
        drawn.markers
    );
    Ok(())
}

fn main() -> ExitCode {
    let (args, _): (Args, _) = parse_args();
    exit_with(run(&args))
}
