//! A deterministic simulated host: vCPUs with a CPU demand, pCPUs that share their time among the
//! vCPUs charged to them, guests whose memory use follows a workload behind a balloon that cannot
//! shrink under what they use, a connection that can be dropped, and a clock that only moves when
//! the test says so. Tests and benchmarks share it, with its seeded generator [`Rng`].

use std::time::{Duration, Instant};

use vmbalance::domain_xml::DomainFacts;
use vmbalance::host::{
    BalloonStats, DomainId, DomainRef, Host, HostError, HostMemory, HostResult, NodeCpus,
    NodeMemory, VcpuInfo,
};

/// xorshift64*: a small seeded generator, so every simulated run is the same on every run.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A whole number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A uniform draw in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How much slower a hyperthread runs when its sibling is fully busy: two busy threads of one
/// core each run at 60 % of a thread alone (1.2 times the work of one thread per core, within the
/// 10-30 % SMT usually yields).
pub const SMT_SLOWDOWN: f64 = 0.4;

/// Speed of a vCPU whose memory is on another NUMA node: every cache miss crosses the
/// interconnect (remote accesses take some 1.3-2 times as long).
pub const REMOTE_SPEED: f64 = 0.75;

/// The capabilities XML of a host of `sockets` sockets (one NUMA node each) of `cores` cores of
/// `threads` threads, numbered as Linux numbers them: all first threads, socket by socket, then
/// all second threads (so pCPU `c` and `c + sockets * cores` are siblings).
pub fn smt_capabilities(sockets: u32, cores: u32, threads: u32) -> String {
    let per_thread = sockets * cores;
    let mut cells = String::new();
    for socket in 0..sockets {
        let mut cpus = String::new();
        for t in 0..threads {
            for core in 0..cores {
                let id = t * per_thread + socket * cores + core;
                let siblings: Vec<String> = (0..threads)
                    .map(|u| (u * per_thread + socket * cores + core).to_string())
                    .collect();
                cpus.push_str(&format!(
                    "<cpu id='{id}' socket_id='{socket}' core_id='{core}' siblings='{}'/>",
                    siblings.join(",")
                ));
            }
        }
        cells.push_str(&format!(
            "<cell id='{socket}'><cpus num='{}'>{cpus}</cpus></cell>",
            cores * threads
        ));
    }
    format!(
        "<capabilities><host><topology><cells num='{sockets}'>{cells}</cells></topology></host></capabilities>"
    )
}

/// One simulated vCPU.
#[derive(Clone, Debug)]
pub struct SimVcpu {
    /// Percent of one pCPU it would use if it had the pCPU to itself.
    pub demand: f64,
    /// pCPUs it may run on.
    pub affinity: Vec<u32>,
    /// Cumulative CPU time, ns.
    pub cpu_ns: u64,
    /// Cumulative time runnable but waiting for its pCPU, ns.
    pub delay_ns: u64,
    /// The affinity its domain's persistent configuration gives it (`None`: transient).
    pub configured: Option<Vec<u32>>,
}

