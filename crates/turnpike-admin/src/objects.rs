//! Create, read, list, replace, patch and delete for every kind, with the server-managed
//! fields (service and subscription states, credential secrets) filled in here.

use std::collections::HashMap;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use turnpike_model::mgmt::{Kind, Lifecycle, Role, SubscriptionState, check_name, parse_spec};
use turnpike_store::{
    ListQuery, NewObject, Object, ObjectPatch, Store, StoreTx, TeamFilter, now_ms,
};

use crate::auth::{Caller, team_access, write_role};
use crate::endpoints::PREFIX;
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::refs;
use crate::util::{merge_patch, random_bytes, rfc3339, sha256_hex};

/// Prefix of generated API keys, so scanners and people recognise a leaked one.
pub(crate) const API_KEY_PREFIX: &str = "tpk_";

/// The spec as clients may see it: credential secrets removed.
pub(crate) fn redact(kind: &str, spec: &Value) -> Value {
    let mut spec = spec.clone();
    if kind == Kind::Credential.as_str() {
        if let Some(object) = spec.as_object_mut() {
            for field in ["hash", "password_hash", "password"] {
                object.remove(field);
            }
        }
    }
    spec
}

/// The response envelope of an object.
pub(crate) fn envelope(object: &Object, team_name: Option<&str>) -> Value {
    json!({
        "id": object.id,
        "kind": object.kind,
        "team": team_name,
        "name": object.name,
        "revision": object.revision,
        "state": object.state,
        "created_at": rfc3339(object.created_at),
        "updated_at": rfc3339(object.updated_at),
        "created_by": object.created_by,
        "updated_by": object.updated_by,
        "spec": redact(&object.kind, &object.spec),
    })
}

/// The URL of an object.
pub(crate) fn object_url(kind: Kind, team_name: Option<&str>, name: &str) -> String {
    match (kind, team_name) {
        (Kind::Team | Kind::User, _) | (_, None) => {
            format!("{PREFIX}/{}/{name}", kind.collection())
        }
        (_, Some(team)) => format!("{PREFIX}/teams/{team}/{}/{name}", kind.collection()),
    }
}

/// A single-object response with its `ETag`.
pub(crate) fn object_response(
    status: StatusCode,
    object: &Object,
    team_name: Option<&str>,
    extra: Option<(&str, Value)>,
) -> Response {
    let mut body = envelope(object, team_name);
    if let Some((key, value)) = extra {
        body[key] = value;
    }
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", object.revision)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

fn set_location(response: &mut Response, kind: Kind, team_name: Option<&str>, name: &str) {
    if let Ok(url) = HeaderValue::from_str(&object_url(kind, team_name, name)) {
        response.headers_mut().insert(header::LOCATION, url);
    }
}

/// Where an object lives, as resolved for the caller.
struct Scope {
    /// The team object (team-scoped kinds only).
    team: Option<Object>,
}

impl Scope {
    fn team_id(&self) -> Option<&str> {
        self.team.as_ref().map(|t| t.id.as_str())
    }
    fn team_name(&self) -> Option<&str> {
        self.team.as_ref().map(|t| t.name.as_str())
    }
}

/// Resolves the team of a team-scoped request, checking the caller's role.
async fn scope(ctx: &Ctx, kind: Kind, min: Role) -> AdminResult<Scope> {
    if !kind.team_scoped() {
        return Ok(Scope { team: None });
    }
    let caller = ctx.caller()?;
    let team = team_access(ctx.store(), caller, ctx.param("team"), min).await?;
    Ok(Scope { team: Some(team) })
}

/// Reads one object the caller can see, or 404. For teams and users the access rules of the
/// global kinds apply.
async fn find(ctx: &Ctx, kind: Kind, scope: &Scope, name: &str) -> AdminResult<Object> {
    let missing = || AdminError::not_found(format!("no {} named {name:?}", kind.as_str()));
    if check_name(name).is_err() {
        return Err(missing());
    }
    ctx.store()
        .get_by_name(kind.as_str(), scope.team_id(), name)
        .await?
        .ok_or_else(missing)
}

/// `GET` a collection.
pub(crate) async fn list(ctx: &Ctx, kind: Kind) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    if kind == Kind::User {
        caller.require_super()?;
    }
    let scope = scope(ctx, kind, Role::Viewer).await?;
    let limit = ctx.limit()?;
    let (Ok(state), Ok(name_prefix)) = (ctx.store_filter("state"), ctx.store_filter("name_prefix"))
    else {
        return Ok(axum::Json(json!({ "items": [], "next_cursor": null })).into_response());
    };
    let query = ListQuery {
        team: match scope.team_id() {
            Some(id) => TeamFilter::Team(id.to_owned()),
            None => TeamFilter::NoTeam,
        },
        state,
        name_prefix,
        limit,
        cursor: ctx.cursor(),
    };
    let page = ctx.store().list(kind.as_str(), &query).await?;
    let items: Vec<Value> = page
        .items
        .iter()
        // Teams: a member lists only its own teams (pages may come out short).
        .filter(|o| kind != Kind::Team || caller.sees(&o.id))
        .map(|o| {
            envelope(
                o,
                if kind == Kind::Team {
                    None
                } else {
                    scope.team_name()
                },
            )
        })
        .collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": page.next_cursor })).into_response())
}

