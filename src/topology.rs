//! The host's CPU topology: which NUMA node, socket and core each pCPU belongs to, and its
//! hyperthread siblings, as libvirt describes them in its capabilities
//! (`<host><topology><cells><cell id><cpus><cpu id socket_id core_id siblings>`); and what a
//! domain's XML says of where its memory lives: the NUMA binding
//! (`<numatune><memory mode='strict' nodeset=…>`) and memory a balloon cannot give back.

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

/// The NUMA nodes a domain's memory is strictly bound to (`<numatune><memory mode='strict'
/// nodeset=…>`, strict being libvirt's default mode), from its XML; `None` when it is not bound,
/// or bound in another mode (`preferred`, `interleave`, `restrictive`), which lets it run anywhere.
pub fn strict_memory_nodes(domain_xml: &str) -> Option<Vec<u32>> {
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    let memory = doc.descendants().find(|n| {
        n.has_tag_name("memory") && n.parent().is_some_and(|p| p.has_tag_name("numatune"))
    })?;
    if memory.attribute("mode").is_some_and(|m| m != "strict") {
        return None;
    }
    cpuset::parse(memory.attribute("nodeset")?)
}

/// Is the domain's vCPU placement `auto` (`<vcpu placement='auto'>`), from its XML: libvirt asked
/// numad for the nodes to run it on, and numad owns its placement?
pub fn vcpu_placement_auto(domain_xml: &str) -> bool {
    roxmltree::Document::parse(domain_xml).is_ok_and(|doc| {
        doc.root_element()
            .children()
            .any(|n| n.has_tag_name("vcpu") && n.attribute("placement") == Some("auto"))
    })
}

/// Does the domain's balloon deflate on its own when the guest runs short
/// (`<memballoon autodeflate='on'>`, virtio-balloon's deflate-on-oom), from its XML? Such a guest
/// can grow back to its max memory without being asked, so the host must count it at its max.
pub fn balloon_autodeflates(domain_xml: &str) -> bool {
    roxmltree::Document::parse(domain_xml).is_ok_and(|doc| {
        doc.descendants()
            .any(|n| n.has_tag_name("memballoon") && n.attribute("autodeflate") == Some("on"))
    })
}

/// Why ballooning a domain down would free nothing on the host, from its XML: memory backed by
/// hugepages (`<memoryBacking><hugepages/>`) or locked (`<memoryBacking><locked/>`), a device
/// assigned with VFIO (`<hostdev>`, or `<interface type='hostdev'>`) or a vDPA device
/// (`<interface type='vdpa'>`), which pin all guest memory, or memory encrypted for the guest
/// (`<launchSecurity>`, AMD SEV), which the host pins too. `None` when none of these holds.
pub fn memory_held_by(domain_xml: &str) -> Option<&'static str> {
    fn child<'a, 'i>(
        parent: roxmltree::Node<'a, 'i>,
        tag: &str,
    ) -> Option<roxmltree::Node<'a, 'i>> {
        parent.children().find(|n| n.has_tag_name(tag))
    }
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    let domain = doc.root_element();
    if let Some(backing) = child(domain, "memoryBacking") {
        // Hugepages for some of the guest's NUMA cells only hold part of it (see
        // [`hugepages_held_kib`]).
        if child(backing, "hugepages").is_some() && hugepage_cells(domain).is_none() {
            return Some("backed by hugepages");
        }
        if child(backing, "locked").is_some() {
            return Some("locked");
        }
    }
    if child(domain, "launchSecurity").is_some() {
        return Some("encrypted for the guest (launchSecurity), which pins it");
    }
    let devices = child(domain, "devices")?;
    let interface_of = |kind: &str| {
        devices
            .children()
            .any(|n| n.has_tag_name("interface") && n.attribute("type") == Some(kind))
    };
    if child(devices, "hostdev").is_some() || interface_of("hostdev") {
        return Some("pinned by an assigned device (VFIO)");
    }
    interface_of("vdpa").then_some("pinned by a vDPA device")
}

