//! The status endpoints (`/metrics`, `/healthz`, `/readyz`, `/version`) and the metrics read
//! from the data plane at scrape time: upstream target health and load, circuit breaker
//! states, the snapshot version and reloads.
//!
//! [`Status`] answers the endpoints for any listener that hands it a request: the Admin API
//! listener (the binary routes these paths to it before anything else, so they answer while
//! the store is down) and the optional dedicated listener (`observability.metrics.listen`),
//! which [`serve`] runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio_util::sync::CancellationToken;
use turnpike_observe::metrics::{BuildInfo, Metrics};

use crate::policy::resilience::BreakerState;
use crate::proxy::Shared;

/// The paths [`Status::respond`] answers.
pub const PATHS: [&str; 4] = ["/metrics", "/healthz", "/readyz", "/version"];

/// Something `/readyz` must find working besides the gateway itself (the management store).
pub trait ReadinessCheck: Send + Sync + 'static {
    /// The check's name in `/readyz` answers (`store`).
    fn name(&self) -> &'static str;
    /// `Ok` when ready; otherwise what is wrong. Must bound its own wait.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Configuration reloads, counted for `turnpike_config_reloads_total`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    last_ok_unix: AtomicU64,
}

impl ReloadStats {
    /// A reload that was applied.
    pub fn succeeded(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_ok_unix.store(now, Ordering::Relaxed);
    }

    /// A reload that was refused or could not be attempted (store unreadable).
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// (applied, failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Answers the status endpoints.
pub struct Status {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    readiness: RwLock<Option<Arc<dyn ReadinessCheck>>>,
    draining: CancellationToken,
    started: Instant,
}

/// A status endpoint's response.
pub type StatusResponse = Response<Full<Bytes>>;

impl Status {
    pub(crate) fn new(
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        draining: CancellationToken,
    ) -> Self {
        Self {
            shared,
            metrics,
            readiness: RwLock::new(None),
            draining,
            started: Instant::now(),
        }
    }

    /// Adds a check `/readyz` runs (replacing the previous one).
    pub fn set_readiness_check(&self, check: Arc<dyn ReadinessCheck>) {
        if let Ok(mut slot) = self.readiness.write() {
            *slot = Some(check);
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The answer for `path`, or `None` when it is not a status path.
    pub async fn respond(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<StatusResponse> {
        if !PATHS.contains(&path) {
            return None;
        }
        let rid = request_id(headers);
        if *method != Method::GET && *method != Method::HEAD {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{method} is not allowed here; use GET"),
                &rid,
                None,
            );
            resp.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return Some(resp);
        }
        Some(match path {
            "/metrics" => match self.metrics.render() {
                Ok(text) => reply(
                    StatusCode::OK,
                    turnpike_observe::metrics::CONTENT_TYPE,
                    text.into(),
                    &rid,
                ),
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the metrics could not be rendered",
                    &rid,
                    None,
                ),
            },
            "/healthz" => {
                let info = BuildInfo::current();
                json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "status": "ok",
                        "version": info.version,
                        "uptime_seconds": self.started.elapsed().as_secs(),
                    }),
                    &rid,
                )
            }
            "/version" => {
                let info = BuildInfo::current();
                let mut body = serde_json::json!({"version": info.version});
                if let Some(c) = info.commit {
                    body["commit"] = c.into();
                }
                if let Some(r) = info.rustc {
                    body["rustc"] = r.into();
                }
                json(StatusCode::OK, &body, &rid)
            }
            _ => self.ready(&rid).await,
        })
    }

    async fn ready(&self, rid: &str) -> StatusResponse {
        let version = self.shared.snapshot.load().version;
        let mut checks = vec![serde_json::json!({
            "name": "snapshot", "ok": true, "detail": format!("version {version} loaded"),
        })];
        let mut failing = Vec::new();
        if self.draining.is_cancelled() {
            failing.push("draining: the gateway is shutting down".to_owned());
            checks.push(serde_json::json!({
                "name": "draining", "ok": false, "detail": "the gateway is shutting down",
            }));
        }
        // A dependency check (the store) never makes the node unready: the gateway keeps
        // serving its last snapshot without it, and a store outage must not take every node
        // out of a load balancer at once. It shows as `degraded`.
        let mut degraded = false;
        let check = self.readiness.read().ok().and_then(|c| c.clone());
        if let Some(check) = check {
            match check.check().await {
                Ok(()) => checks.push(serde_json::json!({"name": check.name(), "ok": true})),
                Err(e) => {
                    degraded = true;
                    checks
                        .push(serde_json::json!({"name": check.name(), "ok": false, "detail": e}));
                }
            }
        }
        if failing.is_empty() {
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "status": if degraded { "degraded" } else { "ready" },
                    "checks": checks,
                }),
                rid,
            )
        } else {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                &format!("not ready: {}", failing.join("; ")),
                rid,
                Some(serde_json::Value::Array(checks)),
            )
        }
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes, rid: &str) -> StatusResponse {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if let Ok(v) = http::HeaderValue::from_str(rid) {
        h.insert("x-request-id", v);
    }
    resp
}

