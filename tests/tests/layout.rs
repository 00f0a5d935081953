//! The layout ARCHITECTURE.md promises, checked on the source itself:
//! - no import circle between the files of a crate (a file's imports are
//!   the modules its `crate::`, `super::` and child paths name, outside its
//!   `#[cfg(test)]` part);
//! - no file's code (outside its `#[cfg(test)]` part, and outside files
//!   that are tests) over 700 lines;
//! - every folder's `mod.rs` and every crate's `lib.rs` opens with a few
//!   lines (`//!`) saying what lives there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates' source folders, from the workspace root.
const CRATES: &[&str] = &["proto/src", "common/src", "workload-api/src", "server/src", "agent/src"];

/// Lines of code a file may hold outside its tests.
const MAX_LINES: usize = 700;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines (`api::node::sync`; "" for the crate root).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> =
        rel.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        return String::new();
    }
    parts.join("::")
}

/// The code of a file: up to its `#[cfg(test)]` part, comments removed.
fn code(source: &str) -> String {
    let end = source.find("#[cfg(test)]").unwrap_or(source.len());
    source[..end]
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path (`a::b::c`, at least two segments) in `code` whose first
/// segment does not follow an identifier character or `::`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = is_ident(bytes[i])
            && !bytes[i].is_ascii_digit()
            && (i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            if j == start {
                break;
            }
            segments.push(bytes[start..j].iter().collect::<String>());
            if j + 1 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' {
                j += 2;
            } else {
                break;
            }
        }
        if segments.len() > 1 {
            out.push(segments);
        }
        i = j.max(i + 1);
    }
    out
}

/// The longest prefix of `path` that is a module of the crate.
fn resolve(modules: &BTreeSet<String>, path: &[String]) -> Option<String> {
    (1..=path.len()).rev().map(|k| path[..k].join("::")).find(|m| modules.contains(m))
}

/// The modules each file of a crate imports.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(src).unwrap();
            (module_of(rel), code(&std::fs::read_to_string(f).unwrap()))
        })
        .collect();
    let modules: BTreeSet<String> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (me, code) in &sources {
        let mut deps = BTreeSet::new();
        let own: Vec<String> =
            if me.is_empty() { Vec::new() } else { me.split("::").map(String::from).collect() };
        let parent = &own[..own.len().saturating_sub(1)];
        for path in paths(code) {
            match path[0].as_str() {
                "crate" => deps.extend(resolve(&modules, &path[1..])),
                "super" => {
                    let full: Vec<String> =
                        parent.iter().cloned().chain(path[1..].to_vec()).collect();
                    deps.insert(resolve(&modules, &full).unwrap_or_else(|| parent.join("::")));
                }
                // A child module named by a relative path (`use sync::...`).
                first => {
                    let child = own.iter().map(String::as_str).chain([first]).collect::<Vec<_>>();
                    if modules.contains(&child.join("::")) {
                        deps.insert(child.join("::"));
                    }
                }
            }
        }
        // `use super::*`.
        if code.contains("super::*") {
            deps.insert(parent.join("::"));
        }
        deps.remove(me);
        graph.insert(me.clone(), deps);
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut circle = stack[i..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(dep, graph, stack, done) {
                return Some(circle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_circle_between_the_files_of_a_crate() {
    for krate in CRATES {
        let graph = import_graph(&workspace().join(krate));
        let show =
            |m: &str| if m.is_empty() { "the crate root".to_string() } else { m.to_string() };
        if let Some(circle) = find_circle(&graph) {
            let names: Vec<String> = circle.iter().map(|m| show(m)).collect();
            panic!("{krate}: import circle {}", names.join(" -> "));
        }
    }
}

/// The checker sees what it must: a circle made on purpose is found.
#[test]
fn the_circle_checker_finds_a_circle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.rs"), "//! x\nmod a;\nmod b;\n").unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
    std::fs::write(dir.path().join("b.rs"), "pub struct B(super::a::A);\n").unwrap();
    let circle = find_circle(&import_graph(dir.path())).expect("a circle");
    assert!(circle.contains(&"a".to_string()) && circle.contains(&"b".to_string()));
    std::fs::write(dir.path().join("b.rs"), "pub struct B;\n").unwrap();
    assert_eq!(find_circle(&import_graph(dir.path())), None);
}

#[test]
fn no_file_holds_more_than_700_lines_of_code() {
    let mut over = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate), &mut files);
        for file in files {
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let source = std::fs::read_to_string(&file).unwrap();
            let end = source.find("#[cfg(test)]").unwrap_or(source.len());
            let lines = source[..end].lines().count();
            if lines > MAX_LINES {
                over.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(over.is_empty(), "files over {MAX_LINES} lines of code: {over:?}");
}

#[test]
fn every_folder_says_what_lives_there() {
    let mut silent = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate), &mut files);
        for file in files {
            let name = file.file_name().unwrap_or_default();
            if name == "mod.rs" || name == "lib.rs" {
                let source = std::fs::read_to_string(&file).unwrap();
                if !source.trim_start().starts_with("//!") {
                    silent.push(file.display().to_string());
                }
            }
        }
    }
    assert!(silent.is_empty(), "mod.rs/lib.rs without an opening //! comment: {silent:?}");
}
