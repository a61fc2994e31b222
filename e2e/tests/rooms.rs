//! The rooms of every crate import one another in one direction: a lower room never reaches up. A
//! room is a file (`consume/pull.rs` is the module `consume::pull`, `consume/mod.rs` is `consume`).
//! A cycle (a file that imports a file that, by some path, imports it back) fails here with the
//! loop spelled out, so that it is undone where it starts rather than discovered when the two no
//! longer compile apart. So does an index file (`mod.rs`, `lib.rs`) whose own item its children
//! import: the index names its children, so that import is a loop through it, and what the
//! children share belongs in a room of its own below them. Unit tests (`#[cfg(test)]` and
//! `tests.rs`) may use whatever they test with, and are left out.
//!
//! What an index re-exports (`pub use pull::Worker`, `pub use pipeline::*`) is not its own: an
//! import of it is an import of the room that defines it.

mod source_tree;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use source_tree::{product_lines, rust_files, workspace, CRATES};

/// One file of a crate.
struct Room {
    /// Its module path: `""` for the crate root, `consume::pull`.
    module: String,
    /// Its code without unit tests and comments.
    code: String,
    /// `mod.rs` or the crate root: it declares children.
    index: bool,
}

/// The rooms of the crate whose source folder is `src`, by module path.
fn rooms(src: &Path) -> BTreeMap<String, Room> {
    let root = if src.join("lib.rs").exists() {
        "lib.rs"
    } else {
        "main.rs"
    };
    let mut rooms = BTreeMap::new();
    for path in rust_files(src) {
        let relative = path.strip_prefix(src).expect("below src");
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let (module, index) = match parts.as_slice() {
            [only] if *only == root.trim_end_matches(".rs") => (String::new(), true),
            [only] if only == "lib" || only == "main" => continue,
            [first, ..] if first == "bin" => continue,
            [.., last] if last == "tests" => continue,
            [folders @ .., last] if last == "mod" => (folders.join("::"), true),
            all => (all.join("::"), false),
        };
        let text = std::fs::read_to_string(&path).expect("a source file is readable");
        rooms.insert(
            module.clone(),
            Room {
                module,
                code: without_tests_and_comments(&text),
                index,
            },
        );
    }
    rooms
}

fn without_tests_and_comments(text: &str) -> String {
    product_lines(text)
        .iter()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths `code` names after `prefix` (`crate::`, `super::`, `pull::`): each as its segments,
/// groups spelled out (`crate::{a::{b, c}, d}` is `a::b`, `a::c` and `d`).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    paths_after_at(code, prefix)
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}

/// `paths_after`, each with where in `code` it is.
fn paths_after_at(code: &str, prefix: &str) -> Vec<(usize, Vec<String>)> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let preceded_by_name = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        if !preceded_by_name {
            let mut found = Vec::new();
            expand(&code[at + prefix.len()..], &mut Vec::new(), &mut found);
            paths.extend(found.into_iter().map(|path| (at, path)));
        }
    }
    paths
}

/// Where the modules written inside a file (`mod names { … }`) are in its code.
fn inline_modules(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    for (at, _) in code.match_indices("mod ") {
        let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
        let before = code[line_start..at].trim();
        if !(before.is_empty() || before.starts_with("pub")) {
            continue;
        }
        let rest = &code[at + 4..];
        let name_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let Some(body) = rest[name_end..].trim_start().strip_prefix('{') else {
            continue;
        };
        let open = code.len() - body.len();
        ranges.push(open..open + block_end(body));
    }
    ranges
}

/// Where the block whose `{` is just before `text` closes: the index of its `}` in `text`, or
/// the end.
fn block_end(text: &str) -> usize {
    let mut depth = 1;
    text.char_indices()
        .find(|&(_, c)| {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            depth == 0
        })
        .map_or(text.len(), |(i, _)| i)
}

