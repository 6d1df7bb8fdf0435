-- Call logs: one row per request through a gateway node, written in batches by the call-log
-- writer, searched by the Admin API, deleted past their retention. Not configuration: writes
-- do not bump store_meta.version. Keep in step with the other dialect.
CREATE TABLE call_logs (
    -- Increasing per insert; with at, the search cursor (at desc, id desc).
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- When the request arrived, milliseconds since the epoch (UTC).
    at BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    trace_id TEXT,
    client_ip TEXT NOT NULL,
    protocol TEXT NOT NULL,
    method TEXT NOT NULL,
    host TEXT,
    path TEXT NOT NULL,
    -- Compiled route name (team/service/route for store routes).
    route TEXT,
    -- Store ids of the service and the application; team is the application's team name.
    service TEXT,
    application TEXT,
    application_name TEXT,
    team TEXT,
    status BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    duration_us BIGINT NOT NULL,
    upstream_us BIGINT,
    upstream TEXT,
    upstream_target TEXT,
    attempts BIGINT NOT NULL,
    cache TEXT,
    error TEXT,
    user_agent TEXT,
    completed BOOLEAN NOT NULL
);
-- Every search is newest first within a time range, optionally narrowed by one of these.
CREATE INDEX call_logs_at ON call_logs (at, id);
CREATE INDEX call_logs_request_id ON call_logs (request_id);
CREATE INDEX call_logs_service ON call_logs (service, at);
CREATE INDEX call_logs_route ON call_logs (route, at);
CREATE INDEX call_logs_application ON call_logs (application, at);
CREATE INDEX call_logs_status ON call_logs (status, at);
