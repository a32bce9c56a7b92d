//! The libvirt implementation of [`Host`]: the only code that talks to libvirt.

mod bounded;
mod events;
mod known;
mod numad;
mod opening;
mod raw;

use bounded::{Bounded, Connections, Kind, Slot, Unanswered};
use known::{ConfiguredPins, Known, KnownPins};
use opening::{NotOpened, OPEN_DEADLINE, Opening};

use raw::Definition;
pub use raw::{cpu_map_len, cpus_in_map, map_of_cpus};

use std::time::{Duration, Instant};

use anyhow::anyhow;
use log::debug;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::domain_xml::DomainFacts;
use crate::host::{
    BalloonSample, BalloonStats, DomainId, DomainRef, Host, HostError, HostMemory, HostResult,
    NodeCpus, NodeMemory, VcpuInfo, VcpuSample, balloons_domain_by_domain, read_or_skip,
    vcpus_domain_by_domain,
};
use crate::topology::Topology;
use crate::tracker::Tracker;

/// Where libvirt does not announce pin changes (see [`events`]), bulk samples re-read the vCPU
/// pins of every domain this often (in samples), so pins changed by someone else are seen; between
/// re-reads the pins read last, or set by us, are used.
const PIN_REFRESH_SAMPLES: u64 = 10;

/// Affinity changed outside libvirt (`taskset` on QEMU's threads, cgroups) reaches neither
/// libvirt's pin records nor its events: this often (in samples) every domain's vCPUs are read
/// with `virDomainGetVcpus`, which reports the real affinity of each thread, one call per domain.
const AFFINITY_CHECK_SAMPLES: u64 = 30;

/// Open a read-write connection, with an error that names the URI and the likely cause.
fn open(uri: &str) -> anyhow::Result<Connect> {
    Connect::open(Some(uri)).map_err(|e| {
        anyhow!(
            "cannot connect to libvirt at '{uri}': {} ({})",
            e.message(),
            connect_hint(e.message())
        )
    })
}

/// The error for a libvirt that accepted the connection but did not answer it.
fn not_answering_at_start(uri: &str) -> anyhow::Error {
    anyhow!(
        "cannot connect to libvirt at '{uri}': it did not answer within {} s (is libvirtd, or virtqemud, hung or stopped? 'virsh -c {uri} list' tells)",
        OPEN_DEADLINE.as_secs()
    )
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

/// Where the host's available memory is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemorySource {
    /// The kernel's own estimate, MemAvailable in /proc/meminfo: the host is this machine.
    ProcMeminfo,
    /// libvirt's `free` (MemFree): a remote host, where nothing better is known. libvirt's
    /// `cached` would count shared memory (tmpfs, and guest RAM backed by memfd or shared memory,
    /// which virtiofs and vhost-user need), which the kernel cannot hand out.
    LibvirtFree,
}

impl MemorySource {
    /// The source for `uri`: this machine's /proc/meminfo when the URI names no host (and is not
    /// libvirt's test driver, whose host is a fake), else libvirt's figure.
    fn for_uri(uri: &str) -> Self {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Self::LibvirtFree;
        };
        let local = rest.starts_with('/')
            && !scheme.starts_with("test")
            && !scheme.contains("+ssh")
            && !scheme.contains("+tcp")
            && !scheme.contains("+tls");
        if local {
            Self::ProcMeminfo
        } else {
            Self::LibvirtFree
        }
    }
}

