//! [`CpuSampler`]: vCPU CPU times and run-queue delays in, the [`CpuSnapshot`] the vCPU planner
//! decides on out; [`VcpuHistory`] is what it needs of a vCPU's earlier samples.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::RateSeries;
use crate::host::{DomainId, VcpuInfo};

/// Nanoseconds of CPU time per second that make one percent of one pCPU.
const NS_PER_SEC_PER_PERCENT: f64 = 1e7;

/// The most a vCPU's usage or demand can read, in percent of one pCPU: a vCPU thread is running,
/// waiting to run or asleep, so neither exceeds 100 %; the margin allows for the instant a reading
/// is stamped with. A figure over it says the interval is wrong (a read that stalled and was stamped
/// long after the counters were read), and is not used.
const MOST_PERCENT: f64 = 110.0;

/// A vCPU across domains: domain UUID and vCPU number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuKey {
    /// The domain.
    pub domain: DomainId,
    /// The vCPU number inside it.
    pub vcpu: u32,
}

/// One vCPU as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuLoad {
    /// Which vCPU.
    pub key: VcpuKey,
    /// Percent of one pCPU used over the last interval; `None` until it has two samples.
    pub usage: Option<f64>,
    /// Percent of one pCPU it wanted: used plus waited for in the host run queue, where the
    /// hypervisor reports the wait; `None` otherwise.
    pub demand: Option<f64>,
    /// The pCPU it is pinned to, when its affinity is exactly one online pCPU.
    pub pinned: Option<u32>,
    /// The online pCPU it last ran on, if known.
    pub last_pcpu: Option<u32>,
    /// How much its usage swings from one sample to the next (a standard deviation, in points);
    /// `None` until known.
    pub usage_swing: Option<f64>,
    /// The same for its demand.
    pub demand_swing: Option<f64>,
    /// Where the planner may pin it.
    pub allowed: Allowed,
}

/// The pCPUs a vCPU may be pinned to: what its admin, its memory's NUMA binding and the host's
/// pool leave it (see [`crate::cpu_plan`], rule 9).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Allowed {
    /// Any online pCPU.
    #[default]
    Any,
    /// Only these pCPUs, ascending (shared between the vCPUs that have the same set). Empty: the
    /// vCPU is never moved (its domain is excluded, or none of its pCPUs is online).
    Only(Arc<[u32]>),
}

impl Allowed {
    /// May the vCPU be pinned to `pcpu`?
    pub fn contains(&self, pcpu: u32) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Only(set) => set.binary_search(&pcpu).is_ok(),
        }
    }

    /// Never to be moved: nothing allowed.
    pub fn is_none(&self) -> bool {
        matches!(self, Allowed::Only(set) if set.is_empty())
    }
}

impl VcpuLoad {
    /// vCPU `key` with nothing known of it: no load yet, not pinned, no pCPU it last ran on,
    /// allowed anywhere. Snapshots built by hand (tests, benchmarks) start from it.
    pub fn unknown(key: VcpuKey) -> Self {
        Self {
            key,
            usage: None,
            demand: None,
            pinned: None,
            last_pcpu: None,
            usage_swing: None,
            demand_swing: None,
            allowed: Allowed::Any,
        }
    }

    /// The pCPU this vCPU's usage is charged to: its pin, else the pCPU it last ran on.
    pub fn charged_pcpu(&self) -> Option<u32> {
        self.pinned.or(self.last_pcpu)
    }

    /// Its demand where known, else its usage.
    pub fn demand_or_usage(&self) -> Option<f64> {
        self.demand.or(self.usage)
    }
}

/// Everything the vCPU planner needs about the host at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSnapshot {
    /// Online pCPUs, ascending.
    pub pcpus: Vec<u32>,
    /// Every vCPU of every active domain.
    pub vcpus: Vec<VcpuLoad>,
    /// The online pCPUs that are hyperthread siblings, one group per core that has two or more
    /// (see [`crate::topology::Topology::sibling_groups`]); empty on a host without SMT or one
    /// that does not describe its topology.
    pub cores: Vec<Vec<u32>>,
    /// The online pCPUs of each NUMA node, where the host describes its nodes (else empty).
    pub nodes: Vec<Vec<u32>>,
}

impl CpuSnapshot {
    /// Does the hypervisor report run-queue delay (does any vCPU have a demand)?
    pub fn reports_delay(&self) -> bool {
        self.vcpus.iter().any(|v| v.demand.is_some())
    }
}

/// Usage of every online pCPU: the sum of the usages of the vCPUs charged to it (pinned to exactly
/// that pCPU, or spanning several and last run there). vCPUs without a usage yet count as 0.
pub fn pcpu_usage(snapshot: &CpuSnapshot) -> BTreeMap<u32, f64> {
    charged_sums(snapshot, |v| v.usage)
}

