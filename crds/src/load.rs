//! Reading a Pipeline file, and reporting its problems with the file's name.

use std::fmt::Write as _;
use std::path::Path;

use crate::problem::Problem;
use crate::validate::parse_pipeline;
use crate::Pipeline;

/// Why a file could not be used: it could not be read, or it has problems.
#[derive(Debug)]
pub enum LoadError {
    Unreadable(String),
    Invalid(Vec<Problem>),
}

pub fn load(path: &Path) -> Result<Pipeline, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadError::Unreadable(format!("{}: cannot read the file: {e}", path.display()))
    })?;
    parse_pipeline(&text).map_err(|p| LoadError::Invalid(vec![p]))
}

/// One line per problem, `FILE:LINE: where: what to do`, then a count.
pub fn describe(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for p in problems {
        let _ = write!(out, "{}", path.display());
        if let Some(line) = p.line {
            let _ = write!(out, ":{line}");
        }
        if p.path.is_empty() {
            let _ = writeln!(out, ": {}", p.message);
        } else {
            let _ = writeln!(out, ": {}: {}", p.path, p.message);
        }
    }
    let count = problems.len();
    let _ = writeln!(
        out,
        "{}: {count} problem{}",
        path.display(),
        if count == 1 { "" } else { "s" }
    );
    out
}

impl LoadError {
    pub fn describe(&self, path: &Path) -> String {
        match self {
            LoadError::Unreadable(message) => format!("{message}\n"),
            LoadError::Invalid(problems) => describe(path, problems),
        }
    }
}
