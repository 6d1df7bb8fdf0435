//! Management-plane entities: teams, users, services, routes, applications, credentials,
//! plans, subscriptions and the rest, as the Admin API and `turnpike apply` exchange them.
//!
//! The store keeps every entity as a generic object (kind, id, team, name, revision, JSON
//! spec); this module owns what each kind's spec looks like and the checks serde cannot
//! express. A spec carries its own `name`; everything the server manages (id, team, revision,
//! state, times) lives beside the spec, never inside it, so a client cannot forge it.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{
    PathMatch, PathRewrite, Predicate, RouteConfig, Timeouts, UpstreamConfig, UpstreamHost,
};
use crate::{ConfigError, ConfigErrors};

/// Every kind of management object, with where it lives in the Admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A tenant: owns services, upstreams, applications and everything under them.
    Team,
    /// A person or automation account that holds admin tokens.
    User,
    /// A user's role in one team.
    Member,
    /// A group of APIs with one upstream, visibility, approval mode and lifecycle.
    Service,
    /// One API route of a service.
    Route,
    /// A named pool of targets.
    Upstream,
    /// A consumer: what credentials identify and subscriptions attach to.
    Application,
    /// A secret that identifies an application (API key, basic-auth user, JWT issuer, ...).
    Credential,
    /// A named set of applications, for authorization rules.
    ConsumerGroup,
    /// A named tier of rate limits and quotas.
    Plan,
    /// An application's request to use a service under a plan.
    Subscription,
    /// A policy attached at some scope.
    Policy,
    /// A server certificate for TLS termination.
    Certificate,
    /// A reference to a secret held in the environment or a file.
    Secret,
}

impl Kind {
    /// Every kind, in dependency order (an object only refers to kinds before it), which is
    /// also the order `apply` creates them in.
    pub const ALL: [Kind; 14] = [
        Kind::Team,
        Kind::User,
        Kind::Member,
        Kind::Secret,
        Kind::Certificate,
        Kind::Upstream,
        Kind::Service,
        Kind::Route,
        Kind::Plan,
        Kind::Application,
        Kind::Credential,
        Kind::ConsumerGroup,
        Kind::Subscription,
        Kind::Policy,
    ];

    /// The name stored in the store's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Team => "team",
            Kind::User => "user",
            Kind::Member => "member",
            Kind::Service => "service",
            Kind::Route => "route",
            Kind::Upstream => "upstream",
            Kind::Application => "application",
            Kind::Credential => "credential",
            Kind::ConsumerGroup => "consumer_group",
            Kind::Plan => "plan",
            Kind::Subscription => "subscription",
            Kind::Policy => "policy",
            Kind::Certificate => "certificate",
            Kind::Secret => "secret",
        }
    }

    /// The collection segment in Admin API paths (`/admin/v1/teams/{team}/services`).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Team => "teams",
            Kind::User => "users",
            Kind::Member => "members",
            Kind::Service => "services",
            Kind::Route => "routes",
            Kind::Upstream => "upstreams",
            Kind::Application => "applications",
            Kind::Credential => "credentials",
            Kind::ConsumerGroup => "consumer-groups",
            Kind::Plan => "plans",
            Kind::Subscription => "subscriptions",
            Kind::Policy => "policies",
            Kind::Certificate => "certificates",
            Kind::Secret => "secrets",
        }
    }

    /// Parses [`Kind::as_str`].
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether objects of this kind belong to a team (all but teams, users and global
    /// policies' holders).
    pub fn team_scoped(self) -> bool {
        !matches!(self, Kind::Team | Kind::User)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fixed role set. Super admin is global; the others are held per team.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the team's objects.
    Viewer,
    /// Manages the team's applications, credentials and subscription requests.
    ConsumerDeveloper,
    /// Manages the team's services, routes, upstreams, plans and policies, and decides on
    /// subscriptions to the team's services.
    ApiOwner,
    /// Everything in the team, including members.
    TeamAdmin,
    /// Everything everywhere (users, teams, global policies). Only as a user flag.
    SuperAdmin,
}

/// A team.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamSpec {
    /// Unique name; also used in compiled route and upstream names.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Host names the team's routes may serve (`api.example.com`, `*.acme.example.com`).
    /// Empty: any. Only a super admin sets it; on a shared gateway, give every team a space
    /// of its own so no team's route can take another's traffic.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefixes the team's routes must stay under (`/acme`). Empty: any. Only a super
    /// admin sets it.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
}

