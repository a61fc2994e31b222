//! What a day-2 command (`switchyard dlq|tap|trace|status|pause`, and the same through
//! `kubectl switchyard`) could not do: one enum a caller can match, whose message is the line the
//! person reads after `switchyard: `, naming the object and what to do.

use switchyard_ops::OpsError;
use switchyard_platform::credentials::CredentialsError;
use switchyard_platform::nats::ConnectSetupError;

/// What the API server said, without the client's wrapping.
fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The Pipeline's NATS could not be reached from its file (`switchyard_local::reach`), or its
    /// run could not be asked (`switchyard pause`).
    #[error(transparent)]
    Local(#[from] switchyard_local::RunError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("cannot write: {0}")]
    Write(std::io::Error),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{question} Not asked: no terminal to answer on; pass --yes to confirm")]
    NoTerminal { question: String },
    #[error("cannot read the answer: {0}")]
    Answer(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What `kubectl switchyard` could not do with the cluster before NATS.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the kubeconfig: {0}")]
    Kubeconfig(kube::config::KubeconfigError),
    #[error("cannot make a client: {0}")]
    Client(kube::Error),
    #[error("there is no Pipeline {name} in namespace {namespace}: `kubectl get pipelines -n {namespace}` lists them")]
    NoPipeline { namespace: String, name: String },
    #[error("cannot {action}: {}", said(.source))]
    Api {
        /// What was asked, naming the object: `read Pipeline ns/p`.
        action: String,
        source: kube::Error,
    },
    #[error("Pipeline {namespace}/{name} does not validate ({problems} problems); `kubectl describe pipeline {name}` shows them")]
    Invalid {
        namespace: String,
        name: String,
        problems: usize,
    },
    #[error("Pipeline {namespace}/{name} cannot be laid out")]
    NoLayout { namespace: String, name: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    ConnectSetup(#[from] ConnectSetupError),
    #[error("cannot connect to NATS at {how}: {source}")]
    Connect {
        how: String,
        source: async_nats::ConnectError,
    },
    #[error("the Pipeline names no NATS (spec.nats.url) and the operator's Deployment cannot be read ({}): pass --nats-url", said(.0))]
    OperatorUnreadable(kube::Error),
    #[error("the Pipeline names no NATS (spec.nats.url) and no operator Deployment says which it uses: pass --nats-url")]
    OperatorNamesNoNats,
    #[error("Service {namespace}/{service} selects no pods: pass --nats-url")]
    NoSelector { namespace: String, service: String },
    #[error("no ready pod behind Service {namespace}/{service} ({selector}) to port-forward to")]
    NoReadyPod {
        namespace: String,
        service: String,
        selector: String,
    },
    #[error("cannot listen on loopback: {0}")]
    Listen(std::io::Error),
}

impl ClusterError {
    pub fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
        let action = action.into();
        move |source| ClusterError::Api { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_api_server_said_is_quoted_without_the_clients_wrapping() {
        let forbidden = kube::Error::Api(
            kube::core::Status::failure("pipelines.switchyard.dev \"p\" is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        let e = CommandError::from(ClusterError::api("read Pipeline ns/p")(forbidden));
        assert_eq!(
            e.to_string(),
            "cannot read Pipeline ns/p: pipelines.switchyard.dev \"p\" is forbidden"
        );
        assert!(matches!(
            e,
            CommandError::Cluster(ClusterError::Api { source: kube::Error::Api(ref s), .. }) if s.code == 403
        ));
    }

    #[test]
    fn each_message_names_the_object_and_what_to_do() {
        let missing = ClusterError::NoPipeline {
            namespace: "ns".into(),
            name: "p".into(),
        };
        assert_eq!(
            missing.to_string(),
            "there is no Pipeline p in namespace ns: `kubectl get pipelines -n ns` lists them"
        );
        let unasked = CommandError::NoTerminal {
            question: "remove 3 dead letters of p for good?".into(),
        };
        assert_eq!(
            unasked.to_string(),
            "remove 3 dead letters of p for good? Not asked: no terminal to answer on; pass --yes to confirm"
        );
    }
}
