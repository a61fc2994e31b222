//! What keeps a run honest about the world around it: the NATS server it depends on (restarted when it
//! is the run's own, waited for when it was given) and the signals that stop it.

use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::progress::Display;
use crate::RunNats;

/// How often a run says that NATS is still unreachable.
const SAY_UNREACHABLE_EVERY: Duration = Duration::from_secs(5);

/// Ctrl-C (SIGINT) and SIGTERM, which stop a run alike.
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// A private server that exits this soon after it was started counts towards a crash loop.
const QUICK_EXIT: Duration = Duration::from_secs(10);
/// Quick exits in a row after which the run gives up on a server instead of starting it forever.
const SERVER_CRASH_LOOP: u32 = 5;

/// Why the run cannot go on: one of its own servers will not stay up.
#[derive(Debug)]
pub struct ServerCrashLoop {
    pub server: String,
    pub status: String,
    pub log: String,
}

/// What the watch knows of one private server.
#[derive(Default, Clone)]
struct ServerWatch {
    /// Started again at this time and not yet taking connections.
    coming_back: Option<Instant>,
    quick_exits: u32,
}

/// Watches the run's NATS: its own servers (every node of a private cluster), and the connection.
#[derive(Default)]
pub struct NatsWatch {
    /// Since when the run's own connection has been down, and when that was last said.
    unreachable: Option<(Instant, Instant)>,
    servers: Vec<ServerWatch>,
    /// Times a private server was started again.
    pub restarts: u32,
}

impl NatsWatch {
    /// Starts a private server that exited again, on its port and store, so that the units reconnect
    /// and carry on (without waiting for it: the rest of the run goes on meanwhile); says when it is
    /// back, how long NATS was unreachable, and keeps saying so while it is.
    pub fn check(
        &mut self,
        nats: &mut RunNats,
        display: &mut Display,
    ) -> Result<(), ServerCrashLoop> {
        self.servers
            .resize(nats.servers.len(), ServerWatch::default());
        let cluster = nats.servers.len() > 1;
        for (server, watch) in nats.servers.iter_mut().zip(&mut self.servers) {
            let name = if cluster {
                format!("nats-server {}", server.name())
            } else {
                "nats-server".to_string()
            };
            if let Some(status) = server.exited() {
                watch.quick_exits = if server.uptime() < QUICK_EXIT {
                    watch.quick_exits + 1
                } else {
                    1
                };
                if watch.quick_exits >= SERVER_CRASH_LOOP {
                    return Err(ServerCrashLoop {
                        server: name,
                        status: status.to_string(),
                        log: server.log_tail(),
                    });
                }
                display.note(&format!(
                    "{name} exited ({status}); starting it again on the same port and store"
                ));
                match server.respawn() {
                    Ok(()) => watch.coming_back = Some(Instant::now()),
                    Err(e) => {
                        display.note(&format!("cannot start {name} again ({e}); trying again"))
                    }
                }
            } else if let Some(since) = watch.coming_back {
                if server.accepting() {
                    watch.coming_back = None;
                    self.restarts += 1;
                    display.note(&format!(
                        "{name} is back after {:.1}s; the units reconnect and carry on",
                        since.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        match (nats.connected(), self.unreachable) {
            (true, Some((since, _))) => {
                display.note(&format!(
                    "NATS at {} is reachable again, after {:.1}s",
                    nats.url,
                    since.elapsed().as_secs_f64()
                ));
                self.unreachable = None;
            }
            (false, None) => self.unreachable = Some((Instant::now(), Instant::now())),
            (false, Some((since, said))) if said.elapsed() >= SAY_UNREACHABLE_EVERY => {
                display.note(&format!(
                    "NATS at {} has been unreachable for {:.0}s; waiting for it (Ctrl-C to stop)",
                    nats.url,
                    since.elapsed().as_secs_f64()
                ));
                self.unreachable = Some((since, Instant::now()));
            }
            _ => {}
        }
        Ok(())
    }
}