impl TeamSpec {
    /// Checks that `route` stays within the team's hosts and path prefixes. On failure: the
    /// route field at fault and why.
    pub fn admits(&self, route: &RouteSpec) -> Result<(), (String, String)> {
        if !self.hosts.is_empty() {
            if route.hosts.is_empty() {
                return Err((
                    "hosts".into(),
                    format!(
                        "the team's routes must name their hosts, among {}",
                        self.hosts.join(", ")
                    ),
                ));
            }
            for (i, h) in route.hosts.iter().enumerate() {
                if !self.hosts.iter().any(|t| host_within(h, t)) {
                    return Err((
                        format!("hosts[{i}]"),
                        format!(
                            "`{h}` is outside the team's hosts ({})",
                            self.hosts.join(", ")
                        ),
                    ));
                }
            }
        }
        if !self.path_prefixes.is_empty() {
            if route.paths.is_empty() {
                return Err((
                    "paths".into(),
                    format!(
                        "the team's routes must name their paths, under {}",
                        self.path_prefixes.join(", ")
                    ),
                ));
            }
            for (i, p) in route.paths.iter().enumerate() {
                let path = match p {
                    PathMatch::Exact(p) | PathMatch::Prefix(p) | PathMatch::Template(p) => p,
                    PathMatch::Regex(_) => {
                        return Err((
                            format!("paths[{i}]"),
                            "a regex path cannot be checked against the team's path prefixes"
                                .into(),
                        ));
                    }
                };
                if !self.path_prefixes.iter().any(|pre| path_within(path, pre)) {
                    return Err((
                        format!("paths[{i}]"),
                        format!(
                            "`{path}` is outside the team's path prefixes ({})",
                            self.path_prefixes.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether route host `host` is covered by team host `allowed` (exact, or under a wildcard).
fn host_within(host: &str, allowed: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let allowed = allowed.to_ascii_lowercase();
    match allowed.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => host == allowed,
    }
}

/// Whether `path` is `prefix` or continues it at a segment boundary.
fn path_within(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// Unique login name.
    pub name: String,
    /// Contact address.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the user is a super admin.
    #[serde(default)]
    pub super_admin: bool,
    /// A disabled user's tokens stop working.
    #[serde(default)]
    pub disabled: bool,
}

/// A user's membership of a team. The object's name is the user's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// The user's name.
    pub name: String,
    /// Role in the team; `super_admin` is not allowed here.
    pub role: Role,
}

/// Who can see a service in the catalogue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Only the owning team.
    #[default]
    Internal,
    /// Every team and the developer portal.
    Public,
}

/// How subscription requests to a service are decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// Approved on request; the gateway does not require a subscription.
    #[default]
    Auto,
    /// An API owner approves each request; the gateway answers 403 without an approved one.
    Manual,
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Being designed; not served.
    #[default]
    Draft,
    /// Served from its current release.
    Published,
    /// Served, with `Deprecation` and `Sunset` headers.
    Deprecated,
    /// Answered with 410 and a pointer to the successor.
    Retired,
}

impl Lifecycle {
    /// The value stored in the store's `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Draft => "draft",
            Lifecycle::Published => "published",
            Lifecycle::Deprecated => "deprecated",
            Lifecycle::Retired => "retired",
        }
    }

    /// Parses [`Lifecycle::as_str`].
    pub fn parse(s: &str) -> Option<Lifecycle> {
        [
            Lifecycle::Draft,
            Lifecycle::Published,
            Lifecycle::Deprecated,
            Lifecycle::Retired,
        ]
        .into_iter()
        .find(|l| l.as_str() == s)
    }

    /// Whether the lifecycle may move from `self` to `to`. Forward only, except that a
    /// deprecated service can be published again (a deprecation withdrawn).
    pub fn can_move_to(self, to: Lifecycle) -> bool {
        use Lifecycle::*;
        matches!(
            (self, to),
            (Draft, Published)
                | (Published, Published)
                | (Published, Deprecated)
                | (Deprecated, Published)
                | (Published | Deprecated, Retired)
        )
    }
}

/// A service: a team's group of APIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique within the team.
    pub name: String,
    /// Free text for the catalogue.
    #[serde(default)]
    pub description: String,
    /// Upstream (by name, in the same team) that routes use unless they name another.
    pub upstream: String,
    /// Catalogue visibility.
    #[serde(default)]
    pub visibility: Visibility,
    /// Subscription approval mode.
    #[serde(default)]
    pub approval: Approval,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Catalogue category.
    #[serde(default)]
    pub category: Option<String>,
    /// Where clients of a deprecated or retired service should go (a URL), sent in `Link`
    /// and in the 410 body.
    #[serde(default)]
    pub successor: Option<String>,
    /// When a deprecated service stops being served, as an RFC 3339 date-time. Sent in
    /// `Sunset`.
    #[serde(default)]
    pub sunset: Option<String>,
    /// The service's OpenAPI 3 document, when it has one (import creates routes from it).
    #[serde(default)]
    pub openapi: Option<Value>,
}

/// A route of a service. Matching fields are those of a declarative route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique within the team.
    pub name: String,
    /// The service (by name, in the same team) the route belongs to.
    pub service: String,
    /// Upstream override (by name, in the same team); the service's otherwise.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Higher wins before specificity is considered.
    #[serde(default)]
    pub priority: i32,
    /// Host names. Empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path matchers. Empty: any path.
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Methods. Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header predicates.
    #[serde(default)]
    pub headers: Vec<Predicate>,
    /// Query predicates.
    #[serde(default)]
    pub query: Vec<Predicate>,
    /// Cookie predicates.
    #[serde(default)]
    pub cookies: Vec<Predicate>,
    /// Forwarded path derivation.
    #[serde(default)]
    pub rewrite: Option<PathRewrite>,
    /// `Host` sent upstream.
    #[serde(default)]
    pub upstream_host: UpstreamHost,
    /// Per-route timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Per-route body limit.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

impl RouteSpec {
    /// The declarative route this compiles to, under a compiled `name` and `upstream`.
    pub fn to_route_config(&self, name: String, upstream: String) -> RouteConfig {
        RouteConfig {
            name,
            priority: self.priority,
            hosts: self.hosts.clone(),
            paths: self.paths.clone(),
            methods: self.methods.clone(),
            headers: self.headers.clone(),
            query: self.query.clone(),
            cookies: self.cookies.clone(),
            upstream,
            rewrite: self.rewrite.clone(),
            upstream_host: self.upstream_host.clone(),
            timeouts: self.timeouts.clone(),
            max_body_bytes: self.max_body_bytes,
            api_version: None,
        }
    }
}

/// An application (consumer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplicationSpec {
    /// Unique within the team.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// A credential. Secret material is generated or hashed by the server: an API key is shown
/// once in the creation response and only its hash is kept; a basic-auth password is kept as
/// an Argon2 hash.
// No `deny_unknown_fields` here: serde cannot combine it with `flatten`; the flattened enum
// denies unknown fields instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CredentialSpec {
    /// Unique within the team.
    pub name: String,
    /// The application (by name, in the same team) it identifies.
    pub application: String,
    /// What kind of credential, with its parameters.
    #[serde(flatten)]
    pub method: CredentialMethod,
}

