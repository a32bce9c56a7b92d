//! What a daemon cycle reports: plain structs, serialized as is for `--json` and shown as the one
//! log line of the cycle, so the two can never disagree.
//!
//! Figures are kept as computed; in JSON, loads and sizes are rounded to one decimal.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use crate::cpu_plan::Basis;
use crate::host::DomainId;
use crate::mem_plan::MemStatus;

/// What every cycle report offers the daemon loop.
pub trait Report: fmt::Display + Serialize {
    /// Changes made (pins or balloons; in a dry run, the changes that would have been made).
    fn changes(&self) -> usize;

    /// Changes skipped because their domain vanished or the call failed.
    fn skipped(&self) -> usize;

    /// Record how many hypervisor API calls the cycle made.
    fn set_api_calls(&mut self, calls: u64);

    /// What is wrong on the host this cycle, in words that stay the same while it lasts (no
    /// figures), so the log can say it when it begins and changes rather than every cycle;
    /// `None` when nothing is.
    fn trouble(&self) -> Option<String>;
}

/// The parts of a trouble, and the domains not answering, joined; `None` when there is none.
fn troubles(mut parts: Vec<String>, not_answering: &[String]) -> Option<String> {
    if !not_answering.is_empty() {
        parts.push(format!("not answering: {}", not_answering.join(" ")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Round to one decimal, for figures in JSON output.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn rounded<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round1(*x))
}

fn rounded_opt<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => s.serialize_some(&round1(*x)),
        None => s.serialize_none(),
    }
}

/// Busiest minus freest of some per-pCPU figures (0 for none).
pub fn spread(figures: impl IntoIterator<Item = f64>) -> f64 {
    let (min, max) = figures
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    if min > max { 0.0 } else { max - min }
}

named_enum! {
    /// Which daemon a report comes from.
    pub enum Daemon {
        /// `vcpu_scheduler`.
        VcpuScheduler = "vcpu_scheduler",
        /// `memory_coordinator`.
        MemoryCoordinator = "memory_coordinator",
    }
}

/// How far a vCPU scheduler cycle got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// No usage yet (the first cycle, or the first whose reads answered), or no demand yet
    /// where run-queue delay is read: no decision.
    #[default]
    FirstSample,
    /// Right after pin changes: observed only (rule 7 of [`crate::cpu_plan`]).
    Settling,
    /// A plan was made.
    Planned,
}

/// One pCPU's figures in a vCPU scheduler cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PcpuLine {
    /// pCPU number.
    pub pcpu: u32,
    /// Usage, percent of the pCPU.
    #[serde(serialize_with = "rounded")]
    pub usage: f64,
    /// Demand, where the hypervisor reports run-queue delay.
    #[serde(serialize_with = "rounded_opt")]
    pub demand: Option<f64>,
}

/// One NUMA node's balance in a vCPU scheduler cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeLine {
    /// NUMA node.
    pub node: u32,
    /// Busiest minus freest of its online pCPUs, in the figure balanced (demand where reported).
    #[serde(serialize_with = "rounded")]
    pub spread: f64,
}

named_enum! {
    /// Why a pin change was made, in a word: the `reason` label of the pin change counter.
    pub enum PinWhy {
        /// A vCPU not pinned to one pCPU was pinned (rule 1 of [`crate::cpu_plan`]).
        Unpinned = "unpinned",
        /// A vCPU pinned outside the pCPUs it may use was brought back into them (rule 9).
        OutsideAllowed = "outside_allowed",
        /// A vCPU moved from a busier pCPU to a freer one (rules 2-4).
        Balance = "balance",
    }
}

named_enum! {
    /// Why a balloon was resized, in a word: the `reason` label of the resize counter.
    pub enum ResizeWhy {
        /// A starving guest was fed (rule 3 of [`crate::mem_plan`]).
        Starving = "starving",
        /// A wasting guest gave memory back (rules 3 and 4).
        Idle = "idle",
        /// A wasting guest gave memory back while the host was short (under its reserve, or
        /// under its target in host-pressure mode).
        HostShort = "host_short",
    }
}

