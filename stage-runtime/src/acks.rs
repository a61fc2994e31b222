//! Waiting for JetStream's acknowledgement of a publish, knowing that a lost connection loses it.

use std::future::IntoFuture;

use tokio::sync::watch;

/// How many times the connection to NATS has been lost so far. What was published before a loss and
/// not yet acknowledged never will be: whoever waits for such an acknowledgement gives up at once instead
/// of at the request timeout.
pub type Disconnects = watch::Receiver<u64>;

/// The connection to NATS was lost while an acknowledgement was awaited; the publish may or may not
/// have been stored, and publishing it again (with its id) is safe.
#[derive(Debug, thiserror::Error)]
#[error("the connection to NATS was lost before the stream acknowledged a publish")]
pub struct ConnectionLost;

/// Waits for `ack`, of a publish made at `epoch` (the count of `disconnects` then), unless the connection
/// has been lost since: then at once, not at the request's timeout, which no answer could beat.
pub async fn acknowledged<T>(
    ack: impl IntoFuture<Output = T>,
    epoch: u64,
    disconnects: &Disconnects,
) -> Result<T, ConnectionLost> {
    let mut lost = disconnects.clone();
    lost.mark_unchanged();
    if *lost.borrow() != epoch {
        return Err(ConnectionLost);
    }
    tokio::select! {
        answer = ack => Ok(answer),
        _ = lost.changed() => Err(ConnectionLost),
    }
}
