//! The caller's own things and read-only views: tokens, `me`, the audit log, kind schemas.

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};
use turnpike_model::mgmt::{Kind, Role, check_name, spec_schema};
use turnpike_store::{AuditEntry, AuditQuery, Object, TokenRecord, now_ms};

use crate::auth::{Caller, role_name, team_access};
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::objects::{envelope, redact};
use crate::util::rfc3339;

pub(crate) use crate::actions::catalog;

fn token_json(token: &TokenRecord) -> Value {
    json!({
        "id": token.id,
        "name": token.name,
        "created_at": rfc3339(token.created_at),
        "expires_at": token.expires_at.map(rfc3339),
        "last_used_at": token.last_used_at.map(rfc3339),
        "revoked": token.revoked,
    })
}

/// The user `{user}` of a token endpoint: the caller itself, or anyone for a super admin.
async fn token_owner(ctx: &Ctx, caller: &Caller) -> AdminResult<Object> {
    let name = ctx.param("user");
    if caller.name() == name {
        return Ok(caller.user.clone());
    }
    caller
        .require_super()
        .map_err(|_| AdminError::forbidden("only a super admin may manage other users' tokens"))?;
    let missing = || AdminError::not_found(format!("no user named {name:?}"));
    if check_name(name).is_err() {
        return Err(missing());
    }
    ctx.store()
        .get_by_name(Kind::User.as_str(), None, name)
        .await?
        .ok_or_else(missing)
}

