//! The http step: POST each message to a URL; the response body is the output.

use std::str::FromStr;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use super::StepError;
use crate::lineage::Lineage;
use crate::payload::{is_json, Payload};

pub struct HttpStep {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
}

/// One client per process: it pools connections for every http step and sink.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a bundled crypto provider; use ring, which the NATS client uses too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Headers a user configured, checked once at start-up.
fn parse_headers(pairs: &[(String, String)]) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_str(name)
            .map_err(|e| anyhow::anyhow!("`{name}` is not an HTTP header name: {e}"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| anyhow::anyhow!("the value of header `{name}` is not valid: {e}"))?;
        map.insert(name, value);
    }
    Ok(map)
}

impl HttpStep {
    pub fn new(
        client: reqwest::Client,
        url: &str,
        headers: &[(String, String)],
    ) -> anyhow::Result<HttpStep> {
        Ok(HttpStep {
            client,
            url: reqwest::Url::parse(url)
                .map_err(|e| anyhow::anyhow!("`{url}` is not a URL: {e}"))?,
            headers: parse_headers(headers)?,
        })
    }

    pub async fn call(&self, item: Payload, lineage: &Lineage) -> Result<Vec<Payload>, StepError> {
        let response = self.post(item.into_bytes(), lineage).await?;
        if response.is_empty() {
            Ok(Vec::new())
        } else {
            Ok(vec![Payload::Bytes(response)])
        }
    }

    /// POSTs `body` and returns the response body of a 2xx answer. Server errors, throttling and
    /// network trouble are worth retrying; other refusals are not.
    pub async fn post(&self, body: Bytes, lineage: &Lineage) -> Result<Bytes, StepError> {
        post(&self.client, &self.url, &self.headers, body, lineage).await
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
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| StepError::transient(format!("POST {url}: {}", error_chain(&e))))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| StepError::transient(format!("POST {url}: reading the response: {e}")))?;
    if status.is_success() {
        return Ok(bytes);
    }
    let shown: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
    let message = format!("POST {url} answered {status}: {shown}");
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(StepError::transient(message))
    } else {
        Err(StepError::permanent(message))
    }
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