/// The share of the last 10 s some task stalled waiting for memory, in %, from the text of
/// /proc/pressure/memory (its `some avg10=` figure).
fn pressure_some_avg10(pressure: &str) -> Option<f64> {
    pressure
        .lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// MemAvailable, in KiB, from the text of /proc/meminfo.
fn meminfo_available_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether pin changes are followed through libvirt's events on this connection.
#[derive(Default)]
enum PinEvents {
    /// Not tried yet.
    #[default]
    Untried,
    /// The driver does not announce them (or the event loop is not running): pins are polled.
    Polled,
    /// Announced: pins are never polled.
    Watched(events::PinWatch),
}

/// Whether device hot-plugs are followed through libvirt's events on this connection.
#[derive(Default)]
enum DeviceEvents {
    /// Not tried yet.
    #[default]
    Untried,
    /// Not announced (or the event loop is not running): a hot-plug is seen on SIGHUP.
    Unavailable,
    /// Announced: a domain whose devices changed has its XML read again.
    Watched(events::DeviceWatch),
}

/// The host's topology, read once per connection.
#[derive(Default)]
enum Capabilities {
    /// Not read yet (or to be read again: SIGHUP).
    #[default]
    Unread,
    /// Read: the topology, where the driver describes one.
    Read(Option<Topology>),
}

/// What is learnt of the host through one connection: a new connection starts with
/// `Session::default()`.
#[derive(Default)]
struct Session {
    /// pCPUs present, from the last node read; sizes the affinity bitmaps.
    present_cpus: Option<u32>,
    /// Set once the driver showed it has no bulk statistics (e.g. the test driver).
    no_bulk_stats: bool,
    /// Pin changes announced by libvirt, where it announces them.
    pin_events: PinEvents,
    /// How many fields the host's memory statistics have (0 until learnt).
    node_memory_fields: std::os::raw::c_int,
    /// The host's topology.
    capabilities: Capabilities,
    /// Device hot-plugs announced by libvirt, where it announces them.
    device_events: DeviceEvents,
}

/// One active domain as a listing gives it: its UUID, name and run (domain ID).
type Listed = (DomainId, String, u32);

/// A connection to one libvirt host.
pub struct LibvirtHost {
    conn: Connect,
    uri: String,
    /// libvirt API calls made so far (each may be a round trip to the daemon); only
    /// [`LibvirtHost::counted`] adds to it.
    calls: u64,
    /// Bulk samples taken so far.
    samples: u64,
    /// Was libvirt's event loop running when the first connection was opened?
    event_loop: bool,
    /// Where the host's available memory is read from.
    memory_source: MemorySource,
    /// What was learnt of the host through the current connection.
    session: Session,
    /// What is known of each domain run of the last listing that answered: its one record.
    domains: Tracker<Known>,
    /// Room for one listing of the domains at a time.
    listing: Slot,
    /// Room for one bulk statistics call (over every domain) at a time.
    bulk: Slot,
    /// Room for one host-wide call on the daemon's own connection at a time.
    host_calls: Slot,
    /// A new connection still being opened (libvirtd did not answer in time).
    opening: Option<Opening>,
    /// A listing did not answer in time, and it was said.
    listing_stuck_said: bool,
    /// A listing has answered at least once (before, an unanswered listing knows no domain).
    ever_listed: bool,
    /// The budget of calls running at once was found spent, and it was said.
    budget_said: bool,
    /// The domains last said not to be asked because their QEMU did not run (sorted names).
    quiet_said: Vec<String>,
    /// Calls that may wait on a domain's QEMU, bounded in time.
    bounded: Bounded,
    /// Is the daemon stopping? A bounded call stops waiting at once when it is.
    stop: fn() -> bool,
    /// numad, on a host that is this machine.
    numad: numad::Numad,
}

/// How long closing the connections is waited for when the daemon ends.
pub const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// How long a call that may wait on a domain's QEMU is waited for, by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// The most calls a daemon has running in libvirt at once, by default: each holds one of
/// libvirtd's worker threads (20 by default, shared with every other client) until it returns,
/// and a call to a hung QEMU may never return. Both daemons together hold at most 10. One is kept
/// for host-wide calls; a domain whose lock libvirt holds in a call that blocks (a dump into a
/// file that does not open) costs three: the bulk read, a listing and its own read, which leaves
/// one to read the other domains one by one.
pub const DEFAULT_CALL_BUDGET: usize = 5;

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
        // Events reach a connection only if the event loop was registered before it was opened.
        let event_loop = events::start_event_loop();
        let conn = Opening::start(uri, open)
            .wait(OPEN_DEADLINE, || false)
            .map_err(|e| match e {
                NotOpened::Failed(e) => e,
                NotOpened::Late | NotOpened::Stopping => not_answering_at_start(uri),
            })?;
        let bounded = Bounded::new(
            DEFAULT_DEADLINE,
            Connections::for_uri(uri, &conn),
            DEFAULT_CALL_BUDGET,
        );
        Ok(Self {
            conn,
            uri: uri.to_string(),
            calls: 0,
            samples: 0,
            event_loop,
            memory_source: MemorySource::for_uri(uri),
            session: Session::default(),
            domains: Tracker::new(),
            listing: Slot::default(),
            bulk: Slot::default(),
            host_calls: Slot::default(),
            opening: None,
            listing_stuck_said: false,
            ever_listed: false,
            budget_said: false,
            quiet_said: Vec::new(),
            bounded,
            stop: || false,
            numad: numad::Numad::default(),
        })
    }

    /// Wait at most `deadline` for a call that may wait on one domain's QEMU (its monitor, or a
    /// job someone else holds): past it, the domain is skipped as stuck until the call returns.
    /// `stop` tells whether the daemon is stopping, which ends any such wait at once.
    pub fn with_deadline(mut self, deadline: Duration, stop: fn() -> bool) -> Self {
        self.bounded.set_deadline(deadline);
        self.bounded.end_cycle();
        self.stop = stop;
        self
    }

    /// Hold at most `budget` calls running in libvirt at once (see [`DEFAULT_CALL_BUDGET`]).
    pub fn with_call_budget(mut self, budget: usize) -> Self {
        self.bounded.set_budget(budget);
        self
    }

    /// Close the connections, waiting at most [`CLOSE_WAIT`]: closing is a call to libvirtd
    /// too, and a libvirtd that does not answer must not keep the daemon from exiting.
    pub fn close(self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let closing = std::thread::Builder::new()
            .name("libvirt-close".into())
            .spawn(move || {
                drop(self);
                let _ = tx.send(());
            });
        if closing.is_ok() && rx.recv_timeout(CLOSE_WAIT).is_err() {
            log::debug!("libvirt did not answer the close: exiting without it");
        }
    }

    /// Calls this host has running in libvirt now (each holding one of libvirtd's workers).
    pub fn calls_outstanding(&self) -> usize {
        self.bounded.outstanding()
    }

    /// A call was not made: the budget of calls running at once is spent (said once, until
    /// calls return).
    fn over_budget(&mut self) {
        // Calls stop waiting when the daemon stops: nothing to say of them.
        if (self.stop)() {
            return;
        }
        if !std::mem::replace(&mut self.budget_said, true) {
            log::warn!(
                "{} calls to libvirt are still running, the most this daemon holds of libvirtd's workers (--max-libvirt-calls): domains are not read until some return",
                self.bounded.outstanding()
            );
        }
    }

    /// Say which domains became stuck, and which answer again, since the last time.
    fn say_stuck(&mut self) {
        // Calls stop waiting when the daemon stops: they are not stuck.
        if (self.stop)() {
            return;
        }
        let deadline = self.bounded.deadline().as_secs_f64();
        for known in self.domains.records_mut() {
            let stuck = known.slot.is_busy();
            let name = &known.name;
            if stuck && !known.stuck_said {
                log::warn!(
                    "domain {name} did not answer within {deadline:.1} s (busy in a libvirt job, or its QEMU is stopped or hung): it is skipped until it answers"
                );
            } else if !stuck && known.stuck_said {
                log::info!("domain {name} answers again");
            }
            known.stuck_said = stuck;
            if !known.unreadable
                && !known.missed
                && let Some(failure) = known.failure_said.take()
            {
                log::info!("domain {name} reads again (it failed: {failure})");
            }
        }
    }

    /// Domain `id`'s vCPUs, read directly.
    fn read_vcpus(&mut self, id: &DomainId) -> HostResult<Vec<VcpuInfo>> {
        let present = self.present_cpus()?;
        // Bounded: it waits on a domain held by a blocked libvirt call.
        let raw = self.on_domain_bounded(
            id,
            2,
            || format!("reading the vCPUs of domain {id}"),
            move |dom| raw::domain_vcpus(dom, present),
        )?;
        self.vcpu_infos(id, raw)
    }

    /// Domain `id`'s vCPUs as `virDomainGetVcpus` gave them (`raw`), with their configured
    /// affinity.
    fn vcpu_infos(&mut self, id: &DomainId, raw: Vec<raw::RawVcpu>) -> HostResult<Vec<VcpuInfo>> {
        let nvcpus = raw.iter().map(|v| v.number + 1).max().unwrap_or(0);
        let configured = self.configured(id, nvcpus)?;
        Ok(raw
            .into_iter()
            .map(|v| VcpuInfo {
                number: v.number,
                cpu_time_ns: v.cpu_time_ns,
                last_pcpu: u32::try_from(v.cpu).ok(),
                configured: configured
                    .as_ref()
                    .and_then(|c| c.get(v.number as usize).cloned()),
                affinity: v.affinity,
                delay_ns: None,
            })
            .collect())
    }

    /// Domain `id`'s balloon and guest memory figures (bounded in time).
    fn read_balloon_stats(&mut self, id: &DomainId) -> HostResult<BalloonStats> {
        self.on_domain_in_job(
            id,
            2,
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
                            stats.mem_total_kib = Some(stat.val)
                        }
                        sys::VIR_DOMAIN_MEMORY_STAT_USABLE => {
                            stats.mem_available_kib = Some(stat.val)
                        }
                        sys::VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE => {
                            stats.last_update = Some(stat.val)
                        }
                        sys::VIR_DOMAIN_MEMORY_STAT_RSS => stats.rss_kib = Some(stat.val),
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

    /// Remember domain `id` as unreadable this sample when `read` failed otherwise than by
    /// vanishing, not answering or losing the connection: the daemons then count it at its most
    /// cautious ([`Host::stuck_domains`]). The failure is said once, until the domain reads
    /// again or fails otherwise.
    fn note_unreadable<T>(&mut self, id: &DomainId, read: &HostResult<T>) {
        let Err(e @ (HostError::Other(_) | HostError::Unsupported(_) | HostError::Denied(_))) =
            read
        else {
            return;
        };
        let message = format!("{e:#}");
        let Some(known) = self.domains.get_mut(id) else {
            log::warn!("domain {id}: {message}; skipped");
            return;
        };
        known.unreadable = true;
        if known.failure_said.as_deref() != Some(message.as_str()) {
            log::warn!(
                "domain {}: {message}; it is skipped, and counted at its most cautious, until it reads again",
                known.name
            );
            known.failure_said = Some(message);
        }
    }

    /// [`read_or_skip`], saying a failure once ([`LibvirtHost::note_unreadable`]).
    fn skip<T>(&mut self, domain: &DomainRef, read: HostResult<T>) -> HostResult<Option<T>> {
        self.note_unreadable(&domain.id, &read);
        read_or_skip(domain, read)
    }

    /// Every domain known, described, in UUID order; `keep` chooses which.
    fn described_known(&self, keep: impl Fn(&Known) -> bool) -> Vec<DomainRef> {
        self.domains
            .sorted_runs()
            .into_iter()
            .filter(|(_, _, known)| keep(known))
            .filter_map(|(id, run, known)| known.describe(id, run))
            .collect()
    }

    /// The domains of the last listing that answered (the listing does not answer now: said
    /// once). With none yet, nothing is known of the domains: the cycle is given up, never taken
    /// for one that found no domain.
    fn last_listing(&mut self) -> HostResult<Vec<DomainRef>> {
        if !self.ever_listed {
            return Err(HostError::NotAnswering(format!(
                "listing the domains of {}: no answer within {:.1} s",
                self.uri,
                self.bounded.deadline().as_secs_f64()
            )));
        }
        if !(self.stop)() && !std::mem::replace(&mut self.listing_stuck_said, true) {
            log::warn!(
                "listing the domains did not answer within {:.1} s (a domain is held by a libvirt call that blocks: a dump or save to a file that does not open, a hung storage call): going on with the {} domains listed before",
                self.bounded.deadline().as_secs_f64(),
                self.domains.len()
            );
        }
        Ok(self.described_known(|_| true))
    }

    /// A listing answered: its domains are the ones known from now on, each with its record
    /// (fresh for a domain not known, or known under an earlier run), and the others are
    /// forgotten.
    fn listed(&mut self, listed: &[Listed]) {
        if std::mem::take(&mut self.listing_stuck_said) {
            log::info!("listing the domains answers again");
        }
        self.ever_listed = true;
        self.domains.begin_cycle();
        for (id, name, run) in listed {
            self.domains.see_run(*id, Some(*run), || Known::new(name));
        }
        self.domains.end_cycle();
    }

    /// Which figure stands for the host's available memory, for the start-up line.
    pub fn memory_figure(&self) -> &'static str {
        match self.memory_source {
            MemorySource::ProcMeminfo => "MemAvailable from this machine's /proc/meminfo",
            MemorySource::LibvirtFree => {
                "libvirt's free memory (MemFree; a remote host's page cache is not counted)"
            }
        }
    }

    /// Are pin changes followed through libvirt's events (rather than polled)?
    pub fn follows_pin_events(&self) -> bool {
        matches!(self.session.pin_events, PinEvents::Watched(_))
    }

    /// Make `calls` libvirt calls with `op` (on the connection, or bounded in time), counting
    /// them: every libvirt call goes through here.
    fn counted<T>(&mut self, calls: u64, op: impl FnOnce(&Self) -> T) -> T {
        self.calls += calls;
        op(self)
    }

    /// Is the connection to the libvirt daemon still up?
    fn is_connected(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// A libvirt error as a [`HostError`] whose message is libvirt's own (without the code and
    /// domain numbers meant for developers) after `what` was being done: "no support" is
    /// [`HostError::Unsupported`], "access denied" and its kin [`HostError::Denied`], any error on
    /// a connection that is no longer alive is [`HostError::Disconnected`].
    fn error(&self, e: virt::error::Error, what: impl FnOnce() -> String) -> HostError {
        let code = e.code().to_raw();
        if code == sys::VIR_ERR_NO_SUPPORT {
            HostError::Unsupported(format!("{}: {}", what(), e.message()))
        } else if [
            sys::VIR_ERR_ACCESS_DENIED,
            sys::VIR_ERR_AUTH_FAILED,
            sys::VIR_ERR_OPERATION_DENIED,
        ]
        .contains(&code)
        {
            HostError::Denied(format!(
                "{}: {} (this user may no longer use libvirt: run as root or as a member of the 'libvirt' group)",
                what(),
                e.message()
            ))
        } else if !self.is_connected() {
            HostError::Disconnected(e.message().to_string())
        } else {
            HostError::Other(anyhow!("{}", e.message()).context(what()))
        }
    }

    /// The URI this host was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The underlying connection, for tests that prepare a host (define or destroy domains).
    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    /// Make `calls` libvirt calls with `call` on `slot`, bounded as `kind` says, on a pooled
    /// connection; a call not made because the budget is spent is said ([`Self::over_budget`]).
    fn run_bounded<T: Send + 'static>(
        &mut self,
        calls: u64,
        slot: &Slot,
        kind: Kind,
        call: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<Result<T, virt::error::Error>, Unanswered> {
        let answer = self.counted(calls, |h| h.bounded.run(slot, h.stop, kind, call));
        if answer.as_ref().err() == Some(&Unanswered::OverBudget) {
            self.over_budget();
        }
        answer
    }

    /// Run `op`, which makes `calls` host-wide libvirt calls (`what` says which), on the daemon's
    /// own connection, bounded like every call: libvirtd hung or stopped makes it
    /// [`HostError::NotAnswering`] (the cycle is given up), never a daemon blocked for good.
    /// libvirt's own failure is left to the caller.
    fn on_host<T: Send + 'static>(
        &mut self,
        calls: u64,
        what: &str,
        op: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> HostResult<Result<T, virt::error::Error>> {
        let slot = self.host_calls.clone();
        let answer = self.counted(calls, |h| h.bounded.run_on(&h.conn, &slot, h.stop, op));
        match answer {
            Ok(read) => Ok(read),
            Err(unanswered) => {
                let why = match unanswered {
                    Unanswered::Stopping => "the daemon is stopping".to_string(),
                    Unanswered::OverBudget => {
                        self.over_budget();
                        "every call this daemon may hold in libvirtd is still running".to_string()
                    }
                    // A host-wide call is never cut short by the cycle's time.
                    Unanswered::Late | Unanswered::OutOfTime => format!(
                        "libvirt at {} did not answer within {:.1} s (is libvirtd, or virtqemud, hung or stopped?)",
                        self.uri,
                        self.bounded.host_deadline().as_secs_f64()
                    ),
                };
                Err(HostError::NotAnswering(format!("{what}: {why}")))
            }
        }
    }

    /// Run `op`, which makes `calls` libvirt calls, on domain `id`, looked up on the call's own
    /// connection, on a worker thread waited for at most the deadline: "no such domain" and "not
    /// running" are [`HostError::Vanished`], any other failure says what was being done. A call
    /// that does not answer in time is [`HostError::Stuck`], and so is every call on the domain
    /// until it answers (one call on a domain at a time).
    fn on_domain_bounded<T: Send + 'static>(
        &mut self,
        id: &DomainId,
        calls: u64,
        what: impl FnOnce() -> String,
        op: impl FnOnce(&Domain) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> HostResult<T> {
        let uuid = id.to_string();
        // A domain not known (not listed yet) has a slot for this call alone.
        let slot = self
            .domains
            .get(id)
            .map(|k| k.slot.clone())
            .unwrap_or_default();
        // The domain is looked up on the call's own connection (one call more).
        let call = move |conn: &Connect| op(&conn.lookup_domain_by_uuid_string(&uuid)?);
        match self.run_bounded(calls + 1, &slot, Kind::Domains, call) {
            Err(_) => {
                // Not read this sample: the daemons keep what they know of it.
                if let Some(known) = self.domains.get_mut(id) {
                    known.missed = true;
                }
                Err(HostError::Stuck(*id))
            }
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_vanished(&e) => Err(HostError::Vanished(*id)),
            Ok(Err(e)) => Err(self.error(e, what)),
        }
    }

    /// [`LibvirtHost::on_domain_bounded`] for a call that needs domain `id`'s job or its QEMU
    /// monitor: made only when `virDomainGetControlInfo` (in the same worker; it waits on
    /// neither) says nobody has held them longer than the deadline, since the call would only
    /// queue behind the holder (a migration, a dump, another client's call to a hung QEMU),
    /// keeping one of libvirtd's workers for up to 30 s. A domain held is skipped, said once
    /// until it is free.
    fn on_domain_in_job<T: Send + 'static>(
        &mut self,
        id: &DomainId,
        calls: u64,
        what: impl FnOnce() -> String,
        op: impl FnOnce(&Domain) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> HostResult<T> {
        let longer_than = self.bounded.deadline();
        let gated = move |dom: &Domain| match raw::control(dom, longer_than)? {
            raw::Control::Free => op(dom).map(Ok),
            held => Ok(Err(held)),
        };
        let answer = self.on_domain_bounded(id, calls + 1, what, gated)?;
        let Some(known) = self.domains.get_mut(id) else {
            return answer.map_err(|_| HostError::Stuck(*id));
        };
        match answer {
            Ok(value) => {
                if std::mem::take(&mut known.held_said) {
                    log::info!("domain {} is free again", known.name);
                }
                Ok(value)
            }
            Err(held) => {
                known.missed = true;
                if !std::mem::replace(&mut known.held_said, true) {
                    let why = match held {
                        raw::Control::InJob { secs } => {
                            format!(
                                "a libvirt job has held it for {secs:.0} s (a migration, a dump, another client's call)"
                            )
                        }
                        raw::Control::Occupied { secs } => {
                            format!("a call has waited on its QEMU for {secs:.0} s")
                        }
                        raw::Control::Broken | raw::Control::Free => {
                            "its QEMU monitor failed".to_string()
                        }
                    };
                    log::warn!(
                        "domain {}: {why}: it is not called until it is free",
                        known.name
                    );
                }
                Err(HostError::Stuck(*id))
            }
        }
    }

    /// The statistics `groups` of every domain that answers in one call, bounded in time, with
    /// the instant its figures were read: `virConnectGetAllDomainStats`, or, while calls on some
    /// domains are stuck, `virDomainListGetStats` over the others (a bulk call would wait on a
    /// stuck domain again), so the domains that answer keep one read and their run-queue delay.
    /// `None` when the driver does not support it, when it did not answer in time, or while the
    /// listing itself is stuck (the caller then reads domain by domain). vCPU times are read
    /// without waiting for domains busy in a job (`NOWAIT`); a domain whose job is free is still
    /// asked through its QEMU (libvirt 9's vCPU group sends `query-stats` in the job), so a
    /// stopped or hung QEMU nobody else holds keeps the call.
    fn bulk_stats(&mut self, groups: u32) -> HostResult<Option<Vec<(raw::DomainStats, Instant)>>> {
        if self.session.no_bulk_stats || self.listing.is_busy() {
            return Ok(None);
        }
        let skip: Vec<[u8; 16]> = self
            .domains
            .sorted_runs()
            .into_iter()
            .filter(|(_, _, known)| known.slot.is_busy())
            .map(|(id, _, _)| id.0)
            .collect();
        let nowait = groups == sys::VIR_DOMAIN_STATS_VCPU;
        // The listing and the statistics, where some domains are left out.
        let calls = if skip.is_empty() { 1 } else { 2 };
        let call = move |conn: &Connect| {
            if skip.is_empty() {
                raw::all_domain_stats(conn, groups, nowait).map(|records| (None, records))
            } else {
                raw::listed_domain_stats(conn, &skip, groups, nowait)
                    .map(|(listed, records)| (Some(listed), records))
            }
        };
        let before = Instant::now();
        let bulk = self.bulk.clone();
        let answer = self.run_bounded(calls, &bulk, Kind::Domains, call);
        let at = midway(before);
        let read = match answer {
            Ok(read) => read,
            Err(_) => {
                log::debug!(
                    "the bulk statistics call did not answer in time: reading domain by domain"
                );
                return Ok(None);
            }
        };
        match read {
            Ok((listing, records)) => {
                // The bulk call answers: what was seen of QEMUs' CPU time while it did not is
                // stale by the next time it does not.
                for known in self.domains.records_mut() {
                    known.cpu_seen = None;
                }
                let listed: Vec<Listed> = match listing {
                    Some(listing) => listing
                        .into_iter()
                        .map(|(uuid, name, run)| (DomainId(uuid), name, run))
                        .collect(),
                    None => records
                        .iter()
                        .map(|r| (DomainId(r.uuid), r.name.clone(), r.id))
                        .collect(),
                };
                self.listed(&listed);
                Ok(Some(records.into_iter().map(|r| (r, at)).collect()))
            }
            Err(e) => match self.error(e, || "reading the statistics of all domains".into()) {
                HostError::Unsupported(_) => {
                    self.session.no_bulk_stats = true;
                    Ok(None)
                }
                e => Err(e),
            },
        }
    }

    /// The statistics `groups` of every domain that answers, each record with the instant it was
    /// read: in one call ([`LibvirtHost::bulk_stats`]); else, for balloons, domain by domain
    /// ([`LibvirtHost::balloon_records_one_by_one`]). `None` where the driver has no such
    /// statistics, and for vCPUs whenever the bulk call is not answered: the caller then reads
    /// each domain's vCPUs with `virDomainGetVcpus`, which takes neither the domain's job nor its
    /// QEMU (libvirt's vCPU statistics take the job and ask QEMU for `query-stats`, and a QEMU
    /// that is stopped or hung would keep one of libvirtd's workers per domain asked).
    fn stats_records(
        &mut self,
        groups: u32,
    ) -> HostResult<Option<Vec<(raw::DomainStats, Instant)>>> {
        match self.bulk_stats(groups)? {
            Some(records) => Ok(Some(records)),
            None if groups == sys::VIR_DOMAIN_STATS_VCPU => Ok(None),
            None => self.balloon_records_one_by_one(groups),
        }
    }

    /// The balloon statistics `groups` of each active domain read on its own
    /// (`virDomainListGetStats` of one domain, in its job, bounded like every call on it), each
    /// with the instant it was read, while the bulk call does not answer. Only a domain whose
    /// QEMU ran since the last look is asked ([`LibvirtHost::ran_since_last_look`]): when calls
    /// are stuck, many QEMUs may be frozen at once (a storage outage), and asking each would keep
    /// one of libvirtd's workers per frozen domain until the budget of calls is spent and no
    /// domain is read at all. `None` where the driver has no such statistics (the caller then
    /// reads domain by domain the old way).
    fn balloon_records_one_by_one(
        &mut self,
        groups: u32,
    ) -> HostResult<Option<Vec<(raw::DomainStats, Instant)>>> {
        if self.session.no_bulk_stats {
            return Ok(None);
        }
        let mut out = Vec::new();
        let mut quiet = Vec::new();
        let domains = self.active_domains_missed_first()?;
        for domain in domains {
            // `virDomainGetInfo` waits on neither the domain's job nor its QEMU.
            let read = self.on_domain_bounded(
                &domain.id,
                1,
                || format!("reading the CPU time of domain {}", domain.id),
                |dom| Ok(dom.info()?.cpu_time),
            );
            let Some(cpu_ns) = self.skip(&domain, read)? else {
                continue;
            };
            if !self.ran_since_last_look(&domain.id, cpu_ns) {
                // Not read: it keeps its last figures.
                if let Some(known) = self.domains.get_mut(&domain.id) {
                    known.missed = true;
                }
                quiet.push(domain.name.clone());
                continue;
            }
            let what = || format!("reading the statistics of domain {}", domain.id);
            let read_stats = move |dom: &Domain| raw::domain_stats(dom, groups, false);
            let read = self.on_domain_in_job(&domain.id, 1, what, read_stats);
            if let Err(HostError::Unsupported(_)) = &read {
                self.session.no_bulk_stats = true;
                return Ok(None);
            }
            if let Some(Some(record)) = self.skip(&domain, read)? {
                out.push((record, Instant::now()));
            }
        }
        self.say_quiet(quiet);
        Ok(Some(out))
    }

    /// The active domains ([`Host::active_domains`]), those not read last time (the cycle's time
    /// ran out before them) first.
    fn active_domains_missed_first(&mut self) -> HostResult<Vec<DomainRef>> {
        let mut domains = self.active_domains()?;
        domains.sort_by_key(|d| !self.domains.get(&d.id).is_some_and(|k| k.missed_last));
        Ok(domains)
    }

    /// Whether domain `id` ran since the last look while the bulk call does not answer, from its
    /// CPU time `cpu_ns` now (read by a call that waits on neither its job nor its QEMU): false
    /// at the first look, and when it has not run since, as a QEMU that is stopped or hung (a
    /// storage outage freezes many at once): a call that needs its QEMU would keep one of
    /// libvirtd's workers until it runs again, so none is made. CPU time is counted in clock
    /// ticks, so a domain idle enough is taken for quiet too, until it runs again.
    fn ran_since_last_look(&mut self, id: &DomainId, cpu_ns: u64) -> bool {
        self.domains
            .get_mut(id)
            .is_some_and(|known| known.cpu_seen.replace(cpu_ns).is_some_and(|b| b != cpu_ns))
    }

    /// Every domain's vCPUs read on its own while the bulk call does not answer: its times and
    /// affinity by `virDomainGetVcpus`, which waits on neither its job nor its QEMU, so every
    /// domain is read however many QEMUs are frozen; and the run-queue delay of the domains that
    /// ran since the last look ([`LibvirtHost::ran_since_last_look`]) from their own statistics
    /// (without waiting for their job), so those keep balancing on demand. A domain not asked
    /// counts its usage (nothing, when it did not run).
    fn vcpus_one_by_one(&mut self) -> HostResult<Vec<VcpuSample>> {
        let mut out = Vec::new();
        let domains = self.active_domains_missed_first()?;
        let present = self.present_cpus()?;
        for domain in domains {
            let id = domain.id;
            let seen = self.domains.get(&id).and_then(|k| k.cpu_seen);
            // One worker for both reads: the delay only where the vCPUs ran since the last look.
            let read = self.on_domain_bounded(
                &id,
                3,
                || format!("reading the vCPUs of domain {id}"),
                move |dom| {
                    let raw = raw::domain_vcpus(dom, present)?;
                    let cpu_ns: u64 = raw.iter().map(|v| v.cpu_time_ns).sum();
                    let delays = if seen.is_some_and(|seen| seen != cpu_ns) {
                        let stats = raw::domain_stats(dom, sys::VIR_DOMAIN_STATS_VCPU, true);
                        // Without its delay, a vCPU counts its usage.
                        stats.ok().flatten()
                    } else {
                        None
                    };
                    Ok((raw, cpu_ns, delays))
                },
            );
            let Some((raw, cpu_ns, delays)) = self.skip(&domain, read)? else {
                continue;
            };
            let at = Instant::now();
            self.ran_since_last_look(&id, cpu_ns);
            let infos = self.vcpu_infos(&id, raw);
            let Some(mut vcpus) = self.skip(&domain, infos)? else {
                continue;
            };
            if let Some(record) = delays {
                for v in &mut vcpus {
                    v.delay_ns = record.vcpu_delay(v.number);
                }
            }
            out.push(VcpuSample { domain, vcpus, at });
        }
        self.say_stuck();
        Ok(out)
    }

    /// Say which domains were not asked because their QEMU did not run since the last look,
    /// when they change.
    fn say_quiet(&mut self, mut quiet: Vec<String>) {
        quiet.sort();
        if quiet != self.quiet_said {
            if !quiet.is_empty() {
                log::info!(
                    "calls to libvirt are stuck: {} domains whose QEMU has not run since the last look are not asked for their memory figures (a stopped or hung QEMU would keep the call), until it runs: {}",
                    quiet.len(),
                    quiet.join(" ")
                );
            }
            self.quiet_said = quiet;
        }
    }

    /// The affinity of a domain's `nvcpus` vCPUs: from what we know, re-read when unknown or
    /// stale.
    fn known_pins(&mut self, id: &DomainId, nvcpus: u32) -> HostResult<Vec<Vec<u32>>> {
        let polled = !self.follows_pin_events();
        let samples = self.samples;
        let known = self.domains.get(id).and_then(|k| k.pins.as_ref());
        if let Some(k) = known
            && k.affinity.len() >= nvcpus as usize
            && (!polled || samples - k.read_at_sample < PIN_REFRESH_SAMPLES)
        {
            return Ok(k.affinity.clone());
        }
        let present = self.present_cpus()?;
        let affinity = self.on_domain_bounded(
            id,
            1,
            || format!("reading the vCPU pins of domain {id}"),
            move |dom| raw::vcpu_pin_info(dom, nvcpus, present, Definition::Live),
        )?;
        if let Some(known) = self.domains.get_mut(id) {
            known.pins = Some(KnownPins {
                read_at_sample: samples,
                affinity: affinity.clone(),
            });
        }
        Ok(affinity)
    }

    /// Register for pin-change events, once per connection, where libvirt emits them for every
    /// pin change (the QEMU driver). Elsewhere pins are polled.
    fn watch_pins(&mut self) {
        if !matches!(self.session.pin_events, PinEvents::Untried) {
            return;
        }
        if !self.event_loop {
            self.session.pin_events = PinEvents::Polled;
            return;
        }
        let register = |conn: &Connect| {
            if !conn.driver_type()?.eq_ignore_ascii_case("QEMU") {
                return Ok(None);
            }
            events::PinWatch::register(conn).map(Some)
        };
        // Not answering: tried again at the next sample.
        let Ok(registered) = self.on_host(2, "registering for pin-change events", register) else {
            return;
        };
        self.session.pin_events = PinEvents::Polled;
        match registered {
            Ok(Some(watch)) => {
                debug!("following vCPU pin changes through libvirt events");
                self.session.pin_events = PinEvents::Watched(watch);
            }
            Ok(None) => {}
            Err(e) => debug!(
                "no pin-change events ({}): re-reading pins every {PIN_REFRESH_SAMPLES} samples",
                e.message()
            ),
        }
    }

    /// Forget what was read once of the domains whose devices libvirt announced as added or
    /// removed since the last call (registering for those events first, once per connection),
    /// so their XML is read again: a hot-plugged VFIO or vDPA device pins a guest's memory.
    fn forget_replugged(&mut self) {
        if matches!(self.session.device_events, DeviceEvents::Untried) && self.event_loop {
            let register = |conn: &Connect| events::DeviceWatch::register(conn);
            // Not answering: tried again at the next sample.
            match self.on_host(2, "registering for device events", register) {
                Ok(Ok(watch)) => self.session.device_events = DeviceEvents::Watched(watch),
                Ok(Err(e)) => {
                    self.session.device_events = DeviceEvents::Unavailable;
                    debug!(
                        "no device events ({}): a hot-plugged device is seen on SIGHUP",
                        e.message()
                    );
                }
                Err(_) => {}
            }
        } else if !self.event_loop {
            self.session.device_events = DeviceEvents::Unavailable;
        }
        let DeviceEvents::Watched(watch) = &self.session.device_events else {
            return;
        };
        for uuid in watch.take() {
            if let Some(known) = self.domains.get_mut(&DomainId(uuid)) {
                known.read_again();
                debug!(
                    "domain {}: a device was added or removed; its XML is read again",
                    known.name
                );
            }
        }
    }

    /// Apply the pin changes libvirt announced since the last sample to the pins we know. A
    /// change we cannot apply makes the domain's pins unknown, so they are read again.
    fn apply_pin_events(&mut self) {
        let PinEvents::Watched(watch) = &self.session.pin_events else {
            return;
        };
        for change in watch.take() {
            if let Some(known) = self.domains.get_mut(&DomainId(change.uuid)) {
                known.set_pin(change.vcpu, change.cpus);
            }
        }
    }

    /// What the XML of domain `id` says, read once per run (and again after a device hot-plug
    /// or SIGHUP) with `virDomainGetXMLDesc`, vmbalance's metadata included. While it cannot be
    /// read again, the facts read before stand.
    fn facts(&mut self, id: &DomainId) -> HostResult<DomainFacts> {
        if let Some(known) = self.domains.get(id)
            && let Some(facts) = known.facts.as_ref().filter(|_| !known.facts_stale)
        {
            return Ok(facts.clone());
        }
        let read = self
            .on_domain_bounded(
                id,
                1,
                || format!("reading the XML of domain {id}"),
                |dom| dom.xml_desc(0),
            )
            .and_then(|xml| {
                DomainFacts::parse(&xml).ok_or_else(|| {
                    HostError::Other(anyhow!(
                        "the XML libvirt gave for domain {id} does not parse"
                    ))
                })
            });
        let Some(known) = self.domains.get_mut(id) else {
            return read;
        };
        match read {
            Ok(facts) => {
                known.facts = Some(facts.clone());
                known.facts_stale = false;
                Ok(facts)
            }
            Err(HostError::Stuck(_)) if known.facts.is_some() => {
                Ok(known.facts.clone().expect("checked"))
            }
            Err(e) => Err(e),
        }
    }

    /// Domain `id`, named `name`, in its run `run`, with its facts; `None` when it vanished or
    /// cannot be read (said once, see [`LibvirtHost::skip`]).
    fn described(&mut self, id: DomainId, name: &str, run: u32) -> HostResult<Option<DomainRef>> {
        let domain = DomainRef {
            run: Some(run),
            ..DomainRef::new(id, name)
        };
        let facts = self.facts(&id);
        Ok(self
            .skip(&domain, facts)?
            .map(|facts| DomainRef { facts, ..domain }))
    }

    /// The vCPU affinity of domain `id`'s persistent configuration (`nvcpus` vCPUs), read once
    /// per run; `None` for a transient domain, and for a domain not listed.
    fn configured(&mut self, id: &DomainId, nvcpus: u32) -> HostResult<Option<Vec<Vec<u32>>>> {
        match self.domains.get(id).map(|k| &k.configured) {
            None | Some(ConfiguredPins::Transient) => return Ok(None),
            Some(ConfiguredPins::Pinned(pins)) => return Ok(Some(pins.clone())),
            Some(ConfiguredPins::Unread) => {}
        }
        let present = self.present_cpus()?;
        let configured = self.on_domain_bounded(
            id,
            2,
            || format!("reading the configured vCPU pins of domain {id}"),
            move |dom| {
                if !dom.is_persistent()? {
                    return Ok(None);
                }
                raw::vcpu_pin_info(dom, nvcpus, present, Definition::Config).map(Some)
            },
        )?;
        if let Some(known) = self.domains.get_mut(id) {
            known.configured = configured
                .clone()
                .map_or(ConfiguredPins::Transient, ConfiguredPins::Pinned);
        }
        Ok(configured)
    }

    /// Keep the known pins true to the real affinity `vcpus` report, saying when it differs (a
    /// change made outside libvirt).
    fn note_real_affinity(&mut self, domain: &DomainRef, vcpus: &[VcpuInfo]) {
        let Some(known) = self.domains.get_mut(&domain.id) else {
            return;
        };
        for v in vcpus {
            let said = known
                .pins
                .as_ref()
                .and_then(|k| k.affinity.get(v.number as usize));
            if let Some(said) = said
                && *said != v.affinity
            {
                debug!(
                    "domain {} vCPU{}: affinity {:?}, not {:?} as libvirt last said (changed outside libvirt)",
                    domain.name, v.number, v.affinity, said
                );
                known.set_pin(v.number, Some(v.affinity.clone()));
            }
        }
    }

    /// Read each domain's facts, configured affinity and pins again: the operator changed
    /// something (SIGHUP), or the connection is new (its events may have been missed).
    fn read_everything_again(&mut self) {
        for known in self.domains.records_mut() {
            known.read_again();
            known.pins = None;
        }
    }

    /// Start a sample: no domain is unreadable yet, and the domains whose devices changed are
    /// read again.
    fn begin_sample(&mut self) {
        for known in self.domains.records_mut() {
            known.unreadable = false;
            known.missed_last = std::mem::take(&mut known.missed);
        }
        if self.budget_said && self.bounded.has_room_for_domains() {
            self.budget_said = false;
            log::info!("calls to libvirt return again: every domain is read");
        }
        self.forget_replugged();
    }

    /// The domains of a statistics sample, `records` (each with the instant it was read), each
    /// described and read with `read` (skipped where it gives nothing); then which domains are
    /// stuck is said.
    fn each_record<S>(
        &mut self,
        records: &[(raw::DomainStats, Instant)],
        mut read: impl FnMut(&mut Self, DomainRef, &raw::DomainStats, Instant) -> HostResult<Option<S>>,
    ) -> HostResult<Vec<S>> {
        let mut out = Vec::with_capacity(records.len());
        for (rec, at) in records {
            let Some(domain) = self.described(DomainId(rec.uuid), &rec.name, rec.id)? else {
                continue;
            };
            if let Some(sample) = read(self, domain, rec, *at)? {
                out.push(sample);
            }
        }
        self.say_stuck();
        Ok(out)
    }

    /// A sample taken domain by domain with `sample` (the driver has no bulk statistics, or a
    /// domain is stuck); then which domains are stuck is said.
    fn domain_by_domain<S>(&mut self, sample: fn(&mut Self) -> HostResult<S>) -> HostResult<S> {
        let out = sample(self)?;
        self.say_stuck();
        Ok(out)
    }

    fn present_cpus(&mut self) -> HostResult<u32> {
        match self.session.present_cpus {
            Some(n) => Ok(n),
            None => Ok(self.node_cpus()?.present),
        }
    }
}

