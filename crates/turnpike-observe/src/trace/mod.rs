//! Distributed tracing: the gateway's part of a W3C trace, and its export over OTLP.
//!
//! The data plane asks the [`Observer`](crate::Observer) for the current
//! [`TraceSettings`] (one atomic load); with tracing on it builds a [`TraceFacts`] per
//! request — trace id, the server span, one client span per upstream attempt — and the
//! facts ride on the [`CallEvent`](crate::CallEvent) to the [`export::TraceExporter`],
//! which turns them into OTLP spans off the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use turnpike_model::observe::TracingConfig;

use crate::{CallSink, Observer, SinkStats, StatsSource};

pub mod context;
pub mod export;

pub use context::{Parent, TRACEPARENT, TRACESTATE};

/// How the data plane decides and records traces; swapped on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Follow the caller's sampled flag when a valid `traceparent` came in.
    pub parent_based: bool,
    /// Trace ids whose low 64 bits fall below this are sampled (`ratio × 2^64`).
    threshold: u64,
    /// The configured ratio (for `always`/`never` fast paths).
    ratio: f64,
}

impl TraceSettings {
    /// The settings of an enabled `tracing` section.
    pub fn new(cfg: &TracingConfig) -> Self {
        let ratio = cfg.sample_ratio.clamp(0.0, 1.0);
        // `as` saturates: 1.0 × 2^64 becomes u64::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (ratio * 18_446_744_073_709_551_616.0) as u64;
        Self {
            parent_based: cfg.parent_based,
            threshold,
            ratio,
        }
    }

    /// Whether a trace that starts here (or whose parent is not followed) is recorded.
    /// Decided from the trace id alone, so every gateway node decides alike.
    pub fn sample(&self, trace_id: &[u8; 16]) -> bool {
        if self.ratio >= 1.0 {
            return true;
        }
        if self.ratio <= 0.0 {
            return false;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        u64::from_be_bytes(low) < self.threshold
    }

    /// Joins or starts the trace of a request with these `headers`.
    pub fn start(&self, headers: &HeaderMap) -> TraceFacts {
        let parent = context::parent(headers);
        let (trace_id, parent_span_id, sampled, tracestate) = match parent {
            Some(p) => {
                let sampled = if self.parent_based {
                    p.sampled()
                } else {
                    self.sample(&p.trace_id)
                };
                (
                    p.trace_id,
                    Some(p.span_id),
                    sampled,
                    context::tracestate(headers),
                )
            }
            // No usable parent: a new trace, and any `tracestate` that came without a valid
            // `traceparent` is not passed on.
            None => {
                let id = context::new_trace_id();
                (id, None, self.sample(&id), None)
            }
        };
        TraceFacts {
            trace_id,
            span_id: context::new_span_id(),
            parent_span_id,
            sampled,
            tracestate,
            start_unix_ns: now_unix_ns(),
            attempts: Vec::new(),
        }
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The gateway's part of one trace: its server span and a client span per upstream attempt.
#[derive(Debug, Clone)]
pub struct TraceFacts {
    /// The trace id (the caller's, or a new one).
    pub trace_id: [u8; 16],
    /// The gateway's server span.
    pub span_id: [u8; 8],
    /// The caller's span, when a valid `traceparent` came in.
    pub parent_span_id: Option<[u8; 8]>,
    /// Whether this trace is recorded (and exported).
    pub sampled: bool,
    /// The caller's `tracestate`, checked, passed on unchanged.
    pub tracestate: Option<String>,
    /// When the server span started (ns since the Unix epoch).
    pub start_unix_ns: u64,
    /// The upstream attempts, in order.
    pub attempts: Vec<AttemptSpan>,
}

/// One upstream attempt, a client span under the server span.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    /// The attempt's span id; the upstream sees it as its parent.
    pub span_id: [u8; 8],
    /// When the attempt started (ns since the Unix epoch).
    pub start_unix_ns: u64,
    /// When it ended; `None` for the attempt whose response went to the client, which ends
    /// with the server span (its body streams until then).
    pub end_unix_ns: Option<u64>,
    /// The upstream pool.
    pub upstream: Arc<str>,
    /// The target address.
    pub target: SocketAddr,
    /// The response status, when the upstream answered.
    pub status: Option<u16>,
    /// Why the attempt failed, when it did: the gateway error code (`upstream_unreachable`,
    /// `upstream_error`, `upstream_timeout`, or the client body error).
    pub error: Option<&'static str>,
    /// Attempts before this one.
    pub resend_count: u32,
}

impl TraceFacts {
    fn flags(&self) -> u8 {
        u8::from(self.sampled)
    }

    /// Sets `traceparent` (this gateway's server span as the parent) and the checked
    /// `tracestate` on the headers going upstream; used for copies (mirrors) too.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(
            &TRACEPARENT,
            context::traceparent(&self.trace_id, &self.span_id, self.flags()),
        );
        match self
            .tracestate
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            Some(v) => {
                headers.insert(&TRACESTATE, v);
            }
            None => {
                headers.remove(&TRACESTATE);
            }
        }
    }

    /// Starts an attempt's client span; returns its index and the `traceparent` the
    /// attempt's request carries.
    pub fn begin_attempt(&mut self, upstream: &str, target: SocketAddr) -> (usize, HeaderValue) {
        let span_id = context::new_span_id();
        let resend_count = u32::try_from(self.attempts.len()).unwrap_or(u32::MAX);
        self.attempts.push(AttemptSpan {
            span_id,
            start_unix_ns: now_unix_ns(),
            end_unix_ns: None,
            upstream: Arc::from(upstream),
            target,
            status: None,
            error: None,
            resend_count,
        });
        (
            self.attempts.len() - 1,
            context::traceparent(&self.trace_id, &span_id, self.flags()),
        )
    }

    /// Records how an attempt ended. `ended` is false for the attempt whose response is
    /// streamed to the client: its span closes with the server span.
    pub fn end_attempt(
        &mut self,
        index: usize,
        status: Option<u16>,
        error: Option<&'static str>,
        ended: bool,
    ) {
        if let Some(a) = self.attempts.get_mut(index) {
            a.status = status;
            a.error = error;
            a.end_unix_ns = ended.then(now_unix_ns);
        }
    }
}

