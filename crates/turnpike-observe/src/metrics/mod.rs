//! Prometheus metrics: counters and histograms fed by every [`CallEvent`], plus collectors
//! that read live state (the process, and whatever the data plane registers) at scrape time.
//!
//! [`Metrics`] is a [`CallSink`]: [`CallSink::offer`] finds the call's series (one
//! lock-free lookup; a lock only the first time a route, service and upstream are seen) and
//! bumps atomics, so it never waits on I/O. Every label value is bounded: service, route and upstream names come from
//! the configuration, methods outside the standard set are `other`, error codes are the
//! gateway's fixed list, and applications (opt-in) are capped, the rest counted as `other`.

pub mod process;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::{CallEvent, CallSink};

/// The `Content-Type` of [`Metrics::render`]'s output (OpenMetrics text, which Prometheus
/// prefers and negotiates by default).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label value applications past `max_applications` are counted under.
pub const OTHER: &str = "other";

/// How the request metrics are labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsOptions {
    /// Count requests at all (the [`CallSink`] side). Off: only collectors are exported.
    pub count_requests: bool,
    /// Add an `application` label to request and byte counters.
    pub per_application: bool,
    /// The most distinct applications labelled; later ones become [`OTHER`].
    pub max_applications: usize,
    /// Latency histogram bounds in seconds, increasing.
    pub buckets: Vec<f64>,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            count_requests: true,
            per_application: false,
            max_applications: 1000,
            buckets: vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
            ],
        }
    }
}

/// Version and build facts, exported as `turnpike_build_info` and served by `/version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// The crate version.
    pub version: &'static str,
    /// The Git commit, when the build set `TURNPIKE_GIT_COMMIT`.
    pub commit: Option<&'static str>,
    /// The compiler, when the build set `TURNPIKE_RUSTC_VERSION`.
    pub rustc: Option<&'static str>,
}

impl BuildInfo {
    /// This build.
    pub const fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            commit: option_env!("TURNPIKE_GIT_COMMIT"),
            rustc: option_env!("TURNPIKE_RUSTC_VERSION"),
        }
    }
}

