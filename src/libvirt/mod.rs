//! The libvirt implementation of [`Host`]: the only code that talks to libvirt.

mod raw;

pub use raw::{cpu_map_len, cpus_in_map, map_of_one_cpu};

use std::collections::HashMap;

use anyhow::{Context, anyhow};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::host::{
    Applied, BalloonStats, DomainId, DomainRef, Host, HostMemory, NodeCpus, VcpuInfo,
};

/// The URI used when neither `--connect` nor `LIBVIRT_DEFAULT_URI` names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// A libvirt error as a plain message, without the code and domain numbers meant for developers.
fn plain(e: virt::error::Error) -> anyhow::Error {
    anyhow!("{}", e.message())
}

/// True for the errors libvirt gives when a domain stopped or was undefined under our feet.
fn is_vanished(e: &virt::error::Error) -> bool {
    let code = e.code().to_raw();
    code == sys::VIR_ERR_NO_DOMAIN || code == sys::VIR_ERR_OPERATION_INVALID
}

/// One line telling the operator what to do about a failed connection.
fn connect_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("permission denied")
        || m.contains("authentication")
        || m.contains("access denied")
    {
        "this user may not use the libvirt socket: run as root or as a member of the 'libvirt' group"
    } else if m.contains("no such file") || m.contains("connection refused") {
        "is the libvirt daemon running? start libvirtd (or virtqemud), or pick another URI with --connect"
    } else {
        "check the URI given with --connect or LIBVIRT_DEFAULT_URI"
    }
}

/// A connection to one libvirt host.
pub struct LibvirtHost {
    conn: Connect,
    uri: String,
    /// Handles of the domains seen in the last listing, by UUID.
    domains: HashMap<DomainId, Domain>,
    /// pCPUs present, from the last node read; sizes the affinity bitmaps.
    present_cpus: Option<u32>,
}

impl LibvirtHost {
    /// Open a read-write connection to `uri`. libvirt's habit of printing every error to stderr is
    /// switched off: errors reach the operator once, through our own messages.
    pub fn connect(uri: &str) -> anyhow::Result<Self> {
        virt::error::clear_error_callback();
        // The test driver hands a missing node file to libxml2, which prints its own warning to
        // stderr before libvirt fails; say it once, ourselves, instead.
        if let Some(path) = uri
            .strip_prefix("test://")
            .filter(|p| p.starts_with('/') && *p != "/default")
        {
            anyhow::ensure!(
                std::path::Path::new(path).is_file(),
                "cannot connect to libvirt at '{uri}': no node file at {path} (give the absolute path of a test-driver node XML)"
            );
        }
        let conn = Connect::open(Some(uri)).map_err(|e| {
            anyhow!(
                "cannot connect to libvirt at '{uri}': {} ({})",
                e.message(),
                connect_hint(e.message())
            )
        })?;
        Ok(Self {
            conn,
            uri: uri.to_string(),
            domains: HashMap::new(),
            present_cpus: None,
        })
    }

    /// The URI this host was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The underlying connection, for tests that prepare a host (define or destroy domains).
    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    /// The handle of a domain by UUID: from the last listing, else looked up afresh.
    /// `Ok(None)` when no such domain exists any more.
    fn domain(&mut self, id: &DomainId) -> anyhow::Result<Option<Domain>> {
        if let Some(dom) = self.domains.get(id) {
            return Ok(Some(dom.clone()));
        }
        match self.conn.lookup_domain_by_uuid_string(&id.to_string()) {
            Ok(dom) => Ok(Some(dom)),
            Err(e) if is_vanished(&e) => Ok(None),
            Err(e) => Err(plain(e)).with_context(|| format!("looking up domain {id}")),
        }
    }

    /// Run `op` on a domain's handle, mapping "no such domain" and "not running" to `Ok(None)`
    /// and any other failure to an error that says what was being done.
    fn on_domain<T>(
        &mut self,
        id: &DomainId,
        what: impl FnOnce() -> String,
        op: impl FnOnce(&Domain) -> Result<T, virt::error::Error>,
    ) -> anyhow::Result<Option<T>> {
        let Some(dom) = self.domain(id)? else {
            return Ok(None);
        };
        match op(&dom) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_vanished(&e) => Ok(None),
            Err(e) => Err(plain(e)).with_context(what),
        }
    }

    fn present_cpus(&mut self) -> anyhow::Result<u32> {
        match self.present_cpus {
            Some(n) => Ok(n),
            None => Ok(self.node_cpus()?.present),
        }
    }
}

impl Host for LibvirtHost {
    fn active_domains(&mut self) -> anyhow::Result<Vec<DomainRef>> {
        let flags = sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
        let listed = self
            .conn
            .list_all_domains(flags)
            .map_err(plain)
            .with_context(|| format!("listing the active domains of {}", self.uri))?;
        self.domains.clear();
        let mut out = Vec::with_capacity(listed.len());
        for dom in listed {
            // A domain that vanishes between the listing and these reads is simply not listed.
            let (Ok(uuid), Ok(name)) = (dom.uuid(), dom.name()) else {
                continue;
            };
            let id = DomainId(*uuid.as_bytes());
            out.push(DomainRef { id, name });
            self.domains.insert(id, dom);
        }
        Ok(out)
    }

