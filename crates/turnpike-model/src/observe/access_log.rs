//! Structured access logs: fields and sinks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Structured access logs: fields and sinks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {}
