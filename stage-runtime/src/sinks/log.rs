//! The log sink: one JSON line per message on standard output.

use std::io::{self, Write};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::sink::{OpenSink, Sink, SinkContext, SinkError, Written};
use crate::lineage::Lineage;
use crate::payload::write_bytes_as_json;
use crate::retry::StepError;

pub struct LogSink;

impl OpenSink for LogSink {
    type Settings = switchyard_crds::LogSink;

    async fn open_with(_: &Self::Settings, _: &SinkContext<'_>) -> Result<LogSink, SinkError> {
        Ok(LogSink)
    }
}

impl Sink for LogSink {
    fn write<'a>(
        &'a self,
        _: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        let mut line = Vec::with_capacity(payload.len() + 1);
        write_bytes_as_json(&payload, &mut line);
        line.push(b'\n');
        let mut out = io::stdout().lock();
        let written = out
            .write_all(&line)
            .and_then(|_| out.flush())
            .map(|_| Written::New)
            .map_err(|e| StepError::transient(format!("cannot write to stdout: {e}")));
        Box::pin(std::future::ready(written))
    }
}
