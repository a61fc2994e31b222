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
    /// A source's allowance of items it traces all of (`every_up_to_per_second`).
    allowance: std::sync::Arc<std::sync::Mutex<Allowance>>,
}

/// Items a second a source traces every one of: a bucket that refills at that rate and holds a
/// second's worth.
struct Allowance {
    tokens: f64,
    at: Instant,
}

impl Allowance {
    /// One more item at `now`: within the allowance of `most` a second, or not.
    fn take(&mut self, now: Instant, most: u32) -> bool {
        let most = f64::from(most);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * most).min(most);
        self.at = now;
        let within = self.tokens >= 1.0;
        if within {
            self.tokens -= 1.0;
        }
        within
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_traces_every_item_up_to_its_allowance_a_second() {
        let start = Instant::now();
        let mut a = Allowance {
            tokens: 100.0,
            at: start,
        };
        let taken = (0..150).filter(|_| a.take(start, 100)).count();
        assert_eq!(taken, 100, "a second's worth at once, no more");
        let later = start + Duration::from_millis(500);
        let taken = (0..150).filter(|_| a.take(later, 100)).count();
        assert_eq!(taken, 50, "half a second refills half of it");
        let much_later = start + Duration::from_secs(60);
        let taken = (0..150).filter(|_| a.take(much_later, 100)).count();
        assert_eq!(taken, 100, "never more than a second's worth saved up");
    }
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
    /// What a join did with a part (see `TraceEvent::note`).
    pub note: Option<String>,
}

impl Tracer {
    pub fn new(
        client: async_nats::Client,
        config: Option<&TraceConfig>,
        unit: &str,
        replica: &str,
    ) -> Option<Tracer> {
        let config = config.filter(|c| c.sample_rate > 0.0)?.clone();
        let tokens = f64::from(config.every_up_to_per_second.unwrap_or(0));
        Some(Tracer {
            client,
            config,
            unit: unit.to_string(),
            replica: replica.to_string(),
            allowance: std::sync::Arc::new(std::sync::Mutex::new(Allowance {
                tokens,
                at: Instant::now(),
            })),
        })
    }

    /// Whether this item is traced: then `record` its events. Its source's decision when it made
    /// one, otherwise the one every unit makes alike from its identity.
    pub fn samples(&self, lineage: &Lineage) -> bool {
        lineage.traced.unwrap_or_else(|| {
            traced(
                self.config.sample_rate,
                &lineage.origin,
                &lineage.origin_seq,
            )
        })
    }

    /// At a source: decides whether the new item is traced and says so in its lineage, when the
    /// Pipeline traces every item up to a pace (`every_up_to_per_second`); otherwise leaves the
    /// decision to each unit.
    pub fn decide(&self, lineage: &mut Lineage) {
        let Some(most) = self.config.every_up_to_per_second else {
            return;
        };
        let within = match self.allowance.lock() {
            Ok(mut a) => a.take(Instant::now(), most),
            Err(_) => false,
        };
        lineage.traced = Some(
            within
                || traced(
                    self.config.sample_rate,
                    &lineage.origin,
                    &lineage.origin_seq,
                ),
        );
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
            note: done.note,
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
