//! The control plane: turns what the management store holds into gateway configuration and
//! keeps a running gateway in step with it.
//!
//! ```text
//! store ──fetch──► StoreState ──compile──► StorePart ─┐
//!   (objects + served releases, serde,    (routes,    ├─merge─► Config ─► Gateway::reload
//!    saved as last-good-store.json)        upstreams, │
//!                                          Managed)   │
//! declarative file ───────────────────────────────────┘
//! ```
//!
//! What is served from the store is each service's latest *release*, not its live route
//! objects: editing a route changes nothing at the gateway until the service is published
//! again, and a rollback is a new release with old content. Upstreams, credentials and
//! subscriptions are read live: they are operations, not API design.

pub mod alerts;
pub mod analytics;
pub mod calllog;
pub mod quota;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use turnpike_model::managed::{
    BasicUser, Consumer, HmacKey, JwtIssuerBinding, Managed, ServiceBinding,
};
use turnpike_model::mgmt::{
    ApplicationSpec, ConsumerGroupSpec, CredentialMethod, CredentialSpec, Kind, Lifecycle,
    PlanSpec, PolicyScope, PolicySpec, RouteSpec, SecretSource, SecretSpec, ServiceSpec,
    SubscriptionSpec, TeamSpec, UpstreamSpec,
};
use turnpike_model::policy::PolicyKind;
use turnpike_model::{Config, ConfigErrors, RouteConfig, UpstreamConfig};
use turnpike_proxy::gateway::Gateway;
use turnpike_store::{Object, Release, Store, StoreError};

/// Kinds the gateway needs from the store.
const SERVED_KINDS: [Kind; 10] = [
    Kind::Team,
    Kind::Upstream,
    Kind::Service,
    Kind::Application,
    Kind::Credential,
    Kind::ConsumerGroup,
    Kind::Plan,
    Kind::Subscription,
    Kind::Policy,
    // Only where a secret is (an environment variable or a file), for `hmac` credentials.
    Kind::Secret,
];

/// File name of the saved store state in the data directory.
pub const SAVED_STATE: &str = "last-good-store.json";

/// Everything the gateway's configuration is compiled from, as read from the store at one
/// version. Serialisable, so a node can save it and start from it when the store is down.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    /// The store version the objects were read at.
    pub version: i64,
    /// Objects of the kinds the gateway needs.
    pub objects: Vec<Object>,
    /// The latest release of every service that is not a draft.
    pub releases: Vec<Release>,
}

/// Reads the current [`StoreState`].
pub async fn fetch(store: &Store) -> Result<StoreState, StoreError> {
    let kinds: Vec<&str> = SERVED_KINDS.iter().map(|k| k.as_str()).collect();
    let loaded = store.load_all(&kinds).await?;
    let mut releases = Vec::new();
    for service in loaded
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Service.as_str())
    {
        if served(service).is_some()
            && let Some(release) = store.latest_release("service", &service.id).await?
        {
            releases.push(release);
        }
    }
    Ok(StoreState {
        version: loaded.version,
        objects: loaded.objects,
        releases,
    })
}

/// The lifecycle of a service object if the gateway serves it (anything but a draft).
fn served(service: &Object) -> Option<Lifecycle> {
    service
        .state
        .as_deref()
        .and_then(Lifecycle::parse)
        .filter(|l| *l != Lifecycle::Draft)
}

/// The store's contribution to the gateway configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorePart {
    /// Upstreams, named `team/upstream`.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes of served releases, named `team/service/route`.
    pub routes: Vec<RouteConfig>,
    /// Service bindings and consumer indexes.
    pub managed: Managed,
    /// Policies, their targets resolved: routes by compiled name, services, applications
    /// and plans by id.
    pub policies: Vec<PolicySpec>,
    /// Objects that could not be used, and why. They are left out; the rest is served.
    pub warnings: Vec<String>,
}

