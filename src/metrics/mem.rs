//! The memory coordinator's metric families.

use prometheus::{IntCounterVec, Registry};

use super::families::{Known, Series, count_by_reason, counters, snake_case};
use crate::report::{GuestState, MemReport, ResizeWhy};

const MIB: f64 = 1024.0 * 1024.0;

/// What the memory coordinator exports of each cycle.
pub struct MemFamilies {
    balloon: Series,
    free: Series,
    rate: Series,
    state: Series,
    guests: Series,
    /// Every state and its label value, in order.
    states: Vec<(GuestState, String)>,
    host_total: Known,
    host_available: Known,
    host_reserve: Known,
    host_unbacked: Known,
    host_stall: Known,
    unmet: Known,
    resizes: IntCounterVec,
}

/// The labels of a guest's series.
const GUEST: [&str; 2] = ["domain", "uuid"];

impl MemFamilies {
    /// Every family, registered in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            balloon: Series::new(
                r,
                "vmbalance_guest_balloon_bytes",
                "A guest's balloon size: the memory it has.",
                &GUEST,
            ),
            free: Series::new(
                r,
                "vmbalance_guest_free_bytes",
                "Memory a guest can still use (MemAvailable, else MemFree), as it last reported.",
                &GUEST,
            ),
            rate: Series::new(
                r,
                "vmbalance_guest_consumption_bytes_per_second",
                "How fast a guest's used memory grows (negative: shrinks).",
                &GUEST,
            ),
            state: Series::new(
                r,
                "vmbalance_guest_state",
                "1 for the state a guest is in this cycle, 0 for each other state.",
                &["domain", "uuid", "state"],
            ),
            guests: Series::new(
                r,
                "vmbalance_guests",
                "Guests in each state this cycle.",
                &["state"],
            ),
            states: GuestState::ALL
                .iter()
                .map(|&s| (s, snake_case(s.as_str())))
                .collect(),
            host_total: Known::new(
                r,
                "vmbalance_host_memory_total_bytes",
                "The host's physical memory.",
            ),
            host_available: Known::new(
                r,
                "vmbalance_host_memory_available_bytes",
                "Memory the host's kernel can hand out (MemAvailable).",
            ),
            host_reserve: Known::new(
                r,
                "vmbalance_host_memory_reserve_bytes",
                "Memory the coordinator keeps available whatever the guests want.",
            ),
            host_unbacked: Known::new(
                r,
                "vmbalance_host_memory_unbacked_bytes",
                "Memory guests hold free and may touch at any time, which the host would then have to back.",
            ),
            host_stall: Known::new(
                r,
                "vmbalance_host_memory_stall_ratio",
                "Share of the last 10 s some host task stalled waiting for memory (PSI some avg10), where known.",
            ),
            unmet: Known::new(
                r,
                "vmbalance_memory_pressure_ratio",
                "Memory need the last plan left unmet (what starving guests asked and the reserve lacks, that neither the host nor a guest gave), as a share of the host's memory above its reserve, in [0, 1]: what only moving a guest to another host relieves.",
            ),
            resizes: counters(
                r,
                "vmbalance_balloon_resizes_total",
                "Balloon resizes made, by reason.",
                &["reason"],
            ),
        }
    }

    /// Export the cycle `r`.
    pub fn export(&mut self, r: &MemReport) {
        count_by_reason(
            &self.resizes,
            ResizeWhy::ALL.iter().map(|w| w.as_str()),
            r.changes.iter().map(|c| c.why.as_str()),
        );
        let mut counts = vec![0usize; self.states.len()];
        for g in &r.guests {
            let uuid = g.uuid.to_string();
            let labels = [g.domain.as_str(), &uuid];
            self.balloon.set(&labels, g.actual_mib * MIB);
            if let Some(free) = g.free_mib {
                self.free.set(&labels, free * MIB);
            }
            if let Some(rate) = g.rate_mib_s {
                self.rate.set(&labels, rate * MIB);
            }
            for (i, (state, name)) in self.states.iter().enumerate() {
                let now = *state == g.state;
                counts[i] += usize::from(now);
                self.state
                    .set(&[g.domain.as_str(), &uuid, name], f64::from(u8::from(now)));
            }
        }
        for ((_, name), count) in self.states.iter().zip(counts) {
            self.guests.set(&[name], count as f64);
        }
        for series in [
            &mut self.balloon,
            &mut self.free,
            &mut self.rate,
            &mut self.state,
            &mut self.guests,
        ] {
            series.end_cycle();
        }
        let h = r.host.as_ref();
        self.host_total.set(h.map(|h| h.total_mib * MIB));
        self.host_available.set(h.map(|h| h.available_mib * MIB));
        self.host_reserve.set(h.map(|h| h.reserve_mib * MIB));
        self.host_unbacked.set(h.map(|h| h.unbacked_mib * MIB));
        self.host_stall
            .set(h.and_then(|h| h.stalled_pct).map(|pct| pct / 100.0));
        let idle = r.guests.is_empty() && r.not_answering.is_empty() && r.without_balloon == 0;
        self.unmet
            .set(r.unmet_share.or(if idle { Some(0.0) } else { None }));
    }
}