/// The kinds of credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialMethod {
    /// An API key. Clients send the key; the store keeps `hash` (SHA-256, hex) and the first
    /// characters as `prefix` to tell keys apart.
    ApiKey {
        /// Set by the server.
        #[serde(default)]
        prefix: String,
        /// Set by the server; never accepted from a client.
        #[serde(default)]
        hash: String,
    },
    /// A basic-auth user. `password` is accepted on write and replaced by `password_hash`.
    Basic {
        /// User name (unique across credentials of this type).
        username: String,
        /// Plain password on write only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
        /// Set by the server.
        #[serde(default)]
        password_hash: String,
    },
    /// Tokens of a JWT issuer map to the application.
    Jwt {
        /// Expected `iss`.
        issuer: String,
        /// JWKS URL, or ...
        #[serde(default)]
        jwks_url: Option<String>,
        /// ... the JWKS named by the issuer's OpenID Connect discovery document
        /// (`{issuer}/.well-known/openid-configuration`), or ...
        #[serde(default)]
        discovery: bool,
        /// ... a PEM public key.
        #[serde(default)]
        public_key: Option<String>,
        /// Secret (by name) holding an HMAC key.
        #[serde(default)]
        secret: Option<String>,
    },
    /// An OAuth2 client id (tokens introspected elsewhere map to the application).
    OauthClient {
        /// The client id.
        client_id: String,
    },
    /// A shared secret for HTTP message signatures (`hmac_auth`): signatures whose `keyid`
    /// is `key_id` are verified with the secret and identify the application.
    Hmac {
        /// The `keyid` clients send (unique across `hmac` credentials).
        key_id: String,
        /// The team's secret object (by name) holding the shared secret; the Admin API never
        /// sees the value.
        secret: String,
    },
    /// A client certificate subject or SAN.
    Mtls {
        /// Subject distinguished name, or ...
        #[serde(default)]
        subject: Option<String>,
        /// ... a subject alternative name.
        #[serde(default)]
        san: Option<String>,
    },
}

