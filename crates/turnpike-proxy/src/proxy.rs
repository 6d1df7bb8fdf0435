//! The request pipeline: one function per phase, run in order for every request.
//!
//! Phases (DESIGN.md §2), as implemented today:
//! 1. `accept` — done by the listener; gives us the peer address and whether TLS was used.
//! 2. `route` — request id, URI limit, path normalisation, route match (404 / 405).
//! 3. `access` — body size limit (policies plug in here later).
//! 4. `upstream_request` — forwarding headers, target choice, timeouts, retries.
//! 5. `upstream_response` — hop-by-hop removal, `Via`, streamed body with idle timeout,
//!    WebSocket tunnel after a 101.
//! 6. `log` — one event per request, whatever happened before.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access::{self, Access};
use crate::body::{self, ProxyBody};
use crate::error::{ErrorKind, GatewayError, error_response};
use crate::reqbody::{BodyIdleTimeout, BodySlot, IdleTimeoutBody, UpstreamBodyTimeout};
use crate::router::{RequestView, RouteResult, normalize_path};
use crate::snapshot::{CompiledRoute, Settings, Snapshot, backoff};
use crate::upstream::{Outcome, SelectInput};

/// The live snapshot, swapped atomically on reload.
pub struct Shared {
    /// Current snapshot.
    pub snapshot: ArcSwap<Snapshot>,
}

/// What the proxy needs to know about the client connection. Built once per connection,
/// so per-request work reuses the peer's formatted values.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// Peer address of the TCP connection.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The peer IP as an `X-Forwarded-For` value.
    peer_ip: HeaderValue,
    /// `for=<peer>;proto=<scheme>`: the start of this hop's `Forwarded` element.
    forwarded_base: Arc<str>,
}

impl ClientConn {
    /// Describes a connection from `peer`, over TLS or not.
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; use the IPv4 form so
        // `trusted_proxies` CIDRs, logs and forwarding headers see the address people write.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let ip = peer.ip();
        let ip_text = ip.to_string();
        let proto = if tls { "https" } else { "http" };
        let forwarded_base = match ip {
            IpAddr::V4(_) => format!("for={ip_text};proto={proto}"),
            IpAddr::V6(_) => format!("for=\"[{ip_text}]\";proto={proto}"),
        };
        Self {
            peer,
            tls,
            peer_ip: HeaderValue::from_str(&ip_text).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_base: Arc::from(forwarded_base),
        }
    }
}

