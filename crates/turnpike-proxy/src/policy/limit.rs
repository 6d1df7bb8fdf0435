//! The `rate_limit` policy: keys requests, asks the limiters (local or Redis), and answers
//! 429 with `Retry-After`, or delays a throttled request, or lets it through. Every answer
//! carries `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers): the
//! policy lists each limit as `"name";q=<requests>;w=<seconds>`, and `RateLimit` reports
//! the limit closest to exhaustion as `"name";r=<remaining>;t=<seconds to reset>`.
//!
//! All the local limits of one stage of a request are decided together, all or nothing (a
//! refused request consumes nothing of them); so are all the limits of one Redis policy, in
//! one round trip. Redis policies are asked first, and a refusal there stops the request
//! before any local limit is charged. Limits of the early stage (before authentication) are
//! charged even when a later stage refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::Digest;
use turnpike_model::policy::{RateLimitAlgorithm, RateLimitConfig, RateLimitKey, RateLimitMode};

use super::ratelimit::{Algorithm, Decision, Limit, LocalLimiter, RedisLimiter};
use super::{Compiled, Identity, Policy, Request};
use crate::error::{ErrorKind, GatewayError};

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `rate_limit`, compiled.
pub struct RateLimit {
    config: RateLimitConfig,
    /// Item names for the headers, one per limit.
    names: Vec<String>,
    limits: Vec<Limit>,
    store: Store,
    /// `RateLimit-Policy` items, pre-rendered.
    policy_items: Vec<String>,
    /// Prefix of this policy's keys, so two policies never share counters.
    key_prefix: String,
}

enum Store {
    Local(Vec<LocalLimiter>),
    Redis(RedisLimiter),
}

impl RateLimit {
    /// Compiles the policy `name` attached at `scope` (names are unique per scope only); in
    /// Redis mode this creates the (lazily connecting) client.
    pub async fn new(
        name: &str,
        scope: &str,
        config: RateLimitConfig,
    ) -> Result<Self, (String, String)> {
        let limits: Vec<Limit> = config
            .limits
            .iter()
            .map(|l| {
                Limit::new(
                    l.requests,
                    l.per,
                    match l.algorithm {
                        RateLimitAlgorithm::FixedWindow => Algorithm::FixedWindow,
                        RateLimitAlgorithm::SlidingWindow => Algorithm::SlidingWindow,
                        RateLimitAlgorithm::TokenBucket => Algorithm::TokenBucket,
                        RateLimitAlgorithm::LeakyBucket => Algorithm::LeakyBucket,
                    },
                )
                .with_max_delay(l.max_delay)
            })
            .collect();
        let token: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let names: Vec<String> = (0..limits.len())
            .map(|i| {
                if limits.len() == 1 {
                    token.clone()
                } else {
                    format!("{token}-{i}")
                }
            })
            .collect();
        let policy_items = names
            .iter()
            .zip(&limits)
            .map(|(n, l)| format!("\"{n}\";q={};w={}", l.requests, l.window.as_secs().max(1)))
            .collect();
        let store = match config.mode {
            RateLimitMode::Local => Store::Local(
                limits
                    .iter()
                    .map(|l| LocalLimiter::new(*l, config.max_keys))
                    .collect(),
            ),
            RateLimitMode::Redis => Store::Redis(
                RedisLimiter::connect(
                    &config.redis.url,
                    &config.redis.prefix,
                    config.redis.timeout,
                )
                .await
                .map_err(|e| ("redis.url".to_owned(), e.to_string()))?,
            ),
        };
        Ok(Self {
            key_prefix: format!("{name}\u{1f}{scope}\u{1f}"),
            config,
            names,
            limits,
            store,
            policy_items,
        })
    }

    /// The counting key of a request.
    fn key(&self, req: &Request<'_>, identity: &Identity, headers: &HeaderMap) -> String {
        // An IPv6 client usually holds a whole /64: count it as one.
        let ip = || match req.client_ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            v4 => format!("ip:{v4}"),
        };
        let k = match &self.config.key {
            RateLimitKey::Ip => ip(),
            RateLimitKey::Application => identity
                .consumer
                .as_ref()
                .filter(|_| !identity.anonymous)
                .map_or_else(ip, |c| format!("app:{}", c.id)),
            RateLimitKey::Credential => identity
                .credential
                .as_ref()
                .map_or_else(ip, |c| format!("cred:{c}")),
            RateLimitKey::Header { name } => format!(
                "h:{}",
                headers
                    .get(name.as_str())
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default()
            ),
            RateLimitKey::Route => format!("route:{}", req.route),
            RateLimitKey::Service => match req.service {
                Some(s) => format!("service:{s}"),
                None => format!("route:{}", req.route),
            },
            RateLimitKey::Team => identity
                .consumer
                .as_ref()
                .filter(|c| !identity.anonymous && !c.team.is_empty())
                .map_or_else(ip, |c| format!("team:{}", c.team)),
            RateLimitKey::Global => "all".to_owned(),
        };
        // Client-chosen parts (a header's value) could make keys, and the memory or Redis
        // space they take, as large as a header: long keys are replaced by their digest.
        if k.len() > 128 {
            return format!(
                "{}sha256:{}",
                self.key_prefix,
                hex::encode(sha2::Sha256::digest(k.as_bytes()))
            );
        }
        format!("{}{k}", self.key_prefix)
    }
}