    fn vcpus(&mut self, id: &DomainId) -> anyhow::Result<Option<Vec<VcpuInfo>>> {
        let present = self.present_cpus()?;
        let raw = self.on_domain(
            id,
            || format!("reading the vCPUs of domain {id}"),
            |dom| raw::domain_vcpus(dom, present),
        )?;
        Ok(raw.map(|vcpus| {
            vcpus
                .into_iter()
                .map(|v| VcpuInfo {
                    number: v.number,
                    cpu_time_ns: v.cpu_time_ns,
                    last_pcpu: u32::try_from(v.cpu).ok(),
                    affinity: v.affinity,
                })
                .collect()
        }))
    }

    fn node_cpus(&mut self) -> anyhow::Result<NodeCpus> {
        let cpus = match raw::node_cpu_map(&self.conn) {
            Ok((present, online)) => NodeCpus { present, online },
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_SUPPORT => {
                // Drivers without a CPU map: every CPU the node reports counts as online.
                let info = self
                    .conn
                    .node_info()
                    .map_err(plain)
                    .context("reading the host's CPU count")?;
                NodeCpus {
                    present: info.cpus,
                    online: (0..info.cpus).collect(),
                }
            }
            Err(e) => return Err(plain(e)).context("reading the host's online CPUs"),
        };
        self.present_cpus = Some(cpus.present);
        Ok(cpus)
    }

    fn pin_vcpu(&mut self, id: &DomainId, vcpu: u32, pcpu: u32) -> anyhow::Result<Applied> {
        let map = map_of_one_cpu(pcpu, self.present_cpus()?);
        let done = self.on_domain(
            id,
            || format!("pinning vCPU {vcpu} of domain {id} to pCPU {pcpu}"),
            |dom| dom.pin_vcpu(vcpu, &map),
        )?;
        Ok(done.map_or(Applied::Vanished, |()| Applied::Done))
    }

    fn balloon_stats(&mut self, id: &DomainId) -> anyhow::Result<Option<BalloonStats>> {
        self.on_domain(
            id,
            || format!("reading the memory statistics of domain {id}"),
            |dom| {
                let mut stats = BalloonStats {
                    max_kib: dom.max_memory()?,
                    ..BalloonStats::default()
                };
                let mut actual = None;
                for stat in dom.memory_stats(0)? {
                    match stat.tag as sys::virDomainMemoryStatTags {
                        sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => actual = Some(stat.val),
                        sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => stats.unused_kib = Some(stat.val),
                        sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => {
                            stats.available_kib = Some(stat.val)
                        }
                        sys::VIR_DOMAIN_MEMORY_STAT_USABLE => stats.usable_kib = Some(stat.val),
                        sys::VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE => {
                            stats.last_update = Some(stat.val)
                        }
                        _ => {}
                    }
                }
                // Without a balloon there is no "actual": the domain's current memory is its size.
                stats.actual_kib = match actual {
                    Some(kib) => kib,
                    None => dom.info()?.memory,
                };
                Ok(stats)
            },
        )
    }

    fn enable_balloon_stats(&mut self, id: &DomainId, period_secs: u32) -> anyhow::Result<Applied> {
        let period = i32::try_from(period_secs).unwrap_or(i32::MAX);
        let done = self.on_domain(
            id,
            || format!("setting the balloon statistics period of domain {id} (does it have a <memballoon> device?)"),
            |dom| dom.set_memory_stats_period(period, sys::VIR_DOMAIN_AFFECT_LIVE),
        )?;
        Ok(done.map_or(Applied::Vanished, |()| Applied::Done))
    }

    fn set_balloon(&mut self, id: &DomainId, kib: u64) -> anyhow::Result<Applied> {
        let done = self.on_domain(
            id,
            || format!("setting the balloon of domain {id} to {kib} KiB"),
            |dom| dom.set_memory_flags(kib, sys::VIR_DOMAIN_MEM_LIVE),
        )?;
        Ok(done.map_or(Applied::Vanished, |()| Applied::Done))
    }

    fn host_memory(&mut self) -> anyhow::Result<Option<HostMemory>> {
        let fields = match raw::node_memory_stats(&self.conn) {
            Ok(fields) => fields,
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_SUPPORT => return Ok(None),
            Err(e) => return Err(plain(e)).context("reading the host's memory statistics"),
        };
        let get = |name: &str| fields.iter().find(|(f, _)| f == name).map(|&(_, v)| v);
        let Some(total_kib) = get("total") else {
            return Ok(None);
        };
        let free_kib = ["free", "buffers", "cached"]
            .iter()
            .filter_map(|f| get(f))
            .sum::<u64>()
            .min(total_kib);
        Ok(Some(HostMemory {
            total_kib,
            free_kib,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_likely_cause() {
        assert!(
            connect_hint(
                "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied"
            )
            .contains("group")
        );
        assert!(
            connect_hint("Failed to connect socket to '/x': No such file or directory")
                .contains("daemon running")
        );
        assert!(connect_hint("no connection driver available for foo:///").contains("URI"));
    }
}