impl Host for LibvirtHost {
    fn numad_running(&mut self) -> bool {
        // Only where the host is this machine: a remote host's processes are not ours to see.
        self.memory_source == MemorySource::ProcMeminfo && self.numad.running()
    }

    fn api_calls(&self) -> u64 {
        self.calls
    }

    /// Every domain's vCPU times from statistics records ([`LibvirtHost::stats_records`]), plus
    /// the pins where they are not known; per-domain calls where the driver has no bulk
    /// statistics.
    fn sample_vcpus(&mut self) -> HostResult<Vec<VcpuSample>> {
        self.begin_sample();
        let Some(records) = self.stats_records(sys::VIR_DOMAIN_STATS_VCPU)? else {
            if self.session.no_bulk_stats {
                return self.domain_by_domain(vcpus_domain_by_domain);
            }
            return self.vcpus_one_by_one();
        };
        self.samples += 1;
        self.watch_pins();
        self.apply_pin_events();
        let check_affinity = self.samples.is_multiple_of(AFFINITY_CHECK_SAMPLES);
        if check_affinity {
            debug!(
                "re-reading every vCPU's real affinity (changes made outside libvirt), every {AFFINITY_CHECK_SAMPLES} samples"
            );
        }
        self.each_record(&records, |h, domain, rec, at| {
            let from_bulk = match rec.u64("vcpu.maximum") {
                Some(max) => {
                    let max = u32::try_from(max).unwrap_or(u32::MAX);
                    let pins = h.known_pins(&domain.id, max);
                    let configured = h.configured(&domain.id, max);
                    match (h.skip(&domain, pins)?, h.skip(&domain, configured)?) {
                        (Some(affinity), Some(configured)) => {
                            Some(bulk_vcpus(rec, max, &affinity, configured.as_deref()))
                        }
                        _ => None,
                    }
                }
                // This driver's records carry no vCPU statistics.
                None => None,
            };
            // A vCPU that may run on several pCPUs is charged to no pCPU between the affinity
            // checks (only the per-domain call tells where it last ran): the scheduler leaves
            // such a vCPU floating only while it is idle, and pins it once it is not.
            let vcpus = match from_bulk {
                Some(vcpus) if !check_affinity => Some(vcpus),
                _ => {
                    // `vcpus` says a failure itself.
                    let read = h.vcpus(&domain.id);
                    let mut vcpus = read_or_skip(&domain, read)?;
                    if let Some(vcpus) = &mut vcpus {
                        h.note_real_affinity(&domain, vcpus);
                        // The run-queue delay is the record's: this call carries none.
                        for v in vcpus {
                            v.delay_ns = rec.vcpu_delay(v.number);
                        }
                    }
                    vcpus
                }
            };
            Ok(vcpus.map(|vcpus| VcpuSample { domain, vcpus, at }))
        })
    }

