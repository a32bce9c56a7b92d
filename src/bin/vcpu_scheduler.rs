//! `vcpu_scheduler PERIOD`: re-pin vCPUs every PERIOD seconds so pCPU load stays balanced.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use log::info;
use vmbalance::cpu_plan::CpuPolicy;
use vmbalance::daemon::{
    CommonArgs, CpuList, StopSignal, UsageError, call_deadline, exit_with, parse_args, parse_cpus,
    parse_non_negative, parse_period, parse_positive_count, reload_args, say_reloaded,
};
use vmbalance::host::{Host, HostError};
use vmbalance::libvirt::LibvirtHost;
use vmbalance::scheduler::{DEFAULT_WINDOW, Scheduler};

/// Balance the vCPUs of the running libvirt domains over the host's pCPUs.
///
/// Every PERIOD seconds it samples the CPU time of every vCPU of every active domain, derives
/// per-vCPU and per-pCPU usage, and re-pins vCPUs so that the busiest pCPU is at most THRESHOLD
/// points above the freest one, with as few pin changes as it can; a gap that the loads' own
/// swings from one sample to the next explain moves nothing. vCPUs not pinned to a single
/// pCPU are pinned once. Where the hypervisor reports run-queue delay (QEMU does), it balances
/// demand, CPU time used plus waited for, instead of usage.
/// It exits 0 when a cycle finds no active domain, and on Ctrl-C or SIGTERM.
#[derive(Parser, Debug, Clone)]
#[command(name = "vcpu_scheduler", version, allow_negative_numbers = true)]
struct Args {
    /// Seconds between two samples, from 0.1 to 86400 (a day), e.g. 3 or 0.5
    #[arg(value_name = "PERIOD", value_parser = parse_period)]
    period: Duration,

    /// Largest allowed gap between the busiest and the freest pCPU, in percentage points
    #[arg(long, value_name = "POINTS", default_value_t = CpuPolicy::DEFAULT.threshold, value_parser = parse_non_negative)]
    threshold: f64,

    /// Samples over which each vCPU's load is averaged before deciding (and logged): 1 judges
    /// the latest sample; swings are allowed for either way, so more mostly smooth the figures,
    /// for slower reactions to lasting changes
    #[arg(long, value_name = "SAMPLES", default_value_t = DEFAULT_WINDOW, value_parser = parse_positive_count)]
    window: usize,

    /// Most pin changes per cycle (default: as many as balance needs); the rest wait for the next
    /// cycles, heaviest unpinned vCPUs and largest gains first
    #[arg(long, value_name = "N", value_parser = parse_positive_count)]
    max_changes: Option<usize>,

    /// Pin vCPUs only to these pCPUs, in cpuset syntax such as 2-15,18 (default: every online
    /// pCPU). Leave out the cores kept for the host. Each vCPU also stays within what its
    /// domain's persistent configuration allows it
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    cpus: Option<CpuList>,

    /// Let vCPUs whose memory is not bound to a NUMA node (no strict <numatune>) move to another
    /// node when their node cannot be balanced within itself. Off by default: a vCPU stays on the
    /// node it runs on, near its memory, and each node is balanced on its own; on, each node is
    /// still balanced within itself first, then a busy node sheds load to a freer one, at the
    /// price of remote memory accesses (tens of percent slower) for what moves
    #[arg(long)]
    cross_node: bool,

    /// Balance the vCPUs numad places too. By default, while numad runs on the host every vCPU is
    /// left alone, and so are the vCPUs of a domain whose vCPU placement is auto (numad's): two
    /// tools pinning the same vCPUs undo each other's work
    #[arg(long)]
    override_numad: bool,

    /// When the daemon stops, put every vCPU it re-pinned back to the affinity it had when the
    /// daemon first saw it, unless someone else pinned it since
    #[arg(long)]
    restore_on_exit: bool,

    #[command(flatten)]
    common: CommonArgs,
}

/// Check `--cpus` against the host: every pCPU named must be online.
fn check_pool(pool: &[u32], online: &[u32], uri: &str) -> Result<()> {
    let missing: Vec<u32> = pool
        .iter()
        .copied()
        .filter(|p| online.binary_search(p).is_err())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "--cpus names pCPUs {missing:?} that are not online on {uri} (online: {online:?})"
    ))
    .into())
}

impl Args {
    /// The planner's policy these options ask for.
    fn policy(&self) -> CpuPolicy {
        CpuPolicy {
            threshold: self.threshold,
            max_changes: self.max_changes,
        }
    }
}

