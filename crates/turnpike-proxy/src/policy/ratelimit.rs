//! Rate-limit algorithms, in process ([`LocalLimiter`]) and shared by a cluster of gateways
//! through Redis ([`RedisLimiter`]).
//!
//! A [`Limit`] is "`requests` per `window`" with one of four [`Algorithm`]s:
//!
//! - **Fixed window**: time is cut into windows aligned to multiples of `window` since an epoch
//!   (locally the limiter's epoch, by default its creation; the UNIX epoch in Redis) and each key counts its requests
//!   in the current window. Cheap and exact, but a client can send `2 × requests` around a
//!   window boundary.
//! - **Sliding window**: the sliding-window-counter approximation. The estimate is
//!   `previous × (unelapsed part of the current window) + current`, so the previous window's
//!   count fades out linearly. A request is admitted while the estimate including it stays
//!   within `requests`. It only counts admitted requests, and with no previous window (a fresh
//!   key) it is a plain counter, so a burst gets exactly `requests` through.
//! - **Token bucket**: GCRA (generic cell rate algorithm). Each key keeps one timestamp, its
//!   theoretical arrival time (TAT); a request advances it by the emission interval
//!   `T = window / requests` and is admitted while `TAT - now ≤ window`, which is a bucket of
//!   `requests` tokens refilled one per `T`. A fresh key can take `requests` at once.
//! - **Leaky bucket**: the same virtual schedule, but a request that is early is not refused:
//!   it is given the next free slot (`max(TAT, now)`), the slot is reserved at once (so
//!   concurrent waiters get successive slots, `T` apart), and the caller is told to wait until
//!   it ([`Decision::Delay`]). A request is refused only when its wait would exceed
//!   `max_delay`, or would put more than `requests` requests in the queue (the bucket's
//!   capacity): the wait is capped at `min(max_delay, window - T)`. So a burst from a fresh key
//!   gets its first request through at once and the next ones at `T`, `2T`, …; with
//!   `max_delay` = 0 requests are strictly spaced `T` apart.
//!
//! Arithmetic is exact (integers, with the emission interval kept as a whole part plus a
//! remainder in 1/`requests` units), so "N per window" lets exactly N through a fast burst for
//! every algorithm and nothing drifts when `window` is not a multiple of `requests`. The local
//! limiter counts nanoseconds; Redis counts whole microseconds (Lua numbers are doubles, exact
//! to 2^53), so its durations are rounded up to the microsecond and its limits clamped to
//! 2^50 requests and 2^50 µs. Both run the same algorithms and decide alike (a test replays
//! random timelines through both).
//!
//! **All or nothing.** A request usually meets several limits (per client, per route, per
//! second and per day). [`LocalLimiter::check_all`] and [`RedisLimiter::check_all`] decide all
//! of them together: if any limit refuses, no limit's state is consumed, so a refused request
//! does not eat the quota of the limits it passed. Locally this holds every shard the check
//! touches locked at once (taken in a fixed order, so two checks cannot deadlock); in Redis it
//! is one Lua script, which Redis runs atomically, reading the clock with `TIME` inside the
//! script so every gateway node uses the server's clock and nothing the nodes disagree on.
//! A request costs one round trip to Redis however many limits it has (`EVALSHA`; the script
//! is sent again only when Redis answers that it does not know it, e.g. after a restart).
//!
//! Memory is bounded: the local limiter keeps at most `max_keys` keys (see
//! [`LocalLimiter::new`] for what it evicts), and every Redis key gets a TTL equal to the time
//! after which its state equals a fresh key's, so Redis only holds keys that matter.

pub(crate) mod cluster;
mod local;

use std::time::Duration;

pub use cluster::{DEFAULT_PREFIX, RedisLimitError, RedisLimiter};
pub use local::LocalLimiter;

/// Which rate-limiting algorithm a [`Limit`] uses; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// A counter per window, windows aligned to multiples of the window length.
    FixedWindow,
    /// The previous window's count, weighted by its overlap, plus the current window's.
    SlidingWindow,
    /// GCRA: a bucket of `requests` tokens refilled one per `window / requests`.
    TokenBucket,
    /// GCRA's schedule, delaying early requests to their slot instead of refusing them.
    LeakyBucket,
}

impl Algorithm {
    /// A short tag for keys and logs, stable across releases because Redis keys contain it.
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fw",
            Algorithm::SlidingWindow => "sw",
            Algorithm::TokenBucket => "tb",
            Algorithm::LeakyBucket => "lb",
        }
    }
}

/// One limit: `requests` per `window`, enforced with `algorithm`.
///
/// `requests == 0` refuses everything; a zero `window` is treated as the shortest one the
/// limiter can measure (1 ns locally, 1 µs in Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// How many requests a window (or a full bucket) admits.
    pub requests: u64,
    /// The window length, or for the buckets the time to refill from empty.
    pub window: Duration,
    /// How the limit is enforced.
    pub algorithm: Algorithm,
    /// LeakyBucket only: the longest a request may be delayed before it is refused.
    pub max_delay: Duration,
}

impl Limit {
    /// A limit with no `max_delay` (a leaky bucket built this way spaces requests strictly).
    pub fn new(requests: u64, window: Duration, algorithm: Algorithm) -> Self {
        Limit {
            requests,
            window,
            algorithm,
            max_delay: Duration::ZERO,
        }
    }

    /// The same limit with `max_delay` set (meaningful for [`Algorithm::LeakyBucket`]).
    pub fn with_max_delay(self, max_delay: Duration) -> Self {
        Limit { max_delay, ..self }
    }
}

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through now.
    Allow {
        /// Requests left in the current window or bucket after this one.
        remaining: u64,
        /// Time until the quota is next restored: the next window for the window algorithms,
        /// a full bucket for the bucket algorithms.
        reset: Duration,
    },
    /// Leaky bucket: let the request through after waiting `wait` (the caller sleeps). Its
    /// slot is already reserved.
    Delay {
        /// How long the caller must hold the request before forwarding it.
        wait: Duration,
        /// Requests that could still be queued now, after this one.
        remaining: u64,
        /// Time until the bucket is empty again.
        reset: Duration,
    },
    /// Refuse the request (429).
    Deny {
        /// When a retry could succeed, if nothing else consumes the quota first; never zero.
        retry_after: Duration,
        /// Time until the quota is next restored, as in [`Decision::Allow`].
        reset: Duration,
    },
}

impl Decision {
    /// Whether the request may go on ([`Decision::Allow`] or [`Decision::Delay`]).
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }

    /// Requests left, for a `RateLimit-Remaining` header (0 when refused).
    pub fn remaining(&self) -> u64 {
        match *self {
            Decision::Allow { remaining, .. } | Decision::Delay { remaining, .. } => remaining,
            Decision::Deny { .. } => 0,
        }
    }

    /// Time until the quota is next restored, for a `RateLimit-Reset` header.
    pub fn reset(&self) -> Duration {
        match *self {
            Decision::Allow { reset, .. }
            | Decision::Delay { reset, .. }
            | Decision::Deny { reset, .. } => reset,
        }
    }
}
