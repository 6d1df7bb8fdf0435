//! Analytics rollups: a [`CallSink`] that counts calls per minute in memory, a flusher that
//! writes closed minutes to the store, and a downsampler that merges minutes into hours and
//! hours into days and enforces retention.
//!
//! On the request path, [`Rollups::offer`] locks one of 16 shards for a few hash-map
//! operations and a sketch insert; it never waits on I/O. Memory is bounded: each shard keeps
//! at most its share of `max_keys_per_minute` keys per minute (the rest count under the key
//! `_other`, and [`Rollups::overflowed`] counts them), and at most [`MAX_PENDING_MINUTES`]
//! unflushed minutes (older ones are dropped and counted when the store stays down).
//!
//! Minute rows are per flush batch: the `node` column is `<node>.<batch>`, a random id per
//! process and a number that moves on only after a batch was written. A failed flush puts
//! its minutes back and the next attempt writes them under the same batch id, setting (not
//! adding to) those rows; so a flush whose commit landed but whose answer was lost is never
//! counted twice, and nodes sharing a PostgreSQL never race on a row. Hours and days are
//! recomputed from the finer rows of every node and replaced, so the downsampler is
//! idempotent and any number of nodes may run it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use turnpike_model::observe::AnalyticsConfig;
use turnpike_observe::{CallEvent, CallSink};
use turnpike_proxy::quota::{Clock, SystemClock};
use turnpike_store::sketch::LatencySketch;
use turnpike_store::{RollupFilter, RollupRow, Step, Store, fold_rows};

/// The label of keys past the per-minute cap.
pub const OTHER: &str = "_other";
/// Unflushed minutes kept in memory while the store is unreachable.
pub const MAX_PENDING_MINUTES: usize = 120;
const SHARDS: usize = 16;
/// How long one store call of the flusher or downsampler may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Buckets the downsampler fills per run and resolution, so a long outage is caught up in
/// steps rather than one huge run.
const MAX_BUCKETS_PER_RUN: i64 = 24 * 8;

/// The clock analytics cut minutes by; tests replace it.
pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    minute: i64,
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
    application: Option<Arc<str>>,
    status: u16,
}

#[derive(Debug, Default, Clone)]
struct Agg {
    requests: u64,
    errors_4xx: u64,
    errors_5xx: u64,
    bytes_in: u64,
    bytes_out: u64,
    latency_sum_us: u64,
    sketch: LatencySketch,
}

