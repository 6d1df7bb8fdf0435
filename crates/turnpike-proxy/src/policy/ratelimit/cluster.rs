//! The cluster limiter: state in Redis, every limit of a request decided by one Lua script.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};

use super::{Algorithm, Decision, Limit};

/// The key prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "turnpike:rl:";

/// Largest value sent to the script: Lua numbers are doubles, exact up to 2^53, and the
/// script adds windows to timestamps of about 2^51 µs.
const LUA_MAX: u64 = 1 << 50;

/// After this many calls in a row fail for want of an answer, the connection is replaced.
/// The connection manager reconnects by itself when the socket breaks, but not when a live
/// socket simply stops answering (a hung server, a black-holed route).
const FAILURES_BEFORE_REBUILD: u32 = 3;

/// Why a check could not be decided. The caller chooses between failing open and closed.
#[derive(Debug)]
pub enum RedisLimitError {
    /// The Redis URL or client configuration is invalid.
    Config(RedisError),
    /// Redis did not answer within the limiter's timeout.
    Timeout(Duration),
    /// Redis could not be reached, or answered with an error.
    Redis(RedisError),
    /// The script answered something this code does not understand (a version mismatch).
    Reply(String),
}

impl std::fmt::Display for RedisLimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisLimitError::Config(e) => write!(f, "invalid Redis configuration: {e}"),
            RedisLimitError::Timeout(d) => write!(f, "Redis did not answer within {d:?}"),
            RedisLimitError::Redis(e) => write!(f, "Redis error: {e}"),
            RedisLimitError::Reply(what) => write!(f, "unexpected reply from Redis: {what}"),
        }
    }
}

impl std::error::Error for RedisLimitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisLimitError::Config(e) | RedisLimitError::Redis(e) => Some(e),
            RedisLimitError::Timeout(_) | RedisLimitError::Reply(_) => None,
        }
    }
}

/// A rate limiter whose state lives in Redis, shared by every gateway node using the same
/// Redis and prefix. Cheap to share (`&self`); one multiplexed connection carries all calls.
///
/// Keys are `{prefix}{algorithm}:{requests}:{window µs}:{key}`, so two limits with different
/// parameters never share state, and a changed limit starts afresh. A request's limits are
/// decided by one script touching several keys, which Redis Cluster only allows within one
/// hash slot: use a single Redis (or a prefix with a hash tag, at the cost of one slot).
///
/// A clone is another handle on the same connection.
#[derive(Clone)]
pub struct RedisLimiter {
    // Behind one pointer: the connection state is large, and handles get moved into tasks
    // and stored in enums.
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: ConnectionManagerConfig,
    manager: ArcSwap<ConnectionManager>,
    /// Consecutive calls that got no answer; reset by any answer.
    failures: AtomicU32,
    /// When the connection was last replaced, so replacing cannot turn into a storm.
    rebuilt: Mutex<Instant>,
    prefix: String,
    timeout: Duration,
    script: Script,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// How a Redis connection manager of the gateway behaves: few, quick retries inside the
/// manager, since the caller's `timeout` bounds a call anyway and the next call starts a new
/// attempt.
pub(crate) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(timeout.min(Duration::from_secs(1)))
}

