//! NATS from the operator's side: one connection per server (and credentials), reused across
//! reconciles, and what the operator reads there for status.
//!
//! Every call is bounded in time, and connecting to one server never waits on another: a server that
//! accepts connections but never answers slows only the Pipelines that use it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use switchyard_crds::books::Books;
use switchyard_crds::layout::{NatsLayout, DEAD_LETTER_CONSUMER};
use switchyard_platform::credentials::NatsCredentials;

/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one step's work against NATS (declaring the stream and consumers, reading lag) may take.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// An error of the NATS client, whichever of its kinds.
type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("the NATS credentials are not usable: {0}")]
    BadCredentials(#[from] switchyard_platform::nats::ConnectSetupError),
    #[error("cannot reach NATS at {url}: {source}")]
    Unreachable { url: String, source: Cause },
    #[error("cannot reach NATS at {url}: no answer to the connection handshake")]
    NoHandshake { url: String },
    #[error("NATS did not answer within {}s while {doing}", .after.as_secs())]
    Timeout { doing: String, after: Duration },
    #[error("NATS refused {doing}: {source}")]
    Refused { doing: String, source: Cause },
}

type Key = (String, NatsCredentials);
type Slot = Arc<tokio::sync::Mutex<Option<async_nats::Client>>>;

#[derive(Default)]
pub struct NatsPool {
    /// One slot per server and credentials; the map's lock is held only to find the slot.
    slots: std::sync::Mutex<HashMap<Key, Slot>>,
}

impl NatsPool {
    /// A JetStream context for `url`, connecting on first use (or after the connection was lost).
    pub async fn jetstream(
        &self,
        url: &str,
        credentials: NatsCredentials,
    ) -> Result<jetstream::Context, NatsError> {
        let key = (url.to_string(), credentials.clone());
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut client = slot.lock().await;
        if let Some(c) = client.as_ref() {
            if c.connection_state() == async_nats::connection::State::Connected {
                return Ok(switchyard_platform::nats::jetstream_context(c.clone()));
            }
        }
        let options =
            switchyard_platform::nats::connect_options("switchyard-operator", &credentials)?
                .connection_timeout(CONNECT_TIMEOUT)
                .request_timeout(Some(Duration::from_secs(5)));
        let servers = switchyard_platform::nats::server_addrs(url)?;
        // The connection timeout covers the TCP connect; a server that accepts and then stays silent
        // is bounded here.
        let connected = tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(servers))
            .await
            .map_err(|_| NatsError::NoHandshake {
                url: url.to_string(),
            })?
            .map_err(|e| NatsError::Unreachable {
                url: url.to_string(),
                source: Box::new(e),
            })?;
        *client = Some(connected.clone());
        Ok(switchyard_platform::nats::jetstream_context(connected))
    }
}

/// Runs `work` against NATS within `OPERATION_TIMEOUT`.
pub async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    doing: &str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, NatsError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(refused(doing.to_string())(e)),
        Err(_) => Err(NatsError::Timeout {
            doing: doing.to_string(),
            after: OPERATION_TIMEOUT,
        }),
    }
}

/// What NATS says about each unit that reads: its lag (pending plus unacknowledged) and the dead
/// letters in its dead-letter subject.
#[derive(Debug, Default)]
pub struct NatsObservation {
    pub lag: BTreeMap<String, u64>,
    pub dead_lettered: BTreeMap<String, u64>,
    /// The books as read now, with the units whose consumer was idle before and after they were
    /// read (and took nothing new meanwhile); None when they could not be read.
    pub books: Option<(Books, BTreeSet<String>)>,
}

pub async fn observe(
    js: &jetstream::Context,
    layout: &NatsLayout,
    dead_letter_subjects: &BTreeMap<String, String>,
) -> Result<NatsObservation, NatsError> {
    let doing = "reading lag and dead letters";
    tokio::time::timeout(
        OPERATION_TIMEOUT,
        observe_unbounded(js, layout, dead_letter_subjects),
    )
    .await
    .unwrap_or_else(|_| {
        Err(NatsError::Timeout {
            doing: doing.to_string(),
            after: OPERATION_TIMEOUT,
        })
    })
}

fn refused<E: std::error::Error + Send + Sync + 'static>(
    doing: String,
) -> impl FnOnce(E) -> NatsError {
    move |e| NatsError::Refused {
        doing,
        source: Box::new(e),
    }
}

