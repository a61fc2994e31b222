//! The cron source: a message at every time of a cron schedule (UTC).

use switchyard_crds::CronSource;

use super::error::SourceError;
use super::template::Template;
use super::unit::{Source, SourceUnit};

pub struct Cron<'a>(pub &'a CronSource);

impl Source for Cron<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let schedule = &self.0.schedule;
        let cron: croner::Cron = schedule.parse().map_err(|e| {
            SourceError::Settings(format!("`{schedule}` is not a cron schedule: {e}"))
        })?;
        let template = Template::or_default(&self.0.payload);
        loop {
            let now = chrono::Utc::now();
            let next = cron.find_next_occurrence(&now, false).map_err(|e| {
                SourceError::Settings(format!("schedule `{schedule}` has no next time: {e}"))
            })?;
            let wait = (next - now).to_std().unwrap_or_default();
            if !unit.sleep_or_stop(wait).await {
                return Ok(());
            }
            unit.fire(next.timestamp().max(0) as u64, &template).await;
        }
    }
}
