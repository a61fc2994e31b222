//! The Switchyard stage runtime: one process runs one unit of a Pipeline — a source, a group of
//! in-process steps (perhaps one replica of a switcher), or a sink — reading and writing NATS JetStream.
//!
//! What it shares with the other programs (NATS objects, the private server, logging, probes) is in
//! `switchyard-platform`.

pub mod acks;
pub mod books;
pub mod consume;
pub mod crashes;
pub mod faults;
pub mod http;
pub mod join;
pub mod lineage;
pub mod locks;
pub mod otlp;
pub mod payload;
pub mod postgres;
pub mod retry;
pub mod shutdown;
pub mod sinks;
pub mod sources;
pub mod stats;
pub mod steps;
pub mod trace;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use switchyard_crds::unit::{StatsReport, UnitConfig, UnitRole};
use switchyard_platform::credentials::NatsCredentials;
use tokio::sync::watch;

pub use crate::acks::Disconnects;

use crate::consume::{Output, Worker};
use crate::sources::SourceUnit;
use crate::stats::Stats;

/// How to reach NATS and who this process is.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// One server, or several separated by commas.
    pub nats_url: String,
    pub credentials: NatsCredentials,
    /// Tells replicas of one unit apart in reports (pod name, or pid locally).
    pub replica: String,
    /// Exit once a finite source has published everything (local mode); in a cluster the pod stays.
    pub exit_when_done: bool,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (port 0: any free port).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How long a stopping process waits for NATS to take what it still has to send.
const FINAL_FLUSH_WITHIN: Duration = Duration::from_secs(3);

