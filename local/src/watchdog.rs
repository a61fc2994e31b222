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

/// Watches the run's NATS server.
#[derive(Default)]
pub struct NatsWatch {
    /// Since when the run's own connection has been down, and when that was last said.
    unreachable: Option<(Instant, Instant)>,
    /// Times the private server was started again.
    pub restarts: u32,
}

impl NatsWatch {
    /// Restarts a private server that exited, on its port and store, so that the units reconnect and
    /// carry on; says how long NATS was unreachable, and keeps saying so while it is.
    pub fn check(&mut self, nats: &mut RunNats, display: &mut Display) {
        if let Some(server) = nats.server.as_mut() {
            if let Some(status) = server.exited() {
                display.note(&format!(
                    "nats-server exited ({status}); starting it again on the same port and store"
                ));
                let started = Instant::now();
                // Blocks this task for the server's start (well under a second): the units wait for
                // it anyway.
                match server.restart() {
                    Ok(()) => {
                        self.restarts += 1;
                        display.note(&format!(
                            "nats-server is back after {:.1}s; the units reconnect and carry on",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    Err(e) => display.note(&format!(
                        "cannot start nats-server again ({e}); trying again"
                    )),
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
    }
}
