//! The rooms of a folder import one another in one direction: a lower room never reaches up. A cycle
//! (a file that imports a file that, by some path, imports it back) fails here with the loop spelled
//! out, so that it is undone where it starts rather than discovered when the two no longer compile
//! apart. Unit tests (`#[cfg(test)]` and `tests.rs`) may use whatever they test with, and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room of `folder` (a `.rs` file or a subfolder, named without `.rs`) and the rooms it names
/// after one of `prefixes` (`crate::`, `super::`), in a `use` or a path.
fn imports(folder: &Path, prefixes: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    collect(folder, None, &mut files);
    let rooms: BTreeSet<String> = files.iter().map(|(room, _)| room.clone()).collect();
    let glob_reexports = reexported_globs(folder, &rooms);
    let mut graph: BTreeMap<String, BTreeSet<String>> =
        rooms.iter().map(|r| (r.clone(), BTreeSet::new())).collect();
    for (room, path) in &files {
        let text = std::fs::read_to_string(path).expect("a source file is readable");
        let code = without_tests_and_comments(&text);
        for prefix in prefixes {
            for named in named_after(&code, prefix) {
                let target = if rooms.contains(&named) {
                    Some(&named)
                } else if named.starts_with(char::is_uppercase) {
                    // `crate::Pipeline` is the room whose items lib.rs re-exports with a glob.
                    glob_reexports.iter().next()
                } else {
                    None
                };
                if let Some(target) = target.filter(|t| *t != room) {
                    graph
                        .entry(room.clone())
                        .or_default()
                        .insert(target.clone());
                }
            }
        }
    }
    graph
}

fn collect(folder: &Path, room: Option<&str>, files: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(folder)
        .expect("the folder exists")
        .map(|e| e.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if path.is_dir() {
            collect(&path, Some(room.unwrap_or(&name)), files);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "tests" {
            match room {
                Some(room) => files.push((room.to_string(), path)),
                None if !["lib", "mod", "main"].contains(&name.as_str()) => {
                    files.push((name, path))
                }
                None => {}
            }
        }
    }
}

/// Rooms that `lib.rs` or `mod.rs` re-export whole (`pub use pipeline::*;`).
fn reexported_globs(folder: &Path, rooms: &BTreeSet<String>) -> BTreeSet<String> {
    ["lib.rs", "mod.rs"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(folder.join(f)).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("pub use ")?.strip_suffix("::*;"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|r| rooms.contains(r))
        .collect()
}

fn without_tests_and_comments(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first name after each `prefix`, or every name inside the braces that follow it.
fn named_after(code: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let preceded_by_name = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_name {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            // Only names at the group's top level are rooms: `{nats::{self, X}, Context}`.
            let mut depth = 0;
            let mut top = String::new();
            for c in group[..end].chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ if depth == 0 => top.push(c),
                    _ => {}
                }
            }
            names.extend(
                top.split(',')
                    .filter_map(|part| part.trim().split("::").next())
                    .filter(|n| !n.is_empty())
                    .map(str::to_string),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// One loop of the graph, spelled `a -> b -> a`, if there is any.
fn a_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit(
        room: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if let Some(start) = path.iter().position(|r| r == room) {
            let mut cycle = path[start..].to_vec();
            cycle.push(room.to_string());
            return Some(cycle.join(" -> "));
        }
        if done.contains(room) {
            return None;
        }
        path.push(room.to_string());
        for next in graph.get(room).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(room.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|room| visit(room, graph, &mut Vec::new(), &mut done))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace")
        .to_path_buf()
}

fn assert_one_direction(folder: &str, prefixes: &[&str]) {
    let graph = imports(&workspace().join(folder), prefixes);
    assert!(graph.len() > 3, "{folder}: no rooms found: {graph:?}");
    if let Some(cycle) = a_cycle(&graph) {
        panic!("{folder} imports in a loop: {cycle}\n(the whole graph: {graph:#?})");
    }
}

#[test]
fn the_api_crate_imports_in_one_direction() {
    assert_one_direction("crds/src", &["crate::"]);
}

#[test]
fn the_controller_imports_in_one_direction() {
    assert_one_direction(
        "operator/src/controller",
        &["super::", "crate::controller::"],
    );
}

#[test]
fn a_loop_is_found_and_spelled_out() {
    let folder = tempfile::tempdir().expect("a temporary folder");
    let write = |name: &str, text: &str| std::fs::write(folder.path().join(name), text).unwrap();
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub use d::*;\n",
    );
    write(
        "a.rs",
        "use crate::{b::{self, X}, a};\n// crate::d is only mentioned\n",
    );
    write(
        "b.rs",
        "fn f() { crate::c::g() }\n#[cfg(test)]\nmod tests { use crate::a; }\n",
    );
    write("c.rs", "use crate::Spec;\n");
    write("d.rs", "pub struct Spec;\n");
    let graph = imports(folder.path(), &["crate::"]);
    assert_eq!(graph["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(a_cycle(&graph), None, "{graph:?}");
    write("d.rs", "pub struct Spec;\nfn h() { crate::a::f() }\n");
    let graph = imports(folder.path(), &["crate::"]);
    assert_eq!(
        a_cycle(&graph).as_deref(),
        Some("a -> b -> c -> d -> a"),
        "{graph:?}"
    );
}
