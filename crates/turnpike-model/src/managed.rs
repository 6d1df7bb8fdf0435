//! What the management plane adds to a compiled configuration: which service each store-defined
//! route belongs to (lifecycle, approval) and the consumer indexes the gateway enforces.
//! Built by the control plane from the store; never read from or written to a file.

use std::collections::HashMap;
use std::sync::Arc;

use crate::mgmt::{Approval, Lifecycle, PlanQuota};

/// The managed part of a configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Managed {
    /// Compiled route name → the service it serves.
    pub routes: HashMap<String, Arc<ServiceBinding>>,
    /// Lower-case hex SHA-256 of an API key → the application it identifies.
    pub api_keys: HashMap<String, Arc<Consumer>>,
    /// Approved subscriptions: (application id, service id) → the plan's id, if any.
    pub subscriptions: HashMap<(Arc<str>, Arc<str>), Option<String>>,
    /// Basic-auth user name → its Argon2 hash and application.
    pub basic_users: HashMap<String, BasicUser>,
    /// JWT issuers of `jwt` credentials, with the application their tokens map to.
    pub jwt_issuers: Vec<JwtIssuerBinding>,
    /// Applications by id and by `team/name`.
    pub consumers: HashMap<String, Arc<Consumer>>,
    /// OAuth2 client id (of `oauth_client` credentials) → the application its tokens
    /// identify.
    pub oauth_clients: HashMap<String, Arc<Consumer>>,
    /// `keyid` of `hmac` credentials → the shared secret and the application.
    pub hmac_keys: HashMap<String, HmacKey>,
    /// Client certificate subject (RFC 4514 string) → the application it identifies.
    pub mtls_subjects: HashMap<String, Arc<Consumer>>,
    /// Client certificate SAN (see [`mtls_san_key`]) → the application it identifies.
    pub mtls_sans: HashMap<String, Arc<Consumer>>,
    /// Quotas of the plans approved subscriptions use, by plan id (plans without quotas are
    /// left out, so a subscription whose plan is absent here has no quota).
    pub plan_quotas: HashMap<String, Arc<[PlanQuota]>>,
}

/// A basic-auth credential.
#[derive(Debug, Clone, PartialEq)]
pub struct BasicUser {
    /// Argon2 hash, PHC form.
    pub password_hash: String,
    /// The application.
    pub consumer: Arc<Consumer>,
}

/// An `hmac` credential: message signatures made with `secret` identify `consumer`.
#[derive(Clone, PartialEq)]
pub struct HmacKey {
    /// The shared secret's bytes.
    pub secret: Arc<[u8]>,
    /// The application.
    pub consumer: Arc<Consumer>,
}

// The secret must never reach a log line through a `{:?}` of the index.
impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacKey")
            .field("secret", &"<redacted>")
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// A `jwt` credential: tokens of `issuer`, verified with its key, identify `consumer`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtIssuerBinding {
    /// Expected `iss`.
    pub issuer: String,
    /// JWKS URL.
    pub jwks_url: Option<String>,
    /// Keys found through the issuer's OpenID Connect discovery document.
    pub discovery: bool,
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
    pub id: Arc<str>,
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
    /// The released service's OpenAPI document, for `request_validation` with
    /// `use_service_openapi`.
    pub openapi: Option<Arc<serde_json::Value>>,
}

/// An application, as identified by a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Store id of the application.
    pub id: Arc<str>,
    /// Application name.
    pub name: Arc<str>,
    /// Owning team's name (empty for consumers from the file).
    pub team: Arc<str>,
    /// Consumer groups it belongs to.
    pub groups: Vec<String>,
}

/// The form a SAN of an `mtls` credential is indexed under: DNS names (bare or `DNS:`) in
/// lower case, since DNS compares without case; everything else as written.
pub fn mtls_san_key(san: &str) -> String {
    // One address has many spellings (`2001:DB8::1`, `2001:db8:0::1`): index the canonical one.
    let (ip_prefix, ip_text) = san.strip_prefix("IP:").map_or(("", san), |ip| ("IP:", ip));
    if let Ok(ip) = ip_text.parse::<std::net::IpAddr>() {
        return format!("{ip_prefix}{ip}");
    }
    if let Some(dns) = san.strip_prefix("DNS:") {
        return format!("DNS:{}", dns.to_ascii_lowercase());
    }
    let typed = ["URI:", "email:", "IP:"].iter().any(|p| san.starts_with(p));
    if !typed && !san.contains([':', '@', '/']) {
        return san.to_ascii_lowercase();
    }
    san.to_owned()
}

/// What makes two `mtls` SANs the same claim: the value of [`mtls_san_key`] without a type,
/// since a bare SAN matches every type and would overlap with a typed one.
pub fn mtls_san_claim(san: &str) -> String {
    let key = mtls_san_key(san);
    for prefix in ["DNS:", "URI:", "email:", "IP:"] {
        if let Some(value) = key.strip_prefix(prefix) {
            return value.to_owned();
        }
    }
    key
}
