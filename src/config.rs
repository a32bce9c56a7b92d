//! `--config FILE`: every option of a daemon in a TOML file, the command line over it, re-read on
//! SIGHUP.
//!
//! A key is an option's long name (`threshold = 15`, `max-changes = 4`; `max_changes` also works)
//! and `period` is PERIOD. Flags take `true`/`false`, counts (`verbose`) an integer, repeatable
//! options (`exclude`) a string or an array of strings, every other option a string or a number.
//! The file becomes command-line words placed before the real command line, and the whole is
//! parsed by the same definitions as `--help`: one set of names, checks and defaults, and an
//! option given on the command line wins over the file. An unknown key, a value of the wrong kind
//! or one an option refuses is an error naming the file and the line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command, Parser};

use crate::given::Given;

/// Why the options could not be made.
#[derive(Debug)]
pub enum Problem {
    /// The command line itself is wrong (clap's error, to be shown as clap shows it).
    CommandLine(clap::Error),
    /// The configuration file is wrong: one line naming it and where.
    File(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::CommandLine(e) => write!(f, "{}", first_paragraph(&e.render().to_string())),
            Problem::File(message) => f.write_str(message),
        }
    }
}

/// The options of `T` from the command line `argv` (program name first) and the file its
/// `--config` names, if any, with each option as given.
pub fn parse<T: Parser>(argv: &[OsString]) -> Result<(T, Given), Problem> {
    let Some(path) = config_path(argv) else {
        return options_of::<T>(T::command(), argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Problem::File(format!(
            "cannot read the configuration {}: {e}",
            path.display()
        ))
    })?;
    with_file::<T>(argv, &path, &text)
}

/// `argv` with the configuration `text` (read from `path`) under it, with each option as given.
pub fn with_file<T: Parser>(
    argv: &[OsString],
    path: &Path,
    text: &str,
) -> Result<(T, Given), Problem> {
    let at = |line: Option<usize>, message: &str| {
        Problem::File(match line {
            Some(line) => format!("{} line {line}: {message}", path.display()),
            None => format!("{}: {message}", path.display()),
        })
    };
    let command = T::command();
    let words = file_words(&command, text).map_err(|(line, m)| at(line, &m))?;
    let program = argv.first().cloned().unwrap_or_else(|| "daemon".into());
    let rest = &argv[argv.len().min(1)..];
    // The file alone (with a stand-in PERIOD when it has none): its own mistakes, by line.
    let mut alone: Vec<OsString> = vec![program.clone()];
    alone.extend(
        words
            .options
            .iter()
            .flat_map(|(_, w)| w.iter().map(OsString::from)),
    );
    alone.push(words.period.clone().map_or("1".into(), |(_, p)| p.into()));
    if let Err(e) = command.clone().try_get_matches_from(&alone) {
        let line = invalid_long(&e)
            .and_then(|long| words.options.iter().find(|(key, _)| key.name == long))
            .and_then(|(key, _)| key.line)
            .or_else(|| {
                words
                    .period
                    .as_ref()
                    .filter(|_| is_about_period(&e))
                    .and_then(|(line, _)| *line)
            });
        return Err(at(line, &first_paragraph(&e.render().to_string())));
    }
    // Then the file under the command line, which wins: an option the command line gives (a list
    // included) is not taken from the file.
    let given = given_on_command_line(&command, rest);
    let mut all: Vec<OsString> = vec![program];
    all.extend(
        words
            .options
            .iter()
            .filter(|(key, _)| !given.contains(&key.id))
            .flat_map(|(_, w)| w.iter().map(OsString::from)),
    );
    if let Some((_, period)) = &words.period
        && !given.iter().any(|id| id == "period")
    {
        all.push(period.into());
    }
    all.extend(rest.iter().cloned());
    options_of::<T>(command.args_override_self(true), &all)
}

/// The options of `T` that `command` (its definition) reads from `words`, with each as given.
fn options_of<T: Parser>(command: Command, words: &[OsString]) -> Result<(T, Given), Problem> {
    let matches = command
        .clone()
        .try_get_matches_from(words)
        .map_err(Problem::CommandLine)?;
    let options = T::from_arg_matches(&matches).map_err(Problem::CommandLine)?;
    Ok((options, Given::of(&command, &matches)))
}

/// Where `--config FILE` (or `--config=FILE`) of `argv` points.
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut words = argv.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_string_lossy();
        if word == "--" {
            return None;
        }
        if word == "--config" {
            return words.next().map(PathBuf::from);
        }
        if let Some(path) = word.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// A key of the file: the option's long name and id, and the line it is on.
