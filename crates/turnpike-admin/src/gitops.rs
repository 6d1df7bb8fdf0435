//! GitOps: the managed state as one document (`turnpike export`) and applying such a document
//! (`turnpike apply -f`) as a per-entity diff in one transaction.
//!
//! The document has one list per collection (`teams`, `users`, `services`, ...). An entry is
//! the object's spec plus `team` (the owning team's name, for team-scoped kinds) and `state`
//! (services and subscriptions). A collection present in the document is managed by it:
//! objects of that kind missing from the list are deleted. A collection left out is not
//! touched. Applying the same document twice changes nothing the second time.
//!
//! Secrets never appear: API-key credentials carry the key's `hash` (what export gives), and
//! basic-auth users their `password_hash`; a plain `password` is refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::{Map, Value, json};
use turnpike_model::mgmt::{Kind, Lifecycle, SubscriptionState, parse_spec};
use turnpike_store::{NewObject, Object, ObjectPatch, Store, StoreTx};

use crate::error::{AdminError, AdminResult};
use crate::refs;

/// Version of the document format.
pub const DOCUMENT_VERSION: u64 = 1;

/// What applying does to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Created.
    Create,
    /// Spec or state changed.
    Update,
    /// Deleted.
    Delete,
    /// A new release of a service, because its served content changed.
    Release,
}

/// One entry of the diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happens.
    pub action: Action,
    /// The object's kind.
    pub kind: Kind,
    /// Its team's name, for team-scoped kinds.
    pub team: Option<String>,
    /// Its name.
    pub name: String,
    /// For updates: the top-level fields that differ (`state` included).
    pub fields: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.action {
            Action::Create => "+",
            Action::Update => "~",
            Action::Delete => "-",
            Action::Release => "^",
        };
        write!(f, "{sign} {} ", self.kind.as_str())?;
        if let Some(team) = &self.team {
            write!(f, "{team}/")?;
        }
        f.write_str(&self.name)?;
        if self.action == Action::Release {
            f.write_str(" (new release)")?;
        }
        if !self.fields.is_empty() {
            write!(f, " ({})", self.fields.join(", "))?;
        }
        Ok(())
    }
}

/// Every managed object as a document; team-scoped objects name their team.
pub async fn export(store: &Store) -> AdminResult<Value> {
    let teams = store.list_all(Kind::Team.as_str()).await?;
    let team_names: HashMap<&str, &str> = teams
        .iter()
        .map(|t| (t.id.as_str(), t.name.as_str()))
        .collect();
    let mut doc = Map::new();
    doc.insert("version".into(), json!(DOCUMENT_VERSION));
    for kind in Kind::ALL {
        let mut objects = if kind == Kind::Team {
            teams.clone()
        } else {
            store.list_all(kind.as_str()).await?
        };
        objects.sort_by(|a, b| {
            let ta = a.team_id.as_deref().and_then(|t| team_names.get(t));
            let tb = b.team_id.as_deref().and_then(|t| team_names.get(t));
            (ta, &a.name).cmp(&(tb, &b.name))
        });
        let entries: Vec<Value> = objects
            .iter()
            .map(|o| {
                let team = o
                    .team_id
                    .as_deref()
                    .and_then(|t| team_names.get(t).copied());
                entry(o, team)
            })
            .collect();
        doc.insert(kind.collection().into(), Value::Array(entries));
    }
    Ok(Value::Object(doc))
}

fn entry(o: &Object, team: Option<&str>) -> Value {
    let mut out = Map::new();
    if let Some(team) = team {
        out.insert("team".into(), json!(team));
    }
    if let Value::Object(spec) = &o.spec {
        out.extend(spec.clone());
    }
    if let Some(state) = &o.state {
        out.insert("state".into(), json!(state));
    }
    Value::Object(out)
}

/// One desired object, validated.
struct Desired {
    kind: Kind,
    team: Option<String>,
    name: String,
    spec: Value,
    state: Option<String>,
}

type Key = (Kind, String, String);

fn key(kind: Kind, team: Option<&str>, name: &str) -> Key {
    (kind, team.unwrap_or("").to_owned(), name.to_owned())
}

