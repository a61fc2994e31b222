//! nats-servers that ask for credentials, for the tests that check every kind works and that none is
//! ever shown: a token, a user and password, JWT accounts (a credentials file), and TLS with client
//! certificates. Keys, certificates and JWTs are made afresh for each server.

use std::path::{Path, PathBuf};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sha2::Digest;
use switchyard_platform::embedded::NatsServer;

/// A server and what a client needs to pass its checks.
pub struct SecureNats {
    pub server: NatsServer,
    /// Files the credentials live in (a credentials file, certificates and keys).
    pub dir: tempfile::TempDir,
    /// The flags `switchyard run` takes for them.
    pub flags: Vec<String>,
    /// The secret values that must never be shown (a token, a password, a seed, a key).
    pub secrets: Vec<String>,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a credentials file");
    path
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

impl SecureNats {
    /// A server that wants `token`.
    pub fn token(token: &str) -> SecureNats {
        SecureNats {
            server: NatsServer::start_with(&["--auth", token]).expect("nats-server"),
            dir: tempfile::tempdir().expect("a folder"),
            flags: vec!["--nats-token".into(), token.into()],
            secrets: vec![token.into()],
        }
    }

    /// A server that wants `user` and `password`.
    pub fn user(user: &str, password: &str) -> SecureNats {
        SecureNats {
            server: NatsServer::start_with(&["--user", user, "--pass", password])
                .expect("nats-server"),
            dir: tempfile::tempdir().expect("a folder"),
            flags: vec![
                "--nats-user".into(),
                user.into(),
                "--nats-password".into(),
                password.into(),
            ],
            secrets: vec![password.into()],
        }
    }

    /// A server in operator mode (JWT accounts with JetStream) and a credentials file for one user.
    pub fn jwt() -> SecureNats {
        let dir = tempfile::tempdir().expect("a folder");
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        // JetStream in operator mode wants a system account beside the one the user is in.
        let system = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let operator_jwt = jwt(&operator, &operator, "operator", serde_json::json!({}));
        let account_jwt = jwt(
            &operator,
            &account,
            "account",
            serde_json::json!({"limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            }}),
        );
        let system_jwt = jwt(&operator, &system, "account", serde_json::json!({}));
        let user_jwt = jwt(
            &account,
            &user,
            "user",
            serde_json::json!({"subs": -1, "data": -1, "payload": -1}),
        );
        let operator_file = write(dir.path(), "operator.jwt", &operator_jwt);
        let config = write(
            dir.path(),
            "server.conf",
            &format!(
                "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
                operator_file.display(),
                system.public_key(),
                account.public_key(),
                account_jwt,
                system.public_key(),
                system_jwt
            ),
        );
        let seed = user.seed().expect("a user seed");
        let creds = write(
            dir.path(),
            "user.creds",
            &format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        );
        SecureNats {
            server: NatsServer::start_with(&["-c", &path_arg(&config)]).expect("nats-server"),
            flags: vec!["--nats-creds".into(), path_arg(&creds)],
            secrets: vec![seed],
            dir,
        }
    }

    /// A server with TLS that verifies client certificates, and a client certificate for it.
    pub fn tls() -> SecureNats {
        let dir = tempfile::tempdir().expect("a folder");
        let ca_key = KeyPair::generate().expect("a key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("a CA");
        let ca = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("a key");
            let cert = CertificateParams::new(names)
                .expect("parameters")
                .signed_by(&key, &ca)
                .expect("a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = leaf(vec!["switchyard-client".into()]);
        let ca_file = write(dir.path(), "ca.crt", &ca_cert.pem());
        let server_cert = write(dir.path(), "server.crt", &server_cert);
        let server_key = write(dir.path(), "server.key", &server_key);
        let client_cert_file = write(dir.path(), "tls.crt", &client_cert);
        let client_key_file = write(dir.path(), "tls.key", &client_key);
        let server = NatsServer::start_with(&[
            "--tls",
            "--tlscert",
            &path_arg(&server_cert),
            "--tlskey",
            &path_arg(&server_key),
            "--tlscacert",
            &path_arg(&ca_file),
            "--tlsverify",
        ])
        .expect("nats-server");
        SecureNats {
            server,
            flags: vec![
                "--nats-tls-ca".into(),
                path_arg(&ca_file),
                "--nats-tls-cert".into(),
                path_arg(&client_cert_file),
                "--nats-tls-key".into(),
                path_arg(&client_key_file),
            ],
            secrets: vec![client_key.lines().nth(1).unwrap_or_default().to_string()],
            dir,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }
}

/// A NATS JWT (v2) of `kind` for `subject`, signed by `issuer`.
fn jwt(
    issuer: &nkeys::KeyPair,
    subject: &nkeys::KeyPair,
    kind: &str,
    mut nats: serde_json::Value,
) -> String {
    nats["type"] = kind.into();
    nats["version"] = 2.into();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::json!({
        "jti": "",
        "iat": now,
        "iss": issuer.public_key(),
        "sub": subject.public_key(),
        "name": kind,
        "nats": nats,
    });
    let unsigned = serde_json::to_vec(&claims).expect("claims");
    claims["jti"] = BASE32_NOPAD.encode(&sha2::Sha256::digest(&unsigned)).into();
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).expect("claims"));
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("a signature");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
