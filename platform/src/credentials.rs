//! How a program proves itself to NATS and which server certificates it trusts: a token, a user and
//! password, a credentials file (JWT and nkey), and TLS (a CA, a client certificate).
//!
//! Every program reads them the same way. In a cluster they are the keys of the Secret named in
//! `spec.nats.credentialsSecret` (the operator reads the Secret; a unit's pod mounts it as a folder);
//! locally they come from flags or `SWITCHYARD_NATS_*` variables, which `switchyard run` hands to its
//! stage processes through their environment, never their command line. Nothing here prints a secret:
//! `Debug` says which kinds are set, not what they hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The keys of a credentials Secret, and the file names of the folder a pod mounts it as.
pub mod keys {
    pub const CREDS: &str = "nats.creds";
    pub const TOKEN: &str = "token";
    pub const USER: &str = "user";
    pub const PASSWORD: &str = "password";
    pub const TLS_CA: &str = "ca.crt";
    pub const TLS_CERT: &str = "tls.crt";
    pub const TLS_KEY: &str = "tls.key";
    /// Every key, in the order they are described.
    pub const ALL: [&str; 7] = [CREDS, TOKEN, USER, PASSWORD, TLS_CA, TLS_CERT, TLS_KEY];
}

/// Environment variables that carry credentials to a stage process (and that `switchyard run` reads).
pub mod env {
    pub const TOKEN: &str = "SWITCHYARD_NATS_TOKEN";
    pub const USER: &str = "SWITCHYARD_NATS_USER";
    pub const PASSWORD: &str = "SWITCHYARD_NATS_PASSWORD";
    pub const CREDS: &str = "SWITCHYARD_NATS_CREDS";
    pub const TLS_CA: &str = "SWITCHYARD_NATS_TLS_CA";
    pub const TLS_CERT: &str = "SWITCHYARD_NATS_TLS_CERT";
    pub const TLS_KEY: &str = "SWITCHYARD_NATS_TLS_KEY";
    /// A folder holding files named as the keys of a credentials Secret (a pod's mounted Secret).
    pub const DIR: &str = "SWITCHYARD_NATS_CREDENTIALS_DIR";
    /// Every one of them.
    pub const ALL: [&str; 8] = [TOKEN, USER, PASSWORD, CREDS, TLS_CA, TLS_CERT, TLS_KEY, DIR];

    /// Takes every credentials variable away from a child's environment: a child is given exactly
    /// the ones its parent means it to have (a stage process its run's, an exec handler none).
    pub fn withhold(command: &mut std::process::Command) {
        for name in ALL {
            command.env_remove(name);
        }
    }
}

/// Why the credentials could not be had; names the file or key, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the NATS {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the NATS {what} ({place}) is not valid: {reason}")]
    Invalid {
        what: &'static str,
        place: String,
        reason: String,
    },
    #[error("{0}")]
    Incomplete(String),
}

/// Credentials as loaded, held in memory. Equal credentials share one operator connection.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct NatsCredentials {
    token: Option<String>,
    user: Option<(String, String)>,
    /// A `.creds` file's text: the user's JWT and its nkey seed.
    creds: Option<String>,
    tls_ca: Option<Vec<u8>>,
    /// Client certificate chain and key, PEM.
    tls_client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NatsCredentials({})", self.describe())
    }
}

/// Where one value came from, for errors: a file, or a key of a Secret.
enum Place<'a> {
    File(&'a Path),
    Key(&'a str),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::File(path) => write!(f, "{}", path.display()),
            Place::Key(key) => write!(f, "key `{key}`"),
        }
    }
}

impl NatsCredentials {
    /// No credentials: an open server, or one that trusts the network.
    pub fn none() -> NatsCredentials {
        NatsCredentials::default()
    }

    pub fn is_empty(&self) -> bool {
        *self == NatsCredentials::default()
    }