    /// Every domain's balloon figures from statistics records ([`LibvirtHost::stats_records`]);
    /// per-domain calls where the driver has no bulk statistics.
    fn sample_balloons(&mut self) -> HostResult<Vec<BalloonSample>> {
        self.begin_sample();
        let Some(records) = self.stats_records(sys::VIR_DOMAIN_STATS_BALLOON)? else {
            return self.domain_by_domain(balloons_domain_by_domain);
        };
        self.each_record(&records, |h, domain, rec, at| {
            let stats = match (rec.u64("balloon.current"), rec.u64("balloon.maximum")) {
                (Some(actual_kib), Some(max_kib)) => Some(BalloonStats {
                    actual_kib,
                    max_kib,
                    unused_kib: rec.u64("balloon.unused"),
                    mem_total_kib: rec.u64("balloon.available"),
                    mem_available_kib: rec.u64("balloon.usable"),
                    last_update: rec.u64("balloon.last-update"),
                    rss_kib: rec.u64("balloon.rss"),
                }),
                // This driver's records carry no balloon statistics: read the domain directly.
                _ => {
                    // `balloon_stats` says a failure itself.
                    let read = h.balloon_stats(&domain.id);
                    read_or_skip(&domain, read)?
                }
            };
            Ok(stats.map(|stats| BalloonSample { domain, stats, at }))
        })
    }

