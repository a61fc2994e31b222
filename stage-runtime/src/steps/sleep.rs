//! The sleep step: holds each message for a fixed time, then passes it on.

use std::time::Duration;

use switchyard_crds::duration::parse_duration;

use super::handler::{BuildContext, BuildError, Handler};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;
use switchyard_crds::unit::StepConfig;

pub struct SleepStep(Duration);

impl SleepStep {
    pub fn new(path: &str, delay: &str) -> Result<SleepStep, BuildError> {
        parse_duration(delay)
            .map(SleepStep)
            .map_err(|e| BuildError::Settings(format!("step {path}: sleep: {e}")))
    }
}

impl Handler for SleepStep {
    type Settings = String;

    fn build(delay: &String, step: &StepConfig, _: &BuildContext) -> Result<SleepStep, BuildError> {
        SleepStep::new(&step.path, delay)
    }

    async fn handle(
        &self,
        item: Payload,
        _: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        tokio::time::sleep(self.0).await;
        out.push(item);
        Ok(())
    }
}
