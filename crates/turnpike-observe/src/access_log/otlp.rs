//! OTLP/HTTP logs in the JSON encoding: an `ExportLogsServiceRequest` POSTed to
//! `/v1/logs`. The JSON mapping is protobuf's (camelCase names, 64-bit integers as strings,
//! trace and span ids as hex), so no protobuf code is needed.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use turnpike_model::observe::access_log::OtlpSink;

use super::format::Formatter;
use super::http::{header_map, post};
use super::worker::Deliver;
use crate::CallEvent;

pub(crate) struct OtlpWriter {
    client: reqwest::Client,
    url: String,
    service_name: String,
}

impl OtlpWriter {
    pub(crate) fn new(cfg: &OtlpSink) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .default_headers(header_map(&cfg.headers)?)
            .timeout(cfg.batch.timeout)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let base = cfg.endpoint.trim_end_matches('/');
        let url = if base.ends_with("/v1/logs") {
            base.to_owned()
        } else {
            format!("{base}/v1/logs")
        };
        Ok(Self {
            client,
            url,
            service_name: cfg.service_name.clone(),
        })
    }
}

/// An OTLP `AnyValue`.
fn any_value(v: &Value) -> Value {
    match v {
        Value::String(s) => json!({ "stringValue": s }),
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n.as_f64() }),
        other => json!({ "stringValue": other.to_string() }),
    }
}

fn attributes(record: &Map<String, Value>) -> Vec<Value> {
    record
        .iter()
        .filter(|(k, _)| k.as_str() != "time")
        .map(|(k, v)| json!({ "key": k, "value": any_value(v) }))
        .collect()
}

/// One `LogRecord`: the event's own time, a severity from the status class, a short body
/// and the record's fields as attributes.
pub(crate) fn log_record(e: &CallEvent, fmt: &Formatter) -> Value {
    let (number, text) = match e.status {
        500.. => (17, "ERROR"),
        400..=499 => (13, "WARN"),
        _ => (9, "INFO"),
    };
    let nanos = i128::from(e.time_unix_ms).saturating_mul(1_000_000).max(0);
    let mut r = json!({
        "timeUnixNano": nanos.to_string(),
        "observedTimeUnixNano": nanos.to_string(),
        "severityNumber": number,
        "severityText": text,
        "body": { "stringValue": format!("{} {} {}", e.method, e.path, e.status) },
        "attributes": attributes(&fmt.record(e)),
    });
    if let (Some(t), Value::Object(m)) = (&e.trace_id, &mut r) {
        m.insert("traceId".into(), Value::String(t.clone()));
        if let Some(s) = &e.span_id {
            m.insert("spanId".into(), Value::String(s.clone()));
        }
    }
    r
}

/// The whole export request for `events`.
pub(crate) fn export_request(
    service_name: &str,
    events: &[Arc<CallEvent>],
    fmt: &Formatter,
) -> Value {
    let records: Vec<Value> = events.iter().map(|e| log_record(e, fmt)).collect();
    json!({
        "resourceLogs": [{
            "resource": {
                "attributes": [
                    { "key": "service.name", "value": { "stringValue": service_name } }
                ]
            },
            "scopeLogs": [{
                "scope": { "name": "turnpike.access_log", "version": env!("CARGO_PKG_VERSION") },
                "logRecords": records,
            }],
        }]
    })
}

impl Deliver for OtlpWriter {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        let body = serde_json::to_vec(&export_request(&self.service_name, events, fmt))
            .map_err(|e| e.to_string())?;
        post(&self.client, &self.url, "application/json", body).await
    }
}
