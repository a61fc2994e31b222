//! A Pipeline manifest read (YAML or JSON), refused before parsing when it is too large or nested
//! too deep to be one.

use crate::pipeline::Pipeline;
use crate::problem::Problem;

/// Largest Pipeline manifest read: what the API server stores of one object at most (etcd's limit).
pub const MAX_MANIFEST_BYTES: usize = 1536 * 1024;
/// Deepest nesting of YAML (or JSON) collections in a manifest; the YAML reader stops at the same depth.
/// Checked before parsing, whose cost grows with the square of the depth of `[` and `{` nesting.
pub const MAX_MANIFEST_NESTING: usize = 128;

/// Parses a Pipeline manifest (YAML or JSON). A syntax or type error comes back with its line.
pub fn parse_pipeline(text: &str) -> Result<Pipeline, Problem> {
    check_size_and_nesting(text)?;
    let value: serde_norway::Value = serde_norway::from_str(text).map_err(yaml_problem)?;
    let field = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    if field("apiVersion") != "switchyard.dev/v1alpha1" || field("kind") != "Pipeline" {
        return Err(Problem::at(
            "",
            format!(
                "expected `apiVersion: switchyard.dev/v1alpha1` and `kind: Pipeline`, found apiVersion `{}` and kind `{}`",
                field("apiVersion"),
                field("kind")
            ),
        ));
    }
    // Deserialize from the text, not the value, so type errors keep their line numbers.
    serde_norway::from_str(text).map_err(yaml_problem)
}

/// Refuses, before parsing, a manifest too large or nested too deep to be a Pipeline.
fn check_size_and_nesting(text: &str) -> Result<(), Problem> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(Problem::at(
            "",
            format!(
                "the manifest has {} bytes and a Pipeline may have at most {MAX_MANIFEST_BYTES} (what the API server stores of one object)",
                text.len()
            ),
        ));
    }
    match flow_nesting_over(text, MAX_MANIFEST_NESTING) {
        None => Ok(()),
        Some(line) => Err(Problem {
            path: String::new(),
            message: format!(
                "collections nest more than {MAX_MANIFEST_NESTING} levels deep here: a Pipeline needs far fewer"
            ),
            line: Some(line),
        }),
    }
}

/// The line (1-based) where `[` and `{` first nest deeper than `limit`, outside quotes and comments.
fn flow_nesting_over(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let mut previous = b'\n';
    let mut escaped = false;
    for &b in text.as_bytes() {
        if b == b'\n' {
            line += 1;
            comment = false;
        }
        match quote {
            Some(_) if escaped => escaped = false,
            Some(b'"') if b == b'\\' => escaped = true,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if comment => {}
            None => match b {
                b'#' if previous.is_ascii_whitespace() => comment = true,
                b'"' | b'\'' => quote = Some(b),
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Some(line);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        previous = b;
    }
    None
}

fn yaml_problem(e: serde_norway::Error) -> Problem {
    let line = e.location().map(|l| l.line());
    let message = e.to_string();
    // serde_norway appends " at line L column C"; the line is reported separately.
    let message = match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    Problem {
        path: String::new(),
        message,
        line,
    }
}