/// Tracing as configured: the settings the data plane reads and the exporter, rebuilt when
/// a reload changes them.
pub struct Tracing {
    observer: Arc<Observer>,
    current: std::sync::Mutex<Current>,
}

#[derive(Default)]
struct Current {
    config: Option<TracingConfig>,
    exporter: Option<Arc<export::TraceExporter>>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Tracing for the data plane behind `observer`; off until [`Tracing::apply`].
    pub fn new(observer: Arc<Observer>) -> Arc<Self> {
        let t = Arc::new(Self {
            observer: Arc::clone(&observer),
            current: std::sync::Mutex::default(),
        });
        let source: Arc<dyn StatsSource> = t.clone();
        observer.add_stats(&source);
        t
    }

    /// Applies a (new) configuration. An exporter whose settings did not change keeps
    /// running with its queue; a replaced one sends what it holds in the background.
    /// Must run inside a Tokio runtime.
    pub fn apply(&self, cfg: &TracingConfig) -> Result<(), String> {
        let mut cur = self
            .current
            .lock()
            .map_err(|_| "tracing state is poisoned".to_owned())?;
        if cur.config.as_ref() == Some(cfg) {
            return Ok(());
        }
        let same_export = cur.config.as_ref().is_some_and(|old| {
            old.enabled == cfg.enabled
                && old.otlp == cfg.otlp
                && old.service_name == cfg.service_name
                && old.resource == cfg.resource
        });
        if !same_export {
            let next = match (&cfg.otlp, cfg.enabled) {
                (Some(o), true) => Some(export::TraceExporter::start(
                    o,
                    &cfg.service_name,
                    &cfg.resource,
                )?),
                _ => None,
            };
            let old = std::mem::replace(&mut cur.exporter, next.clone());
            // One step: a call finishing during the swap is exported once, not by both.
            let old_sink = old.clone().map(|o| o as Arc<dyn CallSink>);
            self.observer
                .swap(old_sink.as_ref(), next.map(|n| n as Arc<dyn CallSink>));
            if let Some(old) = old {
                let deadline = old.config().batch.timeout;
                tokio::spawn(async move { old.shutdown(deadline).await });
            }
        }
        self.observer
            .set_tracing(cfg.enabled.then(|| Arc::new(TraceSettings::new(cfg))));
        cur.config = Some(cfg.clone());
        Ok(())
    }

