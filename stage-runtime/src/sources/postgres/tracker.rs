//! The jobs of a source that completes a row once its item is finished: the units' accounts
//! read as they come (`switchyard_crds::jobs`), and each row's outcome written back, fenced by its
//! reservation, once its job has ended.

use std::time::Duration;

use crate::postgres::Database;
use crate::sources::error::SourceError;
use crate::sources::unit::SourceUnit;

/// Writes the outcomes back in one statement, each fenced by its reservation; how many were
/// written (the others' rows are held by another attempt now).
pub(super) async fn write_outcomes(
    database: &Database,
    finish: &str,
    done: &[Done],
) -> Result<usize, SourceError> {
    if done.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = done.iter().map(|d| d.key.as_str()).collect();
    let reservations: Vec<&str> = done.iter().map(|d| d.reservation.as_str()).collect();
    let successes: Vec<bool> = done.iter().map(|d| d.success).collect();
    let errors: Vec<Option<&str>> = done.iter().map(|d| d.error.as_deref()).collect();
    let written = database
        .query_until_answered(finish, &[&keys, &reservations, &successes, &errors])
        .await
        .map_err(SourceError::Settings)?
        .len();
    if written < done.len() {
        tracing::warn!(
            rows = done.len() - written,
            "outcomes not written: another attempt holds those rows now (their lease ran out)"
        );
    }
    Ok(written)
}

/// What the source writes back about one row.
pub(super) struct Done {
    pub(super) key: String,
    pub(super) reservation: String,
    pub(super) success: bool,
    pub(super) error: Option<String>,
}

/// A job the tracker follows: its row, its claim, where it stands, and the account messages that
/// brought it there (by stream sequence; see `Held`).
pub(super) struct Open {
    pub(super) key: String,
    pub(super) reservation: String,
    pub(super) state: switchyard_crds::jobs::JobState,
    pub(super) accounts: Vec<u64>,
    pub(super) since: std::time::Instant,
}

/// The account messages read and not yet acknowledged, by stream sequence. A message speaks of
/// the items of one input, often of many jobs; it is acknowledged once every job it spoke of is
/// written back or forgotten, so that a restarted source reads again what it has not done.
#[derive(Default)]
pub(super) struct Held {
    pub(super) messages: std::collections::HashMap<u64, (async_nats::jetstream::Message, usize)>,
}

impl Held {
    /// Holds `message`, which open jobs spoke of `waiting` times; acknowledges it now if none did.
    async fn hold(
        &mut self,
        sequence: u64,
        message: async_nats::jetstream::Message,
        waiting: usize,
    ) {
        if waiting == 0 {
            let _ = message.ack().await;
        } else {
            self.messages.insert(sequence, (message, waiting));
        }
    }

    /// A job is done with: the messages no other open job waits on are acknowledged.
    async fn release(&mut self, accounts: Vec<u64>) {
        for sequence in accounts {
            let last = match self.messages.get_mut(&sequence) {
                Some((_, waiting)) => {
                    *waiting = waiting.saturating_sub(1);
                    *waiting == 0
                }
                None => false,
            };
            if last {
                if let Some((message, _)) = self.messages.remove(&sequence) {
                    let _ = message.ack().await;
                }
            }
        }
    }
}

