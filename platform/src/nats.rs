//! A NATS connection as Switchyard makes it, a JetStream context sized for pipelined publishing, and
//! what a consumer's leader says about its lag.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::ServerAddr;

use crate::credentials::{CredentialsError, NatsCredentials};

/// How often a connection checks that its server still answers. The client gives a server up after
/// three unanswered pings, so a node that hangs (frozen, cut off from the network) is left for another
/// within about ten seconds instead of the client's default of three minutes.
pub const PING_INTERVAL: Duration = Duration::from_secs(3);

/// Why a server list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectSetupError {
    #[error("`{url}` is not a NATS server address: {reason}; give nats://host:port, or several separated by commas")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// The servers of `urls`: one address, or several separated by commas (the nodes of a cluster; the
/// client also learns the others from the first it reaches).
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ConnectSetupError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|e| ConnectSetupError::BadUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(ConnectSetupError::BadUrl {
            url: urls.to_string(),
            reason: "it is empty".to_string(),
        });
    }
    Ok(addrs)
}

/// Connection options every Switchyard program starts from: its name, the credentials, and a ping
/// interval that notices a hung server.
pub fn connect_options(
    name: &str,
    credentials: &NatsCredentials,
) -> Result<async_nats::ConnectOptions, ConnectSetupError> {
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .ping_interval(PING_INTERVAL);
    Ok(credentials.apply(options)?)
}

/// How long a publish waits for JetStream's acknowledgement. A stream leader that died or hung never
/// answers what it was sent, even once another leader is elected, so this is what such a publish
/// costs before it is sent again (with the same id, so nothing is stored twice); acknowledgements
/// take milliseconds otherwise, also with thousands in flight.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A JetStream context sized for pipelined publishing.
pub fn jetstream_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(20_000)
        .build(client)
}

/// Pending plus unacknowledged messages, from the consumer's leader.
pub async fn read_lag(js: &jetstream::Context, stream: &str, consumer: &str) -> Option<u64> {
    let stream = js.get_stream(stream).await.ok()?;
    let info = stream.consumer_info(consumer).await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_servers_is_split_on_commas() {
        let addrs = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").unwrap();
        assert_eq!(addrs.len(), 2);
        let e = server_addrs(" , ").unwrap_err().to_string();
        assert!(e.contains("it is empty"), "{e}");
        let e = server_addrs("nats://a:1,http://[::1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`http://[::1` is not a NATS server address"),
            "{e}"
        );
    }
}
