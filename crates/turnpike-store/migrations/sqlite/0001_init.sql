-- Turnpike management-plane store, SQLite dialect. Keep in step with ../postgres/0001_init.sql:
-- same tables, same columns, same meaning. Times are milliseconds since the Unix epoch (UTC).

-- One row: the version counter every committed write transaction bumps. Nodes compare it to
-- know whether their compiled snapshot is stale.
CREATE TABLE store_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO store_meta (id, version) VALUES (1, 0);

-- Every management object, whatever its kind. team_id is '' for objects without a team so the
-- name stays unique among them (NULLs never collide in a UNIQUE constraint).
CREATE TABLE objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    state TEXT,
    revision BIGINT NOT NULL,
    spec TEXT NOT NULL CHECK (json_valid(spec)),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    created_by TEXT,
    updated_by TEXT,
    store_version BIGINT NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, team_id, name)
);
CREATE INDEX objects_team ON objects (kind, team_id, id);
CREATE INDEX objects_state ON objects (kind, state, id);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    team_id TEXT,
    before_json TEXT,
    after_json TEXT,
    store_version BIGINT NOT NULL
);
CREATE INDEX audit_log_object ON audit_log (kind, object_id, id);
CREATE INDEX audit_log_team ON audit_log (team_id, id);

CREATE TABLE releases (
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    content TEXT NOT NULL CHECK (json_valid(content)),
    note TEXT,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    store_version BIGINT NOT NULL,
    PRIMARY KEY (kind, object_id, number)
);
-- A release is what was deployed; rewriting one would falsify history.
CREATE TRIGGER releases_immutable BEFORE UPDATE ON releases
BEGIN
    SELECT RAISE(ABORT, 'releases are immutable');
END;

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX admin_tokens_user ON admin_tokens (user_id);
