-- Analytics rollups and alert history. Not configuration: nothing here bumps
-- store_meta.version. Keep in step with the other dialect.
--
-- One table for the three resolutions. Minute rows are written per gateway node (`node`),
-- each node merging only into its own rows, so nodes never race on a row. Hour and day rows
-- (`node` = '') are recomputed from the finer resolution by the downsampler, which replaces
-- them: running it twice, or on two nodes at once, writes the same rows.
CREATE TABLE analytics_rollup (
    -- 'minute', 'hour' or 'day'
    resolution TEXT NOT NULL,
    node TEXT NOT NULL,
    -- Start of the bucket, milliseconds since the epoch (UTC).
    bucket BIGINT NOT NULL,
    -- '' when the request had none (file routes have no service, anonymous calls no
    -- application); '_other' collects keys past the per-minute cap.
    service TEXT NOT NULL,
    route TEXT NOT NULL,
    application TEXT NOT NULL,
    status BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors_4xx BIGINT NOT NULL,
    errors_5xx BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    -- Sum of total latencies in microseconds (for the mean).
    latency_sum_us BIGINT NOT NULL,
    -- The latency sketch (total latency, microseconds), JSON; see turnpike-control analytics.
    sketch TEXT NOT NULL,
    PRIMARY KEY (resolution, node, bucket, service, route, application, status)
);
CREATE INDEX analytics_rollup_bucket ON analytics_rollup (resolution, bucket);

-- How far each coarser resolution is complete: buckets before `done_until` have their rows.
CREATE TABLE analytics_watermark (
    resolution TEXT PRIMARY KEY,
    done_until BIGINT NOT NULL
);

-- The state of each alert rule, shared by the nodes: a transition is made (and notified) by
-- the one node whose conditional update changed the row.
CREATE TABLE alert_state (
    rule TEXT PRIMARY KEY,
    -- 'firing' or 'resolved'
    state TEXT NOT NULL,
    since BIGINT NOT NULL,
    -- When a firing notification was last sent (cooldown), 0 if never.
    notified_at BIGINT NOT NULL,
    -- Whether the current firing was notified (a resolve is sent only then).
    notified BOOLEAN NOT NULL
);

CREATE TABLE alert_history (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    at BIGINT NOT NULL,
    notified BOOLEAN NOT NULL
);
CREATE INDEX alert_history_at ON alert_history (at);
