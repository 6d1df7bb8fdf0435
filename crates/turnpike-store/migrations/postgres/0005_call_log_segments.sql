-- Call logs in segments (crates/turnpike-store/src/calllog.rs): one row per batch the call-log
-- writer hands over, its calls compressed together. Replaces call_logs: the store moves that
-- table's rows into segments, deleting them as it goes; the empty table stays until a later
-- migration. Not configuration: writes do not bump store_meta.version. Keep in step with the
-- other dialect.
CREATE TABLE call_log_segments (
    -- Increasing per write, never reused; a call's id is id * 16384 + its place in the
    -- segment.
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Earliest and latest arrival of its calls, milliseconds since the epoch (UTC).
    first_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    -- Bit n is set when a call's status is from n * 100 to n * 100 + 99.
    status_classes BIGINT NOT NULL,
    -- The distinct services, routes and applications of its calls as JSON arrays of strings;
    -- NULL when there were too many to list (every search filtering on it then reads it).
    services TEXT,
    routes TEXT,
    applications TEXT,
    -- How body is written; 1: postcard records, compressed with zstd.
    encoding BIGINT NOT NULL,
    body BYTEA NOT NULL
);
-- Searches walk back in time by each segment's latest call.
CREATE INDEX call_log_segments_last_at ON call_log_segments (last_at, id);
-- Request-id lookups: request_key is, for a UUIDv7 request id, its millisecond time then 15
-- bits of an xxh3 hash of it (a batch's keys sit together); for any other id, the xxh3 hash
-- with the top bit set (calllog.rs, request_key).
CREATE TABLE call_log_ids (
    request_key BIGINT NOT NULL,
    segment BIGINT NOT NULL,
    PRIMARY KEY (request_key, segment)
);
CREATE INDEX call_log_ids_segment ON call_log_ids (segment);
