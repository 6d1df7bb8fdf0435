//! Transformation policies: `request_transform` changes what goes upstream,
//! `response_transform` what the client gets, `compression` how it is encoded.
//!
//! # Where they run
//!
//! The request transform runs after the access phase and body inspection (the checks judge
//! what the client sent), before the response cache: the cache keys what the upstream will
//! receive. Like any header, one the transform adds reaches the upstream of a cached route
//! only when the cache keys it (`key.headers`).
//!
//! The response transform and compression run on every answer the route gives from its
//! upstream or its cache (stale answers included), not on the gateway's own errors; the cache
//! stores the upstream's answer untransformed, so per-caller templates (`${app.id}`) never
//! leak from one caller's entry to another.
//!
//! # Streaming
//!
//! Header, query, path, method and status changes leave the body streaming, as does
//! compression. Body operations need the whole body: it is read up to the policy's
//! `max_bytes` (413 `body_too_large` for a request, 502 `response_too_large` for a response
//! past it). Templates read the request as the client sent it.

pub mod aggregate;
pub mod compress;
pub mod json;
pub mod template;
pub mod xml;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use turnpike_model::policy::{
    BodyFormat, BodyTransform, FieldOps, JsonOp, RequestTransformConfig, ResponseTransformConfig,
    Scope, Template, XmlOptions,
};

use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::inspect::ReqBody;
use template::{JsonTemplate, Vars};

/// Compiled header operations.
#[derive(Default)]
struct HeaderOps {
    remove: Vec<HeaderName>,
    rename: Vec<(HeaderName, HeaderName)>,
    set: Vec<(HeaderName, Template)>,
    add: Vec<(HeaderName, Template)>,
}

fn header_name(n: &str) -> Result<HeaderName, (String, String)> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| (String::new(), format!("`{n}` is not a header name")))
}

impl HeaderOps {
    fn new(ops: &FieldOps, scope: Scope) -> Result<Self, (String, String)> {
        let tpl = |(n, v): (&String, &String)| -> Result<(HeaderName, Template), (String, String)> {
            Ok((
                header_name(n)?,
                Template::parse(v, scope).map_err(|e| (String::new(), e))?,
            ))
        };
        Ok(Self {
            remove: ops
                .remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
            rename: ops
                .rename
                .iter()
                .map(|(a, b)| Ok((header_name(a)?, header_name(b)?)))
                .collect::<Result<_, (String, String)>>()?,
            set: ops.set.iter().map(tpl).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(tpl).collect::<Result<_, _>>()?,
        })
    }

    /// The rendered values, computed before any change (templates read the original).
    fn render(&self, vars: &Vars<'_>) -> Vec<Result<HeaderValue, String>> {
        self.set
            .iter()
            .chain(&self.add)
            .map(|(name, t)| {
                HeaderValue::try_from(vars.render(t, template::plain)).map_err(|_| {
                    format!("the value rendered for header `{name}` is not a valid header value")
                })
            })
            .collect()
    }

    /// Takes the headers these operations write out of `Connection` (see [`unlist`]).
    fn unlist_from_connection(&self, headers: &mut HeaderMap) {
        let written: Vec<HeaderName> = self
            .set
            .iter()
            .chain(&self.add)
            .map(|(n, _)| n.clone())
            .chain(self.rename.iter().map(|(_, to)| to.clone()))
            .collect();
        if !written.is_empty() {
            unlist(headers, &written);
        }
    }

    /// Applies the operations; a `None` value leaves its header alone.
    fn apply(&self, headers: &mut HeaderMap, mut values: Vec<Option<HeaderValue>>) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (from, to) in &self.rename {
            let moved: Vec<HeaderValue> = match headers.entry(from) {
                http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
                http::header::Entry::Vacant(_) => continue,
            };
            headers.remove(to);
            for v in moved {
                headers.append(to, v);
            }
        }
        let added = values.split_off(self.set.len().min(values.len()));
        for ((n, _), v) in self.set.iter().zip(values) {
            if let Some(v) = v {
                headers.insert(n, v);
            }
        }
        for ((n, _), v) in self.add.iter().zip(added) {
            if let Some(v) = v {
                headers.append(n, v);
            }
        }
    }
}