    /// Which kinds are set, such as `token, TLS CA`: what logs and errors may say.
    pub fn describe(&self) -> String {
        let kinds: Vec<&str> = [
            (self.creds.is_some(), "credentials file"),
            (self.token.is_some(), "token"),
            (self.user.is_some(), "user and password"),
            (self.tls_ca.is_some(), "TLS CA"),
            (self.tls_client.is_some(), "TLS client certificate"),
        ]
        .into_iter()
        .filter_map(|(set, kind)| set.then_some(kind))
        .collect();
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(", ")
        }
    }

    /// From the data of a credentials Secret: any of the keys in [`keys`]; others are ignored.
    pub fn from_secret_data(
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<NatsCredentials, CredentialsError> {
        let text = |key: &'static str, what: &'static str| {
            data.get(key)
                .map(|bytes| {
                    String::from_utf8(bytes.clone()).map_err(|_| CredentialsError::Invalid {
                        what,
                        place: Place::Key(key).to_string(),
                        reason: "it is not text".to_string(),
                    })
                })
                .transpose()
        };
        let parts = Parts {
            token: text(keys::TOKEN, "token")?,
            user: text(keys::USER, "user")?,
            password: text(keys::PASSWORD, "password")?,
            creds: text(keys::CREDS, "credentials file")?,
            tls_ca: data.get(keys::TLS_CA).cloned(),
            tls_cert: data.get(keys::TLS_CERT).cloned(),
            tls_key: data.get(keys::TLS_KEY).cloned(),
        };
        parts.assemble(" in the Secret", |key| Place::Key(key).to_string())
    }

    /// From a folder of files named as the keys of a credentials Secret (how a pod mounts one).
    pub fn from_dir(dir: &Path) -> Result<NatsCredentials, CredentialsError> {
        let read = |key: &'static str, what: &'static str| -> Result<_, CredentialsError> {
            let path = dir.join(key);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(CredentialsError::Read { what, path, source }),
            }
        };
        let mut data = BTreeMap::new();
        for key in keys::ALL {
            if let Some(bytes) = read(key, what(key))? {
                data.insert(key.to_string(), bytes);
            }
        }
        NatsCredentials::from_secret_data(&data).map_err(|e| match e {
            CredentialsError::Invalid {
                what,
                place,
                reason,
            } => CredentialsError::Invalid {
                what,
                place: format!("{place} in {}", dir.display()),
                reason,
            },
            other => other,
        })
    }

    /// Applies these credentials to a connection's options.
    pub fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        if let Some(creds) = &self.creds {
            options = options
                .credentials(creds)
                .map_err(|e| CredentialsError::Invalid {
                    what: "credentials file",
                    place: "its JWT and nkey seed".to_string(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if self.tls_ca.is_some() || self.tls_client.is_some() {
            options = options
                .tls_client_config(self.tls_config()?)
                .require_tls(true);
        }
        Ok(options)
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, CredentialsError> {
        let invalid = |what, reason: String| CredentialsError::Invalid {
            what,
            place: "PEM".to_string(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.tls_ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| invalid("TLS CA", e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| invalid("TLS CA", e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(invalid("TLS CA", "it holds no certificate".to_string()));
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS settings", e.to_string()))?
            .with_root_certificates(roots);
        match &self.tls_client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("TLS client certificate", e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| invalid("TLS client key", e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid("TLS client certificate", e.to_string()))
            }
        }
    }
}

/// What a key of a credentials Secret holds, for errors.
fn what(key: &str) -> &'static str {
    match key {
        keys::CREDS => "credentials file",
        keys::TOKEN => "token",
        keys::USER => "user",
        keys::PASSWORD => "password",
        keys::TLS_CA => "TLS CA",
        keys::TLS_CERT => "TLS client certificate",
        keys::TLS_KEY => "TLS client key",
        _ => "credentials",
    }
}

/// The values as found, before the pairs (user and password, certificate and key) are checked.
#[derive(Default)]
struct Parts {
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    creds: Option<String>,
    tls_ca: Option<Vec<u8>>,
    tls_cert: Option<Vec<u8>>,
    tls_key: Option<Vec<u8>>,
}

impl Parts {
    fn assemble(
        self,
        within: &str,
        name: impl Fn(&str) -> String,
    ) -> Result<NatsCredentials, CredentialsError> {
        let pair = |a: &str, b: &str| {
            CredentialsError::Incomplete(format!(
                "{} is given{within} without {}: give both, or neither",
                name(a),
                name(b)
            ))
        };
        let user = match (self.user, self.password) {
            (Some(user), Some(password)) => Some((user.trim().to_string(), password)),
            (Some(_), None) => return Err(pair(keys::USER, keys::PASSWORD)),
            (None, Some(_)) => return Err(pair(keys::PASSWORD, keys::USER)),
            (None, None) => None,
        };
        let tls_client = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(_), None) => return Err(pair(keys::TLS_CERT, keys::TLS_KEY)),
            (None, Some(_)) => return Err(pair(keys::TLS_KEY, keys::TLS_CERT)),
            (None, None) => None,
        };
        Ok(NatsCredentials {
            // A token written to a file usually ends with a newline that is not part of it.
            token: self.token.map(|t| t.trim().to_string()),
            user,
            creds: self.creds,
            tls_ca: self.tls_ca,
            tls_client,
        })
    }
}

/// The credentials flags of `switchyard run` and `switchyard-stage`, each also read from its
/// environment variable (better for secrets: a command line is visible to every user of the machine).
#[derive(clap::Args, Clone, Default)]
pub struct NatsAuthArgs {
    /// NATS token.
    #[arg(long = "nats-token", env = env::TOKEN, hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long = "nats-user", env = env::USER, value_name = "USER")]
    pub user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long = "nats-password", env = env::PASSWORD, hide_env_values = true, value_name = "PASSWORD")]
    pub password: Option<String>,
    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes it).
    #[arg(long = "nats-creds", env = env::CREDS, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// CA certificate(s) that signed the NATS server's certificate (PEM); turns TLS on.
    #[arg(long = "nats-tls-ca", env = env::TLS_CA, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for TLS (PEM, with --nats-tls-key).
    #[arg(long = "nats-tls-cert", env = env::TLS_CERT, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Client key for TLS (PEM, with --nats-tls-cert).
    #[arg(long = "nats-tls-key", env = env::TLS_KEY, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A folder with files named as the keys of a credentials Secret (`token`, `user`, `password`,
    /// `nats.creds`, `ca.crt`, `tls.crt`, `tls.key`): how a unit's pod mounts the Secret.
    #[arg(long = "nats-credentials-dir", env = env::DIR, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl std::fmt::Debug for NatsAuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: bool| if v { "set" } else { "-" };
        f.debug_struct("NatsAuthArgs")
            .field("token", &set(self.token.is_some()))
            .field("user", &self.user)
            .field("password", &set(self.password.is_some()))
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("dir", &self.dir)
            .finish()
    }
}

