//! One cycle of the vCPU scheduler: observe the host, derive usage, decide, apply.
//!
//! Generic over [`Host`], so the same cycle runs against libvirt in the daemon and against a
//! simulated host in tests and benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use log::{debug, info, warn};
use serde_json::json;

use crate::daemon::{Report, round1};

use crate::cpu_plan::{Basis, CpuPlan, CpuPolicy, PinMove, plan};
use crate::host::{Applied, DomainId, Host};
use crate::sampling::{CpuSampler, CpuSnapshot, pcpu_demand, pcpu_usage};

/// What one cycle saw and did.
#[derive(Clone, Debug, Default)]
pub struct CycleReport {
    /// Number of active domains seen.
    pub domains: usize,
    /// Number of vCPUs seen.
    pub vcpus: usize,
    /// Usage of each online pCPU, as measured this cycle (empty on the first cycle).
    pub usage: BTreeMap<u32, f64>,
    /// Demand of each online pCPU, where the hypervisor reports run-queue delay.
    pub demand: Option<BTreeMap<u32, f64>>,
    /// The plan, from the second cycle on.
    pub plan: Option<CpuPlan>,
    /// Moves made (or, in a dry run, that would have been made).
    pub applied: Vec<PinMove>,
    /// Moves skipped because the domain vanished, or that failed.
    pub skipped: usize,
    /// Domain names, for the report.
    pub names: HashMap<DomainId, String>,
    /// True when nothing was changed on purpose.
    pub dry_run: bool,
    /// Hypervisor API calls this cycle made.
    pub api_calls: u64,
    /// The balance threshold in force, in points.
    pub threshold: f64,
}

/// Busiest minus freest of per-pCPU figures.
fn spread(per_pcpu: &BTreeMap<u32, f64>) -> f64 {
    let max = per_pcpu.values().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = per_pcpu.values().copied().fold(f64::INFINITY, f64::min);
    if per_pcpu.is_empty() { 0.0 } else { max - min }
}

impl CycleReport {
    fn name(&self, id: &DomainId) -> String {
        self.names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

impl fmt::Display for CycleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} domains, {} vCPUs", self.domains, self.vcpus)?;
        if self.usage.is_empty() {
            return write!(f, "; first sample, usage from the next cycle");
        }
        f.write_str("; pCPU usage %:")?;
        for (p, u) in &self.usage {
            write!(f, " {p}:{u:.1}")?;
        }
        write!(f, " (spread {:.1})", spread(&self.usage))?;
        if let Some(demand) = &self.demand {
            f.write_str("; demand %:")?;
            for (p, d) in demand {
                write!(f, " {p}:{d:.1}")?;
            }
        }
        let Some(plan) = &self.plan else {
            return f.write_str("; settling after the last pin changes, no decision");
        };
        if self.demand.is_some() {
            f.write_str(match plan.basis {
                Basis::Demand => "; balancing demand",
                Basis::Usage => "; balancing usage",
            })?;
        }
        if plan.moves.is_empty() {
            return if plan.before.fixable_spread <= self.threshold {
                f.write_str("; balanced, no change")
            } else {
                f.write_str("; no pin change would pay off, no change")
            };
        }
        let verb = if self.dry_run { "would move" } else { "moved" };
        write!(f, "; {verb} {}:", self.applied.len())?;
        for m in &self.applied {
            let from = m.from.map_or("*".to_string(), |p| p.to_string());
            write!(
                f,
                " {} vCPU{} {}->{}",
                self.name(&m.key.domain),
                m.key.vcpu,
                from,
                m.to
            )?;
        }
        if self.skipped > 0 {
            write!(f, "; {} skipped", self.skipped)?;
        }
        let basis = match plan.basis {
            Basis::Usage => "usage",
            Basis::Demand => "demand",
        };
        write!(f, "; predicted {basis} spread {:.1}", plan.after.spread)
    }
}

impl Report for CycleReport {
    fn changes(&self) -> usize {
        self.applied.len()
    }

    fn skipped(&self) -> usize {
        self.skipped
    }

    fn set_api_calls(&mut self, calls: u64) {
        self.api_calls = calls;
    }

    fn to_json(&self) -> serde_json::Value {
        let pcpus: Vec<_> = self
            .usage
            .iter()
            .map(|(p, u)| {
                let demand = self.demand.as_ref().and_then(|d| d.get(p)).copied();
                json!({"pcpu": p, "usage": round1(*u), "demand": demand.map(round1)})
            })
            .collect();
        let moves: Vec<_> = self
            .applied
            .iter()
            .map(|m| {
                json!({
                    "domain": self.name(&m.key.domain),
                    "uuid": m.key.domain.to_string(),
                    "vcpu": m.key.vcpu,
                    "from": m.from,
                    "to": m.to,
                    "load": round1(m.usage),
                })
            })
            .collect();
        let (decision, basis) = match &self.plan {
            _ if self.usage.is_empty() => ("first_sample", None),
            None => ("settling", None),
            Some(plan) => (
                "planned",
                Some(match plan.basis {
                    Basis::Usage => "usage",
                    Basis::Demand => "demand",
                }),
            ),
        };
        json!({
            "daemon": "vcpu_scheduler",
            "domains": self.domains,
            "vcpus": self.vcpus,
            "pcpus": pcpus,
            "decision": decision,
            "basis": basis,
            "dry_run": self.dry_run,
            "moves": moves,
            "skipped": self.skipped,
            "libvirt_calls": self.api_calls,
        })
    }
}

