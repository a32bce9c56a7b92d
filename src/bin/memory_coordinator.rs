//! `memory_coordinator PERIOD`: resize guest balloons every PERIOD seconds so starving guests are
//! fed and idle memory goes back to the host.

use std::process::ExitCode;

use anyhow::{Result, ensure};
use clap::Parser;
use log::info;
use vmbalance::coordinator::Coordinator;
use vmbalance::daemon::{
    CommonArgs, Daemon, Given, Running, StopSignal, call_deadline, exit_with, parse_args,
    parse_non_negative, serve,
};
use vmbalance::exclusions::Exclusions;
use vmbalance::host::{Host, HostResult};
use vmbalance::libvirt::LibvirtHost;
use vmbalance::mem_plan::MemPolicy;
use vmbalance::report::MemReport;

/// Move memory between the running libvirt domains and the host with their balloons.
///
/// Every PERIOD seconds it reads each guest's balloon statistics (switching them on first), works
/// out how fast each guest consumes memory, and resizes balloons: guests short of memory and still
/// consuming (STARVING) get memory from the host's spare memory, while guests with much free
/// memory (WASTING) give memory back to the host a step at a time, down to a target free share.
/// It never grants more than the host has above its reserve and the grants its guests have not
/// used yet, never shrinks a guest under its floor, its guaranteed minimum or what it uses, and
/// never grows one past its max memory. It exits 0 when a cycle finds no active domain,
/// and on Ctrl-C or SIGTERM.
#[derive(Parser, Debug, Clone)]
#[command(name = "memory_coordinator", version, allow_negative_numbers = true)]
struct Args {
    /// A guest with less than this % of its memory free, and still consuming, is starving
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.starve_pct, value_parser = parse_non_negative)]
    starve_pct: f64,

    /// A guest with more than this % of its memory free, and not consuming, is wasting
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.waste_pct, value_parser = parse_non_negative)]
    waste_pct: f64,

    /// An idle guest is shrunk until this % of its memory is free [default: mid-way between
    /// --starve-pct and --waste-pct]; it is not shrunk again until it passes --waste-pct
    #[arg(long, value_name = "PCT", value_parser = parse_non_negative)]
    target_free_pct: Option<f64>,

    /// An idle guest is never shrunk under this many MiB free: the cushion a burst (a service
    /// starting) lives on until the coordinator sees it and feeds it
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT.cushion_kib / 1024, value_parser = clap::value_parser!(u64).range(0..=MAX_MIB))]
    cushion_mib: u64,

    /// Keep at least this % of the host's memory available
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.host_reserve_pct, value_parser = parse_non_negative)]
    host_reserve_pct: f64,

    /// Host-pressure mode: take memory back from idle guests only while the host has less than
    /// this % of its memory available [default: always take idle memory back]
    #[arg(long, value_name = "PCT", value_parser = parse_non_negative)]
    host_target_pct: Option<f64>,

    /// The host is pressed, and idle guests give back all they can at once, when its tasks
    /// stalled on memory this % of the last 10 s (the kernel's pressure stall information, read
    /// where the host is this machine)
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.host_stall_pct, value_parser = parse_non_negative)]
    host_stall_pct: f64,

    /// Never shrink a guest below this many MiB
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT.min_guest_kib / 1024, value_parser = clap::value_parser!(u64).range(0..=MAX_MIB))]
    min_guest_mib: u64,

    /// A guest whose used memory grows faster than this many MiB/s is consuming
    #[arg(long, value_name = "MIB_S", default_value_t = DEFAULT.consuming_kib_s / 1024.0, value_parser = parse_rate)]
    consuming_mib_s: f64,

    /// The margin a shrink leaves above what a guest uses, and the smallest step an idle guest
    /// gives back, in MiB
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT.min_step_kib / 1024, value_parser = clap::value_parser!(u64).range(1..=MAX_MIB))]
    min_step_mib: u64,

    /// Largest change of one guest's memory in one cycle, in MiB
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT.max_step_kib / 1024, value_parser = clap::value_parser!(u64).range(1..=MAX_MIB))]
    max_step_mib: u64,

    /// A consuming guest whose free memory would run out within this many periods (and 10 s more,
    /// the time a libvirt restart may leave the coordinator blind) is starving, whatever its
    /// free %
    #[arg(long, value_name = "N", default_value_t = DEFAULT.runway_periods, value_parser = parse_runway)]
    runway_periods: f64,

    /// A starving guest is fed so that, two periods ahead, it still has this % of its memory free
    /// (and --runway-periods periods of its consumption)
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.headroom_pct, value_parser = parse_non_negative)]
    headroom_pct: f64,

    /// Share of a wasting guest's excess memory returned to the host per cycle, in %
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT.return_fraction * 100.0, value_parser = parse_non_negative)]
    return_pct: f64,

    #[command(flatten)]
    common: CommonArgs,
}

/// The policy's defaults, which the options show and take.
const DEFAULT: MemPolicy = MemPolicy::DEFAULT;

/// Largest size any option takes, in MiB (1 PiB): far above any host, and small enough that
/// sizes in KiB cannot wrap.
const MAX_MIB: u64 = 1 << 30;

/// `--runway-periods`: at most 1000 periods.
fn parse_runway(text: &str) -> Result<f64, String> {
    parse_non_negative(text).and_then(|v| {
        (v <= 1000.0)
            .then_some(v)
            .ok_or_else(|| format!("{text} is over 1000"))
    })
}

/// `--consuming-mib-s`: at most 1 TiB/s.
fn parse_rate(text: &str) -> Result<f64, String> {
    parse_non_negative(text).and_then(|v| {
        (v <= MAX_MIB as f64)
            .then_some(v)
            .ok_or_else(|| format!("{text} is over {MAX_MIB}"))
    })
}