/// One simulated guest's memory, KiB.
#[derive(Clone, Debug)]
pub struct SimMemory {
    /// Balloon size.
    pub actual: u64,
    /// Max memory.
    pub max: u64,
    /// Memory the guest uses now.
    pub used: f64,
    /// What it uses with no workload; an OOM kill brings it back here.
    pub baseline: f64,
    /// The workload's allocation rate, KiB/s (negative: freeing)...
    pub rate: f64,
    /// ...until used reaches this.
    pub goal: f64,
    /// Has a balloon device.
    pub balloon: bool,
    /// Runs the balloon driver (posts statistics).
    pub driver: bool,
    /// Stats period set by the coordinator, s (0 = off).
    pub stats_period: u32,
    /// Last posted report: (last_update, unused, usable, total). Unused (MemFree) is what it
    /// never touched; usable (MemAvailable) adds what it touched and no longer uses (its cache);
    /// total (MemTotal) is its balloon size when it posted the report.
    pub report: Option<(u64, u64, u64, u64)>,
    /// Its MemTotal stays at this whatever its balloon (virtio-balloon's `deflate-on-oom`).
    pub fixed_total: Option<u64>,
    last_report_at: f64,
    /// Times the guest ran out of memory (its workload was killed).
    pub ooms: u32,
    /// Host memory backing the guest, KiB: what it has touched, until a balloon takes it back.
    pub resident: f64,
    /// Its balloon frees nothing on the host (passthrough memory the host does not announce).
    pub frees_nothing: bool,
    /// It reports this balloon size whatever its real one (a lying or broken driver).
    pub claims_actual: Option<u64>,
    /// Its configuration says its balloon deflates on its own (`autodeflate`, deflate-on-oom).
    pub autodeflate: bool,
    /// It reports this much free memory (MemFree and MemAvailable) whatever it really has free.
    pub claims_free: Option<u64>,
}

impl SimMemory {
    /// A guest of `actual` KiB (max `max`) using `used` KiB, with a balloon and its driver.
    pub fn new(actual: u64, max: u64, used: u64) -> Self {
        Self {
            actual,
            max,
            used: used as f64,
            baseline: used as f64,
            rate: 0.0,
            goal: used as f64,
            balloon: true,
            driver: true,
            stats_period: 0,
            report: None,
            fixed_total: None,
            last_report_at: f64::NEG_INFINITY,
            ooms: 0,
            resident: used as f64,
            frees_nothing: false,
            claims_actual: None,
            autodeflate: false,
            claims_free: None,
        }
    }

    /// The balloon size the guest reports.
    pub fn reported_actual(&self) -> u64 {
        self.claims_actual.unwrap_or(self.actual)
    }

    /// Start a workload that allocates (or frees) `rate` KiB/s until it uses `goal` KiB.
    pub fn work(&mut self, rate: f64, goal: u64) {
        self.rate = rate;
        self.goal = goal as f64;
    }

    /// The guest restarts: it uses `used` KiB at once, has posted no report, and has lost its
    /// statistics period.
    pub fn restart(&mut self, used: u64) {
        self.used = used as f64;
        self.baseline = used as f64;
        self.goal = used as f64;
        self.rate = 0.0;
        self.report = None;
        self.stats_period = 0;
        self.last_report_at = f64::NEG_INFINITY;
    }

    fn advance(&mut self, now: f64, dt: f64) {
        // A workload moves its use toward its goal, never away from it.
        if self.rate > 0.0 {
            self.used = (self.used + self.rate * dt).min(self.goal).max(self.used);
        } else if self.rate < 0.0 {
            self.used = (self.used + self.rate * dt).max(self.goal).min(self.used);
        }
        if self.autodeflate && self.used > self.actual as f64 {
            // Deflate-on-oom: the guest's balloon driver takes pages back from the balloon, up
            // to its max, without asking anyone.
            self.actual = self.max.min(self.used.ceil() as u64);
        }
        if self.used > self.actual as f64 {
            self.ooms += 1;
            // The kill frees the workload's memory, and at least what overflowed.
            self.used = self.baseline.min(self.actual as f64);
            self.rate = 0.0;
            self.goal = self.baseline;
        }
        // Pages the guest touches are backed by the host from then on.
        self.resident = self.resident.max(self.used);
        if self.driver
            && self.stats_period > 0
            && now - self.last_report_at >= f64::from(self.stats_period) - 1e-9
        {
            self.last_report_at = now;
            let actual = self.reported_actual() as f64;
            let unused = (actual - self.resident.max(self.used)).max(0.0) as u64;
            let usable = (actual - self.used).max(0.0) as u64;
            let (unused, usable) = self.claims_free.map_or((unused, usable), |f| (f, f));
            let total = self.fixed_total.unwrap_or(actual as u64);
            self.report = Some((1_000_000 + now as u64, unused, usable, total));
        }
    }
}

