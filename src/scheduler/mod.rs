//! One cycle of the vCPU scheduler: observe the host, derive usage, decide, apply.
//!
//! Generic over [`Host`], so the same cycle runs against libvirt in the daemon and against a
//! simulated host in tests and benchmarks. What must persist between cycles about a domain (its
//! vCPUs' history, first affinities, which it re-pinned) is its `DomainRecord` (`record.rs`), one per domain
//! run in a [`Tracker`].

mod allowed;
mod record;

pub use allowed::AllowedSets;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::cpu_plan::{self, Basis, CpuPlan, CpuPolicy, PinMove, plan, unserved_share};
use crate::exclusions::Exclusions;
use crate::host::{
    DomainNames, DomainRef, Host, HostResult, VcpuSample, changed_or_skipped, read_or_skip,
};
use crate::report::{CpuReport, Decision, MoveLine, NodeLine, PcpuLine, PinWhy, VcpuLine, spread};
use crate::sampling::{
    Allowed, CpuSampler, CpuSnapshot, VcpuKey, VcpuLoad, pcpu_demand, pcpu_usage,
};
use crate::topology::Topology;
use crate::tracker::Tracker;
use record::{DomainRecord, VcpuRecord};

/// How many cycles without a demand a host that reports run-queue delay waits before it
/// balances usage instead (rule 5).
pub const DEMAND_GRACE_CYCLES: u64 = 3;

/// The vCPU scheduler's state across cycles.
pub struct Scheduler {
    /// Everything remembered about each domain, one record per domain run.
    domains: Tracker<DomainRecord>,
    /// What the options ask for.
    config: SchedulerConfig,
    planner: Planner,
    cycles: u64,
    /// Set after a cycle that changed pins: the next interval straddles the change, so its
    /// figures mix the old placement and the new, and the next cycle only observes (rule 7).
    settling: bool,
    /// Whether to observe only after a cycle that changed pins (on by default).
    settle_after_changes: bool,
    /// Whether the host reports run-queue delay, once known (said once in the log).
    delay_reported: Option<bool>,
    /// The last cycle that read some run-queue delay.
    delay_read_at: Option<u64>,
    /// Where each vCPU may go (rule 9), within the configuration's pool and NUMA crossing.
    allowed: AllowedSets,
    /// Said that sampling is slow, and not yet that it is back to normal.
    slow: bool,
    /// The host topology last said in the log.
    topology_said: TopologySaid,
    /// Whether numad ran on the host at the last cycle, once said in the log.
    numad_said: Option<bool>,
}

/// What the log last said of the host's topology.
#[derive(Debug)]
enum TopologySaid {
    /// Nothing yet.
    Nothing,
    /// This topology, or that there is none.
    Said(Option<Topology>),
}

/// Samples over which vCPU loads are averaged by default (see [`crate::sampling::VcpuHistory`]): one, the latest
/// sample. The planner allows for swings whatever the window; a longer window sees a lasting
/// change only part by part, and then corrects it in several steps (see BENCHMARKS.md).
pub const DEFAULT_WINDOW: usize = 1;

/// A vCPU planning policy: a snapshot in, pin moves out.
pub type Planner = fn(&CpuSnapshot, &CpuPolicy) -> CpuPlan;

/// What the vCPU scheduler's options ask for: given whole at start and again on each reload.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The planner's policy (`--threshold`, `--max-changes`).
    pub policy: CpuPolicy,
    /// Decide and say, change nothing (`--dry-run`).
    pub dry_run: bool,
    /// Samples over which vCPU loads are averaged (`--window`; 1: judge each sample alone).
    pub window: usize,
    /// Pin vCPUs only within these pCPUs, sorted (`--cpus`; `None`: every online pCPU).
    pub pool: Option<Vec<u32>>,
    /// Let vCPUs whose memory is not bound to a NUMA node leave the node they run on
    /// (`--cross-node`).
    pub cross_node: bool,
    /// Domains left alone: read, never re-pinned (`--exclude`, and their own metadata).
    pub exclusions: Exclusions,
    /// The daemon's period, where known (PERIOD): a cycle whose sampling took more than half of
    /// it decides nothing (its domains were read at instants too far apart to compare).
    pub period: Option<Duration>,
    /// Balance the vCPUs numad places too (`--override-numad`): when numad runs on the host, or
    /// a domain's vCPU placement is `auto`, they are otherwise left alone.
    pub override_numad: bool,
}

