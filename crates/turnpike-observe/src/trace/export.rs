//! OTLP/HTTP (protobuf) export of the gateway's spans, off the request path.
//!
//! [`TraceExporter::offer`] only pushes sampled calls onto a bounded queue and counts what
//! does not fit; one task batches them, encodes an `ExportTraceServiceRequest` with the
//! OpenTelemetry protocol types, and POSTs it with retries on the answers OTLP calls
//! retryable (429, 502, 503, 504, and transport errors).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode,
};
use prost::Message;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use turnpike_model::observe::tracing::OtlpTraceExport;

use super::TraceFacts;
use crate::{CallEvent, CallSink, SinkStats, WarnGate};

/// How often a gathering batch looks at the queue again.
const LINGER: Duration = Duration::from_millis(20);

/// The longest pause between two tries of one batch (`Retry-After` is capped the same way).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `flags` bit saying whether the parent's remoteness is known (OTLP `SpanFlags`).
const HAS_IS_REMOTE: u32 = 0x100;
/// `flags` bit saying the parent came from another process.
const IS_REMOTE: u32 = 0x200;

#[derive(Debug, Default)]
struct Counters {
    /// Spans the collector accepted.
    sent: AtomicU64,
    /// Calls dropped because the queue was full.
    dropped: AtomicU64,
    /// Spans lost because the collector refused them or kept failing.
    failed: AtomicU64,
    /// Export requests sent again after a retryable failure.
    retries: AtomicU64,
    /// Drop and failure warnings, at most one per interval.
    warning: WarnGate,
}

/// Exports the spans of sampled calls to an OTLP/HTTP collector.
pub struct TraceExporter {
    cfg: OtlpTraceExport,
    tx: mpsc::Sender<Arc<CallEvent>>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TraceExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceExporter")
            .field("endpoint", &self.cfg.endpoint)
            .finish_non_exhaustive()
    }
}

impl CallSink for TraceExporter {
    fn offer(&self, event: &Arc<CallEvent>) {
        if !event.trace.as_ref().is_some_and(|t| t.sampled) {
            return;
        }
        if self.tx.try_send(Arc::clone(event)).is_err() {
            let total = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if self.counters.warning.allow() {
                tracing::warn!(
                    dropped_total = total,
                    "trace export queue full: dropping spans (the collector is slower than the traffic)"
                );
            }
        }
    }
}

impl TraceExporter {
    /// Starts the export task. Must run inside a Tokio runtime.
    pub fn start(
        cfg: &OtlpTraceExport,
        service_name: &str,
        resource: &BTreeMap<String, String>,
    ) -> Result<Arc<Self>, String> {
        let mut headers = http::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("otlp.headers: `{k}` is not a valid header name"))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| format!("otlp.headers.{k}: not a valid header value"))?;
            headers.insert(name, value);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        let client = reqwest::Client::builder()
            .timeout(cfg.batch.timeout)
            .default_headers(headers)
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            cfg: cfg.clone(),
            client,
            resource: resource_of(service_name, resource),
            counters: counters.clone(),
        };
        let task = tokio::spawn(worker.run(rx, stop_rx));
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            tx,
            counters,
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// The export settings this exporter runs with.
    pub fn config(&self) -> &OtlpTraceExport {
        &self.cfg
    }

    /// What the exporter has done so far (`sent` and `failed` count spans, `dropped` calls).
    pub fn stats(&self) -> SinkStats {
        SinkStats {
            name: "otlp-traces".into(),
            kind: "otlp_traces",
            sent: self.counters.sent.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            queued: self.tx.max_capacity() - self.tx.capacity(),
        }
    }

    /// Export requests sent again after a retryable failure.
    pub fn retries(&self) -> u64 {
        self.counters.retries.load(Ordering::Relaxed)
    }

    /// Sends what is queued, waiting at most `deadline`, then stops the task.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        let task = self.task.lock().await.take();
        if let Some(mut task) = task
            && tokio::time::timeout(deadline, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!("trace export did not finish in time; queued spans were lost");
        }
    }
}

