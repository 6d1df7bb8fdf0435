//! Call logs, stored in segments. Each batch the call-log writer hands over becomes one row of
//! `call_log_segments`: the calls compressed together, the range of arrival times they span and
//! a summary (services, routes, applications, status classes) that lets a search skip segments
//! that cannot match without reading them. A lookup by request id reads only the segments that
//! may hold it: for the gateway's own ids (UUIDv7s, made as the request arrived) those that
//! arrived around the id's time; for any other id those a narrow table, `call_log_ids`, maps a
//! hash of the id to (see [`TIMED_ID_SLACK_MS`]).
//!
//! Segments instead of a row per call: a 25-column row with six index entries cost the
//! gateway about 5 µs of CPU per call, most of it in the database; a segment costs one row,
//! and each call one compressed record (and one narrow index entry, when its id needs one).
//! `examples/calllog_write.rs` measures the difference, on the machine it was run on: with
//! the gateway's own request ids (UUIDv7), about 10 µs against 2 µs of CPU per call written
//! and 415 against 64 bytes on disk, when each call was still keyed (now 36 bytes); with
//! random ones, 32 µs against 5 µs and 427 against 85 bytes.
//!
//! Like quota usage, these writes are not configuration: they do not bump the store version
//! nor go through [`crate::StoreTx`].
//!
//! Searches are newest first (arrival time, then id) with a keyset cursor `<at>.<id>`: calls
//! written between two pages never make a call appear twice or be skipped. A call's id is its
//! segment's id times [`SEGMENT_SPAN`] plus its place in the segment, so ids increase with
//! writes (calls moved from an earlier version's table get new ones) and do not change when
//! retention trims a segment.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::Store;
use crate::db::{Arg, Tx};
use crate::error::{Result, StoreError};
use crate::model::page_limit;
use crate::{Page, page};

/// Ids per segment: a call's id is `segment * SEGMENT_SPAN + place`.
const SEGMENT_SPAN: i64 = 16_384;
/// Calls of one segment all arrived within one aligned window of this many milliseconds;
/// a batch is split at window boundaries.
///
/// A call is written when its response ends, so a batch also holds calls that arrived long
/// before the rest (a WebSocket, a long download). Without windows such a batch's segment
/// would span minutes, and a search page cut short at a time inside it (its budget, below)
/// would read it again on every page. Ten seconds splits a batch of a second's traffic one
/// time in ten.
const SEGMENT_WINDOW_MS: i64 = 10_000;
/// Most calls in one segment (below [`SEGMENT_SPAN`]); larger batches are split.
pub const MAX_SEGMENT_CALLS: usize = 10_000;
const _: () = assert!(MAX_SEGMENT_CALLS <= SEGMENT_SPAN as usize && SEGMENT_SPAN <= 1 << 16);
/// Most distinct values a segment's summary lists per field. A segment with more lists none
/// and is read by every search filtering on that field.
const SUMMARY_MAX: usize = 64;
/// Segment summaries read per query while a search walks back in time.
const META_PAGE: i64 = 256;
/// Segments deleted per transaction when pruning (at most this many times
/// [`MAX_SEGMENT_CALLS`] request keys, 16,000 with the writer's default batch), so that
/// however large the backlog, each transaction, and on SQLite the write lock, is short.
const DELETE_STEP: i64 = 8;
/// Calls of the table of earlier versions deleted or moved per transaction.
const LEGACY_STEP: i64 = 2_000;
/// How a segment's body is written: each call as `(place, CallLogRow)` in postcard, one after
/// the other, the whole compressed with zstd.
const ENCODING_POSTCARD_ZSTD: i64 = 1;
/// zstd's fastest standard level: the writer's CPU is what segments are for, and call logs
/// still compress about tenfold at it.
const ZSTD_LEVEL: i32 = 1;

/// One stored call, as searches return it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CallLogRecord {
    /// Call id, increasing with writes. Never deserialised: it comes from where the call is
    /// stored, not from its record.
    #[serde(skip_deserializing)]
    pub id: i64,
    /// When the request arrived, epoch milliseconds (UTC).
    pub at: i64,
    /// The request id.
    pub request_id: String,
    /// W3C trace id, when traced.
    pub trace_id: Option<String>,
    /// Client IP.
    pub client_ip: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
    /// Request method.
    pub method: String,
    /// Requested host.
    pub host: Option<String>,
    /// Request path (without the query).
    pub path: String,
    /// Matched route's name.
    pub route: Option<String>,
    /// Service store id.
    pub service: Option<String>,
    /// Application store id.
    pub application: Option<String>,
    /// Application name.
    pub application_name: Option<String>,
    /// The application's team name.
    pub team: Option<String>,
    /// Response status.
    pub status: i64,
    /// Request body bytes.
    pub bytes_in: i64,
    /// Response body bytes.
    pub bytes_out: i64,
    /// Total time, microseconds.
    pub duration_us: i64,
    /// Upstream time to response headers, microseconds.
    pub upstream_us: Option<i64>,
    /// Upstream pool name.
    pub upstream: Option<String>,
    /// Upstream target address that answered.
    pub upstream_target: Option<String>,
    /// Upstream attempts.
    pub attempts: i64,
    /// Cache outcome.
    pub cache: Option<String>,
    /// Gateway error code.
    pub error: Option<String>,
    /// Client `User-Agent`.
    pub user_agent: Option<String>,
    /// Whether the response body was sent to the end.
    pub completed: bool,
}

