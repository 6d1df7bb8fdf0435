//! Policy types: the typed configuration of each policy, its JSON Schema and where it runs.
//!
//! A policy attachment (in the file's `policies:` or the store's policy objects) names a
//! `type` and gives a `config`; [`PolicyKind::parse`] turns the pair into one of the typed
//! configs below, naming the failing field when it cannot. The gateway compiles the typed
//! config once per snapshot.
//!
//! Policies run in the `access` phase in a fixed order of stages ([`Stage`]), then by
//! `priority` (higher first) within a stage. For each type, the attachments of the most
//! specific scope win: route over service over global, and after authentication, application
//! over plan over the route's. A disabled attachment at a more specific scope switches its
//! type off there.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::shaping::*;
pub use crate::traffic::*;
pub use crate::transform::*;
use crate::{ConfigError, ConfigErrors};

/// When a policy runs: the stages of the `access` phase, then the upstream call. The order
/// of the variants is the order of the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Cheap checks on the connection and request head: IP rules, User-Agent rules, size.
    Admission,
    /// Who is calling: the first authentication method whose credential is present wins.
    Authentication,
    /// What the caller may do: groups, scopes, claims (the subscription check follows it).
    Authorization,
    /// Rate limits and quotas.
    Limit,
    /// CORS: a preflight is answered here, after the limits and without authentication.
    Cors,
    /// Body inspection (`waf`, `request_validation`): after the whole access phase, the
    /// managed service's checks and identity limits included, on the buffered body. Callers
    /// that are refused anyway never make the gateway buffer and scan their bodies.
    Inspection,
    /// Transformation of the request sent upstream and of the answer the client gets
    /// (`request_transform`, `response_transform`, `compression`): after inspection, so
    /// the checks above judge what the client sent.
    Transform,
    /// The call to the upstream: traffic split, mirroring, fault injection, bulkhead,
    /// circuit breaker and fallback (see [`crate::traffic`]).
    Upstream,
}

impl Stage {
    /// Every stage, in running order.
    pub const ALL: [Stage; 8] = [
        Stage::Admission,
        Stage::Authentication,
        Stage::Authorization,
        Stage::Limit,
        Stage::Cors,
        Stage::Inspection,
        Stage::Transform,
        Stage::Upstream,
    ];

    /// The stage's name in the Admin API (`admission`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Admission => "admission",
            Stage::Authentication => "authentication",
            Stage::Authorization => "authorization",
            Stage::Limit => "limit",
            Stage::Cors => "cors",
            Stage::Inspection => "inspection",
            Stage::Transform => "transform",
            Stage::Upstream => "upstream",
        }
    }
}

/// Every policy type with its typed configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "config", rename_all = "snake_case")]
pub enum PolicyKind {
    /// API keys in a header, query parameter or cookie.
    KeyAuth(KeyAuthConfig),
    /// HTTP basic authentication against basic-auth credentials.
    BasicAuth(BasicAuthConfig),
    /// Bearer JWTs verified against issuers' keys.
    Jwt(JwtConfig),
    /// Allow or deny client IP ranges.
    IpRestriction(IpRestrictionConfig),
    /// Consumer groups, scopes and claims required.
    Acl(AclConfig),
    /// Request rate limits.
    RateLimit(RateLimitConfig),
    /// Cross-origin resource sharing.
    Cors(CorsConfig),
    /// A route's request body limit.
    RequestSize(RequestSizeConfig),
    /// User-Agent deny and allow lists.
    UserAgent(UserAgentConfig),
    /// Web application firewall: SQL injection, XSS, path traversal, command injection.
    Waf(Box<WafConfig>),
    /// Request validation against a JSON Schema or an OpenAPI 3 document.
    RequestValidation(Box<RequestValidationConfig>),
    /// OAuth2 bearer tokens checked by token introspection (RFC 7662).
    Oauth2Introspection(OAuth2IntrospectionConfig),
    /// HTTP message signatures (RFC 9421) with `hmac-sha256` and a shared secret per key id.
    HmacAuth(HmacAuthConfig),
    /// Circuit breaker per route or per upstream target.
    CircuitBreaker(CircuitBreakerConfig),
    /// Bounded concurrency per route or upstream.
    Bulkhead(BulkheadConfig),
    /// What to answer when the upstream call cannot be made.
    Fallback(FallbackConfig),
    /// Delays and errors injected for resilience testing.
    FaultInjection(FaultInjectionConfig),
    /// Canary and A/B upstream choice.
    TrafficSplit(TrafficSplitConfig),
    /// Copies of requests to a shadow upstream.
    Mirror(MirrorConfig),
    /// The listener-verified client certificate (mTLS) mapped to an application.
    Mtls(MtlsConfig),
    /// Response cache with HTTP semantics.
    Cache(Box<CacheConfig>),
    /// Changes to the request sent upstream: method, path, headers, query, body.
    RequestTransform(Box<RequestTransformConfig>),
    /// Changes to the answer: status, headers, body.
    ResponseTransform(Box<ResponseTransformConfig>),
    /// Response compression negotiated with `Accept-Encoding`.
    Compression(CompressionConfig),
    /// Redaction of sensitive data in responses and logged bodies.
    DataMasking(Box<DataMaskingConfig>),
    /// A composite answer from several concurrent upstream calls.
    Aggregate(Box<AggregateConfig>),
    /// REST/JSON in front of a gRPC upstream, from `.proto` files.
    GrpcTranscode(Box<crate::grpc::GrpcTranscodeConfig>),
    /// gRPC-Web clients in front of a gRPC upstream.
    GrpcWeb(crate::grpc::GrpcWebConfig),
}

