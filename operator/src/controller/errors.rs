//! Every way a reconcile can fail, by step, and the one place where a failure becomes a condition
//! reason, a metric label and what the controller does next.

use std::time::Duration;

use switchyard_crds::problem::Problem;

use super::apply::ApplyError;
use super::cleanup::CleanupError;
use super::migrate::MigrateError;
use super::resolve::ResolveError;

/// A Pipeline whose objects clash with another's is looked at again this often, since the other
/// Pipeline going away does not trigger it.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The object does not decode as a Pipeline (a CRD older or newer than the operator).
    #[error("the Pipeline cannot be read by this operator: {0}")]
    Decode(String),
    #[error("the spec has {} problem(s)", .0.len())]
    Invalid(Vec<Problem>),
}

#[derive(Debug, thiserror::Error)]
pub enum FinalizerError {
    #[error("cannot add the finalizer: {0}")]
    Add(#[source] kube::Error),
    #[error("cannot remove the finalizer: {0}")]
    Remove(#[source] kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot write the status: {0}")]
    Write(#[source] kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Finalizer(#[from] FinalizerError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Validate(#[from] ValidateError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// What the controller does after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again with growing back-off: the fault may pass by itself.
    Retry,
    /// Look again after this long: only something outside this Pipeline can fix it.
    Recheck(Duration),
    /// Nothing changes until the Pipeline does.
    AwaitChange,
}

impl Error {
    /// Label of `switchyard_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Finalizer(_) => "finalizer",
            Error::Resolve(ResolveError::Nats(_)) => "nats",
            Error::Resolve(_) => "credentials",
            Error::Validate(_) => "invalid_spec",
            Error::Apply(ApplyError::Nats(_)) => "nats",
            Error::Apply(ApplyError::Replicas(_)) => "nats_replicas",
            Error::Apply(ApplyError::NameConflict { .. }) => "name_conflict",
            Error::Apply(ApplyError::Refused { .. }) => "apply",
            Error::Apply(ApplyError::NamespaceTerminating { .. }) => "namespace_terminating",
            Error::Status(_) => "status",
            Error::Cleanup(_) => "cleanup",
            Error::Migrate(
                MigrateError::Apply(ApplyError::Nats(_)) | MigrateError::Nats { .. },
            ) => "nats",
            Error::Migrate(_) => "migration",
        }
    }

    /// Reason of the Ready and Degraded conditions and of the Warning Event; None: the failure says
    /// nothing about the Pipeline (its namespace is going, or writing the status itself failed).
    pub fn condition_reason(&self) -> Option<&'static str> {
        Some(match self {
            Error::Finalizer(_) => "FinalizerFailed",
            Error::Resolve(ResolveError::Nats(_)) | Error::Apply(ApplyError::Nats(_)) => {
                "NatsUnavailable"
            }
            Error::Apply(ApplyError::Replicas(_)) => "NatsReplicasUnavailable",
            Error::Resolve(_) => "CredentialsUnavailable",
            Error::Validate(_) => "InvalidSpec",
            Error::Apply(ApplyError::NameConflict { .. }) => "NameConflict",
            Error::Apply(ApplyError::Refused { .. }) => "ApplyFailed",
            Error::Cleanup(_) => "CleanupFailed",
            Error::Migrate(_) => "MigrationFailed",
            Error::Apply(ApplyError::NamespaceTerminating { .. }) | Error::Status(_) => {
                return None
            }
        })
    }

    pub fn next(&self) -> Next {
        match self {
            Error::Validate(_)
            | Error::Apply(ApplyError::NamespaceTerminating { .. })
            | Error::Migrate(MigrateError::Plan(_)) => Next::AwaitChange,
            Error::Apply(ApplyError::NameConflict { .. } | ApplyError::Replicas(_)) => {
                Next::Recheck(CONFLICT_RECHECK)
            }
            Error::Resolve(
                ResolveError::SecretMissing { .. }
                | ResolveError::SecretWithoutCredentials { .. }
                | ResolveError::SecretInvalid { .. },
            ) => Next::Recheck(CONFLICT_RECHECK),
            _ => Next::Retry,
        }
    }

    /// The problems a person reads in the conditions.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Error::Validate(ValidateError::Invalid(problems)) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => vec![error_chain(other)],
        }
    }
}

/// An error with its causes, as one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_a_reason_a_label_and_a_next_step() {
        let conflict = Error::Apply(ApplyError::NameConflict {
            kind: "ConfigMap",
            namespace: "ns".into(),
            name: "a-b-c".into(),
            owner: "Pipeline a".into(),
        });
        assert_eq!(conflict.condition_reason(), Some("NameConflict"));
        assert_eq!(conflict.metric_label(), "name_conflict");
        assert_eq!(conflict.next(), Next::Recheck(CONFLICT_RECHECK));
        assert!(conflict.problems()[0]
            .contains("ConfigMap ns/a-b-c already exists and belongs to Pipeline a"));

        let decode = Error::Validate(ValidateError::Decode(
            "invalid type: string \"8\", expected u32".into(),
        ));
        assert_eq!(decode.condition_reason(), Some("InvalidSpec"));
        assert_eq!(decode.next(), Next::AwaitChange);
        assert!(decode.problems()[0].contains("expected u32"));

        let gone = Error::Apply(ApplyError::NamespaceTerminating {
            namespace: "ns".into(),
        });
        assert_eq!(gone.condition_reason(), None);
        assert_eq!(gone.next(), Next::AwaitChange);
    }
}
