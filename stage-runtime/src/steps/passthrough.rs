//! The passthrough step: hands each message on unchanged.

use super::Handler;
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

pub struct Passthrough;

impl Handler for Passthrough {
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
