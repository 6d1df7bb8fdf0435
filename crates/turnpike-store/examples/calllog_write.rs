//! What writing call logs costs the store: CPU per call written, bytes on disk per call, and
//! how long searches take over what was written (three common ones, and the worst case
//! unbounded and a page at a time within the search budget).
//!
//! ```sh
//! cargo run --release -p turnpike-store --example calllog_write -- [CALLS] [BATCH] [URL]
//! ```
//!
//! Defaults: 200,000 calls in batches of 2,000 (the call-log writer's default batch) into a
//! new SQLite store in a temporary directory; give a `postgres://` URL to measure a server
//! instead (its disk use is not reported). Request ids are UUIDv7s, as the gateway makes
//! them; with `IDS=random` in the environment they are random, as clients may send them. CPU is the whole process's (user + system, from
//! `/proc/self/stat`), so it includes the database's own work on SQLite, which runs in this
//! process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use turnpike_store::{CallLogQuery, CallLogRecord, CallLogRow, Store};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, 100 on every architecture it runs on here.
    ticks as f64 / 100.0
}

/// A call shaped like the benchmark's: one route and upstream, distinct request ids.
fn call(i: u64, random_ids: bool) -> CallLogRecord {
    let at = 1_800_000_000_000 + i / 40;
    let mixed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let request_id = if random_ids {
        format!("{mixed:016x}{i:016x}")
    } else {
        let mut tail = [0u8; 10];
        tail[..8].copy_from_slice(&mixed.to_le_bytes());
        uuid::Builder::from_unix_timestamp_millis(at, &tail)
            .into_uuid()
            .to_string()
    };
    CallLogRecord {
        at: i64::try_from(at).unwrap(),
        request_id,
        client_ip: "127.0.0.1".into(),
        protocol: "HTTP/1.1".into(),
        method: "GET".into(),
        host: Some("127.0.0.1:29082".into()),
        path: format!("/items/{}", i % 500),
        route: Some("bench".into()),
        service: Some("0192f3a4-5b6c-7d8e-9f00-112233445566".into()),
        status: if i % 50 == 0 { 404 } else { 200 },
        bytes_out: 13,
        duration_us: 400 + i64::try_from(i % 300).unwrap(),
        upstream_us: Some(300 + i64::try_from(i % 200).unwrap()),
        upstream: Some("bench".into()),
        upstream_target: Some("127.0.0.1:29081".into()),
        attempts: 1,
        user_agent: Some("wrk".into()),
        completed: true,
        ..CallLogRecord::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let calls: u64 = args.next().map_or(200_000, |a| a.parse().expect("CALLS"));
    let batch: u64 = args.next().map_or(2_000, |a| a.parse().expect("BATCH"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("store.db");
    let url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", db.display()));
    let store = Store::open(&url).await.expect("open the store");
    let random_ids = std::env::var_os("IDS").is_some_and(|v| v == "random");

    let mut written = 0u64;
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    while written < calls {
        let n = batch.min(calls - written);
        let records: Vec<CallLogRecord> = (written..written + n)
            .map(|i| call(i, random_ids))
            .collect();
        let rows: Vec<CallLogRow<'_>> = records.iter().map(CallLogRow::from).collect();
        store.insert_call_logs(&rows).await.expect("insert");
        written += n;
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    let per_call = |s: f64| s * 1e6 / calls as f64;
    println!(
        "calls {calls}, batches of {batch}, {} request ids, {url}",
        if random_ids { "random" } else { "UUIDv7" }
    );
    println!(
        "write: {:.2} us CPU per call, {:.2} us wall per call (includes building the rows)",
        per_call(cpu),
        per_call(wall)
    );
    if url.starts_with("sqlite:") {
        let bytes: u64 = std::fs::read_dir(dir.path())
            .expect("list the store's files")
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!("disk: {:.1} bytes per call", bytes as f64 / calls as f64);
    }

    let target = call(calls / 2, random_ids).request_id;
    let time = async |query: CallLogQuery| {
        let t = Instant::now();
        let page = store.search_call_logs(&query).await.expect("search");
        (t.elapsed().as_secs_f64() * 1e3, page.items.len())
    };
    let (ms, n) = time(CallLogQuery {
        limit: Some(50),
        ..CallLogQuery::default()
    })
    .await;
    println!("search, newest 50: {ms:.2} ms ({n} calls)");
    let (ms, n) = time(CallLogQuery {
        request_id: Some(target),
        ..CallLogQuery::default()
    })
    .await;
    println!("search, one request id: {ms:.2} ms ({n} call)");
    let (ms, n) = time(CallLogQuery {
        status: Some(404),
        limit: Some(50),
        ..CallLogQuery::default()
    })
    .await;
    println!("search, status 404, 50: {ms:.2} ms ({n} calls)");
    // No call has status 405, but every segment's summary lets a 4xx search through: the
    // worst case for a search, unbounded and a page at a time within the default bound
    // (`observability.call_log.search.max_calls`, 100,000).
    let none = |max_calls| CallLogQuery {
        status: Some(405),
        limit: Some(50),
        max_calls,
        ..CallLogQuery::default()
    };
    let (ms, _) = time(none(None)).await;
    println!(
        "search, status 405 (no match, every segment read): {ms:.2} ms, {:.3} ms per segment",
        ms / calls.div_ceil(batch) as f64
    );
    let t = Instant::now();
    let mut query = none(Some(100_000));
    let mut pages = 0u32;
    let mut slowest = 0f64;
    loop {
        let page_start = Instant::now();
        let page = store.search_call_logs(&query).await.expect("search");
        slowest = slowest.max(page_start.elapsed().as_secs_f64() * 1e3);
        pages += 1;
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }
    println!(
        "search, status 405, 100,000 calls a page: {pages} pages, slowest {slowest:.2} ms, \
         all {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}
