//! What the vCPU scheduler remembers about one domain run: [`DomainRecord`], kept in a
//! [`crate::tracker::Tracker`], so that everything it knows of a domain's vCPUs is in one place,
//! forgotten in one place, and a restarted domain starts fresh (its affinities are what its admin
//! gave the new run).

use std::collections::BTreeMap;

use crate::host::VcpuInfo;
use crate::sampling::{VcpuHistory, VcpuLoad};

/// Everything the scheduler remembers about one domain run.
#[derive(Debug, Default)]
pub struct DomainRecord {
    /// Its name at its last sight, for the log.
    pub name: String,
    /// It was left alone (`--exclude`, its metadata) at its last sight: said when that begins.
    pub excluded: bool,
    /// Told the operator that one of its vCPUs has no online pCPU it may use.
    pub nowhere_said: bool,
    /// Told the operator that numad places it (its vCPU placement is `auto`).
    pub numad_said: bool,
    /// Its vCPUs seen at the last sample, by number.
    pub vcpus: BTreeMap<u32, VcpuRecord>,
}

impl DomainRecord {
    /// Forget the vCPUs not among `vcpus` (read now): unplugged, or gone offline.
    pub fn keep_only(&mut self, vcpus: &[VcpuInfo]) {
        if self.vcpus.len() == vcpus.len()
            && vcpus.iter().all(|v| self.vcpus.contains_key(&v.number))
        {
            return;
        }
        self.vcpus
            .retain(|n, _| vcpus.iter().any(|v| v.number == *n));
    }
}

/// What the scheduler remembers about one vCPU.
#[derive(Clone, Debug)]
pub struct VcpuRecord {
    /// Its earlier samples, for its usage and demand.
    pub history: VcpuHistory,
    /// Its affinity when first seen in this run, before any pin of ours: the admin's word for a
    /// domain without a persistent configuration, and what `--restore-on-exit` puts back.
    pub first_affinity: Vec<u32>,
    /// The pCPU this scheduler last pinned it to, if it re-pinned it.
    pub pinned_to: Option<u32>,
    /// Its figures and place at its last reading: what stands for it while its domain does not
    /// answer (never zero).
    pub last_load: Option<VcpuLoad>,
}

impl VcpuRecord {
    /// `vcpu` at first sight, its rates to be averaged over `window` samples.
    pub fn new(window: usize, vcpu: &VcpuInfo) -> Self {
        Self {
            history: VcpuHistory::new(window),
            first_affinity: vcpu.affinity.clone(),
            pinned_to: None,
            last_load: None,
        }
    }
}
