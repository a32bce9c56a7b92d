//! `memory_coordinator PERIOD`: not built yet; it says so instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "error: memory_coordinator is not implemented yet in this version of vmbalance; \
         only vcpu_scheduler is available"
    );
    ExitCode::FAILURE
}
