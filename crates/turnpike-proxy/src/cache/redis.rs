//! The shared cache tier in Redis.
//!
//! Entries are stored at `{prefix}e:{primary key}`; the primary key starts with the URL, so a
//! purge by URL or URL prefix is a `SCAN MATCH` over the entry keys. Each tag is a set at
//! `{prefix}t:{tag}` naming the entry keys it covers. Purges are published on
//! `{prefix}purge`, and every node's subscriber clears its memory tier.
//!
//! Redis is an optimisation here, never a dependency: every call is bounded by the
//! configured timeout, and a failure makes a lookup a miss and a store a no-op. After a
//! failure the tier is skipped for a second, so a dead Redis costs one timeout a second,
//! not one per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client};
use turnpike_model::policy::CacheRedisConfig;

use super::Purge;
use super::entry::Entry;

/// How long the tier is skipped after a failed call.
const BACKOFF: Duration = Duration::from_secs(1);

/// The Redis tier of one cache store.
pub struct RedisTier {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    /// Milliseconds since the process's time origin until which the tier is skipped.
    skip_until_ms: AtomicU64,
    origin: std::time::Instant,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisTier {
    /// A tier on `cfg.url`; connects lazily. Fails only on an invalid URL.
    pub fn new(cfg: &CacheRedisConfig) -> Result<Self, String> {
        let client =
            Client::open(cfg.url.as_str()).map_err(|e| format!("invalid Redis URL: {e}"))?;
        let timeout = cfg.timeout.max(Duration::from_millis(1));
        let config = crate::policy::ratelimit::cluster::manager_config(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("invalid Redis configuration: {e}"))?;
        Ok(Self {
            client,
            conn,
            prefix: cfg.prefix.clone(),
            timeout,
            skip_until_ms: AtomicU64::new(0),
            origin: std::time::Instant::now(),
        })
    }

    fn entry_key(&self, primary: &str) -> String {
        format!("{}e:{primary}", self.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{tag}", self.prefix)
    }

    /// The channel purges are published on.
    pub fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn available(&self) -> bool {
        self.now_ms() >= self.skip_until_ms.load(Ordering::Relaxed)
    }

    /// Runs `call` within the timeout; a failure starts the backoff.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        let until = self.now_ms() + u64::try_from(BACKOFF.as_millis()).unwrap_or(1000);
        if self.skip_until_ms.swap(until, Ordering::Relaxed) <= self.now_ms() {
            // Once per backoff period, so a dead Redis does not flood the log.
            tracing::warn!(error = %result, operation = what, "cache: Redis tier unavailable; skipped for a second");
        }
        None
    }

    fn invalidated_key(&self, url: &str) -> String {
        format!("{}inv:{url}", self.prefix)
    }

    /// The entry stored under `primary`, if any, readable, and not stored before its URL was
    /// invalidated (one round trip for both).
    pub async fn get(&self, primary: &str) -> Option<Entry> {
        if !self.available() {
            return None;
        }
        let mut conn = self.conn.clone();
        let url = primary.split('\n').next().unwrap_or(primary);
        let keys = [self.entry_key(primary), self.invalidated_key(url)];
        let (raw, invalidated): (Option<Vec<u8>>, Option<u64>) =
            self.bounded("get", conn.mget(&keys)).await?;
        let e = Entry::decode(Bytes::from(raw?))?;
        match invalidated {
            Some(at) if super::entry::epoch_ms(e.stored_at) <= at => None,
            _ => Some(e),
        }
    }

    /// Records that `url` was invalidated at `at_ms` (for as long as an entry may live) and
    /// tells every node.
    pub async fn invalidate(&self, url: &str, at_ms: u64) {
        if !self.available() {
            return;
        }
        let Ok(message) = serde_json::to_string(&Purge::Invalidate {
            url: url.to_owned(),
            at_ms,
        }) else {
            return;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.invalidated_key(url))
            .arg(at_ms)
            .arg("PX")
            .arg(u64::try_from(super::entry::MAX_KEEP.as_millis()).unwrap_or(u64::MAX))
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(message)
            .ignore();
        let mut conn = self.conn.clone();
        self.bounded("invalidate", pipe.query_async::<()>(&mut conn))
            .await;
    }

    /// Stores `entry` under `primary` for as long as it can be of use, and records its tags.
    pub async fn put(&self, primary: &str, entry: &Entry) {
        if !self.available() {
            return;
        }
        let Ok(raw) = entry.encode() else { return };
        let key = self.entry_key(primary);
        let ttl_ms = u64::try_from(entry.keep_for().as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(raw.as_ref())
            .arg("PX")
            .arg(ttl_ms)
            .ignore();
        for tag in &entry.tags {
            let tk = self.tag_key(tag);
            pipe.cmd("SADD").arg(&tk).arg(&key).ignore();
            // A tag set lives at least as long as its longest-lived entry.
            pipe.cmd("PEXPIRE").arg(&tk).arg(ttl_ms).arg("GT").ignore();
            pipe.cmd("PEXPIRE").arg(&tk).arg(ttl_ms).arg("NX").ignore();
        }
        let mut conn = self.conn.clone();
        self.bounded("put", pipe.query_async::<()>(&mut conn)).await;
    }

    /// Deletes the entries `purge` covers and tells every node; returns how many entry keys
    /// were deleted, or `None` when Redis could not be reached.
    pub async fn purge(&self, purge: &Purge) -> Option<u64> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = match purge {
            Purge::Tag(tag) => {
                let tk = self.tag_key(tag);
                let mut members: Vec<String> = self.bounded("purge", conn.smembers(&tk)).await?;
                members.push(tk);
                members
            }
            Purge::Key(url) => self.scan(&format!("{}\n*", glob_escape(url))).await?,
            Purge::Prefix(prefix) => self.scan(&format!("{}*", glob_escape(prefix))).await?,
            Purge::All => self.scan("*").await?,
            Purge::Invalidate { url, at_ms } => {
                self.invalidate(url, *at_ms).await;
                return Some(0);
            }
        };
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            let n: u64 = self.bounded("purge", conn.del(chunk)).await?;
            deleted += n;
        }
        let Ok(message) = serde_json::to_string(purge) else {
            return Some(deleted);
        };
        self.bounded("publish", conn.publish::<_, _, ()>(self.channel(), message))
            .await?;
        Some(deleted)
    }

