//! Decide: new balloon sizes that feed starving guests and hand idle memory back to the host.
//!
//! Pure: a [`MemSnapshot`] in, a [`MemPlan`] out, no I/O. Only guests with a fresh report and a
//! consumption rate are in the snapshot; every other guest is left alone. This is the one
//! statement of the memory coordinator's rules; docs/memory_coordinator.md's "How it decides"
//! tells them to the user under the same numbers and names (a test keeps the two lists in step),
//! and every place in the code that implements a rule says `rule N`.
//!
//! 1. **Free memory.** A guest's free memory is what it can still use: its MemAvailable
//!    (`usable`) when it reports one, else its MemFree (`unused`)
//!    ([`crate::host::BalloonStats::free_kib`]).
//! 2. **Status.** A guest is **starving** when it is still consuming (its used memory grows
//!    faster than `consuming_kib_s`) and its free memory is under `starve_pct` % of its balloon,
//!    or would run out within `runway_periods` periods and `blind_secs` at its current rate (a
//!    small guest running a fast hog has no time to wait for the percentage; the coordinator may
//!    be blind that long while libvirt restarts). Its rate here and in rule 3 is its
//!    *pace*: the last interval's rate alone when its consumption jumped to more than twice its
//!    rate, so a burst is fed a report sooner ([`GuestMemory::pace_kib_s`]); **wasting** when free memory is over
//!    `waste_pct` % and it is not consuming, and it stays wasting, while it does not consume,
//!    until it is brought down to where a shrink stops (rule 5), so a guest is not left just
//!    under the waste line (a guest already there is not wasting, whatever its free share);
//!    **balanced** otherwise ([`MemPolicy::status`]).
//! 3. **Feeding.** Each starving guest wants what it lacks to still have, after two periods of
//!    consumption, its *headroom*. A resized guest is decided on again as soon as a report shows
//!    its balloon's new size: one period later when the report read then was taken after the
//!    move (see [`crate::sampling::MemoryHistory`]), two when it predates it. The second period
//!    is a margin for a burst: a guest may eat twice its recent rate for a period and still keep
//!    its headroom (seen on real guests: a guest that fell behind caught up at 4 times its
//!    rate). The headroom is `runway_periods` periods and `blind_secs` of consumption (at the
//!    fastest rate of its last few reports: one report's rate swings), and at least
//!    `headroom_pct` % of its balloon.
//!    No more than it needs (what a guest holds free is memory no other guest can have), and
//!    nothing while it has that much (it is fed again, in time, as its free memory falls). A
//!    guest whose balloon did not follow its last grant (its `actual` stayed under the size it
//!    was given) gets nothing until it does. Grants are paid from the host's budget only (rule
//!    6); when the budget cannot pay every want, it is shared in proportion to the wants, so
//!    equal needs get equal shares whatever each guest claims. Wasting guests (most wasteful
//!    first) give back as much as the starving guests want: it reaches the host's figure, and so
//!    the budget, in later cycles.
//! 4. **Returning.** With nobody starving (a guest behind its last grant does not count), wasting
//!    guests give a fraction of their excess back to the host each cycle (all of it, step-capped,
//!    while the host is *pressed*: under its reserve, or its tasks stalled on memory for
//!    `host_stall_pct` % of the last 10 s, the kernel's pressure stall information, read where
//!    the host is this machine). In host-pressure mode (`host_target_pct`) wasting guests give
//!    memory back (rules 3 and 4) only while the host's available memory is under that % of its
//!    total, or it is pressed.
//! 5. **Shrink floor.** A shrinking guest keeps enough memory to have `target_free_pct` % of it
//!    free (by default mid-way between starving and wasting), so a guest that was shrunk is
//!    balanced, not starving, the next cycle, and at least `cushion_kib` free, so a burst (a
//!    service starting) lives on it until the next reports show it and it is fed (not a guest
//!    whose balloon deflates on its own: a burst takes its memory back at once); and never less
//!    than its hard floor (rule 6). When starving guests want more than the host's budget and
//!    the wasting guests can give, idle guests give from their cushions, down to their share,
//!    what the wants lack and what the budget lacks to be above zero again: a guest starving now
//!    comes before a burst that may come.
//! 6. **Hard limits.** Never below the hard floor: `min_guest_kib`, what the guest uses plus
//!    `min_step_kib`, and the minimum its metadata guarantees it; never above the guest's max
//!    memory; never more than `max_step_kib` of change per guest per cycle; never granting more
//!    than the host's budget: its available memory, minus `host_reserve_pct` % of its total,
//!    minus what guests may still make it back (what they hold free: every page a guest never
//!    touched is free in it, and it may touch it at any time; see [`crate::ledger`]); and, to a
//!    guest whose memory is strictly bound to NUMA nodes, never more than those nodes' budget:
//!    their free memory, minus `host_reserve_pct` % of theirs, minus what the guests bound to
//!    them may still make them back (shared in proportion to the grants when short). Memory a
//!    shrink frees on the host counts only once the host's own figure shows it. Every plan is
//!    checked against these before it is applied ([`safe_part`]): a change that breaks one is
//!    dropped and said, never the whole plan, so one guest cannot stop the others being fed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use crate::host::{DomainId, HostMemory, NodeMemory};
use crate::sampling::GuestMemory;

