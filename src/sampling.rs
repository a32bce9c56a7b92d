//! Derive: turn successive raw readings into rates over the measured wall-clock interval.
//!
//! [`Rates`] keeps the previous reading of every series (a vCPU's CPU time, a guest's free memory)
//! with the instant it was taken, and answers with a per-second rate once a series has two
//! readings. A series that was not read in a cycle (its domain vanished) is forgotten at the end of
//! that cycle, and a counter that goes backwards (its domain restarted) starts again, so a stale
//! reading is never compared with a new one.
//!
//! [`CpuSampler`] applies that to vCPU CPU times and builds the [`CpuSnapshot`] the planner decides
//! on, and [`pcpu_usage`] charges each vCPU's usage to a pCPU.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

use crate::host::{BalloonStats, DomainId, VcpuInfo};

/// One series: its latest readings (value, instant), oldest first, and the cycle it was last read.
struct Series {
    readings: VecDeque<(f64, Instant)>,
    generation: u64,
}

/// Per-key rates of change over the measured wall-clock interval, averaged over the last `window`
/// intervals (one by default), and how much the rate swings from one interval to the next.
///
/// The swing is the larger of the latest change of the single-interval rate and the second largest
/// of the last five, scaled to a standard deviation (for normal noise, the second largest of five
/// is about 1.435 σ). So a rate that just changed counts as swinging for one sample: a change is
/// acted on once it holds for a second sample, which a one-sample dip never does. A jump and back
/// makes two large changes, and counts as a swing while they are among the last five; one jump that
/// holds is not a swing.
pub struct Rates<K> {
    last: HashMap<K, Series>,
    generation: u64,
    window: usize,
}

impl<K> Default for Rates<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
            generation: 0,
            window: 1,
        }
    }
}

impl<K: Hash + Eq> Rates<K> {
    /// An empty tracker whose rates cover the last interval.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty tracker whose rates cover the last `window` intervals (at least one): the change
    /// since the oldest reading kept, over the time since then. A series with fewer readings
    /// averages what it has.
    pub fn with_window(window: usize) -> Self {
        Self {
            window: window.max(1),
            ..Self::default()
        }
    }

    /// Record `value` read at `at`; return the per-second change since the oldest reading of
    /// `key` kept, or `None` for a new series or a non-positive interval.
    pub fn gauge(&mut self, key: K, value: f64, at: Instant) -> Option<f64> {
        let generation = self.generation;
        let series = self.last.entry(key).or_insert_with(|| Series {
            readings: VecDeque::new(),
            generation,
        });
        series.generation = generation;
        while series.readings.len() > self.window.max(SWING_SAMPLES) {
            series.readings.pop_front();
        }
        // The reading `window` intervals back, or the oldest there is.
        let before = series
            .readings
            .get(series.readings.len().saturating_sub(self.window))
            .copied();
        series.readings.push_back((value, at));
        let (old, then) = before?;
        let secs = at.checked_duration_since(then)?.as_secs_f64();
        (secs > 0.0).then(|| (value - old) / secs)
    }

    /// Like [`Rates::counter`], with how much the rate swings from one interval to the next
    /// (`None` until two single-interval rates are known).
    pub fn counter_with_swing(
        &mut self,
        key: K,
        value: u64,
        at: Instant,
    ) -> Option<(f64, Option<f64>)>
    where
        K: Clone,
    {
        let rate = self.counter(key.clone(), value, at)?;
        Some((rate, self.last.get(&key).and_then(|s| swing(&s.readings))))
    }

    /// Like [`Rates::gauge`] for a cumulative counter: a counter lower than its previous reading
    /// (the domain restarted) starts a new series and has no rate yet.
    pub fn counter(&mut self, key: K, value: u64, at: Instant) -> Option<f64> {
        if let Some(series) = self.last.get_mut(&key)
            && series
                .readings
                .back()
                .is_some_and(|&(before, _)| (value as f64) < before)
        {
            series.readings.clear();
        }
        let rate = self.gauge(key, value as f64, at)?;
        (rate >= 0.0).then_some(rate)
    }