/// Checks a caller may act on the global object `name` of kind team or user (team-scoped
/// kinds are checked by [`scope`]). Returns the object.
async fn global_access(ctx: &Ctx, kind: Kind, name: &str, min: Role) -> AdminResult<Object> {
    let caller = ctx.caller()?;
    match kind {
        Kind::Team => team_access(ctx.store(), caller, name, min).await,
        Kind::User => {
            let is_self = caller.name() == name;
            // Reading oneself is allowed; anything else about users is for super admins.
            if !(caller.super_admin || (is_self && min == Role::Viewer)) {
                return Err(AdminError::forbidden(
                    "only a super admin may manage other users",
                ));
            }
            find(ctx, kind, &Scope { team: None }, name).await
        }
        _ => Err(AdminError::internal("global_access on a team-scoped kind")),
    }
}

/// `GET` one object.
pub(crate) async fn get(ctx: &Ctx, kind: Kind) -> AdminResult<Response> {
    let name = ctx.param(crate::endpoints::item_param(kind));
    if !kind.team_scoped() {
        let object = global_access(ctx, kind, name, Role::Viewer).await?;
        return Ok(object_response(StatusCode::OK, &object, None, None));
    }
    let scope = scope(ctx, kind, Role::Viewer).await?;
    let object = find(ctx, kind, &scope, name).await?;
    Ok(object_response(
        StatusCode::OK,
        &object,
        scope.team_name(),
        None,
    ))
}

/// Permission checks that depend on the spec, not just the kind.
fn check_spec_rights(kind: Kind, spec: &Value, caller: &Caller) -> AdminResult<()> {
    if kind == Kind::Policy && spec.get("scope").and_then(Value::as_str) == Some("global") {
        caller.require_super().map_err(|_| {
            AdminError::forbidden("only a super admin may create or change a global policy")
        })?;
    }
    Ok(())
}

/// Secret material worked out before the transaction (Argon2 is deliberately slow and must
/// not hold the writer lock).
struct Prehashed {
    password_hash: Option<String>,
}

/// Longest basic-auth password accepted: hashing is deliberately expensive.
const MAX_PASSWORD_BYTES: usize = 1024;