const MIB: u64 = 1024;

/// Tuning of the memory planner. Sizes are in KiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemPolicy {
    /// Below this % of its balloon free, a consuming guest is starving.
    pub starve_pct: f64,
    /// Above this % of its balloon free, a guest that is not consuming is wasting.
    pub waste_pct: f64,
    /// A shrink stops where the guest has this % of its balloon free (rule 5).
    pub target_free_pct: f64,
    /// A shrink stops where the guest has at least this much free, KiB: the cushion a burst
    /// lives on until the coordinator sees it (rule 5).
    pub cushion_kib: u64,
    /// The host keeps at least this % of its memory available.
    pub host_reserve_pct: f64,
    /// Host-pressure mode: wasting guests give memory back only while the host has less than this
    /// % of its memory available (rule 4). `None`: always.
    pub host_target_pct: Option<f64>,
    /// The host is pressed when its tasks stalled on memory at least this % of the last 10 s
    /// (its PSI `some avg10`), whatever it has available (rule 4).
    pub host_stall_pct: f64,
    /// No guest is shrunk below this.
    pub min_guest_kib: u64,
    /// A guest whose used memory grows faster than this, in KiB/s, is consuming.
    pub consuming_kib_s: f64,
    /// The margin a shrink leaves above what a guest uses, and the smallest step an idle guest
    /// gives back.
    pub min_step_kib: u64,
    /// Largest change of one guest's balloon in one cycle.
    pub max_step_kib: u64,
    /// Fraction of a wasting guest's excess returned to the host per cycle.
    pub return_fraction: f64,
    /// Seconds between cycles: a starving guest gets twice its consumption over one period.
    pub period_secs: f64,
    /// A consuming guest whose free memory would last fewer periods than this is starving.
    pub runway_periods: f64,
    /// A starving guest is fed so that two periods ahead it still has this % of its balloon free
    /// (and its runway).
    pub headroom_pct: f64,
    /// Seconds of consumption a consuming guest keeps free on top of its runway periods (see
    /// [`BLIND_SECS`]).
    pub blind_secs: f64,
}

/// Seconds of a consuming guest's consumption it keeps free on top of its runway by default
/// ([`MemPolicy::blind_secs`], rules 2 and 3): the coordinator may be blind that long when libvirt
/// restarts. Measured on real guests: a libvirtd restart leaves it 3 to 6 s without answers, and
/// the first cycle on the new connection comes within a period of its return; before this
/// margin, a guest growing at 10 MiB/s was fed 17 s of runway and came within a few MiB of the
/// OOM killer over a 6 s restart.
pub const BLIND_SECS: f64 = 10.0;

impl MemPolicy {
    /// The defaults, written once: `--help`, the man page and the daemon take them from here.
    pub const DEFAULT: MemPolicy = MemPolicy {
        starve_pct: 15.0,
        waste_pct: 50.0,
        target_free_pct: 32.5,
        cushion_kib: 256 * MIB,
        host_reserve_pct: 5.0,
        host_target_pct: None,
        host_stall_pct: 10.0,
        min_guest_kib: 50 * MIB,
        consuming_kib_s: 1024.0,
        min_step_kib: 32 * MIB,
        max_step_kib: 512 * MIB,
        return_fraction: 0.25,
        period_secs: 3.0,
        runway_periods: 3.0,
        headroom_pct: 8.0,
        blind_secs: BLIND_SECS,
    };
}

