//! The timer source: a message every `interval`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_crds::duration::parse_duration;
use switchyard_crds::TimerSource;

use super::error::SourceError;
use super::template::Template;
use super::unit::{Source, SourceUnit};

pub struct Timer<'a>(pub &'a TimerSource);

impl Source for Timer<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let interval = parse_duration(&self.0.interval)
            .map_err(|e| SourceError::Settings(format!("timer.interval: {e}")))?;
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let template = Template::or_default(&self.0.payload);
        loop {
            // Ticks fall on multiples of the interval since the epoch, so a restarted source (or a second
            // replica) produces the same tick ids, and JetStream keeps each tick once.
            let now = unix_ms();
            let tick = now / interval_ms + 1;
            let wait = Duration::from_millis(tick * interval_ms - now);
            if !unit.sleep_or_stop(wait).await {
                return Ok(());
            }
            unit.fire(tick, &template).await;
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
