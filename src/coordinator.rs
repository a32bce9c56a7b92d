//! One cycle of the memory coordinator: observe balloons, derive consumption, decide, apply.
//!
//! Generic over [`Host`], like [`crate::scheduler`]. It owns what must persist between cycles:
//! which domains have their balloon statistics switched on, which were found without a balloon
//! (warned about once, then left alone), and the sampler's history.

use std::collections::HashMap;
use std::fmt;

use log::{debug, warn};
use serde_json::json;

use crate::daemon::{Report, round1};

use crate::host::{Applied, DomainId, Host, HostMemory};
use crate::mem_plan::{BalloonChange, MemPlan, MemPolicy, MemSnapshot, plan, violations};
use crate::sampling::{MemoryReading, MemorySampler};

/// Stale reports in a row after which the stats period is set again (the domain may have
/// restarted, which resets it) and the operator is warned once.
const STALE_CYCLES_BEFORE_REARM: u32 = 5;

/// How one guest stood in a cycle, for the report.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestLine {
    /// Domain name.
    pub name: String,
    /// Balloon size, KiB.
    pub actual_kib: u64,
    /// Memory the guest can still use, KiB, when reported (`usable`, else `unused`).
    pub free_kib: Option<u64>,
    /// Consumption, KiB/s, when known.
    pub rate_kib_s: Option<f64>,
    /// Status, or why there is none.
    pub state: String,
}