/// Compiles a [`StoreState`]. Pure but for one thing: the secrets `hmac` credentials name
/// are read from their environment variable or file here, since the gateway needs their
/// values and the store never holds them; the same state and secrets always give the same
/// part. An object
/// that cannot be used (a release naming an upstream deleted since) is left out with a
/// warning rather than failing everything: one team's mistake must not freeze every other
/// team's changes.
pub fn compile(state: &StoreState) -> StorePart {
    let mut part = StorePart::default();
    let of = |kind: Kind| {
        state
            .objects
            .iter()
            .filter(move |o| o.kind == kind.as_str())
    };
    let teams: HashMap<&str, TeamSpec> = of(Kind::Team)
        .filter_map(|o| spec::<TeamSpec>(o, &mut Vec::new()).map(|t| (o.id.as_str(), t)))
        .collect();
    let team_names: HashMap<&str, String> =
        teams.iter().map(|(id, t)| (*id, t.name.clone())).collect();
    let team_of = |o: &Object| -> Option<&String> { team_names.get(o.team_id.as_deref()?) };

    let mut upstream_names = HashSet::new();
    // Policies of releases, checked once the consumers they may name are known.
    let mut released_policies: Vec<(PolicySpec, String, String)> = Vec::new();
    for o in of(Kind::Upstream) {
        let (Some(team), Some(mut u)) = (team_of(o), spec::<UpstreamSpec>(o, &mut part.warnings))
        else {
            continue;
        };
        u.name = format!("{team}/{}", o.name);
        upstream_names.insert(u.name.clone());
        part.upstreams.push(u);
    }

    let releases: HashMap<&str, &Release> = state
        .releases
        .iter()
        .map(|r| (r.object_id.as_str(), r))
        .collect();
    // (team name, service name) → service id, for subscriptions.
    let mut service_ids: HashMap<(String, String), String> = HashMap::new();
    for o in of(Kind::Service) {
        let (Some(team), Some(lifecycle)) = (team_of(o), served(o)) else {
            continue;
        };
        service_ids.insert((team.clone(), o.name.clone()), o.id.clone());
        let Some(release) = releases.get(o.id.as_str()) else {
            part.warnings
                .push(format!("service {team}/{}: not published yet", o.name));
            continue;
        };
        let Some(space) = o.team_id.as_deref().and_then(|id| teams.get(id)) else {
            continue;
        };
        compile_release(
            &mut part,
            space,
            o,
            lifecycle,
            release,
            &upstream_names,
            &mut released_policies,
        );
    }

    // Applications, their groups and their credentials.
    let mut groups: HashMap<(String, String), Vec<String>> = HashMap::new();
    for o in of(Kind::ConsumerGroup) {
        let (Some(team), Some(g)) = (team_of(o), spec::<ConsumerGroupSpec>(o, &mut part.warnings))
        else {
            continue;
        };
        // Qualified by team: another team's group of the same name is another group.
        for app in g.applications {
            groups
                .entry((team.clone(), app))
                .or_default()
                .push(format!("{team}/{}", g.name));
        }
    }
    let mut apps: HashMap<(String, String), Arc<Consumer>> = HashMap::new();
    for o in of(Kind::Application) {
        let (Some(team), Some(_)) = (team_of(o), spec::<ApplicationSpec>(o, &mut part.warnings))
        else {
            continue;
        };
        let key = (team.clone(), o.name.clone());
        let mut app_groups = groups.remove(&key).unwrap_or_default();
        app_groups.sort();
        let consumer = Arc::new(Consumer {
            id: Arc::from(o.id.as_str()),
            name: Arc::from(o.name.as_str()),
            team: Arc::from(team.as_str()),
            groups: app_groups,
        });
        part.managed
            .consumers
            .insert(o.id.clone(), consumer.clone());
        part.managed
            .consumers
            .insert(format!("{team}/{}", o.name), consumer.clone());
        apps.insert(key, consumer);
    }
    // (team name, secret name) → where its value is.
    let secrets: HashMap<(String, String), SecretSource> = of(Kind::Secret)
        .filter_map(|o| {
            let team = team_of(o)?.clone();
            let s = spec::<SecretSpec>(o, &mut part.warnings)?;
            Some(((team, o.name.clone()), s.source))
        })
        .collect();
    let mut mtls_claims = std::collections::HashSet::new();
    for o in of(Kind::Credential) {
        let (Some(team), Some(c)) = (team_of(o), spec::<CredentialSpec>(o, &mut part.warnings))
        else {
            continue;
        };
        let Some(app) = apps.get(&(team.clone(), c.application.clone())) else {
            continue;
        };
        match c.method {
            CredentialMethod::ApiKey { hash, .. } if !hash.is_empty() => {
                part.managed
                    .api_keys
                    .insert(hash.to_ascii_lowercase(), app.clone());
            }
            CredentialMethod::Basic {
                username,
                password_hash,
                ..
            } if !password_hash.is_empty() => {
                // One team must not shadow another's user: the first credential keeps the name.
                if part.managed.basic_users.contains_key(&username) {
                    part.warnings.push(format!(
                        "credential `{}` ({}): basic-auth user `{username}` already exists; left out",
                        o.name, o.id
                    ));
                    continue;
                }
                part.managed.basic_users.insert(
                    username,
                    BasicUser {
                        password_hash,
                        consumer: app.clone(),
                    },
                );
            }
            CredentialMethod::Jwt {
                issuer,
                jwks_url,
                discovery,
                public_key,
                secret,
            } => {
                if discovery && (jwks_url.is_some() || public_key.is_some()) {
                    part.warnings.push(format!(
                        "credential `{}` ({}): give one of `jwks_url`, `public_key` or `discovery`; left out",
                        o.name, o.id
                    ));
                    continue;
                }
                if secret.is_some() && jwks_url.is_none() && public_key.is_none() && !discovery {
                    part.warnings.push(format!(
                        "credential `{}` ({}): HMAC secrets of jwt credentials are not used yet; \
                         give the issuer a public key or JWKS URL",
                        o.name, o.id
                    ));
                    continue;
                }
                if part.managed.jwt_issuers.iter().any(|b| b.issuer == issuer) {
                    part.warnings.push(format!(
                        "credential `{}` ({}): issuer `{issuer}` is already bound to an application; left out",
                        o.name, o.id
                    ));
                    continue;
                }
                part.managed.jwt_issuers.push(JwtIssuerBinding {
                    issuer,
                    jwks_url,
                    discovery,
                    public_key,
                    secret: None,
                    consumer: app.clone(),
                });
            }
            CredentialMethod::OauthClient { client_id } if !client_id.is_empty() => {
                // As for basic-auth users: the first credential keeps the client id.
                if part.managed.oauth_clients.contains_key(&client_id) {
                    part.warnings.push(format!(
                        "credential `{}` ({}): OAuth2 client `{client_id}` is already bound to an application; left out",
                        o.name, o.id
                    ));
                    continue;
                }
                part.managed.oauth_clients.insert(client_id, app.clone());
            }
            CredentialMethod::Hmac { key_id, secret } if !key_id.is_empty() => {
                let left_out =
                    |why: String| format!("credential `{}` ({}): {why}; left out", o.name, o.id);
                // As for basic-auth users: the first credential keeps the key id.
                if part.managed.hmac_keys.contains_key(&key_id) {
                    part.warnings.push(left_out(format!(
                        "key id `{key_id}` is already bound to an application"
                    )));
                    continue;
                }
                let value = match secrets.get(&(team.clone(), secret.clone())) {
                    Some(source) => read_secret(source),
                    None => Err(format!("secret `{secret}` does not exist")),
                };
                match value {
                    Ok(value) => {
                        part.managed.hmac_keys.insert(
                            key_id,
                            HmacKey {
                                secret: Arc::from(value),
                                consumer: app.clone(),
                            },
                        );
                    }
                    Err(why) => part.warnings.push(left_out(why)),
                }
            }
            CredentialMethod::Mtls { subject, san } => {
                let (what, index, key) = match (subject, san) {
                    (Some(s), None) if !s.is_empty() => {
                        ("subject", &mut part.managed.mtls_subjects, s)
                    }
                    (None, Some(s)) if !s.is_empty() => (
                        "SAN",
                        &mut part.managed.mtls_sans,
                        turnpike_model::managed::mtls_san_key(&s),
                    ),
                    _ => {
                        part.warnings.push(format!(
                            "credential `{}` ({}): an mtls credential names exactly one of subject or san; left out",
                            o.name, o.id
                        ));
                        continue;
                    }
                };
                // The Admin API refuses duplicates; a store written otherwise (an import)
                // may still hold one, and then the first credential keeps the name.
                let claim = if what == "SAN" {
                    turnpike_model::managed::mtls_san_claim(&key)
                } else {
                    format!("subject\u{0}{key}")
                };
                if !mtls_claims.insert(claim) {
                    part.warnings.push(format!(
                        "credential `{}` ({}): certificate {what} `{key}` is already bound to an application; left out",
                        o.name, o.id
                    ));
                    continue;
                }
                index.insert(key, app.clone());
            }
            _ => {}
        }
    }
    let plan_ids: HashMap<(String, String), String> = of(Kind::Plan)
        .filter_map(|o| Some(((team_of(o)?.clone(), o.name.clone()), o.id.clone())))
        .collect();
    for o in of(Kind::Subscription) {
        if o.state.as_deref() != Some("approved") {
            continue;
        }
        let (Some(team), Some(s)) = (team_of(o), spec::<SubscriptionSpec>(o, &mut part.warnings))
        else {
            continue;
        };
        if let (Some(app), Some(service)) = (
            apps.get(&(team.clone(), s.application.clone())),
            service_ids.get(&(s.service_team.clone(), s.service.clone())),
        ) {
            let plan = s
                .plan
                .as_ref()
                .and_then(|p| plan_ids.get(&(s.service_team.clone(), p.clone())))
                .cloned();
            part.managed
                .subscriptions
                .insert((Arc::clone(&app.id), Arc::from(service.as_str())), plan);
        }
    }

    compile_plans(&mut part, of(Kind::Plan), &team_of);

    for (policy, team, label) in released_policies {
        push_policy(&mut part, policy, &team, &label);
    }
    // Live policies: global ones and those of applications and plans (operations, not API
    // design; a service's and its routes' policies come with its releases).
    for o in of(Kind::Policy) {
        let (Some(team), Some(mut p)) = (team_of(o), spec::<PolicySpec>(o, &mut part.warnings))
        else {
            continue;
        };
        let resolved = match &p.scope {
            PolicyScope::Global => Some(PolicyScope::Global),
            PolicyScope::Application(a) => apps
                .get(&(team.clone(), a.clone()))
                .map(|c| PolicyScope::Application(c.id.to_string())),
            // A plan no approved subscription uses has no request to apply to.
            PolicyScope::Plan(plan) => plan_ids
                .get(&(team.clone(), plan.clone()))
                .filter(|id| {
                    part.managed
                        .subscriptions
                        .values()
                        .any(|p| p.as_ref() == Some(*id))
                })
                .map(|id| PolicyScope::Plan(id.clone())),
            PolicyScope::Service(_) | PolicyScope::Route(_) => continue,
        };
        let label = format!("policy `{}` ({})", o.name, o.id);
        match resolved {
            Some(scope) => {
                p.scope = scope;
                p.name = format!("{team}/{}", p.name);
                push_policy(&mut part, p, team, &label);
            }
            None => part
                .warnings
                .push(format!("{label}: its target does not exist; left out")),
        }
    }
    part
}

