//! The Turnpike management-plane store: teams, services, routes, consumers, plans and every
//! other management object, their audit log, numbered releases and Admin API tokens.
//!
//! One API over two backends, chosen by URL in [`Store::open`]:
//!
//! - **SQLite** (`sqlite://PATH` or a plain file path): the embedded default. The file and its
//!   directory are created on first use; WAL journal, `synchronous=FULL`.
//! - **PostgreSQL** (`postgres://...`): for clusters. A schema other than the default is chosen
//!   the libpq way, `?options=-c%20search_path%3DNAME` (the schema must exist).
//!
//! The embedded migrations (`migrations/<backend>/`) run on open.
//!
//! Objects are generic (`kind`, `id`, `team_id`, `name`, `state`, JSON `spec`): the store
//! gives them revisions (ETags), uniqueness, audit and change propagation; what a spec means
//! is `turnpike-model`'s business. Reads go through [`Store`]; writes through a [`StoreTx`]
//! from [`Store::begin`]. Every committed write transaction bumps one store-wide version
//! counter, which [`Store::watch`] reports so each node knows when to recompile its snapshot.
//!
//! ```no_run
//! # async fn demo() -> Result<(), turnpike_store::StoreError> {
//! use turnpike_store::{NewObject, Store};
//! let store = Store::open("sqlite://data/turnpike.db").await?;
//! let mut tx = store.begin("admin").await?;
//! let service = tx
//!     .create(NewObject {
//!         kind: "service".into(),
//!         name: "orders".into(),
//!         spec: serde_json::json!({ "url": "http://orders:8080" }),
//!         ..NewObject::default()
//!     })
//!     .await?;
//! tx.commit().await?;
//! assert_eq!(store.get("service", &service.id).await?, Some(service));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations)]

mod analytics;
mod calllog;
mod db;
mod error;
mod model;
pub mod sketch;
mod sql;
mod token;
mod tx;
mod usage;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch as channel;

pub use analytics::{
    AlertEvent, AlertState, HistoryQuery, RollupFilter, RollupRow, RollupScope, Step, fold_rows,
    merge_row,
};
pub use calllog::{
    CallLogQuery, CallLogRecord, CallLogRow, CallLogScope, LegacyCallLogs, MAX_SEGMENT_CALLS,
    valid_call_log_cursor,
};
pub use error::{BoxError, Result, StoreError};
pub use model::{
    AuditEntry, AuditQuery, AuditRecord, DEFAULT_LIMIT, ListQuery, Loaded, MAX_LIMIT, NewObject,
    Object, ObjectPatch, Page, Release, TeamFilter, TokenRecord, now_ms, page_limit,
};
pub use token::{TOKEN_PREFIX, sha256_hex};
pub use tx::{StoreTx, TOKEN_KIND};
pub use usage::Usage;

use db::{Arg, Pool};
use model::team_key;

/// The PostgreSQL NOTIFY channel every commit signals on.
pub const CHANGES_CHANNEL: &str = "turnpike_changes";

/// Which database a [`Store`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Embedded, single node.
    Sqlite,
    /// Shared by the nodes of a cluster.
    Postgres,
}

impl Backend {
    /// "sqlite" or "postgres".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handle to the store. Cheap to clone; clones share the connection pool and the watcher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pool: Pool,
    /// The latest store version this process knows of. Local commits publish here directly,
    /// so local watchers never wait for a poll.
    version: Arc<channel::Sender<i64>>,
    watcher: tokio::sync::Mutex<Option<watch::Watcher>>,
}

impl Inner {
    /// Versions only move forward: a slow poll must not overwrite a newer local commit.
    pub(crate) fn publish(&self, version: i64) {
        watch::publish(&self.version, version);
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .field("version", &*self.inner.version.borrow())
            .finish()
    }
}

