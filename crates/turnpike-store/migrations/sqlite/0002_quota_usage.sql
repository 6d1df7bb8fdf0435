-- Plan quota usage: requests per subscription (application id x service id) per period.
-- Gateway nodes add their counts with an additive upsert (used = used + delta), so nodes
-- sharing the database never overwrite each other. Not versioned: usage is not
-- configuration and does not bump store_meta.version. Keep in step with the other dialect.
CREATE TABLE quota_usage (
    application TEXT NOT NULL,
    service TEXT NOT NULL,
    -- 'day' or 'month'
    period TEXT NOT NULL,
    -- Start of the period (UTC midnight; the 1st for months), milliseconds since the epoch.
    period_start BIGINT NOT NULL,
    used BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (application, service, period, period_start)
);
CREATE INDEX quota_usage_period_start ON quota_usage (period_start);