impl Agg {
    fn add(&mut self, e: &CallEvent) {
        self.requests += 1;
        match e.status {
            400..=499 => self.errors_4xx += 1,
            500..=599 => self.errors_5xx += 1,
            _ => {}
        }
        self.bytes_in = self.bytes_in.saturating_add(e.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(e.bytes_out);
        self.latency_sum_us = self.latency_sum_us.saturating_add(e.duration_us);
        self.sketch.add(e.duration_us);
    }

    fn merge(&mut self, o: &Self) {
        self.requests += o.requests;
        self.errors_4xx += o.errors_4xx;
        self.errors_5xx += o.errors_5xx;
        self.bytes_in = self.bytes_in.saturating_add(o.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(o.bytes_out);
        self.latency_sum_us = self.latency_sum_us.saturating_add(o.latency_sum_us);
        self.sketch.merge(&o.sketch);
    }
}

/// The hasher of the in-memory aggregates. Their keys are configured names and store ids,
/// not what a client sends, so a fast hash is enough; it runs on every request, where
/// SipHash showed in the profiles of `bench/run.sh observe`.
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct Shard {
    aggs: HashMap<Key, Agg, FastHash>,
    /// Distinct keys per minute in this shard.
    keys: HashMap<i64, usize, FastHash>,
}

/// The flush batch being written, and what its retry must cover.
#[derive(Default)]
struct Batch {
    /// Its number (the `<batch>` of `<node>.<batch>`).
    number: u64,
    /// After a failed attempt: the attempt's cut-off. The retry takes at least those
    /// minutes, so it sets every row the failed attempt may have committed; a row it left
    /// out would be written again under the next batch and counted twice.
    retry_before: Option<i64>,
}

/// The in-memory per-minute aggregator (the sink) and its flush to the store.
pub struct Rollups {
    shards: Vec<Mutex<Shard>>,
    keys_per_shard: usize,
    overflowed: AtomicU64,
    dropped: AtomicU64,
    /// Calls whose minute rows reached the store.
    flushed: AtomicU64,
    node: String,
    /// The next flush batch; held for the whole flush, so flushes never overlap.
    batch: tokio::sync::Mutex<Batch>,
    /// Tests: the next successful write reports a failure, as if the store's answer was lost.
    lose_next_ack: std::sync::atomic::AtomicBool,
    clock: Mutex<SharedClock>,
    other: Arc<str>,
    /// Picks a key's shard.
    hasher: FastHash,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn label(v: Option<&Arc<str>>) -> String {
    v.map_or_else(String::new, |s| s.to_string())
}

impl Rollups {
    /// An aggregator keeping at most `max_keys_per_minute` keys per minute, writing its
    /// minute rows as `node`.
    pub fn new(max_keys_per_minute: usize, node: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            keys_per_shard: max_keys_per_minute.div_ceil(SHARDS).max(1),
            overflowed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            node: node.into(),
            batch: tokio::sync::Mutex::default(),
            lose_next_ack: std::sync::atomic::AtomicBool::new(false),
            clock: Mutex::new(Arc::new(SystemClock)),
            other: Arc::from(OTHER),
            hasher: FastHash::default(),
        })
    }

    /// Replaces the clock that decides which minutes are closed (tests).
    pub fn set_clock(&self, clock: SharedClock) {
        *self.clock.lock().unwrap_or_else(PoisonError::into_inner) = clock;
    }

    /// Now, by the aggregator's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .now_ms()
    }

    /// The node id minute rows are written under (as `<node>.<batch>`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Makes the next write that succeeds report a failure anyway, like a commit whose
    /// answer never arrived (tests of the idempotent retry).
    #[doc(hidden)]
    pub fn lose_next_ack(&self) {
        self.lose_next_ack.store(true, Ordering::Relaxed);
    }

