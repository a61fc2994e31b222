//! The passthrough step: hands each message on unchanged.

use super::handler::{BuildContext, BuildError, Handler};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;
use switchyard_crds::unit::StepConfig;

pub struct Passthrough;

impl Handler for Passthrough {
    type Settings = switchyard_crds::Passthrough;

    fn build(
        _: &Self::Settings,
        _: &StepConfig,
        _: &BuildContext,
    ) -> Result<Passthrough, BuildError> {
        Ok(Passthrough)
    }

    async fn handle(
        &self,
        item: Payload,
        _: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        out.push(item);
        Ok(())
    }
}