/// Handles one request end to end. Never fails: every error becomes a JSON response.
pub async fn handle(
    shared: Arc<Shared>,
    conn: &ClientConn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let snap = shared.snapshot.load_full();
    let started = Instant::now();
    let settings = &snap.settings;
    let rid = request_id(req.headers(), &settings.request_id_header);
    let request_id = rid.to_str().unwrap_or("-");
    // Only copy what the access event needs when someone listens for it: this is the hot path.
    let log_request = tracing::enabled!(target: "turnpike::access", tracing::Level::DEBUG)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));

    let grpc = crate::error::is_grpc(req.headers());

    let mut outcome = LogFacts::default();
    let mut resp = match proxy(&snap, conn, req, &rid, &mut outcome).await {
        Ok(r) => r,
        Err(e) => {
            outcome.error = Some(e.kind.code());
            e.into_response_for(grpc, request_id)
        }
    };
    if !outcome.response_headers.is_empty() {
        let headers = resp.headers_mut();
        let mut last = None;
        for (name, value) in std::mem::take(&mut outcome.response_headers) {
            if let Some(n) = name {
                // The policy's value replaces the upstream's for the fields it sets; `Vary`
                // lists add up.
                if n != header::VARY {
                    headers.remove(&n);
                }
                last = Some(n);
            }
            if let Some(n) = &last {
                headers.append(n.clone(), value);
            }
        }
    }
    resp.headers_mut()
        .insert(settings.request_id_header.clone(), rid.clone());
    if let Some(via) = &settings.via {
        resp.headers_mut().append(header::VIA, via.clone());
    }

    // Phase `log`: always emitted, whatever failed above. The structured access log and
    // metrics of the observability issue hang off this point.
    tracing::debug!(
        target: "turnpike::access",
        request_id = %request_id,
        method = %log_request.as_ref().map_or("-", |t| t.0.as_str()),
        path = %log_request.as_ref().map_or("-", |t| t.1.as_str()),
        route = outcome.route.as_deref().unwrap_or("-"),
        upstream_target = %outcome.target.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        status = resp.status().as_u16(),
        attempts = outcome.attempts,
        error = outcome.error.unwrap_or("-"),
        duration_us = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

/// What the log phase learns from the others.
#[derive(Default)]
struct LogFacts {
    route: Option<Arc<str>>,
    target: Option<SocketAddr>,
    attempts: u32,
    error: Option<&'static str>,
    /// Headers policies add to whatever response the client gets (CORS, `RateLimit`,
    /// `WWW-Authenticate`), error responses included.
    response_headers: HeaderMap,
}

async fn proxy(
    snap: &Snapshot,
    conn: &ClientConn,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut LogFacts,
) -> Result<Response<ProxyBody>, GatewayError> {
    let settings = &snap.settings;
    let (mut parts, body) = req.into_parts();

    // Phase `route`.
    let target_len = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > settings.limits.max_uri_length {
        return Err(GatewayError::new(
            ErrorKind::UriTooLong,
            "request target is too long",
        ));
    }
    if parts.method == Method::CONNECT {
        return Err(GatewayError::new(
            ErrorKind::MethodNotAllowed,
            "CONNECT is not supported",
        ));
    }
    let path = normalize_path(parts.uri.path()).map_err(|e| {
        GatewayError::new(
            ErrorKind::InvalidPath,
            format!("invalid request path: {}", e.0),
        )
    })?;
    let host = request_host(&parts);
    let client_ip = client_ip(settings, conn.peer.ip(), &parts.headers);
    let view = RequestView {
        host: host.as_deref(),
        path: &path,
        query: parts.uri.query(),
        method: &parts.method,
        headers: &parts.headers,
    };
    let matched = match snap.router.route(&view) {
        RouteResult::Matched(m) => m,
        RouteResult::NotFound => {
            return Err(GatewayError::new(
                ErrorKind::RouteNotFound,
                "no route matches the request",
            ));
        }
        RouteResult::MethodNotAllowed(_) if crate::error::is_grpc(&parts.headers) => {
            return Err(GatewayError::new(
                ErrorKind::MethodNotAllowed,
                "method not allowed",
            ));
        }
        RouteResult::MethodNotAllowed(methods) => {
            let allow = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut resp = error_response(
                ErrorKind::MethodNotAllowed,
                &format!("method {} is not allowed here", parts.method),
                request_id.to_str().unwrap_or("-"),
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return Ok(resp);
        }
    };
    let route = snap
        .routes
        .get(matched.index)
        .ok_or_else(|| GatewayError::new(ErrorKind::Internal, "route table out of sync"))?;
    log.route = Some(route.name.clone());

    // Phase `access`.
    if let Some(len) = content_length(&parts.headers) {
        if len > route.max_body_bytes {
            return Err(GatewayError::new(
                ErrorKind::BodyTooLarge,
                format!("request body exceeds {} bytes", route.max_body_bytes),
            ));
        }
    }
    access::strip_identity(&mut parts.headers);
    let mut identity = crate::policy::Identity::default();
    if !route.chain.is_empty() {
        let preq = crate::policy::Request {
            client_ip,
            route: &route.name,
            service: route.service.as_deref().map(|s| s.id.as_str()),
        };
        let answer = crate::policy::run_access(
            &route.chain,
            &snap.managed,
            &preq,
            &mut parts,
            &mut identity,
            &mut log.response_headers,
        )
        .await?;
        if let Some(resp) = answer {
            return Ok(resp);
        }
    }
    if let Some(service) = &route.service {
        let access = access::check(
            &snap.managed,
            service,
            &parts.headers,
            request_id.to_str().unwrap_or("-"),
            &mut identity,
        )?;
        // The key identifies the application to the gateway only: an upstream (another
        // team's) must never see it.
        parts.headers.remove(&access::API_KEY);
        if let Access::Respond(resp) = access {
            return Ok(resp);
        }
    }
    if !route.chain.limits.is_empty() || snap.policies.has_consumer_limits() {
        let preq = crate::policy::Request {
            client_ip,
            route: &route.name,
            service: route.service.as_deref().map(|s| s.id.as_str()),
        };
        crate::policy::run_identity_limits(
            &route.chain,
            &snap.policies,
            &snap.managed,
            &preq,
            &identity,
            &parts.headers,
            &mut log.response_headers,
        )
        .await?;
    }

    // Phase `upstream_request`.
    let upgrade = if is_upgrade_request(&parts) {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut path_and_query = matched.forward_path;
    if let Some(q) = parts.uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let original_host = host_header_value(&parts);
    let mut headers = std::mem::take(&mut parts.headers);
    let upstream_h2 = route.upstream.config.http2;
    strip_hop_by_hop(&mut headers, upgrade.is_some(), upstream_h2);
    // The gateway answers `Expect: 100-continue` itself: hyper sends the interim 100 when the
    // body is first read, which happens once the upstream connection is ready for it.
    headers.remove(header::EXPECT);
    add_forwarding(
        &mut headers,
        settings,
        conn,
        original_host.as_ref(),
        request_id,
    );
    access::identify(&mut headers, &identity);

    let slot = BodySlot::new(crate::reqbody::limited(
        body,
        route.max_body_bytes,
        route.timeouts.write,
    ));
    let (resp, guard) = send_with_retries(
        route,
        &parts.method,
        &path_and_query,
        headers,
        original_host,
        &slot,
        client_ip,
        &path,
        log,
    )
    .await?;

    // Phase `upstream_response`.
    let mut resp = finish_response(resp, guard, upgrade, route)?;
    if route.chain.cors.is_some() {
        // The route's `cors` policy alone decides: the upstream's own `Access-Control-*`
        // headers could allow an origin the policy does not.
        let upstream_cors: Vec<HeaderName> = resp
            .headers()
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in upstream_cors {
            resp.headers_mut().remove(&name);
        }
    }
    Ok(resp)
}

/// Held until the response body ends: the target's in-flight count and the upstream's
/// concurrency permit.
type ResponseGuard = (crate::upstream::Attempt, InFlight);

#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    route: &CompiledRoute,
    method: &Method,
    path_and_query: &str,
    mut headers: HeaderMap,
    original_host: Option<HeaderValue>,
    slot: &BodySlot,
    client_ip: IpAddr,
    path: &str,
    log: &mut LogFacts,
) -> Result<(Response<Incoming>, ResponseGuard), GatewayError> {
    let upstream = &route.upstream;
    let cfg = &upstream.config;
    let version = if cfg.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let max_attempts = 1 + cfg.retries.attempts;
    let deadline = (!route.timeouts.total.is_zero()).then(|| Instant::now() + route.timeouts.total);
    route.budget.record_request();

    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt_no in 0..max_attempts {
        let last = attempt_no + 1 == max_attempts;
        let input = SelectInput {
            client_ip,
            path,
            headers: &headers,
        };
        let target = upstream.select(&input, &tried).map_err(|_| {
            GatewayError::new(
                ErrorKind::NoHealthyUpstream,
                format!("no healthy target in upstream `{}`", upstream.name),
            )
        })?;
        let permit = InFlight::acquire(upstream, cfg.pool.max_requests).ok_or_else(|| {
            GatewayError::new(
                ErrorKind::UpstreamOverloaded,
                format!("upstream `{}` is at its request limit", upstream.name),
            )
        })?;
        tried.push(target.addr);
        log.target = Some(target.addr);
        log.attempts = attempt_no + 1;

        let uri = upstream
            .client
            .uri_for_target(&target, path_and_query.to_owned())
            .map_err(|_| {
                GatewayError::new(ErrorKind::BadRequest, "request target cannot be forwarded")
            })?;
        let mut req = Request::new(slot.attempt().boxed_unsync());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = if last {
            std::mem::take(&mut headers)
        } else {
            headers.clone()
        };
        let host = match &route.upstream_host {
            turnpike_model::UpstreamHost::Target => target.host_header().cloned(),
            turnpike_model::UpstreamHost::Preserve => original_host.clone(),
            turnpike_model::UpstreamHost::Rewrite(h) => HeaderValue::from_str(h).ok(),
        };
        if let Some(h) = host {
            req.headers_mut().insert(header::HOST, h);
        }

        let mut attempt = upstream.begin(target);
        let start = Instant::now();
        let mut limit = start + route.timeouts.read;
        if let Some(d) = deadline {
            limit = limit.min(d);
        }
        let result = tokio::time::timeout_at(limit, upstream.client.request(req)).await;
        let can_retry =
            |retry_safe: bool| !last && retry_safe && !slot.started() && route.budget.try_retry();
        match result {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let failed = status.is_server_error();
                if failed
                    && idempotent
                    && cfg.retries.on_status.contains(&status.as_u16())
                    && can_retry(true)
                {
                    attempt.finish(Outcome::Failure);
                    drop(resp);
                    tokio::time::sleep(backoff(
                        cfg.retries.backoff,
                        cfg.retries.max_backoff,
                        attempt_no,
                    ))
                    .await;
                    continue;
                }
                attempt.record(if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success(start.elapsed())
                });
                return Ok((resp, (attempt, permit)));
            }
            Ok(Err(e)) => {
                if let Some(kind) = client_body_error(&e) {
                    // The client's body broke the exchange; the target is not to blame.
                    drop(attempt);
                    return Err(match kind {
                        ErrorKind::BodyTooLarge => {
                            GatewayError::new(kind, "request body is too large")
                        }
                        _ => GatewayError::new(kind, "client stopped sending the request body"),
                    });
                }
                attempt.finish(Outcome::Failure);
                let connect = e.is_connect();
                // A connect failure sent nothing, so any request may be retried; otherwise
                // the head may have reached the upstream, and only idempotent ones may.
                if can_retry(connect || idempotent) {
                    tracing::debug!(upstream = %upstream.name, error = %e, "retrying after upstream error");
                    tokio::time::sleep(backoff(
                        cfg.retries.backoff,
                        cfg.retries.max_backoff,
                        attempt_no,
                    ))
                    .await;
                    continue;
                }
                return Err(if connect {
                    GatewayError::new(
                        ErrorKind::UpstreamUnreachable,
                        format!("cannot connect to upstream `{}`", upstream.name),
                    )
                } else {
                    GatewayError::new(
                        ErrorKind::UpstreamError,
                        format!("upstream `{}` failed to answer", upstream.name),
                    )
                });
            }
            Err(_elapsed) => {
                attempt.finish(Outcome::Failure);
                return Err(GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("upstream `{}` did not answer in time", upstream.name),
                ));
            }
        }
    }
    Err(GatewayError::new(
        ErrorKind::UpstreamError,
        "retries exhausted",
    ))
}