    /// The active domains, listed on a connection of the pool and waited for at most the
    /// deadline: a listing locks every domain in turn, so one domain held by a libvirt call that
    /// blocks (a dump or save to a file that does not open, a hung storage call) holds it up.
    /// While it does not answer, the domains of the last listing that did are used (said once),
    /// each read on its own, bounded too.
    fn active_domains(&mut self) -> HostResult<Vec<DomainRef>> {
        let flags = sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
        // The handles stay on the call's connection: only what they say comes back.
        let call = move |conn: &Connect| {
            Ok(conn
                .list_all_domains(flags)?
                .into_iter()
                .filter_map(|dom| {
                    // A domain that vanishes between the listing and these reads is not listed.
                    let (uuid, name) = (dom.uuid().ok()?, dom.name().ok()?);
                    Some((
                        DomainId(*uuid.as_bytes()),
                        name,
                        dom.id().unwrap_or(u32::MAX),
                    ))
                })
                .collect::<Vec<Listed>>())
        };
        let listing = self.listing.clone();
        let Ok(listed) = self.run_bounded(1, &listing, Kind::Listing, call) else {
            return self.last_listing();
        };
        let listed = listed
            .map_err(|e| self.error(e, || format!("listing the active domains of {}", self.uri)))?;
        self.listed(&listed);
        let mut out = Vec::with_capacity(listed.len());
        for (id, name, run) in listed {
            if let Some(domain) = self.described(id, &name, run)? {
                out.push(domain);
            }
        }
        Ok(out)
    }