impl NatsAuthArgs {
    /// Reads what the flags name: the folder first, then each flag, which wins over the folder's file.
    pub fn load(&self) -> Result<NatsCredentials, CredentialsError> {
        let mut parts = match &self.dir {
            Some(dir) => NatsCredentials::from_dir(dir)?.into_parts(),
            None => Parts::default(),
        };
        let read = |path: &Path, what: &'static str| {
            std::fs::read(path).map_err(|source| CredentialsError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let text = |path: &Path, what: &'static str| {
            let bytes = read(path, what)?;
            String::from_utf8(bytes).map_err(|_| CredentialsError::Invalid {
                what,
                place: Place::File(path).to_string(),
                reason: "it is not text".to_string(),
            })
        };
        override_with(&mut parts.token, self.token.clone());
        override_with(&mut parts.user, self.user.clone());
        override_with(&mut parts.password, self.password.clone());
        if let Some(path) = &self.creds {
            parts.creds = Some(text(path, "credentials file")?);
        }
        if let Some(path) = &self.tls_ca {
            parts.tls_ca = Some(read(path, "TLS CA")?);
        }
        if let Some(path) = &self.tls_cert {
            parts.tls_cert = Some(read(path, "TLS client certificate")?);
        }
        if let Some(path) = &self.tls_key {
            parts.tls_key = Some(read(path, "TLS client key")?);
        }
        parts.assemble("", flag_of)
    }

    /// The environment that gives a child process these same credentials: values for what is given
    /// as a value, absolute paths for files.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| {
            p.as_ref().map(|p| {
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            })
        };
        [
            (env::TOKEN, self.token.clone()),
            (env::USER, self.user.clone()),
            (env::PASSWORD, self.password.clone()),
            (env::CREDS, path(&self.creds)),
            (env::TLS_CA, path(&self.tls_ca)),
            (env::TLS_CERT, path(&self.tls_cert)),
            (env::TLS_KEY, path(&self.tls_key)),
            (env::DIR, path(&self.dir)),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
    }
}

