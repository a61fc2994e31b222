//! A private PostgreSQL server on a free loopback port and a temporary data folder: what the tests
//! and the benchmark of the `postgres` source and sink run against (never a mock).
//!
//! Debian's `postgresql` package provides the programs (`/usr/lib/postgresql/<version>/bin`, or the
//! folder `SWITCHYARD_POSTGRES_BIN` names). PostgreSQL refuses to run as root: as root, the server
//! runs as the `postgres` user the package creates. Connections over TCP need the password, as a
//! real server's would; `psql` over the server's own socket does not.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What `./scripts/test` installs when the programs are missing.
const INSTALL_HINT: &str = "install Debian's postgresql package (apt-get install postgresql), or name the folder of initdb and postgres in SWITCHYARD_POSTGRES_BIN";
/// The superuser the tests connect as, and its database.
const USER: &str = "switchyard";
const DATABASE: &str = "postgres";
/// How long a server gets to take connections after it is started.
const READY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("no PostgreSQL programs (initdb, postgres) found: {INSTALL_HINT}")]
    NotInstalled,
    #[error("PostgreSQL does not run as root and this machine has no 'postgres' user to run it as: {INSTALL_HINT}")]
    NoUser,
    #[error("cannot {action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("postgres did not take connections within {limit:?}; its log ends: {log}")]
    NotReady { limit: Duration, log: String },
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let action = action.into();
    move |source| PostgresError::Io { action, source }
}

/// A running (or stopped, to be started again) PostgreSQL server of the caller's own.
pub struct PostgresServer {
    child: Option<Child>,
    bin: PathBuf,
    /// Holds `data/` (the cluster), `socket/` and `postgres.log`; removed with the server.
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    /// The user and group the server runs as, when this process is root.
    run_as: Option<(u32, u32)>,
    /// Serves TLS with `server.crt` and `server.key` of its data folder.
    tls: bool,
}

impl PostgresServer {
    /// `initdb` into a new temporary folder, then the server on a free loopback port.
    pub fn start() -> Result<PostgresServer, PostgresError> {
        PostgresServer::start_with(None)
    }