    /// The running exporter, if spans are exported.
    pub fn exporter(&self) -> Option<Arc<export::TraceExporter>> {
        self.current.lock().ok().and_then(|c| c.exporter.clone())
    }

    /// Stops tracing and sends what the exporter holds, waiting at most its timeout.
    pub async fn shutdown(&self) {
        self.observer.set_tracing(None);
        let old = self.current.lock().ok().and_then(|mut c| c.exporter.take());
        if let Some(old) = old {
            let as_sink: Arc<dyn CallSink> = old.clone();
            self.observer.remove(&as_sink);
            old.shutdown(old.config().batch.timeout).await;
        }
    }
}

impl StatsSource for Tracing {
    fn sink_stats(&self) -> Vec<SinkStats> {
        self.exporter().map(|e| e.stats()).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn settings(ratio: f64, parent_based: bool) -> TraceSettings {
        TraceSettings::new(&TracingConfig {
            enabled: true,
            sample_ratio: ratio,
            parent_based,
            ..TracingConfig::default()
        })
    }

    #[test]
    fn ratio_sampling_is_by_trace_id_and_close_to_the_ratio() {
        let s = settings(0.25, true);
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| s.sample(&context::new_trace_id()))
            .count();
        let share = hits as f64 / f64::from(n);
        assert!((0.22..0.28).contains(&share), "sampled share {share}");
        let id = context::new_trace_id();
        assert_eq!(s.sample(&id), s.sample(&id));
        assert!(settings(1.0, true).sample(&[0xff; 16]));
        assert!(!settings(0.0, true).sample(&[0; 16]));
    }

    #[test]
    fn joins_a_valid_parent_and_restarts_on_an_invalid_one() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        h.insert(&TRACESTATE, HeaderValue::from_static("a=1"));
        // Parent-based: the caller did not sample, so neither does the gateway.
        let t = settings(1.0, true).start(&h);
        assert_eq!(
            context::hex(&t.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            t.parent_span_id,
            Some(
                context::parse_traceparent(
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                )
                .unwrap()
                .span_id
            )
        );
        assert!(!t.sampled);
        assert_eq!(t.tracestate.as_deref(), Some("a=1"));
        assert!(settings(1.0, false).start(&h).sampled);

        h.insert(&TRACEPARENT, HeaderValue::from_static("00-bad"));
        let t = settings(1.0, true).start(&h);
        assert!(t.parent_span_id.is_none() && t.sampled && t.tracestate.is_none());
        let mut out = h.clone();
        t.write_headers(&mut out);
        assert!(out.get(&TRACESTATE).is_none());
        let sent = context::parent(&out).unwrap();
        assert_eq!((sent.trace_id, sent.span_id), (t.trace_id, t.span_id));
    }

    #[test]
    fn each_attempt_gets_its_own_span() {
        let mut t = settings(1.0, true).start(&HeaderMap::new());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (i, a) = t.begin_attempt("up", addr);
        t.end_attempt(i, Some(503), None, true);
        let (j, b) = t.begin_attempt("up", addr);
        t.end_attempt(j, Some(200), None, false);
        assert_ne!(a, b);
        assert_eq!(t.attempts[1].resend_count, 1);
        assert!(t.attempts[0].end_unix_ns.is_some() && t.attempts[1].end_unix_ns.is_none());
        let pa = context::parse_traceparent(a.as_bytes()).unwrap();
        assert_eq!(pa.span_id, t.attempts[0].span_id);
        assert_eq!(pa.trace_id, t.trace_id);
    }
}