/// The gateway's metrics registry and request-metrics sink.
pub struct Metrics {
    registry: Registry,
    per_application: bool,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, AtomicHistogram, Buckets>,
    upstream_duration: Family<UpstreamLabels, AtomicHistogram, Buckets>,
    bytes_in: Family<TrafficLabels, Counter>,
    bytes_out: Family<TrafficLabels, Counter>,
    errors: Family<CodeLabels, Counter>,
    auth_rejections: Family<CodeLabels, Counter>,
    rate_limit_rejections: Family<CodeLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    aborted: Family<RouteLabels, Counter>,
    retries: Family<UpstreamOnly, Counter>,
    applications: AppBound,
    empty: Arc<str>,
    /// The series each (route, service, upstream, application) feeds, so a request finds
    /// them with one lookup instead of hashing a label set and locking each family.
    series: SeriesIndex,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("per_application", &self.per_application)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with the request metrics (when `options.count_requests`), build info,
    /// process metrics, and `collectors` (read at every scrape).
    pub fn new(options: &MetricsOptions, collectors: Vec<Box<dyn Collector>>) -> Self {
        let buckets = Buckets(options.buckets.iter().copied().collect());
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            per_application: options.per_application,
            requests: Family::default(),
            duration: Family::new_with_constructor(buckets.clone()),
            upstream_duration: Family::new_with_constructor(buckets),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            errors: Family::default(),
            auth_rejections: Family::default(),
            rate_limit_rejections: Family::default(),
            cache: Family::default(),
            aborted: Family::default(),
            retries: Family::default(),
            applications: AppBound::new(options.max_applications),
            empty: Arc::from(""),
            series: SeriesIndex::default(),
        };
        if options.count_requests {
            registry.register(
                "turnpike_http_requests",
                "Requests answered, by service, route, method and status class.",
                m.requests.clone(),
            );
            registry.register(
                "turnpike_http_request_duration_seconds",
                "Time from a request's arrival to the end of its response body.",
                m.duration.clone(),
            );
            registry.register(
                "turnpike_upstream_duration_seconds",
                "Time from sending to the upstream to its response headers (last attempt).",
                m.upstream_duration.clone(),
            );
            registry.register(
                "turnpike_http_request_bytes",
                "Request body bytes received from clients.",
                m.bytes_in.clone(),
            );
            registry.register(
                "turnpike_http_response_bytes",
                "Response body bytes sent to clients.",
                m.bytes_out.clone(),
            );
            registry.register(
                "turnpike_gateway_errors",
                "Responses the gateway answered with an error, by error code.",
                m.errors.clone(),
            );
            registry.register(
                "turnpike_auth_rejections",
                "Requests refused by authentication or authorization, by error code.",
                m.auth_rejections.clone(),
            );
            registry.register(
                "turnpike_rate_limit_rejections",
                "Requests refused by a rate limit or a quota, by error code.",
                m.rate_limit_rejections.clone(),
            );
            registry.register(
                "turnpike_cache_requests",
                "Response cache lookups, by result (hit, miss, stale, bypass).",
                m.cache.clone(),
            );
            registry.register(
                "turnpike_http_responses_aborted",
                "Responses whose body was not sent to the end (client gone, stream failed).",
                m.aborted.clone(),
            );
            registry.register(
                "turnpike_upstream_retries",
                "Upstream attempts beyond the first.",
                m.retries.clone(),
            );
        }
        let info = BuildInfo::current();
        let build: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
        let mut labels = vec![("version", info.version)];
        labels.extend(info.commit.map(|c| ("commit", c)));
        labels.extend(info.rustc.map(|r| ("rustc", r)));
        build.get_or_create(&labels).set(1);
        registry.register(
            "turnpike_build_info",
            "Always 1; the labels describe the build.",
            build,
        );
        registry.register_collector(Box::new(process::ProcessCollector));
        for c in collectors {
            registry.register_collector(c);
        }
        Self { registry, ..m }
    }

    /// The exposition text of every metric (OpenMetrics, see [`CONTENT_TYPE`]).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    fn label(&self, v: Option<&Arc<str>>) -> Arc<str> {
        v.cloned().unwrap_or_else(|| Arc::clone(&self.empty))
    }
}

impl CallSink for Metrics {
    fn offer(&self, e: &Arc<CallEvent>) {
        self.with_series(e, |series| self.count(e, series));
    }
}

impl Metrics {
    /// Counts `e` into its series and the families.
    fn count(&self, e: &CallEvent, series: &Series) {
        let (method, class) = (method_index(&e.method), status_index(e.status));
        let application = self
            .per_application
            .then(|| self.applications.label(e.application.as_ref(), &self.empty));
        // With application labels a route has as many label sets as applications (up to
        // the cap): those go through the families' own hashed lookup instead of a handle
        // per combination.
        let cached = application.is_none();
        let requests = || RequestLabels {
            service: series.service.clone(),
            route: series.route.clone(),
            method: METHODS[method],
            status_class: STATUS_CLASSES[class],
            application: application.clone(),
        };
        bump(
            &self.requests,
            &series.requests[method][class],
            cached,
            requests,
            1,
        );
        let traffic = || TrafficLabels {
            service: series.service.clone(),
            route: series.route.clone(),
            application: application.clone(),
        };
        if e.bytes_in > 0 {
            bump(
                &self.bytes_in,
                &series.bytes_in,
                cached,
                traffic,
                e.bytes_in,
            );
        }
        if e.bytes_out > 0 {
            bump(
                &self.bytes_out,
                &series.bytes_out,
                cached,
                traffic,
                e.bytes_out,
            );
        }
        series.duration.observe_us(e.duration_us);
        if let (Some(upstream), Some(us)) = (&series.upstream, e.upstream_us) {
            series
                .upstream_duration
                .get_or_init(|| {
                    self.upstream_duration
                        .get_or_create(&UpstreamLabels {
                            service: series.service.clone(),
                            route: series.route.clone(),
                            upstream: upstream.clone(),
                        })
                        .clone()
                })
                .observe_us(us);
        }
        // The rest happens on few requests (retries, errors, cached routes, aborted
        // responses): the families are used directly.
        let service = &series.service;
        let route = &series.route;
        if let Some(upstream) = &e.upstream {
            if e.attempts > 1 {
                self.retries
                    .get_or_create(&UpstreamOnly {
                        upstream: upstream.clone(),
                    })
                    .inc_by(u64::from(e.attempts - 1));
            }
        }
        if let Some(code) = e.error {
            let labels = CodeLabels {
                service: service.clone(),
                route: route.clone(),
                code,
            };
            match rejection_kind(code) {
                Some(Rejection::Auth) => {
                    self.auth_rejections.get_or_create(&labels).inc();
                }
                Some(Rejection::RateLimit) => {
                    self.rate_limit_rejections.get_or_create(&labels).inc();
                }
                None => {}
            }
            self.errors.get_or_create(&labels).inc();
        }
        if let Some(result) = e.cache {
            self.cache
                .get_or_create(&CacheLabels {
                    service: service.clone(),
                    route: route.clone(),
                    result: cache_label(result),
                })
                .inc();
        }
        if !e.completed {
            self.aborted
                .get_or_create(&RouteLabels {
                    service: service.clone(),
                    route: route.clone(),
                })
                .inc();
        }
    }

