//! The quota sync: makes a gateway's in-memory quota counts
//! ([`turnpike_proxy::quota::QuotaTracker`]) durable and shared by every node of a cluster.
//!
//! Every `interval` (and once at start, and once at shutdown) it adds this node's counts since
//! the last flush to the store (`Store::add_usage`, an additive upsert on (application,
//! service, period, period start)) and reloads the totals of the current periods, which now
//! include every node's flushed counts. It never runs on the request path: requests only
//! touch the tracker's memory.
//!
//! When the store is unreachable or slow (each call has a timeout), the counts stay pending
//! in memory and go with the next flush; requests keep flowing, checked against the last
//! totals plus this node's own counts. A flush that times out after the database applied it
//! is sent again, so an outage can only make counts too high, never lose them.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use turnpike_model::mgmt::QuotaPeriod;
use turnpike_proxy::quota::{QuotaTracker, UsageKey};
use turnpike_store::{Store, Usage};

/// How often a node flushes its counts and reloads the totals, by default. It bounds the
/// overshoot of a cluster: each other node may admit what it sees in one interval.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// How long one store call of a sync may take, by default.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long counters of past periods are kept in the store, by default: the usage API shows
/// the current periods, and a year and a bit leaves time to bill or export the rest.
pub const DEFAULT_USAGE_RETENTION: Duration = Duration::from_secs(400 * 86_400);
/// The shortest retention: the current month (31 days at most) must never be pruned.
pub const MIN_USAGE_RETENTION: Duration = Duration::from_secs(32 * 86_400);
/// How often a node prunes old counters; every node does, and a second delete finds nothing.
const PRUNE_EVERY_MS: i64 = 3_600_000;

/// Flushes one gateway's quota counts to the store and reloads the cluster's totals.
pub struct QuotaSync {
    store: Store,
    tracker: Arc<QuotaTracker>,
    timeout: Duration,
    retention: Duration,
    /// When this node last pruned (tracker clock, epoch milliseconds).
    pruned_at: std::sync::Mutex<Option<i64>>,
    /// One sync at a time: the tracker's flush protocol has one flush in flight.
    running: tokio::sync::Mutex<()>,
}

/// What went wrong in a sync; the counts are kept for the next one either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError(pub String);

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SyncError {}

impl QuotaSync {
    /// A sync of `tracker` (the gateway's, [`turnpike_proxy::gateway::Gateway::quotas`])
    /// with `store`; each store call gives up after `timeout`.
    pub fn new(store: Store, tracker: Arc<QuotaTracker>, timeout: Duration) -> Arc<Self> {
        Self::with_retention(store, tracker, timeout, DEFAULT_USAGE_RETENTION)
    }

    /// Like [`Self::new`], keeping counters of periods that started within `retention`
    /// (at least [`MIN_USAGE_RETENTION`]; a shorter one is raised to it).
    pub fn with_retention(
        store: Store,
        tracker: Arc<QuotaTracker>,
        timeout: Duration,
        retention: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tracker,
            timeout,
            retention: retention.max(MIN_USAGE_RETENTION),
            pruned_at: std::sync::Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// Deletes counters older than the retention, at most once an hour (the sync task calls
    /// it after a sync, never before the shutdown flush). Old rows are never read by a
    /// sync, so a failure only leaves them for the next try.
    pub async fn prune(&self) {
        let now = self.tracker.now_ms();
        {
            let mut at = self
                .pruned_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if at.is_some_and(|t| now - t < PRUNE_EVERY_MS) {
                return;
            }
            *at = Some(now);
        }
        let keep_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let before = now.saturating_sub(keep_ms);
        match tokio::time::timeout(self.timeout, self.store.prune_usage(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(rows = n, "old quota counters pruned"),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot prune old quota counters"),
            Err(_) => tracing::debug!("pruning old quota counters timed out"),
        }
    }

    /// Flushes pending counts, then reloads the totals. Both steps are tried: a failed flush
    /// still reloads (others' counts are worth seeing), and its counts stay pending.
    pub async fn sync(&self) -> Result<(), SyncError> {
        let _one = self.running.lock().await;
        let deltas = self.tracker.begin_flush();
        let mut error = None;
        if !deltas.is_empty() {
            let rows: Vec<Usage> = deltas
                .iter()
                .map(|(k, n)| Usage {
                    application: k.application.clone(),
                    service: k.service.clone(),
                    period: k.period.as_str().to_owned(),
                    period_start: k.period_start,
                    used: i64::try_from(*n).unwrap_or(i64::MAX),
                })
                .collect();
            let now = self.tracker.now_ms();
            let stored =
                match tokio::time::timeout(self.timeout, self.store.add_usage(&rows, now)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        error = Some(format!("cannot flush quota counts: {e}"));
                        false
                    }
                    Err(_) => {
                        error = Some(format!(
                            "cannot flush quota counts: no answer within {:?}",
                            self.timeout
                        ));
                        false
                    }
                };
            self.tracker.end_flush(stored);
        }
        let since = self.tracker.current_since();
        match tokio::time::timeout(self.timeout, self.store.usage_since(since)).await {
            Ok(Ok(rows)) => {
                let totals: Vec<(UsageKey, u64)> = rows
                    .into_iter()
                    .filter_map(|r| {
                        Some((
                            UsageKey {
                                period: QuotaPeriod::parse(&r.period)?,
                                application: r.application,
                                service: r.service,
                                period_start: r.period_start,
                            },
                            u64::try_from(r.used).unwrap_or(0),
                        ))
                    })
                    .collect();
                self.tracker.set_totals(since, &totals);
            }
            Ok(Err(e)) => {
                error.get_or_insert(format!("cannot read quota totals: {e}"));
            }
            Err(_) => {
                error.get_or_insert(format!(
                    "cannot read quota totals: no answer within {:?}",
                    self.timeout
                ));
            }
        }
        match error {
            Some(e) => Err(SyncError(e)),
            None => Ok(()),
        }
    }

    /// Syncs now, then every `interval`, until `stop` turns true (or its sender is dropped);
    /// then syncs a last time, so a clean shutdown loses no count the store can take.
    pub fn spawn(
        self: &Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    changed = stop.changed() => changed.is_err() || *stop.borrow(),
                };
                match this.sync().await {
                    Ok(()) if failing => {
                        tracing::info!("quota counts are reaching the store again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        // Logged once per outage, not once per interval.
                        if !failing {
                            tracing::warn!(error = %e, "quota sync failed; counting in memory and retrying");
                        }
                        failing = true;
                    }
                }
                if stopping {
                    return;
                }
                if !failing {
                    this.prune().await;
                }
            }
        })
    }
}
