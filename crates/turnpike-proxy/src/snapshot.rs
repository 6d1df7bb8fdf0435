//! The compiled, immutable view of a configuration that requests run against.
//!
//! A request loads the current snapshot once and uses it to the end, so it never sees half
//! of a change. Compiling may fail (and then nothing changes); swapping cannot.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use turnpike_model::{
    Config, ConfigError, ConfigErrors, Limits, Timeouts, UpstreamConfig, UpstreamHost,
};

use crate::router::Router;
use crate::upstream::Upstream;

/// Everything a request needs, compiled once per configuration change.
pub struct Snapshot {
    /// Increases by one with every successful reload.
    pub version: u64,
    /// The route table.
    pub router: Router,
    /// Routes, indexed like the configuration's `routes`.
    pub routes: Vec<CompiledRoute>,
    /// Process-wide settings.
    pub settings: Settings,
    /// Consumers and subscriptions: the management store's, with the file's consumers.
    pub managed: Arc<turnpike_model::managed::Managed>,
    /// Policies of applications and plans (routes hold their own chains).
    pub policies: crate::policy::Policies,
    /// Every upstream pool by name, for policies that choose one per request
    /// (`traffic_split`, `mirror`, `fallback`).
    pub upstreams: HashMap<String, (Arc<Upstream>, Arc<RetryBudget>)>,
    /// Where the `cache` policy keeps responses (kept across reloads that leave the
    /// top-level `cache` section unchanged).
    pub cache: Arc<crate::cache::CacheStore>,
}

/// A route with its references resolved.
pub struct CompiledRoute {
    /// Route name.
    pub name: Arc<str>,
    /// Upstream pool.
    pub upstream: Arc<Upstream>,
    /// Retry budget of that upstream.
    pub budget: Arc<RetryBudget>,
    /// `Host` sent upstream.
    pub upstream_host: UpstreamHost,
    /// Effective timeouts (route override or upstream's).
    pub timeouts: Timeouts,
    /// Whether the route sets its own timeouts (else another upstream chosen by a policy
    /// brings its own).
    pub own_timeouts: bool,
    /// Effective body limit.
    pub max_body_bytes: u64,
    /// The managed service the route belongs to; `None` for routes from the file.
    pub service: Option<Arc<turnpike_model::managed::ServiceBinding>>,
    /// The route's policies.
    pub chain: crate::policy::Chain,
    /// The version of a versioned API the route serves.
    pub version: Option<Arc<crate::versioning::VersionFacts>>,
}

/// Process-wide request settings.
pub struct Settings {
    /// Peers trusted to set forwarding headers.
    pub trusted_proxies: Vec<IpNet>,
    /// The header of theirs that names the client.
    pub client_ip_header: turnpike_model::config::ClientIpHeader,
    /// Header carrying the request id.
    pub request_id_header: HeaderName,
    /// `Via` value we append, if any (`1.1 turnpike`).
    pub via: Option<HeaderValue>,
    /// Limits.
    pub limits: Limits,
}

impl Settings {
    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Keeps upstream pools alive across snapshots so health state, connection pools and
/// latency estimates survive a reload that does not change them.
#[derive(Default)]
pub struct UpstreamRegistry {
    pools: HashMap<String, (Arc<Upstream>, Arc<RetryBudget>)>,
    version: u64,
    policies: crate::policy::PolicyCache,
    cache: Option<Arc<crate::cache::CacheStore>>,
}

impl UpstreamRegistry {
    /// Compiles `config` into a snapshot. On success the registry keeps the new pools (and
    /// drops pools no longer used, which stops their background tasks); on failure it is
    /// unchanged.
    pub async fn compile(&mut self, config: &Config) -> Result<Snapshot, ConfigErrors> {
        turnpike_model::validate(config)?;
        let mut errors = Vec::new();

        let router = match Router::compile_versioned(&config.routes, &config.versioning) {
            Ok(r) => Some(r),
            Err(e) => {
                errors.extend(e);
                None
            }
        };

        let mut pools: HashMap<String, (Arc<Upstream>, Arc<RetryBudget>)> = HashMap::new();
        let mut fresh = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            match self.pools.get(&u.name) {
                Some((pool, budget)) if pool.config == *u => {
                    pools.insert(u.name.clone(), (pool.clone(), budget.clone()));
                }
                _ => match Upstream::build(u).await {
                    Ok(pool) => {
                        fresh.push(pool.clone());
                        pools.insert(u.name.clone(), (pool, Arc::new(RetryBudget::new(u))));
                    }
                    Err(e) => errors.push(ConfigError::at(format!("upstreams[{i}]"), e)),
                },
            }
        }

        let settings = compile_settings(config, &mut errors);
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let Some((upstream, budget)) = pools.get(&r.upstream) else {
                continue;
            };
            routes.push(CompiledRoute {
                name: Arc::from(r.name.as_str()),
                upstream: upstream.clone(),
                budget: budget.clone(),
                upstream_host: r.upstream_host.clone(),
                timeouts: r
                    .timeouts
                    .clone()
                    .unwrap_or_else(|| upstream.config.timeouts.clone()),
                own_timeouts: r.timeouts.is_some(),
                max_body_bytes: r
                    .max_body_bytes
                    .unwrap_or(config.server.limits.max_body_bytes),
                service: config.managed.routes.get(&r.name).cloned(),
                chain: crate::policy::Chain::default(),
                version: crate::versioning::VersionFacts::of(r, &config.versioning),
            });
        }

