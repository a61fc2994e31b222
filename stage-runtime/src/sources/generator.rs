//! The generator source: `count` messages (or endless), at `ratePerSecond` (or as fast as the stream
//! takes them), from a template numbered by `{{seq}}`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_crds::GeneratorSource;

use super::error::SourceError;
use super::framer::{self, Framer};
use super::template::Template;
use super::unit::{Source, SourceUnit};

pub struct Generator<'a>(pub &'a GeneratorSource);

#[derive(Serialize, Deserialize, Clone)]
struct SeqCheckpoint {
    seq: u64,
}

impl Source for Generator<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let template = Template::or_default(&self.0.payload);
        unit.resuming(|| async {
            let resumed = framer::resume::<SeqCheckpoint>(unit).await?;
            let done = resumed.at.as_ref().map_or(0, |c| c.seq);
            if self.0.count.is_some_and(|c| done >= c) {
                return Ok(());
            }
            self.generate_from(unit, done + 1, &template, Framer::new(unit, resumed))
                .await
        })
        .await
    }
}

impl Generator<'_> {
    async fn generate_from(
        &self,
        unit: &SourceUnit,
        first: u64,
        template: &Template,
        mut framer: Framer<SeqCheckpoint>,
    ) -> Result<(), SourceError> {
        let started = tokio::time::Instant::now();
        let mut seq = first;
        while self.0.count.is_none_or(|c| seq <= c) && !unit.stopping() {
            if let Some(rate) = self.0.rate_per_second {
                let due = started + Duration::from_secs_f64((seq - first) as f64 / rate);
                let wait = due.saturating_duration_since(tokio::time::Instant::now());
                if !wait.is_zero() {
                    // Nothing else is ready before then: what is held goes now, not after the wait.
                    framer.flush(unit).await?;
                    if !unit.sleep_or_stop(wait).await {
                        break;
                    }
                }
            }
            framer
                .offer(
                    unit,
                    unit.lineage(seq.to_string()),
                    template.render(seq),
                    SeqCheckpoint { seq },
                )
                .await?;
            seq += 1;
        }
        framer.finish(unit).await
    }
}