    fn vcpus(&mut self, id: &DomainId) -> HostResult<Vec<VcpuInfo>> {
        let read = self.read_vcpus(id);
        self.note_unreadable(id, &read);
        read
    }

    fn node_cpus(&mut self) -> HostResult<NodeCpus> {
        let cpus = match self.on_host(1, "reading the host's online CPUs", raw::node_cpu_map)? {
            Ok((present, online)) => NodeCpus { present, online },
            Err(e) => match self.error(e, || "reading the host's online CPUs".into()) {
                HostError::Unsupported(_) => {
                    // Drivers without a CPU map: every CPU the node reports counts as online.
                    const WHAT: &str = "reading the host's CPU count";
                    let info = self
                        .on_host(1, WHAT, |conn| conn.node_info())?
                        .map_err(|e| self.error(e, || WHAT.into()))?;
                    NodeCpus {
                        present: info.cpus,
                        online: (0..info.cpus).collect(),
                    }
                }
                e => return Err(e),
            },
        };
        self.session.present_cpus = Some(cpus.present);
        Ok(cpus)
    }

    fn set_affinity(&mut self, id: &DomainId, vcpu: u32, cpus: &[u32]) -> HostResult<()> {
        let map = map_of_cpus(cpus, self.present_cpus()?);
        // Pinning takes the domain's job: not made while someone else holds it.
        self.on_domain_in_job(
            id,
            1,
            || format!("pinning vCPU {vcpu} of domain {id} to pCPUs {cpus:?}"),
            move |dom| dom.pin_vcpu(vcpu, &map),
        )?;
        // Keep the known pins true to what we just set.
        if let Some(known) = self.domains.get_mut(id) {
            known.set_pin(vcpu, Some(cpus.to_vec()));
        }
        Ok(())
    }

