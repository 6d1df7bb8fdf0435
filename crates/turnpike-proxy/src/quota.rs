//! Plan quotas: requests per subscription (application × service) per UTC day or calendar
//! month, counted in memory on the request path and made durable and cluster-wide by the
//! control plane's quota sync (`turnpike-control`), which never runs on the request path.
//!
//! # Counting
//!
//! Each counter (application, service, period, period start) holds three numbers:
//!
//! - `base`: the cluster-wide total the store held at the last reload (every node's flushed
//!   requests, this node's included);
//! - `flushing`: this node's requests being written to the store right now;
//! - `pending`: this node's requests not yet handed to a flush.
//!
//! A request is admitted while `base + flushing + pending < limit`, and then adds one to
//! `pending` of every quota of its plan (all or nothing: a refused request consumes none).
//! The sync periodically moves `pending` to `flushing` ([`QuotaTracker::begin_flush`]),
//! adds those deltas to the store (an additive upsert, so nodes never overwrite each
//! other), then ends the flush ([`QuotaTracker::end_flush`]) and replaces `base` with the
//! store's totals ([`QuotaTracker::set_totals`]). When the store is unreachable the deltas
//! go back to `pending` and are retried at the next flush: requests keep flowing, counted
//! locally.
//!
//! # Overshoot
//!
//! A node only sees other nodes' requests once they are flushed and reloaded, so with `N`
//! nodes a quota can be exceeded by what the other `N - 1` nodes admit in one sync interval
//! (each at most the remaining quota). A single node never exceeds its quota.
//!
//! # Clock
//!
//! Periods are cut on the tracker's [`Clock`] (the system clock by default). Tests inject a
//! [`ManualClock`] to cross a period boundary without waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use turnpike_model::mgmt::{PlanQuota, QuotaPeriod};

use crate::error::{ErrorKind, GatewayError};

/// `X-Quota-Limit`: requests the period allows.
pub static QUOTA_LIMIT: HeaderName = HeaderName::from_static("x-quota-limit");
/// `X-Quota-Remaining`: requests left in the period after this one.
pub static QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-quota-remaining");
/// `X-Quota-Reset`: seconds until the period ends and the count restarts.
pub static QUOTA_RESET: HeaderName = HeaderName::from_static("x-quota-reset");
/// `X-Quota-Period`: `day` or `month`.
pub static QUOTA_PERIOD: HeaderName = HeaderName::from_static("x-quota-period");

#[cfg(test)]
const DAY_MS: i64 = 86_400_000;

/// The current time, in milliseconds since the UNIX epoch (UTC).
pub trait Clock: Send + Sync {
    /// Now, in epoch milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `ms` (epoch milliseconds).
    pub fn new(ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(ms)))
    }

    /// Sets the time.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for Arc<ManualClock> {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which counter a request counts in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// Application id.
    pub application: String,
    /// Service id.
    pub service: String,
    /// Day or month.
    pub period: QuotaPeriod,
    /// Start of the period, epoch milliseconds (UTC midnight; the 1st for months).
    pub period_start: i64,
}

/// The start (inclusive) and end (exclusive) of the period containing `now_ms`, in epoch
/// milliseconds (see [`QuotaPeriod::bounds`]).
pub fn period_bounds(period: QuotaPeriod, now_ms: i64) -> (i64, i64) {
    period.bounds(now_ms)
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    base: u64,
    flushing: u64,
    pending: u64,
}

impl Counter {
    fn used(&self) -> u64 {
        self.base
            .saturating_add(self.flushing)
            .saturating_add(self.pending)
    }
}

/// The counters one admitted request was counted in (see [`QuotaTracker::charge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge(Vec<UsageKey>);

/// What a quota check found, for the headers: the quota closest to exhaustion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    /// The quota's period.
    pub period: QuotaPeriod,
    /// Requests the period allows.
    pub limit: u64,
    /// Requests left after this one (0 when refused).
    pub remaining: u64,
    /// Milliseconds until the period ends.
    pub reset_ms: i64,
    /// Whether the request was admitted.
    pub allowed: bool,
}

