//! gRPC protocol translation: `grpc_transcode` (REST/JSON ↔ gRPC from `.proto` files) and
//! `grpc_web` (gRPC-Web ↔ gRPC), and the HTTP path templates of `google.api.http` rules.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `grpc_transcode`: JSON over HTTP in front of a gRPC upstream. The `.proto` files are
/// compiled when the configuration loads (no `protoc` needed); each method is reached through
/// its `google.api.http` annotation or an explicit mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcTranscodeConfig {
    /// `.proto` files to compile, by path on the gateway's machine (relative paths from its
    /// working directory), or by name under one of `import_paths`.
    #[serde(default)]
    pub proto_files: Vec<String>,
    /// Directories imports are looked up in (the files' own directories are added).
    #[serde(default)]
    pub import_paths: Vec<String>,
    /// `.proto` sources given inline, by file name (`echo/v1/echo.proto`): for attachments
    /// made through the Admin API, which cannot place files on the gateway's machine. They are
    /// compiled, and importable by that name.
    #[serde(default)]
    pub proto_sources: BTreeMap<String, String>,
    /// Services exposed, by full name (`echo.v1.Echo`). Empty: every service of the files
    /// named (not of their imports).
    #[serde(default)]
    pub services: Vec<String>,
    /// Whether methods' `google.api.http` annotations are followed (`import
    /// "google/api/annotations.proto"`; the gateway supplies that file when no import path
    /// has it).
    #[serde(default = "yes")]
    pub use_annotations: bool,
    /// Explicit mappings, for methods without annotations or to add HTTP forms.
    #[serde(default)]
    pub methods: Vec<GrpcMethodMapping>,
    /// How server-streaming answers are written when the client's `Accept` does not choose
    /// (`text/event-stream` chooses `sse`, `application/x-ndjson` chooses `ndjson`).
    #[serde(default)]
    pub stream: StreamFormat,
    /// How messages are written as JSON.
    #[serde(default)]
    pub json: GrpcJsonOptions,
    /// Whether JSON fields and query parameters the request message does not have are ignored
    /// (default: refused with 400 naming them).
    #[serde(default)]
    pub ignore_unknown_fields: bool,
    /// Largest request body read, and largest message accepted from the upstream.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Which native gRPC (and gRPC-Web) requests on the route reach the upstream.
    #[serde(default)]
    pub native_grpc: NativeGrpc,
}

/// Which native gRPC requests a transcoded route passes to its upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NativeGrpc {
    /// Only calls to the methods this policy exposes as JSON: `services` and `methods` are an
    /// allow-list for gRPC clients too.
    #[default]
    Mapped,
    /// Every method of the upstream.
    All,
    /// None: the route is JSON only.
    None,
}

fn yes() -> bool {
    true
}

fn default_max_message_bytes() -> u64 {
    4 * 1024 * 1024
}

/// How a server-streaming method's messages reach an HTTP client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamFormat {
    /// One JSON document per line (`application/x-ndjson`).
    #[default]
    Ndjson,
    /// Server-sent events, one `data:` event per message (`text/event-stream`).
    Sse,
}

/// Protobuf → JSON printing options (the proto3 JSON mapping's own options).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcJsonOptions {
    /// Field names as written in the `.proto` (`user_id`), not lowerCamelCase (`userId`).
    #[serde(default)]
    pub proto_names: bool,
    /// Fields holding their default value (0, "", false, empty lists) are written too.
    #[serde(default)]
    pub emit_defaults: bool,
    /// Enums written as numbers, not names.
    #[serde(default)]
    pub enums_as_numbers: bool,
}

/// One explicit HTTP form of a gRPC method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMapping {
    /// The method: `package.Service/Method`.
    pub grpc: String,
    /// The HTTP method (upper case).
    #[serde(default = "default_http_method")]
    pub method: String,
    /// The path template, as in `google.api.http`: `/v1/{name=shelves/*}/books:search`.
    pub path: String,
    /// Where the request body goes: `*` (the whole message), a top-level field's name, or
    /// absent (no body; fields not in the path come from query parameters).
    #[serde(default)]
    pub body: Option<String>,
    /// A top-level field of the response message answered alone instead of the whole message.
    #[serde(default)]
    pub response_body: Option<String>,
}