impl Default for MemPolicy {
    fn default() -> Self {
        Self::DEFAULT
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

/// What the planner knows of a guest beyond its report: the admin's word and the guest's
/// history with the coordinator ([`crate::ledger::GuestLedger`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Standing {
    /// No shrink takes the guest under this (its metadata's guaranteed minimum), KiB.
    pub guaranteed_kib: u64,
    /// It was wasting last cycle: it stays wasting until brought down to its target (rule 2).
    pub reclaiming: bool,
    /// Its balloon did not follow its last grant: no more until it does (rule 3).
    pub behind: bool,
    /// The fastest it consumed over its last few reports, KiB/s: a grant is sized on this, not on
    /// the last rate alone, which swings from report to report (rule 3).
    pub peak_rate_kib_s: f64,
    /// Its balloon deflates on its own when it runs short (deflate-on-oom): a burst takes its
    /// memory back without waiting for us, so a shrink leaves it no cushion (rule 5).
    pub self_deflates: bool,
}

/// One guest as the planner sees it: its figures (which it derefs to), what its history and the
/// admin say of it, and where its memory must live.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedGuest {
    /// Its figures, from its latest report.
    pub memory: GuestMemory,
    /// What its history and the admin say of it.
    pub standing: Standing,
    /// The NUMA nodes its memory is strictly bound to, where it is.
    pub nodes: Option<Vec<u32>>,
}

impl From<GuestMemory> for PlannedGuest {
    /// A guest with a default standing, bound to no node.
    fn from(memory: GuestMemory) -> Self {
        Self {
            memory,
            standing: Standing::default(),
            nodes: None,
        }
    }
}

impl std::ops::Deref for PlannedGuest {
    type Target = GuestMemory;

    fn deref(&self) -> &GuestMemory {
        &self.memory
    }
}

/// Everything the memory planner needs at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemSnapshot {
    /// Guests with a fresh report and a rate: one list, each with all the planner knows of it.
    pub guests: Vec<PlannedGuest>,
    /// The host's memory, when the driver reports it; without it nothing is taken from the host.
    pub host: Option<HostMemory>,
    /// Memory guests may still make the host back, KiB: what they hold free (every page a guest
    /// never touched is free in it), as last reported and moved by their balloons since
    /// ([`crate::ledger::GuestLedger::unbacked_kib`]). The host may have to back it at any time, so it
    /// is not in the budget.
    pub unbacked_kib: u64,
    /// Each NUMA node's memory, on a host of two nodes or more (empty: one budget for all).
    pub nodes: Vec<NodeMemory>,
    /// What the guests bound to each node may still make it back, KiB (a guest bound to several
    /// nodes counts on each: it may touch any of them).
    pub node_unbacked_kib: HashMap<u32, u64>,
}

impl MemSnapshot {
    /// Count `kib` that a domain whose memory is bound to `memory_nodes` (if it is) may still
    /// make the host back: against the host's budget, and against that of each of those nodes.
    pub fn add_unbacked(&mut self, memory_nodes: Option<&[u32]>, kib: u64) {
        self.unbacked_kib += kib;
        for &node in memory_nodes.unwrap_or_default() {
            *self.node_unbacked_kib.entry(node).or_default() += kib;
        }
    }

    /// Guest `id`, if it is in the snapshot.
    pub fn guest(&self, id: &DomainId) -> Option<&PlannedGuest> {
        self.guests.iter().find(|g| g.id == *id)
    }

    /// Each guest, by UUID.
    fn by_id(&self) -> HashMap<DomainId, &PlannedGuest> {
        self.guests.iter().map(|g| (g.id, g)).collect()
    }

    /// Guest `id`, to change, if it is in the snapshot.
    pub fn guest_mut(&mut self, id: &DomainId) -> Option<&mut PlannedGuest> {
        self.guests.iter_mut().find(|g| g.id == *id)
    }

    /// The standing of guest `id` (a default one for a guest not in the snapshot).
    pub fn standing(&self, id: &DomainId) -> Standing {
        self.guest(id).map(|g| g.standing).unwrap_or_default()
    }
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
    /// Resizes, shrinks first.
    pub changes: Vec<BalloonChange>,
    /// Memory granted to guests, all of it from the host's budget, KiB.
    pub from_host_kib: u64,
    /// Memory wasting guests give back to the host, KiB.
    pub to_host_kib: u64,
    /// Memory needed and not found this cycle, KiB: what the starving guests asked and were not
    /// granted, plus what the host lacks to be back at its reserve, minus what guests give
    /// back. What only moving a guest to another host would relieve, when it lasts.
    pub unmet_kib: u64,
}

