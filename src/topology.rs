//! The host's CPU topology: which NUMA node, socket and core each pCPU belongs to, and its
//! hyperthread siblings, as libvirt describes them in its capabilities
//! (`<host><topology><cells><cell id><cpus><cpu id socket_id core_id siblings>`). What a domain's
//! own XML says is read in [`crate::domain_xml`].

use std::collections::BTreeMap;

use crate::cpuset;

/// Where one pCPU sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPlace {
    /// NUMA node (cell).
    pub node: u32,
    /// Socket (package).
    pub socket: u32,
    /// Core within its socket.
    pub core: u32,
    /// The pCPUs sharing its core (itself included), sorted.
    pub siblings: Vec<u32>,
}

/// The host's CPU topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Every pCPU libvirt describes, by number.
    pub cpus: BTreeMap<u32, CpuPlace>,
    /// Each NUMA node's pCPUs, sorted (worked out once: the scheduler asks for every vCPU).
    by_node: BTreeMap<u32, Vec<u32>>,
    /// Each NUMA node's memory, KiB, where the capabilities say (`<cell><memory unit='KiB'>`).
    memory_kib: BTreeMap<u32, u64>,
}

impl Topology {
    /// Parse the `<capabilities>` XML of `virConnectGetCapabilities`. `None` when it describes no
    /// NUMA cell with CPUs (some drivers do not), or does not parse.
    pub fn from_capabilities(xml: &str) -> Option<Self> {
        let doc = roxmltree::Document::parse(xml).ok()?;
        let mut cpus = BTreeMap::new();
        let mut memory_kib = BTreeMap::new();
        let cells = doc.descendants().filter(|n| {
            n.has_tag_name("cell") && n.parent().is_some_and(|p| p.has_tag_name("cells"))
        });
        for cell in cells {
            let node: u32 = cell.attribute("id")?.parse().ok()?;
            let memory = cell
                .children()
                .find(|n| n.has_tag_name("memory"))
                .filter(|m| m.attribute("unit").is_none_or(|u| u == "KiB"))
                .and_then(|m| m.text()?.trim().parse::<u64>().ok());
            if let Some(kib) = memory {
                memory_kib.insert(node, kib);
            }
            for cpu in cell.descendants().filter(|n| n.has_tag_name("cpu")) {
                let id: u32 = cpu.attribute("id")?.parse().ok()?;
                let number = |name: &str| cpu.attribute(name).and_then(|v| v.parse().ok());
                let place = CpuPlace {
                    node,
                    socket: number("socket_id").unwrap_or(node),
                    core: number("core_id").unwrap_or(id),
                    siblings: cpu
                        .attribute("siblings")
                        .and_then(cpuset::parse)
                        .unwrap_or_else(|| vec![id]),
                };
                cpus.insert(id, place);
            }
        }
        if cpus.is_empty() {
            return None;
        }
        let mut by_node: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&cpu, place) in &cpus {
            by_node.entry(place.node).or_default().push(cpu);
        }
        Some(Self {
            cpus,
            by_node,
            memory_kib,
        })
    }

    /// The memory of NUMA node `node`, KiB, where the capabilities say.
    pub fn node_memory_kib(&self, node: u32) -> Option<u64> {
        self.memory_kib.get(&node).copied()
    }

    /// The NUMA node of pCPU `cpu`, where known.
    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        self.cpus.get(&cpu).map(|p| p.node)
    }

    /// The pCPUs of the nodes in `nodes`, sorted.
    pub fn cpus_of_nodes(&self, nodes: &[u32]) -> Vec<u32> {
        match nodes {
            [one] => self.cpus_of_node(*one).to_vec(),
            _ => self
                .cpus
                .iter()
                .filter(|(_, p)| nodes.contains(&p.node))
                .map(|(&cpu, _)| cpu)
                .collect(),
        }
    }

    /// The pCPUs of node `node`, sorted (none for a node it does not describe).
    pub fn cpus_of_node(&self, node: u32) -> &[u32] {
        self.by_node.get(&node).map_or(&[], Vec::as_slice)
    }

    /// The NUMA nodes, ascending.
    pub fn nodes(&self) -> Vec<u32> {
        self.by_node.keys().copied().collect()
    }

    /// The most hyperthreads any core has (1: no SMT).
    pub fn threads_per_core(&self) -> usize {
        self.cpus
            .values()
            .map(|p| p.siblings.len())
            .max()
            .unwrap_or(1)
    }

    /// One line for the log: nodes, sockets, cores and pCPUs, e.g. `2 NUMA nodes, 2 sockets, 32
    /// cores, 64 pCPUs (2 threads per core)`.
    pub fn summary(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let sockets: std::collections::BTreeSet<u32> =
            self.cpus.values().map(|p| p.socket).collect();
        let cores: std::collections::BTreeSet<(u32, u32)> =
            self.cpus.values().map(|p| (p.socket, p.core)).collect();
        let threads = self.threads_per_core();
        format!(
            "{}, {}, {}, {}{}",
            plural(self.by_node.len(), "NUMA node"),
            plural(sockets.len(), "socket"),
            plural(cores.len(), "core"),
            plural(self.cpus.len(), "pCPU"),
            if threads > 1 {
                format!(" ({threads} threads per core)")
            } else {
                String::new()
            }
        )
    }

    /// The hyperthread siblings among the `online` pCPUs: each core's online pCPUs, for the cores
    /// that have two or more, in ascending order of their first pCPU. Empty on a host without SMT.
    pub fn sibling_groups(&self, online: &[u32]) -> Vec<Vec<u32>> {
        let mut groups: Vec<Vec<u32>> = Vec::new();
        for &cpu in online {
            let Some(place) = self.cpus.get(&cpu) else {
                continue;
            };
            let group: Vec<u32> = place
                .siblings
                .iter()
                .copied()
                .filter(|s| online.binary_search(s).is_ok())
                .collect();
            // Listed once, at its first pCPU.
            if group.len() >= 2 && group[0] == cpu {
                groups.push(group);
            }
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn a_two_socket_smt_host() {
        let t = Topology::from_capabilities(&fixture("caps-2socket-smt.xml")).unwrap();
        assert_eq!(t.cpus.len(), 16);
        assert_eq!(t.nodes(), [0, 1]);
        // Node 1 holds socket 1's pCPUs 4-7 and their siblings 12-15.
        assert_eq!(t.cpus_of_nodes(&[1]), [4, 5, 6, 7, 12, 13, 14, 15]);
        let cpu5 = &t.cpus[&5];
        assert_eq!((cpu5.node, cpu5.socket, cpu5.core), (1, 1, 1));
        assert_eq!(cpu5.siblings, [5, 13]);
        assert_eq!(t.node_of(12), Some(1));
        assert_eq!(t.node_of(99), None);
        let online: Vec<u32> = (0..16).filter(|&p| p != 9).collect();
        let groups = t.sibling_groups(&online);
        // Eight cores, and core 1 of socket 0 has one thread left online.
        assert_eq!(groups.len(), 7);
        assert_eq!(groups[0], [0, 8]);
        assert_eq!(
            t.summary(),
            "2 NUMA nodes, 2 sockets, 8 cores, 16 pCPUs (2 threads per core)"
        );
        assert!(groups.iter().all(|g| !g.contains(&1) && !g.contains(&9)));
    }

    #[test]
    fn a_one_socket_host_and_a_driver_without_cells() {
        let t = Topology::from_capabilities(&fixture("caps-1socket.xml")).unwrap();
        assert_eq!(t.nodes(), [0]);
        assert_eq!(t.cpus.len(), 4);
        assert!(t.cpus.values().all(|p| p.siblings.len() == 1));
        assert!(t.sibling_groups(&[0, 1, 2, 3]).is_empty());
        assert_eq!(t.summary(), "1 NUMA node, 1 socket, 4 cores, 4 pCPUs");
        assert_eq!(
            Topology::from_capabilities("<capabilities><host><cpu/></host></capabilities>"),
            None
        );
        assert_eq!(Topology::from_capabilities("not xml"), None);
    }
}
