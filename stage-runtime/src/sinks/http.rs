//! The http sink: POSTs each message to a URL.

use bytes::Bytes;
use futures::future::BoxFuture;
use switchyard_crds::HttpSink as Settings;
use tokio::sync::Semaphore;

use super::{Sink, SinkError, Written};
use crate::http::{http_client, Endpoint};
use crate::lineage::Lineage;
use crate::retry::StepError;
use crate::steps::OUTSTANDING_CALLS;

pub struct HttpSink {
    endpoint: Endpoint,
    /// See `OUTSTANDING_CALLS`.
    turns: Semaphore,
}

impl HttpSink {
    pub fn new(settings: &Settings) -> Result<HttpSink, SinkError> {
        Ok(HttpSink {
            endpoint: Endpoint::new(http_client()?, &settings.url, settings.headers.as_ref())?,
            turns: Semaphore::new(OUTSTANDING_CALLS),
        })
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
}
