//! Analytics rollups and alert rules.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Analytics rollups and alert rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {}
