//! Observe: what each unit's Deployment and NATS say now, as the status computation takes it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::context::Context;
use super::keys;
use super::nats::{self, NatsObservation};
use super::status::UnitObservation;
use crate::pause::{PauseState, UnitNow};
use crate::plan::{self, Plan};

/// The rollout facts of one Deployment (as `kubectl rollout status` reads them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    /// Seen by the Deployment controller, every replica updated and none of the old ones left: what
    /// ran before the latest spec runs nowhere any more.
    pub old_gone: bool,
    pub complete: bool,
    /// The Deployment controller gave up (its Progressing condition says ProgressDeadlineExceeded).
    pub failed: Option<String>,
}

/// Pure: the rollout of `deployment` as its own status tells it.
pub fn rollout(deployment: &Deployment) -> Rollout {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = deployment.status.as_ref() else {
        return Rollout {
            desired,
            ..Rollout::default()
        };
    };
    let seen = match (deployment.metadata.generation, status.observed_generation) {
        (Some(generation), Some(observed)) => observed >= generation,
        (None, _) => true,
        (Some(_), None) => false,
    };
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let old_gone = seen && updated >= desired && total <= updated;
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            c.message
                .clone()
                .unwrap_or_else(|| "the rollout timed out".to_string())
        });
    Rollout {
        desired,
        ready,
        updated,
        old_gone,
        complete: old_gone && available >= desired,
        failed,
    }
}

/// Waiting reasons of a container that will not get better by itself: its image cannot be had, its
/// configuration cannot be used, or it keeps exiting.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "StartError",
];

/// At most this much of a container's last words goes into a condition.
const MESSAGE_LIMIT: usize = 300;

/// The last thing a container said: the last line of its termination message (a log's tail), or
/// the message of that line when it is a JSON log record.
fn last_words(text: &str) -> String {
    let last = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let record: Option<serde_json::Value> = serde_json::from_str(last).ok();
    match record
        .as_ref()
        .and_then(|r| r["fields"]["message"].as_str())
    {
        Some(message) => shortened(message),
        None => shortened(last),
    }
}

fn shortened(text: &str) -> String {
    let text = text.trim().replace('\n', " | ");
    if text.chars().count() <= MESSAGE_LIMIT {
        text
    } else {
        format!("{}…", text.chars().take(MESSAGE_LIMIT).collect::<String>())
    }
}

/// Pure: why a container of a pod fails, if it does: `container stage: CrashLoopBackOff (exited
/// with 1: <its last message>)`.
fn container_failure(status: &ContainerStatus) -> Option<String> {
    let state = status.state.as_ref()?;
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or(state.terminated.as_ref());
    let exited = last.filter(|t| t.exit_code != 0).map(|t| {
        let mut text = format!("exited with {}", t.exit_code);
        if let Some(message) = t.message.as_deref().filter(|m| !m.trim().is_empty()) {
            text.push_str(&format!(": {}", last_words(message)));
        } else if let Some(reason) = t.reason.as_deref() {
            text.push_str(&format!(" ({reason})"));
        }
        text
    });
    if let Some(waiting) = state.waiting.as_ref() {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if FAILING_REASONS.contains(&reason) {
            let detail = exited.or_else(|| {
                waiting
                    .message
                    .as_deref()
                    .filter(|m| !m.trim().is_empty())
                    .map(shortened)
            });
            return Some(match detail {
                Some(detail) => format!("container {}: {reason} ({detail})", status.name),
                None => format!("container {}: {reason}", status.name),
            });
        }
        return None;
    }
    // Between two restarts: exited with an error, and about to be started again.
    match (&state.terminated, exited) {
        (Some(_), Some(detail)) if status.restart_count > 0 => {
            Some(format!("container {}: {detail}", status.name))
        }
        _ => None,
    }
}

/// Pure: why `pod` fails, if it does (its first failing container, init containers first, or the
/// scheduler's reason for not placing it).
pub fn pod_failure(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    failure_of(pod).map(|what| format!("pod {name}: {what}"))
}

/// The failure of a pod, without its name.
fn failure_of(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    if let Some(failure) = containers.filter_map(container_failure).next() {
        return Some(failure);
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| {
            format!(
                "Unschedulable ({})",
                shortened(c.message.as_deref().unwrap_or("no node fits"))
            )
        })
}

/// Pure: what a unit's failing pods say, once per distinct failure: `pod a: …`, or `pods a, b and
/// 3 more: …` when several fail alike.
pub fn unit_failures<'a>(pods: impl Iterator<Item = &'a Pod>) -> Vec<String> {
    let mut alike: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for pod in pods {
        if let Some(what) = failure_of(pod) {
            let name = pod.metadata.name.clone().unwrap_or_default();
            alike.entry(what).or_default().push(name);
        }
    }
    alike
        .into_iter()
        .map(|(what, mut names)| {
            names.sort();
            let who = match names.as_slice() {
                [one] => format!("pod {one}"),
                [a, b] => format!("pods {a}, {b}"),
                [a, b, rest @ ..] => format!("pods {a}, {b} and {} more", rest.len()),
                [] => String::new(),
            };
            format!("{who}: {what}")
        })
        .collect()
}

