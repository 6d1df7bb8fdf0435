//! Circuit breaker, bulkhead, fault injection and fallback: the policies that protect an
//! upstream from a flood and clients from a failing upstream.
//!
//! State is kept per key (a route name, an upstream name or a target address) inside the
//! compiled policy, so a policy attached at service or global scope still gives every route
//! (or target) its own breaker, and the state survives reloads that keep the policy.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use turnpike_model::policy::{
    BreakerPer, BulkheadConfig, BulkheadPer, CircuitBreakerConfig, FallbackConfig, FallbackTrigger,
    FaultInjectionConfig,
};

use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError, error_response};

/// Keyed state, created on first use. Keys are route names, upstream names or target
/// addresses: set by the configuration and DNS, not by clients. Target addresses still come
/// and go as DNS answers change, so their cells are bounded (see [`Cells::get_bounded`]).
struct Cells<K, V> {
    map: RwLock<HashMap<K, Arc<V>>>,
}

/// Target cells kept before idle ones are dropped; far above any real configuration's count
/// of targets.
const MAX_CELLS: usize = 4096;

impl<K: Eq + Hash + Clone, V> Cells<K, V> {
    fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }

    fn get<Q>(&self, key: &Q, make: impl FnOnce() -> V) -> Arc<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(v) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return v.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// [`Self::get`], dropping the idle cells first when a new key would pass
    /// [`MAX_CELLS`]: those nobody holds (no call in flight) and `busy` says nothing of.
    fn get_bounded<Q>(&self, key: &Q, make: impl FnOnce() -> V, busy: impl Fn(&V) -> bool) -> Arc<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(v) = self.peek(key) {
            return v;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CELLS && !map.contains_key(key) {
            map.retain(|_, v| Arc::strong_count(v) > 1 || busy(v));
        }
        map.entry(key.to_owned())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    fn peek<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

// ---- Circuit breaker ----------------------------------------------------------------------

/// Buckets of the error-ratio window: the window slides by a tenth of its length.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// The state visible from outside, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// A few probes go through.
    HalfOpen,
}

struct Cell {
    phase: Phase,
    /// Bumped on every transition, so a result from before it is not counted after it.
    generation: u64,
    consecutive: u32,
    /// (bucket number, requests, failures).
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Cell {
    fn new() -> Self {
        Self {
            phase: Phase::Closed,
            generation: 0,
            consecutive: 0,
            buckets: [(0, 0, 0); BUCKETS],
        }
    }

    fn transition(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation += 1;
        self.consecutive = 0;
        self.buckets = [(0, 0, 0); BUCKETS];
    }
}

/// A compiled `circuit_breaker`.
pub struct Breaker {
    cfg: CircuitBreakerConfig,
    consecutive: Option<u32>,
    bucket_len: Duration,
    epoch: Instant,
    routes: Cells<String, Mutex<Cell>>,
    targets: Cells<SocketAddr, Mutex<Cell>>,
}

/// A call the breaker let through; report its outcome with [`Ticket::record`]. Dropped
/// without a record (the client went away), it counts as neither success nor failure.
pub struct Ticket {
    cell: Arc<Mutex<Cell>>,
    generation: u64,
    probe: bool,
    done: bool,
    owner: Arc<Breaker>,
}

impl Breaker {
    /// Compiles the policy.
    pub fn new(cfg: CircuitBreakerConfig) -> Self {
        let bucket_len = (cfg.window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            consecutive: cfg.consecutive(),
            cfg,
            bucket_len,
            epoch: Instant::now(),
            routes: Cells::new(),
            targets: Cells::new(),
        }
    }

    /// Whether the breaker is per target (else per route).
    pub fn per_target(&self) -> bool {
        self.cfg.per == BreakerPer::Target
    }

    /// Whether `status` counts as a failure.
    pub fn is_failure(&self, status: StatusCode) -> bool {
        self.cfg.failure_statuses.contains(&status.as_u16())
    }

    /// Lets a call on `route` through, or says how long until the breaker may let one through.
    pub fn admit_route(self: &Arc<Self>, route: &str) -> Result<Ticket, Duration> {
        let cell = self.routes.get(route, || Mutex::new(Cell::new()));
        self.admit(cell)
    }