impl QuotaStatus {
    /// Writes the `X-Quota-*` headers, and `Retry-After` when refused.
    pub fn write_headers(&self, out: &mut HeaderMap) {
        let reset_secs = u64::try_from((self.reset_ms + 999) / 1000).unwrap_or(0);
        out.insert(QUOTA_LIMIT.clone(), HeaderValue::from(self.limit));
        out.insert(QUOTA_REMAINING.clone(), HeaderValue::from(self.remaining));
        out.insert(QUOTA_RESET.clone(), HeaderValue::from(reset_secs));
        out.insert(
            QUOTA_PERIOD.clone(),
            HeaderValue::from_static(self.period.as_str()),
        );
        if !self.allowed {
            out.insert(header::RETRY_AFTER, HeaderValue::from(reset_secs.max(1)));
        }
    }
}

/// The gateway's quota counters; shared by every snapshot, so reloads keep them.
pub struct QuotaTracker {
    clock: ArcSwap<Box<dyn Clock>>,
    counters: std::sync::Mutex<HashMap<UsageKey, Counter>>,
}

impl Default for QuotaTracker {
    fn default() -> Self {
        Self {
            clock: ArcSwap::from_pointee(Box::new(SystemClock) as Box<dyn Clock>),
            counters: std::sync::Mutex::default(),
        }
    }
}

impl QuotaTracker {
    /// Replaces the clock (tests).
    pub fn set_clock(&self, clock: impl Clock + 'static) {
        self.clock
            .store(Arc::new(Box::new(clock) as Box<dyn Clock>));
    }

    /// Now, on the tracker's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.load().now_ms()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UsageKey, Counter>> {
        // A panic while holding the lock cannot leave a counter half-updated (each update is
        // one field write), so a poisoned lock's data is still good.
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one request of `application` to `service` against `quotas`, all or nothing.
    /// `Ok` when admitted, `Err` when a quota is used up; both carry the quota closest to
    /// exhaustion (`None` only when `quotas` is empty).
    pub fn check(
        &self,
        application: &str,
        service: &str,
        quotas: &[PlanQuota],
    ) -> Result<Option<QuotaStatus>, QuotaStatus> {
        self.charge(application, service, quotas)
            .map(|(status, _)| status)
    }