/// The policy type names, in a stable order.
pub const POLICY_TYPES: [&str; 28] = [
    "key_auth",
    "basic_auth",
    "jwt",
    "ip_restriction",
    "acl",
    "rate_limit",
    "cors",
    "request_size",
    "user_agent",
    "circuit_breaker",
    "bulkhead",
    "fallback",
    "fault_injection",
    "traffic_split",
    "mirror",
    "oauth2_introspection",
    "waf",
    "request_validation",
    "hmac_auth",
    "mtls",
    "cache",
    "request_transform",
    "response_transform",
    "compression",
    "data_masking",
    "aggregate",
    "grpc_transcode",
    "grpc_web",
];

impl PolicyKind {
    /// Parses `config` as the configuration of policy type `policy_type`. Errors carry the
    /// field path inside `config`.
    pub fn parse(policy_type: &str, config: &Value) -> Result<Self, ConfigErrors> {
        fn typed<T: serde::de::DeserializeOwned>(config: &Value) -> Result<T, ConfigErrors> {
            // `null` (an attachment with no config) means all defaults.
            let config = if config.is_null() {
                Value::Object(Default::default())
            } else {
                config.clone()
            };
            serde_path_to_error::deserialize(config).map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                ConfigError::at(path, e.inner().to_string()).into()
            })
        }
        let kind = match policy_type {
            "key_auth" => Self::KeyAuth(typed(config)?),
            "basic_auth" => Self::BasicAuth(typed(config)?),
            "jwt" => Self::Jwt(typed(config)?),
            "ip_restriction" => Self::IpRestriction(typed(config)?),
            "acl" => Self::Acl(typed(config)?),
            "rate_limit" => Self::RateLimit(typed(config)?),
            "cors" => Self::Cors(typed(config)?),
            "request_size" => Self::RequestSize(typed(config)?),
            "user_agent" => Self::UserAgent(typed(config)?),
            "circuit_breaker" => Self::CircuitBreaker(typed(config)?),
            "bulkhead" => Self::Bulkhead(typed(config)?),
            "fallback" => Self::Fallback(typed(config)?),
            "fault_injection" => Self::FaultInjection(typed(config)?),
            "traffic_split" => Self::TrafficSplit(typed(config)?),
            "mirror" => Self::Mirror(typed(config)?),
            "oauth2_introspection" => Self::Oauth2Introspection(typed(config)?),
            "hmac_auth" => Self::HmacAuth(typed(config)?),
            "waf" => Self::Waf(typed(config)?),
            "request_validation" => Self::RequestValidation(typed(config)?),
            "mtls" => Self::Mtls(typed(config)?),
            "cache" => Self::Cache(typed(config)?),
            "request_transform" => Self::RequestTransform(typed(config)?),
            "response_transform" => Self::ResponseTransform(typed(config)?),
            "compression" => Self::Compression(typed(config)?),
            "data_masking" => Self::DataMasking(typed(config)?),
            "aggregate" => Self::Aggregate(typed(config)?),
            "grpc_transcode" => Self::GrpcTranscode(typed(config)?),
            "grpc_web" => Self::GrpcWeb(typed(config)?),
            other => {
                return Err(ConfigError::at(
                    "",
                    format!(
                        "unknown policy type `{other}`; known types: {}",
                        POLICY_TYPES.join(", ")
                    ),
                )
                .into());
            }
        };
        kind.check()
            .map_err(|(path, why)| ConfigError::at(path, why))?;
        Ok(kind)
    }

    /// Like [`PolicyKind::parse`], with error paths relative to the attachment: `type` for an
    /// unknown type, `config.<field>` for a bad configuration.
    pub fn parse_attachment(policy_type: &str, config: &Value) -> Result<Self, ConfigErrors> {
        Self::parse(policy_type, config).map_err(|e| {
            ConfigErrors(
                e.0.into_iter()
                    .map(|e| {
                        let path = match (e.path.is_empty(), stage_of(policy_type).is_none()) {
                            (true, true) => "type".to_owned(),
                            (true, false) => "config".to_owned(),
                            (false, _) => format!("config.{}", e.path),
                        };
                        ConfigError::at(path, e.message)
                    })
                    .collect(),
            )
        })
    }

    /// The type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::KeyAuth(_) => "key_auth",
            Self::BasicAuth(_) => "basic_auth",
            Self::Jwt(_) => "jwt",
            Self::IpRestriction(_) => "ip_restriction",
            Self::Acl(_) => "acl",
            Self::RateLimit(_) => "rate_limit",
            Self::Cors(_) => "cors",
            Self::RequestSize(_) => "request_size",
            Self::UserAgent(_) => "user_agent",
            Self::Waf(_) => "waf",
            Self::RequestValidation(_) => "request_validation",
            Self::Oauth2Introspection(_) => "oauth2_introspection",
            Self::HmacAuth(_) => "hmac_auth",
            Self::CircuitBreaker(_) => "circuit_breaker",
            Self::Bulkhead(_) => "bulkhead",
            Self::Fallback(_) => "fallback",
            Self::FaultInjection(_) => "fault_injection",
            Self::TrafficSplit(_) => "traffic_split",
            Self::Mirror(_) => "mirror",
            Self::Mtls(_) => "mtls",
            Self::Cache(_) => "cache",
            Self::RequestTransform(_) => "request_transform",
            Self::ResponseTransform(_) => "response_transform",
            Self::Compression(_) => "compression",
            Self::DataMasking(_) => "data_masking",
            Self::Aggregate(_) => "aggregate",
            Self::GrpcTranscode(_) => "grpc_transcode",
            Self::GrpcWeb(_) => "grpc_web",
        }
    }

    /// The upstreams (by name) the policy sends requests to, with the field path of each.
    pub fn upstream_refs(&self) -> Vec<(String, &str)> {
        match self {
            Self::TrafficSplit(c) => c.upstreams(),
            Self::Mirror(c) => vec![("upstream".into(), c.upstream.as_str())],
            Self::Fallback(FallbackConfig {
                upstream: Some(u), ..
            }) => vec![("upstream".into(), u.as_str())],
            Self::Aggregate(c) => c
                .calls
                .iter()
                .enumerate()
                .map(|(i, call)| (format!("calls[{i}].upstream"), call.upstream.as_str()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The stage the type runs in.
    pub fn stage(&self) -> Stage {
        stage_of(self.type_name()).unwrap_or(Stage::Admission)
    }

    /// Checks what serde cannot: value ranges and parseable patterns. Returns the field path
    /// (inside `config`) and the reason.
    fn check(&self) -> Result<(), (String, String)> {
        match self {
            Self::KeyAuth(c) => {
                if c.sources.is_empty() {
                    return Err(("sources".into(), "name at least one place to look".into()));
                }
                for (i, s) in c.sources.iter().enumerate() {
                    if s.name.is_empty() {
                        return Err((format!("sources[{i}].name"), "must not be empty".into()));
                    }
                    if s.location == KeyLocation::Header
                        && http::HeaderName::from_bytes(s.name.as_bytes()).is_err()
                    {
                        return Err((
                            format!("sources[{i}].name"),
                            format!("`{}` is not a valid header name", s.name),
                        ));
                    }
                }
            }
            Self::BasicAuth(_) => {}
            Self::Jwt(c) => {
                for (i, iss) in c.issuers.iter().enumerate() {
                    let given = [
                        iss.secret_env.is_some(),
                        iss.secret.is_some(),
                        iss.public_key.is_some(),
                        iss.jwks.is_some(),
                        iss.jwks_url.is_some(),
                        iss.discovery || iss.discovery_url.is_some(),
                    ]
                    .iter()
                    .filter(|b| **b)
                    .count();
                    if given != 1 {
                        return Err((
                            format!("issuers[{i}]"),
                            "give exactly one of `secret_env`, `secret`, `public_key`, `jwks`, `jwks_url`, `discovery`"
                                .into(),
                        ));
                    }
                }
                if http::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
                    return Err(("header".into(), "not a valid header name".into()));
                }
            }
            Self::IpRestriction(c) => {
                for (field, list) in [("allow", &c.allow), ("deny", &c.deny)] {
                    for (i, cidr) in list.iter().enumerate() {
                        parse_cidr(cidr).map_err(|e| (format!("{field}[{i}]"), e))?;
                    }
                }
                if c.allow.is_empty() && c.deny.is_empty() {
                    return Err(("allow".into(), "give `allow` or `deny` ranges".into()));
                }
            }
            Self::Acl(_) => {}
            Self::RateLimit(c) => {
                if c.limits.is_empty() {
                    return Err(("limits".into(), "give at least one limit".into()));
                }
                for (i, l) in c.limits.iter().enumerate() {
                    if l.requests == 0 {
                        return Err((format!("limits[{i}].requests"), "must be at least 1".into()));
                    }
                    if l.per.is_zero() {
                        return Err((format!("limits[{i}].per"), "must be longer than 0".into()));
                    }
                }
                if let RateLimitKey::Header { name } = &c.key {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(("key.name".into(), "not a valid header name".into()));
                    }
                }
                if c.mode == RateLimitMode::Redis && c.redis.url.is_empty() {
                    return Err(("redis.url".into(), "required in redis mode".into()));
                }
                if c.max_keys == 0 {
                    return Err(("max_keys".into(), "must be at least 1".into()));
                }
            }
            Self::Cors(c) => {
                for (i, o) in c.allow_origins.iter().enumerate() {
                    check_origin_pattern(o).map_err(|e| (format!("allow_origins[{i}]"), e))?;
                    if o == "*" && c.allow_credentials {
                        return Err((
                            format!("allow_origins[{i}]"),
                            "`*` cannot be combined with allow_credentials: list the origins"
                                .into(),
                        ));
                    }
                }
            }
            Self::RequestSize(_) => {}
            Self::UserAgent(c) => {
                for (field, list) in [("deny", &c.deny), ("allow", &c.allow)] {
                    for (i, re) in list.iter().enumerate() {
                        user_regex(re)
                            .map(drop)
                            .map_err(|e| (format!("{field}[{i}]"), e))?;
                    }
                }
            }
            Self::CircuitBreaker(c) => c.check()?,
            Self::Bulkhead(c) => c.check()?,
            Self::Fallback(c) => c.check()?,
            Self::FaultInjection(c) => c.check()?,
            Self::TrafficSplit(c) => c.check()?,
            Self::Mirror(c) => c.check()?,
            Self::Oauth2Introspection(c) => c.check()?,
            Self::HmacAuth(c) => c.check()?,
            Self::Waf(c) => c.check()?,
            Self::RequestValidation(c) => c.check()?,
            Self::Mtls(c) => c.check()?,
            Self::Cache(c) => c.check()?,
            Self::RequestTransform(c) => c.check()?,
            Self::ResponseTransform(c) => c.check()?,
            Self::Compression(c) => c.check()?,
            Self::DataMasking(c) => c.check()?,
            Self::Aggregate(c) => c.check()?,
            Self::GrpcTranscode(c) => c.check()?,
            Self::GrpcWeb(c) => c.check()?,
        }
        Ok(())
    }
}

/// The stage of a policy type, by name.
pub fn stage_of(policy_type: &str) -> Option<Stage> {
    Some(match policy_type {
        "ip_restriction" | "user_agent" | "request_size" => Stage::Admission,
        "key_auth" | "basic_auth" | "jwt" => Stage::Authentication,
        "acl" => Stage::Authorization,
        "rate_limit" => Stage::Limit,
        "cors" => Stage::Cors,
        "waf" | "request_validation" => Stage::Inspection,
        "circuit_breaker" | "bulkhead" | "fallback" | "fault_injection" | "traffic_split"
        | "mirror" | "cache" | "aggregate" | "grpc_transcode" | "grpc_web" => Stage::Upstream,
        "request_transform" | "response_transform" | "compression" | "data_masking" => {
            Stage::Transform
        }
        "oauth2_introspection" | "hmac_auth" | "mtls" => Stage::Authentication,
        _ => return None,
    })
}

/// The JSON Schema of a policy type's `config`, or `None` for an unknown type.
pub fn policy_schema(policy_type: &str) -> Option<Value> {
    fn schema<T: JsonSchema>() -> Value {
        schemars::schema_for!(T).to_value()
    }
    Some(match policy_type {
        "key_auth" => schema::<KeyAuthConfig>(),
        "basic_auth" => schema::<BasicAuthConfig>(),
        "jwt" => schema::<JwtConfig>(),
        "ip_restriction" => schema::<IpRestrictionConfig>(),
        "acl" => schema::<AclConfig>(),
        "rate_limit" => schema::<RateLimitConfig>(),
        "cors" => schema::<CorsConfig>(),
        "request_size" => schema::<RequestSizeConfig>(),
        "user_agent" => schema::<UserAgentConfig>(),
        "circuit_breaker" => schema::<CircuitBreakerConfig>(),
        "bulkhead" => schema::<BulkheadConfig>(),
        "fallback" => schema::<FallbackConfig>(),
        "fault_injection" => schema::<FaultInjectionConfig>(),
        "traffic_split" => schema::<TrafficSplitConfig>(),
        "mirror" => schema::<MirrorConfig>(),
        "oauth2_introspection" => schema::<OAuth2IntrospectionConfig>(),
        "hmac_auth" => schema::<HmacAuthConfig>(),
        "waf" => schema::<WafConfig>(),
        "request_validation" => schema::<RequestValidationConfig>(),
        "mtls" => schema::<MtlsConfig>(),
        "cache" => schema::<CacheConfig>(),
        "request_transform" => schema::<RequestTransformConfig>(),
        "response_transform" => schema::<ResponseTransformConfig>(),
        "compression" => schema::<CompressionConfig>(),
        "data_masking" => schema::<DataMaskingConfig>(),
        "aggregate" => schema::<AggregateConfig>(),
        "grpc_transcode" => schema::<crate::grpc::GrpcTranscodeConfig>(),
        "grpc_web" => schema::<crate::grpc::GrpcWebConfig>(),
        _ => return None,
    })
}

/// Parses an IP network (`10.0.0.0/8`) or a single address (`192.0.2.7`).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}` is not an IP address or CIDR range"))
}

