//! References between objects: checked on every write (a missing reference is a 422 naming
//! the field), and looked for before a delete or rename (a referenced object answers 409
//! naming who refers to it).
//!
//! Forward checks read through the write transaction. The reverse look-ups need listings,
//! which `StoreTx` does not offer, so they read through the store while the transaction is
//! open: writers are serialised by the store, so no other writer can add a referrer between
//! that read and this transaction's commit.

use serde_json::Value;
use turnpike_model::mgmt::{Kind, check_name};
use turnpike_store::{ListQuery, MAX_LIMIT, Object, Store, StoreTx, TeamFilter};

use crate::error::{AdminError, AdminResult};

fn text<'a>(spec: &'a Value, field: &str) -> Option<&'a str> {
    spec.get(field).and_then(Value::as_str)
}

/// The object `kind`/`name` in `team_id` seen by the transaction, or a 422 about `field`.
async fn must(
    tx: &mut StoreTx,
    kind: Kind,
    team: Option<&Object>,
    name: &str,
    field: &str,
) -> AdminResult<Object> {
    let found = if check_name(name).is_ok() {
        tx.get_by_name(kind.as_str(), team.map(|t| t.id.as_str()), name)
            .await?
    } else {
        None
    };
    found.ok_or_else(|| {
        let place = team.map_or_else(String::new, |t| format!(" in team {}", t.name));
        AdminError::validation(
            field,
            format!(
                "there is no {} named {name:?}{place}",
                kind.as_str().replace('_', " ")
            ),
        )
    })
}

/// An `hmac` credential's `key_id` must be free in every team: the gateway finds the secret
/// by key id alone. Read through the store, as [`referrers`] does, for the same reason.
pub(crate) async fn unique_key_id(
    store: &Store,
    kind: Kind,
    spec: &Value,
    own_id: Option<&str>,
) -> AdminResult<()> {
    let hmac = |s: &Value| text(s, "type") == Some("hmac");
    let (true, Some(key_id)) = (kind == Kind::Credential && hmac(spec), text(spec, "key_id"))
    else {
        return Ok(());
    };
    for o in all_of(store, Kind::Credential, None).await? {
        if Some(o.id.as_str()) != own_id && hmac(&o.spec) && text(&o.spec, "key_id") == Some(key_id)
        {
            return Err(AdminError::conflict(format!(
                "key id {key_id:?} is already used by another hmac credential"
            )));
        }
    }
    Ok(())
}

/// Checks every reference a spec of `kind` in `team` makes.
pub(crate) async fn check(
    tx: &mut StoreTx,
    kind: Kind,
    team: Option<&Object>,
    spec: &Value,
) -> AdminResult<()> {
    match kind {
        Kind::Member => {
            if let Some(user) = text(spec, "name") {
                must(tx, Kind::User, None, user, "name").await?;
            }
        }
        Kind::Service => {
            if let Some(upstream) = text(spec, "upstream") {
                must(tx, Kind::Upstream, team, upstream, "upstream").await?;
            }
        }
        Kind::Route => {
            if let Some(service) = text(spec, "service") {
                must(tx, Kind::Service, team, service, "service").await?;
            }
            if let (Some(team), Ok(route)) = (
                team,
                serde_json::from_value::<turnpike_model::mgmt::RouteSpec>(spec.clone()),
            ) && let Ok(space) =
                serde_json::from_value::<turnpike_model::mgmt::TeamSpec>(team.spec.clone())
                && let Err((field, why)) = space.admits(&route)
            {
                return Err(AdminError::validation(field, why));
            }
            if let Some(upstream) = text(spec, "upstream") {
                must(tx, Kind::Upstream, team, upstream, "upstream").await?;
            }
        }
        Kind::Credential => {
            if let Some(app) = text(spec, "application") {
                must(tx, Kind::Application, team, app, "application").await?;
            }
            if matches!(text(spec, "type"), Some("jwt" | "hmac")) {
                if let Some(secret) = text(spec, "secret") {
                    must(tx, Kind::Secret, team, secret, "secret").await?;
                }
            }
        }
        Kind::ConsumerGroup => {
            let apps = spec
                .get("applications")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (i, app) in apps.iter().enumerate() {
                if let Some(app) = app.as_str() {
                    must(
                        tx,
                        Kind::Application,
                        team,
                        app,
                        &format!("applications[{i}]"),
                    )
                    .await?;
                }
            }
        }
        Kind::Subscription => {
            if let Some(app) = text(spec, "application") {
                must(tx, Kind::Application, team, app, "application").await?;
            }
            subscribed_service(tx, team, spec).await?;
        }
        Kind::Policy => {
            if let (Some(scope), Some(target)) = (text(spec, "scope"), text(spec, "target")) {
                let target_kind = match scope {
                    "service" => Kind::Service,
                    "route" => Kind::Route,
                    "application" => Kind::Application,
                    "plan" => Kind::Plan,
                    _ => return Ok(()),
                };
                must(tx, target_kind, team, target, "target").await?;
            }
        }
        Kind::Certificate => {
            if let Some(secret) = text(spec, "key_secret") {
                must(tx, Kind::Secret, team, secret, "key_secret").await?;
            }
        }
        Kind::Team
        | Kind::User
        | Kind::Upstream
        | Kind::Application
        | Kind::Plan
        | Kind::Secret => {}
    }
    Ok(())
}

