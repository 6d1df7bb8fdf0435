//! Observability for Turnpike: the [`CallEvent`] every proxied request produces, and the
//! [`Observer`] that hands it to whatever consumes it (metrics, access-log sinks, the call-log
//! store, analytics).
//!
//! The data plane builds an event only when at least one [`CallSink`] is registered, and
//! emits it when the response body has been sent (or abandoned), so byte counts and total
//! latency cover the whole exchange. A sink's [`CallSink::offer`] runs on the request path: it
//! must never block or wait on I/O. Sinks that write somewhere queue the event on a bounded
//! queue and count what they drop.

pub mod metrics;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

pub mod access_log;
pub mod redact;
pub mod text;
pub mod trace;

pub use access_log::capture::{Capture, CapturedBody};

/// One request through the gateway, as seen when its response finished.
#[derive(Debug, Clone, Serialize)]
pub struct CallEvent {
    /// When the request arrived: milliseconds since the Unix epoch (UTC).
    pub time_unix_ms: i64,
    /// The request id (`X-Request-Id` or the configured header), propagated or generated.
    pub request_id: String,
    /// W3C trace id (32 lower-case hex digits), when the request is traced.
    pub trace_id: Option<String>,
    /// W3C span id of the gateway's server span (16 hex digits), when traced.
    pub span_id: Option<String>,
    /// The real client IP (after trusted proxies).
    pub client_ip: IpAddr,
    /// The listener that accepted the connection.
    pub listener: Option<Arc<str>>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    /// Request method.
    pub method: String,
    /// Host the client asked for (authority or `Host`), without the port.
    pub host: Option<String>,
    /// The request path as the client sent it (not normalised).
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The matched route's name.
    pub route: Option<Arc<str>>,
    /// The managed service (store id) the route belongs to.
    pub service: Option<Arc<str>>,
    /// The identified application's id.
    pub application: Option<Arc<str>>,
    /// The identified application's name.
    pub application_name: Option<Arc<str>>,
    /// The identified application's team.
    pub team: Option<Arc<str>>,
    /// Response status sent to the client.
    pub status: u16,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// From the request's arrival to the end of the response body, in microseconds.
    pub duration_us: u64,
    /// From sending to the upstream to its response headers (last attempt), in microseconds.
    pub upstream_us: Option<u64>,
    /// The upstream pool's name.
    pub upstream: Option<Arc<str>>,
    /// The upstream target that answered (last attempt).
    pub upstream_target: Option<SocketAddr>,
    /// Upstream attempts made (0 when none was sent).
    pub attempts: u32,
    /// Response cache outcome (`HIT`, `MISS`, `STALE`, `REVALIDATED`, `BYPASS`), when a
    /// cache ran.
    pub cache: Option<&'static str>,
    /// The gateway error code, when the gateway answered with an error.
    pub error: Option<&'static str>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// Whether the response body was sent to the end (false: the client went away or the
    /// stream failed).
    pub completed: bool,
    /// Request headers (sensitive ones masked), only when capture asks for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<Vec<(String, String)>>,
    /// Response headers (sensitive ones masked), only when capture asks for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<Vec<(String, String)>>,
    /// The start of the request body as sent upstream, only when capture asks for it (and
    /// an upstream was called).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<CapturedBody>,
    /// The start of the response body, only when capture asks for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<CapturedBody>,
    /// The gateway's spans, when tracing is on (exported by the trace exporter; logs carry
    /// `trace_id` and `span_id` instead).
    #[serde(skip)]
    pub trace: Option<Box<trace::TraceFacts>>,
    /// The route's `data_masking`, when it masks logged bodies: applied to the captured
    /// bodies when the event is written.
    #[serde(skip)]
    pub redact: Option<std::sync::Arc<redact::Redactor>>,
}

/// What one sink (an access-log destination, the call-log writer, the trace exporter, ...)
/// has done since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// The sink's name (configured, or `<type>-<index>`).
    pub name: String,
    /// The kind of sink (`file`, `http`, `call_log`, `otlp_traces`, ...).
    pub kind: &'static str,
    /// Records written or accepted by the destination.
    pub sent: u64,
    /// Records dropped because the queue was full (never waited on).
    pub dropped: u64,
    /// Records lost because the destination failed (after retries).
    pub failed: u64,
    /// Records waiting in the queue now.
    pub queued: usize,
}

/// Lets a warning through at most once per interval, so a sink that drops or fails on every
/// request logs one line now and then instead of one per request. Lock-free: it runs on the
/// request path.
#[derive(Debug, Default)]
pub struct WarnGate {
    /// Unix seconds of the last warning let through; 0 before the first.
    last: std::sync::atomic::AtomicU64,
}

impl WarnGate {
    /// How often (seconds) a gated warning may repeat.
    pub const EVERY_SECS: u64 = 10;

    /// True when the caller should log now: the first time, then once per
    /// [`Self::EVERY_SECS`]. Racing callers agree on one winner.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= Self::EVERY_SECS)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Something whose [`SinkStats`] the metrics endpoint exports at every scrape.
pub trait StatsSource: Send + Sync + 'static {
    /// The current counters of each sink this source runs.
    fn sink_stats(&self) -> Vec<SinkStats>;
}

/// Something that consumes call events. Runs on the request path: never block.
pub trait CallSink: Send + Sync + 'static {
    /// Takes one finished call. Must return promptly; queue and drop rather than wait.
    fn offer(&self, event: &Arc<CallEvent>);
}

