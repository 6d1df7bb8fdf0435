//! Call-log search: the calls the gateway nodes wrote to the store, newest first, filtered
//! by time range, service, route, application, status and request id.
//!
//! A search page does a bounded amount of work (`observability.call_log.search`): past it,
//! the page holds what it could settle, perhaps fewer calls than asked or none, and a
//! `next_cursor` to go on.
//!
//! Visibility follows the teams: a super admin sees every call; anyone else sees the calls to
//! services of their teams and the calls made by applications of their teams, whatever role
//! they hold there. Calls of other teams are left out of a search exactly as if they did not
//! exist, and fetched one by one they answer 404.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use turnpike_model::mgmt::Kind;
use turnpike_store::{CallLogQuery, CallLogRecord, CallLogScope, Store, valid_call_log_cursor};

use crate::auth::{Caller, find_team};
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::refs::all_of;
use crate::util::rfc3339;

/// `GET /call-logs`.
pub(crate) async fn search(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let empty = || {
        axum::Json(json!({ "items": [], "next_cursor": null, "partial": false })).into_response()
    };
    let from = time_param(ctx, "from")?;
    let to = time_param(ctx, "to")?;
    let status = match ctx.query_text("status") {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (100..=599).contains(&n) => Some(n),
            _ => {
                return Err(AdminError::validation(
                    "status",
                    "status must be an integer from 100 to 599",
                ));
            }
        },
    };
    let status_class = match ctx.query_text("status_class").as_deref() {
        None => None,
        Some(c @ ("1xx" | "2xx" | "3xx" | "4xx" | "5xx")) => {
            Some(i64::from(c.as_bytes()[0] - b'0'))
        }
        Some(_) => {
            return Err(AdminError::validation(
                "status_class",
                "status_class must be one of 1xx, 2xx, 3xx, 4xx, 5xx",
            ));
        }
    };
    let limit = ctx.limit()?;
    let cursor = ctx.query_text("cursor");
    if cursor.as_deref().is_some_and(|c| !valid_call_log_cursor(c)) {
        return Err(AdminError::validation(
            "cursor",
            "not a cursor this API returned",
        ));
    }
    let (Ok(route), Ok(request_id), Ok(service), Ok(application)) = (
        ctx.store_filter("route"),
        ctx.store_filter("request_id"),
        ctx.store_filter("service"),
        ctx.store_filter("application"),
    ) else {
        return Ok(empty());
    };
    let service = match service {
        None => None,
        Some(s) => match resolve(store, Kind::Service, &s).await? {
            Some(id) => Some(id),
            None => return Ok(empty()),
        },
    };
    let application = match application {
        None => None,
        Some(a) => match resolve(store, Kind::Application, &a).await? {
            Some(id) => Some(id),
            None => return Ok(empty()),
        },
    };
    let query = CallLogQuery {
        from,
        to,
        service,
        route,
        application,
        status,
        status_class,
        request_id,
        scope: scope(store, caller).await?,
        limit,
        cursor,
        ..bounded(ctx)
    };
    let page = store.search_call_logs(&query).await?;
    // A page that goes on is full unless the search bounds stopped it first.
    let want = usize::try_from(turnpike_store::page_limit(limit)).unwrap_or(usize::MAX);
    let partial = page.next_cursor.is_some() && page.items.len() < want;
    let items = render(store, &page.items).await?;
    Ok(axum::Json(json!({
        "items": items,
        "next_cursor": page.next_cursor,
        "partial": partial,
    }))
    .into_response())
}

/// Pages of a request-id lookup followed before it gives up with `too_many_calls`.
const LOOKUP_PAGES: usize = 8;

/// A query with the configured bounds on a search page and nothing else.
fn bounded(ctx: &Ctx) -> CallLogQuery {
    let limits = ctx.call_log_search();
    CallLogQuery {
        max_calls: Some(limits.max_calls),
        max_segments: Some(limits.max_segments),
        max_summaries: Some(limits.max_summaries),
        ..CallLogQuery::default()
    }
}

/// `GET /call-logs/{request_id}`: the newest call with this request id the caller may see.
///
/// The request-id keys narrow the walk to the segments holding this id, so one page
/// normally answers. Clients choose their request ids, though, and one reused on every call
/// would have a lookup read the whole store: the lookup follows pages cut short by the
/// search bounds up to [`LOOKUP_PAGES`] times, then answers 422 `too_many_calls` rather
/// than a 404 for a call that may exist.
pub(crate) async fn get(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    let store = ctx.store();
    let request_id = ctx.param("request_id");
    let missing = || AdminError::not_found(format!("no call with request id {request_id:?}"));
    if request_id.contains('\0') {
        return Err(missing());
    }
    let mut query = CallLogQuery {
        request_id: Some(request_id.to_owned()),
        scope: scope(store, caller).await?,
        limit: Some(1),
        ..bounded(ctx)
    };
    for _ in 0..LOOKUP_PAGES {
        let page = store.search_call_logs(&query).await?;
        if let Some(item) = render(store, &page.items).await?.into_iter().next() {
            return Ok(axum::Json(item).into_response());
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return Err(missing()),
        }
    }
    Err(AdminError::too_large(
        "too_many_calls",
        "request_id",
        format!(
            "request id {request_id:?} is on more stored calls than a lookup reads \
             ({LOOKUP_PAGES} pages within observability.call_log.search): search \
             /call-logs?request_id=... and follow next_cursor"
        ),
    ))
}

