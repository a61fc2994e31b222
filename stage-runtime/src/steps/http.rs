//! The http step: POSTs each message to a URL; the response body, if any, is the output.

use switchyard_crds::HttpStep as Settings;

use super::{BuildError, Handler};
use crate::http::Endpoint;
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

pub struct HttpStep(Endpoint);

impl HttpStep {
    pub fn new(settings: &Settings, client: &reqwest::Client) -> Result<HttpStep, BuildError> {
        Ok(HttpStep(Endpoint::new(
            client.clone(),
            &settings.url,
            settings.headers.as_ref(),
        )?))
    }
}

impl Handler for HttpStep {
    async fn handle(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        let response = self.0.post(item.into_bytes(), lineage).await?;
        if !response.is_empty() {
            out.push(Payload::Bytes(response));
        }
        Ok(())
    }

    fn hands_off(&self) -> bool {
        true
    }
}
