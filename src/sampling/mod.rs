//! Derive: turn successive raw readings into rates over the measured wall-clock interval.
//!
//! Three components, one file each:
//! - [`Rates`] (`rates.rs`) keeps the previous readings of every series (a vCPU's CPU time, a
//!   guest's used memory) with the instants they were taken, and answers with a per-second rate
//!   once a series has two readings, and with how much that rate swings. A series that was not read
//!   in a cycle (its domain vanished) is forgotten at the end of that cycle, and a counter that goes
//!   backwards (its domain restarted) starts again, so a stale reading is never compared with a
//!   new one.
//! - [`CpuSampler`] (`cpu.rs`) applies that to vCPU CPU times and run-queue delays and builds the
//!   [`CpuSnapshot`] the vCPU planner decides on; [`pcpu_usage`] and [`pcpu_demand`] charge each
//!   vCPU's figures to a pCPU.
//! - [`MemorySampler`] (`memory.rs`) judges each balloon report (fresh, stale, settling, ...) and
//!   derives a guest's consumption rate for the memory planner.

mod cpu;
mod memory;
mod rates;

pub use cpu::{Allowed, CpuSampler, CpuSnapshot, VcpuKey, VcpuLoad, pcpu_demand, pcpu_usage};
pub use memory::{GuestMemory, MemoryReading, MemorySampler};
pub use rates::Rates;
