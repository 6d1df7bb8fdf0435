//! The values the store takes and returns.
//!
//! Times are milliseconds since the Unix epoch (UTC) on both backends, so values compare the
//! same way everywhere and need no time library; the Admin API formats them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StoreError};

/// Page size when a query gives none.
pub const DEFAULT_LIMIT: u32 = 50;
/// The largest page a query may ask for; larger limits are clamped to it.
pub const MAX_LIMIT: u32 = 500;

/// A stored management object: a team, a service, a route, a plan... The store does not know
/// what `spec` means; typed validation lives in `turnpike-model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Object {
    /// What the object is ("service", "route", "plan", ...).
    pub kind: String,
    /// Unique within the kind; a UUIDv7 string unless the caller chose one.
    pub id: String,
    /// The owning team; `None` for objects that belong to no team.
    pub team_id: Option<String>,
    /// Unique within (kind, team).
    pub name: String,
    /// Lifecycle or workflow state ("draft", "published", "pending", "approved", ...), indexed
    /// for filtering.
    pub state: Option<String>,
    /// 1 on creation, +1 on every update: the object's ETag.
    pub revision: i64,
    /// The kind-specific content.
    #[sqlx(json)]
    pub spec: Value,
    /// When it was created (ms since the epoch, UTC).
    pub created_at: i64,
    /// When it last changed (ms since the epoch, UTC).
    pub updated_at: i64,
    /// The actor that created it.
    pub created_by: Option<String>,
    /// The actor that last changed it.
    pub updated_by: Option<String>,
    /// The store version of the transaction that last changed it.
    pub store_version: i64,
}

/// What [`StoreTx::create`](crate::StoreTx::create) needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewObject {
    /// The object's kind.
    pub kind: String,
    /// A caller-chosen id (declarative config, imports); `None` generates a UUIDv7.
    pub id: Option<String>,
    /// The owning team, if any. Immutable once created.
    pub team_id: Option<String>,
    /// Unique within (kind, team).
    pub name: String,
    /// Initial state, if the kind has one.
    pub state: Option<String>,
    /// The kind-specific content.
    pub spec: Value,
}

/// The fields [`StoreTx::update`](crate::StoreTx::update) changes; `None` keeps the current
/// value. Team and kind cannot change: move an object by deleting and re-creating it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectPatch {
    /// A new name.
    pub name: Option<String>,
    /// A new state: `Some(None)` clears it.
    pub state: Option<Option<String>>,
    /// A new spec (replaces the whole spec).
    pub spec: Option<Value>,
}

/// Which team a listing is restricted to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TeamFilter {
    /// Objects of every team and of no team.
    #[default]
    Any,
    /// Only objects without a team.
    NoTeam,
    /// Only this team's objects.
    Team(String),
}

/// Filters and paging for [`Store::list`](crate::Store::list). All filters combine with AND.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListQuery {
    /// Restrict to a team.
    pub team: TeamFilter,
    /// Only objects in this state.
    pub state: Option<String>,
    /// Only names starting with this (case-sensitive, no wildcards).
    pub name_prefix: Option<String>,
    /// Page size: [`DEFAULT_LIMIT`] if `None`, clamped to 1..=[`MAX_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Filters and paging for [`Store::audit`](crate::Store::audit), newest entry first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditQuery {
    /// Only entries about this kind.
    pub kind: Option<String>,
    /// Only entries about this object id.
    pub object_id: Option<String>,
    /// Only entries about this team's objects.
    pub team_id: Option<String>,
    /// Page size: [`DEFAULT_LIMIT`] if `None`, clamped to 1..=[`MAX_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of a listing. Items are in a stable order (objects by id, audit entries newest
/// first); pass `next_cursor` back to get the next page. Keyset paging: items created or
/// deleted between pages never make another item appear twice or be skipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// This page's items.
    pub items: Vec<T>,
    /// `None` on the last page.
    pub next_cursor: Option<String>,
}

