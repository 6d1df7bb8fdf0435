//! Write transactions.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::db::Tx;
use crate::error::{Result, StoreError};
use crate::model::{
    AuditRecord, NewObject, Object, ObjectPatch, Release, TokenRecord, check_id, check_kind,
    check_name, now_ms, team_key,
};
use crate::{CHANGES_CHANNEL, Inner, sql, token};

/// The kind under which admin token changes appear in the audit log.
pub const TOKEN_KIND: &str = "admin_token";

const POISONED: &str = "an earlier statement of this transaction failed, so it can only be \
                        dropped; start a new transaction";

/// A write transaction, from [`Store::begin`](crate::Store::begin).
///
/// Write transactions are serialised: from `begin` to commit or drop, no other write
/// transaction runs, on this node or (with PostgreSQL) any other. That is what makes the
/// revision checks, the uniqueness checks and release numbering race-free, and what gives
/// each committed transaction its own store version. Keep transactions short: another writer
/// waits at most 5 seconds and then gets [`StoreError::Unavailable`].
///
/// Every change is recorded in the audit log in this same transaction. Dropping the
/// transaction without [`commit`](Self::commit) rolls everything back, audit entries included.
///
/// After a database error (anything but `NotFound`, `Conflict`, `Duplicate*` or `Invalid`),
/// the transaction refuses further work and cannot commit: PostgreSQL aborts a transaction
/// on error, and SQLite is made to behave the same so code tested on one works on the other.
pub struct StoreTx {
    inner: Arc<Inner>,
    tx: Tx,
    actor: String,
    /// The store version this transaction commits as, if it changes anything. Known up front
    /// because writers are serialised.
    version: i64,
    changed: bool,
    poisoned: bool,
}

impl std::fmt::Debug for StoreTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTx")
            .field("backend", &self.inner.pool.backend())
            .field("actor", &self.actor)
            .field("version", &self.version)
            .field("changed", &self.changed)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Runs one query on the transaction; a database error poisons it.
macro_rules! tracked {
    ($self:ident, $exec:ident => $query:expr) => {{
        if $self.poisoned {
            return Err(StoreError::Invalid(POISONED.to_owned()));
        }
        let $exec = $self.tx.exec();
        let result = $query.await;
        if result.is_err() {
            $self.poisoned = true;
        }
        result
    }};
}

impl StoreTx {
    pub(crate) async fn begin(inner: Arc<Inner>, actor: &str) -> Result<Self> {
        check_id("actor", actor)?;
        let dialect = inner.pool.dialect();
        let mut tx = inner.pool.begin(dialect.begin_write).await?;
        let (current,): (i64,) = tx.exec().fetch_one(dialect.lock_version, &[]).await?;
        Ok(Self {
            inner,
            tx,
            actor: actor.to_owned(),
            version: current + 1,
            changed: false,
            poisoned: false,
        })
    }

    /// Who this transaction's changes are attributed to.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The store version this transaction will commit as if it changes anything.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Reads an object, seeing this transaction's own changes.
    pub async fn get(&mut self, kind: &str, id: &str) -> Result<Option<Object>> {
        Ok(tracked!(self, e => e.fetch_optional(sql::GET_OBJECT, &[kind.into(), id.into()]))?)
    }

    /// Reads an object by name within a team (`None`: objects without a team).
    pub async fn get_by_name(
        &mut self,
        kind: &str,
        team_id: Option<&str>,
        name: &str,
    ) -> Result<Option<Object>> {
        let team = team_key(team_id)?;
        Ok(tracked!(self, e => e.fetch_optional(
            sql::GET_OBJECT_BY_NAME,
            &[kind.into(), team.into(), name.into()],
        ))?)
    }

    /// Creates an object at revision 1.
    ///
    /// Errors: `Invalid` for a bad kind, id, team or name; `DuplicateId` if the given id is
    /// taken; `Duplicate` if the name is taken in the team.
    pub async fn create(&mut self, new: NewObject) -> Result<Object> {
        check_kind(&new.kind)?;
        check_name(&new.name)?;
        let team = team_key(new.team_id.as_deref())?;
        let id = match new.id {
            Some(id) => {
                check_id("id", &id)?;
                id
            }
            None => uuid::Uuid::now_v7().to_string(),
        };
        // Checked here rather than left to the constraints: a constraint error would abort
        // the whole transaction on PostgreSQL, and the caller could not try another name.
        if self.get(&new.kind, &id).await?.is_some() {
            return Err(StoreError::DuplicateId { kind: new.kind, id });
        }
        if self
            .get_by_name(&new.kind, new.team_id.as_deref(), &new.name)
            .await?
            .is_some()
        {
            return Err(duplicate(&new.kind, &new.name));
        }
        let now = now_ms();
        let object: Object = tracked!(self, e => e.fetch_one(
            sql::INSERT_OBJECT,
            &[
                new.kind.as_str().into(),
                id.as_str().into(),
                team.into(),
                new.name.as_str().into(),
                new.state.as_deref().into(),
                (&new.spec).into(),
                now.into(),
                self.actor.as_str().into(),
                self.version.into(),
            ],
        ))
        .map_err(|e| unique_violation(e, &new.kind, &new.name))?;
        self.audit_object("create", &object, None, Some(&object))
            .await?;
        Ok(object)
    }