/// A call to write, borrowing its text from wherever the caller holds it.
///
/// Stored in postcard, which writes fields by position: they are [`CallLogRecord`]'s, in
/// the same order, without the id (a test holds the two together). Adding, removing or
/// reordering a field therefore needs a new segment encoding beside
/// `ENCODING_POSTCARD_ZSTD`, so that segments written before stay readable.
///
/// The fields mean what [`CallLogRecord`]'s of the same name mean.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct CallLogRow<'a> {
    pub at: i64,
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub client_ip: Cow<'a, str>,
    pub protocol: &'a str,
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    pub application: Option<&'a str>,
    pub application_name: Option<&'a str>,
    pub team: Option<&'a str>,
    pub status: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub duration_us: i64,
    pub upstream_us: Option<i64>,
    pub upstream: Option<&'a str>,
    pub upstream_target: Option<Cow<'a, str>>,
    pub attempts: i64,
    pub cache: Option<&'a str>,
    pub error: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub completed: bool,
}

impl<'a> From<&'a CallLogRecord> for CallLogRow<'a> {
    fn from(r: &'a CallLogRecord) -> Self {
        Self {
            at: r.at,
            request_id: &r.request_id,
            trace_id: r.trace_id.as_deref(),
            client_ip: Cow::Borrowed(&r.client_ip),
            protocol: &r.protocol,
            method: &r.method,
            host: r.host.as_deref(),
            path: &r.path,
            route: r.route.as_deref(),
            service: r.service.as_deref(),
            application: r.application.as_deref(),
            application_name: r.application_name.as_deref(),
            team: r.team.as_deref(),
            status: r.status,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            duration_us: r.duration_us,
            upstream_us: r.upstream_us,
            upstream: r.upstream.as_deref(),
            upstream_target: r.upstream_target.as_deref().map(Cow::Borrowed),
            attempts: r.attempts,
            cache: r.cache.as_deref(),
            error: r.error.as_deref(),
            user_agent: r.user_agent.as_deref(),
            completed: r.completed,
        }
    }
}

/// Whose calls a search may return. `None` in [`CallLogQuery::scope`] means everyone's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLogScope {
    /// Calls to these services (store ids)...
    pub services: Vec<String>,
    /// ...or made by these applications (store ids).
    pub applications: Vec<String>,
}

/// A call-log search. Every filter is optional; all given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLogQuery {
    /// Calls that arrived at or after this (epoch ms).
    pub from: Option<i64>,
    /// Calls that arrived before this (epoch ms).
    pub to: Option<i64>,
    /// Service store id.
    pub service: Option<String>,
    /// Route name.
    pub route: Option<String>,
    /// Application store id.
    pub application: Option<String>,
    /// Exact status.
    pub status: Option<i64>,
    /// Status class, 1 to 5 (`2` is 200..=299).
    pub status_class: Option<i64>,
    /// Request id.
    pub request_id: Option<String>,
    /// Visibility limit: only calls to these services or by these applications.
    pub scope: Option<CallLogScope>,
    /// Page size: [`crate::DEFAULT_LIMIT`] if `None`, clamped to 1..=[`crate::MAX_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Most calls one page decompresses and filters, counted a segment at a time (a page
    /// stops after the segment that reaches it); `None`: no bound. See
    /// [`Store::search_call_logs`] for what a page cut short by it holds.
    pub max_calls: Option<u64>,
    /// Most segments one page reads; `None`: no bound.
    pub max_segments: Option<u32>,
    /// Most segment summaries one page examines, read or skipped; `None`: no bound.
    pub max_summaries: Option<u32>,
}

/// Parses a cursor of [`Store::search_call_logs`]: `<at>.<id>`.
fn parse_cursor(cursor: &str) -> Result<(i64, i64)> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    cursor
        .split_once('.')
        .and_then(|(at, id)| Some((number(at)?, number(id)?)))
        .ok_or_else(|| {
            StoreError::Invalid(format!("call-log cursor {cursor:?} is not one of ours"))
        })
}

/// The text of the cursor `(at, id)`, as [`parse_cursor`] reads it.
fn cursor_text((at, id): (i64, i64)) -> String {
    format!("{at}.{id}")
}

/// Whether `cursor` is one [`Store::search_call_logs`] could have returned.
pub fn valid_call_log_cursor(cursor: &str) -> bool {
    parse_cursor(cursor).is_ok()
}

/// Bits of a hash below the time in the key of a time-ordered request id.
const KEY_HASH_BITS: u32 = 15;

/// The key of a request id in `call_log_ids`, the same on every node and in every version (the
/// table outlives both).
///
/// The gateway's own ids are UUIDv7s, which begin with when they were made, in milliseconds.
/// Their key is that time followed by 15 bits of a hash of the id (xxh3), so the keys of a
/// batch are close together and go in at the end of the table's B-tree, a few pages per
/// batch; keyed by a hash alone, each call touched a page anywhere in the tree, and writing
/// those pages was most of what a segment cost. Any other id (one a client sent) is keyed by
/// its hash with the top bit set, so the two kinds of key never meet.
fn request_key(request_id: &str) -> i64 {
    let hash = xxhash_rust::xxh3::xxh3_64(request_id.as_bytes());
    let timed = id_time(request_id)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| (ms << KEY_HASH_BITS) | (hash & ((1 << KEY_HASH_BITS) - 1)));
    // Both fit: 48 bits of time and 15 of hash, or the top bit set on purpose.
    i64::from_ne_bytes(timed.unwrap_or(hash | 1 << 63).to_ne_bytes())
}

