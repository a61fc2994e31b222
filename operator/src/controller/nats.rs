//! NATS from the operator's side: one connection per server (and credentials), reused across
//! reconciles, and what the operator reads there for status.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use switchyard_crds::layout::{NatsLayout, DEAD_LETTER_CONSUMER};
use tokio::sync::Mutex;

#[derive(Default)]
pub struct NatsPool {
    clients: Mutex<HashMap<(String, Option<String>), async_nats::Client>>,
}

impl NatsPool {
    /// A JetStream context for `url`, connecting on first use. A server that does not answer within a
    /// few seconds is an error, so a reconcile never hangs on it.
    pub async fn jetstream(
        &self,
        url: &str,
        credentials: Option<String>,
    ) -> Result<jetstream::Context, String> {
        let key = (url.to_string(), credentials.clone());
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&key) {
            if client.connection_state() == async_nats::connection::State::Connected {
                return Ok(switchyard_stage::jetstream_context(client.clone()));
            }
        }
        let mut options = async_nats::ConnectOptions::new()
            .name("switchyard-operator")
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(Duration::from_secs(5)));
        if let Some(creds) = &credentials {
            options = options
                .credentials(creds)
                .map_err(|e| format!("the NATS credentials are not usable: {e}"))?;
        }
        let client = options
            .connect(url)
            .await
            .map_err(|e| format!("cannot reach NATS at {url}: {e}"))?;
        clients.insert(key, client.clone());
        Ok(switchyard_stage::jetstream_context(client))
    }
}

/// What NATS says about each unit that reads: its lag (pending plus unacknowledged) and the dead
/// letters in its dead-letter subject.
#[derive(Debug, Default)]
pub struct NatsObservation {
    pub lag: BTreeMap<String, u64>,
    pub dead_lettered: BTreeMap<String, u64>,
}

pub async fn observe(
    js: &jetstream::Context,
    layout: &NatsLayout,
    dead_letter_subjects: &BTreeMap<String, String>,
) -> Result<NatsObservation, String> {
    let stream = js
        .get_stream(&layout.stream.name)
        .await
        .map_err(|e| format!("cannot read stream {}: {e}", layout.stream.name))?;
    let mut observation = NatsObservation::default();
    for consumer in &layout.consumers {
        if consumer.durable == DEAD_LETTER_CONSUMER {
            continue;
        }
        let info = stream
            .consumer_info(&consumer.durable)
            .await
            .map_err(|e| format!("cannot read consumer {}: {e}", consumer.durable))?;
        observation.lag.insert(
            consumer.durable.clone(),
            info.num_pending + info.num_ack_pending as u64,
        );
    }
    // Dead letters wait in the stream (their own consumer keeps them): count them per subject.
    let mut counts = stream
        .info_with_subjects(dead_letter_filter(layout))
        .await
        .map_err(|e| format!("cannot count dead letters: {e}"))?;
    let mut per_subject: HashMap<String, u64> = HashMap::new();
    while let Some(entry) = futures::StreamExt::next(&mut counts).await {
        let (subject, count) = entry.map_err(|e| format!("cannot count dead letters: {e}"))?;
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