async fn prehash(kind: Kind, body: &Value) -> AdminResult<Prehashed> {
    // Argon2 is costly on purpose: only a basic-auth credential's password is hashed, and
    // only after the cheap checks, so no other body can make the server do that work.
    let basic = kind == Kind::Credential
        && body
            .get("type")
            .and_then(Value::as_str)
            .is_none_or(|t| t == "basic");
    let Some(password) = body
        .get("password")
        .and_then(Value::as_str)
        .filter(|_| basic)
    else {
        return Ok(Prehashed {
            password_hash: None,
        });
    };
    if password.is_empty() {
        return Err(AdminError::validation(
            "password",
            "the password must not be empty",
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(AdminError::validation(
            "password",
            format!("the password must be at most {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(AdminError::internal)?
    .map_err(AdminError::internal)?;
    Ok(Prehashed {
        password_hash: Some(hash),
    })
}

/// A spec with the server-managed fields filled in.
struct Prepared {
    spec: Value,
    /// `None`: keep the current state.
    state: Option<Option<String>>,
    /// A generated secret to show once.
    secret: Option<String>,
}

/// Fills in what the server manages. `current` is the stored object on updates.
async fn prepare(
    tx: &mut StoreTx,
    kind: Kind,
    mut spec: Value,
    current: Option<&Object>,
    pre: Prehashed,
) -> AdminResult<Prepared> {
    let mut state = None;
    let mut secret = None;
    match kind {
        Kind::Service if current.is_none() => {
            state = Some(Some(Lifecycle::Draft.as_str().to_owned()));
        }
        Kind::Subscription => {
            let unchanged = current.is_some_and(|c| {
                ["application", "service_team", "service", "plan"]
                    .iter()
                    .all(|f| c.spec.get(f) == spec.get(f))
            });
            match current {
                Some(c) if unchanged => {
                    spec["decision"] = c.spec.get("decision").cloned().unwrap_or(Value::Null);
                }
                _ => {
                    // A new request, or one changed to ask for something else: decided anew.
                    let auto = refs::subscribed_service_is_auto(tx, &spec).await?;
                    if auto {
                        spec["decision"] = json!({
                            "by": crate::SYSTEM_ACTOR,
                            "reason": "the service approves subscriptions automatically",
                            "at": rfc3339(now_ms()),
                        });
                        state = Some(Some(SubscriptionState::Approved.as_str().to_owned()));
                    } else {
                        spec["decision"] = Value::Null;
                        state = Some(Some(SubscriptionState::Requested.as_str().to_owned()));
                    }
                }
            }
        }
        Kind::Credential => {
            let current_type = current
                .and_then(|c| c.spec.get("type"))
                .and_then(Value::as_str);
            let object = spec
                .as_object_mut()
                .ok_or_else(|| AdminError::internal("credential spec is not an object"))?;
            match object.get("type").and_then(Value::as_str) {
                Some("api_key") => match current {
                    Some(c) if current_type == Some("api_key") => {
                        for field in ["prefix", "hash"] {
                            object.insert(
                                field.into(),
                                c.spec.get(field).cloned().unwrap_or_default(),
                            );
                        }
                    }
                    _ => {
                        let key = format!(
                            "{API_KEY_PREFIX}{}",
                            crate::util::hex(&random_bytes::<32>()?)
                        );
                        object.insert("prefix".into(), Value::String(key[..8].to_owned()));
                        object.insert("hash".into(), Value::String(sha256_hex(&key)));
                        secret = Some(key);
                    }
                },
                Some("basic") => {
                    object.remove("password");
                    let hash = match (pre.password_hash, current) {
                        (Some(hash), _) => hash,
                        (None, Some(c)) if current_type == Some("basic") => c
                            .spec
                            .get("password_hash")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        _ => {
                            return Err(AdminError::validation(
                                "password",
                                "a basic credential needs a password when it is created",
                            ));
                        }
                    };
                    object.insert("password_hash".into(), Value::String(hash));
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(Prepared {
        spec,
        state,
        secret,
    })
}

fn spec_name(spec: &Value) -> AdminResult<String> {
    spec.get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| AdminError::validation("name", "missing field `name`"))
}

/// `POST` to a collection.
pub(crate) async fn create(ctx: &Ctx, kind: Kind) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    if !kind.team_scoped() {
        caller.require_super()?;
    }
    let scope = scope(ctx, kind, write_role(kind)).await?;
    let body = ctx.body()?;
    let spec = parse_spec(kind, body.clone())?;
    let pre = prehash(kind, &body).await?;
    check_spec_rights(kind, &spec, caller)?;
    let name = spec_name(&spec)?;
    let store = ctx.store();
    let mut tx = store.begin(caller.actor()).await?;
    refs::check(&mut tx, kind, scope.team.as_ref(), &spec).await?;
    refs::unique_key_id(store, kind, &spec, None).await?;
    refs::unique_mtls(store, &spec, None).await?;
    let prepared = prepare(&mut tx, kind, spec, None, pre).await?;
    let object = tx
        .create(NewObject {
            kind: kind.as_str().to_owned(),
            id: None,
            team_id: scope.team_id().map(str::to_owned),
            name: name.clone(),
            state: prepared.state.flatten(),
            spec: prepared.spec,
        })
        .await?;
    tx.commit().await?;
    let extra = prepared.secret.map(|s| ("secret", Value::String(s)));
    let mut response = object_response(StatusCode::CREATED, &object, scope.team_name(), extra);
    set_location(&mut response, kind, scope.team_name(), &name);
    Ok(response)
}

/// `PUT` (replace) or `PATCH` (merge) one object.
pub(crate) async fn replace(ctx: &Ctx, kind: Kind, patch: bool) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let url_name = ctx.param(crate::endpoints::item_param(kind)).to_owned();
    let scope = if kind.team_scoped() {
        scope(ctx, kind, write_role(kind)).await?
    } else {
        let min = if kind == Kind::Team {
            Role::TeamAdmin
        } else {
            Role::SuperAdmin
        };
        global_access(ctx, kind, &url_name, min).await?;
        Scope { team: None }
    };
    let body = ctx.body()?;
    let expected = ctx.if_match();
    let pre = prehash(kind, &body).await?;
    let store = ctx.store();
    let mut tx = store.begin(caller.actor()).await?;
    let current = tx
        .get_by_name(kind.as_str(), scope.team_id(), &url_name)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no {} named {url_name:?}", kind.as_str())))?;
    let input = if patch {
        let mut merged = redact(kind.as_str(), &current.spec);
        // The decision is the server's: a patch works on the client-writable part only.
        if kind == Kind::Subscription {
            if let Some(o) = merged.as_object_mut() {
                o.remove("decision");
            }
        }
        // A member set to null vanishes in the merge, so the spec's own check of unknown
        // members never sees it: the patch's members are checked against the published schema.
        if let (Some(known), Some(members)) =
            (crate::openapi::patch_members(kind), body.as_object())
            && let Some(unknown) = members.keys().find(|k| !known.contains_key(*k))
        {
            return Err(AdminError::validation(
                unknown.clone(),
                format!("unknown field `{unknown}`"),
            ));
        }
        merge_patch(&mut merged, &body);
        merged
    } else {
        body
    };
    let spec = parse_spec(kind, input)?;
    check_spec_rights(kind, &spec, caller)?;
    if kind == Kind::Team {
        // A team's route space bounds what its own admins may route: only a super admin
        // may change it.
        let list = |v: &Value, f: &str| v.get(f).cloned().unwrap_or(Value::Array(Vec::new()));
        let space = |v: &Value| (list(v, "hosts"), list(v, "path_prefixes"));
        if space(&spec) != space(&current.spec) {
            caller.require_super().map_err(|_| {
                AdminError::forbidden(
                    "only a super admin may change a team's hosts or path prefixes",
                )
            })?;
        }
    }
    // After validation: a malformed body is a 422 whatever revision it was meant for.
    check_revision(&current, expected)?;
    let name = spec_name(&spec)?;
    if name != current.name {
        let users = refs::referrers(store, kind, scope.team.as_ref(), &current, false).await?;
        if !users.is_empty() {
            return Err(AdminError::conflict(format!(
                "cannot rename {} {:?}: referred to by {}",
                kind.as_str(),
                current.name,
                users.join(", ")
            )));
        }
    }
    refs::check(&mut tx, kind, scope.team.as_ref(), &spec).await?;
    refs::unique_key_id(store, kind, &spec, Some(&current.id)).await?;
    refs::unique_mtls(store, &spec, Some(&current.id)).await?;
    let prepared = prepare(&mut tx, kind, spec, Some(&current), pre).await?;
    let object = tx
        .update(
            kind.as_str(),
            &current.id,
            Some(current.revision),
            ObjectPatch {
                name: Some(name.clone()),
                state: prepared.state,
                spec: Some(prepared.spec),
            },
        )
        .await?;
    tx.commit().await?;
    let extra = prepared.secret.map(|s| ("secret", Value::String(s)));
    let team_name = scope.team_name();
    let mut response = object_response(StatusCode::OK, &object, team_name, extra);
    if name != url_name {
        set_location(&mut response, kind, team_name, &name);
    }
    Ok(response)
}

/// 412 unless `expected` (from `If-Match`) is the object's revision.
pub(crate) fn check_revision(object: &Object, expected: Option<Vec<i64>>) -> AdminResult<()> {
    match expected {
        Some(tags) if !tags.contains(&object.revision) => {
            Err(AdminError::precondition_failed(format!(
                "{} {:?} is at revision {} (ETag \"{}\"), which If-Match does not name",
                object.kind, object.name, object.revision, object.revision
            )))
        }
        _ => Ok(()),
    }
}

/// `DELETE` one object.
pub(crate) async fn delete(ctx: &Ctx, kind: Kind) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let url_name = ctx.param(crate::endpoints::item_param(kind)).to_owned();
    let scope = if kind.team_scoped() {
        scope(ctx, kind, write_role(kind)).await?
    } else {
        // Only super admins delete teams and users; others keep the isolation 404.
        global_access(ctx, kind, &url_name, Role::Viewer).await?;
        caller.require_super()?;
        Scope { team: None }
    };
    let expected = ctx.if_match();
    let store = ctx.store();
    let mut tx = store.begin(caller.actor()).await?;
    let current = tx
        .get_by_name(kind.as_str(), scope.team_id(), &url_name)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no {} named {url_name:?}", kind.as_str())))?;
    check_revision(&current, expected)?;
    if kind == Kind::User && current.id == caller.user.id {
        return Err(AdminError::conflict("a user cannot delete itself"));
    }
    let users = refs::referrers(store, kind, scope.team.as_ref(), &current, true).await?;
    if !users.is_empty() {
        return Err(AdminError::conflict(format!(
            "cannot delete {} {:?}: referred to by {}",
            kind.as_str(),
            current.name,
            users.join(", ")
        )));
    }
    tx.delete(kind.as_str(), &current.id, Some(current.revision))
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Team names by id, for envelopes of objects from several teams.
pub(crate) async fn team_names(
    store: &Store,
    objects: &[Object],
) -> AdminResult<HashMap<String, String>> {
    let mut names = HashMap::new();
    for id in objects.iter().filter_map(|o| o.team_id.as_deref()) {
        if !names.contains_key(id) {
            if let Some(team) = store.get(Kind::Team.as_str(), id).await? {
                names.insert(id.to_owned(), team.name);
            }
        }
    }
    Ok(names)
}
