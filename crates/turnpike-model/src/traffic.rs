//! Configuration of the policies that shape the call to the upstream: circuit breaker,
//! bulkhead, fallback, fault injection, traffic split (canary, A/B) and mirroring.
//!
//! They run in [`crate::policy::Stage::Upstream`], after every access check, so a request
//! refused by authentication or a rate limit never counts against a breaker or takes a
//! bulkhead slot.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Predicate;

/// What a circuit breaker watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPer {
    /// One breaker for the route: when it opens, the route answers without calling upstream.
    #[default]
    Route,
    /// One breaker per upstream target: an open target is skipped by the load balancer, and
    /// the route fails only when every target is open.
    Target,
}

/// `circuit_breaker`: stop calling an upstream that keeps failing, then probe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// One breaker per route or per upstream target.
    #[serde(default)]
    pub per: BreakerPer,
    /// Opens after this many failures in a row. Default 5 when `error_ratio` is not set.
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    /// Opens when the share of failures over `window` reaches this (0 < ratio ≤ 1), once at
    /// least `min_requests` were seen in the window.
    #[serde(default)]
    pub error_ratio: Option<f64>,
    /// Requests the window must hold before `error_ratio` applies.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Length of the sliding window for `error_ratio`.
    #[serde(default = "default_window", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// How long the breaker stays open before letting probes through (half-open).
    #[serde(default = "default_open_for", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub open_for: Duration,
    /// Probes let through at once while half-open; this many successes in a row close the
    /// breaker, one failure opens it again.
    #[serde(default = "default_probes")]
    pub half_open_requests: u32,
    /// Upstream statuses that count as failures (connect errors and timeouts always do).
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
}

fn default_min_requests() -> u32 {
    20
}
fn default_window() -> Duration {
    Duration::from_secs(10)
}
fn default_open_for() -> Duration {
    Duration::from_secs(30)
}
fn default_probes() -> u32 {
    1
}
fn default_failure_statuses() -> Vec<u16> {
    vec![500, 502, 503, 504]
}

/// What a bulkhead bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BulkheadPer {
    /// Concurrent requests on the route.
    #[default]
    Route,
    /// Concurrent requests to the route's upstream, across all routes this policy covers.
    Upstream,
}

/// `bulkhead`: at most `max_concurrent` requests at once, with a bounded wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Per route or per upstream.
    #[serde(default)]
    pub per: BulkheadPer,
    /// Requests in flight at once (until their response body ends).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Requests that may wait for a slot; past it, refused at once.
    #[serde(default)]
    pub max_queue: u32,
    /// How long a queued request waits before it is refused.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub queue_timeout: Duration,
}

fn default_max_concurrent() -> u32 {
    100
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

/// When a fallback answers instead of the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FallbackTrigger {
    /// The circuit breaker is open.
    CircuitOpen,
    /// The bulkhead is full.
    BulkheadFull,
    /// No upstream target is healthy.
    NoHealthyUpstream,
    /// The upstream could not be reached.
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream is at its request limit.
    UpstreamOverloaded,
}

/// A static fallback response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticResponse {
    /// Status code.
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// `Content-Type`.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Body.
    #[serde(default)]
    pub body: String,
    /// Extra response headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn default_fallback_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "application/json".into()
}

/// `fallback`: what the client gets when the call cannot be made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The failures it covers.
    #[serde(default = "default_triggers")]
    pub on: Vec<FallbackTrigger>,
    /// A fixed response, or ...
    #[serde(default)]
    pub response: Option<StaticResponse>,
    /// ... another upstream (by name) to send the request to, once, when the request body
    /// has not been sent yet.
    #[serde(default)]
    pub upstream: Option<String>,
}

fn default_triggers() -> Vec<FallbackTrigger> {
    vec![FallbackTrigger::CircuitOpen, FallbackTrigger::BulkheadFull]
}

/// A delay fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DelayFault {
    /// How long.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub duration: Duration,
    /// Share of requests delayed, 0–100.
    pub percent: f64,
}

/// An abort fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortFault {
    /// Status answered.
    #[serde(default = "default_abort_status")]
    pub status: u16,
    /// Share of requests aborted, 0–100.
    pub percent: f64,
}

fn default_abort_status() -> u16 {
    503
}

/// `fault_injection`: delay or fail a share of requests before they reach the upstream,
/// for resilience testing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultInjectionConfig {
    /// Delay a share of requests.
    #[serde(default)]
    pub delay: Option<DelayFault>,
    /// Answer a share of requests with an error status instead of calling upstream.
    #[serde(default)]
    pub abort: Option<AbortFault>,
    /// Only requests carrying this header are eligible (keeps faults to test traffic).
    #[serde(default)]
    pub only_with_header: Option<String>,
}

/// One upstream of a weighted split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedUpstream {
    /// Upstream by name.
    pub upstream: String,
    /// Relative weight (0 takes no traffic).
    pub weight: u32,
}

/// An A/B rule: requests matching every predicate go to `upstream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// Header predicates.
    #[serde(default)]
    pub headers: Vec<Predicate>,
    /// Query predicates.
    #[serde(default)]
    pub query: Vec<Predicate>,
    /// Cookie predicates.
    #[serde(default)]
    pub cookies: Vec<Predicate>,
    /// Upstream by name.
    pub upstream: String,
}

/// What keeps a client on one side of a weighted split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "by", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sticky {
    /// The client IP.
    Ip,
    /// A header's value (requests without it are split at random).
    Header {
        /// Header name.
        name: String,
    },
    /// A cookie's value (requests without it are split at random).
    Cookie {
        /// Cookie name.
        name: String,
    },
}

