//! The nats sink: publishes each message to a core NATS subject, with its lineage in headers.

use async_nats::Subject;
use bytes::Bytes;
use futures::future::BoxFuture;
use switchyard_crds::unit::headers;
use switchyard_crds::NatsSink as Settings;

use super::sink::{OpenSink, Sink, SinkContext, SinkError, Written};
use crate::lineage::{header_value, Lineage};
use crate::retry::StepError;

pub struct NatsSink {
    client: async_nats::Client,
    subject: Subject,
    unit: String,
}

impl NatsSink {
    pub fn new(unit: &str, settings: &Settings, client: &async_nats::Client) -> NatsSink {
        NatsSink {
            client: client.clone(),
            subject: Subject::from(settings.subject.as_str()),
            unit: unit.to_string(),
        }
    }
}

impl OpenSink for NatsSink {
    type Settings = Settings;

    async fn open_with(
        settings: &Settings,
        context: &SinkContext<'_>,
    ) -> Result<NatsSink, SinkError> {
        Ok(NatsSink::new(context.unit, settings, context.client))
    }
}

impl Sink for NatsSink {
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        Box::pin(async move {
            let mut map = lineage.headers_after(&self.unit);
            map.insert(headers::MSG_ID, header_value(&lineage.id));
            self.client
                .publish_with_headers(self.subject.clone(), map, payload)
                .await
                .map_err(|e| {
                    StepError::transient(format!("cannot publish to {}: {e}", self.subject))
                })?;
            Ok(Written::New)
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if let Err(e) = self.client.flush().await {
                tracing::warn!("cannot flush the NATS sink: {e}");
            }
        })
    }
}
