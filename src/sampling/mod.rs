//! Derive: turn successive raw readings into rates over the measured wall-clock interval.
//!
//! Three components, one file each. None keeps a map of domains: what is remembered of a domain
//! between samples ([`VcpuHistory`], [`MemoryHistory`]) lives in the record its daemon keeps of
//! the domain's run ([`crate::tracker`]), so a domain that vanishes or restarts takes its history
//! with it, and a stale reading is never compared with a new one.
//! - [`RateSeries`] (`rates.rs`) keeps the previous readings of one series (a vCPU's CPU time, a
//!   guest's used memory) with the instants they were taken, and answers with a per-second rate
//!   once it has two readings, and with how much that rate swings; a counter that goes backwards
//!   starts again.
//! - [`CpuSampler`] (`cpu.rs`) applies that to vCPU CPU times and run-queue delays and builds the
//!   [`CpuSnapshot`] the vCPU planner decides on; [`pcpu_usage`] and [`pcpu_demand`] charge each
//!   vCPU's figures to a pCPU.
//! - [`MemoryHistory`] (`memory.rs`) judges each balloon report (fresh, stale, settling, ...) and
//!   derives a guest's consumption rate for the memory planner.

mod cpu;
mod memory;
mod rates;

pub use cpu::{
    Allowed, CpuSampler, CpuSnapshot, VcpuHistory, VcpuKey, VcpuLoad, pcpu_demand, pcpu_usage,
};
pub use memory::{GuestMemory, Implausible, MemoryHistory, MemoryReading};
pub use rates::RateSeries;