    /// Forget all of `key`'s history but its latest reading, so its next rate (and swing) covers
    /// only the intervals from that reading on.
    pub fn restart(&mut self, key: &K) {
        if let Some(series) = self.last.get_mut(key) {
            while series.readings.len() > 1 {
                series.readings.pop_front();
            }
        }
    }

    /// Keep `key`'s series alive through this cycle without a new reading.
    pub fn touch(&mut self, key: &K) {
        if let Some(series) = self.last.get_mut(key) {
            series.generation = self.generation;
        }
    }

    /// Close a cycle: forget every series that was not read since the previous call.
    pub fn end_cycle(&mut self) {
        let current = self.generation;
        self.last.retain(|_, r| r.generation == current);
        self.generation += 1;
    }

    /// Number of series currently tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when no series is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Readings kept per series, at least, to judge how much its rate swings.
const SWING_SAMPLES: usize = 6;

/// How much the single-interval rates between successive `readings` swing (see [`Rates`]), as a
/// standard deviation. `None` with fewer than two rates.
fn swing(readings: &VecDeque<(f64, Instant)>) -> Option<f64> {
    let rates: Vec<f64> = readings
        .iter()
        .zip(readings.iter().skip(1))
        .rev()
        .take(SWING_SAMPLES)
        .filter_map(|(&(v0, t0), &(v1, t1))| {
            let secs = t1.checked_duration_since(t0)?.as_secs_f64();
            (secs > 0.0).then(|| (v1 - v0) / secs)
        })
        .collect();
    // Newest first.
    let mut steps: Vec<f64> = rates.windows(2).map(|w| (w[0] - w[1]).abs()).collect();
    let latest = *steps.first()?;
    steps.sort_by(f64::total_cmp);
    let second_largest = steps[steps.len().saturating_sub(2)];
    Some(latest.max(second_largest) / 1.435)
}

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
}

impl VcpuLoad {
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

/// Turns successive vCPU CPU-time readings into a [`CpuSnapshot`].
///
/// Usage and demand are averaged over the last `window` samples, so that a load which swings from
/// one sample to the next is judged by its level, not by its latest swing. A vCPU's demand is what
/// it wants wherever it runs, so its average carries across pin changes; its usage depends on where
/// it runs (a vCPU sharing a pCPU uses its share), so its average starts again when its affinity
/// changes.
#[derive(Default)]
pub struct CpuSampler {
    rates: Rates<VcpuKey>,
    /// Rates of CPU time plus run-queue delay.
    wanted: Rates<VcpuKey>,
    pcpus: Vec<u32>,
    vcpus: Vec<VcpuLoad>,
    /// Each vCPU's affinity at the previous sample, and at this one.
    affinity_before: HashMap<VcpuKey, Vec<u32>>,
    affinity_now: HashMap<VcpuKey, Vec<u32>>,
}

impl CpuSampler {
    /// A sampler with no history whose rates cover the last sample interval.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sampler with no history whose rates are averaged over the last `window` intervals.
    pub fn with_window(window: usize) -> Self {
        Self {
            rates: Rates::with_window(window),
            wanted: Rates::with_window(window),
            ..Self::default()
        }
    }

    /// Start a cycle on a host whose online pCPUs are `online`.
    pub fn begin(&mut self, online: &[u32]) {
        self.pcpus = online.to_vec();
        self.vcpus.clear();
    }

