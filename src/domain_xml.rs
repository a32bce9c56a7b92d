//! What a domain's XML says that vmbalance acts on, read in one parse into [`DomainFacts`].
//!
//! The libvirt layer reads a domain's live XML (`virDomainGetXMLDesc`) once per run of the domain
//! and parses it here; the scheduler, the coordinator and the simulated host all share the typed
//! value. A new fact is one field of [`DomainFacts`] and one line of [`DomainFacts::parse`], with
//! a case in this file's tests.

use roxmltree::Node;

use crate::cpuset;

/// The XML namespace of vmbalance's element in a domain's metadata (`<metadata>`).
pub const METADATA_URI: &str = "http://vmbalance.org/xmlns/libvirt/1.0";

/// What a domain's XML says that vmbalance acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainFacts {
    /// The domain asks, in its vmbalance metadata, to be left alone (see [`crate::exclusions`]):
    /// `<policy exclude="yes"/>`.
    pub opted_out: bool,
    /// The memory its vmbalance metadata guarantees it (`<policy guaranteed-mib="1024"/>`, oVirt's
    /// "guaranteed memory"): no shrink goes under this, KiB (0: none).
    pub guaranteed_kib: u64,
    /// The NUMA nodes its memory is strictly bound to (`<numatune><memory mode='strict'
    /// nodeset=…>`, strict being libvirt's default mode); `None` when it is not bound, or bound in
    /// another mode (`preferred`, `interleave`, `restrictive`), which lets it run anywhere.
    pub memory_nodes: Option<Vec<u32>>,
    /// Why ballooning it down would free nothing on the host, where so: memory backed by
    /// hugepages or locked, a device assigned with VFIO or a vDPA device (which pin all guest
    /// memory), or memory encrypted for the guest (`<launchSecurity>`, which the host pins too).
    pub memory_held: Option<&'static str>,
    /// Memory hugepages hold when they back some of the guest's NUMA cells only, KiB (0 when
    /// none, or when they back all of it: then [`DomainFacts::memory_held`] says so). A balloon
    /// shrunk into it would free nothing on the host.
    pub held_kib: u64,
    /// Its max memory (`<memory>`), KiB: what it may grow to, known without asking its QEMU (so
    /// known of a domain that does not answer).
    pub max_kib: Option<u64>,
    /// Its balloon deflates on its own when the guest runs short (`<memballoon
    /// autodeflate='on'>`, deflate-on-oom): the guest may grow back to its max without being
    /// asked, so the host must count it at its max.
    pub autodeflate: bool,
    /// Its vCPU placement is `auto` (`<vcpu placement='auto'>`): libvirt asked numad where to run
    /// it, and numad owns its placement.
    pub auto_placement: bool,
}