#[derive(Debug)]
struct Key {
    name: String,
    id: String,
    line: Option<usize>,
}

/// The file as command-line words.
#[derive(Debug, Default)]
struct Words {
    /// Each option's key and words (`--threshold=15`, or `--dry-run`, or nothing for false).
    options: Vec<(Key, Vec<String>)>,
    /// PERIOD's line and value, if given.
    period: Option<(Option<usize>, String)>,
}

/// Keys that cannot be set in the file.
const NOT_IN_FILE: [&str; 4] = ["config", "help", "version", "man"];

/// The configuration `text` as words for `command`, or the line and message of its first mistake.
fn file_words(command: &clap::Command, text: &str) -> Result<Words, (Option<usize>, String)> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| line_of(text, span.start));
        (line, e.message().trim().to_string())
    })?;
    let mut words = Words::default();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let line = key_line(text, key);
        let wrong = |m: String| (line, m);
        if name == "period" {
            let period = scalar(value).map_err(|kind| {
                wrong(format!("'period' must be a number of seconds, not {kind}"))
            })?;
            words.period = Some((line, period));
            continue;
        }
        if NOT_IN_FILE.contains(&name.as_str()) {
            return Err(wrong(format!(
                "'{key}' cannot be set in the configuration file"
            )));
        }
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
        else {
            let known: Vec<&str> = std::iter::once("period")
                .chain(
                    command
                        .get_arguments()
                        .filter_map(|a| a.get_long())
                        .filter(|l| !NOT_IN_FILE.contains(l)),
                )
                .collect();
            return Err(wrong(format!(
                "unknown key '{key}' (the keys are: {})",
                known.join(", ")
            )));
        };
        let option_words = option_words(arg, key, &name, value).map_err(wrong)?;
        let id = arg.get_id().to_string();
        words.options.push((Key { name, id, line }, option_words));
    }
    Ok(words)
}

/// The command-line words of option `arg`, named `name`, set to `value` under `key` in the file;
/// else what is wrong with the value.
fn option_words(
    arg: &clap::Arg,
    key: &str,
    name: &str,
    value: &toml::Value,
) -> Result<Vec<String>, String> {
    let flag = format!("--{name}");
    Ok(match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => {
            if *on {
                vec![flag]
            } else {
                Vec::new()
            }
        }
        (ArgAction::SetTrue, other) => {
            return Err(format!(
                "'{key}' takes true or false, not {}",
                other.type_str()
            ));
        }
        (ArgAction::Count, toml::Value::Integer(n)) if (0..=3).contains(n) => {
            vec![flag; *n as usize]
        }
        (ArgAction::Count, _) => {
            return Err(format!("'{key}' takes a count from 0 to 3"));
        }
        (ArgAction::Append, toml::Value::Array(items)) => items
            .iter()
            .map(|item| {
                scalar(item)
                    .map(|v| format!("{flag}={v}"))
                    .map_err(|kind| format!("'{key}' lists {kind}, not a string"))
            })
            .collect::<Result<_, _>>()?,
        (_, value) => {
            let v = scalar(value)
                .map_err(|kind| format!("'{key}' takes a string or a number, not {kind}"))?;
            vec![format!("{flag}={v}")]
        }
    })
}

/// A string or a number as a command-line word; else the kind of value it is.
fn scalar(value: &toml::Value) -> Result<String, &'static str> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => Err(other.type_str()),
    }
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line on which `key` is set, where a line starts with it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| l.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// The long name of the option a clap error is about, if it names one.
fn invalid_long(e: &clap::Error) -> Option<String> {
    let arg = e.get(clap::error::ContextKind::InvalidArg)?.to_string();
    let long = arg.strip_prefix("--")?;
    Some(long.split([' ', '=', '<']).next()?.to_string())
}

/// Is a clap error about PERIOD (the positional)?
fn is_about_period(e: &clap::Error) -> bool {
    e.get(clap::error::ContextKind::InvalidArg)
        .is_some_and(|a| a.to_string().contains("PERIOD"))
}

/// The ids of the arguments the command line `rest` (without the program name) gives.
fn given_on_command_line(command: &clap::Command, rest: &[OsString]) -> Vec<String> {
    let relaxed = command
        .clone()
        .mut_arg("period", |a| a.required(false))
        .ignore_errors(true);
    let mut argv: Vec<OsString> = vec!["daemon".into()];
    argv.extend(rest.iter().cloned());
    let Ok(matches) = relaxed.try_get_matches_from(argv) else {
        return Vec::new();
    };
    command
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .collect()
}

