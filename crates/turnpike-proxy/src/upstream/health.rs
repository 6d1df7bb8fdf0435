//! Target resolution, active health checks, passive outlier ejection, DNS refresh.
//!
//! - **Active checks** probe every target with `GET path` through the upstream's own client
//!   (same TLS, SNI and pool as real traffic), all targets concurrently, once per `interval`.
//!   A target turns unhealthy after `unhealthy_threshold` consecutive failed probes and healthy
//!   again after `healthy_threshold` consecutive good ones; one odd probe flips nothing.
//! - **Passive ejection** counts consecutive failures of real requests ([`record`]); at
//!   `consecutive_failures` the target is skipped for `ejection_time`, then tried again.
//! - **DNS refresh** re-resolves host names every `dns_refresh`. Addresses that stay keep their
//!   `Arc<Target>` (health, ejection, in-flight counts and latency survive); only a changed
//!   address set builds a new `TargetSet`. A failed resolution keeps the old set.
//!
//! Background tasks hold a `Weak<Upstream>` and end at the first tick after the pool is
//! dropped, so a configuration reload that retires a pool also retires its tasks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use tokio::time::{Instant, MissedTickBehavior};
use turnpike_model::{ActiveHealthCheck, PassiveHealthCheck, TargetConfig, UpstreamConfig};

use super::{Outcome, Target, TargetSet, Upstream, lb};
use crate::client::UpstreamClient;

/// Smallest probe or refresh period accepted; a zero period would spin (and panics in tokio).
const MIN_PERIOD: Duration = Duration::from_millis(10);
/// Longest a DNS refresh may take before the round is abandoned (the old set stays).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe response bodies are read (so the connection can be reused) up to this size.
const PROBE_BODY_LIMIT: usize = 64 * 1024;
/// Weight of a new sample in the latency EWMA (see [`record`]).
const EWMA_ALPHA_TENTHS: u128 = 3;

/// One resolved address of a configured target: the identity used to match targets across
/// DNS refreshes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Resolved {
    addr: SocketAddr,
    host: String,
    port: u16,
    weight: u32,
}

impl Resolved {
    fn of(t: &Target) -> Self {
        Self {
            addr: t.addr,
            host: t.host.clone(),
            port: t.port,
            weight: t.weight,
        }
    }

    fn into_target(self) -> Arc<Target> {
        Arc::new(Target::new(self.addr, self.host, self.port, self.weight))
    }
}