    /// The same, serving TLS with the certificate and key given (PEM) beside plain connections.
    pub fn start_with_tls(certificate: &str, key: &str) -> Result<PostgresServer, PostgresError> {
        PostgresServer::start_with(Some((certificate, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Result<PostgresServer, PostgresError> {
        let bin = programs()?;
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("switchyard-postgres-")
            .tempdir()
            .map_err(io("create a folder for PostgreSQL"))?;
        // The server's user must reach its folders through this one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io("open the PostgreSQL folder to its user"))?;
        for folder in ["data", "socket"] {
            let path = dir.path().join(folder);
            std::fs::create_dir(&path).map_err(io(format!("create {}", path.display())))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("restrict {}", path.display())))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io(format!("give {} to the postgres user", path.display())))?;
            }
        }
        let password = format!("pw-{}", nuid_like());
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, &password).map_err(io("write the password file"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&password_file, Some(uid), Some(gid))
                .map_err(io("give the password file to the postgres user"))?;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"]);
        run_checked(as_user(&mut initdb, run_as), "initdb")?;
        let _ = std::fs::remove_file(&password_file);
        let mut tls_on = false;
        if let Some((certificate, key)) = tls {
            // PostgreSQL takes a key only if its own user alone may read it.
            for (name, text) in [("server.crt", certificate), ("server.key", key)] {
                let path = dir.path().join("data").join(name);
                std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io(format!("restrict {}", path.display())))?;
                if let Some((uid, gid)) = run_as {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                        .map_err(io(format!("give {} to the postgres user", path.display())))?;
                }
            }
            tls_on = true;
        }
        let mut server = PostgresServer {
            child: None,
            bin,
            dir,
            port: free_port()?,
            password,
            run_as,
            tls: tls_on,
        };
        // Another process can take the port between our probe and the server's bind: try a few.
        let mut attempts = 0;
        loop {
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) if attempts == 4 => return Err(e),
                Err(_) => {
                    attempts += 1;
                    server.port = free_port()?;
                }
            }
        }
    }

    /// Starts the server again on its data and port (after [`PostgresServer::stop_immediately`]),
    /// and waits until it takes connections: after an immediate stop it first replays its log.
    pub fn start_again(&mut self) -> Result<(), PostgresError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("open postgres.log"))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let err = log.try_clone().map_err(io("open postgres.log"))?;
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // A test server: nothing to keep through a power cut.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .args(if self.tls {
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[][..]
            })
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        crate::os::die_with_parent(as_user(&mut command, self.run_as));
        let child = command.spawn().map_err(io("start postgres"))?;
        self.child = Some(child);
        self.wait_until_ready()
    }

    /// Stops the server at once, as `pg_ctl stop -m immediate` does (SIGQUIT): no checkpoint, open
    /// transactions cut off; the next start recovers from the write-ahead log.
    pub fn stop_immediately(&mut self) {
        self.stop_with(libc::SIGQUIT);
    }

    /// The server's process (the postmaster, whose children are the backends), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `postgres://switchyard@127.0.0.1:PORT/postgres`: the password goes apart (see
    /// [`PostgresServer::password`]), as a Pipeline takes it from the environment.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The URL with the password in it, for clients that take it that way.
    pub fn url_with_password(&self) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{DATABASE}",
            self.password, self.port
        )
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` with `psql` over the server's socket and returns what it printed, one row a line,
    /// columns split by `|` (`psql -At`). Stops at the first error.
    pub fn psql(&self, sql: &str) -> Result<String, PostgresError> {
        let psql = self.bin.join("psql");
        let program = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let output = Command::new(program)
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                USER,
                "-d",
                DATABASE,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(io("run psql"))?;
        if !output.status.success() {
            return Err(PostgresError::Failed {
                program: "psql".into(),
                status: output.status,
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_string())
    }

    /// The end of the server's log, for a failure's message.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    fn wait_until_ready(&mut self) -> Result<(), PostgresError> {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if !self.running() {
                return Err(PostgresError::NotReady {
                    limit: READY_WITHIN,
                    log: self.log_tail(),
                });
            }
            if self.psql("select 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(PostgresError::NotReady {
            limit: READY_WITHIN,
            log: self.log_tail(),
        })
    }

    /// Stops the server as a clean shutdown would (SIGINT: "fast"), waiting for it.
    fn stop(&mut self) {
        self.stop_with(libc::SIGINT);
    }

    /// Sends `signal` to the server and waits up to 10 s for it to end, then kills it.
    fn stop_with(&mut self, signal: libc::c_int) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) has no memory effects; our own child, not yet waited for.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The folder holding initdb and postgres.
fn programs() -> Result<PathBuf, PostgresError> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("SWITCHYARD_POSTGRES_BIN").map(PathBuf::from) {
        return has_both(&dir)
            .then_some(dir)
            .ok_or(PostgresError::NotInstalled);
    }
    // Debian keeps each major version apart; the newest one serves.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_both(dir))
        .ok_or(PostgresError::NotInstalled)
}

/// The `postgres` user's ids when this process is root (PostgreSQL refuses root), else none.
fn run_as() -> Result<Option<(u32, u32)>, PostgresError> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: getpwnam with a NUL-terminated name; the record is read before any other call.
    unsafe {
        let record = libc::getpwnam(c"postgres".as_ptr());
        if record.is_null() {
            return Err(PostgresError::NoUser);
        }
        Ok(Some(((*record).pw_uid, (*record).pw_gid)))
    }
}

fn as_user(command: &mut Command, run_as: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command
}

fn run_checked(command: &mut Command, program: &str) -> Result<(), PostgresError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {program}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(PostgresError::Failed {
        program: program.to_string(),
        status: output.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

fn free_port() -> Result<u16, PostgresError> {
    let find = || std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr();
    Ok(find().map_err(io("find a free loopback port"))?.port())
}

/// A password nobody guesses: the time and this process, hashed.
fn nuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_answers_stops_at_once_and_comes_back_with_its_data() {
        let mut server = match PostgresServer::start() {
            Ok(s) => s,
            Err(PostgresError::NotInstalled) => {
                println!("skipped: {}", PostgresError::NotInstalled);
                return;
            }
            Err(e) => panic!("{e}"),
        };
        server
            .psql("create table t (v int primary key); insert into t values (1), (2)")
            .unwrap();
        assert_eq!(server.psql("select count(*) from t").unwrap(), "2");
        server.stop_immediately();
        assert!(!server.running());
        assert!(server.psql("select 1").is_err());
        server.start_again().unwrap();
        assert_eq!(server.psql("select sum(v) from t").unwrap(), "3");
        let dir = server.dir.path().to_path_buf();
        drop(server);
        assert!(!dir.exists());
    }
}
