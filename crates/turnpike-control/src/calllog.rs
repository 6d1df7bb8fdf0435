//! The call-log writer: a [`CallSink`] that puts each finished call on a bounded queue, and a
//! background task that writes the queue to the store in batches
//! ([`Store::insert_call_logs`]), off the request path.
//!
//! The request path only ever does a `try_send`: when the queue is full the call is dropped
//! and counted. A failing or slow store never reaches the requests: a batch that cannot be
//! written is tried again a bounded number of times (each try with a timeout), then dropped
//! and counted as failed, while new calls keep queueing (and dropping once the queue is
//! full). A second task deletes calls older than the retention (and past the row cap).

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use turnpike_model::observe::CallLogConfig;
use turnpike_observe::{CallEvent, CallSink, Observer, WarnGate};
use turnpike_store::{CallLogRow, Store};

/// How long one store call (a batch insert, a prune) may take before it counts as failed.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause before a failed batch is tried again; it doubles per try, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often a batch that is gathering looks at the queue again.
const LINGER: Duration = Duration::from_millis(20);

/// Moves queued calls into `batch` until it holds `max`; true when the queue is closed.
fn drain(
    receiver: &mut mpsc::Receiver<Arc<CallEvent>>,
    batch: &mut Vec<Arc<CallEvent>>,
    max: usize,
) -> bool {
    while batch.len() < max {
        match receiver.try_recv() {
            Ok(e) => batch.push(e),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// What the writer has done since it started, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CallLogStats {
    /// Calls taken onto the queue.
    pub queued: u64,
    /// Calls written to the store.
    pub written: u64,
    /// Calls dropped because the queue was full.
    pub dropped: u64,
    /// Calls dropped because their batch could not be written after every retry.
    pub failed: u64,
    /// Successful calls left out by sampling.
    pub sampled_out: u64,
    /// Calls deleted by retention or the row cap.
    pub pruned: u64,
    /// Calls waiting to be written now: in the queue, or taken off it into the batch
    /// being gathered or written.
    pub queue_len: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    sampled_out: AtomicU64,
    pruned: AtomicU64,
    /// Queue-full warnings, at most one per interval.
    drop_warning: WarnGate,
}

/// Writes calls to the store in batches. Register it on the gateway's
/// [`Observer`](turnpike_observe::Observer) and run its tasks with [`Self::spawn`]
/// (or do both with [`start`]).
pub struct CallLogWriter {
    store: Store,
    config: CallLogConfig,
    queue: mpsc::Sender<Arc<CallEvent>>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Arc<CallEvent>>>>,
    counters: Counters,
    /// Successful calls whose request-id hash is below this are kept.
    keep_below: u64,
}

impl std::fmt::Debug for CallLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallLogWriter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CallSink for CallLogWriter {
    fn offer(&self, event: &Arc<CallEvent>) {
        if !self.keeps(event) {
            self.counters.sampled_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.queue.try_send(Arc::clone(event)) {
            Ok(()) => self.counters.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                let total = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.counters.drop_warning.allow() {
                    tracing::warn!(
                        dropped_total = total,
                        "call log queue full: dropping calls (the store is slower than the traffic; \
                         see observability.call_log.queue_size and sample)"
                    );
                }
                total
            }
        };
    }
}

impl CallLogWriter {
    /// A writer to `store` with `config`'s queue, batches, retries, retention and sampling.
    /// Nothing is written until [`Self::spawn`] runs its tasks; calls offered before then wait
    /// in the queue (and are dropped once it is full).
    pub fn new(store: Store, config: &CallLogConfig) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(config.queue_size.max(1));
        // The casts saturate: 1.0 keeps everything, 0.0 nothing but errors.
        let keep_below = if config.sample >= 1.0 {
            u64::MAX
        } else {
            (config.sample.max(0.0) * u64::MAX as f64) as u64
        };
        Arc::new(Self {
            store,
            config: config.clone(),
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
            counters: Counters::default(),
            keep_below,
        })
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> CallLogStats {
        let c = &self.counters;
        let (queued, written, failed) = (
            c.queued.load(Ordering::Relaxed),
            c.written.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        );
        CallLogStats {
            queued,
            written,
            dropped: c.dropped.load(Ordering::Relaxed),
            failed,
            sampled_out: c.sampled_out.load(Ordering::Relaxed),
            pruned: c.pruned.load(Ordering::Relaxed),
            // A call is counted as queued just after it is sent, so the writer may count it
            // first: the difference is briefly short, never long.
            queue_len: queued.saturating_sub(written.saturating_add(failed)),
        }
    }

    /// Errors and gateway-answered calls are always kept; successes by sampling. The
    /// decision hashes the request id, so every node (and every sink that samples the same
    /// way) keeps the same calls.
    fn keeps(&self, event: &CallEvent) -> bool {
        if self.keep_below == u64::MAX || event.status >= 400 || event.error.is_some() {
            return true;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        event.request_id.hash(&mut h);
        h.finish() < self.keep_below
    }

    /// Starts the writer task and the retention task. Both stop when `stop` turns true (or
    /// its sender is dropped); the writer first writes what is queued, so a clean shutdown
    /// (after the gateway has drained) loses no call the store can take. Only the first call
    /// starts anything; later ones return a finished task.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(receiver) = receiver else {
            return tokio::spawn(async {});
        };
        let pruner = tokio::spawn(Arc::clone(self).prune_loop(stop.clone()));
        let writer = Arc::clone(self);
        tokio::spawn(async move {
            writer.write_loop(receiver, stop).await;
            pruner.abort();
        })
    }

    async fn write_loop(
        &self,
        mut receiver: mpsc::Receiver<Arc<CallEvent>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let batch_size = self.config.batch_size.max(1);
        let mut batch: Vec<Arc<CallEvent>> = Vec::with_capacity(batch_size);
        let mut failing = false;
        let mut stopping = *stop.borrow();
        while !stopping {
            // Wait for the first call of a batch...
            tokio::select! {
                event = receiver.recv() => match event {
                    Some(e) => batch.push(e),
                    None => stopping = true,
                },
                changed = stop.changed() => stopping = changed.is_err() || *stop.borrow(),
            }
            // ...then for more, until the batch is full or its first call is due. The queue
            // is looked at every LINGER rather than on each call: one timer instead of a
            // wake-up per request.
            let due = tokio::time::Instant::now() + self.config.flush_interval;
            while !batch.is_empty() {
                stopping |= drain(&mut receiver, &mut batch, batch_size);
                let now = tokio::time::Instant::now();
                if stopping || batch.len() >= batch_size || now >= due {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until((now + LINGER).min(due)) => {}
                    changed = stop.changed() => stopping = changed.is_err() || *stop.borrow(),
                }
            }
            if !batch.is_empty() {
                self.write(&mut batch, &mut failing).await;
            }
        }
        // Stopping: what is queued now goes out too.
        while let Ok(e) = receiver.try_recv() {
            batch.push(e);
            if batch.len() >= batch_size {
                self.write(&mut batch, &mut failing).await;
            }
        }
        if !batch.is_empty() {
            self.write(&mut batch, &mut failing).await;
        }
    }

    /// Writes (and empties) `batch`, retrying with backoff; counts it as failed at the end.
    async fn write(&self, batch: &mut Vec<Arc<CallEvent>>, failing: &mut bool) {
        let rows: Vec<CallLogRow<'_>> = batch.iter().map(|e| row(e)).collect();
        self.write_rows(&rows, failing).await;
        drop(rows);
        batch.clear();
    }

    async fn write_rows(&self, rows: &[CallLogRow<'_>], failing: &mut bool) {
        let count = u64::try_from(rows.len()).unwrap_or(u64::MAX);
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            match tokio::time::timeout(STORE_TIMEOUT, self.store.insert_call_logs(rows)).await {
                Ok(Ok(_)) => {
                    self.counters.written.fetch_add(count, Ordering::Relaxed);
                    if *failing {
                        tracing::info!("call logs are reaching the store again");
                        *failing = false;
                    }
                    return;
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = format!("no answer within {STORE_TIMEOUT:?}"),
            }
        }
        self.counters.failed.fetch_add(count, Ordering::Relaxed);
        // Logged once per outage, not once per batch.
        if !*failing {
            tracing::warn!(error = %last_error, calls = count, "cannot write call logs; dropping the batch");
            *failing = true;
        }
    }

    /// Deletes calls older than the retention, then those past the row cap; returns how many
    /// went. Every node of a cluster does this; a second delete finds nothing.
    ///
    /// First, calls an earlier version stored a row each are moved into segments (those past
    /// the retention deleted instead), within [`STORE_TIMEOUT`] and whatever the outcome: a
    /// large backlog is moved over several runs and never holds up retention.
    pub async fn prune(&self) -> Result<u64, turnpike_store::StoreError> {
        let keep_ms = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let before = turnpike_store::now_ms().saturating_sub(keep_ms);
        let legacy =
            tokio::time::timeout(STORE_TIMEOUT, self.store.move_legacy_call_logs(before)).await;
        let mut n = match legacy {
            Ok(Ok(done)) => {
                if done.moved > 0 {
                    tracing::info!(
                        calls = done.moved,
                        "call logs of an earlier version moved into segments"
                    );
                }
                done.expired
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot move call logs of an earlier version");
                0
            }
            Err(_) => {
                tracing::info!("moving call logs of an earlier version goes on at the next prune");
                0
            }
        };
        n += within(self.store.prune_call_logs(before)).await?;
        if let Some(max) = self.config.max_rows {
            n += within(self.store.cap_call_logs(max)).await?;
        }
        self.counters.pruned.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    async fn prune_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.prune_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                    continue;
                }
            }
            match self.prune().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(rows = n, "old call logs deleted"),
                Err(e) => tracing::debug!(error = %e, "cannot delete old call logs"),
            }
        }
    }
}