named_enum! {
    /// How a guest stood in a memory coordinator cycle: its status, or why it has none.
    pub enum GuestState {
        /// Little free memory and still consuming.
        Starving = "STARVING",
        /// Starving, but its balloon did not follow its last grant: no more until it does.
        StarvingBehind = "STARVING (balloon behind)",
        /// Much free memory and not consuming.
        Wasting = "WASTING",
        /// Neither.
        Balanced = "BALANCED",
        /// Its first fresh report: no consumption rate yet.
        FirstReport = "first report",
        /// No report posted since the last one read.
        WaitingForStats = "waiting for stats",
        /// Its balloon moved and the report may predate the move.
        BalloonSettling = "balloon settling",
        /// The report contradicts itself.
        InconsistentStats = "inconsistent stats",
        /// The domain reports no guest figures at all.
        NoGuestStats = "no guest stats",
        /// Left alone (`--exclude`, or its metadata).
        Excluded = "excluded",
        /// Its memory is held (hugepages, locked, VFIO): ballooning frees nothing.
        MemoryHeld = "memory held",
    }
}

impl GuestState {
    /// The state of a guest judged `status`, whose balloon is `behind` its last grant.
    pub fn judged(status: MemStatus, behind: bool) -> Self {
        match status {
            MemStatus::Starving if behind => GuestState::StarvingBehind,
            MemStatus::Starving => GuestState::Starving,
            MemStatus::Wasting => GuestState::Wasting,
            MemStatus::Balanced => GuestState::Balanced,
        }
    }

    /// Was the guest judged on a fresh report (its free memory a fact this cycle)?
    pub fn is_judged(self) -> bool {
        matches!(
            self,
            GuestState::Starving
                | GuestState::StarvingBehind
                | GuestState::Wasting
                | GuestState::Balanced
        )
    }
}

/// One pin change made (or, in a dry run, that would have been made).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveLine {
    /// Domain name.
    pub domain: String,
    /// Domain UUID.
    pub uuid: DomainId,
    /// vCPU number.
    pub vcpu: u32,
    /// pCPU before; `None` when it was not pinned to a single pCPU.
    pub from: Option<u32>,
    /// pCPU it is pinned to.
    pub to: u32,
    /// Its load (usage or demand, as balanced), percent of one pCPU.
    #[serde(serialize_with = "rounded")]
    pub load: f64,
    /// Why, in a word.
    pub why: PinWhy,
    /// Why, with the figures that decided it (`pCPU 3 demand 190% vs pCPU 7 40%`).
    pub reason: String,
}

/// One vCPU's figures in a vCPU scheduler cycle (for the metrics; not in `--json`, which would
/// grow with every vCPU of the host).
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuLine {
    /// Domain name.
    pub domain: String,
    /// Domain UUID.
    pub uuid: DomainId,
    /// vCPU number.
    pub vcpu: u32,
    /// The pCPU it is pinned to after the cycle, or last ran on, where known.
    pub pcpu: Option<u32>,
    /// Usage, percent of one pCPU.
    pub usage: f64,
    /// Demand, where the hypervisor reports run-queue delay.
    pub demand: Option<f64>,
}

/// What one vCPU scheduler cycle saw and did. Read back (the plot) with every field optional, so
/// runs written by older versions still read.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuReport {
    /// Always [`Daemon::VcpuScheduler`].
    pub daemon: Daemon,
    /// Active domains seen.
    pub domains: usize,
    /// vCPUs seen.
    pub vcpus: usize,
    /// Every online pCPU (empty on the first cycle).
    pub pcpus: Vec<PcpuLine>,
    /// Each NUMA node's spread, where the host has more than one node (else empty).
    pub nodes: Vec<NodeLine>,
    /// How far the cycle got.
    pub decision: Decision,
    /// What the plan balanced, when one was made.
    pub basis: Option<Basis>,
    /// True when nothing was changed on purpose.
    pub dry_run: bool,
    /// Pin changes made.
    pub moves: Vec<MoveLine>,
    /// Every vCPU with a load, once loads are known.
    #[serde(skip)]
    pub vcpu_lines: Vec<VcpuLine>,
    /// How long deciding took (planning, not reading or applying), where a decision was made.
    #[serde(skip)]
    pub decision_secs: Option<f64>,
    /// Pin changes skipped because the domain vanished or the call failed.
    pub skipped: usize,
    /// Domains left out because they did not answer in time (busy in a libvirt job, or their
    /// QEMU stopped or hung), by name.
    pub not_answering: Vec<String>,
    /// libvirt calls the cycle made.
    pub libvirt_calls: u64,
    /// Pin changes in the plan (made or skipped).
    #[serde(skip)]
    pub planned: usize,
    /// The host was balanced before the plan (its fixable spread within the threshold).
    #[serde(skip)]
    pub balanced: bool,
    /// The spread the plan predicts.
    #[serde(skip)]
    pub predicted_spread: f64,
    /// The CPU demand the plan leaves unserved, as a share of the usable pCPUs' capacity (see
    /// [`crate::cpu_plan::unserved_share`]), where a plan was made and demand is reported.
    #[serde(skip)]
    pub unserved_share: Option<f64>,
}

