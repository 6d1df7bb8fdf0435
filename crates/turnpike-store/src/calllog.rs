//! Call logs (table `call_logs`): one row per request through a gateway node, written in
//! batches by the call-log writer and searched by the Admin API. Like quota usage, these
//! writes are not configuration: they do not bump the store version nor go through
//! [`crate::StoreTx`].
//!
//! Searches are newest first with a keyset cursor on `(at, id)`: rows written between two
//! pages never make a row appear twice or be skipped.

use serde::Serialize;

use crate::Store;
use crate::db::Arg;
use crate::error::{Result, StoreError};
use crate::model::page_limit;
use crate::{Page, page};

/// The columns, in the order [`CallLogRecord`] binds them on insert.
const COLUMNS: [&str; 26] = [
    "at",
    "request_id",
    "trace_id",
    "client_ip",
    "protocol",
    "method",
    "host",
    "path",
    "route",
    "service",
    "application",
    "application_name",
    "team",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_us",
    "upstream_us",
    "upstream",
    "upstream_target",
    "attempts",
    "cache",
    "error",
    "user_agent",
    "completed",
    "id",
];

/// Rows per DELETE when pruning: a long retention backlog goes in steps, so neither backend
/// holds one huge transaction (or, on SQLite, the write lock) for long.
const DELETE_STEP: i64 = 5_000;

/// One stored call. On insert, `id` is ignored (the store numbers rows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CallLogRecord {
    /// Row id, increasing with inserts.
    pub id: i64,
    /// When the request arrived, epoch milliseconds (UTC).
    pub at: i64,
    /// The request id.
    pub request_id: String,
    /// W3C trace id, when traced.
    pub trace_id: Option<String>,
    /// Client IP.
    pub client_ip: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
    /// Request method.
    pub method: String,
    /// Requested host.
    pub host: Option<String>,
    /// Request path (without the query).
    pub path: String,
    /// Matched route's name.
    pub route: Option<String>,
    /// Service store id.
    pub service: Option<String>,
    /// Application store id.
    pub application: Option<String>,
    /// Application name.
    pub application_name: Option<String>,
    /// The application's team name.
    pub team: Option<String>,
    /// Response status.
    pub status: i64,
    /// Request body bytes.
    pub bytes_in: i64,
    /// Response body bytes.
    pub bytes_out: i64,
    /// Total time, microseconds.
    pub duration_us: i64,
    /// Upstream time to response headers, microseconds.
    pub upstream_us: Option<i64>,
    /// Upstream pool name.
    pub upstream: Option<String>,
    /// Upstream target address that answered.
    pub upstream_target: Option<String>,
    /// Upstream attempts.
    pub attempts: i64,
    /// Cache outcome.
    pub cache: Option<String>,
    /// Gateway error code.
    pub error: Option<String>,
    /// Client `User-Agent`.
    pub user_agent: Option<String>,
    /// Whether the response body was sent to the end.
    pub completed: bool,
}

impl CallLogRecord {
    fn args(&self) -> [Arg<'_>; 25] {
        [
            self.at.into(),
            self.request_id.as_str().into(),
            self.trace_id.as_deref().into(),
            self.client_ip.as_str().into(),
            self.protocol.as_str().into(),
            self.method.as_str().into(),
            self.host.as_deref().into(),
            self.path.as_str().into(),
            self.route.as_deref().into(),
            self.service.as_deref().into(),
            self.application.as_deref().into(),
            self.application_name.as_deref().into(),
            self.team.as_deref().into(),
            self.status.into(),
            self.bytes_in.into(),
            self.bytes_out.into(),
            self.duration_us.into(),
            self.upstream_us.into(),
            self.upstream.as_deref().into(),
            self.upstream_target.as_deref().into(),
            self.attempts.into(),
            self.cache.as_deref().into(),
            self.error.as_deref().into(),
            self.user_agent.as_deref().into(),
            self.completed.into(),
        ]
    }
}

/// Whose calls a search may return. `None` in [`CallLogQuery::scope`] means everyone's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLogScope {
    /// Calls to these services (store ids)...
    pub services: Vec<String>,
    /// ...or made by these applications (store ids).
    pub applications: Vec<String>,
}

/// A call-log search. Every filter is optional; all given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLogQuery {
    /// Calls that arrived at or after this (epoch ms).
    pub from: Option<i64>,
    /// Calls that arrived before this (epoch ms).
    pub to: Option<i64>,
    /// Service store id.
    pub service: Option<String>,
    /// Route name.
    pub route: Option<String>,
    /// Application store id.
    pub application: Option<String>,
    /// Exact status.
    pub status: Option<i64>,
    /// Status class, 1 to 5 (`2` is 200..=299).
    pub status_class: Option<i64>,
    /// Request id.
    pub request_id: Option<String>,
    /// Visibility limit: only calls to these services or by these applications.
    pub scope: Option<CallLogScope>,
    /// Page size: [`crate::DEFAULT_LIMIT`] if `None`, clamped to 1..=[`crate::MAX_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Parses a cursor of [`Store::search_call_logs`]: `<at>.<id>`.
