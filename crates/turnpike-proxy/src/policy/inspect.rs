//! Body inspection: the policies that need the whole request body (`waf`,
//! `request_validation`, and the `Content-Digest` check of a request `hmac_auth` verified)
//! get it buffered up to a bound, after the rest of the access phase.
//!
//! Routes without such policies keep streaming their bodies (the fast path returns the body
//! untouched). With them, the body is read up to the largest `max_body_bytes` among the
//! route's inspecting policies (never past the route's own limit), with the route's write
//! timeout between chunks; the buffered bytes then go upstream as one frame, which also
//! makes retries safe (every attempt gets the same bytes). A body past a policy's bound is
//! refused with 413 `body_too_large`, unless a `waf` with `oversize: skip_body` is the only
//! reason to read it: then what was read is sent first and the rest streams on, uninspected.
//! Request trailers are not forwarded on a buffered body.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use turnpike_model::policy::{Oversize, WafMode};

use super::hmac::BodyCheck;
use super::{Chain, Policy};
use crate::error::{ErrorKind, GatewayError};
use crate::reqbody::{BodySlot, BytesIn};

/// The request body after inspection.
pub enum ReqBody {
    /// Not read: streams upstream as it comes.
    Stream(Incoming),
    /// Read whole.
    Buffered(Bytes),
    /// Read in part (too large to inspect, inspection skipped): the part read, then the rest.
    Partial(Bytes, Incoming),
}

impl ReqBody {
    /// Whether the body is known to be empty (no `Content-Length`/`Transfer-Encoding` on
    /// HTTP/1.1; the headers frame ended the stream on HTTP/2).
    pub fn is_empty(&self) -> bool {
        use http_body::Body;
        match self {
            Self::Stream(b) => b.is_end_stream(),
            Self::Buffered(b) => b.is_empty(),
            Self::Partial(head, rest) => head.is_empty() && rest.is_end_stream(),
        }
    }

    /// The slot upstream attempts take the body from, with the route's limit and write
    /// timeout on whatever still streams.
    pub fn into_slot(self, limit: u64, idle: Duration, counted: Option<BytesIn>) -> BodySlot {
        match self {
            Self::Stream(b) => BodySlot::new(crate::reqbody::limited(b, limit, idle, counted)),
            Self::Buffered(b) => BodySlot::buffered(b),
            Self::Partial(head, rest) => BodySlot::new(crate::reqbody::limited_after(
                head, rest, limit, idle, counted,
            )),
        }
    }
}

enum Read {
    All(Bytes),
    /// More than the bound: what was read (possibly nothing, when `Content-Length` said so).
    Over(Bytes, Incoming),
}

/// What a request brings to inspection.
pub struct Target<'a> {
    /// The route's body limit (413 past it, whatever the policies say).
    pub route_limit: u64,
    /// The route's write timeout, between body chunks.
    pub idle: Duration,
    /// The route's total timeout (zero: none), which also bounds reading the whole body: a
    /// client dripping a byte per `idle` cannot hold a buffer for ever.
    pub total: Duration,
    /// The request id, for log-only findings.
    pub request_id: &'a str,
    /// The route's name, for logs.
    pub route: &'a str,
    /// The normalised path the route matched.
    pub path: &'a str,
    /// Counts the bytes read, when the call is observed.
    pub counted: Option<&'a BytesIn>,
}