        let managed = crate::policy::merged_consumers(config, &mut errors);
        let names: Vec<(&str, Option<&str>)> = routes
            .iter()
            .map(|r| (&*r.name, r.service.as_deref().map(|s| &*s.id)))
            .collect();
        let mut policies = self
            .policies
            .compile(config, &names, &managed, &mut errors)
            .await;
        for (route, chain) in routes.iter_mut().zip(std::mem::take(&mut policies.chains)) {
            if let Some(max) = chain.max_body_bytes() {
                route.max_body_bytes = route.max_body_bytes.min(max);
            }
            route.chain = chain;
        }

        let cache = match &self.cache {
            Some(c) if *c.config() == config.cache => Some(Arc::clone(c)),
            _ => match crate::cache::CacheStore::new(&config.cache) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(ConfigError::at("cache.redis.url", e));
                    None
                }
            },
        };

        let (Some(router), Some(settings), Some(cache)) = (router, settings, cache) else {
            return Err(ConfigErrors(errors));
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        for pool in fresh {
            pool.start();
        }
        self.pools = pools.clone();
        self.cache = Some(Arc::clone(&cache));
        self.version += 1;
        Ok(Snapshot {
            version: self.version,
            router,
            routes,
            settings,
            managed,
            policies,
            upstreams: pools,
            cache,
        })
    }
}

fn compile_settings(config: &Config, errors: &mut Vec<ConfigError>) -> Option<Settings> {
    let s = &config.server;
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .filter_map(|c| turnpike_model::parse_cidr(c))
        .collect::<Vec<_>>();
    let request_id_header = match HeaderName::from_bytes(s.request_id_header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            errors.push(ConfigError::at(
                "server.request_id_header",
                "not a valid header name",
            ));
            return None;
        }
    };
    let via = if s.via.is_empty() {
        None
    } else {
        match HeaderValue::from_str(&format!("1.1 {}", s.via)) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(ConfigError::at("server.via", "not a valid header value"));
                return None;
            }
        }
    };
    Some(Settings {
        trusted_proxies,
        client_ip_header: s.client_ip_header,
        request_id_header,
        via,
        limits: s.limits.clone(),
    })
}

/// Caps retries to a fraction of an upstream's traffic so retries cannot multiply load on an
/// upstream that is already failing.
///
/// Counts requests and retries in the current one-second window; a retry is allowed while
/// `retries < max(min_per_sec, ratio × requests)`. Coarse, lock-free and good enough to stop
/// retry storms; it is not a precise rate.
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u64,
    start: Instant,
    /// Window number (seconds since `start`) in the high 24 bits; requests in the low 40 bits.
    requests: AtomicU64,
    retries: AtomicU64,
    retries_window: AtomicU64,
}

impl RetryBudget {
    /// The budget configured for `u`.
    pub fn new(u: &UpstreamConfig) -> Self {
        Self {
            ratio: u.retries.budget_ratio,
            min_per_sec: u64::from(u.retries.budget_min_per_sec),
            start: Instant::now(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            retries_window: AtomicU64::new(0),
        }
    }

    fn window(&self) -> u64 {
        self.start.elapsed().as_secs() & 0xFF_FFFF
    }

    /// Counts one request.
    pub fn record_request(&self) {
        let w = self.window();
        let cur = self.requests.load(Ordering::Relaxed);
        if cur >> 40 != w {
            // A new window: the first request to notice resets the counters. A race may
            // lose a few counts, which the budget tolerates.
            self.requests.store((w << 40) | 1, Ordering::Relaxed);
        } else {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a retry from the budget if one is left.
    pub fn try_retry(&self) -> bool {
        let w = self.window();
        if self.retries_window.swap(w, Ordering::Relaxed) != w {
            self.retries.store(0, Ordering::Relaxed);
        }
        let req = self.requests.load(Ordering::Relaxed);
        let requests = if req >> 40 == w {
            req & 0xFF_FFFF_FFFF
        } else {
            0
        };
        let allowed = self.min_per_sec.max((self.ratio * requests as f64) as u64);
        let used = self.retries.fetch_add(1, Ordering::Relaxed);
        if used < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

/// Backoff before retry number `n` (0-based): exponential with full jitter, capped.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let nanos = exp.as_nanos() as u64;
    if nanos == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(fastrand::u64(nanos / 2..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_min_then_ratio() {
        let mut u: UpstreamConfig = serde_json::from_value(
            serde_json::json!({"name":"u","targets":[{"address":"127.0.0.1:1"}]}),
        )
        .unwrap();
        u.retries.budget_min_per_sec = 2;
        u.retries.budget_ratio = 0.5;
        let b = RetryBudget::new(&u);
        assert!(b.try_retry());
        assert!(b.try_retry());
        assert!(!b.try_retry(), "min_per_sec exhausted with no traffic");
        for _ in 0..10 {
            b.record_request();
        }
        // 0.5 × 10 = 5 retries in this window, 2 already used.
        let granted = (0..10).filter(|_| b.try_retry()).count();
        // Allow for the window rolling over mid-test on a slow machine.
        assert!((2..=5).contains(&granted), "granted {granted}");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        for n in 0..20 {
            let d = backoff(base, max, n);
            assert!(d <= max);
        }
        let d0 = backoff(base, max, 0);
        assert!(d0 >= Duration::from_millis(5) && d0 <= base);
    }
}