/// One simulated domain.
#[derive(Clone, Debug)]
pub struct SimDomain {
    pub id: DomainId,
    pub name: String,
    /// What its XML says; its `max_kib` and `autodeflate` are `mem`'s, whatever is set here.
    pub facts: DomainFacts,
    /// The NUMA node its memory lives on, bound or not (for [`SimHost::work`]; `None`: nowhere
    /// in particular, no vCPU of it runs remote).
    pub home_node: Option<u32>,
    /// Its run (domain ID): a restart gives it a new one.
    pub run: u32,
    pub vcpus: Vec<SimVcpu>,
    pub mem: SimMemory,
}

impl SimDomain {
    /// The domain as the host lists it.
    pub fn domain_ref(&self) -> DomainRef {
        DomainRef {
            id: self.id,
            name: self.name.clone(),
            facts: DomainFacts {
                max_kib: Some(self.mem.max),
                autodeflate: self.mem.autodeflate,
                ..self.facts.clone()
            },
            run: Some(self.run),
        }
    }
}

/// The simulated host.
pub struct SimHost {
    pub online: Vec<u32>,
    pub present: u32,
    pub domains: Vec<SimDomain>,
    /// Domains that vanish right after the next listing (before they are read).
    pub vanish_after_listing: Vec<DomainId>,
    /// Domains that do not answer (their QEMU stopped, or busy in a libvirt job): listed, but
    /// every call on them is `HostError::Stuck`.
    pub stuck: Vec<DomainId>,
    /// Domains whose every read fails (an error that is neither a vanished domain nor a stuck
    /// one); reported with the stuck ones, as the libvirt layer does.
    pub unreadable: Vec<DomainId>,
    /// Domains whose statistics period cannot be set in time (busy in a libvirt job), though
    /// they are read as usual.
    pub stuck_on_stats_period: Vec<DomainId>,
    /// Number of pin calls that changed something.
    pub pins: usize,
    /// Host memory, KiB; guests take their balloon size from it.
    pub host_total: u64,
    /// Memory the host itself uses, KiB.
    pub host_used: u64,
    /// Does the host report its memory?
    pub host_reports_memory: bool,
    /// The host's memory pressure (PSI `some avg10`, %), where it reports one.
    pub host_stalled_pct: Option<f64>,
    /// NUMA nodes' memory: (node, total KiB, KiB used by others than the guests). A guest whose
    /// memory is bound to nodes ([`SimDomain::memory_nodes`]) takes what it touched from them,
    /// shared evenly. Empty: one node.
    pub mem_nodes: Vec<(u32, u64, u64)>,
    /// Does the host describe its nodes' memory ([`Host::node_memory`])?
    pub reports_nodes: bool,
    /// The least each of `mem_nodes` had free at any instant, KiB.
    pub node_low: std::collections::BTreeMap<u32, u64>,
    /// Number of balloon changes made.
    pub resizes: usize,
    /// The least memory the host had available at any instant, KiB.
    pub host_low: u64,
    /// Does the host report vCPU run-queue delay (like QEMU's `vcpu.N.delay`)?
    pub reports_delay: bool,
    /// Does numad run on the host?
    pub numad: bool,
    /// Each period, every vCPU wants its demand plus a uniform draw in ±`jitter` points (clamped
    /// to 0-100): loads that swing from one sample to the next around a steady level.
    pub jitter: f64,
    /// The seeded generator behind `jitter`.
    jitter_rng: Rng,
    /// Is the connection up? While it is down every call fails with `HostError::Disconnected`.
    pub connected: bool,
    /// Drop the connection when the next pin change is asked for (mid-cycle).
    pub drop_connection_at_next_pin: bool,
    /// How many of the next reconnection attempts fail.
    pub failing_reconnects: u32,
    /// Reconnection attempts so far.
    pub reconnects: u32,
    /// Simulated time one sampling of every domain's vCPUs takes (a domain stuck in libvirt).
    pub sample_delay: Duration,
    /// The CPU topology the host describes (`None`: it describes none).
    pub topology: Option<vmbalance::topology::Topology>,
    start: Instant,
    elapsed: Duration,
}