impl Default for SchedulerConfig {
    /// The defaults of the options, loads averaged over [`DEFAULT_WINDOW`] samples.
    fn default() -> Self {
        Self {
            policy: CpuPolicy::default(),
            dry_run: false,
            window: DEFAULT_WINDOW,
            pool: None,
            cross_node: false,
            exclusions: Exclusions::default(),
            period: None,
            override_numad: false,
        }
    }
}

/// Rule 10: which of `snapshot`'s pCPUs share a core; rule 9: which make a NUMA node, as
/// `topology` says.
fn with_topology(snapshot: &mut CpuSnapshot, topology: &Topology) {
    snapshot.cores = topology.sibling_groups(&snapshot.pcpus);
    snapshot.nodes = topology
        .nodes()
        .into_iter()
        .map(|n| cpu_plan::allowed(&snapshot.pcpus, &[Some(topology.cpus_of_node(n))]))
        .collect();
}

impl Scheduler {
    /// A scheduler with no history, configured as `config` says.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            domains: Tracker::new(),
            allowed: AllowedSets::new(config.pool.clone()).with_cross_node(config.cross_node),
            config,
            planner: plan,
            cycles: 0,
            settling: false,
            settle_after_changes: true,
            delay_reported: None,
            delay_read_at: None,
            slow: false,
            topology_said: TopologySaid::Nothing,
            numad_said: None,
        }
    }

    /// Decide with another planner (benchmarks compare policies this way).
    pub fn with_planner(mut self, planner: Planner) -> Self {
        self.planner = planner;
        self
    }

    /// Decide in every cycle, even right after pin changes (benchmarks use it to run the seed's
    /// one-move-per-period policy as it was).
    pub fn without_settling(mut self) -> Self {
        self.settle_after_changes = false;
        self
    }

    /// Apply `config` from the next cycle, keeping all the scheduler knows (rates, first-seen
    /// affinities, the samples of each window): a configuration reloaded. A change of
    /// `--override-numad` is said in the log again.
    pub fn configure(&mut self, config: SchedulerConfig) {
        if config.window != self.config.window {
            for record in self.domains.records_mut() {
                for v in record.vcpus.values_mut() {
                    v.history.set_window(config.window);
                }
            }
        }
        if config.override_numad != self.config.override_numad {
            self.numad_said = None;
            for record in self.domains.records_mut() {
                record.numad_said = false;
            }
        }
        self.allowed = AllowedSets::new(config.pool.clone()).with_cross_node(config.cross_node);
        self.config = config;
    }

    /// What the scheduler runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Does numad place every domain's vCPUs on this host (it runs, and is not overridden)?
    /// Said in the log when that is first known and when it changes.
    fn numad_owns_the_host(&mut self, host: &mut dyn Host) -> bool {
        let running = host.numad_running();
        if self.numad_said != Some(running) {
            match (running, self.config.override_numad) {
                (true, false) => log::warn!(
                    "numad runs on this host and places the guests' processes: every vCPU is left alone, so the two tools do not undo each other's pins (--override-numad to balance anyway, or stop numad)"
                ),
                (true, true) => log::warn!(
                    "numad runs on this host, and --override-numad is given: vCPUs are balanced, and numad may move them again"
                ),
                (false, _) if self.numad_said.is_some() => {
                    log::info!("numad no longer runs on this host: vCPUs are balanced again")
                }
                (false, _) => {}
            }
            self.numad_said = Some(running);
        }
        running && !self.config.override_numad
    }

    /// Run one cycle. `Ok(None)` when the host has no active domain.
    pub fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<CpuReport>> {
        self.cycles += 1;
        let node = host.node_cpus()?;
        let started = host.now();
        let samples = host.sample_vcpus()?;
        self.say_slow_sampling(host.now().saturating_duration_since(started));
        let stuck = host.stuck_domains();
        if samples.is_empty() && stuck.is_empty() {
            return Ok(None);
        }
        let mut report = CpuReport::new(self.config.dry_run);
        let mut names = DomainNames::default();
        let numad_host = self.numad_owns_the_host(host);
        let topology = host.topology()?;
        self.say_topology_once(&topology);
        let snapshot = self.derive(
            &samples,
            &stuck,
            &node.online,
            &topology,
            numad_host,
            &mut report,
            &mut names,
        );
        // Rule 5: nothing measured yet (the first cycle, or the first whose reads answered), or
        // no demand for a moment on a host that reports run-queue delay (read but not measured
        // yet, or not read in this cycle: domains read one by one while some stop answering): a
        // decision on usage alone would not be the one demand makes.
        let delay_read = samples
            .iter()
            .flat_map(|s| &s.vcpus)
            .any(|v| v.delay_ns.is_some());
        if delay_read {
            self.delay_read_at = Some(self.cycles);
        }
        let demand_missed = self
            .delay_read_at
            .is_some_and(|at| self.cycles - at <= DEMAND_GRACE_CYCLES)
            && !snapshot.reports_delay();
        if self.cycles == 1 || snapshot.vcpus.iter().all(|v| v.usage.is_none()) || demand_missed {
            return Ok(Some(report));
        }
        report.pcpus = pcpu_lines(&snapshot);
        report.nodes = node_lines(&report.pcpus, topology.as_ref());
        report.vcpu_lines = vcpu_lines(&snapshot, &names);
        self.say_basis_once(snapshot.reports_delay());
        // Rule 7: right after pin changes, observe only. A slow sample is decided on: each
        // domain's rates are over its own measured interval, and the cycle's calls are bounded.
        if std::mem::take(&mut self.settling) {
            report.decision = Decision::Settling;
            return Ok(Some(report));
        }
        let started = std::time::Instant::now();
        let plan = (self.planner)(&snapshot, &self.config.policy);
        report.decision_secs = Some(started.elapsed().as_secs_f64());
        self.apply(host, &plan, &snapshot, &names, &mut report)?;
        report.decision = Decision::Planned;
        report.basis = Some(plan.basis);
        report.planned = plan.moves.len();
        report.balanced = plan.before.fixable_spread <= self.config.policy.threshold;
        report.predicted_spread = plan.after.spread;
        report.unserved_share = unserved_share(&snapshot, &plan, self.config.policy.threshold);
        self.settling =
            self.settle_after_changes && !self.config.dry_run && !report.moves.is_empty();
        Ok(Some(report))
    }

    /// The snapshot of this cycle's `samples`: each vCPU's load (from the sampler) and allowed
    /// set (rule 9), on a host whose online pCPUs are `online`; the records of the domains
    /// `stuck` (not answering) are kept. Every vCPU is left alone when `numad_host` (numad places
    /// them), and those of a domain whose placement is `auto` unless numad is overridden. Counts
    /// domains and vCPUs in `report` and their names in `names`.
    #[allow(clippy::too_many_arguments)]
    fn derive(
        &mut self,
        samples: &[VcpuSample],
        stuck: &[DomainRef],
        online: &[u32],
        topology: &Option<Topology>,
        numad_host: bool,
        report: &mut CpuReport,
        names: &mut DomainNames,
    ) -> CpuSnapshot {
        let mut sampler = CpuSampler::new(online);
        self.allowed.begin(online, topology.clone());
        self.domains.begin_cycle();
        let mut allowed = HashMap::new();
        for sample in samples {
            let (_, record) = self.domains.see(&sample.domain, DomainRecord::default);
            record.name.clone_from(&sample.domain.name);
            record.keep_only(&sample.vcpus);
            let excluded = self
                .config
                .exclusions
                .excludes(&sample.domain, &mut record.excluded);
            let numad_domain = sample.domain.facts.auto_placement && !self.config.override_numad;
            if numad_domain && !std::mem::replace(&mut record.numad_said, true) {
                log::info!(
                    "domain {}: its vCPU placement is auto (numad chose its nodes): its vCPUs are left alone (--override-numad to balance them)",
                    sample.domain.name
                );
            }
            let excluded = excluded || numad_domain || numad_host;
            let DomainRecord {
                vcpus,
                nowhere_said,
                ..
            } = record;
            for vcpu in &sample.vcpus {
                let v = vcpus
                    .entry(vcpu.number)
                    .or_insert_with(|| VcpuRecord::new(self.config.window, vcpu));
                sampler.record(sample.domain.id, sample.at, vcpu, &mut v.history);
                // Rule 9: where each vCPU may go.
                let key = VcpuKey {
                    domain: sample.domain.id,
                    vcpu: vcpu.number,
                };
                let first = &v.first_affinity;
                let set = self
                    .allowed
                    .of(&sample.domain, excluded, vcpu, first, nowhere_said);
                allowed.insert(key, set);
            }
            report.domains += 1;
            report.vcpus += sample.vcpus.len();
            names.insert(&sample.domain);
        }
        let mut snapshot = sampler.finish();
        for v in &mut snapshot.vcpus {
            if let Some(set) = allowed.remove(&v.key) {
                v.allowed = set;
            }
            self.remember(v);
        }
        let read: std::collections::HashSet<_> = samples.iter().map(|s| s.domain.id).collect();
        for domain in stuck.iter().filter(|d| !read.contains(&d.id)) {
            self.stand_in(domain, &mut snapshot);
            report.not_answering.push(domain.name.clone());
            names.insert(domain);
        }
        snapshot.vcpus.sort_by_key(|v| v.key);
        self.domains.end_cycle();
        if let Some(topology) = topology {
            with_topology(&mut snapshot, topology);
        }
        snapshot
    }

    /// Rule 5: domain `domain` does not answer: it is not read, but what is known of it is kept,
    /// and its vCPUs stand in `snapshot` where they were with their last figures (unknown where
    /// it had none yet): never moved, never counted idle.
    fn stand_in(&mut self, domain: &DomainRef, snapshot: &mut CpuSnapshot) {
        let (_, record) = self.domains.see(domain, DomainRecord::default);
        let last = record.vcpus.values().filter_map(|v| v.last_load.clone());
        snapshot.vcpus.extend(last.map(|v| VcpuLoad {
            allowed: Allowed::Only(Arc::from([])),
            ..v
        }));
    }

    /// Remember vCPU `v`'s figures and place in its record, to stand for it while its domain does
    /// not answer.
    fn remember(&mut self, v: &VcpuLoad) {
        let record = self.domains.get_mut(&v.key.domain);
        if let Some(r) = record.and_then(|r| r.vcpus.get_mut(&v.key.vcpu)) {
            r.last_load = Some(v.clone());
        }
    }

    /// Say when sampling takes more than half the period, once when it starts being so and once
    /// when it stops.
    fn say_slow_sampling(&mut self, took: Duration) {
        let Some(period) = self.config.period else {
            return;
        };
        let slow = took > period / 2;
        if slow != self.slow {
            self.slow = slow;
            if slow {
                warn!(
                    "reading the vCPUs took {:.1} s of a {:.1} s period (is libvirt slow, or a domain stuck?): the domains that answered are balanced",
                    took.as_secs_f64(),
                    period.as_secs_f64()
                );
            } else {
                info!("reading the vCPUs is quick again");
            }
        }
    }

    /// Say what the host's topology is and what the planner makes of it, once per connection
    /// and again if it changes (SIGHUP re-reads it).
    fn say_topology_once(&mut self, topology: &Option<Topology>) {
        if matches!(&self.topology_said, TopologySaid::Said(said) if said == topology) {
            return;
        }
        self.topology_said = TopologySaid::Said(topology.clone());
        match topology {
            Some(t) => info!(
                "host topology: {}; each NUMA node is balanced on its own{}{}",
                t.summary(),
                if self.allowed.crosses_nodes() {
                    ", then across nodes (--cross-node)"
                } else {
                    ""
                },
                if t.threads_per_core() > 1 {
                    "; a pCPU counts half of its hyperthread siblings' load"
                } else {
                    ""
                }
            ),
            None => info!(
                "the host describes no CPU topology: every online pCPU is one node, without hyperthread siblings"
            ),
        }
    }

    /// Say which figure is balanced, once, and again if that changes.
    fn say_basis_once(&mut self, reported: bool) {
        if self.delay_reported == Some(reported) {
            return;
        }
        self.delay_reported = Some(reported);
        if reported {
            info!(
                "the hypervisor reports vCPU run-queue delay: balancing demand (CPU time used plus waited for)"
            );
        } else {
            info!("the hypervisor reports no vCPU run-queue delay: balancing usage");
        }
    }

    /// Put every vCPU this scheduler re-pinned back to the affinity it had when first seen
    /// (`--restore-on-exit`), unless its pin changed since ours (someone else pinned it: theirs
    /// is the word that stands). Domains that are gone are skipped; a failure is warned about.
    /// Returns how many vCPUs were restored.
    pub fn restore(&mut self, host: &mut dyn Host) -> usize {
        let mut restored = 0;
        'domains: for (id, record) in self.domains.sorted() {
            let ours: Vec<(u32, u32, Vec<u32>)> = record
                .vcpus
                .iter()
                .filter_map(|(&n, v)| Some((n, v.pinned_to?, v.first_affinity.clone())))
                .collect();
            if ours.is_empty() {
                continue;
            }
            let name = &record.name;
            let now = match read_or_skip(&DomainRef::new(id, name), host.vcpus(&id)) {
                Ok(Some(now)) => now,
                Ok(None) => continue,
                Err(e) => {
                    warn!(
                        "restoring the vCPUs' first affinity: {e}; the rest are left as they are"
                    );
                    break;
                }
            };
            for (vcpu, pinned_to, first) in ours {
                let Some(current) = now.iter().find(|v| v.number == vcpu) else {
                    continue;
                };
                if current.affinity != [pinned_to] {
                    info!(
                        "domain {name} vCPU{vcpu}: pinned to {:?} since we pinned it to {pinned_to}; left as it is",
                        current.affinity
                    );
                    continue;
                }
                let what = format!("vCPU{vcpu} could be restored");
                let result = host.set_affinity(&id, vcpu, &first);
                match changed_or_skipped(name, &what, result) {
                    Ok(true) => restored += 1,
                    Ok(false) => {}
                    Err(e) => {
                        warn!(
                            "restoring the vCPUs' first affinity: {e}; the rest are left as they are"
                        );
                        break 'domains;
                    }
                }
            }
        }
        info!("restored {restored} vCPUs to the affinity they had when first seen");
        restored
    }

    /// What is remembered of vCPU `key`, if its domain was seen in the last cycle.
    fn vcpu_record(&mut self, key: &VcpuKey) -> Option<&mut VcpuRecord> {
        self.domains.get_mut(&key.domain)?.vcpus.get_mut(&key.vcpu)
    }

    /// Make the plan's pin changes (in a dry run, only report them).
    fn apply(
        &mut self,
        host: &mut dyn Host,
        plan: &CpuPlan,
        snapshot: &CpuSnapshot,
        names: &DomainNames,
        report: &mut CpuReport,
    ) -> HostResult<()> {
        let allowed: HashMap<VcpuKey, &Allowed> =
            snapshot.vcpus.iter().map(|v| (v.key, &v.allowed)).collect();
        for m in &plan.moves {
            let domain = names.of(&m.key.domain);
            let made = self.config.dry_run
                || changed_or_skipped(
                    &domain,
                    &format!("vCPU{} could be pinned", m.key.vcpu),
                    host.pin_vcpu(&m.key.domain, m.key.vcpu, m.to),
                )?;
            if !made {
                report.skipped += 1;
                continue;
            }
            if !self.config.dry_run
                && let Some(v) = self.vcpu_record(&m.key)
            {
                v.pinned_to = Some(m.to);
                // Should its domain stop answering, its last figures stand where it is now.
                if let Some(last) = &mut v.last_load {
                    last.pinned = Some(m.to);
                }
            }
            let (why, reason) = move_reason(m, allowed.get(&m.key).copied(), plan.basis, report);
            if let Some(line) = report
                .vcpu_lines
                .iter_mut()
                .find(|l| l.uuid == m.key.domain && l.vcpu == m.key.vcpu)
            {
                line.pcpu = Some(m.to);
            }
            report.moves.push(MoveLine {
                domain,
                uuid: m.key.domain,
                vcpu: m.key.vcpu,
                from: m.from,
                to: m.to,
                load: m.load,
                why,
                reason,
            });
        }
        Ok(())
    }
}

