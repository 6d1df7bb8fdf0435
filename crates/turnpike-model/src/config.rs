//! The external configuration schema: what users write in YAML or JSON.
//!
//! These types are deliberately plain data. They are parsed with serde, then checked by
//! [`crate::validate`], and finally compiled by `turnpike-proxy` into its internal snapshot.
//! Nothing here is used on the request path.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The whole declarative configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version of the file. Only `1` exists today.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Listeners, limits and process-wide behaviour.
    #[serde(default)]
    pub server: ServerConfig,
    /// Named pools of upstream targets.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, matched by host, path, method and predicates.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Policies attached globally, to routes or to consumers (see `policy`).
    #[serde(default)]
    pub policies: Vec<crate::mgmt::PolicySpec>,
    /// Consumers (applications) defined in the file, with their credentials.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    /// Metrics, traces, access logs, the call-log store and analytics.
    #[serde(default)]
    pub observability: crate::observe::Observability,
    /// Where the `cache` policy keeps responses: memory size and the shared Redis tier.
    #[serde(default)]
    pub cache: crate::shaping::CacheStoreConfig,
    /// Versioned APIs: how requests name a version, and which versions exist (see
    /// [`crate::versioning`]).
    #[serde(default)]
    pub versioning: Vec<crate::versioning::VersionedApiConfig>,
    /// What the management store adds (service bindings, consumers); empty for a file alone.
    #[serde(skip)]
    #[schemars(skip)]
    pub managed: std::sync::Arc<crate::managed::Managed>,
}

fn default_version() -> u32 {
    1
}

// Not derived: an empty document must mean the current schema version, not 0.
impl Default for Config {
    fn default() -> Self {
        Self {
            version: default_version(),
            server: ServerConfig::default(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            policies: Vec::new(),
            consumers: Vec::new(),
            observability: crate::observe::Observability::default(),
            cache: crate::shaping::CacheStoreConfig::default(),
            versioning: Vec::new(),
            managed: std::sync::Arc::default(),
        }
    }
}

/// A consumer (application) defined in the file. Its id at the gateway is its name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Unique among the file's consumers.
    pub name: String,
    /// Consumer groups it belongs to (for `acl`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Its API keys.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Its basic-auth users.
    #[serde(default)]
    pub basic_auth: Vec<BasicUserConfig>,
    /// OAuth2 client ids whose introspected tokens identify it (`oauth2_introspection`).
    #[serde(default)]
    pub oauth_clients: Vec<String>,
    /// Shared secrets for HTTP message signatures (`hmac_auth`).
    #[serde(default)]
    pub hmac: Vec<HmacKeyConfig>,
    /// Client certificates that identify it (`mtls`), by subject or by SAN.
    #[serde(default)]
    pub mtls: Vec<MtlsIdentity>,
}

/// A message-signature key of a file consumer: exactly one of `secret` and `secret_env`.
#[derive(Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacKeyConfig {
    /// The `keyid` clients send (unique across consumers).
    pub key_id: String,
    /// The shared secret, inline; prefer `secret_env`.
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of an environment variable holding the shared secret.
    #[serde(default)]
    pub secret_env: Option<String>,
}

// By hand: an inline secret must not reach a log through a `{:?}` of the configuration.
impl std::fmt::Debug for HmacKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacKeyConfig")
            .field("key_id", &self.key_id)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

/// What a client certificate must carry to identify a file consumer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum MtlsIdentity {
    /// The subject distinguished name as an RFC 4514 string (`CN=app,O=Example`).
    Subject(String),
    /// A subject alternative name: the bare value (`app.example.com`,
    /// `spiffe://example.org/app`, `ops@example.com`, `192.0.2.7`) matches a SAN of any type;
    /// `DNS:`, `URI:`, `email:` or `IP:` in front matches only that type.
    San(String),
}

/// An API key of a file consumer, never written in clear in the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ApiKeyConfig {
    /// Lower-case hex SHA-256 of the key (`printf %s KEY | sha256sum`).
    Sha256(String),
    /// Name of an environment variable holding the key.
    Env(String),
}

