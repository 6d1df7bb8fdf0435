//! Configuration of the policies that shape responses: today the response cache.
//!
//! The `cache` policy is attached like any other (globally, to a service or a route) and
//! runs in [`crate::policy::Stage::Upstream`], after every access check: a cached answer is
//! still only given to callers the route lets in, and still counts against their limits.
//! Where entries live (the memory tier's size, the shared Redis tier) is process-wide, in the
//! top-level `cache` section ([`CacheStoreConfig`]).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which query parameters are part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueryKey {
    /// Every parameter, in a canonical order (`?b=2&a=1` and `?a=1&b=2` share an entry).
    #[default]
    All,
    /// None: the query is removed from the request sent upstream, so it cannot change the
    /// response.
    None,
    /// Only these parameters; the others are removed from the request sent upstream.
    Only(Vec<String>),
}

/// What the cache key is made of besides method, scheme, host, port, path, the route and the
/// upstream pool (always part of it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheKeyConfig {
    /// Query parameters: `all` (the default), `none`, or `{only: [names]}`.
    #[serde(default)]
    pub query: QueryKey,
    /// Request headers that are part of the key (and so are forwarded upstream).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Whether the calling application is part of the key: each application gets its own
    /// entries, and the upstream sees who is calling.
    #[serde(default)]
    pub application: bool,
}

/// `cache`: store upstream responses and answer from them, with HTTP caching semantics
/// (RFC 9111): `Cache-Control`, `Expires`, `Age`, `Vary`, validation with `ETag` and
/// `Last-Modified`, `stale-while-revalidate` and `stale-if-error` (RFC 5861).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Freshness override: a storable response is fresh this long whatever its
    /// `Cache-Control` and `Expires` say. `no-store`, `private` and `Set-Cookie` still keep it
    /// out of the cache.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub ttl: Option<Duration>,
    /// Freshness of a response that gives none (no `max-age`, `s-maxage` or `Expires`).
    /// Unset (the default): such a response is not stored, so a dynamic page never is.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub default_ttl: Option<Duration>,
    /// Response statuses that may be stored.
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
    /// What the key is made of.
    #[serde(default)]
    pub key: CacheKeyConfig,
    /// How long a stale entry may be served while it is refreshed in the background, when
    /// the response does not say (`stale-while-revalidate`).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stale_while_revalidate: Duration,
    /// How long a stale entry may be served when the upstream fails (cannot be reached,
    /// times out or answers 5xx), when the response does not say (`stale-if-error`).
    #[serde(default = "default_stale_if_error", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stale_if_error: Duration,
    /// Largest response body stored; a larger one is streamed to the client and not kept.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Response header whose comma-separated values tag the entry, for purges by tag.
    #[serde(default = "default_tag_header")]
    pub tag_header: String,
    /// How long requests for an entry being fetched wait for that fetch before going to the
    /// upstream themselves.
    #[serde(default = "default_lock_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lock_timeout: Duration,
    /// Honour the client's `Cache-Control: no-cache` / `max-age=0` by revalidating with the
    /// upstream (default true). `false`: clients cannot force upstream calls.
    #[serde(default = "yes")]
    pub honor_request_no_cache: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: None,
            default_ttl: None,
            statuses: default_statuses(),
            key: CacheKeyConfig::default(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: default_stale_if_error(),
            max_object_bytes: default_max_object_bytes(),
            tag_header: default_tag_header(),
            lock_timeout: default_lock_timeout(),
            honor_request_no_cache: true,
        }
    }
}

/// The statuses RFC 9110 (§15.1) calls heuristically cacheable.
fn default_statuses() -> Vec<u16> {
    vec![200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]
}
fn default_stale_if_error() -> Duration {
    Duration::from_secs(300)
}
fn default_max_object_bytes() -> u64 {
    8 << 20
}
fn default_tag_header() -> String {
    "cache-tag".into()
}
fn default_lock_timeout() -> Duration {
    Duration::from_secs(5)
}
fn yes() -> bool {
    true
}