/// What one cycle saw and did.
#[derive(Clone, Debug, Default)]
pub struct MemReport {
    /// One entry per active domain read.
    pub guests: Vec<GuestLine>,
    /// Host memory, when known.
    pub host: Option<HostMemory>,
    /// Resizes made (or, in a dry run, that would have been made).
    pub applied: Vec<(String, BalloonChange)>,
    /// Resizes skipped: domain vanished, call failed, or plan refused.
    pub skipped: usize,
    /// Domains left alone because they have no balloon device.
    pub no_balloon: usize,
    /// True when nothing was changed on purpose.
    pub dry_run: bool,
    /// Hypervisor API calls this cycle made.
    pub api_calls: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl fmt::Display for MemReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            Some(h) => write!(
                f,
                "host available {:.0}/{:.0} MiB",
                mib(h.free_kib),
                mib(h.total_kib)
            )?,
            None => f.write_str("host memory unknown")?,
        }
        for g in &self.guests {
            write!(f, "; {} {:.0} MiB", g.name, mib(g.actual_kib))?;
            if let Some(u) = g.free_kib {
                write!(f, " free {:.0}", mib(u))?;
            }
            if let Some(r) = g.rate_kib_s {
                write!(f, " rate {:+.1} MiB/s", r / 1024.0)?;
            }
            write!(f, " {}", g.state)?;
        }
        if self.no_balloon > 0 {
            write!(f, "; {} without balloon left alone", self.no_balloon)?;
        }
        if self.applied.is_empty() && self.skipped == 0 {
            return f.write_str("; no change");
        }
        let verb = if self.dry_run {
            "would resize"
        } else {
            "resized"
        };
        write!(f, "; {verb} {}:", self.applied.len())?;
        for (name, c) in &self.applied {
            write!(
                f,
                " {name} {:.0}->{:.0} MiB",
                mib(c.from_kib),
                mib(c.to_kib)
            )?;
        }
        if self.skipped > 0 {
            write!(f, "; {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

impl Report for MemReport {
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
        let guests: Vec<_> = self
            .guests
            .iter()
            .map(|g| {
                json!({
                    "domain": g.name,
                    "actual_mib": round1(mib(g.actual_kib)),
                    "free_mib": g.free_kib.map(|k| round1(mib(k))),
                    "rate_mib_s": g.rate_kib_s.map(|r| round1(r / 1024.0)),
                    "state": g.state,
                })
            })
            .collect();
        let changes: Vec<_> = self
            .applied
            .iter()
            .map(|(name, c)| {
                json!({
                    "domain": name,
                    "from_mib": round1(mib(c.from_kib)),
                    "to_mib": round1(mib(c.to_kib)),
                })
            })
            .collect();
        json!({
            "daemon": "memory_coordinator",
            "host": self.host.map(|h| json!({
                "total_mib": round1(mib(h.total_kib)),
                "available_mib": round1(mib(h.free_kib)),
            })),
            "guests": guests,
            "without_balloon": self.no_balloon,
            "dry_run": self.dry_run,
            "changes": changes,
            "skipped": self.skipped,
            "libvirt_calls": self.api_calls,
        })
    }
}

#[derive(Default)]
struct DomainState {
    stats_enabled: bool,
    no_balloon: bool,
    stale_cycles: u32,
    ever_fresh: bool,
    warned_stale: bool,
    seen: u64,
}

/// The memory coordinator's state across cycles.
pub struct Coordinator {
    sampler: MemorySampler,
    policy: MemPolicy,
    stats_period_secs: u32,
    dry_run: bool,
    domains: HashMap<DomainId, DomainState>,
    cycles: u64,
    warned_host_unknown: bool,
}

impl Coordinator {
    /// A coordinator with no history. The guests' stats period is `policy.period_secs` rounded up,
    /// at least one second.
    pub fn new(policy: MemPolicy, dry_run: bool) -> Self {
        Self {
            sampler: MemorySampler::new(),
            stats_period_secs: policy.period_secs.ceil().max(1.0).min(u32::MAX as f64) as u32,
            policy,
            dry_run,
            domains: HashMap::new(),
            cycles: 0,
            warned_host_unknown: false,
        }
    }

    /// Run one cycle. `Ok(None)` when the host has no active domain.
    pub fn cycle(&mut self, host: &mut dyn Host) -> anyhow::Result<Option<MemReport>> {
        self.cycles += 1;
        let samples = host.sample_balloons()?;
        if samples.is_empty() {
            return Ok(None);
        }
        let host_memory = host.host_memory()?;
        if host_memory.is_none() && !self.warned_host_unknown {
            warn!(
                "this libvirt driver does not report host memory: no memory will be given from the host"
            );
            self.warned_host_unknown = true;
        }
        let mut report = MemReport {
            host: host_memory,
            dry_run: self.dry_run,
            ..MemReport::default()
        };
        let mut snapshot = MemSnapshot {
            guests: Vec::new(),
            host: host_memory,
        };
        let mut names = HashMap::new();
        for sample in &samples {
            let (dom, stats) = (&sample.domain, &sample.stats);
            let state = self.domains.entry(dom.id).or_default();
            state.seen = self.cycles;
            if state.no_balloon {
                report.no_balloon += 1;
                continue;
            }
            // On first sight, switch statistics on; the figures read this cycle predate that, and
            // the sampler treats a first report as stale anyway.
            if !state.stats_enabled {
                match host.enable_balloon_stats(&dom.id, self.stats_period_secs) {
                    Ok(Applied::Done) => state.stats_enabled = true,
                    Ok(Applied::Vanished) => continue,
                    Err(e) => {
                        warn!("domain {}: {e:#}; it is left alone", dom.name);
                        state.no_balloon = true;
                        report.no_balloon += 1;
                        continue;
                    }
                }
            }
            let reading = self.sampler.record(dom.id, sample.at, stats);
            let mut line = GuestLine {
                name: dom.name.clone(),
                actual_kib: stats.actual_kib,
                free_kib: stats.usable_kib.or(stats.unused_kib),
                rate_kib_s: None,
                state: String::new(),
            };
            line.state = match reading {
                MemoryReading::Fresh(g) => {
                    line.rate_kib_s = Some(g.rate_kib_s);
                    snapshot.guests.push(g);
                    self.policy.status(&g).to_string()
                }
                MemoryReading::First => "first report".into(),
                MemoryReading::Stale => "waiting for stats".into(),
                MemoryReading::Settling => "balloon settling".into(),
                MemoryReading::Inconsistent => "inconsistent stats".into(),
                MemoryReading::NoStats => "no guest stats".into(),
            };
            if matches!(
                reading,
                MemoryReading::Fresh(_) | MemoryReading::First | MemoryReading::Settling
            ) {
                state.ever_fresh = true;
                state.stale_cycles = 0;
            } else {
                state.stale_cycles += 1;
                if state.stale_cycles >= STALE_CYCLES_BEFORE_REARM {
                    state.stale_cycles = 0;
                    state.stats_enabled = false;
                    if !state.warned_stale {
                        state.warned_stale = true;
                        warn!(
                            "domain {}: no fresh balloon statistics for {} cycles{}; it is left alone until they come",
                            dom.name,
                            STALE_CYCLES_BEFORE_REARM,
                            if state.ever_fresh {
                                ""
                            } else {
                                " (is the virtio_balloon driver loaded in the guest?)"
                            }
                        );
                    }
                }
            }
            names.insert(dom.id, dom.name.clone());
            report.guests.push(line);
        }
        self.sampler.end_cycle();
        let current = self.cycles;
        self.domains.retain(|_, s| s.seen == current);

        let plan = plan(&snapshot, &self.policy);
        let problems = violations(&snapshot, &plan, &self.policy);
        if !problems.is_empty() {
            for p in &problems {
                log::error!("refusing a plan that breaks a limit: {p}");
            }
            report.skipped = plan.changes.len();
            return Ok(Some(report));
        }
        self.apply(host, &plan, &snapshot, &names, &mut report);
        Ok(Some(report))
    }

    /// Apply shrinks, then grows. When a shrink does not happen, the grows it was to fund are cut
    /// by what the host cannot cover above its reserve.
    fn apply(
        &self,
        host: &mut dyn Host,
        plan: &MemPlan,
        snapshot: &MemSnapshot,
        names: &HashMap<DomainId, String>,
        report: &mut MemReport,
    ) {
        let name = |id: &DomainId| names.get(id).cloned().unwrap_or_else(|| id.to_string());
        let mut missing_kib = 0u64;
        let (shrinks, grows): (Vec<_>, Vec<_>) = plan.changes.iter().partition(|c| c.shrinks());
        for c in shrinks {
            if self.set(host, c, &name(&c.id), report) {
                continue;
            }
            missing_kib += c.from_kib - c.to_kib;
        }
        let spare = self
            .policy
            .host_budget_kib(snapshot.host)
            .saturating_sub(plan.from_host_kib);
        let mut uncovered = missing_kib.saturating_sub(spare);
        for c in grows.into_iter().rev() {
            let cut = uncovered.min(c.to_kib - c.from_kib);
            uncovered -= cut;
            let c = BalloonChange {
                to_kib: c.to_kib - cut,
                ..*c
            };
            if c.to_kib > c.from_kib {
                self.set(host, &c, &name(&c.id), report);
            } else {
                report.skipped += 1;
            }
        }
    }

    /// Resize one balloon; true when it was done (or would be, in a dry run).
    fn set(
        &self,
        host: &mut dyn Host,
        c: &BalloonChange,
        name: &str,
        report: &mut MemReport,
    ) -> bool {
        if self.dry_run {
            report.applied.push((name.to_string(), *c));
            return true;
        }
        match host.set_balloon(&c.id, c.to_kib) {
            Ok(Applied::Done) => {
                report.applied.push((name.to_string(), *c));
                true
            }
            Ok(Applied::Vanished) => {
                debug!("domain {name} stopped before its balloon could be set");
                report.skipped += 1;
                false
            }
            Err(e) => {
                warn!("{e:#}");
                report.skipped += 1;
                false
            }
        }
    }
}