/// What the plans approved subscriptions use add: their quotas (enforced by the gateway's
/// quota counters) and their rate limits, each plan's as one `rate_limit` policy at plan
/// scope keyed by application (so they run like a plan's own `rate_limit` policies, through
/// the same limiter).
fn compile_plans<'o, 't>(
    part: &mut StorePart,
    plans: impl Iterator<Item = &'o Object>,
    team_of: &dyn Fn(&Object) -> Option<&'t String>,
) {
    for o in plans {
        let used = part
            .managed
            .subscriptions
            .values()
            .any(|p| p.as_deref() == Some(o.id.as_str()));
        if !used {
            continue;
        }
        let (Some(team), Some(plan)) = (team_of(o), spec::<PlanSpec>(o, &mut part.warnings)) else {
            continue;
        };
        if !plan.quotas.is_empty() {
            part.managed
                .plan_quotas
                .insert(o.id.clone(), plan.quotas.clone().into());
        }
        if plan.rate_limits.is_empty() {
            continue;
        }
        let limits: Vec<Value> = plan
            .rate_limits
            .iter()
            .map(|l| {
                serde_json::json!({
                    "requests": l.requests,
                    "per": humantime::format_duration(l.per).to_string(),
                })
            })
            .collect();
        let policy = PolicySpec {
            // `:` cannot appear in a policy object's name, so this never collides with one.
            name: format!("{team}/plan:{}", o.name),
            policy_type: "rate_limit".into(),
            scope: PolicyScope::Plan(o.id.clone()),
            config: serde_json::json!({ "key": { "by": "application" }, "limits": limits }),
            enabled: true,
            priority: 0,
        };
        let label = format!("plan `{}` ({}): rate_limits", o.name, o.id);
        push_policy(part, policy, team, &label);
    }
}

