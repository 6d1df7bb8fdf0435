//! Actions beyond CRUD: subscription decisions, the service lifecycle with its releases, and
//! OpenAPI import.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Map, Value, json};
use turnpike_model::mgmt::{Kind, Lifecycle, Role, SubscriptionState, check_name, parse_spec};
use turnpike_store::{AuditRecord, NewObject, Object, ObjectPatch, Release, now_ms};

use crate::auth::{find_team, team_access, team_not_found};
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::objects::{check_revision, envelope, object_response, team_names};
use crate::refs::all_of;
use crate::util::{rfc3339, sha256_hex, slug};

/// Reads an optional JSON object body with only the given string or integer members.
fn optional_fields(ctx: &Ctx, allowed: &[&str]) -> AdminResult<Map<String, Value>> {
    if let Some(body) = &ctx.body {
        crate::util::reject_nul(body)?;
    }
    match &ctx.body {
        None => Ok(Map::new()),
        Some(Value::Object(members)) => {
            if let Some(unknown) = members.keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(AdminError::validation(
                    unknown.clone(),
                    format!("unknown field `{unknown}`, expected one of {allowed:?}"),
                ));
            }
            Ok(members.clone())
        }
        Some(_) => Err(AdminError::validation("", "the body must be a JSON object")),
    }
}

fn optional_text(members: &Map<String, Value>, field: &str) -> AdminResult<Option<String>> {
    match members.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 4096 => Ok(Some(s.clone())),
        Some(_) => Err(AdminError::validation(
            field,
            "must be a string of at most 4096 bytes",
        )),
    }
}

fn state_of(object: &Object) -> &str {
    object.state.as_deref().unwrap_or_default()
}

fn parse_sub_state(s: &str) -> Option<SubscriptionState> {
    use SubscriptionState::*;
    [Requested, Approved, Rejected, Revoked]
        .into_iter()
        .find(|x| x.as_str() == s)
}

