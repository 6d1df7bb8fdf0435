//! Analytics rollups (`analytics_rollup`, `analytics_watermark`) and alert state and history
//! (`alert_state`, `alert_history`), written by gateway nodes off the request path. Like quota
//! usage, none of this is configuration: it does not bump the store version.
//!
//! The store keeps rows; merging them (latency sketches included) is the caller's business
//! (`turnpike-control`'s analytics module), so the store needs no knowledge of the sketch.

use crate::Store;
use crate::db::Arg;
use crate::error::Result;
use crate::sketch::LatencySketch;

const COLUMNS: &str = "resolution, node, bucket, service, route, application, status, requests, \
    errors_4xx, errors_5xx, bytes_in, bytes_out, latency_sum_us, sketch";

const UPSERT_ROLLUP: &str = "INSERT INTO analytics_rollup \
    (resolution, node, bucket, service, route, application, status, requests, errors_4xx, \
     errors_5xx, bytes_in, bytes_out, latency_sum_us, sketch) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
    ON CONFLICT (resolution, node, bucket, service, route, application, status) DO UPDATE SET \
    requests = excluded.requests, errors_4xx = excluded.errors_4xx, \
    errors_5xx = excluded.errors_5xx, bytes_in = excluded.bytes_in, \
    bytes_out = excluded.bytes_out, latency_sum_us = excluded.latency_sum_us, \
    sketch = excluded.sketch";

const DELETE_BUCKET: &str =
    "DELETE FROM analytics_rollup WHERE resolution = $1 AND node = $2 AND bucket = $3";

const PRUNE_ROLLUPS: &str = "DELETE FROM analytics_rollup WHERE resolution = $1 AND bucket < $2";

const MIN_BUCKET: &str = "SELECT MIN(bucket) AS bucket FROM analytics_rollup WHERE resolution = $1";

const GET_WATERMARK: &str = "SELECT done_until FROM analytics_watermark WHERE resolution = $1";

const SET_WATERMARK: &str = "INSERT INTO analytics_watermark (resolution, done_until) \
    VALUES ($1, $2) ON CONFLICT (resolution) DO UPDATE SET done_until = \
    CASE WHEN excluded.done_until > analytics_watermark.done_until \
    THEN excluded.done_until ELSE analytics_watermark.done_until END";

const GET_ALERT_STATE: &str =
    "SELECT rule, state, since, notified_at, notified FROM alert_state WHERE rule = $1";

const INSERT_ALERT_STATE: &str = "INSERT INTO alert_state \
    (rule, state, since, notified_at, notified) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (rule) DO NOTHING";

const UPDATE_ALERT_STATE: &str = "UPDATE alert_state SET state = $2, since = $3, \
    notified_at = $4, notified = $5 WHERE rule = $1 AND state = $6 AND since = $7";

const INSERT_HISTORY: &str = "INSERT INTO alert_history \
    (id, rule, kind, state, value, threshold, at, notified) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

const PRUNE_HISTORY: &str = "DELETE FROM alert_history WHERE at < $1";

/// One rollup row: the traffic of one (service, route, application, status) key in one
/// bucket, at one resolution.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RollupRow {
    /// `minute`, `hour` or `day`.
    pub resolution: String,
    /// The node that wrote a minute row; `''` for hours and days.
    pub node: String,
    /// Bucket start, epoch milliseconds (UTC).
    pub bucket: i64,
    /// Service store id, `''` for none.
    pub service: String,
    /// Route name, `''` for none.
    pub route: String,
    /// Application id, `''` for none.
    pub application: String,
    /// Response status.
    pub status: i64,
    /// Requests.
    pub requests: i64,
    /// Responses with a 4xx status.
    pub errors_4xx: i64,
    /// Responses with a 5xx status.
    pub errors_5xx: i64,
    /// Request body bytes.
    pub bytes_in: i64,
    /// Response body bytes.
    pub bytes_out: i64,
    /// Sum of total latencies, microseconds.
    pub latency_sum_us: i64,
    /// The serialised latency sketch.
    pub sketch: String,
}