/// SIGHUP: re-read the command line and `--config` file into `running`, and apply what changed
/// to `scheduler` from the next cycle, keeping what it knows. A bad file changes nothing (one
/// error line naming it). `online` are the host's pCPUs, for `--cpus`. The new period, if any.
fn reload(running: &mut Args, scheduler: &mut Scheduler, online: &[u32]) -> Option<Duration> {
    let (new, path) = reload_args::<Args>(running.common.config.as_deref())?;
    if let Some(CpuList(pool)) = &new.cpus
        && let Err(e) = check_pool(pool, online, "this host")
    {
        log::error!(
            "reload of {}: {e}; the running configuration is kept",
            path.display()
        );
        return None;
    }
    let mut changed = Vec::new();
    let mut note = |name: &str, old: String, new: String| {
        if old != new {
            changed.push(format!("{name} {old} -> {new}"));
        }
    };
    note(
        "period",
        format!("{:?}", running.period),
        format!("{:?}", new.period),
    );
    note(
        "threshold",
        running.threshold.to_string(),
        new.threshold.to_string(),
    );
    note("window", running.window.to_string(), new.window.to_string());
    note(
        "max-changes",
        format!("{:?}", running.max_changes),
        format!("{:?}", new.max_changes),
    );
    note(
        "cpus",
        format!("{:?}", running.cpus),
        format!("{:?}", new.cpus),
    );
    note(
        "cross-node",
        running.cross_node.to_string(),
        new.cross_node.to_string(),
    );
    note(
        "dry-run",
        running.common.dry_run.to_string(),
        new.common.dry_run.to_string(),
    );
    note(
        "override-numad",
        running.override_numad.to_string(),
        new.override_numad.to_string(),
    );
    note(
        "exclude",
        format!("{:?}", running.common.exclude),
        format!("{:?}", new.common.exclude),
    );
    vmbalance::daemon::warn_fixed_on_reload(&running.common, &new.common);
    if running.restore_on_exit != new.restore_on_exit {
        log::warn!("reload: restore-on-exit changes at the next restart");
    }
    configure(scheduler, &new);
    say_reloaded(&path, &changed);
    let period = new.period;
    let restore = running.restore_on_exit;
    *running = new;
    running.restore_on_exit = restore;
    Some(period)
}

/// Give `scheduler` what `args` ask for: its policy, window, pool, NUMA crossing, exclusions,
/// numad and period. At start, and again on each reload (what it knows is kept).
fn configure(scheduler: &mut Scheduler, args: &Args) {
    scheduler.set_policy(args.policy(), args.common.dry_run);
    scheduler.set_window(args.window);
    scheduler.set_override_numad(args.override_numad);
    scheduler.set_limits(
        args.cpus.clone().map(|CpuList(pool)| pool),
        args.cross_node,
        args.common.exclusions(),
        args.period,
    );
}

fn run(args: Args) -> Result<()> {
    let uri = args.common.uri();
    let mut host = LibvirtHost::connect(&uri)?
        .with_deadline(call_deadline(args.period), StopSignal::stop_requested);
    let online = host.node_cpus().map_err(HostError::into_anyhow)?.online;
    if let Some(CpuList(pool)) = &args.cpus {
        check_pool(pool, &online, &uri)?;
    }
    let mut scheduler = Scheduler::new(args.policy(), args.common.dry_run);
    configure(&mut scheduler, &args);
    info!(
        "vcpu_scheduler on {uri}: period {:?}, threshold {} points{}{}{}{}",
        args.period,
        args.threshold,
        args.cpus
            .as_ref()
            .map_or(String::new(), |CpuList(pool)| format!(", pCPUs {pool:?}")),
        if args.window > 1 {
            format!(", loads averaged over {} samples", args.window)
        } else {
            String::new()
        },
        args.max_changes.map_or(String::new(), |n| format!(
            ", at most {n} pin changes a cycle"
        )),
        args.common.dry_run_note()
    );
    let scheduler = std::cell::RefCell::new(scheduler);
    let mut running = args.clone();
    let result = args.common.serve(
        &uri,
        args.period,
        &mut host,
        |host| scheduler.borrow_mut().cycle(host),
        || reload(&mut running, &mut scheduler.borrow_mut(), &online),
    );
    let mut scheduler = scheduler.into_inner();
    if args.restore_on_exit && !args.common.dry_run {
        // Stopping: each restore is still waited for, up to the deadline.
        host = host.with_deadline(call_deadline(args.period), || false);
        scheduler.restore(&mut host);
    }
    result
}

fn main() -> ExitCode {
    let args: Args = parse_args();
    args.common.init_logging();
    exit_with(run(args))
}
