//! The NATS a run uses: a private server or cluster that it starts (and keeps running, see
//! `watchdog`), or one it is given.

use std::time::{Duration, Instant};

use switchyard_platform::admin::{self, AdminError};
use switchyard_platform::credentials::NatsAuthArgs;
use switchyard_platform::embedded::{NatsCluster, NatsServer};

use crate::args::RunArgs;
use crate::error::RunError;
use crate::prepare::Prepared;
use crate::progress::Display;
use crate::state::{Kept, LocalState, RunRecord, StateLock};

/// How long a private cluster may take to elect its JetStream leaders before the run gives up.
const CLUSTER_READY_WITHIN: Duration = Duration::from_secs(30);

pub struct RunNats {
    /// The run's own servers: one, or the nodes of a cluster. Empty when the run was given a server.
    pub servers: Vec<NatsServer>,
    pub url: String,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// What the stage processes are given to prove themselves: the run's own flags for a given
    /// server, nothing for a private one (it is open, on loopback).
    pub auth: NatsAuthArgs,
    /// The run's local state, held while it runs; absent on a given server.
    pub state: Option<(LocalState, StateLock)>,
    /// What was there is taken up again rather than deleted.
    pub resumed: bool,
}

impl Drop for RunNats {
    fn drop(&mut self) {
        if let Some((state, _)) = &self.state {
            if let Err(e) = state.clear_run() {
                tracing::warn!("{e}");
            }
        }
    }
}

impl RunNats {
    /// Connects (starting a private server or cluster unless one is given) and creates the Pipeline's
    /// stream, bucket and consumers; on a given server, what the Pipeline had there is deleted first.
    /// Settles how many copies the stream keeps, in the layout every unit is started from.
    pub async fn start(
        args: &RunArgs,
        prepared: &mut Prepared,
        display: &mut Display,
    ) -> Result<RunNats, RunError> {
        let (servers, url, auth, state, resumed) = match &args.nats_url {
            Some(url) => (
                Vec::new(),
                url.clone(),
                args.nats_auth.clone(),
                None,
                args.resume,
            ),
            None => {
                let private = Private::start(args, prepared, display)?;
                (
                    private.servers,
                    private.url,
                    NatsAuthArgs::default(),
                    Some(private.state),
                    private.resumed,
                )
            }
        };
        let credentials = auth.load()?;
        let client = crate::connect::connect("switchyard run", &url, &credentials).await?;
        let js = switchyard_platform::nats::jetstream_context(client.clone());
        let nats = RunNats {
            servers,
            url,
            client,
            js,
            auth,
            state,
            resumed,
        };
        nats.declare(prepared).await?;
        display.note(&nats.describe(prepared));
        Ok(nats)
    }

    /// Creates the Pipeline's NATS objects. A private cluster is given time to elect its leaders.
    async fn declare(&self, prepared: &Prepared) -> Result<(), RunError> {
        let layout = &prepared.layout.nats;
        let started = Instant::now();
        loop {
            let attempt = async {
                if self.servers.is_empty() && !self.resumed {
                    // A run is a job: it starts from nothing, even on a server that saw this Pipeline
                    // before, unless it resumes.
                    admin::delete(&self.js, layout).await?;
                }
                admin::apply(&self.js, layout).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e @ AdminError::Replicas { .. }) => return Err(e.into()),
                Err(e) if self.servers.len() > 1 && started.elapsed() < CLUSTER_READY_WITHIN => {
                    tracing::debug!("the private cluster is not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn describe(&self, prepared: &Prepared) -> String {
        let kept = match &self.state {
            Some((state, _)) => format!(
                "{}, kept in {}",
                if self.resumed { "resumed" } else { "fresh" },
                state.dir.display()
            ),
            None => String::new(),
        };
        let which = match self.servers.len() {
            0 if self.resumed => " (resumed)".to_string(),
            0 => String::new(),
            1 => format!(" (private, {kept})"),
            n => format!(" (a private cluster of {n} servers, {kept})"),
        };
        let replicas = prepared.layout.nats.stream.replicas;
        format!(
            "{}: NATS at {}{which}; stream {}{}",
            prepared.name,
            self.url,
            prepared.layout.nats.stream.name,
            if replicas > 1 {
                format!(" with {replicas} replicas")
            } else {
                String::new()
            }
        )
    }

    /// The run's own connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// The run's private server or cluster, on its kept store, and the local state it holds.
struct Private {
    servers: Vec<NatsServer>,
    url: String,
    state: (LocalState, StateLock),
    resumed: bool,
}

impl Private {
    /// Starts the servers (as many as asked, or as the kept store had when resuming), settles how
    /// many copies the stream keeps, and records the run in the local state.
    fn start(
        args: &RunArgs,
        prepared: &mut Prepared,
        display: &mut Display,
    ) -> Result<Private, RunError> {
        let local = LocalState::of(&args.file, &prepared.name);
        let lock = local.lock()?;
        let kept = local.kept();
        let resumed = args.resume && local.exists();
        if args.resume && !resumed {
            display.note(&format!(
                "nothing to resume in {}: starting afresh",
                local.dir.display()
            ));
        }
        let size = args.nats_cluster.unwrap_or(if resumed {
            kept.servers.max(1)
        } else {
            prepared.nats_replicas.unwrap_or(1) as usize
        });
        if resumed && kept.servers.max(1) != size {
            return Err(RunError::ResumeCluster {
                kept: kept.servers.max(1),
                asked: size,
            });
        }
        let replicas = prepared.nats_replicas.unwrap_or(size as u32);
        if replicas as usize > size {
            return Err(RunError::ClusterTooSmall {
                replicas,
                servers: size,
            });
        }
        prepared.layout.nats.stream.replicas = replicas;
        if !args.nats_auth.child_env().is_empty() {
            display.note("NATS credentials are not used: the run's private server needs none (they are for --nats-url)");
        }
        if !resumed {
            local.reset()?;
        }
        let store = local.store();
        let servers = if size == 1 {
            vec![NatsServer::start_in(&store)?]
        } else {
            NatsCluster::start_in(size, &store)?.nodes
        };
        if resumed && !kept.epochs.is_empty() {
            // Edits made with --watch moved publishers to subjects of later epochs.
            prepared.layout =
                switchyard_crds::migration::with_epochs(prepared.layout.clone(), &kept.epochs);
        }
        local.save_kept(&Kept {
            servers: size,
            counts: kept.counts,
            epochs: if resumed {
                kept.epochs
            } else {
                Default::default()
            },
        })?;
        let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
        let url = urls.join(",");
        local.record_run(&RunRecord {
            pid: std::process::id(),
            url: url.clone(),
        })?;
        Ok(Private {
            servers,
            url,
            state: (local, lock),
            resumed,
        })
    }
}
