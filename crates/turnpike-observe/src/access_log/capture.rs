//! Header and body capture: what the data plane copies into a [`crate::CallEvent`] when
//! the access log asks for it, and the masking applied to it.

use serde::{Serialize, Serializer};
use serde_json::Value;
use turnpike_model::observe::access_log::CaptureConfig;

/// The capture settings the data plane reads on each request (see
/// [`crate::Observer::capture`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    /// Copy request headers.
    pub request_headers: bool,
    /// Copy response headers.
    pub response_headers: bool,
    /// Keep the first `max_body_bytes` of the request body.
    pub request_body: bool,
    /// Keep the first `max_body_bytes` of the response body.
    pub response_body: bool,
    /// Body bytes kept at most.
    pub max_body_bytes: usize,
    /// Lower-case header names whose values are masked.
    pub mask_headers: Vec<String>,
    /// JSON field names whose values are masked in captured bodies.
    pub mask_fields: Vec<String>,
}

/// What replaces a masked value.
pub const MASK: &str = "***";

impl Capture {
    /// The settings of `cfg`, or `None` when it captures nothing.
    pub fn from_config(cfg: &CaptureConfig) -> Option<Self> {
        cfg.any().then(|| Self {
            request_headers: cfg.request_headers,
            response_headers: cfg.response_headers,
            request_body: cfg.request_body,
            response_body: cfg.response_body,
            max_body_bytes: cfg.max_body_bytes,
            mask_headers: cfg
                .mask_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            mask_fields: cfg.mask_fields.clone(),
        })
    }

    /// Copies `headers`, masking the sensitive ones. Header names from `http` are already
    /// lower case, so the comparison is exact.
    pub fn headers(&self, headers: &http::HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(name, value)| {
                let name = name.as_str();
                let value = if self.mask_headers.iter().any(|m| m == name) {
                    MASK.to_owned()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                };
                (name.to_owned(), value)
            })
            .collect()
    }

    /// A body in its capturing state, empty.
    pub fn body(&self) -> CapturedBody {
        CapturedBody {
            data: Vec::new(),
            truncated: false,
            max: self.max_body_bytes,
        }
    }
}

/// The start of a body, at most the configured number of bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapturedBody {
    /// The bytes kept.
    pub data: Vec<u8>,
    /// Whether the body was longer than what was kept.
    pub truncated: bool,
    max: usize,
}

impl CapturedBody {
    /// Keeps what still fits of `chunk`.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.max.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data
            .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
    }

    /// Forgets what was kept (a retried upstream attempt sends the body again).
    pub fn clear(&mut self) {
        self.data.clear();
        self.truncated = false;
    }

    /// The body as a record value: masked JSON when it parses as JSON (and was not cut),
    /// otherwise text (invalid UTF-8 replaced).
    pub fn to_value(&self, mask_fields: &[String]) -> Value {
        if !self.truncated
            && let Ok(mut json) = serde_json::from_slice::<Value>(&self.data)
        {
            mask_json(&mut json, mask_fields);
            return json;
        }
        let text = String::from_utf8_lossy(&self.data);
        if mask_fields.is_empty() {
            return Value::String(text.into_owned());
        }
        Value::String(mask_json_text(&text, mask_fields))
    }
}

impl Serialize for CapturedBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(&self.data))
    }
}

/// Replaces the values of the named fields, at any depth.
pub fn mask_json(value: &mut Value, fields: &[String]) {
    if fields.is_empty() {
        return;
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if fields.iter().any(|f| f == k) {
                    *v = Value::String(MASK.into());
                } else {
                    mask_json(v, fields);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| mask_json(v, fields)),
        _ => {}
    }
}

/// Masks `"field": value` pairs in JSON text that was cut and no longer parses: a string
/// value is replaced up to its closing quote (or the end), a scalar up to the next `,` `}`
/// `]`. Nested objects under a masked name are left alone (their own fields still match).
fn mask_json_text(text: &str, fields: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for f in fields {
            let key = format!("\"{f}\"");
            if let Some(after_key) = rest.strip_prefix(key.as_str()) {
                let trimmed = after_key.trim_start();
                if let Some(after_colon) = trimmed.strip_prefix(':') {
                    let value = after_colon.trim_start();
                    out.push_str(&key);
                    out.push(':');
                    if let Some(s) = value.strip_prefix('"') {
                        out.push('"');
                        out.push_str(MASK);
                        out.push('"');
                        rest = skip_string(s);
                        continue 'outer;
                    }
                    if value.starts_with('{') || value.starts_with('[') {
                        rest = value;
                        continue 'outer;
                    }
                    out.push('"');
                    out.push_str(MASK);
                    out.push('"');
                    let end = value.find([',', '}', ']']).unwrap_or(value.len());
                    rest = value.get(end..).unwrap_or_default();
                    continue 'outer;
                }
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// The text after a JSON string's closing quote (`s` starts just after the opening one).
fn skip_string(s: &str) -> &str {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return s.get(i + 1..).unwrap_or_default(),
            _ => {}
        }
    }
    ""
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn capture() -> Capture {
        Capture::from_config(&CaptureConfig {
            request_body: true,
            max_body_bytes: 16,
            mask_fields: vec!["password".into()],
            ..CaptureConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn bodies_are_capped_and_json_fields_masked() {
        let c = capture();
        let mut b = c.body();
        b.push(br#"{"user":"a","#);
        b.push(br#""password":"secret"}"#);
        assert!(b.truncated);
        assert_eq!(b.data.len(), 16);
        // Cut JSON: masked as text.
        let v = b.to_value(&c.mask_fields);
        assert_eq!(v, Value::String(r#"{"user":"a","pas"#.into()));

        let mut b = Capture {
            max_body_bytes: 100,
            ..c.clone()
        }
        .body();
        b.push(br#"{"user":"a","nested":[{"password":"x"}],"password":1}"#);
        let v = b.to_value(&c.mask_fields);
        assert_eq!(v["password"], "***");
        assert_eq!(v["nested"][0]["password"], "***");
        assert_eq!(v["user"], "a");
    }

    #[test]
    fn cut_json_text_is_masked() {
        let f = vec!["password".to_owned(), "pin".to_owned()];
        assert_eq!(
            mask_json_text(r#"{"password": "se\"cret", "pin": 12, "a": "b"#, &f),
            r#"{"password":"***", "pin":"***", "a": "b"#
        );
        assert_eq!(
            mask_json_text(r#"{"password":"sec"#, &f),
            r#"{"password":"***""#
        );
    }

    #[test]
    fn headers_are_masked() {
        let c = capture();
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.insert("x-thing", "1".parse().unwrap());
        let got = c.headers(&h);
        assert!(got.contains(&("authorization".into(), "***".into())));
        assert!(got.contains(&("x-thing".into(), "1".into())));
    }
}
