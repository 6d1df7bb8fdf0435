//! The response cache: the `cache` policy's lookup before the upstream call and its store
//! after, over a memory tier bounded in bytes and an optional shared tier in Redis.
//!
//! # Keys
//!
//! An entry's primary key is its URL (`scheme://host:port/path?query`, the query reduced to
//! the keyed parameters in a canonical order), then the route, the upstream pool, the
//! application when keyed, and the keyed request headers. Responses that declare `Vary` are
//! stored as variants of their primary key, matched on the values the request sends
//! upstream.
//!
//! No input that can change the response is left out of the key: on a request the cache
//! may answer, the gateway forwards only the keyed headers, the content-negotiation headers
//! (`Accept*`, which `Vary` governs), `Authorization` and `Cookie` (a response to a request
//! with either is only shared when it says so: `public`, `s-maxage` or `must-revalidate`)
//! and the headers the gateway sets itself; the query keeps only keyed
//! parameters; a request with a body is not cached; and without `key.application` the
//! upstream is not told which application called. So `X-Forwarded-Host: evil` never reaches
//! the upstream on a cacheable request, and cannot poison an entry.
//!
//! # Flow
//!
//! [`begin`] decides, before the upstream call: answer from a fresh entry (`HIT`), from a
//! stale one while it is refreshed in the background (`STALE`, `stale-while-revalidate`),
//! or go upstream — conditionally when a stale entry has validators, and as the only
//! request in flight for that key: identical misses wait for the first one's response
//! (up to `lock_timeout`) instead of each calling the upstream. [`Pending::finish`] then
//! stores what may be stored, merges a `304` into the stored entry, or serves the stale
//! entry when the upstream failed (`stale-if-error`).

pub mod entry;
pub mod redis;
pub mod rfc;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use turnpike_model::policy::{CacheConfig, CacheStoreConfig, QueryKey};

use crate::body::{BoxError, ProxyBody};
use crate::error::{GatewayError, Origin};
use entry::{Entry, epoch_ms};

/// `X-Cache` values.
pub const HIT: &str = "HIT";
/// Fetched from the upstream (and stored when allowed).
pub const MISS: &str = "MISS";
/// A stale entry served: while it is refreshed, or because the upstream failed.
pub const STALE: &str = "STALE";
/// A stale entry the upstream confirmed with `304 Not Modified`.
pub const REVALIDATED: &str = "REVALIDATED";
/// Not a request the cache handles (method, body, `no-store`).
pub const BYPASS: &str = "BYPASS";

/// The response header that tells the client what the cache did.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Most variants (`Vary`) kept per primary key in memory.
const MAX_VARIANTS: usize = 16;

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purge {
    /// Every entry (all methods' keys, all variants) of this URL:
    /// `scheme://host:port/path?query`.
    Key(String),
    /// Every entry whose URL starts with this.
    Prefix(String),
    /// Every entry the upstream tagged with this (`cache-tag` header).
    Tag(String),
    /// Everything.
    All,
    /// What an unsafe method's success does (RFC 9111 §4.4): entries of this URL stored up
    /// to `at_ms` (ms since the epoch) are no longer used. O(1) on every node, unlike
    /// [`Purge::Key`], so clients cannot make each `POST` scan the cache.
    Invalidate {
        /// The URL, as in [`Purge::Key`].
        url: String,
        /// When it was invalidated.
        at_ms: u64,
    },
}

impl Purge {
    fn covers(&self, e: &Entry) -> bool {
        match self {
            Purge::Key(url) => e.url == *url,
            Purge::Prefix(p) => e.url.starts_with(p.as_str()),
            Purge::Tag(t) => e.tags.iter().any(|x| x == t),
            Purge::All => true,
            Purge::Invalidate { .. } => false,
        }
    }
}

/// Most URLs remembered as invalidated; past it the least used are forgotten (an entry
/// stored before its URL was invalidated could then be served until it expires).
const MAX_INVALIDATED: usize = 100_000;

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Primary keys removed from this node's memory tier.
    pub memory: u64,
    /// Entry keys deleted in Redis (`None`: no Redis tier, or it could not be reached).
    pub shared: Option<u64>,
}