/// When a time-ordered request id (a UUIDv7) was made, in Unix milliseconds; `None` for any
/// other id.
fn id_time(request_id: &str) -> Option<i64> {
    uuid::Uuid::try_parse(request_id)
        .ok()
        .filter(|id| id.get_version_num() == 7)
        // 48 bits: always fits.
        .and_then(|id| i64::try_from(id.as_u128() >> 80).ok())
}

/// How far from its call's arrival a time-ordered request id may have been made for the call
/// to be found by time rather than through `call_log_ids`.
///
/// The gateway makes its ids as a request arrives, so its own calls (nearly all of them)
/// write no key: a lookup reads the segments that arrived around the id's time instead, a
/// window of twice this plus [`SEGMENT_WINDOW_MS`]. The keys were most of what the database
/// did per call. A client's id made further away (another clock, a replay) is keyed as
/// before.
const TIMED_ID_SLACK_MS: i64 = 100;

/// The key a call arriving at `at` puts in `call_log_ids`, or `None` when a lookup finds it
/// by its id's time (see [`TIMED_ID_SLACK_MS`]).
fn indexed_key(request_id: &str, at: i64) -> Option<i64> {
    match id_time(request_id) {
        Some(made) if made.abs_diff(at) <= TIMED_ID_SLACK_MS.unsigned_abs() => None,
        _ => Some(request_key(request_id)),
    }
}

/// The status-class bit of `status` in a segment's `status_classes`.
fn class_bit(class: i64) -> i64 {
    1 << class.clamp(0, 62)
}

/// A segment ready to be written.
struct Encoded {
    first_at: i64,
    last_at: i64,
    calls: i64,
    status_classes: i64,
    services: Option<String>,
    routes: Option<String>,
    applications: Option<String>,
    body: Vec<u8>,
    /// The calls' request keys, distinct, as a JSON array for the database to expand.
    keys: String,
}

impl Encoded {
    /// The segment's columns as bound by INSERT and UPDATE (`$1` to `$9`: `first_at`,
    /// `last_at`, `calls`, `status_classes`, `services`, `routes`, `applications`,
    /// `encoding`, `body`), then `id` if given (`$10`).
    fn args(&self, id: Option<i64>) -> Vec<Arg<'_>> {
        let mut args = vec![
            self.first_at.into(),
            self.last_at.into(),
            self.calls.into(),
            self.status_classes.into(),
            self.services.as_deref().into(),
            self.routes.as_deref().into(),
            self.applications.as_deref().into(),
            ENCODING_POSTCARD_ZSTD.into(),
            Arg::Bytes(&self.body),
        ];
        args.extend(id.map(Arg::from));
        args
    }
}

/// The distinct values of one summary field, or `None` once there are too many to list.
struct Distinct<'a>(Option<BTreeSet<&'a str>>);

impl<'a> Distinct<'a> {
    fn new() -> Self {
        Self(Some(BTreeSet::new()))
    }

    fn add(&mut self, value: Option<&'a str>) {
        if let (Some(set), Some(v)) = (&mut self.0, value) {
            set.insert(v);
            if set.len() > SUMMARY_MAX {
                self.0 = None;
            }
        }
    }

    fn json(&self) -> Result<Option<String>> {
        self.0
            .as_ref()
            .map(|set| serde_json::to_string(set).map_err(|e| StoreError::Other(Box::new(e))))
            .transpose()
    }
}

/// Encodes calls, each with its place in the segment, into a segment.
fn encode<'r, 'a: 'r>(
    calls: impl IntoIterator<Item = (u16, &'r CallLogRow<'a>)>,
) -> Result<Encoded> {
    let other = |e: &dyn std::fmt::Display| StoreError::Other(e.to_string().into());
    let mut raw = Vec::new();
    let (mut first_at, mut last_at, mut count, mut status_classes) = (i64::MAX, i64::MIN, 0, 0);
    let (mut services, mut routes, mut applications) =
        (Distinct::new(), Distinct::new(), Distinct::new());
    let mut keys = Vec::new();
    for (place, row) in calls {
        raw = postcard::to_extend(&(place, row), raw).map_err(|e| other(&e))?;
        first_at = first_at.min(row.at);
        last_at = last_at.max(row.at);
        count += 1;
        status_classes |= class_bit(row.status / 100);
        services.add(row.service);
        routes.add(row.route);
        applications.add(row.application);
        keys.extend(indexed_key(row.request_id, row.at));
    }
    keys.sort_unstable();
    keys.dedup();
    let mut key_list = String::with_capacity(keys.len() * 21 + 2);
    key_list.push('[');
    let mut buf = itoa::Buffer::new();
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            key_list.push(',');
        }
        key_list.push_str(buf.format(*k));
    }
    key_list.push(']');
    Ok(Encoded {
        first_at,
        last_at,
        calls: count,
        status_classes,
        services: services.json()?,
        routes: routes.json()?,
        applications: applications.json()?,
        body: zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(|e| other(&e))?,
        keys: key_list,
    })
}