impl RedisLimiter {
    /// A limiter on the Redis at `url` (`redis://[user:password@]host:port[/db]`), its keys
    /// under `prefix` ([`DEFAULT_PREFIX`] when empty), every call bounded by `timeout`.
    ///
    /// Fails only when `url` is invalid. An unreachable Redis is not an error here: the
    /// connection is made lazily and retried, so a gateway that starts before its Redis
    /// works as soon as Redis does; until then [`RedisLimiter::check_all`] returns errors.
    /// This tries the connection once (within `timeout`) and logs a warning if it fails.
    /// Must be called within a Tokio runtime.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RedisLimitError> {
        let client = Client::open(url).map_err(RedisLimitError::Config)?;
        let timeout = timeout.max(Duration::from_millis(1));
        let config = manager_config(timeout);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(RedisLimitError::Config)?;
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        let inner = Inner {
            client,
            config,
            manager: ArcSwap::from_pointee(manager),
            failures: AtomicU32::new(0),
            rebuilt: Mutex::new(Instant::now()),
            prefix: prefix.to_owned(),
            timeout,
            script: Script::new(include_str!("script.lua")),
        };
        let limiter = RedisLimiter {
            inner: Arc::new(inner),
        };
        if let Err(error) = limiter.ping().await {
            tracing::warn!(%error, "rate limit: Redis is not reachable yet; checks fail until it is");
        }
        Ok(limiter)
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Checks that Redis answers within the timeout, and loads the script so the first
    /// check needs no extra round trip. For readiness probes.
    pub async fn ping(&self) -> Result<(), RedisLimitError> {
        let mut conn = self.connection();
        let script = &self.inner.script;
        let call = async move {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            script.load_async(&mut conn).await.map(drop)
        };
        self.bounded(call).await
    }

    /// Decides one request against all of `checks` (each a key and its limit) in one round
    /// trip, atomically and all or nothing: if any limit refuses, no limit is consumed. The
    /// decisions come back in the order of `checks`; when one is a refusal, the others say
    /// what they would have decided, but their state is untouched.
    ///
    /// Returns an error, within the timeout, when Redis is unreachable or slow.
    pub async fn check_all(
        &self,
        checks: &[(&str, &Limit)],
    ) -> Result<Vec<Decision>, RedisLimitError> {
        self.check_all_at(checks, None).await
    }

    /// [`RedisLimiter::check_all`], at `now_us` (µs since the UNIX epoch) instead of Redis's
    /// clock when given, so tests can replay a timeline.
    async fn check_all_at(
        &self,
        checks: &[(&str, &Limit)],
        now_us: Option<u64>,
    ) -> Result<Vec<Decision>, RedisLimitError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.inner.script.prepare_invoke();
        for &(key, limit) in checks {
            let (requests, window, max_delay) = script_numbers(limit);
            invocation
                .key(self.redis_key(key, limit))
                .arg(algorithm_code(limit.algorithm))
                .arg(requests)
                .arg(window)
                .arg(max_delay);
        }
        if let Some(now) = now_us {
            invocation.arg(now);
        }
        let mut conn = self.connection();
        let reply: Vec<i64> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        parse_reply(&reply, checks.len())
    }

    /// The Redis key holding `key`'s state under `limit`.
    fn redis_key(&self, key: &str, limit: &Limit) -> String {
        let (requests, window, _) = script_numbers(limit);
        format!(
            "{}{}:{requests}:{window}:{key}",
            self.inner.prefix,
            limit.algorithm.tag()
        )
    }

    fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.inner.manager.load())
    }

    /// Runs one exchange with Redis within the timeout and keeps the connection's health.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisLimitError> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(value)) => {
                self.answered();
                Ok(value)
            }
            Ok(Err(error)) => {
                if is_unanswered(&error) {
                    self.unanswered();
                } else {
                    // Redis answered (with an error): the connection itself is fine.
                    self.answered();
                }
                // The connection's own response timeout equals ours and may fire first.
                if error.is_timeout() {
                    return Err(RedisLimitError::Timeout(self.inner.timeout));
                }
                Err(RedisLimitError::Redis(error))
            }
            Err(_) => {
                self.unanswered();
                Err(RedisLimitError::Timeout(self.inner.timeout))
            }
        }
    }

    fn answered(&self) {
        // Read first so the common case does not write a shared cache line.
        if self.inner.failures.load(Ordering::Relaxed) != 0 {
            self.inner.failures.store(0, Ordering::Relaxed);
        }
    }

    fn unanswered(&self) {
        let failures = self.inner.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_BEFORE_REBUILD {
            return;
        }
        let Ok(mut rebuilt) = self.inner.rebuilt.try_lock() else {
            return; // another caller is replacing it
        };
        if rebuilt.elapsed() < self.inner.timeout.max(Duration::from_secs(1)) {
            return;
        }
        match ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.config.clone(),
        ) {
            Ok(manager) => {
                tracing::warn!(
                    failures,
                    "rate limit: Redis stopped answering; reconnecting"
                );
                self.inner.manager.store(Arc::new(manager));
                self.inner.failures.store(0, Ordering::Relaxed);
                *rebuilt = Instant::now();
            }
            Err(error) => tracing::warn!(%error, "rate limit: cannot create a Redis connection"),
        }
    }
}