    /// Lets a call to `target` through, or refuses it.
    pub fn admit_target(self: &Arc<Self>, target: SocketAddr) -> Result<Ticket, Duration> {
        // A target whose breaker is open or probing keeps its state; only closed ones that
        // no call holds are forgotten when the table is full.
        let cell = self.targets.get_bounded(
            &target,
            || Mutex::new(Cell::new()),
            |c| {
                !matches!(
                    c.lock().unwrap_or_else(|e| e.into_inner()).phase,
                    Phase::Closed
                )
            },
        );
        self.admit(cell)
    }

    /// Whether `target` would be let through now (without taking a probe slot).
    pub fn target_available(&self, target: SocketAddr) -> bool {
        let Some(cell) = self.targets.peek(&target) else {
            return true;
        };
        let c = cell.lock().unwrap_or_else(|e| e.into_inner());
        match c.phase {
            Phase::Closed => true,
            Phase::Open { until } => Instant::now() >= until,
            Phase::HalfOpen { in_flight, .. } => in_flight < self.cfg.half_open_requests,
        }
    }

    /// The state of the route's breaker.
    pub fn route_state(&self, route: &str) -> BreakerState {
        self.routes
            .peek(route)
            .map_or(BreakerState::Closed, |c| state_of(&c))
    }

    /// Every target this breaker has a cell for, with its state (for metrics).
    pub fn target_states(&self) -> Vec<(SocketAddr, BreakerState)> {
        let cells: Vec<(SocketAddr, Arc<Mutex<Cell>>)> = self
            .targets
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, Arc::clone(v)))
            .collect();
        cells.into_iter().map(|(k, c)| (k, state_of(&c))).collect()
    }

    /// The state of a target's breaker.
    pub fn target_state(&self, target: SocketAddr) -> BreakerState {
        self.targets
            .peek(&target)
            .map_or(BreakerState::Closed, |c| state_of(&c))
    }

    fn admit(self: &Arc<Self>, cell: Arc<Mutex<Cell>>) -> Result<Ticket, Duration> {
        let now = Instant::now();
        let (generation, probe) = {
            let mut c = cell.lock().unwrap_or_else(|e| e.into_inner());
            match c.phase {
                Phase::Closed => (c.generation, false),
                Phase::Open { until } if now < until => return Err(until - now),
                Phase::Open { .. } => {
                    c.transition(Phase::HalfOpen {
                        in_flight: 1,
                        successes: 0,
                    });
                    (c.generation, true)
                }
                Phase::HalfOpen {
                    in_flight,
                    successes,
                } => {
                    if in_flight >= self.cfg.half_open_requests {
                        // The probes decide soon; a second is a fair hint.
                        return Err(Duration::from_secs(1));
                    }
                    c.phase = Phase::HalfOpen {
                        in_flight: in_flight + 1,
                        successes,
                    };
                    (c.generation, true)
                }
            }
        };
        Ok(Ticket {
            cell,
            generation,
            probe,
            done: false,
            owner: self.clone(),
        })
    }

    fn bucket(&self, now: Instant) -> u64 {
        (now.duration_since(self.epoch).as_nanos() / self.bucket_len.as_nanos().max(1)) as u64
    }

    fn record(&self, c: &mut Cell, generation: u64, probe: bool, failed: bool) {
        if c.generation != generation {
            return;
        }
        let now = Instant::now();
        match c.phase {
            Phase::HalfOpen {
                in_flight,
                successes,
            } if probe => {
                if failed {
                    c.transition(Phase::Open {
                        until: now + self.cfg.open_for,
                    });
                } else if successes + 1 >= self.cfg.half_open_requests {
                    c.transition(Phase::Closed);
                } else {
                    c.phase = Phase::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes: successes + 1,
                    };
                }
            }
            Phase::Closed => {
                let b = self.bucket(now);
                let slot = &mut c.buckets[(b % BUCKETS as u64) as usize];
                if slot.0 != b {
                    *slot = (b, 0, 0);
                }
                slot.1 += 1;
                if failed {
                    slot.2 += 1;
                    c.consecutive += 1;
                } else {
                    c.consecutive = 0;
                }
                let trip_consecutive = self.consecutive.is_some_and(|n| c.consecutive >= n);
                let trip_ratio = self.cfg.error_ratio.is_some_and(|ratio| {
                    let oldest = b.saturating_sub(BUCKETS as u64 - 1);
                    let (total, failures) = c
                        .buckets
                        .iter()
                        .filter(|s| s.0 >= oldest && s.0 <= b)
                        .fold((0u64, 0u64), |(t, f), s| (t + s.1 as u64, f + s.2 as u64));
                    failed
                        && total >= u64::from(self.cfg.min_requests)
                        && failures as f64 >= ratio * total as f64
                });
                if trip_consecutive || trip_ratio {
                    c.transition(Phase::Open {
                        until: now + self.cfg.open_for,
                    });
                }
            }
            _ => {}
        }
    }
}