/// A size in a domain XML element (`<memory unit='KiB'>1048576</memory>`), in KiB.
fn size_kib(node: roxmltree::Node, value: Option<&str>) -> Option<u64> {
    let n: u64 = value?.trim().parse().ok()?;
    let kib = match node.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => n / 1024,
        "k" | "KiB" => n,
        "KB" => n * 1000 / 1024,
        "M" | "MiB" => n << 10,
        "MB" => n * 1_000_000 / 1024,
        "G" | "GiB" => n << 20,
        "GB" => n * 1_000_000_000 / 1024,
        "T" | "TiB" => n << 30,
        _ => return None,
    };
    Some(kib)
}

/// The domain's max memory (`<memory>`), KiB, from its XML: what it may grow to, known without
/// asking its QEMU.
pub fn max_memory_kib(domain_xml: &str) -> Option<u64> {
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    let memory = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("memory"))?;
    size_kib(memory, memory.text())
}

/// The guest NUMA cells whose memory hugepages back, when `<hugepages>` names some cells only
/// (`<page size=… nodeset='0'/>`), with each such cell's memory in KiB; `None` when hugepages
/// back all of it (or there are none, or the cells cannot be told).
fn hugepage_cells(domain: roxmltree::Node) -> Option<Vec<(u32, u64)>> {
    let hugepages = domain
        .children()
        .find(|n| n.has_tag_name("memoryBacking"))?
        .children()
        .find(|n| n.has_tag_name("hugepages"))?;
    let mut nodes = Vec::new();
    let mut pages = 0;
    for page in hugepages.children().filter(|n| n.has_tag_name("page")) {
        pages += 1;
        nodes.extend(cpuset::parse(page.attribute("nodeset")?)?);
    }
    if pages == 0 {
        return None;
    }
    let cells: Vec<(u32, u64)> = domain
        .children()
        .find(|n| n.has_tag_name("cpu"))?
        .descendants()
        .filter(|n| n.has_tag_name("cell") && n.parent().is_some_and(|p| p.has_tag_name("numa")))
        .map(|c| {
            let id = c.attribute("id")?.parse().ok()?;
            Some((id, size_kib(c, c.attribute("memory"))?))
        })
        .collect::<Option<_>>()?;
    let held: Vec<(u32, u64)> = cells
        .iter()
        .copied()
        .filter(|(id, _)| nodes.contains(id))
        .collect();
    // Every cell backed: all of it is held.
    (held.len() < cells.len()).then_some(held)
}

