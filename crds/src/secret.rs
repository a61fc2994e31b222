//! Where a secret comes from: a variable of the unit's environment, set in a cluster from a key of a
//! Secret. Below the spec types and their checks, which both use it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a secret comes from (an http source's token, a database's password): the unit's environment
/// variable `env`, which in a cluster the operator sets from `secretKeyRef` (locally, export it
/// before `switchyard run`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretFromEnv {
    /// The environment variable holding the secret, such as `INGEST_TOKEN` or `PGPASSWORD`.
    #[schemars(length(min = 1), pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub env: String,
    /// In a cluster: the key of a Secret in the Pipeline's namespace that holds the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the Pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// An environment variable's name: letters, digits and `_`, not starting with a digit.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A URL as a message may show it: the password, if any, replaced.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        assert_eq!(
            shown_url("postgres://app:s3cret@db:5432/jobs?sslmode=require"),
            "postgres://app:***@db:5432/jobs?sslmode=require"
        );
        assert_eq!(
            shown_url("postgres://app@db/jobs"),
            "postgres://app@db/jobs"
        );
        assert_eq!(shown_url("postgres://db/jobs"), "postgres://db/jobs");
    }
}
