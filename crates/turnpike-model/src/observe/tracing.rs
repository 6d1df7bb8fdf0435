//! W3C trace context propagation and OTLP trace export.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::access_log::BatchConfig;
use crate::ConfigError;

/// W3C trace context propagation and OpenTelemetry (OTLP) trace export.
///
/// Off (the default), the gateway forwards an incoming `traceparent`/`tracestate` untouched
/// and logs the incoming trace id. On, it joins the trace: one server span per request and
/// one client span per upstream attempt, each attempt sent upstream with its own parent id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Whether the gateway takes part in traces (spans, sampling, export).
    pub enabled: bool,
    /// The share of new traces (no sampled parent) that are recorded, 0.0 to 1.0. Decided
    /// from the trace id, so every node decides the same for one trace.
    pub sample_ratio: f64,
    /// Follow the caller's decision when a request carries a `traceparent`: its sampled flag
    /// decides, and `sample_ratio` only applies to traces that start here.
    pub parent_based: bool,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Further resource attributes (e.g. `deployment.environment`).
    pub resource: BTreeMap<String, String>,
    /// Where spans are sent; without it, trace context is still propagated and logged, and
    /// nothing is exported.
    pub otlp: Option<OtlpTraceExport>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sample_ratio: 1.0,
            parent_based: true,
            service_name: "turnpike".into(),
            resource: BTreeMap::new(),
            otlp: None,
        }
    }
}

/// OTLP/HTTP protobuf export of spans.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpTraceExport {
    /// The collector's traces URL, e.g. `http://otel-collector:4318/v1/traces`.
    pub endpoint: String,
    /// Extra request headers (e.g. an API key for a hosted backend).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Spans waiting to be sent at most; past it new spans are dropped and counted.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Batching, timeout and retries (spans per batch is `batch_size`).
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_queue_size() -> usize {
    4096
}

/// Largest queue a configuration may ask for: a queue is memory held while the collector
/// is away.
pub const MAX_QUEUE_SIZE: usize = 1_000_000;

impl TracingConfig {
    /// Problems with this section, as configuration errors.
    pub fn validate(&self) -> Vec<ConfigError> {
        const P: &str = "observability.tracing";
        let mut errs = Vec::new();
        if !self.sample_ratio.is_finite() || !(0.0..=1.0).contains(&self.sample_ratio) {
            errs.push(ConfigError::at(
                format!("{P}.sample_ratio"),
                "must be between 0.0 and 1.0",
            ));
        }
        if self.service_name.trim().is_empty() {
            errs.push(ConfigError::at(
                format!("{P}.service_name"),
                "must not be empty",
            ));
        }
        if let Some(o) = &self.otlp {
            let url = o.endpoint.parse::<http::Uri>();
            let ok = url.as_ref().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                errs.push(ConfigError::at(
                    format!("{P}.otlp.endpoint"),
                    format!("`{}` is not an http:// or https:// URL", o.endpoint),
                ));
            }
            for name in o.headers.keys() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    errs.push(ConfigError::at(
                        format!("{P}.otlp.headers.{name}"),
                        "is not a valid header name",
                    ));
                }
            }
            for (name, value) in &o.headers {
                if http::HeaderValue::from_str(value).is_err() {
                    errs.push(ConfigError::at(
                        format!("{P}.otlp.headers.{name}"),
                        "the value is not a valid header value",
                    ));
                }
            }
            if o.queue_size == 0 || o.queue_size > MAX_QUEUE_SIZE {
                errs.push(ConfigError::at(
                    format!("{P}.otlp.queue_size"),
                    format!("must be between 1 and {MAX_QUEUE_SIZE}"),
                ));
            }
            let b = &o.batch;
            if b.batch_size == 0 || b.batch_size > 100_000 {
                errs.push(ConfigError::at(
                    format!("{P}.otlp.batch.batch_size"),
                    "must be between 1 and 100000",
                ));
            }
            for (field, d) in [("max_delay", b.max_delay), ("timeout", b.timeout)] {
                if d.is_zero() {
                    errs.push(ConfigError::at(
                        format!("{P}.otlp.batch.{field}"),
                        "must be positive",
                    ));
                }
            }
            if b.max_retries > 20 {
                errs.push(ConfigError::at(
                    format!("{P}.otlp.batch.max_retries"),
                    "must be at most 20",
                ));
            }
            if b.retry_backoff > Duration::from_secs(60) {
                errs.push(ConfigError::at(
                    format!("{P}.otlp.batch.retry_backoff"),
                    "must be at most 60s",
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

    #[test]
    fn defaults_and_errors_name_the_field() {
        let c: TracingConfig = serde_yaml_ng::from_str("enabled: true").unwrap();
        assert!(c.enabled && c.parent_based);
        assert!((c.sample_ratio - 1.0).abs() < f64::EPSILON);
        assert!(c.validate().is_empty());

        let c: TracingConfig = serde_yaml_ng::from_str(
            "sample_ratio: 1.5\notlp:\n  endpoint: ftp://x\n  queue_size: 0\n  headers: {\"bad name\": v}",
        )
        .unwrap();
        let paths: Vec<String> = c.validate().iter().map(|e| e.path.clone()).collect();
        for p in [
            "observability.tracing.sample_ratio",
            "observability.tracing.otlp.endpoint",
            "observability.tracing.otlp.queue_size",
            "observability.tracing.otlp.headers.bad name",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        assert!(serde_yaml_ng::from_str::<TracingConfig>("sampler: x").is_err());
    }
}
