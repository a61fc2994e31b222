//! How `switchyard run` and the day-2 commands connect to a Pipeline's NATS.

use crate::error::RunError;

/// Connects to the server (or the nodes, separated by commas) at `url`, as `name`.
pub(crate) async fn connect(
    name: &str,
    url: &str,
    credentials: &switchyard_platform::credentials::NatsCredentials,
) -> Result<async_nats::Client, RunError> {
    use switchyard_platform::nats::{connect_options, server_addrs};
    connect_options(name, credentials)?
        .connect(server_addrs(url)?)
        .await
        .map_err(|source| RunError::Connect {
            url: url.to_string(),
            source,
        })
}