impl MemPolicy {
    /// `unmet_kib` as a share, in [0, 1], of the memory the reserve lets guests have: the
    /// host's total less its reserve. `None` when the host's memory is unknown.
    pub fn unmet_share(&self, unmet_kib: u64, host: Option<HostMemory>) -> Option<f64> {
        let h = host?;
        let usable = h.total_kib.saturating_sub(self.reserve_kib(h)).max(1);
        Some((unmet_kib as f64 / usable as f64).min(1.0))
    }
}

impl MemPolicy {
    /// Status of a guest under this policy (rule 2), given its standing.
    pub fn status(&self, g: &GuestMemory, standing: &Standing) -> MemStatus {
        let pace = g.pace_kib_s();
        let consuming = pace > self.consuming_kib_s;
        let free = g.free_pct();
        let runway_secs = g.free_kib as f64 / pace.max(f64::MIN_POSITIVE);
        let short = free < self.starve_pct || runway_secs < self.runway_secs();
        let has_excess = self.excess_kib(g, standing) >= MIB;
        if consuming && short {
            MemStatus::Starving
        } else if !consuming && has_excess && (free > self.waste_pct || standing.reclaiming) {
            MemStatus::Wasting
        } else {
            MemStatus::Balanced
        }
    }

    /// How long a consuming guest's free memory must last (rule 2): its runway periods and the
    /// time the coordinator may be blind.
    pub fn runway_secs(&self) -> f64 {
        self.runway_periods * self.period_secs + self.blind_secs
    }

    /// The size no shrink may go under (rule 6): the guest floor, what the guest uses plus a
    /// margin, and its guaranteed minimum.
    pub fn hard_floor_kib(&self, g: &GuestMemory, standing: &Standing) -> u64 {
        self.min_guest_kib
            .max(g.used_kib() + self.min_step_kib)
            .max(standing.guaranteed_kib)
    }

    /// The size a shrink stops at (rule 5): above the hard floor, with `target_free_pct` % free
    /// and the burst cushion free.
    pub fn keep_kib(&self, g: &GuestMemory, standing: &Standing) -> u64 {
        let cushion = if standing.self_deflates {
            0
        } else {
            self.cushion_kib
        };
        self.share_keep_kib(g, standing)
            .max(g.used_kib().saturating_add(cushion))
    }

    /// The size a shrink stops at without the burst cushion (rule 5): above the hard floor, with
    /// `target_free_pct` % free. An idle guest gives from its cushion down to this when a
    /// starving guest needs more than the host can give.
    pub fn share_keep_kib(&self, g: &GuestMemory, standing: &Standing) -> u64 {
        let free_frac = (self.target_free_pct / 100.0).clamp(0.0, 0.95);
        let comfortable = (g.used_kib() as f64 / (1.0 - free_frac)).ceil() as u64;
        self.hard_floor_kib(g, standing).max(comfortable)
    }

    /// What a guest holds above the size a shrink stops at.
    fn excess_kib(&self, g: &GuestMemory, standing: &Standing) -> u64 {
        g.actual_kib.saturating_sub(self.keep_kib(g, standing))
    }

    /// What the host can grant now (rule 6): its available memory above its reserve, minus what
    /// guests may still make it back (nothing when the host is unknown).
    pub fn host_budget_kib(&self, host: Option<HostMemory>, unbacked_kib: u64) -> u64 {
        host.map_or(0, |h| {
            h.available_kib
                .saturating_sub(self.reserve_kib(h))
                .saturating_sub(unbacked_kib)
        })
    }

    /// What NUMA node `n` can grant the guests bound to it (rule 6): its free memory above its
    /// share of the reserve, minus `unbacked_kib`, what the guests bound to it may still touch.
    pub fn node_budget_kib(&self, n: &NodeMemory, unbacked_kib: u64) -> u64 {
        n.free_kib
            .saturating_sub(self.reserve_of_kib(n.total_kib))
            .saturating_sub(unbacked_kib)
    }

    /// The host memory kept available: `host_reserve_pct` % of its total.
    pub fn reserve_kib(&self, h: HostMemory) -> u64 {
        self.reserve_of_kib(h.total_kib)
    }

    /// `host_reserve_pct` % of `total_kib`: the share of the reserve memory of that size keeps.
    fn reserve_of_kib(&self, total_kib: u64) -> u64 {
        (total_kib as f64 * self.host_reserve_pct / 100.0).ceil() as u64
    }

