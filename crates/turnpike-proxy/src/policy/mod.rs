//! Policies: the gateway's cross-cutting behaviour, compiled from configuration and run in
//! the request pipeline's `access` phase.
//!
//! # Order
//!
//! Each route gets a [`Chain`]: its policies grouped by [`Stage`] and, within a stage, by
//! `priority` (higher first, then name). A request runs the stages in this order:
//!
//! 1. **Admission** (`ip_restriction`, `user_agent`, `request_size`): refuse cheaply on the
//!    client IP and request head. CORS response headers are decided here too, so that every
//!    answer the browser gets from here on (401, 429 included) carries them.
//! 2. **Authentication** (`key_auth`, `basic_auth`, `jwt`, `oauth2_introspection`,
//!    `hmac_auth`, `mtls`): the methods are tried in order and the first whose credential is
//!    *present* decides: valid → identified, invalid → 401 `credential_invalid`. With no
//!    credential at all, the first `anonymous` application configured is used, else 401
//!    `credential_missing`. For `mtls` the credential is the client certificate the listener
//!    verified. A CORS preflight skips this stage.
//! 3. **Authorization** (`acl`), then the managed service's subscription check.
//! 4. **Limit** (`rate_limit`). Limits keyed by something known before authentication
//!    (client IP, a header, route, service, everything) run just before authentication, so
//!    failed credential guesses count. Limits keyed by application, credential or team run
//!    after the managed service's check ([`run_identity_limits`]), when the caller is known
//!    however it was identified: the route's (or its plan's instead), plus the
//!    application's own.
//! 5. **CORS**: a preflight is answered after the early limits, so preflights are limited
//!    too.
//! 6. **Inspection** (`waf`, `request_validation`, and the `Content-Digest` of a request
//!    `hmac_auth` verified): after all of the above and the managed service's checks, on
//!    the buffered body ([`inspect::run`], called by the proxy).
//!
//! # Scopes
//!
//! For each policy type, the attachments of the most specific scope that has that type win:
//! route over service over global. A disabled attachment at that scope switches the type
//! off for the route. Several attachments of one type at one scope all run (two rate limits,
//! or two authentication methods).
//!
//! # State across reloads
//!
//! A compiled policy carries state (rate-limit counters, JWKS caches, verified passwords).
//! [`PolicyCache`] keeps each compiled policy while its name, scope and configuration are
//! unchanged, so a reload that does not touch a policy does not reset it. Policies look
//! consumers up in the snapshot's index at request time, so credential changes need no
//! recompiled policy; only `jwt` depends on the store's credentials (their issuers' keys)
//! and is rebuilt when those change.

pub mod auth;
pub mod cors;
pub mod hmac;
pub mod inspect;
pub mod introspection;
pub mod jwt;
pub mod limit;
pub mod ratelimit;
pub mod resilience;
pub mod rules;
pub mod sf;
pub mod traffic;
pub mod validation;
pub mod waf;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, Response};
use turnpike_model::managed::{Consumer, Managed};
use turnpike_model::mgmt::{PolicyScope, PolicySpec};
use turnpike_model::policy::{PolicyKind, Stage};
use turnpike_model::{Config, ConfigError};

use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError};

/// One compiled policy attachment.
pub struct Compiled {
    /// The attachment's name (store policies: `team/...`).
    pub name: Arc<str>,
    /// Order within its stage (higher first).
    pub priority: i32,
    /// What it does.
    pub policy: Policy,
}