fn default_http_method() -> String {
    "POST".into()
}

impl GrpcTranscodeConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.proto_files.is_empty() && self.proto_sources.is_empty() {
            return Err((
                "proto_files".into(),
                "name at least one .proto file (or give `proto_sources`)".into(),
            ));
        }
        for (i, f) in self.proto_files.iter().enumerate() {
            if !f.ends_with(".proto") {
                return Err((
                    format!("proto_files[{i}]"),
                    format!("`{f}` is not a .proto file"),
                ));
            }
        }
        for name in self.proto_sources.keys() {
            let relative = std::path::Path::new(name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !name.ends_with(".proto") || !relative {
                return Err((
                    format!("proto_sources.{name}"),
                    "names a relative `.proto` file (`pkg/v1/api.proto`)".into(),
                ));
            }
        }
        if self.max_message_bytes == 0 {
            return Err(("max_message_bytes".into(), "must be at least 1".into()));
        }
        if !self.use_annotations && self.methods.is_empty() {
            return Err((
                "methods".into(),
                "with `use_annotations: false`, map at least one method".into(),
            ));
        }
        for (i, m) in self.methods.iter().enumerate() {
            let at = format!("methods[{i}]");
            split_grpc_method(&m.grpc).map_err(|e| (format!("{at}.grpc"), e))?;
            if http::Method::from_bytes(m.method.as_bytes()).is_err()
                || m.method != m.method.to_ascii_uppercase()
            {
                return Err((
                    format!("{at}.method"),
                    format!("`{}` is not an upper-case method", m.method),
                ));
            }
            PathTemplate::parse(&m.path).map_err(|e| (format!("{at}.path"), e))?;
            if let Some(b) = &m.body
                && b != "*"
                && !is_ident(b)
            {
                return Err((
                    format!("{at}.body"),
                    "is `*` or a top-level field name".into(),
                ));
            }
            if let Some(b) = &m.response_body
                && !is_ident(b)
            {
                return Err((
                    format!("{at}.response_body"),
                    "is a top-level field name".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `grpc_web`: gRPC-Web clients (browsers) reach a gRPC upstream. Binary
/// (`application/grpc-web`, `+proto`) and text (`application/grpc-web-text`, base64) forms
/// are translated; native gRPC requests on the route pass untouched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Largest `grpc-web-text` request body decoded (binary bodies stream).
    #[serde(default = "default_max_message_bytes")]
    pub max_text_bytes: u64,
}

impl GrpcWebConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.max_text_bytes == 0 {
            return Err(("max_text_bytes".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// `package.Service/Method` split into the service's full name and the method's name.
pub fn split_grpc_method(s: &str) -> Result<(&str, &str), String> {
    let (service, method) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not `package.Service/Method`"))?;
    if !service.split('.').all(is_ident) || !is_ident(method) {
        return Err(format!("`{s}` is not `package.Service/Method`"));
    }
    Ok((service, method))
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A `google.api.http` path template: `/v1/{name=shelves/*/books/*}:publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The segments, in order.
    pub segments: Vec<Segment>,
    /// The custom verb after the last segment (`publish`), if any.
    pub verb: Option<String>,
    /// The variables: field path (`book.name`) and the segment range `[start, end)` it binds.
    pub variables: Vec<Variable>,
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Exactly this text (compared with the request's decoded segment).
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path (zero or more segments); last only.
    Rest,
}

/// A variable of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The field path it sets (`book.name`).
    pub field: Vec<String>,
    /// First segment bound.
    pub start: usize,
    /// One past the last segment bound (`usize::MAX` for `**`: to the end).
    pub end: usize,
}

impl PathTemplate {
    /// Parses a template, naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix('/')
            .ok_or_else(|| format!("`{s}` must start with `/`"))?;
        // The verb is after the last `:` outside braces, in the last segment.
        let (body, verb) = split_verb(rest);
        if let Some(v) = verb
            && (v.is_empty() || v.contains(['/', '{', '}', '*']))
        {
            return Err(format!("`{s}`: the verb `:{v}` must be literal text"));
        }
        let mut t = PathTemplate {
            segments: Vec::new(),
            verb: verb.map(str::to_owned),
            variables: Vec::new(),
        };
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner
                    .find('}')
                    .ok_or_else(|| format!("`{s}`: a `{{` is not closed"))?;
                let var = &inner[..close];
                chars = &inner[close + 1..];
                let (field, pattern) = var.split_once('=').unwrap_or((var, "*"));
                let field: Vec<String> = field.split('.').map(str::to_owned).collect();
                if !field.iter().all(|f| is_ident(f)) {
                    return Err(format!("`{s}`: `{var}` does not name a field"));
                }
                if t.variables.iter().any(|v| v.field == field) {
                    return Err(format!("`{s}`: `{}` is bound twice", field.join(".")));
                }
                let start = t.segments.len();
                for p in pattern.split('/') {
                    t.segments.push(segment(p, s)?);
                }
                let end = if t.segments.last() == Some(&Segment::Rest) {
                    usize::MAX
                } else {
                    t.segments.len()
                };
                t.variables.push(Variable { field, start, end });
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let seg = &chars[..end];
                if seg.contains(['{', '}', '=']) {
                    return Err(format!("`{s}`: `{seg}` mixes text and a variable"));
                }
                t.segments.push(segment(seg, s)?);
                chars = &chars[end..];
            }
            if let Some(next) = chars.strip_prefix('/') {
                if next.is_empty() {
                    return Err(format!("`{s}` must not end with `/`"));
                }
                chars = next;
            } else if !chars.is_empty() {
                return Err(format!("`{s}`: a variable must be a whole segment"));
            }
        }
        if t.segments.is_empty() {
            return Err(format!("`{s}` has no segment"));
        }
        if let Some(i) = t.segments.iter().position(|g| *g == Segment::Rest)
            && i + 1 != t.segments.len()
        {
            return Err(format!("`{s}`: `**` must be the last segment"));
        }
        Ok(t)
    }

    /// Matches a path (as sent: percent-encoded segments). On a match, the variables' values,
    /// decoded: a one-segment value fully, a multi-segment one except for `%2F`.
    pub fn matches(&self, path: &str) -> Option<Vec<(&[String], String)>> {
        let rest = path.strip_prefix('/')?;
        // Without a verb, a `:` in the last segment is ordinary text.
        let body = match &self.verb {
            Some(v) => rest.strip_suffix(v.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let rest_at = self.segments.iter().position(|s| *s == Segment::Rest);
        match rest_at {
            Some(i) if parts.len() < i => return None,
            None if parts.len() != self.segments.len() => return None,
            _ => {}
        }
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) => {
                    if decode(part, true)? != *l {
                        return None;
                    }
                }
                Segment::One => {
                    if part.is_empty() {
                        return None;
                    }
                }
                Segment::Rest => break,
            }
        }
        let mut out = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let end = v.end.min(parts.len());
            let bound = parts.get(v.start..end)?;
            let value = if bound.len() == 1 && v.end != usize::MAX {
                decode(bound[0], true)?
            } else {
                bound
                    .iter()
                    .map(|p| decode(p, false))
                    .collect::<Option<Vec<_>>>()?
                    .join("/")
            };
            out.push((v.field.as_slice(), value));
        }
        Some(out)
    }

    /// Precedence between templates that could match the same path: literal segments before
    /// variables, variables before `**`, then the longer template, then one with a verb.
    pub fn specificity(&self) -> Vec<u8> {
        let mut key: Vec<u8> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 3,
                Segment::One => 2,
                Segment::Rest => 1,
            })
            .collect();
        key.push(u8::from(self.verb.is_some()));
        key
    }
}

fn split_verb(rest: &str) -> (&str, Option<&str>) {
    let last_seg_start = rest.rfind('/').map_or(0, |i| i + 1);
    let mut depth = 0i32;
    let mut colon = None;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ':' if depth == 0 && i >= last_seg_start => colon = Some(i),
            _ => {}
        }
    }
    // A `/` inside braces of the last variable can put the real last segment earlier; the
    // braces check covers it.
    match colon {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

fn segment(p: &str, whole: &str) -> Result<Segment, String> {
    Ok(match p {
        "" => return Err(format!("`{whole}` has an empty segment")),
        "*" => Segment::One,
        "**" => Segment::Rest,
        _ if p.contains(['*', '{', '}', '=', '?', '#']) => {
            return Err(format!("`{whole}`: `{p}` is not a literal segment"));
        }
        _ => Segment::Literal(p.to_owned()),
    })
}

/// Percent-decodes one segment; `all: false` keeps `%2F` (a slash inside a multi-segment
/// value) encoded. `None` for a bad escape or text that is not UTF-8.
fn decode(s: &str, all: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if !all && v == b'/' {
                out.extend_from_slice(&b[i..i + 3]);
            } else {
                out.push(v);
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = PathTemplate::parse(t).unwrap();
        t.matches(path)
            .map(|v| v.into_iter().map(|(f, val)| (f.join("."), val)).collect())
    }

    #[test]
    fn templates_bind_variables() {
        assert_eq!(
            vars("/v1/echo/{text}", "/v1/echo/hi%20there"),
            Some(vec![("text".into(), "hi there".into())])
        );
        assert_eq!(
            vars("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/a%2Fb"),
            Some(vec![("name".into(), "shelves/1/books/a%2Fb".into())])
        );
        assert_eq!(
            vars("/v1/{book.name=**}", "/v1/a/b/c"),
            Some(vec![("book.name".into(), "a/b/c".into())])
        );
        assert_eq!(
            vars("/v1/things/{id}:publish", "/v1/things/7:publish"),
            Some(vec![("id".into(), "7".into())])
        );
        assert_eq!(vars("/v1/things/{id}:publish", "/v1/things/7"), None);
        assert_eq!(vars("/v1/echo/{text}", "/v1/echo"), None);
        assert_eq!(vars("/v1/echo/{text}", "/v1/echo/a/b"), None);
        assert_eq!(vars("/v1/echo", "/v1/echo"), Some(vec![]));
        assert_eq!(vars("/v1/echo/{text}", "/v1/echo/%zz"), None);
    }

    #[test]
    fn bad_templates_are_named() {
        for (t, why) in [
            ("v1/x", "start with"),
            ("/v1/{x", "not closed"),
            ("/v1/**/x", "last segment"),
            ("/v1/a{x}", "mixes"),
            ("/v1/{x}/{x}", "bound twice"),
            ("/v1/{1x}", "does not name"),
            ("/v1//x", "empty segment"),
            ("/v1/x/", "end with"),
            ("/v1/x:", "verb"),
        ] {
            let e = PathTemplate::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn literals_are_more_specific_than_variables() {
        let a = PathTemplate::parse("/v1/messages/search").unwrap();
        let b = PathTemplate::parse("/v1/messages/{id}").unwrap();
        let c = PathTemplate::parse("/v1/{rest=**}").unwrap();
        assert!(a.specificity() > b.specificity());
        assert!(b.specificity() > c.specificity());
    }

    #[test]
    fn method_names_are_checked() {
        assert_eq!(
            split_grpc_method("echo.v1.Echo/Unary").unwrap(),
            ("echo.v1.Echo", "Unary")
        );
        assert!(split_grpc_method("echo.Echo.Unary").is_err());
        assert!(split_grpc_method("echo.Echo/").is_err());
    }
}
