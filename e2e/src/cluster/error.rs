//! What went wrong with a cluster, with what to do where there is something to do: below every
//! other room of the cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What went wrong, with what to do where there is something to do.
#[derive(Debug)]
pub enum ClusterError {
    /// The machine cannot run a cluster; the reason is one line (the suite skips with it).
    Unavailable(String),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Command {
        command: String,
        output: String,
    },
    Timeout {
        what: String,
        limit: Duration,
        last: Option<String>,
    },
    /// A process of the cluster exited while `up` waited for it.
    Exited {
        program: String,
        log: PathBuf,
        tail: String,
    },
    AlreadyUp {
        name: String,
        kubeconfig: PathBuf,
    },
    NotUp {
        name: String,
    },
    /// `down` could not remove everything; what is left is named.
    Leftovers(Vec<String>),
}

impl ClusterError {
    pub fn io(path: impl AsRef<Path>, error: std::io::Error) -> ClusterError {
        ClusterError::Io {
            path: path.as_ref().to_path_buf(),
            error,
        }
    }
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Unavailable(why) => write!(f, "{why}"),
            ClusterError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ClusterError::Command { command, output } => write!(f, "`{command}` failed: {output}"),
            ClusterError::Timeout { what, limit, last } => {
                write!(f, "{what}: not within {}s", limit.as_secs())?;
                if let Some(last) = last {
                    write!(f, " (last: {last})")?;
                }
                Ok(())
            }
            ClusterError::Exited { program, log, tail } => write!(
                f,
                "{program} exited; the end of {}:\n{tail}",
                log.display()
            ),
            ClusterError::AlreadyUp { name, kubeconfig } => write!(
                f,
                "cluster {name} is already up (export KUBECONFIG={}); `scripts/cluster down` first to start afresh",
                kubeconfig.display()
            ),
            ClusterError::NotUp { name } => write!(f, "cluster {name} is not up"),
            ClusterError::Leftovers(left) => {
                write!(f, "down left these behind:\n  {}", left.join("\n  "))
            }
        }
    }
}

impl std::error::Error for ClusterError {}
