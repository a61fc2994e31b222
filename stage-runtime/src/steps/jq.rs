//! The jq step: a jq filter over the JSON message, with zero, one or many outputs.

use switchyard_crds::jq::JqFilter;

use super::handler::{BuildContext, BuildError, Handler};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;
use switchyard_crds::unit::StepConfig;

pub struct JqStep(JqFilter);

impl JqStep {
    pub fn new(path: &str, filter: &str) -> Result<JqStep, BuildError> {
        JqFilter::compile(filter).map(JqStep).map_err(|e| {
            BuildError::Settings(format!("step {path}: the jq filter does not compile: {e}"))
        })
    }
}

impl Handler for JqStep {
    type Settings = String;

    fn build(filter: &String, step: &StepConfig, _: &BuildContext) -> Result<JqStep, BuildError> {
        JqStep::new(&step.path, filter)
    }

    async fn handle(
        &self,
        item: Payload,
        _: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        let failed = |e: switchyard_crds::jq::JqError| StepError::permanent(e.to_string());
        let input = item.into_json().map_err(failed)?;
        let outputs = self.0.run(input).map_err(failed)?;
        out.extend(outputs.into_iter().map(Payload::Json));
        Ok(())
    }
}