impl Args {
    /// What these options ask of the coordinator: its policy, dry-run mode and exclusions.
    fn config(&self) -> Result<(MemPolicy, bool, Exclusions)> {
        Ok((
            self.policy()?,
            self.common.dry_run,
            self.common.exclusions(),
        ))
    }

    /// The policy, after checking the options make sense together.
    fn policy(&self) -> Result<MemPolicy> {
        ensure!(
            self.starve_pct < self.waste_pct,
            "--starve-pct ({}) must be below --waste-pct ({})",
            self.starve_pct,
            self.waste_pct
        );
        ensure!(self.waste_pct <= 100.0, "--waste-pct must be at most 100");
        ensure!(
            self.headroom_pct < self.starve_pct,
            "--headroom-pct ({}) must be below --starve-pct ({})",
            self.headroom_pct,
            self.starve_pct
        );
        let target_free_pct = self
            .target_free_pct
            .unwrap_or((self.starve_pct + self.waste_pct) / 2.0);
        ensure!(
            self.starve_pct < target_free_pct && target_free_pct < self.waste_pct,
            "--target-free-pct ({target_free_pct}) must lie between --starve-pct ({}) and --waste-pct ({})",
            self.starve_pct,
            self.waste_pct
        );
        ensure!(
            self.host_reserve_pct < 100.0,
            "--host-reserve-pct must be below 100"
        );
        if let Some(pct) = self.host_target_pct {
            ensure!(
                self.host_reserve_pct < pct && pct <= 100.0,
                "--host-target-pct ({pct}) must be above --host-reserve-pct ({}) and at most 100",
                self.host_reserve_pct
            );
        }
        ensure!(
            self.return_pct > 0.0 && self.return_pct <= 100.0,
            "--return-pct must be above 0 and at most 100"
        );
        ensure!(
            self.min_step_mib <= self.max_step_mib,
            "--min-step-mib ({}) must not exceed --max-step-mib ({})",
            self.min_step_mib,
            self.max_step_mib
        );
        Ok(MemPolicy {
            starve_pct: self.starve_pct,
            waste_pct: self.waste_pct,
            target_free_pct,
            cushion_kib: self.cushion_mib * 1024,
            host_reserve_pct: self.host_reserve_pct,
            host_target_pct: self.host_target_pct,
            host_stall_pct: self.host_stall_pct,
            min_guest_kib: self.min_guest_mib * 1024,
            consuming_kib_s: self.consuming_mib_s * 1024.0,
            min_step_kib: self.min_step_mib * 1024,
            max_step_kib: self.max_step_mib * 1024,
            return_fraction: self.return_pct / 100.0,
            period_secs: self.common.period.as_secs_f64(),
            runway_periods: self.runway_periods,
            headroom_pct: self.headroom_pct,
            blind_secs: DEFAULT.blind_secs,
        })
    }
}

/// The memory coordinator as a daemon.
struct MemDaemon(Coordinator);

impl Daemon for MemDaemon {
    type Args = Args;
    type Report = MemReport;
    const AT_RESTART: &'static [&'static str] = &[];

    fn common(args: &Args) -> &CommonArgs {
        &args.common
    }

    fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<MemReport>> {
        self.0.cycle(host)
    }

    fn configure(&mut self, args: &Args) -> Result<(), String> {
        let (policy, dry_run, exclusions) = args.config().map_err(|e| format!("{e:#}"))?;
        self.0.reconfigure(policy, dry_run, exclusions);
        Ok(())
    }
}

fn run(args: Args, given: Given, policy: MemPolicy) -> Result<()> {
    let uri = args.common.uri();
    let period = args.common.period;
    let mut host = LibvirtHost::connect(&uri)?
        .with_deadline(call_deadline(period), StopSignal::stop_requested)
        .with_call_budget(args.common.max_libvirt_calls);
    let coordinator =
        Coordinator::new(policy, args.common.dry_run).with_exclusions(args.common.exclusions());
    info!(
        "memory_coordinator on {uri}: period {period:?}, starving under {}% free, wasting over {}% (shrunk to {}% free, {} MiB at least), host reserve {}% (host available memory: {}), {}, guest floor {} MiB{}",
        args.starve_pct,
        args.waste_pct,
        policy.target_free_pct,
        args.cushion_mib,
        args.host_reserve_pct,
        host.memory_figure(),
        match policy.host_target_pct {
            Some(pct) =>
                format!("idle memory taken back only while the host has under {pct}% available"),
            None => "idle memory always taken back".into(),
        },
        args.min_guest_mib,
        args.common.dry_run_note()
    );
    let running = Running {
        args: args.clone(),
        given,
    };
    let result = serve(&mut MemDaemon(coordinator), &mut host, &uri, running);
    host.close();
    result
}

fn main() -> ExitCode {
    let (args, given) = parse_args::<Args>();
    let policy = match args.policy() {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("error: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    args.common.init_logging();
    exit_with(run(args, given, policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbalance::daemon::{options_not_reloaded, restart_options_not_in_the_guide};

    #[test]
    fn every_option_is_applied_by_a_reload_or_said_to_need_a_restart() {
        let missed = options_not_reloaded::<Args>(MemDaemon::AT_RESTART, |args| {
            args.config().ok().map(|config| format!("{config:?}"))
        });
        assert!(
            missed.is_empty(),
            "a reload neither applies these options nor says they need a restart: {missed:?}"
        );
    }

    #[test]
    fn the_operations_guide_lists_every_option_a_reload_does_not_apply() {
        let guide = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"));
        let missing = restart_options_not_in_the_guide(guide, MemDaemon::AT_RESTART);
        assert!(
            missing.is_empty(),
            "docs/operations.md does not list {missing:?}"
        );
    }
}