/// Splits `host:port` (`[v6]:port` too) into host and port.
fn split_address(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("bad target `{address}`"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in `{address}`"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, port))
}

/// Resolves every configured target, one entry per address, in configuration order.
async fn resolve(targets: &[TargetConfig]) -> Result<Vec<Resolved>, String> {
    let mut out = Vec::new();
    for t in targets {
        let (host, port) = split_address(&t.address)?;
        let addrs = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve `{}`: {e}", t.address))?;
        for addr in addrs {
            out.push(Resolved {
                addr,
                host: host.clone(),
                port,
                weight: t.weight,
            });
        }
    }
    Ok(out)
}

/// Resolves every configured target to socket addresses.
pub async fn resolve_targets(config: &UpstreamConfig) -> Result<Vec<Arc<Target>>, String> {
    Ok(resolve(&config.targets)
        .await?
        .into_iter()
        .map(Resolved::into_target)
        .collect())
}

/// Whether any configured target is a host name, which makes DNS refresh worthwhile.
fn has_host_names(config: &UpstreamConfig) -> bool {
    config
        .targets
        .iter()
        .any(|t| match split_address(&t.address) {
            Ok((host, _)) => host.parse::<IpAddr>().is_err(),
            Err(_) => false,
        })
}

/// Starts background tasks for `upstream`: active health checks when configured, DNS refresh
/// when a target is a host name. Without a Tokio runtime nothing starts (logged) and it
/// returns `false`; otherwise `true`, including when there was nothing to start.
pub fn spawn_background(upstream: Weak<Upstream>) -> bool {
    let Some(up) = upstream.upgrade() else {
        return true;
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(upstream = %up.name, "no async runtime: health checks and DNS refresh not started");
        return false;
    };
    if let Some(active) = up.config.health_check.active.clone() {
        handle.spawn(active_loop(upstream.clone(), up.name.clone(), active));
    }
    if has_host_names(&up.config) && !up.config.dns_refresh.is_zero() {
        let period = up.config.dns_refresh.max(MIN_PERIOD);
        handle.spawn(dns_loop(upstream, period));
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Active health checks

/// Consecutive probe results for one target address.
#[derive(Debug, Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

async fn active_loop(upstream: Weak<Upstream>, name: Arc<str>, cfg: ActiveHealthCheck) {
    let period = cfg.interval.max(MIN_PERIOD);
    // A zero timeout would fail every probe; a probe may at most take one period then.
    let timeout = if cfg.timeout.is_zero() {
        period
    } else {
        cfg.timeout
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    loop {
        tick.tick().await;
        // The strong reference lives only while copying what the round needs, so probes in
        // flight never keep a retired pool alive.
        let (targets, client, http2) = match upstream.upgrade() {
            Some(up) => (up.targets(), up.client.clone(), up.config.http2),
            None => return,
        };
        let results = futures_util::future::join_all(
            targets
                .iter()
                .map(|t| probe(&client, t, &cfg, timeout, http2)),
        )
        .await;
        streaks.retain(|addr, _| targets.iter().any(|t| t.addr == *addr));
        for (target, result) in targets.iter().zip(results) {
            let streak = streaks.entry(target.addr).or_default();
            apply_probe(&name, target, streak, &cfg, result);
        }
    }
}

/// Sends one probe; `Ok` with the status when a response head arrived in time.
async fn probe(
    client: &UpstreamClient,
    target: &Target,
    cfg: &ActiveHealthCheck,
    timeout: Duration,
    http2: bool,
) -> Result<StatusCode, String> {
    let path = if cfg.path.starts_with('/') {
        cfg.path.clone()
    } else {
        format!("/{}", cfg.path)
    };
    let uri = client
        .uri_for(target.addr, &path)
        .map_err(|e| format!("bad probe URI: {e}"))?;
    let mut req = http::Request::get(uri).header(http::header::USER_AGENT, "turnpike-health-check");
    if !http2 && let Some(host) = target.host_header() {
        // The client does not set Host itself; HTTP/2 carries the authority in the URI.
        req = req.header(http::header::HOST, host.clone());
    }
    let req = req
        .body(crate::body::empty())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the (small) body so the connection goes back to the pool; its content and
        // errors do not matter, the status decided.
        let _ = Limited::new(resp.into_body(), PROBE_BODY_LIMIT)
            .collect()
            .await;
        Ok(status)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no response within {timeout:?}"))?
}

/// Updates a target's streak with one probe result and flips its health at the thresholds.
fn apply_probe(
    upstream: &str,
    target: &Target,
    streak: &mut Streak,
    cfg: &ActiveHealthCheck,
    result: Result<StatusCode, String>,
) {
    let outcome = match result {
        Ok(status) if cfg.expected_status.contains(&status.as_u16()) => Ok(()),
        Ok(status) => Err(format!("status {}", status.as_u16())),
        Err(e) => Err(e),
    };
    let healthy = target.active_healthy.load(Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            streak.failures = 0;
            streak.successes = streak.successes.saturating_add(1);
            if !healthy && streak.successes >= cfg.healthy_threshold.max(1) {
                target.active_healthy.store(true, Ordering::Relaxed);
                tracing::info!(
                    upstream,
                    target = %target.addr,
                    host = %target.host,
                    successes = streak.successes,
                    "target healthy again"
                );
            }
        }
        Err(reason) => {
            streak.successes = 0;
            streak.failures = streak.failures.saturating_add(1);
            tracing::debug!(upstream, target = %target.addr, %reason, "health probe failed");
            if healthy && streak.failures >= cfg.unhealthy_threshold.max(1) {
                target.active_healthy.store(false, Ordering::Relaxed);
                tracing::warn!(
                    upstream,
                    target = %target.addr,
                    host = %target.host,
                    failures = streak.failures,
                    %reason,
                    "target unhealthy"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DNS refresh

async fn dns_loop(upstream: Weak<Upstream>, period: Duration) {
    // The pool was resolved just before it started: the first refresh is one period away.
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (name, targets) = match upstream.upgrade() {
            Some(up) => (up.name.clone(), up.config.targets.clone()),
            None => return,
        };
        // Resolve without holding the pool, as for probes.
        let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, resolve(&targets)).await;
        let fresh = match resolved {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(e)) => {
                tracing::warn!(upstream = %name, error = %e, "DNS refresh failed; keeping current targets");
                continue;
            }
            Err(_) => {
                tracing::warn!(upstream = %name, "DNS refresh timed out; keeping current targets");
                continue;
            }
        };
        let Some(up) = upstream.upgrade() else {
            return;
        };
        apply_resolution(&up, fresh);
    }
}

/// Resolves the upstream's targets once and installs the result if it changed.
///
/// Returns whether the target set changed. Used by tests; the background loop does the same
/// without holding the pool during resolution.
#[cfg(test)]
async fn refresh_dns(up: &Upstream) -> Result<bool, String> {
    let fresh = resolve(&up.config.targets).await?;
    Ok(apply_resolution(up, fresh))
}

/// Installs a new resolution if its address set differs from the current one.
fn apply_resolution(up: &Upstream, fresh: Vec<Resolved>) -> bool {
    if fresh.is_empty() && !up.config.targets.is_empty() {
        tracing::warn!(upstream = %up.name, "DNS refresh returned no address; keeping current targets");
        return false;
    }
    let current = up.set.load();
    let Some(targets) = merge_targets(&current.targets, fresh) else {
        return false;
    };
    // Names for both generations: requests that picked a departing target just before the
    // swap may still open a TLS connection to it and need its name for SNI.
    let mut named = targets.clone();
    named.extend(
        current
            .targets
            .iter()
            .filter(|old| !targets.iter().any(|t| Arc::ptr_eq(t, old)))
            .cloned(),
    );
    up.client.set_server_names(&named);
    let balancer = lb::Balancer::new(&up.config.load_balancer, &targets);
    let addrs: Vec<String> = targets.iter().map(|t| t.addr.to_string()).collect();
    tracing::info!(upstream = %up.name, targets = ?addrs, "DNS refresh changed the target set");
    up.set.store(Arc::new(TargetSet { targets, balancer }));
    true
}

/// The new target list for `fresh`, reusing the `Arc<Target>` of every address that stays;
/// `None` when the address set is unchanged (order aside).
fn merge_targets(old: &[Arc<Target>], fresh: Vec<Resolved>) -> Option<Vec<Arc<Target>>> {
    let mut old_keys: Vec<Resolved> = old.iter().map(|t| Resolved::of(t)).collect();
    let mut new_keys = fresh.clone();
    old_keys.sort();
    new_keys.sort();
    if old_keys == new_keys {
        return None;
    }
    let mut reusable: HashMap<Resolved, Vec<Arc<Target>>> = HashMap::new();
    for t in old {
        reusable.entry(Resolved::of(t)).or_default().push(t.clone());
    }
    Some(
        fresh
            .into_iter()
            .map(|r| match reusable.get_mut(&r).and_then(Vec::pop) {
                Some(existing) => existing,
                None => r.into_target(),
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Passive health and latency

/// Records an attempt's outcome.
///
/// Latency feeds an exponentially weighted moving average with a fixed weight of 0.3 per new
/// sample (the last few responses dominate, one outlier moves it by less than a third). A fixed
/// weight rather than a time-decayed one keeps this a single atomic update; the price is that
/// an idle target's estimate does not age, which P2C tolerates because it compares in-flight
/// counts too. The first sample replaces the "unknown" zero outright.
///
/// A success resets the consecutive-failure count. A failure increments it; with passive
/// checking configured, reaching `consecutive_failures` ejects the target for
/// `ejection_time` and starts the count again, so after the ejection it gets a fresh budget.
pub fn record(target: &Target, passive: Option<&PassiveHealthCheck>, outcome: Outcome) {
    match outcome {
        Outcome::Success(latency) => {
            let sample = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
            // The closure always returns Some, so the update cannot fail.
            let _ = target
                .ewma_ns
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    if old == 0 {
                        return Some(sample);
                    }
                    let next = (u128::from(old) * (10 - EWMA_ALPHA_TENTHS)
                        + u128::from(sample) * EWMA_ALPHA_TENTHS)
                        / 10;
                    Some(u64::try_from(next).unwrap_or(u64::MAX).max(1))
                });
            target.consecutive_failures.store(0, Ordering::Relaxed);
        }
        Outcome::Failure => {
            let failures = target.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let Some(passive) = passive else {
                return;
            };
            if failures >= u64::from(passive.consecutive_failures.max(1)) {
                let now = u64::try_from(target.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let ejection = u64::try_from(passive.ejection_time.as_nanos()).unwrap_or(u64::MAX);
                // Never 0, which means "not ejected".
                let until = now.saturating_add(ejection).max(1);
                target.ejected_until.store(until, Ordering::Relaxed);
                target.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::warn!(
                    target = %target.addr,
                    host = %target.host,
                    failures,
                    ejection = ?passive.ejection_time,
                    "target ejected after consecutive failures"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;
    use crate::upstream::{SelectError, SelectInput};

    fn config(yaml: &str) -> UpstreamConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// Polls `cond` every 10 ms until it holds; fails after a generous deadline.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn select(up: &Upstream) -> Result<Arc<Target>, SelectError> {
        let headers = HeaderMap::new();
        let input = SelectInput {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            path: "/",
            headers: &headers,
        };
        up.select(&input, &[])
    }

    struct Server {
        addr: SocketAddr,
        healthy: Arc<AtomicBool>,
        hits: Arc<AtomicUsize>,
        host_ok: Arc<AtomicBool>,
    }

    /// An HTTP/1 server on 127.0.0.1:0 whose `/health` answers 200 or 503 as `healthy` says.
    async fn health_server() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicUsize::new(0));
        let host_ok = Arc::new(AtomicBool::new(false));
        let (h, n, ho) = (healthy.clone(), hits.clone(), host_ok.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, n, ho) = (h.clone(), n.clone(), ho.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            n.fetch_add(1, Ordering::SeqCst);
                            let want = addr.to_string();
                            if req.headers().get(http::header::HOST).map(|v| v.as_bytes())
                                == Some(want.as_bytes())
                            {
                                ho.store(true, Ordering::SeqCst);
                            }
                            let up = req.uri().path() == "/health" && h.load(Ordering::SeqCst);
                            let status = if up { 200 } else { 503 };
                            async move {
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server {
            addr,
            healthy,
            hits,
            host_ok,
        }
    }

    #[tokio::test]
    async fn active_check_flips_health_both_ways() {
        let server = health_server().await;
        let cfg = config(&format!(
            r#"
name: api
targets:
  - address: "{}"
health_check:
  active:
    path: /health
    interval: 50ms
    timeout: 2s
    healthy_threshold: 2
    unhealthy_threshold: 2
"#,
            server.addr
        ));
        let up = Upstream::build(&cfg).await.unwrap();
        up.start();
        let target = up.targets()[0].clone();
        assert!(select(&up).is_ok());

        wait_for("probes", || server.hits.load(Ordering::SeqCst) >= 2).await;
        assert!(target.is_healthy());
        assert!(server.host_ok.load(Ordering::SeqCst), "probe sends Host");

        server.healthy.store(false, Ordering::SeqCst);
        wait_for("unhealthy", || !target.is_healthy()).await;
        assert_eq!(select(&up).unwrap_err(), SelectError::NoHealthy);

        server.healthy.store(true, Ordering::SeqCst);
        wait_for("healthy again", || target.is_healthy()).await;
        assert!(Arc::ptr_eq(&select(&up).unwrap(), &target));

        // The task holds only a Weak: once the pool is gone, probes stop.
        let weak = Arc::downgrade(&up);
        drop(up);
        assert!(weak.upgrade().is_none());
        let mut last = server.hits.load(Ordering::SeqCst);
        let mut still = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while still < 5 {
            assert!(std::time::Instant::now() < deadline, "probes did not stop");
            tokio::time::sleep(Duration::from_millis(60)).await;
            let now = server.hits.load(Ordering::SeqCst);
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
    }

    #[tokio::test]
    async fn active_check_counts_refused_connections_and_timeouts() {
        // A port with nothing listening: bind, note the port, close.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // A listener that accepts and never answers: probes time out.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let cfg = config(&format!(
            r#"
name: api
targets:
  - address: "{closed}"
  - address: "{silent_addr}"
health_check:
  active:
    interval: 50ms
    timeout: 100ms
    unhealthy_threshold: 2
"#
        ));
        let up = Upstream::build(&cfg).await.unwrap();
        up.start();
        let ts = up.targets();
        wait_for("both unhealthy", || ts.iter().all(|t| !t.is_healthy())).await;
        assert_eq!(select(&up).unwrap_err(), SelectError::NoHealthy);
    }

    #[tokio::test]
    async fn passive_ejection_and_return() {
        let cfg = config(
            r#"
name: api
targets:
  - address: "127.0.0.1:9"
health_check:
  passive:
    consecutive_failures: 3
    ejection_time: 200ms
"#,
        );
        let up = Upstream::build(&cfg).await.unwrap();
        let t = select(&up).unwrap();

        // A success in between resets the count.
        up.begin(t.clone()).finish(Outcome::Failure);
        up.begin(t.clone()).finish(Outcome::Failure);
        up.begin(t.clone())
            .finish(Outcome::Success(Duration::from_millis(1)));
        up.begin(t.clone()).finish(Outcome::Failure);
        up.begin(t.clone()).finish(Outcome::Failure);
        assert!(t.is_available());
        assert_eq!(t.in_flight(), 0);

        up.begin(t.clone()).finish(Outcome::Failure);
        assert!(!t.is_available(), "ejected after 3 failures in a row");
        assert!(t.is_healthy(), "ejection is not active health");
        assert_eq!(select(&up).unwrap_err(), SelectError::NoHealthy);

        wait_for("ejection to end", || t.is_available()).await;
        assert!(select(&up).is_ok());
        // The count started again: one more failure does not eject.
        up.begin(t.clone()).finish(Outcome::Failure);
        assert!(t.is_available());
    }

    #[test]
    fn failures_without_passive_config_never_eject() {
        let t = Target::new(([127, 0, 0, 1], 1).into(), "h".into(), 1, 1);
        for _ in 0..100 {
            record(&t, None, Outcome::Failure);
        }
        assert!(t.is_available());
    }

    #[test]
    fn ewma_starts_at_first_sample_then_moves_by_alpha() {
        let t = Target::new(([127, 0, 0, 1], 1).into(), "h".into(), 1, 1);
        record(&t, None, Outcome::Success(Duration::from_millis(10)));
        assert_eq!(t.ewma_ns.load(Ordering::Relaxed), 10_000_000);
        record(&t, None, Outcome::Success(Duration::from_millis(20)));
        assert_eq!(t.ewma_ns.load(Ordering::Relaxed), 13_000_000);
        for _ in 0..40 {
            record(&t, None, Outcome::Success(Duration::from_millis(2)));
        }
        let e = t.ewma_ns.load(Ordering::Relaxed);
        assert!((2_000_000..2_100_000).contains(&e), "{e}");
        // Zero latency still counts as a known estimate.
        let z = Target::new(([127, 0, 0, 1], 1).into(), "h".into(), 1, 1);
        record(&z, None, Outcome::Success(Duration::ZERO));
        assert_eq!(z.ewma_ns.load(Ordering::Relaxed), 1);
    }

    fn resolved(ip: [u8; 4]) -> Resolved {
        Resolved {
            addr: (ip, 80).into(),
            host: "svc".into(),
            port: 80,
            weight: 1,
        }
    }

    #[test]
    fn merge_reuses_targets_that_stay() {
        let old: Vec<_> = [[10, 0, 0, 1], [10, 0, 0, 2]]
            .into_iter()
            .map(|ip| resolved(ip).into_target())
            .collect();
        // Same set in another order: unchanged.
        assert!(
            merge_targets(&old, vec![resolved([10, 0, 0, 2]), resolved([10, 0, 0, 1])]).is_none()
        );
        let new =
            merge_targets(&old, vec![resolved([10, 0, 0, 2]), resolved([10, 0, 0, 3])]).unwrap();
        assert_eq!(new.len(), 2);
        assert!(
            Arc::ptr_eq(&new[0], &old[1]),
            "kept address keeps its state"
        );
        assert_eq!(new[1].addr, SocketAddr::from(([10, 0, 0, 3], 80)));
        assert!(!old.iter().any(|o| Arc::ptr_eq(o, &new[1])));
    }

    #[tokio::test]
    async fn dns_refresh_with_localhost_keeps_state() {
        let cfg = config(
            r#"
name: api
targets:
  - address: "localhost:8081"
    weight: 3
dns_refresh: 50ms
load_balancer:
  algorithm: consistent_hash
  hash_on: client_ip
"#,
        );
        assert!(has_host_names(&cfg));
        let up = Upstream::build(&cfg).await.unwrap();
        let before = up.targets();
        assert!(!before.is_empty());
        assert!(
            before
                .iter()
                .all(|t| t.addr.ip().is_loopback() && t.host == "localhost")
        );
        before[0].in_flight.store(7, Ordering::Relaxed);
        before[0].ewma_ns.store(1234, Ordering::Relaxed);

        // The background loop runs too; it must never disturb an unchanged set.
        up.start();
        assert!(
            !refresh_dns(&up).await.unwrap(),
            "same addresses: no change"
        );
        let same = up.targets();
        assert_eq!(same.len(), before.len());
        assert!(same.iter().zip(&before).all(|(a, b)| Arc::ptr_eq(a, b)));

        // A changed resolution (an extra address) builds a new set reusing the old targets.
        let mut fresh: Vec<Resolved> = before.iter().map(|t| Resolved::of(t)).collect();
        fresh.push(Resolved {
            addr: ([127, 0, 0, 2], 8081).into(),
            host: "localhost".into(),
            port: 8081,
            weight: 3,
        });
        assert!(apply_resolution(&up, fresh));
        let grown = up.targets();
        assert_eq!(grown.len(), before.len() + 1);
        assert!(
            before
                .iter()
                .all(|b| grown.iter().any(|g| Arc::ptr_eq(g, b)))
        );
        assert!(select(&up).is_ok(), "new balancer matches the new set");

        // The next refresh goes back to what DNS says, still with the same Arcs and state.
        wait_for("refresh to drop the extra address", || {
            up.targets().len() == before.len()
        })
        .await;
        let after = up.targets();
        assert!(
            after
                .iter()
                .all(|a| before.iter().any(|b| Arc::ptr_eq(a, b)))
        );
        assert_eq!(before[0].in_flight(), 7);
        assert_eq!(before[0].ewma_ns.load(Ordering::Relaxed), 1234);
        before[0].in_flight.store(0, Ordering::Relaxed);
    }

    #[tokio::test]
    async fn ip_literals_need_no_refresh() {
        let cfg =
            config("name: api\ntargets:\n  - address: \"127.0.0.1:1\"\n  - address: \"[::1]:2\"\n");
        assert!(!has_host_names(&cfg));
        let up = Upstream::build(&cfg).await.unwrap();
        let hosts: Vec<_> = up.targets().iter().map(|t| t.authority()).collect();
        assert_eq!(hosts, vec!["127.0.0.1:1", "[::1]:2"]);
        // No runtime-less panic, no task for nothing to do.
        up.start();
    }

    #[test]
    fn spawn_without_runtime_does_not_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cfg = config(
            "name: api\ntargets:\n  - address: \"localhost:1\"\nhealth_check:\n  active: {}\n",
        );
        let up = rt.block_on(Upstream::build(&cfg)).unwrap();
        drop(rt);
        up.start();
        assert!(
            !up.started.load(Ordering::Relaxed),
            "a later start may still spawn"
        );
    }
}