impl CacheConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        for (i, s) in self.statuses.iter().enumerate() {
            if !(200..=599).contains(s) {
                return Err((
                    format!("statuses[{i}]"),
                    format!("{s} is not a final status"),
                ));
            }
        }
        for (i, h) in self.key.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err((
                    format!("key.headers[{i}]"),
                    format!("`{h}` is not a valid header name"),
                ));
            }
        }
        if let QueryKey::Only(names) = &self.key.query {
            if let Some(i) = names.iter().position(String::is_empty) {
                return Err((format!("key.query.only[{i}]"), "must not be empty".into()));
            }
        }
        if http::HeaderName::from_bytes(self.tag_header.as_bytes()).is_err() {
            return Err(("tag_header".into(), "not a valid header name".into()));
        }
        if self.max_object_bytes == 0 {
            return Err(("max_object_bytes".into(), "must be at least 1".into()));
        }
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err((
                "ttl".into(),
                "must be longer than 0 (leave it out to follow the upstream)".into(),
            ));
        }
        Ok(())
    }
}

/// The top-level `cache` section: where the `cache` policy keeps its entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheStoreConfig {
    /// Bytes the memory tier may hold (bodies, headers and keys). When full, entries are
    /// evicted by a scan-resistant policy that keeps what is asked for often.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// A shared tier in Redis, for clusters: entries one node stores are hits on the others,
    /// and purges reach every node. Unset: memory only.
    #[serde(default)]
    pub redis: Option<CacheRedisConfig>,
}

impl Default for CacheStoreConfig {
    fn default() -> Self {
        Self {
            memory_bytes: default_memory_bytes(),
            redis: None,
        }
    }
}

fn default_memory_bytes() -> u64 {
    64 << 20
}

/// The shared Redis tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheRedisConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of the keys (and of the purge channel).
    #[serde(default = "default_cache_prefix")]
    pub prefix: String,
    /// How long a Redis call may take; past it the tier is skipped for that request (a
    /// lookup is a miss, a store is dropped). The cache never fails a request for Redis.
    #[serde(default = "default_cache_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_cache_prefix() -> String {
    "turnpike:cache:".into()
}
fn default_cache_timeout() -> Duration {
    Duration::from_millis(100)
}

impl CacheStoreConfig {
    /// Checks values serde cannot; the path is relative to the `cache` section.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.memory_bytes == 0 {
            return Err(("memory_bytes".into(), "must be at least 1".into()));
        }
        if let Some(r) = &self.redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
                return Err((
                    "redis.url".into(),
                    format!("`{}` is not a redis:// or rediss:// URL", r.url),
                ));
            }
            if r.timeout.is_zero() {
                return Err(("redis.timeout".into(), "must be longer than 0".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn defaults_and_key_forms_parse() {
        let c: CacheConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(c, CacheConfig::default());
        let c: CacheConfig = serde_json::from_value(serde_json::json!({
            "ttl": "30s",
            "key": {"query": {"only": ["page"]}, "headers": ["accept-language"]},
        }))
        .unwrap();
        assert_eq!(c.ttl, Some(Duration::from_secs(30)));
        assert_eq!(c.key.query, QueryKey::Only(vec!["page".into()]));
        let c: CacheConfig =
            serde_json::from_value(serde_json::json!({"key": {"query": "none"}})).unwrap();
        assert_eq!(c.key.query, QueryKey::None);
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = |v: serde_json::Value| {
            let c: CacheConfig = serde_json::from_value(v).unwrap();
            c.check().unwrap_err().0
        };
        assert_eq!(
            bad(serde_json::json!({"statuses": [200, 99]})),
            "statuses[1]"
        );
        assert_eq!(
            bad(serde_json::json!({"key": {"headers": ["bad header"]}})),
            "key.headers[0]"
        );
        assert_eq!(bad(serde_json::json!({"ttl": "0s"})), "ttl");
        let s = CacheStoreConfig {
            redis: Some(CacheRedisConfig {
                url: "localhost:6379".into(),
                prefix: default_cache_prefix(),
                timeout: default_cache_timeout(),
            }),
            ..CacheStoreConfig::default()
        };
        assert_eq!(s.check().unwrap_err().0, "redis.url");
    }
}