/// The calls of segment `segment` from its stored body.
fn decode(segment: i64, encoding: i64, body: &[u8]) -> Result<Vec<CallLogRecord>> {
    let corrupt = |why: &dyn std::fmt::Display| {
        StoreError::Other(format!("call-log segment {segment} cannot be read: {why}").into())
    };
    if encoding != ENCODING_POSTCARD_ZSTD {
        return Err(corrupt(&format!(
            "encoding {encoding} is not one this version reads"
        )));
    }
    let raw = zstd::stream::decode_all(body).map_err(|e| corrupt(&e))?;
    let mut rest = raw.as_slice();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let ((place, mut call), tail): ((u16, CallLogRecord), _) =
            postcard::take_from_bytes(rest).map_err(|e| corrupt(&e))?;
        if i64::from(place) >= SEGMENT_SPAN {
            return Err(corrupt(&format!("place {place} is past {SEGMENT_SPAN}")));
        }
        call.id = segment * SEGMENT_SPAN + i64::from(place);
        calls.push(call);
        rest = tail;
    }
    Ok(calls)
}

/// What a search reads of a segment before deciding whether to read its calls.
#[derive(Debug, sqlx::FromRow)]
struct SegmentMeta {
    id: i64,
    last_at: i64,
    calls: i64,
    services: Option<String>,
    routes: Option<String>,
    applications: Option<String>,
}

/// Whether a summary list (JSON, `None` when too long to list) may hold `value`.
fn may_hold(list: Option<&str>, value: &str) -> bool {
    list.and_then(|l| serde_json::from_str::<Vec<&str>>(l).ok())
        .is_none_or(|values| values.contains(&value))
}

/// Whether a summary list may hold any of `values`.
fn may_hold_any(list: Option<&str>, values: &[String]) -> bool {
    list.and_then(|l| serde_json::from_str::<Vec<&str>>(l).ok())
        .is_none_or(|listed| values.iter().any(|v| listed.contains(&v.as_str())))
}

/// A search's conditions, checked against segment summaries and then against each call.
struct Filter<'q> {
    query: &'q CallLogQuery,
    cursor: Option<(i64, i64)>,
}

impl Filter<'_> {
    fn segment_may_match(&self, m: &SegmentMeta) -> bool {
        let q = self.query;
        let field = |list: &Option<String>, value: &Option<String>| {
            value
                .as_deref()
                .is_none_or(|v| may_hold(list.as_deref(), v))
        };
        field(&m.services, &q.service)
            && field(&m.routes, &q.route)
            && field(&m.applications, &q.application)
            && q.scope.as_ref().is_none_or(|s| {
                may_hold_any(m.services.as_deref(), &s.services)
                    || may_hold_any(m.applications.as_deref(), &s.applications)
            })
    }

    fn call_matches(&self, c: &CallLogRecord) -> bool {
        let q = self.query;
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        let listed = |list: &[String], have: &Option<String>| {
            have.as_ref().is_some_and(|h| list.contains(h))
        };
        q.from.is_none_or(|from| c.at >= from)
            && q.to.is_none_or(|to| c.at < to)
            && self.cursor.is_none_or(|cursor| (c.at, c.id) < cursor)
            && eq(&q.service, &c.service)
            && eq(&q.route, &c.route)
            && eq(&q.application, &c.application)
            && q.request_id.as_ref().is_none_or(|r| *r == c.request_id)
            && q.status.is_none_or(|s| s == c.status)
            && q.status_class.is_none_or(|k| c.status / 100 == k)
            && q.scope.as_ref().is_none_or(|s| {
                listed(&s.services, &c.service) || listed(&s.applications, &c.application)
            })
    }
}

/// A WHERE clause under construction: conditions joined by AND, with `$N` placeholders
/// numbered as arguments are bound.
struct Where<'a> {
    sql: String,
    args: Vec<Arg<'a>>,
}

impl<'a> Where<'a> {
    fn new() -> Self {
        Self {
            sql: String::from(" WHERE 1 = 1"),
            args: Vec::new(),
        }
    }

    /// Binds `arg` and returns its placeholder.
    fn bind(&mut self, arg: impl Into<Arg<'a>>) -> String {
        self.args.push(arg.into());
        format!("${}", self.args.len())
    }

    fn and(&mut self, condition: &str) {
        self.sql.push_str(" AND ");
        self.sql.push_str(condition);
    }

    /// Segments after `(last_at, id)` in the order of [`SEGMENT_ORDER`]. A row value, which
    /// both databases match against the `(last_at, id)` index as a range; spelt out with OR,
    /// SQLite scanned the index from its newest end on every page of summaries.
    fn after_segment(&mut self, (last_at, id): (i64, i64)) {
        let a = self.bind(last_at);
        let i = self.bind(id);
        self.and(&format!("(last_at, id) < ({a}, {i})"));
    }
}

/// The work one search page has done, against its query's bounds.
struct SearchBudget {
    calls: u64,
    segments: u32,
    summaries: u32,
    max_calls: Option<u64>,
    max_segments: Option<u32>,
    max_summaries: Option<u32>,
}

impl SearchBudget {
    fn new(query: &CallLogQuery) -> Self {
        Self {
            calls: 0,
            segments: 0,
            summaries: 0,
            max_calls: query.max_calls,
            max_segments: query.max_segments,
            max_summaries: query.max_summaries,
        }
    }