/// The registry of sinks the data plane emits to. Sinks can be replaced at any time (on
/// reload); an event goes to the set that was current when it was emitted.
#[derive(Default)]
pub struct Observer {
    sinks: ArcSwap<Vec<Arc<dyn CallSink>>>,
    /// What the data plane copies of headers and bodies into each event. Kept here (not in
    /// the snapshot) because sinks, not routes, decide it, and one atomic load per request
    /// tells the proxy whether to pay for it.
    capture: ArcSwapOption<Capture>,
    /// Trace sampling and propagation; `None` when tracing is off.
    tracing: ArcSwapOption<trace::TraceSettings>,
    /// Sinks whose counters are exported as metrics.
    /// Weak, so a sink that is replaced (a store reconnect, a reload) leaves no stale series.
    stats: ArcSwap<Vec<std::sync::Weak<dyn StatsSource>>>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("sinks", &self.sinks.load().len())
            .finish()
    }
}

impl Observer {
    /// An observer with no sinks: the data plane then builds no events at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any sink listens. The data plane checks this before building an event.
    pub fn is_active(&self) -> bool {
        !self.sinks.load().is_empty()
    }

    /// Adds a sink.
    pub fn add(&self, sink: Arc<dyn CallSink>) {
        self.sinks.rcu(|current| {
            let mut next = Vec::clone(current);
            next.push(Arc::clone(&sink));
            next
        });
    }

    /// What events should carry of headers and bodies; `None` (the default) captures
    /// nothing and costs nothing.
    pub fn capture(&self) -> Option<Arc<Capture>> {
        self.capture.load_full()
    }

    /// Sets (or with `None` stops) header and body capture.
    pub fn set_capture(&self, capture: Option<Arc<Capture>>) {
        self.capture.store(capture);
    }

    /// How requests take part in traces; `None` (the default) leaves trace headers alone.
    pub fn tracing(&self) -> Option<Arc<trace::TraceSettings>> {
        self.tracing.load_full()
    }

    /// Turns tracing on (with these settings) or off.
    pub fn set_tracing(&self, settings: Option<Arc<trace::TraceSettings>>) {
        self.tracing.store(settings);
    }

    /// Registers a source of sink counters for the metrics endpoint, for as long as the
    /// source lives.
    pub fn add_stats(&self, source: &Arc<dyn StatsSource>) {
        let weak = Arc::downgrade(source);
        self.stats.rcu(|current| {
            let mut next: Vec<_> = current
                .iter()
                .filter(|s| s.strong_count() > 0)
                .cloned()
                .collect();
            next.push(weak.clone());
            next
        });
    }

    /// The counters of every registered sink that is still running.
    pub fn sink_stats(&self) -> Vec<SinkStats> {
        self.stats
            .load()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .flat_map(|s| s.sink_stats())
            .collect()
    }

    /// Removes one sink (compared by identity), e.g. the access log before it is rebuilt.
    pub fn remove(&self, sink: &Arc<dyn CallSink>) {
        self.sinks.rcu(|current| {
            current
                .iter()
                .filter(|s| !Arc::ptr_eq(s, sink))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Removes `old` (when given) and adds `new` (when given) in one step, so an event
    /// emitted meanwhile reaches exactly one of them.
    pub fn swap(&self, old: Option<&Arc<dyn CallSink>>, new: Option<Arc<dyn CallSink>>) {
        self.sinks.rcu(|current| {
            let mut next: Vec<Arc<dyn CallSink>> = current
                .iter()
                .filter(|s| old.is_none_or(|o| !Arc::ptr_eq(s, o)))
                .cloned()
                .collect();
            next.extend(new.clone());
            next
        });
    }

    /// Replaces every sink at once.
    pub fn replace(&self, sinks: Vec<Arc<dyn CallSink>>) {
        self.sinks.store(Arc::new(sinks));
    }

    /// Hands `event` to every sink.
    pub fn emit(&self, event: impl Into<Arc<CallEvent>>) {
        let sinks = self.sinks.load();
        if sinks.is_empty() {
            return;
        }
        let event = event.into();
        for sink in sinks.iter() {
            sink.offer(&event);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Arc<CallEvent>>>);
    impl CallSink for Collect {
        fn offer(&self, event: &Arc<CallEvent>) {
            self.0.lock().unwrap().push(Arc::clone(event));
        }
    }

    pub(crate) fn event() -> CallEvent {
        CallEvent {
            time_unix_ms: 0,
            request_id: "r".into(),
            trace_id: None,
            span_id: None,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            listener: None,
            protocol: "HTTP/1.1",
            method: "GET".into(),
            host: None,
            path: "/".into(),
            query: None,
            route: Some(Arc::from("r1")),
            service: None,
            application: None,
            application_name: None,
            team: None,
            status: 200,
            bytes_in: 0,
            bytes_out: 5,
            duration_us: 10,
            upstream_us: Some(7),
            upstream: None,
            upstream_target: None,
            attempts: 1,
            cache: None,
            error: None,
            user_agent: None,
            completed: true,
            request_headers: None,
            response_headers: None,
            request_body: None,
            response_body: None,
            trace: None,
            redact: None,
        }
    }

    #[test]
    fn events_reach_every_sink_and_serialise() {
        let obs = Observer::new();
        assert!(!obs.is_active());
        obs.emit(event());
        let a = Arc::new(Collect::default());
        let b = Arc::new(Collect::default());
        obs.add(a.clone());
        obs.add(b.clone());
        assert!(obs.is_active());
        obs.emit(event());
        assert_eq!(a.0.lock().unwrap().len(), 1);
        assert_eq!(b.0.lock().unwrap().len(), 1);
        let json = serde_json::to_value(&*a.0.lock().unwrap()[0]).unwrap();
        assert_eq!(json["route"], "r1");
        assert_eq!(json["status"], 200);
        obs.replace(Vec::new());
        assert!(!obs.is_active());
    }
}