/// A consumer group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerGroupSpec {
    /// Unique within the team.
    pub name: String,
    /// Member applications, by name in the same team.
    #[serde(default)]
    pub applications: Vec<String>,
}

/// A rate limit of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanLimit {
    /// Requests allowed per window.
    pub requests: u64,
    /// Window length, like `1s` or `1m`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub per: std::time::Duration,
}

/// The period a quota counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    /// Calendar day (UTC).
    Day,
    /// Calendar month (UTC).
    Month,
}

impl QuotaPeriod {
    /// The name used in the store, the API and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }

    /// The start (inclusive) and end (exclusive) of the period containing `now_ms`, in epoch
    /// milliseconds: UTC midnights for days, the 1st of the month at UTC midnight for months.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        const DAY_MS: i64 = 86_400_000;
        let day_start = now_ms.div_euclid(DAY_MS) * DAY_MS;
        let day = (day_start, day_start + DAY_MS);
        if self == QuotaPeriod::Day {
            return day;
        }
        let Ok(t) = time::OffsetDateTime::from_unix_timestamp(day_start.div_euclid(1000)) else {
            return day;
        };
        let (year, month) = (t.year(), t.month());
        let first = |y: i32, m: time::Month| {
            time::Date::from_calendar_date(y, m, 1)
                .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
        };
        let next_year = if month == time::Month::December {
            year + 1
        } else {
            year
        };
        match (first(year, month), first(next_year, month.next())) {
            (Ok(start), Ok(end)) => (start, end),
            _ => day,
        }
    }

    /// Parses [`QuotaPeriod::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(QuotaPeriod::Day),
            "month" => Some(QuotaPeriod::Month),
            _ => None,
        }
    }
}

/// A quota of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanQuota {
    /// Requests allowed per period.
    pub requests: u64,
    /// The period.
    pub period: QuotaPeriod,
}

/// A plan: a named tier of limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Unique within the team.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Rate limits, all enforced.
    #[serde(default)]
    pub rate_limits: Vec<PlanLimit>,
    /// Quotas, all enforced.
    #[serde(default)]
    pub quotas: Vec<PlanQuota>,
}

/// A subscription's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Waiting for a decision.
    Requested,
    /// May call the service.
    Approved,
    /// Turned down.
    Rejected,
    /// Was approved, no longer is.
    Revoked,
}

impl SubscriptionState {
    /// The value stored in the store's `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionState::Requested => "requested",
            SubscriptionState::Approved => "approved",
            SubscriptionState::Rejected => "rejected",
            SubscriptionState::Revoked => "revoked",
        }
    }

    /// Whether a decision may move the state from `self` to `to`.
    pub fn can_move_to(self, to: SubscriptionState) -> bool {
        use SubscriptionState::*;
        matches!(
            (self, to),
            (Requested, Approved | Rejected) | (Approved, Revoked) | (Rejected, Approved)
        )
    }
}

/// A subscription, created by the consumer team; decided by the service's team. The object
/// belongs to the application's team. `service_team` names the other side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Unique within the team (for example `<application>-<service>`).
    pub name: String,
    /// The application, by name in the subscribing team.
    pub application: String,
    /// The team that owns the service.
    pub service_team: String,
    /// The service, by name in `service_team`.
    pub service: String,
    /// The plan, by name in `service_team`.
    #[serde(default)]
    pub plan: Option<String>,
    /// Set by the server: who decided, why and when.
    #[serde(default)]
    pub decision: Option<Decision>,
}

/// A recorded subscription decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The user who decided.
    pub by: String,
    /// The stated reason.
    #[serde(default)]
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "scope", content = "target")]
pub enum PolicyScope {
    /// Every request (global policies are created by super admins only).
    Global,
    /// Routes of a service (by name, in the policy's team).
    Service(String),
    /// One route (by name, in the policy's team).
    Route(String),
    /// Requests of an application (by name, in the policy's team).
    Application(String),
    /// Requests under a plan (by name, in the policy's team).
    Plan(String),
}

