//! The vCPU scheduler's metric families.

use prometheus::{IntCounterVec, Registry};

use super::families::{Known, Series, count_by_reason, counters};
use crate::report::{CpuReport, Decision, PinWhy};

/// What the vCPU scheduler exports of each cycle.
pub struct CpuFamilies {
    pcpu_usage: Series,
    pcpu_demand: Series,
    vcpu_usage: Series,
    vcpu_demand: Series,
    vcpu_pcpu: Series,
    node_spread: Series,
    balanced: Known,
    unserved: Known,
    pin_changes: IntCounterVec,
}

/// The labels of a vCPU's series: its domain's name and UUID, and its number. The pCPU it runs
/// on is a value (`vmbalance_vcpu_pcpu`), so a re-pin ends no series.
const VCPU: [&str; 3] = ["domain", "uuid", "vcpu"];

impl CpuFamilies {
    /// Every family, registered in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            pcpu_usage: Series::new(
                r,
                "vmbalance_pcpu_usage_ratio",
                "CPU time the vCPUs on a pCPU used over the last period, as a share of the pCPU.",
                &["pcpu"],
            ),
            pcpu_demand: Series::new(
                r,
                "vmbalance_pcpu_demand_ratio",
                "CPU time the vCPUs on a pCPU wanted (used plus waited for) over the last period, as a share of the pCPU.",
                &["pcpu"],
            ),
            vcpu_usage: Series::new(
                r,
                "vmbalance_vcpu_usage_ratio",
                "CPU time a vCPU used over the last period, as a share of one pCPU.",
                &VCPU,
            ),
            vcpu_demand: Series::new(
                r,
                "vmbalance_vcpu_demand_ratio",
                "CPU time a vCPU wanted (used plus waited for) over the last period, as a share of one pCPU.",
                &VCPU,
            ),
            vcpu_pcpu: Series::new(
                r,
                "vmbalance_vcpu_pcpu",
                "The pCPU a vCPU is pinned to (or last ran on, when its affinity spans several).",
                &VCPU,
            ),
            node_spread: Series::new(
                r,
                "vmbalance_node_spread_ratio",
                "Busiest minus freest pCPU of a NUMA node, in the figure balanced (hosts of two nodes or more).",
                &["node"],
            ),
            balanced: Known::new(
                r,
                "vmbalance_cpu_balanced",
                "1 when the last decision found the host balanced (the spread moving vCPUs can reduce within the threshold), else 0.",
            ),
            unserved: Known::new(
                r,
                "vmbalance_cpu_pressure_ratio",
                "CPU demand the last plan left unserved (above a whole pCPU plus the threshold), as a share of the capacity of the pCPUs the vCPUs may use, in [0, 1]: what only moving a domain to another host relieves. Absent where the hypervisor reports no run-queue delay.",
            ),
            pin_changes: counters(
                r,
                "vmbalance_pin_changes_total",
                "vCPU pin changes made, by reason.",
                &["reason"],
            ),
        }
    }

    /// Export the cycle `r`.
    pub fn export(&mut self, r: &CpuReport) {
        count_by_reason(
            &self.pin_changes,
            PinWhy::ALL.iter().map(|w| w.as_str()),
            r.moves.iter().map(|m| m.why.as_str()),
        );
        for p in &r.pcpus {
            let pcpu = p.pcpu.to_string();
            self.pcpu_usage.set(&[&pcpu], p.usage / 100.0);
            if let Some(demand) = p.demand {
                self.pcpu_demand.set(&[&pcpu], demand / 100.0);
            }
        }
        for v in &r.vcpu_lines {
            let uuid = v.uuid.to_string();
            let vcpu = v.vcpu.to_string();
            let labels = [v.domain.as_str(), &uuid, &vcpu];
            self.vcpu_usage.set(&labels, v.usage / 100.0);
            if let Some(demand) = v.demand {
                self.vcpu_demand.set(&labels, demand / 100.0);
            }
            if let Some(pcpu) = v.pcpu {
                self.vcpu_pcpu.set(&labels, f64::from(pcpu));
            }
        }
        for n in &r.nodes {
            self.node_spread
                .set(&[&n.node.to_string()], n.spread / 100.0);
        }
        for series in [
            &mut self.pcpu_usage,
            &mut self.pcpu_demand,
            &mut self.vcpu_usage,
            &mut self.vcpu_demand,
            &mut self.vcpu_pcpu,
            &mut self.node_spread,
        ] {
            series.end_cycle();
        }
        // A cycle that makes no decision (settling after changes) keeps the last one's verdict.
        if r.decision == Decision::Planned {
            self.balanced.set(Some(if r.balanced { 1.0 } else { 0.0 }));
            self.unserved.set(r.unserved_share);
        } else if r.domains == 0 && r.not_answering.is_empty() {
            // No domain: balanced, and no demand to serve.
            self.balanced.set(Some(1.0));
            self.unserved.set(Some(0.0));
        }
    }
}