/// All stored variants of one primary key.
struct Slot {
    variants: Vec<Arc<Entry>>,
    weight: u64,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<String, Arc<Slot>> for Weigh {
    fn weight(&self, key: &String, slot: &Arc<Slot>) -> u64 {
        key.len() as u64 + slot.weight
    }
}

/// Where entries live: one per gateway process, kept across reloads while the top-level
/// `cache` section is unchanged.
pub struct CacheStore {
    config: CacheStoreConfig,
    memory: quick_cache::sync::Cache<String, Arc<Slot>, Weigh>,
    redis: Option<Arc<redis::RedisTier>>,
    /// Keys being fetched, each with the channel its waiters watch.
    flights: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// URLs invalidated by unsafe methods, with when (ms since the epoch).
    invalidated: quick_cache::sync::Cache<String, u64>,
    subscriber: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStore")
            .field("config", &self.config)
            .field("entries", &self.memory.len())
            .finish_non_exhaustive()
    }
}

impl Drop for CacheStore {
    fn drop(&mut self) {
        if let Some(t) = &self.subscriber {
            t.abort();
        }
    }
}

impl CacheStore {
    /// A store for `config`. With a Redis tier, starts the purge subscriber (so it must run
    /// inside a Tokio runtime); fails only on an invalid Redis URL.
    pub fn new(config: &CacheStoreConfig) -> Result<Arc<Self>, String> {
        // Average entries of about 16 KiB: only a sizing hint for the hash tables.
        let items = usize::try_from(config.memory_bytes / 16_384)
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 20);
        let memory = quick_cache::sync::Cache::with_weighter(items, config.memory_bytes, Weigh);
        let redis = match &config.redis {
            Some(r) => Some(Arc::new(redis::RedisTier::new(r)?)),
            None => None,
        };
        Ok(Arc::new_cyclic(|weak: &std::sync::Weak<CacheStore>| {
            let subscriber = redis.as_ref().map(|tier| {
                let weak = weak.clone();
                tokio::spawn(Arc::clone(tier).subscribe(move |p| {
                    if let Some(store) = weak.upgrade() {
                        match p {
                            Purge::Invalidate { url, at_ms } => store.invalidate_local(url, at_ms),
                            p => {
                                store.purge_memory(&p);
                            }
                        }
                    }
                }))
            });
            CacheStore {
                config: config.clone(),
                memory,
                redis,
                flights: Mutex::new(HashMap::new()),
                invalidated: quick_cache::sync::Cache::new(MAX_INVALIDATED),
                subscriber,
            }
        }))
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &CacheStoreConfig {
        &self.config
    }

    /// Entries (primary keys) and bytes held in memory.
    pub fn memory_usage(&self) -> (usize, u64) {
        (self.memory.len(), self.memory.weight())
    }

    /// Removes what `purge` covers here, in Redis, and (through Redis) on every other node.
    pub async fn purge(&self, purge: &Purge) -> PurgeReport {
        let memory = self.purge_memory(purge);
        let shared = match &self.redis {
            Some(r) => r.purge(purge).await,
            None => None,
        };
        PurgeReport { memory, shared }
    }

    fn invalidate_local(&self, url: String, at_ms: u64) {
        let at = self.invalidated.get(&url).map_or(at_ms, |t| t.max(at_ms));
        self.invalidated.insert(url, at);
    }

    /// Invalidates `url` here now, and on every node and in Redis in the background.
    fn invalidate(self: &Arc<Self>, url: &str) {
        let at_ms = epoch_ms(SystemTime::now());
        self.invalidate_local(url.to_owned(), at_ms);
        if let Some(tier) = &self.redis {
            let tier = Arc::clone(tier);
            let url = url.to_owned();
            tokio::spawn(async move { tier.invalidate(&url, at_ms).await });
        }
    }

    /// Whether `e` was stored before its URL was invalidated.
    fn is_invalidated(&self, e: &Entry) -> bool {
        self.invalidated
            .get(&e.url)
            .is_some_and(|at| epoch_ms(e.stored_at) <= at)
    }

    fn purge_memory(&self, purge: &Purge) -> u64 {
        let before = self.memory.len();
        self.memory
            .retain(|_, slot| !slot.variants.iter().any(|e| purge.covers(e)));
        before.saturating_sub(self.memory.len()) as u64
    }

