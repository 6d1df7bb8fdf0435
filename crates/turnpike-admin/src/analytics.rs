//! Analytics and alert history: time series and top-N over the rollups the gateway nodes
//! write (`turnpike-control`'s analytics), shaped for charts, and the alert transitions.
//!
//! Scoping: super admins see all traffic; anyone else passes `team` (viewer and up) and sees
//! the traffic of that team's services (as provider) and of its applications (as
//! consumer). Alert rules are gateway configuration, so their history is for super admins.

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use turnpike_model::mgmt::{Kind, Role};
use turnpike_store::sketch::LatencySketch;
use turnpike_store::{HistoryQuery, RollupFilter, RollupRow, RollupScope, Step, now_ms};

use crate::auth::team_access;
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;
use crate::refs::all_of;
use crate::util::rfc3339;

/// The metrics a time series can show.
pub(crate) const METRICS: [&str; 8] = [
    "requests",
    "errors",
    "error_rate",
    "p50",
    "p95",
    "p99",
    "bytes_in",
    "bytes_out",
];
/// The labels series can be split by.
pub(crate) const GROUP_BY: [&str; 4] = ["service", "route", "application", "status"];
/// Latest time accepted (the year 9999), so arithmetic on times cannot overflow.
const MAX_TIME: i64 = 253_402_300_799_999;

/// Parses a time: epoch milliseconds or RFC 3339.
fn parse_time(ctx: &Ctx, name: &str) -> AdminResult<Option<i64>> {
    let Some(text) = ctx.query_text(name) else {
        return Ok(None);
    };
    let bad = || {
        AdminError::validation(
            name,
            format!("{name} must be epoch milliseconds or an RFC 3339 time from 1970 to 9999"),
        )
    };
    let ms = if let Ok(ms) = text.parse::<i64>() {
        ms
    } else {
        let t = humantime::parse_rfc3339_weak(&text).map_err(|_| bad())?;
        let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| bad())?;
        i64::try_from(d.as_millis()).map_err(|_| bad())?
    };
    if !(0..=MAX_TIME).contains(&ms) {
        return Err(bad());
    }
    Ok(Some(ms))
}

fn filter_of(ctx: &Ctx) -> AdminResult<RollupFilter> {
    let mut f = RollupFilter::default();
    for (name, slot) in [
        ("service", &mut f.service),
        ("route", &mut f.route),
        ("application", &mut f.application),
    ] {
        if let Some(v) = ctx.query_text(name) {
            if v.contains('\0') || v.len() > 512 {
                return Err(AdminError::validation(name, "not a value this API stores"));
            }
            *slot = Some(v);
        }
    }
    Ok(f)
}

/// Which rows the caller may see: `None` for everything (super admin without `team`). Applied
/// by the store, so rows of other teams are never read (nor count against `max_rows`).
async fn scope(ctx: &Ctx) -> AdminResult<Option<RollupScope>> {
    let caller = ctx.caller()?;
    let team = match ctx.query_text("team") {
        Some(name) => team_access(ctx.store(), caller, &name, Role::Viewer).await?,
        None if caller.super_admin => return Ok(None),
        None => {
            return Err(AdminError::forbidden(
                "pass `team`: only super admins read the traffic of every team",
            ));
        }
    };
    let ids = |objs: Vec<turnpike_store::Object>| objs.into_iter().map(|o| o.id).collect();
    Ok(Some(RollupScope {
        services: ids(all_of(ctx.store(), Kind::Service, Some(&team.id)).await?),
        applications: ids(all_of(ctx.store(), Kind::Application, Some(&team.id)).await?),
    }))
}

/// The range `[from, to)` aligned to `step`, with defaults and bounds.
fn range(ctx: &Ctx, step: Step, default_points: i64) -> AdminResult<(i64, i64)> {
    let to = parse_time(ctx, "to")?.unwrap_or_else(now_ms);
    let from = parse_time(ctx, "from")?
        .unwrap_or_else(|| to.saturating_sub(default_points * step.millis()).max(0));
    if from >= to {
        return Err(AdminError::validation("from", "from must be before to"));
    }
    let from = step.floor(from);
    let to = step.floor(to.saturating_add(step.millis() - 1));
    if from >= to {
        return Err(AdminError::validation("from", "from must be before to"));
    }
    Ok((from, to))
}

#[allow(clippy::cast_precision_loss)]
fn metric_value(
    metric: &str,
    requests: u64,
    errors: u64,
    bytes: (u64, u64),
    sketch: &LatencySketch,
) -> Value {
    let ms = |q: f64| {
        sketch
            .quantile(q)
            .map_or(Value::Null, |us| json!(us / 1000.0))
    };
    match metric {
        "requests" => json!(requests),
        "errors" => json!(errors),
        "error_rate" if requests == 0 => Value::Null,
        "error_rate" => json!(errors as f64 / requests as f64),
        "p50" => ms(0.5),
        "p95" => ms(0.95),
        "p99" => ms(0.99),
        "bytes_in" => json!(bytes.0),
        _ => json!(bytes.1),
    }
}