/// Compiles a user-given regular expression with a size limit, so a pattern cannot make the
/// gateway build an enormous automaton.
pub fn user_regex(re: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression: {e}"))
}

/// Checks a CORS origin pattern: `*`, an exact origin (`https://app.example.com`), or one with
/// a leading wildcard label (`https://*.example.com`).
pub fn check_origin_pattern(o: &str) -> Result<(), String> {
    if o == "*" {
        return Ok(());
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return Err(format!(
            "`{o}` is not an origin: write `https://host[:port]`"
        ));
    };
    if !matches!(scheme, "http" | "https") {
        return Err(format!("`{o}`: the scheme must be http or https"));
    }
    let wildcard = rest.starts_with("*.");
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    if wildcard && !host.split(':').next().unwrap_or("").contains('.') {
        return Err(format!(
            "`{o}`: a wildcard needs a domain under it (`https://*.example.com`, not `*.com`)"
        ));
    }
    if host.is_empty()
        || host.contains(['/', '*', '?', '#', '@', ' '])
        || host.ends_with('.')
        || o.ends_with('/')
    {
        return Err(format!(
            "`{o}` is not an origin: write `https://host[:port]` or `https://*.domain`, without a path"
        ));
    }
    Ok(())
}

fn yes() -> bool {
    true
}

