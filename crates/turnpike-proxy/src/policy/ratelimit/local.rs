//! The in-process limiter: exact integer arithmetic over a sharded, bounded key map.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Algorithm, Decision, Limit};

/// More shards than cores buys nothing but memory; 32 keeps two gateway threads on the same
/// shard rare while a shard's eviction scan stays short.
const MAX_SHARDS: usize = 32;

/// One key's state. A window index of a past window, or a TAT in the past, reads as a fresh
/// key, so stale state never needs to be cleared eagerly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Fixed and sliding windows: admitted requests in window `index` and in the one before.
    Window {
        index: u64,
        count: u64,
        previous: u64,
    },
    /// Token and leaky buckets: the theoretical arrival time, in units of 1/requests ns so
    /// that the emission interval `window / requests` is an integer (`window` in ns).
    Gcra { tat: u128 },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    state: State,
    /// From this tick (ns since the epoch) on, `state` decides exactly as a fresh key would,
    /// so the entry can be dropped.
    expires: u64,
}

/// A decision and, when the request is admitted, the state to store for its key.
struct Outcome {
    decision: Decision,
    next: Option<Entry>,
}

struct Shard {
    map: HashMap<Box<str>, Entry>,
    cap: usize,
}

impl Shard {
    fn store(&mut self, key: &str, entry: Entry, now: u64) {
        if let Some(slot) = self.map.get_mut(key) {
            *slot = entry;
            return;
        }
        if self.map.len() >= self.cap {
            self.make_room(now);
        }
        self.map.insert(key.into(), entry);
    }