fn parse_cursor(cursor: &str) -> Result<(i64, i64)> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    cursor
        .split_once('.')
        .and_then(|(at, id)| Some((number(at)?, number(id)?)))
        .ok_or_else(|| {
            StoreError::Invalid(format!("call-log cursor {cursor:?} is not one of ours"))
        })
}

/// Whether `cursor` is one [`Store::search_call_logs`] could have returned.
pub fn valid_call_log_cursor(cursor: &str) -> bool {
    parse_cursor(cursor).is_ok()
}

/// A WHERE clause under construction: conditions joined by AND, with `$N` placeholders
/// numbered as arguments are bound.
struct Where<'a> {
    sql: String,
    args: Vec<Arg<'a>>,
}

impl<'a> Where<'a> {
    fn new() -> Self {
        Self {
            sql: String::from(" WHERE 1 = 1"),
            args: Vec::new(),
        }
    }

    /// Binds `arg` and returns its placeholder.
    fn bind(&mut self, arg: impl Into<Arg<'a>>) -> String {
        self.args.push(arg.into());
        format!("${}", self.args.len())
    }

    fn and(&mut self, condition: &str) {
        self.sql.push_str(" AND ");
        self.sql.push_str(condition);
    }

    fn eq(&mut self, column: &str, value: Option<&'a str>) {
        if let Some(v) = value {
            let p = self.bind(v);
            self.and(&format!("{column} = {p}"));
        }
    }

    fn one_of(&mut self, column: &str, values: &'a [String]) -> Option<String> {
        if values.is_empty() {
            return None;
        }
        let list: Vec<String> = values.iter().map(|v| self.bind(v.as_str())).collect();
        Some(format!("{column} IN ({})", list.join(", ")))
    }
}

impl Store {
    /// Writes a batch of calls in one transaction (multi-row inserts); returns how many.
    pub async fn insert_call_logs(&self, rows: &[CallLogRecord]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let columns = COLUMNS[..25].join(", ");
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        let mut written = 0;
        let positional = pool.dialect().positional_params;
        for chunk in rows.chunks(pool.dialect().rows_per_insert) {
            let mut sql = format!("INSERT INTO call_logs ({columns}) VALUES ");
            let mut args = Vec::with_capacity(chunk.len() * 25);
            for (i, row) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push('(');
                for j in 0..25 {
                    if j > 0 {
                        sql.push_str(", ");
                    }
                    if positional {
                        sql.push('?');
                    } else {
                        sql.push_str(&format!("${}", i * 25 + j + 1));
                    }
                }
                sql.push(')');
                args.extend(row.args());
            }
            written += tx.exec().execute(&sql, &args).await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    /// One page of the calls matching `query`, newest first (time, then row id, descending).
    ///
    /// Errors: `Invalid` for a cursor this method did not return.
    pub async fn search_call_logs(&self, query: &CallLogQuery) -> Result<Page<CallLogRecord>> {
        let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?;
        let limit = page_limit(query.limit);
        let mut w = Where::new();
        if let Some(scope) = &query.scope {
            let parts: Vec<String> = [
                w.one_of("service", &scope.services),
                w.one_of("application", &scope.applications),
            ]
            .into_iter()
            .flatten()
            .collect();
            if parts.is_empty() {
                return Ok(Page {
                    items: Vec::new(),
                    next_cursor: None,
                });
            }
            w.and(&format!("({})", parts.join(" OR ")));
        }
        if let Some(from) = query.from {
            let p = w.bind(from);
            w.and(&format!("at >= {p}"));
        }
        if let Some(to) = query.to {
            let p = w.bind(to);
            w.and(&format!("at < {p}"));
        }
        w.eq("service", query.service.as_deref());
        w.eq("route", query.route.as_deref());
        w.eq("application", query.application.as_deref());
        w.eq("request_id", query.request_id.as_deref());
        if let Some(status) = query.status {
            let p = w.bind(status);
            w.and(&format!("status = {p}"));
        }
        if let Some(class) = query.status_class {
            let lo = w.bind(class * 100);
            let hi = w.bind(class * 100 + 100);
            w.and(&format!("status >= {lo} AND status < {hi}"));
        }
        if let Some((at, id)) = cursor {
            let a = w.bind(at);
            let b = w.bind(at);
            let i = w.bind(id);
            w.and(&format!("(at < {a} OR (at = {b} AND id < {i}))"));
        }
        let l = w.bind(limit + 1);
        let sql = format!(
            "SELECT {} FROM call_logs{} ORDER BY at DESC, id DESC LIMIT {l}",
            COLUMNS.join(", "),
            w.sql
        );
        let items = self.inner.pool.exec().fetch_all(&sql, &w.args).await?;
        Ok(page(items, limit, |r: &CallLogRecord| {
            format!("{}.{}", r.at, r.id)
        }))
    }

    /// Deletes the calls that arrived before `before` (epoch ms); returns how many went.
    pub async fn prune_call_logs(&self, before: i64) -> Result<u64> {
        const SQL: &str = "DELETE FROM call_logs WHERE id IN \
            (SELECT id FROM call_logs WHERE at < $1 LIMIT $2)";
        self.delete_in_steps(SQL, before).await
    }

    /// Deletes all but the newest `keep` rows (by row id); returns how many went.
    pub async fn cap_call_logs(&self, keep: u64) -> Result<u64> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let threshold: Option<(i64,)> = self
            .inner
            .pool
            .exec()
            .fetch_optional(
                "SELECT id FROM call_logs ORDER BY id DESC LIMIT 1 OFFSET $1",
                &[keep.into()],
            )
            .await?;
        let Some((last_kept,)) = threshold else {
            return Ok(0);
        };
        // The row at OFFSET keep is the newest one to delete.
        const SQL: &str = "DELETE FROM call_logs WHERE id IN \
            (SELECT id FROM call_logs WHERE id <= $1 LIMIT $2)";
        self.delete_in_steps(SQL, last_kept).await
    }