    fn balloon_stats(&mut self, id: &DomainId) -> HostResult<BalloonStats> {
        let read = self.read_balloon_stats(id);
        self.note_unreadable(id, &read);
        read
    }

    fn enable_balloon_stats(&mut self, id: &DomainId, period_secs: u32) -> HostResult<()> {
        let period = i32::try_from(period_secs).unwrap_or(i32::MAX);
        self.on_domain_in_job(
            id,
            1,
            || format!("setting the balloon statistics period of domain {id} (does it have a <memballoon> device?)"),
            move |dom| dom.set_memory_stats_period(period, sys::VIR_DOMAIN_AFFECT_LIVE),
        )
    }

    fn set_balloon(&mut self, id: &DomainId, kib: u64) -> HostResult<()> {
        self.on_domain_in_job(
            id,
            1,
            || format!("setting the balloon of domain {id} to {kib} KiB"),
            move |dom| dom.set_memory_flags(kib, sys::VIR_DOMAIN_MEM_LIVE),
        )
    }

    /// The host's total memory from libvirt (`virNodeGetMemoryStats`, all cells); what it has
    /// available as [`LibvirtHost::memory_figure`] says.
    fn host_memory(&mut self) -> HostResult<HostMemory> {
        const WHAT: &str = "reading the host's memory statistics";
        // The first read asks how many fields there are, then reads them.
        let known = self.session.node_memory_fields;
        let calls = if known > 0 { 1 } else { 2 };
        let (fields, known) = self
            .on_host(calls, WHAT, move |conn| {
                let mut known = known;
                raw::node_memory_stats(conn, &mut known).map(|fields| (fields, known))
            })?
            .map_err(|e| self.error(e, || WHAT.into()))?;
        self.session.node_memory_fields = known;
        let get = |name: &str| fields.iter().find(|(f, _)| f == name).map(|&(_, v)| v);
        let Some(total_kib) = get("total") else {
            return Err(HostError::Unsupported(format!("{WHAT}: no total reported")));
        };
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let (local, stalled_pct) = match self.memory_source {
            MemorySource::ProcMeminfo => (
                read("/proc/meminfo").and_then(|text| meminfo_available_kib(&text)),
                read("/proc/pressure/memory").and_then(|text| pressure_some_avg10(&text)),
            ),
            MemorySource::LibvirtFree => (None, None),
        };
        let available_kib = local.or_else(|| get("free")).unwrap_or(0).min(total_kib);
        Ok(HostMemory {
            total_kib,
            available_kib,
            stalled_pct,
        })
    }