    /// The stored variant of `primary` a request sending `sent` upstream may use: from
    /// memory, else from Redis (then kept in memory too).
    async fn lookup(&self, primary: &str, sent: &HeaderMap) -> Option<Arc<Entry>> {
        if let Some(slot) = self.memory.get(primary)
            && let Some(e) = slot.variants.iter().find(|e| e.matches(sent))
        {
            if self.is_invalidated(e) {
                self.memory.remove(primary);
                return None;
            }
            return Some(Arc::clone(e));
        }
        let tier = self.redis.as_ref()?;
        let e = tier.get(primary).await?;
        if !e.matches(sent) || self.is_invalidated(&e) {
            return None;
        }
        let e = Arc::new(e);
        self.keep_in_memory(primary, Arc::clone(&e));
        Some(e)
    }

    fn keep_in_memory(&self, primary: &str, entry: Arc<Entry>) {
        let mut variants: Vec<Arc<Entry>> = self
            .memory
            .peek(primary)
            .map(|s| {
                s.variants
                    .iter()
                    .filter(|e| e.vary != entry.vary)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        variants.insert(0, entry);
        variants.truncate(MAX_VARIANTS);
        let weight = variants.iter().map(|e| e.weight()).sum::<u64>();
        if weight + primary.len() as u64 > self.memory.shard_capacity() {
            // Larger than a shard of the memory tier can hold: Redis only.
            self.memory.remove(primary);
            return;
        }
        self.memory
            .insert(primary.to_owned(), Arc::new(Slot { variants, weight }));
    }

    /// Stores `entry` in memory now and in Redis in the background.
    fn store(self: &Arc<Self>, primary: &str, entry: Arc<Entry>) {
        self.keep_in_memory(primary, Arc::clone(&entry));
        if let Some(tier) = &self.redis {
            let tier = Arc::clone(tier);
            let primary = primary.to_owned();
            tokio::spawn(async move { tier.put(&primary, &entry).await });
        }
    }

    fn remove(self: &Arc<Self>, primary: &str) {
        self.memory.remove(primary);
    }

    /// Becomes the one fetching `key`, or gets the channel to wait on for whoever is.
    fn join(self: &Arc<Self>, key: &str) -> Result<Flight, watch::Receiver<bool>> {
        let Ok(mut flights) = self.flights.lock() else {
            // Poisoned: no coalescing, every request fetches.
            let (done, _) = watch::channel(false);
            return Ok(Flight {
                store: Arc::clone(self),
                key: None,
                done,
            });
        };
        if let Some(rx) = flights.get(key) {
            return Err(rx.clone());
        }
        let (done, rx) = watch::channel(false);
        flights.insert(key.to_owned(), rx);
        Ok(Flight {
            store: Arc::clone(self),
            key: Some(key.to_owned()),
            done,
        })
    }
}

/// The right to fetch one key; waiters are released when it is dropped (after the entry is
/// stored, or when the response turns out not to be storable).
pub(crate) struct Flight {
    store: Arc<CacheStore>,
    key: Option<String>,
    done: watch::Sender<bool>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(key) = &self.key
            && let Ok(mut flights) = self.store.flights.lock()
        {
            flights.remove(key);
        }
        let _ = self.done.send(true);
    }
}

/// A route's compiled `cache` policy.
pub struct RouteCache {
    /// Its configuration.
    pub cfg: CacheConfig,
    key_headers: Vec<HeaderName>,
    tag_header: HeaderName,
}

impl RouteCache {
    /// Compiles `cfg` (already checked by the model).
    pub fn new(cfg: CacheConfig) -> Result<Self, (String, String)> {
        let key_headers = cfg
            .key
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    (
                        format!("key.headers[{i}]"),
                        "not a valid header name".into(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tag_header = HeaderName::from_bytes(cfg.tag_header.as_bytes()).map_err(|_| {
            (
                "tag_header".to_owned(),
                "not a valid header name".to_owned(),
            )
        })?;
        Ok(Self {
            cfg,
            key_headers,
            tag_header,
        })
    }

    /// Whether `name` may be forwarded upstream on a request the cache may answer.
    fn forwards(&self, name: &HeaderName) -> bool {
        matches!(
            *name,
            header::HOST
                | header::ACCEPT
                | header::ACCEPT_ENCODING
                | header::ACCEPT_LANGUAGE
                | header::ACCEPT_CHARSET
                | header::AUTHORIZATION
                | header::COOKIE
        ) || self.key_headers.contains(name)
    }
}

/// What the cache needs to know of a request besides its head.
pub(crate) struct Ctx<'a> {
    pub scheme: &'static str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    /// The calling application and its granted scopes, as the upstream would be told them.
    pub application: Option<&'a str>,
    /// Whether the request may carry a body (HTTP/2 can send one without `Content-Length`).
    pub has_body: bool,
    /// The path sent upstream when a `request_transform` rewrote it (it may depend on more
    /// than the client's path), keyed with it.
    pub forward_path: Option<&'a str>,
}

/// The cache's decision before the upstream call.
// Returned once per request and matched at once: boxing the answer would cost a hit an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Begin {
    /// Answered from the cache; `Refresh` asks for a background refresh of the entry.
    Answer(Response<ProxyBody>, &'static str, Option<Refresh>),
    /// Go upstream, then hand the response to [`Pending::finish`].
    Fetch(Box<Pending>),
}

/// A background refresh (`stale-while-revalidate`): send `headers` upstream (with the
/// pending's query and method), then finish the pending and read the body to the end.
pub(crate) struct Refresh {
    pub pending: Box<Pending>,
    pub headers: HeaderMap,
}

enum Mode {
    /// Not the cache's business: forwarded as is.
    Bypass,
    /// An unsafe method: a success invalidates the URL's entries (RFC 9111 §4.4).
    Invalidate,
    /// Nothing stored: fetch, store when allowed.
    Miss,
    /// A stored entry that must be validated first.
    Revalidate(Arc<Entry>),
}

/// A request on its way upstream, and what to do with the answer.
pub(crate) struct Pending {
    store: Arc<CacheStore>,
    policy: Arc<RouteCache>,
    mode: Mode,
    primary: String,
    url: String,
    /// The headers sent upstream, before the gateway's own (for storability and `Vary`).
    sent: HeaderMap,
    /// The client's conditional headers, answered from the cache.
    conditions: HeaderMap,
    /// The client asked HEAD; GET went upstream so the answer can be stored.
    head: bool,
    request_time: SystemTime,
    flight: Option<Flight>,
    /// The query to send upstream instead of the client's (unkeyed parameters removed);
    /// `Some(None)` removes it.
    pub query: Option<Option<String>>,
    /// The method to send upstream instead of the client's.
    pub method: Option<Method>,
    /// Whether the upstream may be told the caller's identity (the application is keyed,
    /// or the response will not be stored).
    pub identify: bool,
}

impl Pending {
    fn bypass(
        store: &Arc<CacheStore>,
        policy: &Arc<RouteCache>,
        mode: Mode,
        url: String,
    ) -> Box<Self> {
        Box::new(Self {
            store: Arc::clone(store),
            policy: Arc::clone(policy),
            mode,
            primary: String::new(),
            url,
            sent: HeaderMap::new(),
            conditions: HeaderMap::new(),
            head: false,
            request_time: SystemTime::now(),
            flight: None,
            query: None,
            method: None,
            identify: true,
        })
    }
}

/// Looks the request up. On a fetch, `parts` has been reduced to what may be forwarded
/// (see the module docs) and carries the validators of a stale entry.
pub(crate) async fn begin(
    store: &Arc<CacheStore>,
    policy: &Arc<RouteCache>,
    parts: &mut http::request::Parts,
    ctx: &Ctx<'_>,
) -> Begin {
    let cfg = &policy.cfg;
    let (key_query, forward_query) = query_parts(parts.uri.query(), &cfg.key.query);
    let port = authority_port(parts).unwrap_or(if ctx.scheme == "https" { 443 } else { 80 });
    let mut url = format!(
        "{}://{}:{port}{}",
        ctx.scheme,
        ctx.host.unwrap_or(""),
        ctx.path
    );
    if let Some(q) = &key_query {
        url.push('?');
        url.push_str(q);
    }
    let method = parts.method.clone();
    if method != Method::GET && method != Method::HEAD {
        let mode = if method.is_safe() {
            Mode::Bypass
        } else {
            Mode::Invalidate
        };
        return Begin::Fetch(Pending::bypass(store, policy, mode, url));
    }
    let request = rfc::directives(&parts.headers);
    let has_body = ctx.has_body
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    // The upstream is told the host in `Host` (and `X-Forwarded-Host`); the key holds the one
    // that routed the request. When an absolute request target names another, they differ.
    let host_differs = match (parts.uri.authority(), parts.headers.get(header::HOST)) {
        (Some(a), Some(h)) => !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()),
        _ => false,
    };
    // An upgrade (WebSocket) is a tunnel, not a response: it keeps its headers.
    if has_body || host_differs || request.no_store || parts.headers.contains_key(header::UPGRADE) {
        return Begin::Fetch(Pending::bypass(store, policy, Mode::Bypass, url));
    }

