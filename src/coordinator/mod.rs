//! One cycle of the memory coordinator: observe balloons, derive consumption, decide, apply.
//!
//! Generic over [`Host`], like [`crate::scheduler`]. What must persist between cycles about a
//! guest (where its balloon statistics stand, its earlier reports, what it was asked) is its
//! `GuestRecord` (`record.rs`), one per domain run in a [`Tracker`]. A cycle runs in four steps:
//! [`Coordinator::arm`] switches statistics on, [`Coordinator::classify`] judges each report,
//! [`Coordinator::decide`] plans and checks the plan against the hard limits, and
//! [`Coordinator::apply`] makes the changes.

mod record;

use log::warn;

use crate::exclusions::Exclusions;
use crate::host::{
    BalloonSample, DomainId, DomainNames, DomainRef, Host, HostError, HostMemory, HostResult,
    changed_or_skipped,
};
use crate::ledger::{GuestLedger, at_max_kib, host_floor_kib};
use crate::mem_plan::{
    BalloonChange, MemPlan, MemPlanner, MemPolicy, MemSnapshot, PlannedGuest, Standing,
    checked_plan,
};
use crate::report::{GuestLine, GuestState, HostLine, MemReport, ResizeLine, ResizeWhy, mib};
use crate::sampling::{GuestMemory, MemoryHistory, MemoryReading};
use crate::tracker::{Sight, Tracker};
use record::{Followed, GuestRecord, LastFigures, Stats};

/// The report line of a guest: what it shows, and its state (or why it is left alone).
fn guest_line(sample: &BalloonSample, state: GuestState) -> GuestLine {
    GuestLine {
        domain: sample.domain.name.clone(),
        uuid: sample.domain.id,
        actual_mib: mib(sample.stats.actual_kib),
        free_mib: sample.stats.free_kib().map(mib),
        rate_mib_s: None,
        state,
    }
}

/// What a domain the coordinator does not follow (left alone, or without a balloon) may still
/// make the host back: what it reports free, or all of its balloon when it reports nothing; never
/// less than the host's own figure says, and all of its max where its balloon deflates on its own.
/// (A domain whose memory is held is backed already.)
fn unbacked_as_reported(sample: &BalloonSample) -> u64 {
    let stats = &sample.stats;
    if sample.domain.facts.autodeflate {
        return at_max_kib(stats.max_kib, stats.rss_kib);
    }
    stats
        .unused_kib
        .filter(|&unused| unused <= stats.actual_kib)
        .unwrap_or(stats.actual_kib)
        .max(host_floor_kib(stats.actual_kib, stats.rss_kib))
}

/// What one guest's report came to this cycle.
struct Judged {
    /// Its line in the report.
    line: GuestLine,
    /// Its figures and standing, when the planner may act on them.
    fresh: Option<(GuestMemory, Standing)>,
    /// What it may still make the host back, KiB.
    unbacked_kib: u64,
}

/// Seconds between two balloon reports of a guest: the shortest libvirt allows, whatever the
/// coordinator's period, so the report a cycle reads is at most a second old and a burst shows a
/// second after it starts, not a period (the guest's balloon driver posts a few hundred bytes).
pub const STATS_PERIOD_SECS: u32 = 1;

/// The memory coordinator's state across cycles.
pub struct Coordinator {
    policy: MemPolicy,
    stats_period_secs: u32,
    dry_run: bool,
    /// Everything remembered about each guest, one record per domain run.
    guests: Tracker<GuestRecord>,
    warned_host_unknown: bool,
    exclusions: Exclusions,
    planner: MemPlanner,
}

