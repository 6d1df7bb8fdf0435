//! The call-log store: recent calls written to the store in batches.
//!
//! Every limit is checked while the file is read, so a bad value is reported at its path
//! (`observability.call_log.queue_size`) like any other configuration error.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The call-log store: recent calls written to the store in batches, searchable through the
/// Admin API (`GET /admin/v1/call-logs`), deleted past their retention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CallLogConfig {
    /// Whether calls are written to the store. Only takes effect when a store is configured.
    pub enabled: bool,
    /// Calls waiting to be written (1 to 1 000 000). When full, new calls are dropped and
    /// counted, never waited for.
    #[serde(deserialize_with = "queue_size")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub queue_size: usize,
    /// Most calls written in one transaction (1 to 10 000).
    #[serde(deserialize_with = "batch_size")]
    #[schemars(range(min = 1, max = 10_000))]
    pub batch_size: usize,
    /// Longest a call waits in the queue before its batch is written (10ms to 1h).
    #[schemars(with = "String")]
    #[serde(
        serialize_with = "humantime_serde::serialize",
        deserialize_with = "flush_interval"
    )]
    pub flush_interval: Duration,
    /// How many times a failed batch is tried again (0 to 100) before it is dropped and
    /// counted as failed.
    #[serde(deserialize_with = "retries")]
    #[schemars(range(min = 0, max = 100))]
    pub retries: u32,
    /// How long calls are kept (at least 1m). Older ones are deleted periodically.
    #[schemars(with = "String")]
    #[serde(
        serialize_with = "humantime_serde::serialize",
        deserialize_with = "retention"
    )]
    pub retention: Duration,
    /// Most calls kept, newest first (at least 1); unset keeps all within the retention.
    #[serde(deserialize_with = "max_rows")]
    #[schemars(range(min = 1))]
    pub max_rows: Option<u64>,
    /// How often old calls are deleted (1s to 1d).
    #[schemars(with = "String")]
    #[serde(
        serialize_with = "humantime_serde::serialize",
        deserialize_with = "prune_interval"
    )]
    pub prune_interval: Duration,
    /// Fraction of successful calls kept (0.0 to 1.0). Calls answered with a status of 400
    /// or more, or with a gateway error, are always kept.
    #[serde(deserialize_with = "sample")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample: f64,
    /// Bounds on the work of one Admin API search page.
    pub search: CallLogSearchLimits,
}

/// Bounds on one page of a call-log search (`observability.call_log.search`). A page that
/// reaches one ends early with the calls it could settle, perhaps none, and a `next_cursor`
/// that goes on from there, so a filter that matches little costs each request a bounded
/// amount of work however many calls are stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CallLogSearchLimits {
    /// Most stored calls one page decompresses and filters (1 000 to 100 000 000), counted a
    /// stored batch (segment) at a time.
    #[serde(deserialize_with = "max_calls")]
    #[schemars(range(min = 1_000, max = 100_000_000))]
    pub max_calls: u64,
    /// Most stored batches (segments) one page reads (1 to 1 000 000): what bounds a page
    /// when traffic is light and each batch holds a few calls.
    #[serde(deserialize_with = "max_segments")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_segments: u32,
    /// Most segment summaries one page examines, read or skipped by them (1 to 100 000 000).
    #[serde(deserialize_with = "max_summaries")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_summaries: u32,
}

impl Default for CallLogSearchLimits {
    fn default() -> Self {
        Self {
            max_calls: 100_000,
            max_segments: 1_000,
            max_summaries: 20_000,
        }
    }
}

impl Default for CallLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // Sized for a burst of a few seconds at 10k calls/s: the writer commits a
            // transaction per batch, and on SQLite the commit's sync, not the rows, is what
            // bounds it (500-row batches dropped 30 % of calls at 10k/s in the observe
            // benchmark, 2000-row batches 13 %, 5000-row batches 6 %).
            queue_size: 20_000,
            batch_size: 2_000,
            flush_interval: Duration::from_secs(1),
            retries: 3,
            retention: Duration::from_secs(7 * 86_400),
            max_rows: None,
            prune_interval: Duration::from_secs(600),
            sample: 1.0,
            search: CallLogSearchLimits::default(),
        }
    }
}

fn ranged<'de, D, T>(d: D, min: T, max: T, what: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + std::fmt::Display,
{
    let v = T::deserialize(d)?;
    if v < min || v > max {
        return Err(serde::de::Error::custom(format!(
            "{what} must be from {min} to {max}, got {v}"
        )));
    }
    Ok(v)
}

fn queue_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 1_000_000, "queue_size")
}

fn batch_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 10_000, "batch_size")
}

fn retries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 0, 100, "retries")
}

fn max_calls<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 1_000, 100_000_000, "max_calls")
}

fn max_segments<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 1, 1_000_000, "max_segments")
}

fn max_summaries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 1, 100_000_000, "max_summaries")
}

fn sample<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "sample must be from 0.0 to 1.0, got {v}"
        )));
    }
    Ok(v)
}

fn max_rows<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(
            "max_rows must be at least 1 (leave it out to keep every call within the retention)",
        )),
        v => Ok(v),
    }
}

fn duration<'de, D: Deserializer<'de>>(
    d: D,
    min: Duration,
    max: Duration,
    what: &str,
) -> Result<Duration, D::Error> {
    let v = humantime_serde::deserialize::<Duration, D>(d)?;
    if v < min || v > max {
        return Err(serde::de::Error::custom(format!(
            "{what} must be from {} to {}, got {}",
            humantime_serde::re::humantime::format_duration(min),
            humantime_serde::re::humantime::format_duration(max),
            humantime_serde::re::humantime::format_duration(v)
        )));
    }
    Ok(v)
}

fn flush_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(
        d,
        Duration::from_millis(10),
        Duration::from_secs(3_600),
        "flush_interval",
    )
}

fn retention<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(
        d,
        Duration::from_secs(60),
        Duration::from_secs(100 * 365 * 86_400),
        "retention",
    )
}

fn prune_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(
        d,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        "prune_interval",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn parse(yaml: &str) -> Result<CallLogConfig, String> {
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn defaults_and_bounds() {
        let c = parse("{}").unwrap();
        assert_eq!(c, CallLogConfig::default());
        assert_eq!(c.retention, Duration::from_secs(604_800));
        let c =
            parse("queue_size: 5\nflush_interval: 250ms\nretention: 2d\nsample: 0.1\n").unwrap();
        assert_eq!(c.queue_size, 5);
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.retention, Duration::from_secs(172_800));
        let c = parse("search: {max_segments: 8}\n").unwrap();
        assert_eq!(c.search.max_segments, 8);
        assert_eq!(c.search.max_summaries, 20_000);
        assert_eq!(c.search.max_calls, 100_000);
        for (bad, path) in [
            ("queue_size: 0", "queue_size"),
            ("batch_size: 20000", "batch_size"),
            ("sample: 1.5", "sample"),
            ("flush_interval: 1ms", "flush_interval"),
            ("retention: 10s", "retention"),
            ("max_rows: 0", "max_rows"),
            ("retries: 1000", "retries"),
            ("search: {max_segments: 0}", "search.max_segments"),
            ("search: {max_summaries: 0}", "search.max_summaries"),
            ("search: {max_calls: 999}", "search.max_calls"),
            ("search: {nope: 1}", "search"),
            ("nope: 1", ""),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(path), "{bad}: {e}");
        }
    }
}