/// Where an API key is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyLocation {
    /// A request header.
    Header,
    /// A query parameter.
    Query,
    /// A cookie.
    Cookie,
}

/// One place an API key may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeySource {
    /// Header, query parameter or cookie.
    #[serde(rename = "in")]
    pub location: KeyLocation,
    /// Its name.
    pub name: String,
}

fn default_key_sources() -> Vec<KeySource> {
    vec![KeySource {
        location: KeyLocation::Header,
        name: "x-api-key".into(),
    }]
}

/// `key_auth`: the application's API key, compared by its SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    /// Where to look, in order (default: the `X-API-Key` header).
    #[serde(default = "default_key_sources")]
    pub sources: Vec<KeySource>,
    /// Remove the key before the request goes upstream (default true).
    #[serde(default = "yes")]
    pub hide_credentials: bool,
    /// Application (`team/name`, or a file consumer's name) for requests with no credential.
    #[serde(default)]
    pub anonymous: Option<String>,
}

/// `basic_auth`: `Authorization: Basic` against basic-auth credentials (Argon2 hashes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// Realm named in `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Remove `Authorization` before the request goes upstream (default true).
    #[serde(default = "yes")]
    pub hide_credentials: bool,
    /// See [`KeyAuthConfig::anonymous`].
    #[serde(default)]
    pub anonymous: Option<String>,
}

