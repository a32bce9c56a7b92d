//! Observe: what the daemons need to know about a hypervisor host, and the two things they change.
//!
//! The [`Host`] trait is the only door to the hypervisor. [`crate::libvirt::LibvirtHost`] is the
//! real implementation; tests and benchmarks implement it with a simulated host. Domains are keyed by
//! UUID ([`DomainId`]), never by their position in a listing, so a domain that restarts or a listing
//! that changes order between two samples cannot be confused with another one.

use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use crate::domain_xml::DomainFacts;
use crate::topology::Topology;

/// A domain's UUID: the stable key of a guest across samples.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub [u8; 16]);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl DomainId {
    /// Parse a UUID as libvirt writes it (`6695eb01-f6a4-8304-79aa-97f2502e193f`, dashes optional).
    pub fn parse(text: &str) -> Option<Self> {
        let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
        if hex.len() != 32 || text.len() - hex.len() > 4 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl serde::Serialize for DomainId {
    /// As its UUID string, the way libvirt and `virsh` write it.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DomainId {
    /// From its UUID string.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("'{text}' is not a domain UUID")))
    }
}

impl fmt::Debug for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An active domain as listed by the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRef {
    /// Stable key.
    pub id: DomainId,
    /// Human-readable name, for logs.
    pub name: String,
    /// What its XML says (read once per run of the domain).
    pub facts: DomainFacts,
    /// Which run of the domain this is (libvirt's domain ID, new at every start), where known: a
    /// domain that restarted under the same UUID starts new series.
    pub run: Option<u32>,
}

impl DomainRef {
    /// Domain `id` named `name`, with nothing more known of it.
    pub fn new(id: DomainId, name: &str) -> Self {
        Self {
            id,
            name: name.to_string(),
            facts: DomainFacts::default(),
            run: None,
        }
    }
}

/// One vCPU of a running domain, as read at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuInfo {
    /// vCPU number inside the guest.
    pub number: u32,
    /// Cumulative CPU time consumed by this vCPU, in nanoseconds.
    pub cpu_time_ns: u64,
    /// The pCPU it last ran on, if the hypervisor reports one.
    pub last_pcpu: Option<u32>,
    /// The pCPUs it may run on (its affinity), sorted ascending.
    pub affinity: Vec<u32>,
    /// Cumulative time, in nanoseconds, it was runnable but waiting for a pCPU (the host run
    /// queue delay the guest sees as steal time), where the hypervisor reports it.
    pub delay_ns: Option<u64>,
    /// The pCPUs the domain's persistent configuration allows it (`<vcpupin>`, `<vcpu cpuset>`),
    /// sorted; `None` where there is none (a transient domain) or the driver cannot tell.
    pub configured: Option<Vec<u32>>,
}

/// The host's physical CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCpus {
    /// Number of pCPUs present (online or not); bitmaps are sized from this.
    pub present: u32,
    /// pCPUs that are online, sorted ascending. Only these may be pinned to.
    pub online: Vec<u32>,
}

/// A domain's balloon and the guest's own memory figures, in KiB, read at one instant.
///
/// The guest figures come from its balloon driver and exist only once a stats period is set; until
/// the guest has posted a report since then they are stale (see [`BalloonStats::last_update`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Current balloon size: the memory the guest has now.
    pub actual_kib: u64,
    /// The most the balloon may give the guest (the domain's max memory).
    pub max_kib: u64,
    /// Memory the guest leaves completely unused (its MemFree; libvirt's `unused`).
    pub unused_kib: Option<u64>,
    /// Memory the guest sees in total (its MemTotal; libvirt's `available`).
    pub mem_total_kib: Option<u64>,
    /// Memory the guest could use without swapping (its MemAvailable; libvirt's `usable`).
    pub mem_available_kib: Option<u64>,
    /// Guest timestamp, in seconds, of the report these figures come from.
    pub last_update: Option<u64>,
    /// The host's own figure: memory the domain's QEMU process has resident on the host (libvirt's
    /// `rss`), where the driver reports it. Every other figure here is the guest's claim.
    pub rss_kib: Option<u64>,
}