/// A policy attachment. Its `config` is checked against the policy type's configuration
/// ([`crate::policy::PolicyKind::parse`]); the schema of each type is published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique within the team.
    pub name: String,
    /// Policy type, like `rate_limit` or `cors`.
    #[serde(rename = "type")]
    pub policy_type: String,
    /// Where it applies.
    #[serde(flatten)]
    pub scope: PolicyScope,
    /// Type-specific configuration.
    #[serde(default)]
    pub config: Value,
    /// Disabled policies are kept but not run.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Order among policies of the same phase (higher first).
    #[serde(default)]
    pub priority: i32,
}

fn yes() -> bool {
    true
}

/// A server certificate; its private key comes from a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// Unique within the team.
    pub name: String,
    /// PEM certificate chain.
    pub cert: String,
    /// The secret (by name, same team) holding the PEM private key.
    pub key_secret: String,
    /// SNI names it serves; from the certificate when empty.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Where a secret's value is read from. The value itself is never stored nor returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable of the gateway process.
    Env(String),
    /// A file readable by the gateway process.
    File(String),
}

/// A secret reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// Unique within the team.
    pub name: String,
    /// Where the value is.
    pub source: SecretSource,
}

/// The spec of an upstream is the declarative upstream.
pub type UpstreamSpec = UpstreamConfig;

/// Parses a spec of `kind` from JSON, reporting the failing field path. The `name` the spec
/// carries is checked to be a usable name.
pub fn parse_spec(kind: Kind, value: Value) -> Result<Value, ConfigErrors> {
    fn typed<T: serde::de::DeserializeOwned + Serialize>(
        value: Value,
    ) -> Result<Value, ConfigErrors> {
        let spec: T = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::at(path, e.inner().to_string())
        })?;
        serde_json::to_value(spec).map_err(|e| ConfigError::at("", e.to_string()).into())
    }
    // serde first: its messages name the field for most mistakes. The schema then catches
    // what serde let through.
    let original = value.clone();
    let value = match kind {
        Kind::Team => typed::<TeamSpec>(value)?,
        Kind::User => typed::<UserSpec>(value)?,
        Kind::Member => typed::<MemberSpec>(value)?,
        Kind::Service => typed::<ServiceSpec>(value)?,
        Kind::Route => typed::<RouteSpec>(value)?,
        Kind::Upstream => typed::<UpstreamSpec>(value)?,
        Kind::Application => typed::<ApplicationSpec>(value)?,
        Kind::Credential => typed::<CredentialSpec>(value)?,
        Kind::ConsumerGroup => typed::<ConsumerGroupSpec>(value)?,
        Kind::Plan => typed::<PlanSpec>(value)?,
        Kind::Subscription => typed::<SubscriptionSpec>(value)?,
        Kind::Policy => typed::<PolicySpec>(value)?,
        Kind::Certificate => typed::<CertificateSpec>(value)?,
        Kind::Secret => typed::<SecretSpec>(value)?,
    };
    check_schema(kind, &original)?;
    let name = value.get("name").and_then(Value::as_str).unwrap_or("");
    check_name(name).map_err(|m| ConfigError::at("name", m))?;
    if kind == Kind::Credential && value.get("type").and_then(Value::as_str) == Some("mtls") {
        let given = |f: &str| {
            value
                .get(f)
                .and_then(Value::as_str)
                .is_some_and(|v| !v.is_empty())
        };
        if given("subject") == given("san") {
            return Err(ConfigError::at(
                "subject",
                "an mtls credential names exactly one of subject or san",
            )
            .into());
        }
    }
    if kind == Kind::Member && value.get("role").and_then(Value::as_str) == Some("super_admin") {
        return Err(ConfigError::at("role", "super_admin is a user flag, not a team role").into());
    }
    if kind == Kind::Policy {
        let policy_type = value.get("type").and_then(Value::as_str).unwrap_or("");
        let config = value.get("config").unwrap_or(&Value::Null);
        crate::policy::PolicyKind::parse_attachment(policy_type, config)?;
        let scope = value.get("scope").and_then(Value::as_str).unwrap_or("");
        if matches!(scope, "application" | "plan") && policy_type != "rate_limit" {
            return Err(ConfigError::at(
                "type",
                format!("only rate_limit policies can be attached to an {scope}"),
            )
            .into());
        }
    }
    Ok(value)
}