/// The compiled form of each policy type.
pub enum Policy {
    /// `key_auth`.
    KeyAuth(auth::KeyAuth),
    /// `basic_auth`.
    BasicAuth(auth::BasicAuth),
    /// `jwt` (boxed: its verifier is large and the enum is held per policy, not per request).
    Jwt(Box<auth::JwtAuth>),
    /// `ip_restriction`.
    IpRestriction(rules::IpRules),
    /// `user_agent`.
    UserAgent(rules::UserAgentRules),
    /// `request_size`.
    RequestSize(u64),
    /// `acl`.
    Acl(rules::Acl),
    /// `rate_limit`.
    RateLimit(limit::RateLimit),
    /// `cors`.
    Cors(cors::Cors),
    /// `circuit_breaker` (shared: tickets hold it).
    CircuitBreaker(Arc<resilience::Breaker>),
    /// `bulkhead`.
    Bulkhead(resilience::Bulkhead),
    /// `fallback`.
    Fallback(resilience::Fallback),
    /// `fault_injection`.
    FaultInjection(resilience::Fault),
    /// `traffic_split`.
    TrafficSplit(traffic::Split),
    /// `mirror`.
    Mirror(traffic::Mirror),
    /// `oauth2_introspection` (boxed: its cache and client are large).
    Oauth2Introspection(Box<introspection::Introspection>),
    /// `hmac_auth` (boxed: its configuration and nonce memory are large).
    HmacAuth(Box<hmac::HmacAuth>),
    /// `waf` (boxed: its rule set is large).
    Waf(Box<waf::Waf>),
    /// `request_validation`.
    RequestValidation(Box<validation::Validation>),
    /// `mtls`.
    Mtls(auth::MtlsAuth),
    /// `cache`.
    Cache(Arc<crate::cache::RouteCache>),
    /// `request_transform`.
    RequestTransform(Box<crate::transform::RequestTransform>),
    /// `response_transform`.
    ResponseTransform(Box<crate::transform::ResponseTransform>),
    /// `compression`.
    Compression(crate::transform::compress::Compression),
    /// `data_masking` (shared: call events carry it to the access log).
    DataMasking(Arc<turnpike_observe::redact::Redactor>),
    /// `aggregate`.
    Aggregate(Box<crate::transform::aggregate::Aggregate>),
    /// `grpc_transcode`.
    GrpcTranscode(Arc<crate::transcode::Transcoder>),
    /// `grpc_web`.
    GrpcWeb(crate::transcode::web::GrpcWeb),
}

impl Policy {
    fn stage(&self) -> Stage {
        match self {
            Self::IpRestriction(_) | Self::UserAgent(_) | Self::RequestSize(_) => Stage::Admission,
            Self::KeyAuth(_) | Self::BasicAuth(_) | Self::Jwt(_) => Stage::Authentication,
            Self::Acl(_) => Stage::Authorization,
            Self::RateLimit(_) => Stage::Limit,
            Self::Cors(_) => Stage::Cors,
            Self::Waf(_) | Self::RequestValidation(_) => Stage::Inspection,
            Self::CircuitBreaker(_)
            | Self::Bulkhead(_)
            | Self::Fallback(_)
            | Self::FaultInjection(_)
            | Self::TrafficSplit(_)
            | Self::Mirror(_)
            | Self::Cache(_)
            | Self::Aggregate(_)
            | Self::GrpcTranscode(_)
            | Self::GrpcWeb(_) => Stage::Upstream,
            Self::Oauth2Introspection(_) | Self::HmacAuth(_) | Self::Mtls(_) => {
                Stage::Authentication
            }
            Self::RequestTransform(_)
            | Self::ResponseTransform(_)
            | Self::Compression(_)
            | Self::DataMasking(_) => Stage::Transform,
        }
    }
}

/// The policies of one route, by stage, in running order.
#[derive(Default, Clone)]
pub struct Chain {
    /// Admission checks.
    pub admission: Vec<Arc<Compiled>>,
    /// Authentication methods, tried in order.
    pub authentication: Vec<Arc<Compiled>>,
    /// Authorization checks.
    pub authorization: Vec<Arc<Compiled>>,
    /// Rate limits keyed by what the request shows (IP, header, route, ...): they run before
    /// authentication.
    pub early_limits: Vec<Arc<Compiled>>,
    /// Rate limits keyed by the caller's identity: they run after authentication.
    pub limits: Vec<Arc<Compiled>>,
    /// CORS, at most one (the highest priority).
    pub cors: Option<Arc<Compiled>>,
    /// The policies of the upstream call.
    pub upstream: UpstreamChain,
    /// Body inspection (`waf`, `request_validation`), run by [`inspect::run`] after the
    /// access phase.
    pub inspection: Vec<Arc<Compiled>>,
}

/// The policies of a route's upstream call: at most one of each type (the highest
/// priority), mirrors excepted.
#[derive(Default, Clone)]
pub struct UpstreamChain {
    /// `fault_injection`.
    pub fault: Option<Arc<Compiled>>,
    /// `traffic_split`.
    pub split: Option<Arc<Compiled>>,
    /// `bulkhead`.
    pub bulkhead: Option<Arc<Compiled>>,
    /// `circuit_breaker`.
    pub breaker: Option<Arc<Compiled>>,
    /// `fallback`.
    pub fallback: Option<Arc<Compiled>>,
    /// `mirror`: every one runs.
    pub mirrors: Vec<Arc<Compiled>>,
    /// `cache`.
    pub cache: Option<Arc<Compiled>>,
    /// `request_transform`.
    pub request_transform: Option<Arc<Compiled>>,
    /// `response_transform`.
    pub response_transform: Option<Arc<Compiled>>,
    /// `compression`.
    pub compression: Option<Arc<Compiled>>,
    /// `data_masking`.
    pub masking: Option<Arc<Compiled>>,
    /// `aggregate`.
    pub aggregate: Option<Arc<Compiled>>,
    /// `grpc_transcode`.
    pub transcode: Option<Arc<Compiled>>,
    /// `grpc_web`.
    pub grpc_web: Option<Arc<Compiled>>,
}