    /// The nodes and their memory from the capabilities, their free memory from
    /// `virNodeGetCellsFreeMemory` (one call for all nodes).
    fn node_memory(&mut self) -> HostResult<Vec<NodeMemory>> {
        let Some(topology) = self.topology()? else {
            return Ok(Vec::new());
        };
        let nodes = topology.nodes();
        let (Some(&first), Some(&last)) = (nodes.first(), nodes.last()) else {
            return Ok(Vec::new());
        };
        if nodes.len() < 2 {
            return Ok(Vec::new());
        }
        // libvirt reads consecutive cells: from the first node to the last.
        let count = (last - first + 1) as i32;
        const WHAT: &str = "reading the NUMA nodes' free memory";
        let cells = move |conn: &Connect| conn.cells_free_memory(first as i32, count);
        let free_bytes = match self.on_host(1, WHAT, cells)? {
            Ok(free) => free,
            Err(e) => {
                return match self.error(e, || WHAT.into()) {
                    HostError::Unsupported(_) => Ok(Vec::new()),
                    e => Err(e),
                };
            }
        };
        Ok(nodes
            .iter()
            .filter_map(|&node| {
                let free = free_bytes.get((node - first) as usize)?;
                Some(NodeMemory {
                    node,
                    total_kib: topology.node_memory_kib(node)?,
                    free_kib: free / 1024,
                })
            })
            .collect())
    }

    /// The domains that did not answer in time, those not read in the last sample (the budget of
    /// calls was spent, or the cycle's time), and those whose read failed; one whose XML was
    /// never read is described by its name alone (nothing is known of it, but that it runs).
    fn stuck_domains(&self) -> Vec<DomainRef> {
        self.domains
            .sorted_runs()
            .into_iter()
            .filter(|(_, _, k)| k.stuck_said || k.unreadable || k.missed)
            .map(|(id, run, known)| {
                known.describe(id, run).unwrap_or_else(|| DomainRef {
                    run,
                    ..DomainRef::new(id, &known.name)
                })
            })
            .collect()
    }

    fn begin_cycle(&mut self) {
        self.bounded.begin_cycle();
    }

    fn set_call_deadline(&mut self, deadline: Duration) {
        if deadline != self.bounded.deadline() {
            log::debug!(
                "calls that may wait on a domain are waited for at most {:.1} s",
                deadline.as_secs_f64()
            );
            self.bounded.set_deadline(deadline);
        }
    }

    fn reload(&mut self) {
        self.read_everything_again();
        self.session.capabilities = Capabilities::Unread;
    }

    /// `virConnectGetCapabilities`, once per connection (and again after SIGHUP).
    fn topology(&mut self) -> HostResult<Option<Topology>> {
        if let Capabilities::Read(known) = &self.session.capabilities {
            return Ok(known.clone());
        }
        const WHAT: &str = "reading the host's capabilities";
        let topology = match self.on_host(1, WHAT, |conn| conn.capabilities())? {
            Ok(xml) => Topology::from_capabilities(&xml),
            Err(e) => match self.error(e, || WHAT.into()) {
                HostError::Unsupported(_) => None,
                e => return Err(e),
            },
        };
        self.session.capabilities = Capabilities::Read(topology.clone());
        Ok(topology)
    }

    /// Open the connection again (the daemon restarted or dropped it). What was learnt through the
    /// old connection (driver abilities, and each domain's facts and pins, whose events may have
    /// been missed) is read again; calls still running on a domain keep it busy.
    ///
    /// The open is bounded too: one that libvirtd does not answer in time goes on, and the next
    /// attempt takes its answer.
    fn reconnect(&mut self) -> HostResult<()> {
        let opening = self
            .opening
            .take()
            .unwrap_or_else(|| Opening::start(&self.uri, open));
        let deadline = self.bounded.deadline().max(Duration::from_secs(1));
        let conn = match opening.wait(deadline, self.stop) {
            Ok(conn) => conn,
            Err(NotOpened::Failed(e)) => return Err(HostError::Disconnected(format!("{e:#}"))),
            Err(NotOpened::Late | NotOpened::Stopping) => {
                self.opening = Some(opening);
                return Err(HostError::Disconnected(format!(
                    "libvirt at {} did not answer a new connection within {:.1} s",
                    self.uri,
                    deadline.as_secs_f64()
                )));
            }
        };
        self.session = Session::default();
        self.read_everything_again();
        self.conn = conn;
        self.bounded
            .set_connections(Connections::for_uri(&self.uri, &self.conn));
        Ok(())
    }
}

/// The instant midway between `before` and now: when a call that began at `before` and returned
/// now read its figures, give or take half its length.
fn midway(before: Instant) -> Instant {
    before + before.elapsed() / 2
}

/// The vCPUs of one bulk record: `vcpu.N.time` for each online vCPU N below `max`, with the
/// known pins and the configured affinity, where there is one.
fn bulk_vcpus(
    rec: &raw::DomainStats,
    max: u32,
    affinity: &[Vec<u32>],
    configured: Option<&[Vec<u32>]>,
) -> Vec<VcpuInfo> {
    (0..max)
        .filter_map(|n| {
            Some(VcpuInfo {
                number: n,
                cpu_time_ns: rec.u64(&format!("vcpu.{n}.time"))?,
                last_pcpu: None,
                affinity: affinity.get(n as usize).cloned().unwrap_or_default(),
                delay_ns: rec.vcpu_delay(n),
                configured: configured.and_then(|c| c.get(n as usize).cloned()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_available_memory_of_a_local_host_is_the_kernels_estimate() {
        for local in ["qemu:///system", "qemu:///session", "qemu+unix:///system"] {
            assert_eq!(
                MemorySource::for_uri(local),
                MemorySource::ProcMeminfo,
                "{local}"
            );
        }
        for remote in [
            "qemu+ssh://root@host/system",
            "qemu+tcp://host/system",
            "test:///default",
            "qemu://host/system",
        ] {
            assert_eq!(
                MemorySource::for_uri(remote),
                MemorySource::LibvirtFree,
                "{remote}"
            );
        }
        let meminfo = "MemTotal:       24576000 kB\nMemFree:          512000 kB\nMemAvailable:   20480000 kB\nShmem:          8192000 kB\n";
        assert_eq!(meminfo_available_kib(meminfo), Some(20_480_000));
        assert_eq!(meminfo_available_kib("MemTotal: 1 kB\n"), None);
        let pressure = "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\nfull avg10=4.00 avg60=1.00 avg300=0.10 total=6789\n";
        assert_eq!(pressure_some_avg10(pressure), Some(12.5));
        assert_eq!(pressure_some_avg10("full avg10=4.00\n"), None);
        // This machine's, where its kernel has PSI.
        if let Ok(text) = std::fs::read_to_string("/proc/pressure/memory") {
            assert!(pressure_some_avg10(&text).is_some_and(|p| (0.0..=100.0).contains(&p)));
        }
    }

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

    #[test]
    fn bulk_records_give_times_delays_and_known_pins() {
        let rec = raw::DomainStats {
            uuid: [7; 16],
            name: "g".into(),
            id: 3,
            fields: vec![
                ("vcpu.current".into(), raw::Value::Int(2)),
                ("vcpu.maximum".into(), raw::Value::Int(3)),
                ("vcpu.0.time".into(), raw::Value::Int(1_000)),
                ("vcpu.0.delay".into(), raw::Value::Int(250)),
                ("vcpu.2.time".into(), raw::Value::Int(3_000)),
                ("vcpu.2.wait".into(), raw::Value::Int(9)),
            ],
        };
        let vcpus = bulk_vcpus(&rec, 3, &[vec![0], vec![1], vec![1]], Some(&[vec![0, 1]]));
        // vCPU 1 is offline (no time): not listed. vCPU 2 reports no delay.
        assert_eq!(vcpus.len(), 2);
        assert_eq!(
            (vcpus[0].number, vcpus[0].cpu_time_ns, vcpus[0].delay_ns),
            (0, 1_000, Some(250))
        );
        assert_eq!(
            (vcpus[1].number, vcpus[1].cpu_time_ns, vcpus[1].delay_ns),
            (2, 3_000, None)
        );
        assert_eq!(vcpus[1].affinity, vec![1]);
        // Configured affinity where the configuration names the vCPU.
        assert_eq!(vcpus[0].configured, Some(vec![0, 1]));
        assert_eq!(vcpus[1].configured, None);
    }
}
