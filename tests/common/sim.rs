//! A deterministic simulated host: vCPUs with a CPU demand, pCPUs that share their time among the
//! vCPUs charged to them, and a clock that only moves when the test says so.

use std::time::{Duration, Instant};

use vmbalance::host::{Applied, DomainId, DomainRef, Host, NodeCpus, VcpuInfo};

/// One simulated vCPU.
#[derive(Clone, Debug)]
pub struct SimVcpu {
    /// Percent of one pCPU it would use if it had the pCPU to itself.
    pub demand: f64,
    /// pCPUs it may run on.
    pub affinity: Vec<u32>,
    /// Cumulative CPU time, ns.
    pub cpu_ns: u64,
}

/// One simulated domain.
#[derive(Clone, Debug)]
pub struct SimDomain {
    pub id: DomainId,
    pub name: String,
    pub vcpus: Vec<SimVcpu>,
}

/// The simulated host.
pub struct SimHost {
    pub online: Vec<u32>,
    pub present: u32,
    pub domains: Vec<SimDomain>,
    /// Domains that vanish right after the next listing (before they are read).
    pub vanish_after_listing: Vec<DomainId>,
    /// Number of pin calls that changed something.
    pub pins: usize,
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
            pins: 0,
            start: Instant::now(),
            elapsed: Duration::ZERO,
        }
    }

    /// Add a domain whose vCPUs have the given demands and affinities.
    pub fn add(&mut self, n: u8, vcpus: &[(f64, &[u32])]) -> DomainId {
        let id = DomainId([n; 16]);
        self.domains.push(SimDomain {
            id,
            name: format!("dom{n}"),
            vcpus: vcpus
                .iter()
                .map(|&(demand, affinity)| SimVcpu {
                    demand,
                    affinity: affinity.to_vec(),
                    cpu_ns: 1_000_000_000 * u64::from(n),
                })
                .collect(),
        });
        id
    }

    /// The pCPU a vCPU runs on: its first allowed pCPU (a spanning vCPU stays where it started).
    fn runs_on(v: &SimVcpu) -> u32 {
        v.affinity[0]
    }

    /// Let `dt` of simulated time pass: each pCPU shares its time among its vCPUs in proportion to
    /// their demand when they want more than it has.
    pub fn advance(&mut self, dt: Duration) {
        let mut demand = vec![0.0; self.present as usize];
        for v in self.domains.iter().flat_map(|d| &d.vcpus) {
            demand[Self::runs_on(v) as usize] += v.demand;
        }
        for v in self.domains.iter_mut().flat_map(|d| &mut d.vcpus) {
            let total = demand[Self::runs_on(v) as usize];
            let share = if total > 100.0 {
                v.demand * 100.0 / total
            } else {
                v.demand
            };
            v.cpu_ns += (share / 100.0 * dt.as_nanos() as f64) as u64;
        }
        self.elapsed += dt;
    }

    /// Actual usage of each pCPU over a period with the current pins, in percent.
    pub fn pcpu_usage(&self) -> Vec<f64> {
        let mut demand = vec![0.0; self.present as usize];
        for v in self.domains.iter().flat_map(|d| &d.vcpus) {
            demand[Self::runs_on(v) as usize] += v.demand;
        }
        demand.into_iter().map(|d: f64| d.min(100.0)).collect()
    }

    pub fn domain(&self, id: &DomainId) -> Option<&SimDomain> {
        self.domains.iter().find(|d| d.id == *id)
    }
}

impl Host for SimHost {
    fn active_domains(&mut self) -> anyhow::Result<Vec<DomainRef>> {
        let listed = self
            .domains
            .iter()
            .map(|d| DomainRef {
                id: d.id,
                name: d.name.clone(),
            })
            .collect();
        for gone in std::mem::take(&mut self.vanish_after_listing) {
            self.domains.retain(|d| d.id != gone);
        }
        Ok(listed)
    }

    fn vcpus(&mut self, id: &DomainId) -> anyhow::Result<Option<Vec<VcpuInfo>>> {
        Ok(self.domain(id).map(|d| {
            d.vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| VcpuInfo {
                    number: i as u32,
                    cpu_time_ns: v.cpu_ns,
                    last_pcpu: Some(Self::runs_on(v)),
                    affinity: v.affinity.clone(),
                })
                .collect()
        }))
    }

    fn node_cpus(&mut self) -> anyhow::Result<NodeCpus> {
        Ok(NodeCpus {
            present: self.present,
            online: self.online.clone(),
        })
    }

    fn pin_vcpu(&mut self, id: &DomainId, vcpu: u32, pcpu: u32) -> anyhow::Result<Applied> {
        anyhow::ensure!(self.online.contains(&pcpu), "pCPU {pcpu} is offline");
        let Some(d) = self.domains.iter_mut().find(|d| d.id == *id) else {
            return Ok(Applied::Vanished);
        };
        let v = d
            .vcpus
            .get_mut(vcpu as usize)
            .ok_or_else(|| anyhow::anyhow!("no vCPU {vcpu}"))?;
        if v.affinity != [pcpu] {
            v.affinity = vec![pcpu];
            self.pins += 1;
        }
        Ok(Applied::Done)
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }
}
