//! SQL shared by both backends (`$N` placeholders work on both). Statements that differ are
//! in `db::Dialect`.

/// `team_id` is stored as '' for "no team"; NULLIF turns it back into NULL for `Object`.
macro_rules! object_columns {
    () => {
        "kind, id, NULLIF(team_id, '') AS team_id, name, state, revision, spec, created_at, \
         updated_at, created_by, updated_by, store_version"
    };
}

macro_rules! release_columns {
    () => {
        "kind, object_id, number, content, note, created_at, created_by, store_version"
    };
}

macro_rules! token_columns {
    () => {
        "id, user_id, name, created_at, expires_at, last_used_at, revoked"
    };
}

pub(crate) const CURRENT_VERSION: &str = "SELECT version FROM store_meta WHERE id = 1";
pub(crate) const SET_VERSION: &str = "UPDATE store_meta SET version = $1 WHERE id = 1";

pub(crate) const GET_OBJECT: &str = concat!(
    "SELECT ",
    object_columns!(),
    " FROM objects WHERE kind = $1 AND id = $2"
);
pub(crate) const GET_OBJECT_BY_NAME: &str = concat!(
    "SELECT ",
    object_columns!(),
    " FROM objects WHERE kind = $1 AND team_id = $2 AND name = $3"
);
// Optional filters are `$N IS NULL OR ...` so one prepared statement serves every combination.
// The prefix test uses substr rather than LIKE: LIKE is case-insensitive on SQLite and
// case-sensitive on PostgreSQL, and would need wildcard escaping.
pub(crate) const LIST_OBJECTS: &str = concat!(
    "SELECT ",
    object_columns!(),
    " FROM objects WHERE kind = $1",
    " AND ($2 IS NULL OR team_id = $2)",
    " AND ($3 IS NULL OR state = $3)",
    " AND ($4 IS NULL OR substr(name, 1, length($4)) = $4)",
    " AND ($5 IS NULL OR id > $5)",
    " ORDER BY id LIMIT $6"
);
pub(crate) const LIST_ALL_OBJECTS: &str = concat!(
    "SELECT ",
    object_columns!(),
    " FROM objects WHERE kind = $1 ORDER BY id"
);
pub(crate) const INSERT_OBJECT: &str = concat!(
    "INSERT INTO objects (kind, id, team_id, name, state, revision, spec, created_at, \
     updated_at, created_by, updated_by, store_version)",
    " VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $7, $8, $8, $9) RETURNING ",
    object_columns!()
);
// `revision = $9` re-checks the revision the caller saw, as a second line of defence behind
// the writer lock.
pub(crate) const UPDATE_OBJECT: &str = concat!(
    "UPDATE objects SET name = $3, state = $4, spec = $5, revision = revision + 1, \
     updated_at = $6, updated_by = $7, store_version = $8",
    " WHERE kind = $1 AND id = $2 AND revision = $9 RETURNING ",
    object_columns!()
);
pub(crate) const DELETE_OBJECT: &str =
    "DELETE FROM objects WHERE kind = $1 AND id = $2 AND revision = $3";

pub(crate) const INSERT_AUDIT: &str = "INSERT INTO audit_log (at, actor, action, kind, \
     object_id, team_id, before_json, after_json, store_version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const LIST_AUDIT: &str = "SELECT id, at, actor, action, kind, object_id, team_id, \
     before_json, after_json, store_version FROM audit_log \
     WHERE ($1 IS NULL OR kind = $1) AND ($2 IS NULL OR object_id = $2) \
     AND ($3 IS NULL OR team_id = $3) AND ($4 IS NULL OR id < $4) \
     ORDER BY id DESC LIMIT $5";

// Writers are serialised (db::Dialect::lock_version), so MAX + 1 cannot race; the primary key
// would reject a duplicate number anyway.
pub(crate) const INSERT_RELEASE: &str = concat!(
    "INSERT INTO releases (",
    release_columns!(),
    ") SELECT $1, $2, COALESCE(MAX(number), 0) + 1, $3, $4, $5, $6, $7",
    " FROM releases WHERE kind = $1 AND object_id = $2 RETURNING ",
    release_columns!()
);
pub(crate) const GET_RELEASE: &str = concat!(
    "SELECT ",
    release_columns!(),
    " FROM releases WHERE kind = $1 AND object_id = $2 AND number = $3"
);
pub(crate) const LATEST_RELEASE: &str = concat!(
    "SELECT ",
    release_columns!(),
    " FROM releases WHERE kind = $1 AND object_id = $2 ORDER BY number DESC LIMIT 1"
);
pub(crate) const LIST_RELEASES: &str = concat!(
    "SELECT ",
    release_columns!(),
    " FROM releases WHERE kind = $1 AND object_id = $2 ORDER BY number"
);

pub(crate) const INSERT_TOKEN: &str = concat!(
    "INSERT INTO admin_tokens (id, user_id, name, token_hash, created_at, expires_at, revoked)",
    " VALUES ($1, $2, $3, $4, $5, $6, FALSE) RETURNING ",
    token_columns!()
);
pub(crate) const LOOKUP_TOKEN: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM admin_tokens WHERE token_hash = $1 AND NOT revoked",
    " AND (expires_at IS NULL OR expires_at > $2)"
);
pub(crate) const LIST_TOKENS: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM admin_tokens WHERE user_id = $1 ORDER BY id"
);
pub(crate) const GET_TOKEN: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM admin_tokens WHERE id = $1"
);
pub(crate) const REVOKE_TOKEN: &str = concat!(
    "UPDATE admin_tokens SET revoked = TRUE WHERE id = $1 RETURNING ",
    token_columns!()
);
pub(crate) const TOUCH_TOKEN: &str = "UPDATE admin_tokens SET last_used_at = $2 WHERE id = $1";
