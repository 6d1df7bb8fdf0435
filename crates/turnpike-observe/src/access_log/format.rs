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
        let mut buf = Vec::with_capacity(384);
        self.write_line(e, &mut buf);
        // Only JSON (valid UTF-8) was written.
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Appends the record of `e` to `out` as one line of JSON, without the newline. A
    /// batch of lines shares one buffer, so a line costs no allocation of its own.
    pub fn write_line(&self, e: &CallEvent, out: &mut Vec<u8>) {
        let mut w = Line {
            buf: out,
            first: true,
        };
        w.buf.push(b'{');
        for f in &self.fields {
            let k = f.key();
            match f {
                AccessField::Time => {
                    w.key(k);
                    w.buf.push(b'"');
                    push_rfc3339_ms(w.buf, e.time_unix_ms);
                    w.buf.push(b'"');
                }
                AccessField::RequestId => w.str(k, Some(&e.request_id)),
                AccessField::TraceId => w.str(k, e.trace_id.as_deref()),
                AccessField::SpanId => w.str(k, e.span_id.as_deref()),
                AccessField::ClientIp => {
                    w.key(k);
                    w.buf.push(b'"');
                    crate::text::push_ip(w.buf, e.client_ip);
                    w.buf.push(b'"');
                }
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
                AccessField::Status => w.int(k, e.status),
                AccessField::BytesIn => w.int(k, e.bytes_in),
                AccessField::BytesOut => w.int(k, e.bytes_out),
                AccessField::DurationMs => w.ms(k, e.duration_us),
                AccessField::UpstreamMs => {
                    if let Some(us) = e.upstream_us {
                        w.ms(k, us);
                    }
                }
                AccessField::Upstream => w.str(k, e.upstream.as_deref()),
                AccessField::UpstreamTarget => {
                    if let Some(t) = &e.upstream_target {
                        w.key(k);
                        w.buf.push(b'"');
                        crate::text::push_socket_addr(w.buf, *t);
                        w.buf.push(b'"');
                    }
                }
                AccessField::Attempts => w.int(k, e.attempts),
                AccessField::Cache => w.str(k, e.cache),
                AccessField::Error => w.str(k, e.error),
                AccessField::UserAgent => w.str(k, e.user_agent.as_deref()),
                AccessField::Completed => {
                    w.key(k);
                    w.buf
                        .extend_from_slice(if e.completed { b"true" } else { b"false" });
                }
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
    }
}

/// A JSON object being written: keys and values after the opening brace.
struct Line<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl Line<'_> {
    /// Keys are the fields' fixed names (`request_id`, `response_body_truncated`), which
    /// need no escaping, so they are copied without looking at them.
    fn key(&mut self, k: &str) {
        debug_assert!(plain(k), "{k}");
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string value; absent values are left out, as in the record.
    fn str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.key(k);
            push_json_str(self.buf, v);
        }
    }

    fn int(&mut self, k: &str, v: impl itoa::Integer) {
        self.key(k);
        push_int(self.buf, v);
    }

    /// Microseconds as fractional milliseconds: the same number [`ms`] gives the record
    /// (`1.5`, `0.01`, `12.0`), written without going through a float.
    fn ms(&mut self, k: &str, us: u64) {
        self.key(k);
        push_int(self.buf, us / 1000);
        let frac = us % 1000;
        self.buf.push(b'.');
        if frac == 0 {
            self.buf.push(b'0');
            return;
        }
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let keep = if digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        for d in &digits[..keep] {
            // Each is a single decimal digit.
            self.buf.push(b'0' + *d as u8);
        }
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, k: &str, v: &T) {
        self.key(k);
        let _ = serde_json::to_writer(&mut *self.buf, v);
    }
}