    /// Every entry key whose primary key matches `pattern` (a Redis glob). Purges are rare
    /// and SCAN does not block Redis, so a large keyspace costs time, not availability.
    async fn scan(&self, pattern: &str) -> Option<Vec<String>> {
        let mut conn = self.conn.clone();
        let full = format!("{}e:{pattern}", glob_escape(&self.prefix));
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .bounded(
                    "scan",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&full)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Some(keys);
            }
            cursor = next;
        }
    }

    /// Listens for purges published by any node (this one included) and applies them with
    /// `apply`, reconnecting after a failure. Runs until the task is aborted.
    pub async fn subscribe(self: Arc<Self>, apply: impl Fn(Purge) + Send + Sync + 'static) {
        loop {
            // Bounded, so a Redis that accepts but never answers does not stall this loop.
            let limit = self.timeout.max(Duration::from_secs(1));
            let connected = tokio::time::timeout(limit, self.client.get_async_pubsub())
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer",
                    )))
                });
            match connected {
                Ok(mut pubsub) => {
                    let subscribed = tokio::time::timeout(limit, pubsub.subscribe(self.channel()))
                        .await
                        .map_err(|_| "no answer".to_owned())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    if let Err(e) = subscribed {
                        tracing::warn!(error = %e, "cache: could not subscribe to purges");
                    } else {
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            match serde_json::from_slice::<Purge>(msg.get_payload_bytes()) {
                                Ok(p) => apply(p),
                                Err(e) => {
                                    tracing::warn!(error = %e, "cache: unreadable purge message")
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cache: purge subscription not connected"),
            }
            // Messages sent while disconnected are lost; entries then expire on their own.
            tokio::time::sleep(BACKOFF).await;
        }
    }
}

/// Escapes Redis glob characters, so a URL is matched literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(
            glob_escape("http://a/x?y=[1]*"),
            "http://a/x\\?y=\\[1\\]\\*"
        );
    }
}