/// The first paragraph of a rendered clap error, on one line.
pub fn first_paragraph(rendered: &str) -> String {
    rendered
        .trim_start()
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command line this process was started with, kept for re-reading the file on SIGHUP.
pub fn process_argv() -> Vec<OsString> {
    std::env::args_os().collect()
}

/// Parse `T` from this process's command line and configuration file, or exit: 0 after `--help`
/// or `--version`, 2 with one line for a mistake in either.
pub fn parse_or_exit<T: Parser>() -> (T, Given) {
    match parse::<T>(&process_argv()) {
        Ok(parsed) => parsed,
        Err(Problem::CommandLine(e))
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(problem) => {
            eprintln!("{problem} (see --help)");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's options in small.
    #[derive(Parser, Debug, PartialEq)]
    struct Opts {
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        period: u32,
        #[arg(long, default_value_t = 10)]
        threshold: u32,
        #[arg(long)]
        max_changes: Option<u32>,
        #[arg(long)]
        dry_run: bool,
        #[arg(short, long, action = ArgAction::Count)]
        verbose: u8,
        #[arg(long = "exclude")]
        exclude: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    fn argv(words: &[&str]) -> Vec<OsString> {
        std::iter::once("daemon")
            .chain(words.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn parse(words: &[&str], text: &str) -> Result<Opts, String> {
        with_file::<Opts>(&argv(words), Path::new("/etc/x.toml"), text)
            .map(|(opts, _)| opts)
            .map_err(|p| p.to_string())
    }

    #[test]
    fn every_option_can_be_set_and_the_command_line_wins() {
        let text = "period = 3\nthreshold = 15\nmax_changes = 4\ndry-run = true\nverbose = 1\nexclude = ['rt-*', 'db']\n";
        let o = parse(&[], text).unwrap();
        assert_eq!(
            o,
            Opts {
                period: 3,
                threshold: 15,
                max_changes: Some(4),
                dry_run: true,
                verbose: 1,
                exclude: vec!["rt-*".into(), "db".into()],
                config: None,
            }
        );
        let o = parse(&["--threshold", "20", "5"], text).unwrap();
        assert_eq!((o.period, o.threshold, o.max_changes), (5, 20, Some(4)));
        // A list given on the command line replaces the file's.
        let o = parse(&["--exclude", "web", "--exclude", "mail"], text).unwrap();
        assert_eq!(o.exclude, ["web", "mail"]);
    }

    #[test]
    fn mistakes_name_the_file_and_the_line() {
        let e = parse(&[], "period = 3\n\nthreshhold = 15\n").unwrap_err();
        assert!(
            e.starts_with("/etc/x.toml line 3: unknown key 'threshhold'"),
            "{e}"
        );
        assert!(e.contains("threshold"), "{e}");
        let e = parse(&[], "period = 3\nthreshold = -1\n").unwrap_err();
        assert!(
            e.starts_with("/etc/x.toml line 2:") && e.contains("-1"),
            "{e}"
        );
        let e = parse(&[], "period = 0\n").unwrap_err();
        assert!(e.starts_with("/etc/x.toml line 1:"), "{e}");
        let e = parse(&[], "period = 3\ndry-run = 'yes'\n").unwrap_err();
        assert!(
            e.starts_with("/etc/x.toml line 2: 'dry-run' takes true or false"),
            "{e}"
        );
        let e = parse(&[], "period = 3\nthreshold = [\n").unwrap_err();
        assert!(e.starts_with("/etc/x.toml line 2:"), "{e}");
        let e = parse(&[], "config = 'other.toml'\n").unwrap_err();
        assert!(e.contains("'config' cannot be set"), "{e}");
    }

    #[test]
    fn period_comes_from_the_command_line_when_both_give_it() {
        assert_eq!(parse(&["7"], "period = 3\n").unwrap().period, 7);
        assert_eq!(parse(&["-v"], "period = 3\n").unwrap().period, 3);
        assert!(parse(&[], "threshold = 3\n").is_err());
    }

    #[test]
    fn the_config_option_is_found_in_either_spelling() {
        assert_eq!(config_path(&argv(&["--config", "/a"])), Some("/a".into()));
        assert_eq!(
            config_path(&argv(&["-v", "--config=/b", "3"])),
            Some("/b".into())
        );
        assert_eq!(config_path(&argv(&["3", "--", "--config"])), None);
    }
}
