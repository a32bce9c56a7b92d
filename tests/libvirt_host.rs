//! The libvirt layer against the real libvirt library, with its in-process test driver.

mod common;

use vmbalance::host::{DomainId, Host, HostError};
use vmbalance::libvirt::LibvirtHost;

fn host() -> LibvirtHost {
    LibvirtHost::connect(&common::test_uri("node.xml")).expect("test driver connects")
}

fn id_of(host: &mut LibvirtHost, name: &str) -> DomainId {
    host.active_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("{name} is listed"))
        .id
}

#[test]
fn lists_active_domains_by_uuid_and_skips_inactive_ones() {
    let mut h = host();
    // An inactive domain exists too; it must not be listed.
    h.connection()
        .define_domain_xml(
            "<domain type='test'><name>parked</name><memory>65536</memory><vcpu>1</vcpu>\
             <os><type>hvm</type></os></domain>",
        )
        .expect("define an inactive domain");
    let mut listed: Vec<(String, String)> = h
        .active_domains()
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.id.to_string()))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            (
                "batch".into(),
                "5eb0a7e5-0000-4000-8000-000000000003".into()
            ),
            ("db".into(), "5eb0a7e5-0000-4000-8000-000000000002".into()),
            ("web".into(), "5eb0a7e5-0000-4000-8000-000000000001".into()),
        ]
    );
}