/// A basic-auth user of a file consumer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicUserConfig {
    /// User name.
    pub username: String,
    /// Argon2 hash in PHC form (`$argon2id$v=19$...`).
    pub password_hash: String,
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For`: the right-most entry that is not a trusted proxy.
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded`: the right-most `for=` that is not a trusted proxy.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// Process-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listening sockets. Defaults to one plain HTTP listener on `127.0.0.1:8080`.
    pub listeners: Vec<ListenerConfig>,
    /// Request and connection limits applied to every listener unless it overrides them.
    pub limits: Limits,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are trusted (CIDR list).
    /// Headers from any other peer are discarded and replaced.
    pub trusted_proxies: Vec<String>,
    /// Which header of a trusted proxy names the client: `x-forwarded-for` (default) or
    /// RFC 7239 `forwarded`. Only that one is read, so a client cannot pick the other one
    /// when its proxy passes it through untouched.
    pub client_ip_header: ClientIpHeader,
    /// How long SIGTERM waits for in-flight requests before exiting.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Header that carries the request id, generated when absent.
    pub request_id_header: String,
    /// Pseudonym used in the `Via` header. Empty disables `Via`.
    pub via: String,
    /// Directory for runtime state (store, last good snapshot).
    pub data_dir: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listeners: vec![ListenerConfig::default()],
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            client_ip_header: ClientIpHeader::default(),
            drain_timeout: Duration::from_secs(30),
            request_id_header: "x-request-id".to_owned(),
            via: "turnpike".to_owned(),
            data_dir: None,
        }
    }
}

/// One listening socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name used in logs and metrics.
    #[serde(default = "default_listener_name")]
    pub name: String,
    /// `host:port` to bind. Port 0 picks a free port (useful in tests).
    pub address: String,
    /// TLS termination. Absent: plain HTTP/1.1 and HTTP/2 prior knowledge (h2c).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Per-listener override of [`Limits::max_connections`].
    #[serde(default)]
    pub max_connections: Option<usize>,
}

fn default_listener_name() -> String {
    "default".to_owned()
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            name: default_listener_name(),
            address: "127.0.0.1:8080".to_owned(),
            tls: None,
            max_connections: None,
        }
    }
}

/// TLS termination with certificates chosen by SNI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificates; the first whose names match the SNI wins, the first overall is the
    /// default for clients that send no SNI.
    pub certificates: Vec<CertificateConfig>,
    /// How often certificate files are checked for changes and reloaded.
    #[schemars(with = "String")]
    #[serde(default = "default_cert_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Client certificate verification (mTLS). Absent: no certificate is asked for.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
}

/// Verification of client certificates on a TLS listener. The files are reloaded with the
/// listener's certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// Path to a PEM bundle of the CA certificates client certificates must chain to.
    pub ca: String,
    /// `required` (default): the handshake fails without a valid certificate. `optional`:
    /// a certificate, if sent, must be valid; connections without one go on.
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Paths to PEM certificate revocation lists; a revoked certificate fails the
    /// handshake. Certificates whose issuer has no CRL here are not checked for revocation.
    #[serde(default)]
    pub crls: Vec<String>,
}

/// Whether a client certificate is needed to connect.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// No connection without a valid client certificate.
    #[default]
    Required,
    /// A certificate, if sent, must be valid; connections without one are served.
    Optional,
}