/// `POST /users/{user}/tokens` `{"name", "expires_in"?}`: the secret is in this response
/// only.
pub(crate) async fn create_token(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let user = token_owner(ctx, caller).await?;
    let body = ctx.body()?;
    let Some(fields) = body.as_object() else {
        return Err(AdminError::validation("", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "expires_in"))
    {
        return Err(AdminError::validation(
            unknown.clone(),
            format!("unknown field `{unknown}`"),
        ));
    }
    let name = fields
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| AdminError::validation("name", "a token name is required"))?;
    check_name(name).map_err(|m| AdminError::validation("name", m))?;
    let expires_at = match fields.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            let ttl = humantime::parse_duration(text).map_err(|e| {
                AdminError::validation("expires_in", format!("not a duration like `30d`: {e}"))
            })?;
            if ttl.is_zero() {
                return Err(AdminError::validation(
                    "expires_in",
                    "must be longer than zero",
                ));
            }
            Some(crate::expiry(now_ms(), ttl)?)
        }
        Some(_) => {
            return Err(AdminError::validation(
                "expires_in",
                "must be a string like `30d`",
            ));
        }
    };
    let mut tx = ctx.store().begin(caller.actor()).await?;
    let (record, secret) = tx.create_token(&user.id, name, expires_at).await?;
    tx.commit().await?;
    let mut body = token_json(&record);
    body["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// `GET /users/{user}/tokens`.
pub(crate) async fn list_tokens(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let user = token_owner(ctx, caller).await?;
    let tokens = ctx.store().list_tokens(&user.id).await?;
    let items: Vec<Value> = tokens.iter().map(token_json).collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": null })).into_response())
}

/// `DELETE /users/{user}/tokens/{id}`: revokes for good.
pub(crate) async fn revoke_token(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let user = token_owner(ctx, caller).await?;
    let id = ctx.param("id");
    let owned = ctx
        .store()
        .list_tokens(&user.id)
        .await?
        .into_iter()
        .any(|t| t.id == id);
    if !owned {
        return Err(AdminError::not_found(format!(
            "user {:?} has no token {id:?}",
            user.name
        )));
    }
    let mut tx = ctx.store().begin(caller.actor()).await?;
    tx.revoke_token(id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /me`.
pub(crate) async fn me(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let mut memberships = BTreeMap::new();
    for (team_id, role) in &caller.roles {
        if let Some(team) = ctx.store().get(Kind::Team.as_str(), team_id).await? {
            memberships.insert(team.name, role_name(*role));
        }
    }
    Ok(axum::Json(json!({
        "user": envelope(&caller.user, None),
        "super_admin": caller.super_admin,
        "memberships": memberships,
    }))
    .into_response())
}

/// An audit entry as the API shows it: times formatted, credential secrets removed from the
/// before and after images.
fn audit_json(entry: &AuditEntry, team_name: Option<&str>) -> Value {
    let image = |v: &Option<Value>| {
        v.as_ref().map(|v| {
            let mut v = v.clone();
            if entry.kind == Kind::Credential.as_str() {
                if let Some(spec) = v.get("spec") {
                    v["spec"] = redact(&entry.kind, spec);
                }
            }
            v
        })
    };
    json!({
        "id": entry.id,
        "at": rfc3339(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "kind": entry.kind,
        "object_id": entry.object_id,
        "team": team_name,
        "before": image(&entry.before),
        "after": image(&entry.after),
        "store_version": entry.store_version,
    })
}

/// `GET /audit`: super admins see everything; others must name a team they belong to.
pub(crate) async fn audit(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let team = match ctx.query_text("team") {
        Some(name) => Some(team_access(ctx.store(), caller, &name, Role::Viewer).await?),
        None if caller.super_admin => None,
        None => {
            return Err(AdminError::forbidden(
                "pass `team`: only super admins read the whole audit log",
            ));
        }
    };
    let cursor = ctx.query_text("cursor");
    if cursor.as_deref().is_some_and(|c| c.parse::<i64>().is_err()) {
        return Err(AdminError::validation(
            "cursor",
            "not a cursor this API returned",
        ));
    }
    let limit = ctx.limit()?;
    let (Ok(kind), Ok(object_id)) = (ctx.store_filter("kind"), ctx.store_filter("object_id"))
    else {
        return Ok(axum::Json(json!({ "items": [], "next_cursor": null })).into_response());
    };
    let query = AuditQuery {
        kind,
        object_id,
        team_id: team.as_ref().map(|t| t.id.clone()),
        limit,
        cursor,
    };
    let page = ctx.store().audit(&query).await?;
    let mut names = std::collections::HashMap::new();
    for id in page.items.iter().filter_map(|e| e.team_id.as_deref()) {
        if !names.contains_key(id) {
            let name = ctx
                .store()
                .get(Kind::Team.as_str(), id)
                .await?
                .map(|t| t.name);
            names.insert(id.to_owned(), name);
        }
    }
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| {
            let team = e
                .team_id
                .as_ref()
                .and_then(|t| names.get(t).cloned().flatten());
            audit_json(e, team.as_deref())
        })
        .collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": page.next_cursor })).into_response())
}

/// `GET /schemas/{kind}`.
pub(crate) fn schema(ctx: &Ctx) -> AdminResult<Response> {
    let name = ctx.param("kind");
    let kind = Kind::parse(name)
        .ok_or_else(|| AdminError::not_found(format!("no kind named {name:?}")))?;
    Ok(axum::Json(spec_schema(kind)).into_response())
}

/// `GET /schemas/policies`: every policy type, the stage it runs in, and its schema's path.
pub(crate) fn policy_types() -> Response {
    use turnpike_model::policy::{POLICY_TYPES, stage_of};
    let items: Vec<Value> = POLICY_TYPES
        .iter()
        .map(|t| {
            let stage = stage_of(t).map(|s| s.name());
            json!({
                "type": t,
                "stage": stage,
                "schema": format!("{}/schemas/policies/{t}", crate::endpoints::PREFIX),
            })
        })
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

/// `GET /schemas/policies/{policy_type}`.
pub(crate) fn policy_schema(ctx: &Ctx) -> AdminResult<Response> {
    let name = ctx.param("policy_type");
    let schema = turnpike_model::policy::policy_schema(name)
        .ok_or_else(|| AdminError::not_found(format!("no policy type named {name:?}")))?;
    Ok(axum::Json(schema).into_response())
}