/// Adds a policy of `team` whose target is resolved, if it can be compiled against the
/// store's consumers: one team's broken policy is left out with a warning, never allowed to
/// stop every other change from reaching the gateway.
fn push_policy(part: &mut StorePart, mut policy: PolicySpec, team: &str, label: &str) {
    // A team's `acl` names its own consumer groups; groups are qualified by team.
    if policy.policy_type == "acl"
        && let Some(config) = policy.config.as_object_mut()
    {
        for field in ["allow_groups", "deny_groups"] {
            if let Some(Value::Array(groups)) = config.get_mut(field) {
                for g in groups.iter_mut() {
                    if let Value::String(name) = g
                        && !name.contains('/')
                    {
                        *name = format!("{team}/{name}");
                    }
                }
            }
        }
    }
    // Upstreams a policy sends to are the team's own, named as in the team.
    let qualified = qualify_upstreams(&mut policy.config, &policy.policy_type, team);
    match qualified
        .and_then(|()| {
            PolicyKind::parse_attachment(&policy.policy_type, &policy.config)
                .map_err(|e| e.to_string())
        })
        .and_then(|kind| {
            for (field, name) in kind.upstream_refs() {
                if !part.upstreams.iter().any(|u| u.name == name) {
                    let short = name.split_once('/').map_or(name, |(_, n)| n);
                    return Err(format!("config.{field}: unknown upstream `{short}`"));
                }
            }
            turnpike_proxy::policy::precheck(&kind, &policy.scope, &part.managed)
                .map_err(|(field, why)| format!("config.{field}: {why}"))
        }) {
        Ok(()) => part.policies.push(policy),
        Err(e) if guards_access(&policy.policy_type) => {
            // Leaving out an access guard would open the route: refuse its requests instead.
            part.warnings.push(format!(
                "{label}: {e}; refusing every request it covers until it is fixed"
            ));
            policy.policy_type = "ip_restriction".into();
            policy.config = serde_json::json!({ "deny": ["0.0.0.0/0", "::/0"] });
            part.policies.push(policy);
        }
        Err(e) => part.warnings.push(format!("{label}: {e}; left out")),
    }
}

