//! The http step: POSTs each message to a URL; the response body, if any, is the output.

use bytes::Bytes;
use switchyard_crds::HttpStep as Settings;

use super::{BuildError, Handler};
use crate::http::{Clients, Endpoint};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

pub struct HttpStep {
    endpoint: Endpoint,
    /// For a request tried alone: a connection of its own (see `Clients::fresh`).
    fresh: reqwest::Client,
}

impl HttpStep {
    pub fn new(settings: &Settings, clients: &Clients) -> Result<HttpStep, BuildError> {
        Ok(HttpStep {
            endpoint: Endpoint::new(
                clients.pooled.clone(),
                &settings.url,
                settings.headers.as_ref(),
            )?,
            fresh: clients.fresh.clone(),
        })
    }

    fn answered(response: Bytes, out: &mut Vec<Payload>) {
        if !response.is_empty() {
            out.push(Payload::Bytes(response));
        }
    }
}

impl Handler for HttpStep {
    async fn handle(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        let response = self.endpoint.post(item.into_bytes(), lineage).await?;
        HttpStep::answered(response, out);
        Ok(())
    }

    async fn handle_alone(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        let response = self
            .endpoint
            .post_through(&self.fresh, item.into_bytes(), lineage)
            .await?;
        HttpStep::answered(response, out);
        Ok(())
    }

    fn hands_off(&self) -> bool {
        true
    }
}