/// Whether the error means Redis gave no answer (as opposed to answering with an error).
fn is_unanswered(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
}

fn algorithm_code(algorithm: Algorithm) -> u8 {
    match algorithm {
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindow => 2,
        Algorithm::TokenBucket => 3,
        Algorithm::LeakyBucket => 4,
    }
}

/// Requests, window (µs, at least 1) and max delay (µs) as the script takes them, clamped to
/// where Lua's doubles stay exact.
fn script_numbers(limit: &Limit) -> (u64, u64, u64) {
    let micros = |d: Duration| {
        u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .min(LUA_MAX)
    };
    (
        limit.requests.min(LUA_MAX),
        micros(limit.window).max(1),
        micros(limit.max_delay),
    )
}

fn parse_reply(reply: &[i64], expected: usize) -> Result<Vec<Decision>, RedisLimitError> {
    if reply.len() != expected * 4 {
        return Err(RedisLimitError::Reply(format!(
            "{} numbers for {expected} limits",
            reply.len()
        )));
    }
    let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    reply
        .chunks_exact(4)
        .map(|item| match item {
            &[0, remaining, reset, _] => Ok(Decision::Allow {
                remaining: count(remaining),
                reset: micros(reset),
            }),
            &[1, remaining, reset, wait] => Ok(Decision::Delay {
                wait: micros(wait),
                remaining: count(remaining),
                reset: micros(reset),
            }),
            &[2, _, reset, retry_after] => Ok(Decision::Deny {
                retry_after: micros(retry_after).max(Duration::from_micros(1)),
                reset: micros(reset),
            }),
            other => Err(RedisLimitError::Reply(format!("outcome {other:?}"))),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Notify;
    use tokio::task::{JoinHandle, JoinSet};

    const DAY: Duration = Duration::from_secs(86_400);

    fn redis_url() -> String {
        std::env::var("TURNPIKE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// A limiter on the test Redis with a prefix of its own, so tests running in parallel (and
    /// earlier runs) never share keys. Panics when Redis is not there: these tests must not
    /// pass by skipping.
    async fn limiter() -> RedisLimiter {
        let url = redis_url();
        let prefix = format!("turnpike:test:{}:", uuid::Uuid::new_v4());
        let limiter = RedisLimiter::connect(&url, &prefix, Duration::from_secs(2))
            .await
            .expect("valid Redis URL");
        if let Err(error) = limiter.ping().await {
            panic!(
                "Redis is required for these tests and is not answering at {url} \
                 (set TURNPIKE_TEST_REDIS): {error}"
            );
        }
        limiter
    }

    async fn burst(
        limiter: &RedisLimiter,
        key: &str,
        limit: &Limit,
        count: usize,
    ) -> Vec<Decision> {
        let mut decisions = Vec::with_capacity(count);
        for _ in 0..count {
            let decision = limiter.check_all(&[(key, limit)]).await.unwrap();
            assert_eq!(decision.len(), 1);
            decisions.push(decision[0]);
        }
        decisions
    }

    fn admitted(decisions: &[Decision]) -> usize {
        decisions.iter().filter(|d| d.is_allowed()).count()
    }

    #[tokio::test]
    async fn every_algorithm_is_exact_for_a_burst_through_redis() {
        let limiter = limiter().await;
        for algorithm in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
            Algorithm::LeakyBucket,
        ] {
            // Long windows so the time the burst takes cannot refill anything.
            let limit = Limit::new(100, DAY, algorithm).with_max_delay(DAY);
            let decisions = burst(&limiter, "burst", &limit, 150).await;
            assert_eq!(admitted(&decisions), 100, "{algorithm:?}");
            assert!(
                decisions[..100].iter().all(Decision::is_allowed),
                "{algorithm:?}"
            );
            for decision in &decisions[100..] {
                let Decision::Deny { retry_after, .. } = decision else {
                    panic!("{algorithm:?}: {decision:?}");
                };
                assert!(*retry_after > Duration::ZERO);
            }
            assert_eq!(decisions[0].remaining(), 99, "{algorithm:?}");
            assert_eq!(decisions[99].remaining(), 0, "{algorithm:?}");
        }
    }

    #[tokio::test]
    async fn exact_when_the_window_is_not_a_multiple_of_requests() {
        let limiter = limiter().await;
        for algorithm in [Algorithm::TokenBucket, Algorithm::LeakyBucket] {
            // T = 8 640 000 000 / 7 µs, a fraction of a microsecond left over.
            let limit = Limit::new(7, DAY, algorithm).with_max_delay(DAY);
            let decisions = burst(&limiter, "odd", &limit, 20).await;
            assert_eq!(admitted(&decisions), 7, "{algorithm:?}");
        }
    }

    #[tokio::test]
    async fn leaky_bucket_delays_grow_by_the_interval() {
        let limiter = limiter().await;
        let limit = Limit::new(10, Duration::from_secs(100), Algorithm::LeakyBucket)
            .with_max_delay(Duration::from_secs(35));
        let decisions = burst(&limiter, "leaky", &limit, 6).await;
        assert!(
            matches!(decisions[0], Decision::Allow { .. }),
            "{decisions:?}"
        );
        let interval = Duration::from_secs(10);
        for (k, decision) in decisions.iter().enumerate().take(4).skip(1) {
            let Decision::Delay { wait, .. } = *decision else {
                panic!("{decisions:?}");
            };
            // The burst takes a little real time, which the wait already accounts for.
            let slot = interval * k as u32;
            assert!(
                wait <= slot && wait > slot - Duration::from_secs(1),
                "{decisions:?}"
            );
        }
        let Decision::Deny { retry_after, .. } = decisions[4] else {
            panic!("{decisions:?}");
        };
        assert!(retry_after > Duration::from_secs(4) && retry_after <= Duration::from_secs(5));

        // Without max_delay: strict spacing.
        let strict = Limit::new(10, Duration::from_secs(100), Algorithm::LeakyBucket);
        let decisions = burst(&limiter, "strict", &strict, 3).await;
        assert!(matches!(decisions[0], Decision::Allow { .. }));
        assert!(matches!(decisions[1], Decision::Deny { .. }));
    }

    #[tokio::test]
    async fn all_or_nothing_across_limits() {
        let limiter = limiter().await;
        let roomy = Limit::new(5, DAY, Algorithm::TokenBucket);
        let tight = Limit::new(3, DAY, Algorithm::FixedWindow);
        let mut admitted = 0;
        for _ in 0..5 {
            let decisions = limiter
                .check_all(&[("client", &roomy), ("client", &tight)])
                .await
                .unwrap();
            if decisions.iter().all(Decision::is_allowed) {
                admitted += 1;
            } else {
                assert!(
                    decisions[0].is_allowed() && !decisions[1].is_allowed(),
                    "{decisions:?}"
                );
            }
        }
        assert_eq!(admitted, 3);
        // The refused requests did not consume the roomy limit.
        assert_eq!(admitted_count(&limiter, "client", &roomy, 5).await, 2);

        // A key repeated within one call counts each time, and a refusal writes nothing.
        let limit = Limit::new(3, DAY, Algorithm::SlidingWindow);
        let twice = [("again", &limit), ("again", &limit)];
        assert!(
            limiter
                .check_all(&twice)
                .await
                .unwrap()
                .iter()
                .all(Decision::is_allowed)
        );
        let decisions = limiter.check_all(&twice).await.unwrap();
        assert!(decisions[0].is_allowed() && !decisions[1].is_allowed());
        assert_eq!(admitted_count(&limiter, "again", &limit, 3).await, 1);

        assert!(limiter.check_all(&[]).await.unwrap().is_empty());
    }

    async fn admitted_count(
        limiter: &RedisLimiter,
        key: &str,
        limit: &Limit,
        count: usize,
    ) -> usize {
        admitted(&burst(limiter, key, limit, count).await)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_checks_admit_exactly_the_limit() {
        let limiter = std::sync::Arc::new(limiter().await);
        let limit = Limit::new(100, DAY, Algorithm::TokenBucket);
        let mut tasks = JoinSet::new();
        for _ in 0..250 {
            let limiter = limiter.clone();
            tasks.spawn(async move { limiter.check_all(&[("shared", &limit)]).await.unwrap()[0] });
        }
        let decisions: Vec<Decision> = tasks.join_all().await;
        assert_eq!(admitted(&decisions), 100);
    }

    #[tokio::test]
    async fn keys_are_prefixed_and_expire() {
        let limiter = limiter().await;
        let limit = Limit::new(10, Duration::from_secs(30), Algorithm::SlidingWindow);
        limiter.check_all(&[("ttl", &limit)]).await.unwrap();
        let key = limiter.redis_key("ttl", &limit);
        assert!(key.starts_with(limiter.prefix()));
        let mut conn = limiter.connection();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        // Two windows at most: the sliding window's state fades after that.
        assert!(ttl > 30_000 && ttl <= 60_001, "{ttl}");

        let limit = Limit::new(10, Duration::from_secs(30), Algorithm::TokenBucket);
        limiter.check_all(&[("ttl", &limit)]).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(limiter.redis_key("ttl", &limit))
            .query_async(&mut conn)
            .await
            .unwrap();
        // One token's worth: 3 s.
        assert!(ttl > 0 && ttl <= 3_001, "{ttl}");

        let default = RedisLimiter::connect(&redis_url(), "", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(default.prefix(), DEFAULT_PREFIX);
    }

    #[tokio::test]
    async fn invalid_url_is_an_error() {
        let error = RedisLimiter::connect("not a url", "", Duration::from_secs(1)).await;
        assert!(
            matches!(error, Err(RedisLimitError::Config(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_redis_fails_within_the_timeout() {
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let limiter = RedisLimiter::connect("redis://127.0.0.1:1", "t:", timeout)
            .await
            .unwrap();
        assert!(started.elapsed() < timeout + Duration::from_millis(500));
        let limit = Limit::new(10, DAY, Algorithm::FixedWindow);
        for _ in 0..5 {
            let started = Instant::now();
            let result = limiter.check_all(&[("k", &limit)]).await;
            assert!(result.is_err(), "{result:?}");
            assert!(
                started.elapsed() < timeout + Duration::from_millis(200),
                "{:?}",
                started.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn silent_redis_fails_within_the_timeout() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let timeout = Duration::from_millis(300);
        let limiter = RedisLimiter::connect(&format!("redis://{addr}"), "t:", timeout)
            .await
            .unwrap();
        let limit = Limit::new(10, DAY, Algorithm::TokenBucket);
        for _ in 0..5 {
            let started = Instant::now();
            let result = limiter.check_all(&[("k", &limit)]).await;
            assert!(result.is_err(), "{result:?}");
            assert!(
                started.elapsed() < timeout + Duration::from_millis(200),
                "{:?}",
                started.elapsed()
            );
        }
        hold.abort();
    }

    /// A TCP relay to the test Redis that can be stopped (closing every connection) and
    /// started again on the same port.
    struct Relay {
        port: u16,
        upstream: SocketAddr,
        /// Freezes the connections open at the time: they stay open but carry nothing more.
        freeze: Arc<Notify>,
        task: Option<JoinHandle<()>>,
    }

    impl Relay {
        /// A relay (not yet started) on a free port, and the test Redis URL pointed at it.
        async fn new() -> (Relay, String) {
            let url = redis_url();
            let info = Client::open(url.as_str()).unwrap();
            let redis::ConnectionAddr::Tcp(host, port) = info.get_connection_info().addr().clone()
            else {
                panic!("TURNPIKE_TEST_REDIS must be a redis:// URL");
            };
            let upstream = tokio::net::lookup_host((host.as_str(), port))
                .await
                .unwrap()
                .next()
                .unwrap();
            let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay_port = free.local_addr().unwrap().port();
            drop(free);
            let relayed = url.replacen(
                &format!("{host}:{port}"),
                &format!("127.0.0.1:{relay_port}"),
                1,
            );
            assert_ne!(relayed, url, "could not point {url} at the relay");
            let relay = Relay {
                port: relay_port,
                upstream,
                freeze: Arc::new(Notify::new()),
                task: None,
            };
            (relay, relayed)
        }

        async fn start(&mut self) {
            let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
            let upstream = self.upstream;
            let freeze = self.freeze.clone();
            self.task = Some(tokio::spawn(async move {
                // Dropped with the task, which aborts every connection.
                let mut connections = JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let freeze = freeze.clone();
                    connections.spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            () = freeze.notified() => {
                                // Hold both sockets open, silent, until the relay stops.
                                std::future::pending::<()>().await;
                            }
                        }
                    });
                }
            }));
        }

        async fn stop(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn recovers_when_redis_comes_back() {
        let (mut relay, relayed) = Relay::new().await;

        // Redis down at startup: the limiter is built anyway and fails fast.
        let timeout = Duration::from_millis(500);
        let prefix = format!("turnpike:test:{}:", uuid::Uuid::new_v4());
        let limiter = RedisLimiter::connect(&relayed, &prefix, timeout)
            .await
            .unwrap();
        let limit = Limit::new(1_000_000, DAY, Algorithm::TokenBucket);
        let check = || async { limiter.check_all(&[("k", &limit)]).await };
        assert!(check().await.is_err());

        relay.start().await;
        until("the limiter reaches Redis", async || check().await.is_ok()).await;

        relay.stop().await;
        until("the limiter notices Redis is gone", async || {
            let started = Instant::now();
            let result = check().await;
            assert!(started.elapsed() < timeout + Duration::from_millis(300));
            result.is_err()
        })
        .await;

        relay.start().await;
        until("the limiter reaches Redis again", async || {
            check().await.is_ok()
        })
        .await;
        relay.stop().await;
    }

    #[tokio::test]
    async fn replaces_a_connection_that_stops_answering() {
        let (mut relay, relayed) = Relay::new().await;
        relay.start().await;
        let timeout = Duration::from_millis(300);
        let prefix = format!("turnpike:test:{}:", uuid::Uuid::new_v4());
        let limiter = RedisLimiter::connect(&relayed, &prefix, timeout)
            .await
            .unwrap();
        let limit = Limit::new(1_000_000, DAY, Algorithm::FixedWindow);
        let check = || async { limiter.check_all(&[("k", &limit)]).await };
        assert!(check().await.is_ok());

        // The socket stays up but nothing comes back: no error for the connection manager
        // to react to, only timeouts.
        relay.freeze.notify_waiters();
        let started = Instant::now();
        let result = check().await;
        assert!(
            matches!(result, Err(RedisLimitError::Timeout(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < timeout + Duration::from_millis(200));
        until("the limiter replaces the hung connection", async || {
            check().await.is_ok()
        })
        .await;
        relay.stop().await;
    }

    /// Replays random timelines through the script, with the clock passed in, and through
    /// the local limiter: they must decide alike (Redis rounds durations up to whole µs).
    /// The script's fraction-of-a-microsecond arithmetic is the delicate part this covers.
    #[tokio::test]
    async fn script_decides_like_the_local_limiter() {
        use super::super::LocalLimiter;
        let limiter = limiter().await;
        let algorithms = [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
            Algorithm::LeakyBucket,
        ];
        for seed in 0..60u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let limits: Vec<Limit> = (0..2)
                .map(|_| {
                    let window = match rng.u8(0..3) {
                        0 => rng.u64(1..50),
                        1 => rng.u64(1..100_000),
                        _ => rng.u64(1..10_000_000_000),
                    };
                    let requests = if rng.u8(0..20) == 0 {
                        0
                    } else {
                        rng.u64(1..=12)
                    };
                    let max_delay = rng.u64(0..=2 * window);
                    Limit::new(
                        requests,
                        Duration::from_micros(window),
                        algorithms[rng.usize(..4)],
                    )
                    .with_max_delay(Duration::from_micros(max_delay))
                })
                .collect();
            let epoch = Instant::now();
            let locals: Vec<LocalLimiter> = limits
                .iter()
                .map(|limit| LocalLimiter::with_epoch(*limit, 100, epoch))
                .collect();
            // Half the timelines at today's magnitude, where doubles have least room.
            let base = if seed % 2 == 0 {
                1_750_000_000_000_000
            } else {
                0
            };
            let mut now: u64 = base + rng.u64(0..1_000_000_000);
            for step in 0..150 {
                let limit = &limits[rng.usize(..2)];
                let window = limit.window.as_micros() as u64;
                let interval = window / limit.requests.max(1);
                // Mostly bursts, then gaps around an emission interval or a window.
                now += match rng.u8(0..4) {
                    0 | 1 => 0,
                    2 => rng.u64(0..=interval + 1),
                    _ => rng.u64(0..=2 * window),
                };
                let key = ["a", "b"][rng.usize(..2)];
                let which: &[usize] = match rng.u8(0..3) {
                    0 => &[0],
                    1 => &[1],
                    _ => &[0, 1],
                };
                let keys: Vec<String> =
                    which.iter().map(|i| format!("s{seed}-{key}-{i}")).collect();
                let remote_checks: Vec<(&str, &Limit)> = which
                    .iter()
                    .zip(&keys)
                    .map(|(&i, key)| (key.as_str(), &limits[i]))
                    .collect();
                let local_checks: Vec<(&LocalLimiter, &str)> =
                    which.iter().map(|&i| (&locals[i], key)).collect();
                let remote = limiter
                    .check_all_at(&remote_checks, Some(now))
                    .await
                    .unwrap();
                let local =
                    LocalLimiter::check_all(&local_checks, epoch + Duration::from_micros(now));
                let expected: Vec<Decision> = local.iter().map(in_micros).collect();
                assert_eq!(
                    remote, expected,
                    "seed {seed}, step {step}, at {now} µs, limits {which:?} of {limits:?}"
                );
            }
        }
    }

    fn in_micros(decision: &Decision) -> Decision {
        let up = |d: Duration| Duration::from_micros(d.as_nanos().div_ceil(1000) as u64);
        match *decision {
            Decision::Allow { remaining, reset } => Decision::Allow {
                remaining,
                reset: up(reset),
            },
            Decision::Delay {
                wait,
                remaining,
                reset,
            } => Decision::Delay {
                wait: up(wait),
                remaining,
                reset: up(reset),
            },
            Decision::Deny { retry_after, reset } => Decision::Deny {
                retry_after: up(retry_after),
                reset: up(reset),
            },
        }
    }

    #[test]
    fn reply_parsing() {
        let reply = [0, 5, 1_000, 0, 1, 4, 2_000, 500, 2, 0, 3_000, 0];
        assert_eq!(
            parse_reply(&reply, 3).unwrap(),
            vec![
                Decision::Allow {
                    remaining: 5,
                    reset: Duration::from_millis(1)
                },
                Decision::Delay {
                    wait: Duration::from_micros(500),
                    remaining: 4,
                    reset: Duration::from_millis(2)
                },
                Decision::Deny {
                    retry_after: Duration::from_micros(1),
                    reset: Duration::from_millis(3)
                },
            ]
        );
        assert!(parse_reply(&reply, 2).is_err());
        assert!(parse_reply(&[7, 0, 0, 0], 1).is_err());
    }

    #[test]
    fn script_numbers_stay_exact_in_lua() {
        let limit = Limit::new(u64::MAX, Duration::MAX, Algorithm::LeakyBucket)
            .with_max_delay(Duration::MAX);
        assert_eq!(script_numbers(&limit), (LUA_MAX, LUA_MAX, LUA_MAX));
        let limit = Limit::new(5, Duration::ZERO, Algorithm::FixedWindow);
        assert_eq!(script_numbers(&limit), (5, 1, 0));
    }
}