fn default_cert_reload() -> Duration {
    Duration::from_secs(10)
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Path to the PEM certificate chain.
    pub cert: String,
    /// Path to the PEM private key.
    pub key: String,
    /// Server names this certificate answers for (`*.example.com` allowed). Empty: taken from
    /// the certificate's subject alternative names.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Limits, each with a safe default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Total bytes of the request head (request line + headers). Past it: 431.
    pub max_header_bytes: usize,
    /// Number of request headers. Past it: 431.
    pub max_headers: usize,
    /// Length of the request target. Past it: 414.
    pub max_uri_length: usize,
    /// Request body bytes, enforced while streaming. Past it: 413.
    pub max_body_bytes: u64,
    /// Concurrent connections per listener; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Idle time allowed between requests on a kept-alive connection.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Time allowed to receive a complete request head; slow clients are cut off.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// HTTP/2 concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the connection is closed (reset-flood guard).
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams the server may reset because of client errors before it closes the
    /// connection (defends against "MadeYouReset"-style floods).
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_length: 8 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            max_connections: 10_000,
            keepalive_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 250,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

/// A named pool of targets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name that routes refer to.
    pub name: String,
    /// Targets (`host:port`); host names are re-resolved every `dns_refresh`.
    pub targets: Vec<TargetConfig>,
    /// Protocol spoken to the targets.
    #[serde(default)]
    pub scheme: UpstreamScheme,
    /// Use HTTP/2 to the targets (required for gRPC). With `https`, negotiated by ALPN.
    #[serde(default)]
    pub http2: bool,
    /// Load-balancing algorithm.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Health checking.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Timeouts for calls to this upstream.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retry policy.
    #[serde(default)]
    pub retries: RetryConfig,
    /// Connection pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// TLS to the targets (only with `scheme: https`).
    #[serde(default)]
    pub tls: UpstreamTls,
    /// How often host names are resolved again.
    #[schemars(with = "String")]
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub dns_refresh: Duration,
}

fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}

/// One upstream target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `host:port` or `ip:port`.
    pub address: String,
    /// Relative weight (0 drains the target).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Protocol spoken to an upstream.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamScheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTP over TLS.
    Https,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "algorithm", deny_unknown_fields)]
pub enum LoadBalancer {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest in-flight requests, weighted.
    LeastConnections,
    /// Power of two random choices compared on EWMA latency × (in-flight + 1).
    P2cEwma,
    /// Consistent hashing on a request attribute.
    ConsistentHash {
        /// What to hash.
        hash_on: HashOn,
    },
}

/// Request attribute used by consistent hashing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// The real client IP (after trusted-proxy processing).
    ClientIp,
    /// The request path.
    Path,
    /// The value of a request header.
    Header(String),
    /// The value of a cookie.
    Cookie(String),
}

/// Health checking settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Active probes. Absent: none.
    pub active: Option<ActiveHealthCheck>,
    /// Passive outlier ejection. Absent: none.
    pub passive: Option<PassiveHealthCheck>,
}

/// Active HTTP health probe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveHealthCheck {
    /// Path probed with GET.
    pub path: String,
    /// Statuses that count as healthy.
    pub expected_status: Vec<u16>,
    /// Time between probes.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Probe timeout.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes to mark an unhealthy target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to mark a healthy target unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for ActiveHealthCheck {
    fn default() -> Self {
        Self {
            path: "/health".to_owned(),
            expected_status: vec![200],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive outlier ejection from real traffic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthCheck {
    /// Consecutive failures (connect errors, timeouts, 5xx) that eject a target.
    pub consecutive_failures: u32,
    /// How long an ejected target stays out before it is tried again.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub ejection_time: Duration,
}

impl Default for PassiveHealthCheck {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
        }
    }
}

/// Timeouts for an upstream call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP (and TLS) connection establishment.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Waiting for the response head, and between response body chunks.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub read: Duration,
    /// Sending the request body: longest pause between chunks accepted by the upstream.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub write: Duration,
    /// Whole exchange until the response head, across retries. `0s` disables it.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
            total: Duration::from_secs(0),
        }
    }
}

/// Retry policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Extra attempts after the first (0 disables retries).
    pub attempts: u32,
    /// Backoff before the first retry; doubles each time, with jitter.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Upper bound of the backoff.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Response statuses that are retried for idempotent requests.
    pub on_status: Vec<u16>,
    /// Retries may add at most this fraction of the upstream's request rate.
    pub budget_ratio: f64,
    /// Retries per second always allowed, whatever the ratio says.
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 1,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            on_status: vec![502, 503, 504],
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