/// `store_call`, failed if it takes longer than [`STORE_TIMEOUT`]. What it committed before
/// stays; the next prune goes on from there.
async fn within<T>(
    store_call: impl Future<Output = Result<T, turnpike_store::StoreError>>,
) -> Result<T, turnpike_store::StoreError> {
    tokio::time::timeout(STORE_TIMEOUT, store_call)
        .await
        .unwrap_or_else(|_| {
            Err(turnpike_store::StoreError::Other(
                format!("timed out after {STORE_TIMEOUT:?}").into(),
            ))
        })
}

/// A call as stored, borrowing the event's text.
fn row(e: &CallEvent) -> CallLogRow<'_> {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    CallLogRow {
        at: e.time_unix_ms,
        request_id: &e.request_id,
        trace_id: e.trace_id.as_deref(),
        client_ip: Cow::Owned(turnpike_observe::text::ip_text(e.client_ip)),
        protocol: e.protocol,
        method: &e.method,
        host: e.host.as_deref(),
        path: &e.path,
        route: e.route.as_deref(),
        service: e.service.as_deref(),
        application: e.application.as_deref(),
        application_name: e.application_name.as_deref(),
        team: e.team.as_deref().filter(|t| !t.is_empty()),
        status: i64::from(e.status),
        bytes_in: int(e.bytes_in),
        bytes_out: int(e.bytes_out),
        duration_us: int(e.duration_us),
        upstream_us: e.upstream_us.map(int),
        upstream: e.upstream.as_deref(),
        upstream_target: e
            .upstream_target
            .map(|t| Cow::Owned(turnpike_observe::text::socket_addr_text(t))),
        attempts: i64::from(e.attempts),
        cache: e.cache,
        error: e.error,
        user_agent: e.user_agent.as_deref(),
        completed: e.completed,
    }
}

