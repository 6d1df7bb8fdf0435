//! Upstream pools: targets, their live state, load balancing and health.
//!
//! An [`Upstream`] outlives snapshots: when a new configuration keeps an upstream unchanged,
//! the new snapshot reuses the same `Arc<Upstream>` so health, connection pools and latency
//! estimates survive reloads (see `crate::snapshot::UpstreamRegistry`). Its background tasks
//! (active health checks, DNS refresh) hold only a `Weak` and stop once it is dropped.

pub mod health;
pub mod lb;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderMap;
use turnpike_model::UpstreamConfig;

use crate::client::UpstreamClient;

/// A resolved target and its live state.
#[derive(Debug)]
pub struct Target {
    /// Address connected to.
    pub addr: SocketAddr,
    /// Host as configured (a DNS name or an IP); used for SNI and `Host`.
    pub host: String,
    /// Port as configured.
    pub port: u16,
    /// Relative weight; 0 means drained.
    pub weight: u32,
    /// Set by active health checks. Starts healthy.
    pub(crate) active_healthy: AtomicBool,
    /// Passive ejection: a target is skipped until this instant (nanos since `epoch`), 0 if none.
    pub(crate) ejected_until: AtomicU64,
    /// Consecutive failures seen by passive checking.
    pub(crate) consecutive_failures: AtomicU64,
    /// Requests in flight to this target.
    pub(crate) in_flight: AtomicUsize,
    /// Exponentially weighted moving average of response latency, in nanoseconds.
    pub(crate) ewma_ns: AtomicU64,
    /// Reference point for `ejected_until`.
    pub(crate) epoch: Instant,
    /// `addr` as a URI authority, built once: every request to this target needs it.
    pub(crate) uri_authority: Option<http::uri::Authority>,
    /// [`Target::authority`] as a header value, built once for the same reason.
    pub(crate) host_header: Option<http::HeaderValue>,
}

impl Target {
    /// A new target, healthy and idle.
    pub fn new(addr: SocketAddr, host: String, port: u16, weight: u32) -> Self {
        let host_header = http::HeaderValue::try_from(authority_of(&host, port)).ok();
        Self {
            addr,
            host,
            port,
            weight,
            active_healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            uri_authority: http::uri::Authority::try_from(addr.to_string()).ok(),
            host_header,
        }
    }

    /// The `Host` value naming this target (`host:port` as configured).
    pub fn host_header(&self) -> Option<&http::HeaderValue> {
        self.host_header.as_ref()
    }

    /// Whether the target may receive traffic now: weighted, actively healthy, not ejected.
    pub fn is_available(&self) -> bool {
        if self.weight == 0 || !self.active_healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || self.epoch.elapsed().as_nanos() as u64 >= until
    }

    /// Whether active health checking currently considers the target healthy.
    pub fn is_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// Requests in flight to this target.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `host:port` as configured, for the `Host` header.
    pub fn authority(&self) -> String {
        authority_of(&self.host, self.port)
    }
}

fn authority_of(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What load balancing may look at in a request.
pub struct SelectInput<'a> {
    /// Real client IP.
    pub client_ip: IpAddr,
    /// Normalised request path.
    pub path: &'a str,
    /// Request headers (for header and cookie hashing).
    pub headers: &'a HeaderMap,
}

/// Why no target could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// Every target is unhealthy, ejected or drained.
    NoHealthy,
}

/// The result of one attempt against a target, fed back to balancing and passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived, after this latency, and was not a 5xx.
    Success(Duration),
    /// Connection failure, timeout, reset, or 5xx.
    Failure,
}

/// The set of targets currently resolved, with the balancer built for exactly that set.
pub(crate) struct TargetSet {
    pub(crate) targets: Vec<Arc<Target>>,
    pub(crate) balancer: lb::Balancer,
}

/// A named pool of targets with its client and live state.
pub struct Upstream {
    /// Name from the configuration.
    pub name: Arc<str>,
    /// The configuration this pool was built from.
    pub config: UpstreamConfig,
    pub(crate) set: ArcSwap<TargetSet>,
    /// HTTP client with this upstream's pool, TLS and timeouts.
    pub client: UpstreamClient,
    /// Requests in flight to the whole pool (for `pool.max_requests`).
    pub(crate) in_flight: AtomicUsize,
    /// Whether background tasks were started, so a second `start` does not double them.
    started: AtomicBool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the pool: resolves target names, builds the client. Background tasks are not
    /// started; call [`Upstream::start`] once the pool is in a live snapshot.
    pub async fn build(config: &UpstreamConfig) -> Result<Arc<Self>, String> {
        let targets = health::resolve_targets(config).await?;
        let balancer = lb::Balancer::new(&config.load_balancer, &targets);
        let client = UpstreamClient::new(config)?;
        // TLS to a target must present its host name, known only once resolved.
        client.set_server_names(&targets);
        Ok(Arc::new(Self {
            name: Arc::from(config.name.as_str()),
            config: config.clone(),
            set: ArcSwap::from_pointee(TargetSet { targets, balancer }),
            client,
            in_flight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
        }))
    }

    /// Starts active health checks and DNS refresh. They stop when the pool is dropped.
    /// Calling it again is a no-op.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        if !health::spawn_background(Arc::downgrade(self)) {
            // Nothing could be spawned (no runtime): let a later call try again.
            self.started.store(false, Ordering::Relaxed);
        }
    }

    /// Current targets.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.set.load().targets.clone()
    }

    /// Chooses a target, skipping `tried` addresses when another one is available.
    pub fn select(
        &self,
        input: &SelectInput<'_>,
        tried: &[SocketAddr],
    ) -> Result<Arc<Target>, SelectError> {
        self.select_where(input, tried, &|_| true)
    }

    /// Like [`Upstream::select`], among the targets `allow` accepts only (targets whose
    /// circuit breaker is closed).
    pub fn select_where(
        &self,
        input: &SelectInput<'_>,
        tried: &[SocketAddr],
        allow: &dyn Fn(&Target) -> bool,
    ) -> Result<Arc<Target>, SelectError> {
        let set = self.set.load();
        let fresh = |t: &Target| t.is_available() && allow(t) && !tried.contains(&t.addr);
        if let Some(t) = set.balancer.pick(&set.targets, input, &fresh) {
            return Ok(t);
        }
        // Every untried target is down: a retry may go back to one already tried.
        set.balancer
            .pick(&set.targets, input, &|t: &Target| {
                t.is_available() && allow(t)
            })
            .ok_or(SelectError::NoHealthy)
    }

    /// Marks the start of an attempt on `target`; the guard must be finished with its outcome.
    pub fn begin(&self, target: Arc<Target>) -> Attempt {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        Attempt {
            target,
            passive: self.config.health_check.passive.clone(),
            recorded: false,
        }
    }
}

/// One attempt in flight to a target. The target counts it as in flight until the guard is
/// dropped, which the proxy delays until the response body has been sent, so least-connections
/// and P2C see long streams. Dropping it without [`Attempt::record`] counts as neither success
/// nor failure (the client went away).
pub struct Attempt {
    /// The target.
    pub target: Arc<Target>,
    passive: Option<turnpike_model::PassiveHealthCheck>,
    recorded: bool,
}

impl Attempt {
    /// Records the outcome for latency estimates and passive ejection; only the first call
    /// counts. The attempt stays in flight until dropped.
    pub fn record(&mut self, outcome: Outcome) {
        if !self.recorded {
            self.recorded = true;
            health::record(&self.target, self.passive.as_ref(), outcome);
        }
    }

    /// Records the outcome and ends the attempt.
    pub fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