/// Reads and validates a document. Errors name the entry (`services[2].upstream`).
fn desired(doc: &Value) -> AdminResult<(Vec<Kind>, BTreeMap<Key, Desired>)> {
    let Some(top) = doc.as_object() else {
        return Err(AdminError::validation("", "the document must be a mapping"));
    };
    match top.get("version").and_then(Value::as_u64) {
        Some(DOCUMENT_VERSION) => {}
        _ => {
            return Err(AdminError::validation(
                "version",
                format!("the document needs `version: {DOCUMENT_VERSION}`"),
            ));
        }
    }
    let mut managed = Vec::new();
    let mut out = BTreeMap::new();
    for (field, list) in top {
        if field == "version" {
            continue;
        }
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.collection() == field) else {
            return Err(AdminError::validation(
                field,
                format!("unknown collection {field:?}"),
            ));
        };
        let Some(list) = list.as_array() else {
            return Err(AdminError::validation(field, "must be a list"));
        };
        managed.push(kind);
        for (i, item) in list.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let d = one(kind, item, &at)?;
            let k = key(kind, d.team.as_deref(), &d.name);
            if out.insert(k, d).is_some() {
                return Err(AdminError::validation(
                    at,
                    "the same object appears twice in the document",
                ));
            }
        }
    }
    Ok((managed, out))
}

fn one(kind: Kind, item: &Value, at: &str) -> AdminResult<Desired> {
    let Some(fields) = item.as_object() else {
        return Err(AdminError::validation(at, "must be a mapping"));
    };
    let mut spec = fields.clone();
    let team = match spec.remove("team") {
        Some(Value::String(t)) if kind.team_scoped() => Some(t),
        None if !kind.team_scoped() => None,
        Some(_) if !kind.team_scoped() => {
            return Err(AdminError::validation(
                format!("{at}.team"),
                format!("a {kind} belongs to no team"),
            ));
        }
        _ => {
            return Err(AdminError::validation(
                format!("{at}.team"),
                "the owning team's name is required",
            ));
        }
    };
    let state = match spec.remove("state") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(AdminError::validation(
                format!("{at}.state"),
                "must be a string",
            ));
        }
    };
    check_state(kind, state.as_deref())
        .map_err(|m| AdminError::validation(format!("{at}.state"), m))?;
    if kind == Kind::Credential {
        if spec.contains_key("password") {
            return Err(AdminError::validation(
                format!("{at}.password"),
                "a document holds no plain passwords: give `password_hash` (export shows it)",
            ));
        }
        if spec.get("type").and_then(Value::as_str) == Some("api_key")
            && spec
                .get("hash")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
        {
            return Err(AdminError::validation(
                format!("{at}.hash"),
                "an API key in a document needs its `hash` (export shows it); create new keys through the Admin API",
            ));
        }
    }
    let spec = parse_spec(kind, Value::Object(spec)).map_err(|e| {
        let first = e.0.into_iter().next();
        let (path, message) = first.map_or_else(
            || (String::new(), "invalid".to_owned()),
            |e| (e.path, e.message),
        );
        let path = if path.is_empty() {
            at.to_owned()
        } else {
            format!("{at}.{path}")
        };
        AdminError::validation(path, message)
    })?;
    let name = spec
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(Desired {
        kind,
        team,
        name,
        spec,
        state,
    })
}