    /// May wasting guests give memory back now (rule 4)? Always, except in host-pressure mode
    /// while the host has its target available and is not pressed (or its memory is unknown).
    fn reclaims(&self, host: Option<HostMemory>) -> bool {
        match self.host_target_pct {
            None => true,
            Some(pct) => host.is_some_and(|h| {
                (h.available_kib as f64) < h.total_kib as f64 * pct / 100.0 || self.pressed(h)
            }),
        }
    }

    /// Is the host pressed (rule 4): under its reserve, or its tasks stalling on memory?
    pub fn pressed(&self, h: HostMemory) -> bool {
        h.available_kib < self.reserve_kib(h) || self.stalling(h).is_some()
    }

    /// The share of the last 10 s the host stalled on memory, in %, when it is at least
    /// `host_stall_pct` (rule 4).
    pub fn stalling(&self, h: HostMemory) -> Option<f64> {
        h.stalled_pct.filter(|&pct| pct >= self.host_stall_pct)
    }
}

/// Plan the balloon sizes for one snapshot.
pub fn plan(snapshot: &MemSnapshot, policy: &MemPolicy) -> MemPlan {
    let guests = &snapshot.guests;
    // Rule 2.
    let status: Vec<MemStatus> = guests
        .iter()
        .map(|g| policy.status(g, &g.standing))
        .collect();
    let mut target: Vec<u64> = guests.iter().map(|g| g.actual_kib).collect();
    let mut out = MemPlan::default();
    let givers = if policy.reclaims(snapshot.host) {
        givers(snapshot, &status, policy)
    } else {
        Vec::new()
    };
    // Rule 3: a guest behind its last grant is fed nothing, and does not hold up rule 4 either.
    let starving: Vec<usize> = (0..guests.len())
        .filter(|&i| status[i] == MemStatus::Starving)
        .filter(|&i| !guests[i].standing.behind)
        .collect();
    let mut wanted = Fed::default();
    if starving.is_empty() {
        out.to_host_kib = return_to_host(snapshot, &givers, policy, &mut target);
    } else {
        wanted = feed(snapshot, &starving, policy, &mut target);
        out.from_host_kib = wanted.granted;
        let from_wasting = take_back(&givers, wanted.asked, &mut target);
        // Rule 5: what neither the host nor the wasting guests can give comes from idle guests'
        // cushions, a guest starving now before a burst that may come: the wants not granted,
        // and what the host's budget lacks to be above zero again.
        let deficit = snapshot.host.map_or(0, |h| {
            (policy.reserve_kib(h) + snapshot.unbacked_kib).saturating_sub(h.available_kib)
        });
        let short =
            (wanted.asked.saturating_sub(wanted.granted) + deficit).saturating_sub(from_wasting);
        let cushions = if short > 0 && policy.reclaims(snapshot.host) {
            cushion_givers(snapshot, &status, policy, &target)
        } else {
            Vec::new()
        };
        out.to_host_kib = from_wasting + take_back(&cushions, short, &mut target);
    }
    // The fleet signal: what the starving guests asked and the host's reserve lacks, that
    // neither the host nor any guest gave.
    let reserve_deficit = snapshot
        .host
        .map_or(0, |h| policy.reserve_kib(h).saturating_sub(h.available_kib));
    out.unmet_kib = (wanted.asked.saturating_sub(wanted.granted) + reserve_deficit)
        .saturating_sub(out.to_host_kib);
    out.changes = changes_to(guests, &target);
    out
}

/// What each idle guest can give from its burst cushion this cycle (rule 5): from its `target`
/// so far down to its share, within its one step (rule 6), most free first, as (guest index,
/// KiB). Idle: not starving and not consuming.
fn cushion_givers(
    snapshot: &MemSnapshot,
    status: &[MemStatus],
    policy: &MemPolicy,
    target: &[u64],
) -> Vec<(usize, u64)> {
    let guests = &snapshot.guests;
    let mut givers: Vec<(usize, u64)> = (0..guests.len())
        .filter(|&i| status[i] != MemStatus::Starving)
        .filter(|&i| guests[i].pace_kib_s() <= policy.consuming_kib_s)
        .map(|i| {
            let g = &guests[i];
            let share = policy.share_keep_kib(g, &g.standing);
            let step_left = policy
                .max_step_kib
                .saturating_sub(g.actual_kib.saturating_sub(target[i]));
            (i, target[i].saturating_sub(share).min(step_left))
        })
        .filter(|&(_, can)| can >= MIB)
        .collect();
    most_free_first(guests, &mut givers);
    givers
}

