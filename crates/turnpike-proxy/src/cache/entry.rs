//! A stored response and its wire form in the shared (Redis) tier.

use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::rfc::Storable;

/// One stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `scheme://host:port/path?query`: what purges by key and prefix match.
    pub url: String,
    pub status: StatusCode,
    /// The upstream's headers, hop-by-hop ones already removed, `Content-Length` set to the
    /// stored body's length.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Values of the response's `Tag` header, for purges by tag.
    pub tags: Vec<String>,
    /// The response's `Vary` names with the request's values they were given (as sent
    /// upstream); a request matches when it would send the same values.
    pub vary: Vec<(String, Option<String>)>,
    /// When the response arrived.
    pub stored_at: SystemTime,
    /// Its age when it arrived (RFC 9111 §4.2.3 `corrected_initial_age`).
    pub initial_age: Duration,
    pub rules: Storable,
}

impl Entry {
    /// Its current age.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.stored_at).unwrap_or(Duration::ZERO)
    }

    /// Bytes it holds, as the memory tier counts them.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers + self.url.len() + 256) as u64
    }

    /// How long after it arrived it can still be of use: served fresh or stale, or
    /// validated (an entry with a validator saves a full transfer for a while more); at most
    /// [`MAX_KEEP`].
    pub fn keep_for(&self) -> Duration {
        let r = &self.rules;
        let useful = r.lifetime + r.stale_while_revalidate.max(r.stale_if_error);
        let validatable = self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED);
        let extra = if validatable {
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        };
        (useful + extra)
            .saturating_sub(self.initial_age)
            .clamp(Duration::from_secs(1), MAX_KEEP)
    }

    /// Whether a request that sends `headers` upstream matches this variant.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| vary_value(headers, name).as_deref() == value.as_deref())
    }
}

/// The value a request gives a `Vary` field: its field lines joined, whitespace around
/// list commas removed, so `a,b` and `a, b` match.
pub fn vary_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let mut parts = Vec::new();
    for v in headers.get_all(&name) {
        let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
        parts.extend(text.split(',').map(|p| p.trim().to_owned()));
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(","))
    }
}

/// Longest an entry is kept in Redis, whatever its freshness says: also how long an
/// invalidation is remembered there, so no entry can outlive the record of its invalidation.
pub const MAX_KEEP: Duration = Duration::from_secs(30 * 86_400);

/// Magic and version of the wire form; a node that reads another version treats the
/// entry as a miss.
const MAGIC: &[u8; 4] = b"TPC1";

#[derive(Serialize, Deserialize)]
struct Meta {
    url: String,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    tags: Vec<String>,
    vary: Vec<(String, Option<String>)>,
    stored_at_ms: u64,
    initial_age_ms: u64,
    lifetime_ms: u64,
    swr_ms: u64,
    sie_ms: u64,
    must_revalidate: bool,
    no_cache: bool,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn epoch_ms(t: SystemTime) -> u64 {
    ms(t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO))
}

impl Entry {
    /// The wire form: magic, the metadata's length (4 bytes, big-endian), the metadata as
    /// JSON, then the body as it is.
    pub fn encode(&self) -> Result<Bytes, serde_json::Error> {
        let meta = Meta {
            url: self.url.clone(),
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            tags: self.tags.clone(),
            vary: self.vary.clone(),
            stored_at_ms: epoch_ms(self.stored_at),
            initial_age_ms: ms(self.initial_age),
            lifetime_ms: ms(self.rules.lifetime),
            swr_ms: ms(self.rules.stale_while_revalidate),
            sie_ms: ms(self.rules.stale_if_error),
            must_revalidate: self.rules.must_revalidate,
            no_cache: self.rules.no_cache,
        };
        let meta = serde_json::to_vec(&meta)?;
        let mut out = BytesMut::with_capacity(8 + meta.len() + self.body.len());
        out.put_slice(MAGIC);
        out.put_u32(u32::try_from(meta.len()).unwrap_or(u32::MAX));
        out.put_slice(&meta);
        out.put_slice(&self.body);
        Ok(out.freeze())
    }

    /// Reads the wire form; `None` for anything else (another version, a truncated value).
    pub fn decode(raw: Bytes) -> Option<Self> {
        if raw.len() < 8 || &raw[..4] != MAGIC {
            return None;
        }
        let len = u32::from_be_bytes(raw[4..8].try_into().ok()?) as usize;
        let meta_end = 8usize.checked_add(len)?;
        let meta: Meta = serde_json::from_slice(raw.get(8..meta_end)?).ok()?;
        let mut headers = HeaderMap::new();
        for (n, v) in meta.headers {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_bytes(&v).ok()?,
            );
        }
        Some(Self {
            url: meta.url,
            status: StatusCode::from_u16(meta.status).ok()?,
            headers,
            body: raw.slice(meta_end..),
            tags: meta.tags,
            vary: meta.vary,
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms),
            initial_age: Duration::from_millis(meta.initial_age_ms),
            rules: Storable {
                lifetime: Duration::from_millis(meta.lifetime_ms),
                stale_while_revalidate: Duration::from_millis(meta.swr_ms),
                stale_if_error: Duration::from_millis(meta.sie_ms),
                must_revalidate: meta.must_revalidate,
                no_cache: meta.no_cache,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        Entry {
            url: "http://a.example:80/x?b=1".into(),
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"a\":1}"),
            tags: vec!["t1".into()],
            vary: vec![
                ("accept-language".into(), Some("en".into())),
                ("x-none".into(), None),
            ],
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            initial_age: Duration::from_secs(2),
            rules: Storable {
                lifetime: Duration::from_secs(60),
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(300),
                must_revalidate: false,
                no_cache: false,
            },
        }
    }

    #[test]
    fn wire_form_round_trips() {
        let e = sample();
        let back = Entry::decode(e.encode().unwrap()).unwrap();
        assert_eq!(back.url, e.url);
        assert_eq!(back.status, e.status);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.body, e.body);
        assert_eq!(back.tags, e.tags);
        assert_eq!(back.vary, e.vary);
        assert_eq!(back.stored_at, e.stored_at);
        assert_eq!(back.initial_age, e.initial_age);
        assert_eq!(back.rules, e.rules);
        // Truncated or foreign values are misses, not errors.
        let raw = e.encode().unwrap();
        assert!(Entry::decode(raw.slice(..10)).is_none());
        assert!(Entry::decode(Bytes::from_static(b"TPC9\0\0\0\0")).is_none());
    }

    #[test]
    fn variants_match_on_the_values_sent_upstream() {
        let e = sample();
        let mut h = HeaderMap::new();
        h.insert("accept-language", HeaderValue::from_static("en"));
        assert!(e.matches(&h));
        h.insert("x-none", HeaderValue::from_static("1"));
        assert!(!e.matches(&h));
        let mut h = HeaderMap::new();
        h.insert("accept-language", HeaderValue::from_static("fr"));
        assert!(!e.matches(&h));
        let mut a = HeaderMap::new();
        a.insert("accept", HeaderValue::from_static("a/b,  c/d"));
        assert_eq!(vary_value(&a, "accept").as_deref(), Some("a/b,c/d"));
    }
}