impl UpstreamChain {
    /// Whether none of the policies that guard the call itself is attached (the cache,
    /// which answers before the call, and the transformations are not counted).
    pub fn is_empty(&self) -> bool {
        self.fault.is_none()
            && self.split.is_none()
            && self.bulkhead.is_none()
            && self.breaker.is_none()
            && self.fallback.is_none()
            && self.mirrors.is_empty()
    }

    /// The compiled breaker, if any.
    pub fn breaker(&self) -> Option<&Arc<resilience::Breaker>> {
        match &self.breaker.as_ref()?.policy {
            Policy::CircuitBreaker(b) => Some(b),
            _ => None,
        }
    }

    /// The compiled response cache, if any.
    pub fn cache(&self) -> Option<&Arc<crate::cache::RouteCache>> {
        match &self.cache.as_ref()?.policy {
            Policy::Cache(c) => Some(c),
            _ => None,
        }
    }

    /// The compiled request transform, if any.
    pub fn request_transform(&self) -> Option<&crate::transform::RequestTransform> {
        match &self.request_transform.as_ref()?.policy {
            Policy::RequestTransform(t) => Some(t),
            _ => None,
        }
    }

    /// The compiled response transform, if any.
    pub fn response_transform(&self) -> Option<&crate::transform::ResponseTransform> {
        match &self.response_transform.as_ref()?.policy {
            Policy::ResponseTransform(t) => Some(t),
            _ => None,
        }
    }

    /// The compiled aggregation, if any.
    pub fn aggregate(&self) -> Option<&crate::transform::aggregate::Aggregate> {
        match &self.aggregate.as_ref()?.policy {
            Policy::Aggregate(a) => Some(a),
            _ => None,
        }
    }

    /// The compiled gRPC transcoder, if any.
    pub fn transcoder(&self) -> Option<&crate::transcode::Transcoder> {
        match &self.transcode.as_ref()?.policy {
            Policy::GrpcTranscode(t) => Some(t),
            _ => None,
        }
    }

    /// The compiled gRPC-Web translation, if any.
    pub fn grpc_web(&self) -> Option<&crate::transcode::web::GrpcWeb> {
        match &self.grpc_web.as_ref()?.policy {
            Policy::GrpcWeb(w) => Some(w),
            _ => None,
        }
    }

    /// The compiled data masking, if any.
    pub fn masking(&self) -> Option<&Arc<turnpike_observe::redact::Redactor>> {
        match &self.masking.as_ref()?.policy {
            Policy::DataMasking(r) => Some(r),
            _ => None,
        }
    }

    /// The compiled fallback, if any.
    pub fn fallback(&self) -> Option<&resilience::Fallback> {
        match &self.fallback.as_ref()?.policy {
            Policy::Fallback(f) => Some(f),
            _ => None,
        }
    }

    fn push(&mut self, c: Arc<Compiled>) {
        let slot = match c.policy {
            Policy::FaultInjection(_) => &mut self.fault,
            Policy::TrafficSplit(_) => &mut self.split,
            Policy::Bulkhead(_) => &mut self.bulkhead,
            Policy::CircuitBreaker(_) => &mut self.breaker,
            Policy::Fallback(_) => &mut self.fallback,
            Policy::Cache(_) => &mut self.cache,
            Policy::RequestTransform(_) => &mut self.request_transform,
            Policy::ResponseTransform(_) => &mut self.response_transform,
            Policy::Compression(_) => &mut self.compression,
            Policy::DataMasking(_) => &mut self.masking,
            Policy::Aggregate(_) => &mut self.aggregate,
            Policy::GrpcTranscode(_) => &mut self.transcode,
            Policy::GrpcWeb(_) => &mut self.grpc_web,
            _ => {
                self.mirrors.push(c);
                return;
            }
        };
        if slot.as_ref().is_none_or(|old| rank(&c) < rank(old)) {
            *slot = Some(c);
        }
    }
}