/// The resizes that take each of `guests` to its `target` size (same order), shrinks first.
pub fn changes_to(guests: &[PlannedGuest], target: &[u64]) -> Vec<BalloonChange> {
    let mut changes: Vec<BalloonChange> = guests
        .iter()
        .zip(target)
        .filter(|(g, t)| **t != g.actual_kib)
        .map(|(g, &t)| BalloonChange {
            id: g.id,
            from_kib: g.actual_kib,
            to_kib: t,
        })
        .collect();
    changes.sort_by_key(|c| (Reverse(c.shrinks()), c.id));
    changes
}

/// What each wasting guest can give this cycle (rule 5: down to where a shrink stops; rule 6:
/// one step at most), most wasteful first, as (guest index, KiB).
fn givers(snapshot: &MemSnapshot, status: &[MemStatus], policy: &MemPolicy) -> Vec<(usize, u64)> {
    let guests = &snapshot.guests;
    let mut givers: Vec<(usize, u64)> = (0..guests.len())
        .filter(|&i| status[i] == MemStatus::Wasting)
        .map(|i| {
            let g = &guests[i];
            let excess = policy.excess_kib(g, &g.standing);
            (i, excess.min(policy.max_step_kib))
        })
        .filter(|&(_, can)| can > 0)
        .collect();
    most_free_first(guests, &mut givers);
    givers
}

/// Order `givers` (guest index, KiB) by their guest's free share, most free first, then by index.
fn most_free_first(guests: &[PlannedGuest], givers: &mut [(usize, u64)]) {
    givers.sort_by(|a, b| {
        guests[b.0]
            .free_pct()
            .total_cmp(&guests[a.0].free_pct())
            .then(a.0.cmp(&b.0))
    });
}

/// What feeding asked for and what it could grant, KiB.
#[derive(Default)]
struct Fed {
    asked: u64,
    granted: u64,
}

/// Rule 3: grow each starving guest's `target` by what it wants, from the host's budget,
/// shared in proportion to the wants when the budget cannot pay them all.
fn feed(snapshot: &MemSnapshot, starving: &[usize], policy: &MemPolicy, target: &mut [u64]) -> Fed {
    let guests = &snapshot.guests;
    let wants: Vec<(usize, u64)> = starving
        .iter()
        .map(|&i| {
            let g = &guests[i];
            (i, want_kib(g, &g.standing, policy))
        })
        .collect();
    let asked: u64 = wants.iter().map(|&(_, w)| w).sum();
    let budget = policy.host_budget_kib(snapshot.host, snapshot.unbacked_kib);
    let mut shares = vec![0; guests.len()];
    for &(i, want) in &wants {
        shares[i] = if asked <= budget {
            want
        } else {
            share_of(budget, want, asked)
        };
    }
    within_nodes(snapshot, policy, &mut shares);
    for (t, share) in target.iter_mut().zip(&shares) {
        *t += share;
    }
    Fed {
        asked,
        granted: shares.iter().sum(),
    }
}

/// `want`'s share of `budget` when `asked` in all cannot be paid: rounded down, so the shares
/// never add up to more than the budget.
fn share_of(budget: u64, want: u64, asked: u64) -> u64 {
    (u128::from(budget) * u128::from(want) / u128::from(asked.max(1))) as u64
}

/// Rule 6 for guests strictly bound to NUMA nodes: cut `grants` (KiB, by index of
/// `snapshot.guests`) so that the guests bound to the same nodes get no more in all than those
/// nodes' budget, shared in proportion to their grants when short. Groups are served in order of
/// their node sets, each taking from its first node first. A node the snapshot does not describe
/// grants nothing; a snapshot with no nodes leaves the grants alone.
fn within_nodes(snapshot: &MemSnapshot, policy: &MemPolicy, grants: &mut [u64]) {
    if snapshot.nodes.is_empty() {
        return;
    }
    let mut left: BTreeMap<u32, u64> = snapshot
        .nodes
        .iter()
        .map(|n| {
            let unbacked = snapshot.node_unbacked_kib.get(&n.node).copied();
            (n.node, policy.node_budget_kib(n, unbacked.unwrap_or(0)))
        })
        .collect();
    let mut groups: BTreeMap<&[u32], Vec<usize>> = BTreeMap::new();
    for (i, g) in snapshot.guests.iter().enumerate() {
        if let Some(nodes) = g.nodes.as_ref().filter(|_| grants[i] > 0) {
            groups.entry(nodes.as_slice()).or_default().push(i);
        }
    }
    for (nodes, members) in groups {
        let cap: u64 = nodes.iter().filter_map(|n| left.get(n)).sum();
        let asked: u64 = members.iter().map(|&i| grants[i]).sum();
        if asked > cap {
            for &i in &members {
                grants[i] = share_of(cap, grants[i], asked);
            }
        }
        let mut take: u64 = members.iter().map(|&i| grants[i]).sum();
        for n in nodes {
            if let Some(l) = left.get_mut(n) {
                let t = take.min(*l);
                *l -= t;
                take -= t;
            }
        }
    }
}

