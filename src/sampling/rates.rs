//! [`RateSeries`]: one series' rate of change over the measured interval, and its swing.

use std::collections::VecDeque;
use std::time::Instant;

/// One series (a vCPU's CPU time, a guest's used memory): its latest readings (value, instant),
/// oldest first, and the rates of change between them over the measured wall-clock interval,
/// averaged over the last `window` intervals (one by default), with how much the rate swings from
/// one interval to the next.
///
/// A series holds no key and forgets nothing by itself: it lives in the record its daemon keeps
/// of the domain, and goes with it (a domain that vanishes or restarts starts a new record, so a
/// stale reading is never compared with a new one).
///
/// The swing is the larger of the latest change of the single-interval rate and the second largest
/// of the last five, scaled to a standard deviation (for normal noise, the second largest of five
/// is about 1.435 σ). So a rate that just changed counts as swinging for one sample: a change is
/// acted on once it holds for a second sample, which a one-sample dip never does. A jump and back
/// makes two large changes, and counts as a swing while they are among the last five; one jump that
/// holds is not a swing.
#[derive(Clone, Debug)]
pub struct RateSeries {
    readings: VecDeque<(f64, Instant)>,
    window: usize,
}

impl Default for RateSeries {
    fn default() -> Self {
        Self::with_window(1)
    }
}

impl RateSeries {
    /// An empty series whose rates cover the last interval.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty series whose rates cover the last `window` intervals (at least one): the change
    /// since the oldest reading kept, over the time since then. A series with fewer readings
    /// averages what it has.
    pub fn with_window(window: usize) -> Self {
        Self {
            readings: VecDeque::new(),
            window: window.max(1),
        }
    }

    /// Average rates over the last `window` intervals from now on, keeping the readings.
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// Record `value` read at `at`; return the per-second change since the oldest reading kept,
    /// or `None` for a new series or a non-positive interval.
    /// The rate between the last two readings alone, per second (`None` before two): a jump
    /// shows here one reading before it shows in the windowed rate.
    pub fn last_interval_rate(&self) -> Option<f64> {
        let n = self.readings.len();
        let (old, then) = *self.readings.get(n.checked_sub(2)?)?;
        let (value, at) = *self.readings.get(n - 1)?;
        let secs = at.checked_duration_since(then)?.as_secs_f64();
        (secs > 0.0).then(|| (value - old) / secs)
    }

    pub fn gauge(&mut self, value: f64, at: Instant) -> Option<f64> {
        while self.readings.len() > self.window.max(SWING_SAMPLES) {
            self.readings.pop_front();
        }
        // The reading `window` intervals back, or the oldest there is.
        let before = self
            .readings
            .get(self.readings.len().saturating_sub(self.window))
            .copied();
        self.readings.push_back((value, at));
        let (old, then) = before?;
        let secs = at.checked_duration_since(then)?.as_secs_f64();
        (secs > 0.0).then(|| (value - old) / secs)
    }

    /// Like [`RateSeries::counter`], with how much the rate swings from one interval to the next
    /// (`None` until two single-interval rates are known).
    pub fn counter_with_swing(&mut self, value: u64, at: Instant) -> Option<(f64, Option<f64>)> {
        let rate = self.counter(value, at)?;
        Some((rate, swing(&self.readings)))
    }

    /// Like [`RateSeries::gauge`] for a cumulative counter: a counter lower than its previous
    /// reading (the domain restarted) starts the series again and has no rate yet.
    pub fn counter(&mut self, value: u64, at: Instant) -> Option<f64> {
        if self
            .readings
            .back()
            .is_some_and(|&(before, _)| (value as f64) < before)
        {
            self.readings.clear();
        }
        let rate = self.gauge(value as f64, at)?;
        (rate >= 0.0).then_some(rate)
    }

    /// Forget all history but the latest reading, so the next rate (and swing) covers only the
    /// intervals from that reading on.
    pub fn restart(&mut self) {
        while self.readings.len() > 1 {
            self.readings.pop_front();
        }
    }
}

/// The expected second largest of five absolute normal deviates, in standard deviations: turns
/// the swing measure into a standard deviation.
const SECOND_OF_FIVE_IN_SIGMAS: f64 = 1.435;

/// Readings kept per series, at least, to judge how much its rate swings.
const SWING_SAMPLES: usize = 6;

/// How much the single-interval rates between successive `readings` swing (see [`RateSeries`]), as a
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
        let mut r = RateSeries::new();
        let t0 = Instant::now();
        assert_eq!(r.counter(1_000, t0), None);
        // 1.5 s of CPU over 3 s measured = 0.5 s/s, whatever the nominal period was.
        let rate = r.counter(1_000 + 1_500_000_000, t0 + Duration::from_secs(3));
        assert!((rate.unwrap() - 5e8).abs() < 1.0);
    }

    #[test]
    fn counter_going_backwards_restarts_the_series() {
        let mut r = RateSeries::new();
        let t0 = Instant::now();
        r.counter(5_000, t0);
        assert_eq!(r.counter(10, t0 + Duration::from_secs(1)), None);
        let rate = r.counter(1_010, t0 + Duration::from_secs(2)).unwrap();
        assert!((rate - 1_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_window_averages_the_last_intervals() {
        let mut r = RateSeries::with_window(3);
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        // A counter advancing 10, 40, 10, 40, ... per second.
        let mut total = 0;
        let mut rates = Vec::new();
        for (n, step) in [0, 10, 40, 10, 40, 10].into_iter().enumerate() {
            total += step;
            rates.push(r.counter(total, s(n as u64)));
        }
        // Fewer readings than the window: what there is; then the mean of the last three.
        assert_eq!(rates[..3], [None, Some(10.0), Some(25.0)]);
        assert_eq!(rates[3], Some(20.0));
        assert_eq!(rates[4], Some(30.0));
        assert_eq!(rates[5], Some(20.0));
        // A restart keeps only the latest reading: the next rate is the last interval's.
        r.restart();
        assert_eq!(r.counter(total + 40, s(6)), Some(40.0));
        // A counter going backwards drops the whole window.
        assert_eq!(r.counter(5, s(7)), None);
        assert_eq!(r.counter(15, s(8)), Some(10.0));
    }

    #[test]
    fn a_change_swings_until_it_holds_and_a_dip_while_it_is_recent() {
        let t0 = Instant::now();
        let swings = |steps: &[u64]| {
            let mut r = RateSeries::new();
            let mut total = 0;
            let mut last = None;
            for (n, step) in std::iter::once(&0).chain(steps).enumerate() {
                total += step;
                last = r.counter_with_swing(total, t0 + Duration::from_secs(n as u64));
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
        let mut r = RateSeries::new();
        let t0 = Instant::now();
        r.gauge(100.0, t0);
        let rate = r.gauge(40.0, t0 + Duration::from_secs(2)).unwrap();
        assert!((rate + 30.0).abs() < 1e-9);
    }

    #[test]
    fn zero_interval_has_no_rate() {
        let mut r = RateSeries::new();
        let t0 = Instant::now();
        r.gauge(1.0, t0);
        assert_eq!(r.gauge(2.0, t0), None);
    }
}