    /// Runs `f` on the series `e` feeds, made on first use. Finding it takes no lock and
    /// touches no shared reference count.
    fn with_series<R>(&self, e: &CallEvent, f: impl FnOnce(&Series) -> R) -> R {
        {
            let map = self.series.map.load();
            if let Some(found) = map
                .get(e.route.as_deref().unwrap_or(""))
                .and_then(|all| all.iter().find(|s| s.is_for(e)))
            {
                return f(found);
            }
        }
        let made = self.make_series(e);
        f(&made)
    }

    /// The series for `e`, added to the index unless another thread just did. The index is
    /// copied whole: it grows with the configuration (routes and their upstreams), not with
    /// traffic, and the copy happens once per new combination.
    fn make_series(&self, e: &CallEvent) -> Arc<Series> {
        let _one_writer = self.series.grow.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.series.map.load_full();
        if let Some(found) = current
            .get(e.route.as_deref().unwrap_or(""))
            .and_then(|all| all.iter().find(|s| s.is_for(e)))
        {
            return Arc::clone(found);
        }
        let labels = RouteLabels {
            service: self.label(e.service.as_ref()),
            route: self.label(e.route.as_ref()),
        };
        let made = Arc::new(Series {
            duration: self.duration.get_or_create(&labels).clone(),
            service: labels.service,
            route: labels.route,
            upstream: e.upstream.clone(),
            requests: Default::default(),
            bytes_in: OnceLock::new(),
            bytes_out: OnceLock::new(),
            upstream_duration: OnceLock::new(),
        });
        let mut next = HashMap::clone(&current);
        next.entry(Arc::clone(&made.route))
            .or_default()
            .push(Arc::clone(&made));
        self.series.map.store(Arc::new(next));
        made
    }
}

/// Adds `by` to `family`'s counter for `labels`: through the series' `handle` when
/// `cached`, else by looking the labels up.
fn bump<S: Clone + std::hash::Hash + Eq>(
    family: &Family<S, Counter>,
    handle: &OnceLock<Counter>,
    cached: bool,
    labels: impl Fn() -> S,
    by: u64,
) {
    if cached {
        handle
            .get_or_init(|| family.get_or_create(&labels()).clone())
            .inc_by(by);
    } else {
        family.get_or_create(&labels()).inc_by(by);
    }
}

/// Which rejection counter an error code also goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Authentication or authorization refused the request.
    Auth,
    /// A rate limit or quota refused it.
    RateLimit,
}

/// The rejection family of a gateway error code, if it is one.
pub fn rejection_kind(code: &str) -> Option<Rejection> {
    match code {
        "credential_missing"
        | "credential_invalid"
        | "subscription_required"
        | "access_denied"
        | "insufficient_scope"
        | "auth_unavailable" => Some(Rejection::Auth),
        "rate_limited" | "quota_exceeded" | "rate_limiter_unavailable" => {
            Some(Rejection::RateLimit)
        }
        _ => None,
    }
}

