//! vmbalance: two daemons that keep a KVM/libvirt host fair.
//!
//! The crate is split the way the daemons work:
//! - **Observe** — [`host`] defines what is read from and changed on a hypervisor host, and how a
//!   call fails ([`host::HostError`]); [`libvirt`] implements it with libvirt, and is the only
//!   module that touches libvirt.
//! - **Derive** — [`sampling`] turns successive counters into rates over the measured interval.
//! - **Decide** — [`cpu_plan`] and [`mem_plan`] are pure functions from a snapshot to a plan (pin
//!   moves; balloon sizes), each the one home of its daemon's rules.
//! - **Cycle** — [`scheduler`] and [`coordinator`] run one observe-derive-decide-apply cycle
//!   against any [`host::Host`], and describe it in a [`report`] (the log line and `--json`).
//!
//! The binaries in `src/bin` parse arguments and hand a cycle to [`daemon`], which runs the loop
//! (period, signals, reconnection, output) for both.

#[macro_use]
mod named;

pub mod config;
pub mod coordinator;
pub mod cpu_plan;
pub mod cpuset;
pub mod daemon;
pub mod domain_xml;
pub mod exclusions;
pub mod given;
pub mod host;
pub mod ledger;
pub mod libvirt;
pub mod logging;
pub mod manual;
pub mod mem_plan;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod topology;
pub mod tracker;