/// Runs the route's inspecting policies; see the module docs.
pub async fn run(
    chain: &Chain,
    parts: &Parts,
    body: Incoming,
    body_check: Option<&BodyCheck>,
    t: &Target<'_>,
) -> Result<ReqBody, GatewayError> {
    if chain.inspection.is_empty() && body_check.is_none() {
        return Ok(ReqBody::Stream(body));
    }
    // The bound: the largest of the inspecting policies' (each checks its own below).
    let mut bound: Option<u64> = body_check.map(BodyCheck::bound);
    for c in &chain.inspection {
        let need = match &c.policy {
            Policy::Waf(w) if w.needs_body() => Some(w.config.max_body_bytes),
            Policy::RequestValidation(v) => v.body_bound(),
            _ => None,
        };
        if let Some(n) = need {
            bound = Some(bound.map_or(n, |b| b.max(n)));
        }
    }
    let read = match bound {
        Some(b) if !http_body::Body::is_end_stream(&body) => {
            let read = read_bounded(
                body,
                b.min(t.route_limit),
                &parts.headers,
                t.idle,
                t.counted,
            );
            if t.total.is_zero() {
                read.await?
            } else {
                tokio::time::timeout(t.total, read).await.map_err(|_| {
                    GatewayError::new(
                        ErrorKind::ClientTimeout,
                        "the request body took longer than the route's total timeout",
                    )
                })??
            }
        }
        Some(_) => Read::All(Bytes::new()),
        None => Read::Over(Bytes::new(), body),
    };
    let (bytes, over) = match &read {
        Read::All(b) => (Some(b), false),
        Read::Over(..) => (None, true),
    };
    let len = bytes.map_or(u64::MAX, |b| b.len() as u64);
    if over && bound.is_some_and(|b| b >= t.route_limit) {
        return Err(too_large(t.route_limit, "the route accepts"));
    }
    // The body's integrity first: the other policies would judge bytes nobody signed.
    if let Some(check) = body_check {
        match bytes {
            Some(b) => check.verify(b)?,
            None => return Err(check.over_bound()),
        }
    }
    for c in &chain.inspection {
        match &c.policy {
            Policy::Waf(w) => {
                let fits = len <= w.config.max_body_bytes;
                if w.needs_body() && !fits && w.config.oversize == Oversize::Block {
                    return Err(too_large(w.config.max_body_bytes, "the WAF inspects"));
                }
                let body = bytes.filter(|_| fits);
                let verdict = w.inspect(
                    parts.uri.path(),
                    t.path,
                    parts.uri.query(),
                    &parts.headers,
                    body,
                );
                match verdict {
                    super::waf::Verdict::Clean => {}
                    super::waf::Verdict::TooManyArgs => {
                        if w.config.mode == WafMode::Block {
                            return Err(GatewayError::new(
                                ErrorKind::WafBlocked,
                                format!(
                                    "request blocked by the WAF: more than {} values to inspect",
                                    w.config.max_args
                                ),
                            ));
                        }
                        tracing::warn!(target: "turnpike::waf", policy = %c.name, route = t.route, request_id = t.request_id, "too many values to inspect (log only)");
                    }
                    super::waf::Verdict::Matched(findings) => match w.config.mode {
                        WafMode::Block => {
                            if let Some(f) = findings.first() {
                                tracing::info!(target: "turnpike::waf", policy = %c.name, route = t.route, request_id = t.request_id, rule = f.rule, location = %f.location, "request blocked");
                                return Err(super::waf::Waf::blocked(f));
                            }
                        }
                        WafMode::LogOnly => {
                            for f in &findings {
                                tracing::warn!(target: "turnpike::waf", policy = %c.name, route = t.route, request_id = t.request_id, rule = f.rule, location = %f.location, "WAF rule matched (log only)");
                            }
                        }
                    },
                }
            }
            Policy::RequestValidation(v) => {
                if let Some(max) = v.body_bound()
                    && len > max
                {
                    return Err(too_large(max, "request validation reads"));
                }
                v.validate(parts, t.path, bytes.map_or(&[][..], |b| &b[..]))?;
            }
            _ => {
                return Err(GatewayError::new(
                    ErrorKind::Internal,
                    "policy chain out of order",
                ));
            }
        }
    }
    Ok(match read {
        Read::All(b) => ReqBody::Buffered(b),
        Read::Over(head, rest) => ReqBody::Partial(head, rest),
    })
}

/// Reads the whole body, up to `bound` bytes (413 past it), for a transformation that
/// rewrites it, with `read`'s timeouts and byte counter; `what` names the reader in the 413
/// message (`the request transform reads`).
pub(crate) async fn read_whole(
    body: ReqBody,
    bound: u64,
    parts: &Parts,
    read: &crate::transform::BodyRead,
    what: &str,
) -> Result<Bytes, GatewayError> {
    let (head, incoming) = match body {
        ReqBody::Buffered(b) if b.len() as u64 > bound => return Err(too_large(bound, what)),
        ReqBody::Buffered(b) => return Ok(b),
        // What an inspection read (or skipped), then the rest.
        ReqBody::Partial(head, rest) => (head, rest),
        ReqBody::Stream(b) if http_body::Body::is_end_stream(&b) => return Ok(Bytes::new()),
        ReqBody::Stream(b) => (Bytes::new(), b),
    };
    if head.len() as u64 > bound || content_length(&parts.headers).is_some_and(|n| n > bound) {
        return Err(too_large(bound, what));
    }
    let rest_bound = bound - head.len() as u64;
    // The declared length was checked against the whole bound above.
    let no_length = http::HeaderMap::new();
    let total = read.total;
    let read = read_bounded(
        incoming,
        rest_bound,
        &no_length,
        read.idle,
        read.counted.as_ref(),
    );
    let read = if total.is_zero() {
        read.await?
    } else {
        tokio::time::timeout(total, read).await.map_err(|_| {
            GatewayError::new(
                ErrorKind::ClientTimeout,
                "the request body took longer than the route's total timeout",
            )
        })??
    };
    match read {
        Read::All(b) if head.is_empty() => Ok(b),
        Read::All(b) => Ok([head, b].concat().into()),
        Read::Over(..) => Err(too_large(bound, what)),
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large(max: u64, what: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::BodyTooLarge,
        format!("request body exceeds the {max} bytes {what}"),
    )
}

/// Reads `body` until its end or past `bound` bytes, waiting at most `idle` for each chunk.
async fn read_bounded(
    mut body: Incoming,
    bound: u64,
    headers: &http::HeaderMap,
    idle: Duration,
    counted: Option<&BytesIn>,
) -> Result<Read, GatewayError> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > bound) {
        return Ok(Read::Over(Bytes::new(), body));
    }
    let cap = usize::try_from(declared.unwrap_or(0).min(bound)).unwrap_or(0);
    let mut buf = BytesMut::with_capacity(cap);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::ClientTimeout,
                    "client stopped sending the request body",
                ));
            }
            Ok(None) => return Ok(Read::All(buf.freeze())),
            Ok(Some(Err(_))) => {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "the request body could not be read",
                ));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if let Some(c) = counted {
                c.add(data.len());
            }
            buf.extend_from_slice(&data);
            if buf.len() as u64 > bound {
                return Ok(Read::Over(buf.freeze(), body));
            }
        }
    }
}