    // What goes upstream: the keyed and negotiation headers only.
    let mut conditions = HeaderMap::new();
    for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        for v in parts.headers.get_all(&name) {
            conditions.append(name.clone(), v.clone());
        }
    }
    let all = std::mem::take(&mut parts.headers);
    let mut last = None;
    for (name, value) in all {
        if let Some(n) = name {
            last = Some(n);
        }
        if let Some(n) = &last
            && policy.forwards(n)
        {
            parts.headers.append(n.clone(), value);
        }
    }

    let mut primary = url.clone();
    for part in [
        ctx.route,
        ctx.upstream,
        ctx.application
            .filter(|_| cfg.key.application)
            .unwrap_or(""),
        ctx.forward_path.unwrap_or(""),
    ] {
        primary.push('\n');
        primary.push_str(part);
    }
    for name in &policy.key_headers {
        primary.push('\n');
        primary.push_str(name.as_str());
        primary.push(':');
        if let Some(v) = entry::vary_value(&parts.headers, name.as_str()) {
            primary.push_str(&v);
        }
    }

    let now = SystemTime::now();
    let head = method == Method::HEAD;
    let query = (forward_query.as_deref() != parts.uri.query()).then_some(forward_query);
    let make = |mode: Mode, flight: Option<Flight>, sent: HeaderMap| {
        Box::new(Pending {
            store: Arc::clone(store),
            policy: Arc::clone(policy),
            mode,
            primary: primary.clone(),
            url: url.clone(),
            sent,
            conditions: conditions.clone(),
            head,
            request_time: now,
            flight,
            query: query.clone(),
            method: head.then_some(Method::GET),
            identify: cfg.key.application,
        })
    };