/// Per online pCPU, the sum of `figure` over the vCPUs charged to it (unknown figures count 0).
fn charged_sums(
    snapshot: &CpuSnapshot,
    figure: impl Fn(&VcpuLoad) -> Option<f64>,
) -> BTreeMap<u32, f64> {
    let mut sums: BTreeMap<u32, f64> = snapshot.pcpus.iter().map(|&p| (p, 0.0)).collect();
    for v in &snapshot.vcpus {
        if let Some(slot) = v.charged_pcpu().and_then(|p| sums.get_mut(&p)) {
            *slot += figure(v).unwrap_or(0.0);
        }
    }
    sums
}

/// Demand of every online pCPU: the sum of the demands of the vCPUs charged to it (a vCPU without
/// a demand counts its usage). `None` when no vCPU has a demand: the hypervisor reports no
/// run-queue delay.
pub fn pcpu_demand(snapshot: &CpuSnapshot) -> Option<BTreeMap<u32, f64>> {
    if !snapshot.reports_delay() {
        return None;
    }
    Some(charged_sums(snapshot, VcpuLoad::demand_or_usage))
}

/// What the sampler keeps of one vCPU between samples: its CPU-time and demand series and its
/// affinity at the last sample. The scheduler keeps it in its record of the vCPU's domain run, so
/// it goes when the vCPU or its domain does.
///
/// Usage and demand are averaged over the last `window` samples, so that a load which swings from
/// one sample to the next is judged by its level, not by its latest swing. A vCPU's demand is what
/// it wants wherever it runs, so its average carries across pin changes; its usage depends on where
/// it runs (a vCPU sharing a pCPU uses its share), so its average starts again when its affinity
/// changes.
#[derive(Clone, Debug)]
pub struct VcpuHistory {
    usage: RateSeries,
    /// Rates of CPU time plus run-queue delay: demand.
    demand: RateSeries,
    /// Its affinity at the last sample.
    affinity: Option<Vec<u32>>,
}

impl VcpuHistory {
    /// No sample yet; rates averaged over the last `window` intervals.
    pub fn new(window: usize) -> Self {
        Self {
            usage: RateSeries::with_window(window),
            demand: RateSeries::with_window(window),
            affinity: None,
        }
    }

    /// Average over the last `window` intervals from now on, keeping the samples.
    pub fn set_window(&mut self, window: usize) {
        self.usage.set_window(window);
        self.demand.set_window(window);
    }
}

/// Builds one cycle's [`CpuSnapshot`] from each vCPU's reading and its [`VcpuHistory`].
#[derive(Default)]
pub struct CpuSampler {
    pcpus: Vec<u32>,
    vcpus: Vec<VcpuLoad>,
}

impl CpuSampler {
    /// Start a cycle on a host whose online pCPUs are `online`.
    pub fn new(online: &[u32]) -> Self {
        Self {
            pcpus: online.to_vec(),
            vcpus: Vec::new(),
        }
    }

    /// Record vCPU `v` of `domain`, read at `at`, against its `history` (updated).
    pub fn record(
        &mut self,
        domain: DomainId,
        at: Instant,
        v: &VcpuInfo,
        history: &mut VcpuHistory,
    ) {
        let key = VcpuKey {
            domain,
            vcpu: v.number,
        };
        if history
            .affinity
            .as_ref()
            .is_some_and(|before| *before != v.affinity)
        {
            history.usage.restart();
        }
        history.affinity = Some(v.affinity.clone());
        let percent = |(rate, swing): (f64, Option<f64>)| {
            (
                rate / NS_PER_SEC_PER_PERCENT,
                swing.map(|s| s / NS_PER_SEC_PER_PERCENT),
            )
        };
        let (usage, usage_swing) = history
            .usage
            .counter_with_swing(v.cpu_time_ns, at)
            .map(percent)
            .unzip();
        let (demand, demand_swing) = v
            .delay_ns
            .and_then(|delay| {
                let used_or_waited = v.cpu_time_ns.saturating_add(delay);
                history.demand.counter_with_swing(used_or_waited, at)
            })
            .map(percent)
            .unzip();
        // More than the interval allows: the interval is wrong; both series start again.
        let impossible = |p: Option<f64>| p.is_some_and(|p| p > MOST_PERCENT);
        let (usage, usage_swing, demand, demand_swing) = if impossible(usage) || impossible(demand)
        {
            log::debug!(
                "vCPU{} of domain {domain}: {usage:?} % used, {demand:?} % wanted, more than the interval allows; not used",
                v.number
            );
            history.usage.restart();
            history.demand.restart();
            (None, None, None, None)
        } else {
            (usage, usage_swing, demand, demand_swing)
        };
        let online = |p: &u32| self.pcpus.binary_search(p).is_ok();
        let pinned = match v.affinity.as_slice() {
            [only] if online(only) => Some(*only),
            _ => None,
        };
        self.vcpus.push(VcpuLoad {
            key,
            usage,
            demand,
            pinned,
            last_pcpu: v.last_pcpu.filter(online),
            usage_swing: usage_swing.flatten(),
            demand_swing: demand_swing.flatten(),
            allowed: Allowed::Any,
        });
    }