    /// Changes an object and increments its revision.
    ///
    /// `expected_revision` is the revision the caller read (the If-Match ETag); `None` skips
    /// the check. Errors: `NotFound`; `Conflict` when the revision differs; `Duplicate` when
    /// renaming onto a taken name; `Invalid` for a bad name.
    pub async fn update(
        &mut self,
        kind: &str,
        id: &str,
        expected_revision: Option<i64>,
        patch: ObjectPatch,
    ) -> Result<Object> {
        let before = self.current(kind, id, expected_revision).await?;
        let name = patch.name.unwrap_or_else(|| before.name.clone());
        check_name(&name)?;
        if name != before.name {
            let taken = self
                .get_by_name(kind, before.team_id.as_deref(), &name)
                .await?;
            if taken.is_some() {
                return Err(duplicate(kind, &name));
            }
        }
        let state = patch.state.unwrap_or_else(|| before.state.clone());
        let spec = patch.spec.as_ref().unwrap_or(&before.spec);
        let now = now_ms();
        let after: Option<Object> = tracked!(self, e => e.fetch_optional(
            sql::UPDATE_OBJECT,
            &[
                kind.into(),
                id.into(),
                name.as_str().into(),
                state.as_deref().into(),
                spec.into(),
                now.into(),
                self.actor.as_str().into(),
                self.version.into(),
                before.revision.into(),
            ],
        ))
        .map_err(|e| unique_violation(e, kind, &name))?;
        // The writer lock makes this unreachable; the statement re-checks the revision anyway.
        let after = after.ok_or_else(|| conflict(&before, before.revision))?;
        self.audit_object("update", &after, Some(&before), Some(&after))
            .await?;
        Ok(after)
    }

    /// Deletes an object and returns it as it was. `expected_revision` as for
    /// [`update`](Self::update). Errors: `NotFound`, `Conflict`.
    pub async fn delete(
        &mut self,
        kind: &str,
        id: &str,
        expected_revision: Option<i64>,
    ) -> Result<Object> {
        let before = self.current(kind, id, expected_revision).await?;
        let deleted = tracked!(self, e => e.execute(
            sql::DELETE_OBJECT,
            &[kind.into(), id.into(), before.revision.into()],
        ))?;
        if deleted != 1 {
            return Err(conflict(&before, before.revision));
        }
        self.audit_object("delete", &before, Some(&before), None)
            .await?;
        Ok(before)
    }

    /// Records a custom audit entry (an approval, a login). It counts as a change: the
    /// transaction bumps the store version when it commits.
    pub async fn record(&mut self, entry: AuditRecord) -> Result<()> {
        check_kind(&entry.kind)?;
        check_id("object id", &entry.object_id)?;
        if entry.action.is_empty() || entry.action.len() > 64 {
            return Err(StoreError::Invalid(
                "audit action must be 1-64 bytes".to_owned(),
            ));
        }
        self.write_audit(
            &entry.action,
            &entry.kind,
            &entry.object_id,
            entry.team_id.as_deref(),
            entry.before.as_ref(),
            entry.after.as_ref(),
        )
        .await
    }

    /// Creates the next numbered release of an object: 1 for its first, then 2, 3... The
    /// object does not have to exist (any more): releases outlive what they snapshot.
    pub async fn create_release(
        &mut self,
        kind: &str,
        object_id: &str,
        content: &Value,
        note: Option<&str>,
    ) -> Result<Release> {
        check_kind(kind)?;
        check_id("object id", object_id)?;
        let now = now_ms();
        let release: Release = tracked!(self, e => e.fetch_one(
            sql::INSERT_RELEASE,
            &[
                kind.into(),
                object_id.into(),
                content.into(),
                note.into(),
                now.into(),
                self.actor.as_str().into(),
                self.version.into(),
            ],
        ))?;
        // The content is already in the release; the audit entry only points at it.
        let after = json!({ "number": release.number, "note": release.note });
        self.write_audit("release", kind, object_id, None, None, Some(&after))
            .await?;
        Ok(release)
    }

