//! The crate's modules form layers: no module imports one that imports it back (directly or
//! through others). Checked from the source: every `crate::MODULE` a top-level module's files
//! name in code (not in comments, not in their tests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module a file under `src/` belongs to (`src/libvirt/raw.rs` → `libvirt`), or
/// `None` for the crate root and the binaries.
fn module_of(path: &Path, src: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which top-level modules each one names (`crate::NAME`), its `#[cfg(test)]` modules left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    files(&src, &mut paths);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in paths {
        let Some(module) = module_of(&path, &src) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        // Code only: not its tests, and not comments (doc links name modules without importing).
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or("")
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let named = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let groups = rest.starts_with('{');
            if groups {
                // `use crate::{a, b::C}`: each group's first segment.
                let inner = &rest[1..rest.find('}').unwrap_or(rest.len())];
                for part in inner.split(',') {
                    let first = part.trim().split("::").next().unwrap_or("").to_string();
                    if !first.is_empty() && first != module && first != "named_enum" {
                        named.insert(first);
                    }
                }
            } else if !name.is_empty() && name != module && name != "named_enum" {
                named.insert(name);
            }
        }
    }
    graph
}

/// A path of imports from `from` back to `to`, if there is one.
fn path_back(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(from).into_iter().flatten() {
        if next == to {
            return Some(vec![from.to_string(), to.to_string()]);
        }
        if seen.insert(next.clone())
            && let Some(mut rest) = path_back(graph, next, to, seen)
        {
            rest.insert(0, from.to_string());
            return Some(rest);
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    let mut circles = Vec::new();
    for module in graph.keys() {
        if let Some(path) = path_back(&graph, module, module, &mut BTreeSet::new()) {
            circles.push(path.join(" -> "));
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

/// Lines a function of `src/` may have at most: one that needs more does several things.
const LONGEST_FUNCTION: usize = 79;

/// Each function of the `.rs` file `text` (its tests left out) and how many lines it spans,
/// from its `fn` line to the brace that closes it at the same indent.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..at];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "pub(crate)" | "const" | "unsafe" | "async"));
        if !is_fn || trimmed.ends_with(';') || trimmed.starts_with("//") {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((name, end + 2));
        }
    }
    out
}

#[test]
fn no_function_in_src_is_longer_than_it_can_be_read_whole() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    files(&src, &mut paths);
    let mut long = Vec::new();
    let mut counted = 0;
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.strip_prefix(&src).unwrap().display().to_string();
        for (name, lines) in function_lengths(&text) {
            counted += 1;
            // The plot's drawing is a list of calls to the drawing library, read as one.
            let drawing = file == "plot.rs" && name.starts_with("draw_");
            if lines > LONGEST_FUNCTION && !drawing {
                long.push(format!("{file}: {name} ({lines} lines)"));
            }
        }
    }
    assert!(counted > 300, "too few functions found: {counted}");
    assert!(
        long.is_empty(),
        "functions of 80 lines or more:\n{}",
        long.join("\n")
    );
    // The scanner itself: a function's lines run from its `fn` to its closing brace.
    let sample = "fn a() {\n    x();\n}\n\n    pub fn b(\n        y: u8,\n    ) {\n    }\n";
    assert_eq!(
        function_lengths(sample),
        [("a".to_string(), 3), ("b".to_string(), 4)]
    );
}