/// The `method` label: the standard methods, anything else `other` (methods are client
/// input and would otherwise be unbounded).
pub fn method_label(m: &str) -> &'static str {
    METHODS[method_index(m)]
}

/// Every value [`method_label`] gives, in [`method_index`] order.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", OTHER,
];

/// Where `m`'s label is in [`METHODS`]: the standard methods by name, anything else
/// `other`. Byte patterns compile to a length switch and inline compares, where a search
/// of the list called `memcmp` per request.
fn method_index(m: &str) -> usize {
    match m.as_bytes() {
        b"GET" => 0,
        b"HEAD" => 1,
        b"POST" => 2,
        b"PUT" => 3,
        b"DELETE" => 4,
        b"PATCH" => 5,
        b"OPTIONS" => 6,
        b"CONNECT" => 7,
        b"TRACE" => 8,
        _ => METHODS.len() - 1,
    }
}

/// Every value [`status_class`] gives, in [`status_index`] order.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", OTHER];

/// Where `status`'s class is in [`STATUS_CLASSES`].
fn status_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => STATUS_CLASSES.len() - 1,
    }
}

/// The request series of one (service, route, upstream): handles on the families' own
/// metrics, so counting through them is what the families export.
struct Series {
    service: Arc<str>,
    route: Arc<str>,
    upstream: Option<Arc<str>>,
    /// By [`METHODS`] then [`STATUS_CLASSES`]; made on first use, so only label sets
    /// that occurred are exported. Unused with application labels (see `count`).
    requests: [[OnceLock<Counter>; STATUS_CLASSES.len()]; METHODS.len()],
    duration: AtomicHistogram,
    /// Unused with application labels, like `requests`.
    bytes_in: OnceLock<Counter>,
    bytes_out: OnceLock<Counter>,
    upstream_duration: OnceLock<AtomicHistogram>,
}

impl Series {
    /// Whether `e` is counted here; the route was the index's key.
    fn is_for(&self, e: &CallEvent) -> bool {
        let service = match &e.service {
            Some(s) => same(&self.service, s),
            None => self.service.is_empty(),
        };
        service
            && match (&self.upstream, &e.upstream) {
                (Some(a), Some(b)) => same(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}

/// Whether two labels are equal. The gateway hands out the same shared name for a pool or
/// service on every request, so the text is rarely compared (a comparison per request
/// showed in the profiles of `bench/run.sh observe`).
fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The [`Series`] made so far, by route label. Read without a lock on every request;
/// replaced whole (under `grow`) when a new combination appears, which the configuration
/// keeps rare and finite.
#[derive(Default)]
struct SeriesIndex {
    /// Keyed by configured route names, not client input, so a fast hash is enough; it
    /// runs on every request.
    map: ArcSwap<HashMap<Arc<str>, Vec<Arc<Series>>, foldhash::fast::RandomState>>,
    grow: Mutex<()>,
}

/// A latency histogram counted with atomics alone. prometheus-client's own histogram
/// takes a mutex per observation, which the worker threads contend for on every
/// request; this one exports the same buckets, count and sum.
#[derive(Clone, Debug)]
struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds in seconds, increasing, the last one `+Inf`.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// Sum of the observations in microseconds.
    sum_us: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with these upper bounds (seconds; `+Inf` is added).
    fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds
            .into_iter()
            .filter(|b| b.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramCells {
            bounds,
            counts,
            sum_us: AtomicU64::new(0),
        }))
    }

    /// Counts one observation of `us` microseconds.
    fn observe_us(&self, us: u64) {
        let seconds = us as f64 / 1e6;
        let cells = &*self.0;
        let i = cells
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(cells.bounds.len() - 1);
        if let Some(c) = cells.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        cells.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let cells = &*self.0;
        let buckets: Vec<(f64, u64)> = cells
            .bounds
            .iter()
            .zip(cells.counts.iter())
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so a scrape racing an observation stays
        // consistent with its own buckets.
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = cells.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The `status_class` label: `1xx` to `5xx`.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_index(status)]
}