fn default_realm() -> String {
    "turnpike".into()
}

/// One trusted JWT issuer, with exactly one source of keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// Expected `iss`.
    pub issuer: String,
    /// Environment variable holding an HMAC secret (HS256/384/512).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// An HMAC secret given inline; prefer `secret_env`.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519).
    #[serde(default)]
    pub public_key: Option<String>,
    /// A JWKS document, inline.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// A JWKS URL, fetched and cached.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// OpenID Connect discovery: the keys come from the `jwks_uri` of the issuer's
    /// `/.well-known/openid-configuration` (or `discovery_url`), looked up again at every
    /// key refresh.
    #[serde(default)]
    pub discovery: bool,
    /// Where the discovery document is, when it is not under the issuer's URL.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Accepted audiences for this issuer; empty: the policy's `audiences`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Application (`team/name` or file consumer) this issuer's tokens map to, unless
    /// `consumer_claim` names one.
    #[serde(default)]
    pub application: Option<String>,
}

/// `jwt`: bearer tokens verified against trusted issuers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Trusted issuers.
    #[serde(default)]
    pub issuers: Vec<JwtIssuer>,
    /// Also trust the issuers of `jwt` credentials in the store. Their tokens identify the
    /// credential's application only (never through `consumer_claim`). Off by default: any
    /// team can register a credential, and so an issuer.
    #[serde(default)]
    pub trust_credentials: bool,
    /// Accepted audiences (`aud` must contain one); empty: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Header carrying `Bearer <token>`.
    #[serde(default = "default_auth_header")]
    pub header: String,
    /// Cookie that may carry the token instead.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Claim whose value names the application (`team/name`, id, or file consumer).
    #[serde(default)]
    pub consumer_claim: Option<String>,
    /// Claims every token must have.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Whether `exp` is required (default true).
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Remove the token before the request goes upstream (default false: upstreams often
    /// want it).
    #[serde(default)]
    pub hide_credentials: bool,
    /// How long fetched JWKS documents are used.
    #[serde(default = "default_jwks_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_cache_ttl: Duration,
    /// The least time between two fetches of one JWKS for an unknown `kid`.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_min_refresh: Duration,
    /// See [`KeyAuthConfig::anonymous`].
    #[serde(default)]
    pub anonymous: Option<String>,
}

/// A field of the client certificate that can name an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MtlsField {
    /// The subject distinguished name, as an RFC 4514 string (`CN=app,O=Example`).
    Subject,
    /// Any subject alternative name (DNS, URI, email, IP).
    San,
}

/// `mtls`: the client certificate the listener verified (`client_auth`) identifies the
/// application, through `mtls` credentials and file consumers' `mtls` entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// Certificate fields looked up, in order; the first that maps to an application wins
    /// (default: subject, then SANs).
    #[serde(rename = "match", default = "default_mtls_match")]
    pub match_fields: Vec<MtlsField>,
    /// Refuse requests without a verified client certificate (401 `credential_missing`)
    /// even when another method on the route has a credential or an `anonymous` application
    /// is configured: for routes on a listener whose `client_auth` mode is `optional`.
    #[serde(default)]
    pub required: bool,
    /// Refuse certificates that map to no application (default true); with `false` any
    /// verified certificate is accepted, without an application when none matches.
    #[serde(default = "yes")]
    pub require_application: bool,
    /// Send the certificate's subject, SANs, serial, SHA-256 fingerprint and expiry upstream
    /// as `X-Client-Cert-*` headers (default false).
    #[serde(default)]
    pub upstream_headers: bool,
    /// See [`KeyAuthConfig::anonymous`].
    #[serde(default)]
    pub anonymous: Option<String>,
}

fn default_mtls_match() -> Vec<MtlsField> {
    vec![MtlsField::Subject, MtlsField::San]
}

impl MtlsConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.match_fields.is_empty() {
            return Err((
                "match".into(),
                "name at least one field: subject or san".into(),
            ));
        }
        for (i, f) in self.match_fields.iter().enumerate() {
            if self.match_fields[..i].contains(f) {
                return Err((format!("match[{i}]"), "listed twice".into()));
            }
        }
        Ok(())
    }
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_auth_header() -> String {
    "authorization".into()
}
fn default_jwks_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(10)
}

/// `ip_restriction`: the real client IP (after trusted proxies) against CIDR lists. Deny wins;
/// with an allow list, only listed ranges pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionConfig {
    /// Ranges allowed (empty: all not denied).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Ranges denied.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `acl`: what an authenticated caller needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// The application must be in one of these consumer groups (empty: not checked).
    #[serde(default)]
    pub allow_groups: Vec<String>,
    /// The application must be in none of these.
    #[serde(default)]
    pub deny_groups: Vec<String>,
    /// Scopes the credential must carry (all of them).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Claims the token must carry with one of the given values.
    #[serde(default)]
    pub required_claims: std::collections::BTreeMap<String, Vec<String>>,
}

/// Rate-limit algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitAlgorithm {
    /// Counter per aligned window.
    FixedWindow,
    /// Exact for bursts; no double allowance at window edges.
    #[default]
    SlidingWindow,
    /// GCRA: a bucket of `requests` refilled evenly over `per`.
    TokenBucket,
    /// Throttling: requests spaced evenly, delayed up to `max_delay`, then refused.
    LeakyBucket,
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Requests allowed per window.
    pub requests: u64,
    /// Window length, like `1s`, `10s`, `1d`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub per: Duration,
    /// Algorithm.
    #[serde(default)]
    pub algorithm: RateLimitAlgorithm,
    /// Leaky bucket only: the longest a request is delayed before it is refused.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_delay: Duration,
}

