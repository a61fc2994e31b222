//! A JetStream connection as Switchyard uses it, and what a consumer's leader says about its lag.

use std::time::Duration;

use async_nats::jetstream;

/// A JetStream context sized for pipelined publishing.
pub fn jetstream_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(20_000)
        .build(client)
}

/// Pending plus unacknowledged messages, from the consumer's leader.
pub async fn read_lag(js: &jetstream::Context, stream: &str, consumer: &str) -> Option<u64> {
    let stream = js.get_stream(stream).await.ok()?;
    let info = stream.consumer_info(consumer).await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}