/// Reads one path (or group) at the start of `rest`, below `stem`, into `paths`.
fn expand(rest: &str, stem: &mut Vec<String>, paths: &mut Vec<Vec<String>>) {
    if let Some(group) = rest.strip_prefix('{') {
        let inner = &group[..block_end(group)];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices().chain([(inner.len(), ',')]) {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    let part = inner[start..i].trim();
                    if !part.is_empty() {
                        expand(part, &mut stem.clone(), paths);
                    }
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if name.is_empty() {
        if !stem.is_empty() {
            paths.push(stem.clone());
        }
        return;
    }
    stem.push(name.clone());
    match rest[name.len()..].strip_prefix("::") {
        Some(more) => expand(more, stem, paths),
        None => paths.push(stem.clone()),
    }
}

/// The items `room` defines itself (`pub struct X`, `fn y`, …), not those it re-exports.
fn defined(room: &Room) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in room.code.lines() {
        let mut words = line.split_whitespace().peekable();
        while let Some(word) = words.peek() {
            if word.starts_with("pub") || *word == "async" || *word == "unsafe" {
                words.next();
            } else {
                break;
            }
        }
        if let (Some(kind), Some(name)) = (words.next(), words.next()) {
            if ["struct", "enum", "fn", "trait", "type", "const", "static"].contains(&kind) {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && line.starts_with(|c: char| !c.is_whitespace()) {
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// What a crate's rooms import: the edges between rooms, and the index items children import.
struct Imports {
    edges: BTreeMap<String, BTreeSet<String>>,
    /// `(child, index, item)`.
    index_items: BTreeSet<(String, String, String)>,
}

fn imports(rooms: &BTreeMap<String, Room>) -> Imports {
    let mut imports = Imports {
        edges: rooms.keys().map(|m| (m.clone(), BTreeSet::new())).collect(),
        index_items: BTreeSet::new(),
    };
    for room in rooms.values() {
        let parent = parent_of(&room.module);
        let mut named: Vec<(String, Vec<String>)> = paths_after(&room.code, "crate::")
            .into_iter()
            .map(|p| (String::new(), p))
            .collect();
        let inline = inline_modules(&room.code);
        named.extend(
            paths_after_at(&room.code, "super::")
                .into_iter()
                .map(|(at, p)| {
                    // In a module written inside the file, `super` is the file itself.
                    let base = if inline.iter().any(|r| r.contains(&at)) {
                        room.module.clone()
                    } else {
                        parent.clone().unwrap_or_default()
                    };
                    supers(&base, p)
                }),
        );
        named.extend(
            paths_after(&room.code, "self::")
                .into_iter()
                .map(|p| (room.module.clone(), p)),
        );
        if room.index {
            // An index names its children by their own names: `pull::Worker`.
            for child in children_of(rooms, &room.module) {
                let leaf = child.rsplit("::").next().unwrap_or_default().to_string();
                named.extend(
                    paths_after(&room.code, &format!("{leaf}::"))
                        .into_iter()
                        .map(|mut p| {
                            p.insert(0, leaf.clone());
                            (room.module.clone(), p)
                        }),
                );
            }
        }
        for (base, path) in named {
            let Some((target, item)) = resolve(rooms, &base, &path) else {
                continue;
            };
            if target == room.module {
                continue;
            }
            if let Some(item) = &item {
                if rooms[&target].index
                    && is_below(&room.module, &target)
                    && defined(&rooms[&target]).contains(item)
                {
                    imports
                        .index_items
                        .insert((room.module.clone(), target.clone(), item.clone()));
                }
            }
            imports
                .edges
                .entry(room.module.clone())
                .or_default()
                .insert(target);
        }
    }
    imports
}

fn parent_of(module: &str) -> Option<String> {
    if module.is_empty() {
        return None;
    }
    Some(
        module
            .rsplit_once("::")
            .map_or(String::new(), |(p, _)| p.to_string()),
    )
}

/// `super::super::x` from `base`: the module it starts at, and the rest.
fn supers(base: &str, mut path: Vec<String>) -> (String, Vec<String>) {
    let mut base = base.to_string();
    while path.first().is_some_and(|s| s == "super") {
        path.remove(0);
        base = parent_of(&base).unwrap_or_default();
    }
    (base, path)
}

fn children_of(rooms: &BTreeMap<String, Room>, module: &str) -> Vec<String> {
    rooms
        .keys()
        .filter(|m| parent_of(m).as_deref() == Some(module) && !m.is_empty())
        .cloned()
        .collect()
}

fn is_below(module: &str, ancestor: &str) -> bool {
    ancestor.is_empty() && !module.is_empty() || module.starts_with(&format!("{ancestor}::"))
}

/// The room a path from `base` lands in and the item it names there, an index's re-export
/// followed to the room that defines it. None for a path outside the crate's rooms.
fn resolve(
    rooms: &BTreeMap<String, Room>,
    base: &str,
    path: &[String],
) -> Option<(String, Option<String>)> {
    let mut module = base.to_string();
    let mut rest = path;
    while let Some((first, more)) = rest.split_first() {
        let next = if module.is_empty() {
            first.clone()
        } else {
            format!("{module}::{first}")
        };
        if !rooms.contains_key(&next) {
            break;
        }
        module = next;
        rest = more;
    }
    let room = rooms.get(&module)?;
    let item = rest.first().cloned();
    match &item {
        Some(name) if room.index && !defined(room).contains(name) => {
            reexporter(rooms, room, name).or(Some((module, item)))
        }
        _ => Some((module, item)),
    }
}

/// The child room an index re-exports `name` from, by `pub use child::name`, `pub use
/// child::{.., name, ..}` or `pub use child::*` (whose room defines it).
fn reexporter(
    rooms: &BTreeMap<String, Room>,
    index: &Room,
    name: &str,
) -> Option<(String, Option<String>)> {
    for line in index.code.lines() {
        let Some(used) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let used = used.trim_end_matches(';');
        let mut paths = Vec::new();
        expand(used, &mut Vec::new(), &mut paths);
        for path in paths {
            let (base, path) = match path.first().map(String::as_str) {
                Some("crate") => (String::new(), path[1..].to_vec()),
                Some("self") => (index.module.clone(), path[1..].to_vec()),
                _ => (index.module.clone(), path),
            };
            let Some((target, item)) = resolve(rooms, &base, &path) else {
                continue;
            };
            if target == index.module {
                continue;
            }
            let names_it = item.as_deref() == Some(name)
                || (item.is_none()
                    && used.ends_with("::*")
                    && defined(&rooms[&target]).contains(name));
            if names_it {
                return Some((target, Some(name.to_string())));
            }
        }
    }
    // An item no room spells out (a derive's, such as `Pipeline`) is the one glob's, if one.
    let globs: Vec<String> = index
        .code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub use ")?.strip_suffix("::*;"))
        .map(|room| match index.module.as_str() {
            "" => room.to_string(),
            module => format!("{module}::{room}"),
        })
        .filter(|room| rooms.contains_key(room))
        .collect();
    match globs.as_slice() {
        [only] => Some((only.clone(), Some(name.to_string()))),
        _ => None,
    }
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

fn shown(module: &str) -> &str {
    if module.is_empty() {
        "(the crate root)"
    } else {
        module
    }
}

#[test]
fn every_crate_imports_in_one_direction() {
    let mut found = BTreeSet::new();
    let mut loops = Vec::new();
    for folder in CRATES {
        let rooms = rooms(&workspace().join(folder));
        assert!(rooms.len() > 1, "{folder}: no rooms found");
        let mut imports = imports(&rooms);
        for (child, index, item) in &imports.index_items {
            found.insert(format!("{folder}: {}::{item}", shown(index)));
            // Reported below as what it is, not as the loop it makes.
            if let Some(edges) = imports.edges.get_mut(child) {
                edges.remove(index);
            }
        }
        if let Some(cycle) = a_cycle(&imports.edges) {
            loops.push(format!("{folder}: {cycle}"));
        }
    }
    assert!(
        loops.is_empty() && found.is_empty(),
        "rooms that import in a loop:\n{}\nindex items their children import (move each to a room below them):\n{}",
        loops.join("\n"),
        found.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
    );
}

#[test]
fn a_loop_and_an_index_item_imported_back_are_found() {
    let folder = tempfile::tempdir().expect("a temporary folder");
    let write = |name: &str, text: &str| {
        let path = folder.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod e;\npub use d::*;\n",
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
    write("e/mod.rs", "mod pull;\nmod worker;\npub use worker::Worker;\npub struct Shared;\nfn run() { pull::go() }\n");
    write("e/worker.rs", "pub struct Worker;\n");
    write(
        "e/pull.rs",
        "use super::worker::Worker;\nuse crate::e::Worker as Same;\n",
    );
    let found = imports(&rooms(folder.path()));
    assert_eq!(found.edges["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(
        found.edges["c"],
        BTreeSet::from(["d".to_string()]),
        "the glob followed to d"
    );
    assert_eq!(
        found.edges["e::pull"],
        BTreeSet::from(["e::worker".to_string()]),
        "the re-export followed"
    );
    assert_eq!(a_cycle(&found.edges), None, "{:?}", found.edges);
    assert!(found.index_items.is_empty());

    write("d.rs", "pub struct Spec;\nfn h() { crate::a::f() }\n");
    write("e/pull.rs", "use super::{worker::Worker, Shared};\n");
    let found = imports(&rooms(folder.path()));
    assert_eq!(
        a_cycle(&found.edges).as_deref(),
        Some("a -> b -> c -> d -> a"),
        "{:?}",
        found.edges
    );
    assert_eq!(
        found.index_items,
        BTreeSet::from([("e::pull".into(), "e".into(), "Shared".into())])
    );
}
