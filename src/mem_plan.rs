//! Decide: new balloon sizes that feed starving guests and hand idle memory back to the host.
//!
//! Pure: a [`MemSnapshot`] in, a [`MemPlan`] out, no I/O. Only guests with a fresh report and a
//! consumption rate are in the snapshot; every other guest is left alone. This is the one
//! statement of the memory coordinator's rules; the README's "How it decides" tells them to the
//! user under the same numbers and names (a test keeps the two lists in step), and every place in
//! the code that implements a rule says `rule N`.
//!
//! 1. **Free memory.** A guest's free memory is what it can still use: its MemAvailable
//!    (`usable`) when it reports one, else its MemFree (`unused`)
//!    ([`crate::host::BalloonStats::free_kib`]).
//! 2. **Status.** A guest is **starving** when it is still consuming (its used memory grows
//!    faster than `consuming_kib_s`) and its free memory is under `starve_pct` % of its balloon,
//!    or would run out within `runway_periods` periods at its current rate (a small guest running
//!    a fast hog has no time to wait for the percentage); **wasting** when free memory is over
//!    `waste_pct` % and it is not consuming; **balanced** otherwise ([`MemPolicy::status`]).
//! 3. **Feeding.** Starving guests, most starved first, each get twice what they consume in one
//!    period (a resized guest is decided on again two periods later, once its balloon has
//!    settled), plus what it lacks of `runway_periods` periods of free memory, and at least
//!    `min_step_kib`; taken first from wasting guests (most wasteful first), then from the host.
//! 4. **Returning.** With nobody starving, wasting guests give a fraction of their excess back to
//!    the host each cycle (all of it, step-capped, while the host is under its reserve).
//! 5. **Shrink floor.** A shrinking guest keeps enough memory to land mid-way between starving
//!    and wasting, so a guest that was shrunk is balanced, not starving, the next cycle; and never
//!    less than `min_guest_kib` nor than what it uses plus `min_step_kib`.
//! 6. **Hard limits.** Never below the shrink floor's hard part (`min_guest_kib`, what the guest
//!    uses plus `min_step_kib`); never above the guest's max memory; never more than
//!    `max_step_kib` of change per guest per cycle; never taking the host's available memory under
//!    `host_reserve_pct` % of its total. [`violations`] checks every plan against them before it
//!    is applied; the coordinator applies shrinks before grows, and cuts the grows a failed
//!    shrink was to fund to what the host can spare ([`crate::coordinator`]).

use std::cmp::Reverse;
use std::collections::HashMap;

use crate::host::{DomainId, HostMemory};
use crate::sampling::GuestMemory;

const MIB: u64 = 1024;

/// Tuning of the memory planner. Sizes are in KiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemPolicy {
    /// Below this % of its balloon free, a consuming guest is starving.
    pub starve_pct: f64,
    /// Above this % of its balloon free, a guest that is not consuming is wasting.
    pub waste_pct: f64,
    /// The host keeps at least this % of its memory available.
    pub host_reserve_pct: f64,
    /// No guest is shrunk below this.
    pub min_guest_kib: u64,
    /// A guest whose used memory grows faster than this, in KiB/s, is consuming.
    pub consuming_kib_s: f64,
    /// Smallest grant to a starving guest; also the margin left above a guest's used memory.
    pub min_step_kib: u64,
    /// Largest change of one guest's balloon in one cycle.
    pub max_step_kib: u64,
    /// Fraction of a wasting guest's excess returned to the host per cycle.
    pub return_fraction: f64,
    /// Seconds between cycles: a starving guest gets twice its consumption over one period.
    pub period_secs: f64,
    /// A consuming guest whose free memory would last fewer periods than this is starving.
    pub runway_periods: f64,
}

impl Default for MemPolicy {
    fn default() -> Self {
        Self {
            starve_pct: 15.0,
            waste_pct: 50.0,
            host_reserve_pct: 5.0,
            min_guest_kib: 50 * MIB,
            consuming_kib_s: 1024.0,
            min_step_kib: 32 * MIB,
            max_step_kib: 512 * MIB,
            return_fraction: 0.25,
            period_secs: 3.0,
            runway_periods: 3.0,
        }
    }
}

/// How a guest stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemStatus {
    /// Little free memory and still consuming.
    Starving,
    /// Much free memory and not consuming.
    Wasting,
    /// Neither.
    Balanced,
}

impl std::fmt::Display for MemStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemStatus::Starving => "STARVING",
            MemStatus::Wasting => "WASTING",
            MemStatus::Balanced => "BALANCED",
        })
    }
}

/// Everything the memory planner needs at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemSnapshot {
    /// Guests with a fresh report and a rate.
    pub guests: Vec<GuestMemory>,
    /// The host's memory, when the driver reports it; without it nothing is taken from the host.
    pub host: Option<HostMemory>,
}