/// The changes among `changes` whose grant goes beyond what the NUMA nodes their guests are bound
/// to can spare (rule 6), by index in `changes`.
fn beyond_nodes(
    snapshot: &MemSnapshot,
    policy: &MemPolicy,
    changes: &[BalloonChange],
) -> Vec<usize> {
    let index: HashMap<DomainId, usize> = snapshot
        .guests
        .iter()
        .enumerate()
        .map(|(i, g)| (g.id, i))
        .collect();
    let mut grants = vec![0; snapshot.guests.len()];
    for c in changes.iter().filter(|c| !c.shrinks()) {
        if let Some(&i) = index.get(&c.id) {
            grants[i] = c.to_kib - c.from_kib;
        }
    }
    let asked = grants.clone();
    within_nodes(snapshot, policy, &mut grants);
    changes
        .iter()
        .enumerate()
        .filter(|(_, c)| index.get(&c.id).is_some_and(|&i| grants[i] < asked[i]))
        .map(|(k, _)| k)
        .collect()
}

/// Rule 3: what starving guest `g` wants this cycle: enough that, after two periods of
/// consumption, it still has its headroom; nothing under 1 MiB; within its one step and its max
/// memory (rule 6).
fn want_kib(g: &GuestMemory, standing: &Standing, policy: &MemPolicy) -> u64 {
    let rate = g.pace_kib_s().max(standing.peak_rate_kib_s);
    let per_period = rate * policy.period_secs;
    let runway = rate * policy.runway_secs();
    let headroom = runway.max(g.actual_kib as f64 * policy.headroom_pct / 100.0);
    let need = (2.0 * per_period + headroom - g.free_kib as f64).ceil();
    let need = if need >= MIB as f64 { need as u64 } else { 0 };
    need.min(policy.max_step_kib)
        .min(g.max_kib.saturating_sub(g.actual_kib))
}

/// Rule 3: shrink the givers' `target`s, in order, by `asked` in all (as far as they can).
/// Returns what goes back to the host, KiB.
fn take_back(givers: &[(usize, u64)], asked: u64, target: &mut [u64]) -> u64 {
    let mut left = asked;
    for &(i, can) in givers {
        let take = left.min(can);
        target[i] -= take;
        left -= take;
    }
    asked - left
}

