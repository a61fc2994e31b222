//! Trace events: what a unit did with an item, recorded into the Pipeline's trace stream for
//! `switchyard trace`. Only sampled items are recorded (every unit samples the same ones), and a record
//! is a core NATS publish: nothing on the data path waits for it.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use switchyard_crds::unit::{subject_token, traced, TraceConfig, TraceEvent, TraceOutcome};

use crate::lineage::Lineage;

#[derive(Clone)]
pub struct Tracer {
    client: async_nats::Client,
    config: TraceConfig,
    unit: String,
    replica: String,
}

/// When a traced item reached the unit.
#[derive(Clone, Copy)]
pub struct Began {
    at: SystemTime,
    clock: Instant,
}

impl Began {
    pub fn now() -> Began {
        Began {
            at: SystemTime::now(),
            clock: Instant::now(),
        }
    }
}

/// What became of an item in a unit, besides when.
#[derive(Default)]
pub struct Done {
    pub outcome: TraceOutcome,
    pub outputs: u64,
    pub deliveries: u64,
    pub attempts: u32,
    pub error: Option<String>,
    pub stage: Option<String>,
}

impl Tracer {
    pub fn new(
        client: async_nats::Client,
        config: Option<&TraceConfig>,
        unit: &str,
        replica: &str,
    ) -> Option<Tracer> {
        let config = config.filter(|c| c.sample_rate > 0.0)?.clone();
        Some(Tracer {
            client,
            config,
            unit: unit.to_string(),
            replica: replica.to_string(),
        })
    }

    /// Whether this item is traced: then `record` its events.
    pub fn samples(&self, lineage: &Lineage) -> bool {
        traced(
            self.config.sample_rate,
            &lineage.origin,
            &lineage.origin_seq,
        )
    }

    /// Subject of the events of item `origin:seq`.
    pub fn subject(prefix: &str, origin: &str, seq: &str) -> String {
        format!("{prefix}.{}.{}", subject_token(origin), subject_token(seq))
    }

    /// Records one event of a sampled item. A lost event costs a line of a trace, never data: it is
    /// logged at debug level and forgotten.
    pub async fn record(&self, lineage: &Lineage, began: Began, done: Done) {
        let event = TraceEvent {
            unit: self.unit.clone(),
            replica: self.replica.clone(),
            id: lineage.id.clone(),
            at_ms: began
                .at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            took_us: began.clock.elapsed().as_micros() as u64,
            deliveries: done.deliveries,
            attempts: done.attempts,
            outcome: done.outcome,
            outputs: done.outputs,
            error: done.error,
            stage: done.stage,
            replays: lineage.replays,
        };
        let subject = Tracer::subject(
            &self.config.subject_prefix,
            &lineage.origin,
            &lineage.origin_seq,
        );
        match serde_json::to_vec(&event) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    tracing::debug!("cannot record a trace event: {e}");
                }
            }
            Err(e) => tracing::debug!("cannot encode a trace event: {e}"),
        }
    }
}
