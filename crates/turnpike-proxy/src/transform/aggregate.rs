//! `aggregate`: a composite route that answers itself from several upstream calls made
//! concurrently, their paths, headers and bodies templated from the client's request, their
//! JSON answers merged under keys or deep-merged, or reported one by one (fan-out writes).
//!
//! Each call has its own timeout (answer body included) and is required or optional. A
//! required call that fails (no answer, a timeout, a 4xx/5xx status) fails the whole answer
//! with 502 `aggregate_failed` naming it; an optional one is left out, and the answer says so
//! in the body (`_partial`) and in `X-Partial-Response`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Map, Value, json};
use turnpike_model::policy::{AggregateConfig, MergeMode, Scope, Template};

use super::template::{self, JsonTemplate, Vars};
use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError};

/// The header that lists the optional calls left out of an answer.
pub static PARTIAL: HeaderName = HeaderName::from_static("x-partial-response");

/// A compiled `aggregate` policy.
pub struct Aggregate {
    calls: Vec<Call>,
    merge: MergeMode,
    /// Largest answer body read from one call, and largest client body read for templates.
    pub max_bytes: u64,
}

struct Call {
    name: String,
    upstream: String,
    method: Option<Method>,
    path: Template,
    headers: Vec<(HeaderName, Template)>,
    body: Option<JsonTemplate>,
    timeout: Duration,
    required: bool,
}

/// A call ready to send: everything rendered from the client's request.
pub struct Prepared<'a> {
    /// The call's name.
    pub name: &'a str,
    /// The upstream pool.
    pub upstream: &'a str,
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path_and_query: String,
    /// Headers (the gateway adds its forwarding and identity headers).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Timeout.
    pub timeout: Duration,
    required: bool,
}

/// What one call brought back.
pub enum Outcome {
    /// An answer: its status and body (JSON when it parses, else text).
    Answer(StatusCode, Value),
    /// No usable answer.
    Failed(GatewayError),
}