/// One balloon resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonChange {
    /// Which domain.
    pub id: DomainId,
    /// Balloon size before, KiB.
    pub from_kib: u64,
    /// Balloon size to set, KiB.
    pub to_kib: u64,
}

impl BalloonChange {
    /// True when the guest loses memory.
    pub fn shrinks(&self) -> bool {
        self.to_kib < self.from_kib
    }
}

/// The planner's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemPlan {
    /// Resizes, shrinks first (so memory is free before it is handed out).
    pub changes: Vec<BalloonChange>,
    /// Memory given to guests from the host's free memory, KiB.
    pub from_host_kib: u64,
    /// Memory handed back to the host by wasting guests, KiB.
    pub to_host_kib: u64,
}

impl MemPolicy {
    /// Status of a guest under this policy (rule 2).
    pub fn status(&self, g: &GuestMemory) -> MemStatus {
        let consuming = g.rate_kib_s > self.consuming_kib_s;
        let free = g.free_pct();
        let runway_secs = g.free_kib as f64 / g.rate_kib_s.max(f64::MIN_POSITIVE);
        let short = free < self.starve_pct || runway_secs < self.runway_periods * self.period_secs;
        if consuming && short {
            MemStatus::Starving
        } else if free > self.waste_pct && !consuming {
            MemStatus::Wasting
        } else {
            MemStatus::Balanced
        }
    }

    /// The size no shrink may go under: the guest floor, and what the guest uses plus a margin
    /// (rules 5 and 6).
    pub fn hard_floor_kib(&self, g: &GuestMemory) -> u64 {
        self.min_guest_kib.max(g.used_kib() + self.min_step_kib)
    }

    /// The size a shrink stops at (rule 5): above the hard floor, with free memory mid-way between
    /// the starving and wasting thresholds.
    fn keep_kib(&self, g: &GuestMemory) -> u64 {
        let free_frac = ((self.starve_pct + self.waste_pct) / 200.0).clamp(0.0, 0.95);
        let comfortable = (g.used_kib() as f64 / (1.0 - free_frac)).ceil() as u64;
        self.hard_floor_kib(g).max(comfortable)
    }

    /// What a guest holds above the size a shrink stops at.
    fn excess_kib(&self, g: &GuestMemory) -> u64 {
        g.actual_kib.saturating_sub(self.keep_kib(g))
    }

    /// Memory the host can give: what it has available above its reserve (nothing when unknown).
    pub fn host_budget_kib(&self, host: Option<HostMemory>) -> u64 {
        host.map_or(0, |h| h.available_kib.saturating_sub(self.reserve_kib(h)))
    }

    /// The host memory kept available: `host_reserve_pct` % of its total.
    pub fn reserve_kib(&self, h: HostMemory) -> u64 {
        (h.total_kib as f64 * self.host_reserve_pct / 100.0).ceil() as u64
    }
}

/// Plan the balloon sizes for one snapshot.
pub fn plan(snapshot: &MemSnapshot, policy: &MemPolicy) -> MemPlan {
    let guests = &snapshot.guests;
    // Rule 2.
    let status: Vec<MemStatus> = guests.iter().map(|g| policy.status(g)).collect();
    let mut target: Vec<u64> = guests.iter().map(|g| g.actual_kib).collect();
    let mut out = MemPlan::default();
    let mut givers = givers(guests, &status, policy);
    let starving = most_starved_first(guests, &status);
    if starving.is_empty() {
        out.to_host_kib = return_to_host(snapshot, &givers, policy, &mut target);
    } else {
        out.from_host_kib = feed(snapshot, &starving, &mut givers, policy, &mut target);
    }
    out.changes = guests
        .iter()
        .zip(&target)
        .filter(|(g, t)| **t != g.actual_kib)
        .map(|(g, &t)| BalloonChange {
            id: g.id,
            from_kib: g.actual_kib,
            to_kib: t,
        })
        .collect();
    out.changes.sort_by_key(|c| (Reverse(c.shrinks()), c.id));
    out
}

/// What each wasting guest can give this cycle (rule 5: down to where a shrink stops; rule 6:
/// one step at most), most wasteful first, as (guest index, KiB).
fn givers(guests: &[GuestMemory], status: &[MemStatus], policy: &MemPolicy) -> Vec<(usize, u64)> {
    let mut givers: Vec<(usize, u64)> = (0..guests.len())
        .filter(|&i| status[i] == MemStatus::Wasting)
        .map(|i| (i, policy.excess_kib(&guests[i]).min(policy.max_step_kib)))
        .filter(|&(_, can)| can > 0)
        .collect();
    givers.sort_by(|a, b| {
        guests[b.0]
            .free_pct()
            .total_cmp(&guests[a.0].free_pct())
            .then(a.0.cmp(&b.0))
    });
    givers
}