impl Chain {
    /// Whether the route has no access-phase policy (the common, fast case). Upstream-call
    /// policies are in [`Chain::upstream`].
    pub fn is_empty(&self) -> bool {
        self.admission.is_empty()
            && self.authentication.is_empty()
            && self.authorization.is_empty()
            && self.early_limits.is_empty()
            && self.limits.is_empty()
            && self.cors.is_none()
            && self.inspection.is_empty()
    }

    /// The smallest `request_size` limit of the chain, if any.
    pub fn max_body_bytes(&self) -> Option<u64> {
        self.admission
            .iter()
            .filter_map(|c| match c.policy {
                Policy::RequestSize(max) => Some(max),
                _ => None,
            })
            .min()
    }

    fn push(&mut self, c: Arc<Compiled>) {
        match c.policy.stage() {
            Stage::Admission => self.admission.push(c),
            Stage::Authentication => self.authentication.push(c),
            Stage::Authorization => self.authorization.push(c),
            Stage::Limit if limit::identity_keyed(&c) => self.limits.push(c),
            Stage::Limit => self.early_limits.push(c),
            Stage::Cors => {
                if self.cors.as_ref().is_none_or(|old| rank(&c) < rank(old)) {
                    self.cors = Some(c);
                }
            }
            Stage::Upstream | Stage::Transform => self.upstream.push(c),
            Stage::Inspection => self.inspection.push(c),
        }
    }

    fn sort(&mut self) {
        for v in [
            &mut self.admission,
            &mut self.authentication,
            &mut self.authorization,
            &mut self.early_limits,
            &mut self.limits,
            &mut self.upstream.mirrors,
            &mut self.inspection,
        ] {
            v.sort_by(|a, b| rank(a).cmp(&rank(b)));
        }
    }
}

fn rank(c: &Compiled) -> (std::cmp::Reverse<i32>, &str) {
    (std::cmp::Reverse(c.priority), &c.name)
}

/// Everything policy-related a snapshot holds.
#[derive(Default)]
pub struct Policies {
    /// Per route, indexed like the snapshot's routes.
    pub chains: Vec<Chain>,
    /// `rate_limit` policies of applications, by application id.
    pub by_application: HashMap<String, Vec<Arc<Compiled>>>,
    /// `rate_limit` policies of plans, by plan id.
    pub by_plan: HashMap<String, Vec<Arc<Compiled>>>,
}

/// Keeps compiled policies across reloads (see the module docs).
#[derive(Default)]
pub struct PolicyCache {
    entries: HashMap<String, Arc<Compiled>>,
}

impl PolicyCache {
    /// Compiles the policies of `config` for its routes (given as names, in snapshot order,
    /// with the service id each belongs to). `managed` is the merged consumer index. On
    /// success the cache keeps exactly the policies in use; on failure it is unchanged.
    pub async fn compile(
        &mut self,
        config: &Config,
        routes: &[(&str, Option<&str>)],
        managed: &Arc<Managed>,
        errors: &mut Vec<ConfigError>,
    ) -> Policies {
        let mut entries = HashMap::new();
        let mut compiled: Vec<(&PolicySpec, Option<Arc<Compiled>>)> = Vec::new();
        for (i, spec) in config.policies.iter().enumerate() {
            if !spec.enabled {
                compiled.push((spec, None));
                continue;
            }
            let mut cache_key = format!(
                "{}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{}",
                spec.name, spec.scope, spec.policy_type, spec.priority, spec.config
            );
            if spec.policy_type == "jwt" {
                // The store's jwt credentials are part of what a `jwt` policy trusts.
                cache_key.push_str(&format!("\u{0}{:?}", managed.jwt_issuers));
            }
            let openapi = service_openapi(&spec.scope, managed);
            if spec.policy_type == "request_validation" {
                // A new release of the service may bring a new document.
                cache_key.push_str(&format!("\u{0}{openapi:?}"));
            }
            if let Some(app) = spec.config.get("anonymous").and_then(|a| a.as_str())
                && !managed.consumers.contains_key(app)
            {
                errors.push(ConfigError::at(
                    format!("policies[{i}].config.anonymous"),
                    format!("unknown application `{app}`"),
                ));
                continue;
            }
            if let Some(c) = self.entries.get(&cache_key) {
                entries.insert(cache_key, c.clone());
                compiled.push((spec, Some(c.clone())));
                continue;
            }
            let path = format!("policies[{i}]");
            let kind = match PolicyKind::parse_attachment(&spec.policy_type, &spec.config) {
                Ok(k) => k,
                Err(e) => {
                    for e in e.0 {
                        errors.push(ConfigError::at(format!("{path}.{}", e.path), e.message));
                    }
                    continue;
                }
            };
            let scope = format!("{:?}", spec.scope);
            let policy = match build(kind, managed, &spec.name, &scope, openapi).await {
                Ok(p) => p,
                Err((field, why)) => {
                    let at = if field.is_empty() {
                        format!("{path}.config")
                    } else {
                        format!("{path}.config.{field}")
                    };
                    errors.push(ConfigError::at(at, why));
                    continue;
                }
            };
            let c = Arc::new(Compiled {
                name: Arc::from(spec.name.as_str()),
                priority: spec.priority,
                policy,
            });
            entries.insert(cache_key, c.clone());
            compiled.push((spec, Some(c)));
        }

        let mut policies = Policies::default();
        for (route, service) in routes {
            policies.chains.push(chain_for(&compiled, route, *service));
        }
        for (spec, c) in &compiled {
            let (Some(c), true) = (c, spec.policy_type == "rate_limit") else {
                continue;
            };
            match &spec.scope {
                PolicyScope::Application(id) => {
                    let id = managed
                        .consumers
                        .get(id)
                        .map_or_else(|| id.clone(), |c| c.id.to_string());
                    policies
                        .by_application
                        .entry(id)
                        .or_default()
                        .push(c.clone());
                }
                PolicyScope::Plan(id) => {
                    policies
                        .by_plan
                        .entry(id.clone())
                        .or_default()
                        .push(c.clone());
                }
                _ => {}
            }
        }
        for v in policies
            .by_application
            .values_mut()
            .chain(policies.by_plan.values_mut())
        {
            v.sort_by(|a, b| rank(a).cmp(&rank(b)));
        }
        if errors.is_empty() {
            self.entries = entries;
        }
        policies
    }
}

