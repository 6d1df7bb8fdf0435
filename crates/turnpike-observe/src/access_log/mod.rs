//! Structured access logs: one JSON record per request, sent to any number of sinks
//! (stdout, a rotated file, HTTP batches, syslog, OTLP logs, a Redis stream, NATS).
//!
//! [`AccessLog`] is a [`CallSink`]: its `offer` only pushes the event onto each sink's
//! bounded queue (`try_send`), so the request path never waits for a sink. Each sink has its
//! own background task that formats, batches and writes; when a queue is full the event is
//! dropped and counted ([`AccessLog::stats`]). [`AccessLogs`] owns the running access log,
//! rebuilds it when its configuration changes and flushes it on shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use turnpike_model::observe::access_log::{AccessLogConfig, SinkKind};

use crate::{CallEvent, CallSink, Observer, WarnGate};

pub mod capture;
pub mod format;
mod worker;

mod file;
mod http;
mod nats;
mod otlp;
mod redis;
mod stdout;
mod syslog;

use capture::Capture;
use format::Formatter;

pub use crate::SinkStats;

/// Per-sink counters, shared by the request path (drops) and the sink's task.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Drop and failure warnings are rate-limited, so a full queue does not flood the log
    /// with one line per request.
    drop_warning: WarnGate,
    fail_warning: WarnGate,
}

impl Counters {
    fn dropped_one(&self, sink: &str) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if self.drop_warning.allow() {
            tracing::warn!(
                sink,
                dropped_total = total,
                "access log queue full: dropping records (the sink is slower than the traffic)"
            );
        }
    }

    pub(crate) fn failed(&self, sink: &str, n: usize, why: &str) {
        let total = self.failed.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if self.fail_warning.allow() {
            tracing::warn!(
                sink,
                failed_total = total,
                error = why,
                "access log sink failed"
            );
        }
    }
}

struct SinkHandle {
    name: String,
    kind: &'static str,
    tx: mpsc::Sender<Arc<CallEvent>>,
    counters: Arc<Counters>,
}

/// A running access log: the sinks of one configuration and their tasks.
pub struct AccessLog {
    config: AccessLogConfig,
    capture: Option<Arc<Capture>>,
    sinks: Vec<SinkHandle>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("sinks", &self.stats())
            .finish()
    }
}

impl CallSink for AccessLog {
    fn offer(&self, event: &Arc<CallEvent>) {
        for s in &self.sinks {
            if s.tx.try_send(Arc::clone(event)).is_err() {
                s.counters.dropped_one(&s.name);
            }
        }
    }
}

impl AccessLog {
    /// Starts the sinks of `cfg` (each a task on the current Tokio runtime). Connections
    /// are made by the tasks, so an unreachable destination does not stop the gateway: its
    /// records are counted as failed. Returns `None` when no sink is configured.
    pub fn start(cfg: &AccessLogConfig) -> Result<Option<Arc<Self>>, String> {
        if cfg.sinks.is_empty() {
            return Ok(None);
        }
        let capture = Capture::from_config(&cfg.capture).map(Arc::new);
        let formatter = Arc::new(
            Formatter::new(&cfg.fields, capture.as_deref()).with_query_mask(&cfg.mask_query_params),
        );
        let (stop, stop_rx) = watch::channel(false);
        let mut sinks = Vec::new();
        let mut tasks = Vec::new();
        for (i, s) in cfg.sinks.iter().enumerate() {
            let kind = s.kind.type_name();
            let name = s.name.clone().unwrap_or_else(|| format!("{kind}-{i}"));
            let (tx, rx) = mpsc::channel(s.queue_size.max(1));
            let counters = Arc::new(Counters::default());
            let ctx = worker::Context {
                name: name.clone(),
                rx,
                stop: stop_rx.clone(),
                counters: Arc::clone(&counters),
                formatter: Arc::clone(&formatter),
            };
            let path = format!("observability.access_log.sinks[{i}]");
            let task = match &s.kind {
                SinkKind::Stdout(_) => worker::spawn(ctx, worker::local(), stdout::Stdout::new()),
                SinkKind::File(f) => worker::spawn(ctx, worker::local(), file::FileWriter::new(f)),
                SinkKind::Http(h) => worker::spawn(
                    ctx,
                    worker::remote(&h.batch),
                    http::HttpWriter::new(h).map_err(|e| format!("{path}: {e}"))?,
                ),
                SinkKind::Syslog(c) => {
                    worker::spawn(ctx, worker::local(), syslog::SyslogWriter::new(c))
                }
                SinkKind::Otlp(o) => worker::spawn(
                    ctx,
                    worker::remote(&o.batch),
                    otlp::OtlpWriter::new(o).map_err(|e| format!("{path}: {e}"))?,
                ),
                SinkKind::Redis(r) => worker::spawn(
                    ctx,
                    worker::remote(&r.batch),
                    redis::RedisWriter::new(r).map_err(|e| format!("{path}: {e}"))?,
                ),
                SinkKind::Nats(n) => {
                    worker::spawn(ctx, worker::remote(&n.batch), nats::NatsWriter::new(n))
                }
            };
            tasks.push(task);
            sinks.push(SinkHandle {
                name,
                kind,
                tx,
                counters,
            });
        }
        Ok(Some(Arc::new(Self {
            config: cfg.clone(),
            capture,
            sinks,
            stop,
            tasks: Mutex::new(tasks),
        })))
    }