/// Refuses an `mtls` credential whose certificate subject or SAN already belongs to another
/// credential (of any team): one certificate must identify one application. `own_id` is the
/// credential being replaced. Reads through the store while the write transaction holds the
/// writer lock (see the module docs), so two writers cannot both take one name.
pub(crate) async fn unique_mtls(
    store: &Store,
    spec: &Value,
    own_id: Option<&str>,
) -> AdminResult<()> {
    use turnpike_model::managed::mtls_san_claim;
    if text(spec, "type") != Some("mtls") {
        return Ok(());
    }
    let wanted = |s: &Value| {
        (
            text(s, "subject").map(str::to_owned),
            text(s, "san").map(mtls_san_claim),
        )
    };
    let (subject, san) = wanted(spec);
    for other in store.list_all(Kind::Credential.as_str()).await? {
        if Some(other.id.as_str()) == own_id || text(&other.spec, "type") != Some("mtls") {
            continue;
        }
        let (o_subject, o_san) = wanted(&other.spec);
        let field = if subject.is_some() && subject == o_subject {
            "subject"
        } else if san.is_some() && san == o_san {
            "san"
        } else {
            continue;
        };
        return Err(AdminError::conflict(format!(
            "this certificate {field} already identifies the application of another mtls credential"
        )));
    }
    Ok(())
}

/// The service a subscription spec asks for, after checking it exists, is visible to the
/// subscribing team (public, or the team's own), and that the plan exists in its team.
/// Services the subscriber cannot see are reported exactly like missing ones.
async fn subscribed_service(
    tx: &mut StoreTx,
    team: Option<&Object>,
    spec: &Value,
) -> AdminResult<Object> {
    let team_name = text(spec, "service_team").unwrap_or_default();
    let service_team = must(tx, Kind::Team, None, team_name, "service_team").await?;
    let service_name = text(spec, "service").unwrap_or_default();
    let service = must(
        tx,
        Kind::Service,
        Some(&service_team),
        service_name,
        "service",
    )
    .await?;
    let own = team.is_some_and(|t| t.id == service_team.id);
    if !own && text(&service.spec, "visibility") != Some("public") {
        return Err(AdminError::validation(
            "service",
            format!("there is no service named {service_name:?} in team {team_name}"),
        ));
    }
    if let Some(plan) = text(spec, "plan") {
        must(tx, Kind::Plan, Some(&service_team), plan, "plan").await?;
    }
    Ok(service)
}

/// Whether the service a (checked) subscription spec names approves requests automatically.
pub(crate) async fn subscribed_service_is_auto(
    tx: &mut StoreTx,
    spec: &Value,
) -> AdminResult<bool> {
    let team_name = text(spec, "service_team").unwrap_or_default();
    let service_team = must(tx, Kind::Team, None, team_name, "service_team").await?;
    let service_name = text(spec, "service").unwrap_or_default();
    let service = must(
        tx,
        Kind::Service,
        Some(&service_team),
        service_name,
        "service",
    )
    .await?;
    Ok(text(&service.spec, "approval") != Some("manual"))
}

