//! W3C trace context propagation and OTLP trace export.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// W3C trace context propagation and OTLP trace export.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {}