/// Checks a Redis URL without connecting.
pub fn check_redis_url(url: &str) -> Result<(), (String, String)> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| ("redis.url".to_owned(), e.to_string()))
}

/// Whether a limit counts by the caller's identity, and so must run after authentication.
pub fn identity_keyed(c: &Compiled) -> bool {
    match &c.policy {
        Policy::RateLimit(rl) => matches!(
            rl.config.key,
            RateLimitKey::Application | RateLimitKey::Credential | RateLimitKey::Team
        ),
        _ => false,
    }
}

/// Runs `policies` (all `rate_limit`) for a request.
pub async fn enforce(
    policies: &[Arc<Compiled>],
    req: &Request<'_>,
    identity: &Identity,
    headers: &HeaderMap,
    out: &mut HeaderMap,
) -> Result<(), GatewayError> {
    // (policy, limit index, decision)
    let mut outcomes: Vec<(&RateLimit, usize, Decision)> = Vec::new();
    let mut local: Vec<(&LocalLimiter, String, &RateLimit, usize)> = Vec::new();
    for p in policies {
        let Policy::RateLimit(rl) = &p.policy else {
            continue;
        };
        let key = rl.key(req, identity, headers);
        match &rl.store {
            Store::Local(limiters) => {
                for (i, l) in limiters.iter().enumerate() {
                    local.push((l, key.clone(), rl, i));
                }
            }
            Store::Redis(redis) => {
                let checks: Vec<(&str, &Limit)> =
                    rl.limits.iter().map(|l| (key.as_str(), l)).collect();
                match redis.check_all(&checks).await {
                    Ok(decisions) => {
                        outcomes.extend(decisions.into_iter().enumerate().map(|(i, d)| (rl, i, d)));
                        if outcomes.iter().any(|(_, _, d)| !d.is_allowed()) {
                            // Refused already: consume nothing more.
                            local.clear();
                            break;
                        }
                    }
                    Err(e) if rl.config.redis.fail_open => {
                        tracing::warn!(error = %e, "rate limit: Redis unavailable; failing open");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rate limit: Redis unavailable; failing closed");
                        return Err(GatewayError::new(
                            ErrorKind::RateLimiterUnavailable,
                            "the rate limiter is unavailable",
                        ));
                    }
                }
            }
        }
    }
    if !local.is_empty() {
        let checks: Vec<(&LocalLimiter, &str)> =
            local.iter().map(|(l, k, _, _)| (*l, k.as_str())).collect();
        let decisions = LocalLimiter::check_all(&checks, Instant::now());
        outcomes.extend(
            local
                .iter()
                .zip(decisions)
                .map(|((_, _, rl, i), d)| (*rl, *i, d)),
        );
    }
    if outcomes.is_empty() {
        return Ok(());
    }

    let denied = outcomes
        .iter()
        .filter_map(|(_, _, d)| match d {
            Decision::Deny { retry_after, .. } => Some(*retry_after),
            _ => None,
        })
        .max();
    if outcomes.iter().any(|(rl, _, _)| rl.config.headers) {
        write_headers(&outcomes, out);
    }
    if let Some(retry_after) = denied {
        out.insert(
            header::RETRY_AFTER,
            HeaderValue::from(ceil_secs(retry_after)),
        );
        return Err(GatewayError::new(
            ErrorKind::RateLimited,
            "rate limit exceeded; retry later",
        ));
    }
    let wait = outcomes
        .iter()
        .filter_map(|(_, _, d)| match d {
            Decision::Delay { wait, .. } => Some(*wait),
            _ => None,
        })
        .max();
    if let Some(wait) = wait.filter(|w| !w.is_zero()) {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

/// Writes `RateLimit-Policy` and `RateLimit`, adding to what an earlier stage of the same
/// request wrote: the policy lists every limit, `RateLimit` the one closest to exhaustion.
fn write_headers(outcomes: &[(&RateLimit, usize, Decision)], out: &mut HeaderMap) {
    let shown: Vec<&(&RateLimit, usize, Decision)> = outcomes
        .iter()
        .filter(|(rl, _, _)| rl.config.headers)
        .collect();
    let mut items: Vec<&str> = out
        .get(&RATELIMIT_POLICY)
        .and_then(|v| v.to_str().ok())
        .into_iter()
        .collect();
    items.extend(shown.iter().map(|(rl, i, _)| rl.policy_items[*i].as_str()));
    let policy = items.join(", ");
    // What an earlier stage reported as remaining, to keep the smaller.
    let earlier: Option<u64> = out
        .get(&RATELIMIT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("r=")))
        .and_then(|r| r.parse().ok());
    if let Ok(v) = HeaderValue::from_str(&policy) {
        out.insert(RATELIMIT_POLICY.clone(), v);
    }
    // The limit closest to exhaustion: a refusal first, else the fewest remaining.
    let closest = shown
        .iter()
        .min_by_key(|(_, _, d)| (d.is_allowed(), d.remaining()));
    if let Some((rl, i, d)) = closest
        && earlier.is_none_or(|e| d.remaining() <= e || !d.is_allowed())
    {
        let value = format!(
            "\"{}\";r={};t={}",
            rl.names[*i],
            d.remaining(),
            ceil_secs(d.reset())
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert(RATELIMIT.clone(), v);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
