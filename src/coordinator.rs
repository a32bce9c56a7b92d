//! One cycle of the memory coordinator: observe balloons, derive consumption, decide, apply.
//!
//! Generic over [`Host`], like [`crate::scheduler`]. It owns what must persist between cycles:
//! where each domain's balloon statistics stand (switched on, gone stale, or no balloon at all:
//! warned about once, then left alone), and the sampler's history. A cycle runs in four steps:
//! [`Coordinator::arm`] switches statistics on, [`Coordinator::classify`] judges each report,
//! [`Coordinator::decide`] plans and checks the plan against the hard limits, and
//! [`Coordinator::apply`] makes the changes.

use std::collections::HashMap;

use log::warn;

use crate::exclusions::Exclusions;
use crate::host::{
    BalloonSample, DomainId, DomainNames, DomainRef, Host, HostError, HostMemory, HostResult,
    changed_or_skipped,
};
use crate::ledger::Ledger;
use crate::mem_plan::{
    BalloonChange, MemPlan, MemPlanner, MemPolicy, MemSnapshot, MemStatus, Standing, checked_plan,
};
use crate::report::{GuestLine, HostLine, MemReport, ResizeLine, Why, mib};
use crate::sampling::{GuestMemory, MemoryReading, MemorySampler};

/// The report line of a guest: what it shows, and its state (or why it is left alone).
fn guest_line(sample: &BalloonSample, state: &str) -> GuestLine {
    GuestLine {
        domain: sample.domain.name.clone(),
        uuid: sample.domain.id,
        actual_mib: mib(sample.stats.actual_kib),
        free_mib: sample.stats.free_kib().map(mib),
        rate_mib_s: None,
        state: state.into(),
    }
}

/// What a domain the coordinator does not follow (left alone, or without a balloon) may still
/// make the host back: what it reports free, or all of its balloon when it reports nothing. (A
/// domain whose memory is held is backed already.)
fn unbacked_as_reported(sample: &BalloonSample) -> u64 {
    let stats = &sample.stats;
    stats
        .unused_kib
        .filter(|&unused| unused <= stats.actual_kib)
        .unwrap_or(stats.actual_kib)
}

/// Stale reports in a row after which the stats period is set again (the domain may have
/// restarted, which resets it) and the operator is warned once.
const STALE_CYCLES_BEFORE_REARM: u32 = 5;

/// Where a domain's balloon statistics stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stats {
    /// Not switched on yet: first sight, or switched on again after going stale.
    Off,
    /// Switched on; `stale_cycles` cycles in a row without a usable report since.
    On { stale_cycles: u32 },
    /// The domain has no balloon device: it is left alone.
    NoBalloon,
    /// Its memory is held (hugepages, locked, VFIO): shrinking its balloon would free nothing on
    /// the host, so it is left alone.
    Held,
    /// A dry run: statistics are not switched on; the domain is judged on what it reports anyway.
    Watched,
}

/// What the operator has been told about a domain whose statistics go stale: told once, with a
/// hint about the guest driver when no report ever came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StaleNotice {
    /// Not told; no usable report came yet.
    NeverFresh,
    /// Not told; reports came before.
    WasFresh,
    /// Told.
    Given,
}

/// A domain as the coordinator follows it across cycles.
#[derive(Clone)]
struct DomainState {
    stats: Stats,
    notice: StaleNotice,
    /// The cycle it was last seen in; domains not seen in a cycle are forgotten.
    seen: u64,
    /// The run of the domain this state is about (see [`DomainRef::run`]).
    run: Option<u32>,
}