/// Rewrites the upstream names of `traffic_split`, `mirror` and `fallback` to the gateway's
/// `team/upstream` form. A name with a `/` (another team's upstream) is refused.
fn qualify_upstreams(config: &mut Value, policy_type: &str, team: &str) -> Result<(), String> {
    let qualify = |field: String, v: &mut Value| -> Result<(), String> {
        if let Value::String(name) = v {
            if name.contains('/') {
                return Err(format!(
                    "config.{field}: `{name}`: a policy can only send to its own team's upstreams"
                ));
            }
            *name = format!("{team}/{name}");
        }
        Ok(())
    };
    let Some(obj) = config.as_object_mut() else {
        return Ok(());
    };
    match policy_type {
        "mirror" | "fallback" => {
            if let Some(v) = obj.get_mut("upstream") {
                qualify("upstream".into(), v)?;
            }
        }
        "traffic_split" => {
            for list in ["rules", "weighted"] {
                if let Some(Value::Array(items)) = obj.get_mut(list) {
                    for (i, item) in items.iter_mut().enumerate() {
                        if let Some(v) = item.get_mut("upstream") {
                            qualify(format!("{list}[{i}].upstream"), v)?;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Policy types whose absence would let requests through that they would refuse.
fn guards_access(policy_type: &str) -> bool {
    matches!(
        policy_type,
        "key_auth"
            | "basic_auth"
            | "jwt"
            | "oauth2_introspection"
            | "hmac_auth"
            | "mtls"
            | "acl"
            | "ip_restriction"
            | "user_agent"
            | "waf"
            | "request_validation"
    )
}

/// Adds one service release's routes.
fn compile_release(
    part: &mut StorePart,
    space: &TeamSpec,
    service: &Object,
    lifecycle: Lifecycle,
    release: &Release,
    upstream_names: &HashSet<String>,
    released_policies: &mut Vec<(PolicySpec, String, String)>,
) {
    let team = space.name.as_str();
    let label = format!("service {team}/{} release {}", service.name, release.number);
    let Some(svc) =
        parse::<ServiceSpec>(release.content.get("service"), &label, &mut part.warnings)
    else {
        return;
    };
    // Who may call, and where clients should go next, are operations rather than API design:
    // they apply from the live service at once, without a new release.
    let live = parse::<ServiceSpec>(Some(&service.spec), &label, &mut Vec::new())
        .unwrap_or_else(|| svc.clone());
    let binding = Arc::new(ServiceBinding {
        id: Arc::from(service.id.as_str()),
        team: team.to_owned(),
        name: service.name.clone(),
        lifecycle,
        approval: live.approval,
        successor: live.successor.clone(),
        sunset: live.sunset.as_deref().and_then(|s| {
            humantime::parse_rfc3339_weak(s)
                .ok()
                .map(httpdate::fmt_http_date)
        }),
        openapi: svc.openapi.clone().map(Arc::new),
        deprecation: (lifecycle == Lifecycle::Deprecated).then(|| {
            // RFC 9745: the moment of deprecation as `@<unix seconds>`; the object's last
            // change is when it moved to `deprecated`.
            format!("@{}", service.updated_at.div_euclid(1000))
        }),
    });
    let routes = release
        .content
        .get("routes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for r in routes {
        let Some(route) = parse::<RouteSpec>(Some(r), &label, &mut part.warnings) else {
            continue;
        };
        // The team's space is checked here too, not only when the route is written: a space
        // narrowed later must take effect, and a route outside it must never be served.
        if let Err((field, why)) = space.admits(&route) {
            part.warnings.push(format!(
                "{label}: route `{}` left out: {field}: {why}",
                route.name
            ));
            continue;
        }
        let upstream = format!(
            "{team}/{}",
            route.upstream.as_deref().unwrap_or(&svc.upstream)
        );
        if !upstream_names.contains(&upstream) {
            part.warnings.push(format!(
                "{label}: route `{}` names upstream `{upstream}`, which does not exist; route left out",
                route.name
            ));
            continue;
        }
        let name = format!("{team}/{}/{}", service.name, route.name);
        part.managed.routes.insert(name.clone(), binding.clone());
        part.routes.push(route.to_route_config(name, upstream));
    }
    let policies = release
        .content
        .get("policies")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for p in policies {
        let Some(mut policy) = parse::<PolicySpec>(Some(p), &label, &mut part.warnings) else {
            continue;
        };
        let scope = match &policy.scope {
            PolicyScope::Service(_) => Some(PolicyScope::Service(service.id.clone())),
            PolicyScope::Route(r) => {
                let name = format!("{team}/{}/{r}", service.name);
                part.managed
                    .routes
                    .contains_key(&name)
                    .then_some(PolicyScope::Route(name))
            }
            _ => None,
        };
        let policy_label = format!("{label}: policy `{}`", policy.name);
        // A service whose routes were all left out has nothing to attach to.
        let scope = scope.filter(|s| match s {
            PolicyScope::Service(id) => part.managed.routes.values().any(|b| *b.id == **id),
            _ => true,
        });
        let Some(scope) = scope else {
            part.warnings.push(format!(
                "{policy_label}: its target is not served; left out"
            ));
            continue;
        };
        policy.scope = scope;
        policy.name = format!("{team}/{}/{}", service.name, policy.name);
        released_policies.push((policy, team.to_owned(), policy_label));
    }
}

/// Largest secret file read: a shared secret is a few dozen bytes.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The only environment variables a secret object can name. A team writes secret objects,
/// but the operator decides what the gateway process holds: without the prefix, any team
/// could make the gateway use (and, through its answers, probe) any variable it has.
pub const SECRET_ENV_PREFIX: &str = "TURNPIKE_SECRET_";

/// The environment variable naming the directory secret files must be in; unset, secret
/// objects cannot name files.
pub const SECRETS_DIR_ENV: &str = "TURNPIKE_SECRETS_DIR";

/// The value of a secret object: an environment variable named `TURNPIKE_SECRET_*`, or a
/// regular file under `TURNPIKE_SECRETS_DIR` (a path relative to it, which may not leave
/// it). A file's trailing line break is not part of the secret (editors and `echo` add
/// one). Anything else is refused without being read, so a FIFO cannot stall the
/// control plane.
fn read_secret(source: &SecretSource) -> Result<Vec<u8>, String> {
    let value = match source {
        SecretSource::Env(var) => {
            if !var.starts_with(SECRET_ENV_PREFIX) {
                return Err(format!(
                    "environment variable `{var}` is not a secret variable (only `{SECRET_ENV_PREFIX}*` ones are read)"
                ));
            }
            std::env::var(var)
                .map(String::into_bytes)
                .map_err(|_| format!("environment variable `{var}` of its secret is not set"))?
        }
        SecretSource::File(path) => {
            use std::io::Read;
            let file = secret_file(path)?;
            let mut buf = Vec::new();
            std::fs::File::open(&file)
                .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut buf))
                .map_err(|e| format!("secret file `{path}` cannot be read: {e}"))?;
            if buf.len() as u64 > MAX_SECRET_FILE_BYTES {
                return Err(format!(
                    "secret file `{path}` is larger than {MAX_SECRET_FILE_BYTES} bytes"
                ));
            }
            while buf.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                buf.pop();
            }
            buf
        }
    };
    if value.is_empty() {
        return Err("its secret is empty".into());
    }
    Ok(value)
}

/// Where the secret file `path` is: a regular file inside the secrets directory, after
/// links are resolved.
fn secret_file(path: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::env::var_os(SECRETS_DIR_ENV).ok_or_else(|| {
        format!("secret file `{path}` cannot be read: {SECRETS_DIR_ENV} is not set")
    })?;
    let relative = std::path::Path::new(path);
    if !relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "secret file `{path}` must be a relative path inside {SECRETS_DIR_ENV}"
        ));
    }
    let dir = std::path::Path::new(&dir)
        .canonicalize()
        .map_err(|e| format!("{SECRETS_DIR_ENV} cannot be read: {e}"))?;
    let file = dir
        .join(relative)
        .canonicalize()
        .map_err(|e| format!("secret file `{path}` cannot be read: {e}"))?;
    if !file.starts_with(&dir) {
        return Err(format!(
            "secret file `{path}` links out of {SECRETS_DIR_ENV}"
        ));
    }
    let meta = std::fs::metadata(&file)
        .map_err(|e| format!("secret file `{path}` cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err(format!("secret file `{path}` is not a regular file"));
    }
    Ok(file)
}

fn spec<T: serde::de::DeserializeOwned>(o: &Object, warnings: &mut Vec<String>) -> Option<T> {
    parse(
        Some(&o.spec),
        &format!("{} `{}` ({})", o.kind, o.name, o.id),
        warnings,
    )
}

fn parse<T: serde::de::DeserializeOwned>(
    value: Option<&Value>,
    label: &str,
    warnings: &mut Vec<String>,
) -> Option<T> {
    let Some(value) = value else {
        warnings.push(format!("{label}: missing"));
        return None;
    };
    match T::deserialize(value) {
        Ok(t) => Some(t),
        Err(e) => {
            warnings.push(format!("{label}: {e}"));
            None
        }
    }
}

/// The file's configuration with the store's part added.
pub fn merge(file: &Config, part: &StorePart) -> Config {
    let mut config = file.clone();
    config.upstreams.extend(part.upstreams.iter().cloned());
    config.routes.extend(part.routes.iter().cloned());
    config.policies.extend(part.policies.iter().cloned());
    config.managed = Arc::new(part.managed.clone());
    config
}

/// Keeps a gateway serving the merge of the latest file configuration and the latest store
/// state. Both sides call in when they change; every change is one reload.
pub struct ControlPlane {
    gateway: Arc<Gateway>,
    inputs: Mutex<Inputs>,
    data_dir: Option<PathBuf>,
    applied: tokio::sync::watch::Sender<i64>,
}

struct Inputs {
    file: Config,
    store: Option<Arc<StorePart>>,
    store_version: i64,
}

impl ControlPlane {
    /// A control plane for `gateway`, which is serving `file` (merged with `store`, if any).
    pub fn new(
        gateway: Arc<Gateway>,
        file: Config,
        store: Option<(i64, StorePart)>,
        data_dir: Option<PathBuf>,
    ) -> Arc<Self> {
        let (store_version, store) = match store {
            Some((v, p)) => (v, Some(Arc::new(p))),
            None => (0, None),
        };
        Arc::new(Self {
            gateway,
            inputs: Mutex::new(Inputs {
                file,
                store,
                store_version,
            }),
            data_dir,
            applied: tokio::sync::watch::Sender::new(store_version),
        })
    }

    /// Reports the store version the gateway serves each time a store change is applied.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// The store version the gateway serves (0 before any).
    pub async fn store_version(&self) -> i64 {
        self.inputs.lock().await.store_version
    }

    /// A new file configuration: reload with it and the current store part.
    pub async fn set_file(&self, file: Config) -> Result<u64, ConfigErrors> {
        let mut inputs = self.inputs.lock().await;
        let config = current(&file, inputs.store.as_deref());
        let v = self.gateway.reload(&config).await?;
        inputs.file = file;
        Ok(v)
    }

    /// A new store state: compile, reload, and save it as the last good state.
    pub async fn set_store(&self, state: &StoreState) -> Result<u64, ConfigErrors> {
        let part = compile(state);
        for w in &part.warnings {
            tracing::warn!(store_version = state.version, "{w}");
        }
        let mut inputs = self.inputs.lock().await;
        // Most store changes (drafts, audit-only actions, plans) change nothing served.
        let v = if inputs.store.as_deref() == Some(&part) {
            self.gateway.version()
        } else {
            let config = current(&inputs.file, Some(&part));
            self.gateway.reload(&config).await?
        };
        inputs.store = Some(Arc::new(part));
        inputs.store_version = state.version;
        drop(inputs);
        self.applied.send_replace(state.version);
        if let Some(dir) = &self.data_dir
            && let Err(e) = save_state(dir, state)
        {
            tracing::warn!(error = %e, "cannot save the store state");
        }
        Ok(v)
    }
}

fn current(file: &Config, part: Option<&StorePart>) -> Config {
    match part {
        Some(p) => merge(file, p),
        None => file.clone(),
    }
}

/// Follows the store: on every version change, fetches, compiles and reloads. A failed fetch
/// keeps the gateway serving what it has and is retried every `poll` until it succeeds (the
/// version watch only wakes on a new version, which may never come).
pub fn spawn_sync(control: Arc<ControlPlane>, store: Store, poll: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut versions = match store.watch(poll).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the store; store changes will not be applied");
                return;
            }
        };
        loop {
            let seen = *versions.borrow_and_update();
            let mut retry = false;
            if seen != control.store_version().await {
                match fetch(&store).await {
                    Ok(state) => match control.set_store(&state).await {
                        Ok(v) => tracing::info!(
                            store_version = state.version,
                            snapshot = v,
                            "store change applied"
                        ),
                        Err(e) => {
                            for e in &e.0 {
                                tracing::error!(error = %e, "store change rejected; the running configuration keeps serving");
                            }
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the store; retrying");
                        control.gateway.count_failed_reload();
                        retry = true;
                    }
                }
            }
            if retry {
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(poll) => {}
                }
            } else if versions.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Writes the state atomically (temporary file, then rename).
pub fn save_state(dir: &Path, state: &StoreState) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let target = dir.join(SAVED_STATE);
    let tmp = dir.join(format!(".{SAVED_STATE}.tmp"));
    let json = serde_json::to_vec(state).map_err(|e| e.to_string())?;
    write_private(&tmp, &json)
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| format!("cannot write `{}`: {e}", target.display()))
}

