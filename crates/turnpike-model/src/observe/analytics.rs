//! Analytics rollups and alert rules (`observability.analytics`).
//!
//! Rollups need the management store (they are written there); without one the section is
//! accepted and does nothing. Alert rules live here, in the file, rather than as store
//! objects: they are operator configuration of the gateway, like its listeners, and a file
//! under version control is where operators expect them.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Analytics rollups and alert rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Whether rollups are collected (when a store is configured).
    pub enabled: bool,
    /// How often closed minutes are written to the store.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Distinct (service, route, application, status) keys kept per minute on one node;
    /// further keys are counted under the key `_other` (and the overflow is counted).
    pub max_keys_per_minute: usize,
    /// How often minutes are merged into hours and hours into days.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub downsample_interval: Duration,
    /// How long after its end an hour (or day) is merged: late flushes from other nodes
    /// must have arrived by then. At least twice the flush interval.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub late_grace: Duration,
    /// How long each resolution is kept.
    pub retention: AnalyticsRetention,
    /// Alert rules evaluated over the rollups.
    pub alerts: AlertsConfig,
    /// Bounds on one Admin API analytics query, so a wide range or grouping cannot make
    /// the admin listener read or build an unbounded answer.
    pub query: AnalyticsQueryLimits,
}

/// Bounds on one analytics query (`observability.analytics.query`); past one, the Admin
/// API answers 422 with a code naming it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsQueryLimits {
    /// Points per time series (range divided by step); past it: `too_many_points`.
    pub max_points: u64,
    /// Series in one answer (distinct `group_by` values); past it: `too_many_series`.
    pub max_series: usize,
    /// Rollup rows read from the store for one query; past it: `too_many_rows`.
    pub max_rows: usize,
}

impl Default for AnalyticsQueryLimits {
    fn default() -> Self {
        Self {
            max_points: 10_000,
            max_series: 100,
            max_rows: 200_000,
        }
    }
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval: Duration::from_secs(10),
            max_keys_per_minute: 10_000,
            downsample_interval: Duration::from_secs(300),
            late_grace: Duration::from_secs(120),
            retention: AnalyticsRetention::default(),
            alerts: AlertsConfig::default(),
            query: AnalyticsQueryLimits::default(),
        }
    }
}

/// How long minute, hour and day rollups are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsRetention {
    /// Minute rollups (default 7 days).
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub minute: Duration,
    /// Hour rollups (default 90 days).
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub hour: Duration,
    /// Day rollups (default 5 years).
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub day: Duration,
}

impl Default for AnalyticsRetention {
    fn default() -> Self {
        Self {
            minute: Duration::from_secs(7 * 86_400),
            hour: Duration::from_secs(90 * 86_400),
            day: Duration::from_secs(5 * 365 * 86_400),
        }
    }
}

/// Alert rules and how they are evaluated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often every rule is evaluated.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: Duration,
    /// How long one webhook call may take.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// How long alert history is kept in the store.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
    /// The rules.
    pub rules: Vec<AlertRule>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            evaluate_interval: Duration::from_secs(60),
            webhook_timeout: Duration::from_secs(5),
            history_retention: Duration::from_secs(90 * 86_400),
            rules: Vec::new(),
        }
    }
}

/// What an alert rule measures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Share of responses with status 5xx (or 4xx and 5xx with `include_4xx`) in the window;
    /// fires above `threshold` (0 to 1).
    ErrorRate,
    /// p99 of the total latency in the window, in milliseconds; fires above `threshold`.
    P99Latency,
    /// Requests in the window divided by those in the window before; fires below
    /// `threshold` (for example 0.5: traffic halved).
    TrafficDrop,
    /// Requests in the window divided by those in the window before; fires above
    /// `threshold` (for example 3: traffic tripled).
    TrafficSpike,
    /// Number of healthy targets of the upstream named in `upstream`; fires when it is at
    /// or below `threshold` (default 0: no healthy target).
    UpstreamHealth,
    /// The highest share of a plan quota used by any subscription in its current period
    /// (0 to 1); fires at or above `threshold` (for example 0.9).
    QuotaUsage,
}

/// One alert rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Unique name; notifications and history carry it.
    pub name: String,
    /// What is measured.
    pub kind: AlertKind,
    /// The limit; its meaning depends on `kind`.
    #[serde(default)]
    pub threshold: f64,
    /// The window the value is computed over (whole minutes; default 5m).
    #[schemars(with = "Option<String>")]
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// Only this service (store id); rollup-based kinds.
    #[serde(default)]
    pub service: Option<String>,
    /// Only this route (its gateway name); rollup-based kinds.
    #[serde(default)]
    pub route: Option<String>,
    /// Only this application (store id); rollup-based kinds and `quota_usage`.
    #[serde(default)]
    pub application: Option<String>,
    /// The upstream (`upstream_health`, required).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Below this many requests in the window (the previous window for traffic kinds) the
    /// rule does not judge: a few requests say little.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// `error_rate` counts 4xx responses as errors too.
    #[serde(default)]
    pub include_4xx: bool,
    /// After a firing notification, further firing notifications of this rule wait this long.
    #[schemars(with = "Option<String>")]
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// URLs each notification is POSTed to (JSON).
    pub webhooks: Vec<String>,
}

fn default_window() -> Duration {
    Duration::from_secs(300)
}

fn default_min_requests() -> u64 {
    10
}

fn default_cooldown() -> Duration {
    Duration::from_secs(600)
}