    fn spent(&self) -> bool {
        self.max_calls.is_some_and(|m| self.calls >= m)
            || self.max_segments.is_some_and(|m| self.segments >= m)
            || self.max_summaries.is_some_and(|m| self.summaries >= m)
    }

    fn read(&mut self, meta: &SegmentMeta) {
        self.segments += 1;
        self.calls += u64::try_from(meta.calls).unwrap_or(0);
    }
}

/// The cursor of a page cut short where no unread call is newer than `cut_at`: every call
/// at `cut_at` or before, whatever its id. Its time is `cut_at` itself, so the next page's
/// `first_at <= cursor` leaves out the segments that begin after it.
fn cut_cursor(cut_at: i64) -> (i64, i64) {
    (cut_at, i64::MAX)
}

/// Whether a page cut short at `cut_at` would hand on a cursor before `bound`, the earliest
/// of the cursor it was given and the query's `to`: a cut that does not would return
/// nothing the next page would not read again.
fn resumes_before(cut_at: i64, bound: Option<(i64, i64)>) -> bool {
    bound.is_none_or(|b| cut_cursor(cut_at) < b)
}

/// Segments newest first by their latest call, as searches and the row cap walk them.
const SEGMENT_ORDER: &str = "ORDER BY last_at DESC, id DESC";

/// Newest first: by arrival time, then id.
fn newest_first(a: &CallLogRecord, b: &CallLogRecord) -> std::cmp::Ordering {
    (b.at, b.id).cmp(&(a.at, a.id))
}

impl Store {
    /// Writes a batch of calls in one transaction, as one segment per
    /// [`SEGMENT_WINDOW_MS`] window of arrival times and [`MAX_SEGMENT_CALLS`] calls;
    /// returns how many.
    pub async fn insert_call_logs(&self, rows: &[CallLogRow<'_>]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        // Encoded before the transaction: the write lock is held for the writes only.
        let segments = segments_of(rows)?;
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        for segment in &segments {
            insert_segment(&mut tx, segment).await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(rows.len()).unwrap_or(u64::MAX))
    }

    /// One page of the calls matching `query`, newest first (time, then id, descending).
    ///
    /// Reads segment summaries newest first and the calls of those that may match, until no
    /// segment left can hold a call newer than the page's last.
    ///
    /// Once the page has read [`CallLogQuery::max_calls`] calls or
    /// [`CallLogQuery::max_segments`] segments, or examined [`CallLogQuery::max_summaries`]
    /// summaries, it ends early: it holds the matching calls
    /// newer than every segment left unread (perhaps fewer than the limit, perhaps none) and
    /// a `next_cursor` that takes the next page on from the newest unread segment's latest
    /// call. So a filter the summaries cannot rule out costs each page a bounded amount of
    /// work, and the caller follows cursors instead of one request reading the whole store.
    /// A page only stops where its cursor moves on from the one it was given (and from the
    /// query's `to`), so it may read past the bound through the segments that straddle that
    /// point: those other nodes wrote at the same time, no more than a
    /// [`SEGMENT_WINDOW_MS`] window's worth.
    ///
    /// Errors: `Invalid` for a cursor this method did not return.
    pub async fn search_call_logs(&self, query: &CallLogQuery) -> Result<Page<CallLogRecord>> {
        let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?;
        let limit = page_limit(query.limit);
        if query
            .scope
            .as_ref()
            .is_some_and(|s| s.services.is_empty() && s.applications.is_empty())
        {
            return Ok(Page {
                items: Vec::new(),
                next_cursor: None,
            });
        }
        let filter = Filter { query, cursor };
        let want = usize::try_from(limit + 1).unwrap_or(usize::MAX);
        let mut found: Vec<CallLogRecord> = Vec::new();
        let mut after: Option<(i64, i64)> = None;
        // A segment trimmed by the row cap while the walk goes on may come back later with an
        // earlier `last_at`: its calls are already in `found`.
        let mut read = HashSet::new();
        let mut budget = SearchBudget::new(query);
        let bound = match (cursor, query.to) {
            (Some(c), Some(to)) => Some(c.min((to, 0))),
            (c, to) => c.or(to.map(|to| (to, 0))),
        };
        // When the budget ends the page: the newest time an unread segment may hold.
        let mut cut_at = None;
        'walk: loop {
            let metas = self.segment_metas(query, cursor, after).await?;
            let last_page = metas.len() < usize::try_from(META_PAGE).unwrap_or(usize::MAX);
            for meta in metas {
                // Every call left is at most this old: the page is complete once it holds
                // enough newer calls.
                if found.len() >= want && found[want - 1].at > meta.last_at {
                    break 'walk;
                }
                if budget.spent() && resumes_before(meta.last_at, bound) {
                    cut_at = Some(meta.last_at);
                    break 'walk;
                }
                budget.summaries += 1;
                after = Some((meta.last_at, meta.id));
                if !filter.segment_may_match(&meta) || !read.insert(meta.id) {
                    continue;
                }
                budget.read(&meta);
                found.extend(
                    self.segment_calls(meta.id)
                        .await?
                        .into_iter()
                        .filter(|c| filter.call_matches(c)),
                );
                found.sort_unstable_by(newest_first);
                found.truncate(want);
            }
            if last_page {
                break;
            }
        }
        if let Some(cut_at) = cut_at {
            // Unread segments hold nothing newer than `cut_at`, so the calls after it are
            // final, and there are at most `limit` of them (more would have completed the
            // page). The next page takes every call at or before `cut_at`.
            found.retain(|c| c.at > cut_at);
            debug_assert!(found.len() < want, "a full page would have ended the walk");
            return Ok(Page {
                items: found,
                next_cursor: Some(cursor_text(cut_cursor(cut_at))),
            });
        }
        Ok(page(found, limit, |r: &CallLogRecord| {
            cursor_text((r.at, r.id))
        }))
    }