#[test]
fn reads_node_cpus() {
    let mut h = host();
    let node = h.node_cpus().unwrap();
    assert!(!node.online.is_empty());
    assert!(node.online.iter().all(|&p| p < node.present));
    assert!(node.online.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn reads_every_vcpu_with_its_affinity() {
    let mut h = host();
    let present = h.node_cpus().unwrap().present;
    let db = id_of(&mut h, "db");
    let vcpus = h.vcpus(&db).expect("db is running");
    assert_eq!(
        vcpus.iter().map(|v| v.number).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // vCPU 0 is pinned to pCPU 2 in the node file; the others may run anywhere.
    assert_eq!(vcpus[0].affinity, vec![2]);
    for v in &vcpus[1..] {
        assert_eq!(v.affinity, (0..present.min(4)).collect::<Vec<_>>());
    }
    assert!(vcpus.iter().all(|v| v.cpu_time_ns > 0));
}

#[test]
fn pin_round_trip() {
    let mut h = host();
    let web = id_of(&mut h, "web");
    let online = h.node_cpus().unwrap().online;
    for &pcpu in &online {
        h.pin_vcpu(&web, 1, pcpu).unwrap();
        let vcpus = h.vcpus(&web).unwrap();
        assert_eq!(vcpus[1].affinity, vec![pcpu]);
        // The other vCPU is untouched.
        assert!(vcpus[0].affinity.len() > 1);
    }
}

#[test]
fn a_vanished_domain_is_its_own_kind_of_error() {
    let mut h = host();
    let batch = id_of(&mut h, "batch");
    h.connection()
        .lookup_domain_by_name("batch")
        .unwrap()
        .destroy()
        .unwrap();
    // Listed a moment ago, stopped now: reads and pins skip it.
    let vanished =
        |id: DomainId| move |e: HostError| matches!(e, HostError::Vanished(v) if v == id);
    assert!(h.vcpus(&batch).is_err_and(vanished(batch)));
    assert!(h.pin_vcpu(&batch, 0, 0).is_err_and(vanished(batch)));
    // A UUID libvirt never knew behaves the same.
    let unknown = DomainId([0xab; 16]);
    assert!(h.vcpus(&unknown).is_err_and(vanished(unknown)));
    assert!(h.pin_vcpu(&unknown, 0, 0).is_err_and(vanished(unknown)));
    assert_eq!(h.active_domains().unwrap().len(), 2);
}

#[test]
fn unreachable_uri_is_one_clear_error() {
    let uri = "test:///no/such/dir/node.xml";
    let err = LibvirtHost::connect(uri).err().expect("must fail");
    let text = format!("{err:#}");
    assert!(text.contains(uri), "{text}");
    assert!(!text.contains('\n'), "{text}");
}

#[test]
fn reads_balloon_stats() {
    let mut h = host();
    let web = id_of(&mut h, "web");
    let stats = h.balloon_stats(&web).expect("web is running");
    assert_eq!(stats.actual_kib, 524288);
    assert_eq!(stats.max_kib, 1048576);
    // The test driver's guest figures are fake but present and self-consistent.
    let unused = stats.unused_kib.expect("unused");
    assert!(unused <= stats.actual_kib);
    assert!(stats.mem_total_kib.is_some() && stats.last_update.is_some());
}

#[test]
fn balloon_resize_round_trip_and_error_above_max() {
    let mut h = host();
    let web = id_of(&mut h, "web");
    h.enable_balloon_stats(&web, 3).unwrap();
    for kib in [600 * 1024, 300 * 1024, 1048576] {
        h.set_balloon(&web, kib).unwrap();
        assert_eq!(h.balloon_stats(&web).unwrap().actual_kib, kib);
    }
    let err = h.set_balloon(&web, 1048576 + 1024).unwrap_err();
    assert!(matches!(err, HostError::Other(_)), "{err:?}");
    assert!(format!("{err:#}").contains("max memory"), "{err:#}");
    assert_eq!(h.balloon_stats(&web).unwrap().actual_kib, 1048576);
}

#[test]
fn a_domain_without_balloon_refuses_stats() {
    let mut h = host();
    let batch = id_of(&mut h, "batch");
    let err = h.enable_balloon_stats(&batch, 3).unwrap_err();
    assert!(format!("{err:#}").contains("balloon"), "{err:#}");
}

#[test]
fn memory_calls_on_a_vanished_domain_are_skipped() {
    let mut h = host();
    let web = id_of(&mut h, "web");
    h.connection()
        .lookup_domain_by_name("web")
        .unwrap()
        .destroy()
        .unwrap();
    let vanished = |e: HostError| matches!(e, HostError::Vanished(v) if v == web);
    assert!(h.balloon_stats(&web).is_err_and(vanished));
    assert!(h.set_balloon(&web, 300 * 1024).is_err_and(vanished));
    assert!(h.enable_balloon_stats(&web, 3).is_err_and(vanished));
}

#[test]
fn host_memory_is_unsupported_where_the_driver_cannot_tell() {
    // The test driver does not implement virNodeGetMemoryStats.
    let err = host().host_memory().unwrap_err();
    assert!(matches!(err, HostError::Unsupported(_)), "{err:?}");
}

#[test]
fn the_configured_affinity_is_read_and_our_live_pins_leave_it_alone() {
    let mut h = host();
    let db = id_of(&mut h, "db");
    // db's configuration pins vCPU 0 to pCPU 2; the others may run anywhere.
    let vcpus = h.vcpus(&db).unwrap();
    assert_eq!(vcpus[0].configured, Some(vec![2]));
    let anywhere = vcpus[1].configured.clone().expect("db is persistent");
    assert!(anywhere.len() >= 2, "{anywhere:?}");
    // Our pins are live only: the configuration stays the admin's word.
    h.pin_vcpu(&db, 1, 0).unwrap();
    let dom = h.connection().lookup_domain_by_name("db").unwrap();
    let config = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).unwrap();
    assert!(!config.contains("vcpupin vcpu='1'"), "{config}");
    let mut again = host();
    let db = id_of(&mut again, "db");
    assert_eq!(again.vcpus(&db).unwrap()[1].configured, Some(anywhere));
}

#[test]
fn a_domain_restarted_under_its_uuid_is_read_afresh() {
    let mut h = host();
    set_vmbalance_metadata(&h, "db", "<policy exclude=\"yes\"/>");
    let find = |h: &mut LibvirtHost| {
        h.active_domains()
            .unwrap()
            .into_iter()
            .find(|d| d.name == "db")
            .expect("db is running")
    };
    let first = find(&mut h);
    assert!(first.facts.opted_out);
    assert_eq!(h.vcpus(&first.id).unwrap()[0].configured, Some(vec![2]));
    // The configuration moves vCPU 0 to pCPU 1: read once per run, so this run keeps pCPU 2.
    let dom = h.connection().lookup_domain_by_name("db").unwrap();
    let config = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).unwrap();
    let moved = config.replace(
        "<vcpupin vcpu='0' cpuset='2'/>",
        "<vcpupin vcpu='0' cpuset='1'/>",
    );
    assert_ne!(moved, config, "{config}");
    h.connection().define_domain_xml(&moved).unwrap();
    assert_eq!(h.vcpus(&first.id).unwrap()[0].configured, Some(vec![2]));
    // Destroyed and started again between two listings: a new run under the same UUID, whose
    // facts (its live metadata went with the old run) and configuration are read afresh.
    dom.destroy().unwrap();
    dom.create().unwrap();
    let second = find(&mut h);
    assert_eq!(second.id, first.id);
    assert_ne!(second.run, first.run);
    assert!(!second.facts.opted_out, "{second:?}");
    assert_eq!(h.vcpus(&second.id).unwrap()[0].configured, Some(vec![1]));
}

/// Set the vmbalance metadata element of domain `name` (live), as `virsh metadata` does.
fn set_vmbalance_metadata(h: &LibvirtHost, name: &str, xml: &str) {
    let dom = h.connection().lookup_domain_by_name(name).unwrap();
    dom.set_metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(xml),
        Some("vmbalance"),
        Some(vmbalance::domain_xml::METADATA_URI),
        virt::sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .unwrap();
}

#[test]
fn a_domain_opts_out_in_its_metadata() {
    let mut h = host();
    set_vmbalance_metadata(&h, "web", "<policy exclude=\"yes\"/>");
    let listed = h.active_domains().unwrap();
    let opted: Vec<(&str, bool)> = listed
        .iter()
        .map(|d| (d.name.as_str(), d.facts.opted_out))
        .collect();
    assert!(opted.contains(&("web", true)), "{opted:?}");
    assert!(opted.contains(&("db", false)), "{opted:?}");
    // The per-domain sampling path carries it too.
    let samples = h.sample_vcpus().unwrap();
    let web = samples.iter().find(|s| s.domain.name == "web").unwrap();
    assert!(web.domain.facts.opted_out);
}

#[test]
fn a_domain_is_guaranteed_memory_in_its_metadata() {
    let mut h = host();
    set_vmbalance_metadata(&h, "db", "<policy guaranteed-mib=\"300\"/>");
    // The balloon path (the memory coordinator's) carries it.
    let samples = h.sample_balloons().unwrap();
    let guaranteed: Vec<(&str, u64, bool)> = samples
        .iter()
        .map(|s| {
            let d = &s.domain;
            (d.name.as_str(), d.facts.guaranteed_kib, d.facts.opted_out)
        })
        .collect();
    assert!(
        guaranteed.contains(&("db", 300 * 1024, false)),
        "{guaranteed:?}"
    );
    assert!(guaranteed.contains(&("web", 0, false)), "{guaranteed:?}");
}

#[test]
fn the_topology_comes_from_the_capabilities() {
    // test:///default describes two NUMA cells of 8 pCPUs; the custom node file none.
    let mut h = LibvirtHost::connect("test:///default").unwrap();
    let t = h.topology().unwrap().expect("test:///default has cells");
    assert_eq!(t.nodes(), [0, 1]);
    assert_eq!(t.node_of(3), Some(0));
    assert_eq!(t.node_of(9), Some(1));
    assert_eq!(host().topology().unwrap(), None);
}

#[test]
fn a_transient_domain_restarted_under_the_same_uuid_starts_fresh_in_the_scheduler() {
    use vmbalance::scheduler::{Scheduler, SchedulerConfig};
    let mut h = host();
    let xml = |cpuset: &str| {
        format!(
            "<domain type='test'><name>eph</name><uuid>5eb0a7e5-0000-4000-8000-0000000000ee</uuid>\
             <memory>65536</memory><vcpu cpuset='{cpuset}'>1</vcpu><os><type>hvm</type></os></domain>"
        )
    };
    // A transient domain (no persistent configuration) first seen free to run on pCPUs 0-4.
    let dom = h
        .connection()
        .create_domain_xml(&xml("0-4"), 0)
        .expect("create a transient domain");
    let id = id_of(&mut h, "eph");
    // The test driver's vCPUs are idle: at threshold 0 they are pinned all the same (rule 1).
    let mut sched = Scheduler::new(SchedulerConfig {
        policy: vmbalance::cpu_plan::CpuPolicy {
            threshold: 0.0,
            ..Default::default()
        },
        ..SchedulerConfig::default()
    });
    for _ in 0..2 {
        sched.cycle(&mut h).unwrap();
    }
    let affinity = |h: &mut LibvirtHost| h.vcpus(&id).unwrap()[0].affinity.clone();
    assert_eq!(affinity(&mut h).len(), 1, "pinned to one pCPU");
    // Destroyed and created again under the same UUID, its admin now allowing pCPU 4 only.
    dom.destroy().expect("destroy");
    h.connection()
        .create_domain_xml(&xml("4"), 0)
        .expect("create again");
    for _ in 0..2 {
        sched.cycle(&mut h).unwrap();
    }
    assert_eq!(
        affinity(&mut h),
        [4],
        "moved out of what its new run allows"
    );
    // Restored to what its new run was first seen with, not its old run's.
    sched.restore(&mut h);
    assert_eq!(affinity(&mut h), [4]);
}

#[test]
fn each_numa_nodes_memory_and_a_guests_binding_come_from_the_two_node_host() {
    // test:///default describes two cells: 2 GiB and 4 GiB.
    let mut h = LibvirtHost::connect("test:///default").unwrap();
    let nodes = h.node_memory().unwrap();
    let totals: Vec<(u32, u64)> = nodes.iter().map(|n| (n.node, n.total_kib)).collect();
    assert_eq!(totals, [(0, 2 << 20), (1, 4 << 20)]);
    assert!(
        nodes
            .iter()
            .all(|n| n.free_kib > 0 && n.free_kib <= n.total_kib),
        "{nodes:?}"
    );
    // A guest strictly bound to node 1, one preferring node 0 (it may run anywhere), one free.
    for (name, n, numatune) in [
        (
            "bound",
            'b',
            "<numatune><memory mode='strict' nodeset='1'/></numatune>",
        ),
        (
            "prefers",
            'c',
            "<numatune><memory mode='preferred' nodeset='0'/></numatune>",
        ),
        ("free", 'd', ""),
    ] {
        let xml = format!(
            "<domain type='test'><name>{name}</name><uuid>5eb0a7e5-0000-4000-8000-00000000000{n}</uuid>\
             <memory>65536</memory><vcpu>1</vcpu>{numatune}<os><type>hvm</type></os></domain>"
        );
        h.connection()
            .create_domain_xml(&xml, 0)
            .expect("create a transient domain");
    }
    let domains = h.active_domains().unwrap();
    let binding = |name: &str| {
        domains
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.facts.memory_nodes.clone())
            .unwrap()
    };
    assert_eq!(binding("bound"), Some(vec![1]));
    assert_eq!(binding("prefers"), None);
    assert_eq!(binding("free"), None);
    // Each one's max memory comes from its definition, known without asking its QEMU.
    assert!(
        domains
            .iter()
            .filter(|d| d.name != "test")
            .all(|d| d.facts.max_kib == Some(65536))
    );
    // Hugepages backing one of a guest's two NUMA cells hold that cell only: it is managed,
    // never shrunk into the held half.
    let xml = "<domain type='test'><name>half-huge</name><uuid>5eb0a7e5-0000-4000-8000-0000000000ff</uuid>\
               <memory unit='KiB'>65536</memory><vcpu>2</vcpu>\
               <memoryBacking><hugepages><page size='2048' unit='KiB' nodeset='1'/></hugepages></memoryBacking>\
               <cpu><numa><cell id='0' cpus='0' memory='32768' unit='KiB'/><cell id='1' cpus='1' memory='32768' unit='KiB'/></numa></cpu>\
               <os><type>hvm</type></os></domain>";
    h.connection()
        .create_domain_xml(xml, 0)
        .expect("create a half-hugepage domain");
    let half = h
        .active_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == "half-huge")
        .unwrap();
    assert_eq!((half.facts.memory_held, half.facts.held_kib), (None, 32768));
    // A host of one node (the custom node file describes none) has no node figures: its one
    // budget says it all.
    assert!(host().node_memory().unwrap().is_empty());
}
