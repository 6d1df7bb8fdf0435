//! Batches POSTed to an HTTP endpoint, as one JSON array or as NDJSON.

use std::sync::Arc;

use turnpike_model::observe::access_log::{HttpFormat, HttpSink};

use super::format::Formatter;
use super::worker::Deliver;
use crate::CallEvent;

/// Builds the request headers of a sink; the config was validated, so a bad one is an
/// error naming the header rather than a panic.
pub(crate) fn header_map(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<reqwest::header::HeaderMap, String> {
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("headers.{k}: not a valid header name"))?;
        let value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|_| format!("headers.{k}: not a valid header value"))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// POSTs a body and wants a 2xx back.
pub(crate) async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &'static str,
    body: Vec<u8>,
) -> Result<(), String> {
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: status {}", resp.status()))
    }
}

pub(crate) struct HttpWriter {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
}

impl HttpWriter {
    pub(crate) fn new(cfg: &HttpSink) -> Result<Self, String> {
        // The worker bounds each attempt with the sink's timeout; the client's own timeout
        // is the same so a connection is not left half-used.
        let client = reqwest::Client::builder()
            .default_headers(header_map(&cfg.headers)?)
            .timeout(cfg.batch.timeout)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            client,
            url: cfg.url.clone(),
            format: cfg.format,
        })
    }
}

impl Deliver for HttpWriter {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        let (content_type, body) = match self.format {
            HttpFormat::JsonArray => {
                let records: Vec<serde_json::Value> = events
                    .iter()
                    .map(|e| serde_json::Value::Object(fmt.record(e)))
                    .collect();
                (
                    "application/json",
                    serde_json::to_vec(&records).map_err(|e| e.to_string())?,
                )
            }
            HttpFormat::Ndjson => {
                let mut body = Vec::new();
                for e in events {
                    body.extend_from_slice(fmt.line(e).as_bytes());
                    body.push(b'\n');
                }
                ("application/x-ndjson", body)
            }
        };
        post(&self.client, &self.url, content_type, body).await
    }
}
