//! Router construction from the endpoint table, the request context (request id, error
//! rendering, panic guard), and request parsing: path parameters, query, body.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use turnpike_store::MAX_LIMIT;

use crate::AdminState;
use crate::auth::{self, Caller};
use crate::endpoints::{BodySpec, ENDPOINTS, Endpoint, Op};
use crate::error::{AdminError, AdminResult, ErrorBody};
use crate::{account, actions, objects, openapi};

const REQUEST_ID: &str = "x-request-id";

/// Builds the router from [`ENDPOINTS`]: one method router per path, with a JSON 405 for other
/// methods, and a JSON 404 fallback for unknown paths.
pub(crate) fn build_router(state: AdminState) -> Router {
    let mut paths: Vec<(&str, Vec<&'static Endpoint>)> = Vec::new();
    for ep in ENDPOINTS.iter() {
        match paths.iter_mut().find(|(p, _)| *p == ep.path) {
            Some((_, eps)) => eps.push(ep),
            None => paths.push((ep.path.as_str(), vec![ep])),
        }
    }
    let mut router: Router<AdminState> = Router::new();
    for (path, eps) in paths {
        let allow = eps
            .iter()
            .map(|ep| ep.method.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut methods: MethodRouter<AdminState> = MethodRouter::new();
        for ep in eps {
            let Ok(filter) = MethodFilter::try_from(ep.method.clone()) else {
                continue;
            };
            methods = methods.on(
                filter,
                move |State(state): State<AdminState>, req: Request| handle(state, ep, req),
            );
        }
        let allow_for_fallback = allow.clone();
        methods = methods.fallback(move |req: Request| {
            let allow = allow_for_fallback.clone();
            async move { AdminError::method_not_allowed(req.method().as_str(), allow) }
        });
        router = router.route(path, methods);
    }
    router
        .fallback(|req: Request| async move { AdminError::route_not_found(req.uri().path()) })
        .with_state(state)
        .layer(middleware::from_fn(request_context))
}

/// Assigns the request id, renders error bodies with it, and turns a panic into a JSON 500
/// (a bug must cost one request, never the connection or an HTML page).
async fn request_context(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let mut response = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(response) => response,
        Err(_) => AdminError::internal("a handler panicked").into_response(),
    };
    if let Some(error) = response.extensions_mut().remove::<ErrorBody>() {
        let mut body = json!({ "code": error.code, "message": error.message, "request_id": id });
        if let Some(field) = error.field {
            body["field"] = Value::String(field);
        }
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        response = (status, axum::Json(json!({ "error": body }))).into_response();
        for (name, value) in &headers {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                response.headers_mut().insert(name, value.clone());
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Everything a handler needs, parsed and checked.
pub(crate) struct Ctx {
    /// Shared state.
    pub state: AdminState,
    /// The endpoint being served.
    pub ep: &'static Endpoint,
    /// Percent-decoded path parameters.
    pub params: HashMap<String, String>,
    /// Query parameters (the last of repeated ones wins).
    pub query: HashMap<String, String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// The JSON body, when the endpoint takes one and one was sent.
    pub body: Option<Value>,
    /// The authenticated caller (`None` only on endpoints without auth).
    pub caller: Option<Caller>,
}

impl Ctx {
    /// A path parameter; the router guarantees the endpoint's own parameters are present.
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map_or("", String::as_str)
    }

    /// The caller of an authenticated endpoint.
    pub fn caller(&self) -> AdminResult<&Caller> {
        self.caller
            .as_ref()
            .ok_or_else(|| AdminError::unauthorized("a bearer token is required"))
    }

    /// The body of an endpoint whose body is required. Checked here rather than when read,
    /// so that access checks (404, 403) come first.
    pub fn body(&self) -> AdminResult<Value> {
        let body = self
            .body
            .clone()
            .ok_or_else(|| AdminError::bad_request("a JSON request body is required"))?;
        crate::util::reject_nul(&body)?;
        Ok(body)
    }

    /// The store.
    pub fn store(&self) -> &turnpike_store::Store {
        &self.state.inner.store
    }

    /// Bounds on analytics queries.
    pub fn analytics_limits(&self) -> turnpike_model::observe::analytics::AnalyticsQueryLimits {
        self.state.inner.analytics_limits
    }

    /// Bounds on a call-log search page.
    pub fn call_log_search(&self) -> turnpike_model::observe::CallLogSearchLimits {
        self.state.inner.call_log_search
    }

    /// A query parameter.
    pub fn query_text(&self, name: &str) -> Option<String> {
        self.query.get(name).cloned()
    }

    /// A query parameter used as a store filter. PostgreSQL cannot compare text holding NUL,
    /// and nothing stored holds one, so such a filter matches nothing: `Err(())` tells the
    /// caller to answer an empty page without asking the store.
    pub fn store_filter(&self, name: &str) -> Result<Option<String>, ()> {
        match self.query.get(name) {
            Some(v) if v.contains('\0') => Err(()),
            v => Ok(v.cloned()),
        }
    }

    /// The `cursor` query parameter. Ids hold no NUL, so an id sorts after a cursor exactly
    /// when it sorts after the cursor's part before its first NUL.
    pub fn cursor(&self) -> Option<String> {
        self.query
            .get("cursor")
            .map(|c| c.split('\0').next().unwrap_or_default().to_owned())
    }

    /// The `limit` query parameter: 1 to the store's maximum.
    pub fn limit(&self) -> AdminResult<Option<u32>> {
        match self.query.get("limit") {
            None => Ok(None),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(Some(n)),
                _ => Err(AdminError::validation(
                    "limit",
                    format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                )),
            },
        }
    }

    /// The revisions `If-Match` accepts: `None` without the header or with `*`. Tags that
    /// name no revision of ours are kept out, so a header of only those matches nothing
    /// (and the write gets 412 once the object is known to exist).
    pub fn if_match(&self) -> Option<Vec<i64>> {
        let text = self
            .headers
            .get(header::IF_MATCH)?
            .to_str()
            .unwrap_or("")
            .trim();
        // An empty header names nothing to compare with: treated as absent.
        if text == "*" || text.is_empty() {
            return None;
        }
        Some(
            text.split(',')
                .filter_map(|tag| {
                    let tag = tag.trim();
                    let tag = tag.strip_prefix("W/").unwrap_or(tag);
                    let tag = tag
                        .strip_prefix('"')
                        .and_then(|t| t.strip_suffix('"'))
                        .unwrap_or(tag);
                    tag.parse::<i64>().ok()
                })
                .collect(),
        )
    }
}

/// Turns numbers like `3.0` into integers: JSON Schema counts them as integers, serde's
/// integer fields do not.
fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                // The casts saturate; the range checks keep only exact conversions.
                if (0.0..18_446_744_073_709_551_615.0).contains(&f) {
                    *value = Value::from(f as u64);
                } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(members) => members.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

async fn handle(state: AdminState, ep: &'static Endpoint, req: Request) -> Response {
    match serve(state, ep, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve(state: AdminState, ep: &'static Endpoint, req: Request) -> AdminResult<Response> {
    let (mut parts, body) = req.into_parts();
    // A parameter that does not decode cannot name anything that exists.
    let params = Path::<HashMap<String, String>>::from_request_parts(&mut parts, &state)
        .await
        .map_err(|_| AdminError::not_found("no such object"))?
        .0;
    let query = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let caller = if ep.auth {
        Some(auth::authenticate(&state, &parts.headers).await?)
    } else {
        None
    };
    let body = match &ep.body {
        BodySpec::None => None,
        spec => {
            read_json(
                &state,
                &parts.headers,
                body,
                matches!(spec, BodySpec::MergePatch),
            )
            .await?
        }
    };
    let ctx = Ctx {
        state,
        ep,
        params,
        query,
        headers: parts.headers,
        body,
        caller,
    };
    dispatch(ctx).await
}

async fn dispatch(ctx: Ctx) -> AdminResult<Response> {
    match ctx.ep.op {
        Op::List(kind) => objects::list(&ctx, kind).await,
        Op::Create(kind) => objects::create(&ctx, kind).await,
        Op::Get(kind) => objects::get(&ctx, kind).await,
        Op::Replace(kind) => objects::replace(&ctx, kind, false).await,
        Op::Patch(kind) => objects::replace(&ctx, kind, true).await,
        Op::Delete(kind) => objects::delete(&ctx, kind).await,
        Op::Decide(to) => actions::decide(&ctx, to).await,
        Op::SubscriptionRequests => actions::subscription_requests(&ctx).await,
        Op::Transition(to) => actions::transition(&ctx, to).await,
        Op::ListReleases => actions::list_releases(&ctx).await,
        Op::GetRelease => actions::get_release(&ctx).await,
        Op::Rollback => actions::rollback(&ctx).await,
        Op::SwitchUpstream => actions::switch_upstream(&ctx).await,
        Op::ImportOpenapi => actions::import_openapi(&ctx).await,
        Op::CreateToken => account::create_token(&ctx).await,
        Op::ListTokens => account::list_tokens(&ctx).await,
        Op::RevokeToken => account::revoke_token(&ctx).await,
        Op::Me => account::me(&ctx).await,
        Op::Audit => account::audit(&ctx).await,
        Op::Catalog => account::catalog(&ctx).await,
        Op::Schema => account::schema(&ctx),
        Op::PolicyTypes => Ok(account::policy_types()),
        Op::PolicySchema => account::policy_schema(&ctx),
        Op::ApplicationUsage => crate::usage::application_usage(&ctx).await,
        Op::CallLogs => crate::calllogs::search(&ctx).await,
        Op::CallLog => crate::calllogs::get(&ctx).await,
        Op::AnalyticsTimeseries => crate::analytics::timeseries(&ctx).await,
        Op::AnalyticsTop => crate::analytics::top(&ctx).await,
        Op::AlertHistory => crate::analytics::alert_history(&ctx).await,
        Op::CachePurge => crate::cachepurge::purge(&ctx).await,
        Op::OpenApi => Ok(axum::Json(openapi::document().clone()).into_response()),
    }
}

/// After a body passes the cap, at most this much more is read and thrown away, and for at
/// most [`DRAIN_FOR`]. Closing a socket with unread input makes the kernel send RST, and a
/// client still sending would then lose the 413 it was about to read.
const DRAIN_BYTES: usize = 256 * 1024;
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Collects a body of at most `limit` bytes; past it, answers 413 once the rest of a modest
/// body has been drained.
async fn read_capped(mut body: axum::body::Body, limit: usize) -> AdminResult<bytes::Bytes> {
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(buf.freeze()),
            Some(Err(e)) => {
                return Err(AdminError::bad_request(format!(
                    "could not read the body: {e}"
                )));
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if buf.len() + data.len() > limit {
                    break;
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    let drain = async {
        let mut seen = 0usize;
        while seen <= DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    Err(AdminError::payload_too_large(limit))
}

/// Reads a JSON body up to the configured cap. An empty body is `None`.
async fn read_json(
    state: &AdminState,
    headers: &HeaderMap,
    body: axum::body::Body,
    merge_patch: bool,
) -> AdminResult<Option<Value>> {
    let limit = state.inner.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AdminError::payload_too_large(limit));
    }
    let bytes = read_capped(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let ok = essence == "application/json"
            || (merge_patch && essence == "application/merge-patch+json")
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !ok {
            return Err(AdminError::unsupported_media_type(format!(
                "expected application/json{}, got {essence:?}",
                if merge_patch {
                    " or application/merge-patch+json"
                } else {
                    ""
                }
            )));
        }
    }
    let mut value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::bad_request(format!("the body is not valid JSON: {e}")))?;
    integral_numbers(&mut value);
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_floats_become_integers() {
        let mut v = json!({ "a": 3.0, "b": [-2.0, 1.5], "c": 1e300, "d": 7 });
        integral_numbers(&mut v);
        assert_eq!(v, json!({ "a": 3, "b": [-2, 1.5], "c": 1e300, "d": 7 }));
        assert!(v["a"].is_u64() && v["b"][0].is_i64());
    }
}