/// The chain of one route: per type, the most specific scope's attachments.
fn chain_for(
    compiled: &[(&PolicySpec, Option<Arc<Compiled>>)],
    route: &str,
    service: Option<&str>,
) -> Chain {
    // Specificity: 2 route, 1 service, 0 global.
    let level = |scope: &PolicyScope| match scope {
        PolicyScope::Route(r) if r == route => Some(2),
        PolicyScope::Service(s) if Some(s.as_str()) == service => Some(1),
        PolicyScope::Global => Some(0),
        _ => None,
    };
    let mut best: HashMap<&str, u8> = HashMap::new();
    for (spec, _) in compiled {
        if let Some(l) = level(&spec.scope) {
            let e = best.entry(spec.policy_type.as_str()).or_insert(l);
            *e = (*e).max(l);
        }
    }
    let mut chain = Chain::default();
    for (spec, c) in compiled {
        let (Some(c), Some(l)) = (c, level(&spec.scope)) else {
            continue;
        };
        if best.get(spec.policy_type.as_str()) == Some(&l) {
            chain.push(c.clone());
        }
    }
    chain.sort();
    chain
}

async fn build(
    kind: PolicyKind,
    managed: &Managed,
    name: &str,
    scope: &str,
    service_openapi: Option<&serde_json::Value>,
) -> Result<Policy, (String, String)> {
    Ok(match kind {
        PolicyKind::KeyAuth(c) => Policy::KeyAuth(auth::KeyAuth::new(c)),
        PolicyKind::BasicAuth(c) => Policy::BasicAuth(auth::BasicAuth::new(c)),
        PolicyKind::Jwt(c) => Policy::Jwt(Box::new(auth::JwtAuth::new(c, managed)?)),
        PolicyKind::IpRestriction(c) => Policy::IpRestriction(rules::IpRules::new(&c)?),
        PolicyKind::UserAgent(c) => Policy::UserAgent(rules::UserAgentRules::new(&c)?),
        PolicyKind::RequestSize(c) => Policy::RequestSize(c.max_body_bytes),
        PolicyKind::Acl(c) => Policy::Acl(rules::Acl::new(c)),
        PolicyKind::RateLimit(c) => Policy::RateLimit(limit::RateLimit::new(name, scope, c).await?),
        PolicyKind::Cors(c) => Policy::Cors(cors::Cors::new(c)?),
        PolicyKind::CircuitBreaker(c) => {
            Policy::CircuitBreaker(Arc::new(resilience::Breaker::new(c)))
        }
        PolicyKind::Bulkhead(c) => Policy::Bulkhead(resilience::Bulkhead::new(c)),
        PolicyKind::Fallback(c) => Policy::Fallback(resilience::Fallback::new(c)?),
        PolicyKind::FaultInjection(c) => Policy::FaultInjection(resilience::Fault::new(c)?),
        PolicyKind::TrafficSplit(c) => Policy::TrafficSplit(traffic::Split::new(c)?),
        PolicyKind::Mirror(c) => Policy::Mirror(traffic::Mirror::new(c)),
        PolicyKind::Oauth2Introspection(c) => {
            Policy::Oauth2Introspection(Box::new(introspection::Introspection::new(c)?))
        }
        PolicyKind::HmacAuth(c) => Policy::HmacAuth(Box::new(hmac::HmacAuth::new(c))),
        PolicyKind::Waf(c) => Policy::Waf(Box::new(waf::Waf::new(*c)?)),
        PolicyKind::RequestValidation(c) => {
            Policy::RequestValidation(Box::new(validation::Validation::new(&c, service_openapi)?))
        }
        PolicyKind::Mtls(c) => Policy::Mtls(auth::MtlsAuth::new(c)),
        PolicyKind::Cache(c) => Policy::Cache(Arc::new(crate::cache::RouteCache::new(*c)?)),
        PolicyKind::RequestTransform(c) => {
            Policy::RequestTransform(Box::new(crate::transform::RequestTransform::new(&c)?))
        }
        PolicyKind::ResponseTransform(c) => {
            Policy::ResponseTransform(Box::new(crate::transform::ResponseTransform::new(&c)?))
        }
        PolicyKind::Compression(c) => {
            Policy::Compression(crate::transform::compress::Compression::new(c))
        }
        PolicyKind::Aggregate(c) => {
            Policy::Aggregate(Box::new(crate::transform::aggregate::Aggregate::new(&c)?))
        }
        PolicyKind::DataMasking(c) => {
            Policy::DataMasking(Arc::new(turnpike_observe::redact::Redactor::new(&c)?))
        }
        PolicyKind::GrpcTranscode(c) => {
            Policy::GrpcTranscode(Arc::new(crate::transcode::Transcoder::new(&c)?))
        }
        PolicyKind::GrpcWeb(c) => Policy::GrpcWeb(crate::transcode::web::GrpcWeb::new(&c)),
    })
}