    /// Record the vCPUs of one domain, read at `at`.
    pub fn record(&mut self, domain: DomainId, at: Instant, vcpus: &[VcpuInfo]) {
        for v in vcpus {
            let key = VcpuKey {
                domain,
                vcpu: v.number,
            };
            if self
                .affinity_before
                .get(&key)
                .is_some_and(|before| *before != v.affinity)
            {
                self.rates.restart(&key);
            }
            self.affinity_now.insert(key, v.affinity.clone());
            let percent = |(rate, swing): (f64, Option<f64>)| (rate / 1e7, swing.map(|s| s / 1e7));
            let (usage, usage_swing) = self
                .rates
                .counter_with_swing(key, v.cpu_time_ns, at)
                .map(percent)
                .unzip();
            let (demand, demand_swing) = v
                .delay_ns
                .and_then(|delay| {
                    let wanted = v.cpu_time_ns.saturating_add(delay);
                    self.wanted.counter_with_swing(key, wanted, at)
                })
                .map(percent)
                .unzip();
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
            });
        }
    }

    /// Close the cycle: forget vCPUs that were not recorded, and return the snapshot.
    pub fn finish(&mut self) -> CpuSnapshot {
        self.rates.end_cycle();
        self.wanted.end_cycle();
        self.affinity_before = std::mem::take(&mut self.affinity_now);
        let mut vcpus = std::mem::take(&mut self.vcpus);
        vcpus.sort_by_key(|v| v.key);
        CpuSnapshot {
            pcpus: self.pcpus.clone(),
            vcpus,
        }
    }

    /// Number of vCPU series with history.
    pub fn tracked(&self) -> usize {
        self.rates.len()
    }
}

/// A guest's memory as the memory planner sees it, in KiB, from a fresh balloon report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuestMemory {
    /// Which domain.
    pub id: DomainId,
    /// Balloon size now.
    pub actual_kib: u64,
    /// Largest size the balloon may reach.
    pub max_kib: u64,
    /// Memory the guest can still use: what it reports as available (`usable`, its MemAvailable)
    /// when it does, else what it leaves unused (`unused`, its MemFree). MemFree overstates it: a
    /// ballooned-down guest can show tens of MiB free that sit in reserves it cannot allocate.
    pub free_kib: u64,
    /// Consumption: growth of the memory the guest uses (actual − unused), in KiB/s, over the
    /// measured interval. Positive = consuming. A balloon change does not count as consumption.
    pub rate_kib_s: f64,
}

impl GuestMemory {
    /// Memory the guest uses: its balloon size minus what it can still use.
    pub fn used_kib(&self) -> u64 {
        self.actual_kib.saturating_sub(self.free_kib)
    }

    /// Free memory as a percentage of the balloon size.
    pub fn free_pct(&self) -> f64 {
        if self.actual_kib == 0 {
            0.0
        } else {
            100.0 * self.free_kib as f64 / self.actual_kib as f64
        }
    }
}

/// What a balloon report is worth this cycle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryReading {
    /// A new, consistent report with a consumption rate: the planner may act on it.
    Fresh(GuestMemory),
    /// A new, consistent report, but the first one: no rate yet.
    First,
    /// The guest has not posted a report since the last one we saw (or since we first saw it,
    /// when the figures may predate the stats period): not facts yet.
    Stale,
    /// The balloon moved since the previous read: the report may predate the move, so balloon
    /// size and free memory cannot be compared yet.
    Settling,
    /// The report contradicts itself (unused above actual, no total): ignored.
    Inconsistent,
    /// The domain reports no guest figures at all: no balloon device or no guest driver.
    NoStats,
}

/// What the sampler remembers of a domain's previous read.
struct LastRead {
    update: u64,
    actual_kib: u64,
    generation: u64,
}

/// Turns successive balloon reports into [`MemoryReading`]s.
///
/// A report is used only when it is new (the guest posted it after our previous read) and the
/// balloon did not move between our previous read and this one: then the report was taken with the
/// balloon at the size read now, and "used = actual − free" is a consistent figure.
#[derive(Default)]
pub struct MemorySampler {
    used: Rates<DomainId>,
    last: HashMap<DomainId, LastRead>,
    generation: u64,
}

