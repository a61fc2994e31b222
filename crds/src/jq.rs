//! jq filters, compiled with jaq. `validate` compiles every filter up front; the runtime runs them.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
pub use jaq_json::Val;

type Data = data::JustLut<Val>;

/// What went wrong with a filter or its input, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JqError {
    /// The filter does not compile: what is wrong, and where.
    Compile(String),
    /// The input is not JSON.
    NotJson(String),
    /// The filter failed on this input.
    Run(String),
}

impl std::fmt::Display for JqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JqError::Compile(why) => f.write_str(why),
            JqError::NotJson(why) => write!(f, "not JSON: {why}"),
            JqError::Run(why) => write!(f, "jq: {why}"),
        }
    }
}

impl std::error::Error for JqError {}

/// A compiled jq filter, ready to run on many inputs.
pub struct JqFilter {
    filter: jaq_core::compile::Filter<jaq_core::Native<Data>>,
}

impl std::fmt::Debug for JqFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JqFilter")
    }
}

impl JqFilter {
    /// Compiles `code`; the error says what is wrong and where, in words a person can act on.
    pub fn compile(code: &str) -> Result<JqFilter, JqError> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let arena = Arena::default();
        let loader = Loader::new(defs);
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errs| JqError::Compile(describe_load_errors(code, errs)))?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| {
                let mut parts = Vec::new();
                for (_file, undefined) in errs {
                    for (name, kind) in undefined {
                        parts.push(format!(
                            "undefined {} `{}` at {}",
                            kind.as_str(),
                            name,
                            position(code, name)
                        ));
                    }
                }
                JqError::Compile(parts.join("; "))
            })?;
        Ok(JqFilter { filter })
    }

    /// Runs the filter on one input; every output in order, or the first error.
    pub fn run(&self, input: Val) -> Result<Vec<Val>, JqError> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let mut outputs = Vec::new();
        for out in self.filter.id.run((ctx, input)).map(unwrap_valr) {
            outputs.push(out.map_err(|e| JqError::Run(e.to_string()))?);
        }
        Ok(outputs)
    }
}

/// Parses JSON bytes into a jq value.
pub fn parse_json(bytes: &[u8]) -> Result<Val, JqError> {
    jaq_json::read::parse_single(bytes).map_err(|e| JqError::NotJson(e.to_string()))
}

fn describe_load_errors(code: &str, errs: jaq_core::load::Errors<&str, ()>) -> String {
    use jaq_core::load::Error;
    let mut parts = Vec::new();
    for (_file, err) in errs {
        match err {
            Error::Io(items) => parts.extend(items.into_iter().map(|(p, e)| format!("{p}: {e}"))),
            Error::Lex(items) => parts.extend(items.into_iter().map(|(expect, at)| {
                format!("expected {} at {}", expect.as_str(), position(code, at))
            })),
            Error::Parse(items) => parts.extend(items.into_iter().map(|(expect, at)| {
                format!("expected {} at {}", expect.as_str(), position(code, at))
            })),
        }
    }
    parts.join("; ")
}

/// "column N" for a slice of `code` (jaq reports positions as sub-slices of the input).
fn position(code: &str, part: &str) -> String {
    let range = jaq_core::load::span(code, part);
    if range.start >= code.len() {
        "end of filter".to_string()
    } else {
        format!("column {}", range.start + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_a_filter_with_many_outputs() {
        let f = JqFilter::compile(".[] | select(. > 1) | . * 10").unwrap();
        let out = f.run(parse_json(b"[1,2,3]").unwrap()).unwrap();
        let text: Vec<String> = out.iter().map(|v| v.to_string()).collect();
        assert_eq!(text, vec!["20", "30"]);
    }

    #[test]
    fn object_addition_keeps_fields() {
        let f = JqFilter::compile(". + {worn: true}").unwrap();
        let out = f.run(parse_json(br#"{"item":1}"#).unwrap()).unwrap();
        assert_eq!(out[0].to_string(), r#"{"item":1,"worn":true}"#);
    }

    #[test]
    fn syntax_errors_name_the_column() {
        let err = JqFilter::compile(". + {worn: true")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("closing brace") || err.contains("expected"),
            "{err}"
        );
    }

    #[test]
    fn undefined_functions_are_reported() {
        let err = JqFilter::compile("nosuchfn(1)").unwrap_err().to_string();
        assert!(
            err.contains("undefined") && err.contains("nosuchfn"),
            "{err}"
        );
    }

    #[test]
    fn runtime_errors_are_errors() {
        let f = JqFilter::compile(".a.b").unwrap();
        assert!(f.run(parse_json(b"[1]").unwrap()).is_err());
    }
}