/// A hash of what the status reads of a pod: a change of it, and only that, brings its Pipeline back.
pub fn pod_failure_hash(pod: &Pod) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod_failure(pod).hash(&mut hasher);
    Some(hasher.finish())
}

/// Every unit as observed, from the Deployments just applied or cached, and NATS.
pub fn units(
    ctx: &Context,
    plan: &Plan,
    deployments: &BTreeMap<String, std::sync::Arc<Deployment>>,
    seen: &NatsObservation,
) -> Vec<UnitObservation> {
    plan.units
        .iter()
        .map(|u| {
            let r = deployments
                .get(&u.name)
                .map(|d| rollout(d))
                .unwrap_or_default();
            let scaled = u
                .is_switcher()
                .then(|| ctx.scale_record(&keys::unit(&plan.namespace, &plan.pipeline, &u.name)))
                .flatten();
            UnitObservation {
                name: u.name.clone(),
                deployment: plan::object_name(&plan.pipeline, &u.name),
                desired: r.desired,
                ready: r.ready,
                updated: r.updated,
                rolled_out: r.complete,
                rollout_failed: r.failed,
                lag: seen.lag.get(&u.name).map(|&pending| {
                    let reports =
                        ctx.reports
                            .fresh(&keys::unit(&plan.namespace, &plan.pipeline, &u.name));
                    switchyard_crds::unit::items_pending(pending, &reports)
                }),
                rate: ctx.rate(&plan.namespace, &plan.pipeline, &u.name),
                rows: ctx.rows(&plan.namespace, &plan.pipeline, &u.name),
                join: ctx.join_waiting(&plan.namespace, &plan.pipeline, &u.name),
                dead_lettered: seen.dead_lettered.get(&u.name).copied().unwrap_or(0),
                last_scale_time: scaled.as_ref().and_then(|r| r.last_scale_time.clone()),
                last_scale_reason: scaled.map(|r| r.reason),
                failing: unit_failures(
                    ctx.caches
                        .unit_pods(&plan.namespace, &plan.pipeline, &u.name)
                        .iter()
                        .map(|p| p.as_ref()),
                ),
            }
        })
        .collect()
}

/// The books per edge, each settled when its reader stayed idle while they were read; none when
/// they could not be read.
pub fn edges(plan: &Plan, seen: &NatsObservation) -> Vec<switchyard_crds::EdgeStatus> {
    let Some((books, settled)) = &seen.books else {
        return Vec::new();
    };
    let configs: Vec<_> = plan.units.iter().map(|u| u.config.clone()).collect();
    books
        .edges(&switchyard_crds::books::wiring(&configs))
        .into_iter()
        .map(|e| switchyard_crds::EdgeStatus {
            settled: settled.contains(&e.to),
            from: e.from,
            epoch: e.epoch,
            to: e.to,
            stored: e.out,
            taken_in: e.received,
        })
        .collect()
}

/// Where the Pipeline stands with `spec.paused`, from its Deployments (cached) and the lags just read.
pub fn pause(
    ctx: &Context,
    pipeline: &switchyard_crds::Pipeline,
    plan: &Plan,
    seen: &NatsObservation,
) -> PauseState {
    let was_paused = pipeline.status.as_ref().and_then(|s| s.phase.as_deref())
        == Some(super::status::PHASE_PAUSED);
    let units: Vec<UnitNow> = plan
        .units
        .iter()
        .map(|u| {
            let name = plan::object_name(&plan.pipeline, &u.name);
            let pods = ctx
                .caches
                .deployment(&plan.namespace, &name)
                .and_then(|d| d.status.as_ref().and_then(|s| s.replicas))
                .unwrap_or(0);
            UnitNow {
                name: u.name.clone(),
                is_source: u.kind == switchyard_crds::topology::UnitType::Source,
                pods,
                lag: seen.lag.get(&u.name).copied(),
            }
        })
        .collect();
    crate::pause::decide(pipeline.spec.paused, was_paused, &units)
}

