//! Rule 5's second half: a pCPU whose load is partly unknown is left alone.
//!
//! A vCPU charged to a pCPU without a load (its domain did not answer before it had two samples,
//! or its series started again) makes that pCPU's load unknown: counting the vCPU as idle would
//! make the pCPU look freer than it is, and a move onto it or off it would be decided on a figure
//! nobody measured. So nothing is moved onto such a pCPU, nor off it, until its load is known.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::sampling::{Allowed, CpuSnapshot, VcpuLoad};

/// The online pCPUs charged with a vCPU whose load is not known.
pub fn unknown_pcpus(snapshot: &CpuSnapshot) -> BTreeSet<u32> {
    snapshot
        .vcpus
        .iter()
        .filter(|v| v.usage.is_none())
        .filter_map(VcpuLoad::charged_pcpu)
        .filter(|p| snapshot.pcpus.binary_search(p).is_ok())
        .collect()
}

/// `snapshot` with the pCPUs of `unknown` taken out of every vCPU's allowed set, and the vCPUs
/// charged to them kept where they are (nothing allowed); `None` when `unknown` is empty.
pub fn leaving_alone(snapshot: &CpuSnapshot, unknown: &BTreeSet<u32>) -> Option<CpuSnapshot> {
    if unknown.is_empty() {
        return None;
    }
    let known: Arc<[u32]> = snapshot
        .pcpus
        .iter()
        .copied()
        .filter(|p| !unknown.contains(p))
        .collect();
    let nowhere: Arc<[u32]> = Arc::from([]);
    let mut out = snapshot.clone();
    for v in &mut out.vcpus {
        let set = if v.charged_pcpu().is_some_and(|p| unknown.contains(&p)) {
            nowhere.clone()
        } else {
            match &v.allowed {
                Allowed::Any => known.clone(),
                Allowed::Only(set) => set
                    .iter()
                    .copied()
                    .filter(|p| !unknown.contains(p))
                    .collect(),
            }
        };
        v.allowed = Allowed::Only(set);
    }
    Some(out)
}
