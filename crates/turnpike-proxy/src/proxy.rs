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

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use turnpike_model::config::ClientIpHeader;

use crate::access::{self, Access};
use crate::body::{self, ProxyBody};
use crate::client::UpstreamBody;
use crate::clientcert::ClientCert;
use crate::error::{ErrorKind, GatewayError, error_response};
use crate::observe;
use crate::policy::{Policy, resilience, traffic};
use crate::reqbody::{BodyIdleTimeout, BodySlot, IdleTimeoutBody, UpstreamBodyTimeout};
use crate::router::{RequestView, RouteResult, normalize_path};
use crate::snapshot::{CompiledRoute, Settings, Snapshot, backoff};
use crate::upstream::{Outcome, SelectInput};

/// The live snapshot, swapped atomically on reload.
pub struct Shared {
    /// Current snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// Plan quota counters (kept across snapshots).
    pub quotas: Arc<crate::quota::QuotaTracker>,
    /// Where finished calls go (metrics, access logs, the call-log store, analytics).
    pub observer: Arc<turnpike_observe::Observer>,
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
    /// The client certificate the listener verified, if any (mTLS).
    pub client_cert: Option<Arc<ClientCert>>,
    /// The name of the listener that accepted the connection (for logs).
    pub listener: Option<Arc<str>>,
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
            client_cert: None,
            listener: None,
        }
    }

    /// The same connection, accepted by the listener called `name`.
    pub fn with_listener(mut self, name: Arc<str>) -> Self {
        self.listener = Some(name);
        self
    }

    /// The same connection, with the client certificate its listener verified.
    pub fn with_client_cert(mut self, cert: Option<Arc<ClientCert>>) -> Self {
        self.client_cert = cert;
        self
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
    let observed = shared
        .observer
        .is_active()
        .then(|| observe::Pending::new(&req, conn, request_id, shared.observer.capture()));

    let grpc = crate::error::is_grpc(req.headers());
    // gRPC-Web clients read the gateway's errors as gRPC ones too, in their own framing.
    let grpc_web = crate::transcode::web::Mode::of(req.headers());

    let mut outcome = LogFacts {
        request_body: observed
            .as_ref()
            .and_then(observe::Pending::request_body_capture),
        bytes_in: observed.as_ref().map(observe::Pending::bytes_in),
        trace: shared
            .observer
            .tracing()
            .map(|t| Box::new(t.start(req.headers()))),
        ..LogFacts::default()
    };
    let mut resp = match proxy(&snap, &shared.quotas, conn, req, &rid, &mut outcome).await {
        Ok(r) => r,
        Err(e) => {
            outcome.error = Some(e.kind.code());
            let mut r = e.into_response_for(grpc || grpc_web.is_some(), request_id);
            if let Some(mode) = grpc_web {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(mode.content_type()),
                );
            }
            r
        }
    };
    if !outcome.response_headers.is_empty() {
        let headers = resp.headers_mut();
        let mut last = None;
        for (name, value) in std::mem::take(&mut outcome.response_headers) {
            if let Some(n) = name {
                // The policy's value replaces the upstream's for the fields it sets; `Vary`
                // and `Link` lists add up.
                if n != header::VARY && n != header::LINK {
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
    match observed {
        Some(mut pending) => {
            let captured = pending.take_capture();
            let trace = outcome.trace.take();
            let event = pending.finish(&snap, &outcome, trace, resp.status());
            observe::wrap(resp, event, captured, started, Arc::clone(&shared.observer))
        }
        None => resp,
    }
}

/// What the log phase learns from the others.
#[derive(Default)]
pub(crate) struct LogFacts {
    pub(crate) route: Option<Arc<str>>,
    /// The matched route's managed service.
    pub(crate) service: Option<Arc<turnpike_model::managed::ServiceBinding>>,
    /// The identified application.
    pub(crate) consumer: Option<Arc<turnpike_model::managed::Consumer>>,
    /// The upstream pool of the last attempt.
    pub(crate) upstream: Option<Arc<crate::upstream::Upstream>>,
    /// How long the last attempt waited for the upstream's response headers.
    pub(crate) upstream_time: Option<std::time::Duration>,
    /// The real client IP, once known (after trusted proxies).
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) target: Option<SocketAddr>,
    pub(crate) attempts: u32,
    pub(crate) error: Option<&'static str>,
    /// What the response cache did (`X-Cache`), when the route has one.
    pub(crate) cache: Option<&'static str>,
    /// Where the upstream attempt copies the start of the request body (access-log
    /// capture); `None` unless capture asks for it.
    pub(crate) request_body: Option<Arc<std::sync::Mutex<turnpike_observe::CapturedBody>>>,
    /// The request's part of a trace, when tracing is on: the server span and a client span
    /// per upstream attempt.
    pub(crate) trace: Option<Box<turnpike_observe::trace::TraceFacts>>,
    /// The route's `data_masking`, when it masks logged bodies.
    pub(crate) redact: Option<Arc<turnpike_observe::redact::Redactor>>,
    /// Counts the request body bytes read, when the call is observed.
    pub(crate) bytes_in: Option<crate::reqbody::BytesIn>,
    /// Headers policies add to whatever response the client gets (CORS, `RateLimit`,
    /// `WWW-Authenticate`), error responses included.
    response_headers: HeaderMap,
}

async fn proxy(
    snap: &Arc<Snapshot>,
    quotas: &crate::quota::QuotaTracker,
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
    log.client_ip = Some(client_ip);
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
    log.service = route.service.clone();
    if let Some(v) = &route.version {
        v.check(&path, &mut log.response_headers)?;
    }
    if let Some(r) = route.chain.upstream.masking()
        && r.logs
    {
        log.redact = Some(Arc::clone(r));
    }

    // Phase `access`. With policies, the route's body limit is checked among them, after
    // CORS (see `run_access`).
    if route.chain.is_empty()
        && content_length(&parts.headers).is_some_and(|len| len > route.max_body_bytes)
    {
        return Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("request body exceeds {} bytes", route.max_body_bytes),
        ));
    }
    access::strip_identity(&mut parts.headers);
    let mut identity = crate::policy::Identity::default();
    if !route.chain.is_empty() {
        let preq = crate::policy::Request {
            client_ip,
            route: &route.name,
            service: route.service.as_deref().map(|s| &s.id),
            tls: conn.tls,
            max_body_bytes: route.max_body_bytes,
            client_cert: conn.client_cert.as_deref(),
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
    log.consumer = identity.consumer.clone();
    if !route.chain.limits.is_empty() || snap.policies.has_consumer_limits() {
        let preq = crate::policy::Request {
            client_ip,
            route: &route.name,
            service: route.service.as_deref().map(|s| &s.id),
            tls: conn.tls,
            max_body_bytes: route.max_body_bytes,
            client_cert: conn.client_cert.as_deref(),
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
    // Policies that need the whole body (`waf`, `request_validation`, a signed
    // `Content-Digest`); a no-op otherwise.
    let body = crate::policy::inspect::run(
        &route.chain,
        &parts,
        body,
        identity.body_check.as_ref(),
        &crate::policy::inspect::Target {
            route_limit: route.max_body_bytes,
            idle: route.timeouts.write,
            total: route.timeouts.total,
            request_id: request_id.to_str().unwrap_or("-"),
            route: &route.name,
            path: &path,
            counted: log.bytes_in.as_ref(),
        },
    )
    .await?;

    // Answers are shaped with what the client sent: captured before any transform.
    let mut forward_path = matched.forward_path;
    let caller = crate::transform::template::Caller {
        request_id: request_id.to_str().unwrap_or("-"),
        client_ip,
        path: &path,
        route: &route.name,
        consumer: identity.consumer.as_deref(),
        claims: identity.claims.as_ref(),
        params: &matched.params,
    };
    let up = &route.chain.upstream;
    let shaper = crate::transform::Shaper::new(
        up,
        &caller.vars(&parts),
        identity.consumer.as_ref(),
        &parts.method,
        route.timeouts.read,
    );
    let (body, host) = match up.request_transform() {
        Some(t) => {
            let body = t
                .apply(
                    &mut parts,
                    &mut forward_path,
                    body,
                    &caller,
                    &body_read(route, log),
                )
                .await?;
            // The transform may have set `Host`.
            (body, request_host(&parts))
        }
        None => (body, host),
    };
    // gRPC translation: the client's JSON (or gRPC-Web) request becomes the gRPC call. Native
    // gRPC requests on the route pass as they are.
    let web_mode = up
        .grpc_web()
        .and_then(|w| crate::transcode::web::Mode::of(&parts.headers).map(|m| (w, m)));
    if let Some(t) = up.transcoder()
        && (web_mode.is_some() || crate::error::is_grpc(&parts.headers))
        && !t.passes_native(&forward_path)
    {
        return Err(GatewayError::new(
            ErrorKind::RouteNotFound,
            "this gRPC method is not exposed on the route",
        ));
    }
    let mut transcoded = None;
    let body = match (up.transcoder(), web_mode) {
        (_, Some((w, mode))) => {
            w.request(mode, &mut parts, body, &body_read(route, log))
                .await?
        }
        (Some(t), None) if !crate::error::is_grpc(&parts.headers) => {
            let (body, pending) = t
                .request(
                    &mut parts,
                    &path,
                    &mut forward_path,
                    body,
                    &body_read(route, log),
                )
                .await?;
            transcoded = Some(pending);
            body
        }
        _ => body,
    };
    let web_mode = web_mode.map(|(_, m)| m);
    if up.response_transform().is_some_and(|t| t.reads_body()) || up.masking.is_some() {
        // The response transform or masking reads the whole body: the upstream must send it
        // unencoded (no `Accept-Encoding` at all would allow any coding) and whole (a range,
        // or a multipart of ranges, would slip past the rewrite).
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        parts.headers.remove(header::RANGE);
        parts.headers.remove(header::IF_RANGE);
    }

    // Quotas last: a request a rate limit, the WAF or validation refused does not use up
    // the day's quota.
    let mut charged = None;
    if !snap.managed.plan_quotas.is_empty()
        && let (Some(service), Some(consumer)) = (&route.service, &identity.consumer)
        && let Some(Some(plan)) = snap
            .managed
            .subscriptions
            .get(&(Arc::clone(&consumer.id), Arc::clone(&service.id)))
        && let Some(plan_quotas) = snap.managed.plan_quotas.get(plan)
    {
        match quotas.charge(&consumer.id, &service.id, plan_quotas) {
            Ok((status, charge)) => {
                if let Some(s) = status {
                    s.write_headers(&mut log.response_headers);
                }
                charged = Some(charge);
            }
            Err(s) => {
                s.write_headers(&mut log.response_headers);
                return Err(crate::quota::exceeded(&s));
            }
        }
    }

    // The gateway's own refusals in front of the upstream (an injected fault, an open
    // breaker, a full bulkhead) give the caller nothing: they do not use up its quota —
    // unless an attempt reached an upstream first (a retry then found every breaker open).
    let refund = |attempts: u32| {
        if attempts == 0
            && let Some(charge) = &charged
        {
            quotas.refund(charge);
        }
    };

    // Phase `upstream_request`.
    if let Some(c) = &up.fault
        && let Policy::FaultInjection(f) = &c.policy
        && let Some(resp) = f
            .apply(&parts.headers, request_id.to_str().unwrap_or("-"))
            .await
    {
        log.error = Some(ErrorKind::FaultInjected.code());
        refund(log.attempts);
        return Ok(resp);
    }
    if let Some(agg) = up.aggregate() {
        // A composite route answers itself from its calls; nothing else is called.
        let resp = aggregate(
            snap,
            route,
            agg,
            &parts,
            body,
            &caller,
            conn,
            request_id,
            &identity,
            &body_read(route, log),
        )
        .await?;
        return shaped(shaper.as_ref(), resp).await;
    }
    let mut dest = Dest::of(route);
    if let Some(c) = &up.split
        && let Policy::TrafficSplit(split) = &c.policy
        && let Some(name) = split.choose(&parts.headers, parts.uri.query(), client_ip)
    {
        dest = Dest::named(snap, route, name)?;
    }
    if (transcoded.is_some() || web_mode.is_some()) && !dest.upstream.config.http2 {
        return Err(GatewayError::new(
            ErrorKind::GrpcResponseInvalid,
            format!(
                "upstream `{}` is not HTTP/2 (`http2: true`), which gRPC needs",
                dest.upstream.name
            ),
        ));
    }
    // The response cache: answer from it, or learn what to do with the upstream's answer.
    // Translated gRPC calls are not cached: the stored answer would be the gRPC one.
    let mut cached: Option<Box<crate::cache::Pending>> = None;
    if let Some(rc) = up.cache()
        && transcoded.is_none()
        && web_mode.is_none()
    {
        // Everything the upstream is told of the caller is keyed with it: the application
        // and its granted scopes.
        let caller = rc
            .cfg
            .key
            .application
            .then(|| {
                identity
                    .consumer
                    .as_ref()
                    .map(|c| format!("{}|{}", c.id, identity.scopes.join(" ")))
            })
            .flatten();
        let ctx = crate::cache::Ctx {
            scheme: if conn.tls { "https" } else { "http" },
            host: host.as_deref(),
            path: &path,
            route: &route.name,
            upstream: &dest.upstream.name,
            application: caller.as_deref(),
            has_body: !body.is_empty(),
            forward_path: up
                .request_transform
                .is_some()
                .then_some(forward_path.as_str()),
        };
        match crate::cache::begin(&snap.cache, rc, &mut parts, &ctx).await {
            crate::cache::Begin::Answer(mut resp, label, refresh) => {
                log.cache = Some(label);
                resp.headers_mut().insert(
                    crate::cache::X_CACHE.clone(),
                    HeaderValue::from_static(label),
                );
                if let Some(crate::cache::Refresh {
                    pending,
                    mut headers,
                }) = refresh
                {
                    let mut pq = forward_path;
                    if let Some(q) = pending
                        .query
                        .clone()
                        .unwrap_or_else(|| parts.uri.query().map(str::to_owned))
                    {
                        pq.push('?');
                        pq.push_str(&q);
                    }
                    // The refresh is the request a client's miss would send: the same
                    // forwarding and identity headers.
                    let original_host = host_header_value(&parts);
                    strip_hop_by_hop(&mut headers, false, dest.upstream.config.http2);
                    forward_as_client(
                        &mut headers,
                        settings,
                        conn,
                        original_host.as_ref(),
                        request_id,
                        pending.identify.then_some(&identity),
                    );
                    tokio::spawn(refresh_entry(
                        Arc::clone(snap),
                        matched.index,
                        dest.upstream.name.clone(),
                        crate::cache::Refresh { pending, headers },
                        pq,
                        original_host,
                        client_ip,
                        path.clone(),
                    ));
                }
                return shaped(shaper.as_ref(), resp).await;
            }
            crate::cache::Begin::Fetch(p) => cached = Some(p),
        }
    }
    let upgrade = if is_upgrade_request(&parts) {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut path_and_query = forward_path;
    // The cache may have removed unkeyed query parameters.
    let query_override = cached.as_mut().and_then(|c| c.query.take());
    let query = match &query_override {
        Some(q) => q.as_deref(),
        None => parts.uri.query(),
    };
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let original_host = host_header_value(&parts);
    let mut headers = std::mem::take(&mut parts.headers);
    let upstream_h2 = dest.upstream.config.http2;
    strip_hop_by_hop(&mut headers, upgrade.is_some(), upstream_h2);
    // The gateway answers `Expect: 100-continue` itself: hyper sends the interim 100 when the
    // body is first read, which happens once the upstream connection is ready for it.
    headers.remove(header::EXPECT);
    forward_as_client(
        &mut headers,
        settings,
        conn,
        original_host.as_ref(),
        request_id,
        cached
            .as_ref()
            .is_none_or(|c| c.identify)
            .then_some(&identity),
    );
    if let Some(t) = &log.trace {
        // Copies (mirrors, a fallback) carry the server span as their parent; each attempt
        // below replaces it with its own span.
        t.write_headers(&mut headers);
    }

    let slot = body.into_slot(
        route.max_body_bytes,
        route.timeouts.write,
        log.bytes_in.clone(),
    );
    let method_override = cached.as_mut().and_then(|c| c.method.take());
    let call = Call {
        method: method_override.as_ref().unwrap_or(&parts.method),
        path_and_query: &path_and_query,
        original_host,
        slot: &slot,
        client_ip,
        path: &path,
    };
    // Kept only when a fallback upstream may need to send the request again.
    let fallback_headers = up
        .fallback()
        .and_then(|f| f.upstream())
        .map(|_| headers.clone());
    let sent = if up.is_empty() {
        send_with_retries(route, &dest, &call, headers, None, &[], log).await
    } else {
        guarded_send(snap, route, &dest, &call, headers, upgrade.is_some(), log).await
    };
    if let Err(e) = &sent
        && let Some(mut stale) = cached.as_ref().and_then(|c| c.on_error(e))
    {
        // `stale-if-error`: the stored answer stands in for the failed call, which the log
        // still records. It comes before any `fallback`.
        log.error = Some(e.kind.code());
        log.cache = Some(crate::cache::STALE);
        stale.headers_mut().insert(
            crate::cache::X_CACHE.clone(),
            HeaderValue::from_static(crate::cache::STALE),
        );
        return shaped(shaper.as_ref(), stale).await;
    }
    let (resp, guard, timeouts) = match sent {
        Ok((resp, guard)) => (resp, guard, dest.timeouts.clone()),
        Err(e) => match up.fallback() {
            Some(f) if f.covers(e.kind) => {
                // The fallback answers instead: the refusal's `Retry-After` does not apply.
                log.response_headers.remove(header::RETRY_AFTER);
                let Some(name) = f.upstream() else {
                    return f.response(e.kind).ok_or(e);
                };
                // A timeout means the primary may have received (and acted on) the request:
                // only an idempotent one may be sent again. Every other covered error comes
                // before anything was sent.
                let idempotent = matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
                );
                if slot.started() || (e.kind == ErrorKind::UpstreamTimeout && !idempotent) {
                    return Err(e);
                }
                // The fallback's answer is not the route's: it is never stored.
                cached = None;
                let fb = Dest::named(snap, route, name)?;
                let headers = fallback_headers.unwrap_or_default();
                let (mut resp, guard) =
                    send_with_retries(route, &fb, &call, headers, None, &[], log).await?;
                if let Ok(v) = HeaderValue::from_str(e.kind.code()) {
                    resp.headers_mut()
                        .insert(crate::policy::resilience::FALLBACK_HEADER.clone(), v);
                }
                (resp, guard, fb.timeouts.clone())
            }
            _ => {
                if matches!(e.kind, ErrorKind::CircuitOpen | ErrorKind::BulkheadFull) {
                    refund(log.attempts);
                }
                return Err(e);
            }
        },
    };

    // Phase `upstream_response`.
    let mut resp = finish_response(resp, guard, upgrade, route, &timeouts)?;
    if let Some(pending) = transcoded {
        resp = pending
            .response(resp, request_id.to_str().unwrap_or("-"), timeouts.read)
            .await?;
    }
    if let Some(mode) = web_mode {
        resp = crate::transcode::web::response(resp, mode);
    }
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
    if let Some(c) = cached {
        let (r, label) = c.finish(resp);
        resp = r;
        log.cache = Some(label);
        resp.headers_mut().insert(
            crate::cache::X_CACHE.clone(),
            HeaderValue::from_static(label),
        );
    }
    shaped(shaper.as_ref(), resp).await
}

/// How a policy that rewrites the request body reads it: within the route's limit and
/// timeouts.
fn body_read(route: &CompiledRoute, log: &LogFacts) -> crate::transform::BodyRead {
    crate::transform::BodyRead {
        limit: route.max_body_bytes,
        idle: route.timeouts.write,
        total: route.timeouts.total,
        counted: log.bytes_in.clone(),
    }
}

/// Answers an `aggregate` route: its calls, made concurrently with the gateway's forwarding
/// and identity headers, each bounded by its timeout, then merged.
#[allow(clippy::too_many_arguments)]
async fn aggregate(
    snap: &Snapshot,
    route: &CompiledRoute,
    agg: &crate::transform::aggregate::Aggregate,
    parts: &http::request::Parts,
    body: crate::policy::inspect::ReqBody,
    caller: &crate::transform::template::Caller<'_>,
    conn: &ClientConn,
    request_id: &HeaderValue,
    identity: &crate::policy::Identity,
    read: &crate::transform::BodyRead,
) -> Result<Response<ProxyBody>, GatewayError> {
    use crate::transform::aggregate::Outcome as CallOutcome;
    let json_body = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| crate::transform::is_format(t, turnpike_model::policy::BodyFormat::Json));
    let client_body: Option<serde_json::Value> = if agg.has_bodies() && !body.is_empty() {
        if !json_body {
            return Err(GatewayError::new(
                ErrorKind::UnsupportedMediaType,
                "this route reads JSON bodies (application/json or +json)",
            ));
        }
        let bound = agg.max_bytes.min(route.max_body_bytes);
        let bytes =
            crate::policy::inspect::read_whole(body, bound, parts, read, "the aggregate reads")
                .await?;
        Some(serde_json::from_slice(&bytes).map_err(|e| {
            GatewayError::new(
                ErrorKind::RequestTransformFailed,
                format!("the body is not valid JSON: {e}"),
            )
        })?)
    } else {
        None
    };
    let vars = crate::transform::template::Vars {
        body: client_body.as_ref(),
        ..caller.vars(parts)
    };
    let prepared = agg.prepare(&vars)?;
    let original_host = host_header_value(parts);
    let calls = prepared.iter().map(|p| {
        let mut headers = p.headers.clone();
        forward_as_client(
            &mut headers,
            &snap.settings,
            conn,
            original_host.as_ref(),
            request_id,
            Some(identity),
        );
        async move {
            let call = async {
                let dest = Dest::named(snap, route, p.upstream)?;
                let slot = BodySlot::buffered(p.body.clone());
                let call = Call {
                    method: &p.method,
                    path_and_query: &p.path_and_query,
                    original_host: None,
                    slot: &slot,
                    client_ip: caller.client_ip,
                    path: caller.path,
                };
                let mut log = LogFacts::default();
                let (resp, guard) =
                    send_with_retries(route, &dest, &call, headers, None, &[], &mut log).await?;
                let resp = finish_response(resp, guard, None, route, &dest.timeouts)?;
                Ok::<_, GatewayError>(agg.read(resp, p.timeout).await)
            };
            match tokio::time::timeout(p.timeout, call).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => CallOutcome::Failed(e),
                Err(_) => CallOutcome::Failed(GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("call `{}` took longer than {:?}", p.name, p.timeout),
                )),
            }
        }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    agg.merge(&prepared, outcomes)
}

/// Applies the route's response transform and compression, when it has them.
async fn shaped(
    shaper: Option<&crate::transform::Shaper>,
    resp: Response<ProxyBody>,
) -> Result<Response<ProxyBody>, GatewayError> {
    match shaper {
        Some(s) => s.apply(resp).await,
        None => Ok(resp),
    }
}

/// Adds what the gateway tells the upstream about the request: the forwarding headers and,
/// when given, the caller's identity.
fn forward_as_client(
    headers: &mut HeaderMap,
    settings: &Settings,
    conn: &ClientConn,
    original_host: Option<&HeaderValue>,
    request_id: &HeaderValue,
    identity: Option<&crate::policy::Identity>,
) {
    add_forwarding(headers, settings, conn, original_host, request_id);
    if let Some(identity) = identity {
        access::identify(headers, identity);
    }
}

/// Refreshes a cache entry in the background (`stale-while-revalidate`): the same upstream
/// call a client's request would make, through the same call policies, answering nobody.
#[allow(clippy::too_many_arguments)]
async fn refresh_entry(
    snap: Arc<Snapshot>,
    route_index: usize,
    upstream: Arc<str>,
    refresh: crate::cache::Refresh,
    path_and_query: String,
    original_host: Option<HeaderValue>,
    client_ip: IpAddr,
    path: String,
) {
    let Some(route) = snap.routes.get(route_index) else {
        return;
    };
    let dest = if *route.upstream.name == *upstream {
        Dest::of(route)
    } else {
        match Dest::named(&snap, route, &upstream) {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    let slot = BodySlot::buffered(bytes::Bytes::new());
    let call = Call {
        method: &Method::GET,
        path_and_query: &path_and_query,
        original_host,
        slot: &slot,
        client_ip,
        path: &path,
    };
    let headers = refresh.headers;
    let mut log = LogFacts::default();
    let sent = if route.chain.upstream.is_empty() {
        send_with_retries(route, &dest, &call, headers, None, &[], &mut log).await
    } else {
        guarded_send(&snap, route, &dest, &call, headers, false, &mut log).await
    };
    let Ok((resp, guard)) = sent else {
        return;
    };
    let Ok(resp) = finish_response(resp, guard, None, route, &dest.timeouts) else {
        return;
    };
    let limit = refresh.pending.max_object_bytes();
    let (resp, _) = refresh.pending.finish(resp);
    crate::cache::drain(resp.into_body(), limit, crate::cache::DRAIN_WITHIN).await;
}

/// Held until the response body ends: the target's in-flight count, the upstream's
/// concurrency permit and the bulkhead slot.
type ResponseGuard = (
    crate::upstream::Attempt,
    InFlight,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// Where a request goes: the route's upstream, or one a policy chose.
struct Dest<'a> {
    upstream: &'a Arc<crate::upstream::Upstream>,
    budget: &'a crate::snapshot::RetryBudget,
    timeouts: Cow<'a, turnpike_model::Timeouts>,
}

impl<'a> Dest<'a> {
    fn of(route: &'a CompiledRoute) -> Self {
        Self {
            upstream: &route.upstream,
            budget: &route.budget,
            timeouts: Cow::Borrowed(&route.timeouts),
        }
    }

    /// The upstream `name`, with the route's timeouts if it sets its own, else its own.
    fn named(
        snap: &'a Snapshot,
        route: &'a CompiledRoute,
        name: &str,
    ) -> Result<Self, GatewayError> {
        let (upstream, budget) = snap.upstreams.get(name).ok_or_else(|| {
            GatewayError::new(ErrorKind::Internal, "policy names an unknown upstream")
        })?;
        Ok(Self {
            upstream,
            budget,
            timeouts: if route.own_timeouts {
                Cow::Borrowed(&route.timeouts)
            } else {
                Cow::Borrowed(&upstream.config.timeouts)
            },
        })
    }
}

/// What every attempt of one request shares.
struct Call<'a> {
    method: &'a Method,
    path_and_query: &'a str,
    original_host: Option<HeaderValue>,
    slot: &'a BodySlot,
    client_ip: IpAddr,
    path: &'a str,
}

/// Sends through the route's upstream-call policies: bulkhead, circuit breaker, mirrors.
async fn guarded_send(
    snap: &Snapshot,
    route: &CompiledRoute,
    dest: &Dest<'_>,
    call: &Call<'_>,
    headers: HeaderMap,
    upgrade: bool,
    log: &mut LogFacts,
) -> Result<(Response<UpstreamBody>, ResponseGuard), GatewayError> {
    let up = &route.chain.upstream;
    let permit = match &up.bulkhead {
        Some(c) => match &c.policy {
            Policy::Bulkhead(b) => Some(b.acquire(&route.name, &dest.upstream.name).await?),
            _ => None,
        },
        None => None,
    };
    let breaker = up.breaker();
    let route_ticket = match breaker {
        Some(b) if !b.per_target() => Some(b.admit_route(&route.name).map_err(|wait| {
            resilience::circuit_open(
                wait,
                &format!("route `{}`", route.name),
                &mut log.response_headers,
            )
        })?),
        _ => None,
    };
    let target_breaker = breaker.filter(|b| b.per_target());

    // Mirrors get a copy of what goes upstream; an upgrade is a tunnel, not a request.
    let mut tees = Vec::new();
    if !upgrade {
        for c in &up.mirrors {
            let Policy::Mirror(m) = &c.policy else {
                continue;
            };
            let Some(mirror_slot) = m.pick() else {
                continue;
            };
            let Some((shadow, _)) = snap.upstreams.get(&m.cfg.upstream) else {
                continue;
            };
            let body = if call.slot.is_empty() {
                None
            } else if let Some(bytes) = call.slot.buffered_bytes() {
                // Read whole already (and resent whole on a retry): the copy is those bytes.
                if bytes.len() as u64 > m.cfg.max_body_bytes {
                    mirror_slot
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Some(body::full(bytes.clone()))
            } else {
                let (tx, body) = traffic::tee_channel();
                tees.push((tx, m.cfg.max_body_bytes));
                Some(body.boxed_unsync())
            };
            mirror(
                shadow.clone(),
                m.cfg.timeout,
                call,
                headers.clone(),
                body,
                mirror_slot,
            );
        }
    }

    let result = send_with_retries(route, dest, call, headers, target_breaker, &tees, log).await;
    if let Some(ticket) = route_ticket {
        let failed = match &result {
            Ok((resp, _)) => breaker.is_some_and(|b| b.is_failure(resp.status())),
            // The gateway's own limit (`pool.max_requests`) says nothing about the upstream.
            Err(e) => {
                e.kind.origin() == crate::error::Origin::Upstream
                    && e.kind != ErrorKind::UpstreamOverloaded
            }
        };
        ticket.record(failed);
    }
    result.map(|(resp, (attempt, in_flight, _))| (resp, (attempt, in_flight, permit)))
}

/// Sends a copy of the request to a shadow upstream and discards the answer. Never waits:
/// the copy runs on its own task, bounded by the mirror's timeout and in-flight limit.
fn mirror(
    shadow: Arc<crate::upstream::Upstream>,
    timeout: std::time::Duration,
    call: &Call<'_>,
    mut headers: HeaderMap,
    body: Option<ProxyBody>,
    slot: traffic::MirrorSlot,
) {
    let input_headers = headers.clone();
    let input = SelectInput {
        client_ip: call.client_ip,
        path: call.path,
        headers: &input_headers,
    };
    let Ok(target) = shadow.select(&input, &[]) else {
        slot.dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    let Ok(uri) = shadow
        .client
        .uri_for_target(&target, call.path_and_query.to_owned())
    else {
        slot.dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    if let Some(h) = target.host_header() {
        headers.insert(header::HOST, h.clone());
    }
    let mut req = Request::new(body.unwrap_or_else(body::empty));
    *req.method_mut() = call.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if shadow.config.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    tokio::spawn(async move {
        let attempt = shadow.begin(target);
        let done = tokio::time::timeout(timeout, async {
            let Ok(resp) = shadow.client.request(req).await else {
                return false;
            };
            // Read the answer to its end so the connection goes back to the pool.
            resp.into_body().collect().await.is_ok()
        })
        .await;
        drop(attempt);
        if !matches!(done, Ok(true)) {
            slot.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(upstream = %shadow.name, "mirrored request failed or timed out");
        }
        drop(slot);
    });
}

async fn send_with_retries(
    route: &CompiledRoute,
    dest: &Dest<'_>,
    call: &Call<'_>,
    mut headers: HeaderMap,
    target_breaker: Option<&Arc<resilience::Breaker>>,
    tees: &[(tokio::sync::mpsc::Sender<traffic::Chunk>, u64)],
    log: &mut LogFacts,
) -> Result<(Response<UpstreamBody>, ResponseGuard), GatewayError> {
    let upstream = dest.upstream;
    let cfg = &upstream.config;
    let method = call.method;
    let slot = call.slot;
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
    let timeouts = &dest.timeouts;
    let deadline = (!timeouts.total.is_zero()).then(|| Instant::now() + timeouts.total);
    dest.budget.record_request();

    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt_no in 0..max_attempts {
        let last = attempt_no + 1 == max_attempts;
        let input = SelectInput {
            client_ip: call.client_ip,
            path: call.path,
            headers: &headers,
        };
        let no_healthy = || {
            GatewayError::new(
                ErrorKind::NoHealthyUpstream,
                format!("no healthy target in upstream `{}`", upstream.name),
            )
        };
        let (target, ticket) = match target_breaker {
            None => (
                upstream.select(&input, &tried).map_err(|_| no_healthy())?,
                None,
            ),
            Some(b) => {
                let mut open = || {
                    resilience::circuit_open(
                        std::time::Duration::from_secs(1),
                        &format!("every target of upstream `{}`", upstream.name),
                        &mut log.response_headers,
                    )
                };
                let target =
                    match upstream.select_where(&input, &tried, &|t| b.target_available(t.addr)) {
                        Ok(t) => t,
                        // Healthy targets exist, but every one's breaker is open.
                        Err(_) if upstream.select(&input, &tried).is_ok() => return Err(open()),
                        Err(_) => return Err(no_healthy()),
                    };
                let ticket = b.admit_target(target.addr).map_err(|_| open())?;
                (target, Some(ticket))
            }
        };
        let permit = InFlight::acquire(upstream, cfg.pool.max_requests).ok_or_else(|| {
            GatewayError::new(
                ErrorKind::UpstreamOverloaded,
                format!("upstream `{}` is at its request limit", upstream.name),
            )
        })?;
        tried.push(target.addr);
        log.target = Some(target.addr);
        if log
            .upstream
            .as_ref()
            .is_none_or(|u| !Arc::ptr_eq(u, upstream))
        {
            log.upstream = Some(Arc::clone(upstream));
        }
        log.attempts = attempt_no + 1;

        let uri = upstream
            .client
            .uri_for_target(&target, call.path_and_query.to_owned())
            .map_err(|_| {
                GatewayError::new(ErrorKind::BadRequest, "request target cannot be forwarded")
            })?;
        let mut req_body = slot.attempt().boxed_unsync();
        if let Some(into) = &log.request_body {
            req_body = observe::CaptureRequestBody::new(req_body, Arc::clone(into)).boxed_unsync();
        }
        for (tx, max) in tees {
            req_body = traffic::Tee::new(req_body, tx.clone(), *max).boxed_unsync();
        }
        let mut req = Request::new(req_body);
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
            turnpike_model::UpstreamHost::Preserve => call.original_host.clone(),
            turnpike_model::UpstreamHost::Rewrite(h) => HeaderValue::from_str(h).ok(),
        };
        if let Some(h) = host {
            req.headers_mut().insert(header::HOST, h);
        }
        let traced = log.trace.as_mut().map(|t| {
            let (index, parent) = t.begin_attempt(&upstream.name, target.addr);
            req.headers_mut()
                .insert(&turnpike_observe::trace::TRACEPARENT, parent);
            index
        });

        let mut attempt = upstream.begin(target);
        let start = Instant::now();
        let mut limit = start + timeouts.read;
        if let Some(d) = deadline {
            limit = limit.min(d);
        }
        let result = tokio::time::timeout_at(limit, upstream.client.request(req)).await;
        log.upstream_time = Some(start.elapsed());
        if let Some(ticket) = ticket {
            let failed = match &result {
                Ok(Ok(resp)) => target_breaker.is_some_and(|b| b.is_failure(resp.status())),
                Ok(Err(e)) => client_body_error(e).is_none(),
                Err(_) => true,
            };
            ticket.record(failed);
        }
        let can_retry =
            |retry_safe: bool| !last && retry_safe && !slot.started() && dest.budget.try_retry();
        match result {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let failed = status.is_server_error();
                if failed
                    && idempotent
                    && cfg.retries.on_status.contains(&status.as_u16())
                    && can_retry(true)
                {
                    end_attempt(log, traced, Some(status.as_u16()), None, true);
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
                // Its body streams on to the client: the span ends with the request's.
                end_attempt(log, traced, Some(status.as_u16()), None, false);
                return Ok((resp, (attempt, permit, None)));
            }
            Ok(Err(e)) => {
                if let Some(kind) = client_body_error(&e) {
                    // The client's body broke the exchange; the target is not to blame.
                    drop(attempt);
                    end_attempt(log, traced, None, Some(kind.code()), true);
                    return Err(match kind {
                        ErrorKind::BodyTooLarge => {
                            GatewayError::new(kind, "request body is too large")
                        }
                        _ => GatewayError::new(kind, "client stopped sending the request body"),
                    });
                }
                attempt.finish(Outcome::Failure);
                let connect = e.is_connect();
                let why = if connect {
                    ErrorKind::UpstreamUnreachable
                } else {
                    ErrorKind::UpstreamError
                };
                end_attempt(log, traced, None, Some(why.code()), true);
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
                end_attempt(
                    log,
                    traced,
                    None,
                    Some(ErrorKind::UpstreamTimeout.code()),
                    true,
                );
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

/// Closes an attempt's client span, when the request is traced.
fn end_attempt(
    log: &mut LogFacts,
    index: Option<usize>,
    status: Option<u16>,
    error: Option<&'static str>,
    ended: bool,
) {
    if let (Some(t), Some(i)) = (log.trace.as_deref_mut(), index) {
        t.end_attempt(i, status, error, ended);
    }
}

fn finish_response(
    resp: Response<UpstreamBody>,
    guard: ResponseGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    route: &CompiledRoute,
    timeouts: &turnpike_model::Timeouts,
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
        IdleTimeoutBody::new(body, timeouts.read, || Box::new(UpstreamBodyTimeout)),
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
    // Time-ordered (UUIDv7): ids sort by arrival, and the call-log store's index on them
    // grows at its end instead of touching a random page per call.
    // Encoded into a stack buffer: `to_string` would go through the formatting machinery.
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
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
/// right-most entry of the configured header (`X-Forwarded-For`, or `Forwarded`'s `for=`)
/// that is not itself a trusted proxy.
fn client_ip(settings: &Settings, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !settings.is_trusted(peer) {
        return peer;
    }
    // A trusted proxy vouched for an entry we cannot read: the client is unknown. Answering
    // with the proxy's own (often allow-listed, internal) address would be wrong; `::` is in
    // no one's allow list and puts every such client in one rate-limit bucket.
    let unknown = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
    let mut candidate = peer;
    let forwarded = settings.client_ip_header == ClientIpHeader::Forwarded;
    let name = if forwarded {
        header::FORWARDED
    } else {
        HeaderName::from_static("x-forwarded-for")
    };
    for value in headers.get_all(name).iter().rev() {
        let Ok(s) = value.to_str() else {
            return unknown;
        };
        let entries: Vec<Option<&str>> = if forwarded {
            match forwarded_for(s) {
                Some(entries) => entries,
                None => return unknown,
            }
        } else {
            s.split(',').map(|p| Some(p.trim())).collect()
        };
        for part in entries.into_iter().rev() {
            let parsed = part.and_then(|part| {
                part.parse::<IpAddr>()
                    .ok()
                    .or_else(|| part.parse::<SocketAddr>().ok().map(|a| a.ip()))
                    .or_else(|| {
                        // `Forwarded` writes IPv6 in brackets; its port may be obfuscated
                        // (`_p`), which a socket address cannot parse.
                        match part.strip_prefix('[') {
                            Some(rest) => rest.split(']').next()?.parse().ok(),
                            None => part
                                .split_once(':')?
                                .0
                                .parse::<std::net::Ipv4Addr>()
                                .ok()
                                .map(IpAddr::V4),
                        }
                    })
            });
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

/// The `for=` value of each element of a `Forwarded` header value (RFC 7239 §4), unquoted;
/// `None` for an element without one. Commas and semicolons inside quoted strings do not
/// split, and empty elements are skipped. `None` for a value whose quoted string never
/// ends: the client opened it, and it would hide what the trusted proxy appended after.
fn forwarded_for(value: &str) -> Option<Vec<Option<&str>>> {
    let mut out = Vec::new();
    let mut found = None;
    let mut start = 0;
    let mut elem = 0;
    let mut quoted = false;
    let mut escaped = false;
    let bytes = value.as_bytes();
    for i in 0..=bytes.len() {
        let b = bytes.get(i).copied();
        if quoted {
            match b {
                _ if escaped => escaped = false,
                Some(b'\\') => escaped = true,
                Some(b'"') => quoted = false,
                _ => {}
            }
            if b.is_some() {
                continue;
            }
        }
        match b {
            Some(b'"') => quoted = true,
            Some(b';') | Some(b',') | None => {
                let pair = value.get(start..i).unwrap_or("").trim();
                if let Some((k, v)) = pair.split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                {
                    let v = v.trim();
                    found = Some(
                        v.strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v),
                    );
                }
                let element_ends = b != Some(b';');
                let empty = element_ends
                    && found.is_none()
                    && value.get(elem..i).is_none_or(|e| e.trim().is_empty());
                start = i + 1;
                if element_ends {
                    if !empty {
                        out.push(found.take());
                    }
                    elem = i + 1;
                }
            }
            _ => {}
        }
    }
    (!quoted).then_some(out)
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
            client_ip_header: ClientIpHeader::XForwardedFor,
            request_id_header: HeaderName::from_static("x-request-id"),
            via: Some(HeaderValue::from_static("1.1 turnpike")),
            limits: Default::default(),
        }
    }

    #[test]
    fn client_ip_from_forwarded_when_configured() {
        let mut s = settings(&["10.0.0.0/8"]);
        s.client_ip_header = ClientIpHeader::Forwarded;
        let ip = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::FORWARDED, HeaderValue::from_static(v));
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h)
        };
        let v4 = |a: &str| a.parse::<IpAddr>().unwrap();
        assert_eq!(ip("for=1.2.3.4"), v4("1.2.3.4"));
        // The right-most untrusted entry, across elements; parameters in any order and case;
        // empty elements skipped; obfuscated ports allowed.
        assert_eq!(
            ip("for=6.6.6.6, proto=https;For=1.2.3.4;by=10.9.9.9, for=10.1.1.1,"),
            v4("1.2.3.4")
        );
        assert_eq!(
            ip(r#"for="[2001:db8::1]:4711";proto=https"#),
            v4("2001:db8::1")
        );
        assert_eq!(ip(r#"for="1.2.3.4:80""#), v4("1.2.3.4"));
        assert_eq!(ip(r#"for="192.0.2.43:_p""#), v4("192.0.2.43"));
        // Obfuscated, `unknown` or missing: the client is unknown, not the proxy.
        for v in [
            "for=_hidden",
            "for=unknown",
            "proto=https",
            r#"for="a,b";x=1"#,
        ] {
            assert_eq!(ip(v), v4("::"), "{v}");
        }
        // A quote the client leaves open would swallow what the proxy appended after it.
        assert_eq!(ip(r#"for=6.6.6.6;x=", for=203.0.113.5"#), v4("::"));
        // Only the configured header is read: `X-Forwarded-For` is the client's own here.
        let mut h = HeaderMap::new();
        h.insert(header::FORWARDED, HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        assert_eq!(
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h),
            v4("1.2.3.4")
        );
        s.client_ip_header = ClientIpHeader::XForwardedFor;
        assert_eq!(
            client_ip(&s, "10.0.0.1".parse().unwrap(), &h),
            v4("6.6.6.6")
        );
        assert_eq!(
            client_ip(&s, "192.0.2.9".parse().unwrap(), &h),
            v4("192.0.2.9")
        );
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
    fn generated_request_ids_are_time_ordered() {
        let name = HeaderName::from_static("x-request-id");
        let ids: Vec<String> = (0..1000)
            .map(|_| {
                let v = request_id(&HeaderMap::new(), &name);
                v.to_str().unwrap().to_owned()
            })
            .collect();
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 7, "{id}");
        }
        // The call-log index on request_id relies on this: each id sorts after the last.
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }

    #[test]
    fn host_strips_port_and_case() {
        assert_eq!(strip_port("Example.com:8080"), "Example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