    /// The next page of summaries of segments that may hold calls for `query`, newest first
    /// by their latest call, after the segment `after` (`(last_at, id)`).
    async fn segment_metas(
        &self,
        query: &CallLogQuery,
        cursor: Option<(i64, i64)>,
        after: Option<(i64, i64)>,
    ) -> Result<Vec<SegmentMeta>> {
        let mut w = Where::new();
        if let Some(from) = query.from {
            let p = w.bind(from);
            w.and(&format!("last_at >= {p}"));
        }
        if let Some(to) = query.to {
            let p = w.bind(to);
            w.and(&format!("first_at < {p}"));
        }
        if let Some((at, _)) = cursor {
            let p = w.bind(at);
            w.and(&format!("first_at <= {p}"));
        }
        let classes = match (query.status, query.status_class) {
            (Some(s), _) => Some(class_bit(s / 100)),
            (None, Some(k)) => Some(class_bit(k)),
            (None, None) => None,
        };
        if let Some(mask) = classes {
            let p = w.bind(mask);
            w.and(&format!("(status_classes & {p}) <> 0"));
        }
        if let Some(id) = query.request_id.as_deref() {
            let p = w.bind(request_key(id));
            let keyed = format!("id IN (SELECT segment FROM call_log_ids WHERE request_key = {p})");
            match id_time(id) {
                // Or a segment whose calls may have arrived within the slack of the id's
                // time. A segment spans less than a window, so both ends of the `last_at`
                // index range are known. Segments of earlier versions, which may span more,
                // hold a key for every call.
                Some(made) => {
                    let low = w.bind(made - TIMED_ID_SLACK_MS);
                    let high = w.bind(made + TIMED_ID_SLACK_MS);
                    let last_high = w.bind(made + TIMED_ID_SLACK_MS + SEGMENT_WINDOW_MS);
                    w.and(&format!(
                        "({keyed} OR (last_at >= {low} AND last_at < {last_high} \
                         AND first_at <= {high}))"
                    ));
                }
                None => w.and(&keyed),
            }
        }
        if let Some(after) = after {
            w.after_segment(after);
        }
        let l = w.bind(META_PAGE);
        let sql = format!(
            "SELECT id, last_at, calls, services, routes, applications FROM call_log_segments{} \
             {SEGMENT_ORDER} LIMIT {l}",
            w.sql
        );
        Ok(self.inner.pool.exec().fetch_all(&sql, &w.args).await?)
    }

    /// The calls of one segment; none if it has just been deleted.
    async fn segment_calls(&self, segment: i64) -> Result<Vec<CallLogRecord>> {
        let row: Option<(i64, Vec<u8>)> = self
            .inner
            .pool
            .exec()
            .fetch_optional(
                "SELECT encoding, body FROM call_log_segments WHERE id = $1",
                &[segment.into()],
            )
            .await?;
        row.map_or(Ok(Vec::new()), |(encoding, body)| {
            decode(segment, encoding, &body)
        })
    }

    /// Deletes the calls that arrived before `before` (epoch ms); returns how many went.
    pub async fn prune_call_logs(&self, before: i64) -> Result<u64> {
        let mut total = self
            .delete_segments("last_at < $1", &[before.into()])
            .await?;
        // Segments that straddle the limit keep their newer calls.
        let straddling: Vec<(i64,)> = self
            .inner
            .pool
            .exec()
            .fetch_all(
                "SELECT id FROM call_log_segments WHERE first_at < $1 ORDER BY id",
                &[before.into()],
            )
            .await?;
        for (id,) in straddling {
            total += self
                .trim_segment(id, |calls| calls.retain(|c| c.at >= before))
                .await?;
        }
        Ok(total)
    }

