//! A unit's way to its PostgreSQL database, shared by the postgres source and sink: the connection
//! settings turned into a pool of connections, and a database error sorted by what may help it
//! (waiting, trying again, or nothing: the row itself is refused).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use switchyard_crds::duration::parse_duration;
use switchyard_crds::postgres::{
    PostgresConnection, TlsMode, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE,
    DEFAULT_STATEMENT_TIMEOUT,
};
use switchyard_crds::secret::shown_url;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// Why a unit cannot use its database at all.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{variable} is not set (or empty) in this unit's environment: {hint}")]
    MissingVariable {
        variable: String,
        hint: &'static str,
    },
    #[error("the database URL {url} cannot be read: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Settings(String),
    #[error("{0}")]
    Refused(String),
}

const SECRET_HINT: &str = "export it before `switchyard run`; in a cluster, name the Secret that holds it in secretKeyRef";

/// How one attempt at a statement failed.
#[derive(Clone, Debug)]
pub enum Failure {
    /// The database refused the statement for what it holds: a constraint, a value of the wrong
    /// type, a missing column. Trying again will not help.
    Row(String),
    /// It may work next time: a serialization failure, a deadlock, a statement cancelled for its
    /// timeout, a server short of resources.
    Transient(String),
    /// No connection: the database is down, restarting, or out of reach.
    Unreachable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Row(m) | Failure::Transient(m) | Failure::Unreachable(m) => f.write_str(m),
        }
    }
}

impl Failure {
    /// Sorts a database error; its message says the SQLSTATE, the server's words and detail.
    pub fn of(error: &tokio_postgres::Error) -> Failure {
        let Some(db) = error.as_db_error() else {
            // No answer from a server. The causes say why (refused, a certificate of an unknown
            // authority, …).
            let mut message = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(e) = cause {
                message.push_str(": ");
                message.push_str(&e.to_string());
                cause = e.source();
            }
            // The client's own kinds of error are not public; their words are stable. A connection
            // that broke or could not be made is waited for; anything else (a value that cannot be
            // sent as the parameter's type) would fail the same way every time.
            const NO_CONNECTION: [&str; 6] = [
                "error connecting to server",
                "error performing TLS handshake",
                "connection closed",
                "error communicating with the server",
                "timeout waiting for server",
                "unexpected message from server",
            ];
            if error.is_closed() || NO_CONNECTION.iter().any(|m| message.starts_with(m)) {
                return Failure::Unreachable(message);
            }
            return Failure::Row(message);
        };
        let mut message = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        let code = db.code();
        let class = &code.code()[..2];
        if class == "08"
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
        {
            Failure::Unreachable(message)
        } else if class == "40"
            || class == "53"
            || *code == SqlState::QUERY_CANCELED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            Failure::Transient(message)
        } else {
            Failure::Row(message)
        }
    }

    fn of_pool(error: PoolError) -> Failure {
        match error {
            PoolError::Backend(e) => Failure::of(&e),
            other => Failure::Unreachable(other.to_string()),
        }
    }
}