    let mut waited = false;
    loop {
        if let Some(e) = store.lookup(&primary, &parts.headers).await {
            let age = e.age(now);
            match rfc::usable(&request, cfg.honor_request_no_cache, age, &e.rules) {
                rfc::Usable::Fresh => {
                    return Begin::Answer(serve(&e, &conditions, head, now), HIT, None);
                }
                rfc::Usable::StaleRevalidate => {
                    let refresh = store.join(&primary).ok().map(|flight| {
                        let mut headers = parts.headers.clone();
                        add_validators(&mut headers, &e);
                        let mut pending = make(
                            Mode::Revalidate(Arc::clone(&e)),
                            Some(flight),
                            parts.headers.clone(),
                        );
                        // A background refresh answers nobody: it always fetches GET.
                        pending.head = false;
                        pending.method = None;
                        Refresh { pending, headers }
                    });
                    return Begin::Answer(serve(&e, &conditions, head, now), STALE, refresh);
                }
                rfc::Usable::Validate if request.only_if_cached => {
                    return Begin::Answer(gateway_timeout(), MISS, None);
                }
                rfc::Usable::Validate => {
                    let flight = store.join(&primary).ok();
                    let sent = parts.headers.clone();
                    add_validators(&mut parts.headers, &e);
                    return Begin::Fetch(make(Mode::Revalidate(e), flight, sent));
                }
            }
        }
        if request.only_if_cached {
            return Begin::Answer(gateway_timeout(), MISS, None);
        }
        if waited {
            // The fetch we waited for stored nothing usable: fetch without coalescing.
            return Begin::Fetch(make(Mode::Miss, None, parts.headers.clone()));
        }
        match store.join(&primary) {
            Ok(flight) => {
                return Begin::Fetch(make(Mode::Miss, Some(flight), parts.headers.clone()));
            }
            Err(mut rx) => {
                // Someone is fetching this key: wait for their answer, then look again.
                let _ = tokio::time::timeout(cfg.lock_timeout, rx.wait_for(|done| *done)).await;
                waited = true;
            }
        }
    }
}

fn add_validators(headers: &mut HeaderMap, e: &Entry) {
    if let Some(etag) = e.headers.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = e.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
    }
}

/// 504 for `only-if-cached` with nothing usable stored (RFC 9111 §5.2.1.7).
fn gateway_timeout() -> Response<ProxyBody> {
    let mut r = Response::new(crate::body::empty());
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    r
}