#[derive(Default)]
struct Acc {
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    sketch: LatencySketch,
}

impl Acc {
    fn add(&mut self, r: &RollupRow) {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        self.requests += u(r.requests);
        self.errors += u(r.errors_4xx) + u(r.errors_5xx);
        self.bytes_in += u(r.bytes_in);
        self.bytes_out += u(r.bytes_out);
        self.sketch.merge(&LatencySketch::from_text(&r.sketch));
    }

    fn value(&self, metric: &str) -> Value {
        metric_value(
            metric,
            self.requests,
            self.errors,
            (self.bytes_in, self.bytes_out),
            &self.sketch,
        )
    }
}

fn label_of(row: &RollupRow, by: &str) -> Value {
    let text = |s: &str| {
        if s.is_empty() { Value::Null } else { json!(s) }
    };
    match by {
        "service" => text(&row.service),
        "route" => text(&row.route),
        "application" => text(&row.application),
        _ => json!(row.status),
    }
}

/// The rollup rows of a query, or `too_many_rows` past the configured bound (the store stops
/// reading there, so a wide query costs at most that many rows).
async fn bounded_rows(
    ctx: &Ctx,
    step: Step,
    from: i64,
    to: i64,
    filter: &RollupFilter,
) -> AdminResult<Vec<RollupRow>> {
    let max_rows = ctx.analytics_limits().max_rows;
    ctx.store()
        .rollups_at_bounded(step, from, to, filter, max_rows)
        .await?
        .ok_or_else(|| {
            AdminError::too_large(
                "too_many_rows",
                "from",
                format!(
                    "the range holds more than {max_rows} rollup rows \
                     (observability.analytics.query.max_rows): narrow it, filter it, \
                     or use a coarser step"
                ),
            )
        })
}

/// `GET /analytics/timeseries`.
pub(crate) async fn timeseries(ctx: &Ctx) -> AdminResult<Response> {
    let metric = ctx
        .query_text("metric")
        .ok_or_else(|| AdminError::validation("metric", "metric is required"))?;
    if !METRICS.contains(&metric.as_str()) {
        return Err(AdminError::validation(
            "metric",
            format!("metric must be one of {}", METRICS.join(", ")),
        ));
    }
    let step = match ctx.query_text("step") {
        None => Step::Minute,
        Some(s) => Step::parse(&s)
            .ok_or_else(|| AdminError::validation("step", "step must be minute, hour or day"))?,
    };
    let group_by = ctx.query_text("group_by");
    if group_by.as_deref().is_some_and(|g| !GROUP_BY.contains(&g)) {
        return Err(AdminError::validation(
            "group_by",
            format!("group_by must be one of {}", GROUP_BY.join(", ")),
        ));
    }
    let mut filter = filter_of(ctx)?;
    let (from, to) = range(ctx, step, 60)?;
    let limits = ctx.analytics_limits();
    let points = u64::try_from((to - from) / step.millis()).unwrap_or(u64::MAX);
    if points > limits.max_points {
        return Err(AdminError::too_large(
            "too_many_points",
            "from",
            format!(
                "{points} points per series, at most {} (observability.analytics.query.max_points): \
                 use a coarser step or a shorter range",
                limits.max_points
            ),
        ));
    }
    filter.scope = scope(ctx).await?;
    let rows = bounded_rows(ctx, step, from, to, &filter).await?;
    // Series key (label value) → bucket → accumulated traffic.
    let mut series: BTreeMap<String, (Value, BTreeMap<i64, Acc>)> = BTreeMap::new();
    for row in &rows {
        let label = group_by
            .as_deref()
            .map_or(Value::Null, |g| label_of(row, g));
        let entry = series
            .entry(label.to_string())
            .or_insert_with(|| (label, BTreeMap::new()));
        entry.1.entry(row.bucket).or_default().add(row);
    }
    if series.len() > limits.max_series {
        return Err(AdminError::too_large(
            "too_many_series",
            "group_by",
            format!(
                "{} series, at most {} (observability.analytics.query.max_series): \
                 filter by service, route or application, or group by another label",
                series.len(),
                limits.max_series
            ),
        ));
    }
    if group_by.is_none() && series.is_empty() {
        series.insert(String::new(), (Value::Null, BTreeMap::new()));
    }
    let empty = Acc::default();
    let out: Vec<Value> = series
        .into_values()
        .map(|(label, buckets)| {
            let mut labels = serde_json::Map::new();
            for (name, value) in [
                ("service", &filter.service),
                ("route", &filter.route),
                ("application", &filter.application),
            ] {
                if let Some(v) = value {
                    labels.insert(name.to_owned(), json!(v));
                }
            }
            if let Some(g) = &group_by {
                labels.insert(g.clone(), label);
            }
            let mut points = Vec::new();
            let mut t = from;
            while t < to {
                let acc = buckets.get(&t).unwrap_or(&empty);
                points.push(json!([t, acc.value(&metric)]));
                t += step.millis();
            }
            json!({ "labels": labels, "points": points })
        })
        .collect();
    Ok(axum::Json(json!({
        "metric": metric,
        "step": step.as_str(),
        "from": from,
        "to": to,
        "series": out,
    }))
    .into_response())
}