/// Checks `value` against the published schema of `kind` before serde reads it: serde is more
/// lenient in places (it takes a struct written as an array), and what the OpenAPI document
/// promises should be exactly what is accepted.
fn check_schema(kind: Kind, value: &Value) -> Result<(), ConfigErrors> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    static VALIDATORS: LazyLock<Mutex<HashMap<Kind, std::sync::Arc<jsonschema::Validator>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let validator = {
        let mut cache = VALIDATORS
            .lock()
            .map_err(|_| ConfigError::at("", "schema cache poisoned"))?;
        match cache.get(&kind) {
            Some(v) => v.clone(),
            None => {
                let v = jsonschema::validator_for(&spec_schema(kind))
                    .map(std::sync::Arc::new)
                    .map_err(|e| ConfigError::at("", format!("the {kind} schema: {e}")))?;
                cache.insert(kind, v.clone());
                v
            }
        }
    };
    let Some(error) = validator.iter_errors(value).next() else {
        return Ok(());
    };
    let path: Vec<String> = error
        .instance_path()
        .into_iter()
        .map(|segment| match segment {
            jsonschema::paths::LocationSegment::Property(p) => p.to_string(),
            jsonschema::paths::LocationSegment::Index(i) => format!("[{i}]"),
        })
        .collect();
    let mut dotted = String::new();
    for p in path {
        if !dotted.is_empty() && !p.starts_with('[') {
            dotted.push('.');
        }
        dotted.push_str(&p);
    }
    Err(ConfigError::at(dotted, error.to_string()).into())
}

/// The JSON Schema of `kind`'s spec (2020-12, as OpenAPI 3.1 uses).
pub fn spec_schema(kind: Kind) -> Value {
    fn schema<T: JsonSchema>() -> Value {
        schemars::schema_for!(T).to_value()
    }
    match kind {
        Kind::Team => schema::<TeamSpec>(),
        Kind::User => schema::<UserSpec>(),
        Kind::Member => schema::<MemberSpec>(),
        Kind::Service => schema::<ServiceSpec>(),
        Kind::Route => schema::<RouteSpec>(),
        Kind::Upstream => schema::<UpstreamSpec>(),
        Kind::Application => schema::<ApplicationSpec>(),
        Kind::Credential => schema::<CredentialSpec>(),
        Kind::ConsumerGroup => schema::<ConsumerGroupSpec>(),
        Kind::Plan => schema::<PlanSpec>(),
        Kind::Subscription => schema::<SubscriptionSpec>(),
        Kind::Policy => schema::<PolicySpec>(),
        Kind::Certificate => schema::<CertificateSpec>(),
        Kind::Secret => schema::<SecretSpec>(),
    }
}

