//! The nats source: consumes a core NATS subject (in a queue group, so replicas share it) and answers
//! a request once its message is stored.

use async_nats::Subject;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use switchyard_crds::unit::headers;
use switchyard_crds::NatsSource as Settings;

use super::error::SourceError;
use super::publish::WINDOW;
use super::unit::{Source, SourceUnit};
use crate::stats::Stats;

pub struct NatsSource<'a>(pub &'a Settings);

impl Source for NatsSource<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let subject = &self.0.subject;
        let mut subscriber = unit
            .client
            .queue_subscribe(subject.clone(), unit.queue_group.clone())
            .await
            .map_err(|source| SourceError::Subscribe {
                subject: subject.clone(),
                source,
            })?;
        let mut acks = FuturesUnordered::new();
        let mut shutdown = unit.shutdown.clone();
        loop {
            tokio::select! {
                Some((reply, stored)) = acks.next(), if !acks.is_empty() => {
                    confirm(unit, reply, stored).await;
                }
                message = subscriber.next(), if acks.len() < WINDOW => {
                    let Some(message) = message else { break };
                    let header = |name: &str| {
                        message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(name))
                            .map(|v| v.as_str().to_string())
                    };
                    let key = header(headers::MSG_ID)
                        .unwrap_or_else(|| nuid::next().as_str().to_string());
                    let mut lineage = unit.lineage(key);
                    lineage.traceparent = header(headers::TRACEPARENT);
                    lineage.tracestate = header(headers::TRACESTATE);
                    let ack = unit.publish(&lineage, message.payload).await?;
                    let reply = message.reply;
                    acks.push(async move { (reply, ack.await.map(|_| ())) });
                }
                _ = crate::shutdown::stopped(&mut shutdown) => break,
            }
        }
        while let Some((reply, stored)) = acks.next().await {
            confirm(unit, reply, stored).await;
        }
        Ok(())
    }
}

/// A request on the NATS source gets its answer once the message is stored (or was not).
async fn confirm<E: std::fmt::Display>(
    unit: &SourceUnit,
    reply: Option<Subject>,
    stored: Result<(), E>,
) {
    let answer = match stored {
        Ok(()) => {
            Stats::add(&unit.stats.processed, 1);
            Bytes::from_static(b"{\"stored\":true}")
        }
        Err(e) => {
            // Core NATS cannot redeliver: say so loudly, and tell a requester to try again.
            tracing::error!("a message from the NATS source was not stored: {e}");
            Bytes::from(serde_json::json!({"stored": false, "error": e.to_string()}).to_string())
        }
    };
    if let Some(reply) = reply {
        let _ = unit.client.publish(reply, answer).await;
    }
}