fn state_of(cell: &Mutex<Cell>) -> BreakerState {
    match cell.lock().unwrap_or_else(|e| e.into_inner()).phase {
        Phase::Closed => BreakerState::Closed,
        Phase::Open { .. } => BreakerState::Open,
        Phase::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

impl Ticket {
    /// Reports the call's outcome.
    pub fn record(mut self, failed: bool) {
        self.done = true;
        let mut c = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        self.owner
            .record(&mut c, self.generation, self.probe, failed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done || !self.probe {
            return;
        }
        // An abandoned probe frees its slot so the next request can probe.
        let mut c = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if c.generation == self.generation
            && let Phase::HalfOpen {
                in_flight,
                successes,
            } = c.phase
        {
            c.phase = Phase::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                successes,
            };
        }
    }
}

/// The error a refused call gets, with its `Retry-After`.
pub fn circuit_open(
    retry_after: Duration,
    what: &str,
    out_headers: &mut HeaderMap,
) -> GatewayError {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    out_headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    GatewayError::new(
        ErrorKind::CircuitOpen,
        format!("the circuit breaker of {what} is open"),
    )
}

// ---- Bulkhead -----------------------------------------------------------------------------

struct Slots {
    sem: Arc<Semaphore>,
    queued: AtomicU32,
}

/// A compiled `bulkhead`.
pub struct Bulkhead {
    cfg: BulkheadConfig,
    slots: Cells<String, Slots>,
}

impl Bulkhead {
    /// Compiles the policy.
    pub fn new(cfg: BulkheadConfig) -> Self {
        Self {
            cfg,
            slots: Cells::new(),
        }
    }

    /// Takes a slot for a request on `route` to `upstream`, waiting in the queue if there is
    /// room in it. The permit is held until the response body ends.
    pub async fn acquire(
        &self,
        route: &str,
        upstream: &str,
    ) -> Result<OwnedSemaphorePermit, GatewayError> {
        let key = match self.cfg.per {
            BulkheadPer::Route => route,
            BulkheadPer::Upstream => upstream,
        };
        let max = self.cfg.max_concurrent as usize;
        let slots = self.slots.get(key, || Slots {
            sem: Arc::new(Semaphore::new(max)),
            queued: AtomicU32::new(0),
        });
        if let Ok(p) = slots.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        let full = || {
            GatewayError::new(
                ErrorKind::BulkheadFull,
                format!("too many concurrent requests on `{key}`"),
            )
        };
        let queued = slots.queued.fetch_add(1, Ordering::AcqRel);
        let _leave = QueueSpot(&slots.queued);
        if queued >= self.cfg.max_queue {
            return Err(full());
        }
        match tokio::time::timeout(self.cfg.queue_timeout, slots.sem.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => Ok(p),
            _ => Err(full()),
        }
    }
}

/// Leaves the queue when the wait ends, however it ends.
struct QueueSpot<'a>(&'a AtomicU32);

impl Drop for QueueSpot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// ---- Fault injection ----------------------------------------------------------------------

/// A compiled `fault_injection`.
pub struct Fault {
    cfg: FaultInjectionConfig,
    header: Option<HeaderName>,
}

impl Fault {
    /// Compiles the policy.
    pub fn new(cfg: FaultInjectionConfig) -> Result<Self, (String, String)> {
        let header = match &cfg.only_with_header {
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                (
                    "only_with_header".to_owned(),
                    "not a header name".to_owned(),
                )
            })?),
            None => None,
        };
        Ok(Self { cfg, header })
    }

    /// Delays the request or answers it with an error, as configured. `Some` is the answer.
    pub async fn apply(
        &self,
        headers: &HeaderMap,
        request_id: &str,
    ) -> Option<Response<ProxyBody>> {
        if let Some(h) = &self.header
            && !headers.contains_key(h)
        {
            return None;
        }
        if let Some(d) = &self.cfg.delay
            && chance(d.percent)
        {
            tokio::time::sleep(d.duration).await;
        }
        if let Some(a) = &self.cfg.abort
            && chance(a.percent)
        {
            let mut resp = error_response(
                ErrorKind::FaultInjected,
                "fault injected by the fault_injection policy",
                request_id,
            );
            if let Ok(s) = StatusCode::from_u16(a.status) {
                *resp.status_mut() = s;
            }
            return Some(resp);
        }
        None
    }
}