/// What requests are counted together.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "by", rename_all = "snake_case", deny_unknown_fields)]
pub enum RateLimitKey {
    /// The real client IP.
    #[default]
    Ip,
    /// The application (the client IP for anonymous requests).
    Application,
    /// The credential (the client IP without one).
    Credential,
    /// A request header's value (requests without it share one bucket).
    Header {
        /// Header name.
        name: String,
    },
    /// The route.
    Route,
    /// The service (the route for routes outside services).
    Service,
    /// The application's team (the client IP for anonymous requests).
    Team,
    /// One bucket for everything the policy covers.
    Global,
}

/// Where counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by every node.
    Redis,
}

/// Redis settings of a cluster-wide limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisLimitConfig {
    /// `redis://host:port[/db]`.
    #[serde(default)]
    pub url: String,
    /// Prefix of the counter keys.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// How long a check may take before Redis counts as unreachable.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// When Redis is unreachable: let requests through (`true`, the default) or refuse them
    /// with 503.
    #[serde(default = "yes")]
    pub fail_open: bool,
}

impl Default for RedisLimitConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: default_redis_prefix(),
            timeout: default_redis_timeout(),
            fail_open: true,
        }
    }
}

fn default_redis_prefix() -> String {
    "turnpike:rl:".into()
}
fn default_redis_timeout() -> Duration {
    Duration::from_millis(100)
}

/// `rate_limit`: one or more limits over requests counted by `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Limits applied together (say per second and per day).
    pub limits: Vec<LimitConfig>,
    /// What is counted together.
    #[serde(default)]
    pub key: RateLimitKey,
    /// Local (this process) or Redis (cluster-wide).
    #[serde(default)]
    pub mode: RateLimitMode,
    /// Redis settings for `mode: redis`.
    #[serde(default)]
    pub redis: RedisLimitConfig,
    /// Send `RateLimit-Policy` and `RateLimit` headers (default true).
    #[serde(default = "yes")]
    pub headers: bool,
    /// Most distinct keys tracked in local mode; beyond it, the stalest are forgotten.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

/// `cors`: which browser origins may call, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins: exact (`https://app.example.com`), a wildcard label
    /// (`https://*.example.com`), or `*` (not with credentials).
    pub allow_origins: Vec<String>,
    /// Methods allowed (default GET, HEAD, POST).
    #[serde(default = "default_cors_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers allowed (default: those the preflight asks for are not echoed; list
    /// them).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers exposed to scripts.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Allow cookies and `Authorization`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight.
    #[serde(default = "default_cors_max_age", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_age: Duration,
}

fn default_cors_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}
fn default_cors_max_age() -> Duration {
    Duration::from_secs(600)
}

/// `request_size`: the largest request body accepted (413 past it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSizeConfig {
    /// Bytes.
    pub max_body_bytes: u64,
}

/// `user_agent`: refuse clients by `User-Agent` (regular expressions). Allow wins over deny.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserAgentConfig {
    /// Patterns refused.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Patterns always let through.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Refuse requests without a `User-Agent`.
    #[serde(default)]
    pub deny_missing: bool,
}

/// `oauth2_introspection`: bearer tokens sent to the authorization server's introspection
/// endpoint (RFC 7662), the answers cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2IntrospectionConfig {
    /// The introspection endpoint (`https://idp.example.com/oauth2/introspect`).
    pub endpoint: String,
    /// The gateway's client id at the authorization server (HTTP basic client
    /// authentication).
    pub client_id: String,
    /// Environment variable holding the gateway's client secret.
    pub client_secret_env: String,
    /// Header carrying `Bearer <token>` (default `authorization`).
    #[serde(default = "default_auth_header")]
    pub header: String,
    /// Query parameter that may carry the token instead (not by default: URLs end up in
    /// logs).
    #[serde(default)]
    pub query: Option<String>,
    /// `token_type_hint` sent with each request (default `access_token`; empty: none).
    #[serde(default = "default_token_type_hint")]
    pub token_type_hint: String,
    /// Introspection response member naming the application: its value is looked up among
    /// `oauth_client` credentials and file consumers' `oauth_clients` (default `client_id`).
    #[serde(default = "default_client_claim")]
    pub consumer_claim: String,
    /// Refuse active tokens whose client maps to no application (default true); with
    /// `false` they are accepted without an application.
    #[serde(default = "yes")]
    pub require_application: bool,
    /// Expected `iss` of the response, when given.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted audiences (`aud` must contain one); empty: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Longest an active answer is reused (never past the token's `exp`).
    #[serde(default = "default_introspection_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub cache_ttl: Duration,
    /// How long an inactive answer is reused.
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub negative_cache_ttl: Duration,
    /// Most answers cached; past it, expired ones are dropped, then arbitrary ones.
    #[serde(default = "default_introspection_entries")]
    pub cache_max_entries: usize,
    /// Longest one introspection call may take (connect, TLS, answer).
    #[serde(default = "default_introspection_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// After a failed call, uncached tokens are refused with 503 for this long without
    /// calling the endpoint again.
    #[serde(default = "default_failure_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub failure_backoff: Duration,
    /// Largest introspection response accepted, in bytes.
    #[serde(default = "default_introspection_bytes")]
    pub max_response_bytes: usize,
    /// Introspection calls in flight at once; past it, requests with an uncached token get
    /// 503 at once (without entering the failure backoff), so a flood of random tokens
    /// cannot flood the authorization server.
    #[serde(default = "default_introspection_calls")]
    pub max_concurrent_calls: usize,
    /// Remove the token before the request goes upstream (default false).
    #[serde(default)]
    pub hide_credentials: bool,
    /// See [`KeyAuthConfig::anonymous`].
    #[serde(default)]
    pub anonymous: Option<String>,
}

