//! What the management plane adds to a compiled configuration: which service each store-defined
//! route belongs to (lifecycle, approval) and the consumer indexes the gateway enforces.
//! Built by the control plane from the store; never read from or written to a file.

use std::collections::HashMap;
use std::sync::Arc;

use crate::mgmt::{Approval, Lifecycle};

/// The managed part of a configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Managed {
    /// Compiled route name → the service it serves.
    pub routes: HashMap<String, Arc<ServiceBinding>>,
    /// Lower-case hex SHA-256 of an API key → the application it identifies.
    pub api_keys: HashMap<String, Arc<Consumer>>,
    /// Approved subscriptions: (application id, service id) → the plan's id, if any.
    pub subscriptions: HashMap<(String, String), Option<String>>,
    /// Basic-auth user name → its Argon2 hash and application.
    pub basic_users: HashMap<String, BasicUser>,
    /// JWT issuers of `jwt` credentials, with the application their tokens map to.
    pub jwt_issuers: Vec<JwtIssuerBinding>,
    /// Applications by id and by `team/name`.
    pub consumers: HashMap<String, Arc<Consumer>>,
}

/// A basic-auth credential.
#[derive(Debug, Clone, PartialEq)]
pub struct BasicUser {
    /// Argon2 hash, PHC form.
    pub password_hash: String,
    /// The application.
    pub consumer: Arc<Consumer>,
}

/// A `jwt` credential: tokens of `issuer`, verified with its key, identify `consumer`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtIssuerBinding {
    /// Expected `iss`.
    pub issuer: String,
    /// JWKS URL.
    pub jwks_url: Option<String>,
    /// PEM public key.
    pub public_key: Option<String>,
    /// HMAC secret, resolved from its secret reference.
    pub secret: Option<String>,
    /// The application.
    pub consumer: Arc<Consumer>,
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
    /// Owning team's name (empty for consumers from the file).
    pub team: String,
    /// Consumer groups it belongs to.
    pub groups: Vec<String>,
}