/// Checks that a policy compiles against `managed` (the applications it names exist, its
/// keys parse), without building any state. The control plane leaves out a store policy
/// that fails this, so it cannot make the whole configuration fail to load.
pub fn precheck(
    kind: &PolicyKind,
    scope: &PolicyScope,
    managed: &Managed,
) -> Result<(), (String, String)> {
    let anonymous = match kind {
        PolicyKind::KeyAuth(c) => c.anonymous.as_deref(),
        PolicyKind::BasicAuth(c) => c.anonymous.as_deref(),
        PolicyKind::Jwt(c) => c.anonymous.as_deref(),
        PolicyKind::Oauth2Introspection(c) => c.anonymous.as_deref(),
        PolicyKind::HmacAuth(c) => c.anonymous.as_deref(),
        PolicyKind::Mtls(c) => c.anonymous.as_deref(),
        _ => None,
    };
    if let Some(app) = anonymous
        && !managed.consumers.contains_key(app)
    {
        return Err(("anonymous".into(), format!("unknown application `{app}`")));
    }
    match kind {
        PolicyKind::Jwt(c) => auth::JwtAuth::new(c.clone(), managed).map(drop),
        PolicyKind::IpRestriction(c) => rules::IpRules::new(c).map(drop),
        PolicyKind::UserAgent(c) => rules::UserAgentRules::new(c).map(drop),
        PolicyKind::Cors(c) => cors::Cors::new(c.clone()).map(drop),
        PolicyKind::Fallback(c) => resilience::Fallback::new(c.clone()).map(drop),
        PolicyKind::FaultInjection(c) => resilience::Fault::new(c.clone()).map(drop),
        PolicyKind::TrafficSplit(c) => traffic::Split::new(c.clone()).map(drop),
        PolicyKind::Oauth2Introspection(c) => {
            introspection::Introspection::new(c.clone()).map(drop)
        }
        PolicyKind::Waf(c) => waf::Waf::new((**c).clone()).map(drop),
        PolicyKind::RequestValidation(c) => {
            validation::Validation::new(c, service_openapi(scope, managed)).map(drop)
        }
        PolicyKind::RateLimit(c) if c.mode == turnpike_model::policy::RateLimitMode::Redis => {
            limit::check_redis_url(&c.redis.url)
        }
        // Store policies come from Admin API users, who must not make the gateway read (and
        // echo in errors) files of its machine: their `.proto` files are inline, and imports
        // resolve only among them. They must compile, or the policy is left out.
        PolicyKind::GrpcTranscode(c) => {
            if !c.proto_files.is_empty() || !c.import_paths.is_empty() {
                return Err((
                    "proto_files".into(),
                    "Admin API policies give their .proto files inline in `proto_sources`; \
                     `proto_files` and `import_paths` are for the configuration file"
                        .into(),
                ));
            }
            crate::transcode::Transcoder::new(c).map(drop)
        }
        _ => Ok(()),
    }
}