/// Removes `names` from the request's `Connection` header: the hop-by-hop stripping that
/// follows would otherwise remove the headers the transform wrote, at the client's say.
fn unlist(headers: &mut HeaderMap, names: &[HeaderName]) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !names.iter().any(|n| n.as_str().eq_ignore_ascii_case(t)))
        .map(str::to_owned)
        .collect();
    headers.remove(header::CONNECTION);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::CONNECTION, v);
    }
}

/// A compiled body transformation.
struct BodyOps {
    from: BodyFormat,
    to: BodyFormat,
    ops: Vec<Op>,
    shape: Option<JsonTemplate>,
    max_bytes: u64,
    xml: XmlOptions,
}

enum Op {
    Add(String, JsonTemplate),
    Remove(String),
    Rename(String, String),
    Move(String, String),
    Copy(String, String),
}

impl BodyOps {
    fn new(b: &BodyTransform, response: bool) -> Result<Self, (String, String)> {
        let scope = Scope {
            response,
            body: true,
        };
        let ops = b
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                Ok(match op {
                    JsonOp::Add { path, value } => Op::Add(
                        path.clone(),
                        JsonTemplate::compile(value, scope)
                            .map_err(|e| (format!("body.ops[{i}].value"), e))?,
                    ),
                    JsonOp::Remove { path } => Op::Remove(path.clone()),
                    JsonOp::Rename { path, to } => Op::Rename(path.clone(), to.clone()),
                    JsonOp::Move { from, path } => Op::Move(from.clone(), path.clone()),
                    JsonOp::Copy { from, path } => Op::Copy(from.clone(), path.clone()),
                })
            })
            .collect::<Result<_, (String, String)>>()?;
        let shape = b
            .shape
            .as_ref()
            .map(|s| JsonTemplate::compile(s, scope).map_err(|e| ("body.shape".to_owned(), e)))
            .transpose()?;
        Ok(Self {
            from: b.from,
            to: b.to.unwrap_or(b.from),
            ops,
            shape,
            max_bytes: b.max_bytes,
            xml: b.xml.clone(),
        })
    }

    /// What to do with a body described by `headers`.
    fn plan(&self, headers: &HeaderMap, empty: bool) -> Plan {
        if empty {
            // Only `shape` builds a body from nothing.
            return if self.shape.is_some() {
                Plan::Transform
            } else {
                Plan::Skip
            };
        }
        if headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity")
        {
            return Plan::Encoded;
        }
        match headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(t) if is_format(t, self.from) => Plan::Transform,
            _ => Plan::OtherType(match self.from {
                BodyFormat::Json => "the transform reads JSON bodies (application/json or +json)",
                BodyFormat::Xml => {
                    "the transform reads XML bodies (application/xml, text/xml or +xml)"
                }
            }),
        }
    }

    /// Transforms `body`: the new bytes and their `Content-Type`.
    fn run(&self, body: &[u8], vars: &Vars<'_>) -> Result<(Bytes, &'static str), String> {
        let mut doc = if body.is_empty() {
            Value::Null
        } else {
            match self.from {
                BodyFormat::Json => serde_json::from_slice(body)
                    .map_err(|e| format!("the body is not valid JSON: {e}"))?,
                BodyFormat::Xml => xml::to_json(body, &self.xml)?,
            }
        };
        for op in &self.ops {
            match op {
                Op::Add(path, value) => {
                    let v = Vars {
                        body: Some(&doc),
                        ..*vars
                    }
                    .render_json(value);
                    json::add(&mut doc, path, v)?;
                }
                Op::Remove(path) => {
                    json::take(&mut doc, path);
                }
                Op::Rename(path, to) => json::rename(&mut doc, path, to),
                Op::Move(from, path) => {
                    if let Some(v) = json::take(&mut doc, from) {
                        json::add(&mut doc, path, v)?;
                    }
                }
                Op::Copy(from, path) => {
                    if let Some(v) = doc.pointer(from).cloned() {
                        json::add(&mut doc, path, v)?;
                    }
                }
            }
        }
        if let Some(shape) = &self.shape {
            doc = Vars {
                body: Some(&doc),
                ..*vars
            }
            .render_json(shape);
        }
        Ok(match self.to {
            BodyFormat::Json => (
                Bytes::from(serde_json::to_vec(&doc).map_err(|e| e.to_string())?),
                "application/json",
            ),
            BodyFormat::Xml => {
                let ct = match self.xml.soap.as_deref() {
                    Some("1.2") => "application/soap+xml; charset=utf-8",
                    Some(_) => "text/xml; charset=utf-8",
                    None => "application/xml; charset=utf-8",
                };
                (Bytes::from(xml::from_json(&doc, &self.xml)?), ct)
            }
        })
    }
}