/// `POST .../subscriptions/{name}/approve|reject|revoke`: for API owners of the service's
/// team. Members of the subscribing team see the subscription but may not decide (403);
/// others get 404.
pub(crate) async fn decide(ctx: &Ctx, to: SubscriptionState) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team_name = ctx.param("team");
    let name = ctx.param("name");
    let missing = || AdminError::not_found(format!("no subscription named {name:?}"));
    let team = find_team(store, team_name)
        .await?
        .ok_or_else(|| team_not_found(team_name))?;
    if check_name(name).is_err() {
        return Err(missing());
    }
    let fields = optional_fields(ctx, &["reason"])?;
    let reason = optional_text(&fields, "reason")?.unwrap_or_default();
    let mut tx = store.begin(caller.actor()).await?;
    let sub = tx
        .get_by_name(Kind::Subscription.as_str(), Some(&team.id), name)
        .await?;
    let service_team_name = sub
        .as_ref()
        .and_then(|s| s.spec.get("service_team"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let service_team = tx
        .get_by_name(Kind::Team.as_str(), None, &service_team_name)
        .await?;
    let approver_team = service_team
        .as_ref()
        .map(|t| t.id.as_str())
        .unwrap_or_default();
    if !(caller.sees(&team.id) || caller.sees(approver_team)) {
        return Err(team_not_found(team_name));
    }
    let sub = sub.ok_or_else(missing)?;
    if service_team.is_none() || !caller.has(approver_team, Role::ApiOwner) {
        return Err(AdminError::forbidden(format!(
            "only API owners of team {service_team_name} decide on subscriptions to its services"
        )));
    }
    check_revision(&sub, ctx.if_match())?;
    let from = parse_sub_state(state_of(&sub)).unwrap_or(SubscriptionState::Requested);
    if !from.can_move_to(to) {
        return Err(AdminError::conflict(format!(
            "subscription {name:?} is {}; it cannot become {}",
            from.as_str(),
            to.as_str()
        )));
    }
    let decision = json!({ "by": caller.name(), "reason": reason, "at": rfc3339(now_ms()) });
    let mut spec = sub.spec.clone();
    spec["decision"] = decision.clone();
    let updated = tx
        .update(
            Kind::Subscription.as_str(),
            &sub.id,
            Some(sub.revision),
            ObjectPatch {
                state: Some(Some(to.as_str().to_owned())),
                spec: Some(spec),
                ..ObjectPatch::default()
            },
        )
        .await?;
    let action = match to {
        SubscriptionState::Approved => "approve",
        SubscriptionState::Rejected => "reject",
        SubscriptionState::Revoked => "revoke",
        SubscriptionState::Requested => "request",
    };
    tx.record(AuditRecord {
        action: action.to_owned(),
        kind: Kind::Subscription.as_str().to_owned(),
        object_id: sub.id.clone(),
        team_id: Some(team.id.clone()),
        before: Some(json!({ "state": from.as_str() })),
        after: Some(json!({ "state": to.as_str(), "decision": decision })),
    })
    .await?;
    tx.commit().await?;
    Ok(object_response(
        StatusCode::OK,
        &updated,
        Some(&team.name),
        None,
    ))
}

/// Applies `cursor` (ids after it) and `limit` to an id-ordered listing filtered in memory.
fn paginate(ctx: &Ctx, mut objects: Vec<Object>) -> AdminResult<(Vec<Object>, Option<String>)> {
    let limit = ctx.limit()?.unwrap_or(turnpike_store::DEFAULT_LIMIT) as usize;
    if let Some(cursor) = ctx.cursor() {
        objects.retain(|o| o.id > cursor);
    }
    let next = if objects.len() > limit {
        objects.truncate(limit);
        objects.last().map(|o| o.id.clone())
    } else {
        None
    };
    Ok((objects, next))
}

async fn page_response(ctx: &Ctx, objects: Vec<Object>) -> AdminResult<Response> {
    let (objects, next) = paginate(ctx, objects)?;
    let names = team_names(ctx.store(), &objects).await?;
    let items: Vec<Value> = objects
        .iter()
        .map(|o| {
            envelope(
                o,
                o.team_id
                    .as_ref()
                    .and_then(|t| names.get(t))
                    .map(String::as_str),
            )
        })
        .collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": next })).into_response())
}

/// `GET /teams/{team}/subscription-requests`: subscriptions of every team to this team's
/// services.
pub(crate) async fn subscription_requests(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let team = team_access(ctx.store(), caller, ctx.param("team"), Role::Viewer).await?;
    let state = ctx.query_text("state");
    let subs: Vec<Object> = all_of(ctx.store(), Kind::Subscription, None)
        .await?
        .into_iter()
        .filter(|s| s.spec.get("service_team").and_then(Value::as_str) == Some(team.name.as_str()))
        .filter(|s| {
            state
                .as_deref()
                .is_none_or(|st| s.state.as_deref() == Some(st))
        })
        .collect();
    page_response(ctx, subs).await
}

/// `GET /catalog`: public services that are published or deprecated, of every team.
pub(crate) async fn catalog(ctx: &Ctx) -> AdminResult<Response> {
    ctx.caller()?;
    let state = ctx.query_text("state");
    let services: Vec<Object> = all_of(ctx.store(), Kind::Service, None)
        .await?
        .into_iter()
        .filter(|s| s.spec.get("visibility").and_then(Value::as_str) == Some("public"))
        .filter(|s| matches!(state_of(s), "published" | "deprecated"))
        .filter(|s| state.as_deref().is_none_or(|st| state_of(s) == st))
        .collect();
    page_response(ctx, services).await
}

/// The JSON of a release.
fn release_json(release: &Release) -> Value {
    json!({
        "number": release.number,
        "note": release.note,
        "created_at": rfc3339(release.created_at),
        "created_by": release.created_by,
        "content": release.content,
    })
}

/// What a release of `service` holds: its spec, its routes and the policies attached to
/// it or its routes, each ordered by name.
async fn release_content(ctx: &Ctx, team: &Object, service: &Object) -> AdminResult<Value> {
    let store = ctx.store();
    let mut routes: Vec<Object> = all_of(store, Kind::Route, Some(&team.id))
        .await?
        .into_iter()
        .filter(|r| r.spec.get("service").and_then(Value::as_str) == Some(service.name.as_str()))
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    let attached = |p: &Object| {
        let target = p.spec.get("target").and_then(Value::as_str);
        match p.spec.get("scope").and_then(Value::as_str) {
            Some("service") => target == Some(service.name.as_str()),
            Some("route") => routes.iter().any(|r| Some(r.name.as_str()) == target),
            _ => false,
        }
    };
    let mut policies: Vec<Object> = all_of(store, Kind::Policy, Some(&team.id))
        .await?
        .into_iter()
        .filter(|p| attached(p))
        .collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json!({
        "service": service.spec,
        "routes": routes.iter().map(|r| &r.spec).collect::<Vec<_>>(),
        "policies": policies.iter().map(|p| &p.spec).collect::<Vec<_>>(),
    }))
}

