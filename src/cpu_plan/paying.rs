//! Rule 4, whole: when a step, or a set of steps, pays for its pin changes. The swings it allows
//! for are measured by the sampler ([`crate::sampling::RateSeries`]).

/// A pair of pCPUs must be further apart than the threshold plus this many standard deviations of
/// their gap's swing before a step is taken between them: the busiest and the freest of many
/// pCPUs are the extremes of many swinging loads, and a gap that swings alone explain moves
/// nothing for good.
const SWING_SIGMAS: f64 = 3.0;

/// Is a pair of pCPUs `gap` points apart, a gap that swings by `swing` (a standard deviation)
/// from one sample to the next, worth a step? Only beyond the threshold and the swing.
pub(super) fn gap_worth_working(gap: f64, swing: f64, threshold: f64) -> bool {
    gap > threshold + SWING_SIGMAS * swing
}

/// The least two vCPUs must differ by for swapping them to pay: a swap of near-equal vCPUs only
/// bets on noise (seen on real guests: two CPU-bound vCPUs measured 100 and 93 % demand were
/// swapped).
pub(super) fn min_swap_difference(threshold: f64) -> f64 {
    threshold.max(MIN_SHIFT)
}

/// Smallest load, in points, worth a pin change: moving a vCPU that uses nothing changes nothing.
pub(super) const MIN_SHIFT: f64 = 0.5;

/// Does shifting `shift` points of load across a pair `gap` points apart pay for a pin change?
pub(super) fn pays(gap: f64, shift: f64, threshold: f64) -> bool {
    if shift < MIN_SHIFT || shift >= gap {
        return false;
    }
    if 2.0 * shift <= gap {
        return true;
    }
    let new_gap = 2.0 * shift - gap;
    let gain = gap - new_gap;
    gain >= threshold || (new_gap <= threshold && gain >= threshold / 2.0)
}

/// The largest shift of load across a pair `gap` points apart that pays (see [`pays`]): the
/// paying shifts form the interval `[MIN_SHIFT, max_paying_shift]`.
pub(super) fn max_paying_shift(gap: f64, threshold: f64) -> f64 {
    let by_gain = gap - threshold / 2.0;
    let by_landing = ((gap + threshold) / 2.0).min(gap - threshold / 4.0);
    (gap / 2.0)
        .max(by_gain)
        .max(by_landing)
        .min(gap.next_down())
}

/// How many steps to keep (rule 4): all of them when they reach balance; when they cannot, none
/// unless together they narrow the fixable spread by at least `threshold` (and by anything at
/// all), and then only as many as it takes to get within half a threshold of where all of them
/// would end.
pub(super) fn steps_worth_keeping(start: f64, after: &[f64], threshold: f64) -> usize {
    let Some(&end) = after.last() else {
        return 0;
    };
    if end <= threshold {
        return after.len();
    }
    if start - end < threshold.max(MIN_SHIFT) {
        return 0;
    }
    after
        .iter()
        .position(|&f| f <= end + threshold / 2.0)
        .map_or(after.len(), |i| i + 1)
}