fn json(status: StatusCode, body: &serde_json::Value, rid: &str) -> StatusResponse {
    reply(
        status,
        "application/json",
        Bytes::from(body.to_string()),
        rid,
    )
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    rid: &str,
    checks: Option<serde_json::Value>,
) -> StatusResponse {
    let mut body = serde_json::json!({"error": {
        "code": code, "message": message, "request_id": rid,
    }});
    if let Some(c) = checks {
        body["checks"] = c;
    }
    json(status, &body, rid)
}

/// Serves the status endpoints on `listener` (HTTP/1.1) until `stop` is cancelled; any other
/// path answers 404 `route_not_found`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "status listener: accept failed");
                    // Out of file descriptors and the like: give the process a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let status = status.clone();
                    async move {
                        let resp = match status
                            .respond(req.method(), req.uri().path(), req.headers())
                            .await
                        {
                            Some(r) => r,
                            None => error(
                                StatusCode::NOT_FOUND,
                                "route_not_found",
                                "the status listener serves /metrics, /healthz, /readyz and /version",
                                &request_id(req.headers()),
                                None,
                            ),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Reads the data plane's live state at every scrape.
pub(crate) struct DataPlaneCollector {
    pub(crate) shared: Weak<Shared>,
    pub(crate) reloads: Arc<ReloadStats>,
}

impl std::fmt::Debug for DataPlaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneCollector").finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric's samples, encoded under one descriptor.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels, M)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// The observability sinks' own counters: what each delivered, dropped (queue full) and
/// lost (destination failed), and its queue now. A sink is named by `sink` and `kind`.
fn sink_metrics(
    encoder: &mut DescriptorEncoder,
    stats: &[turnpike_observe::SinkStats],
) -> Result<(), std::fmt::Error> {
    if stats.is_empty() {
        return Ok(());
    }
    let mut events = Vec::new();
    let mut queued = Vec::new();
    for s in stats {
        let labels = |outcome: Option<&str>| {
            let mut l = vec![("sink", s.name.clone()), ("kind", s.kind.to_owned())];
            l.extend(outcome.map(|o| ("outcome", o.to_owned())));
            l
        };
        for (outcome, n) in [
            ("sent", s.sent),
            ("dropped", s.dropped),
            ("failed", s.failed),
        ] {
            events.push((labels(Some(outcome)), ConstCounter::new(n)));
        }
        queued.push((labels(None), ConstGauge::new(gauge_of(s.queued))));
    }
    family(
        encoder,
        "turnpike_observability_sink_records",
        "Records each observability sink delivered (sent), dropped because its queue was full, or lost because its destination failed.",
        MetricType::Counter,
        &events,
    )?;
    family(
        encoder,
        "turnpike_observability_sink_queued",
        "Records waiting in each observability sink's queue.",
        MetricType::Gauge,
        &queued,
    )
}

impl Collector for DataPlaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (ok, failed) = self.reloads.counts();
        family(
            &mut encoder,
            "turnpike_config_reloads",
            "Configuration reloads, by result (a failure leaves the running configuration).",
            MetricType::Counter,
            &[
                (
                    vec![("result", "success".to_owned())],
                    ConstCounter::new(ok),
                ),
                (
                    vec![("result", "failure".to_owned())],
                    ConstCounter::new(failed),
                ),
            ],
        )?;
        let last = self.reloads.last_ok_unix.load(Ordering::Relaxed);
        if last > 0 {
            let g = ConstGauge::new(last as i64);
            g.encode(encoder.encode_descriptor(
                "turnpike_config_last_reload_success_timestamp_seconds",
                "When the configuration was last reloaded successfully (Unix time).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        sink_metrics(&mut encoder, &shared.observer.sink_stats())?;
        let snap = shared.snapshot.load_full();
        let version = ConstGauge::new(i64::try_from(snap.version).unwrap_or(i64::MAX));
        version.encode(encoder.encode_descriptor(
            "turnpike_config_version",
            "Version of the configuration snapshot being served.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut healthy = Vec::new();
        let mut available = Vec::new();
        let mut target_load = Vec::new();
        let mut pool_load = Vec::new();
        let mut pool_max = Vec::new();
        let upstreams: BTreeMap<&String, _> =
            snap.upstreams.iter().map(|(k, v)| (k, &v.0)).collect();
        for (name, up) in upstreams {
            for t in up.targets() {
                let labels = vec![("upstream", name.clone()), ("target", t.addr.to_string())];
                healthy.push((labels.clone(), ConstGauge::new(i64::from(t.is_healthy()))));
                available.push((labels.clone(), ConstGauge::new(i64::from(t.is_available()))));
                target_load.push((labels, ConstGauge::new(gauge_of(t.in_flight()))));
            }
            let labels = vec![("upstream", name.clone())];
            pool_load.push((
                labels.clone(),
                ConstGauge::new(gauge_of(up.in_flight.load(Ordering::Relaxed))),
            ));
            if up.config.pool.max_requests > 0 {
                pool_max.push((
                    labels,
                    ConstGauge::new(gauge_of(up.config.pool.max_requests)),
                ));
            }
        }
        family(
            &mut encoder,
            "turnpike_upstream_target_healthy",
            "1 while active health checks pass for the target (targets start healthy).",
            MetricType::Gauge,
            &healthy,
        )?;
        family(
            &mut encoder,
            "turnpike_upstream_target_available",
            "1 when the target may receive traffic: healthy, not ejected, weight above 0.",
            MetricType::Gauge,
            &available,
        )?;
        family(
            &mut encoder,
            "turnpike_upstream_target_in_flight",
            "Requests in flight to the target (until their response body ends).",
            MetricType::Gauge,
            &target_load,
        )?;
        family(
            &mut encoder,
            "turnpike_upstream_in_flight",
            "Requests in flight to the upstream pool.",
            MetricType::Gauge,
            &pool_load,
        )?;
        family(
            &mut encoder,
            "turnpike_upstream_max_requests",
            "The pool's `pool.max_requests` limit, where one is set.",
            MetricType::Gauge,
            &pool_max,
        )?;

        let mut breakers = Vec::new();
        for route in &snap.routes {
            let Some(b) = route.chain.upstream.breaker() else {
                continue;
            };
            let states: Vec<(String, BreakerState)> = if b.per_target() {
                let mut s: Vec<_> = b
                    .target_states()
                    .into_iter()
                    .map(|(a, st)| (a.to_string(), st))
                    .collect();
                s.sort_by(|a, b| a.0.cmp(&b.0));
                s
            } else {
                vec![(String::new(), b.route_state(&route.name))]
            };
            for (target, state) in states {
                for (name, s) in [
                    ("closed", BreakerState::Closed),
                    ("open", BreakerState::Open),
                    ("half_open", BreakerState::HalfOpen),
                ] {
                    breakers.push((
                        vec![
                            ("route", route.name.to_string()),
                            ("target", target.clone()),
                            ("state", name.to_owned()),
                        ],
                        ConstGauge::new(i64::from(state == s)),
                    ));
                }
            }
        }
        family(
            &mut encoder,
            "turnpike_circuit_breaker_state",
            "1 for the breaker's current state (closed, open, half_open); per route, or per target for `per: target` breakers.",
            MetricType::Gauge,
            &breakers,
        )?;
        Ok(())
    }
}

fn gauge_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The address a status listener is bound to, for logs and tests.
pub(crate) fn bound(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