impl OAuth2IntrospectionConfig {
    fn check(&self) -> Result<(), (String, String)> {
        let uri: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e| ("endpoint".to_owned(), format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err((
                "endpoint".into(),
                "write an absolute http(s) URL with a host".into(),
            ));
        }
        if self.client_id.is_empty() {
            return Err(("client_id".into(), "must not be empty".into()));
        }
        if self.client_secret_env.is_empty() {
            return Err(("client_secret_env".into(), "must not be empty".into()));
        }
        if http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            return Err(("header".into(), "not a valid header name".into()));
        }
        if self.query.as_deref() == Some("") {
            return Err(("query".into(), "must not be empty".into()));
        }
        if self.consumer_claim.is_empty() {
            return Err(("consumer_claim".into(), "must not be empty".into()));
        }
        if self.max_concurrent_calls == 0 {
            return Err(("max_concurrent_calls".into(), "must be at least 1".into()));
        }
        if self.cache_max_entries == 0 {
            return Err(("cache_max_entries".into(), "must be at least 1".into()));
        }
        if self.timeout.is_zero() {
            return Err(("timeout".into(), "must be longer than 0".into()));
        }
        if self.max_response_bytes < 64 {
            return Err(("max_response_bytes".into(), "must be at least 64".into()));
        }
        Ok(())
    }
}

fn default_token_type_hint() -> String {
    "access_token".into()
}
fn default_client_claim() -> String {
    "client_id".into()
}
fn default_introspection_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_introspection_entries() -> usize {
    10_000
}
fn default_introspection_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_failure_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_introspection_calls() -> usize {
    64
}
fn default_introspection_bytes() -> usize {
    64 * 1024
}
/// The derived components (RFC 9421 §2.2) `hmac_auth` can verify in requests.
pub const HMAC_DERIVED_COMPONENTS: [&str; 8] = [
    "@method",
    "@target-uri",
    "@authority",
    "@scheme",
    "@request-target",
    "@path",
    "@query",
    "@query-param",
];

/// Largest `nonce_cache_size` accepted: each entry holds a nonce of up to 128 bytes.
pub const MAX_NONCE_CACHE: usize = 1_000_000;

/// `hmac_auth`: HTTP message signatures (RFC 9421, `Signature-Input` and `Signature`) made
/// with `hmac-sha256` and the secret of the signature's `keyid`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacAuthConfig {
    /// The label of the signature to verify (`sig1` in `Signature-Input: sig1=...`); default:
    /// the first signature of the request.
    #[serde(default)]
    pub label: Option<String>,
    /// Components the signature must cover. Default: `@method` and `@target-uri`. A required
    /// `@target-uri` is also satisfied by `@authority`, `@path` and `@query` together (or
    /// `@authority` and `@request-target`).
    #[serde(default = "default_hmac_components")]
    pub required_components: Vec<String>,
    /// Require `content-digest` to be covered when the request has a body, and check the
    /// digest against the body (default true).
    #[serde(default = "yes")]
    pub require_content_digest: bool,
    /// Largest body read to check its digest; 413 past it.
    #[serde(default = "default_hmac_body_bytes")]
    pub max_body_bytes: u64,
    /// Oldest `created` accepted.
    #[serde(default = "default_hmac_max_age", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_age: Duration,
    /// Clock difference allowed between client and gateway on `created` and `expires`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub clock_skew: Duration,
    /// Refuse signatures without `created` (default true).
    #[serde(default = "yes")]
    pub require_created: bool,
    /// Refuse signatures without `nonce` (default false). A `nonce` that is present is
    /// always checked against replays.
    #[serde(default)]
    pub require_nonce: bool,
    /// Most nonces remembered at once (each for `max_age` plus `clock_skew`); when full of
    /// live nonces, signed requests with a new nonce get 503 `auth_unavailable`.
    #[serde(default = "default_nonce_entries")]
    pub nonce_cache_size: usize,
    /// Remove `Signature` and `Signature-Input` before the request goes upstream (default
    /// false: an upstream may verify the signature again).
    #[serde(default)]
    pub hide_credentials: bool,
    /// See [`KeyAuthConfig::anonymous`].
    #[serde(default)]
    pub anonymous: Option<String>,
}

impl HmacAuthConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if let Some(label) = &self.label {
            let ok = label
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && label.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'_' | b'-' | b'.' | b'*')
                });
            if !ok {
                return Err((
                    "label".into(),
                    "a label is lower-case letters, digits, `_-.*`, starting with a letter".into(),
                ));
            }
        }
        for (i, c) in self.required_components.iter().enumerate() {
            let ok = if c.starts_with('@') {
                HMAC_DERIVED_COMPONENTS.contains(&c.as_str()) && c != "@query-param"
            } else {
                !c.is_empty()
                    && c.bytes().all(|b| !b.is_ascii_uppercase())
                    && http::HeaderName::from_bytes(c.as_bytes()).is_ok()
            };
            if !ok {
                return Err((
                    format!("required_components[{i}]"),
                    format!(
                        "`{c}` is not a lower-case header name or one of @method, @target-uri, \
                         @authority, @scheme, @request-target, @path, @query"
                    ),
                ));
            }
        }
        if self.max_age.is_zero() {
            return Err(("max_age".into(), "must be longer than 0".into()));
        }
        if self.required_components.is_empty() {
            return Err((
                "required_components".into(),
                "must name at least `@method` and the target: a signature over nothing \
                 would authorise any request"
                    .into(),
            ));
        }
        if !(1..=MAX_NONCE_CACHE).contains(&self.nonce_cache_size) {
            return Err((
                "nonce_cache_size".into(),
                format!("must be between 1 and {MAX_NONCE_CACHE}"),
            ));
        }
        if self.max_body_bytes == 0 && self.require_content_digest {
            return Err((
                "max_body_bytes".into(),
                "must be at least 1 when require_content_digest is on".into(),
            ));
        }
        Ok(())
    }
}