fn finish_response(
    resp: Response<Incoming>,
    guard: ResponseGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    route: &CompiledRoute,
) -> Result<Response<ProxyBody>, GatewayError> {
    let (mut parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client), Some(upstream)) = (
            client_upgrade,
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        ) else {
            return Err(GatewayError::new(
                ErrorKind::UpstreamError,
                "upstream switched protocols unasked",
            ));
        };
        // Only now, with the upstream's 101 in hand, does the connection become a tunnel.
        tokio::spawn(async move {
            // The tunnel counts as in flight on its target for as long as it is open.
            let _guard = guard;
            match tokio::try_join!(client, upstream) {
                Ok((c, u)) => {
                    let mut c = hyper_util::rt::TokioIo::new(c);
                    let mut u = hyper_util::rt::TokioIo::new(u);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(error = %e, "upgraded tunnel closed with error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        // Keeps `Upgrade` and sets `Connection: upgrade`, as the 101 must carry both.
        strip_hop_by_hop(&mut parts.headers, true, false);
        return Ok(Response::from_parts(parts, body::empty()));
    }
    strip_hop_by_hop(&mut parts.headers, false, true);
    if let Some(service) = &route.service {
        access::announce(service, &mut parts.headers);
    }
    let body = crate::body::Guarded::new(
        IdleTimeoutBody::new(body, route.timeouts.read, || Box::new(UpstreamBodyTimeout)),
        guard,
    )
    .boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// Limits concurrent requests to one upstream; released when dropped.
struct InFlight(Option<Arc<crate::upstream::Upstream>>);

impl InFlight {
    fn acquire(upstream: &Arc<crate::upstream::Upstream>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        if max == 0 {
            return Some(Self(None));
        }
        let prev = upstream.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            upstream.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Some(upstream.clone())))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(u) = &self.0 {
            u.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Finds our own body errors in a client error's source chain.
fn client_body_error(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return Some(ErrorKind::BodyTooLarge);
        }
        if err.is::<BodyIdleTimeout>() {
            return Some(ErrorKind::ClientTimeout);
        }
        cur = err.source();
    }
    None
}

/// The client's request id if it is sane, else a fresh one.
fn request_id(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    if let Some(v) = headers.get(name) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 200 && b.iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    // Encoded into a stack buffer: `to_string` would go through the formatting machinery.
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"))
}

/// Host for routing: URI authority (HTTP/2, absolute-form) or `Host`, lowercased, no port.
fn request_host(parts: &http::request::Parts) -> Option<String> {
    let raw = match parts.uri.authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let h = parts.headers.get(header::HOST)?.to_str().ok()?;
            strip_port(h).to_owned()
        }
    };
    let host = raw.trim_end_matches('.');
    Some(host.to_ascii_lowercase())
}

fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        // IPv6 literal: keep the brackets off, drop the port.
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// The `Host` value the client sent (or its HTTP/2 authority).
fn host_header_value(parts: &http::request::Parts) -> Option<HeaderValue> {
    match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// The real client IP: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
fn client_ip(settings: &Settings, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !settings.is_trusted(peer) {
        return peer;
    }
    // A trusted proxy vouched for an entry we cannot read: the client is unknown. Answering
    // with the proxy's own (often allow-listed, internal) address would be wrong; `::` is in
    // no one's allow list and puts every such client in one rate-limit bucket.
    let unknown = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
    let mut candidate = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(s) = value.to_str() else {
            return unknown;
        };
        for part in s.rsplit(',') {
            let part = part.trim();
            let parsed = part
                .parse::<IpAddr>()
                .ok()
                .or_else(|| part.parse::<SocketAddr>().ok().map(|a| a.ip()));
            let Some(ip) = parsed.map(|ip| ip.to_canonical()) else {
                return unknown;
            };
            candidate = ip;
            if !settings.is_trusted(ip) {
                return ip;
            }
        }
    }
    candidate
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `Upgrade: h2c` is never treated as an upgrade: the gateway cannot speak HTTP/2 inside the
/// tunnel, so a 101 from an upstream would hand the client a raw connection to it, past routing
/// ("h2c smuggling"). Such a request is forwarded as plain HTTP/1.1 without its `Upgrade`.
fn is_upgrade_request(parts: &http::request::Parts) -> bool {
    parts.version <= Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && !parts
            .headers
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("h2c"))
        && connection_has(&parts.headers, "upgrade")
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and those the `Connection` header names. `upgrade` keeps the
/// `Upgrade` negotiation; `keep_te_trailers` keeps `TE: trailers`, which gRPC needs end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, keep_te_trailers: bool) {
    // Most requests (all HTTP/2 ones) carry no `Connection` header: skip the allocation.
    let named: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named {
        if upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Sets `X-Forwarded-*`, `Forwarded`, `Via` and the request id. Incoming forwarding headers
/// are kept (and extended) only from trusted proxies; from anyone else they are replaced.
fn add_forwarding(
    headers: &mut HeaderMap,
    settings: &Settings,
    conn: &ClientConn,
    original_host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) {
    let trusted = settings.is_trusted(conn.peer.ip());
    let xff_name = HeaderName::from_static("x-forwarded-for");
    let xfp_name = HeaderName::from_static("x-forwarded-proto");
    let xfh_name = HeaderName::from_static("x-forwarded-host");
    let fwd_name = HeaderName::from_static("forwarded");

    let xff = match trusted.then(|| joined(headers, &xff_name)).flatten() {
        Some(mut prior) => {
            prior.push_str(", ");
            prior.push_str(conn.peer_ip.to_str().unwrap_or(""));
            HeaderValue::from_str(&prior).ok()
        }
        None => Some(conn.peer_ip.clone()),
    };

    // This hop's `Forwarded` element; `host` only when it needs no quoting.
    let host_str = original_host.and_then(|h| h.to_str().ok()).unwrap_or("");
    let host_ok = !host_str.is_empty()
        && host_str
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',');
    let prior_forwarded = trusted.then(|| joined(headers, &fwd_name)).flatten();
    let mut forwarded = String::with_capacity(
        prior_forwarded.as_ref().map_or(0, |p| p.len() + 2)
            + conn.forwarded_base.len()
            + host_str.len()
            + 6,
    );
    if let Some(prior) = &prior_forwarded {
        forwarded.push_str(prior);
        forwarded.push_str(", ");
    }
    forwarded.push_str(&conn.forwarded_base);
    if host_ok {
        forwarded.push_str(";host=");
        forwarded.push_str(host_str);
    }

    if !(trusted && headers.contains_key(&xfp_name)) {
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(xfp_name, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&xfh_name)) {
        match original_host {
            Some(h) => {
                headers.insert(xfh_name, h.clone());
            }
            None => {
                headers.remove(xfh_name);
            }
        }
    }
    if let Some(v) = xff {
        headers.insert(xff_name, v);
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(fwd_name, v);
    }
    if let Some(via) = &settings.via {
        headers.append(header::VIA, via.clone());
    }
    headers.insert(settings.request_id_header.clone(), request_id.clone());
}

/// All values of a header joined with `, `, or `None` if there are none.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out = String::new();
    for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(v);
    }
    (!out.is_empty()).then_some(out)
}

