//! POSTing a message to a user's endpoint: what the http step and the http sink share.

use std::collections::BTreeMap;
use std::str::FromStr;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use crate::lineage::Lineage;
use crate::payload::is_json;
use crate::retry::StepError;

/// A user's URL and headers, checked once at start-up.
pub struct Endpoint {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
}

/// The process's HTTP clients (the pooled one serves every http step), made when the first step
/// that needs them is built. A unit without an http step must not need what a client needs: the
/// system's CA certificates, which many handler images do not have.
#[derive(Default)]
pub struct LazyClient(std::sync::OnceLock<Clients>);

/// The pooled client, and one that opens a new connection for each request.
#[derive(Clone)]
pub struct Clients {
    pub pooled: reqwest::Client,
    /// For a request tried alone: a pooled connection may be one that a crash of the service broke
    /// a moment ago, which the pool has not noticed yet, and the request would fail through no fault
    /// of its own just when its failure is meant to count.
    pub fresh: reqwest::Client,
}

impl LazyClient {
    pub fn get(&self) -> Result<Clients, EndpointError> {
        if let Some(clients) = self.0.get() {
            return Ok(clients.clone());
        }
        let clients = Clients::new()?;
        Ok(self.0.get_or_init(|| clients).clone())
    }
}

impl Clients {
    pub fn new() -> Result<Clients, EndpointError> {
        Ok(Clients {
            pooled: http_client()?,
            fresh: client_builder().pool_max_idle_per_host(0).build()?,
        })
    }
}

/// A new HTTP client; see [`LazyClient`] for those a unit's steps share.
pub fn http_client() -> Result<reqwest::Client, EndpointError> {
    Ok(client_builder().build()?)
}

fn client_builder() -> reqwest::ClientBuilder {
    // reqwest is built without a bundled crypto provider; use ring, which the NATS client uses too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
}

/// Why an endpoint's settings cannot be used (validation catches most of these earlier).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("`{url}` is not a URL: {reason}")]
    Url { url: String, reason: String },
    #[error("`{0}` is not an HTTP header name")]
    HeaderName(String),
    #[error("the value of header `{0}` is not valid")]
    HeaderValue(String),
    #[error("cannot set up the HTTP client: {0} (an http step, sink or OTLP export needs the system's CA certificates: install them in the unit's image, for example Debian's ca-certificates)")]
    Client(#[from] reqwest::Error),
}

fn parse_headers(pairs: Option<&BTreeMap<String, String>>) -> Result<HeaderMap, EndpointError> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs.into_iter().flatten() {
        let header =
            HeaderName::from_str(name).map_err(|_| EndpointError::HeaderName(name.clone()))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| EndpointError::HeaderValue(name.clone()))?;
        map.insert(header, value);
    }
    Ok(map)
}

impl Endpoint {
    pub fn new(
        client: reqwest::Client,
        url: &str,
        headers: Option<&BTreeMap<String, String>>,
    ) -> Result<Endpoint, EndpointError> {
        Ok(Endpoint {
            client,
            url: reqwest::Url::parse(url).map_err(|e| EndpointError::Url {
                url: url.to_string(),
                reason: e.to_string(),
            })?,
            headers: parse_headers(headers)?,
        })
    }

    /// POSTs `body` and returns the response body of a 2xx answer. Server errors, throttling and
    /// network trouble are worth retrying; other refusals are not.
    pub async fn post(&self, body: Bytes, lineage: &Lineage) -> Result<Bytes, StepError> {
        post(&self.client, &self.url, &self.headers, body, lineage).await
    }

    /// Like `post`, through another client (its own connections, its own pool).
    pub async fn post_through(
        &self,
        client: &reqwest::Client,
        body: Bytes,
        lineage: &Lineage,
    ) -> Result<Bytes, StepError> {
        post(client, &self.url, &self.headers, body, lineage).await
    }
}

async fn post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: &HeaderMap,
    body: Bytes,
    lineage: &Lineage,
) -> Result<Bytes, StepError> {
    let content_type = if is_json(&body) {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let mut request = client
        .post(url.clone())
        .headers(headers.clone())
        .header(CONTENT_TYPE, content_type)
        .header("Switchyard-Origin", lineage.origin.as_str())
        .header("Switchyard-Origin-Seq", lineage.origin_seq.as_str());
    if let Some(t) = &lineage.traceparent {
        request = request.header("traceparent", t.as_str());
    }
    if let Some(t) = &lineage.tracestate {
        request = request.header("tracestate", t.as_str());
    }
    let response = request.body(body).send().await.map_err(|e| {
        let message = format!("POST {url}: {}", error_chain(&e));
        // A connection that broke under a request that was sent fails every request on it, and
        // may have been broken by any of them (a service that crashed on one): not known to be
        // this one's fault. One that could not be made, or a timeout, is not shared like that.
        if e.is_connect() || e.is_timeout() {
            StepError::transient(message)
        } else {
            StepError::suspect(message)
        }
    })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after);
    let bytes = response
        .bytes()
        .await
        .map_err(|e| StepError::suspect(format!("POST {url}: reading the response: {e}")))?;
    if status.is_success() {
        return Ok(bytes);
    }
    let shown: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
    let message = format!("POST {url} answered {status}: {shown}");
    // A 4xx says the request itself is wrong, except a timeout (408) and throttling (429).
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(StepError {
            retry_after,
            ..StepError::transient(message)
        })
    } else {
        Err(StepError::permanent(message))
    }
}

/// A `Retry-After` value: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<std::time::Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(std::time::Duration::from_secs(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(retry_after("7"), Some(std::time::Duration::from_secs(7)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        let wait = retry_after(&soon).unwrap();
        assert!((80..=90).contains(&wait.as_secs()), "{wait:?}");
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            None,
            "a date passed"
        );
        assert_eq!(retry_after("soon"), None);
    }
}