/// `GET /analytics/top`.
pub(crate) async fn top(ctx: &Ctx) -> AdminResult<Response> {
    let by = ctx
        .query_text("by")
        .ok_or_else(|| AdminError::validation("by", "by is required"))?;
    if !["application", "route", "service"].contains(&by.as_str()) {
        return Err(AdminError::validation(
            "by",
            "by must be application, route or service",
        ));
    }
    let order = ctx.query_text("order").unwrap_or_else(|| "requests".into());
    if !["requests", "errors", "p99"].contains(&order.as_str()) {
        return Err(AdminError::validation(
            "order",
            "order must be requests, errors or p99",
        ));
    }
    let limit = match ctx.query_text("limit") {
        None => 10,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(AdminError::validation(
                    "limit",
                    "limit must be an integer from 1 to 100",
                ));
            }
        },
    };
    let mut filter = filter_of(ctx)?;
    let to_raw = parse_time(ctx, "to")?.unwrap_or_else(now_ms);
    let from_raw =
        parse_time(ctx, "from")?.unwrap_or_else(|| to_raw.saturating_sub(86_400_000).max(0));
    if from_raw >= to_raw {
        return Err(AdminError::validation("from", "from must be before to"));
    }
    let span = to_raw.saturating_sub(from_raw);
    // The finest resolution that is kept for the range and reads few rows.
    let step = if span <= 6 * 3_600_000 {
        Step::Minute
    } else if span <= 62 * 86_400_000 {
        Step::Hour
    } else {
        Step::Day
    };
    let from = step.floor(from_raw);
    let to = step.floor(to_raw.saturating_add(step.millis() - 1));
    if from >= to {
        return Err(AdminError::validation("from", "from must be before to"));
    }
    filter.scope = scope(ctx).await?;
    let rows = bounded_rows(ctx, step, from, to, &filter).await?;
    let mut groups: BTreeMap<String, (Value, Acc)> = BTreeMap::new();
    for row in &rows {
        let key = label_of(row, &by);
        groups
            .entry(key.to_string())
            .or_insert_with(|| (key, Acc::default()))
            .1
            .add(row);
    }
    let mut items: Vec<(Value, Acc)> = groups.into_values().collect();
    let rank = |a: &Acc| rank_of(&order, a);
    items.sort_by(|a, b| rank(&b.1).total_cmp(&rank(&a.1)));
    items.truncate(limit);
    let items: Vec<Value> = items
        .into_iter()
        .map(|(key, a)| {
            json!({
                "key": key,
                "requests": a.requests,
                "errors": a.errors,
                "error_rate": a.value("error_rate"),
                "p50": a.value("p50"),
                "p95": a.value("p95"),
                "p99": a.value("p99"),
                "bytes_in": a.bytes_in,
                "bytes_out": a.bytes_out,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "by": by,
        "order": order,
        "step": step.as_str(),
        "from": from,
        "to": to,
        "items": items,
    }))
    .into_response())
}

#[allow(clippy::cast_precision_loss)]
fn rank_of(order: &str, a: &Acc) -> f64 {
    match order {
        "requests" => a.requests as f64,
        "errors" => a.errors as f64,
        _ => a.sketch.quantile(0.99).unwrap_or(0.0),
    }
}

/// `GET /alerts/history`: newest first, paged by `cursor` (the last id of the page).
pub(crate) async fn alert_history(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    if !caller.super_admin {
        return Err(AdminError::forbidden(
            "alert rules are gateway configuration: only super admins read their history",
        ));
    }
    let limit = ctx.limit()?.unwrap_or(50);
    let (Ok(rule), Ok(cursor)) = (ctx.store_filter("rule"), ctx.store_filter("cursor")) else {
        return Ok(axum::Json(json!({ "items": [], "next_cursor": null })).into_response());
    };
    let query = HistoryQuery {
        rule,
        from: parse_time(ctx, "from")?,
        to: parse_time(ctx, "to")?,
        limit: limit + 1,
        before_id: cursor,
    };
    let mut events = ctx.store().alert_history(&query).await?;
    let more = events.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    events.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = if more {
        events.last().map(|e| e.id.clone())
    } else {
        None
    };
    let items: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "rule": e.rule,
                "kind": e.kind,
                "state": e.state,
                "value": e.value,
                "threshold": e.threshold,
                "at": rfc3339(e.at),
                "notified": e.notified,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "items": items, "next_cursor": next })).into_response())
}