/// `None` for super admins (everything); otherwise the services and applications of the
/// caller's teams.
async fn scope(store: &Store, caller: &Caller) -> AdminResult<Option<CallLogScope>> {
    if caller.super_admin {
        return Ok(None);
    }
    let mut scope = CallLogScope::default();
    let mut teams: Vec<&String> = caller.roles.keys().collect();
    teams.sort();
    for team in teams {
        for o in all_of(store, Kind::Service, Some(team.as_str())).await? {
            scope.services.push(o.id);
        }
        for o in all_of(store, Kind::Application, Some(team.as_str())).await? {
            scope.applications.push(o.id);
        }
    }
    Ok(Some(scope))
}

/// A `service` or `application` filter: `team/name`, resolved to the object's id (`None`:
/// no such object, so nothing matches), or anything else, taken as an id.
async fn resolve(store: &Store, kind: Kind, value: &str) -> AdminResult<Option<String>> {
    let Some((team, name)) = value.split_once('/') else {
        return Ok(Some(value.to_owned()));
    };
    let Some(team) = find_team(store, team).await? else {
        return Ok(None);
    };
    if turnpike_model::mgmt::check_name(name).is_err() {
        return Ok(None);
    }
    Ok(store
        .get_by_name(kind.as_str(), Some(&team.id), name)
        .await?
        .map(|o| o.id))
}

/// A time filter: RFC 3339 (`2026-03-01T12:00:00Z`, an offset or fractional seconds allowed)
/// or milliseconds since the epoch.
fn time_param(ctx: &Ctx, name: &str) -> AdminResult<Option<i64>> {
    let Some(text) = ctx.query_text(name) else {
        return Ok(None);
    };
    parse_time(&text).map(Some).ok_or_else(|| {
        AdminError::validation(
            name,
            format!(
                "{name} must be an RFC 3339 date-time (like 2026-03-01T12:00:00Z) or \
                 milliseconds since the epoch"
            ),
        )
    })
}

fn parse_time(text: &str) -> Option<i64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    // humantime reads UTC (`Z`) only: an offset is taken off first and applied after.
    let (base, offset_secs) = match text.len().checked_sub(6).and_then(|i| {
        let (base, tail) = (text.get(..i)?, text.get(i..)?);
        let sign = match tail.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = tail.get(1..)?.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some((base, sign * (h * 3600 + m * 60)))
    }) {
        Some((base, offset)) if base.contains('T') || base.contains('t') => {
            (format!("{base}Z"), offset)
        }
        _ => (text.to_owned(), 0),
    };
    let at = humantime::parse_rfc3339_weak(&base).ok()?;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    i64::try_from(ms).ok()?.checked_sub(offset_secs * 1000)
}

/// Calls as the API shows them, with each service's `team/name` looked up once per page.
async fn render(store: &Store, rows: &[CallLogRecord]) -> AdminResult<Vec<Value>> {
    let mut services: HashMap<&str, Option<String>> = HashMap::new();
    let mut teams: HashMap<String, Option<String>> = HashMap::new();
    for id in rows.iter().filter_map(|r| r.service.as_deref()) {
        if services.contains_key(id) {
            continue;
        }
        let mut name = None;
        if let Some(service) = store.get(Kind::Service.as_str(), id).await? {
            if let Some(team_id) = &service.team_id {
                if !teams.contains_key(team_id) {
                    let team = store.get(Kind::Team.as_str(), team_id).await?;
                    teams.insert(team_id.clone(), team.map(|t| t.name));
                }
                if let Some(Some(team)) = teams.get(team_id) {
                    name = Some(format!("{team}/{}", service.name));
                }
            }
        }
        services.insert(id, name);
    }
    Ok(rows
        .iter()
        .map(|r| {
            let service_name = r
                .service
                .as_deref()
                .and_then(|id| services.get(id).cloned().flatten());
            json!({
                "id": r.id,
                "time": rfc3339(r.at),
                "request_id": r.request_id,
                "trace_id": r.trace_id,
                "client_ip": r.client_ip,
                "protocol": r.protocol,
                "method": r.method,
                "host": r.host,
                "path": r.path,
                "route": r.route,
                "service": r.service,
                "service_name": service_name,
                "application": r.application,
                "application_name": r.application_name,
                "team": r.team,
                "status": r.status,
                "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out,
                "duration_us": r.duration_us,
                "upstream_us": r.upstream_us,
                "upstream": r.upstream,
                "upstream_target": r.upstream_target,
                "attempts": r.attempts,
                "cache": r.cache,
                "error": r.error,
                "user_agent": r.user_agent,
                "completed": r.completed,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn times_parse_in_every_accepted_form() {
        assert_eq!(parse_time("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500)
        );
        assert_eq!(
            parse_time("2023-11-15T00:13:20+02:00"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_time("2023-11-14T21:13:20-01:00"),
            Some(1_700_000_000_000)
        );
        for bad in ["", "yesterday", "2023-13-01T00:00:00Z", "-5", "1.5"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