/// The media type of a `Content-Type`, lower case, without parameters.
pub(crate) fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// What a body transform does with one body.
enum Plan {
    /// Read and rewrite it.
    Transform,
    /// Leave it (an empty body without `shape`).
    Skip,
    /// Encoded (`Content-Encoding`): it cannot be read, so it is refused (415 for a
    /// request, 502 for a response) rather than let past the rewrite.
    Encoded,
    /// Not of the format the transform reads: refused for a request (a client must not slip
    /// past the rewrite by mislabelling its body); passed for a response.
    OtherType(&'static str),
}

/// Whether a `Content-Type` is of `format`.
pub(crate) fn is_format(content_type: &str, format: BodyFormat) -> bool {
    let media = media_type(content_type);
    match format {
        BodyFormat::Json => media == "application/json" || media.ends_with("+json"),
        BodyFormat::Xml => {
            media == "application/xml" || media == "text/xml" || media.ends_with("+xml")
        }
    }
}

/// Headers that describe the old bytes, removed when a body is rewritten.
const STALE_BODY_HEADERS: [&str; 5] = [
    "content-md5",
    "digest",
    "content-digest",
    "repr-digest",
    "etag",
];

/// Fixes the headers of a rewritten body: its length, its type when it changed.
fn rewrote_body(headers: &mut HeaderMap, len: usize, content_type: Option<&'static str>) {
    for h in STALE_BODY_HEADERS {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
}

/// A compiled `request_transform`.
pub struct RequestTransform {
    method: Option<Method>,
    path: Option<Template>,
    headers: HeaderOps,
    query: FieldOps,
    query_values: Vec<Template>,
    body: Option<BodyOps>,
}

impl RequestTransform {
    /// Compiles `cfg` (checked when it was parsed; errors name the field).
    pub fn new(cfg: &RequestTransformConfig) -> Result<Self, (String, String)> {
        let scope = Scope::default();
        let method = cfg
            .method
            .as_deref()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| ("method".to_owned(), format!("`{m}` is not a method")))
            })
            .transpose()?;
        let path = cfg
            .path
            .as_deref()
            .map(|p| Template::parse(p, scope).map_err(|e| ("path".to_owned(), e)))
            .transpose()?;
        let headers =
            HeaderOps::new(&cfg.headers, scope).map_err(|(_, e)| ("headers".to_owned(), e))?;
        let query_values = cfg
            .query
            .set
            .values()
            .chain(cfg.query.add.values())
            .map(|v| Template::parse(v, scope).map_err(|e| ("query".to_owned(), e)))
            .collect::<Result<_, _>>()?;
        let body = cfg
            .body
            .as_ref()
            .map(|b| BodyOps::new(b, false))
            .transpose()?;
        Ok(Self {
            method,
            path,
            headers,
            query: cfg.query.clone(),
            query_values,
            body,
        })
    }

    /// Whether the query is rewritten.
    fn rewrites_query(&self) -> bool {
        !self.query.is_empty()
    }

    /// Applies the transform to the request about to go upstream: `parts` (method, query,
    /// headers), the path sent upstream, and the body.
    pub async fn apply(
        &self,
        parts: &mut Parts,
        forward_path: &mut String,
        body: ReqBody,
        caller: &template::Caller<'_>,
        read: &BodyRead,
    ) -> Result<ReqBody, GatewayError> {
        let failed = |e: String| GatewayError::new(ErrorKind::RequestTransformFailed, e);
        // Everything is computed from the request as the client sent it, then applied.
        let mut body = body;
        let mut new_body = None;
        let (values, path, query) = {
            let vars = caller.vars(parts);
            if let Some(ops) = &self.body {
                match ops.plan(&parts.headers, body.is_empty()) {
                    Plan::Skip => {}
                    Plan::Encoded => {
                        return Err(GatewayError::new(
                            ErrorKind::UnsupportedMediaType,
                            "an encoded body cannot be transformed",
                        ));
                    }
                    Plan::OtherType(why) => {
                        return Err(GatewayError::new(ErrorKind::UnsupportedMediaType, why));
                    }
                    Plan::Transform => {
                        let bound = ops.max_bytes.min(read.limit);
                        let bytes = crate::policy::inspect::read_whole(
                            body,
                            bound,
                            parts,
                            read,
                            "the request transform reads",
                        )
                        .await?;
                        if bytes.is_empty() && ops.shape.is_none() {
                            body = ReqBody::Buffered(bytes);
                        } else {
                            new_body = Some(ops.run(&bytes, &vars).map_err(failed)?);
                            body = ReqBody::Buffered(Bytes::new());
                        }
                    }
                }
            }
            let values = self
                .headers
                .render(&vars)
                .into_iter()
                .map(|v| v.map(Some))
                .collect::<Result<Vec<_>, _>>()
                .map_err(failed)?;
            let path = self
                .path
                .as_ref()
                .map(|t| vars.render(t, template::path_segment));
            let query = self
                .rewrites_query()
                .then(|| self.query(parts.uri.query(), &vars));
            (values, path, query)
        };

        if let Some(m) = &self.method {
            parts.method = m.clone();
        }
        if let Some(p) = path {
            // A value must not climb out of the prefix the template gives it.
            if template::has_dot_segment(&p) {
                return Err(failed(
                    "the rewritten path has a `.` or `..` segment".into(),
                ));
            }
            *forward_path = p;
        }
        if let Some(q) = query {
            let pq = if q.is_empty() {
                parts.uri.path().to_owned()
            } else {
                format!("{}?{q}", parts.uri.path())
            };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(
                pq.parse()
                    .map_err(|_| failed("the rewritten query is not valid".into()))?,
            );
            parts.uri = http::Uri::from_parts(uri)
                .map_err(|_| failed("the rewritten query is not valid".into()))?;
        }
        self.headers.unlist_from_connection(&mut parts.headers);
        self.headers.apply(&mut parts.headers, values);
        if let Some((bytes, ct)) = new_body {
            unlist(
                &mut parts.headers,
                &[header::CONTENT_TYPE, header::CONTENT_LENGTH],
            );
            rewrote_body(&mut parts.headers, bytes.len(), Some(ct));
            body = ReqBody::Buffered(bytes);
        }
        Ok(body)
    }

    /// The rewritten query. Parameters the operations do not touch keep their bytes as the
    /// client sent them (escapes, bare flags, non-UTF-8 values); names are matched decoded.
    fn query(&self, query: Option<&str>, vars: &Vars<'_>) -> String {
        let q = &self.query;
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or("")
            .split('&')
            .filter(|raw| !raw.is_empty())
            .map(|raw| {
                let raw_name = raw.split('=').next().unwrap_or("");
                let name = form_urlencoded::parse(raw_name.as_bytes())
                    .next()
                    .map(|(n, _)| n.into_owned())
                    .unwrap_or_default();
                (name, raw.to_owned())
            })
            .collect();
        pairs.retain(|(n, _)| !q.remove.contains(n));
        for (from, to) in &q.rename {
            if pairs.iter().any(|(n, _)| n == from) {
                pairs.retain(|(n, _)| n != to);
                for (n, raw) in pairs.iter_mut().filter(|(n, _)| n == from) {
                    let value = raw.split_once('=').map(|(_, v)| v);
                    *raw = match value {
                        Some(v) => format!("{}={v}", encode(to)),
                        None => encode(to),
                    };
                    n.clone_from(to);
                }
            }
        }
        let mut values = self
            .query_values
            .iter()
            .map(|t| vars.render(t, template::plain));
        for name in q.set.keys() {
            let v = values.next().unwrap_or_default();
            pairs.retain(|(n, _)| n != name);
            pairs.push((name.clone(), format!("{}={}", encode(name), encode(&v))));
        }
        for name in q.add.keys() {
            let v = values.next().unwrap_or_default();
            pairs.push((name.clone(), format!("{}={}", encode(name), encode(&v))));
        }
        pairs
            .into_iter()
            .map(|(_, raw)| raw)
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// How a body may be read.
pub struct BodyRead {
    /// The route's own body limit.
    pub limit: u64,
    /// Longest pause between chunks.
    pub idle: Duration,
    /// The whole read (zero: none).
    pub total: Duration,
    /// Counts the bytes read, when the call is observed.
    pub counted: Option<crate::reqbody::BytesIn>,
}

/// A compiled `response_transform`.
pub struct ResponseTransform {
    status: Vec<(u16, StatusCode)>,
    headers: HeaderOps,
    body: Option<BodyOps>,
}

impl ResponseTransform {
    /// Compiles `cfg`.
    pub fn new(cfg: &ResponseTransformConfig) -> Result<Self, (String, String)> {
        let scope = Scope {
            response: true,
            body: false,
        };
        let status = cfg
            .status
            .iter()
            .map(|(from, to)| {
                StatusCode::from_u16(*to)
                    .map(|s| (*from, s))
                    .map_err(|_| (format!("status.{from}"), format!("{to} is not a status")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            status,
            headers: HeaderOps::new(&cfg.headers, scope)
                .map_err(|(_, e)| ("headers".to_owned(), e))?,
            body: cfg
                .body
                .as_ref()
                .map(|b| BodyOps::new(b, true))
                .transpose()?,
        })
    }

    /// Whether the upstream must answer unencoded (a body transform reads it).
    pub fn reads_body(&self) -> bool {
        self.body.is_some()
    }

    /// Applies the transform to an answer.
    pub async fn apply(
        &self,
        resp: Response<ProxyBody>,
        vars: &Vars<'_>,
        head: bool,
        idle: Duration,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let (mut parts, mut body) = resp.into_parts();
        let upstream_status = parts.status.as_u16();
        let mut new_body = None;
        {
            let vars = Vars {
                response: Some((upstream_status, &parts.headers)),
                ..*vars
            };
            let declared_empty = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
            let plan = match &self.body {
                Some(ops) if !head && !matches!(upstream_status, 100..=199 | 204 | 304) => {
                    Some((ops, ops.plan(&parts.headers, declared_empty)))
                }
                _ => None,
            };
            match plan {
                Some((_, Plan::Encoded)) => {
                    return Err(GatewayError::new(
                        ErrorKind::ResponseTransformFailed,
                        "the upstream encoded a body the transform must read",
                    ));
                }
                Some((ops, Plan::Transform)) => {
                    let bytes = read_response(&mut body, ops.max_bytes, idle).await?;
                    if bytes.is_empty() && ops.shape.is_none() {
                        body = crate::body::empty();
                    } else {
                        let out = ops.run(&bytes, &vars).map_err(|e| {
                            GatewayError::new(ErrorKind::ResponseTransformFailed, e)
                        })?;
                        new_body = Some(out);
                    }
                }
                Some((_, Plan::Skip | Plan::OtherType(_))) | None => {}
            }
            // A value the client's input made invalid (a control character in a query
            // parameter) drops that header: the upstream has answered, the answer stands.
            let values = self
                .headers
                .render(&vars)
                .into_iter()
                .map(|v| {
                    v.map_err(
                        |e| tracing::warn!(target: "turnpike::transform", "{e}; header not set"),
                    )
                    .ok()
                })
                .collect();
            self.headers.apply(&mut parts.headers, values);
        }
        if let Some((_, to)) = self
            .status
            .iter()
            .find(|(from, _)| *from == upstream_status)
        {
            parts.status = *to;
        }
        if let Some((bytes, ct)) = new_body {
            rewrote_body(&mut parts.headers, bytes.len(), Some(ct));
            body = crate::body::full(bytes);
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Reads a response body whole, up to `max` bytes.
pub(crate) async fn read_response(
    body: &mut ProxyBody,
    max: u64,
    idle: Duration,
) -> Result<Bytes, GatewayError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    "the upstream stopped sending its response body",
                ));
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => {
                return Err(GatewayError::new(
                    ErrorKind::UpstreamError,
                    "the upstream response body could not be read",
                ));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > max {
                return Err(GatewayError::new(
                    ErrorKind::ResponseTooLarge,
                    format!(
                        "the upstream response body exceeds the {max} bytes the transform reads"
                    ),
                ));
            }
        }
    }
}

/// Masks an answer's body (`data_masking`): read whole within the policy's bound, since a
/// value can straddle chunks. Fails closed: a body too large to mask, or encoded so it
/// cannot be read, is refused rather than sent unmasked.
async fn mask(
    r: &turnpike_observe::redact::Redactor,
    resp: Response<ProxyBody>,
    head: bool,
    idle: Duration,
) -> Result<Response<ProxyBody>, GatewayError> {
    let status = resp.status().as_u16();
    // No `Content-Type` is masked as text: an API that leaves it out is not exempt.
    let media = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| media_type(v.to_str().unwrap_or("")));
    if media.as_deref().is_some_and(|m| r.treats(m).is_none()) {
        return Ok(resp);
    }
    if head || matches!(status, 100..=199 | 204 | 304) {
        return Ok(resp);
    }
    if resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(GatewayError::new(
            ErrorKind::ResponseTransformFailed,
            "the upstream encoded a body that must be masked",
        ));
    }
    let (mut parts, mut body) = resp.into_parts();
    let bytes = read_response(&mut body, r.max_bytes, idle).await?;
    let masked = match r.redact_body(media.as_deref(), &bytes) {
        Ok(Some(m)) => m,
        Ok(None) => bytes.to_vec(),
        Err(e) => return Err(GatewayError::new(ErrorKind::ResponseTransformFailed, e)),
    };
    rewrote_body(&mut parts.headers, masked.len(), None);
    Ok(Response::from_parts(parts, crate::body::full(masked)))
}