    /// Deletes all but about the newest `keep` calls; returns how many went.
    ///
    /// Segments are counted newest first by their latest call: those after the one that
    /// holds the `keep`-th call are deleted, and that one keeps only its newest calls. Calls
    /// are compared by arrival time rather than id, because calls moved from an earlier
    /// version's table have newer ids than older calls. Segments written by different nodes
    /// at once overlap by up to a batch's span, and so may the calls kept and deleted.
    pub async fn cap_call_logs(&self, keep: u64) -> Result<u64> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let mut seen = 0i64;
        let mut after = None;
        let (boundary, keep_in_it) = 'find: loop {
            let mut w = Where::new();
            if let Some(after) = after {
                w.after_segment(after);
            }
            let l = w.bind(META_PAGE);
            let sql = format!(
                "SELECT id, last_at, calls FROM call_log_segments{} {SEGMENT_ORDER} LIMIT {l}",
                w.sql
            );
            let segments: Vec<(i64, i64, i64)> =
                self.inner.pool.exec().fetch_all(&sql, &w.args).await?;
            let Some(&(oldest, oldest_at, _)) = segments.last() else {
                return Ok(0);
            };
            for (id, last_at, calls) in segments {
                if seen.saturating_add(calls) >= keep {
                    break 'find ((last_at, id), keep - seen);
                }
                seen += calls;
            }
            after = Some((oldest_at, oldest));
        };
        let (last_at, id) = boundary;
        let mut total = self
            .delete_segments("(last_at, id) < ($1, $2)", &[last_at.into(), id.into()])
            .await?;
        let keep_in_it = usize::try_from(keep_in_it).unwrap_or(usize::MAX);
        total += self
            .trim_segment(id, |calls| {
                calls.sort_unstable_by(newest_first);
                calls.truncate(keep_in_it);
            })
            .await?;
        Ok(total)
    }

    /// Deletes the segments matching `condition` (on `args`), with their request keys, a
    /// few per transaction; returns how many calls went.
    async fn delete_segments(&self, condition: &str, args: &[Arg<'_>]) -> Result<u64> {
        let pick = format!(
            "SELECT id FROM call_log_segments WHERE {condition} ORDER BY id LIMIT {DELETE_STEP}"
        );
        let pool = &self.inner.pool;
        let mut total = 0u64;
        loop {
            let mut tx = pool.begin(pool.dialect().begin_write).await?;
            let ids: Vec<(i64,)> = tx.exec().fetch_all(&pick, args).await?;
            if ids.is_empty() {
                tx.commit().await?;
                return Ok(total);
            }
            let list = id_list(ids.iter().map(|(id,)| *id));
            // The segments, then their keys: the order `trim_segment` locks them in, so two
            // nodes pruning at once wait for each other rather than deadlock. What this
            // transaction deleted is what counts: another node may have deleted the others.
            let gone: Vec<(i64, i64)> = tx
                .exec()
                .fetch_all(
                    &format!(
                        "DELETE FROM call_log_segments WHERE id IN ({list}) AND ({condition}) \
                         RETURNING id, calls"
                    ),
                    args,
                )
                .await?;
            if !gone.is_empty() {
                let list = id_list(gone.iter().map(|(id, _)| *id));
                tx.exec()
                    .execute(
                        &format!("DELETE FROM call_log_ids WHERE segment IN ({list})"),
                        &[],
                    )
                    .await?;
            }
            tx.commit().await?;
            total += gone
                .iter()
                .map(|(_, n)| u64::try_from(*n).unwrap_or(0))
                .sum::<u64>();
        }
    }

    /// Rewrites segment `segment` with the calls `keep` leaves in it (deleting it if none);
    /// returns how many calls went. Request keys of calls that went stay until the segment
    /// goes: a lookup reads the segment and finds nothing.
    async fn trim_segment(
        &self,
        segment: i64,
        keep: impl FnOnce(&mut Vec<CallLogRecord>),
    ) -> Result<u64> {
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        let sql = format!(
            "SELECT encoding, body FROM call_log_segments WHERE id = $1{}",
            pool.dialect().lock_row
        );
        let row: Option<(i64, Vec<u8>)> = tx.exec().fetch_optional(&sql, &[segment.into()]).await?;
        let Some((encoding, body)) = row else {
            return Ok(0);
        };
        let mut calls = decode(segment, encoding, &body)?;
        let before = calls.len();
        keep(&mut calls);
        let gone = u64::try_from(before.saturating_sub(calls.len())).unwrap_or(0);
        if gone == 0 {
            return Ok(0);
        }
        if calls.is_empty() {
            tx.exec()
                .execute(
                    "DELETE FROM call_log_segments WHERE id = $1",
                    &[segment.into()],
                )
                .await?;
            tx.exec()
                .execute(
                    "DELETE FROM call_log_ids WHERE segment = $1",
                    &[segment.into()],
                )
                .await?;
        } else {
            calls.sort_unstable_by_key(|c| c.id);
            let rows = calls
                .iter()
                .map(|c| {
                    // decode() gave every call an id in this segment's span.
                    let place = u16::try_from(c.id - segment * SEGMENT_SPAN).map_err(|_| {
                        StoreError::Other(
                            format!("call {} is not in call-log segment {segment}", c.id).into(),
                        )
                    })?;
                    Ok((place, CallLogRow::from(c)))
                })
                .collect::<Result<Vec<_>>>()?;
            let e = encode(rows.iter().map(|(place, row)| (*place, row)))?;
            tx.exec()
                .execute(
                    "UPDATE call_log_segments SET first_at = $1, last_at = $2, calls = $3, \
                     status_classes = $4, services = $5, routes = $6, applications = $7, \
                     encoding = $8, body = $9 WHERE id = $10",
                    &e.args(Some(segment)),
                )
                .await?;
        }
        tx.commit().await?;
        Ok(gone)
    }

    /// How many calls are stored.
    pub async fn count_call_logs(&self) -> Result<i64> {
        let (n,): (i64,) = self
            .inner
            .pool
            .exec()
            .fetch_one(
                "SELECT CAST(COALESCE(SUM(calls), 0) AS BIGINT) FROM call_log_segments",
                &[],
            )
            .await?;
        Ok(n)
    }

    /// Empties the table where earlier versions wrote a row per call: deletes those that
    /// arrived before `before` (epoch ms, the retention limit), then moves the rest into
    /// segments, newest first, a step per transaction.
    ///
    /// Each step deletes the rows it moves in the same transaction, so nodes doing this at
    /// once never move a call twice, and stopping midway (a failure, a timeout) loses nothing:
    /// the next call goes on. Moved calls get new ids.
    pub async fn move_legacy_call_logs(&self, before: i64) -> Result<LegacyCallLogs> {
        const COLUMNS: &str = "id, at, request_id, trace_id, client_ip, protocol, method, host, \
            path, route, service, application, application_name, team, status, bytes_in, \
            bytes_out, duration_us, upstream_us, upstream, upstream_target, attempts, cache, \
            error, user_agent, completed";
        let pool = &self.inner.pool;
        let mut done = LegacyCallLogs::default();
        loop {
            let expired = pool
                .exec()
                .execute(
                    "DELETE FROM call_logs WHERE id IN \
                     (SELECT id FROM call_logs WHERE at < $1 ORDER BY at LIMIT $2)",
                    &[before.into(), LEGACY_STEP.into()],
                )
                .await?;
            if expired == 0 {
                break;
            }
            done.expired += expired;
        }
        // Newest first: the calls most likely to be looked for are searchable first.
        let take = format!(
            "DELETE FROM call_logs WHERE id IN \
             (SELECT id FROM call_logs ORDER BY id DESC LIMIT $1) RETURNING {COLUMNS}"
        );
        loop {
            let mut tx = pool.begin(pool.dialect().begin_write).await?;
            let mut calls: Vec<CallLogRecord> =
                tx.exec().fetch_all(&take, &[LEGACY_STEP.into()]).await?;
            if calls.is_empty() {
                tx.commit().await?;
                return Ok(done);
            }
            calls.sort_unstable_by_key(|c| c.id);
            let rows: Vec<CallLogRow<'_>> = calls.iter().map(CallLogRow::from).collect();
            for segment in segments_of(&rows)? {
                insert_segment(&mut tx, &segment).await?;
            }
            tx.commit().await?;
            done.moved += u64::try_from(calls.len()).unwrap_or(0);
        }
    }
}

