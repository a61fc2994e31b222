//! The http step: POSTs each message to a URL; the response body, if any, is the output.

use bytes::Bytes;
use switchyard_crds::HttpStep as Settings;

use super::handler::{BuildContext, BuildError, Handler};
use crate::http::{Clients, Endpoint};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;
use switchyard_crds::unit::StepConfig;

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
    type Settings = Settings;

    fn build(
        settings: &Settings,
        _: &StepConfig,
        context: &BuildContext,
    ) -> Result<HttpStep, BuildError> {
        HttpStep::new(settings, &context.http.get()?)
    }

    async fn handle(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        // Boxed: an HTTP request's future is large, and unboxed it would make every step's future
        // (and so every message's) as large, whatever the step's kind.
        let response = Box::pin(self.endpoint.post(item.into_bytes(), lineage)).await?;
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
