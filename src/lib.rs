//! vmbalance: two daemons that keep a KVM/libvirt host fair.
//!
//! The crate is split the way the daemons work:
//! - **Observe** — [`host`] defines what is read from and changed on a hypervisor host;
//!   [`libvirt`] implements it with libvirt, and is the only module that touches libvirt.
//! - **Derive** — [`sampling`] turns successive counters into rates over the measured interval.
//! - **Decide** — [`cpu_plan`] is a pure function from a snapshot to pin moves.
//! - [`scheduler`] runs one observe-derive-decide-apply cycle against any [`host::Host`].
//!
//! The binaries in `src/bin` parse arguments, loop, and apply plans; [`daemon`] holds what they
//! share.

pub mod coordinator;
pub mod cpu_plan;
pub mod daemon;
pub mod host;
pub mod libvirt;
pub mod mem_plan;
pub mod sampling;
pub mod scheduler;