impl Store {
    /// Opens the store named by `url`, creating the SQLite file if needed, and applies the
    /// migrations. See the crate docs for the URL forms.
    ///
    /// Errors: `Invalid` for a malformed URL, `Unavailable` when the database cannot be
    /// reached, `Migration` when the schema cannot be brought up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let pool = Pool::open(url).await?;
        let (version,): (i64,) = pool.exec().fetch_one(sql::CURRENT_VERSION, &[]).await?;
        let (sender, _) = channel::channel(version);
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                version: Arc::new(sender),
                watcher: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Which database this store uses.
    pub fn backend(&self) -> Backend {
        self.inner.pool.backend()
    }

    /// Stops the watcher and closes the connections. Other clones become unusable.
    pub async fn close(&self) {
        if let Some(watcher) = self.inner.watcher.lock().await.take() {
            watcher.stop().await;
        }
        self.inner.pool.close().await;
    }

    /// The store version: the number of write transactions ever committed.
    pub async fn current_version(&self) -> Result<i64> {
        let (version,): (i64,) = self.exec().fetch_one(sql::CURRENT_VERSION, &[]).await?;
        Ok(version)
    }

    /// Reads one object.
    pub async fn get(&self, kind: &str, id: &str) -> Result<Option<Object>> {
        Ok(self
            .exec()
            .fetch_optional(sql::GET_OBJECT, &[kind.into(), id.into()])
            .await?)
    }

    /// Reads one object by name within a team (`None`: objects without a team).
    pub async fn get_by_name(
        &self,
        kind: &str,
        team_id: Option<&str>,
        name: &str,
    ) -> Result<Option<Object>> {
        let team = team_key(team_id)?;
        let args = [kind.into(), team.into(), name.into()];
        Ok(self
            .exec()
            .fetch_optional(sql::GET_OBJECT_BY_NAME, &args)
            .await?)
    }

    /// One page of the objects of a kind, ordered by id.
    pub async fn list(&self, kind: &str, query: &ListQuery) -> Result<Page<Object>> {
        let team = match &query.team {
            TeamFilter::Any => None,
            TeamFilter::NoTeam => Some(""),
            TeamFilter::Team(team) => Some(team_key(Some(team))?),
        };
        let limit = page_limit(query.limit);
        let args = [
            kind.into(),
            team.into(),
            query.state.as_deref().into(),
            query.name_prefix.as_deref().into(),
            query.cursor.as_deref().into(),
            // One more than asked tells whether there is a next page.
            (limit + 1).into(),
        ];
        let items = self.exec().fetch_all(sql::LIST_OBJECTS, &args).await?;
        Ok(page(items, limit, |o: &Object| o.id.clone()))
    }

    /// Every object of a kind, ordered by id.
    pub async fn list_all(&self, kind: &str) -> Result<Vec<Object>> {
        Ok(self
            .exec()
            .fetch_all(sql::LIST_ALL_OBJECTS, &[kind.into()])
            .await?)
    }

    /// Every object of the given kinds and the store version, read from one consistent
    /// snapshot of the database: the version is exactly the one these objects are at.
    pub async fn load_all(&self, kinds: &[&str]) -> Result<Loaded> {
        let mut tx = self
            .inner
            .pool
            .begin(self.inner.pool.dialect().begin_read)
            .await?;
        let (version,): (i64,) = tx.exec().fetch_one(sql::CURRENT_VERSION, &[]).await?;
        let mut objects = Vec::new();
        for kind in kinds {
            let args = [Arg::from(*kind)];
            objects.extend(
                tx.exec()
                    .fetch_all::<Object>(sql::LIST_ALL_OBJECTS, &args)
                    .await?,
            );
        }
        tx.rollback().await?;
        Ok(Loaded { version, objects })
    }