/// Rule 4: shrink each giver's `target` by a share of its excess (all of it while the host is
/// pressed), at least one minimum step, at most what it can give. Returns what goes
/// back to the host, KiB.
fn return_to_host(
    snapshot: &MemSnapshot,
    givers: &[(usize, u64)],
    policy: &MemPolicy,
    target: &mut [u64],
) -> u64 {
    let fraction = if snapshot.host.is_some_and(|h| policy.pressed(h)) {
        1.0
    } else {
        policy.return_fraction
    };
    let mut to_host_kib = 0;
    for &(i, can) in givers {
        let g = &snapshot.guests[i];
        let excess = policy.excess_kib(g, &g.standing);
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

/// A planner: a snapshot in, a plan and the hard limits it breaks out (none: safe to apply).
/// Benchmarks compare policies by handing the coordinator another.
pub type MemPlanner = fn(&MemSnapshot, &MemPolicy) -> (MemPlan, Vec<String>);

/// [`plan`], with every change that breaks a hard limit dropped by [`safe_part`] (rule 6): the
/// coordinator's planner. The problems are the changes dropped.
pub fn checked_plan(snapshot: &MemSnapshot, policy: &MemPolicy) -> (MemPlan, Vec<String>) {
    safe_part(snapshot, plan(snapshot, policy), policy)
}

/// How change `c` breaks a hard limit of its guest `g` (rule 6), if it does; `g` is `None` when
/// the guest is not in the snapshot.
fn change_problems(c: &BalloonChange, g: Option<&PlannedGuest>, policy: &MemPolicy) -> Vec<String> {
    let Some(g) = g else {
        return vec![format!("{}: not in the snapshot", c.id)];
    };
    let mut found = Vec::new();
    if c.to_kib > g.max_kib {
        found.push(format!(
            "{}: {} KiB above max {} KiB",
            c.id, c.to_kib, g.max_kib
        ));
    }
    let floor = policy.hard_floor_kib(g, &g.standing);
    if c.shrinks() && c.to_kib < floor {
        found.push(format!(
            "{}: {} KiB under its floor {} KiB (uses {} KiB)",
            c.id,
            c.to_kib,
            floor,
            g.used_kib()
        ));
    }
    if c.from_kib.abs_diff(c.to_kib) > policy.max_step_kib {
        found.push(format!("{}: step over {} KiB", c.id, policy.max_step_kib));
    }
    found
}

/// Memory `changes` grant to guests, KiB.
fn granted_kib(changes: &[BalloonChange]) -> u64 {
    changes
        .iter()
        .filter(|c| !c.shrinks())
        .map(|c| c.to_kib - c.from_kib)
        .sum()
}

/// Rule 6: every way `plan` breaks a hard limit for `snapshot`; empty when it is safe to apply.
pub fn violations(snapshot: &MemSnapshot, plan: &MemPlan, policy: &MemPolicy) -> Vec<String> {
    let guests = snapshot.by_id();
    let mut found: Vec<String> = plan
        .changes
        .iter()
        .flat_map(|c| change_problems(c, guests.get(&c.id).copied(), policy))
        .collect();
    let granted = granted_kib(&plan.changes);
    let budget = policy.host_budget_kib(snapshot.host, snapshot.unbacked_kib);
    if granted > budget {
        found.push(format!(
            "grants {granted} KiB, but the host can spare {budget} KiB above its reserve and what guests may still touch"
        ));
    }
    for k in beyond_nodes(snapshot, policy, &plan.changes) {
        found.push(beyond_nodes_said(snapshot, &plan.changes[k]));
    }
    found
}

/// What is said of change `c`, a grant beyond what its guest's NUMA nodes can spare.
fn beyond_nodes_said(snapshot: &MemSnapshot, c: &BalloonChange) -> String {
    let bound = snapshot.guest(&c.id).and_then(|g| g.nodes.as_ref());
    let nodes = bound.map_or(String::new(), |n| {
        n.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    });
    format!(
        "{}: a grant of {} KiB, beyond what NUMA node {nodes} (its memory's binding) can spare above its share of the reserve",
        c.id,
        c.to_kib - c.from_kib
    )
}

/// Rule 6 applied: `plan` without the changes that break a hard limit for `snapshot`, and one line
/// per change dropped. A change beyond its guest's limits is dropped alone, never the whole plan
/// (one guest cannot stop the others being fed); grants beyond the host's budget are dropped from
/// the last one on until the rest fits. What is left has no [`violations`].
pub fn safe_part(
    snapshot: &MemSnapshot,
    mut plan: MemPlan,
    policy: &MemPolicy,
) -> (MemPlan, Vec<String>) {
    let guests = snapshot.by_id();
    let mut dropped = Vec::new();
    plan.changes.retain(|c| {
        let problems = change_problems(c, guests.get(&c.id).copied(), policy);
        dropped.extend(problems.iter().take(1).cloned());
        problems.is_empty()
    });
    let budget = policy.host_budget_kib(snapshot.host, snapshot.unbacked_kib);
    let mut granted = granted_kib(&plan.changes);
    while granted > budget {
        let last = plan
            .changes
            .iter()
            .rposition(|c| !c.shrinks())
            .expect("something is granted");
        let c = plan.changes.remove(last);
        granted -= c.to_kib - c.from_kib;
        dropped.push(format!(
            "{}: a grant of {} KiB, beyond what the host can spare ({budget} KiB above its reserve and what guests may still touch)",
            c.id,
            c.to_kib - c.from_kib
        ));
    }
    let beyond = beyond_nodes(snapshot, policy, &plan.changes);
    for &k in beyond.iter().rev() {
        let c = plan.changes.remove(k);
        granted -= c.to_kib - c.from_kib;
        dropped.push(beyond_nodes_said(snapshot, &c));
    }
    plan.from_host_kib = granted;
    plan.to_host_kib = plan
        .changes
        .iter()
        .filter(|c| c.shrinks())
        .map(|c| c.from_kib - c.to_kib)
        .sum();
    (plan, dropped)
}
