//! The http sink: POSTs each message to a URL.

use bytes::Bytes;
use futures::future::BoxFuture;
use switchyard_crds::HttpSink as Settings;
use tokio::sync::Semaphore;

use super::sink::{OpenSink, Sink, SinkContext, SinkError, Written};
use crate::http::{Clients, Endpoint};
use crate::lineage::Lineage;
use crate::retry::StepError;
use crate::steps::OUTSTANDING_CALLS;

pub struct HttpSink {
    endpoint: Endpoint,
    /// For a write tried alone: a connection of its own (see `Clients::fresh`).
    fresh: reqwest::Client,
    /// See `OUTSTANDING_CALLS`. A write tried alone takes every turn: no other request beside it.
    turns: Semaphore,
    /// Held while a suspect is written alone: one at a time.
    alone: tokio::sync::Mutex<()>,
}

impl HttpSink {
    pub fn new(settings: &Settings) -> Result<HttpSink, SinkError> {
        let clients = Clients::new()?;
        Ok(HttpSink {
            endpoint: Endpoint::new(clients.pooled, &settings.url, settings.headers.as_ref())?,
            fresh: clients.fresh,
            turns: Semaphore::new(OUTSTANDING_CALLS),
            alone: tokio::sync::Mutex::new(()),
        })
    }
}

impl OpenSink for HttpSink {
    type Settings = Settings;

    async fn open_with(settings: &Settings, _: &SinkContext<'_>) -> Result<HttpSink, SinkError> {
        HttpSink::new(settings)
    }
}

impl Sink for HttpSink {
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        Box::pin(async move {
            let _turn = self.turns.acquire().await.ok();
            self.endpoint.post(payload, lineage).await?;
            Ok(Written::New)
        })
    }

    fn write_alone<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        Box::pin(async move {
            let _alone = self.alone.lock().await;
            let _every_turn = self.turns.acquire_many(OUTSTANDING_CALLS as u32).await.ok();
            self.endpoint
                .post_through(&self.fresh, payload, lineage)
                .await?;
            Ok(Written::New)
        })
    }
}