/// True with probability `percent` / 100.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

// ---- Fallback -----------------------------------------------------------------------------

/// A compiled `fallback`.
pub struct Fallback {
    cfg: FallbackConfig,
    content_type: HeaderValue,
    headers: HeaderMap,
}

/// The header telling clients (and logs) that a fallback answered, and why.
pub static FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-turnpike-fallback");

impl Fallback {
    /// Compiles the policy.
    pub fn new(cfg: FallbackConfig) -> Result<Self, (String, String)> {
        let mut headers = HeaderMap::new();
        let mut content_type = HeaderValue::from_static("application/json");
        if let Some(r) = &cfg.response {
            content_type = HeaderValue::from_str(&r.content_type).map_err(|_| {
                (
                    "response.content_type".to_owned(),
                    "not a header value".to_owned(),
                )
            })?;
            for (k, v) in &r.headers {
                let bad = || {
                    (
                        format!("response.headers.{k}"),
                        "not a valid header".to_owned(),
                    )
                };
                headers.insert(
                    HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?,
                    HeaderValue::from_str(v).map_err(|_| bad())?,
                );
            }
        }
        Ok(Self {
            cfg,
            content_type,
            headers,
        })
    }

    /// Whether the fallback covers errors of `kind`.
    pub fn covers(&self, kind: ErrorKind) -> bool {
        let trigger = match kind {
            ErrorKind::CircuitOpen => FallbackTrigger::CircuitOpen,
            ErrorKind::BulkheadFull => FallbackTrigger::BulkheadFull,
            ErrorKind::NoHealthyUpstream => FallbackTrigger::NoHealthyUpstream,
            ErrorKind::UpstreamUnreachable => FallbackTrigger::UpstreamUnreachable,
            ErrorKind::UpstreamTimeout => FallbackTrigger::UpstreamTimeout,
            ErrorKind::UpstreamOverloaded => FallbackTrigger::UpstreamOverloaded,
            _ => return false,
        };
        self.cfg.on.contains(&trigger)
    }

    /// The fallback upstream's name, if it sends to one.
    pub fn upstream(&self) -> Option<&str> {
        self.cfg.upstream.as_deref()
    }