fn cache_label(v: &str) -> &'static str {
    match v {
        "HIT" => "hit",
        "MISS" => "miss",
        "STALE" => "stale",
        "REVALIDATED" => "revalidated",
        "BYPASS" => "bypass",
        _ => OTHER,
    }
}

/// The application label values handed out so far, at most `max`.
struct AppBound {
    max: usize,
    seen: RwLock<HashSet<Arc<str>>>,
    other: Arc<str>,
}

impl AppBound {
    fn new(max: usize) -> Self {
        Self {
            max,
            seen: RwLock::new(HashSet::new()),
            other: Arc::from(OTHER),
        }
    }

    fn label(&self, app: Option<&Arc<str>>, none: &Arc<str>) -> Arc<str> {
        let Some(app) = app else {
            return Arc::clone(none);
        };
        {
            let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
            if let Some(known) = seen.get(app) {
                return Arc::clone(known);
            }
            if seen.len() >= self.max {
                return Arc::clone(&self.other);
            }
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.len() < self.max {
            seen.insert(Arc::clone(app));
            Arc::clone(app)
        } else if seen.contains(app) {
            Arc::clone(app)
        } else {
            Arc::clone(&self.other)
        }
    }
}

#[derive(Clone, Debug)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<AtomicHistogram> for Buckets {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::new(self.0.iter().copied())
    }
}

fn put(enc: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), std::fmt::Error> {
    (key, value).encode(enc.encode_label())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RequestLabels {
    service: Arc<str>,
    route: Arc<str>,
    method: &'static str,
    status_class: &'static str,
    application: Option<Arc<str>>,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)?;
        put(enc, "method", self.method)?;
        put(enc, "status_class", self.status_class)?;
        if let Some(a) = &self.application {
            put(enc, "application", a)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RouteLabels {
    service: Arc<str>,
    route: Arc<str>,
}

impl EncodeLabelSet for RouteLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TrafficLabels {
    service: Arc<str>,
    route: Arc<str>,
    application: Option<Arc<str>>,
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)?;
        if let Some(a) = &self.application {
            put(enc, "application", a)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct UpstreamLabels {
    service: Arc<str>,
    route: Arc<str>,
    upstream: Arc<str>,
}

impl EncodeLabelSet for UpstreamLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)?;
        put(enc, "upstream", &self.upstream)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct UpstreamOnly {
    upstream: Arc<str>,
}

impl EncodeLabelSet for UpstreamOnly {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "upstream", &self.upstream)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CodeLabels {
    service: Arc<str>,
    route: Arc<str>,
    code: &'static str,
}

impl EncodeLabelSet for CodeLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)?;
        put(enc, "code", self.code)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CacheLabels {
    service: Arc<str>,
    route: Arc<str>,
    result: &'static str,
}

impl EncodeLabelSet for CacheLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(enc, "service", &self.service)?;
        put(enc, "route", &self.route)?;
        put(enc, "result", self.result)
    }
}