    /// Close the cycle and return the snapshot, its vCPUs in key order.
    pub fn finish(self) -> CpuSnapshot {
        let mut vcpus = self.vcpus;
        vcpus.sort_by_key(|v| v.key);
        CpuSnapshot {
            pcpus: self.pcpus,
            vcpus,
            cores: Vec::new(),
            nodes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dom(n: u8) -> DomainId {
        DomainId([n; 16])
    }

    /// Each vCPU's history, as the scheduler's records keep them, by domain and vCPU number.
    type Histories = std::collections::HashMap<(u8, u32), VcpuHistory>;

    /// One cycle on a host whose online pCPUs are `online`: each domain's vCPUs read at `at`.
    fn sample(
        histories: &mut Histories,
        window: usize,
        online: &[u32],
        at: Instant,
        domains: &[(u8, &[VcpuInfo])],
    ) -> CpuSnapshot {
        let mut s = CpuSampler::new(online);
        for &(d, vcpus) in domains {
            for v in vcpus {
                let history = histories
                    .entry((d, v.number))
                    .or_insert_with(|| VcpuHistory::new(window));
                s.record(dom(d), at, v, history);
            }
        }
        s.finish()
    }

    fn vcpu(number: u32, ns: u64, pcpu: u32, affinity: &[u32]) -> VcpuInfo {
        VcpuInfo {
            number,
            cpu_time_ns: ns,
            last_pcpu: Some(pcpu),
            affinity: affinity.to_vec(),
            delay_ns: None,
            configured: None,
        }
    }

    #[test]
    fn averaged_usage_starts_again_when_a_vcpu_is_re_pinned_but_demand_carries_on() {
        let mut h = Histories::new();
        let t0 = Instant::now();
        let at = |n| t0 + Duration::from_secs(n);
        let read = |ns: u64, delay: u64, pcpu: u32| VcpuInfo {
            delay_ns: Some(delay),
            ..vcpu(0, ns, pcpu, &[pcpu])
        };
        // Three seconds sharing pCPU 0 (30 % used, 100 % wanted), then one alone on pCPU 1.
        let mut snaps = Vec::new();
        for (n, (ns, delay, pcpu)) in [
            (0, 0, 0),
            (300_000_000, 700_000_000, 0),
            (600_000_000, 1_400_000_000, 0),
            (900_000_000, 2_100_000_000, 0),
            (1_900_000_000, 2_100_000_000, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let snap = sample(
                &mut h,
                3,
                &[0, 1],
                at(n as u64),
                &[(1, &[read(ns, delay, pcpu)])],
            );
            snaps.push(snap.vcpus[0].clone());
        }
        assert!((snaps[3].usage.unwrap() - 30.0).abs() < 1e-9);
        assert!((snaps[3].demand.unwrap() - 100.0).abs() < 1e-9);
        // Re-pinned: usage is the last second's alone, not a mix of before and after.
        assert!((snaps[4].usage.unwrap() - 100.0).abs() < 1e-9);
        assert!((snaps[4].demand.unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn sampler_derives_vcpu_usage_over_the_measured_interval() {
        let mut h = Histories::new();
        let t0 = Instant::now();
        let d1 = [vcpu(0, 0, 0, &[0]), vcpu(1, 0, 1, &[0, 1])];
        let first = sample(&mut h, 1, &[0, 1], t0, &[(1, &d1)]);
        assert!(first.vcpus.iter().all(|v| v.usage.is_none()));

        // vCPU 0 used 1 s of its 2 s: 50 %. vCPU 1 used 0.2 s: 10 %. Domain 2 is new.
        let t1 = t0 + Duration::from_secs(2);
        let d1 = [
            vcpu(0, 1_000_000_000, 0, &[0]),
            vcpu(1, 200_000_000, 1, &[0, 1]),
        ];
        let d2 = [vcpu(0, 9_000_000_000, 1, &[1])];
        let snap = sample(&mut h, 1, &[0, 1], t1, &[(1, &d1), (2, &d2)]);
        let u: Vec<_> = snap.vcpus.iter().map(|v| v.usage).collect();
        assert!((u[0].unwrap() - 50.0).abs() < 1e-9);
        assert!((u[1].unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(u[2], None);
        assert_eq!(snap.vcpus[0].pinned, Some(0));
        assert_eq!(snap.vcpus[1].pinned, None);

        // Domain 1 is not read: only what was read is in the snapshot.
        let d2 = [vcpu(0, 9_500_000_000, 1, &[1])];
        let snap = sample(&mut h, 1, &[0, 1], t1 + Duration::from_secs(1), &[(2, &d2)]);
        assert_eq!(snap.vcpus.len(), 1);
        assert!((snap.vcpus[0].usage.unwrap() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn pin_to_an_offline_pcpu_does_not_count_as_pinned() {
        let snap = sample(
            &mut Histories::new(),
            1,
            &[0, 2],
            Instant::now(),
            &[(1, &[vcpu(0, 0, 1, &[1])])],
        );
        let v = &snap.vcpus[0];
        assert_eq!(v.pinned, None);
        assert_eq!(v.last_pcpu, None);
    }

    #[test]
    fn pcpu_usage_charges_pins_and_spanning_vcpus_to_their_last_pcpu() {
        let key = |d, n| VcpuKey {
            domain: dom(d),
            vcpu: n,
        };
        let load = |d, n, usage, pinned, last_pcpu| VcpuLoad {
            usage,
            pinned,
            last_pcpu,
            ..VcpuLoad::unknown(key(d, n))
        };
        let snap = CpuSnapshot {
            pcpus: vec![0, 1, 2],
            vcpus: vec![
                load(1, 0, Some(30.0), Some(0), Some(0)),
                load(1, 1, Some(20.0), None, Some(2)),
                load(2, 0, Some(5.0), Some(0), Some(0)),
                load(2, 1, None, Some(1), Some(1)),
            ],
            cores: Vec::new(),
            nodes: Vec::new(),
        };
        let u = pcpu_usage(&snap);
        assert_eq!(
            u.into_iter().collect::<Vec<_>>(),
            vec![(0, 35.0), (1, 0.0), (2, 20.0)]
        );
    }

    #[test]
    fn demand_adds_the_run_queue_wait_to_the_time_used() {
        let mut h = Histories::new();
        let t0 = Instant::now();
        let with_delay = |ns, delay| VcpuInfo {
            delay_ns: Some(delay),
            ..vcpu(0, ns, 0, &[0])
        };
        sample(
            &mut h,
            1,
            &[0, 1],
            t0,
            &[(1, &[with_delay(0, 0), vcpu(1, 0, 1, &[1])])],
        );
        // Over 2 s: 0.66 s run and 1.18 s waiting = 33 % used, 92 % wanted. No delay: no demand.
        let t1 = t0 + Duration::from_secs(2);
        let read = [
            with_delay(660_000_000, 1_180_000_000),
            vcpu(1, 1_760_000_000, 1, &[1]),
        ];
        let snap = sample(&mut h, 1, &[0, 1], t1, &[(1, &read)]);
        assert!((snap.vcpus[0].usage.unwrap() - 33.0).abs() < 1e-9);
        assert!((snap.vcpus[0].demand.unwrap() - 92.0).abs() < 1e-9);
        assert_eq!(snap.vcpus[1].demand, None);
        let demand = pcpu_demand(&snap).unwrap();
        // A vCPU without a demand counts its usage.
        assert_eq!(
            demand.into_iter().collect::<Vec<_>>(),
            vec![(0, 92.0), (1, 88.0)]
        );
        let without = CpuSnapshot {
            vcpus: vec![snap.vcpus[1].clone()],
            ..snap
        };
        assert_eq!(pcpu_demand(&without), None);
    }

    #[test]
    fn a_figure_beyond_what_the_interval_allows_is_not_used() {
        let mut h = Histories::new();
        let t0 = Instant::now();
        sample(&mut h, 1, &[0], t0, &[(1, &[vcpu(0, 0, 0, &[0])])]);
        // 4 s of CPU time over a 1 s interval: a read stamped long after its counters were read.
        let t1 = t0 + Duration::from_secs(1);
        let snap = sample(
            &mut h,
            1,
            &[0],
            t1,
            &[(1, &[vcpu(0, 4_000_000_000, 0, &[0])])],
        );
        assert_eq!(snap.vcpus[0].usage, None);
        // The next interval is measured from that reading on.
        let t2 = t1 + Duration::from_secs(1);
        let snap = sample(
            &mut h,
            1,
            &[0],
            t2,
            &[(1, &[vcpu(0, 4_500_000_000, 0, &[0])])],
        );
        assert!((snap.vcpus[0].usage.unwrap() - 50.0).abs() < 1e-9);
    }
}
