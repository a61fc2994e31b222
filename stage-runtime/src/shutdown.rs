//! A unit is told to stop through a `watch` of a flag; how its parts wait for that.

use tokio::sync::watch;

/// Resolves once `shutdown` is set (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