/// `traffic_split`: choose the upstream per request. Rules (A/B) are tried first, in order;
/// otherwise the weighted split (canary, blue/green) decides; with neither, the route's
/// upstream serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitConfig {
    /// A/B rules, first match wins.
    #[serde(default)]
    pub rules: Vec<SplitRule>,
    /// Weighted upstreams for requests no rule matched.
    #[serde(default)]
    pub weighted: Vec<WeightedUpstream>,
    /// Keep a client on the same side by hashing this instead of choosing at random.
    #[serde(default)]
    pub sticky: Option<Sticky>,
}

/// `mirror`: send a copy of requests to a shadow upstream and discard its answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Shadow upstream by name.
    pub upstream: String,
    /// Share of requests mirrored, 0–100.
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// Mirrored requests in flight at once; past it, copies are dropped (and counted).
    #[serde(default = "default_mirror_in_flight")]
    pub max_in_flight: u32,
    /// How long a mirrored request may take.
    #[serde(default = "default_mirror_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Request bodies larger than this are not mirrored (the copy is abandoned).
    #[serde(default = "default_mirror_body")]
    pub max_body_bytes: u64,
}

fn default_percent() -> f64 {
    100.0
}
fn default_mirror_in_flight() -> u32 {
    64
}
fn default_mirror_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_mirror_body() -> u64 {
    1024 * 1024
}

fn check_percent(field: &str, p: f64) -> Result<(), (String, String)> {
    if !(0.0..=100.0).contains(&p) {
        return Err((field.into(), "must be between 0 and 100".into()));
    }
    Ok(())
}

fn check_status(field: &str, s: u16) -> Result<(), (String, String)> {
    if !(100..=599).contains(&s) {
        return Err((field.into(), "not an HTTP status code".into()));
    }
    Ok(())
}

impl CircuitBreakerConfig {
    /// Failures in a row that open the breaker, if that rule applies.
    pub fn consecutive(&self) -> Option<u32> {
        match (self.consecutive_failures, self.error_ratio) {
            (Some(n), _) => Some(n),
            (None, None) => Some(5),
            (None, Some(_)) => None,
        }
    }

    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.consecutive_failures == Some(0) {
            return Err(("consecutive_failures".into(), "must be at least 1".into()));
        }
        if let Some(r) = self.error_ratio
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(("error_ratio".into(), "must be in (0, 1]".into()));
        }
        if self.window.is_zero() {
            return Err(("window".into(), "must be longer than 0".into()));
        }
        if self.half_open_requests == 0 {
            return Err(("half_open_requests".into(), "must be at least 1".into()));
        }
        for (i, s) in self.failure_statuses.iter().enumerate() {
            check_status(&format!("failure_statuses[{i}]"), *s)?;
        }
        Ok(())
    }
}

impl BulkheadConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.max_concurrent == 0 {
            return Err(("max_concurrent".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

impl FallbackConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        match (&self.response, &self.upstream) {
            (Some(r), None) => {
                check_status("response.status", r.status)?;
                if http::HeaderValue::from_str(&r.content_type).is_err() {
                    return Err(("response.content_type".into(), "not a header value".into()));
                }
                for (k, v) in &r.headers {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                        || http::HeaderValue::from_str(v).is_err()
                    {
                        return Err((format!("response.headers.{k}"), "not a valid header".into()));
                    }
                }
            }
            (None, Some(u)) if !u.is_empty() => {}
            _ => {
                return Err((
                    String::new(),
                    "give exactly one of `response` or `upstream`".into(),
                ));
            }
        }
        if self.on.is_empty() {
            return Err(("on".into(), "name at least one failure".into()));
        }
        Ok(())
    }
}

impl FaultInjectionConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err((String::new(), "give `delay`, `abort` or both".into()));
        }
        if let Some(d) = &self.delay {
            check_percent("delay.percent", d.percent)?;
        }
        if let Some(a) = &self.abort {
            check_percent("abort.percent", a.percent)?;
            check_status("abort.status", a.status)?;
        }
        if let Some(h) = &self.only_with_header
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err(("only_with_header".into(), "not a valid header name".into()));
        }
        Ok(())
    }
}

impl TrafficSplitConfig {
    /// Every upstream it names, with the field path of each.
    pub fn upstreams(&self) -> Vec<(String, &str)> {
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("rules[{i}].upstream"), r.upstream.as_str()));
        let weighted = self
            .weighted
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("weighted[{i}].upstream"), w.upstream.as_str()));
        rules.chain(weighted).collect()
    }

    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.rules.is_empty() && self.weighted.is_empty() {
            return Err((String::new(), "give `rules`, `weighted` or both".into()));
        }
        if !self.weighted.is_empty() && self.weighted.iter().all(|w| w.weight == 0) {
            return Err((
                "weighted".into(),
                "at least one weight must be above 0".into(),
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.headers.is_empty() && r.query.is_empty() && r.cookies.is_empty() {
                return Err((
                    format!("rules[{i}]"),
                    "give at least one header, query or cookie predicate".into(),
                ));
            }
        }
        match &self.sticky {
            Some(Sticky::Header { name })
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() =>
            {
                Err(("sticky.name".into(), "not a valid header name".into()))
            }
            Some(Sticky::Cookie { name }) if name.is_empty() => {
                Err(("sticky.name".into(), "must not be empty".into()))
            }
            _ => Ok(()),
        }
    }
}

impl MirrorConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        check_percent("percent", self.percent)?;
        if self.upstream.is_empty() {
            return Err(("upstream".into(), "must not be empty".into()));
        }
        if self.max_in_flight == 0 {
            return Err(("max_in_flight".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}