/// What shapes the answers of one request: the route's response transform and compression,
/// with what they need of the request, captured before it goes upstream.
pub struct Shaper {
    response: Option<(Arc<crate::policy::Compiled>, OwnedVars)>,
    masking: Option<Arc<turnpike_observe::redact::Redactor>>,
    compression: Option<(Arc<crate::policy::Compiled>, Option<HeaderValue>)>,
    method: Method,
    idle: Duration,
}

/// An owned copy of what templates read of the request.
pub struct OwnedVars {
    request_id: String,
    client_ip: std::net::IpAddr,
    method: String,
    path: String,
    route: String,
    consumer: Option<Arc<turnpike_model::managed::Consumer>>,
    claims: Option<serde_json::Map<String, Value>>,
    params: Vec<(String, String)>,
    headers: HeaderMap,
    query: Option<String>,
}

impl OwnedVars {
    /// Copies `vars`.
    pub fn of(vars: &Vars<'_>, consumer: Option<Arc<turnpike_model::managed::Consumer>>) -> Self {
        Self {
            request_id: vars.request_id.to_owned(),
            client_ip: vars.client_ip,
            method: vars.method.to_owned(),
            path: vars.path.to_owned(),
            route: vars.route.to_owned(),
            consumer,
            claims: vars.claims.cloned(),
            params: vars.params.to_vec(),
            headers: vars.headers.clone(),
            query: vars.query.map(str::to_owned),
        }
    }

