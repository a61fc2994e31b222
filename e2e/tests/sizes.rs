//! Rooms stay readable alone: no product file over 600 lines, no function over 80 (unit tests,
//! `#[cfg(test)]` and `tests.rs`, left out). The test names each one over, with its size.

mod source_tree;

use std::collections::BTreeSet;

use source_tree::{product_lines, rust_files, workspace, CRATES};

const MOST_FILE_LINES: usize = 600;
const MOST_FUNCTION_LINES: usize = 80;

/// Each line's braces outside strings, chars and comments: +1 for `{`, -1 for `}`, and whether
/// the line has any.
fn braces_by_line(lines: &[&str]) -> Vec<(i32, bool)> {
    #[derive(Clone, Copy, PartialEq)]
    enum In {
        Code,
        Block,
        Str,
        Raw(usize),
    }
    let mut state = In::Code;
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        let chars: Vec<char> = line.chars().collect();
        let (mut delta, mut any) = (0, false);
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            match state {
                In::Block => {
                    if c == '*' && next == Some('/') {
                        state = In::Code;
                        i += 1;
                    }
                }
                In::Str => {
                    if c == '\\' {
                        i += 1;
                    } else if c == '"' {
                        state = In::Code;
                    }
                }
                In::Raw(hashes) => {
                    if c == '"'
                        && chars[i + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&h| h == '#')
                            .count()
                            == hashes
                    {
                        state = In::Code;
                        i += hashes;
                    }
                }
                In::Code => match c {
                    '/' if next == Some('/') => break,
                    '/' if next == Some('*') => {
                        state = In::Block;
                        i += 1;
                    }
                    '"' => state = In::Str,
                    'r' if matches!(next, Some('"') | Some('#'))
                        && !chars[..i]
                            .last()
                            .is_some_and(|p| p.is_alphanumeric() || *p == '_') =>
                    {
                        let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                        if chars.get(i + 1 + hashes) == Some(&'"') {
                            state = In::Raw(hashes);
                            i += 1 + hashes;
                        }
                    }
                    '\'' => {
                        // A char literal ('{', '\n'), not a lifetime ('a).
                        if next == Some('\\') {
                            if let Some(end) = chars[i + 2..].iter().position(|&c| c == '\'') {
                                i += 2 + end;
                            }
                        } else if chars.get(i + 2) == Some(&'\'') {
                            i += 2;
                        }
                    }
                    '{' => {
                        delta += 1;
                        any = true;
                    }
                    '}' => {
                        delta -= 1;
                        any = true;
                    }
                    _ => {}
                },
            }
            i += 1;
        }
        out.push((delta, any));
    }
    out
}

/// Each function of the file with a body: its name and length in lines.
fn functions(lines: &[&str]) -> Vec<(String, usize)> {
    let braces = braces_by_line(lines);
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let Some(at) = code.find("fn ") else {
            continue;
        };
        let before = code[..at].trim();
        let is_item = before.is_empty()
            || before.split_whitespace().all(|w| {
                w.starts_with("pub") || ["async", "const", "unsafe", "extern"].contains(&w)
            });
        if !is_item {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0;
        let mut opened = false;
        for (end, (delta, any)) in braces.iter().enumerate().skip(start) {
            if !opened && !any && lines[end].trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            depth += delta;
            opened |= *any;
            if opened && depth <= 0 {
                found.push((name.clone(), end - start + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn files_and_functions_stay_within_their_sizes() {
    let mut long_files = BTreeSet::new();
    let mut long_functions = BTreeSet::new();
    let mut sizes = Vec::new();
    for folder in CRATES {
        for path in rust_files(&workspace().join(folder)) {
            let text = std::fs::read_to_string(&path).expect("a source file is readable");
            let lines = product_lines(&text);
            let shown = path
                .strip_prefix(workspace())
                .unwrap_or(&path)
                .display()
                .to_string();
            if lines.len() > MOST_FILE_LINES {
                long_files.insert(shown.clone());
                sizes.push(format!("{shown}: {} lines", lines.len()));
            }
            for (name, length) in functions(&lines) {
                if length > MOST_FUNCTION_LINES {
                    long_functions.insert(format!("{shown}: {name}"));
                    sizes.push(format!("{shown}: {name}: {length} lines"));
                }
            }
        }
    }
    let problems: Vec<String> = long_files
        .iter()
        .map(|f| format!("file too long (split it): {f}"))
        .chain(
            long_functions
                .iter()
                .map(|f| format!("function too long (split it): {f}")),
        )
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n(all sizes over the limits today:\n{})",
        problems.join("\n"),
        sizes.join("\n")
    );
}

#[test]
fn a_function_is_measured_from_its_signature_to_its_closing_brace() {
    let text = r##"
pub(crate) async fn one(x: u32) -> u32 {
    let brace = '{';
    let text = "}}}";
    let raw = r#"{"a": {"#;
    // } a comment
    if x > 0 {
        x
    } else {
        0
    }
}

fn declared(&self);

impl X {
    fn two<'a>(&'a self) -> &'a str { "" }
}
"##;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        functions(&lines),
        vec![("one".to_string(), 11), ("two".to_string(), 1)]
    );
    let with_tests = "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\n";
    assert_eq!(product_lines(with_tests), vec!["fn a() {}"]);
}
