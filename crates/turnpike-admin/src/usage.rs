//! Plan quota usage of an application: what its approved subscriptions' plans allow in the
//! current day or month, and how much of it the gateway nodes have counted so far.
//!
//! The counts are the store's (`quota_usage`): what the nodes have flushed, so they lag the
//! gateways by up to one quota flush interval.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use turnpike_model::mgmt::{Kind, PlanSpec, Role, SubscriptionSpec, check_name};
use turnpike_store::{Usage, now_ms};

use crate::auth::{find_team, team_access};
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::refs::all_of;
use crate::util::rfc3339;

/// `GET /teams/{team}/applications/{name}/usage`: the application's team (viewer and up)
/// sees it, like the application itself.
pub(crate) async fn application_usage(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let team = team_access(store, caller, ctx.param("team"), Role::Viewer).await?;
    let name = ctx.param("name");
    let missing = || AdminError::not_found(format!("no application named {name:?}"));
    if check_name(name).is_err() {
        return Err(missing());
    }
    let app = store
        .get_by_name(Kind::Application.as_str(), Some(&team.id), name)
        .await?
        .ok_or_else(missing)?;
    let now = now_ms();
    let day = turnpike_model::mgmt::QuotaPeriod::Day.bounds(now).0;
    let month = turnpike_model::mgmt::QuotaPeriod::Month.bounds(now).0;
    let counted = store.usage_of(&app.id, day.min(month)).await?;

    let mut items = Vec::new();
    for sub in all_of(store, Kind::Subscription, Some(&team.id)).await? {
        if sub.state.as_deref() != Some("approved") {
            continue;
        }
        let Ok(spec) = serde_json::from_value::<SubscriptionSpec>(sub.spec.clone()) else {
            continue;
        };
        if spec.application != app.name {
            continue;
        }
        // The service and plan live in the provider's team; either may be gone since.
        let Some(provider) = find_team(store, &spec.service_team).await? else {
            continue;
        };
        let Some(service) = store
            .get_by_name(Kind::Service.as_str(), Some(&provider.id), &spec.service)
            .await?
        else {
            continue;
        };
        let plan = match &spec.plan {
            Some(p) => store
                .get_by_name(Kind::Plan.as_str(), Some(&provider.id), p)
                .await?
                .and_then(|o| serde_json::from_value::<PlanSpec>(o.spec).ok()),
            None => None,
        };
        let quotas: Vec<Value> = plan
            .iter()
            .flat_map(|p| p.quotas.iter())
            .map(|q| {
                let (start, end) = q.period.bounds(now);
                let used = counted
                    .iter()
                    .find(|u: &&Usage| {
                        u.service == service.id
                            && u.period == q.period.as_str()
                            && u.period_start == start
                    })
                    .map_or(0, |u| u64::try_from(u.used).unwrap_or(0));
                json!({
                    "period": q.period.as_str(),
                    "limit": q.requests,
                    "used": used,
                    "remaining": q.requests.saturating_sub(used),
                    "period_start": rfc3339(start),
                    "reset_at": rfc3339(end),
                })
            })
            .collect();
        items.push(json!({
            "subscription": sub.name,
            "service_team": spec.service_team,
            "service": spec.service,
            "plan": spec.plan,
            "quotas": quotas,
        }));
    }
    Ok(axum::Json(json!({ "application": app.name, "items": items })).into_response())
}
