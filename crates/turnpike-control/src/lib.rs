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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use turnpike_model::managed::{BasicUser, Consumer, JwtIssuerBinding, Managed, ServiceBinding};
use turnpike_model::mgmt::{
    ApplicationSpec, ConsumerGroupSpec, CredentialMethod, CredentialSpec, Kind, Lifecycle,
    PolicyScope, PolicySpec, RouteSpec, ServiceSpec, SubscriptionSpec, TeamSpec, UpstreamSpec,
};
use turnpike_model::policy::PolicyKind;
use turnpike_model::{Config, ConfigErrors, RouteConfig, UpstreamConfig};
use turnpike_proxy::gateway::Gateway;
use turnpike_store::{Object, Release, Store, StoreError};

/// Kinds the gateway needs from the store.
const SERVED_KINDS: [Kind; 9] = [
    Kind::Team,
    Kind::Upstream,
    Kind::Service,
    Kind::Application,
    Kind::Credential,
    Kind::ConsumerGroup,
    Kind::Plan,
    Kind::Subscription,
    Kind::Policy,
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

/// Compiles a [`StoreState`]. Pure: the same state always gives the same part. An object
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
            id: o.id.clone(),
            name: o.name.clone(),
            team: team.clone(),
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
                public_key,
                secret,
            } => {
                if secret.is_some() && jwks_url.is_none() && public_key.is_none() {
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
                    public_key,
                    secret: None,
                    consumer: app.clone(),
                });
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
                .insert((app.id.clone(), service.clone()), plan);
        }
    }

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
                .map(|c| PolicyScope::Application(c.id.clone())),
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
    match PolicyKind::parse_attachment(&policy.policy_type, &policy.config)
        .map_err(|e| e.to_string())
        .and_then(|kind| {
            turnpike_proxy::policy::precheck(&kind, &part.managed)
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

/// Policy types whose absence would let requests through that they would refuse.
fn guards_access(policy_type: &str) -> bool {
    matches!(
        policy_type,
        "key_auth" | "basic_auth" | "jwt" | "acl" | "ip_restriction" | "user_agent"
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
        id: service.id.clone(),
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
            PolicyScope::Service(id) => part.managed.routes.values().any(|b| b.id == *id),
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