impl turnpike_observe::StatsSource for CallLogWriter {
    fn sink_stats(&self) -> Vec<turnpike_observe::SinkStats> {
        let s = self.stats();
        vec![turnpike_observe::SinkStats {
            name: "call_log".into(),
            kind: "call_log",
            sent: s.written,
            dropped: s.dropped,
            failed: s.failed,
            queued: usize::try_from(s.queue_len).unwrap_or(usize::MAX),
        }]
    }
}

/// A running call-log writer, as [`start`] returns it.
#[derive(Debug)]
pub struct CallLogHandle {
    /// The writer, for its [`CallLogWriter::stats`].
    pub writer: Arc<CallLogWriter>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl CallLogHandle {
    /// Stops the tasks after writing what is queued, waiting at most `deadline`. Call it
    /// after the gateway has drained, so the last calls are in the queue.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            tracing::warn!("the last call logs could not be written in time");
        }
    }
}

/// Starts writing the calls `observer` sees to `store`, unless `config` disables it: makes a
/// [`CallLogWriter`], registers it on the observer and runs its tasks.
pub fn start(store: Store, config: &CallLogConfig, observer: &Observer) -> Option<CallLogHandle> {
    let (stop, stop_rx) = watch::channel(false);
    let (writer, task) = spawn(store, config, observer, stop_rx)?;
    Some(CallLogHandle { writer, stop, task })
}

/// Like [`start`], stopped by `stop` (as [`CallLogWriter::spawn`]): the task it returns ends
/// once the queue has been written after `stop` turns true.
pub fn spawn(
    store: Store,
    config: &CallLogConfig,
    observer: &Observer,
    stop: watch::Receiver<bool>,
) -> Option<(Arc<CallLogWriter>, JoinHandle<()>)> {
    if !config.enabled {
        return None;
    }
    let writer = CallLogWriter::new(store, config);
    let task = writer.spawn(stop);
    observer.add(writer.clone());
    let source: Arc<dyn turnpike_observe::StatsSource> = writer.clone();
    observer.add_stats(&source);
    Some((writer, task))
}
