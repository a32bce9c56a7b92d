//! Rule 9's sets, worked out for the scheduler's cycle: where each vCPU may be pinned, from what
//! its admin configured, the NUMA node its memory is bound to or it runs on, the host's pool
//! (`--cpus`) and the online pCPUs, and whether its domain is excluded. The intersection itself is
//! the planner's ([`crate::cpu_plan::allowed`]); what must be remembered across cycles (a vCPU's
//! first affinity, that a domain was told it has nowhere to go) is in the scheduler's record of
//! the domain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::cpu_plan::allowed;
use crate::host::{DomainRef, VcpuInfo};
use crate::sampling::Allowed;
use crate::topology::Topology;

/// Works out every vCPU's allowed set in a cycle.
///
/// A transient domain has no persistent configuration: its admin's word is the affinity its
/// vCPUs had when first seen in its run, before any pin of ours (so after a restart of the
/// daemon, a transient domain keeps the pins it was given). Sets are shared between the vCPUs
/// that have the same one, and a vCPU left with no pCPU at all is said once per domain run.
#[derive(Debug, Default)]
pub struct AllowedSets {
    /// The host's pool (`--cpus`), sorted; `None`: every online pCPU.
    pool: Option<Vec<u32>>,
    /// The distinct sets of this cycle.
    interned: HashMap<Vec<u32>, Arc<[u32]>>,
    /// The host's online pCPUs this cycle.
    online: Vec<u32>,
    /// The host's topology, where known.
    topology: Option<Topology>,
    /// May a vCPU whose memory is not bound leave the NUMA node it runs on?
    cross_node: bool,
}

impl AllowedSets {
    /// Sets within `pool` (sorted pCPU numbers; `None`: all online pCPUs).
    pub fn new(pool: Option<Vec<u32>>) -> Self {
        Self {
            pool,
            ..Self::default()
        }
    }

    /// Let vCPUs whose memory is not bound to a NUMA node move across nodes (`--cross-node`).
    pub fn with_cross_node(mut self, cross_node: bool) -> Self {
        self.cross_node = cross_node;
        self
    }

    /// May vCPUs whose memory is not bound leave their NUMA node?
    pub fn crosses_nodes(&self) -> bool {
        self.cross_node
    }

    /// Start a cycle on a host whose online pCPUs are `online` (sorted), laid out as `topology`.
    pub fn begin(&mut self, online: &[u32], topology: Option<Topology>) {
        self.online = online.to_vec();
        self.topology = topology;
        self.interned.clear();
    }

