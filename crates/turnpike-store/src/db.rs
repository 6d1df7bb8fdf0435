//! The two backends behind one small set of query primitives.
//!
//! Every query is written once: SQL uses `$N` placeholders, which both SQLite and PostgreSQL
//! accept, and the few statements that differ live in [`Dialect`]. [`Exec`] is "something a
//! query can run on" (a pool or a transaction, of either backend); its primitives are written
//! once and expanded per backend by [`on_exec!`], so the callers never match on the backend.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Sqlite, Transaction};

use crate::Backend;
use crate::error::{Result, StoreError};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a writer waits for another writer before giving up with `Unavailable`.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// SQLite connections. Writers are serialised by `BEGIN IMMEDIATE`; a writer holding the lock
/// may still read through the pool (reference checks), so the pool must outnumber the writers
/// that can queue on the lock, or they starve it.
const SQLITE_POOL: u32 = 16;

/// The statements that differ between the backends.
pub(crate) struct Dialect {
    /// Starts a write transaction. Write transactions are serialised (see `lock_version`), so
    /// SQLite takes the write lock up front instead of failing to upgrade a read lock later.
    pub begin_write: &'static str,
    /// Starts a read-only transaction that sees one consistent snapshot.
    pub begin_read: &'static str,
    /// Reads the version at the start of a write transaction. On PostgreSQL it also locks the
    /// row until commit, which serialises writers across the cluster; that is what lets a
    /// transaction know the version it will commit as (current + 1) before it writes.
    pub lock_version: &'static str,
    /// Tells other nodes about a commit; delivered by PostgreSQL only if the transaction
    /// commits.
    pub notify: Option<&'static str>,
    /// Writes a call-log segment's request keys: `$1` is a JSON array of them, `$2` the
    /// segment. One parameter for the whole list rather than one per call: binding is what
    /// per-call rows cost most. On SQLite `OR IGNORE` (the keys are distinct anyway): a
    /// multi-row INSERT that may abort on a conflict keeps a statement journal of every page
    /// it touches, about 30 % of the writer's CPU per call.
    pub insert_call_keys: &'static str,
    /// Appended to a SELECT of one row that the transaction is about to rewrite. SQLite's
    /// write transactions already exclude each other.
    pub lock_row: &'static str,
}

const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    begin_read: "BEGIN",
    lock_version: "SELECT version FROM store_meta WHERE id = 1",
    notify: None,
    insert_call_keys: "INSERT OR IGNORE INTO call_log_ids (request_key, segment) \
        SELECT value, $2 FROM json_each($1)",
    lock_row: "",
};

const POSTGRES: Dialect = Dialect {
    // SET LOCAL: the timeout ends with the transaction and never leaks into pooled sessions.
    begin_write: "BEGIN; SET LOCAL lock_timeout = '5s'",
    begin_read: "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    lock_version: "SELECT version FROM store_meta WHERE id = 1 FOR UPDATE",
    notify: Some("SELECT pg_notify($1, $2)"),
    insert_call_keys: "INSERT INTO call_log_ids (request_key, segment) \
        SELECT CAST(value AS BIGINT), $2 FROM json_array_elements_text(CAST($1 AS JSON))",
    lock_row: " FOR UPDATE",
};