/// Why pin change `m` is made (the vCPU may use `allowed`), in a word and with the figures of the
/// pCPUs in `report`, in the figure the plan balanced.
fn move_reason(
    m: &PinMove,
    allowed: Option<&Allowed>,
    basis: Basis,
    report: &CpuReport,
) -> (PinWhy, String) {
    let load = |pcpu: u32| {
        report
            .pcpus
            .iter()
            .find(|p| p.pcpu == pcpu)
            .map_or(0.0, |p| match basis {
                Basis::Demand => p.demand.unwrap_or(p.usage),
                Basis::Usage => p.usage,
            })
    };
    match m.from {
        None => (
            PinWhy::Unpinned,
            format!(
                "not pinned to one pCPU; pCPU {} {basis} {:.0}% is the freest it may use",
                m.to,
                load(m.to)
            ),
        ),
        Some(from) if allowed.is_some_and(|a| !a.contains(from)) => (
            PinWhy::OutsideAllowed,
            format!("pCPU {from} is outside the pCPUs it may use"),
        ),
        Some(from) => (
            PinWhy::Balance,
            format!(
                "pCPU {from} {basis} {:.0}% vs pCPU {} {:.0}%",
                load(from),
                m.to,
                load(m.to)
            ),
        ),
    }
}

/// Every vCPU whose load is known, named, where it runs.
fn vcpu_lines(snapshot: &CpuSnapshot, names: &DomainNames) -> Vec<VcpuLine> {
    snapshot
        .vcpus
        .iter()
        .filter_map(|v| {
            Some(VcpuLine {
                domain: names.of(&v.key.domain),
                uuid: v.key.domain,
                vcpu: v.key.vcpu,
                pcpu: v.pinned.or(v.last_pcpu),
                usage: v.usage?,
                demand: v.demand,
            })
        })
        .collect()
}

/// The spread of each NUMA node's online pCPUs, in the figure balanced; empty unless the online
/// pCPUs span two nodes or more.
fn node_lines(pcpus: &[PcpuLine], topology: Option<&Topology>) -> Vec<NodeLine> {
    let Some(topology) = topology else {
        return Vec::new();
    };
    let mut by_node: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for p in pcpus {
        if let Some(node) = topology.node_of(p.pcpu) {
            by_node
                .entry(node)
                .or_default()
                .push(p.demand.unwrap_or(p.usage));
        }
    }
    if by_node.len() < 2 {
        return Vec::new();
    }
    by_node
        .into_iter()
        .map(|(node, loads)| NodeLine {
            node,
            spread: spread(loads),
        })
        .collect()
}

/// Usage, and demand where reported, of every online pCPU.
fn pcpu_lines(snapshot: &CpuSnapshot) -> Vec<PcpuLine> {
    let demand = pcpu_demand(snapshot);
    pcpu_usage(snapshot)
        .into_iter()
        .map(|(pcpu, usage)| PcpuLine {
            pcpu,
            usage,
            demand: demand.as_ref().and_then(|d| d.get(&pcpu)).copied(),
        })
        .collect()
}