impl Aggregate {
    /// Compiles `cfg` (checked when it was parsed).
    pub fn new(cfg: &AggregateConfig) -> Result<Self, (String, String)> {
        let calls = cfg
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let at = |f: &str| format!("calls[{i}].{f}");
                Ok(Call {
                    name: c.name.clone(),
                    upstream: c.upstream.clone(),
                    method: c
                        .method
                        .as_deref()
                        .map(|m| Method::from_bytes(m.as_bytes()))
                        .transpose()
                        .map_err(|_| (at("method"), "not a method".to_owned()))?,
                    path: Template::parse(&c.path, Scope::default())
                        .map_err(|e| (at("path"), e))?,
                    headers: c
                        .headers
                        .iter()
                        .map(|(n, v)| {
                            Ok((
                                HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                                    (at("headers"), format!("`{n}` is not a header name"))
                                })?,
                                Template::parse(v, Scope::default())
                                    .map_err(|e| (at("headers"), e))?,
                            ))
                        })
                        .collect::<Result<_, (String, String)>>()?,
                    body: c
                        .body
                        .as_ref()
                        .map(|b| {
                            JsonTemplate::compile(
                                b,
                                Scope {
                                    response: false,
                                    body: true,
                                },
                            )
                            .map_err(|e| (at("body"), e))
                        })
                        .transpose()?,
                    timeout: c.timeout,
                    required: c.required,
                })
            })
            .collect::<Result<_, (String, String)>>()?;
        Ok(Self {
            calls,
            merge: cfg.merge,
            max_bytes: cfg.max_bytes,
        })
    }

    /// Whether a call has a body (the client's JSON body is then read for its templates).
    pub fn has_bodies(&self) -> bool {
        self.calls.iter().any(|c| c.body.is_some())
    }

    /// Renders every call from the client's request.
    pub fn prepare<'a>(&'a self, vars: &Vars<'_>) -> Result<Vec<Prepared<'a>>, GatewayError> {
        let failed = |e: String| GatewayError::new(ErrorKind::RequestTransformFailed, e);
        self.calls
            .iter()
            .map(|c| {
                let pq = vars.render_url(&c.path);
                if template::has_dot_segment(pq.split('?').next().unwrap_or("")) {
                    return Err(failed(format!(
                        "the path of call `{}` has a `.` or `..` segment",
                        c.name
                    )));
                }
                let mut headers = HeaderMap::new();
                for (n, t) in &c.headers {
                    let v =
                        HeaderValue::try_from(vars.render(t, template::plain)).map_err(|_| {
                            failed(format!(
                                "header `{n}` of call `{}` is not a valid value",
                                c.name
                            ))
                        })?;
                    headers.insert(n.clone(), v);
                }
                headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
                let body = match &c.body {
                    Some(t) => {
                        headers.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        Bytes::from(vars.render_json(t).to_string())
                    }
                    None => Bytes::new(),
                };
                Ok(Prepared {
                    name: &c.name,
                    upstream: &c.upstream,
                    // A composite is a read unless a call says otherwise: the client's method
                    // (a DELETE) must not fan out to every upstream.
                    method: c.method.clone().unwrap_or(Method::GET),
                    path_and_query: pq,
                    headers,
                    body,
                    timeout: c.timeout,
                    required: c.required,
                })
            })
            .collect()
    }

    /// Reads a call's answer (within the call's deadline, which the caller enforces).
    pub async fn read(&self, resp: Response<ProxyBody>, idle: Duration) -> Outcome {
        let (parts, mut body) = resp.into_parts();
        let bytes = match super::read_response(&mut body, self.max_bytes, idle).await {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Outcome::Answer(parts.status, value)
    }

    /// Combines the calls' outcomes (in call order) into the route's answer.
    pub fn merge(
        &self,
        prepared: &[Prepared<'_>],
        outcomes: Vec<Outcome>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        if self.merge == MergeMode::Statuses {
            return Ok(statuses(prepared, outcomes));
        }
        let mut merged = Value::Object(Map::new());
        let mut missing: Vec<(&str, Value)> = Vec::new();
        for (p, outcome) in prepared.iter().zip(outcomes) {
            let why = match outcome {
                Outcome::Answer(status, value) if status.is_success() => {
                    match self.merge {
                        MergeMode::Deep => deep_merge(&mut merged, value),
                        _ => {
                            if let Value::Object(m) = &mut merged {
                                m.insert(p.name.to_owned(), value);
                            }
                        }
                    }
                    continue;
                }
                Outcome::Answer(status, _) => json!({
                    "code": "upstream_status",
                    "message": format!("the upstream answered {}", status.as_u16()),
                    "status": status.as_u16(),
                }),
                Outcome::Failed(e) => json!({"code": e.kind.code(), "message": e.message}),
            };
            if p.required {
                return Err(GatewayError::new(
                    ErrorKind::AggregateFailed,
                    format!(
                        "required call `{}` failed: {}",
                        p.name,
                        why["message"].as_str().unwrap_or("")
                    ),
                ));
            }
            missing.push((p.name, why));
        }
        let mut resp_headers = HeaderMap::new();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
            if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
                resp_headers.insert(PARTIAL.clone(), v);
            }
            if let Value::Object(m) = &mut merged {
                if self.merge == MergeMode::Keys {
                    for n in &names {
                        m.insert((*n).to_owned(), Value::Null);
                    }
                }
                m.insert(
                    "_partial".into(),
                    Value::Object(
                        missing
                            .into_iter()
                            .map(|(n, why)| (n.to_owned(), why))
                            .collect(),
                    ),
                );
            }
        }
        let mut resp = json_response(StatusCode::OK, &merged);
        resp.headers_mut().extend(resp_headers);
        Ok(resp)
    }
}

/// Fan-out: every call's status and body; 200 when all succeeded, 502 when none did, 207
/// (Multi-Status) otherwise.
fn statuses(prepared: &[Prepared<'_>], outcomes: Vec<Outcome>) -> Response<ProxyBody> {
    let mut results = Map::new();
    let (mut ok, mut failed) = (0, 0);
    for (p, outcome) in prepared.iter().zip(outcomes) {
        let entry = match outcome {
            Outcome::Answer(status, body) => {
                if status.is_success() {
                    ok += 1;
                } else {
                    failed += 1;
                }
                json!({"status": status.as_u16(), "body": body})
            }
            Outcome::Failed(e) => {
                failed += 1;
                json!({"status": e.kind.status().as_u16(), "error": {"code": e.kind.code(), "message": e.message}})
            }
        };
        results.insert(p.name.to_owned(), entry);
    }
    let status = match (ok, failed) {
        (_, 0) => StatusCode::OK,
        (0, _) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::MULTI_STATUS,
    };
    json_response(status, &json!({ "results": results }))
}

fn json_response(status: StatusCode, v: &Value) -> Response<ProxyBody> {
    let mut r = Response::new(crate::body::full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Merges `b` into `a`: objects member by member, recursively; anything else replaces.
pub fn deep_merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_merge_objects_and_replaces_the_rest() {
        let mut a = json!({"user": {"id": 1, "name": "Ada"}, "tags": [1], "n": 1});
        deep_merge(
            &mut a,
            json!({"user": {"name": "Ada L.", "email": "a@x"}, "tags": [2], "m": 2}),
        );
        assert_eq!(
            a,
            json!({"user": {"id": 1, "name": "Ada L.", "email": "a@x"}, "tags": [2], "n": 1, "m": 2})
        );
    }
}