/// Reads the state saved by [`save_state`], if there is a readable one.
pub fn load_saved_state(dir: &Path) -> Result<Option<StoreState>, String> {
    let path = dir.join(SAVED_STATE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("`{}` is not a saved store state: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read `{}`: {e}", path.display())),
    }
}

/// Writes a file only its owner can read: the state holds credential hashes.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn secrets_are_read_only_where_the_operator_put_them() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("partner"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("outside"), "nope").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), secrets.join("link")).unwrap();
        let fifo = secrets.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        // SAFETY: nextest runs each test in its own process; nothing else reads these.
        unsafe {
            std::env::set_var(SECRETS_DIR_ENV, &secrets);
            std::env::set_var("TURNPIKE_SECRET_UNIT", "from-env");
            std::env::set_var("HOME_SWEET_HOME", "not a secret");
        }
        let read = |s: SecretSource| read_secret(&s);
        assert_eq!(
            read(SecretSource::File("partner".into())).unwrap(),
            b"s3cret"
        );
        assert_eq!(
            read(SecretSource::Env("TURNPIKE_SECRET_UNIT".into())).unwrap(),
            b"from-env"
        );
        for (source, why) in [
            (
                SecretSource::Env("HOME_SWEET_HOME".into()),
                "not a secret variable",
            ),
            (
                SecretSource::File("../outside".into()),
                "relative path inside",
            ),
            (
                SecretSource::File(dir.path().join("outside").display().to_string()),
                "relative path inside",
            ),
            (SecretSource::File("link".into()), "links out of"),
            // A FIFO would block the reader until someone writes to it.
            (SecretSource::File("fifo".into()), "not a regular file"),
            (SecretSource::File("missing".into()), "cannot be read"),
        ] {
            let e = read(source.clone()).unwrap_err();
            assert!(e.contains(why), "{source:?}: {e}");
        }
        unsafe { std::env::remove_var(SECRETS_DIR_ENV) };
        let e = read(SecretSource::File("partner".into())).unwrap_err();
        assert!(e.contains("TURNPIKE_SECRETS_DIR is not set"), "{e}");
    }
}