    /// Calls counted under `_other` because their minute had too many keys.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Calls dropped because the store stayed unreachable past [`MAX_PENDING_MINUTES`].
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn shard_of(&self, key: &Key) -> usize {
        usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0)
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes every minute before `before` (all of them with `i64::MAX`) out of memory.
    fn take(&self, before: i64) -> Vec<(Key, Agg)> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let mut shard = self.lock(i);
            let closed: Vec<Key> = shard
                .aggs
                .keys()
                .filter(|k| k.minute < before)
                .cloned()
                .collect();
            for k in closed {
                if let Some(a) = shard.aggs.remove(&k) {
                    out.push((k, a));
                }
            }
            shard.keys.retain(|m, _| *m >= before);
        }
        out
    }

    /// Puts back what a failed flush took, bounded to the newest minutes.
    fn put_back(&self, taken: Vec<(Key, Agg)>) {
        let mut minutes: Vec<i64> = taken.iter().map(|(k, _)| k.minute).collect();
        minutes.sort_unstable();
        minutes.dedup();
        let oldest_kept = minutes
            .len()
            .checked_sub(MAX_PENDING_MINUTES)
            .and_then(|skip| minutes.get(skip).copied())
            .unwrap_or(i64::MIN);
        for (k, a) in taken {
            if k.minute < oldest_kept {
                self.dropped.fetch_add(a.requests, Ordering::Relaxed);
                continue;
            }
            let mut shard = self.lock(self.shard_of(&k));
            let new_key = usize::from(!shard.aggs.contains_key(&k));
            *shard.keys.entry(k.minute).or_insert(0) += new_key;
            shard.aggs.entry(k).or_default().merge(&a);
        }
    }

    /// Writes every minute closed by now (the clock's current minute stays in memory).
    pub async fn flush(&self, store: &Store) -> Result<usize, String> {
        let before = Step::Minute.floor(self.now_ms());
        self.flush_before(store, before).await
    }

    /// Writes everything, the current minute included (shutdown, tests).
    pub async fn flush_all(&self, store: &Store) -> Result<usize, String> {
        self.flush_before(store, i64::MAX).await
    }

    async fn flush_before(&self, store: &Store, before: i64) -> Result<usize, String> {
        let mut batch = self.batch.lock().await;
        let before = batch.retry_before.map_or(before, |r| before.max(r));
        let taken = self.take(before);
        if taken.is_empty() {
            return Ok(0);
        }
        let node = format!("{}.{}", self.node, batch.number);
        let written = tokio::time::timeout(STORE_TIMEOUT, self.write(store, &node, &taken))
            .await
            .map(|r| {
                r.and_then(|n| {
                    if self.lose_next_ack.swap(false, Ordering::Relaxed) {
                        Err("the store's answer was lost (test)".into())
                    } else {
                        Ok(n)
                    }
                })
            });
        match written {
            Ok(Ok(n)) => {
                batch.number += 1;
                batch.retry_before = None;
                let calls: u64 = taken.iter().map(|(_, a)| a.requests).sum();
                self.flushed.fetch_add(calls, Ordering::Relaxed);
                Ok(n)
            }
            Ok(Err(e)) => {
                batch.retry_before = Some(before);
                self.put_back(taken);
                Err(format!("cannot write analytics rollups: {e}"))
            }
            Err(_) => {
                batch.retry_before = Some(before);
                self.put_back(taken);
                Err("cannot write analytics rollups: the store did not answer in time".into())
            }
        }
    }

    /// Writes the taken minutes as the rows of batch `node`. Rows of the same batch are set,
    /// not added to: a retry carries everything the failed attempt did (and maybe more).
    async fn write(
        &self,
        store: &Store,
        node: &str,
        taken: &[(Key, Agg)],
    ) -> Result<usize, String> {
        let mut rows: HashMap<(i64, String, String, String, i64), RollupRow> = HashMap::new();
        for (k, a) in taken {
            let row = RollupRow {
                resolution: Step::Minute.as_str().to_owned(),
                node: node.to_owned(),
                bucket: k.minute,
                service: label(k.service.as_ref()),
                route: label(k.route.as_ref()),
                application: label(k.application.as_ref()),
                status: i64::from(k.status),
                requests: i64_of(a.requests),
                errors_4xx: i64_of(a.errors_4xx),
                errors_5xx: i64_of(a.errors_5xx),
                bytes_in: i64_of(a.bytes_in),
                bytes_out: i64_of(a.bytes_out),
                latency_sum_us: i64_of(a.latency_sum_us),
                sketch: a.sketch.to_text(),
            };
            let key = (
                row.bucket,
                row.service.clone(),
                row.route.clone(),
                row.application.clone(),
                row.status,
            );
            match rows.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    turnpike_store::merge_row(o.get_mut(), &row);
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(row);
                }
            }
        }
        let rows: Vec<RollupRow> = rows.into_values().collect();
        store.put_rollups(&rows).await.map_err(|e| e.to_string())?;
        Ok(rows.len())
    }
}

impl turnpike_observe::StatsSource for Rollups {
    /// `sent` counts calls whose minute reached the store, `dropped` calls lost because the
    /// store stayed down, `queued` calls held in memory for minutes not yet written. Calls
    /// over the key cap are not lost (they count under `_other`), so they are not here.
    fn sink_stats(&self) -> Vec<turnpike_observe::SinkStats> {
        let queued: u64 = (0..SHARDS)
            .map(|i| self.lock(i).aggs.values().map(|a| a.requests).sum::<u64>())
            .sum();
        vec![turnpike_observe::SinkStats {
            name: "analytics".into(),
            kind: "rollups",
            sent: self.flushed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: 0,
            queued: usize::try_from(queued).unwrap_or(usize::MAX),
        }]
    }
}

