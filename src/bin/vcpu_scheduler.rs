//! `vcpu_scheduler PERIOD`: re-pin vCPUs every PERIOD seconds so pCPU load stays balanced.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use log::info;
use vmbalance::cpu_plan::CpuPolicy;
use vmbalance::daemon::{
    CommonArgs, CpuList, Daemon, Given, Running, StopSignal, UsageError, call_deadline, exit_with,
    parse_args, parse_cpus, parse_non_negative, parse_positive_count, serve,
};
use vmbalance::host::{Host, HostError, HostResult};
use vmbalance::libvirt::LibvirtHost;
use vmbalance::report::CpuReport;
use vmbalance::scheduler::{DEFAULT_WINDOW, Scheduler, SchedulerConfig};

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
    /// What these options ask of the scheduler.
    fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            policy: CpuPolicy {
                threshold: self.threshold,
                max_changes: self.max_changes,
            },
            dry_run: self.common.dry_run,
            window: self.window,
            pool: self.cpus.clone().map(|CpuList(pool)| pool),
            cross_node: self.cross_node,
            exclusions: self.common.exclusions(),
            period: Some(self.common.period),
            override_numad: self.override_numad,
        }
    }
}

/// The vCPU scheduler as a daemon: the scheduler, and the host's online pCPUs at start, which
/// `--cpus` must name (on a reload too).
struct VcpuDaemon {
    scheduler: Scheduler,
    online: Vec<u32>,
}

impl Daemon for VcpuDaemon {
    type Args = Args;
    type Report = CpuReport;
    const AT_RESTART: &'static [&'static str] = &["restore-on-exit"];

    fn common(args: &Args) -> &CommonArgs {
        &args.common
    }

    fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<CpuReport>> {
        self.scheduler.cycle(host)
    }

    fn configure(&mut self, args: &Args) -> Result<(), String> {
        if let Some(CpuList(pool)) = &args.cpus {
            check_pool(pool, &self.online, "this host").map_err(|e| e.to_string())?;
        }
        self.scheduler.configure(args.config());
        Ok(())
    }
}

fn run(args: Args, given: Given) -> Result<()> {
    let uri = args.common.uri();
    let period = args.common.period;
    let mut host = LibvirtHost::connect(&uri)?
        .with_deadline(call_deadline(period), StopSignal::stop_requested)
        .with_call_budget(args.common.max_libvirt_calls);
    let online = host.node_cpus().map_err(HostError::into_anyhow)?.online;
    if let Some(CpuList(pool)) = &args.cpus {
        check_pool(pool, &online, &uri)?;
    }
    let mut daemon = VcpuDaemon {
        scheduler: Scheduler::new(args.config()),
        online,
    };
    info!(
        "vcpu_scheduler on {uri}: period {period:?}, threshold {} points{}{}{}{}",
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
    let running = Running {
        args: args.clone(),
        given,
    };
    let result = serve(&mut daemon, &mut host, &uri, running);
    if args.restore_on_exit && !args.common.dry_run {
        // Stopping: each restore is still waited for, up to the deadline.
        host = host.with_deadline(call_deadline(period), || false);
        daemon.scheduler.restore(&mut host);
    }
    host.close();
    result
}

fn main() -> ExitCode {
    let (args, given) = parse_args::<Args>();
    args.common.init_logging();
    exit_with(run(args, given))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbalance::daemon::{options_not_reloaded, restart_options_not_in_the_guide};

    #[test]
    fn every_option_is_applied_by_a_reload_or_said_to_need_a_restart() {
        let missed = options_not_reloaded::<Args>(VcpuDaemon::AT_RESTART, |args| {
            Some(format!("{:?}", args.config()))
        });
        assert!(
            missed.is_empty(),
            "a reload neither applies these options nor says they need a restart: {missed:?}"
        );
    }

    #[test]
    fn the_operations_guide_lists_every_option_a_reload_does_not_apply() {
        let guide = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"));
        let missing = restart_options_not_in_the_guide(guide, VcpuDaemon::AT_RESTART);
        assert!(
            missing.is_empty(),
            "docs/operations.md does not list {missing:?}"
        );
    }
}