    fn vars(&self) -> Vars<'_> {
        Vars {
            request_id: &self.request_id,
            client_ip: self.client_ip,
            method: &self.method,
            path: &self.path,
            route: &self.route,
            consumer: self.consumer.as_deref(),
            claims: self.claims.as_ref(),
            params: &self.params,
            headers: &self.headers,
            query: self.query.as_deref(),
            response: None,
            body: None,
        }
    }
}

impl Shaper {
    /// The shaper of a request on a route whose upstream chain is `up`; `None` when the
    /// route has neither a response transform nor compression.
    pub fn new(
        up: &crate::policy::UpstreamChain,
        vars: &Vars<'_>,
        consumer: Option<&Arc<turnpike_model::managed::Consumer>>,
        method: &Method,
        idle: Duration,
    ) -> Option<Self> {
        if up.response_transform.is_none() && up.compression.is_none() && up.masking.is_none() {
            return None;
        }
        Some(Self {
            response: up
                .response_transform
                .clone()
                .map(|c| (c, OwnedVars::of(vars, consumer.cloned()))),
            masking: up.masking().cloned(),
            compression: up
                .compression
                .clone()
                .map(|c| (c, vars.headers.get(header::ACCEPT_ENCODING).cloned())),
            method: method.clone(),
            idle,
        })
    }

    /// Shapes one answer.
    pub async fn apply(
        &self,
        mut resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        if let Some((c, vars)) = &self.response
            && let crate::policy::Policy::ResponseTransform(t) = &c.policy
        {
            resp = t
                .apply(resp, &vars.vars(), self.method == Method::HEAD, self.idle)
                .await?;
        }
        if let Some(r) = &self.masking {
            resp = mask(r, resp, self.method == Method::HEAD, self.idle).await?;
        }
        if let Some((c, accept)) = &self.compression
            && let crate::policy::Policy::Compression(z) = &c.policy
        {
            resp = z.apply(resp, accept.as_ref(), &self.method);
        }
        Ok(resp)
    }
}