impl Default for CpuReport {
    fn default() -> Self {
        Self {
            daemon: Daemon::VcpuScheduler,
            domains: 0,
            vcpus: 0,
            pcpus: Vec::new(),
            nodes: Vec::new(),
            decision: Decision::default(),
            basis: None,
            dry_run: false,
            moves: Vec::new(),
            vcpu_lines: Vec::new(),
            decision_secs: None,
            skipped: 0,
            not_answering: Vec::new(),
            libvirt_calls: 0,
            planned: 0,
            balanced: false,
            predicted_spread: 0.0,
            unserved_share: None,
        }
    }
}

impl CpuReport {
    /// An empty report of a cycle that has just begun.
    pub fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            ..Self::default()
        }
    }

    /// Does the hypervisor report run-queue delay (have the pCPUs a demand)?
    fn reports_demand(&self) -> bool {
        self.pcpus.iter().any(|p| p.demand.is_some())
    }
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} domains, {} vCPUs", self.domains, self.vcpus)?;
        write_not_answering(f, &self.not_answering)?;
        if self.decision == Decision::FirstSample {
            return write!(f, "; first sample, rates from the next cycle");
        }
        f.write_str("; pCPU usage %:")?;
        for p in &self.pcpus {
            write!(f, " {}:{:.1}", p.pcpu, p.usage)?;
        }
        write!(
            f,
            " (spread {:.1})",
            spread(self.pcpus.iter().map(|p| p.usage))
        )?;
        if self.reports_demand() {
            f.write_str("; demand %:")?;
            for p in &self.pcpus {
                write!(f, " {}:{:.1}", p.pcpu, p.demand.unwrap_or(p.usage))?;
            }
        }
        if !self.nodes.is_empty() {
            f.write_str("; node spread:")?;
            for n in &self.nodes {
                write!(f, " {}:{:.1}", n.node, n.spread)?;
            }
        }
        let (Decision::Planned, Some(basis)) = (self.decision, self.basis) else {
            return f.write_str("; settling after the last pin changes, no decision");
        };
        if self.reports_demand() {
            write!(f, "; balancing {basis}")?;
        }
        if self.planned == 0 {
            return if self.balanced {
                f.write_str("; balanced, no change")
            } else {
                f.write_str("; no pin change would pay off, no change")
            };
        }
        let verb = if self.dry_run { "would move" } else { "moved" };
        write!(f, "; {verb} {}:", self.moves.len())?;
        for m in &self.moves {
            let from = m.from.map_or("*".to_string(), |p| p.to_string());
            write!(
                f,
                " {} vCPU{} {}->{} ({})",
                m.domain, m.vcpu, from, m.to, m.reason
            )?;
        }
        if self.skipped > 0 {
            write!(f, "; {} skipped", self.skipped)?;
        }
        write!(f, "; predicted {basis} spread {:.1}", self.predicted_spread)
    }
}

impl Report for CpuReport {
    fn changes(&self) -> usize {
        self.moves.len()
    }

    fn skipped(&self) -> usize {
        self.skipped
    }

    fn set_api_calls(&mut self, calls: u64) {
        self.libvirt_calls = calls;
    }

    fn trouble(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.decision == Decision::Planned && !self.balanced && self.planned == 0 {
            parts.push("unbalanced, and no pin change within the limits helps".to_string());
        }
        troubles(parts, &self.not_answering)
    }
}

