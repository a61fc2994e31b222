//! What `helm uninstall` does with the Pipelines that are left (the chart's pre-delete hook runs
//! `switchyard uninstall-hook`). Without the operator a Pipeline can no longer be deleted: its
//! finalizer waits for the operator to clean its NATS data, and its Deployments keep running. So
//! the hook either refuses (the default: the release stays, nothing is lost) or deletes every
//! Pipeline while the operator still runs and waits until they are gone.

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use switchyard_crds::Pipeline;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Fail, naming the Pipelines left: the release stays installed.
    Refuse,
    /// Delete them (their NATS data goes as their deletionPolicy says) and wait until they are gone.
    Delete,
}

/// The Helm release being uninstalled, as the chart passes it: a refusal names the commands to run
/// next exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    pub namespace: String,
    /// Its revision now: the one `helm rollback` brings back.
    pub revision: u32,
}

/// What the hook does now, given the Pipelines that are left.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is left: the uninstall goes on.
    Proceed,
    Refuse(String),
    /// Delete these (namespace/name).
    Delete(Vec<String>),
}

/// Pure: the hook's decision, and the message a refusal leaves in the Job's log.
pub fn decide(mode: Mode, left: &[String], release: &Release) -> Verdict {
    if left.is_empty() {
        return Verdict::Proceed;
    }
    let Release {
        name,
        namespace,
        revision,
    } = release;
    match mode {
        Mode::Delete => Verdict::Delete(left.to_vec()),
        // Helm keeps a release whose pre-delete hook failed as `uninstalling` and upgrades only a
        // deployed one: rolling back to the same revision makes it deployed again.
        Mode::Refuse => Verdict::Refuse(format!(
            "not uninstalling: {} left ({}); without the operator they could not be deleted (their finalizer waits for it) and their units would keep running. Everything is still in place; Helm lists the release as `uninstalling`. Either delete them (kubectl delete pipelines --all -A) and run `helm uninstall {name} -n {namespace}` again; or let the uninstall delete them: `helm rollback {name} {revision} -n {namespace}` (deployed again), `helm upgrade {name} CHART -n {namespace} --reuse-values --set uninstall.pipelines=delete`, then `helm uninstall {name} -n {namespace}`; or leave them running without an operator: `helm uninstall {name} -n {namespace} --no-hooks`",
            count(left.len()),
            shortlist(left)
        )),
    }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 Pipeline is".to_string()
    } else {
        format!("{n} Pipelines are")
    }
}

fn shortlist(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(5);
    let more_text = format!("and {more} more");
    if more > 0 {
        shown.push(&more_text);
    }
    shown.join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kubernetes(#[from] kube::Error),
    #[error("{0}")]
    Refused(String),
    #[error("{} still there after {}s: {}; `kubectl describe pipeline` says what each waits for", count(.left.len()), .waited.as_secs(), shortlist(.left))]
    StillThere { left: Vec<String>, waited: Duration },
}

async fn left(api: &Api<Pipeline>) -> Result<Vec<String>, kube::Error> {
    let list = api.list_metadata(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect())
}

/// The hook: Pipelines in `namespace` (or everywhere), refused or deleted as `mode` says.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    mode: Mode,
    release: &Release,
    timeout: Duration,
) -> Result<(), UninstallError> {
    let all: Api<Pipeline> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let names = left(&all).await?;
    match decide(mode, &names, release) {
        Verdict::Proceed => {
            tracing::info!("no Pipeline is left: uninstalling");
            Ok(())
        }
        Verdict::Refuse(message) => Err(UninstallError::Refused(message)),
        Verdict::Delete(names) => {
            for name in &names {
                let (ns, name) = name.split_once('/').unwrap_or(("", name));
                let api: Api<Pipeline> = Api::namespaced(client.clone(), ns);
                match api.delete(name, &DeleteParams::background()).await {
                    Ok(_) => tracing::info!(pipeline = %format!("{ns}/{name}"), "deleting"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let started = Instant::now();
            loop {
                let remaining = left(&all).await?;
                if remaining.is_empty() {
                    tracing::info!(
                        "{} deleted in {:.1}s: uninstalling",
                        names.len(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                if started.elapsed() >= timeout {
                    return Err(UninstallError::StillThere {
                        left: remaining,
                        waited: timeout,
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            name: "switchyard".into(),
            namespace: "switchyard-system".into(),
            revision: 1,
        }
    }

    #[test]
    fn nothing_left_proceeds_in_either_mode() {
        assert_eq!(decide(Mode::Refuse, &[], &release()), Verdict::Proceed);
        assert_eq!(decide(Mode::Delete, &[], &release()), Verdict::Proceed);
    }

    /// Found on the real node: the refusal advised `helm upgrade`, which Helm refuses for a release
    /// left `uninstalling` ("has no deployed releases"), and a bare `helm rollback` of a first
    /// revision fails ("release has no 0 version"); the same revision, named, works.
    #[test]
    fn a_refusal_names_what_is_left_and_the_exact_commands_on() {
        let left: Vec<String> = (1..=7).map(|i| format!("ns/p{i}")).collect();
        let Verdict::Refuse(message) = decide(Mode::Refuse, &left, &release()) else {
            panic!("not refused");
        };
        assert!(
            message
                .contains("7 Pipelines are left (ns/p1, ns/p2, ns/p3, ns/p4, ns/p5, and 2 more)"),
            "{message}"
        );
        assert!(message.contains("kubectl delete pipelines --all -A"));
        assert!(message.contains("`helm uninstall switchyard -n switchyard-system` again"));
        assert!(message.contains("`helm rollback switchyard 1 -n switchyard-system`"));
        let rollback = message.find("helm rollback").unwrap_or(usize::MAX);
        let upgrade = message.find("helm upgrade").unwrap_or(0);
        assert!(rollback < upgrade, "roll back before upgrading: {message}");
        assert!(message.contains("--reuse-values --set uninstall.pipelines=delete"));
        assert!(message.contains("`helm uninstall switchyard -n switchyard-system --no-hooks`"));
    }

    #[test]
    fn delete_mode_deletes_every_one() {
        let left = vec!["a/x".to_string(), "b/y".to_string()];
        assert_eq!(
            decide(Mode::Delete, &left, &release()),
            Verdict::Delete(left.clone())
        );
    }
}