    /// Frees at least an eighth of the shard, so the O(len) scan is paid once per cap/8
    /// insertions rather than on every new key. Expired entries go first (dropping them
    /// changes no decision); if that is not enough, the live entries closest to expiring go,
    /// because they are the ones whose quota was about to be restored anyway, while a
    /// client that used much of its quota keeps its state against a flood of new keys.
    fn make_room(&mut self, now: u64) {
        self.map.retain(|_, entry| entry.expires > now);
        let slack = (self.cap / 8).max(1);
        let excess = (self.map.len() + slack).saturating_sub(self.cap);
        if excess == 0 {
            return;
        }
        let mut expiries: Vec<u64> = self.map.values().map(|entry| entry.expires).collect();
        let (below, cutoff, _) = expiries.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        let strictly_below = below.iter().filter(|&&e| e < cutoff).count();
        let mut at_cutoff = excess - strictly_below;
        self.map.retain(|_, entry| {
            if entry.expires < cutoff {
                false
            } else if entry.expires == cutoff && at_cutoff > 0 {
                at_cutoff -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// An in-process rate limiter for one [`Limit`], keyed by strings (client address, API key,
/// …). Thread-safe and cheap to share: the keys are spread over independently locked shards.
pub struct LocalLimiter {
    limit: Limit,
    epoch: Instant,
    max_keys: usize,
    /// Randomly seeded because keys come from clients: a fixed hash would let them aim many
    /// keys at one shard (and one hash bucket).
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl std::fmt::Debug for LocalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("limit", &self.limit)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl LocalLimiter {
    /// A limiter for `limit` that remembers at most `max_keys` keys (at least 1), with fixed
    /// windows aligned to its creation.
    ///
    /// When a new key arrives and its shard is full, the limiter first drops the entries that
    /// have expired (their state is the same as a fresh key's, so no decision changes); if
    /// that frees too little, it evicts the live entries that are closest to expiring, i.e.
    /// whose quota would soon have been restored anyway. An evicted key starts afresh, so
    /// under a flood of distinct keys a limit can admit more than it should for the keys
    /// evicted; size `max_keys` for the number of clients active within one window.
    pub fn new(limit: Limit, max_keys: usize) -> Self {
        Self::with_epoch(limit, max_keys, Instant::now())
    }

    /// As [`LocalLimiter::new`], with fixed windows aligned to multiples of the window since
    /// `epoch` (several limiters built from one epoch roll their windows over together).
    pub fn with_epoch(limit: Limit, max_keys: usize, epoch: Instant) -> Self {
        let max_keys = max_keys.max(1);
        let count = max_keys.min(MAX_SHARDS);
        // Per-shard caps sum to exactly max_keys, so the bound holds for the whole limiter.
        let shards = (0..count)
            .map(|i| {
                let cap = max_keys / count + usize::from(i < max_keys % count);
                Mutex::new(Shard {
                    map: HashMap::new(),
                    cap,
                })
            })
            .collect();
        LocalLimiter {
            limit,
            epoch,
            max_keys,
            hasher: RandomState::new(),
            shards,
        }
    }

    /// The limit this limiter enforces.
    pub fn limit(&self) -> &Limit {
        &self.limit
    }

    /// How many keys the limiter currently holds (a snapshot: other threads may be adding).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).map.len()).sum()
    }

    /// Whether the limiter holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides one request for `key` at `now`, consuming quota when it is admitted.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let tick = self.tick(now);
        let mut shard = lock(&self.shards[self.shard_of(key)]);
        let prior = shard.map.get(key).map(|entry| &entry.state);
        let outcome = decide(&self.limit, prior, tick);
        if let Some(entry) = outcome.next {
            shard.store(key, entry, tick);
        }
        outcome.decision
    }

    /// Decides one request against several limits at once, all or nothing: if any limit
    /// refuses, none is consumed. The decisions come back in the order of `checks`; when
    /// one is a refusal, the others say what they would have decided, but their state is
    /// untouched. The same limiter and key may appear more than once (each counts).
    pub fn check_all(checks: &[(&LocalLimiter, &str)], now: Instant) -> Vec<Decision> {
        // Every shard involved stays locked until the outcome is known, taken in address
        // order so that concurrent calls cannot deadlock (`check` only ever holds one).
        let mut targets: Vec<(usize, usize, &LocalLimiter)> = checks
            .iter()
            .map(|&(limiter, key)| (limiter_id(limiter), limiter.shard_of(key), limiter))
            .collect();
        targets.sort_unstable_by_key(|&(id, shard, _)| (id, shard));
        targets.dedup_by_key(|&mut (id, shard, _)| (id, shard));
        let mut guards: Vec<MutexGuard<'_, Shard>> = targets
            .iter()
            .map(|&(_, shard, limiter)| lock(&limiter.shards[shard]))
            .collect();

        let mut decisions = Vec::with_capacity(checks.len());
        // Admitted-so-far states, so a key repeated within the call sees its earlier use.
        let mut pending: Vec<(usize, &str, Entry, u64)> = Vec::new();
        let mut refused = false;
        for (limiter, key) in checks {
            let target = (limiter_id(limiter), limiter.shard_of(key));
            let Ok(g) = targets.binary_search_by_key(&target, |&(id, shard, _)| (id, shard)) else {
                // Unreachable: every target was collected above. Refusing is the safe answer.
                refused = true;
                decisions.push(refusal(&limiter.limit));
                continue;
            };
            let tick = limiter.tick(now);
            let prior = match pending
                .iter()
                .rev()
                .find(|(pg, pk, ..)| *pg == g && pk == key)
            {
                Some((_, _, entry, _)) => Some(entry.state),
                None => guards[g].map.get(*key).map(|entry| entry.state),
            };
            let outcome = decide(&limiter.limit, prior.as_ref(), tick);
            match outcome.next {
                Some(entry) => pending.push((g, key, entry, tick)),
                None => refused = true,
            }
            decisions.push(outcome.decision);
        }
        if !refused {
            for (g, key, entry, tick) in pending {
                guards[g].store(key, entry, tick);
            }
        }
        decisions
    }

    fn shard_of(&self, key: &str) -> usize {
        // The modulo keeps the index in range whatever the shard count; the remainder bias
        // over a 64-bit hash is negligible.
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// Nanoseconds since the epoch; instants before it count as the epoch itself.
    fn tick(&self, now: Instant) -> u64 {
        saturate(now.saturating_duration_since(self.epoch).as_nanos())
    }
}

fn limiter_id(limiter: &LocalLimiter) -> usize {
    std::ptr::from_ref(limiter).addr()
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave a shard half-updated (each update is a
    // single insert or replace), so the data stays usable.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn refusal(limit: &Limit) -> Decision {
    let window = duration(window_ns(limit.window));
    Decision::Deny {
        retry_after: window,
        reset: window,
    }
}

/// The window in ns, clamped to [1 ns, u64::MAX ns] so products with request counts and
/// ticks fit in u128.
fn window_ns(window: Duration) -> u128 {
    window.as_nanos().clamp(1, u128::from(u64::MAX))
}

fn saturate(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn duration(ns: u128) -> Duration {
    const NS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(ns / NS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it always fits.
    let nanos = u32::try_from(ns % NS_PER_SEC).unwrap_or(0);
    Duration::new(secs, nanos)
}

fn ceil_div(value: u128, divisor: u128) -> u128 {
    value.div_ceil(divisor.max(1))
}

/// Decides one request at `tick` (ns since the epoch) given the key's stored state.
fn decide(limit: &Limit, prior: Option<&State>, tick: u64) -> Outcome {
    let n = u128::from(limit.requests);
    if n == 0 {
        return Outcome {
            decision: refusal(limit),
            next: None,
        };
    }
    let w = window_ns(limit.window);
    match limit.algorithm {
        Algorithm::FixedWindow => fixed_window(n, w, prior, tick),
        Algorithm::SlidingWindow => sliding_window(n, w, prior, tick),
        Algorithm::TokenBucket => token_bucket(n, w, prior, tick),
        Algorithm::LeakyBucket => {
            let max_delay = limit.max_delay.as_nanos().min(u128::from(u64::MAX));
            leaky_bucket(n, w, max_delay, prior, tick)
        }
    }
}

fn deny(retry_after: u128, reset: u128) -> Outcome {
    Outcome {
        decision: Decision::Deny {
            retry_after: duration(retry_after.max(1)),
            reset: duration(reset),
        },
        next: None,
    }
}

fn fixed_window(n: u128, w: u128, prior: Option<&State>, tick: u64) -> Outcome {
    let t = u128::from(tick);
    let index = t / w;
    let reset = w - t % w;
    let count = match prior {
        Some(&State::Window {
            index: i, count, ..
        }) if u128::from(i) == index => u128::from(count),
        _ => 0,
    };
    if count >= n {
        return deny(reset, reset);
    }
    let count = count + 1;
    Outcome {
        decision: Decision::Allow {
            remaining: saturate(n - count),
            reset: duration(reset),
        },
        next: Some(Entry {
            state: State::Window {
                index: saturate(index),
                count: saturate(count),
                previous: 0,
            },
            expires: saturate(t + reset),
        }),
    }
}

fn sliding_window(n: u128, w: u128, prior: Option<&State>, tick: u64) -> Outcome {
    let t = u128::from(tick);
    let index = t / w;
    let elapsed = t % w;
    let left = w - elapsed;
    let (current, previous) = match prior {
        Some(&State::Window {
            index: i,
            count,
            previous,
        }) => {
            let i = u128::from(i);
            if i == index {
                (u128::from(count), u128::from(previous))
            } else if i + 1 == index {
                (0, u128::from(count))
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    };
    // Scaled by w to stay in integers: the estimate is previous * left / w + current.
    let budget = n * w;
    let carried = previous * left;
    if carried.saturating_add((current + 1) * w) <= budget {
        let current = current + 1;
        let remaining = (budget - carried - current * w) / w;
        return Outcome {
            decision: Decision::Allow {
                remaining: saturate(remaining),
                reset: duration(left),
            },
            next: Some(Entry {
                state: State::Window {
                    index: saturate(index),
                    count: saturate(current),
                    previous: saturate(previous),
                },
                // Two window ends away both counts have faded out.
                expires: saturate(t + left + w),
            }),
        };
    }
    let retry_after = if current < n {
        // The current window has room; wait until the previous window's weight has faded
        // enough. previous > 0 here, or the estimate would have fitted.
        let room = (n - current - 1) * w / previous.max(1);
        (w - room).saturating_sub(elapsed)
    } else {
        // The current window is full: it becomes the previous one at the next window start
        // and fits once its weight is at most n - 1.
        left + (w - (n - 1) * w / current.max(1))
    };
    deny(retry_after, left)
}

fn token_bucket(n: u128, w: u128, prior: Option<&State>, tick: u64) -> Outcome {
    // Units of 1/n ns: the emission interval T = w/n ns is `w` units and the window `w * n`.
    let now = u128::from(tick) * n;
    let interval = w;
    let capacity = w * n;
    let tat = match prior {
        Some(&State::Gcra { tat }) => tat.max(now),
        _ => now,
    };
    let next = tat.saturating_add(interval);
    let ahead = next - now;
    if ahead <= capacity {
        return Outcome {
            decision: Decision::Allow {
                remaining: saturate((capacity - ahead) / interval),
                reset: duration(ceil_div(ahead, n)),
            },
            next: Some(Entry {
                state: State::Gcra { tat: next },
                expires: saturate(ceil_div(next, n)),
            }),
        };
    }
    deny(ceil_div(ahead - capacity, n), ceil_div(tat - now, n))
}

fn leaky_bucket(n: u128, w: u128, max_delay: u128, prior: Option<&State>, tick: u64) -> Outcome {
    let now = u128::from(tick) * n;
    let interval = w;
    // The queue holds at most n requests (the last one waits (n - 1) T = w - T), and none
    // waits longer than max_delay.
    let cap = max_delay.saturating_mul(n).min(w * n - interval);
    let slot = match prior {
        Some(&State::Gcra { tat }) => tat.max(now),
        _ => now,
    };
    let wait = slot - now;
    if wait > cap {
        return deny(ceil_div(wait - cap, n), ceil_div(wait, n));
    }
    let next = slot.saturating_add(interval);
    let ahead = next - now;
    let remaining = if ahead > cap {
        0
    } else {
        (cap - ahead) / interval + 1
    };
    let reset = duration(ceil_div(ahead, n));
    let decision = if wait == 0 {
        Decision::Allow {
            remaining: saturate(remaining),
            reset,
        }
    } else {
        Decision::Delay {
            wait: duration(ceil_div(wait, n)),
            remaining: saturate(remaining),
            reset,
        }
    };
    Outcome {
        decision,
        next: Some(Entry {
            state: State::Gcra { tat: next },
            expires: saturate(ceil_div(next, n)),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn fresh(requests: u64, window: Duration, algorithm: Algorithm) -> (LocalLimiter, Instant) {
        let epoch = Instant::now();
        let limiter =
            LocalLimiter::with_epoch(Limit::new(requests, window, algorithm), 10_000, epoch);
        (limiter, epoch)
    }

    /// Sends `count` requests for `key`, all at `now`, and returns how many were let through
    /// (now or after a delay), checking every refusal's Retry-After on the way.
    fn burst(limiter: &LocalLimiter, key: &str, count: usize, now: Instant) -> usize {
        (0..count)
            .filter(|_| {
                let decision = limiter.check(key, now);
                if let Decision::Deny { retry_after, .. } = decision {
                    assert!(retry_after > Duration::ZERO, "{decision:?}");
                }
                decision.is_allowed()
            })
            .count()
    }

    const ALL: [Algorithm; 4] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
    ];

    #[test]
    fn every_algorithm_is_exact_for_a_burst() {
        for algorithm in ALL {
            let epoch = Instant::now();
            let limit = Limit::new(100, 10 * SEC, algorithm).with_max_delay(60 * SEC);
            let limiter = LocalLimiter::with_epoch(limit, 1000, epoch);
            // 150 requests over 3 ms, starting mid-window.
            let start = epoch + 4 * SEC;
            let admitted = (0..150)
                .filter(|i| limiter.check("k", start + MS * (i / 50)).is_allowed())
                .count();
            assert_eq!(admitted, 100, "{algorithm:?}");
        }
    }

    #[test]
    fn exact_when_window_is_not_a_multiple_of_requests() {
        for algorithm in ALL {
            for (requests, window) in [(3, SEC), (7, Duration::from_nanos(10)), (1000, 3 * MS)] {
                let limit = Limit::new(requests, window, algorithm).with_max_delay(window);
                let epoch = Instant::now();
                let limiter = LocalLimiter::with_epoch(limit, 10, epoch);
                let admitted = burst(&limiter, "k", requests as usize + 50, epoch);
                assert_eq!(
                    admitted as u64, requests,
                    "{algorithm:?} {requests}/{window:?}"
                );
            }
        }
    }

    #[test]
    fn fixed_window_counts_down_and_rolls_over() {
        let (limiter, epoch) = fresh(3, 10 * SEC, Algorithm::FixedWindow);
        let t = epoch + 4 * SEC;
        for remaining in [2, 1, 0] {
            assert_eq!(
                limiter.check("k", t),
                Decision::Allow {
                    remaining,
                    reset: 6 * SEC
                }
            );
        }
        assert_eq!(
            limiter.check("k", t),
            Decision::Deny {
                retry_after: 6 * SEC,
                reset: 6 * SEC
            }
        );
        // Still the same window one nanosecond before its end.
        let end = epoch + 10 * SEC;
        assert!(
            !limiter
                .check("k", end - Duration::from_nanos(1))
                .is_allowed()
        );
        assert_eq!(burst(&limiter, "k", 5, end), 3);
        // Keys are independent.
        assert_eq!(burst(&limiter, "other", 5, end), 3);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let (limiter, epoch) = fresh(100, 10 * SEC, Algorithm::SlidingWindow);
        assert_eq!(burst(&limiter, "k", 100, epoch + 9 * SEC), 100);
        // Halfway through the next window the previous 100 count as 50.
        let half = epoch + 15 * SEC;
        assert_eq!(burst(&limiter, "k", 80, half), 50);
        match limiter.check("k", half) {
            Decision::Deny { retry_after, reset } => {
                // Each 100 ms the carried weight drops by one request.
                assert_eq!(retry_after, Duration::from_millis(100));
                assert_eq!(reset, 5 * SEC);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            burst(&limiter, "k", 5, half + Duration::from_millis(100)),
            1
        );
        // In the window after, the previous window holds 51: at its start that fills all but 49.
        let next = epoch + 20 * SEC;
        assert_eq!(burst(&limiter, "k", 80, next), 49);
        // Two windows later everything has faded.
        assert_eq!(burst(&limiter, "k", 150, epoch + 40 * SEC), 100);
    }

    #[test]
    fn sliding_window_retry_after_from_a_full_current_window() {
        let (limiter, epoch) = fresh(10, 10 * SEC, Algorithm::SlidingWindow);
        let t = epoch + 2 * SEC;
        assert_eq!(burst(&limiter, "k", 10, t), 10);
        let Decision::Deny { retry_after, .. } = limiter.check("k", t) else {
            panic!("expected a refusal");
        };
        // Next window starts in 8 s, where the 10 carried must fade to 9: 1 s more.
        assert_eq!(retry_after, 9 * SEC);
        assert!(
            !limiter
                .check("k", t + retry_after - Duration::from_nanos(1))
                .is_allowed()
        );
        assert!(limiter.check("k", t + retry_after).is_allowed());
    }

    #[test]
    fn token_bucket_refills_one_token_per_interval() {
        let (limiter, epoch) = fresh(100, 10 * SEC, Algorithm::TokenBucket);
        let t = epoch + 3 * SEC;
        assert_eq!(
            limiter.check("k", t),
            Decision::Allow {
                remaining: 99,
                reset: Duration::from_millis(100)
            }
        );
        assert_eq!(burst(&limiter, "k", 120, t), 99);
        let interval = Duration::from_millis(100);
        assert_eq!(
            limiter.check("k", t),
            Decision::Deny {
                retry_after: interval,
                reset: 10 * SEC
            }
        );
        assert!(
            !limiter
                .check("k", t + interval - Duration::from_nanos(1))
                .is_allowed()
        );
        assert!(limiter.check("k", t + interval).is_allowed());
        assert!(!limiter.check("k", t + interval).is_allowed());
        // 2.5 intervals later: two more tokens.
        assert_eq!(burst(&limiter, "k", 10, t + interval * 7 / 2), 2);
        // A whole window refills the bucket, but no more than the bucket holds.
        assert_eq!(burst(&limiter, "k", 200, t + 60 * SEC), 100);
    }

    #[test]
    fn leaky_bucket_spaces_requests_and_refuses_beyond_max_delay() {
        let limit = Limit::new(10, SEC, Algorithm::LeakyBucket).with_max_delay(350 * MS);
        let epoch = Instant::now();
        let limiter = LocalLimiter::with_epoch(limit, 100, epoch);
        let t = epoch + SEC;
        assert_eq!(
            limiter.check("k", t),
            Decision::Allow {
                remaining: 3,
                reset: 100 * MS
            }
        );
        for (k, remaining) in [(1u32, 2), (2, 1), (3, 0)] {
            assert_eq!(
                limiter.check("k", t),
                Decision::Delay {
                    wait: 100 * MS * k,
                    remaining,
                    reset: 100 * MS * (k + 1)
                }
            );
        }
        // The next slot is 400 ms away, 50 ms past max_delay.
        assert_eq!(
            limiter.check("k", t),
            Decision::Deny {
                retry_after: 50 * MS,
                reset: 400 * MS
            }
        );
        // Refusals reserve nothing: 50 ms later the slot at 400 ms is within reach.
        assert_eq!(
            limiter.check("k", t + 50 * MS),
            Decision::Delay {
                wait: 350 * MS,
                remaining: 0,
                reset: 450 * MS
            }
        );
        // Once the queue has drained a request passes at once.
        assert!(matches!(
            limiter.check("k", t + SEC),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn leaky_bucket_queue_never_exceeds_the_limit() {
        // max_delay far beyond the window: the bucket's capacity (10) is what bounds it.
        let limit = Limit::new(10, SEC, Algorithm::LeakyBucket).with_max_delay(60 * SEC);
        let epoch = Instant::now();
        let limiter = LocalLimiter::with_epoch(limit, 100, epoch);
        let mut waits = Vec::new();
        for _ in 0..15 {
            match limiter.check("k", epoch) {
                Decision::Allow { .. } => waits.push(Duration::ZERO),
                Decision::Delay { wait, .. } => waits.push(wait),
                Decision::Deny { retry_after, .. } => assert_eq!(retry_after, 100 * MS),
            }
        }
        let expected: Vec<Duration> = (0..10).map(|k| 100 * MS * k).collect();
        assert_eq!(waits, expected);
    }

    #[test]
    fn leaky_bucket_with_no_delay_is_strict_spacing() {
        let (limiter, epoch) = fresh(4, SEC, Algorithm::LeakyBucket);
        let interval = 250 * MS;
        assert!(matches!(
            limiter.check("k", epoch),
            Decision::Allow { remaining: 0, .. }
        ));
        assert_eq!(
            limiter.check("k", epoch + 100 * MS),
            Decision::Deny {
                retry_after: 150 * MS,
                reset: 150 * MS
            }
        );
        for step in 1..20 {
            let t = epoch + interval * step;
            assert!(
                matches!(limiter.check("k", t), Decision::Allow { .. }),
                "{step}"
            );
            assert!(!limiter.check("k", t).is_allowed(), "{step}");
        }
    }

    #[test]
    fn zero_requests_refuses_and_zero_window_does_not_panic() {
        for algorithm in ALL {
            let (limiter, epoch) = fresh(0, SEC, algorithm);
            assert_eq!(
                limiter.check("k", epoch),
                Decision::Deny {
                    retry_after: SEC,
                    reset: SEC
                }
            );
            assert!(limiter.is_empty());
            // Without max_delay a leaky bucket spaces requests strictly, so only one passes.
            let expected = if algorithm == Algorithm::LeakyBucket {
                1
            } else {
                5
            };
            let (limiter, epoch) = fresh(5, Duration::ZERO, algorithm);
            assert_eq!(burst(&limiter, "k", 10, epoch), expected, "{algorithm:?}");
            let huge = Limit::new(u64::MAX, Duration::MAX, algorithm).with_max_delay(Duration::MAX);
            let limiter = LocalLimiter::new(huge, 10);
            assert!(limiter.check("k", Instant::now() + 1000 * SEC).is_allowed());
        }
    }

    #[test]
    fn instants_before_the_epoch_count_as_the_epoch() {
        let before = Instant::now();
        let limiter = LocalLimiter::new(Limit::new(2, SEC, Algorithm::FixedWindow), 10);
        assert_eq!(burst(&limiter, "k", 3, before), 2);
    }

    #[test]
    fn key_count_never_exceeds_max_keys() {
        for algorithm in ALL {
            for max_keys in [1, 7, 100, 1000] {
                let epoch = Instant::now();
                let limit = Limit::new(5, 10 * SEC, algorithm);
                let limiter = LocalLimiter::with_epoch(limit, max_keys, epoch);
                for i in 0..(3 * max_keys + 50) {
                    // All live: nothing expires within the run.
                    assert!(limiter.check(&format!("key-{i}"), epoch).is_allowed());
                    assert!(limiter.len() <= max_keys, "{algorithm:?} {max_keys}");
                }
                assert!(
                    limiter.len() >= max_keys / 2,
                    "keeps most of its room in use"
                );
            }
        }
    }

    #[test]
    fn expired_keys_are_dropped_before_live_ones() {
        let epoch = Instant::now();
        let limit = Limit::new(10, SEC, Algorithm::TokenBucket);
        let limiter = LocalLimiter::with_epoch(limit, 1, epoch);
        // A single shard of one key: a heavy user, then another key long after it expired.
        assert_eq!(burst(&limiter, "heavy", 10, epoch), 10);
        assert!(limiter.check("light", epoch + 5 * SEC).is_allowed());
        assert_eq!(limiter.len(), 1);

        // With room for several keys, a flood of one-request keys evicts its own kind (which
        // expire after one interval) before the heavy user's state (a full window).
        let limiter = LocalLimiter::with_epoch(limit, 64, epoch);
        assert_eq!(burst(&limiter, "heavy", 10, epoch), 10);
        for i in 0..10_000 {
            assert!(limiter.check(&format!("flood-{i}"), epoch).is_allowed());
        }
        assert!(limiter.len() <= 64);
        assert!(
            !limiter.check("heavy", epoch).is_allowed(),
            "heavy user was evicted"
        );
    }

    #[test]
    fn concurrent_checks_on_one_key_admit_exactly_the_limit() {
        for algorithm in ALL {
            let epoch = Instant::now();
            let limit = Limit::new(1000, 60 * SEC, algorithm).with_max_delay(60 * SEC);
            let limiter = LocalLimiter::with_epoch(limit, 100, epoch);
            let now = epoch + SEC;
            let admitted: usize = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| burst(&limiter, "shared", 300, now)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(admitted, 1000, "{algorithm:?}");
        }
    }

    #[test]
    fn concurrent_leaky_waiters_get_distinct_slots() {
        let epoch = Instant::now();
        let limit = Limit::new(100, 10 * SEC, Algorithm::LeakyBucket).with_max_delay(60 * SEC);
        let limiter = LocalLimiter::with_epoch(limit, 100, epoch);
        let mut waits: Vec<Duration> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..40)
                            .filter_map(|_| match limiter.check("k", epoch) {
                                Decision::Allow { .. } => Some(Duration::ZERO),
                                Decision::Delay { wait, .. } => Some(wait),
                                Decision::Deny { .. } => None,
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        waits.sort();
        let expected: Vec<Duration> = (0..100).map(|k| 100 * MS * k).collect();
        assert_eq!(waits, expected);
    }

    #[test]
    fn check_all_is_all_or_nothing() {
        let epoch = Instant::now();
        let per_second =
            LocalLimiter::with_epoch(Limit::new(5, SEC, Algorithm::TokenBucket), 10, epoch);
        let per_minute =
            LocalLimiter::with_epoch(Limit::new(3, 60 * SEC, Algorithm::FixedWindow), 10, epoch);
        let checks = [(&per_second, "client"), (&per_minute, "client")];
        let mut admitted = 0;
        for _ in 0..5 {
            let decisions = LocalLimiter::check_all(&checks, epoch);
            assert_eq!(decisions.len(), 2);
            if decisions.iter().all(Decision::is_allowed) {
                admitted += 1;
            } else {
                assert!(decisions[0].is_allowed(), "the per-second limit had room");
                assert!(!decisions[1].is_allowed());
            }
        }
        assert_eq!(admitted, 3);
        // The two refused requests did not consume the per-second limit.
        assert_eq!(burst(&per_second, "client", 5, epoch), 2);
    }

    #[test]
    fn check_all_counts_a_repeated_key_each_time() {
        let epoch = Instant::now();
        let limiter =
            LocalLimiter::with_epoch(Limit::new(3, SEC, Algorithm::SlidingWindow), 10, epoch);
        let twice = [(&limiter, "k"), (&limiter, "k")];
        assert!(
            LocalLimiter::check_all(&twice, epoch)
                .iter()
                .all(Decision::is_allowed)
        );
        let decisions = LocalLimiter::check_all(&twice, epoch);
        assert!(decisions[0].is_allowed() && !decisions[1].is_allowed());
        // All or nothing: the second call consumed nothing.
        assert!(limiter.check("k", epoch).is_allowed());
        assert!(!limiter.check("k", epoch).is_allowed());
        assert!(LocalLimiter::check_all(&[], epoch).is_empty());
    }

    #[test]
    fn check_all_from_many_threads_does_not_deadlock_and_stays_exact() {
        let epoch = Instant::now();
        let minute = 60 * SEC;
        let a =
            LocalLimiter::with_epoch(Limit::new(500, minute, Algorithm::TokenBucket), 64, epoch);
        let b =
            LocalLimiter::with_epoch(Limit::new(300, minute, Algorithm::FixedWindow), 64, epoch);
        let c = LocalLimiter::with_epoch(
            Limit::new(1 << 40, minute, Algorithm::SlidingWindow),
            64,
            epoch,
        );
        let admitted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|thread| {
                    let (a, b, c) = (&a, &b, &c);
                    scope.spawn(move || {
                        let keys = ["x", "y", "z"];
                        (0..200)
                            .filter(|i| {
                                // Vary the order and the keys so shards are locked in every
                                // order, with single-key checks mixed in.
                                let other = keys[(i + thread) % 3];
                                let checks = if i % 2 == 0 {
                                    [(a, "shared"), (c, other), (b, "shared")]
                                } else {
                                    [(b, "shared"), (c, other), (a, "shared")]
                                };
                                assert!(c.check(other, epoch).is_allowed());
                                LocalLimiter::check_all(&checks, epoch)
                                    .iter()
                                    .all(Decision::is_allowed)
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // b's 300 binds; a (500) and c (unbounded) always have room.
        assert_eq!(admitted, 300);
        // a was consumed only by the 300 admitted requests.
        assert_eq!(burst(&a, "shared", 500, epoch), 200);
    }
}