impl Coordinator {
    /// A coordinator with no history. The guests report every [`STATS_PERIOD_SECS`], whatever
    /// the policy's period.
    pub fn new(policy: MemPolicy, dry_run: bool) -> Self {
        Self {
            stats_period_secs: STATS_PERIOD_SECS,
            policy,
            dry_run,
            guests: Tracker::new(),
            warned_host_unknown: false,
            exclusions: Exclusions::default(),
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

    /// Change the policy, dry-run mode and exclusions from the next cycle, keeping all the
    /// coordinator knows (rates, the ledger of grants, balloons behind): a configuration
    /// reloaded.
    pub fn reconfigure(&mut self, policy: MemPolicy, dry_run: bool, exclusions: Exclusions) {
        self.policy = policy;
        self.dry_run = dry_run;
        self.exclusions = exclusions;
    }

    /// Run one cycle. `Ok(None)` when the host has no active domain.
    pub fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<MemReport>> {
        let samples = host.sample_balloons()?;
        let stuck = host.stuck_domains();
        if samples.is_empty() && stuck.is_empty() {
            return Ok(None);
        }
        let host_memory = self.host_memory(host)?;
        let mut report = MemReport::new(self.dry_run);
        report.host = host_memory.map(|h| HostLine {
            total_mib: mib(h.total_kib),
            available_mib: mib(h.available_kib),
            reserve_mib: mib(self.policy.reserve_kib(h)),
            unbacked_mib: 0.0,
            stalled_pct: h.stalled_pct,
        });
        // Each NUMA node's memory, where some guest is bound to nodes (rule 6).
        let bound = samples
            .iter()
            .any(|s| s.domain.facts.memory_nodes.is_some());
        let mut snapshot = MemSnapshot {
            host: host_memory,
            nodes: if bound {
                host.node_memory()?
            } else {
                Vec::new()
            },
            ..MemSnapshot::default()
        };
        let mut names = DomainNames::default();
        self.guests.begin_cycle();
        for sample in &samples {
            self.observe(host, sample, &mut snapshot, &mut report, &mut names)?;
        }
        for dom in &stuck {
            self.count_unanswering(dom, &mut snapshot, &mut report);
        }
        self.guests.end_cycle();
        if let Some(h) = &mut report.host {
            h.unbacked_mib = mib(snapshot.unbacked_kib);
        }

        let started = std::time::Instant::now();
        let plan = self.decide(&snapshot, &mut report);
        report.decision_secs = Some(started.elapsed().as_secs_f64());
        report.unmet_share = self.policy.unmet_share(plan.unmet_kib, snapshot.host);
        self.apply(host, &plan, &snapshot, &names, &mut report)?;
        Ok(Some(report))
    }

    /// Observe the guest of `sample`: its record seen, its statistics armed, its report judged
    /// into `snapshot` (its figures and standing when the planner may act on them, and what it
    /// may still make the host back), its line in `report`, its name in `names`.
    fn observe(
        &mut self,
        host: &mut dyn Host,
        sample: &BalloonSample,
        snapshot: &mut MemSnapshot,
        report: &mut MemReport,
        names: &mut DomainNames,
    ) -> HostResult<()> {
        let dom = &sample.domain;
        let (sight, record) = self.guests.see(dom, GuestRecord::default);
        if sight == Sight::Restarted {
            log::debug!("domain {} restarted: its history starts again", dom.name);
        }
        if self.exclusions.excludes(dom, &mut record.excluded) {
            record.followed = None;
            report.guests.push(guest_line(sample, GuestState::Excluded));
            snapshot.add_unbacked(
                dom.facts.memory_nodes.as_deref(),
                unbacked_as_reported(sample),
            );
            return Ok(());
        }
        let guest = record.followed.get_or_insert_with(Followed::default);
        let (dry_run, period) = (self.dry_run, self.stats_period_secs);
        if !Self::arm(guest, host, sample, dry_run, period, report)? {
            // Not read this cycle: its next report is a first sight.
            guest.history = MemoryHistory::new();
            if dom.facts.memory_held.is_none() {
                snapshot.add_unbacked(
                    dom.facts.memory_nodes.as_deref(),
                    unbacked_as_reported(sample),
                );
            }
            return Ok(());
        }
        let judged = Self::classify(guest, sample, &self.policy);
        snapshot.add_unbacked(dom.facts.memory_nodes.as_deref(), judged.unbacked_kib);
        if let Some((memory, standing)) = judged.fresh {
            snapshot.guests.push(PlannedGuest {
                memory,
                standing,
                nodes: dom.facts.memory_nodes.clone(),
            });
        }
        names.insert(dom);
        report.guests.push(judged.line);
        Ok(())
    }

    /// A domain that does not answer, or whose read failed, keeps its record, and counts in
    /// the budget at its most cautious: all of its max memory the host did not back at its
    /// last read, or all of its max memory when it was never read.
    fn count_unanswering(
        &mut self,
        dom: &DomainRef,
        snapshot: &mut MemSnapshot,
        report: &mut MemReport,
    ) {
        let (_, record) = self.guests.see(dom, GuestRecord::default);
        let last = record.followed.as_ref().and_then(|g| g.last_read);
        let at_max = match last {
            Some(last) => Some(at_max_kib(last.max_kib, last.rss_kib)),
            None => dom.facts.max_kib,
        };
        if dom.facts.memory_held.is_none() {
            let at_max = at_max.unwrap_or(0);
            snapshot.add_unbacked(dom.facts.memory_nodes.as_deref(), at_max);
        }
        report.not_answering.push(dom.name.clone());
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

    /// Make sure `guest`, the domain of `sample`, has its balloon statistics switched on, on
    /// first sight and again after they went stale (with `period`; a `dry_run` only watches).
    /// False when it is not to be read this cycle: it has no balloon (counted in the report), its
    /// memory is held, or it vanished.
    fn arm(
        guest: &mut Followed,
        host: &mut dyn Host,
        sample: &BalloonSample,
        dry_run: bool,
        period: u32,
        report: &mut MemReport,
    ) -> HostResult<bool> {
        let dom = &sample.domain;
        if let Some(reason) = dom.facts.memory_held {
            if guest.stats != Stats::Held {
                warn!(
                    "domain {}: its memory is {reason}, so ballooning it would free nothing on the host; it is left alone",
                    dom.name
                );
                guest.stats = Stats::Held;
            }
            report
                .guests
                .push(guest_line(sample, GuestState::MemoryHeld));
            return Ok(false);
        }
        match guest.stats {
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
            guest.stats = Stats::Watched;
            return Ok(true);
        }
        // The figures read this cycle predate the switch; a first report is taken as stale anyway.
        match host.enable_balloon_stats(&dom.id, period) {
            Ok(()) => {
                guest.stats = Stats::On { stale_cycles: 0 };
                Ok(true)
            }
            // Gone, or busy for now: tried again next cycle.
            Err(HostError::Vanished(_) | HostError::Stuck(_)) => Ok(false),
            Err(e @ HostError::Disconnected(_)) => Err(e),
            Err(e) => {
                warn!("domain {}: {e:#}; it is left alone", dom.name);
                guest.stats = Stats::NoBalloon;
                report.without_balloon += 1;
                Ok(false)
            }
        }
    }

    /// Judge the report of `sample` against what is known of `guest` under `policy`: its line in
    /// the report, its figures and standing when the planner may act on them, and what it may
    /// still make the host back. A report that cannot be true leaves the guest alone and counts
    /// it at its max memory (said once, until its reports are plausible again), as does a balloon
    /// that deflates on its own.
    fn classify(guest: &mut Followed, sample: &BalloonSample, policy: &MemPolicy) -> Judged {
        let (dom, stats) = (&sample.domain, &sample.stats);
        guest.last_read = Some(LastFigures {
            max_kib: stats.max_kib,
            rss_kib: stats.rss_kib,
        });
        let reading = guest.history.record(dom.id, sample.at, stats);
        let mut fresh = None;
        let mut trusted = !dom.facts.autodeflate;
        let state = match reading {
            MemoryReading::Fresh(g) => {
                guest.implausible_said = false;
                guest.ledger.observe(&g, &dom.name);
                // Memory its hugepages hold is a floor too: a shrink into it frees nothing.
                let standing = Standing {
                    self_deflates: dom.facts.autodeflate,
                    ..guest
                        .ledger
                        .standing(dom.facts.guaranteed_kib.max(dom.facts.held_kib))
                };
                let status = policy.status(&g, &standing);
                guest.ledger.judged(status);
                fresh = Some((g, standing));
                GuestState::judged(status, standing.behind)
            }
            MemoryReading::First => GuestState::FirstReport,
            MemoryReading::Stale => GuestState::WaitingForStats,
            MemoryReading::Settling => GuestState::BalloonSettling,
            MemoryReading::Inconsistent(why) => {
                if !std::mem::replace(&mut guest.implausible_said, true) {
                    warn!(
                        "domain {}: its balloon statistics cannot be true ({why}); it is left alone and counted at its max memory while they are so",
                        dom.name
                    );
                }
                trusted = false;
                GuestState::InconsistentStats
            }
            MemoryReading::NoStats => GuestState::NoGuestStats,
        };
        guest.track_staleness(&reading, &dom.name);
        let mut line = guest_line(sample, state);
        line.rate_mib_s = fresh.map(|(g, _)| g.rate_kib_s / 1024.0);
        let unbacked_kib = if trusted {
            guest.ledger.unbacked_kib(stats.actual_kib, stats.rss_kib)
        } else {
            at_max_kib(stats.max_kib, stats.rss_kib)
        };
        Judged {
            line,
            fresh,
            unbacked_kib,
        }
    }

    /// The ledger of guest `id`, where it is followed.
    fn ledger(&mut self, id: &DomainId) -> Option<&mut GuestLedger> {
        let guest = self.guests.get_mut(id)?.followed.as_mut()?;
        Some(&mut guest.ledger)
    }

    /// The plan for `snapshot`, without the changes that break a hard limit: each dropped is
    /// logged as an error and counted as skipped (rule 6).
    fn decide(&self, snapshot: &MemSnapshot, report: &mut MemReport) -> MemPlan {
        let (plan, dropped) = (self.planner)(snapshot, &self.policy);
        for p in &dropped {
            log::error!("dropped a change that breaks a limit: {p}");
        }
        report.skipped += dropped.len();
        plan
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
            if self.ledger(&c.id).is_some_and(|l| l.already_set(c.to_kib)) {
                continue;
            }
            let why = self.reason(c, snapshot);
            if self.set(host, c, why, names, report)? && !self.dry_run {
                self.ledger(&c.id)
                    .expect("planned guests are followed")
                    .resized(c);
            }
        }
        Ok(())
    }

    /// Why change `c` of the plan for `snapshot` is made, in a word and with its figures.
    fn reason(&self, c: &BalloonChange, snapshot: &MemSnapshot) -> (ResizeWhy, String) {
        let Some(g) = snapshot.guest(&c.id) else {
            return (ResizeWhy::Idle, String::new());
        };
        let free = g.free_pct();
        let rate = g.rate_kib_s / 1024.0;
        if !c.shrinks() {
            return (
                ResizeWhy::Starving,
                format!("starving: {free:.0}% free, {rate:+.1} MiB/s"),
            );
        }
        let target = self.policy.target_free_pct;
        let stalled = snapshot.host.and_then(|h| self.policy.stalling(h));
        match (snapshot.host, stalled) {
            (Some(h), _) if h.available_kib < self.policy.reserve_kib(h) => (
                ResizeWhy::HostShort,
                format!("host under its reserve; {free:.0}% free, idle"),
            ),
            (_, Some(stalled)) => (
                ResizeWhy::HostShort,
                format!(
                    "host stalled on memory {stalled:.0}% of the last 10 s; {free:.0}% free, idle"
                ),
            ),
            (Some(h), None) if self.policy.host_target_pct.is_some() => (
                ResizeWhy::HostShort,
                format!(
                    "host at {:.0}% available; {free:.0}% free, idle",
                    100.0 * h.available_kib as f64 / h.total_kib.max(1) as f64
                ),
            ),
            _ => (
                ResizeWhy::Idle,
                format!(
                    "wasting: {free:.0}% free, idle (target {target}% free, at least {} MiB)",
                    self.policy.cushion_kib / 1024
                ),
            ),
        }
    }

    /// Resize one balloon; true when it was done (or would be, in a dry run).
    fn set(
        &self,
        host: &mut dyn Host,
        c: &BalloonChange,
        (why, reason): (ResizeWhy, String),
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