impl MemorySampler {
    /// A sampler with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Judge the report `stats` of domain `id`, read at `at`.
    pub fn record(&mut self, id: DomainId, at: Instant, stats: &BalloonStats) -> MemoryReading {
        let (Some(unused), Some(available), Some(update)) =
            (stats.unused_kib, stats.available_kib, stats.last_update)
        else {
            return MemoryReading::NoStats;
        };
        let now = LastRead {
            update,
            actual_kib: stats.actual_kib,
            generation: self.generation,
        };
        let Some(previous) = self.last.insert(id, now) else {
            return MemoryReading::Stale;
        };
        if update <= previous.update {
            self.used.touch(&id);
            return MemoryReading::Stale;
        }
        if stats.actual_kib != previous.actual_kib {
            self.used.touch(&id);
            return MemoryReading::Settling;
        }
        let free = stats.usable_kib.unwrap_or(unused);
        if unused > stats.actual_kib
            || free > stats.actual_kib
            || available == 0
            || stats.actual_kib == 0
        {
            self.used.touch(&id);
            return MemoryReading::Inconsistent;
        }
        let used = stats.actual_kib - free;
        match self.used.gauge(id, used as f64, at) {
            None => MemoryReading::First,
            Some(rate_kib_s) => MemoryReading::Fresh(GuestMemory {
                id,
                actual_kib: stats.actual_kib,
                max_kib: stats.max_kib,
                free_kib: free,
                rate_kib_s,
            }),
        }
    }

    /// Close a cycle: forget domains that were not recorded in it.
    pub fn end_cycle(&mut self) {
        let current = self.generation;
        self.last.retain(|_, r| r.generation == current);
        self.used.end_cycle();
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dom(n: u8) -> DomainId {
        DomainId([n; 16])
    }

    fn vcpu(number: u32, ns: u64, pcpu: u32, affinity: &[u32]) -> VcpuInfo {
        VcpuInfo {
            number,
            cpu_time_ns: ns,
            last_pcpu: Some(pcpu),
            affinity: affinity.to_vec(),
            delay_ns: None,
        }
    }

    #[test]
    fn rate_uses_the_measured_interval_not_the_period() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        assert_eq!(r.counter("a", 1_000, t0), None);
        // 1.5 s of CPU over 3 s measured = 0.5 s/s, whatever the nominal period was.
        let rate = r.counter("a", 1_000 + 1_500_000_000, t0 + Duration::from_secs(3));
        assert!((rate.unwrap() - 5e8).abs() < 1.0);
    }