/// Memory that hugepages hold when they back some of the guest's NUMA cells only, KiB, from its
/// XML (0 when none, or when they back all of it: see [`memory_held_by`]). A balloon shrunk into
/// it frees nothing on the host.
pub fn hugepages_held_kib(domain_xml: &str) -> u64 {
    roxmltree::Document::parse(domain_xml)
        .ok()
        .and_then(|doc| hugepage_cells(doc.root_element()))
        .map_or(0, |cells| cells.iter().map(|&(_, kib)| kib).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_vcpu_placement_is_numads() {
        assert!(vcpu_placement_auto(
            "<domain><vcpu placement='auto'>4</vcpu><numatune><memory placement='auto'/></numatune></domain>"
        ));
        assert!(!vcpu_placement_auto(
            "<domain><vcpu placement='static' cpuset='0-3'>4</vcpu></domain>"
        ));
        assert!(!vcpu_placement_auto("<domain><vcpu>4</vcpu></domain>"));
    }

    #[test]
    fn hugepages_on_some_guest_cells_hold_those_cells_only() {
        let numa = "<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/><cell id='1' cpus='1' memory='524288' unit='KiB'/></numa></cpu>";
        let with = |pages: &str| {
            format!(
                "<domain><memory unit='KiB'>1572864</memory><memoryBacking><hugepages>{pages}</hugepages></memoryBacking>{numa}</domain>"
            )
        };
        // Cell 1 only: half a GiB held, the rest balloons.
        let one = with("<page size='2048' unit='KiB' nodeset='1'/>");
        assert_eq!(memory_held_by(&one), None);
        assert_eq!(hugepages_held_kib(&one), 512 * 1024);
        // Both cells, or no nodeset: all of it.
        let both = with("<page size='2048' unit='KiB' nodeset='0-1'/>");
        assert_eq!(memory_held_by(&both), Some("backed by hugepages"));
        assert_eq!(hugepages_held_kib(&both), 0);
        let all = with("<page size='2048' unit='KiB'/>");
        assert_eq!(memory_held_by(&all), Some("backed by hugepages"));
        assert_eq!(max_memory_kib(&one), Some(1572864));
        assert_eq!(
            max_memory_kib("<domain><memory unit='GiB'>2</memory></domain>"),
            Some(2 << 20)
        );
        assert_eq!(max_memory_kib("<domain/>"), None);
    }

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

    #[test]
    fn memory_a_balloon_cannot_give_back() {
        let xml = |inner: &str| format!("<domain><name>d</name>{inner}</domain>");
        assert_eq!(
            memory_held_by(&xml("<memoryBacking><hugepages/></memoryBacking>")),
            Some("backed by hugepages")
        );
        assert_eq!(
            memory_held_by(&xml("<memoryBacking><locked/></memoryBacking>")),
            Some("locked")
        );
        let vfio = "<devices><hostdev mode='subsystem' type='pci' managed='yes'>\
                    <source><address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/></source>\
                    </hostdev></devices>";
        assert!(memory_held_by(&xml(vfio)).is_some_and(|r| r.contains("VFIO")));
        // A NIC assigned with VFIO, a vDPA NIC, SEV: all pin guest memory.
        let nic = |kind: &str| format!("<devices><interface type='{kind}'/></devices>");
        assert!(memory_held_by(&xml(&nic("hostdev"))).is_some_and(|r| r.contains("VFIO")));
        assert!(memory_held_by(&xml(&nic("vdpa"))).is_some_and(|r| r.contains("vDPA")));
        assert_eq!(memory_held_by(&xml(&nic("network"))), None);
        let sev = "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>";
        assert!(memory_held_by(&xml(sev)).is_some_and(|r| r.contains("launchSecurity")));
        assert_eq!(
            memory_held_by(&xml(
                "<memoryBacking><nosharepages/></memoryBacking><devices><memballoon model='virtio'/></devices>"
            )),
            None
        );
    }

    #[test]
    fn a_balloon_that_deflates_on_its_own_is_seen() {
        let xml = |balloon: &str| format!("<domain><devices>{balloon}</devices></domain>");
        assert!(balloon_autodeflates(&xml(
            "<memballoon model='virtio' autodeflate='on'/>"
        )));
        assert!(!balloon_autodeflates(&xml("<memballoon model='virtio'/>")));
        assert!(!balloon_autodeflates(&xml(
            "<memballoon model='virtio' autodeflate='off'/>"
        )));
    }

    #[test]
    fn only_strict_memory_binding_binds() {
        let xml = |tune: &str| format!("<domain><name>d</name>{tune}</domain>");
        assert_eq!(
            strict_memory_nodes(&xml(
                "<numatune><memory mode='strict' nodeset='1'/></numatune>"
            )),
            Some(vec![1])
        );
        assert_eq!(
            strict_memory_nodes(&xml("<numatune><memory nodeset='0-1'/></numatune>")),
            Some(vec![0, 1])
        );
        assert_eq!(
            strict_memory_nodes(&xml(
                "<numatune><memory mode='preferred' nodeset='1'/></numatune>"
            )),
            None
        );
        assert_eq!(strict_memory_nodes(&xml("")), None);
        // A <memory> elsewhere (the domain's size) is not a binding.
        assert_eq!(
            strict_memory_nodes(&xml("<memory unit='KiB'>1024</memory>")),
            None
        );
    }
}