impl BalloonStats {
    /// Memory the guest can still use (rule 1 of [`crate::mem_plan`]): its MemAvailable
    /// (`usable`) when it reports one, else its MemFree (`unused`). MemFree overstates it: a
    /// ballooned-down guest can show tens of MiB free that sit in reserves it cannot allocate.
    pub fn free_kib(&self) -> Option<u64> {
        self.mem_available_kib.or(self.unused_kib)
    }
}

/// The host's memory, summed over all NUMA cells, in KiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostMemory {
    /// Physical memory.
    pub total_kib: u64,
    /// Memory the host can give: what the kernel can hand out (the host's MemAvailable where it
    /// is known, see the libvirt layer), not memory merely cached or shared.
    pub available_kib: u64,
    /// The share of the last 10 s some task on the host stalled waiting for memory, in % (the
    /// kernel's pressure stall information, `some avg10` of `/proc/pressure/memory`), where the
    /// host is this machine and its kernel reports it.
    pub stalled_pct: Option<f64>,
}

impl HostMemory {
    /// `total_kib` of memory, `available_kib` of it available, pressure unknown.
    pub fn new(total_kib: u64, available_kib: u64) -> Self {
        Self {
            total_kib,
            available_kib,
            stalled_pct: None,
        }
    }
}

/// One NUMA node's memory, KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeMemory {
    /// The node (libvirt's cell id).
    pub node: u32,
    /// Its physical memory.
    pub total_kib: u64,
    /// What it has free (the node's MemFree: page cache the kernel could reclaim is not counted,
    /// which errs on the safe side).
    pub free_kib: u64,
}

/// Why a call to the host failed. The daemons act on the kind: a vanished domain is skipped, a
/// lost connection is re-opened, an unsupported call is worked around, a refused one (lost rights)
/// ends the daemon, anything else is retried at the next period.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The domain stopped or was undefined since it was listed: a normal event on a live host.
    #[error("domain {0} stopped or vanished")]
    Vanished(DomainId),
    /// The domain did not answer in time (busy in a libvirt job, or its QEMU stopped or hung):
    /// skipped until it does, the others going on.
    #[error("domain {0} does not answer")]
    Stuck(DomainId),
    /// The hypervisor's daemon did not answer a host-wide call in time (hung, or stopped): the
    /// cycle is given up, and the next one tries again.
    #[error("{0}")]
    NotAnswering(String),
    /// The connection to the hypervisor is down (the message says why); [`Host::reconnect`] may
    /// bring it back.
    #[error("{0}")]
    Disconnected(String),
    /// This hypervisor driver does not offer the call (the message says which).
    #[error("{0}")]
    Unsupported(String),
    /// The hypervisor refused the call for lack of rights (the message says which): the daemon's
    /// user lost the permission it needs.
    #[error("{0}")]
    Denied(String),
    /// Any other failure, with what was being done.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl HostError {
    /// As an operator-facing error: the message of [`HostError::Other`] keeps its context chain.
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            HostError::Other(e) => e,
            e => anyhow::Error::new(e),
        }
    }
}

/// The result of a call to the host.
pub type HostResult<T> = Result<T, HostError>;

/// One active domain's vCPUs, read at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuSample {
    /// The domain.
    pub domain: DomainRef,
    /// Its online vCPUs.
    pub vcpus: Vec<VcpuInfo>,
    /// When they were read.
    pub at: Instant,
}

/// One active domain's balloon figures, read at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct BalloonSample {
    /// The domain.
    pub domain: DomainRef,
    /// Its balloon and guest memory figures.
    pub stats: BalloonStats,
    /// When they were read.
    pub at: Instant,
}

/// A hypervisor host, as the daemons see it.
///
/// Every call says how it failed with a [`HostError`]: a domain that stopped or vanished since it
/// was listed is [`HostError::Vanished`] (a normal event on a live host, skipped), a lost
/// connection is [`HostError::Disconnected`] (the daemon calls [`Host::reconnect`] and carries on
/// with its state), a call the driver lacks is [`HostError::Unsupported`].
pub trait Host {
    /// Active (running or paused) domains, in no particular order.
    fn active_domains(&mut self) -> HostResult<Vec<DomainRef>>;