impl SimHost {
    /// A host with pCPUs `0..pcpus`, all online, and no domain.
    pub fn new(pcpus: u32) -> Self {
        Self {
            online: (0..pcpus).collect(),
            present: pcpus,
            domains: Vec::new(),
            vanish_after_listing: Vec::new(),
            stuck: Vec::new(),
            unreadable: Vec::new(),
            stuck_on_stats_period: Vec::new(),
            pins: 0,
            host_total: 16 << 20,
            host_used: 1 << 20,
            host_reports_memory: true,
            host_stalled_pct: None,
            mem_nodes: Vec::new(),
            reports_nodes: true,
            node_low: std::collections::BTreeMap::new(),
            resizes: 0,
            host_low: u64::MAX,
            reports_delay: false,
            numad: false,
            jitter: 0.0,
            jitter_rng: Rng(0x9E37_79B9_7F4A_7C15),
            connected: true,
            drop_connection_at_next_pin: false,
            failing_reconnects: 0,
            reconnects: 0,
            topology: None,
            sample_delay: Duration::ZERO,
            start: Instant::now(),
            elapsed: Duration::ZERO,
        }
    }

    /// Add a persistent domain whose vCPUs have the given demands and (live) affinities, and
    /// whose configuration lets them run anywhere.
    pub fn add(&mut self, n: u8, vcpus: &[(f64, &[u32])]) -> DomainId {
        let id = DomainId([n; 16]);
        let anywhere: Vec<u32> = (0..self.present).collect();
        self.domains.push(SimDomain {
            id,
            name: format!("dom{n}"),
            facts: DomainFacts::default(),
            home_node: None,
            run: 1,
            vcpus: vcpus
                .iter()
                .map(|&(demand, affinity)| SimVcpu {
                    demand,
                    affinity: affinity.to_vec(),
                    cpu_ns: 1_000_000_000 * u64::from(n),
                    delay_ns: 0,
                    configured: Some(anywhere.clone()),
                })
                .collect(),
            mem: SimMemory::new(1 << 20, 2 << 20, 256 << 10),
        });
        id
    }

    /// Add a one-vCPU idle domain with the given memory.
    pub fn add_guest(&mut self, n: u8, mem: SimMemory) -> DomainId {
        let id = self.add(n, &[(1.0, &[0])]);
        self.domains.last_mut().unwrap().mem = mem;
        id
    }

    /// Memory the host has available, KiB: what neither it nor the guests' touched memory
    /// takes.
    pub fn host_free(&self) -> u64 {
        let guests: u64 = self.domains.iter().map(|d| d.mem.resident as u64).sum();
        self.host_total.saturating_sub(self.host_used + guests)
    }

    pub fn domain_mut(&mut self, id: &DomainId) -> &mut SimDomain {
        self.domains.iter_mut().find(|d| d.id == *id).unwrap()
    }

    /// The pCPU a vCPU runs on: its first allowed pCPU (a spanning vCPU stays where it started).
    fn runs_on(v: &SimVcpu) -> u32 {
        v.affinity[0]
    }

