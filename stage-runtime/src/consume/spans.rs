//! Sampled items: whether an item is traced, and its span over OTLP.

use std::time::SystemTime;

use opentelemetry::trace::SpanKind;

use crate::lineage::Lineage;
use crate::otlp::ItemSpan;

use super::worker::Worker;

impl Worker {
    /// The item's span in this unit, when it gets one, and the lineage its outputs then carry.
    pub(super) fn begin_span(
        &self,
        lineage: &Lineage,
        also: &[&Lineage],
    ) -> (Option<Lineage>, Option<ItemSpan>) {
        let kind = if self.is_sink() {
            SpanKind::Consumer
        } else {
            SpanKind::Internal
        };
        match self
            .spans
            .as_ref()
            .and_then(|s| s.begin(lineage, kind, SystemTime::now(), also))
        {
            Some((carried, span)) => (Some(carried), Some(span)),
            None => (None, None),
        }
    }

    /// Whether this item's events are recorded.
    pub(super) fn tracing(&self, lineage: &Lineage) -> bool {
        self.tracer.as_ref().is_some_and(|t| t.samples(lineage))
    }
}
