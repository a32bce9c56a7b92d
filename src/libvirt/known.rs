//! What the libvirt layer knows of one run of a domain: its one record.
//!
//! [`LibvirtHost`](super::LibvirtHost) keeps a [`crate::tracker::Tracker`] of [`Known`], seen at
//! every listing that answers (the listing itself, or the records of a bulk statistics call) and
//! forgotten with the domain: nothing else in the layer is keyed by domain. A domain that runs anew
//! under the same UUID gets a fresh record, so no fact, pin or stuck call of its old run carries
//! over. Domain handles are not kept: each call looks its domain up on the connection it runs on.

use crate::domain_xml::DomainFacts;
use crate::host::{DomainId, DomainRef};

use super::bounded::Slot;

/// The vCPU affinity of a domain's persistent configuration, read when the vCPU scheduler first
/// needs it.
#[derive(Clone, Debug, Default)]
pub enum ConfiguredPins {
    /// Not read yet.
    #[default]
    Unread,
    /// The domain has no persistent configuration.
    Transient,
    /// Each vCPU's configured affinity, by vCPU number.
    Pinned(Vec<Vec<u32>>),
}

/// vCPU pins known for a domain, for bulk samples (which carry none).
#[derive(Clone, Debug)]
pub struct KnownPins {
    /// The bulk sample they were read at.
    pub read_at_sample: u64,
    /// Each vCPU's affinity, by vCPU number.
    pub affinity: Vec<Vec<u32>>,
}

/// One run of one domain, as the libvirt layer knows it.
#[derive(Debug)]
pub struct Known {
    /// Its name, from the listing.
    pub name: String,
    /// What its XML says, once read.
    pub facts: Option<DomainFacts>,
    /// Its facts are to be read again (a device was hot-plugged, or SIGHUP); the old ones stand
    /// until the new ones are read.
    pub facts_stale: bool,
    /// Its configured vCPU affinity.
    pub configured: ConfiguredPins,
    /// Its vCPU pins, where known.
    pub pins: Option<KnownPins>,
    /// Room for one call on it at a time; busy while a call on it has not returned.
    pub slot: Slot,
    /// It was said not to answer (and not yet said to answer again).
    pub stuck_said: bool,
    /// Its read failed in the last sample otherwise than by vanishing, not answering or losing
    /// the connection.
    pub unreadable: bool,
    /// A call on it in the last sample was not answered (or not made: the budget of calls
    /// running at once was spent, or someone else holds it), so it was not read.
    pub missed: bool,
    /// It was missed in the previous sample: it goes first in this one.
    pub missed_last: bool,
    /// Its QEMU's CPU time (ns, counted in clock ticks) at the last look while domains were read
    /// one by one; `None` while the bulk call answers.
    pub cpu_seen: Option<u64>,
    /// It was said to be held by someone else's job (and not yet said to be free again).
    pub held_said: bool,
    /// The failure said of its reads, until it reads again: a domain that keeps failing the
    /// same way is said once.
    pub failure_said: Option<String>,
}

impl Known {
    /// A domain named `name`, nothing read of it yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            facts: None,
            facts_stale: false,
            configured: ConfiguredPins::Unread,
            pins: None,
            slot: Slot::default(),
            stuck_said: false,
            unreadable: false,
            missed: false,
            missed_last: false,
            held_said: false,
            cpu_seen: None,
            failure_said: None,
        }
    }

    /// Read again what is read once per run (its XML, its configured affinity): something
    /// changed that it may depend on.
    pub fn read_again(&mut self) {
        self.facts_stale = true;
        self.configured = ConfiguredPins::Unread;
    }

    /// Domain `id`, in run `run`, with its facts; `None` until they are read.
    pub fn describe(&self, id: DomainId, run: Option<u32>) -> Option<DomainRef> {
        Some(DomainRef {
            facts: self.facts.clone()?,
            run,
            ..DomainRef::new(id, &self.name)
        })
    }

    /// vCPU `vcpu` now has affinity `cpus` (we set it, libvirt announced it, or the thread's
    /// real affinity says so); `None` when the change cannot be applied, which makes its pins
    /// unknown, to be read again.
    pub fn set_pin(&mut self, vcpu: u32, cpus: Option<Vec<u32>>) {
        let slot = self
            .pins
            .as_mut()
            .and_then(|k| k.affinity.get_mut(vcpu as usize));
        match (slot, cpus) {
            (Some(slot), Some(cpus)) => *slot = cpus,
            _ => self.pins = None,
        }
    }
}