/// Used by the listener wiring to turn a handler into a hyper service.
pub fn service(
    shared: Arc<Shared>,
    conn: ClientConn,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>
             + Send,
> + Clone
+ Send {
    let conn = Arc::new(conn);
    hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(shared, &conn, req).await) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(trusted: &[&str]) -> Settings {
        Settings {
            trusted_proxies: trusted
                .iter()
                .filter_map(|s| turnpike_model::parse_cidr(s))
                .collect(),
            request_id_header: HeaderName::from_static("x-request-id"),
            via: Some(HeaderValue::from_static("1.1 turnpike")),
            limits: Default::default(),
        }
    }

    #[test]
    fn client_ip_ignores_xff_from_untrusted_peer() {
        let s = settings(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        assert_eq!(
            client_ip(&s, "192.0.2.9".parse().unwrap(), &h),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        // From a trusted proxy, the right-most untrusted entry is the client.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.1.1.1"),
        );
        assert_eq!(
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // An entry with a port is read; one that cannot be read makes the client unknown,
        // never the trusted proxy itself.
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4:5678"));
        assert_eq!(
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h),
            "::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false, true);
        assert!(
            !h.contains_key("x-secret")
                && !h.contains_key("keep-alive")
                && !h.contains_key(header::UPGRADE)
        );
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarding_headers_are_replaced_from_untrusted_peers() {
        let s = settings(&[]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        let conn = ClientConn::new("192.0.2.1:5555".parse().unwrap(), false);
        let host = HeaderValue::from_static("api.test");
        add_forwarding(
            &mut h,
            &s,
            &conn,
            Some(&host),
            &HeaderValue::from_static("rid"),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.test");
        assert_eq!(h["forwarded"], "for=192.0.2.1;proto=http;host=api.test");
        assert_eq!(h["via"], "1.1 turnpike");
        assert_eq!(h["x-request-id"], "rid");
    }

    #[test]
    fn forwarding_extends_headers_from_trusted_proxies() {
        let s = settings(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert("forwarded", HeaderValue::from_static("for=203.0.113.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let conn = ClientConn::new("[::ffff:10.1.2.3]:443".parse().unwrap(), true);
        let v6 = ClientConn::new("[2001:db8::1]:443".parse().unwrap(), true);
        add_forwarding(&mut h, &s, &conn, None, &HeaderValue::from_static("rid"));
        // An IPv4-mapped peer is treated as the IPv4 address it is: trusted here.
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.1.2.3");
        let conn = ClientConn::new("10.1.2.3:443".parse().unwrap(), true);
        let mut h2 = HeaderMap::new();
        h2.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h2.insert("forwarded", HeaderValue::from_static("for=203.0.113.7"));
        h2.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        add_forwarding(&mut h2, &s, &conn, None, &HeaderValue::from_static("rid"));
        assert_eq!(h2["x-forwarded-for"], "203.0.113.7, 10.1.2.3");
        assert_eq!(h2["forwarded"], "for=203.0.113.7, for=10.1.2.3;proto=https");
        assert_eq!(
            h2["x-forwarded-proto"], "http",
            "a trusted proxy's proto is kept"
        );
        let mut h3 = HeaderMap::new();
        add_forwarding(&mut h3, &s, &v6, None, &HeaderValue::from_static("rid"));
        assert_eq!(h3["forwarded"], "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn request_id_is_propagated_or_generated() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h, &name), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h, &name), "has space");
    }

    #[test]
    fn host_strips_port_and_case() {
        assert_eq!(strip_port("Example.com:8080"), "Example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
