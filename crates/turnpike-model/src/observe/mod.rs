//! The `observability:` section of the configuration: metrics, tracing, access logs, the
//! call-log store and analytics. Each part lives in its own module.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod access_log;
pub mod analytics;
pub mod call_log;
pub mod metrics;
pub mod tracing;

pub use access_log::AccessLogConfig;
pub use analytics::AnalyticsConfig;
pub use call_log::{CallLogConfig, CallLogSearchLimits};
pub use metrics::MetricsConfig;
pub use tracing::TracingConfig;

/// What the gateway records about the traffic it serves, and where it sends it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Observability {
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// W3C trace context and OpenTelemetry traces.
    pub tracing: TracingConfig,
    /// Structured access logs and their sinks.
    pub access_log: AccessLogConfig,
    /// Recent calls kept in the store and searchable through the Admin API.
    pub call_log: CallLogConfig,
    /// Per-minute rollups, downsampled, and alerts on them.
    pub analytics: AnalyticsConfig,
}