    /// One page of the audit log, newest first.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Page<AuditEntry>> {
        let cursor = match query.cursor.as_deref() {
            None => None,
            Some(cursor) => Some(cursor.parse::<i64>().map_err(|_| {
                StoreError::Invalid(format!("audit cursor {cursor:?} is not one of ours"))
            })?),
        };
        let limit = page_limit(query.limit);
        let args = [
            query.kind.as_deref().into(),
            query.object_id.as_deref().into(),
            query.team_id.as_deref().into(),
            cursor.into(),
            (limit + 1).into(),
        ];
        let items = self.exec().fetch_all(sql::LIST_AUDIT, &args).await?;
        Ok(page(items, limit, |e: &AuditEntry| e.id.to_string()))
    }

    /// One release of an object.
    pub async fn get_release(
        &self,
        kind: &str,
        object_id: &str,
        number: i64,
    ) -> Result<Option<Release>> {
        let args = [kind.into(), object_id.into(), number.into()];
        Ok(self.exec().fetch_optional(sql::GET_RELEASE, &args).await?)
    }

    /// The highest-numbered release of an object.
    pub async fn latest_release(&self, kind: &str, object_id: &str) -> Result<Option<Release>> {
        let args = [kind.into(), object_id.into()];
        Ok(self
            .exec()
            .fetch_optional(sql::LATEST_RELEASE, &args)
            .await?)
    }

    /// Every release of an object, oldest first.
    pub async fn list_releases(&self, kind: &str, object_id: &str) -> Result<Vec<Release>> {
        let args = [kind.into(), object_id.into()];
        Ok(self.exec().fetch_all(sql::LIST_RELEASES, &args).await?)
    }

    /// Reports the store version as it changes, whoever changed it: this process, another
    /// process on the same SQLite file, or another node of the cluster.
    ///
    /// Local commits are seen at once. PostgreSQL commits by other nodes arrive by
    /// LISTEN/NOTIFY on [`CHANGES_CHANNEL`], within milliseconds; the version is also polled
    /// every `poll_interval` (1 s is a good default) in case a notification is lost with its
    /// connection. On SQLite, other processes' commits are seen by that poll.
    ///
    /// The first call starts one background task for the store (and, on PostgreSQL, one
    /// dedicated connection); later calls share it and their `poll_interval` is ignored. The
    /// task stops when every receiver is dropped, or on [`close`](Self::close). The receiver
    /// starts at the current version, marked as seen. Must be called inside a Tokio runtime.
    pub async fn watch(&self, poll_interval: Duration) -> Result<channel::Receiver<i64>> {
        let mut slot = self.inner.watcher.lock().await;
        if let Some(watcher) = slot.as_ref() {
            if watcher.is_running() {
                return Ok(self.inner.version.subscribe());
            }
        }
        let (watcher, receiver) =
            watch::Watcher::start(&self.inner.pool, &self.inner.version, poll_interval).await?;
        *slot = Some(watcher);
        Ok(receiver)
    }

    /// Starts a write transaction on behalf of `actor` (a user id, a token id or "system"),
    /// waiting for the transaction of another writer to end. See [`StoreTx`].
    pub async fn begin(&self, actor: &str) -> Result<StoreTx> {
        StoreTx::begin(Arc::clone(&self.inner), actor).await
    }

    /// Finds the live token (not revoked, not expired) with this secret.
    pub async fn lookup_token(&self, secret: &str) -> Result<Option<TokenRecord>> {
        if !secret.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash = token::sha256_hex(secret);
        let args = [hash.as_str().into(), now_ms().into()];
        Ok(self.exec().fetch_optional(sql::LOOKUP_TOKEN, &args).await?)
    }

    /// Every token of a user, revoked and expired ones included.
    pub async fn list_tokens(&self, user_id: &str) -> Result<Vec<TokenRecord>> {
        Ok(self
            .exec()
            .fetch_all(sql::LIST_TOKENS, &[user_id.into()])
            .await?)
    }

    /// Records a token's last use. Outside any transaction and not audited: it is bookkeeping,
    /// not configuration, so it neither bumps the store version nor waits for writers
    /// on PostgreSQL. Errors: `NotFound`.
    pub async fn touch_token(&self, id: &str, at: i64) -> Result<()> {
        let touched = self
            .exec()
            .execute(sql::TOUCH_TOKEN, &[id.into(), at.into()])
            .await?;
        if touched == 0 {
            return Err(StoreError::not_found(TOKEN_KIND, id));
        }
        Ok(())
    }

    fn exec(&self) -> db::Exec<'_> {
        self.inner.pool.exec()
    }
}

/// Cuts the extra row fetched to detect a next page and turns the last item into the cursor.
fn page<T>(mut items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next_cursor }
}
