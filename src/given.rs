//! Each option as the user gave it, in the user's own words: what a reload compares and says.
//!
//! The options are declared once, in each daemon's command-line definition (clap), which gives
//! `--help`, the man page, the configuration file's keys ([`crate::config`]) and these words;
//! which of them apply only at a restart is [`AT_RESTART`] and each daemon's own list.

use clap::{ArgAction, ArgMatches, Command};

/// The options every daemon applies only at a restart, by long name: the connection and what it
/// may hold of libvirtd, the run's shape, the log level and the metrics endpoint. (`--config` itself cannot change: a reload
/// re-reads the file the command line names.)
pub const AT_RESTART: &[&str] = &[
    "connect",
    "cycles",
    "verbose",
    "quiet",
    "json",
    "wait",
    "metrics-address",
    "web-config-file",
    "max-libvirt-calls",
    "config",
];

/// Every option of a command with its value as given (the command line over the configuration
/// file, defaults where neither gave one), in declaration order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Given(Vec<Word>);

/// One option and its value, as the user writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Word {
    /// `--long-name`, or the value name of a positional argument (`PERIOD`).
    name: String,
    /// Its long name (empty for a positional argument), to match [`AT_RESTART`].
    long: String,
    /// Its value: the words given (space-separated), `true`/`false` for a flag, a count for a
    /// counted flag, `none` for an option neither given nor defaulted.
    value: String,
}

/// One option a reload changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// `--long-name` (or `PERIOD`).
    pub name: String,
    /// Its long name (empty for a positional argument).
    pub long: String,
    /// Its value before, and now.
    pub was: String,
    /// Its value now.
    pub now: String,
}

impl std::fmt::Display for Change {
    /// `--cushion-mib 256 -> 128`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.name, self.was, self.now)
    }
}

impl Change {
    /// Does it apply only at a restart, by [`AT_RESTART`] or `also` (a daemon's own)?
    pub fn at_restart(&self, also: &[&str]) -> bool {
        let long = self.long.as_str();
        AT_RESTART.contains(&long) || also.contains(&long)
    }
}

impl Given {
    /// The options of `command` as `matches` has them.
    pub fn of(command: &Command, matches: &ArgMatches) -> Self {
        let words = command
            .get_arguments()
            .filter(|arg| !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version))
            .map(|arg| {
                let id = arg.get_id().as_str();
                let value = match arg.get_action() {
                    ArgAction::Count => matches.get_count(id).to_string(),
                    _ => matches.get_raw(id).map_or_else(
                        || "none".to_string(),
                        |raw| {
                            raw.map(|w| w.to_string_lossy().into_owned())
                                .collect::<Vec<_>>()
                                .join(" ")
                        },
                    ),
                };
                let long = arg.get_long().unwrap_or_default().to_string();
                let name = if long.is_empty() {
                    arg.get_value_names()
                        .and_then(|names| names.first())
                        .map_or_else(|| id.to_uppercase(), |n| n.to_string())
                } else {
                    format!("--{long}")
                };
                Word { name, long, value }
            })
            .collect();
        Self(words)
    }

    /// What `new` gives otherwise than `self`, option by option.
    pub fn changes(&self, new: &Given) -> Vec<Change> {
        self.0
            .iter()
            .zip(&new.0)
            .filter(|(was, now)| was.value != now.value)
            .map(|(was, now)| Change {
                name: was.name.clone(),
                long: was.long.clone(),
                was: was.value.clone(),
                now: now.value.clone(),
            })
            .collect()
    }

    /// `self`, with `change` made.
    pub fn with(mut self, change: &Change) -> Self {
        if let Some(word) = self.0.iter_mut().find(|w| w.name == change.name) {
            word.value.clone_from(&change.now);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    /// A daemon's command line in miniature.
    #[derive(Parser, Debug)]
    struct Args {
        #[arg(value_name = "PERIOD")]
        period: f64,
        #[arg(long, default_value_t = 256)]
        cushion_mib: u64,
        #[arg(long)]
        max_changes: Option<usize>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long = "exclude")]
        exclude: Vec<String>,
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
        #[arg(long)]
        connect: Option<String>,
    }

    fn given(words: &[&str]) -> Given {
        let command = Args::command();
        let matches = command.clone().try_get_matches_from(words).unwrap();
        Args::from_arg_matches(&matches).unwrap();
        Given::of(&command, &matches)
    }

    #[test]
    fn a_change_is_said_in_the_users_own_words() {
        let was = given(&["d", "3"]);
        let now = given(&[
            "d",
            "2.5",
            "--cushion-mib",
            "128",
            "--max-changes=4",
            "--dry-run",
            "--exclude",
            "rt-*",
            "--exclude",
            "db",
            "-vv",
            "--connect",
            "test:///default",
        ]);
        let said: Vec<String> = was.changes(&now).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            said,
            [
                "PERIOD 3 -> 2.5",
                "--cushion-mib 256 -> 128",
                "--max-changes none -> 4",
                "--dry-run false -> true",
                "--exclude none -> rt-* db",
                "--verbose 0 -> 2",
                "--connect none -> test:///default",
            ]
        );
        assert!(was.changes(&was).is_empty());
        // The connection applies at a restart only; the rest at once.
        let restart: Vec<bool> = was
            .changes(&now)
            .iter()
            .map(|c| c.at_restart(&[]))
            .collect();
        assert_eq!(restart, [false, false, false, false, false, true, true]);
        // What a reload applied is what runs from then on.
        let cushion = &was.changes(&now)[1];
        assert_eq!(was.clone().with(cushion).changes(&now).len(), 6);
    }
}