impl DomainState {
    /// Follow how long the domain's reports have been stale: after
    /// [`STALE_CYCLES_BEFORE_REARM`] cycles, switch its statistics on again and tell the operator
    /// (once).
    fn track_staleness(&mut self, reading: &MemoryReading, name: &str) {
        let reporting = matches!(
            reading,
            MemoryReading::Fresh(_) | MemoryReading::First | MemoryReading::Settling
        );
        if reporting {
            self.stats = Stats::On { stale_cycles: 0 };
            if self.notice == StaleNotice::NeverFresh {
                self.notice = StaleNotice::WasFresh;
            }
            return;
        }
        let Stats::On { stale_cycles } = &mut self.stats else {
            return;
        };
        *stale_cycles += 1;
        if *stale_cycles < STALE_CYCLES_BEFORE_REARM {
            return;
        }
        self.stats = Stats::Off;
        if self.notice != StaleNotice::Given {
            warn!(
                "domain {name}: no fresh balloon statistics for {STALE_CYCLES_BEFORE_REARM} cycles{}; it is left alone until they come",
                if self.notice == StaleNotice::WasFresh {
                    ""
                } else {
                    " (is the virtio_balloon driver loaded in the guest?)"
                }
            );
            self.notice = StaleNotice::Given;
        }
    }
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
    exclusions: Exclusions,
    ledger: Ledger,
    planner: MemPlanner,
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
            exclusions: Exclusions::default(),
            ledger: Ledger::new(),
            planner: checked_plan,
        }
    }

    /// Decide with another planner (benchmarks compare policies this way).
    pub fn with_planner(mut self, planner: MemPlanner) -> Self {
        self.planner = planner;
        self
    }

    /// Leave the domains `exclusions` names alone: their balloons are never touched (not even
    /// their statistics period).
    pub fn with_exclusions(mut self, exclusions: Exclusions) -> Self {
        self.exclusions = exclusions;
        self
    }

    /// Run one cycle. `Ok(None)` when the host has no active domain.
    pub fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<MemReport>> {
        self.cycles += 1;
        let samples = host.sample_balloons()?;
        if samples.is_empty() {
            return Ok(None);
        }
        let host_memory = self.host_memory(host)?;
        let mut report = MemReport::new(self.dry_run);
        report.host = host_memory.map(|h| HostLine {
            total_mib: mib(h.total_kib),
            available_mib: mib(h.available_kib),
            reserve_mib: mib(self.policy.reserve_kib(h)),
            unbacked_mib: 0.0,
        });
        let mut snapshot = MemSnapshot {
            host: host_memory,
            ..MemSnapshot::default()
        };
        let mut names = DomainNames::default();
        self.exclusions.begin_cycle();
        for sample in &samples {
            if self.exclusions.excludes(&sample.domain) {
                report.guests.push(guest_line(sample, "excluded"));
                snapshot.unbacked_kib += unbacked_as_reported(sample);
                continue;
            }
            if !self.arm(host, sample, &mut report)? {
                if sample.domain.memory_held.is_none() {
                    snapshot.unbacked_kib += unbacked_as_reported(sample);
                }
                continue;
            }
            let (line, fresh) = self.classify(sample);
            snapshot.unbacked_kib += self
                .ledger
                .unbacked_kib(&sample.domain.id, sample.stats.actual_kib);
            if let Some((g, standing)) = fresh {
                snapshot.guests.push(g);
                snapshot.standing.insert(g.id, standing);
            }
            names.insert(&sample.domain);
            report.guests.push(line);
        }
        self.sampler.end_cycle();
        self.exclusions.end_cycle();
        let current = self.cycles;
        self.domains.retain(|_, s| s.seen == current);
        self.ledger.retain(|id| self.domains.contains_key(id));
        if let Some(h) = &mut report.host {
            h.unbacked_mib = mib(snapshot.unbacked_kib);
        }

        let started = std::time::Instant::now();
        let plan = self.decide(&snapshot, &mut report);
        report.decision_secs = Some(started.elapsed().as_secs_f64());
        if let Some(plan) = plan {
            self.apply(host, &plan, &snapshot, &names, &mut report)?;
        }
        Ok(Some(report))
    }

    /// The host's memory; `None` (said once) when the driver does not report it.
    fn host_memory(&mut self, host: &mut dyn Host) -> HostResult<Option<HostMemory>> {
        match host.host_memory() {
            Ok(memory) => Ok(Some(memory)),
            Err(HostError::Unsupported(_)) => {
                if !std::mem::replace(&mut self.warned_host_unknown, true) {
                    warn!(
                        "this libvirt driver does not report host memory: no memory will be given from the host"
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Make sure the domain of `sample` has its balloon statistics switched on, on first sight
    /// and again after they went stale. False when it is not to be read this cycle: it has no
    /// balloon (counted in the report), or it vanished.
    fn arm(
        &mut self,
        host: &mut dyn Host,
        sample: &BalloonSample,
        report: &mut MemReport,
    ) -> HostResult<bool> {
        let dom = &sample.domain;
        let (dry_run, period) = (self.dry_run, self.stats_period_secs);
        let state = self.follow(dom);
        if let Some(reason) = dom.memory_held {
            if state.stats != Stats::Held {
                warn!(
                    "domain {}: its memory is {reason}, so ballooning it would free nothing on the host; it is left alone",
                    dom.name
                );
                state.stats = Stats::Held;
            }
            report.guests.push(guest_line(sample, "memory held"));
            return Ok(false);
        }
        match state.stats {
            Stats::On { .. } | Stats::Watched => return Ok(true),
            Stats::NoBalloon => {
                report.without_balloon += 1;
                return Ok(false);
            }
            Stats::Off | Stats::Held => {}
        }
        if dry_run {
            // A dry run changes nothing, not even the statistics period.
            log::info!(
                "dry run: domain {}'s balloon statistics are not switched on; it is judged on what it already reports",
                dom.name
            );
            state.stats = Stats::Watched;
            return Ok(true);
        }
        // The figures read this cycle predate the switch; the sampler treats a first report as
        // stale anyway.
        match host.enable_balloon_stats(&dom.id, period) {
            Ok(()) => {
                state.stats = Stats::On { stale_cycles: 0 };
                Ok(true)
            }
            Err(HostError::Vanished(_)) => Ok(false),
            Err(e @ HostError::Disconnected(_)) => Err(e),
            Err(e) => {
                warn!("domain {}: {e:#}; it is left alone", dom.name);
                state.stats = Stats::NoBalloon;
                report.without_balloon += 1;
                Ok(false)
            }
        }
    }

    /// The state of domain `dom`, seen this cycle: new on first sight, and new again when the
    /// domain restarted under the same UUID (its history is forgotten: a new guest as far as its
    /// figures go, and its statistics period is gone too).
    fn follow(&mut self, dom: &DomainRef) -> &mut DomainState {
        let fresh = DomainState {
            stats: Stats::Off,
            notice: StaleNotice::NeverFresh,
            seen: 0,
            run: dom.run,
        };
        let state = self.domains.entry(dom.id).or_insert_with(|| fresh.clone());
        if state.run != dom.run {
            log::debug!("domain {} restarted: its history starts again", dom.name);
            *state = fresh;
            self.sampler.forget(&dom.id);
            self.ledger.forget(&dom.id);
        }
        state.seen = self.cycles;
        state
    }

    /// Judge the report of `sample`: its line in the report, and the guest's figures and
    /// standing when the planner may act on them.
    fn classify(&mut self, sample: &BalloonSample) -> (GuestLine, Option<(GuestMemory, Standing)>) {
        let (dom, stats) = (&sample.domain, &sample.stats);
        let reading = self.sampler.record(dom.id, sample.at, stats);
        let mut line = guest_line(sample, "");
        let mut fresh = None;
        line.state = match reading {
            MemoryReading::Fresh(g) => {
                line.rate_mib_s = Some(g.rate_kib_s / 1024.0);
                self.ledger.observe(&g, &dom.name);
                let standing = self.ledger.standing(&dom.id, dom.guaranteed_kib);
                let status = self.policy.status(&g, &standing);
                self.ledger.judged(&dom.id, status);
                fresh = Some((g, standing));
                if standing.behind && status == MemStatus::Starving {
                    format!("{status} (balloon behind)")
                } else {
                    status.to_string()
                }
            }
            MemoryReading::First => "first report".into(),
            MemoryReading::Stale => "waiting for stats".into(),
            MemoryReading::Settling => "balloon settling".into(),
            MemoryReading::Inconsistent => "inconsistent stats".into(),
            MemoryReading::NoStats => "no guest stats".into(),
        };
        let state = self
            .domains
            .get_mut(&dom.id)
            .expect("armed before it is classified");
        state.track_staleness(&reading, &dom.name);
        (line, fresh)
    }

    /// The plan for `snapshot`, or `None` when it breaks a hard limit: then it is refused whole,
    /// each problem logged as an error, and its changes counted as skipped.
    fn decide(&self, snapshot: &MemSnapshot, report: &mut MemReport) -> Option<MemPlan> {
        // Rule 6: no plan that breaks a hard limit is applied.
        let (plan, problems) = (self.planner)(snapshot, &self.policy);
        if problems.is_empty() {
            return Some(plan);
        }
        for p in &problems {
            log::error!("refusing a plan that breaks a limit: {p}");
        }
        report.skipped = plan.changes.len();
        None
    }

    /// Apply shrinks, then grows (grants never count on this cycle's shrinks: rule 6 of
    /// [`crate::mem_plan`]), and note each change made in the ledger. A balloon is not set again
    /// to the size it was last set to (one that does not get there, or a guest that misreports
    /// it, would be asked every cycle).
    fn apply(
        &mut self,
        host: &mut dyn Host,
        plan: &MemPlan,
        snapshot: &MemSnapshot,
        names: &DomainNames,
        report: &mut MemReport,
    ) -> HostResult<()> {
        for c in &plan.changes {
            if self.ledger.already_set(&c.id, c.to_kib) {
                continue;
            }
            let why = self.reason(c, snapshot);
            if self.set(host, c, why, names, report)? && !self.dry_run {
                self.ledger.resized(c);
            }
        }
        Ok(())
    }

    /// Why change `c` of the plan for `snapshot` is made, in a word and with its figures.
    fn reason(&self, c: &BalloonChange, snapshot: &MemSnapshot) -> (Why, String) {
        let Some(g) = snapshot.guests.iter().find(|g| g.id == c.id) else {
            return (Why::Idle, String::new());
        };
        let free = g.free_pct();
        let rate = g.rate_kib_s / 1024.0;
        if !c.shrinks() {
            return (
                Why::Starving,
                format!("starving: {free:.0}% free, {rate:+.1} MiB/s"),
            );
        }
        let target = self.policy.target_free_pct;
        match snapshot.host {
            Some(h) if h.available_kib < self.policy.reserve_kib(h) => (
                Why::HostShort,
                format!("host under its reserve; {free:.0}% free, idle"),
            ),
            Some(h) if self.policy.host_target_pct.is_some() => (
                Why::HostShort,
                format!(
                    "host at {:.0}% available; {free:.0}% free, idle",
                    100.0 * h.available_kib as f64 / h.total_kib.max(1) as f64
                ),
            ),
            _ => (
                Why::Idle,
                format!("wasting: {free:.0}% free, idle (target {target}%)"),
            ),
        }
    }

    /// Resize one balloon; true when it was done (or would be, in a dry run).
    fn set(
        &self,
        host: &mut dyn Host,
        c: &BalloonChange,
        (why, reason): (Why, String),
        names: &DomainNames,
        report: &mut MemReport,
    ) -> HostResult<bool> {
        let domain = names.of(&c.id);
        let made = self.dry_run
            || changed_or_skipped(
                &domain,
                "its balloon could be set",
                host.set_balloon(&c.id, c.to_kib),
            )?;
        if made {
            report.changes.push(ResizeLine {
                domain,
                from_mib: mib(c.from_kib),
                to_mib: mib(c.to_kib),
                why,
                reason,
            });
        } else {
            report.skipped += 1;
        }
        Ok(made)
    }
}