/// Reads one sample from exposition text: the value of the line for `name` whose labels
/// include every `labels` pair. For tests and tools that check a scrape.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels_part, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (l, v) = r.split_once("} ")?;
                (l, v)
            }
            None => ("", rest.strip_prefix(' ')?),
        };
        let all = labels
            .iter()
            .all(|(k, v)| labels_part.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::net::IpAddr;

    fn event(status: u16, app: Option<&str>) -> Arc<CallEvent> {
        Arc::new(CallEvent {
            time_unix_ms: 0,
            request_id: "r".into(),
            trace_id: None,
            span_id: None,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            listener: None,
            protocol: "HTTP/1.1",
            method: "BREW".into(),
            host: None,
            path: "/".into(),
            query: None,
            route: Some(Arc::from("r1")),
            service: None,
            application: app.map(Arc::from),
            application_name: None,
            team: None,
            status,
            bytes_in: 3,
            bytes_out: 5,
            duration_us: 20_000,
            upstream_us: Some(7_000),
            upstream: Some(Arc::from("up")),
            upstream_target: None,
            attempts: 2,
            cache: Some("HIT"),
            error: (status == 429).then_some("rate_limited"),
            user_agent: None,
            completed: status != 499,
            request_headers: None,
            response_headers: None,
            request_body: None,
            response_body: None,
            trace: None,
            redact: None,
        })
    }

    #[test]
    fn events_become_bounded_series() {
        let m = Metrics::new(
            &MetricsOptions {
                per_application: true,
                max_applications: 2,
                ..MetricsOptions::default()
            },
            Vec::new(),
        );
        for app in ["a", "b", "c", "d", "a"] {
            m.offer(&event(200, Some(app)));
        }
        m.offer(&event(429, None));
        m.offer(&event(499, Some("a")));
        let text = m.render().unwrap();
        let req = |app: &str, class: &str| {
            sample(
                &text,
                "turnpike_http_requests_total",
                &[
                    ("application", app),
                    ("status_class", class),
                    ("method", "other"),
                ],
            )
        };
        assert_eq!(req("a", "2xx"), Some(2.0));
        assert_eq!(req("b", "2xx"), Some(1.0));
        assert_eq!(req("other", "2xx"), Some(2.0), "c and d past the cap");
        assert_eq!(req("", "4xx"), Some(1.0), "the 429 was unidentified");
        assert_eq!(req("a", "4xx"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                "turnpike_rate_limit_rejections_total",
                &[("code", "rate_limited")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_gateway_errors_total",
                &[("code", "rate_limited")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_http_request_duration_seconds_count",
                &[("route", "r1")]
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_http_request_duration_seconds_bucket",
                &[("route", "r1"), ("le", "0.01")]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_http_request_duration_seconds_bucket",
                &[("route", "r1"), ("le", "0.025")]
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_upstream_duration_seconds_bucket",
                &[("upstream", "up"), ("le", "0.01")]
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "turnpike_cache_requests_total", &[("result", "hit")]),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "turnpike_upstream_retries_total", &[]),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "turnpike_http_responses_aborted_total", &[]),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "turnpike_http_response_bytes_total",
                &[("application", "a")]
            ),
            Some(15.0)
        );
        assert!(text.contains("turnpike_build_info{version=\""));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn without_request_counting_only_state_is_exported() {
        let m = Metrics::new(
            &MetricsOptions {
                count_requests: false,
                ..MetricsOptions::default()
            },
            Vec::new(),
        );
        let text = m.render().unwrap();
        assert!(!text.contains("turnpike_http_requests"));
        assert!(text.contains("turnpike_build_info"));
        #[cfg(target_os = "linux")]
        assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    }

    #[test]
    fn atomic_histogram_exports_what_the_library_histogram_does() {
        use prometheus_client::metrics::histogram::Histogram;
        let bounds = [0.005, 0.01, 0.1, 1.0, f64::INFINITY];
        let ours = AtomicHistogram::new(bounds);
        let theirs = Histogram::new(bounds);
        for us in [
            0,
            7,
            4_999,
            5_000,
            5_001,
            10_000,
            99_999,
            2_000_000,
            3_600_000_000,
        ] {
            ours.observe_us(us);
            theirs.observe(us as f64 / 1e6);
        }
        let render = |register: &dyn Fn(&mut Registry)| {
            let mut r = Registry::default();
            register(&mut r);
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
            out
        };
        let ours = render(&|r| r.register("h", "h", ours.clone()));
        let theirs = render(&|r| r.register("h", "h", theirs.clone()));
        let (mut our_lines, mut their_lines) = (ours.lines(), theirs.lines());
        for (a, b) in our_lines.by_ref().zip(their_lines.by_ref()) {
            if a.starts_with("h_sum ") {
                // Summed in whole microseconds against in float seconds.
                let value = |l: &str| l["h_sum ".len()..].parse::<f64>().unwrap();
                assert!((value(a) - value(b)).abs() < 1e-9, "{a} / {b}");
            } else {
                assert_eq!(a, b);
            }
        }
        assert_eq!(our_lines.next(), None);
        assert_eq!(their_lines.next(), None);
        assert!(ours.contains("h_count 9"), "{ours}");
        assert!(ours.contains("h_bucket{le=\"0.005\"} 4"), "{ours}");
        assert!(ours.contains("h_bucket{le=\"+Inf\"} 9"), "{ours}");
    }

    #[test]
    fn series_follow_route_service_upstream_and_application() {
        for per_application in [false, true] {
            let m = Metrics::new(
                &MetricsOptions {
                    per_application,
                    ..MetricsOptions::default()
                },
                Vec::new(),
            );
            let mut a = (*event(200, Some("app-a"))).clone();
            a.method = "GET".into();
            a.route = Some(Arc::from("r1"));
            a.upstream = Some(Arc::from("u1"));
            let mut b = a.clone();
            b.upstream = Some(Arc::from("u2"));
            let mut c = a.clone();
            c.application = Some(Arc::from("app-c"));
            let mut d = a.clone();
            d.route = Some(Arc::from("r2"));
            d.method = "BREW".into();
            d.status = 503;
            let mut e = a.clone();
            e.service = Some(Arc::from("s1"));
            for (event, n) in [(&a, 3), (&b, 2), (&c, 1), (&d, 1), (&e, 1)] {
                for _ in 0..n {
                    m.offer(&Arc::new(event.clone()));
                }
            }
            let text = m.render().unwrap();
            let requests = |route: &str, service: &str, method: &str, class: &str, app: &str| {
                let mut labels = vec![
                    ("route", route),
                    ("service", service),
                    ("method", method),
                    ("status_class", class),
                ];
                if per_application {
                    labels.push(("application", app));
                }
                sample(&text, "turnpike_http_requests_total", &labels)
            };
            // u1 and u2 feed the same request counter (it has no upstream label).
            /// Route, service, method, status class, application; the count wanted.
            type Want = (
                (
                    &'static str,
                    &'static str,
                    &'static str,
                    &'static str,
                    &'static str,
                ),
                Option<f64>,
            );
            let expected: &[Want] = if per_application {
                &[
                    (("r1", "", "GET", "2xx", "app-a"), Some(5.0)),
                    (("r1", "", "GET", "2xx", "app-c"), Some(1.0)),
                ]
            } else {
                &[(("r1", "", "GET", "2xx", ""), Some(6.0))]
            };
            let common: [Want; 3] = [
                (("r1", "s1", "GET", "2xx", "app-a"), Some(1.0)),
                (("r2", "", "other", "5xx", "app-a"), Some(1.0)),
                (("r2", "", "GET", "2xx", "app-a"), None),
            ];
            for &((route, service, method, class, app), want) in expected.iter().chain(&common) {
                assert_eq!(requests(route, service, method, class, app), want, "{text}");
            }
            if !per_application {
                assert!(!text.contains("application=\""), "{text}");
            }
            let mut labels = vec![("route", "r1"), ("service", "")];
            if per_application {
                labels.push(("application", "app-a"));
            }
            let bytes_out = sample(&text, "turnpike_http_response_bytes_total", &labels);
            // Five bytes per call: a three times and b twice (and c, without the label).
            assert_eq!(bytes_out, Some(if per_application { 25.0 } else { 30.0 }));
            let upstream = |u: &str| {
                sample(
                    &text,
                    "turnpike_upstream_duration_seconds_count",
                    &[("route", "r1"), ("service", ""), ("upstream", u)],
                )
            };
            assert_eq!(upstream("u1"), Some(4.0), "{text}");
            assert_eq!(upstream("u2"), Some(2.0), "{text}");
            let duration = |route: &str, service: &str| {
                sample(
                    &text,
                    "turnpike_http_request_duration_seconds_count",
                    &[("route", route), ("service", service)],
                )
            };
            assert_eq!(duration("r1", ""), Some(6.0), "{text}");
            assert_eq!(duration("r1", "s1"), Some(1.0), "{text}");
            assert_eq!(duration("r2", ""), Some(1.0), "{text}");
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("get"), "other");
        assert_eq!(method_label("GETS"), "other");
        for (i, m) in METHODS.iter().enumerate() {
            assert_eq!(method_index(m), i, "{m}");
        }
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "other");
        assert_eq!(rejection_kind("credential_missing"), Some(Rejection::Auth));
        assert_eq!(rejection_kind("quota_exceeded"), Some(Rejection::RateLimit));
        assert_eq!(rejection_kind("upstream_error"), None);
    }
}