fn default_hmac_components() -> Vec<String> {
    vec!["@method".into(), "@target-uri".into()]
}
fn default_hmac_body_bytes() -> u64 {
    1024 * 1024
}
fn default_hmac_max_age() -> Duration {
    Duration::from_secs(300)
}
fn default_nonce_entries() -> usize {
    100_000
}

pub use crate::protect::*;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_type_parses_defaults_and_has_a_schema() {
        for t in POLICY_TYPES {
            assert!(policy_schema(t).is_some(), "{t}");
            assert!(stage_of(t).is_some(), "{t}");
        }
        let k = PolicyKind::parse("key_auth", &Value::Null).unwrap();
        assert_eq!(k.type_name(), "key_auth");
        assert_eq!(k.stage(), Stage::Authentication);
    }

    #[test]
    fn errors_name_the_field() {
        let e = PolicyKind::parse(
            "rate_limit",
            &json!({"limits": [{"requests": 0, "per": "1s"}]}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "limits[0].requests");
        let e = PolicyKind::parse("rate_limit", &json!({"limits": [{"requests": 5}]})).unwrap_err();
        assert!(e.0[0].message.contains("per"), "{e:?}");
        let e = PolicyKind::parse("ip_restriction", &json!({"deny": ["10.0.0.0/8", "nope"]}))
            .unwrap_err();
        assert_eq!(e.0[0].path, "deny[1]");
        let e = PolicyKind::parse(
            "cors",
            &json!({"allow_origins": ["*"], "allow_credentials": true}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "allow_origins[0]");
        let e = PolicyKind::parse("nope", &Value::Null).unwrap_err();
        assert!(e.0[0].message.contains("unknown policy type"));
        let e = PolicyKind::parse("jwt", &json!({"issuers": [{"issuer": "x"}]})).unwrap_err();
        assert_eq!(e.0[0].path, "issuers[0]");
        let e = PolicyKind::parse(
            "oauth2_introspection",
            &json!({"endpoint": "/introspect", "client_id": "gw", "client_secret_env": "S"}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "endpoint");
        let e = PolicyKind::parse(
            "oauth2_introspection",
            &json!({"endpoint": "http://idp/i", "client_id": "gw", "client_secret_env": "S",
                    "cache_max_entries": 0}),
        )
        .unwrap_err();
        assert_eq!(e.0[0].path, "cache_max_entries");
        let e = PolicyKind::parse("mtls", &json!({"match": ["san", "san"]})).unwrap_err();
        assert_eq!(e.0[0].path, "match[1]");
        let e = PolicyKind::parse("mtls", &json!({"match": []})).unwrap_err();
        assert_eq!(e.0[0].path, "match");
        let PolicyKind::Mtls(m) = PolicyKind::parse("mtls", &Value::Null).unwrap() else {
            panic!("not mtls");
        };
        assert_eq!(m.match_fields, [MtlsField::Subject, MtlsField::San]);
        assert!(m.require_application && !m.required && !m.upstream_headers);
    }

    #[test]
    fn hmac_auth_configs_are_checked_by_field() {
        let c = PolicyKind::parse("hmac_auth", &Value::Null).unwrap();
        let PolicyKind::HmacAuth(c) = c else {
            panic!("not hmac_auth");
        };
        assert_eq!(c.required_components, ["@method", "@target-uri"]);
        assert_eq!(c.max_age, Duration::from_secs(300));
        assert_eq!(c.clock_skew, Duration::from_secs(30));
        assert!(c.require_created && c.require_content_digest && !c.require_nonce);
        for (config, path) in [
            (
                json!({"required_components": ["@method", "@status"]}),
                "required_components[1]",
            ),
            (
                json!({"required_components": ["Content-Type"]}),
                "required_components[0]",
            ),
            (json!({"label": "Sig1"}), "label"),
            (json!({"max_age": "0s"}), "max_age"),
            (json!({"nonce_cache_size": 0}), "nonce_cache_size"),
            (json!({"nonce_cache_size": 1_000_001}), "nonce_cache_size"),
            (json!({"required_components": []}), "required_components"),
            (json!({"max_body_bytes": 0}), "max_body_bytes"),
            (json!({"algorithm": "x"}), "algorithm"),
        ] {
            let e = PolicyKind::parse("hmac_auth", &config).unwrap_err();
            assert_eq!(e.0[0].path, path, "{config}: {e:?}");
        }
        assert!(
            PolicyKind::parse(
                "hmac_auth",
                &json!({"required_components": ["@authority", "content-digest", "x-date"],
                        "require_content_digest": false, "max_body_bytes": 0})
            )
            .is_ok()
        );
    }

    #[test]
    fn origin_patterns() {
        assert!(check_origin_pattern("https://a.example.com").is_ok());
        assert!(check_origin_pattern("https://*.example.com").is_ok());
        assert!(check_origin_pattern("http://localhost:3000").is_ok());
        for bad in [
            "example.com",
            "https://a.com/",
            "ftp://a.com",
            "https://*",
            "https://a.*.com",
            "https://*.com",
        ] {
            assert!(check_origin_pattern(bad).is_err(), "{bad}");
        }
    }
}
