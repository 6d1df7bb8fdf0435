//! Prometheus metrics: what is exported, where, and how many label values it may grow to.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Latency histogram buckets (seconds) used when none are configured: from 5 ms, where a
/// cached or rejected request lands, to a minute, past any sane upstream timeout.
pub const DEFAULT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// The most distinct applications labelled by default; the rest share `other`.
pub const DEFAULT_MAX_APPLICATIONS: usize = 1000;

/// Upper bound for `max_applications`: every value multiplies the series of each labelled
/// metric, so a typo of a few zeros must not take the scraper down.
pub const MAX_APPLICATIONS_LIMIT: usize = 100_000;

/// Upper bound on the number of histogram buckets (each is one series per label set).
pub const MAX_BUCKETS: usize = 50;

/// Prometheus metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether requests are counted at all. Off: no metrics sink runs on the request path and
    /// `/metrics` answers with process and gateway state only.
    pub enabled: bool,
    /// An extra listener (`ip:port`) serving `/metrics`, `/healthz`, `/readyz` and `/version`,
    /// for deployments without the Admin API. Absent: only the Admin API listener serves them.
    /// Changing it needs a restart.
    pub listen: Option<String>,
    /// Label request counters and byte counters with the identified application's id.
    /// Off by default: applications are many and each one multiplies the series.
    pub per_application: bool,
    /// With `per_application`, the most distinct applications labelled; later ones are counted
    /// under `application="other"`.
    pub max_applications: usize,
    /// Latency histogram upper bounds, in seconds, strictly increasing.
    pub buckets: Vec<f64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            per_application: false,
            max_applications: DEFAULT_MAX_APPLICATIONS,
            buckets: DEFAULT_BUCKETS.to_vec(),
        }
    }
}

impl MetricsConfig {
    /// The dedicated listener's address, when one is configured and valid.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.as_deref().and_then(|a| a.parse().ok())
    }

    /// Problems with this section, with their paths under `observability.metrics`.
    pub fn validate(&self) -> Vec<ConfigError> {
        const P: &str = "observability.metrics";
        let mut errs = Vec::new();
        if let Some(l) = &self.listen
            && l.parse::<SocketAddr>().is_err()
        {
            errs.push(ConfigError::at(
                format!("{P}.listen"),
                format!("`{l}` is not an `ip:port` socket address"),
            ));
        }
        if self.max_applications == 0 || self.max_applications > MAX_APPLICATIONS_LIMIT {
            errs.push(ConfigError::at(
                format!("{P}.max_applications"),
                format!("must be between 1 and {MAX_APPLICATIONS_LIMIT}"),
            ));
        }
        if self.buckets.is_empty() || self.buckets.len() > MAX_BUCKETS {
            errs.push(ConfigError::at(
                format!("{P}.buckets"),
                format!("give between 1 and {MAX_BUCKETS} bucket bounds"),
            ));
        }
        for (i, b) in self.buckets.iter().enumerate() {
            if !b.is_finite() || *b <= 0.0 {
                errs.push(ConfigError::at(
                    format!("{P}.buckets[{i}]"),
                    format!("{b} is not a positive number of seconds"),
                ));
            } else if i > 0 && self.buckets[i - 1] >= *b {
                errs.push(ConfigError::at(
                    format!("{P}.buckets[{i}]"),
                    format!("bounds must increase: {b} follows {}", self.buckets[i - 1]),
                ));
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn parse(yaml: &str) -> MetricsConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_on() {
        let c = MetricsConfig::default();
        assert!(c.enabled && !c.per_application && c.listen.is_none());
        assert!(c.validate().is_empty());
        assert_eq!(parse("{}"), c);
    }

    #[test]
    fn bad_values_are_named_by_path() {
        let c = parse(
            "listen: nowhere\nmax_applications: 0\nbuckets: [0.1, 0.1, -1, 2]\nper_application: true",
        );
        let paths: Vec<String> = c.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "observability.metrics.listen",
                "observability.metrics.max_applications",
                "observability.metrics.buckets[1]",
                "observability.metrics.buckets[2]",
            ]
        );
        assert!(parse("buckets: []").validate()[0].path.ends_with("buckets"));
        assert!(serde_yaml_ng::from_str::<MetricsConfig>("enable: true").is_err());
    }
}