    /// Every online vCPU of a domain: cumulative CPU time, last pCPU and affinity.
    fn vcpus(&mut self, domain: &DomainId) -> HostResult<Vec<VcpuInfo>>;

    /// The host's present and online pCPUs.
    fn node_cpus(&mut self) -> HostResult<NodeCpus>;

    /// The host's CPU topology (NUMA nodes, sockets, cores, siblings); `None` where the driver
    /// does not describe it.
    fn topology(&mut self) -> HostResult<Option<Topology>> {
        Ok(None)
    }

    /// Let one vCPU of a running domain run on the pCPUs `cpus` only (its live affinity; the
    /// persistent configuration is left as it is).
    fn set_affinity(&mut self, domain: &DomainId, vcpu: u32, cpus: &[u32]) -> HostResult<()>;

    /// Pin one vCPU of a running domain to exactly one pCPU.
    fn pin_vcpu(&mut self, domain: &DomainId, vcpu: u32, pcpu: u32) -> HostResult<()> {
        self.set_affinity(domain, vcpu, &[pcpu])
    }

    /// The vCPUs of every active domain. The default reads them domain by domain; a host that can
    /// read them all in one call overrides it. Domains that vanish while being read are left
    /// out; one that cannot be read is left out with a warning.
    fn sample_vcpus(&mut self) -> HostResult<Vec<VcpuSample>> {
        vcpus_domain_by_domain(self)
    }

    /// The balloon figures of every active domain, like [`Host::sample_vcpus`].
    fn sample_balloons(&mut self) -> HostResult<Vec<BalloonSample>> {
        balloons_domain_by_domain(self)
    }

    /// The balloon and guest memory figures of a domain.
    fn balloon_stats(&mut self, domain: &DomainId) -> HostResult<BalloonStats>;

    /// Ask the guest's balloon driver to report memory figures every `period_secs` seconds.
    /// Fails when the domain has no balloon device.
    fn enable_balloon_stats(&mut self, domain: &DomainId, period_secs: u32) -> HostResult<()>;

    /// Set the balloon of a running domain to `kib`.
    fn set_balloon(&mut self, domain: &DomainId, kib: u64) -> HostResult<()>;

    /// The host's total and available memory over all NUMA cells ([`HostError::Unsupported`]
    /// when the driver cannot tell).
    fn host_memory(&mut self) -> HostResult<HostMemory>;

    /// Each NUMA node's memory, on a host of two nodes or more (empty on one node, where
    /// [`Host::host_memory`] says it all, and where the driver cannot tell).
    fn node_memory(&mut self) -> HostResult<Vec<NodeMemory>> {
        Ok(Vec::new())
    }

    /// Open the connection to the hypervisor again after [`HostError::Disconnected`]. What the
    /// host learnt through the old connection is forgotten; the daemons' own state is not here.
    fn reconnect(&mut self) -> HostResult<()>;

    /// Does numad, which places processes on NUMA nodes by re-pinning them, run on the host?
    /// (`false` where it cannot be told, as on a remote host.)
    fn numad_running(&mut self) -> bool {
        false
    }

    /// Wait at most `deadline` for each call that may wait on a domain's QEMU from now on (the
    /// period changed); a host whose calls never wait ignores it.
    fn set_call_deadline(&mut self, _deadline: std::time::Duration) {}

    /// A cycle begins: from now on its calls together wait at most one call deadline, however
    /// many domains do not answer.
    fn begin_cycle(&mut self) {}

    /// Forget what is read once per domain (its configured affinity, its metadata, its pins), so
    /// the next sample reads it again: the operator changed something (SIGHUP).
    fn reload(&mut self) {}

    /// The active domains left out of the last sample because they did not answer in time (busy
    /// in a libvirt job, or their QEMU stopped or hung): the daemons keep what they know of them.
    fn stuck_domains(&self) -> Vec<DomainRef> {
        Vec::new()
    }

    /// Hypervisor API calls made so far, for cost reports (0 where not counted).
    fn api_calls(&self) -> u64 {
        0
    }

