-- Turnpike management-plane store, PostgreSQL dialect. Keep in step with ../sqlite/0001_init.sql:
-- same tables, same columns, same meaning. Times are milliseconds since the Unix epoch (UTC).
-- Key columns use COLLATE "C" so ordering (and so keyset pagination) is byte order, as in SQLite.

CREATE TABLE store_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO store_meta (id, version) VALUES (1, 0);

CREATE TABLE objects (
    kind TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    team_id TEXT COLLATE "C" NOT NULL DEFAULT '',
    name TEXT COLLATE "C" NOT NULL,
    state TEXT COLLATE "C",
    revision BIGINT NOT NULL,
    spec JSONB NOT NULL,
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
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    object_id TEXT COLLATE "C" NOT NULL,
    team_id TEXT COLLATE "C",
    before_json JSONB,
    after_json JSONB,
    store_version BIGINT NOT NULL
);
CREATE INDEX audit_log_object ON audit_log (kind, object_id, id);
CREATE INDEX audit_log_team ON audit_log (team_id, id);

CREATE TABLE releases (
    kind TEXT COLLATE "C" NOT NULL,
    object_id TEXT COLLATE "C" NOT NULL,
    number BIGINT NOT NULL,
    content JSONB NOT NULL,
    note TEXT,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    store_version BIGINT NOT NULL,
    PRIMARY KEY (kind, object_id, number)
);
CREATE FUNCTION releases_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'releases are immutable';
END;
$$;
CREATE TRIGGER releases_immutable BEFORE UPDATE ON releases
    FOR EACH ROW EXECUTE FUNCTION releases_immutable();

CREATE TABLE admin_tokens (
    id TEXT COLLATE "C" PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    name TEXT NOT NULL,
    token_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX admin_tokens_user ON admin_tokens (user_id);