    /// Runs `sql` (bound to `value` and the step size) until it deletes less than a step.
    async fn delete_in_steps(&self, sql: &str, value: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self
                .inner
                .pool
                .exec()
                .execute(sql, &[value.into(), DELETE_STEP.into()])
                .await?;
            total += n;
            if n < u64::try_from(DELETE_STEP).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }

    /// How many calls are stored.
    pub async fn count_call_logs(&self) -> Result<i64> {
        let (n,): (i64,) = self
            .inner
            .pool
            .exec()
            .fetch_one("SELECT COUNT(*) FROM call_logs", &[])
            .await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn row(at: i64, service: &str, status: i64) -> CallLogRecord {
        CallLogRecord {
            at,
            request_id: format!("r{at}"),
            client_ip: "127.0.0.1".into(),
            protocol: "HTTP/1.1".into(),
            method: "GET".into(),
            path: "/".into(),
            service: Some(service.into()),
            status,
            completed: true,
            ..CallLogRecord::default()
        }
    }

    #[tokio::test]
    async fn insert_search_page_prune_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .unwrap();
        // 450 rows: more than one INSERT statement per batch; two share each timestamp.
        let rows: Vec<CallLogRecord> = (0..450)
            .map(|i| {
                row(
                    1_000 + i / 2,
                    if i % 3 == 0 { "a" } else { "b" },
                    200 + i % 5 * 100,
                )
            })
            .collect();
        assert_eq!(store.insert_call_logs(&rows).await.unwrap(), 450);
        let mut seen = std::collections::HashSet::new();
        let mut query = CallLogQuery {
            limit: Some(100),
            ..CallLogQuery::default()
        };
        let mut last = i64::MAX;
        loop {
            let page = store.search_call_logs(&query).await.unwrap();
            for r in &page.items {
                assert!(r.at <= last);
                last = r.at;
                assert!(seen.insert(r.id), "row {} twice", r.id);
            }
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 450);
        let errors = store
            .search_call_logs(&CallLogQuery {
                status_class: Some(5),
                service: Some("a".into()),
                limit: Some(500),
                ..CallLogQuery::default()
            })
            .await
            .unwrap();
        assert!(!errors.items.is_empty());
        assert!(
            errors
                .items
                .iter()
                .all(|r| r.status / 100 == 5 && r.service.as_deref() == Some("a"))
        );
        let scoped = store
            .search_call_logs(&CallLogQuery {
                scope: Some(CallLogScope::default()),
                ..CallLogQuery::default()
            })
            .await
            .unwrap();
        assert!(scoped.items.is_empty());
        assert!(
            store
                .search_call_logs(&CallLogQuery {
                    cursor: Some("x".into()),
                    ..CallLogQuery::default()
                })
                .await
                .is_err()
        );
        // Times 1000..=1224: before 1100 there are 200 rows.
        assert_eq!(store.prune_call_logs(1_100).await.unwrap(), 200);
        assert_eq!(store.count_call_logs().await.unwrap(), 250);
        assert_eq!(store.cap_call_logs(100).await.unwrap(), 150);
        assert_eq!(store.count_call_logs().await.unwrap(), 100);
        assert_eq!(store.cap_call_logs(100).await.unwrap(), 0);
    }
}