/// Connection pool to one upstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Idle connections kept per target.
    pub max_idle_per_target: usize,
    /// Idle connections are closed after this.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Concurrent requests in flight to the upstream; 0 means unlimited. Past it: 503.
    pub max_requests: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle_per_target: 64,
            idle_timeout: Duration::from_secs(90),
            max_requests: 0,
        }
    }
}

/// TLS settings towards an upstream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified; defaults to the target host.
    pub sni: Option<String>,
    /// PEM bundle of CAs to trust instead of the platform roots.
    pub ca: Option<String>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<String>,
    /// Client private key (PEM) for mutual TLS.
    pub client_key: Option<String>,
    /// Skip verification. Only for tests; logged loudly.
    pub insecure_skip_verify: bool,
}

/// A route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs, metrics and errors.
    pub name: String,
    /// Higher wins before specificity is considered.
    #[serde(default)]
    pub priority: i32,
    /// Host names (`api.example.com`, `*.example.com`). Empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path matchers. Empty: any path.
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Methods. Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header predicates, all of which must hold.
    #[serde(default)]
    pub headers: Vec<Predicate>,
    /// Query parameter predicates, all of which must hold.
    #[serde(default)]
    pub query: Vec<Predicate>,
    /// Cookie predicates, all of which must hold.
    #[serde(default)]
    pub cookies: Vec<Predicate>,
    /// Upstream (by name) that serves the route.
    pub upstream: String,
    /// How the forwarded path is derived from the matched one.
    #[serde(default)]
    pub rewrite: Option<PathRewrite>,
    /// `Host` sent upstream.
    #[serde(default)]
    pub upstream_host: UpstreamHost,
    /// Per-route timeouts replacing the upstream's.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Per-route override of [`Limits::max_body_bytes`].
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// The version of a versioned API this route serves: it matches only requests for that
    /// version (or, for the API's default version, requests naming none).
    #[serde(default)]
    pub api_version: Option<crate::versioning::RouteVersion>,
}

/// A path matcher. Exactly one field is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole normalised path equals this.
    Exact(String),
    /// The path equals this or continues it at a segment boundary (`/api` matches `/api`,
    /// `/api/x`, not `/apix`).
    Prefix(String),
    /// Segments with `{name}` captures: `/users/{id}/posts/{post}`. A capture matches one
    /// non-empty segment; a final `{name*}` matches the rest of the path.
    Template(String),
    /// A regular expression matched against the whole path; named groups become parameters.
    Regex(String),
}

/// A header, query or cookie predicate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    /// Name (case-insensitive for headers).
    pub name: String,
    /// The condition.
    #[serde(flatten)]
    pub test: PredicateTest,
}

/// The test a predicate applies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredicateTest {
    /// Value equals.
    Equals(String),
    /// Value starts with.
    Prefix(String),
    /// Value matches the regular expression (unanchored).
    Regex(String),
    /// Present (any value). The value must be `true`.
    Present(bool),
    /// Absent. The value must be `true`.
    Absent(bool),
}

/// How the path sent upstream is derived from the matched path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathRewrite {
    /// Remove the matched prefix (the route must use a `prefix` path).
    StripPrefix(bool),
    /// Replace the path by a template using route parameters: `/v2/users/{id}`.
    Template(String),
    /// Regex replacement on the path: `${1}` and `${name}` refer to groups.
    Regex {
        /// Pattern searched in the normalised path.
        pattern: String,
        /// Replacement.
        replacement: String,
    },
    /// Prepend a prefix to the forwarded path.
    AddPrefix(String),
}

/// The `Host` header sent upstream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamHost {
    /// The chosen target's `host:port`.
    #[default]
    Target,
    /// The client's `Host`, unchanged.
    Preserve,
    /// A fixed value.
    Rewrite(String),
}

/// Named map type used where order does not matter.
pub type Map<V> = BTreeMap<String, V>;