/// The OpenAPI document of the managed service a policy attachment covers (service scope, or
/// a route of a managed service), for `request_validation`'s `use_service_openapi`.
fn service_openapi<'a>(scope: &PolicyScope, managed: &'a Managed) -> Option<&'a serde_json::Value> {
    let binding = match scope {
        PolicyScope::Route(r) => managed.routes.get(r),
        PolicyScope::Service(id) => managed.routes.values().find(|b| *b.id == **id),
        _ => None,
    }?;
    binding.openapi.as_deref()
}

/// What the access phase learns about the caller, for later stages and the upstream.
#[derive(Default)]
pub struct Identity {
    /// The application, when one was identified.
    pub consumer: Option<Arc<Consumer>>,
    /// A stable id of the credential used (for limits keyed by credential).
    pub credential: Option<String>,
    /// Scopes the credential carries.
    pub scopes: Vec<String>,
    /// Token claims (JWT).
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether an authentication policy accepted the request (or chose the anonymous
    /// application).
    pub authenticated: bool,
    /// Whether the application is the anonymous one (no credential was presented).
    pub anonymous: bool,
    /// What a verified message signature requires of the body, checked once it is read.
    pub body_check: Option<hmac::BodyCheck>,
}

/// What a request brings to the policies.
pub struct Request<'a> {
    /// The real client IP (after trusted proxies).
    pub client_ip: IpAddr,
    /// The route's name.
    pub route: &'a str,
    /// The route's service id, if it belongs to one (the snapshot's, shared).
    pub service: Option<&'a Arc<str>>,
    /// Whether the client connection is TLS (the `https` scheme of signed requests).
    pub tls: bool,
    /// The route's own body limit, checked against `Content-Length` right after the CORS
    /// headers are decided, so a browser can read the 413.
    pub max_body_bytes: u64,
    /// The client certificate the listener verified (mTLS), if any.
    pub client_cert: Option<&'a crate::clientcert::ClientCert>,
}

/// Runs the access stages of `chain`. `Ok(Some(resp))` answers the request (a preflight);
/// `Ok(None)` lets it go on. Headers to add to whatever response the client gets (CORS,
/// `RateLimit`, `WWW-Authenticate`) are put into `out_headers`, also on error.
pub async fn run_access(
    chain: &Chain,
    managed: &Managed,
    req: &Request<'_>,
    parts: &mut Parts,
    identity: &mut Identity,
    out_headers: &mut HeaderMap,
) -> Result<Option<Response<ProxyBody>>, GatewayError> {
    let preflight = match &chain.cors {
        Some(c) => {
            let Policy::Cors(cors) = &c.policy else {
                return Err(internal());
            };
            cors.decide(&parts.method, &parts.headers, out_headers)
        }
        None => None,
    };
    rules::check_size(&parts.headers, req.max_body_bytes)?;

    for p in &chain.admission {
        match &p.policy {
            Policy::IpRestriction(r) => r.check(req.client_ip)?,
            Policy::UserAgent(r) => r.check(&parts.headers)?,
            Policy::RequestSize(max) => rules::check_size(&parts.headers, *max)?,
            _ => return Err(internal()),
        }
    }

    // Limits that do not depend on who calls count every request, failed credential
    // guesses included.
    if !chain.early_limits.is_empty() {
        limit::enforce(
            &chain.early_limits,
            req,
            identity,
            &parts.headers,
            out_headers,
        )
        .await?;
    }

    // A preflight from an origin the policy refuses is answered now, after the limits.
    let preflight = preflight.transpose()?;
    if preflight.is_none() && !chain.authentication.is_empty() {
        auth::authenticate(
            &chain.authentication,
            managed,
            req,
            parts,
            identity,
            out_headers,
        )
        .await?;
        for p in &chain.authorization {
            let Policy::Acl(acl) = &p.policy else {
                return Err(internal());
            };
            acl.check(identity)?;
        }
    } else if preflight.is_none() && !chain.authorization.is_empty() {
        // An `acl` with no authentication method on the route cannot know the caller.
        return Err(GatewayError::new(
            ErrorKind::CredentialMissing,
            "this route requires an authenticated application",
        ));
    }

    Ok(preflight)
}

