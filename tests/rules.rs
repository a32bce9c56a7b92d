//! One home per rule: docs/DAEMON.md's "How it decides" and the planners' module docs number and name
//! the same rules, and every rule is named (`rule N`) where the code implements it.

use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The numbered, named rules of a list: lines `N. **Name.** …` (after `prefix`, e.g. `//! `).
fn rules(text: &str, prefix: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start().strip_prefix(prefix)?;
            let (number, rest) = line.split_once(". **")?;
            let number = number.parse().ok()?;
            let (name, _) = rest.split_once(".**")?;
            Some((number, name.to_string()))
        })
        .collect()
}

/// The "How it decides" section of the daemon's page, docs/DAEMON.md.
fn readme_decides(daemon: &str) -> String {
    let page = read(&format!("docs/{daemon}.md"));
    let (_, decides) = page
        .split_once("\n## How it decides")
        .unwrap_or_else(|| panic!("docs/{daemon}.md has no How it decides"));
    decides.split("\n## ").next().unwrap().to_string()
}

/// Rule numbers the code names, as `rule N`, `rules N-M` or `rules N and M` (any case), outside
/// module docs.
fn named_in_code(files: &[&str]) -> Vec<u32> {
    let mut named = Vec::new();
    for file in files {
        let code: String = read(file)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase();
        for (i, _) in code.match_indices("rule") {
            let rest = code[i + 4..].trim_start_matches('s').trim_start();
            let digits = |s: &str| -> Option<(u32, usize)> {
                let n = s.chars().take_while(char::is_ascii_digit).count();
                Some((s[..n].parse().ok()?, n))
            };
            let Some((first, len)) = digits(rest) else {
                continue;
            };
            let after = &rest[len..];
            let last = after
                .strip_prefix('-')
                .or_else(|| after.strip_prefix(" and "))
                .and_then(digits)
                .map_or(first, |(n, _)| n);
            named.extend(first..=last.max(first));
        }
    }
    named.sort();
    named.dedup();
    named
}

fn check(daemon: &str, module_doc: &str, code: &[&str]) {
    let readme = rules(&readme_decides(daemon), "");
    let planner = rules(&read(module_doc), "//! ");
    assert!(!planner.is_empty(), "{module_doc} states no numbered rules");
    assert_eq!(
        readme, planner,
        "docs/{daemon}.md's rules and {module_doc}'s disagree"
    );
    let numbers: Vec<u32> = planner.iter().map(|(n, _)| *n).collect();
    let expected: Vec<u32> = (1..=planner.len() as u32).collect();
    assert_eq!(numbers, expected, "{module_doc}: rules not numbered 1..N");
    let named = named_in_code(code);
    for (n, name) in &planner {
        assert!(
            named.contains(n),
            "rule {n} ({name}) is named nowhere in {code:?}"
        );
    }
    assert!(
        named.iter().all(|n| numbers.contains(n)),
        "the code names rules {named:?}; {module_doc} has {numbers:?}"
    );
}

#[test]
fn vcpu_rules_agree_between_readme_planner_and_code() {
    check(
        "vcpu_scheduler",
        "src/cpu_plan/mod.rs",
        &[
            "src/cpu_plan/mod.rs",
            "src/scheduler/allowed.rs",
            "src/cpu_plan/placement.rs",
            "src/cpu_plan/paying.rs",
            "src/cpu_plan/steps.rs",
            "src/scheduler/mod.rs",
        ],
    );
}

#[test]
fn memory_rules_agree_between_readme_planner_and_code() {
    check(
        "memory_coordinator",
        "src/mem_plan.rs",
        &["src/mem_plan.rs", "src/coordinator/mod.rs", "src/host.rs"],
    );
}

#[test]
fn the_rule_reader_reads_what_it_should() {
    let text = "1. **Pinning.** a\n   more\n2. **Balance.** b\n- not a rule\n";
    assert_eq!(
        rules(text, ""),
        [(1, "Pinning".to_string()), (2, "Balance".to_string())]
    );
}