/// A pool of connections to one database; a clone shares the pool.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    size: usize,
    /// The address as messages show it (no password).
    shown: String,
    /// How to open a connection of its own, outside the pool (one that listens).
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Database {
    /// The pool the settings describe; nothing is connected yet (see
    /// [`Database::prepare_when_reachable`]).
    pub async fn connect(settings: &PostgresConnection) -> Result<Database, ConnectError> {
        let (url, from) = match (&settings.url, &settings.url_from) {
            (Some(url), _) => (url.clone(), None),
            (None, Some(from)) => (read_variable(&from.env)?, Some(from.env.clone())),
            (None, None) => {
                return Err(ConnectError::Settings(
                    "the connection names no database: url or urlFrom".into(),
                ))
            }
        };
        let shown = match &from {
            Some(variable) => format!("{} (from {variable})", shown_url(&url)),
            None => shown_url(&url),
        };
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| ConnectError::Url {
                    url: shown_url(&url),
                    reason: e.to_string(),
                })?;
        if let Some(password) = &settings.password {
            config.password(read_variable(&password.env)?);
        }
        let duration = |field: &str, value: &Option<String>, default: &str| {
            let value = value.as_deref().unwrap_or(default);
            parse_duration(value)
                .map_err(|e| ConnectError::Settings(format!("connection.{field}: {e}")))
        };
        let statement_timeout = duration(
            "statementTimeout",
            &settings.statement_timeout,
            DEFAULT_STATEMENT_TIMEOUT,
        )?;
        let connect_timeout = duration(
            "connectTimeout",
            &settings.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        config.connect_timeout(connect_timeout);
        config.options(format!(
            "-c statement_timeout={}",
            statement_timeout.as_millis()
        ));
        if config.get_application_name().is_none() {
            config.application_name("switchyard");
        }
        let recycling = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = match &settings.tls {
            Some(tls) if tls.mode != TlsMode::Disable => {
                // Encrypted or nothing: never the plain connection libpq's `prefer` falls back to.
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tls_connector(tls)?)
            }
            _ => None,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), recycling()),
            None => Manager::from_config(config.clone(), tokio_postgres::NoTls, recycling()),
        };
        let size = settings.pool_size.unwrap_or(DEFAULT_POOL_SIZE).max(1) as usize;
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(connect_timeout))
            .wait_timeout(Some(connect_timeout + statement_timeout))
            .build()
            .map_err(|e| ConnectError::Settings(e.to_string()))?;
        Ok(Database {
            pool,
            size,
            shown,
            config,
            tls,
        })
    }

    /// Listens on `channel` (a plain name) on a connection of its own, and says on `woken` each time
    /// a `NOTIFY` arrives there. A lost connection is opened again; meanwhile nothing is said, and
    /// whoever waits falls back on its own polling. Ends when `woken` is dropped.
    pub async fn listen(&self, channel: String, woken: tokio::sync::mpsc::Sender<()>) {
        let mut pause = Duration::from_millis(200);
        while !woken.is_closed() {
            match self.listen_once(&channel, &woken).await {
                Ok(()) => pause = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(
                        "cannot listen on {channel} at {} ({e}); polling meanwhile",
                        self.shown
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn listen_once(
        &self,
        channel: &str,
        woken: &tokio::sync::mpsc::Sender<()>,
    ) -> Result<(), tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                relay(client, connection, channel, woken).await
            }
            None => {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                relay(client, connection, channel, woken).await
            }
        }
    }

    pub fn pool_size(&self) -> usize {
        self.size
    }

    /// The columns of `table` (quoted as in SQL), in their order; a table that is not there is
    /// the database's refusal. Waits while the database cannot be reached.
    pub async fn columns_when_reachable(&self, table: &str) -> Result<Vec<String>, ConnectError> {
        const COLUMNS: &str = "SELECT attname::text FROM pg_attribute \
            WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum";
        let rows = self.query_when_reachable(COLUMNS, &[&table]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The type of `column` of `table` (quoted as in SQL) as SQL writes it (`bigint`, `text`, …).
    pub async fn column_type_when_reachable(
        &self,
        table: &str,
        column: &str,
    ) -> Result<String, ConnectError> {
        const TYPE: &str = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
            WHERE attrelid = $1::text::regclass AND attname = $2 AND NOT attisdropped";
        let rows = self.query_when_reachable(TYPE, &[&table, &column]).await?;
        rows.first()
            .map(|row| row.get(0))
            .ok_or_else(|| ConnectError::Refused(format!("{table} has no column {column}")))
    }

    /// The predicates of the partial indexes of `table` (quoted as in SQL) that lead with `column`,
    /// as the database writes them back (`(success IS NULL)`), and the table's size in bytes.
    pub async fn partial_indexes_on(
        &self,
        table: &str,
        column: &str,
    ) -> Result<(Vec<String>, i64), ConnectError> {
        const PREDICATES: &str = "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i \
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
            WHERE i.indrelid = $1::text::regclass AND a.attname = $2 AND i.indpred IS NOT NULL";
        const SIZE: &str = "SELECT pg_relation_size($1::text::regclass)";
        let rows = self
            .query_when_reachable(PREDICATES, &[&table, &column])
            .await?;
        let size = self.query_when_reachable(SIZE, &[&table]).await?;
        Ok((
            rows.iter()
                .filter_map(|row| row.try_get::<_, String>(0).ok())
                .collect(),
            size.first()
                .and_then(|row| row.try_get::<_, i64>(0).ok())
                .unwrap_or(0),
        ))
    }

    /// Runs a question about the database's catalog, waiting while the database cannot be reached
    /// (it may start after the unit); the database's refusal is the error.
    async fn query_when_reachable(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ConnectError> {
        self.query_until_answered(statement, params)
            .await
            .map_err(ConnectError::Refused)
    }

    /// Runs `statement` until the database answers it: while it cannot be reached, or asks for
    /// another try (a serialization failure, a deadlock), it is asked again after 0.1 s, then up
    /// to 5 s; its refusal (the statement's own fault) is the error.
    pub async fn query_until_answered(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, String> {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.query(statement, params).await {
                Ok(rows) => return Ok(rows),
                Err(Failure::Unreachable(e)) | Err(Failure::Transient(e)) => {
                    tracing::warn!(
                        "the database at {} cannot answer yet ({e}); asking again in {pause:?}",
                        self.shown
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(Failure::Row(e)) => return Err(e),
            }
        }
    }

    /// Checks `statement` against the database, waiting while the database cannot be reached (it
    /// may start after the unit); the database's refusal is the error.
    pub async fn prepare_when_reachable(&self, statement: &str) -> Result<(), ConnectError> {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.prepare(statement).await {
                Ok(()) => return Ok(()),
                Err(Failure::Unreachable(e)) | Err(Failure::Transient(e)) => {
                    tracing::warn!("cannot reach the database at {} yet: {e}", self.shown);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(Failure::Row(e)) => return Err(ConnectError::Refused(e)),
            }
        }
    }

    async fn prepare(&self, statement: &str) -> Result<(), Failure> {
        let client = self.pool.get().await.map_err(Failure::of_pool)?;
        client
            .prepare_cached(statement)
            .await
            .map_err(|e| Failure::of(&e))?;
        Ok(())
    }

    /// Runs one statement (prepared once per connection) on a connection of the pool.
    pub async fn query(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Failure> {
        let client = self.pool.get().await.map_err(Failure::of_pool)?;
        let prepared = client
            .prepare_cached(statement)
            .await
            .map_err(|e| Failure::of(&e))?;
        client
            .query(&prepared, params)
            .await
            .map_err(|e| Failure::of(&e))
    }
}

/// The TLS client `tls` asks for: the server's certificate checked against `caFile` (or the
/// system's roots) and the host's name (`verify-full`), or not checked at all (`require`, as libpq
/// means it: encrypted against eavesdropping, not against a server in the middle).
fn tls_connector(
    tls: &switchyard_crds::postgres::PostgresTls,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let invalid = |reason: String| ConnectError::Settings(format!("connection.tls: {reason}"));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?;
    let config = match tls.mode {
        TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        _ => {
            let mut roots = rustls::RootCertStore::empty();
            match &tls.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| invalid(format!("cannot read caFile {path}: {e}")))?;
                    for cert in CertificateDer::pem_slice_iter(&pem) {
                        let cert = cert.map_err(|e| invalid(format!("caFile {path}: {e}")))?;
                        roots
                            .add(cert)
                            .map_err(|e| invalid(format!("caFile {path}: {e}")))?;
                    }
                    if roots.is_empty() {
                        return Err(invalid(format!("caFile {path} holds no certificate")));
                    }
                }
                None => {
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `tls.mode: require`: any certificate is taken (libpq's `sslmode=require`); the handshake's
/// signatures are still checked, so the session is encrypted with the key the certificate holds.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Says on `woken` each notification `connection` brings, after `LISTEN channel`, until the
/// connection ends (Ok: open another) or fails.
async fn relay<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    channel: &str,
    woken: &tokio::sync::mpsc::Sender<()>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The connection only moves while it is polled: LISTEN is sent while the messages are read.
    let statement = format!("LISTEN \"{channel}\"");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done?;
                listening = true;
            }
            message = messages.next() => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    // A full channel already holds a wake-up: one is enough.
                    let _ = woken.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = woken.closed() => return Ok(()),
        }
    }
}

/// `"name"` or `"schema"."name"`: names are checked to be plain words, quoted all the same so that
/// upper case and reserved words mean what the Pipeline says.
pub fn quoted(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

fn read_variable(variable: &str) -> Result<String, ConnectError> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(ConnectError::MissingVariable {
            variable: variable.to_string(),
            hint: SECRET_HINT,
        }),
    }
}