    /// [`Self::check`], also returning what was counted, for [`Self::refund`].
    pub fn charge(
        &self,
        application: &str,
        service: &str,
        quotas: &[PlanQuota],
    ) -> Result<(Option<QuotaStatus>, Charge), QuotaStatus> {
        let now = self.now_ms();
        let keyed: Vec<(UsageKey, &PlanQuota, i64)> = quotas
            .iter()
            .map(|q| {
                let (start, end) = period_bounds(q.period, now);
                let key = UsageKey {
                    application: application.to_owned(),
                    service: service.to_owned(),
                    period: q.period,
                    period_start: start,
                };
                (key, q, end - now)
            })
            .collect();
        let mut counters = self.lock();
        let mut tightest: Option<QuotaStatus> = None;
        let mut refused: Option<QuotaStatus> = None;
        for (key, q, reset_ms) in &keyed {
            let used = counters.get(key).map_or(0, Counter::used);
            let allowed = used < q.requests;
            let status = QuotaStatus {
                period: q.period,
                limit: q.requests,
                remaining: if allowed { q.requests - used - 1 } else { 0 },
                reset_ms: *reset_ms,
                allowed,
            };
            if !allowed {
                // The refusal that lasts longest is the one worth reporting.
                if refused.is_none_or(|r| r.reset_ms < status.reset_ms) {
                    refused = Some(status);
                }
            } else if tightest.is_none_or(|t| status.remaining < t.remaining) {
                tightest = Some(status);
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }
        let mut charged = Vec::with_capacity(keyed.len());
        for (key, _, _) in keyed {
            let c = counters.entry(key.clone()).or_default();
            c.pending = c.pending.saturating_add(1);
            charged.push(key);
        }
        Ok((tightest, Charge(charged)))
    }

    /// Takes back what [`Self::charge`] counted for a request the gateway then refused
    /// itself — in the periods it was counted in, even if one has ended since. Only a count
    /// not yet flushed can be taken back (a flush sends additions only); one already on its
    /// way to the store stays, so a refusal more than a flush interval after its check may
    /// still count.
    pub fn refund(&self, charge: &Charge) {
        let mut counters = self.lock();
        for key in &charge.0 {
            if let Some(c) = counters.get_mut(key) {
                c.pending = c.pending.saturating_sub(1);
            }
        }
    }

    /// Moves every pending count into the flush in progress and returns the deltas to add
    /// to the store.
    pub fn begin_flush(&self) -> Vec<(UsageKey, u64)> {
        let mut counters = self.lock();
        let mut out = Vec::new();
        for (key, c) in counters.iter_mut() {
            if c.pending > 0 {
                c.flushing = c.flushing.saturating_add(c.pending);
                out.push((key.clone(), c.pending));
                c.pending = 0;
            }
        }
        out
    }

    /// Ends the flush [`Self::begin_flush`] started: when it reached the store, its counts
    /// join `base` (until the next [`Self::set_totals`]); when not, they are pending again.
    pub fn end_flush(&self, stored: bool) {
        let mut counters = self.lock();
        for c in counters.values_mut() {
            if stored {
                c.base = c.base.saturating_add(c.flushing);
            } else {
                c.pending = c.pending.saturating_add(c.flushing);
            }
            c.flushing = 0;
        }
    }

    /// Replaces the cluster-wide totals with the store's, for every period starting at or
    /// after `since` (counters of such periods absent from `totals` had no flushed request).
    /// Counters of older periods are dropped once they have nothing left to flush, so
    /// memory holds the current periods only.
    pub fn set_totals(&self, since: i64, totals: &[(UsageKey, u64)]) {
        let now = self.now_ms();
        let mut counters = self.lock();
        for c in counters.values_mut() {
            c.base = 0;
        }
        for (key, used) in totals {
            if key.period_start >= since {
                counters.entry(key.clone()).or_default().base = *used;
            }
        }
        counters.retain(|key, c| {
            c.pending > 0 || c.flushing > 0 || period_bounds(key.period, now).0 == key.period_start
        });
    }

    /// The earliest period start the tracker counts in now (the current month's first
    /// day): the store's totals from there on are what [`Self::set_totals`] needs.
    pub fn current_since(&self) -> i64 {
        let now = self.now_ms();
        period_bounds(QuotaPeriod::Month, now)
            .0
            .min(period_bounds(QuotaPeriod::Day, now).0)
    }

    /// The count a counter shows now (base + in flight + pending), for tests and metrics.
    pub fn used(&self, key: &UsageKey) -> u64 {
        self.lock().get(key).map_or(0, Counter::used)
    }
}

/// The 429 for an exhausted quota.
pub fn exceeded(status: &QuotaStatus) -> GatewayError {
    GatewayError::new(
        ErrorKind::QuotaExceeded,
        format!(
            "the {} quota of {} requests is used up; it resets in {} s",
            status.period.as_str(),
            status.limit,
            (status.reset_ms + 999) / 1000
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    // 2026-03-31T23:59:59Z
    const MARCH_END: i64 = 1_775_001_599_000;

    fn q(requests: u64, period: QuotaPeriod) -> PlanQuota {
        PlanQuota { requests, period }
    }

    #[test]
    fn period_bounds_cut_utc_days_and_calendar_months() {
        let (s, e) = period_bounds(QuotaPeriod::Day, MARCH_END);
        assert_eq!((s, e), (MARCH_END - 86_399_000, MARCH_END + 1000));
        let (s, e) = period_bounds(QuotaPeriod::Month, MARCH_END);
        // 2026-03-01T00:00:00Z .. 2026-04-01T00:00:00Z
        assert_eq!((s, e), (1_772_323_200_000, 1_775_001_600_000));
        // December rolls over into the next year.
        let dec = 1_798_675_200_000; // 2026-12-31T00:00:00Z
        let (s, e) = period_bounds(QuotaPeriod::Month, dec);
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000));
        // February of a leap year.
        let feb = 1_709_208_000_000; // 2024-02-29T12:00:00Z
        let (s, e) = period_bounds(QuotaPeriod::Month, feb);
        assert_eq!((s, e), (1_706_745_600_000, 1_709_251_200_000));
    }

    #[test]
    fn admits_up_to_the_limit_all_or_nothing() {
        let t = QuotaTracker::default();
        let clock = ManualClock::new(MARCH_END - 10_000);
        t.set_clock(clock.clone());
        let quotas = [q(3, QuotaPeriod::Day), q(100, QuotaPeriod::Month)];
        for left in [2, 1, 0] {
            let s = t.check("a", "s", &quotas).unwrap().unwrap();
            assert_eq!((s.period, s.remaining), (QuotaPeriod::Day, left));
        }
        let refused = t.check("a", "s", &quotas).unwrap_err();
        assert_eq!(refused.period, QuotaPeriod::Day);
        assert_eq!(refused.reset_ms, 11_000);
        // The refused request did not count against the month.
        let month = UsageKey {
            application: "a".into(),
            service: "s".into(),
            period: QuotaPeriod::Month,
            period_start: period_bounds(QuotaPeriod::Month, MARCH_END).0,
        };
        assert_eq!(t.used(&month), 3);
        // Another subscription counts apart.
        assert!(t.check("b", "s", &quotas).is_ok());
        // The next day (and month) starts from zero.
        clock.set(MARCH_END + 1000);
        let s = t.check("a", "s", &quotas).unwrap().unwrap();
        assert_eq!(s.remaining, 2);
    }

    #[test]
    fn flushes_move_counts_without_losing_any() {
        let t = QuotaTracker::default();
        t.set_clock(ManualClock::new(MARCH_END));
        let quotas = [q(10, QuotaPeriod::Day)];
        for _ in 0..3 {
            t.check("a", "s", &quotas).unwrap();
        }
        let deltas = t.begin_flush();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].1, 3);
        // Requests during the flush stay pending.
        t.check("a", "s", &quotas).unwrap();
        assert_eq!(t.used(&deltas[0].0), 4);
        // A failed flush keeps everything for the next one.
        t.end_flush(false);
        assert_eq!(t.used(&deltas[0].0), 4);
        let deltas = t.begin_flush();
        assert_eq!(deltas[0].1, 4);
        t.end_flush(true);
        assert_eq!(t.used(&deltas[0].0), 4);
        // The store says another node added 5.
        t.set_totals(t.current_since(), &[(deltas[0].0.clone(), 9)]);
        assert_eq!(t.used(&deltas[0].0), 9);
        assert_eq!(t.check("a", "s", &quotas).unwrap().unwrap().remaining, 0);
        assert!(t.check("a", "s", &quotas).is_err());
    }

    #[test]
    fn refunds_take_back_pending_counts_only() {
        let t = QuotaTracker::default();
        t.set_clock(ManualClock::new(MARCH_END));
        let quotas = [q(10, QuotaPeriod::Day)];
        let (_, first) = t.charge("a", "s", &quotas).unwrap();
        let deltas = t.begin_flush();
        let (_, second) = t.charge("a", "s", &quotas).unwrap();
        t.refund(&second);
        // The pending count is gone; the one being flushed stays (flushes only add).
        assert_eq!(t.used(&deltas[0].0), 1);
        t.refund(&first);
        assert_eq!(t.used(&deltas[0].0), 1);
        t.end_flush(true);
        assert_eq!(t.begin_flush(), Vec::new());
        // A refund goes to the period the request was counted in, not today's.
        let clock = ManualClock::new(MARCH_END);
        t.set_clock(clock.clone());
        let (_, late) = t.charge("b", "s", &quotas).unwrap();
        clock.set(MARCH_END + 1000);
        let (_, next_day) = t.charge("b", "s", &quotas).unwrap();
        t.refund(&late);
        assert_eq!(t.check("b", "s", &quotas).unwrap().unwrap().remaining, 8);
        assert_ne!(late, next_day);
    }

    #[test]
    fn old_periods_are_forgotten_once_flushed() {
        let t = QuotaTracker::default();
        let clock = ManualClock::new(MARCH_END);
        t.set_clock(clock.clone());
        t.check("a", "s", &[q(10, QuotaPeriod::Day)]).unwrap();
        let key = t.begin_flush().remove(0).0;
        t.end_flush(true);
        clock.set(MARCH_END + DAY_MS);
        t.set_totals(t.current_since(), &[]);
        assert_eq!(t.used(&key), 0);
        assert!(t.lock().is_empty());
    }

    #[test]
    fn headers_name_limit_remaining_and_reset() {
        let mut h = HeaderMap::new();
        QuotaStatus {
            period: QuotaPeriod::Month,
            limit: 5,
            remaining: 0,
            reset_ms: 1_500,
            allowed: false,
        }
        .write_headers(&mut h);
        assert_eq!(h[&QUOTA_LIMIT], "5");
        assert_eq!(h[&QUOTA_REMAINING], "0");
        assert_eq!(h[&QUOTA_RESET], "2");
        assert_eq!(h[&QUOTA_PERIOD], "month");
        assert_eq!(h[header::RETRY_AFTER], "2");
    }
}