    /// Let `dt` of simulated time pass: each pCPU shares its time among its vCPUs in proportion to
    /// their demand when they want more than it has.
    pub fn advance(&mut self, dt: Duration) {
        let count = self.domains.iter().map(|d| d.vcpus.len()).sum::<usize>();
        let jitter: Vec<f64> = (0..count).map(|_| self.draw_jitter()).collect();
        let wants: Vec<f64> = self
            .domains
            .iter()
            .flat_map(|d| &d.vcpus)
            .zip(jitter)
            .map(|(v, j)| (v.demand + j).clamp(0.0, 100.0))
            .collect();
        let mut demand = vec![0.0; self.present as usize];
        for (v, want) in self.domains.iter().flat_map(|d| &d.vcpus).zip(&wants) {
            demand[Self::runs_on(v) as usize] += want;
        }
        for (v, want) in self
            .domains
            .iter_mut()
            .flat_map(|d| &mut d.vcpus)
            .zip(wants)
        {
            let total = demand[Self::runs_on(v) as usize];
            let share = if total > 100.0 {
                want * 100.0 / total
            } else {
                want
            };
            v.cpu_ns += (share / 100.0 * dt.as_nanos() as f64) as u64;
            // What it wanted but did not get, it spent waiting in the run queue.
            v.delay_ns += ((want - share) / 100.0 * dt.as_nanos() as f64) as u64;
        }
        self.elapsed += dt;
        let now = self.elapsed.as_secs_f64();
        for d in &mut self.domains {
            d.mem.advance(now, dt.as_secs_f64());
        }
        self.host_low = self.host_low.min(self.host_free());
        for (node, free) in self.nodes_free() {
            let low = self.node_low.entry(node).or_insert(u64::MAX);
            *low = (*low).min(free);
        }
    }

    /// What each of `mem_nodes` has free, KiB.
    pub fn nodes_free(&self) -> Vec<(u32, u64)> {
        self.mem_nodes
            .iter()
            .map(|&(node, total, others)| {
                let guests: f64 = self
                    .domains
                    .iter()
                    .filter_map(|d| {
                        let nodes = d.facts.memory_nodes.as_ref()?;
                        nodes
                            .contains(&node)
                            .then(|| d.mem.resident / nodes.len() as f64)
                    })
                    .sum();
                (node, total.saturating_sub(others + guests as u64))
            })
            .collect()
    }

    /// The work the vCPUs want and the work they do with the current pins, in percent of one
    /// thread running alone with local memory, on the topology the host describes: a thread runs
    /// slower by [`SMT_SLOWDOWN`] times how busy its busiest sibling is, and a vCPU away from its
    /// domain's memory ([`SimDomain::home_node`]) runs at [`REMOTE_SPEED`]. Demands are CPU time
    /// (a slowed vCPU does not ask for more time), so this measures placement, not feedback.
    pub fn work(&self) -> (f64, f64) {
        let time = self.pcpu_demand();
        let busy = |p: u32| time[p as usize].min(100.0) / 100.0;
        let topology = self.topology.as_ref();
        let mut wanted = 0.0;
        let mut done = 0.0;
        for d in &self.domains {
            for v in &d.vcpus {
                let p = Self::runs_on(v);
                let share = if time[p as usize] > 100.0 {
                    v.demand * 100.0 / time[p as usize]
                } else {
                    v.demand
                };
                let place = topology.and_then(|t| t.cpus.get(&p));
                let sibling_busy = place.map_or(0.0, |pl| {
                    pl.siblings
                        .iter()
                        .filter(|&&s| s != p && s < self.present)
                        .map(|&s| busy(s))
                        .fold(0.0, f64::max)
                });
                let remote = match (place, d.home_node) {
                    (Some(pl), Some(home)) => pl.node != home,
                    _ => false,
                };
                let speed =
                    (1.0 - SMT_SLOWDOWN * sibling_busy) * if remote { REMOTE_SPEED } else { 1.0 };
                wanted += v.demand;
                done += share * speed;
            }
        }
        (wanted, done)
    }