fn lifecycle_of(service: &Object) -> Lifecycle {
    service
        .state
        .as_deref()
        .and_then(Lifecycle::parse)
        .unwrap_or_default()
}

fn lifecycle_response(service: &Object, team: &Object, release: Option<&Release>) -> Response {
    axum::Json(json!({
        "service": envelope(service, Some(&team.name)),
        "release": release.map(release_json),
    }))
    .into_response()
}

/// `POST .../services/{name}/publish|deprecate|retire`.
pub(crate) async fn transition(ctx: &Ctx, to: Lifecycle) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::ApiOwner).await?;
    let note = optional_text(&optional_fields(ctx, &["note"])?, "note")?;
    let name = ctx.param("name");
    let mut tx = store.begin(caller.actor()).await?;
    let service = get_service(&mut tx, &team, name).await?;
    check_revision(&service, ctx.if_match())?;
    let from = lifecycle_of(&service);
    if !from.can_move_to(to) {
        return Err(AdminError::conflict(format!(
            "service {name:?} is {}; it cannot become {}",
            from.as_str(),
            to.as_str()
        )));
    }
    let release = if to == Lifecycle::Published {
        let content = release_content(ctx, &team, &service).await?;
        Some(
            tx.create_release(
                Kind::Service.as_str(),
                &service.id,
                &content,
                note.as_deref(),
            )
            .await?,
        )
    } else {
        None
    };
    let updated = tx
        .update(
            Kind::Service.as_str(),
            &service.id,
            Some(service.revision),
            ObjectPatch {
                state: Some(Some(to.as_str().to_owned())),
                ..ObjectPatch::default()
            },
        )
        .await?;
    tx.commit().await?;
    Ok(lifecycle_response(&updated, &team, release.as_ref()))
}

async fn get_service(
    tx: &mut turnpike_store::StoreTx,
    team: &Object,
    name: &str,
) -> AdminResult<Object> {
    let missing = || AdminError::not_found(format!("no service named {name:?}"));
    if check_name(name).is_err() {
        return Err(missing());
    }
    tx.get_by_name(Kind::Service.as_str(), Some(&team.id), name)
        .await?
        .ok_or_else(missing)
}

async fn read_service(ctx: &Ctx) -> AdminResult<(Object, Object)> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::Viewer).await?;
    let name = ctx.param("name");
    let missing = || AdminError::not_found(format!("no service named {name:?}"));
    if check_name(name).is_err() {
        return Err(missing());
    }
    let service = store
        .get_by_name(Kind::Service.as_str(), Some(&team.id), name)
        .await?
        .ok_or_else(missing)?;
    Ok((team, service))
}

/// `GET .../services/{name}/releases`.
pub(crate) async fn list_releases(ctx: &Ctx) -> AdminResult<Response> {
    let (_, service) = read_service(ctx).await?;
    let releases = ctx
        .store()
        .list_releases(Kind::Service.as_str(), &service.id)
        .await?;
    let items: Vec<Value> = releases.iter().map(release_json).collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": null })).into_response())
}

/// `GET .../services/{name}/releases/{number}`.
pub(crate) async fn get_release(ctx: &Ctx) -> AdminResult<Response> {
    let (_, service) = read_service(ctx).await?;
    let number = ctx.param("number");
    let missing = || AdminError::not_found(format!("no release {number:?}"));
    let number: i64 = number.parse().map_err(|_| missing())?;
    let release = ctx
        .store()
        .get_release(Kind::Service.as_str(), &service.id, number)
        .await?
        .ok_or_else(missing)?;
    Ok(axum::Json(release_json(&release)).into_response())
}

/// `POST .../services/{name}/rollback` `{"release": N}`.
pub(crate) async fn rollback(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::ApiOwner).await?;
    let fields = optional_fields(ctx, &["release"])?;
    let number = fields
        .get("release")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            AdminError::validation("release", "a release number (1 or more) is required")
        })?;
    let name = ctx.param("name");
    let mut tx = store.begin(caller.actor()).await?;
    let service = get_service(&mut tx, &team, name).await?;
    let state = lifecycle_of(&service);
    if !matches!(state, Lifecycle::Published | Lifecycle::Deprecated) {
        return Err(AdminError::conflict(format!(
            "service {name:?} is {}; only a published or deprecated service can be rolled back",
            state.as_str()
        )));
    }
    let old = store
        .get_release(Kind::Service.as_str(), &service.id, number)
        .await?
        .ok_or_else(|| {
            AdminError::validation(
                "release",
                format!("service {name:?} has no release {number}"),
            )
        })?;
    let note = format!("rollback to {number}");
    let release = tx
        .create_release(
            Kind::Service.as_str(),
            &service.id,
            &old.content,
            Some(&note),
        )
        .await?;
    tx.commit().await?;
    Ok(lifecycle_response(&service, &team, Some(&release)))
}