fn override_with(slot: &mut Option<String>, value: Option<String>) {
    if value.is_some() {
        *slot = value;
    }
}

/// The flag that sets what a Secret key holds, for errors about flags.
fn flag_of(key: &str) -> String {
    let flag = match key {
        keys::TOKEN => "--nats-token",
        keys::USER => "--nats-user",
        keys::PASSWORD => "--nats-password",
        keys::CREDS => "--nats-creds",
        keys::TLS_CA => "--nats-tls-ca",
        keys::TLS_CERT => "--nats-tls-cert",
        keys::TLS_KEY => "--nats-tls-key",
        other => other,
    };
    flag.to_string()
}

impl NatsCredentials {
    fn into_parts(self) -> Parts {
        let (user, password) = self.user.map_or((None, None), |(u, p)| (Some(u), Some(p)));
        let (tls_cert, tls_key) = self
            .tls_client
            .map_or((None, None), |(c, k)| (Some(c), Some(k)));
        Parts {
            token: self.token,
            user,
            password,
            creds: self.creds,
            tls_ca: self.tls_ca,
            tls_cert,
            tls_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_secret_gives_each_kind_by_its_key() {
        let c = NatsCredentials::from_secret_data(&data(&[
            ("token", "s3cret\n"),
            ("user", "app"),
            ("password", "pw"),
            ("unrelated", "x"),
        ]))
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.user, Some(("app".to_string(), "pw".to_string())));
        assert_eq!(c.describe(), "token, user and password");
        assert!(NatsCredentials::from_secret_data(&BTreeMap::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn half_a_pair_is_an_error_that_names_the_missing_half() {
        let e = NatsCredentials::from_secret_data(&data(&[("user", "app")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "key `user` is given in the Secret without key `password`: give both, or neither"
        );
        let e = NatsCredentials::from_secret_data(&data(&[("tls.key", "k")])).unwrap_err();
        assert!(e.to_string().contains("key `tls.key`"), "{e}");
        let flags = NatsAuthArgs {
            user: Some("app".into()),
            ..NatsAuthArgs::default()
        };
        assert_eq!(
            flags.load().unwrap_err().to_string(),
            "--nats-user is given without --nats-password: give both, or neither"
        );
    }

    #[test]
    fn nothing_secret_is_in_debug_output_or_errors() {
        let c = NatsCredentials::from_secret_data(&data(&[
            ("token", "tok-123"),
            ("user", "u"),
            ("password", "pw-456"),
        ]))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("tok-123") && !shown.contains("pw-456"),
            "{shown}"
        );
        let args = NatsAuthArgs {
            token: Some("tok-123".into()),
            password: Some("pw-456".into()),
            ..NatsAuthArgs::default()
        };
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("tok-123") && !shown.contains("pw-456"),
            "{shown}"
        );
        let bad = NatsCredentials::from_secret_data(&data(&[("ca.crt", "tok-123")])).unwrap();
        let e = bad.apply(async_nats::ConnectOptions::new()).unwrap_err();
        assert!(!e.to_string().contains("tok-123"), "{e}");
        assert!(e.to_string().contains("TLS CA"), "{e}");
    }

    #[test]
    fn flags_win_over_the_folder_and_children_get_paths_not_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-folder").unwrap();
        std::fs::write(dir.path().join("nats.creds"), "creds text").unwrap();
        let args = NatsAuthArgs {
            dir: Some(dir.path().to_path_buf()),
            token: Some("from-flag".into()),
            ..NatsAuthArgs::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.token.as_deref(), Some("from-flag"));
        assert_eq!(c.creds.as_deref(), Some("creds text"));
        let env = args.child_env();
        assert!(env.contains(&(env::TOKEN, "from-flag".to_string())));
        assert!(env.contains(&(env::DIR, dir.path().display().to_string())));
        let missing = NatsAuthArgs {
            creds: Some(dir.path().join("nope.creds")),
            ..NatsAuthArgs::default()
        };
        let e = missing.load().unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read the NATS credentials file from "),
            "{e}"
        );
        assert!(e.contains("nope.creds"), "{e}");
    }
}