    /// How many vCPUs run on a NUMA node other than their domain's memory, and how many vCPUs
    /// there are.
    pub fn remote_vcpus(&self) -> (usize, usize) {
        let Some(topology) = &self.topology else {
            return (0, self.domains.iter().map(|d| d.vcpus.len()).sum());
        };
        let mut remote = 0;
        let mut all = 0;
        for d in &self.domains {
            for v in &d.vcpus {
                all += 1;
                let node = topology.node_of(Self::runs_on(v));
                if d.home_node.is_some() && node != d.home_node {
                    remote += 1;
                }
            }
        }
        (remote, all)
    }

    /// A uniform draw in ±`jitter` (0 without jitter), from a seeded xorshift64*.
    fn draw_jitter(&mut self) -> f64 {
        if self.jitter == 0.0 {
            return 0.0;
        }
        let unit = self.jitter_rng.range(0.0, 1.0);
        self.jitter * (2.0 * unit - 1.0)
    }

    /// The summed demand of the vCPUs on each pCPU, in percent (over 100: contended).
    fn pcpu_demand(&self) -> Vec<f64> {
        let mut demand = vec![0.0; self.present as usize];
        for v in self.domains.iter().flat_map(|d| &d.vcpus) {
            demand[Self::runs_on(v) as usize] += v.demand;
        }
        demand
    }

    /// Actual usage of each pCPU over a period with the current pins, in percent.
    pub fn pcpu_usage(&self) -> Vec<f64> {
        self.pcpu_demand()
            .into_iter()
            .map(|d: f64| d.min(100.0))
            .collect()
    }

    pub fn domain(&self, id: &DomainId) -> Option<&SimDomain> {
        self.domains.iter().find(|d| d.id == *id)
    }

    /// Fail when the connection is down.
    fn up(&self) -> HostResult<()> {
        if self.connected {
            Ok(())
        } else {
            Err(HostError::Disconnected(
                "the simulated connection is down".into(),
            ))
        }
    }

    /// A running domain, or `HostError::Vanished` (`Stuck` for one that does not answer).
    fn running(&mut self, id: &DomainId) -> HostResult<&mut SimDomain> {
        self.up()?;
        if self.stuck.contains(id) {
            return Err(HostError::Stuck(*id));
        }
        if self.unreadable.contains(id) {
            return Err(anyhow::anyhow!("the simulated domain {id} cannot be read").into());
        }
        self.domains
            .iter_mut()
            .find(|d| d.id == *id)
            .ok_or(HostError::Vanished(*id))
    }
}

impl Host for SimHost {
    fn active_domains(&mut self) -> HostResult<Vec<DomainRef>> {
        self.up()?;
        let listed = self.domains.iter().map(SimDomain::domain_ref).collect();
        for gone in std::mem::take(&mut self.vanish_after_listing) {
            self.domains.retain(|d| d.id != gone);
        }
        Ok(listed)
    }

    fn stuck_domains(&self) -> Vec<DomainRef> {
        self.domains
            .iter()
            .filter(|d| self.stuck.contains(&d.id) || self.unreadable.contains(&d.id))
            .map(SimDomain::domain_ref)
            .collect()
    }