/// The domains left out of a cycle because they did not answer, if any.
fn write_not_answering(f: &mut fmt::Formatter<'_>, names: &[String]) -> fmt::Result {
    if names.is_empty() {
        return Ok(());
    }
    write!(f, "; not answering, skipped: {}", names.join(" "))
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The host's memory in a memory coordinator cycle.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostLine {
    /// Physical memory, MiB.
    #[serde(serialize_with = "rounded")]
    pub total_mib: f64,
    /// Memory the host can give, MiB.
    #[serde(serialize_with = "rounded")]
    pub available_mib: f64,
    /// Memory the host keeps available whatever the guests want, MiB.
    #[serde(serialize_with = "rounded")]
    pub reserve_mib: f64,
    /// Memory guests hold free and may touch at any time, which the host would then have to
    /// back, MiB: not counted as the host's to give.
    #[serde(serialize_with = "rounded")]
    pub unbacked_mib: f64,
    /// The share of the last 10 s the host's tasks stalled on memory, in % (its PSI), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_pct: Option<f64>,
}

/// How one guest stood in a memory coordinator cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestLine {
    /// Domain name.
    pub domain: String,
    /// Domain UUID.
    pub uuid: DomainId,
    /// Balloon size, MiB.
    #[serde(serialize_with = "rounded")]
    pub actual_mib: f64,
    /// Memory the guest can still use, MiB, when reported.
    #[serde(serialize_with = "rounded_opt")]
    pub free_mib: Option<f64>,
    /// Consumption, MiB/s, when known.
    #[serde(serialize_with = "rounded_opt")]
    pub rate_mib_s: Option<f64>,
    /// Status (`STARVING`, `WASTING`, `BALANCED`), or why there is none.
    pub state: GuestState,
}

/// One balloon resize made (or, in a dry run, that would have been made).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeLine {
    /// Domain name.
    pub domain: String,
    /// Balloon size before, MiB.
    #[serde(serialize_with = "rounded")]
    pub from_mib: f64,
    /// Balloon size set, MiB.
    #[serde(serialize_with = "rounded")]
    pub to_mib: f64,
    /// Why, in a word.
    pub why: ResizeWhy,
    /// Why, with the figures that decided it (`starving: 6% free, +10.0 MiB/s`).
    pub reason: String,
}

/// What one memory coordinator cycle saw and did. Read back like [`CpuReport`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct MemReport {
    /// Always [`Daemon::MemoryCoordinator`].
    pub daemon: Daemon,
    /// Host memory, when the driver reports it.
    pub host: Option<HostLine>,
    /// Every active domain read.
    pub guests: Vec<GuestLine>,
    /// Domains left alone because they have no balloon device.
    pub without_balloon: usize,
    /// True when nothing was changed on purpose.
    pub dry_run: bool,
    /// Resizes made.
    pub changes: Vec<ResizeLine>,
    /// Resizes skipped: domain vanished, call failed, or dropped for breaking a limit (rule 6).
    pub skipped: usize,
    /// Domains left out because they did not answer in time, by name: each counts in the host's
    /// budget at its max memory, as last known.
    pub not_answering: Vec<String>,
    /// libvirt calls the cycle made.
    pub libvirt_calls: u64,
    /// How long deciding took (planning, not reading or applying), where a decision was made.
    #[serde(skip)]
    pub decision_secs: Option<f64>,
    /// The memory need the plan leaves unmet, as a share of what the reserve lets guests have
    /// (see [`crate::mem_plan::MemPolicy::unmet_share`]), where the host's memory is known.
    #[serde(skip)]
    pub unmet_share: Option<f64>,
}

impl Default for MemReport {
    fn default() -> Self {
        Self {
            daemon: Daemon::MemoryCoordinator,
            host: None,
            guests: Vec::new(),
            without_balloon: 0,
            dry_run: false,
            changes: Vec::new(),
            skipped: 0,
            not_answering: Vec::new(),
            libvirt_calls: 0,
            decision_secs: None,
            unmet_share: None,
        }
    }
}

impl MemReport {
    /// An empty report of a cycle that has just begun.
    pub fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            ..Self::default()
        }
    }
}

