//! Resolve references: the NATS server a Pipeline uses, with the credentials its Secret holds.

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use switchyard_crds::PipelineSpec;

use switchyard_platform::credentials::{keys, CredentialsError, NatsCredentials};

use super::context::Context;
use super::nats::NatsError;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the NATS credentials Secret {namespace}/{secret} does not exist: create it with any of the keys `{}`, or change spec.nats.credentialsSecret", keys::ALL.join("`, `"))]
    SecretMissing { namespace: String, secret: String },
    #[error("cannot read the NATS credentials Secret {namespace}/{secret}: {source}")]
    SecretUnreadable {
        namespace: String,
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{secret} holds no NATS credentials: give it one of the keys `{}`", keys::ALL.join("`, `"))]
    SecretWithoutCredentials { namespace: String, secret: String },
    #[error("Secret {namespace}/{secret}: {source}")]
    SecretInvalid {
        namespace: String,
        secret: String,
        #[source]
        source: CredentialsError,
    },
    #[error(transparent)]
    Nats(#[from] NatsError),
}

impl ResolveError {
    /// The Secret is gone, or no longer readable (in a namespace being deleted, the operator's
    /// RoleBinding there can go first).
    pub fn is_secret_unavailable(&self) -> bool {
        match self {
            ResolveError::SecretMissing { .. } => true,
            ResolveError::SecretUnreadable {
                source: kube::Error::Api(status),
                ..
            } => status.code == 403,
            _ => false,
        }
    }
}

/// The NATS server of a Pipeline in `namespace`, connected.
pub async fn nats(
    ctx: &Context,
    namespace: &str,
    spec: &PipelineSpec,
) -> Result<async_nats::jetstream::Context, ResolveError> {
    let nats = spec.nats.as_ref();
    let url = nats
        .and_then(|n| n.url.clone())
        .unwrap_or_else(|| ctx.settings.nats_url.clone());
    let credentials = match nats.and_then(|n| n.credentials_secret.as_deref()) {
        None => NatsCredentials::none(),
        Some(secret) => credentials(ctx, namespace, secret).await?,
    };
    Ok(ctx.nats.jetstream(&url, credentials).await?)
}

async fn credentials(
    ctx: &Context,
    namespace: &str,
    secret: &str,
) -> Result<NatsCredentials, ResolveError> {
    let key = (namespace.to_string(), secret.to_string());
    if let Some(creds) = ctx.credentials.get(&key) {
        return Ok(creds);
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let found = secrets
        .get_opt(secret)
        .await
        .map_err(|source| ResolveError::SecretUnreadable {
            namespace: namespace.to_string(),
            secret: secret.to_string(),
            source,
        })?
        .ok_or_else(|| ResolveError::SecretMissing {
            namespace: namespace.to_string(),
            secret: secret.to_string(),
        })?;
    let data: std::collections::BTreeMap<String, Vec<u8>> = found
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let creds =
        NatsCredentials::from_secret_data(&data).map_err(|source| ResolveError::SecretInvalid {
            namespace: namespace.to_string(),
            secret: secret.to_string(),
            source,
        })?;
    if creds.is_empty() {
        return Err(ResolveError::SecretWithoutCredentials {
            namespace: namespace.to_string(),
            secret: secret.to_string(),
        });
    }
    ctx.credentials.put(key, creds.clone());
    Ok(creds)
}

/// Whether `namespace` is being deleted. Asked only before creating objects and while cleaning up, so
/// it costs no request on an ordinary reconcile; unknown (no permission, a passing error) is false.
pub async fn namespace_terminating(ctx: &Context, namespace: &str) -> bool {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    match namespaces.get_opt(namespace).await {
        Ok(Some(ns)) => {
            ns.metadata.deletion_timestamp.is_some()
                || ns.status.and_then(|s| s.phase).as_deref() == Some("Terminating")
        }
        // Not found: nothing to tell (a fake or restricted API); a create there fails on its own.
        Ok(None) => false,
        Err(e) => {
            tracing::debug!(%namespace, "cannot tell whether the namespace is terminating: {e}");
            false
        }
    }
}
