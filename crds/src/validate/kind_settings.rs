//! Each kind's own settings checked (a jq filter that compiles, a URL with a host, a subject
//! without wildcards): one arm a kind in each of the three matches. Whether a holder has exactly one
//! kind is `validate.rs`'s.

use crate::duration::parse_duration;
use crate::jq::JqFilter;
use crate::pipeline::{SinkKind, SourceKind, StepKind};
use crate::problem::Problem;

pub(super) fn is_valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '\t']))
}

pub(super) fn check_source_kind(problems: &mut Vec<Problem>, path: &str, kind: &SourceKind) {
    match kind {
        SourceKind::Generator(g) => {
            if let Some(rate) = g.rate_per_second {
                if !(rate > 0.0 && rate.is_finite()) {
                    problems.push(Problem::at(path, format!("generator.ratePerSecond {rate} must be a positive number (or leave it out to generate as fast as possible)")));
                }
            }
        }
        SourceKind::Http(h) => {
            if h.port == 0 {
                problems.push(Problem::at(path, "http.port must be between 1 and 65535"));
            }
            if let Some(p) = &h.path {
                if !p.starts_with('/') {
                    problems.push(Problem::at(
                        path,
                        format!("http.path `{p}` must start with '/'"),
                    ));
                }
            }
            if h.max_body_bytes == Some(0) {
                problems.push(Problem::at(path, "http.maxBodyBytes must be at least 1"));
            }
            if let Some(token) = &h.bearer_token {
                if !crate::secret::is_env_name(&token.env) {
                    problems.push(Problem::at(path, format!("http.bearerToken.env `{}` is not an environment variable's name: use letters, digits and `_`, not starting with a digit", token.env)));
                }
                if let Some(r) = &token.secret_key_ref {
                    if r.name.is_empty() || r.key.is_empty() {
                        problems.push(Problem::at(path, "http.bearerToken.secretKeyRef needs the Secret's name and the key that holds the token"));
                    }
                }
            }
        }
        SourceKind::Timer(t) => {
            crate::duration::check_duration(problems, path, "timer.interval", &t.interval)
        }
        SourceKind::Cron(c) => {
            if let Err(e) = c.schedule.parse::<croner::Cron>() {
                problems.push(Problem::at(path, format!("cron.schedule `{}` is not a cron schedule ({e}): use five fields, minute hour day-of-month month day-of-week, such as `*/5 * * * *` (or six, with seconds first)", c.schedule)));
            }
        }
        SourceKind::Nats(n) => {
            if n.subject.trim().is_empty() {
                problems.push(Problem::at(
                    path,
                    "nats.subject is empty: name the subject to consume",
                ));
            }
        }
        SourceKind::File(f) => {
            if f.path.trim().is_empty() {
                problems.push(Problem::at(
                    path,
                    "file.path is empty: name a JSON-lines file or a folder of them",
                ));
            }
        }
        SourceKind::Postgres(p) => crate::postgres_checks::check_source(problems, path, p),
    }
}

pub(super) fn check_sink_kind(problems: &mut Vec<Problem>, path: &str, kind: &SinkKind) {
    match kind {
        SinkKind::File(f) => {
            if f.path.trim().is_empty() {
                problems.push(Problem::at(
                    path,
                    "file.path is empty: name the file to write",
                ));
            }
        }
        SinkKind::Log(_) => {}
        SinkKind::Nats(n) => {
            if !is_valid_subject(&n.subject) {
                problems.push(Problem::at(path, format!("nats.subject `{}` is not a subject to publish to: use dot-separated tokens without wildcards", n.subject)));
            }
        }
        SinkKind::Http(h) => check_url(problems, path, "http.url", &h.url),
        SinkKind::Postgres(p) => crate::postgres_checks::check_sink(problems, path, p),
    }
}

pub(super) fn check_step_kind(problems: &mut Vec<Problem>, path: &str, kind: &StepKind) {
    match kind {
        StepKind::Jq(filter) => {
            if let Err(e) = JqFilter::compile(filter) {
                problems.push(Problem::at(
                    path,
                    format!("the jq filter `{filter}` does not compile: {e}"),
                ));
            }
        }
        StepKind::Exec(exec) => {
            if exec.command.first().is_none_or(|c| c.trim().is_empty()) {
                problems.push(Problem::at(path, "exec.command is empty: give the program and its arguments, such as [\"python3\", \"handler.py\"]"));
            }
        }
        StepKind::Http(http) => check_url(problems, path, "http.url", &http.url),
        StepKind::Sleep(sleep) => {
            if let Err(e) = parse_duration(sleep) {
                problems.push(Problem::at(path, format!("sleep: {e}")));
            }
        }
        StepKind::Passthrough(_) => {}
    }
}

fn check_url(problems: &mut Vec<Problem>, path: &str, field: &str, url: &str) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
        problems.push(Problem::at(
            path,
            format!("{field} `{url}` must be an http:// or https:// URL with a host"),
        ));
    }
}