    /// The pCPUs of the NUMA nodes `vcpu` of `domain` may use: those its memory is bound to;
    /// else, unless cross-node moves are allowed, the one it runs on now. `None`: no NUMA limit
    /// (no topology, or a node that cannot be told).
    fn node_cpus(&self, domain: &DomainRef, vcpu: &VcpuInfo) -> Option<Cow<'_, [u32]>> {
        let topology = self.topology.as_ref()?;
        if let Some(bound) = &domain.facts.memory_nodes {
            return Some(Cow::Owned(topology.cpus_of_nodes(bound)));
        }
        if self.cross_node {
            return None;
        }
        // The one node its affinity lies in, else the node it last ran on.
        let mut nodes = vcpu.affinity.iter().filter_map(|&p| topology.node_of(p));
        let node = match nodes.next() {
            Some(node) if nodes.all(|n| n == node) => node,
            _ => topology.node_of(vcpu.last_pcpu?)?,
        };
        Some(Cow::Borrowed(topology.cpus_of_node(node)))
    }

    /// The allowed set of vCPU `vcpu` of `domain`, whose affinity was `first_affinity` when first
    /// seen in this run; empty when the domain is `excluded`. A vCPU with nowhere to go is said
    /// unless `nowhere_said` (the domain's record of it) says it was.
    pub fn of(
        &mut self,
        domain: &DomainRef,
        excluded: bool,
        vcpu: &VcpuInfo,
        first_affinity: &[u32],
        nowhere_said: &mut bool,
    ) -> Allowed {
        if excluded {
            return Allowed::Only(Arc::from([]));
        }
        let configured = vcpu.configured.as_deref().unwrap_or(first_affinity);
        let nodes = self.node_cpus(domain, vcpu);
        let set = allowed(
            &self.online,
            &[Some(configured), nodes.as_deref(), self.pool.as_deref()],
        );
        if set.is_empty() && !std::mem::replace(nowhere_said, true) {
            log::warn!(
                "domain {} vCPU{}: none of the pCPUs it may use ({configured:?}) is online{}; it is left where it runs",
                domain.name,
                vcpu.number,
                if self.pool.is_some() {
                    " and in --cpus"
                } else {
                    ""
                }
            );
        }
        if set.len() == self.online.len() {
            return Allowed::Any;
        }
        let shared = self
            .interned
            .entry(set)
            .or_insert_with_key(|set| Arc::from(set.as_slice()));
        Allowed::Only(Arc::clone(shared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::DomainId;

    fn vcpu(number: u32, affinity: &[u32], configured: Option<&[u32]>) -> VcpuInfo {
        VcpuInfo {
            number,
            cpu_time_ns: 0,
            last_pcpu: None,
            affinity: affinity.to_vec(),
            delay_ns: None,
            configured: configured.map(<[u32]>::to_vec),
        }
    }

    fn domain(n: u8) -> DomainRef {
        DomainRef::new(DomainId([n; 16]), &format!("d{n}"))
    }

    /// The set of `vcpu` of `domain`, first seen with the affinity it has now.
    fn set_of(
        sets: &mut AllowedSets,
        domain: &DomainRef,
        excluded: bool,
        vcpu: &VcpuInfo,
    ) -> Allowed {
        sets.of(domain, excluded, vcpu, &vcpu.affinity.clone(), &mut false)
    }

    #[test]
    fn a_vcpu_stays_on_its_numa_node_unless_allowed_to_cross() {
        let caps = std::fs::read_to_string(format!(
            "{}/tests/data/caps-2socket-smt.xml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let topology = Topology::from_capabilities(&caps);
        let online: Vec<u32> = (0..16).collect();
        let node1 = [4, 5, 6, 7, 12, 13, 14, 15];
        let anywhere: Vec<u32> = online.clone();
        // Pinned on pCPU 5 (node 1), configured anywhere: node 1 only.
        let mut sets = AllowedSets::new(None);
        sets.begin(&online, topology.clone());
        let on5 = vcpu(0, &[5], Some(&anywhere));
        assert_eq!(
            set_of(&mut sets, &domain(1), false, &on5),
            Allowed::Only(Arc::from(node1))
        );
        // Spanning both nodes, last ran on pCPU 1 (node 0): node 0.
        let spanning = VcpuInfo {
            last_pcpu: Some(1),
            ..vcpu(1, &anywhere, Some(&anywhere))
        };
        let node0 = [0, 1, 2, 3, 8, 9, 10, 11];
        assert_eq!(
            set_of(&mut sets, &domain(1), false, &spanning),
            Allowed::Only(Arc::from(node0))
        );
        // Memory strictly bound to node 0: node 0, even while it runs on node 1, even across.
        let mut bound = domain(2);
        bound.facts.memory_nodes = Some(vec![0]);
        let mut crossing = AllowedSets::new(None).with_cross_node(true);
        crossing.begin(&online, topology);
        assert_eq!(
            set_of(&mut crossing, &bound, false, &on5),
            Allowed::Only(Arc::from(node0))
        );
        // Not bound, crossing allowed: anywhere.
        assert_eq!(set_of(&mut crossing, &domain(3), false, &on5), Allowed::Any);
    }

    #[test]
    fn sets_follow_configuration_pool_exclusion_and_first_sight() {
        let mut sets = AllowedSets::new(Some(vec![1, 2, 3]));
        sets.begin(&[0, 1, 2, 3], None);
        let d = domain(1);
        // Configured on 0-1, pool 1-3: pCPU 1 only.
        assert_eq!(
            set_of(&mut sets, &d, false, &vcpu(0, &[0], Some(&[0, 1]))),
            Allowed::Only(Arc::from([1]))
        );
        // Excluded: nowhere.
        assert!(set_of(&mut sets, &d, true, &vcpu(1, &[0], Some(&[0, 1]))).is_none());
        // Transient: its first affinity (0-3) within the pool, and it stays so after we pin it.
        let first = set_of(&mut sets, &domain(2), false, &vcpu(0, &[0, 1, 2, 3], None));
        assert_eq!(first, Allowed::Only(Arc::from([1, 2, 3])));
        sets.begin(&[0, 1, 2, 3], None);
        let pinned = vcpu(0, &[2], None);
        assert_eq!(
            sets.of(&domain(2), false, &pinned, &[0, 1, 2, 3], &mut false),
            first
        );
        // Nowhere to go: said once.
        let mut said = false;
        let offline = vcpu(0, &[0], Some(&[7]));
        assert!(sets.of(&d, false, &offline, &[0], &mut said).is_none());
        assert!(said);
        // Without a pool, a set of every online pCPU is no constraint.
        let mut free = AllowedSets::new(None);
        free.begin(&[0, 1], None);
        assert_eq!(
            set_of(&mut free, &d, false, &vcpu(0, &[0], Some(&[0, 1, 7]))),
            Allowed::Any
        );
    }
}
