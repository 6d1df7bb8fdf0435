//! Prometheus metrics.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Prometheus metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {}