/// Every object of `kind` in `team_id` (`None`: in every team).
pub(crate) async fn all_of(
    store: &Store,
    kind: Kind,
    team_id: Option<&str>,
) -> AdminResult<Vec<Object>> {
    let Some(team_id) = team_id else {
        return Ok(store.list_all(kind.as_str()).await?);
    };
    let mut out = Vec::new();
    let mut query = ListQuery {
        team: TeamFilter::Team(team_id.to_owned()),
        limit: Some(MAX_LIMIT),
        ..ListQuery::default()
    };
    loop {
        let page = store.list(kind.as_str(), &query).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return Ok(out),
        }
    }
}

/// Who refers to `object` (of `kind`, in `team`) by name, as `kind name` labels. A team
/// being deleted is also "referred to" by every object it holds; a team being renamed only
/// by subscriptions naming it as `service_team`.
pub(crate) async fn referrers(
    store: &Store,
    kind: Kind,
    team: Option<&Object>,
    object: &Object,
    deleting: bool,
) -> AdminResult<Vec<String>> {
    let name = object.name.as_str();
    let team_id = team.map(|t| t.id.as_str());
    let team_name = team.map_or("", |t| t.name.as_str());
    let mut found = Vec::new();
    let mut scan = async |of: Kind,
                          in_team: Option<&str>,
                          refers: &(dyn Fn(&Value) -> bool + Sync)|
           -> AdminResult<()> {
        for o in all_of(store, of, in_team).await? {
            if refers(&o.spec) {
                found.push(format!("{} {}", of.as_str().replace('_', " "), o.name));
            }
        }
        Ok(())
    };
    let is = |field: &'static str| move |spec: &Value| text(spec, field) == Some(name);
    let policy_on = |scope: &'static str| {
        move |spec: &Value| text(spec, "scope") == Some(scope) && text(spec, "target") == Some(name)
    };
    let subscribed = |field: &'static str| {
        move |spec: &Value| {
            text(spec, "service_team") == Some(team_name) && text(spec, field) == Some(name)
        }
    };
    match kind {
        Kind::Upstream => {
            scan(Kind::Service, team_id, &is("upstream")).await?;
            scan(Kind::Route, team_id, &is("upstream")).await?;
        }
        Kind::Service => {
            scan(Kind::Route, team_id, &is("service")).await?;
            scan(Kind::Policy, team_id, &policy_on("service")).await?;
            scan(Kind::Subscription, None, &subscribed("service")).await?;
        }
        Kind::Route => scan(Kind::Policy, team_id, &policy_on("route")).await?,
        Kind::Application => {
            scan(Kind::Credential, team_id, &is("application")).await?;
            scan(Kind::ConsumerGroup, team_id, &|spec: &Value| {
                spec.get("applications")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(name)))
            })
            .await?;
            scan(Kind::Subscription, team_id, &is("application")).await?;
            scan(Kind::Policy, team_id, &policy_on("application")).await?;
        }
        Kind::Plan => {
            scan(Kind::Subscription, None, &subscribed("plan")).await?;
            scan(Kind::Policy, team_id, &policy_on("plan")).await?;
        }
        Kind::Secret => {
            scan(Kind::Certificate, team_id, &is("key_secret")).await?;
            scan(Kind::Credential, team_id, &|spec: &Value| {
                matches!(text(spec, "type"), Some("jwt" | "hmac"))
                    && text(spec, "secret") == Some(name)
            })
            .await?;
        }
        Kind::User => {
            for member in all_of(store, Kind::Member, None).await? {
                if member.name == name {
                    found.push(format!(
                        "membership of team id {}",
                        member.team_id.unwrap_or_default()
                    ));
                }
            }
        }
        Kind::Team => {
            if deleting {
                for of in Kind::ALL.into_iter().filter(|k| k.team_scoped()) {
                    let count = all_of(store, of, Some(&object.id)).await?.len();
                    if count > 0 {
                        found.push(format!("{count} {} object(s) of the team", of.as_str()));
                    }
                }
            } else {
                for sub in all_of(store, Kind::Subscription, None).await? {
                    if text(&sub.spec, "service_team") == Some(name) {
                        found.push(format!("subscription {}", sub.name));
                    }
                }
            }
        }
        Kind::Member
        | Kind::Credential
        | Kind::ConsumerGroup
        | Kind::Subscription
        | Kind::Policy
        | Kind::Certificate => {}
    }
    Ok(found)
}
