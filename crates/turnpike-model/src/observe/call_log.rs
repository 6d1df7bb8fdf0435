//! The call-log store: recent calls written to the store in batches.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The call-log store: recent calls written to the store in batches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CallLogConfig {}