/// The vCPU scheduler's state across cycles.
pub struct Scheduler {
    sampler: CpuSampler,
    policy: CpuPolicy,
    planner: Planner,
    dry_run: bool,
    cycles: u64,
    /// Set after a cycle that changed pins: the next interval straddles the change, so its
    /// figures mix the old placement and the new, and the next cycle only observes.
    settling: bool,
    /// Whether to observe only after a cycle that changed pins (on by default).
    settle_after_changes: bool,
    /// Whether the host reports run-queue delay, once known (said once in the log).
    delay_reported: Option<bool>,
}

/// Samples over which vCPU loads are averaged by default (see [`CpuSampler`]): one, the latest
/// sample. The planner allows for swings whatever the window; a longer window sees a lasting
/// change only part by part, and then corrects it in several steps (see BENCHMARKS.md).
pub const DEFAULT_WINDOW: usize = 1;

/// A vCPU planning policy: a snapshot in, pin moves out.
pub type Planner = fn(&CpuSnapshot, &CpuPolicy) -> CpuPlan;

impl Scheduler {
    /// A scheduler with no history, averaging loads over [`DEFAULT_WINDOW`] samples.
    pub fn new(policy: CpuPolicy, dry_run: bool) -> Self {
        Self::with_planner(policy, dry_run, plan)
    }

    /// A scheduler deciding with another planner (benchmarks compare policies this way).
    pub fn with_planner(policy: CpuPolicy, dry_run: bool, planner: Planner) -> Self {
        Self {
            sampler: CpuSampler::with_window(DEFAULT_WINDOW),
            policy,
            planner,
            dry_run,
            cycles: 0,
            settling: false,
            settle_after_changes: true,
            delay_reported: None,
        }
    }

    /// Average vCPU loads over the last `window` samples (1: judge each sample alone).
    pub fn with_window(mut self, window: usize) -> Self {
        self.sampler = CpuSampler::with_window(window);
        self
    }

    /// Decide in every cycle, even right after pin changes (benchmarks use it to run the seed's
    /// one-move-per-period policy as it was).
    pub fn without_settling(mut self) -> Self {
        self.settle_after_changes = false;
        self
    }

    /// Run one cycle. `Ok(None)` when the host has no active domain.
    pub fn cycle(&mut self, host: &mut dyn Host) -> anyhow::Result<Option<CycleReport>> {
        self.cycles += 1;
        let node = host.node_cpus()?;
        let samples = host.sample_vcpus()?;
        if samples.is_empty() {
            return Ok(None);
        }
        let mut report = CycleReport {
            dry_run: self.dry_run,
            threshold: self.policy.threshold,
            ..CycleReport::default()
        };
        self.sampler.begin(&node.online);
        for sample in &samples {
            self.sampler
                .record(sample.domain.id, sample.at, &sample.vcpus);
            report.domains += 1;
            report.vcpus += sample.vcpus.len();
            report
                .names
                .insert(sample.domain.id, sample.domain.name.clone());
        }
        let snapshot = self.sampler.finish();
        if self.cycles == 1 {
            return Ok(Some(report));
        }
        report.usage = pcpu_usage(&snapshot);
        report.demand = pcpu_demand(&snapshot);
        let reported = report.demand.is_some();
        if self.delay_reported != Some(reported) {
            self.delay_reported = Some(reported);
            if reported {
                info!(
                    "the hypervisor reports vCPU run-queue delay: balancing demand (CPU time used plus waited for)"
                );
            } else {
                info!("the hypervisor reports no vCPU run-queue delay: balancing usage");
            }
        }
        if std::mem::take(&mut self.settling) {
            return Ok(Some(report));
        }
        let plan = (self.planner)(&snapshot, &self.policy);
        for m in &plan.moves {
            if self.dry_run {
                report.applied.push(*m);
                continue;
            }
            let name = report.name(&m.key.domain);
            match host.pin_vcpu(&m.key.domain, m.key.vcpu, m.to) {
                Ok(Applied::Done) => report.applied.push(*m),
                Ok(Applied::Vanished) => {
                    debug!(
                        "domain {name} stopped before vCPU{} could be pinned",
                        m.key.vcpu
                    );
                    report.skipped += 1;
                }
                Err(e) => {
                    warn!("{e:#}");
                    report.skipped += 1;
                }
            }
        }
        report.plan = Some(plan);
        self.settling = self.settle_after_changes && !self.dry_run && !report.applied.is_empty();
        Ok(Some(report))
    }
}
