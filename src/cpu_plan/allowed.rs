//! Rule 9's sets: where each vCPU may be pinned, from what its admin configured, the host's pool
//! (`--cpus`) and the online pCPUs, and whether its domain is excluded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::host::{DomainId, DomainRef, VcpuInfo};
use crate::sampling::{Allowed, VcpuKey};

/// The allowed set of one vCPU: `configured` (its persistent configuration's affinity, where
/// there is one) ∩ `pool` (where set) ∩ `online`.
pub fn allowed(configured: Option<&[u32]>, pool: Option<&[u32]>, online: &[u32]) -> Vec<u32> {
    online
        .iter()
        .copied()
        .filter(|p| configured.is_none_or(|c| c.binary_search(p).is_ok()))
        .filter(|p| pool.is_none_or(|c| c.binary_search(p).is_ok()))
        .collect()
}

/// Works out every vCPU's allowed set, cycle after cycle.
///
/// A transient domain has no persistent configuration: its admin's word is the affinity its
/// vCPUs had when first seen, before any pin of ours (so after a restart of the daemon, a
/// transient domain keeps the pins it was given). Sets are shared between the vCPUs that have the
/// same one, and a vCPU left with no pCPU at all is said once.
#[derive(Debug, Default)]
pub struct AllowedSets {
    /// The host's pool (`--cpus`), sorted; `None`: every online pCPU.
    pool: Option<Vec<u32>>,
    /// Affinity first seen, for vCPUs of domains without a persistent configuration.
    first_seen: HashMap<VcpuKey, Vec<u32>>,
    /// vCPUs seen this cycle.
    seen: HashSet<VcpuKey>,
    /// Domains told about a vCPU with nowhere to go.
    warned: HashSet<DomainId>,
    /// The distinct sets of this cycle.
    interned: HashMap<Vec<u32>, Arc<[u32]>>,
    /// The host's online pCPUs this cycle.
    online: Vec<u32>,
}

impl AllowedSets {
    /// Sets within `pool` (sorted pCPU numbers; `None`: all online pCPUs).
    pub fn new(pool: Option<Vec<u32>>) -> Self {
        Self {
            pool,
            ..Self::default()
        }
    }

    /// Start a cycle on a host whose online pCPUs are `online` (sorted).
    pub fn begin(&mut self, online: &[u32]) {
        self.online = online.to_vec();
        self.interned.clear();
        self.seen.clear();
    }

    /// The allowed set of vCPU `vcpu` of `domain`; empty when the domain is `excluded`.
    pub fn of(&mut self, domain: &DomainRef, excluded: bool, vcpu: &VcpuInfo) -> Allowed {
        let key = VcpuKey {
            domain: domain.id,
            vcpu: vcpu.number,
        };
        self.seen.insert(key);
        if excluded {
            return Allowed::Only(Arc::from([]));
        }
        let configured = match &vcpu.configured {
            Some(configured) => configured,
            None => self
                .first_seen
                .entry(key)
                .or_insert_with(|| vcpu.affinity.clone()),
        };
        let set = allowed(Some(configured), self.pool.as_deref(), &self.online);
        if set.is_empty() && self.warned.insert(domain.id) {
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

    /// End a cycle: forget the vCPUs and domains not seen in it.
    pub fn end_cycle(&mut self) {
        let seen = &self.seen;
        self.first_seen.retain(|key, _| seen.contains(key));
        let domains: HashSet<DomainId> = seen.iter().map(|k| k.domain).collect();
        self.warned.retain(|id| domains.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        DomainRef {
            id: DomainId([n; 16]),
            name: format!("d{n}"),
            opted_out: false,
        }
    }

    #[test]
    fn the_set_is_configuration_and_pool_and_online() {
        let online = [0, 1, 2, 3, 5];
        assert_eq!(allowed(None, None, &online), online);
        assert_eq!(allowed(Some(&[1, 2, 4]), None, &online), [1, 2]);
        assert_eq!(allowed(Some(&[1, 2, 4]), Some(&[2, 3]), &online), [2]);
        assert_eq!(allowed(None, Some(&[3, 4, 5]), &online), [3, 5]);
        assert!(allowed(Some(&[4]), None, &online).is_empty());
    }

    #[test]
    fn sets_follow_configuration_pool_exclusion_and_first_sight() {
        let mut sets = AllowedSets::new(Some(vec![1, 2, 3]));
        sets.begin(&[0, 1, 2, 3]);
        let d = domain(1);
        // Configured on 0-1, pool 1-3: pCPU 1 only.
        assert_eq!(
            sets.of(&d, false, &vcpu(0, &[0], Some(&[0, 1]))),
            Allowed::Only(Arc::from([1]))
        );
        // Excluded: nowhere.
        assert!(sets.of(&d, true, &vcpu(1, &[0], Some(&[0, 1]))).is_none());
        // Transient: its first affinity (0-3) within the pool, and it stays so after we pin it.
        let first = sets.of(&domain(2), false, &vcpu(0, &[0, 1, 2, 3], None));
        assert_eq!(first, Allowed::Only(Arc::from([1, 2, 3])));
        sets.end_cycle();
        sets.begin(&[0, 1, 2, 3]);
        assert_eq!(sets.of(&domain(2), false, &vcpu(0, &[2], None)), first);
        // Without a pool, a set of every online pCPU is no constraint.
        let mut free = AllowedSets::new(None);
        free.begin(&[0, 1]);
        assert_eq!(
            free.of(&d, false, &vcpu(0, &[0], Some(&[0, 1, 7]))),
            Allowed::Any
        );
    }
}