async fn observe_unbounded(
    js: &jetstream::Context,
    layout: &NatsLayout,
    dead_letter_subjects: &BTreeMap<String, String>,
) -> Result<NatsObservation, NatsError> {
    let stream = js
        .get_stream(&layout.stream.name)
        .await
        .map_err(refused(format!("reading stream {}", layout.stream.name)))?;
    let mut observation = NatsObservation::default();
    let mut idle_before = BTreeMap::new();
    for consumer in &layout.consumers {
        if consumer.durable == DEAD_LETTER_CONSUMER {
            continue;
        }
        let info = stream
            .consumer_info(&consumer.durable)
            .await
            .map_err(refused(format!("reading consumer {}", consumer.durable)))?;
        observation.lag.insert(
            consumer.durable.clone(),
            info.num_pending + info.num_ack_pending as u64,
        );
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            idle_before.insert(consumer.durable.clone(), info.delivered.stream_sequence);
        }
    }
    // The books, and which readers stayed idle while they were read: a Pipeline made before the
    // books has none, which leaves the rest of the status as it was.
    match switchyard_platform::books::read(js, &layout.books.name, &layout.books.filter()).await {
        Ok(read) => {
            let mut settled = BTreeSet::new();
            for (durable, seq) in idle_before {
                let info = stream
                    .consumer_info(&durable)
                    .await
                    .map_err(refused(format!("reading consumer {durable}")))?;
                if info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence == seq
                {
                    settled.insert(durable);
                }
            }
            observation.books = Some((read.books(&layout.books.root), settled));
            // Replicas that stopped leave their last records; nobody else writes their subjects.
            let window = std::time::Duration::from_millis(layout.stream.duplicate_window_ms);
            if let Err(e) =
                switchyard_platform::books::roll_up_idle(js, &layout.books.name, &read, window)
                    .await
            {
                tracing::warn!("cannot roll up the books of stopped replicas: {e}");
            }
        }
        Err(e) => tracing::debug!("cannot read the books of {}: {e}", layout.stream.name),
    }
    // Dead letters wait in the stream (their own consumer keeps them): count them per subject.
    let counting = "counting dead letters".to_string();
    let mut counts = stream
        .info_with_subjects(dead_letter_filter(layout))
        .await
        .map_err(refused(counting.clone()))?;
    let mut per_subject: HashMap<String, u64> = HashMap::new();
    while let Some(entry) = futures::StreamExt::next(&mut counts).await {
        let (subject, count) = entry.map_err(refused(counting.clone()))?;
        per_subject.insert(subject, count as u64);
    }
    for (unit, subject) in dead_letter_subjects {
        if let Some(n) = per_subject.get(subject) {
            observation.dead_lettered.insert(unit.clone(), *n);
        }
    }
    Ok(observation)
}

fn dead_letter_filter(layout: &NatsLayout) -> String {
    layout
        .consumers
        .iter()
        .find(|c| c.durable == DEAD_LETTER_CONSUMER)
        .and_then(|c| c.filter_subjects.first().cloned())
        .unwrap_or_else(|| ">".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_answers_is_an_error_within_the_bound_and_blocks_no_other() {
        // Accepts connections and never says a word, like a wrong port behind a proxy.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let pool = Arc::new(NatsPool::default());
        let started = std::time::Instant::now();
        let silent_attempt = {
            let pool = pool.clone();
            let url = url.clone();
            tokio::spawn(async move {
                pool.jetstream(&url, NatsCredentials::none())
                    .await
                    .map(|_| ())
            })
        };
        // Another server (closed port: refused at once) is not held up behind the silent one.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let other = pool
            .jetstream(&format!("nats://{closed}"), NatsCredentials::none())
            .await;
        assert!(other.is_err());
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "the other server waited {:?}",
            started.elapsed()
        );
        let silent_result = silent_attempt.await.unwrap();
        assert!(
            matches!(
                silent_result,
                Err(NatsError::Unreachable { .. } | NatsError::NoHandshake { .. })
            ),
            "{silent_result:?}"
        );
        assert!(started.elapsed() <= CONNECT_TIMEOUT * 2 + Duration::from_secs(1));
        held.abort();
    }
}
