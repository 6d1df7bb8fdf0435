//! The Turnpike Admin API: REST + JSON under `/admin/v1`, over the management store.
//!
//! Every object is addressed by name: teams and users at `/admin/v1/teams/{team}` and
//! `/admin/v1/users/{user}`, everything else under its team at
//! `/admin/v1/teams/{team}/{collection}/{name}`. Bodies are the typed specs of
//! `turnpike_model::mgmt`; responses wrap a spec in an envelope with the server-managed fields
//! (id, revision, state, times). The endpoint table in `endpoints.rs` drives both the router
//! and the OpenAPI 3.1 document served at `/admin/v1/openapi.json`, so the two cannot drift.
//!
//! Callers authenticate with `Authorization: Bearer <token>` (tokens from [`bootstrap`],
//! [`create_token`] or the tokens endpoint). Writes run in one store transaction each, on
//! behalf of the calling user's id: that id is the actor in the audit log. Reference checks
//! run in the same transaction as the write they guard.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = turnpike_store::Store::open("sqlite://data/turnpike.db").await?;
//! if let Some(secret) = turnpike_admin::bootstrap(&store).await? {
//!     println!("super admin token (shown once): {secret}");
//! }
//! let app = turnpike_admin::router(turnpike_admin::AdminState::new(store));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

mod account;
mod actions;
mod analytics;
mod auth;
mod cachepurge;
mod calllogs;
mod endpoints;
mod error;
pub mod gitops;
mod http;
mod objects;
mod openapi;
mod refs;
mod usage;
mod util;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use turnpike_model::mgmt::{Kind, parse_spec};
use turnpike_store::{ListQuery, NewObject, Store, TeamFilter, now_ms};

pub use endpoints::PREFIX;
pub use error::{AdminError, AdminResult};

/// The actor recorded for changes made by [`bootstrap`] and [`create_token`], which act for
/// the operator at the command line rather than for an authenticated user.
pub const SYSTEM_ACTOR: &str = "system";

/// Default cap on request bodies.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Shared state of the Admin API. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<StateInner>,
}

#[derive(Clone)]
struct StateInner {
    store: Store,
    max_body_bytes: usize,
    analytics_limits: turnpike_model::observe::analytics::AnalyticsQueryLimits,
    call_log_search: turnpike_model::observe::CallLogSearchLimits,
    cache: Option<Arc<dyn CachePurger>>,
}

/// What a cache purge removes (`POST /admin/v1/cache/purge`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// Every entry of this URL (`scheme://host:port/path?query`).
    Key(String),
    /// Every entry whose URL starts with this.
    Prefix(String),
    /// Every entry the upstream tagged with this.
    Tag(String),
    /// Everything.
    All,
}

/// The gateway's response cache, as the Admin API reaches it: given by the process that
/// runs both (the `turnpike` binary). Without one, purges answer 503.
pub trait CachePurger: Send + Sync + 'static {
    /// Purges `target` on this node, in the shared tier and (through it) on every node;
    /// returns the report the endpoint sends back (`{"memory": n, "shared": n | null}`).
    fn purge(
        &self,
        target: PurgeTarget,
    ) -> futures_util::future::BoxFuture<'static, serde_json::Value>;
}

impl AdminState {
    /// State over `store`, with a [`DEFAULT_MAX_BODY_BYTES`] body cap.
    pub fn new(store: Store) -> Self {
        Self {
            inner: Arc::new(StateInner {
                store,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                analytics_limits: Default::default(),
                call_log_search: Default::default(),
                cache: None,
            }),
        }
    }

    fn with(self, change: impl FnOnce(&mut StateInner)) -> Self {
        let mut inner = (*self.inner).clone();
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The same state with another cap on request bodies (larger bodies get 413).
    #[must_use]
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> Self {
        self.with(|i| i.max_body_bytes = max_body_bytes)
    }

    /// The same state with other bounds on analytics queries
    /// (`observability.analytics.query`).
    #[must_use]
    pub fn with_analytics_limits(
        self,
        analytics_limits: turnpike_model::observe::analytics::AnalyticsQueryLimits,
    ) -> Self {
        self.with(|i| i.analytics_limits = analytics_limits)
    }

    /// The same state with other bounds on a call-log search page
    /// (`observability.call_log.search`).
    #[must_use]
    pub fn with_call_log_search(
        self,
        call_log_search: turnpike_model::observe::CallLogSearchLimits,
    ) -> Self {
        self.with(|i| i.call_log_search = call_log_search)
    }

    /// The same state, purging `cache` on `POST /admin/v1/cache/purge`.
    #[must_use]
    pub fn with_cache_purger(self, cache: Arc<dyn CachePurger>) -> Self {
        self.with(|i| i.cache = Some(cache))
    }

    /// The store the API serves.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn cache_purger(&self) -> Option<&Arc<dyn CachePurger>> {
        self.inner.cache.as_ref()
    }
}

/// The Admin API router, serving `/admin/v1/...`. Unknown paths get a JSON 404 with code
/// `route_not_found`; every response carries `X-Request-Id`.
pub fn router(state: AdminState) -> axum::Router {
    http::build_router(state)
}

/// The OpenAPI 3.1 document of this API (what `GET /admin/v1/openapi.json` serves).
pub fn openapi_document() -> serde_json::Value {
    openapi::document().clone()
}

/// Creates the first user when there is none: `admin`, a super admin, with a token named
/// `bootstrap`, in one transaction. Returns the token's secret (shown once), or `None` when a
/// user already exists.
pub async fn bootstrap(store: &Store) -> AdminResult<Option<String>> {
    let mut tx = store.begin(SYSTEM_ACTOR).await?;
    // Read while holding the writer lock: no other writer can add a user before this commits.
    let any = store
        .list(
            Kind::User.as_str(),
            &ListQuery {
                team: TeamFilter::NoTeam,
                limit: Some(1),
                ..ListQuery::default()
            },
        )
        .await?;
    if !any.items.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    let spec = parse_spec(Kind::User, json!({ "name": "admin", "super_admin": true }))?;
    let user = tx
        .create(NewObject {
            kind: Kind::User.as_str().to_owned(),
            name: "admin".to_owned(),
            spec,
            ..NewObject::default()
        })
        .await?;
    let (_, secret) = tx.create_token(&user.id, "bootstrap", None).await?;
    tx.commit().await?;
    Ok(Some(secret))
}

/// Creates an admin token for the user named `user_name`, valid for `ttl` (forever when
/// `None`), and returns its secret (shown once). For `turnpike token create`.
pub async fn create_token(
    store: &Store,
    user_name: &str,
    token_name: &str,
    ttl: Option<Duration>,
) -> AdminResult<String> {
    turnpike_model::mgmt::check_name(token_name).map_err(|m| AdminError::validation("name", m))?;
    let user = store
        .get_by_name(Kind::User.as_str(), None, user_name)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no user named {user_name:?}")))?;
    let expires_at = ttl.map(|ttl| expiry(now_ms(), ttl)).transpose()?;
    let mut tx = store.begin(SYSTEM_ACTOR).await?;
    let (_, secret) = tx.create_token(&user.id, token_name, expires_at).await?;
    tx.commit().await?;
    Ok(secret)
}

/// `now + ttl` in epoch milliseconds, refusing what does not fit.
pub(crate) fn expiry(now: i64, ttl: Duration) -> AdminResult<i64> {
    i64::try_from(ttl.as_millis())
        .ok()
        .and_then(|ms| now.checked_add(ms))
        .ok_or_else(|| AdminError::validation("expires_in", "the expiry is too far away"))
}