fn check_state(kind: Kind, state: Option<&str>) -> Result<(), String> {
    let Some(state) = state else { return Ok(()) };
    let ok = match kind {
        Kind::Service => Lifecycle::parse(state).is_some(),
        Kind::Subscription => [
            SubscriptionState::Requested,
            SubscriptionState::Approved,
            SubscriptionState::Rejected,
            SubscriptionState::Revoked,
        ]
        .iter()
        .any(|s| s.as_str() == state),
        _ => return Err(format!("a {kind} has no state")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{state:?} is not a state of a {kind}"))
    }
}

/// The state an object gets when the document says nothing.
fn default_state(kind: Kind) -> Option<String> {
    match kind {
        Kind::Service => Some(Lifecycle::Draft.as_str().to_owned()),
        Kind::Subscription => Some(SubscriptionState::Requested.as_str().to_owned()),
        _ => None,
    }
}

/// Applies `doc` in one transaction as `actor`, returning the changes. With `dry_run` the
/// transaction is rolled back after every check has run, so the diff shown is exactly what
/// a real run would do, and a document that would fail fails the same way.
pub async fn apply(
    store: &Store,
    doc: &Value,
    actor: &str,
    dry_run: bool,
) -> AdminResult<Vec<Change>> {
    let (managed, mut wanted) = desired(doc)?;
    let mut tx = store.begin(actor).await?;
    // Reads outside the transaction see what it will build on: writers are serialised by
    // the store, so nothing else changes until it ends.
    let mut current: BTreeMap<Key, Object> = BTreeMap::new();
    let teams = store.list_all(Kind::Team.as_str()).await?;
    let mut team_names: HashMap<String, String> = teams
        .iter()
        .map(|t| (t.id.clone(), t.name.clone()))
        .collect();
    for kind in &managed {
        for o in store.list_all(kind.as_str()).await? {
            let team = o
                .team_id
                .as_deref()
                .and_then(|t| team_names.get(t))
                .cloned();
            current.insert(key(*kind, team.as_deref(), &o.name), o);
        }
    }

    let mut changes = Vec::new();
    let mut applied = Vec::new();
    for kind in Kind::ALL {
        let keys: Vec<Key> = wanted.keys().filter(|k| k.0 == kind).cloned().collect();
        for k in keys {
            let Some(d) = wanted.remove(&k) else { continue };
            let team = match &d.team {
                Some(name) => Some(team_object(&mut tx, name, &k).await?),
                None => None,
            };
            refs::check(&mut tx, kind, team.as_ref(), &d.spec).await?;
            let state = d.state.clone().or_else(|| default_state(kind));
            match current.remove(&k) {
                None => {
                    let created = tx
                        .create(NewObject {
                            kind: kind.as_str().to_owned(),
                            team_id: team.as_ref().map(|t| t.id.clone()),
                            name: d.name.clone(),
                            state,
                            spec: d.spec.clone(),
                            ..NewObject::default()
                        })
                        .await?;
                    if kind == Kind::Team {
                        team_names.insert(created.id.clone(), created.name.clone());
                    }
                    changes.push(change(Action::Create, &d, Vec::new()));
                }
                Some(o) => {
                    let fields =
                        differing(&o.spec, &d.spec, o.state.as_deref(), d.state.as_deref());
                    if !fields.is_empty() {
                        tx.update(
                            kind.as_str(),
                            &o.id,
                            Some(o.revision),
                            ObjectPatch {
                                spec: Some(d.spec.clone()),
                                state: d.state.clone().map(Some),
                                ..ObjectPatch::default()
                            },
                        )
                        .await?;
                        changes.push(change(Action::Update, &d, fields));
                    }
                }
            }
            // What the document wants is what releases are built from.
            applied.push(d);
        }
    }

    // Deletes, dependants first. Referrers of a kind the document manages are checked after
    // the deletes, through the transaction (below); those of other kinds, which this document
    // does not change, must not exist.
    let managed_labels: Vec<String> = managed
        .iter()
        .map(|k| format!("{} ", k.as_str().replace('_', " ")))
        .collect();
    for (k, o) in &current {
        let team = match o.team_id.as_deref() {
            Some(id) => tx.get(Kind::Team.as_str(), id).await?,
            None => None,
        };
        let blocking: Vec<String> = refs::referrers(store, k.0, team.as_ref(), o, true)
            .await?
            .into_iter()
            .filter(|r| !managed_labels.iter().any(|m| r.starts_with(m.as_str())))
            .collect();
        if !blocking.is_empty() {
            return Err(AdminError::conflict(format!(
                "the document leaves out {} {:?}, but {} still refer to it",
                k.0.as_str().replace('_', " "),
                o.name,
                blocking.join(", ")
            )));
        }
    }
    for kind in Kind::ALL.into_iter().rev() {
        let doomed: Vec<(Key, Object)> = current
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (k, o) in doomed {
            tx.delete(kind.as_str(), &o.id, Some(o.revision)).await?;
            changes.push(Change {
                action: Action::Delete,
                kind,
                team: (!k.1.is_empty()).then(|| k.1.clone()),
                name: o.name.clone(),
                fields: Vec::new(),
            });
        }
    }

    // Every object the document keeps must still find what it refers to.
    for d in &applied {
        let team = match &d.team {
            Some(name) => tx.get_by_name(Kind::Team.as_str(), None, name).await?,
            None => None,
        };
        refs::check(&mut tx, d.kind, team.as_ref(), &d.spec)
            .await
            .map_err(|e| {
                AdminError::conflict(format!(
                    "{} {}{}: {e}",
                    d.kind.as_str().replace('_', " "),
                    d.team.as_deref().map_or(String::new(), |t| format!("{t}/")),
                    d.name
                ))
            })?;
    }

    release_changed_services(store, &mut tx, &applied, &managed, &mut changes).await?;

    if dry_run {
        tx.rollback().await?;
    } else if !changes.is_empty() {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(changes)
}

fn change(action: Action, d: &Desired, fields: Vec<String>) -> Change {
    Change {
        action,
        kind: d.kind,
        team: d.team.clone(),
        name: d.name.clone(),
        fields,
    }
}

async fn team_object(tx: &mut StoreTx, name: &str, k: &Key) -> AdminResult<Object> {
    tx.get_by_name(Kind::Team.as_str(), None, name)
        .await?
        .ok_or_else(|| {
            AdminError::validation(
                format!("{}[{}].team", k.0.collection(), k.2),
                format!("there is no team named {name:?}"),
            )
        })
}

/// Top-level fields that differ, with `state` when the document sets one that differs.
fn differing(
    current: &Value,
    wanted: &Value,
    current_state: Option<&str>,
    wanted_state: Option<&str>,
) -> Vec<String> {
    let empty = Map::new();
    let a = current.as_object().unwrap_or(&empty);
    let b = wanted.as_object().unwrap_or(&empty);
    let mut fields: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|f| a.get(*f) != b.get(*f))
        .cloned()
        .collect();
    fields.sort();
    fields.dedup();
    if wanted_state.is_some() && wanted_state != current_state {
        fields.push("state".into());
    }
    fields
}

/// A published or deprecated service whose spec, routes or policies differ from its latest
/// release gets a new release: applying a document deploys it.
async fn release_changed_services(
    store: &Store,
    tx: &mut StoreTx,
    desired: &[Desired],
    managed: &[Kind],
    changes: &mut Vec<Change>,
) -> AdminResult<()> {
    if !managed.contains(&Kind::Service) {
        return Ok(());
    }
    for svc in desired.iter().filter(|d| d.kind == Kind::Service) {
        let team_name = svc.team.as_deref().unwrap_or_default();
        let Some(team) = tx.get_by_name(Kind::Team.as_str(), None, team_name).await? else {
            continue;
        };
        let Some(object) = tx
            .get_by_name(Kind::Service.as_str(), Some(&team.id), &svc.name)
            .await?
        else {
            continue;
        };
        // Served is the object's state now, whether or not the document set it.
        let served = object
            .state
            .as_deref()
            .and_then(Lifecycle::parse)
            .is_some_and(|l| matches!(l, Lifecycle::Published | Lifecycle::Deprecated));
        if !served {
            continue;
        }
        let mut routes: Vec<(String, Value)> =
            specs(store, desired, managed, Kind::Route, &team, team_name)
                .await?
                .into_iter()
                .filter(|(_, spec)| {
                    spec.get("service").and_then(Value::as_str) == Some(svc.name.as_str())
                })
                .collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let route_names: Vec<&str> = routes.iter().map(|r| r.0.as_str()).collect();
        let mut policies: Vec<(String, Value)> =
            specs(store, desired, managed, Kind::Policy, &team, team_name)
                .await?
                .into_iter()
                .filter(|(_, spec)| {
                    let target = spec.get("target").and_then(Value::as_str);
                    match spec.get("scope").and_then(Value::as_str) {
                        Some("service") => target == Some(svc.name.as_str()),
                        Some("route") => target.is_some_and(|t| route_names.contains(&t)),
                        _ => false,
                    }
                })
                .collect();
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        let content = json!({
            "service": svc.spec,
            "routes": routes.iter().map(|r| &r.1).collect::<Vec<_>>(),
            "policies": policies.iter().map(|p| &p.1).collect::<Vec<_>>(),
        });
        let latest = store
            .latest_release(Kind::Service.as_str(), &object.id)
            .await?;
        if latest.is_some_and(|r| r.content == content) {
            continue;
        }
        tx.create_release(
            Kind::Service.as_str(),
            &object.id,
            &content,
            Some("applied from a document"),
        )
        .await?;
        changes.push(Change {
            action: Action::Release,
            kind: Kind::Service,
            team: svc.team.clone(),
            name: svc.name.clone(),
            fields: Vec::new(),
        });
    }
    Ok(())
}

/// Specs of `kind` in a team, by name: from the document when it manages the kind, else from
/// the store, which the document does not change for that kind.
async fn specs(
    store: &Store,
    desired: &[Desired],
    managed: &[Kind],
    kind: Kind,
    team: &Object,
    team_name: &str,
) -> AdminResult<Vec<(String, Value)>> {
    if managed.contains(&kind) {
        return Ok(desired
            .iter()
            .filter(|d| d.kind == kind && d.team.as_deref() == Some(team_name))
            .map(|d| (d.name.clone(), d.spec.clone()))
            .collect());
    }
    Ok(refs::all_of(store, kind, Some(&team.id))
        .await?
        .into_iter()
        .map(|o| (o.name, o.spec))
        .collect())
}