impl DomainFacts {
    /// The facts of a domain's XML (as `virDomainGetXMLDesc` gives it); `None` when it is not XML
    /// with a root element.
    pub fn parse(domain_xml: &str) -> Option<Self> {
        let doc = roxmltree::Document::parse(domain_xml).ok()?;
        let domain = doc.root_element();
        let policy = metadata_policy(domain);
        let hugepage_cells = hugepage_cells(domain);
        Some(Self {
            opted_out: policy
                .and_then(|p| p.attribute("exclude"))
                .is_some_and(|v| matches!(v.trim(), "yes" | "true" | "1")),
            guaranteed_kib: policy
                .and_then(|p| p.attribute("guaranteed-mib"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(0, |mib| mib.min(1 << 40).saturating_mul(1024)),
            memory_nodes: strict_memory_nodes(domain),
            memory_held: memory_held_by(domain, hugepage_cells.is_some()),
            held_kib: hugepage_cells.map_or(0, |cells| cells.iter().map(|&(_, kib)| kib).sum()),
            max_kib: child(domain, "memory").and_then(|m| size_kib(m, m.text())),
            autodeflate: child(domain, "devices").is_some_and(|devices| {
                devices.children().any(|n| {
                    n.has_tag_name("memballoon") && n.attribute("autodeflate") == Some("on")
                })
            }),
            auto_placement: child(domain, "vcpu")
                .is_some_and(|v| v.attribute("placement") == Some("auto")),
        })
    }
}

/// The first child element of `parent` named `tag`.
fn child<'a, 'i>(parent: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    parent.children().find(|n| n.has_tag_name(tag))
}

/// vmbalance's own element in the domain's `<metadata>`: the child in [`METADATA_URI`]'s
/// namespace, whatever its prefix.
fn metadata_policy<'a, 'i>(domain: Node<'a, 'i>) -> Option<Node<'a, 'i>> {
    child(domain, "metadata")?
        .children()
        .find(|n| n.is_element() && n.tag_name().namespace() == Some(METADATA_URI))
}

/// See [`DomainFacts::memory_nodes`].
fn strict_memory_nodes(domain: Node) -> Option<Vec<u32>> {
    let memory = child(child(domain, "numatune")?, "memory")?;
    if memory.attribute("mode").is_some_and(|m| m != "strict") {
        return None;
    }
    cpuset::parse(memory.attribute("nodeset")?)
}

/// See [`DomainFacts::memory_held`]; `some_cells_hugepaged` when hugepages back some of the
/// guest's NUMA cells only (see [`DomainFacts::held_kib`]), which holds part of it.
fn memory_held_by(domain: Node, some_cells_hugepaged: bool) -> Option<&'static str> {
    if let Some(backing) = child(domain, "memoryBacking") {
        if child(backing, "hugepages").is_some() && !some_cells_hugepaged {
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
fn size_kib(node: Node, value: Option<&str>) -> Option<u64> {
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

/// The guest NUMA cells whose memory hugepages back, when `<hugepages>` names some cells only
/// (`<page size=… nodeset='0'/>`), with each such cell's memory in KiB; `None` when hugepages
/// back all of it (or there are none, or the cells cannot be told).
fn hugepage_cells(domain: Node) -> Option<Vec<(u32, u64)>> {
    let hugepages = child(child(domain, "memoryBacking")?, "hugepages")?;
    let mut nodes = Vec::new();
    let mut pages = 0;
    for page in hugepages.children().filter(|n| n.has_tag_name("page")) {
        pages += 1;
        nodes.extend(cpuset::parse(page.attribute("nodeset")?)?);
    }
    if pages == 0 {
        return None;
    }
    let cells: Vec<(u32, u64)> = child(domain, "cpu")?
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The facts of `<domain>inner</domain>`.
    fn facts(inner: &str) -> DomainFacts {
        DomainFacts::parse(&format!(
            "<domain type='kvm'><name>d</name>{inner}</domain>"
        ))
        .unwrap()
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn a_live_domain_xml_as_libvirt_writes_it() {
        let f = DomainFacts::parse(&fixture("domain-live.xml")).unwrap();
        assert_eq!(
            f,
            DomainFacts {
                opted_out: true,
                guaranteed_kib: 300 * 1024,
                memory_nodes: Some(vec![0]),
                memory_held: None,
                held_kib: 0,
                max_kib: Some(512 * 1024),
                autodeflate: true,
                auto_placement: false,
            }
        );
        // A plain domain asks for nothing and holds nothing.
        assert_eq!(
            facts("<memory unit='KiB'>1024</memory>"),
            DomainFacts {
                max_kib: Some(1024),
                ..DomainFacts::default()
            }
        );
        assert_eq!(DomainFacts::parse("not xml"), None);
    }

    #[test]
    fn metadata_asks_with_exclude_yes_and_guarantees_in_mib() {
        let meta = |policy: &str| {
            facts(&format!(
                "<metadata><vmb:policy xmlns:vmb='{METADATA_URI}' {policy}/></metadata>"
            ))
        };
        let f = meta("exclude='yes' guaranteed-mib='1024'");
        assert_eq!((f.opted_out, f.guaranteed_kib), (true, 1024 * 1024));
        assert!(meta("exclude='true'").opted_out);
        assert!(!meta("exclude='no'").opted_out);
        assert_eq!(meta("guaranteed-mib='lots'"), DomainFacts::default());
        // Another tool's element with the same attributes asks nothing of vmbalance.
        let other = facts("<metadata><x:policy xmlns:x='urn:other' exclude='yes'/></metadata>");
        assert!(!other.opted_out);
    }

    #[test]
    fn auto_vcpu_placement_is_numads() {
        assert!(
            facts("<vcpu placement='auto'>4</vcpu><numatune><memory placement='auto'/></numatune>")
                .auto_placement
        );
        assert!(!facts("<vcpu placement='static' cpuset='0-3'>4</vcpu>").auto_placement);
        assert!(!facts("<vcpu>4</vcpu>").auto_placement);
    }

    #[test]
    fn hugepages_on_some_guest_cells_hold_those_cells_only() {
        let numa = "<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/><cell id='1' cpus='1' memory='524288' unit='KiB'/></numa></cpu>";
        let with = |pages: &str| {
            facts(&format!(
                "<memory unit='KiB'>1572864</memory><memoryBacking><hugepages>{pages}</hugepages></memoryBacking>{numa}"
            ))
        };
        // Cell 1 only: half a GiB held, the rest balloons.
        let one = with("<page size='2048' unit='KiB' nodeset='1'/>");
        assert_eq!((one.memory_held, one.held_kib), (None, 512 * 1024));
        assert_eq!(one.max_kib, Some(1572864));
        // Both cells, or no nodeset: all of it.
        let both = with("<page size='2048' unit='KiB' nodeset='0-1'/>");
        assert_eq!(
            (both.memory_held, both.held_kib),
            (Some("backed by hugepages"), 0)
        );
        let all = with("<page size='2048' unit='KiB'/>");
        assert_eq!(all.memory_held, Some("backed by hugepages"));
        assert_eq!(
            facts("<memory unit='GiB'>2</memory>").max_kib,
            Some(2 << 20)
        );
        assert_eq!(facts("").max_kib, None);
    }

    #[test]
    fn memory_a_balloon_cannot_give_back() {
        let held = |inner: &str| facts(inner).memory_held;
        assert_eq!(
            held("<memoryBacking><hugepages/></memoryBacking>"),
            Some("backed by hugepages")
        );
        assert_eq!(
            held("<memoryBacking><locked/></memoryBacking>"),
            Some("locked")
        );
        let vfio = "<devices><hostdev mode='subsystem' type='pci' managed='yes'>\
                    <source><address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/></source>\
                    </hostdev></devices>";
        assert!(held(vfio).is_some_and(|r| r.contains("VFIO")));
        // A NIC assigned with VFIO, a vDPA NIC, SEV: all pin guest memory.
        let nic = |kind: &str| format!("<devices><interface type='{kind}'/></devices>");
        assert!(held(&nic("hostdev")).is_some_and(|r| r.contains("VFIO")));
        assert!(held(&nic("vdpa")).is_some_and(|r| r.contains("vDPA")));
        assert_eq!(held(&nic("network")), None);
        let sev = "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>";
        assert!(held(sev).is_some_and(|r| r.contains("launchSecurity")));
        assert_eq!(
            held(
                "<memoryBacking><nosharepages/></memoryBacking><devices><memballoon model='virtio'/></devices>"
            ),
            None
        );
    }

    #[test]
    fn a_balloon_that_deflates_on_its_own_is_seen() {
        let deflates = |balloon: &str| facts(&format!("<devices>{balloon}</devices>")).autodeflate;
        assert!(deflates("<memballoon model='virtio' autodeflate='on'/>"));
        assert!(!deflates("<memballoon model='virtio'/>"));
        assert!(!deflates("<memballoon model='virtio' autodeflate='off'/>"));
    }

    #[test]
    fn only_strict_memory_binding_binds() {
        let nodes = |inner: &str| facts(inner).memory_nodes;
        assert_eq!(
            nodes("<numatune><memory mode='strict' nodeset='1'/></numatune>"),
            Some(vec![1])
        );
        assert_eq!(
            nodes("<numatune><memory nodeset='0-1'/></numatune>"),
            Some(vec![0, 1])
        );
        assert_eq!(
            nodes("<numatune><memory mode='preferred' nodeset='1'/></numatune>"),
            None
        );
        assert_eq!(nodes(""), None);
        // A <memory> elsewhere (the domain's size) is not a binding.
        assert_eq!(nodes("<memory unit='KiB'>1024</memory>"), None);
    }
}
