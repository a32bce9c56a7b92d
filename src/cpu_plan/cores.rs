//! Rules 9 and 10 in the planner's form: which pCPUs share a core (hyperthread siblings) and which
//! make a NUMA node, and the scopes a step works in.

use super::PcpuIndex;
use crate::sampling::CpuSnapshot;

/// How much of a hyperthread sibling's load counts in a pCPU's effective load (rule 10). Two
/// busy threads of one core each run at a little more than half the speed of a thread alone
/// (SMT yields some 10-30 % more work per core than one thread, not 100 %), so a pCPU whose
/// sibling is busy is taken as half busy already: a vCPU goes to a free core before it goes to
/// the idle sibling of a busy pCPU, and to that idle sibling before it doubles up on a busy
/// thread.
pub(super) const SIBLING_SHARE: f64 = 0.5;

/// Which pairs of pCPUs a step works on (rule 9): each NUMA node is balanced on its own, then,
/// where vCPUs may leave their node, the nodes against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// Both pCPUs in this node.
    Node(u32),
    /// The two pCPUs in different nodes.
    Across,
}

/// Which pCPUs share a core (rule 10) and a NUMA node (rule 9), by pCPU index.
pub(super) struct Cores {
    /// Per pCPU: the index of its core.
    pub(super) core_of: Vec<usize>,
    /// Per core: its pCPUs when it has two or more, else empty (a core of one pCPU has no
    /// sibling to account for).
    pub(super) threads: Vec<Vec<usize>>,
    /// Per pCPU: its NUMA node (all 0 where the host does not describe its nodes).
    pub(super) node_of: Vec<u32>,
    /// How many NUMA nodes (1 where the host does not describe them).
    pub(super) nodes: u32,
}

impl Cores {
    /// Rule 10: which online pCPUs share a core, and rule 9: which make a NUMA node, by index.
    pub(super) fn of(snapshot: &CpuSnapshot, index: &PcpuIndex) -> Self {
        let pcpus = &snapshot.pcpus;
        let groups = snapshot
            .cores
            .iter()
            .map(|group| {
                let mut g: Vec<usize> = group.iter().filter_map(|&p| index.of(p)).collect();
                g.sort_unstable();
                g.dedup();
                g
            })
            .collect();
        let mut node_of = vec![0; pcpus.len()];
        for (n, node) in snapshot.nodes.iter().enumerate() {
            for i in node.iter().filter_map(|&p| index.of(p)) {
                node_of[i] = n as u32;
            }
        }
        Self::new(pcpus.len(), groups, node_of)
    }

    /// `pcpus` pCPUs, each a core of its own but for the `groups` of sibling indices (sorted),
    /// in NUMA nodes as `node_of` says.
    fn new(pcpus: usize, groups: Vec<Vec<usize>>, node_of: Vec<u32>) -> Self {
        let mut core_of: Vec<usize> = (0..pcpus).collect();
        let mut threads: Vec<Vec<usize>> = vec![Vec::new(); pcpus];
        let mut taken = vec![false; pcpus];
        for group in groups {
            // A pCPU belongs to one core: a group that names one twice, or one already placed,
            // is not a core.
            if group.len() < 2
                || group
                    .iter()
                    .any(|&p| std::mem::replace(&mut taken[p], true))
            {
                continue;
            }
            let core = group[0];
            for &p in &group {
                core_of[p] = core;
            }
            threads[core] = group;
        }
        let nodes = node_of.iter().max().map_or(1, |&n| n + 1);
        Self {
            core_of,
            threads,
            node_of,
            nodes,
        }
    }
}
