//! One [`CallEvent`] as one JSON record, with the configured fields.

use serde_json::{Map, Value};
use turnpike_model::observe::access_log::AccessField;

use super::capture::Capture;
use crate::CallEvent;

/// Turns events into records. Built once per access-log configuration and shared by the
/// sinks' background tasks: formatting never runs on the request path.
#[derive(Debug, Clone)]
pub struct Formatter {
    fields: Vec<AccessField>,
    mask_fields: Vec<String>,
    /// Lower-case names of query parameters whose values are masked.
    mask_query: Vec<String>,
}

impl Formatter {
    /// A formatter writing `fields`, masking `capture`'s JSON fields in captured bodies.
    pub fn new(fields: &[AccessField], capture: Option<&Capture>) -> Self {
        Self {
            fields: fields.to_vec(),
            mask_fields: capture.map(|c| c.mask_fields.clone()).unwrap_or_default(),
            mask_query: turnpike_model::observe::access_log::DEFAULT_MASK_QUERY_PARAMS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }

    /// The same formatter, masking the values of these query parameters instead of the
    /// default ones.
    pub fn with_query_mask(mut self, names: &[String]) -> Self {
        self.mask_query = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        self
    }

    /// `query` with the values of the masked parameters replaced by `***`.
    fn masked_query(&self, query: &str) -> String {
        if self.mask_query.is_empty() {
            return query.to_owned();
        }
        let mut out = String::with_capacity(query.len());
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            if self.mask_query.iter().any(|m| m.eq_ignore_ascii_case(name)) {
                out.push_str(name);
                out.push_str("=***");
            } else {
                out.push_str(pair);
            }
        }
        out
    }