    /// Creates an Admin API token for a user. Returns the record and the secret; the secret
    /// is not stored and cannot be shown again. `expires_at` in ms since the epoch.
    pub async fn create_token(
        &mut self,
        user_id: &str,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<(TokenRecord, String)> {
        check_id("user id", user_id)?;
        check_name(name)?;
        let secret = token::new_secret()?;
        let hash = token::sha256_hex(&secret);
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let record: TokenRecord = tracked!(self, e => e.fetch_one(
            sql::INSERT_TOKEN,
            &[
                id.as_str().into(),
                user_id.into(),
                name.into(),
                hash.as_str().into(),
                now.into(),
                expires_at.into(),
            ],
        ))?;
        let after = to_json(&record)?;
        self.write_audit("create", TOKEN_KIND, &record.id, None, None, Some(&after))
            .await?;
        Ok((record, secret))
    }

    /// Revokes a token for good. Revoking a revoked token succeeds (and is audited again).
    pub async fn revoke_token(&mut self, id: &str) -> Result<TokenRecord> {
        let before: TokenRecord =
            tracked!(self, e => e.fetch_optional(sql::GET_TOKEN, &[id.into()]))?
                .ok_or_else(|| StoreError::not_found(TOKEN_KIND, id))?;
        let after: TokenRecord = tracked!(self, e => e.fetch_one(sql::REVOKE_TOKEN, &[id.into()]))?;
        let (before_json, after_json) = (to_json(&before)?, to_json(&after)?);
        self.write_audit(
            "revoke",
            TOKEN_KIND,
            id,
            None,
            Some(&before_json),
            Some(&after_json),
        )
        .await?;
        Ok(after)
    }

    /// Commits. If anything changed, the store version is bumped exactly once, other nodes
    /// are notified (PostgreSQL) and this process's watchers see the new version at once.
    /// Returns the store version after the commit.
    pub async fn commit(mut self) -> Result<i64> {
        if self.poisoned {
            // Best effort: dropping the transaction rolls back anyway.
            let _ = self.tx.rollback().await;
            return Err(StoreError::Invalid(POISONED.to_owned()));
        }
        if !self.changed {
            self.tx.commit().await?;
            return Ok(self.version - 1);
        }
        let version = self.version;
        tracked!(self, e => e.execute(sql::SET_VERSION, &[version.into()]))?;
        if let Some(notify) = self.inner.pool.dialect().notify {
            // The payload is informative only: listeners re-read the version from their own
            // schema, since channels are shared by every schema of the database.
            let payload = version.to_string();
            tracked!(self, e => e.execute(notify, &[CHANGES_CHANNEL.into(), payload.as_str().into()]))?;
        }
        self.tx.commit().await?;
        self.inner.publish(version);
        Ok(version)
    }

    /// Rolls back explicitly (dropping the transaction does the same, without waiting).
    pub async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }

    /// The object as it is now, after checking it exists and has the expected revision.
    async fn current(&mut self, kind: &str, id: &str, expected: Option<i64>) -> Result<Object> {
        let object = self
            .get(kind, id)
            .await?
            .ok_or_else(|| StoreError::not_found(kind, id))?;
        match expected {
            Some(expected) if expected != object.revision => Err(conflict(&object, expected)),
            _ => Ok(object),
        }
    }

    async fn audit_object(
        &mut self,
        action: &str,
        object: &Object,
        before: Option<&Object>,
        after: Option<&Object>,
    ) -> Result<()> {
        let before = before.map(to_json).transpose()?;
        let after = after.map(to_json).transpose()?;
        self.write_audit(
            action,
            &object.kind,
            &object.id,
            object.team_id.as_deref(),
            before.as_ref(),
            after.as_ref(),
        )
        .await
    }

    async fn write_audit(
        &mut self,
        action: &str,
        kind: &str,
        object_id: &str,
        team_id: Option<&str>,
        before: Option<&Value>,
        after: Option<&Value>,
    ) -> Result<()> {
        let now = now_ms();
        tracked!(self, e => e.execute(
            sql::INSERT_AUDIT,
            &[
                now.into(),
                self.actor.as_str().into(),
                action.into(),
                kind.into(),
                object_id.into(),
                team_id.into(),
                before.into(),
                after.into(),
                self.version.into(),
            ],
        ))?;
        self.changed = true;
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| StoreError::Other(Box::new(e)))
}

fn duplicate(kind: &str, name: &str) -> StoreError {
    StoreError::Duplicate {
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

fn conflict(object: &Object, expected: i64) -> StoreError {
    StoreError::Conflict {
        kind: object.kind.clone(),
        id: object.id.clone(),
        expected,
        actual: object.revision,
    }
}

/// The uniqueness checks run before writing, so this only fires if something bypassed the
/// writer lock; it still maps both backends' unique-violation codes to `Duplicate`.
fn unique_violation(error: sqlx::Error, kind: &str, name: &str) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => duplicate(kind, name),
        _ => error.into(),
    }
}