/// The starving guests, most starved (least free, in %) first.
fn most_starved_first(guests: &[GuestMemory], status: &[MemStatus]) -> Vec<usize> {
    let mut starving: Vec<usize> = (0..guests.len())
        .filter(|&i| status[i] == MemStatus::Starving)
        .collect();
    starving.sort_by(|&a, &b| {
        guests[a]
            .free_pct()
            .total_cmp(&guests[b].free_pct())
            .then(a.cmp(&b))
    });
    starving
}

/// Rule 3: grow each starving guest's `target` by what it needs, from the givers in order, then
/// from the host down to its reserve (rule 6). Returns what the host gives, KiB.
fn feed(
    snapshot: &MemSnapshot,
    starving: &[usize],
    givers: &mut [(usize, u64)],
    policy: &MemPolicy,
    target: &mut [u64],
) -> u64 {
    let guests = &snapshot.guests;
    let mut host_budget = policy.host_budget_kib(snapshot.host);
    let mut from_host_kib = 0;
    let mut next_giver = 0;
    for &i in starving {
        let g = &guests[i];
        let per_period = g.rate_kib_s * policy.period_secs;
        let twice = (2.0 * per_period).ceil() as u64;
        let runway = (policy.runway_periods * per_period).ceil() as u64;
        // Rule 6: one step at most, never past max memory.
        let mut want = (twice + runway.saturating_sub(g.free_kib))
            .max(policy.min_step_kib)
            .min(policy.max_step_kib)
            .min(g.max_kib.saturating_sub(g.actual_kib));
        // Givers are drained in order: skip the exhausted ones for good.
        while want > 0 && next_giver < givers.len() {
            let (giver, can) = &mut givers[next_giver];
            let take = want.min(*can);
            *can -= take;
            target[*giver] -= take;
            target[i] += take;
            want -= take;
            if *can == 0 {
                next_giver += 1;
            }
        }
        let from_host = want.min(host_budget);
        host_budget -= from_host;
        target[i] += from_host;
        from_host_kib += from_host;
    }
    from_host_kib
}

/// Rule 4: shrink each giver's `target` by a share of its excess (all of it while the host is
/// under its reserve), at least one minimum step, at most what it can give. Returns what goes
/// back to the host, KiB.
fn return_to_host(
    snapshot: &MemSnapshot,
    givers: &[(usize, u64)],
    policy: &MemPolicy,
    target: &mut [u64],
) -> u64 {
    let host_short = snapshot
        .host
        .is_some_and(|h| h.available_kib < policy.reserve_kib(h));
    let fraction = if host_short {
        1.0
    } else {
        policy.return_fraction
    };
    let mut to_host_kib = 0;
    for &(i, can) in givers {
        let excess = policy.excess_kib(&snapshot.guests[i]);
        let step = ((excess as f64 * fraction).ceil() as u64)
            .max(policy.min_step_kib)
            .min(can);
        if step >= MIB {
            target[i] -= step;
            to_host_kib += step;
        }
    }
    to_host_kib
}

/// Rule 6: every way `plan` breaks a hard limit for `snapshot`; empty when it is safe to apply.
pub fn violations(snapshot: &MemSnapshot, plan: &MemPlan, policy: &MemPolicy) -> Vec<String> {
    let mut found = Vec::new();
    let guests: HashMap<DomainId, &GuestMemory> =
        snapshot.guests.iter().map(|g| (g.id, g)).collect();
    for c in &plan.changes {
        let Some(g) = guests.get(&c.id) else {
            found.push(format!("{}: not in the snapshot", c.id));
            continue;
        };
        if c.to_kib > g.max_kib {
            found.push(format!(
                "{}: {} KiB above max {} KiB",
                c.id, c.to_kib, g.max_kib
            ));
        }
        if c.shrinks() && c.to_kib < policy.hard_floor_kib(g) {
            found.push(format!(
                "{}: {} KiB under its floor {} KiB (uses {} KiB)",
                c.id,
                c.to_kib,
                policy.hard_floor_kib(g),
                g.used_kib()
            ));
        }
        if c.from_kib.abs_diff(c.to_kib) > policy.max_step_kib {
            found.push(format!("{}: step over {} KiB", c.id, policy.max_step_kib));
        }
    }
    if plan.from_host_kib > policy.host_budget_kib(snapshot.host) {
        found.push(format!(
            "takes {} KiB from the host, which can spare {} KiB above its reserve",
            plan.from_host_kib,
            policy.host_budget_kib(snapshot.host)
        ));
    }
    found
}