    fn vcpus(&mut self, id: &DomainId) -> HostResult<Vec<VcpuInfo>> {
        let reports_delay = self.reports_delay;
        let d = self.running(id)?;
        Ok(d.vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| VcpuInfo {
                number: i as u32,
                cpu_time_ns: v.cpu_ns,
                last_pcpu: Some(Self::runs_on(v)),
                affinity: v.affinity.clone(),
                delay_ns: reports_delay.then_some(v.delay_ns),
                configured: v.configured.clone(),
            })
            .collect())
    }

    fn numad_running(&mut self) -> bool {
        self.numad
    }

    fn node_cpus(&mut self) -> HostResult<NodeCpus> {
        self.up()?;
        Ok(NodeCpus {
            present: self.present,
            online: self.online.clone(),
        })
    }

    fn sample_vcpus(&mut self) -> HostResult<Vec<vmbalance::host::VcpuSample>> {
        self.elapsed += self.sample_delay;
        vmbalance::host::vcpus_domain_by_domain(self)
    }

    fn topology(&mut self) -> HostResult<Option<vmbalance::topology::Topology>> {
        self.up()?;
        Ok(self.topology.clone())
    }

    fn set_affinity(&mut self, id: &DomainId, vcpu: u32, cpus: &[u32]) -> HostResult<()> {
        if std::mem::take(&mut self.drop_connection_at_next_pin) {
            self.connected = false;
        }
        self.up()?;
        if let Some(offline) = cpus.iter().find(|p| !self.online.contains(p)) {
            return Err(anyhow::anyhow!("pCPU {offline} is offline").into());
        }
        let d = self.running(id)?;
        let v = d
            .vcpus
            .get_mut(vcpu as usize)
            .ok_or_else(|| anyhow::anyhow!("no vCPU {vcpu}"))?;
        if v.affinity != cpus {
            v.affinity = cpus.to_vec();
            self.pins += 1;
        }
        Ok(())
    }

    fn balloon_stats(&mut self, id: &DomainId) -> HostResult<BalloonStats> {
        let m = &self.running(id)?.mem;
        let mut stats = BalloonStats {
            actual_kib: m.reported_actual(),
            max_kib: m.max,
            rss_kib: Some(m.resident as u64),
            ..BalloonStats::default()
        };
        if let Some((update, unused, usable, total)) = m.report {
            stats.unused_kib = Some(unused);
            stats.mem_total_kib = Some(total);
            stats.mem_available_kib = Some(usable);
            stats.last_update = Some(update);
        }
        Ok(stats)
    }

    fn enable_balloon_stats(&mut self, id: &DomainId, period: u32) -> HostResult<()> {
        if self.stuck_on_stats_period.contains(id) {
            return Err(HostError::Stuck(*id));
        }
        let d = self.running(id)?;
        if !d.mem.balloon {
            return Err(anyhow::anyhow!("No memory balloon device configured").into());
        }
        d.mem.stats_period = period;
        Ok(())
    }

    fn set_balloon(&mut self, id: &DomainId, kib: u64) -> HostResult<()> {
        let d = self.running(id)?;
        if kib > d.mem.max {
            return Err(anyhow::anyhow!("cannot set memory higher than max memory").into());
        }
        if !d.mem.balloon {
            return Err(anyhow::anyhow!("No memory balloon device configured").into());
        }
        // The balloon stalls at what the guest uses rather than taking it.
        d.mem.actual = kib.max(d.mem.used.ceil() as u64);
        // What the balloon takes goes back to the host, unless the guest's memory is held.
        if d.facts.memory_held.is_none() && !d.mem.frees_nothing {
            d.mem.resident = d.mem.resident.min(d.mem.actual as f64);
        }
        self.resizes += 1;
        Ok(())
    }

    fn node_memory(&mut self) -> HostResult<Vec<NodeMemory>> {
        self.up()?;
        if !self.reports_nodes {
            return Ok(Vec::new());
        }
        Ok(self
            .nodes_free()
            .into_iter()
            .zip(&self.mem_nodes)
            .map(|((node, free_kib), &(_, total_kib, _))| NodeMemory {
                node,
                total_kib,
                free_kib,
            })
            .collect())
    }

    fn host_memory(&mut self) -> HostResult<HostMemory> {
        self.up()?;
        if !self.host_reports_memory {
            return Err(HostError::Unsupported(
                "no host memory in this simulation".into(),
            ));
        }
        Ok(HostMemory {
            total_kib: self.host_total,
            available_kib: self.host_free(),
            stalled_pct: self.host_stalled_pct,
        })
    }

    fn reconnect(&mut self) -> HostResult<()> {
        self.reconnects += 1;
        if self.failing_reconnects > 0 {
            self.failing_reconnects -= 1;
            return Err(HostError::Disconnected("the simulated host refuses".into()));
        }
        self.connected = true;
        Ok(())
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }
}