/// Names appear in URLs, compiled route names and logs: 1–63 characters of ASCII letters,
/// digits, `-`, `_` and `.`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok_first || !ok_rest || name.len() > 63 {
        return Err(format!(
            "`{name}` is not a valid name: use 1-63 ASCII letters, digits, `-`, `_` or `.`, \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_round_trip_and_are_unique() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        let mut names: Vec<_> = Kind::ALL.iter().map(|k| k.collection()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
    }

    #[test]
    fn spec_errors_name_the_field() {
        let e = parse_spec(
            Kind::Service,
            json!({"name": "s", "upstream": "u", "approval": "sometimes"}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "approval", "{e}");
        let e = parse_spec(Kind::Team, json!({"name": "a b"})).unwrap_err();
        assert_eq!(e.0[0].path, "name");
        let e = parse_spec(Kind::Team, json!({"name": "a", "colour": 1})).unwrap_err();
        assert!(e.0[0].message.contains("colour"), "{e}");
    }

    #[test]
    fn defaults_are_filled_in() {
        let v = parse_spec(Kind::Service, json!({"name": "s", "upstream": "u"})).unwrap();
        assert_eq!(v["approval"], "auto");
        assert_eq!(v["visibility"], "internal");
        let v = parse_spec(
            Kind::Policy,
            json!({"name": "p", "type": "key_auth", "scope": "route", "target": "r"}),
        )
        .unwrap();
        assert_eq!(v["enabled"], true);
        assert_eq!(v["target"], "r");
        // A policy's config is checked against its type, the field named.
        let e = parse_spec(
            Kind::Policy,
            json!({"name": "p", "type": "cors", "scope": "route", "target": "r", "config": {}}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "config", "{e}");
        assert!(e.0[0].message.contains("allow_origins"), "{e}");
    }

    #[test]
    fn credentials_are_tagged_by_type() {
        let v = parse_spec(
            Kind::Credential,
            json!({"name": "k", "application": "app", "type": "api_key"}),
        )
        .unwrap();
        assert_eq!(v["type"], "api_key");
        let e = parse_spec(
            Kind::Credential,
            json!({"name": "k", "application": "app", "type": "api_key", "extra": 1}),
        )
        .unwrap_err();
        assert!(e.0[0].message.contains("extra"), "{e}");
        let e = parse_spec(
            Kind::Credential,
            json!({"name": "k", "application": "app", "type": "telepathy"}),
        )
        .unwrap_err();
        assert!(e.0[0].message.contains("telepathy"), "{e}");
        let v = parse_spec(
            Kind::Credential,
            json!({"name": "c", "application": "app", "type": "mtls", "san": "a.example"}),
        )
        .unwrap();
        assert_eq!(v["san"], "a.example");
        for both_or_neither in [
            json!({"name": "c", "application": "app", "type": "mtls"}),
            json!({"name": "c", "application": "app", "type": "mtls", "san": "a", "subject": "CN=a"}),
            json!({"name": "c", "application": "app", "type": "mtls", "subject": ""}),
        ] {
            let e = parse_spec(Kind::Credential, both_or_neither).unwrap_err();
            assert_eq!(e.0[0].path, "subject", "{e}");
        }
    }

    #[test]
    fn the_schema_is_enforced_where_serde_is_lenient() {
        // serde takes a struct written as an array; the published schema does not.
        let e = parse_spec(
            Kind::Upstream,
            json!({"name": "u", "targets": [], "tls": [null, null, null, null, false]}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "tls", "{e}");
    }

    #[test]
    fn teams_admit_routes_within_their_space() {
        let team: TeamSpec = serde_json::from_value(json!({"name": "acme",
            "hosts": ["api.acme.com", "*.acme.io"], "path_prefixes": ["/acme"]}))
        .unwrap();
        let route = |v: Value| -> RouteSpec {
            let mut base = json!({"name": "r", "service": "s"});
            base.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        let ok = route(json!({"hosts": ["api.acme.com", "x.acme.io"],
            "paths": [{"prefix": "/acme"}, {"template": "/acme/{id}"}]}));
        assert!(team.admits(&ok).is_ok());
        for (bad, field) in [
            (json!({"paths": [{"prefix": "/acme"}]}), "hosts"),
            (
                json!({"hosts": ["evil.com"], "paths": [{"prefix": "/acme"}]}),
                "hosts[0]",
            ),
            (
                json!({"hosts": ["acme.io"], "paths": [{"prefix": "/acme"}]}),
                "hosts[0]",
            ),
            (json!({"hosts": ["api.acme.com"]}), "paths"),
            (
                json!({"hosts": ["api.acme.com"], "paths": [{"prefix": "/acmex"}]}),
                "paths[0]",
            ),
            (
                json!({"hosts": ["api.acme.com"], "paths": [{"regex": "^/acme/.*"}]}),
                "paths[0]",
            ),
        ] {
            assert_eq!(
                team.admits(&route(bad.clone())).unwrap_err().0,
                field,
                "{bad}"
            );
        }
        let open: TeamSpec = serde_json::from_value(json!({"name": "any"})).unwrap();
        assert!(open.admits(&route(json!({}))).is_ok());
    }

    #[test]
    fn members_cannot_be_super_admins() {
        let e = parse_spec(Kind::Member, json!({"name": "u", "role": "super_admin"})).unwrap_err();
        assert_eq!(e.0[0].path, "role");
    }

    #[test]
    fn lifecycle_moves_forward() {
        use Lifecycle::*;
        assert!(Draft.can_move_to(Published));
        assert!(!Draft.can_move_to(Retired));
        assert!(!Retired.can_move_to(Published));
        assert!(Deprecated.can_move_to(Retired));
    }

    #[test]
    fn every_kind_has_an_object_schema() {
        for k in Kind::ALL {
            let s = spec_schema(k);
            assert!(s.get("$schema").is_some(), "{k}: {s}");
        }
    }
}
