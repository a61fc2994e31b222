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
    /// Quick exits in a row.
    pub exits: u32,
    pub log: String,
}

/// The wait before starting again a server that exited quickly for the `quick_exits`-th time in a
/// row: none after a first exit (it comes back at once), then doubling from 250 ms, so that a server
/// that cannot start is not started ten times a second.
pub fn respawn_delay(quick_exits: u32) -> Duration {
    match quick_exits {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(250) * 2u32.pow((n - 2).min(4)),
    }
}

/// What the watch knows of one private server.
#[derive(Default, Clone)]
struct ServerWatch {
    /// Started again at this time and not yet taking connections.
    coming_back: Option<Instant>,
    quick_exits: u32,
    /// It exited and is to be started again at this time (after its backoff).
    respawn_at: Option<Instant>,
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
    /// and carry on (without waiting for it: the rest of the run goes on meanwhile; after quick exits,
    /// after a backoff); says when it is back, how long NATS was unreachable, and keeps saying so
    /// while it is. A server that keeps exiting right after its start ends the run.
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
            if let Some(at) = watch.respawn_at {
                if Instant::now() >= at {
                    watch.respawn_at = None;
                    match server.respawn() {
                        Ok(()) => watch.coming_back = Some(Instant::now()),
                        Err(e) => {
                            display.note(&format!("cannot start {name} again ({e}); trying again"));
                            watch.respawn_at = Some(Instant::now() + respawn_delay(2));
                        }
                    }
                }
            } else if let Some(status) = server.exited() {
                watch.quick_exits = if server.uptime() < QUICK_EXIT {
                    watch.quick_exits + 1
                } else {
                    1
                };
                if watch.quick_exits >= SERVER_CRASH_LOOP {
                    return Err(ServerCrashLoop {
                        server: name,
                        status: status.to_string(),
                        exits: watch.quick_exits,
                        log: server.log_tail(),
                    });
                }
                let delay = respawn_delay(watch.quick_exits);
                display.note(&format!(
                    "{name} exited ({status}); starting it again on the same port and store{}",
                    if delay.is_zero() {
                        String::new()
                    } else {
                        format!(" in {:.2}s", delay.as_secs_f64())
                    }
                ));
                watch.respawn_at = Some(Instant::now() + delay);
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
        self.note_reachability(nats, display);
        Ok(())
    }

    /// Says when NATS became unreachable, every `SAY_UNREACHABLE_EVERY` while it stays so, and
    /// when it is back.
    fn note_reachability(&mut self, nats: &RunNats, display: &mut Display) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_keeps_exiting_is_started_again_later_and_later() {
        let delays: Vec<u128> = (1..=SERVER_CRASH_LOOP)
            .map(|n| respawn_delay(n).as_millis())
            .collect();
        assert_eq!(delays, vec![0, 250, 500, 1000, 2000]);
        assert_eq!(respawn_delay(40), Duration::from_secs(4));
    }
}