/// The port the client addressed (`Host` or the request target), if it gave one.
fn authority_port(parts: &http::request::Parts) -> Option<u16> {
    if let Some(a) = parts.uri.authority() {
        return a.port_u16();
    }
    let host = parts.headers.get(header::HOST)?.to_str().ok()?;
    let (_, port) = host.rsplit_once(':')?;
    if host.starts_with('[') && !host.contains("]:") {
        return None;
    }
    port.parse().ok()
}

/// The query as keyed (canonical order) and as forwarded (the keyed parameters only, in
/// their original order and encoding).
fn query_parts(query: Option<&str>, rule: &QueryKey) -> (Option<String>, Option<String>) {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return (None, None);
    };
    let kept: Vec<&str> = match rule {
        QueryKey::None => return (None, None),
        QueryKey::All => q.split('&').filter(|p| !p.is_empty()).collect(),
        QueryKey::Only(names) => q
            .split('&')
            .filter(|p| {
                let raw = p.split('=').next().unwrap_or("");
                let name: String = form_urlencoded::parse(raw.as_bytes())
                    .next()
                    .map(|(k, _)| k.into_owned())
                    .unwrap_or_default();
                names.contains(&name)
            })
            .collect(),
    };
    if kept.is_empty() {
        return (None, None);
    }
    let forward = kept.join("&");
    let mut sorted = kept;
    // By name only, and stable: repeated parameters keep their order (`?id=1&id=2` and
    // `?id=2&id=1` can mean different things to the upstream).
    sorted.sort_by_key(|p| p.split('=').next().unwrap_or(""));
    (Some(sorted.join("&")), Some(forward))
}