impl Policies {
    /// Whether any application or plan has limits of its own.
    pub fn has_consumer_limits(&self) -> bool {
        !self.by_application.is_empty() || !self.by_plan.is_empty()
    }
}

/// Runs the identity-keyed rate limits, once the caller is known (by an authentication
/// policy or a managed service's key): the route's, or instead its plan's when the caller's
/// subscription has a plan with limits (the plan belongs to the service's team), plus the
/// application's own (its team's: they add to the provider's limits, never replace them).
pub async fn run_identity_limits(
    chain: &Chain,
    policies: &Policies,
    managed: &Managed,
    req: &Request<'_>,
    identity: &Identity,
    headers: &HeaderMap,
    out_headers: &mut HeaderMap,
) -> Result<(), GatewayError> {
    let mut base: &[Arc<Compiled>] = &chain.limits;
    let mut own: &[Arc<Compiled>] = &[];
    if let Some(consumer) = &identity.consumer {
        if let Some(o) = policies.by_application.get(&*consumer.id) {
            own = o;
        }
        if let Some(service) = req.service
            && !policies.by_plan.is_empty()
            && let Some(Some(plan)) = managed
                .subscriptions
                .get(&(Arc::clone(&consumer.id), Arc::clone(service)))
            && let Some(by_plan) = policies.by_plan.get(plan)
        {
            base = by_plan;
        }
    }
    match (base.is_empty(), own.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => limit::enforce(base, req, identity, headers, out_headers).await,
        (true, false) => limit::enforce(own, req, identity, headers, out_headers).await,
        (false, false) => {
            let all: Vec<Arc<Compiled>> = base.iter().chain(own).cloned().collect();
            limit::enforce(&all, req, identity, headers, out_headers).await
        }
    }
}

fn internal() -> GatewayError {
    GatewayError::new(ErrorKind::Internal, "policy chain out of order")
}

/// The consumer index of a snapshot: the store's, with the file's consumers added. An `hmac`
/// key whose `secret_env` is not set is an error naming it: a signing partner would
/// otherwise be locked out without a word.
pub fn merged_consumers(config: &Config, errors: &mut Vec<ConfigError>) -> Arc<Managed> {
    if config.consumers.is_empty() {
        return config.managed.clone();
    }
    let mut m = (*config.managed).clone();
    for (i, c) in config.consumers.iter().enumerate() {
        let name: Arc<str> = Arc::from(c.name.as_str());
        let consumer = Arc::new(Consumer {
            id: Arc::clone(&name),
            name,
            team: Arc::from(""),
            groups: c.groups.clone(),
        });
        m.consumers.insert(c.name.clone(), consumer.clone());
        for k in &c.api_keys {
            let hash = match k {
                turnpike_model::ApiKeyConfig::Sha256(h) => h.to_ascii_lowercase(),
                turnpike_model::ApiKeyConfig::Env(var) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => crate::access::api_key_hash(v.as_bytes()),
                    _ => continue,
                },
            };
            m.api_keys.insert(hash, consumer.clone());
        }
        for id in &c.oauth_clients {
            m.oauth_clients.insert(id.clone(), consumer.clone());
        }
        for (j, k) in c.hmac.iter().enumerate() {
            let secret = match (&k.secret, &k.secret_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => v,
                    _ => {
                        errors.push(ConfigError::at(
                            format!("consumers[{i}].hmac[{j}].secret_env"),
                            format!("environment variable `{var}` is not set"),
                        ));
                        continue;
                    }
                },
                (None, None) => continue,
            };
            m.hmac_keys.insert(
                k.key_id.clone(),
                turnpike_model::managed::HmacKey {
                    secret: Arc::from(secret.into_bytes()),
                    consumer: consumer.clone(),
                },
            );
        }
        for id in &c.mtls {
            match id {
                turnpike_model::MtlsIdentity::Subject(s) => {
                    m.mtls_subjects.insert(s.clone(), consumer.clone());
                }
                turnpike_model::MtlsIdentity::San(s) => {
                    let key = turnpike_model::managed::mtls_san_key(s);
                    m.mtls_sans.insert(key, consumer.clone());
                }
            }
        }
        for b in &c.basic_auth {
            m.basic_users.insert(
                b.username.clone(),
                turnpike_model::managed::BasicUser {
                    password_hash: b.password_hash.clone(),
                    consumer: consumer.clone(),
                },
            );
        }
    }
    Arc::new(m)
}