/// What [`Store::move_legacy_call_logs`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegacyCallLogs {
    /// Calls deleted as older than the retention.
    pub expired: u64,
    /// Calls moved into segments.
    pub moved: u64,
}

/// `ids` as a list for `IN (...)`: integers, so written into the SQL rather than bound.
fn id_list(ids: impl Iterator<Item = i64>) -> String {
    ids.map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
}

/// Writes one segment and its request keys in `tx`.
/// `rows` encoded as segments: grouped by [`SEGMENT_WINDOW_MS`] window of arrival (in the
/// order given within each), at most [`MAX_SEGMENT_CALLS`] each.
fn segments_of(rows: &[CallLogRow<'_>]) -> Result<Vec<Encoded>> {
    let window = |r: &&CallLogRow<'_>| r.at.div_euclid(SEGMENT_WINDOW_MS);
    let mut ordered: Vec<&CallLogRow<'_>> = rows.iter().collect();
    // Stable, and nearly free on a batch already in one window.
    ordered.sort_by_key(window);
    ordered
        .chunk_by(|a, b| window(a) == window(b))
        .flat_map(|same| same.chunks(MAX_SEGMENT_CALLS))
        .map(|chunk| encode((0u16..).zip(chunk.iter().copied())))
        .collect()
}

async fn insert_segment(tx: &mut Tx, e: &Encoded) -> Result<()> {
    let (id,): (i64,) = tx
        .exec()
        .fetch_one(
            "INSERT INTO call_log_segments (first_at, last_at, calls, status_classes, services, \
             routes, applications, encoding, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             RETURNING id",
            &e.args(None),
        )
        .await?;
    let dialect = tx.dialect();
    tx.exec()
        .execute(
            dialect.insert_call_keys,
            &[e.keys.as_str().into(), id.into()],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v7(ms: u64, tail: u8) -> String {
        uuid::Builder::from_unix_timestamp_millis(ms, &[tail; 10])
            .into_uuid()
            .to_string()
    }

    #[test]
    fn keys_of_time_ordered_ids_follow_their_time() {
        let ms = 1_800_000_000_000u64;
        let (a, b, later) = (v7(ms, 1), v7(ms, 2), v7(ms + 1, 0));
        let (ka, kb, kl) = (request_key(&a), request_key(&b), request_key(&later));
        // Same millisecond: the same time bits, told apart by the hash bits.
        assert_eq!(ka >> KEY_HASH_BITS, i64::try_from(ms).unwrap_or(0));
        assert_eq!(kb >> KEY_HASH_BITS, ka >> KEY_HASH_BITS);
        assert_ne!(ka, kb);
        assert!(kl > ka && kl > kb);
        assert_eq!(request_key(&a), ka);
        // Any other id (a v4 UUID, free text) is a hash with the top bit set.
        for other in ["4b0c7e6e-43a0-4c35-9d3b-2f1e5a9b7c11", "req-1", ""] {
            assert!(request_key(other) < 0, "{other}");
            assert_eq!(request_key(other), request_key(other));
        }
        assert_ne!(request_key("req-1"), request_key("req-2"));
    }
}