    /// The host's monotonic clock, which rates are measured against. A simulated host overrides
    /// it with simulated time.
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Read one domain's figures with `read`: a domain that vanished, does not answer or cannot be
/// read is `None` (the host says which once; here a debug line); none stops the cycle. A lost
/// connection, or a hypervisor that does not answer at all, does.
pub fn read_or_skip<T>(domain: &DomainRef, read: HostResult<T>) -> HostResult<Option<T>> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(HostError::Vanished(_)) => {
            log::debug!("domain {} stopped while being read; skipped", domain.name);
            Ok(None)
        }
        Err(HostError::Stuck(_)) => {
            log::debug!("domain {} does not answer; skipped", domain.name);
            Ok(None)
        }
        Err(e @ (HostError::Disconnected(_) | HostError::NotAnswering(_))) => Err(e),
        Err(e) => {
            log::debug!("domain {}: {e:#}; skipped this cycle", domain.name);
            Ok(None)
        }
    }
}

/// [`Host::sample_vcpus`] the slow way: list, then read each domain.
pub fn vcpus_domain_by_domain<H: Host + ?Sized>(host: &mut H) -> HostResult<Vec<VcpuSample>> {
    domain_by_domain(host, H::vcpus, |domain, vcpus, at| VcpuSample {
        domain,
        vcpus,
        at,
    })
}

/// [`Host::sample_balloons`] the slow way: list, then read each domain.
pub fn balloons_domain_by_domain<H: Host + ?Sized>(host: &mut H) -> HostResult<Vec<BalloonSample>> {
    domain_by_domain(host, H::balloon_stats, |domain, stats, at| BalloonSample {
        domain,
        stats,
        at,
    })
}

/// List the active domains, then `read` each one, skipping those that vanish or cannot be read,
/// and make a sample of what was read with `sample`.
fn domain_by_domain<H: Host + ?Sized, T, S>(
    host: &mut H,
    read: impl Fn(&mut H, &DomainId) -> HostResult<T>,
    sample: impl Fn(DomainRef, T, Instant) -> S,
) -> HostResult<Vec<S>> {
    let mut out = Vec::new();
    for domain in host.active_domains()? {
        let figures = read(host, &domain.id);
        if let Some(figures) = read_or_skip(&domain, figures)? {
            let at = host.now();
            out.push(sample(domain, figures, at));
        }
    }
    Ok(out)
}

/// The outcome of one change asked of the host (a pin, a balloon size): `Ok(true)` when it was
/// made. A domain that vanished meanwhile (debug log) or a call that failed (warning) is
/// `Ok(false)`, skipped this cycle; a lost connection is returned, to reconnect.
pub fn changed_or_skipped(domain: &str, what: &str, result: HostResult<()>) -> HostResult<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(HostError::Vanished(_)) => {
            log::debug!("domain {domain} stopped before {what}; skipped");
            Ok(false)
        }
        Err(HostError::Stuck(_)) => {
            log::debug!("domain {domain} does not answer; skipped");
            Ok(false)
        }
        Err(e @ (HostError::Disconnected(_) | HostError::NotAnswering(_))) => Err(e),
        Err(e) => {
            log::warn!("{e:#}");
            Ok(false)
        }
    }
}

/// Domain names by UUID, for reports; a domain not in it is named by its UUID.
#[derive(Clone, Debug, Default)]
pub struct DomainNames(HashMap<DomainId, String>);

impl DomainNames {
    /// Remember `domain`'s name.
    pub fn insert(&mut self, domain: &DomainRef) {
        self.0.insert(domain.id, domain.name.clone());
    }

    /// The name of `id`, else its UUID.
    pub fn of(&self, id: &DomainId) -> String {
        self.0.get(id).cloned().unwrap_or_else(|| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_as_libvirt_writes_them() {
        let id = DomainId::parse("6695eb01-f6a4-8304-79aa-97f2502e193f").unwrap();
        assert_eq!(id.to_string(), "6695eb01-f6a4-8304-79aa-97f2502e193f");
        assert_eq!(
            DomainId::parse("6695eb01f6a4830479aa97f2502e193f"),
            Some(id)
        );
        for bad in [
            "",
            "web",
            "6695eb01-f6a4-8304-79aa-97f2502e193",
            "6695eb01-f6a4-8304-79aa-97f2502e193g",
        ] {
            assert_eq!(DomainId::parse(bad), None, "{bad:?}");
        }
    }
}
