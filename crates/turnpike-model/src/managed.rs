//! What the management plane adds to a compiled configuration: which service each store-defined
//! route belongs to (lifecycle, approval) and the consumer indexes the gateway enforces.
//! Built by the control plane from the store; never read from or written to a file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::mgmt::{Approval, Lifecycle};

/// The managed part of a configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Managed {
    /// Compiled route name → the service it serves.
    pub routes: HashMap<String, Arc<ServiceBinding>>,
    /// Lower-case hex SHA-256 of an API key → the application it identifies.
    pub api_keys: HashMap<String, Arc<Consumer>>,
    /// Approved subscriptions as (application id, service id).
    pub subscriptions: HashSet<(String, String)>,
}

/// A service as the gateway needs it for a route of the service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBinding {
    /// Store id.
    pub id: String,
    /// Owning team's name.
    pub team: String,
    /// Service name.
    pub name: String,
    /// Lifecycle state of the service.
    pub lifecycle: Lifecycle,
    /// Subscription approval mode.
    pub approval: Approval,
    /// Successor URL for deprecated and retired services.
    pub successor: Option<String>,
    /// `Sunset` header value (an HTTP-date), already formatted.
    pub sunset: Option<String>,
    /// `Deprecation` header value (`@<unix seconds>`), already formatted.
    pub deprecation: Option<String>,
}

/// An application, as identified by a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Store id of the application.
    pub id: String,
    /// Application name.
    pub name: String,
    /// Owning team's name.
    pub team: String,
}
