//! [`Rates`]: per-series rates of change over the measured interval, and their swing.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

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

    /// Forget `key`'s series altogether: its next reading starts a new one.
    pub fn forget(&mut self, key: &K) {
        self.last.remove(key);
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

/// The expected second largest of five absolute normal deviates, in standard deviations: turns
/// the swing measure into a standard deviation.
const SECOND_OF_FIVE_IN_SIGMAS: f64 = 1.435;

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
    Some(latest.max(second_largest) / SECOND_OF_FIVE_IN_SIGMAS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!((alternating - 30.0 / SECOND_OF_FIVE_IN_SIGMAS).abs() < 1e-9);
        // Steady at 10, then 100: a swing for the sample that shows the jump, none once it holds.
        let jump = swings(&[10, 10, 10, 10, 100]).unwrap();
        assert!((jump - 90.0 / SECOND_OF_FIVE_IN_SIGMAS).abs() < 1e-9);
        assert_eq!(swings(&[10, 10, 10, 100, 100]), Some(0.0));
        // A one-sample dip is a jump and back: a swing, while it is among the last five changes.
        let dip = swings(&[100, 100, 100, 78, 100]).unwrap();
        assert!((dip - 22.0 / SECOND_OF_FIVE_IN_SIGMAS).abs() < 1e-9);
        assert!(swings(&[100, 100, 78, 100, 100, 100, 100]).unwrap() > 15.0);
        assert_eq!(swings(&[100, 78, 100, 100, 100, 100, 100, 100]), Some(0.0));
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
}