/// `POST .../services/{name}/switch` `{"upstream": U}`: blue/green in one call. The latest
/// release's content is released again with the service's upstream set to `U` (routes that
/// name an upstream of their own keep it), and the working spec follows, so a later publish
/// does not switch back. Switching back is the same call (or a rollback).
pub(crate) async fn switch_upstream(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::ApiOwner).await?;
    let fields = optional_fields(ctx, &["upstream", "note"])?;
    let upstream = fields
        .get("upstream")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| AdminError::validation("upstream", "an upstream name is required"))?
        .to_owned();
    let note = optional_text(&fields, "note")?;
    let name = ctx.param("name");
    let mut tx = store.begin(caller.actor()).await?;
    let service = get_service(&mut tx, &team, name).await?;
    check_revision(&service, ctx.if_match())?;
    let state = lifecycle_of(&service);
    if !matches!(state, Lifecycle::Published | Lifecycle::Deprecated) {
        return Err(AdminError::conflict(format!(
            "service {name:?} is {}; only a published or deprecated service can be switched",
            state.as_str()
        )));
    }
    crate::refs::check(
        &mut tx,
        Kind::Service,
        Some(&team),
        &json!({ "upstream": upstream }),
    )
    .await?;
    let latest = store
        .latest_release(Kind::Service.as_str(), &service.id)
        .await?
        .ok_or_else(|| AdminError::conflict(format!("service {name:?} has no release")))?;
    let mut content = latest.content.clone();
    if let Some(svc) = content.get_mut("service").and_then(Value::as_object_mut) {
        svc.insert("upstream".into(), Value::String(upstream.clone()));
    }
    let note = note.unwrap_or_else(|| format!("switch to upstream {upstream}"));
    let release = tx
        .create_release(Kind::Service.as_str(), &service.id, &content, Some(&note))
        .await?;
    let mut spec = service.spec.clone();
    if let Some(obj) = spec.as_object_mut() {
        obj.insert("upstream".into(), Value::String(upstream));
    }
    let updated = tx
        .update(
            Kind::Service.as_str(),
            &service.id,
            Some(service.revision),
            ObjectPatch {
                spec: Some(spec),
                ..ObjectPatch::default()
            },
        )
        .await?;
    tx.commit().await?;
    Ok(lifecycle_response(&updated, &team, Some(&release)))
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The path part of the first server URL, without a trailing `/` (`""` when none).
fn base_path(doc: &Value) -> String {
    let url = doc
        .get("servers")
        .and_then(Value::as_array)
        .and_then(|s| s.first())
        .and_then(|s| s.get("url"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let path = match url.find("://") {
        Some(i) => url[i + 3..].find('/').map_or("", |j| &url[i + 3 + j..]),
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.starts_with('/') {
        path.trim_end_matches('/').to_owned()
    } else {
        String::new()
    }
}

/// The routes an OpenAPI document asks for: (name, template, methods), by path.
fn planned_routes(service: &str, doc: &Value) -> AdminResult<Vec<(String, String, Vec<String>)>> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if !version.starts_with("3.") {
        return Err(AdminError::validation(
            "openapi",
            "an OpenAPI 3.x document is required (`openapi: 3.x`)",
        ));
    }
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or_else(|| AdminError::validation("paths", "the document has no `paths` object"))?;
    let base = base_path(doc);
    let mut planned: Vec<(String, String, Vec<String>)> = Vec::new();
    // In path order, not the document's: the same paths written in another order plan the
    // same routes with the same names.
    let mut paths: Vec<(&String, &Value)> = paths.iter().collect();
    paths.sort_by(|a, b| a.0.cmp(b.0));
    for (path, item) in paths {
        if !path.starts_with('/') {
            return Err(AdminError::validation(
                format!("paths.{path}"),
                "paths must start with `/`",
            ));
        }
        let methods: Vec<String> = HTTP_METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_ascii_uppercase())
            .collect();
        if methods.is_empty() {
            continue;
        }
        let fragment = slug(path);
        let fragment = if fragment.is_empty() {
            "root".to_owned()
        } else {
            fragment
        };
        let mut name = format!("{service}-{fragment}");
        let taken = |n: &str| planned.iter().any(|(p, _, _)| p == n);
        if name.len() > 63 || taken(&name) {
            // Deterministic, so importing the same document again finds the same names.
            let hash = &sha256_hex(path)[..8];
            let keep = name
                .char_indices()
                .take_while(|(i, _)| *i < 54)
                .map(|(_, c)| c);
            name = format!("{}-{hash}", keep.collect::<String>().trim_end_matches('-'));
        }
        check_name(&name).map_err(|m| AdminError::validation(format!("paths.{path}"), m))?;
        let template = if path == "/" && !base.is_empty() {
            base.clone()
        } else {
            format!("{base}{path}")
        };
        planned.push((name, template, methods));
    }
    Ok(planned)
}

/// `POST .../services/{name}/import-openapi`.
pub(crate) async fn import_openapi(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::ApiOwner).await?;
    let doc = ctx.body()?;
    let name = ctx.param("name").to_owned();
    let planned = planned_routes(&name, &doc)?;
    let mut tx = store.begin(caller.actor()).await?;
    let service = get_service(&mut tx, &team, &name).await?;
    check_revision(&service, ctx.if_match())?;
    let mut spec = service.spec.clone();
    spec["openapi"] = doc;
    let spec = parse_spec(Kind::Service, spec)?;
    let service = if spec == service.spec {
        service
    } else {
        tx.update(
            Kind::Service.as_str(),
            &service.id,
            Some(service.revision),
            ObjectPatch {
                spec: Some(spec),
                ..ObjectPatch::default()
            },
        )
        .await?
    };
    let mut routes = Vec::new();
    for (route_name, template, methods) in planned {
        let existing = tx
            .get_by_name(Kind::Route.as_str(), Some(&team.id), &route_name)
            .await?;
        let route = match existing {
            Some(route) => {
                if route.spec.get("service").and_then(Value::as_str) != Some(name.as_str()) {
                    return Err(AdminError::conflict(format!(
                        "route {route_name:?} already exists and belongs to another service"
                    )));
                }
                let mut spec = route.spec.clone();
                spec["paths"] = json!([{ "template": template }]);
                spec["methods"] = json!(methods);
                let spec = parse_spec(Kind::Route, spec)?;
                if spec == route.spec {
                    route
                } else {
                    tx.update(
                        Kind::Route.as_str(),
                        &route.id,
                        Some(route.revision),
                        ObjectPatch {
                            spec: Some(spec),
                            ..ObjectPatch::default()
                        },
                    )
                    .await?
                }
            }
            None => {
                let spec = parse_spec(
                    Kind::Route,
                    json!({
                        "name": route_name,
                        "service": name,
                        "paths": [{ "template": template }],
                        "methods": methods,
                    }),
                )?;
                tx.create(NewObject {
                    kind: Kind::Route.as_str().to_owned(),
                    team_id: Some(team.id.clone()),
                    name: route_name.clone(),
                    spec,
                    ..NewObject::default()
                })
                .await?
            }
        };
        routes.push(envelope(&route, Some(&team.name)));
    }
    tx.commit().await?;
    Ok(axum::Json(json!({
        "service": envelope(&service, Some(&team.name)),
        "routes": routes,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths() {
        let doc = |url: &str| json!({ "servers": [{ "url": url }] });
        assert_eq!(base_path(&doc("https://api.example.com/v1/")), "/v1");
        assert_eq!(base_path(&doc("https://api.example.com")), "");
        assert_eq!(base_path(&doc("/v2")), "/v2");
        assert_eq!(base_path(&json!({})), "");
    }

    #[test]
    fn routes_are_planned_per_path() -> Result<(), AdminError> {
        let doc = json!({
            "openapi": "3.1.0",
            "servers": [{ "url": "https://x/api" }],
            "paths": {
                "/users/{id}": { "get": {}, "delete": {}, "parameters": [] },
                "/": { "get": {} },
                "/empty": { "summary": "no operations" },
            },
        });
        let planned = planned_routes("svc", &doc)?;
        assert_eq!(planned.len(), 2);
        assert_eq!(
            planned[0],
            ("svc-root".into(), "/api".into(), vec!["GET".into()])
        );
        assert_eq!(
            planned[1],
            (
                "svc-users-id".into(),
                "/api/users/{id}".into(),
                vec!["GET".into(), "DELETE".into()]
            )
        );
        Ok(())
    }
}