    /// The static response, if it has one.
    pub fn response(&self, kind: ErrorKind) -> Option<Response<ProxyBody>> {
        let r = self.cfg.response.as_ref()?;
        let mut resp = Response::new(crate::body::full(r.body.clone()));
        *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, self.content_type.clone());
        for (k, v) in &self.headers {
            h.insert(k.clone(), v.clone());
        }
        h.insert(
            FALLBACK_HEADER.clone(),
            HeaderValue::from_static(kind.code()),
        );
        Some(resp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn cells_past_the_bound_drop_only_unused_ones() {
        let cells: Cells<u32, u32> = Cells::new();
        let busy = |v: &u32| *v == 1;
        let held = cells.get_bounded(&0, || 0, busy);
        for k in 1..MAX_CELLS as u32 {
            cells.get_bounded(&k, || k, busy);
        }
        assert_eq!(cells.map.read().unwrap().len(), MAX_CELLS);
        // A known key never evicts.
        cells.get_bounded(&5, || 5, busy);
        assert_eq!(cells.map.read().unwrap().len(), MAX_CELLS);
        // A new one drops every cell nobody holds and `busy` does not keep.
        cells.get_bounded(&u32::MAX, || 7, busy);
        let map = cells.map.read().unwrap();
        assert_eq!(map.len(), 3);
        assert!(Arc::ptr_eq(&map[&0], &held));
        assert_eq!(*map[&1], 1);
        // The unbounded `get` (routes, bulkhead slots) never drops anything.
        drop(map);
        let plain: Cells<u32, u32> = Cells::new();
        for k in 0..=MAX_CELLS as u32 {
            plain.get(&k, || k);
        }
        assert_eq!(plain.map.read().unwrap().len(), MAX_CELLS + 1);
    }

    fn breaker(json: serde_json::Value) -> Arc<Breaker> {
        Arc::new(Breaker::new(serde_json::from_value(json).unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_then_probe_closes() {
        let b = breaker(serde_json::json!({"consecutive_failures": 3, "open_for": "10s"}));
        for _ in 0..2 {
            b.admit_route("r").unwrap().record(true);
        }
        assert_eq!(b.route_state("r"), BreakerState::Closed);
        // A success resets the run.
        b.admit_route("r").unwrap().record(false);
        for _ in 0..3 {
            b.admit_route("r").unwrap().record(true);
        }
        assert_eq!(b.route_state("r"), BreakerState::Open);
        let wait = b.admit_route("r").err().unwrap();
        assert_eq!(wait, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.admit_route("r").unwrap();
        assert_eq!(b.route_state("r"), BreakerState::HalfOpen);
        // One probe at a time.
        assert!(b.admit_route("r").is_err());
        probe.record(false);
        assert_eq!(b.route_state("r"), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_abandoned_probe_frees_its_slot() {
        let b = breaker(serde_json::json!({"consecutive_failures": 1, "open_for": "1s"}));
        b.admit_route("r").unwrap().record(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.admit_route("r").unwrap());
        let probe = b.admit_route("r").unwrap();
        probe.record(true);
        assert_eq!(b.route_state("r"), BreakerState::Open);
        assert!(b.admit_route("r").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn error_ratio_needs_min_requests() {
        let b = breaker(serde_json::json!({
            "error_ratio": 0.5, "min_requests": 10, "window": "10s"
        }));
        for i in 0..9 {
            b.admit_route("r").unwrap().record(i % 2 == 0);
        }
        // 5 failures of 9: below the minimum volume.
        assert_eq!(b.route_state("r"), BreakerState::Closed);
        b.admit_route("r").unwrap().record(true);
        assert_eq!(b.route_state("r"), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn error_ratio_window_slides() {
        let b = breaker(serde_json::json!({
            "error_ratio": 0.5, "min_requests": 4, "window": "10s"
        }));
        for _ in 0..3 {
            b.admit_route("r").unwrap().record(true);
        }
        // The old failures leave the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..3 {
            b.admit_route("r").unwrap().record(false);
        }
        b.admit_route("r").unwrap().record(true);
        assert_eq!(b.route_state("r"), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_results_do_not_count_after_a_transition() {
        let b = breaker(serde_json::json!({"consecutive_failures": 1, "open_for": "1s"}));
        let early = b.admit_route("r").unwrap();
        b.admit_route("r").unwrap().record(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.admit_route("r").unwrap();
        probe.record(false);
        assert_eq!(b.route_state("r"), BreakerState::Closed);
        // A failure from before the breaker opened does not open it again.
        early.record(true);
        assert_eq!(b.route_state("r"), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn bulkhead_queues_then_refuses() {
        let bh = Bulkhead::new(
            serde_json::from_value(serde_json::json!({
                "max_concurrent": 1, "max_queue": 1, "queue_timeout": "1s"
            }))
            .unwrap(),
        );
        let first = bh.acquire("r", "u").await.unwrap();
        let bh = Arc::new(bh);
        let waiter = {
            let bh = bh.clone();
            tokio::spawn(async move { bh.acquire("r", "u").await.map(drop) })
        };
        tokio::task::yield_now().await;
        // The queue holds one: a third request is refused at once.
        let third = bh.acquire("r", "u").await;
        assert_eq!(third.err().unwrap().kind, ErrorKind::BulkheadFull);
        drop(first);
        waiter.await.unwrap().unwrap();
        // Another route has its own slots.
        drop(bh.acquire("other", "u").await.unwrap());
    }
}