/// Checks ranges and names of `observability.analytics`; errors carry their path.
pub fn validate(config: &AnalyticsConfig, errs: &mut Vec<ConfigError>) {
    let p = "observability.analytics";
    let mut err = |path: String, msg: &str| errs.push(ConfigError::at(path, msg));
    if config.flush_interval < Duration::from_millis(100)
        || config.flush_interval > Duration::from_secs(300)
    {
        err(
            format!("{p}.flush_interval"),
            "must be between 100ms and 5m",
        );
    }
    if !(1..=1_000_000).contains(&config.max_keys_per_minute) {
        err(
            format!("{p}.max_keys_per_minute"),
            "must be between 1 and 1000000",
        );
    }
    if config.downsample_interval < Duration::from_secs(1)
        || config.downsample_interval > Duration::from_secs(3600)
    {
        err(
            format!("{p}.downsample_interval"),
            "must be between 1s and 1h",
        );
    }
    if config.late_grace < config.flush_interval * 2
        || config.late_grace > Duration::from_secs(3600)
    {
        err(
            format!("{p}.late_grace"),
            "must be at least twice flush_interval and at most 1h",
        );
    }
    let q = &config.query;
    if !(1..=1_000_000).contains(&q.max_points) {
        err(
            format!("{p}.query.max_points"),
            "must be between 1 and 1000000",
        );
    }
    if !(1..=10_000).contains(&q.max_series) {
        err(
            format!("{p}.query.max_series"),
            "must be between 1 and 10000",
        );
    }
    if !(1..=10_000_000).contains(&q.max_rows) {
        err(
            format!("{p}.query.max_rows"),
            "must be between 1 and 10000000",
        );
    }
    let r = &config.retention;
    if r.minute < Duration::from_secs(2 * 3600) {
        err(format!("{p}.retention.minute"), "must be at least 2h");
    }
    if r.hour < Duration::from_secs(2 * 86_400) || r.hour < r.minute {
        err(
            format!("{p}.retention.hour"),
            "must be at least 2 days and at least retention.minute",
        );
    }
    if r.day < Duration::from_secs(7 * 86_400) || r.day < r.hour {
        err(
            format!("{p}.retention.day"),
            "must be at least 7 days and at least retention.hour",
        );
    }
    let a = &config.alerts;
    if a.evaluate_interval < Duration::from_millis(100)
        || a.evaluate_interval > Duration::from_secs(3600)
    {
        err(
            format!("{p}.alerts.evaluate_interval"),
            "must be between 100ms and 1h",
        );
    }
    if a.webhook_timeout < Duration::from_millis(100) || a.webhook_timeout > Duration::from_secs(60)
    {
        err(
            format!("{p}.alerts.webhook_timeout"),
            "must be between 100ms and 60s",
        );
    }
    if a.history_retention < Duration::from_secs(86_400) {
        err(
            format!("{p}.alerts.history_retention"),
            "must be at least 1 day",
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, rule) in a.rules.iter().enumerate() {
        let rp = format!("{p}.alerts.rules[{i}]");
        if rule.name.is_empty() || rule.name.len() > 100 || rule.name.chars().any(char::is_control)
        {
            err(
                format!("{rp}.name"),
                "must be 1 to 100 characters, none a control character",
            );
        } else if !names.insert(rule.name.as_str()) {
            err(format!("{rp}.name"), "duplicate alert rule name");
        }
        if !rule.threshold.is_finite() || rule.threshold < 0.0 {
            err(
                format!("{rp}.threshold"),
                "must be a finite number, 0 or more",
            );
        }
        let secs = rule.window.as_secs();
        if secs < 60 || secs % 60 != 0 || secs > 86_400 || rule.window.subsec_nanos() != 0 {
            err(
                format!("{rp}.window"),
                "must be whole minutes, from 1m to 24h",
            );
        }
        match rule.kind {
            AlertKind::ErrorRate | AlertKind::QuotaUsage if rule.threshold > 1.0 => {
                err(format!("{rp}.threshold"), "is a share: 0 to 1");
            }
            AlertKind::UpstreamHealth if rule.upstream.as_deref().is_none_or(str::is_empty) => {
                err(format!("{rp}.upstream"), "name the upstream to watch");
            }
            _ => {}
        }
        if rule.webhooks.is_empty() {
            err(format!("{rp}.webhooks"), "name at least one webhook URL");
        }
        for (j, url) in rule.webhooks.iter().enumerate() {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
            if !ok {
                err(
                    format!("{rp}.webhooks[{j}]"),
                    "must be an absolute http:// or https:// URL",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_path() {
        let mut errs = Vec::new();
        validate(&AnalyticsConfig::default(), &mut errs);
        assert!(errs.is_empty(), "{errs:?}");

        let config: AnalyticsConfig = serde_json::from_value(serde_json::json!({
            "flush_interval": "1ms",
            "retention": { "minute": "1h" },
            "alerts": { "rules": [
                { "name": "a", "kind": "error_rate", "threshold": 2.0, "window": "90s",
                  "webhooks": ["ftp://x"] },
                { "name": "a", "kind": "upstream_health", "webhooks": ["http://h/x"] }
            ]}
        }))
        .unwrap();
        validate(&config, &mut errs);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "observability.analytics.flush_interval",
            "observability.analytics.retention.minute",
            "observability.analytics.alerts.rules[0].threshold",
            "observability.analytics.alerts.rules[0].window",
            "observability.analytics.alerts.rules[0].webhooks[0]",
            "observability.analytics.alerts.rules[1].name",
            "observability.analytics.alerts.rules[1].upstream",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
    }
}