    #[test]
    fn counter_going_backwards_restarts_the_series() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        r.counter("a", 5_000, t0);
        assert_eq!(r.counter("a", 10, t0 + Duration::from_secs(1)), None);
        let rate = r.counter("a", 1_010, t0 + Duration::from_secs(2)).unwrap();
        assert!((rate - 1_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_window_averages_the_last_intervals() {
        let mut r = Rates::with_window(3);
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        // A counter advancing 10, 40, 10, 40, ... per second.
        let mut total = 0;
        let mut rates = Vec::new();
        for (n, step) in [0, 10, 40, 10, 40, 10].into_iter().enumerate() {
            total += step;
            rates.push(r.counter("a", total, s(n as u64)));
        }
        // Fewer readings than the window: what there is; then the mean of the last three.
        assert_eq!(rates[..3], [None, Some(10.0), Some(25.0)]);
        assert_eq!(rates[3], Some(20.0));
        assert_eq!(rates[4], Some(30.0));
        assert_eq!(rates[5], Some(20.0));
        // A restart keeps only the latest reading: the next rate is the last interval's.
        r.restart(&"a");
        assert_eq!(r.counter("a", total + 40, s(6)), Some(40.0));
        // A counter going backwards drops the whole window.
        assert_eq!(r.counter("a", 5, s(7)), None);
        assert_eq!(r.counter("a", 15, s(8)), Some(10.0));
    }

    #[test]
    fn a_change_swings_until_it_holds_and_a_dip_while_it_is_recent() {
        let t0 = Instant::now();
        let swings = |steps: &[u64]| {
            let mut r = Rates::new();
            let mut total = 0;
            let mut last = None;
            for (n, step) in std::iter::once(&0).chain(steps).enumerate() {
                total += step;
                last = r.counter_with_swing("a", total, t0 + Duration::from_secs(n as u64));
            }
            last.and_then(|(_, swing)| swing)
        };
        // One rate known: no swing yet. Steady: none.
        assert_eq!(swings(&[10]), None);
        assert_eq!(swings(&[10, 10, 10, 10]), Some(0.0));
        // Alternating 10 and 40: it swings by 30 every interval.
        let alternating = swings(&[10, 40, 10, 40, 10, 40]).unwrap();
        assert!((alternating - 30.0 / 1.435).abs() < 1e-9);
        // Steady at 10, then 100: a swing for the sample that shows the jump, none once it holds.
        let jump = swings(&[10, 10, 10, 10, 100]).unwrap();
        assert!((jump - 90.0 / 1.435).abs() < 1e-9);
        assert_eq!(swings(&[10, 10, 10, 100, 100]), Some(0.0));
        // A one-sample dip is a jump and back: a swing, while it is among the last five changes.
        let dip = swings(&[100, 100, 100, 78, 100]).unwrap();
        assert!((dip - 22.0 / 1.435).abs() < 1e-9);
        assert!(swings(&[100, 100, 78, 100, 100, 100, 100]).unwrap() > 15.0);
        assert_eq!(swings(&[100, 78, 100, 100, 100, 100, 100, 100]), Some(0.0));
    }

    #[test]
    fn averaged_usage_starts_again_when_a_vcpu_is_re_pinned_but_demand_carries_on() {
        let mut s = CpuSampler::with_window(3);
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
            s.begin(&[0, 1]);
            s.record(dom(1), at(n as u64), &[read(ns, delay, pcpu)]);
            snaps.push(s.finish().vcpus[0].clone());
        }
        assert!((snaps[3].usage.unwrap() - 30.0).abs() < 1e-9);
        assert!((snaps[3].demand.unwrap() - 100.0).abs() < 1e-9);
        // Re-pinned: usage is the last second's alone, not a mix of before and after.
        assert!((snaps[4].usage.unwrap() - 100.0).abs() < 1e-9);
        assert!((snaps[4].demand.unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn gauge_reports_signed_change() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        r.gauge(1, 100.0, t0);
        let rate = r.gauge(1, 40.0, t0 + Duration::from_secs(2)).unwrap();
        assert!((rate + 30.0).abs() < 1e-9);
    }

    #[test]
    fn zero_interval_has_no_rate() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        r.gauge(1, 1.0, t0);
        assert_eq!(r.gauge(1, 2.0, t0), None);
    }

    #[test]
    fn series_not_read_in_a_cycle_is_forgotten() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        r.counter("gone", 1, t0);
        r.counter("stays", 1, t0);
        r.end_cycle();
        r.counter("stays", 2, t0 + Duration::from_secs(1));
        r.end_cycle();
        assert_eq!(r.len(), 1);
        // The vanished series comes back as new: no rate against its stale reading.
        assert_eq!(r.counter("gone", 10_000, t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn sampler_derives_vcpu_usage_and_tolerates_domains_coming_and_going() {
        let mut s = CpuSampler::new();
        let t0 = Instant::now();
        s.begin(&[0, 1]);
        s.record(dom(1), t0, &[vcpu(0, 0, 0, &[0]), vcpu(1, 0, 1, &[0, 1])]);
        let first = s.finish();
        assert!(first.vcpus.iter().all(|v| v.usage.is_none()));

        let t1 = t0 + Duration::from_secs(2);
        s.begin(&[0, 1]);
        // vCPU 0 used 1 s of its 2 s: 50 %. vCPU 1 used 0.2 s: 10 %. Domain 2 is new.
        s.record(
            dom(1),
            t1,
            &[
                vcpu(0, 1_000_000_000, 0, &[0]),
                vcpu(1, 200_000_000, 1, &[0, 1]),
            ],
        );
        s.record(dom(2), t1, &[vcpu(0, 9_000_000_000, 1, &[1])]);
        let snap = s.finish();
        let u: Vec<_> = snap.vcpus.iter().map(|v| v.usage).collect();
        assert!((u[0].unwrap() - 50.0).abs() < 1e-9);
        assert!((u[1].unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(u[2], None);
        assert_eq!(snap.vcpus[0].pinned, Some(0));
        assert_eq!(snap.vcpus[1].pinned, None);

        // Domain 1 vanishes; its series are dropped at the end of the cycle.
        s.begin(&[0, 1]);
        s.record(
            dom(2),
            t1 + Duration::from_secs(1),
            &[vcpu(0, 9_500_000_000, 1, &[1])],
        );
        let snap = s.finish();
        assert_eq!(snap.vcpus.len(), 1);
        assert!((snap.vcpus[0].usage.unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(s.tracked(), 1);
    }

    #[test]
    fn pin_to_an_offline_pcpu_does_not_count_as_pinned() {
        let mut s = CpuSampler::new();
        s.begin(&[0, 2]);
        s.record(dom(1), Instant::now(), &[vcpu(0, 0, 1, &[1])]);
        let v = &s.finish().vcpus[0];
        assert_eq!(v.pinned, None);
        assert_eq!(v.last_pcpu, None);
    }

    #[test]
    fn pcpu_usage_charges_pins_and_spanning_vcpus_to_their_last_pcpu() {
        let key = |d, n| VcpuKey {
            domain: dom(d),
            vcpu: n,
        };
        let snap = CpuSnapshot {
            pcpus: vec![0, 1, 2],
            vcpus: vec![
                VcpuLoad {
                    key: key(1, 0),
                    usage: Some(30.0),
                    demand: None,
                    pinned: Some(0),
                    last_pcpu: Some(0),
                    usage_swing: None,
                    demand_swing: None,
                },
                VcpuLoad {
                    key: key(1, 1),
                    usage: Some(20.0),
                    demand: None,
                    pinned: None,
                    last_pcpu: Some(2),
                    usage_swing: None,
                    demand_swing: None,
                },
                VcpuLoad {
                    key: key(2, 0),
                    usage: Some(5.0),
                    demand: None,
                    pinned: Some(0),
                    last_pcpu: Some(0),
                    usage_swing: None,
                    demand_swing: None,
                },
                VcpuLoad {
                    key: key(2, 1),
                    usage: None,
                    demand: None,
                    pinned: Some(1),
                    last_pcpu: Some(1),
                    usage_swing: None,
                    demand_swing: None,
                },
            ],
        };
        let u = pcpu_usage(&snap);
        assert_eq!(
            u.into_iter().collect::<Vec<_>>(),
            vec![(0, 35.0), (1, 0.0), (2, 20.0)]
        );
    }

    fn stats(actual: u64, unused: u64, update: u64) -> BalloonStats {
        BalloonStats {
            actual_kib: actual,
            max_kib: 4 * actual,
            unused_kib: Some(unused),
            available_kib: Some(actual),
            usable_kib: Some(unused),
            last_update: Some(update),
        }
    }

    #[test]
    fn memory_needs_an_advanced_report_then_a_second_one_for_a_rate() {
        let mut m = MemorySampler::new();
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        // First sight: the report may predate the stats period.
        assert_eq!(
            m.record(dom(1), s(0), &stats(1000, 900, 10)),
            MemoryReading::Stale
        );
        m.end_cycle();
        // Same report again: still stale.
        assert_eq!(
            m.record(dom(1), s(2), &stats(1000, 900, 10)),
            MemoryReading::Stale
        );
        m.end_cycle();
        assert_eq!(
            m.record(dom(1), s(4), &stats(1000, 800, 12)),
            MemoryReading::First
        );
        m.end_cycle();
        // Used grew by 200 KiB over 2 s: consuming 100 KiB/s.
        let MemoryReading::Fresh(g) = m.record(dom(1), s(6), &stats(1000, 600, 14)) else {
            panic!("expected a fresh reading");
        };
        assert!((g.rate_kib_s - 100.0).abs() < 1e-9);
        assert_eq!((g.used_kib(), g.free_pct()), (400, 60.0));
        m.end_cycle();
        // The balloon grew by 500 KiB: the next report may predate the move, so it waits...
        assert_eq!(
            m.record(dom(1), s(8), &stats(1500, 1100, 16)),
            MemoryReading::Settling
        );
        m.end_cycle();
        // ...and once the balloon stayed put, the memory given is not mistaken for memory released.
        let MemoryReading::Fresh(g) = m.record(dom(1), s(10), &stats(1500, 1100, 18)) else {
            panic!("expected a fresh reading");
        };
        assert!(g.rate_kib_s.abs() < 1e-9);
    }

    #[test]
    fn a_stale_cycle_does_not_lose_the_rate_history() {
        let mut m = MemorySampler::new();
        let t0 = Instant::now();
        m.record(dom(1), t0, &stats(1000, 900, 1));
        m.end_cycle();
        m.record(dom(1), t0 + Duration::from_secs(1), &stats(1000, 900, 2));
        m.end_cycle();
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(2), &stats(1000, 900, 2)),
            MemoryReading::Stale
        );
        m.end_cycle();
        assert!(matches!(
            m.record(dom(1), t0 + Duration::from_secs(3), &stats(1000, 700, 3)),
            MemoryReading::Fresh(g) if (g.rate_kib_s - 100.0).abs() < 1e-9
        ));
    }

    #[test]
    fn inconsistent_or_missing_memory_reports_are_not_facts() {
        let mut m = MemorySampler::new();
        let t0 = Instant::now();
        m.record(dom(1), t0, &stats(1000, 900, 1));
        // unused above actual: a stale report from before the balloon shrank.
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(1), &stats(1000, 1200, 2)),
            MemoryReading::Inconsistent
        );
        let no_driver = BalloonStats {
            actual_kib: 1000,
            max_kib: 1000,
            ..BalloonStats::default()
        };
        assert_eq!(m.record(dom(2), t0, &no_driver), MemoryReading::NoStats);
    }

    #[test]
    fn a_vanished_guest_starts_over() {
        let mut m = MemorySampler::new();
        let t0 = Instant::now();
        m.record(dom(1), t0, &stats(1000, 900, 1));
        m.end_cycle();
        m.record(dom(1), t0 + Duration::from_secs(1), &stats(1000, 900, 2));
        m.end_cycle();
        m.end_cycle();
        // Back (restarted) with a new report: first sight again, not a rate against old figures.
        assert_eq!(
            m.record(dom(1), t0 + Duration::from_secs(9), &stats(1000, 100, 50)),
            MemoryReading::Stale
        );
    }

    #[test]
    fn free_memory_is_what_the_guest_can_still_use() {
        let mut m = MemorySampler::new();
        let t0 = Instant::now();
        // A ballooned-down guest: 57 MiB free by MemFree, nothing available by MemAvailable.
        let report = |update| BalloonStats {
            usable_kib: Some(0),
            ..stats(160 * 1024, 57 * 1024, update)
        };
        m.record(dom(1), t0, &report(1));
        m.record(dom(1), t0 + Duration::from_secs(1), &report(2));
        let MemoryReading::Fresh(g) = m.record(dom(1), t0 + Duration::from_secs(2), &report(3))
        else {
            panic!("expected a fresh reading");
        };
        assert_eq!((g.free_kib, g.used_kib()), (0, 160 * 1024));
        // Without MemAvailable, MemFree is all there is.
        let plain = |update| BalloonStats {
            usable_kib: None,
            ..stats(1000, 300, update)
        };
        m.record(dom(2), t0, &plain(1));
        m.record(dom(2), t0 + Duration::from_secs(1), &plain(2));
        let MemoryReading::Fresh(g) = m.record(dom(2), t0 + Duration::from_secs(2), &plain(3))
        else {
            panic!("expected a fresh reading");
        };
        assert_eq!(g.free_kib, 300);
    }

    #[test]
    fn demand_adds_the_run_queue_wait_to_the_time_used() {
        let mut s = CpuSampler::new();
        let t0 = Instant::now();
        let with_delay = |ns, delay| VcpuInfo {
            delay_ns: Some(delay),
            ..vcpu(0, ns, 0, &[0])
        };
        s.begin(&[0, 1]);
        s.record(dom(1), t0, &[with_delay(0, 0), vcpu(1, 0, 1, &[1])]);
        s.finish();
        s.begin(&[0, 1]);
        // Over 2 s: 0.66 s run and 1.18 s waiting = 33 % used, 92 % wanted. No delay: no demand.
        let t1 = t0 + Duration::from_secs(2);
        s.record(
            dom(1),
            t1,
            &[
                with_delay(660_000_000, 1_180_000_000),
                vcpu(1, 1_760_000_000, 1, &[1]),
            ],
        );
        let snap = s.finish();
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
}