/// Why a unit stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    ConnectSetup(#[from] switchyard_platform::nats::ConnectSetupError),
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("stopped while waiting for {0}")]
    StoppedWaiting(String),
    #[error("the unit config of {role} has no {field}")]
    Config {
        role: &'static str,
        field: &'static str,
    },
    #[error(
        "stopped before the source finished ({0} stored); a restart resumes from its checkpoint"
    )]
    SourceUnfinished(u64),
    #[error(transparent)]
    Source(#[from] sources::SourceError),
    #[error(transparent)]
    Sink(#[from] sinks::SinkError),
    #[error(transparent)]
    Step(#[from] steps::BuildError),
    #[error(transparent)]
    Endpoint(#[from] http::EndpointError),
    #[error(transparent)]
    Consume(#[from] consume::ConsumeError),
}

/// Connects to NATS, retrying until it answers or `shutdown` is set. After that the client reconnects
/// by itself.
pub async fn connect(
    options: &RunOptions,
    name: &str,
    shutdown: &watch::Receiver<bool>,
) -> Result<(async_nats::Client, Disconnects), RunError> {
    let mut delay = Duration::from_millis(200);
    let (lost_tx, lost) = watch::channel(0u64);
    let lost_tx = Arc::new(lost_tx);
    let servers = switchyard_platform::nats::server_addrs(&options.nats_url)?;
    loop {
        let lost_tx = lost_tx.clone();
        let connect = switchyard_platform::nats::connect_options(name, &options.credentials)?
            .event_callback(move |event| {
                let lost_tx = lost_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::debug!("NATS connected"),
                        async_nats::Event::Disconnected => {
                            lost_tx.send_modify(|n| *n += 1);
                            tracing::info!("NATS: disconnected");
                        }
                        other => tracing::info!("NATS: {other}"),
                    }
                }
            });
        match connect.connect(servers.as_slice()).await {
            Ok(client) => return Ok((client, lost)),
            Err(e) => {
                if *shutdown.borrow() {
                    return Err(RunError::Connect {
                        url: options.nats_url.clone(),
                        source: e,
                    });
                }
                tracing::warn!(
                    "cannot reach NATS at {}: {e}; trying again in {delay:?}",
                    options.nats_url
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one unit until it is finished (a finite source in local mode) or `shutdown` is set.
pub async fn run_unit(
    config: UnitConfig,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let name = format!(
        "switchyard-stage {}/{} {}",
        config.pipeline, config.unit, options.replica
    );
    let (client, disconnects) = connect(&options, &name, &shutdown).await?;
    let js = switchyard_platform::nats::jetstream_context(client.clone());
    let stats = Arc::new(Stats::default());
    let concurrency = match &config.role {
        UnitRole::Source { .. } => 0,
        UnitRole::Process { concurrency, .. } | UnitRole::Sink { concurrency, .. } => *concurrency,
    };
    let latest: stats::Latest = Arc::default();
    let reporter = stats::spawn_reporter(
        stats::ReportContext {
            client: client.clone(),
            js: js.clone(),
            subject: config.stats_subject.clone(),
            unit: config.unit.clone(),
            replica: options.replica.clone(),
            stream: config.stream.clone(),
            consumer: config.input.as_ref().map(|i| i.durable.clone()),
            concurrency,
        },
        stats.clone(),
        latest.clone(),
    );
    let server = serve_metrics(&options, &config, &latest, &stats);
    let spans = export_spans(&config, &options.replica);
    let books = config.books.as_ref().map(|b| {
        Arc::new(books::Ledger::new(
            js.clone(),
            b.stream.clone(),
            &b.prefix,
            &config.unit,
            &options.replica,
            disconnects.clone(),
        ))
    });
    let roll_ups = books.clone().map(books::Ledger::spawn_roll_ups);
    let unit = Unit {
        books: &books,
        config: &config,
        options: &options,
        client: &client,
        js: &js,
        stats: &stats,
        disconnects: &disconnects,
        spans: &spans,
    };
    let result = unit.run(shutdown).await;
    if let Some(roll_ups) = roll_ups {
        roll_ups.abort();
    }
    if let Some(books) = &books {
        close_books(books).await;
    }
    if let Some(spans) = spans {
        spans.shutdown().await;
    }
    reporter.abort();
    if let Some(server) = server {
        server.abort();
    }
    let mut last = stats.report(&config.unit, &options.replica);
    last.concurrency = concurrency;
    last.last = true;
    goodbye(&client, &config.stats_subject, &last).await;
    result
}

/// Serves `/metrics` and the probes, when the unit was given an address for them.
fn serve_metrics(
    options: &RunOptions,
    config: &UnitConfig,
    latest: &stats::Latest,
    stats: &Arc<Stats>,
) -> Option<tokio::task::JoinHandle<()>> {
    options.metrics_addr.map(|addr| {
        let (pipeline, latest, stats) = (config.pipeline.clone(), latest.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(e) = stats::serve(addr, pipeline, latest, stats).await {
                tracing::error!("cannot serve metrics on {addr}: {e}");
            }
        })
    })
}

/// What this process recorded, in one message: the books of a stopped process stay small.
async fn close_books(books: &books::Ledger) {
    match tokio::time::timeout(FINAL_FLUSH_WITHIN, books.roll_up()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot roll up the books: {e}"),
        Err(_) => tracing::warn!("the books were not rolled up within {FINAL_FLUSH_WITHIN:?}"),
    }
}

/// The OTLP exporter, when the environment asks for one. A misconfigured one is logged and the unit
/// runs without it: spans are worth less than the data.
fn export_spans(config: &UnitConfig, replica: &str) -> Option<otlp::Spans> {
    // Only a unit told to export needs a client (and CA certificates for it).
    otlp::configured(|name| std::env::var(name).ok())?;
    let client = match steps::http_client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("cannot build an HTTP client for OTLP ({e}); spans are not exported");
            return None;
        }
    };
    otlp::Spans::from_env(config, replica, client).unwrap_or_else(|e| {
        tracing::error!("{e}");
        None
    })
}

/// Sends the last report and what is still buffered (acknowledgements are fire-and-forget publishes)
/// before the process goes, unless NATS is gone, when waiting would keep the process forever.
async fn goodbye(client: &async_nats::Client, subject: &str, last: &StatsReport) {
    let flushed = async {
        stats::publish(client, subject, last).await;
        client.flush().await
    };
    match tokio::time::timeout(FINAL_FLUSH_WITHIN, flushed).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot flush the NATS connection: {e}"),
        Err(_) => tracing::warn!(
            "NATS did not take the last acknowledgements within {FINAL_FLUSH_WITHIN:?}; their messages are delivered again"
        ),
    }
}

/// One unit's process: its config and its connections.
struct Unit<'a> {
    config: &'a UnitConfig,
    options: &'a RunOptions,
    client: &'a async_nats::Client,
    js: &'a jetstream::Context,
    stats: &'a Arc<Stats>,
    disconnects: &'a Disconnects,
    spans: &'a Option<otlp::Spans>,
    books: &'a Option<Arc<books::Ledger>>,
}

impl Unit<'_> {
    fn tracer(&self) -> Option<trace::Tracer> {
        trace::Tracer::new(
            self.client.clone(),
            self.config.trace.as_ref(),
            &self.config.unit,
            &self.options.replica,
        )
    }

    /// The unit's role, until it is finished or `shutdown` is set.
    async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
        match &self.config.role {
            UnitRole::Source {
                source,
                checkpoint_bucket,
            } => self.run_source(source, checkpoint_bucket, shutdown).await,
            UnitRole::Process {
                steps,
                batch,
                concurrency,
            } => {
                self.run_process(steps, *batch, *concurrency, shutdown)
                    .await
            }
            UnitRole::Sink {
                sink,
                retry,
                concurrency,
            } => self.run_sink(sink, *retry, *concurrency, shutdown).await,
        }
    }

    async fn run_source(
        &self,
        source: &switchyard_crds::SourceKind,
        checkpoint_bucket: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let (config, stats) = (self.config, self.stats);
        let checkpoints = wait_for(&mut shutdown, "the checkpoint bucket", || {
            self.js.get_key_value(checkpoint_bucket.to_string())
        })
        .await?;
        let output = config.output_subject.clone().ok_or(RunError::Config {
            role: "a source",
            field: "outputSubject",
        })?;
        let unit = SourceUnit {
            name: config.unit.clone(),
            js: self.js.clone(),
            client: self.client.clone(),
            subject: output.into(),
            checkpoints,
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            disconnects: self.disconnects.clone(),
            queue_group: format!(
                "switchyard.{}.{}.{}",
                config.namespace, config.pipeline, config.unit
            ),
            tracer: self.tracer(),
            spans: self.spans.clone(),
            frame_items: config.frame_items as usize,
            books: self.books.clone(),
            last_sent: Default::default(),
            jobs: config.jobs.clone(),
            readers: config.output_readers.clone(),
        };
        stats.ready.store(true, Ordering::Relaxed);
        sources::run(source, &unit).await?;
        let stopped_early = *shutdown.borrow();
        if !source.is_finite() {
            return Ok(());
        }
        if stopped_early && self.options.exit_when_done {
            // In local mode a clean exit means "finished": a source stopped halfway must not say so.
            return Err(RunError::SourceUnfinished(
                stats.processed.load(Ordering::Relaxed),
            ));
        }
        if !stopped_early {
            stats.finished.store(true, Ordering::Relaxed);
            tracing::info!(
                published = stats.processed.load(Ordering::Relaxed),
                "source finished"
            );
            if !self.options.exit_when_done {
                crate::shutdown::stopped(&mut shutdown).await;
            }
        }
        Ok(())
    }

    /// A process unit: its steps on every input, then publish downstream.
    async fn run_process(
        &self,
        steps: &[switchyard_crds::unit::StepConfig],
        batch: Option<switchyard_crds::unit::BatchConfig>,
        concurrency: u32,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let output = self.config.output_subject.clone().ok_or(RunError::Config {
            role: "a process unit",
            field: "outputSubject",
        })?;
        let http = steps::LazyClient::default();
        let steps = steps
            .iter()
            .map(|s| steps::Step::build(s, &http))
            .collect::<Result<Vec<_>, _>>()?;
        let output = Output::Publish(output.into());
        self.read(steps, output, batch, concurrency, shutdown).await
    }

    async fn run_sink(
        &self,
        sink: &switchyard_crds::SinkKind,
        retry: switchyard_crds::unit::RetryConfig,
        concurrency: u32,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let output = Output::Sink {
            sink: self.open_sink(sink, &mut shutdown).await?,
            retry,
        };
        self.read(Vec::new(), output, None, concurrency, shutdown)
            .await
    }

    /// Pulls the unit's input until `shutdown`, through `steps` to `output`.
    async fn read(
        &self,
        steps: Vec<steps::Step>,
        output: Output,
        batch: Option<switchyard_crds::unit::BatchConfig>,
        concurrency: u32,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let config = self.config;
        let input = config.input.as_ref().ok_or(RunError::Config {
            role: "a unit that reads",
            field: "input",
        })?;
        let records = config.crashes.as_ref().ok_or(RunError::Config {
            role: "a unit that reads",
            field: "crashes",
        })?;
        let mut shutdown = shutdown;
        let store = wait_for(&mut shutdown, "the checkpoint bucket", || {
            self.js.get_key_value(records.bucket.clone())
        })
        .await?;
        let max_payload = self.client.server_info().max_payload;
        let join = self.open_join(max_payload, &mut shutdown).await?;
        let worker = Worker {
            crashes: crashes::CrashRecords {
                store,
                unit: config.unit.clone(),
                dead_letter_after: records.dead_letter_after,
            },
            unit: config.unit.clone(),
            stream: config.stream.clone(),
            js: self.js.clone(),
            steps,
            output,
            dead_letter_subject: config.dead_letter_subject.as_str().into(),
            stats: self.stats.clone(),
            batch,
            concurrency: concurrency.max(1) as usize,
            progress_every: Duration::from_millis(input.ack_wait_ms / 3)
                .max(Duration::from_millis(100)),
            max_payload,
            frame_items: config.frame_items as usize,
            disconnects: self.disconnects.clone(),
            tracer: self.tracer(),
            spans: self.spans.clone(),
            books: self.books.clone(),
            jobs: config.jobs.clone().map(|jobs| consume::Jobs {
                config: jobs,
                readers: config.output_readers.clone(),
            }),
            join,
            branch: config.branch.clone(),
        };
        // A join's timeouts are swept beside the loop, until it has wound down.
        let (wound_down, sweep_until) = watch::channel(false);
        let run = async {
            let result = worker.run(input, shutdown).await;
            let _ = wound_down.send(true);
            result
        };
        let (result, ()) = tokio::join!(run, worker.sweep_joins(sweep_until));
        for step in &worker.steps {
            step.shutdown().await;
        }
        Ok(result?)
    }

    /// A join unit's store of the items it waits on.
    async fn open_join(
        &self,
        max_payload: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<join::Join>, RunError> {
        let Some(join) = &self.config.join else {
            return Ok(None);
        };
        let bucket = wait_for(shutdown, "the join bucket", || {
            self.js.get_key_value(join.bucket.clone())
        })
        .await?;
        Ok(Some(join::Join::new(
            &self.config.unit,
            join.clone(),
            bucket,
            self.js.clone(),
            max_payload.saturating_sub(switchyard_platform::frame::HEADERS_ROOM),
            self.stats.clone(),
        )))
    }

    async fn open_sink(
        &self,
        sink: &switchyard_crds::SinkKind,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Box<dyn sinks::Sink>, RunError> {
        let stream = wait_for(shutdown, "the pipeline's stream", || {
            self.js.get_stream(self.config.stream.clone())
        })
        .await?;
        // The stream's creation time names its life: a sink's ledger from an earlier life is void.
        let instance = stream
            .cached_info()
            .created
            .unix_timestamp_nanos()
            .to_string();
        Ok(sinks::open(&self.config.unit, sink, self.client, &instance).await?)
    }
}

/// Retries `get` until it succeeds: in a cluster a stage may start before the operator has created
/// the stream or bucket it needs.
async fn wait_for<T, E, F, Fut>(
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
    mut get: F,
) -> Result<T, RunError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match get().await {
            Ok(value) => return Ok(value),
            Err(e) => {
                tracing::warn!("cannot open {what}: {e}; trying again in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = crate::shutdown::stopped(shutdown) => return Err(RunError::StoppedWaiting(what.to_string())),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