/// Which rollup rows to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupFilter {
    /// Only this service id.
    pub service: Option<String>,
    /// Only this route.
    pub route: Option<String>,
    /// Only this application id.
    pub application: Option<String>,
    /// Only rows of one of these services or one of these applications (a team's view);
    /// `None` for every row. An empty scope matches nothing.
    pub scope: Option<RollupScope>,
}

/// The services and applications whose rows a [`RollupFilter`] keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupScope {
    /// Service ids.
    pub services: Vec<String>,
    /// Application ids.
    pub applications: Vec<String>,
}

/// The shared state of one alert rule.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AlertState {
    /// Rule name.
    pub rule: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// When it entered this state, epoch milliseconds.
    pub since: i64,
    /// When a firing notification was last sent (0: never).
    pub notified_at: i64,
    /// Whether the current firing was notified.
    pub notified: bool,
}

/// One alert transition, as kept in the history.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertEvent {
    /// Unique id (UUIDv7, so ids sort by time).
    pub id: String,
    /// Rule name.
    pub rule: String,
    /// Rule kind (`error_rate`, ...).
    pub kind: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The measured value.
    pub value: f64,
    /// The rule's threshold.
    pub threshold: f64,
    /// When, epoch milliseconds.
    pub at: i64,
    /// Whether a notification was sent (false within a cooldown).
    pub notified: bool,
}

/// Which history entries to read, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only this rule.
    pub rule: Option<String>,
    /// Only entries at or after (epoch milliseconds).
    pub from: Option<i64>,
    /// Only entries before (epoch milliseconds).
    pub to: Option<i64>,
    /// Page size.
    pub limit: u32,
    /// Only entries whose id sorts before this one (the previous page's last id).
    pub before_id: Option<String>,
}

fn row_args(r: &RollupRow) -> [Arg<'_>; 14] {
    [
        r.resolution.as_str().into(),
        r.node.as_str().into(),
        r.bucket.into(),
        r.service.as_str().into(),
        r.route.as_str().into(),
        r.application.as_str().into(),
        r.status.into(),
        r.requests.into(),
        r.errors_4xx.into(),
        r.errors_5xx.into(),
        r.bytes_in.into(),
        r.bytes_out.into(),
        r.latency_sum_us.into(),
        r.sketch.as_str().into(),
    ]
}

