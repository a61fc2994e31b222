//! Cleanup on deletion: the Pipeline's stream and bucket are deleted (or kept with `deletionPolicy:
//! Retain`) before its finalizer goes. Deletion never strands a namespace: when the data cannot be
//! reached — a missing Secret, a namespace being deleted, a NATS server gone for longer than the
//! cleanup timeout — the finalizer is removed anyway and a Warning Event names what was left behind.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::discovery::ApiResource;
use kube::runtime::events::EventType;
use kube::Api;
use switchyard_crds::layout::Names;
use switchyard_crds::{DeletionPolicy, Pipeline, PipelineSpec};

use super::context::Context;
use super::nats::NatsError;
use super::resolve::{self, namespace_terminating, ResolveError};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot delete stream {stream} and bucket {bucket} yet: {source}")]
    Unreachable {
        stream: String,
        bucket: String,
        #[source]
        source: ResolveError,
    },
    #[error("cannot delete stream {stream} and bucket {bucket} yet: {source}")]
    Refused {
        stream: String,
        bucket: String,
        #[source]
        source: NatsError,
    },
}

/// What to do after a failed attempt to delete the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Retry,
    LetGo,
}

/// Pure: whether a deleted Pipeline keeps waiting for its data. A namespace being deleted will not get
/// its Secret back, so a missing Secret there ends at once; anything else waits out the timeout.
pub fn verdict(
    deleted_for: Duration,
    timeout: Duration,
    namespace_terminating: bool,
    secret_missing: bool,
) -> Verdict {
    if (namespace_terminating && secret_missing) || deleted_for >= timeout {
        Verdict::LetGo
    } else {
        Verdict::Retry
    }
}

/// Deletes (or keeps) the Pipeline's data. `Ok` means the finalizer may go.
pub async fn cleanup(
    ctx: &Context,
    meta: &ObjectMeta,
    spec: Option<&PipelineSpec>,
) -> Result<(), CleanupError> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let names = Names::new(&namespace, &name);
    let (stream, bucket) = (names.stream(), names.checkpoint_bucket());
    // A Pipeline that cannot be decoded still has a spec in the API: read what cleanup needs from it.
    let spec = match spec {
        Some(spec) => Some(spec.clone()),
        None => lenient_spec(ctx, &namespace, &name).await,
    };
    let policy = spec
        .as_ref()
        .and_then(|s| s.deletion_policy)
        .unwrap_or_default();
    if policy == DeletionPolicy::Retain {
        super::context::publish(
            ctx,
            meta,
            EventType::Normal,
            "Retained",
            format!("kept stream {stream} and bucket {bucket} (deletionPolicy: Retain)"),
        )
        .await;
        return Ok(());
    }
    let spec = spec.unwrap_or_else(empty_spec);
    let deleted = async {
        let js = resolve::nats(ctx, &namespace, &spec)
            .await
            .map_err(|source| CleanupError::Unreachable {
                stream: stream.clone(),
                bucket: bucket.clone(),
                source,
            })?;
        super::nats::bounded(
            "deleting the stream and bucket",
            switchyard_platform::admin::delete_named(&js, &stream, &bucket),
        )
        .await
        .map_err(|source| CleanupError::Refused {
            stream: stream.clone(),
            bucket: bucket.clone(),
            source,
        })
    }
    .await;
    match deleted {
        Ok(()) => {
            super::context::publish(
                ctx,
                meta,
                EventType::Normal,
                "Deleted",
                format!("stream {stream} and bucket {bucket}"),
            )
            .await;
            Ok(())
        }
        Err(error) => give_up_or_retry(ctx, meta, &namespace, error).await,
    }
}

async fn give_up_or_retry(
    ctx: &Context,
    meta: &ObjectMeta,
    namespace: &str,
    error: CleanupError,
) -> Result<(), CleanupError> {
    let deleted_for = meta
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            Duration::try_from(elapsed).unwrap_or_default()
        })
        .unwrap_or_default();
    let secret_missing = matches!(&error, CleanupError::Unreachable { source, .. } if source.is_secret_unavailable());
    let terminating = namespace_terminating(ctx, namespace).await;
    match verdict(
        deleted_for,
        ctx.cleanup_timeout,
        terminating,
        secret_missing,
    ) {
        Verdict::LetGo => {
            let why = if terminating && secret_missing {
                "its namespace is being deleted and the credentials Secret is gone or no longer readable"
                    .to_string()
            } else {
                format!(
                    "NATS was not reachable for {}s",
                    ctx.cleanup_timeout.as_secs()
                )
            };
            super::context::publish(
                ctx,
                meta,
                EventType::Warning,
                "CleanupAbandoned",
                format!("{error}; the Pipeline is deleted anyway because {why}: delete them by hand if they are not wanted"),
            )
            .await;
            Ok(())
        }
        Verdict::Retry => {
            super::context::publish(
                ctx,
                meta,
                EventType::Warning,
                "CleanupFailed",
                format!(
                    "{error}; retrying, and deleting the Pipeline without its data after {}s",
                    ctx.cleanup_timeout.as_secs()
                ),
            )
            .await;
            Err(error)
        }
    }
}

fn empty_spec() -> PipelineSpec {
    PipelineSpec {
        sources: Vec::new(),
        stages: Vec::new(),
        sinks: Vec::new(),
        nats: None,
        image: None,
        dead_letter: None,
        deletion_policy: None,
        paused: false,
        tracing: None,
        migration: None,
    }
}

/// `spec.nats` and `spec.deletionPolicy` of a Pipeline whose spec as a whole does not decode.
async fn lenient_spec(ctx: &Context, namespace: &str, name: &str) -> Option<PipelineSpec> {
    let resource = ApiResource::erase::<Pipeline>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
    let object = api.get_opt(name).await.ok().flatten()?;
    let spec = object.data.get("spec")?;
    let mut lenient = empty_spec();
    lenient.nats = spec
        .get("nats")
        .and_then(|n| serde_json::from_value(n.clone()).ok());
    lenient.deletion_policy = spec
        .get("deletionPolicy")
        .and_then(|p| serde_json::from_value(p.clone()).ok());
    Some(lenient)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(300);

    #[test]
    fn a_passing_fault_is_retried_until_the_timeout() {
        let s = Duration::from_secs;
        assert_eq!(verdict(s(10), TIMEOUT, false, false), Verdict::Retry);
        assert_eq!(verdict(s(10), TIMEOUT, false, true), Verdict::Retry);
        assert_eq!(verdict(s(10), TIMEOUT, true, false), Verdict::Retry);
        assert_eq!(verdict(s(300), TIMEOUT, false, false), Verdict::LetGo);
    }

    #[test]
    fn a_missing_secret_in_a_namespace_being_deleted_lets_go_at_once() {
        assert_eq!(verdict(Duration::ZERO, TIMEOUT, true, true), Verdict::LetGo);
    }
}