/// Whether `s` needs no escaping in a JSON string. Every byte is looked at, with no early
/// exit, so the loop is vectorised: most values need none, and they are found so in a
/// fraction of the time a byte-by-byte search takes.
fn plain(s: &str) -> bool {
    !s.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// `s` as a JSON string. Most values (paths, ids, names) need no escaping, and copying
/// them whole is several times cheaper than serde_json's escaper, which takes the same
/// output for the rest.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    if plain(s) {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

fn push_int(buf: &mut Vec<u8>, v: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Appends `n` as exactly `width` decimal digits (zero-padded; larger values are cut to
/// their lowest digits, which a calendar field never needs).
fn push_digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        // n % 10 is a single decimal digit.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `2026-01-02T03:04:05.678Z` for `unix_ms`, appended to `buf`.
fn push_rfc3339_ms(buf: &mut Vec<u8>, unix_ms: i64) {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        use std::io::Write as _;
        let _ = write!(buf, "{year:04}");
    } else {
        push_digits(buf, year.unsigned_abs(), 4);
    }
    buf.push(b'-');
    push_digits(buf, u32::from(u8::from(t.month())), 2);
    buf.push(b'-');
    push_digits(buf, u32::from(t.day()), 2);
    buf.push(b'T');
    push_digits(buf, u32::from(t.hour()), 2);
    buf.push(b':');
    push_digits(buf, u32::from(t.minute()), 2);
    buf.push(b':');
    push_digits(buf, u32::from(t.second()), 2);
    buf.push(b'.');
    push_digits(buf, u32::from(t.millisecond()), 3);
    buf.push(b'Z');
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
    let mut buf = Vec::with_capacity(24);
    push_rfc3339_ms(&mut buf, unix_ms);
    // Only ASCII digits and separators were written.
    String::from_utf8(buf).unwrap_or_default()
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
    fn written_numbers_times_addresses_and_strings_are_serde_json_s() {
        // The line writer's own number, time, address and string writing gives the text
        // serde_json would.
        let f = Formatter::new(&[AccessField::DurationMs], None);
        let mut e = crate::tests::event();
        for us in [
            0,
            1,
            9,
            10,
            12,
            100,
            120,
            999,
            1000,
            1001,
            1010,
            1100,
            1234,
            12_000,
            999_999,
            1_000_000_007,
            4_294_967_296_001,
        ] {
            e.duration_us = us;
            let want = format!(
                "{{\"duration_ms\":{}}}",
                serde_json::to_string(&ms(us)).unwrap()
            );
            assert_eq!(f.line(&e), want, "{us} us");
        }
        let f = Formatter::new(
            &[
                AccessField::Time,
                AccessField::ClientIp,
                AccessField::UpstreamTarget,
            ],
            None,
        );
        for (t, ip, target) in [
            (0, "0.0.0.0", "255.255.255.255:65535"),
            (1_767_322_245_678, "10.1.20.255", "127.0.0.1:0"),
            (253_402_300_799_999, "::1", "[fe80::1%2]:8080"),
            (-1, "2001:db8::ff", "[::ffff:1.2.3.4]:1"),
        ] {
            e.time_unix_ms = t;
            e.client_ip = ip.parse().unwrap();
            e.upstream_target = Some(target.parse().unwrap());
            let time =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t) * 1_000_000).unwrap();
            let time = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                time.year(),
                u8::from(time.month()),
                time.day(),
                time.hour(),
                time.minute(),
                time.second(),
                time.millisecond()
            );
            let want = format!(
                "{{\"time\":\"{time}\",\"client_ip\":\"{}\",\"upstream_target\":\"{}\"}}",
                e.client_ip,
                e.upstream_target.unwrap()
            );
            assert_eq!(f.line(&e), want);
        }
        let f = Formatter::new(&[AccessField::Path], None);
        for path in [
            "/plain/path?x",
            "/quote\"d",
            "/back\\slash",
            "/ctl\u{1}\u{1f}\t\n",
            "/del\u{7f}",
            "/caf\u{e9}/\u{1f600}",
            "",
        ] {
            e.path = path.into();
            let want = format!("{{\"path\":{}}}", serde_json::to_string(path).unwrap());
            assert_eq!(f.line(&e), want);
        }
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
