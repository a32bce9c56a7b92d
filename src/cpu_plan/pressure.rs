//! The fleet signal of the vCPU planner: the CPU demand a host cannot serve however its vCPUs are
//! pinned, which only moving a domain to another host relieves.

use super::{Basis, CpuPlan};
use crate::sampling::CpuSnapshot;

/// The CPU demand `plan` leaves unserved, as a share of the capacity of the pCPUs the vCPUs of
/// `snapshot` may use, in [0, 1]: the sum, over those pCPUs, of the predicted demand above one
/// whole pCPU plus `noise` points (the balance threshold: a few points over 100 % are the host's
/// own threads, not a lack of pCPUs), divided by their number times 100 %, at most 1.
///
/// `None` when the hypervisor reports no run-queue delay (the plan balanced usage, which cannot
/// exceed 100 % of a pCPU and so cannot show unserved demand), or when no vCPU may be moved.
pub fn unserved_share(snapshot: &CpuSnapshot, plan: &CpuPlan, noise: f64) -> Option<f64> {
    if plan.basis != Basis::Demand {
        return None;
    }
    let usable: Vec<u32> = snapshot
        .pcpus
        .iter()
        .copied()
        .filter(|&p| {
            snapshot
                .vcpus
                .iter()
                .any(|v| !v.allowed.is_none() && v.allowed.contains(p))
        })
        .collect();
    if usable.is_empty() {
        return None;
    }
    let unserved: f64 = usable
        .iter()
        .filter_map(|p| plan.predicted.get(p))
        .map(|load| (load - 100.0 - noise.max(0.0)).max(0.0))
        .sum();
    Some((unserved / (100.0 * usable.len() as f64)).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_plan::{CpuPolicy, plan};
    use crate::host::DomainId;
    use crate::sampling::{VcpuKey, VcpuLoad};

    /// A host of `pcpus` pCPUs running one vCPU per demand in `demands`, unpinned.
    fn host(pcpus: u32, demands: &[f64]) -> CpuSnapshot {
        CpuSnapshot {
            pcpus: (0..pcpus).collect(),
            vcpus: demands
                .iter()
                .enumerate()
                .map(|(i, &d)| VcpuLoad {
                    usage: Some(d.min(100.0)),
                    demand: Some(d),
                    ..VcpuLoad::unknown(VcpuKey {
                        domain: DomainId([i as u8 + 1; 16]),
                        vcpu: 0,
                    })
                })
                .collect(),
            ..CpuSnapshot::default()
        }
    }

    fn share(snapshot: &CpuSnapshot) -> Option<f64> {
        let policy = CpuPolicy::DEFAULT;
        unserved_share(snapshot, &plan(snapshot, &policy), policy.threshold)
    }

    #[test]
    fn four_busy_vcpus_on_two_pcpus_leave_demand_unserved() {
        // Each busy vCPU wants a whole pCPU and gets half: 200 % on each pCPU.
        let s = share(&host(2, &[100.0; 4])).expect("demand is reported");
        assert!((s - 0.9).abs() < 1e-9, "{s}");
    }

    #[test]
    fn a_host_its_vcpus_fit_reads_zero() {
        assert_eq!(share(&host(2, &[100.0, 100.0])), Some(0.0));
        assert_eq!(share(&host(4, &[60.0, 50.0, 40.0, 30.0, 20.0])), Some(0.0));
        // A few points over a whole pCPU are the host's own threads.
        assert_eq!(share(&host(2, &[104.0, 103.0])), Some(0.0));
    }

    #[test]
    fn the_share_is_at_most_one() {
        assert_eq!(share(&host(1, &[100.0; 8])), Some(1.0));
    }

    #[test]
    fn without_run_queue_delay_it_is_unknown() {
        let mut s = host(2, &[100.0; 4]);
        for v in &mut s.vcpus {
            v.demand = None;
        }
        assert_eq!(share(&s), None);
    }
}
