//! What both daemons share: the [`Daemon`] trait and [`serve`], which runs one against a host;
//! the command line ([`args`]), SIGHUP ([`reload`]), the loop ([`run`]) and the signals
//! ([`signals`]).

pub mod args;
pub mod reload;
pub mod run;
pub mod signals;

use std::time::Duration;

pub use crate::given::{AT_RESTART, Given};
pub use args::*;
pub use reload::{Running, options_not_reloaded, restart_options_not_in_the_guide};
pub use run::{LoopOptions, Turn, Turns, host_turn, run_cycles};
pub use signals::StopSignal;

use crate::host::{Host, HostResult};
use crate::metrics::Export;
use crate::report::Report;

/// A daemon: one cycle against a host at a time (observe, decide, act, and a report of it), and
/// its options applied at start and again on each reload.
pub trait Daemon {
    /// Its command line: its own options, with [`CommonArgs`] flattened in.
    type Args: clap::Parser + Clone;
    /// What one cycle reports.
    type Report: Report + Export;
    /// Its own options that apply only at a restart (long names), beside [`AT_RESTART`].
    const AT_RESTART: &'static [&'static str];

    /// The options every daemon takes, of `args`.
    fn common(args: &Self::Args) -> &CommonArgs;

    /// Run one cycle: `Ok(None)` when the host has no active domain.
    fn cycle(&mut self, host: &mut dyn Host) -> HostResult<Option<Self::Report>>;

    /// Apply `args` from the next cycle, keeping what the daemon knows; an error says why they
    /// cannot be (options that do not fit together, or not with the host), and nothing changes.
    fn configure(&mut self, args: &Self::Args) -> Result<(), String>;
}

/// Run `daemon` against `host` at `uri` with the options `running` (see [`run_cycles`]),
/// reconnecting the host when its connection drops (see [`host_turn`]). On SIGHUP the host
/// re-reads every domain's configuration, and the daemon its options ([`reload::reload`]).
pub fn serve<D: Daemon, H: Host>(
    daemon: &mut D,
    host: &mut H,
    uri: &str,
    running: Running<D::Args>,
) -> anyhow::Result<()> {
    let options = D::common(&running.args).loop_options();
    run_cycles(
        uri,
        options,
        Served {
            daemon,
            host,
            running,
        },
    )
}

/// A daemon served against its host.
struct Served<'a, D: Daemon, H> {
    daemon: &'a mut D,
    host: &'a mut H,
    running: Running<D::Args>,
}

impl<D: Daemon, H: Host> Turns for Served<'_, D, H> {
    type Report = D::Report;

    fn turn(&mut self) -> anyhow::Result<Turn<D::Report>> {
        host_turn(self.host, |h| self.daemon.cycle(h))
    }

    fn reload(&mut self) -> Option<Duration> {
        log::info!("SIGHUP: re-reading every domain's configured affinity, metadata and pins");
        self.host.reload();
        let period = reload::reload(self.daemon, &mut self.running)?;
        // The deadline of each call follows the period.
        self.host.set_call_deadline(call_deadline(period));
        Some(period)
    }
}