    /// The record for `e`. Absent values are left out rather than written as `null`, so
    /// records stay small and sinks that index keys are not fed empty ones.
    pub fn record(&self, e: &CallEvent) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                m.insert(k.to_owned(), v);
            }
        };
        fn opt<T: Into<Value>>(v: Option<T>) -> Value {
            v.map_or(Value::Null, Into::into)
        }
        fn text(v: Option<&str>) -> Value {
            v.map_or(Value::Null, |s| Value::String(s.to_owned()))
        }
        for f in &self.fields {
            let v = match f {
                AccessField::Time => Value::String(rfc3339_ms(e.time_unix_ms)),
                AccessField::RequestId => Value::String(e.request_id.clone()),
                AccessField::TraceId => text(e.trace_id.as_deref()),
                AccessField::SpanId => text(e.span_id.as_deref()),
                AccessField::ClientIp => Value::String(e.client_ip.to_string()),
                AccessField::Listener => text(e.listener.as_deref()),
                AccessField::Protocol => Value::String(e.protocol.to_owned()),
                AccessField::Method => Value::String(e.method.clone()),
                AccessField::Host => text(e.host.as_deref()),
                AccessField::Path => Value::String(e.path.clone()),
                AccessField::Query => e
                    .query
                    .as_deref()
                    .map_or(Value::Null, |q| Value::String(self.masked_query(q))),
                AccessField::Route => text(e.route.as_deref()),
                AccessField::Service => text(e.service.as_deref()),
                AccessField::Application => text(e.application.as_deref()),
                AccessField::ApplicationName => text(e.application_name.as_deref()),
                AccessField::Team => text(e.team.as_deref()),
                AccessField::Status => Value::from(e.status),
                AccessField::BytesIn => Value::from(e.bytes_in),
                AccessField::BytesOut => Value::from(e.bytes_out),
                AccessField::DurationMs => ms(e.duration_us),
                AccessField::UpstreamMs => e.upstream_us.map_or(Value::Null, ms),
                AccessField::Upstream => text(e.upstream.as_deref()),
                AccessField::UpstreamTarget => opt(e.upstream_target.map(|t| t.to_string())),
                AccessField::Attempts => Value::from(e.attempts),
                AccessField::Cache => text(e.cache),
                AccessField::Error => text(e.error),
                AccessField::UserAgent => text(e.user_agent.as_deref()),
                AccessField::Completed => Value::Bool(e.completed),
            };
            put(f.key(), v);
        }
        // Captured parts appear whenever the event carries them: capture is its own opt-in.
        if let Some(h) = &e.request_headers {
            put("request_headers", headers(h));
        }
        if let Some(h) = &e.response_headers {
            put("response_headers", headers(h));
        }
        for (key, body) in [
            ("request_body", &e.request_body),
            ("response_body", &e.response_body),
        ] {
            if let Some(b) = body {
                let mut v = b.to_value(&self.mask_fields);
                if let Some(r) = &e.redact {
                    if r.has_fields() && v.is_string() {
                        // Cut or not JSON: the fields to mask cannot be found, so none of
                        // it is written.
                        v = Value::String(crate::redact::REDACTED.into());
                    } else {
                        r.redact_json(&mut v);
                    }
                }
                put(key, v);
                if b.truncated {
                    put(&format!("{key}_truncated"), Value::Bool(true));
                }
            }
        }
        m
    }

    /// The record as one line of JSON (no trailing newline): the same document as
    /// [`Formatter::record`], written straight into the line. Building the map first (an
    /// ordered map, with a hashed key and an owned value per field) was most of what an
    /// access log cost per request (`bench/run.sh observe`).
    pub fn line(&self, e: &CallEvent) -> String {
        let mut w = Line {
            buf: Vec::with_capacity(384),
            first: true,
        };
        w.buf.push(b'{');
        for f in &self.fields {
            let k = f.key();
            match f {
                AccessField::Time => w.display(k, &Rfc3339Ms(e.time_unix_ms)),
                AccessField::RequestId => w.str(k, Some(&e.request_id)),
                AccessField::TraceId => w.str(k, e.trace_id.as_deref()),
                AccessField::SpanId => w.str(k, e.span_id.as_deref()),
                AccessField::ClientIp => w.display(k, &e.client_ip),
                AccessField::Listener => w.str(k, e.listener.as_deref()),
                AccessField::Protocol => w.str(k, Some(e.protocol)),
                AccessField::Method => w.str(k, Some(&e.method)),
                AccessField::Host => w.str(k, e.host.as_deref()),
                AccessField::Path => w.str(k, Some(&e.path)),
                AccessField::Query => match e.query.as_deref() {
                    Some(q) if self.mask_query.is_empty() => w.str(k, Some(q)),
                    Some(q) => w.str(k, Some(&self.masked_query(q))),
                    None => {}
                },
                AccessField::Route => w.str(k, e.route.as_deref()),
                AccessField::Service => w.str(k, e.service.as_deref()),
                AccessField::Application => w.str(k, e.application.as_deref()),
                AccessField::ApplicationName => w.str(k, e.application_name.as_deref()),
                AccessField::Team => w.str(k, e.team.as_deref()),
                AccessField::Status => w.json(k, &e.status),
                AccessField::BytesIn => w.json(k, &e.bytes_in),
                AccessField::BytesOut => w.json(k, &e.bytes_out),
                AccessField::DurationMs => w.json(k, &ms(e.duration_us)),
                AccessField::UpstreamMs => {
                    if let Some(us) = e.upstream_us {
                        w.json(k, &ms(us));
                    }
                }
                AccessField::Upstream => w.str(k, e.upstream.as_deref()),
                AccessField::UpstreamTarget => {
                    if let Some(t) = &e.upstream_target {
                        w.display(k, t);
                    }
                }
                AccessField::Attempts => w.json(k, &e.attempts),
                AccessField::Cache => w.str(k, e.cache),
                AccessField::Error => w.str(k, e.error),
                AccessField::UserAgent => w.str(k, e.user_agent.as_deref()),
                AccessField::Completed => w.json(k, &e.completed),
            }
        }
        let captured = e.request_headers.is_some()
            || e.response_headers.is_some()
            || e.request_body.is_some()
            || e.response_body.is_some();
        if captured {
            // Captured parts are opt-in and rare: they go through the record.
            let mut m = self.record(e);
            for key in [
                "request_headers",
                "response_headers",
                "request_body",
                "request_body_truncated",
                "response_body",
                "response_body_truncated",
            ] {
                if let Some(v) = m.remove(key) {
                    w.json(key, &v);
                }
            }
        }
        w.buf.push(b'}');
        // Only JSON (valid UTF-8) was written.
        String::from_utf8(w.buf).unwrap_or_default()
    }
}

/// A JSON object being written: keys and values after the opening brace.
struct Line {
    buf: Vec<u8>,
    first: bool,
}

impl Line {
    fn key(&mut self, k: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        let _ = serde_json::to_writer(&mut self.buf, k);
        self.buf.push(b':');
    }

    /// A string value; absent values are left out, as in the record.
    fn str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.key(k);
            let _ = serde_json::to_writer(&mut self.buf, v);
        }
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, k: &str, v: &T) {
        self.key(k);
        let _ = serde_json::to_writer(&mut self.buf, v);
    }

    /// A value whose text needs no escaping (addresses, times), as a string.
    fn display(&mut self, k: &str, v: &dyn std::fmt::Display) {
        use std::io::Write as _;
        self.key(k);
        let _ = write!(self.buf, "\"{v}\"");
    }
}

/// [`rfc3339_ms`] without the intermediate string.
struct Rfc3339Ms(i64);

impl std::fmt::Display for Rfc3339Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