/// A response from a stored entry: `304` when the client's conditions hold, else the
/// stored one with its current `Age`.
fn serve(e: &Entry, conditions: &HeaderMap, head: bool, now: SystemTime) -> Response<ProxyBody> {
    let age = HeaderValue::from(e.age(now).as_secs());
    if e.status == StatusCode::OK && rfc::not_modified(conditions, &e.headers) {
        let mut r = Response::new(crate::body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        for name in &rfc::NOT_MODIFIED_FIELDS {
            for v in e.headers.get_all(name) {
                r.headers_mut().append(name.clone(), v.clone());
            }
        }
        if let Some(lm) = e.headers.get(header::LAST_MODIFIED) {
            r.headers_mut().insert(header::LAST_MODIFIED, lm.clone());
        }
        r.headers_mut().insert(header::AGE, age);
        return r;
    }
    let body = if head {
        crate::body::empty()
    } else {
        crate::body::full(e.body.clone())
    };
    let mut r = Response::new(body);
    *r.status_mut() = e.status;
    *r.headers_mut() = e.headers.clone();
    r.headers_mut().insert(header::AGE, age);
    r
}

impl Pending {
    /// The largest body the policy stores.
    pub(crate) fn max_object_bytes(&self) -> u64 {
        self.policy.cfg.max_object_bytes
    }

    /// When the upstream call failed: the stale entry, if `stale-if-error` allows it.
    pub(crate) fn on_error(&self, e: &GatewayError) -> Option<Response<ProxyBody>> {
        if e.kind.origin() != Origin::Upstream {
            return None;
        }
        self.stale_for_error()
    }

    fn stale_for_error(&self) -> Option<Response<ProxyBody>> {
        let Mode::Revalidate(entry) = &self.mode else {
            return None;
        };
        let now = SystemTime::now();
        let staleness = entry.age(now).saturating_sub(entry.rules.lifetime);
        (staleness <= entry.rules.stale_if_error && !entry.rules.must_revalidate)
            .then(|| serve(entry, &self.conditions, self.head, now))
    }

    /// Handles the upstream's response: stores it, merges a `304`, or serves the stale
    /// entry in place of a `5xx`. Returns what the client gets and the `X-Cache` value.
    pub(crate) fn finish(
        mut self: Box<Self>,
        resp: Response<ProxyBody>,
    ) -> (Response<ProxyBody>, &'static str) {
        let status = resp.status();
        match &self.mode {
            Mode::Bypass => return (resp, BYPASS),
            Mode::Invalidate => {
                if status.is_success() || status.is_redirection() {
                    self.store.invalidate(&self.url);
                }
                return (resp, BYPASS);
            }
            Mode::Revalidate(entry) => {
                if status == StatusCode::NOT_MODIFIED {
                    let entry = Arc::clone(entry);
                    return self.merge_not_modified(&entry, resp.headers());
                }
                if status.is_server_error()
                    && let Some(stale) = self.stale_for_error()
                {
                    return (stale, STALE);
                }
            }
            Mode::Miss => {}
        }
        let now = SystemTime::now();
        let rules = rfc::storable(&self.policy.cfg, &self.sent, status, resp.headers(), now);
        let too_big = resp
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n > self.policy.cfg.max_object_bytes);
        // An event stream never ends the way a stored answer must, and is one client's.
        let streaming = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        // A `Vary` on a header the gateway sets (client address, identity, trace) names an
        // input the key does not hold: as unmatchable as `Vary: *`.
        let varies_on_gateway = rfc::vary_names(resp.headers())
            .iter()
            .any(|n| set_by_gateway(n));
        let rules = if streaming {
            Err(rfc::NotStored::NoFreshness)
        } else if varies_on_gateway {
            Err(rfc::NotStored::VaryAll)
        } else {
            rules
        };
        let (parts, body) = resp.into_parts();
        let Ok(rules) = rules else {
            if matches!(self.mode, Mode::Revalidate(_)) {
                self.store.remove(&self.primary);
            }
            return (self.strip_for_head(parts, body, false), MISS);
        };
        if too_big {
            return (self.strip_for_head(parts, body, false), MISS);
        }
        let initial_age = rfc::initial_age(&parts.headers, self.request_time, now);
        let flight = self.flight.take();
        let store = Arc::clone(&self.store);
        let primary = std::mem::take(&mut self.primary);
        let template = Entry {
            url: std::mem::take(&mut self.url),
            status,
            headers: parts.headers.clone(),
            body: Bytes::new(),
            tags: tags(&parts.headers, &self.policy.tag_header),
            vary: rfc::vary_names(&parts.headers)
                .into_iter()
                .map(|n| {
                    let v = entry::vary_value(&self.sent, &n);
                    (n, v)
                })
                .collect(),
            stored_at: now,
            initial_age,
            rules,
        };
        let limit = usize::try_from(self.policy.cfg.max_object_bytes).unwrap_or(usize::MAX);
        let done = move |bytes: Bytes| {
            let mut e = template;
            if e.status != StatusCode::NO_CONTENT {
                e.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            e.body = bytes;
            store.store(&primary, Arc::new(e));
            drop(flight);
        };
        if body.is_end_stream() {
            // Nothing will be polled (a 204, an empty body): stored as it is.
            done(Bytes::new());
            return (self.strip_for_head(parts, body, false), MISS);
        }
        let collect = Collect {
            inner: body,
            buf: Some(BytesMut::new()),
            limit,
            done: Some(Box::new(done)),
        }
        .boxed_unsync();
        (self.strip_for_head(parts, collect, true), MISS)
    }

    /// A `304` from the upstream: the stored entry with the new header fields and times.
    fn merge_not_modified(
        self: Box<Self>,
        old: &Entry,
        fresh: &HeaderMap,
    ) -> (Response<ProxyBody>, &'static str) {
        let now = SystemTime::now();
        let mut headers = old.headers.clone();
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (name, value) in fresh {
            if rfc::keeps_stored(name) {
                continue;
            }
            if !replaced.contains(&name) {
                headers.remove(name);
                replaced.push(name);
            }
            headers.append(name.clone(), value.clone());
        }
        let mut e = Entry {
            headers,
            stored_at: now,
            initial_age: rfc::initial_age(fresh, self.request_time, now),
            ..old.clone()
        };
        let keep = match rfc::storable(&self.policy.cfg, &self.sent, e.status, &e.headers, now) {
            Ok(rules) => {
                e.rules = rules;
                e.tags = tags(&e.headers, &self.policy.tag_header);
                true
            }
            Err(_) => false,
        };
        let e = Arc::new(e);
        if keep {
            self.store.store(&self.primary, Arc::clone(&e));
        } else {
            self.store.remove(&self.primary);
        }
        (serve(&e, &self.conditions, self.head, now), REVALIDATED)
    }

    /// For a client's HEAD (sent upstream as GET) the client gets the head alone; the body
    /// is read in the background when `storing` it, else dropped unread.
    fn strip_for_head(
        &self,
        parts: http::response::Parts,
        body: ProxyBody,
        storing: bool,
    ) -> Response<ProxyBody> {
        if !self.head {
            return Response::from_parts(parts, body);
        }
        if storing {
            tokio::spawn(drain(body, self.policy.cfg.max_object_bytes, DRAIN_WITHIN));
        }
        Response::from_parts(parts, crate::body::empty())
    }
}

/// Reads a body to its end, discarding it (what a wrapping [`Collect`] needs to store), but
/// no more than `limit` bytes and no longer than `within`: past them nothing would be stored,
/// and the upstream connection is let go.
pub(crate) async fn drain(mut body: ProxyBody, limit: u64, within: std::time::Duration) {
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    seen += f.data_ref().map_or(0, |d| d.len() as u64);
                    if seen > limit {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
}

/// How long a body read only to store it may take.
pub(crate) const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Request headers the gateway sets itself (forwarding, identity, tracing, request id).
fn set_by_gateway(name: &str) -> bool {
    name.starts_with("x-forwarded-")
        || name.starts_with("x-consumer-")
        || name.starts_with("x-client-cert-")
        || matches!(
            name,
            "forwarded"
                | "via"
                | "x-request-id"
                | "traceparent"
                | "tracestate"
                | "x-anonymous-consumer"
                | "x-authenticated-scopes"
        )
}

fn tags(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
    let mut out = Vec::new();
    for v in headers.get_all(name) {
        if let Ok(text) = v.to_str() {
            out.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    out
}

type Done = Box<dyn FnOnce(Bytes) + Send>;

/// A response body that keeps a copy of what streams through, up to `limit` bytes, and
/// hands it to `done` when the body ends cleanly. Past the limit, on an error, on trailers
/// or when dropped early, nothing is stored.
struct Collect {
    inner: ProxyBody,
    buf: Option<BytesMut>,
    limit: usize,
    done: Option<Done>,
}

impl Collect {
    fn finish(&mut self) {
        if let (Some(buf), Some(done)) = (self.buf.take(), self.done.take()) {
            done(buf.freeze());
        }
    }
}

impl Body for Collect {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    if let Some(buf) = &mut this.buf {
                        if buf.len() + data.len() > this.limit {
                            this.buf = None;
                            this.done = None;
                        } else {
                            buf.extend_from_slice(data);
                        }
                    }
                    // A server stops polling once the body says it has ended (a known
                    // length fully sent): that is the end too.
                    if this.inner.is_end_stream() {
                        this.finish();
                    }
                }
                None => {
                    this.buf = None;
                    this.done = None;
                }
            },
            Poll::Ready(Some(Err(_))) => {
                this.buf = None;
                this.done = None;
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn query_is_keyed_canonically_and_unkeyed_parameters_are_not_forwarded() {
        let all = QueryKey::All;
        assert_eq!(
            query_parts(Some("b=2&a=1"), &all),
            (Some("a=1&b=2".into()), Some("b=2&a=1".into()))
        );
        assert_eq!(query_parts(Some("b=2"), &QueryKey::None), (None, None));
        let only = QueryKey::Only(vec!["page".into(), "q s".into()]);
        assert_eq!(
            query_parts(Some("utm=x&page=2&q+s=1"), &only),
            (Some("page=2&q+s=1".into()), Some("page=2&q+s=1".into()))
        );
        assert_eq!(query_parts(Some("utm=x"), &only), (None, None));
    }

    #[test]
    fn purges_match_by_url_prefix_and_tag() {
        let e = Entry {
            url: "http://a:80/p/1".into(),
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            tags: vec!["prod".into()],
            vary: Vec::new(),
            stored_at: SystemTime::now(),
            initial_age: std::time::Duration::ZERO,
            rules: rfc::Storable {
                lifetime: std::time::Duration::from_secs(1),
                stale_while_revalidate: std::time::Duration::ZERO,
                stale_if_error: std::time::Duration::ZERO,
                must_revalidate: false,
                no_cache: false,
            },
        };
        assert!(Purge::Key("http://a:80/p/1".into()).covers(&e));
        assert!(!Purge::Key("http://a:80/p".into()).covers(&e));
        assert!(Purge::Prefix("http://a:80/p".into()).covers(&e));
        assert!(Purge::Tag("prod".into()).covers(&e));
        assert!(!Purge::Tag("dev".into()).covers(&e));
        assert!(Purge::All.covers(&e));
    }
}