impl fmt::Display for MemReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            Some(h) => {
                write!(
                    f,
                    "host available {:.0}/{:.0} MiB (reserve {:.0}",
                    h.available_mib, h.total_mib, h.reserve_mib
                )?;
                if h.unbacked_mib >= 1.0 {
                    write!(f, ", guests may still touch {:.0}", h.unbacked_mib)?;
                }
                if let Some(pct) = h.stalled_pct.filter(|&p| p >= 1.0) {
                    write!(f, ", stalled on memory {pct:.0} % of the last 10 s")?;
                }
                f.write_str(")")?
            }
            None => f.write_str("host memory unknown")?,
        }
        for g in &self.guests {
            write!(f, "; {} {:.0} MiB", g.domain, g.actual_mib)?;
            if let Some(free) = g.free_mib {
                write!(f, " free {free:.0}")?;
            }
            if let Some(rate) = g.rate_mib_s {
                write!(f, " rate {rate:+.1} MiB/s")?;
            }
            write!(f, " {}", g.state)?;
        }
        if self.without_balloon > 0 {
            write!(f, "; {} without balloon left alone", self.without_balloon)?;
        }
        write_not_answering(f, &self.not_answering)?;
        if self.changes.is_empty() && self.skipped == 0 {
            return f.write_str("; no change");
        }
        let verb = if self.dry_run {
            "would resize"
        } else {
            "resized"
        };
        write!(f, "; {verb} {}:", self.changes.len())?;
        for c in &self.changes {
            write!(
                f,
                " {} {:.0}->{:.0} MiB ({})",
                c.domain, c.from_mib, c.to_mib, c.reason
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
        self.changes.len()
    }

    fn skipped(&self) -> usize {
        self.skipped
    }

    fn set_api_calls(&mut self, calls: u64) {
        self.libvirt_calls = calls;
    }

    fn trouble(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut starving: Vec<&str> = self
            .guests
            .iter()
            .filter(|g| matches!(g.state, GuestState::Starving | GuestState::StarvingBehind))
            .map(|g| g.domain.as_str())
            .collect();
        starving.sort_unstable();
        if !starving.is_empty() {
            parts.push(format!("starving: {}", starving.join(" ")));
        }
        if self.host.is_some_and(|h| h.available_mib < h.reserve_mib) {
            parts.push("the host is under its reserve".to_string());
        }
        troubles(parts, &self.not_answering)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_busiest_minus_freest() {
        assert_eq!(spread([30.0, 80.0, 55.0]), 50.0);
        assert_eq!(spread([]), 0.0);
    }

    #[test]
    fn json_and_log_line_come_from_the_same_figures() {
        let report = MemReport {
            host: Some(HostLine {
                total_mib: 1000.0,
                available_mib: 512.34,
                reserve_mib: 50.0,
                unbacked_mib: 64.0,
                stalled_pct: Some(12.5),
            }),
            guests: vec![GuestLine {
                domain: "g".into(),
                uuid: DomainId([1; 16]),
                actual_mib: 300.0,
                free_mib: Some(40.06),
                rate_mib_s: Some(10.55),
                state: GuestState::Starving,
            }],
            changes: vec![ResizeLine {
                domain: "g".into(),
                from_mib: 300.0,
                to_mib: 350.0,
                why: ResizeWhy::Starving,
                reason: "starving: 13% free, +10.6 MiB/s".into(),
            }],
            ..MemReport::new(false)
        };
        assert_eq!(
            report.to_string(),
            "host available 512/1000 MiB (reserve 50, guests may still touch 64, stalled on memory 12 % of the last 10 s); g 300 MiB free 40 rate +10.6 MiB/s STARVING; resized 1: g 300->350 MiB (starving: 13% free, +10.6 MiB/s)"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["daemon"], "memory_coordinator");
        assert_eq!(json["host"]["available_mib"], 512.3);
        assert_eq!(json["host"]["unbacked_mib"], 64.0);
        assert_eq!(json["host"]["stalled_pct"], 12.5);
        assert_eq!(json["guests"][0]["free_mib"], 40.1);
        assert_eq!(json["changes"][0]["to_mib"], 350.0);
        assert_eq!(json["changes"][0]["why"], "starving");
        assert_eq!(
            json["guests"][0]["uuid"],
            "01010101-0101-0101-0101-010101010101"
        );
        // Read back, it is the same report.
        let back: MemReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.guests[0].state, GuestState::Starving);
        assert_eq!(back.changes[0].why, ResizeWhy::Starving);
        assert_eq!(back.to_string(), report.to_string());
    }
}