impl Drop for TraceExporter {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Worker {
    cfg: OtlpTraceExport,
    client: reqwest::Client,
    resource: Resource,
    counters: Arc<Counters>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Arc<CallEvent>>, mut stop: watch::Receiver<bool>) {
        let size = self.cfg.batch.batch_size.max(1);
        let mut batch: Vec<Arc<CallEvent>> = Vec::with_capacity(size.min(1024));
        loop {
            // Wait for a first call, or the stop signal.
            let first = tokio::select! {
                e = rx.recv() => e,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(first) = first else { break };
            batch.push(first);
            // Gather until the batch is full or `max_delay` passed, looking at the queue every
            // LINGER rather than waking for each call.
            let until = tokio::time::Instant::now() + self.cfg.batch.max_delay;
            loop {
                while batch.len() < size {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let now = tokio::time::Instant::now();
                if batch.len() >= size || now >= until || *stop.borrow() {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until((now + LINGER).min(until)) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            self.export(std::mem::take(&mut batch), &mut stop).await;
        }
        // Stopping: what is still queued goes out in full batches.
        rx.close();
        while let Some(e) = rx.recv().await {
            batch.push(e);
            if batch.len() >= size {
                self.export(std::mem::take(&mut batch), &mut stop).await;
            }
        }
        if !batch.is_empty() {
            self.export(batch, &mut stop).await;
        }
    }

    /// Sends the spans of `calls`, retrying retryable failures with a capped backoff until
    /// stop is asked for (then what is left goes out once, within the shutdown deadline).
    async fn export(&self, calls: Vec<Arc<CallEvent>>, stop: &mut watch::Receiver<bool>) {
        let spans: Vec<Span> = calls.iter().flat_map(|e| spans_of(e)).collect();
        let n = spans.len() as u64;
        if n == 0 {
            return;
        }
        let body = request(self.resource.clone(), spans).encode_to_vec();
        let b = &self.cfg.batch;
        let mut attempt = 0;
        loop {
            let outcome = self
                .client
                .post(&self.cfg.endpoint)
                .body(body.clone())
                .send()
                .await;
            let (retryable, why, wait) = match outcome {
                Ok(r) if r.status().is_success() => {
                    self.counters.sent.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Ok(r) => {
                    let s = r.status().as_u16();
                    let wait = r
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_BACKOFF));
                    (
                        matches!(s, 429 | 502 | 503 | 504),
                        format!("collector answered {s}"),
                        wait,
                    )
                }
                Err(e) => (true, format!("cannot reach the collector: {e}"), None),
            };
            if retryable && attempt < b.max_retries && !*stop.borrow() {
                let backoff = b
                    .retry_backoff
                    .saturating_mul(1 << attempt.min(16))
                    .min(MAX_BACKOFF);
                attempt += 1;
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    () = tokio::time::sleep(wait.unwrap_or(backoff)) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                continue;
            }
            let total = self.counters.failed.fetch_add(n, Ordering::Relaxed) + n;
            if self.counters.warning.allow() {
                tracing::warn!(failed_total = total, error = %why, "trace export failed");
            }
            return;
        }
    }
}

fn text(key: &str, v: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn resource_of(service_name: &str, extra: &BTreeMap<String, String>) -> Resource {
    let mut attributes = vec![
        text("service.name", service_name),
        text("service.version", env!("CARGO_PKG_VERSION")),
        text("telemetry.sdk.name", "turnpike"),
        text("telemetry.sdk.language", "rust"),
    ];
    for (k, v) in extra {
        attributes.retain(|a| &a.key != k);
        attributes.push(text(k, v.as_str()));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn request(resource: Resource, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "turnpike".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn status(error: bool, message: Option<&str>) -> Option<Status> {
    error.then(|| Status {
        code: StatusCode::Error as i32,
        message: message.unwrap_or_default().to_owned(),
    })
}

/// The server span and one client span per upstream attempt of a traced call.
pub fn spans_of(e: &CallEvent) -> Vec<Span> {
    let Some(t) = e.trace.as_deref() else {
        return Vec::new();
    };
    let end = t
        .start_unix_ns
        .saturating_add(e.duration_us.saturating_mul(1000));
    let mut out = Vec::with_capacity(1 + t.attempts.len());
    out.push(server_span(e, t, end));
    let flags = u32::from(u8::from(t.sampled)) | HAS_IS_REMOTE;
    for a in &t.attempts {
        let mut attributes = vec![
            text("http.request.method", e.method.as_str()),
            text("server.address", a.target.ip().to_string()),
            int("server.port", i64::from(a.target.port())),
            text("turnpike.upstream", &*a.upstream),
        ];
        if a.resend_count > 0 {
            attributes.push(int("http.request.resend_count", i64::from(a.resend_count)));
        }
        if let Some(s) = a.status {
            attributes.push(int("http.response.status_code", i64::from(s)));
        }
        let error_type = a
            .error
            .map(str::to_owned)
            .or_else(|| a.status.filter(|s| *s >= 500).map(|s| s.to_string()));
        if let Some(err) = &error_type {
            attributes.push(text("error.type", err.as_str()));
        }
        out.push(Span {
            trace_id: t.trace_id.to_vec(),
            span_id: a.span_id.to_vec(),
            trace_state: t.tracestate.clone().unwrap_or_default(),
            parent_span_id: t.span_id.to_vec(),
            flags,
            name: e.method.clone(),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: a.start_unix_ns,
            end_time_unix_nano: a.end_unix_ns.unwrap_or(end).max(a.start_unix_ns),
            attributes,
            status: status(error_type.is_some(), error_type.as_deref()),
            ..Default::default()
        });
    }
    out
}

fn server_span(e: &CallEvent, t: &TraceFacts, end: u64) -> Span {
    let mut attributes = vec![
        text("http.request.method", e.method.as_str()),
        text("url.path", e.path.as_str()),
        text(
            "network.protocol.version",
            e.protocol.trim_start_matches("HTTP/"),
        ),
        text("client.address", e.client_ip.to_string()),
        int("http.response.status_code", i64::from(e.status)),
        text("turnpike.request_id", e.request_id.as_str()),
    ];
    if let Some(q) = &e.query {
        // Query strings can carry credentials; only their presence is recorded.
        attributes.push(int("url.query_length", i64::try_from(q.len()).unwrap_or(0)));
    }
    if let Some(h) = &e.host {
        attributes.push(text("server.address", h.as_str()));
    }
    if let Some(ua) = &e.user_agent {
        attributes.push(text("user_agent.original", ua.as_str()));
    }
    for (key, value) in [
        ("turnpike.route", &e.route),
        ("turnpike.service", &e.service),
        ("turnpike.application", &e.application),
        ("turnpike.upstream", &e.upstream),
    ] {
        if let Some(v) = value {
            attributes.push(text(key, &**v));
        }
    }
    if let Some(code) = e.error {
        attributes.push(text("turnpike.error_code", code));
    }
    if !e.completed {
        attributes.push(text("turnpike.aborted", "true"));
    }
    // A server span is an error when the gateway answered 5xx (a 4xx is the caller's).
    let error_type = (e.status >= 500).then(|| e.error.unwrap_or("5xx").to_owned());
    if let Some(err) = &error_type {
        attributes.push(text("error.type", err.as_str()));
    }
    let mut flags = u32::from(u8::from(t.sampled)) | HAS_IS_REMOTE;
    if t.parent_span_id.is_some() {
        flags |= IS_REMOTE;
    }
    Span {
        trace_id: t.trace_id.to_vec(),
        span_id: t.span_id.to_vec(),
        trace_state: t.tracestate.clone().unwrap_or_default(),
        parent_span_id: t.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: match &e.route {
            Some(r) => format!("{} {r}", e.method),
            None => e.method.clone(),
        },
        kind: SpanKind::Server as i32,
        start_time_unix_nano: t.start_unix_ns,
        end_time_unix_nano: end,
        attributes,
        status: status(error_type.is_some(), error_type.as_deref()),
        ..Default::default()
    }
}
