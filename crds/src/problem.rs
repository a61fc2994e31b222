//! One thing wrong with a Pipeline, where it is and what to do: what validation, the layout and the
//! loader report, below all of them.

use std::fmt;

/// One thing wrong with a Pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where: `stages[1] machines > stages[0] wash`, `sources[0] clothes`, `metadata.name`, or empty.
    pub path: String,
    pub message: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
            line: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