/// A connection pool of either backend.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An open transaction of either backend. Dropping it rolls back.
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// Where a query runs.
pub(crate) enum Exec<'c> {
    SqlitePool(&'c SqlitePool),
    Sqlite(&'c mut SqliteConnection),
    PgPool(&'c PgPool),
    Postgres(&'c mut PgConnection),
}

/// A bind parameter. The set is small on purpose: every type here is encoded by both drivers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Bool(bool),
    Float(f64),
    Json(Option<&'a Value>),
    Bytes(&'a [u8]),
}

macro_rules! arg_from {
    ($($ty:ty => |$v:ident| $make:expr;)*) => {
        $(impl<'a> From<$ty> for Arg<'a> {
            fn from($v: $ty) -> Self {
                $make
            }
        })*
    };
}

arg_from! {
    &'a str => |v| Self::Text(Some(v));
    Option<&'a str> => |v| Self::Text(v);
    i64 => |v| Self::Int(Some(v));
    Option<i64> => |v| Self::Int(v);
    bool => |v| Self::Bool(v);
    f64 => |v| Self::Float(v);
    &'a Value => |v| Self::Json(Some(v));
    Option<&'a Value> => |v| Self::Json(v);
}

/// A row type both drivers can decode (`#[derive(sqlx::FromRow)]` structs and tuples).
pub(crate) trait Record:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}
impl<T> Record for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

/// Expands `$body` once per [`Exec`] variant with `$c` bound to that variant's executor.
macro_rules! on_exec {
    ($exec:expr, $c:ident => $body:expr) => {
        match $exec {
            Exec::SqlitePool($c) => $body,
            Exec::Sqlite($c) => $body,
            Exec::PgPool($c) => $body,
            Exec::Postgres($c) => $body,
        }
    };
}

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match *arg {
                Arg::Text(v) => query.bind(v),
                Arg::Int(v) => query.bind(v),
                Arg::Bool(v) => query.bind(v),
                Arg::Float(v) => query.bind(v),
                Arg::Json(v) => query.bind(v.map(Json)),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        query
    }};
}

impl Exec<'_> {
    /// Runs a statement; returns the number of rows it changed.
    pub(crate) async fn execute<'q>(self, sql: &'q str, args: &'q [Arg<'q>]) -> sqlx::Result<u64> {
        on_exec!(self, c => bind_all!(sqlx::query(sql), args)
            .execute(c)
            .await
            .map(|done| done.rows_affected()))
    }

    pub(crate) async fn fetch_optional<'q, T: Record>(
        self,
        sql: &'q str,
        args: &'q [Arg<'q>],
    ) -> sqlx::Result<Option<T>> {
        on_exec!(self, c => bind_all!(sqlx::query_as::<_, T>(sql), args).fetch_optional(c).await)
    }

    pub(crate) async fn fetch_one<'q, T: Record>(
        self,
        sql: &'q str,
        args: &'q [Arg<'q>],
    ) -> sqlx::Result<T> {
        on_exec!(self, c => bind_all!(sqlx::query_as::<_, T>(sql), args).fetch_one(c).await)
    }

    pub(crate) async fn fetch_all<'q, T: Record>(
        self,
        sql: &'q str,
        args: &'q [Arg<'q>],
    ) -> sqlx::Result<Vec<T>> {
        on_exec!(self, c => bind_all!(sqlx::query_as::<_, T>(sql), args).fetch_all(c).await)
    }
}

impl Pool {
    /// Opens (creating if needed) the database named by `url` and applies the migrations.
    pub(crate) async fn open(url: &str) -> Result<Self> {
        let url = url.trim();
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            POSTGRES_MIGRATIONS.run(&pool).await?;
            Self::Postgres(pool)
        } else {
            let options = if url.starts_with("sqlite:") {
                SqliteConnectOptions::from_str(url)?
            } else if url.contains("://") || url.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "store URL {url:?}: expected sqlite://PATH, postgres://... or a file path"
                )));
            } else {
                SqliteConnectOptions::new().filename(url)
            };
            create_parent_dir(options.get_filename())?;
            let options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: an acknowledged commit survives power loss, not only a process crash.
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(WRITE_LOCK_WAIT);
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_POOL)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            SQLITE_MIGRATIONS.run(&pool).await?;
            Self::Sqlite(pool)
        };
        Ok(pool)
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    pub(crate) fn dialect(&self) -> &'static Dialect {
        match self {
            Self::Sqlite(_) => &SQLITE,
            Self::Postgres(_) => &POSTGRES,
        }
    }

    pub(crate) fn exec(&self) -> Exec<'_> {
        match self {
            Self::Sqlite(pool) => Exec::SqlitePool(pool),
            Self::Postgres(pool) => Exec::PgPool(pool),
        }
    }

    pub(crate) async fn begin(&self, statement: &'static str) -> sqlx::Result<Tx> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin_with(statement).await?),
            Self::Postgres(pool) => Tx::Postgres(pool.begin_with(statement).await?),
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

impl Tx {
    pub(crate) fn dialect(&self) -> &'static Dialect {
        match self {
            Self::Sqlite(_) => &SQLITE,
            Self::Postgres(_) => &POSTGRES,
        }
    }

    pub(crate) fn exec(&mut self) -> Exec<'_> {
        match self {
            Self::Sqlite(tx) => Exec::Sqlite(tx),
            Self::Postgres(tx) => Exec::Postgres(tx),
        }
    }

    pub(crate) async fn commit(self) -> sqlx::Result<()> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }

    pub(crate) async fn rollback(self) -> sqlx::Result<()> {
        match self {
            Self::Sqlite(tx) => tx.rollback().await,
            Self::Postgres(tx) => tx.rollback().await,
        }
    }
}

/// A first run points at a data directory that may not exist yet.
fn create_parent_dir(file: &Path) -> Result<()> {
    // sqlx names in-memory databases "file:...?mode=memory"; they have no directory.
    if file.to_string_lossy().starts_with("file:") {
        return Ok(());
    }
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(
                format!("cannot create the store directory {}: {e}", dir.display()).into(),
            )
        }),
        _ => Ok(()),
    }
}