#[derive(sqlx::FromRow)]
struct MinBucket {
    bucket: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Watermark {
    done_until: i64,
}

impl Store {
    /// Writes rows, replacing rows with the same key, in one transaction (in key order, so
    /// two writers cannot deadlock).
    pub async fn put_rollups(&self, rows: &[RollupRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sorted: Vec<&RollupRow> = rows.iter().collect();
        sorted.sort_by(|a, b| {
            (
                &a.resolution,
                &a.node,
                a.bucket,
                &a.service,
                &a.route,
                &a.application,
                a.status,
            )
                .cmp(&(
                    &b.resolution,
                    &b.node,
                    b.bucket,
                    &b.service,
                    &b.route,
                    &b.application,
                    b.status,
                ))
        });
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        for r in sorted {
            tx.exec().execute(UPSERT_ROLLUP, &row_args(r)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces every row of one bucket of `node` at `resolution` by `rows`, in one
    /// transaction: what the downsampler writes is complete or absent.
    pub async fn replace_rollup_bucket(
        &self,
        resolution: &str,
        node: &str,
        bucket: i64,
        rows: &[RollupRow],
    ) -> Result<()> {
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        tx.exec()
            .execute(
                DELETE_BUCKET,
                &[resolution.into(), node.into(), bucket.into()],
            )
            .await?;
        for r in rows {
            tx.exec().execute(UPSERT_ROLLUP, &row_args(r)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rows of `resolution` with `from <= bucket < to`, of one node (or every node), matching
    /// `filter`, ordered by bucket.
    pub async fn rollups(
        &self,
        resolution: &str,
        from: i64,
        to: i64,
        node: Option<&str>,
        filter: &RollupFilter,
    ) -> Result<Vec<RollupRow>> {
        self.rollups_limited(resolution, from, to, node, filter, None)
            .await
    }

    /// [`Self::rollups`], reading at most `limit` rows when one is given.
    async fn rollups_limited(
        &self,
        resolution: &str,
        from: i64,
        to: i64,
        node: Option<&str>,
        filter: &RollupFilter,
        limit: Option<usize>,
    ) -> Result<Vec<RollupRow>> {
        let mut sql = format!(
            "SELECT {COLUMNS} FROM analytics_rollup WHERE resolution = $1 AND bucket >= $2 \
             AND bucket < $3"
        );
        let mut args: Vec<Arg<'_>> = vec![resolution.into(), from.into(), to.into()];
        for (column, value) in [
            ("node", node),
            ("service", filter.service.as_deref()),
            ("route", filter.route.as_deref()),
            ("application", filter.application.as_deref()),
        ] {
            if let Some(v) = value {
                args.push(v.into());
                sql.push_str(&format!(" AND {column} = ${}", args.len()));
            }
        }
        if let Some(scope) = &filter.scope {
            let mut any = Vec::new();
            for (column, values) in [
                ("service", &scope.services),
                ("application", &scope.applications),
            ] {
                if values.is_empty() {
                    continue;
                }
                let mut list = Vec::with_capacity(values.len());
                for v in values {
                    args.push(v.as_str().into());
                    list.push(format!("${}", args.len()));
                }
                any.push(format!("{column} IN ({})", list.join(", ")));
            }
            if any.is_empty() {
                return Ok(Vec::new());
            }
            sql.push_str(&format!(" AND ({})", any.join(" OR ")));
        }
        sql.push_str(" ORDER BY bucket");
        if let Some(limit) = limit {
            sql.push_str(&format!(
                " LIMIT {}",
                i64::try_from(limit).unwrap_or(i64::MAX)
            ));
        }
        Ok(self.inner.pool.exec().fetch_all(&sql, &args).await?)
    }

    /// The earliest bucket held at `resolution`.
    pub async fn first_rollup_bucket(&self, resolution: &str) -> Result<Option<i64>> {
        let row: Option<MinBucket> = self
            .inner
            .pool
            .exec()
            .fetch_optional(MIN_BUCKET, &[resolution.into()])
            .await?;
        Ok(row.and_then(|r| r.bucket))
    }

    /// Deletes rows of `resolution` whose bucket starts before `before`.
    pub async fn prune_rollups(&self, resolution: &str, before: i64) -> Result<u64> {
        Ok(self
            .inner
            .pool
            .exec()
            .execute(PRUNE_ROLLUPS, &[resolution.into(), before.into()])
            .await?)
    }

    /// Up to where rows of `resolution` are complete.
    pub async fn rollup_watermark(&self, resolution: &str) -> Result<Option<i64>> {
        let row: Option<Watermark> = self
            .inner
            .pool
            .exec()
            .fetch_optional(GET_WATERMARK, &[resolution.into()])
            .await?;
        Ok(row.map(|r| r.done_until))
    }

    /// Moves the watermark of `resolution` forward to `done_until` (never back).
    pub async fn advance_rollup_watermark(&self, resolution: &str, done_until: i64) -> Result<()> {
        self.inner
            .pool
            .exec()
            .execute(SET_WATERMARK, &[resolution.into(), done_until.into()])
            .await?;
        Ok(())
    }

    /// The shared state of an alert rule.
    pub async fn alert_state(&self, rule: &str) -> Result<Option<AlertState>> {
        Ok(self
            .inner
            .pool
            .exec()
            .fetch_optional(GET_ALERT_STATE, &[rule.into()])
            .await?)
    }

    /// Moves a rule from `previous` (`None`: no state yet) to `next`, only if nobody moved it
    /// since `previous` was read. `true`: this caller made the transition (and notifies).
    pub async fn transition_alert(
        &self,
        previous: Option<&AlertState>,
        next: &AlertState,
    ) -> Result<bool> {
        let exec = self.inner.pool.exec();
        let changed = match previous {
            None => {
                exec.execute(
                    INSERT_ALERT_STATE,
                    &[
                        next.rule.as_str().into(),
                        next.state.as_str().into(),
                        next.since.into(),
                        next.notified_at.into(),
                        next.notified.into(),
                    ],
                )
                .await?
            }
            Some(p) => {
                exec.execute(
                    UPDATE_ALERT_STATE,
                    &[
                        next.rule.as_str().into(),
                        next.state.as_str().into(),
                        next.since.into(),
                        next.notified_at.into(),
                        next.notified.into(),
                        p.state.as_str().into(),
                        p.since.into(),
                    ],
                )
                .await?
            }
        };
        Ok(changed == 1)
    }

    /// Appends one entry to the alert history.
    pub async fn add_alert_event(&self, e: &AlertEvent) -> Result<()> {
        self.inner
            .pool
            .exec()
            .execute(
                INSERT_HISTORY,
                &[
                    e.id.as_str().into(),
                    e.rule.as_str().into(),
                    e.kind.as_str().into(),
                    e.state.as_str().into(),
                    e.value.into(),
                    e.threshold.into(),
                    e.at.into(),
                    e.notified.into(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Alert history, newest first.
    pub async fn alert_history(&self, q: &HistoryQuery) -> Result<Vec<AlertEvent>> {
        let mut sql = "SELECT id, rule, kind, state, value, threshold, at, notified \
            FROM alert_history WHERE 1 = 1"
            .to_owned();
        let mut args: Vec<Arg<'_>> = Vec::new();
        if let Some(rule) = &q.rule {
            args.push(rule.as_str().into());
            sql.push_str(&format!(" AND rule = ${}", args.len()));
        }
        if let Some(from) = q.from {
            args.push(from.into());
            sql.push_str(&format!(" AND at >= ${}", args.len()));
        }
        if let Some(to) = q.to {
            args.push(to.into());
            sql.push_str(&format!(" AND at < ${}", args.len()));
        }
        if let Some(id) = &q.before_id {
            args.push(id.as_str().into());
            sql.push_str(&format!(" AND id < ${}", args.len()));
        }
        args.push(i64::from(q.limit.max(1)).into());
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len()));
        Ok(self.inner.pool.exec().fetch_all(&sql, &args).await?)
    }

    /// Deletes history entries older than `before`.
    pub async fn prune_alert_history(&self, before: i64) -> Result<u64> {
        Ok(self
            .inner
            .pool
            .exec()
            .execute(PRUNE_HISTORY, &[before.into()])
            .await?)
    }
}

/// A rollup resolution: the bucket width of rows and of chart points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Step {
    /// The name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Self::Minute),
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }

    /// Width in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }

    /// The start of the bucket holding `t` (epoch milliseconds).
    pub fn floor(self, t: i64) -> i64 {
        t.div_euclid(self.millis()) * self.millis()
    }
}

/// Adds `from`'s counts and sketch to `into`.
pub fn merge_row(into: &mut RollupRow, from: &RollupRow) {
    into.requests += from.requests;
    into.errors_4xx += from.errors_4xx;
    into.errors_5xx += from.errors_5xx;
    into.bytes_in += from.bytes_in;
    into.bytes_out += from.bytes_out;
    into.latency_sum_us += from.latency_sum_us;
    let mut sketch = LatencySketch::from_text(&into.sketch);
    sketch.merge(&LatencySketch::from_text(&from.sketch));
    into.sketch = sketch.to_text();
}

/// Merges rows into `step` buckets (per key, across nodes), as rows of `step` with node
/// `''`, ordered by bucket then key.
pub fn fold_rows(rows: impl IntoIterator<Item = RollupRow>, step: Step) -> Vec<RollupRow> {
    type FoldKey = (i64, String, String, String, i64);
    let mut out: std::collections::BTreeMap<FoldKey, (RollupRow, LatencySketch)> =
        std::collections::BTreeMap::new();
    for row in rows {
        let bucket = step.floor(row.bucket);
        let key = (
            bucket,
            row.service.clone(),
            row.route.clone(),
            row.application.clone(),
            row.status,
        );
        let sketch = LatencySketch::from_text(&row.sketch);
        match out.get_mut(&key) {
            Some((acc, acc_sketch)) => {
                acc.requests += row.requests;
                acc.errors_4xx += row.errors_4xx;
                acc.errors_5xx += row.errors_5xx;
                acc.bytes_in += row.bytes_in;
                acc.bytes_out += row.bytes_out;
                acc.latency_sum_us += row.latency_sum_us;
                acc_sketch.merge(&sketch);
            }
            None => {
                let mut row = row;
                row.resolution = step.as_str().to_owned();
                row.node = String::new();
                row.bucket = bucket;
                out.insert(key, (row, sketch));
            }
        }
    }
    out.into_values()
        .map(|(mut row, sketch)| {
            row.sketch = sketch.to_text();
            row
        })
        .collect()
}

impl Store {
    /// Rows with `from <= bucket < to` at `step`, merged across nodes: hours and days come
    /// from their downsampled rows where the downsampler has finished them (the watermark)
    /// and from the finer resolution after that, so the current hour and day are included.
    pub async fn rollups_at(
        &self,
        step: Step,
        from: i64,
        to: i64,
        filter: &RollupFilter,
    ) -> Result<Vec<RollupRow>> {
        Ok(self
            .rollups_at_bounded(step, from, to, filter, usize::MAX)
            .await?
            .unwrap_or_default())
    }

    /// [`Self::rollups_at`] reading at most `max_rows` stored rows: `None` when the range
    /// holds more (the caller asks for a narrower query instead of reading them all).
    pub async fn rollups_at_bounded(
        &self,
        step: Step,
        from: i64,
        to: i64,
        filter: &RollupFilter,
        max_rows: usize,
    ) -> Result<Option<Vec<RollupRow>>> {
        let mut rows = Vec::new();
        let mut left = max_rows;
        // One row more than is left tells "too many" from "exactly enough".
        let mut read =
            async |resolution: &str, at: i64, until: i64| -> Result<Option<Vec<RollupRow>>> {
                let got = self
                    .rollups_limited(
                        resolution,
                        at,
                        until,
                        None,
                        filter,
                        Some(left.saturating_add(1)),
                    )
                    .await?;
                if got.len() > left {
                    return Ok(None);
                }
                left -= got.len();
                Ok(Some(got))
            };
        let mut at = from;
        let mut chain = step;
        loop {
            if at >= to {
                break;
            }
            let finer = match chain {
                Step::Minute => {
                    let Some(minute) = read("minute", at, to).await? else {
                        return Ok(None);
                    };
                    rows.extend(fold_rows(minute, step));
                    break;
                }
                Step::Hour => Step::Minute,
                Step::Day => Step::Hour,
            };
            let done = self
                .rollup_watermark(chain.as_str())
                .await?
                .unwrap_or(i64::MIN)
                .min(to);
            if done > at {
                let Some(coarse) = read(chain.as_str(), at, done).await? else {
                    return Ok(None);
                };
                rows.extend(fold_rows(coarse, step));
                at = done;
            }
            chain = finer;
        }
        Ok(Some(fold_rows(rows, step)))
    }
}