/// Repeated headers become an array, so nothing is lost and single ones stay plain.
fn headers(h: &[(String, String)]) -> Value {
    let mut m = Map::new();
    for (k, v) in h {
        match m.get_mut(k) {
            Some(Value::Array(a)) => a.push(Value::String(v.clone())),
            Some(prev) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, Value::String(v.clone())]);
            }
            None => {
                m.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    Value::Object(m)
}

/// Microseconds as fractional milliseconds (three decimals).
fn ms(us: u64) -> Value {
    serde_json::Number::from_f64(us as f64 / 1000.0).map_or(Value::Null, Value::Number)
}

/// `2026-01-02T03:04:05.678Z`.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    Rfc3339Ms(unix_ms).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn time_is_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_767_322_245_678), "2026-01-02T02:50:45.678Z");
    }

    #[test]
    fn credentials_in_the_query_are_masked() {
        let mut e = crate::tests::event();
        e.query = Some("page=2&APIKEY=s3cret&access_token=t&flag&keyless=1".into());
        let f = Formatter::new(&[AccessField::Query], None);
        assert_eq!(
            f.record(&e)["query"],
            "page=2&APIKEY=***&access_token=***&flag&keyless=1"
        );
        let f = Formatter::new(&[AccessField::Query], None).with_query_mask(&["page".into()]);
        assert_eq!(
            f.record(&e)["query"],
            "page=***&APIKEY=s3cret&access_token=t&flag&keyless=1"
        );
    }

    #[test]
    fn only_selected_fields_in_order() {
        let mut e = crate::tests::event();
        e.upstream_us = Some(1500);
        let f = Formatter::new(
            &[
                AccessField::Status,
                AccessField::Route,
                AccessField::UpstreamMs,
                AccessField::Host,
            ],
            None,
        );
        let line: Value = serde_json::from_str(&f.line(&e)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"status": 200, "route": "r1", "upstream_ms": 1.5})
        );
    }

    #[test]
    fn lines_are_the_records_written_out() {
        let mut e = crate::tests::event();
        let every = [
            AccessField::Time,
            AccessField::RequestId,
            AccessField::TraceId,
            AccessField::SpanId,
            AccessField::ClientIp,
            AccessField::Listener,
            AccessField::Protocol,
            AccessField::Method,
            AccessField::Host,
            AccessField::Path,
            AccessField::Query,
            AccessField::Route,
            AccessField::Service,
            AccessField::Application,
            AccessField::ApplicationName,
            AccessField::Team,
            AccessField::Status,
            AccessField::BytesIn,
            AccessField::BytesOut,
            AccessField::DurationMs,
            AccessField::UpstreamMs,
            AccessField::Upstream,
            AccessField::UpstreamTarget,
            AccessField::Attempts,
            AccessField::Cache,
            AccessField::Error,
            AccessField::UserAgent,
            AccessField::Completed,
        ];
        let f = Formatter::new(&every, None);
        let same = |f: &Formatter, e: &CallEvent| {
            let line = f.line(e);
            let parsed: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(parsed, Value::Object(f.record(e)), "{line}");
            // Key order too.
            let keys: Vec<String> = f.record(e).keys().cloned().collect();
            let line_keys: Vec<String> = parsed.as_object().unwrap().keys().cloned().collect();
            assert_eq!(keys, line_keys);
        };
        same(&f, &e);
        e.time_unix_ms = 1_767_322_245_678;
        e.trace_id = Some("t\"1".into());
        e.host = Some("h\u{7}\u{e9}".into());
        e.query = Some("token=x&a=1".into());
        e.upstream_target = Some("[::1]:8080".parse().unwrap());
        e.upstream_us = None;
        e.duration_us = 1_234_567;
        e.cache = Some("HIT");
        e.error = Some("upstream_timeout");
        e.user_agent = Some("curl/8 \\ ok".into());
        e.completed = false;
        e.request_headers = Some(vec![("a".into(), "1".into()), ("a".into(), "2".into())]);
        e.response_headers = Some(vec![("b".into(), "3".into())]);
        same(&f, &e);
        same(&Formatter::new(&every, None).with_query_mask(&[]), &e);
    }

    #[test]
    fn basic_fields_and_captured_parts() {
        let mut e = crate::tests::event();
        e.request_headers = Some(vec![
            ("accept".into(), "a".into()),
            ("accept".into(), "b".into()),
        ]);
        let f = Formatter::new(AccessField::BASIC, None);
        let r = f.record(&e);
        assert_eq!(r["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(r["client_ip"], "127.0.0.1");
        assert_eq!(r["duration_ms"], 0.01);
        assert_eq!(
            r["request_headers"]["accept"],
            serde_json::json!(["a", "b"])
        );
        assert!(!r.contains_key("trace_id"));
    }
}