/// Follows the jobs of a source that completes a row once its item is finished: reads the units'
/// accounts, and writes each row's outcome back once its job has ended.
pub(super) struct Tracker {
    pub(super) open: std::sync::Arc<OpenJobs>,
    pub(super) jobs: tokio::sync::mpsc::UnboundedSender<(String, Open)>,
    pub(super) stop: tokio::sync::watch::Sender<bool>,
    pub(super) task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

/// Jobs followed and not yet written back (or forgotten): the source claims no more while
/// `maxClaimed` are, and is woken as soon as some are done with.
#[derive(Default)]
pub(super) struct OpenJobs {
    pub(super) count: std::sync::atomic::AtomicUsize,
    pub(super) freed: tokio::sync::Notify,
}

impl OpenJobs {
    fn done_with(&self, jobs: usize) {
        if jobs > 0 {
            self.count
                .fetch_sub(jobs, std::sync::atomic::Ordering::Relaxed);
            self.freed.notify_one();
        }
    }
}

/// Jobs that ended are written back as soon as no account is waiting to be read (so they go
/// together under load), and once this many have, whatever is waiting.
pub(super) const WRITE_BACK_AT_ONCE: usize = 2000;
/// How often the tracker looks for jobs followed too long.
pub(super) const FORGET_EVERY: Duration = Duration::from_millis(500);

impl Tracker {
    /// Starts reading the accounts of `unit`'s jobs: every one still in the stream, that is every
    /// job not yet written back, so jobs taken back after a restart pick up where they stood.
    pub(super) async fn start(
        unit: &SourceUnit,
        config: &switchyard_crds::unit::JobsConfig,
        database: Database,
        finish: String,
        known: Vec<(String, Open)>,
        lease: Duration,
    ) -> Result<Tracker, SourceError> {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let failed =
            |what: &str, e: &dyn std::fmt::Display| SourceError::Jobs(format!("{what}: {e}"));
        let stream = unit
            .js
            .get_stream(config.stream.clone())
            .await
            .map_err(|e| failed(&format!("stream {}", config.stream), &e))?;
        let durable = format!("{}-jobs", unit.name);
        // A consumer left by an earlier process holds what it delivered until its deadline: start
        // afresh, from everything still in the stream.
        let _ = stream.delete_consumer(&durable).await;
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("{}.{}", config.prefix, unit.name),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                // Accounts are held until their job ends, however long its lease.
                ack_wait: Duration::from_secs(24 * 3600),
                max_ack_pending: -1,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&format!("consumer {durable}"), &e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| failed("reading accounts", &e))?;
        let (jobs, registered) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let stats = unit.stats.clone();
        let open = std::sync::Arc::new(OpenJobs {
            count: known.len().into(),
            freed: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(follow(
            messages,
            known.into_iter().collect(),
            Following {
                registered,
                stopping,
                database,
                finish,
                stats,
                open: open.clone(),
                forget_after: lease * 2,
            },
        ));
        Ok(Tracker {
            open,
            jobs,
            stop,
            task,
        })
    }

    pub(super) fn follow(&self, job: String, open: Open) {
        self.open
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.jobs.send((job, open));
    }

    pub(super) fn open(&self) -> usize {
        self.open.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Until some open jobs are done with (at once if some were since the last call).
    pub(super) async fn freed(&self) {
        self.open.freed.notified().await
    }

    /// Writes back what has ended and stops.
    pub(super) async fn finish(self) -> Result<(), SourceError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(SourceError::Task(e)),
        }
    }
}

/// What the tracker's task works with besides the accounts.
pub(super) struct Following {
    pub(super) registered: tokio::sync::mpsc::UnboundedReceiver<(String, Open)>,
    pub(super) stopping: tokio::sync::watch::Receiver<bool>,
    pub(super) database: Database,
    pub(super) finish: String,
    pub(super) stats: std::sync::Arc<crate::stats::Stats>,
    pub(super) open: std::sync::Arc<OpenJobs>,
    /// A job followed this long has had its row claimed again or given up by now: a late outcome
    /// would be refused by the fence anyway.
    pub(super) forget_after: Duration,
}

pub(super) async fn follow(
    mut messages: async_nats::jetstream::consumer::pull::Stream,
    mut open: std::collections::HashMap<String, Open>,
    mut with: Following,
) -> Result<(), SourceError> {
    use futures::StreamExt;
    let mut ended: Vec<(Open, switchyard_crds::jobs::Ended)> = Vec::new();
    let mut tick = tokio::time::interval(FORGET_EVERY);
    let mut forgotten = Vec::new();
    let mut held = Held::default();
    loop {
        tokio::select! {
            // A job is known before its item is published: its accounts never come first.
            biased;
            // An earlier attempt of the same row stays followed: should it end first, the fence
            // refuses its outcome in the database.
            Some((job, entry)) = with.registered.recv() => {
                open.insert(job, entry);
            }
            message = messages.next() => {
                let Some(message) = message else { break };
                let message = message.map_err(|e| SourceError::Jobs(format!("reading accounts: {e}")))?;
                let sequence = message.info().map(|i| i.stream_sequence).unwrap_or_default();
                let Some(accounts) = switchyard_crds::jobs::read_account(&message.payload) else {
                    tracing::warn!(sequence, "an account that cannot be read: dropped");
                    let _ = message.ack().await;
                    continue;
                };
                let mut waiting = 0;
                for account in accounts {
                    // A job already written back (or another attempt's): nothing to do.
                    let Some(job) = open.get_mut(&account.job) else { continue };
                    let end = job.state.apply(&account);
                    job.accounts.push(sequence);
                    waiting += 1;
                    if let Some(end) = end {
                        if let Some(job) = open.remove(&account.job) {
                            ended.push((job, end));
                        }
                    }
                }
                held.hold(sequence, message, waiting).await;
                if ended.len() >= WRITE_BACK_AT_ONCE {
                    write_back(&with, &mut ended, &mut held).await?;
                }
            }
            // No account is waiting to be read: what ended goes now.
            _ = std::future::ready(()), if !ended.is_empty() => {
                write_back(&with, &mut ended, &mut held).await?;
            }
            _ = tick.tick() => {
                let stale: Vec<String> = open
                    .iter()
                    .filter(|(_, o)| o.since.elapsed() > with.forget_after)
                    .map(|(job, _)| job.clone())
                    .collect();
                for job in stale {
                    if let Some(o) = open.remove(&job) {
                        forgotten.push(o);
                    }
                }
                with.open.done_with(forgotten.len());
                for job in forgotten.drain(..) {
                    held.release(job.accounts).await;
                }
            }
            _ = crate::shutdown::stopped(&mut with.stopping) => break,
        }
    }
    write_back(&with, &mut ended, &mut held).await?;
    Ok(())
}

/// Writes the outcomes of the jobs that ended, fenced by their reservations, then acknowledges the
/// accounts nothing else waits on.
pub(super) async fn write_back(
    with: &Following,
    ended: &mut Vec<(Open, switchyard_crds::jobs::Ended)>,
    held: &mut Held,
) -> Result<(), SourceError> {
    let done: Vec<Done> = ended
        .iter()
        .map(|(job, end)| Done {
            key: job.key.clone(),
            reservation: job.reservation.clone(),
            success: *end == switchyard_crds::jobs::Ended::Succeeded,
            error: match end {
                switchyard_crds::jobs::Ended::Failed(error) => Some(error.clone()),
                switchyard_crds::jobs::Ended::Succeeded => None,
            },
        })
        .collect();
    let written = write_outcomes(&with.database, &with.finish, &done).await?;
    crate::stats::Stats::add(&with.stats.published, written as u64);
    with.open.done_with(ended.len());
    for (job, _) in ended.drain(..) {
        held.release(job.accounts).await;
    }
    Ok(())
}