    /// The configuration this access log runs.
    pub fn config(&self) -> &AccessLogConfig {
        &self.config
    }

    /// Counters of every sink, in configuration order (for metrics and the admin API).
    pub fn stats(&self) -> Vec<SinkStats> {
        self.sinks
            .iter()
            .map(|s| SinkStats {
                name: s.name.clone(),
                kind: s.kind,
                sent: s.counters.sent.load(Ordering::Relaxed),
                dropped: s.counters.dropped.load(Ordering::Relaxed),
                failed: s.counters.failed.load(Ordering::Relaxed),
                queued: s.tx.max_capacity() - s.tx.capacity(),
            })
            .collect()
    }

    /// Asks every sink to send what it has queued, waiting at most `deadline`; tasks still
    /// busy then are aborted (their records are lost, not waited on).
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        let until = tokio::time::Instant::now() + deadline;
        for mut task in tasks {
            if tokio::time::timeout_at(until, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // Tasks end on their own once stopped and their queue is drained.
        let _ = self.stop.send(true);
    }
}

/// The gateway's access log across reloads: registers it on the [`Observer`], replaces it
/// when the `observability.access_log` section changes, and flushes it on shutdown.
pub struct AccessLogs {
    observer: Arc<Observer>,
    current: Mutex<Option<Arc<AccessLog>>>,
}

impl std::fmt::Debug for AccessLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogs").finish_non_exhaustive()
    }
}

impl crate::StatsSource for AccessLogs {
    fn sink_stats(&self) -> Vec<SinkStats> {
        self.stats()
    }
}

impl AccessLogs {
    /// Nothing running yet; call [`AccessLogs::apply`] with the configuration.
    pub fn new(observer: Arc<Observer>) -> Self {
        Self {
            observer,
            current: Mutex::new(None),
        }
    }

    /// Runs `cfg`: a no-op when it equals the running configuration; otherwise the new
    /// sinks start, take over on the observer, and the old ones flush in the background.
    /// On error the running access log is kept.
    pub fn apply(&self, cfg: &AccessLogConfig) -> Result<(), String> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| "access log state poisoned".to_owned())?;
        if current.as_ref().map(|c| c.config()) == Some(cfg)
            || (current.is_none() && cfg.sinks.is_empty())
        {
            return Ok(());
        }
        let next = AccessLog::start(cfg)?;
        // The capture settings follow the sinks: with no sink, nothing is captured.
        self.observer
            .set_capture(next.as_ref().and_then(|n| n.capture.clone()));
        // One step, as for the trace exporter: a call finishing meanwhile is logged once.
        let old = current.take();
        self.observer.swap(
            old.clone().map(|o| o as Arc<dyn CallSink>).as_ref(),
            next.clone().map(|n| n as Arc<dyn CallSink>),
        );
        if let Some(old) = old {
            let deadline = old.config.flush_timeout;
            tokio::spawn(async move { old.shutdown(deadline).await });
        }
        *current = next;
        Ok(())
    }

    /// The running access log, if any.
    pub fn current(&self) -> Option<Arc<AccessLog>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Counters of the running sinks.
    pub fn stats(&self) -> Vec<SinkStats> {
        self.current().map(|c| c.stats()).unwrap_or_default()
    }

    /// Unregisters the access log and flushes its queues within its `flush_timeout`.
    pub async fn shutdown(&self) {
        let old = self.current.lock().ok().and_then(|mut c| c.take());
        if let Some(old) = old {
            self.observer
                .remove(&(Arc::clone(&old) as Arc<dyn CallSink>));
            self.observer.set_capture(None);
            old.shutdown(old.config.flush_timeout).await;
        }
    }
}