/// One audit entry, written in the same transaction as the change it records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AuditEntry {
    /// Increasing; the audit cursor.
    pub id: i64,
    /// When the change was made (ms since the epoch, UTC).
    pub at: i64,
    /// Who made it: a user id, a token id or "system".
    pub actor: String,
    /// "create", "update", "delete", or a kind-specific action ("approve", "revoke", ...).
    pub action: String,
    /// The kind of the object changed.
    pub kind: String,
    /// The id of the object changed.
    pub object_id: String,
    /// The team of the object changed, if any.
    pub team_id: Option<String>,
    /// The object before the change (`None` for a creation).
    #[sqlx(rename = "before_json", json(nullable))]
    pub before: Option<Value>,
    /// The object after the change (`None` for a deletion).
    #[sqlx(rename = "after_json", json(nullable))]
    pub after: Option<Value>,
    /// The store version of the transaction that made the change.
    pub store_version: i64,
}

/// A custom audit entry for [`StoreTx::record`](crate::StoreTx::record): an action that is not
/// a plain create/update/delete (an approval, a login, a key rotation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditRecord {
    /// The action name.
    pub action: String,
    /// The kind of the object concerned.
    pub kind: String,
    /// The id of the object concerned.
    pub object_id: String,
    /// The team of the object concerned.
    pub team_id: Option<String>,
    /// State before, if meaningful.
    pub before: Option<Value>,
    /// State after, if meaningful.
    pub after: Option<Value>,
}

/// An immutable numbered snapshot of an object (a service's deployed configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Release {
    /// The kind of the released object ("service").
    pub kind: String,
    /// The released object's id.
    pub object_id: String,
    /// 1, 2, 3... per object, without gaps.
    pub number: i64,
    /// What was released.
    #[sqlx(json)]
    pub content: Value,
    /// A free-form note ("fix timeout on /orders").
    pub note: Option<String>,
    /// When it was created (ms since the epoch, UTC).
    pub created_at: i64,
    /// The actor that created it.
    pub created_by: Option<String>,
    /// The store version of the transaction that created it.
    pub store_version: i64,
}

/// An Admin API token. The secret is shown once at creation and never stored: only its
/// SHA-256 is, so a leaked database does not leak usable tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TokenRecord {
    /// The token's id (UUIDv7); what audit entries name as actor.
    pub id: String,
    /// The user the token acts as.
    pub user_id: String,
    /// A label chosen by the user ("ci", "laptop").
    pub name: String,
    /// When it was created (ms since the epoch, UTC).
    pub created_at: i64,
    /// When it stops working, if ever (ms since the epoch, UTC).
    pub expires_at: Option<i64>,
    /// Last successful use, as recorded by [`Store::touch_token`](crate::Store::touch_token).
    pub last_used_at: Option<i64>,
    /// Revoked tokens never authenticate again.
    pub revoked: bool,
}

/// Every object of some kinds together with the store version they are consistent with: what
/// a node compiles its snapshot from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The store version the objects were read at.
    pub version: i64,
    /// The objects, grouped by kind in the order asked, by id within a kind.
    pub objects: Vec<Object>,
}

/// How many items a page asked for with `limit` holds at most: the default when none is
/// given, clamped to `1..=MAX_LIMIT`.
pub fn page_limit(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT))
}

/// Milliseconds since the Unix epoch, from the local clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// Validation keeps garbage out of indexed columns and keeps '' free to mean "no team".

pub(crate) fn check_kind(kind: &str) -> Result<()> {
    let ok = !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "kind {kind:?} must be 1-64 characters of a-z, 0-9, '_' or '-'"
        )))
    }
}

/// Ids, team ids and actors: printable ASCII without spaces, as they end up in URLs and logs.
pub(crate) fn check_id(what: &str, id: &str) -> Result<()> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} {id:?} must be 1-128 printable ASCII characters without spaces"
        )))
    }
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    if !name.is_empty() && name.chars().count() <= 255 && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "name {name:?} must be 1-255 characters without control characters"
        )))
    }
}

/// The stored form of a team: '' for none, so names of team-less objects still collide.
pub(crate) fn team_key(team_id: Option<&str>) -> Result<&str> {
    match team_id {
        None => Ok(""),
        Some(team) => check_id("team id", team).map(|()| team),
    }
}