/// Lag and dead letters; a failure leaves them unknown (logged), since the units themselves are fine.
pub async fn nats_figures(
    js: &async_nats::jetstream::Context,
    plan: &Plan,
    key: &str,
) -> NatsObservation {
    let dead_letter_subjects: BTreeMap<String, String> = plan
        .units
        .iter()
        .map(|u| (u.name.clone(), u.dead_letters.clone()))
        .collect();
    match nats::observe(js, &plan.nats, &dead_letter_subjects).await {
        Ok(seen) => seen,
        Err(e) => {
            tracing::warn!(pipeline = %key, "cannot read lag: {e}");
            NatsObservation::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    fn deployment(generation: i64, replicas: i32, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..DeploymentSpec::default()
            }),
            status: Some(status),
            ..Deployment::default()
        };
        d.metadata.generation = Some(generation);
        d
    }

    fn status(
        observed: i64,
        total: i32,
        updated: i32,
        ready: i32,
        available: i32,
    ) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(total),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        }
    }

    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodCondition, PodStatus,
    };

    fn pod(name: &str, status: PodStatus) -> Pod {
        let mut pod = Pod {
            status: Some(status),
            ..Pod::default()
        };
        pod.metadata.name = Some(name.into());
        pod
    }

    fn container(waiting: Option<&str>, last_exit: Option<(i32, &str)>) -> ContainerStatus {
        ContainerStatus {
            name: "stage".into(),
            restart_count: i32::from(last_exit.is_some()) * 3,
            state: Some(ContainerState {
                waiting: waiting.map(|reason| ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some("back-off 40s restarting failed container".into()),
                }),
                ..ContainerState::default()
            }),
            last_state: last_exit.map(|(code, message)| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    message: Some(message.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }
    }

    #[test]
    fn a_crash_loop_names_the_pod_and_the_containers_last_words() {
        let crashing = pod(
            "laundry-machines-1",
            PodStatus {
                container_statuses: Some(vec![container(
                    Some("CrashLoopBackOff"),
                    Some((1, "cannot set up the HTTP client")),
                )]),
                ..PodStatus::default()
            },
        );
        assert_eq!(
            pod_failure(&crashing).as_deref(),
            Some("pod laundry-machines-1: container stage: CrashLoopBackOff (exited with 1: cannot set up the HTTP client)")
        );
    }

    #[test]
    fn the_last_words_are_the_last_log_record() {
        let tail = "{\"level\":\"INFO\",\"fields\":{\"message\":\"starting\"}}\n{\"level\":\"ERROR\",\"fields\":{\"message\":\"step machines: cannot start the handler\"}}\n";
        assert_eq!(last_words(tail), "step machines: cannot start the handler");
        assert_eq!(last_words("plain\nlast line\n\n"), "last line");
    }

    #[test]
    fn an_image_that_cannot_be_pulled_and_an_init_container_are_failures_too() {
        let pulling = pod(
            "p-a",
            PodStatus {
                init_container_statuses: Some(vec![ContainerStatus {
                    name: "install-runtime".into(),
                    ..container(Some("ImagePullBackOff"), None)
                }]),
                container_statuses: Some(vec![container(Some("PodInitializing"), None)]),
                ..PodStatus::default()
            },
        );
        let failure = pod_failure(&pulling).unwrap();
        assert!(
            failure.starts_with("pod p-a: container install-runtime: ImagePullBackOff (back-off"),
            "{failure}"
        );
    }

    #[test]
    fn a_pod_starting_or_running_is_no_failure() {
        let starting = pod(
            "p-a",
            PodStatus {
                container_statuses: Some(vec![container(Some("ContainerCreating"), None)]),
                ..PodStatus::default()
            },
        );
        assert_eq!(pod_failure(&starting), None);
        let recovered = pod(
            "p-b",
            PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    state: Some(ContainerState::default()),
                    ..container(None, Some((137, "killed")))
                }]),
                ..PodStatus::default()
            },
        );
        assert_eq!(
            pod_failure(&recovered),
            None,
            "running again after a restart"
        );
    }

    #[test]
    fn an_unschedulable_pod_says_why() {
        let waiting = pod(
            "p-c",
            PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.".into()),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            },
        );
        assert_eq!(
            pod_failure(&waiting).as_deref(),
            Some("pod p-c: Unschedulable (0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.)")
        );
    }

    #[test]
    fn many_failing_pods_are_summed_up() {
        let pods: Vec<Pod> = (0..5)
            .map(|i| {
                pod(
                    &format!("p-{i}"),
                    PodStatus {
                        container_statuses: Some(vec![container(Some("ErrImagePull"), None)]),
                        ..PodStatus::default()
                    },
                )
            })
            .collect();
        let failures = unit_failures(pods.iter());
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].starts_with("pods p-0, p-1 and 3 more: container stage: ErrImagePull"),
            "{failures:?}"
        );
    }

    #[test]
    fn a_finished_rollout_is_complete() {
        assert!(rollout(&deployment(3, 2, status(3, 2, 2, 2, 2))).complete);
    }

    #[test]
    fn an_old_ready_pod_beside_a_pending_new_one_is_not_complete() {
        // The finding: updated=1 ready=1 unavailable=1 after an env change.
        let r = rollout(&deployment(2, 1, status(2, 2, 1, 1, 1)));
        assert!(!r.complete);
        assert_eq!((r.desired, r.ready, r.updated), (1, 1, 1));
    }

    #[test]
    fn a_spec_the_deployment_controller_has_not_seen_is_not_complete() {
        assert!(!rollout(&deployment(4, 1, status(3, 1, 1, 1, 1))).complete);
    }

    #[test]
    fn unavailable_new_replicas_are_not_complete() {
        assert!(!rollout(&deployment(2, 2, status(2, 2, 2, 2, 1))).complete);
    }

    #[test]
    fn a_switcher_at_zero_is_complete() {
        assert!(rollout(&deployment(2, 0, status(2, 0, 0, 0, 0))).complete);
    }
}