impl CallSink for Rollups {
    fn offer(&self, e: &Arc<CallEvent>) {
        let key = Key {
            minute: Step::Minute.floor(e.time_unix_ms),
            service: e.service.clone(),
            route: e.route.clone(),
            application: e.application.clone(),
            status: e.status,
        };
        let i = self.shard_of(&key);
        let mut guard = self.lock(i);
        let shard = &mut *guard;
        let vacant = match shard.aggs.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                o.get_mut().add(e);
                return;
            }
            std::collections::hash_map::Entry::Vacant(v) => v,
        };
        let count = shard.keys.entry(vacant.key().minute).or_insert(0);
        if *count < self.keys_per_shard {
            *count += 1;
            vacant.insert(Agg::default()).add(e);
            return;
        }
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        let mut key = vacant.into_key();
        key.service = Some(self.other.clone());
        key.route = Some(self.other.clone());
        key.application = Some(self.other.clone());
        // The overflow key may hash to another shard; keep it in this one, where the cap
        // was hit (the flush merges equal keys across shards).
        shard.aggs.entry(key).or_default().add(e);
    }
}

/// Merges minutes into hours and hours into days once they are closed (plus `late_grace`),
/// and deletes rows past retention.
pub struct Downsampler {
    store: Store,
    config: AnalyticsConfig,
    clock: Mutex<SharedClock>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Downsampler {
    /// A downsampler for `store` with the retention and grace of `config`.
    pub fn new(store: Store, config: AnalyticsConfig) -> Arc<Self> {
        Arc::new(Self {
            store,
            config,
            clock: Mutex::new(Arc::new(SystemClock)),
        })
    }

    /// Replaces the clock (tests).
    pub fn set_clock(&self, clock: SharedClock) {
        *self.clock.lock().unwrap_or_else(PoisonError::into_inner) = clock;
    }

    fn now_ms(&self) -> i64 {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .now_ms()
    }

    /// Fills `coarse` buckets from `fine` rows up to `until` (exclusive), from the watermark
    /// (or the first fine row); returns buckets written.
    async fn fill(&self, coarse: Step, fine: Step, until: i64) -> Result<usize, String> {
        let err = |e: turnpike_store::StoreError| e.to_string();
        let start = match self
            .store
            .rollup_watermark(coarse.as_str())
            .await
            .map_err(err)?
        {
            Some(w) => w,
            None => match self
                .store
                .first_rollup_bucket(fine.as_str())
                .await
                .map_err(err)?
            {
                Some(first) => coarse.floor(first),
                None => until,
            },
        };
        let mut written = 0;
        let mut bucket = start;
        let mut steps = 0;
        while bucket < until && steps < MAX_BUCKETS_PER_RUN {
            let end = bucket + coarse.millis();
            let rows = self
                .store
                .rollups(fine.as_str(), bucket, end, None, &RollupFilter::default())
                .await
                .map_err(err)?;
            // An empty bucket has nothing to write (and nothing was written for it before:
            // buckets are only written behind the watermark, once).
            if !rows.is_empty() {
                let rows = fold_rows(rows, coarse);
                self.store
                    .replace_rollup_bucket(coarse.as_str(), "", bucket, &rows)
                    .await
                    .map_err(err)?;
                written += 1;
            }
            steps += 1;
            bucket = end;
        }
        // Also records where merging starts when there was nothing to merge yet.
        self.store
            .advance_rollup_watermark(coarse.as_str(), bucket.max(start))
            .await
            .map_err(err)?;
        Ok(written)
    }

    /// One pass: hours, then days, then retention.
    pub async fn run(&self) -> Result<(), String> {
        let now = self.now_ms();
        let grace = millis(self.config.late_grace);
        let hours_until = Step::Hour.floor(now.saturating_sub(grace));
        self.fill(Step::Hour, Step::Minute, hours_until).await?;
        let hour_done = self
            .store
            .rollup_watermark(Step::Hour.as_str())
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(hours_until);
        self.fill(Step::Day, Step::Hour, Step::Day.floor(hour_done))
            .await?;
        let r = &self.config.retention;
        for (step, keep) in [
            (Step::Minute, r.minute),
            (Step::Hour, r.hour),
            (Step::Day, r.day),
        ] {
            self.store
                .prune_rollups(step.as_str(), now.saturating_sub(millis(keep)))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The running analytics of a node: the sink and its background tasks.
pub struct Analytics {
    /// The aggregator registered on the gateway's observer.
    pub rollups: Arc<Rollups>,
    /// The downsampler.
    pub downsampler: Arc<Downsampler>,
    /// The alert evaluator, when rules are configured.
    pub alerts: Option<Arc<crate::alerts::Alerts>>,
    /// Flusher, downsampler and evaluator tasks; the flusher flushes everything when `stop`
    /// turns true, so await them at shutdown.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Starts analytics for `gateway` on `store` when enabled: registers the aggregator on the
/// gateway's observer and spawns the flusher, the downsampler and the alert evaluator. They
/// stop when `stop` turns true (the flusher after a last flush of everything).
pub fn start(
    store: &Store,
    gateway: &Arc<turnpike_proxy::gateway::Gateway>,
    config: &AnalyticsConfig,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Option<Analytics> {
    if !config.enabled {
        return None;
    }
    let node = format!("{:016x}", rand_id());
    let rollups = Rollups::new(config.max_keys_per_minute, node);
    gateway.observer().add(rollups.clone());
    // The observer holds stats sources weakly; the sink registration above keeps the
    // aggregator (and so its metrics) alive for as long as it counts.
    let source: Arc<dyn turnpike_observe::StatsSource> = rollups.clone();
    gateway.observer().add_stats(&source);
    let downsampler = Downsampler::new(store.clone(), config.clone());
    let mut tasks = vec![
        spawn_flusher(
            rollups.clone(),
            store.clone(),
            config.flush_interval,
            stop.clone(),
        ),
        spawn_every(config.downsample_interval, stop.clone(), {
            let d = downsampler.clone();
            move || {
                let d = d.clone();
                async move {
                    if let Err(e) = d.run().await {
                        tracing::warn!(error = %e, "analytics downsampling failed; retrying later");
                    }
                }
            }
        }),
    ];
    let alerts = if config.alerts.rules.is_empty() {
        None
    } else {
        match crate::alerts::Alerts::new(store.clone(), config.alerts.clone()) {
            Ok(a) => {
                a.set_gateway(gateway);
                a.set_settle(config.flush_interval + std::time::Duration::from_secs(5));
                tasks.push(spawn_every(
                    config.alerts.evaluate_interval,
                    stop.clone(),
                    {
                        let a = a.clone();
                        move || {
                            let a = a.clone();
                            async move { a.evaluate().await }
                        }
                    },
                ));
                Some(a)
            }
            Err(e) => {
                tracing::error!(error = %e, "alerts cannot start");
                None
            }
        }
    };
    Some(Analytics {
        rollups,
        downsampler,
        alerts,
        tasks,
    })
}

/// A random node id: process id and time, mixed.
fn rand_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (t, std::process::id()).hash(&mut h);
    h.finish()
}

/// Flushes closed minutes every `interval`, and everything once `stop` turns true.
pub fn spawn_flusher(
    rollups: Arc<Rollups>,
    store: Store,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = false;
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                changed = stop.changed() => changed.is_err() || *stop.borrow(),
            };
            let result = if stopping {
                rollups.flush_all(&store).await
            } else {
                rollups.flush(&store).await
            };
            match result {
                Ok(_) if failing => {
                    tracing::info!("analytics rollups are reaching the store again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "analytics flush failed; keeping the minutes in memory");
                    }
                    failing = true;
                }
            }
            if stopping {
                return;
            }
        }
    })
}

fn spawn_every<F, Fut>(
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    work: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
            work().await;
        }
    })
}

/// The totals of `rows`: requests, 4xx, 5xx and the merged sketch (alerts, tests).
pub fn totals(rows: &[RollupRow]) -> (u64, u64, u64, LatencySketch) {
    let mut sketch = LatencySketch::new();
    let (mut n, mut e4, mut e5) = (0, 0, 0);
    for r in rows {
        n += u64_of(r.requests);
        e4 += u64_of(r.errors_4xx);
        e5 += u64_of(r.errors_5xx);
        sketch.merge(&LatencySketch::from_text(&r.sketch));
    }
    (n, e4, e5, sketch)
}
