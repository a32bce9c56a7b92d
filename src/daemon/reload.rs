//! SIGHUP: re-read a daemon's options and apply what changed, in one way for both daemons.

use std::time::Duration;

use clap::{ArgAction, Parser};

use super::{Daemon, reparse_args};
use crate::given::{AT_RESTART, Given};

/// The options a daemon runs with, and as the user gave them.
pub struct Running<A> {
    /// The options.
    pub args: A,
    /// Each option in the user's words, as it runs: a change a reload could not apply (one
    /// that needs a restart) keeps its old words, so the next reload says it again.
    pub given: Given,
}

/// SIGHUP: re-read the command line and the `--config` file, and apply what changed to `daemon`
/// from the next cycle, keeping what it knows. The log says what changed in the user's words
/// (`--cushion-mib 256 -> 128`), and warns of each change that needs a restart. A bad file, or
/// options the daemon refuses, change nothing (one error line). The period to run at from now
/// on, or `None` when nothing was applied.
pub fn reload<D: Daemon>(daemon: &mut D, running: &mut Running<D::Args>) -> Option<Duration> {
    let Some(path) = D::common(&running.args).config.clone() else {
        log::info!("SIGHUP: no --config file to re-read");
        return None;
    };
    let (new, given) = match reparse_args::<D::Args>() {
        Ok(new) => new,
        Err(e) => {
            log::error!("reload: {e}; the running configuration is kept");
            return None;
        }
    };
    if let Err(e) = daemon.configure(&new) {
        log::error!(
            "reload: {}: {e}; the running configuration is kept",
            path.display()
        );
        return None;
    }
    let mut applied = Vec::new();
    let mut runs = running.given.clone();
    for change in running.given.changes(&given) {
        if change.at_restart(D::AT_RESTART) {
            log::warn!(
                "reload: {} changes at the next restart ({} -> {})",
                change.name,
                change.was,
                change.now
            );
        } else {
            runs = runs.with(&change);
            applied.push(change.to_string());
        }
    }
    log::info!(
        "reloaded {}: {}",
        path.display(),
        if applied.is_empty() {
            "nothing changed".to_string()
        } else {
            applied.join(", ")
        }
    );
    running.args = new;
    running.given = runs;
    Some(D::common(&running.args).period)
}

/// Values tried for an option by [`options_not_reloaded`]: a number, a fraction, a list of
/// pCPUs, a name pattern, an address.
const TRIED: &[&str] = &["7", "2", "0.5", "40", "0-1", "rt-*", "127.0.0.1:9999"];

/// The options of `A` that a reload neither applies nor says need a restart: each option outside
/// [`AT_RESTART`] and `at_restart` is given a value other than its default (from [`TRIED`]),
/// and must change what `applied` (the daemon's configuration, as its `configure` takes it, or
/// `None` when it refuses the options) sees. For each daemon's tests: a new option that is
/// never applied, nor listed as needing a restart, is caught.
pub fn options_not_reloaded<A: Parser>(
    at_restart: &[&str],
    applied: impl Fn(&A) -> Option<String>,
) -> Vec<String> {
    let parse = |words: &[&str]| {
        let mut argv = vec!["daemon"];
        argv.extend(words);
        A::try_parse_from(argv).ok()
    };
    let base = parse(&["3"]).and_then(|a| applied(&a));
    let mut missed = Vec::new();
    for arg in A::command().get_arguments() {
        if matches!(arg.get_action(), ArgAction::Help | ArgAction::Version) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            // PERIOD.
            if parse(&["5"]).and_then(|a| applied(&a)) == base {
                missed.push(arg.get_id().to_string());
            }
            continue;
        };
        if AT_RESTART.contains(&long) || at_restart.contains(&long) {
            continue;
        }
        let flag = format!("--{long}");
        let candidates: Vec<Vec<&str>> = if matches!(arg.get_action(), ArgAction::SetTrue) {
            vec![vec!["3", &flag]]
        } else {
            TRIED.iter().map(|v| vec!["3", &flag, v]).collect()
        };
        let changes = candidates.iter().any(|words| {
            parse(words)
                .and_then(|a| applied(&a))
                .is_some_and(|seen| Some(&seen) != base.as_ref())
        });
        if !changes {
            missed.push(long.to_string());
        }
    }
    missed
}

/// The options among [`AT_RESTART`] and `own` (a daemon's own) that `guide` (the operations
/// guide's text) does not list as applying only at a restart: for each daemon's tests, so the
/// guide follows the declarations.
pub fn restart_options_not_in_the_guide(guide: &str, own: &[&str]) -> Vec<String> {
    let listed = guide
        .split("apply only at a restart")
        .nth(1)
        .and_then(|rest| rest.split("A test of each daemon").next())
        .unwrap_or_default();
    AT_RESTART
        .iter()
        .chain(own)
        .filter(|long| !listed.contains(&format!("`--{long}`")))
        .map(|long| format!("--{long}"))
        .collect()
}
