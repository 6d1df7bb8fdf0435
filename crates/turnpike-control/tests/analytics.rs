//! Analytics rollups and alerts on real stores (SQLite file and PostgreSQL): rollups against
//! the raw events that made them, downsampling against the direct aggregate, retention, the
//! Admin API's time series and top-N, calls through the real gateway, and an alert firing
//! and resolving at a webhook receiver with its cooldown. Clocks are manual, so no test
//! waits for a real minute.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use turnpike_control::alerts::Alerts;
use turnpike_control::analytics::{Downsampler, Rollups, totals};
use turnpike_model::observe::AnalyticsConfig;
use turnpike_model::observe::analytics::{AlertKind, AlertRule, AlertsConfig};
use turnpike_observe::{CallEvent, CallSink};
use turnpike_proxy::quota::ManualClock;
use turnpike_store::sketch::{LatencySketch, RELATIVE_ACCURACY};
use turnpike_store::{RollupFilter, Step, Store, fold_rows};

/// 2026-01-05T00:00:00Z, a Monday: days and hours start on round numbers.
const T0: i64 = 1_767_571_200_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn event(t: i64, service: &str, route: &str, app: Option<&str>, status: u16, us: u64) -> CallEvent {
    CallEvent {
        time_unix_ms: t,
        request_id: "r".into(),
        trace_id: None,
        span_id: None,
        client_ip: IpAddr::from([127, 0, 0, 1]),
        listener: None,
        protocol: "HTTP/1.1",
        method: "GET".into(),
        host: None,
        path: "/".into(),
        query: None,
        route: Some(Arc::from(route)),
        service: Some(Arc::from(service)),
        application: app.map(Arc::from),
        application_name: None,
        team: None,
        status,
        bytes_in: 10,
        bytes_out: 100,
        duration_us: us,
        upstream_us: None,
        upstream: None,
        upstream_target: None,
        attempts: 1,
        cache: None,
        error: None,
        user_agent: None,
        completed: true,
        request_headers: None,
        response_headers: None,
        request_body: None,
        response_body: None,
        trace: None,
        redact: None,
    }
}

fn offer(sink: &Rollups, e: CallEvent) {
    sink.offer(&Arc::new(e));
}

/// A deterministic spread of latencies (µs) from 200 µs to about 2 s.
fn latency(i: u64) -> u64 {
    200 + (i * i * 7919 + i * 104_729) % 2_000_000
}

fn exact(sorted: &[u64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize] as f64
}

fn assert_within(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * RELATIVE_ACCURACY + 1e-6,
        "{what}: {got} not within 1 % of {want}"
    );
}

fn sqlite(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("a.db").display())
}

fn pg_base() -> String {
    std::env::var("TURNPIKE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own in the test database, dropped at the end.
struct Schema(String);

impl Schema {
    fn create() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("tp_analytics_{}_{nanos}", std::process::id());
        let out = Command::new("psql")
            .arg(pg_base())
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                &format!("CREATE SCHEMA {name}"),
            ])
            .output()
            .expect("psql must be installed (scripts/services.sh installs PostgreSQL)");
        assert!(
            out.status.success(),
            "PostgreSQL at {} is required for this test: {}",
            pg_base(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name)
    }

    fn url(&self) -> String {
        format!("{}?options=-c%20search_path%3D{}", pg_base(), self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(pg_base())
            .args(["-qc", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0)])
            .output();
    }
}

/// Rollups against raw events: counts exact, percentiles within the sketch's bound, a late
/// event merged into a minute already written, the key cap.
async fn rollups_match_raw_events(url: &str) {
    let store = Store::open(url).await.unwrap();
    let sink = Rollups::new(10_000, "node-a");
    let mut lat_a = Vec::new();
    for i in 0..600u64 {
        let minute = T0 + i64::try_from(i % 3).unwrap() * MIN;
        let status = if i % 10 == 0 {
            503
        } else if i % 7 == 0 {
            404
        } else {
            200
        };
        let us = latency(i);
        offer(
            &sink,
            event(minute + 5, "svc-a", "t/a/r", Some("app1"), status, us),
        );
        lat_a.push((minute, status, us));
    }
    for i in 0..50u64 {
        offer(
            &sink,
            event(T0 + 30_000, "svc-b", "t/b/r", None, 200, 1000 + i),
        );
    }
    let clock = ManualClock::new(T0 + 2 * MIN + 1);
    sink.set_clock(Arc::new(clock.clone()));
    // Minutes 0 and 1 are closed; minute 2 stays in memory.
    assert!(sink.flush(&store).await.unwrap() > 0);
    // The metrics see what reached the store and what still waits in memory.
    let stats = &turnpike_observe::StatsSource::sink_stats(&*sink)[0];
    assert_eq!(
        (stats.sent, stats.queued, stats.dropped),
        (400 + 50, 200, 0)
    );
    let rows = store
        .rollups_at(Step::Minute, T0, T0 + 3 * MIN, &RollupFilter::default())
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.bucket < T0 + 2 * MIN));
    // A late event for minute 0 and the rest.
    offer(
        &sink,
        event(T0 + 1, "svc-a", "t/a/r", Some("app1"), 200, 777),
    );
    lat_a.push((T0, 200, 777));
    sink.flush_all(&store).await.unwrap();

    let filter = RollupFilter {
        service: Some("svc-a".into()),
        ..Default::default()
    };
    let rows = store
        .rollups_at(Step::Minute, T0, T0 + 3 * MIN, &filter)
        .await
        .unwrap();
    for m in 0..3 {
        let bucket = T0 + m * MIN;
        let raw: Vec<&(i64, u16, u64)> = lat_a.iter().filter(|e| e.0 == bucket).collect();
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.bucket == bucket)
            .cloned()
            .collect();
        let (n, e4, e5, sketch) = totals(&mine);
        assert_eq!(n as usize, raw.len(), "minute {m}");
        assert_eq!(e4 as usize, raw.iter().filter(|e| e.1 == 404).count());
        assert_eq!(e5 as usize, raw.iter().filter(|e| e.1 == 503).count());
        assert_eq!(
            mine.iter().map(|r| r.bytes_out).sum::<i64>(),
            100 * raw.len() as i64
        );
        let mut sorted: Vec<u64> = raw.iter().map(|e| e.2).collect();
        sorted.sort_unstable();
        for q in [0.5, 0.95, 0.99] {
            assert_within(
                sketch.quantile(q).unwrap(),
                exact(&sorted, q),
                &format!("m{m} q{q}"),
            );
        }
    }
    // One row per status per minute for svc-a; svc-b counted apart, with no application.
    let b = store
        .rollups_at(
            Step::Minute,
            T0,
            T0 + 3 * MIN,
            &RollupFilter {
                service: Some("svc-b".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].requests, b[0].application.as_str()), (50, ""));

    // The key cap: past it, keys count under `_other`.
    let capped = Rollups::new(1, "node-c");
    for i in 0..40u16 {
        offer(
            &capped,
            event(T0 + 10 * MIN, &format!("s{i}"), "r", None, 200, 1000),
        );
    }
    assert!(capped.overflowed() > 0);
    capped.flush_all(&store).await.unwrap();
    let rows = store
        .rollups_at(
            Step::Minute,
            T0 + 10 * MIN,
            T0 + 11 * MIN,
            &RollupFilter::default(),
        )
        .await
        .unwrap();
    assert!(
        rows.len() <= 17,
        "at most one key per shard plus `_other`: {}",
        rows.len()
    );
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 40);
    let other = rows.iter().find(|r| r.service == "_other").unwrap();
    assert_eq!(other.requests as u64, capped.overflowed());
}

#[tokio::test]
async fn rollups_match_raw_events_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    rollups_match_raw_events(&sqlite(&dir)).await;
}

#[tokio::test]
async fn rollups_match_raw_events_on_postgres() {
    let schema = Schema::create();
    rollups_match_raw_events(&schema.url()).await;
}

/// A flush whose rows were committed but whose answer was lost is retried under the same
/// batch id and sets the rows again: nothing is counted twice, and calls that arrived in
/// between are added once.
#[tokio::test]
async fn a_lost_flush_acknowledgement_does_not_count_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&sqlite(&dir)).await.unwrap();
    let sink = Rollups::new(1000, "node-x");
    for i in 0..30u64 {
        offer(&sink, event(T0 + 10, "svc", "t/s/r", None, 200, 1000 + i));
    }
    sink.lose_next_ack();
    assert!(sink.flush_all(&store).await.is_err());
    offer(&sink, event(T0 + 20, "svc", "t/s/r", None, 500, 5000));
    offer(&sink, event(T0 + MIN, "svc", "t/s/r", None, 200, 2000));
    // By the clock no minute is closed yet, but the retry still covers everything the
    // failed flush took, or those rows would be written again under the next batch.
    sink.set_clock(Arc::new(ManualClock::new(T0 + 30_000)));
    assert_eq!(sink.flush(&store).await.unwrap(), 3, "rows of both minutes");
    // Nothing new: the next flush writes nothing, and a later call gets a new batch.
    assert_eq!(sink.flush_all(&store).await.unwrap(), 0);
    offer(&sink, event(T0 + 30, "svc", "t/s/r", None, 200, 1000));
    sink.flush_all(&store).await.unwrap();
    let rows = store
        .rollups_at(Step::Minute, T0, T0 + 2 * MIN, &RollupFilter::default())
        .await
        .unwrap();
    let first: Vec<_> = rows.iter().filter(|r| r.bucket == T0).collect();
    assert_eq!(
        first.iter().map(|r| r.requests).sum::<i64>(),
        32,
        "{rows:?}"
    );
    assert_eq!(first.iter().map(|r| r.errors_5xx).sum::<i64>(), 1);
    let second: i64 = rows
        .iter()
        .filter(|r| r.bucket == T0 + MIN)
        .map(|r| r.requests)
        .sum();
    assert_eq!(second, 1);
    let stats = &turnpike_observe::StatsSource::sink_stats(&*sink)[0];
    assert_eq!((stats.sent, stats.queued), (33, 0));
}

/// Two nodes' minutes over two and a half days, downsampled; hours and days equal the direct
/// aggregate of the minutes; running again changes nothing; retention prunes minutes while
/// hours keep answering.
async fn downsampling_and_retention(url: &str) {
    let store = Store::open(url).await.unwrap();
    let a = Rollups::new(10_000, "node-a");
    let b = Rollups::new(10_000, "node-b");
    let mut i = 0u64;
    let mut t = T0;
    while t < T0 + 2 * DAY + 12 * HOUR {
        let node = if i % 2 == 0 { &a } else { &b };
        let status = if i % 9 == 0 { 500 } else { 200 };
        offer(
            node,
            event(t, "svc", "t/s/r", Some("app"), status, latency(i)),
        );
        offer(
            node,
            event(t + 1, "svc2", "t/s/q", None, 201, latency(i + 7)),
        );
        i += 1;
        t += 7 * MIN;
    }
    a.flush_all(&store).await.unwrap();
    b.flush_all(&store).await.unwrap();
    let minutes = store
        .rollups("minute", T0, T0 + 3 * DAY, None, &RollupFilter::default())
        .await
        .unwrap();
    assert_eq!(
        minutes.iter().map(|r| r.requests).sum::<i64>() as u64,
        2 * i
    );

    let config = AnalyticsConfig::default();
    let down = Downsampler::new(store.clone(), config.clone());
    let clock = ManualClock::new(T0 + 2 * DAY + 12 * HOUR + 5 * MIN);
    down.set_clock(Arc::new(clock.clone()));
    down.run().await.unwrap();
    down.run().await.unwrap();

    let hours = store
        .rollups("hour", T0, T0 + 3 * DAY, None, &RollupFilter::default())
        .await
        .unwrap();
    let direct_hours: Vec<_> = fold_rows(
        minutes
            .iter()
            .filter(|r| r.bucket < T0 + 2 * DAY + 12 * HOUR)
            .cloned(),
        Step::Hour,
    );
    // The store returns rows by bucket; folding at the same step only sorts them.
    assert_eq!(fold_rows(hours, Step::Hour), direct_hours);
    let days = store
        .rollups("day", T0, T0 + 3 * DAY, None, &RollupFilter::default())
        .await
        .unwrap();
    let direct_days = fold_rows(
        minutes.iter().filter(|r| r.bucket < T0 + 2 * DAY).cloned(),
        Step::Day,
    );
    assert_eq!(fold_rows(days.clone(), Step::Day), direct_days);
    assert_eq!(days.iter().map(|r| r.bucket).max(), Some(T0 + DAY));

    // Reading by day covers the unfinished third day from hours and minutes.
    let by_day = store
        .rollups_at(Step::Day, T0, T0 + 3 * DAY, &RollupFilter::default())
        .await
        .unwrap();
    assert_eq!(by_day, fold_rows(minutes.clone(), Step::Day));
    let one = by_day
        .iter()
        .filter(|r| r.service == "svc" && r.status == 200 && r.bucket == T0)
        .map(|r| LatencySketch::from_text(&r.sketch))
        .next()
        .unwrap();
    assert!(one.count() > 0);

    // Eight days on: minutes are past the 7-day retention, hours are not.
    clock.set(T0 + 10 * DAY);
    down.run().await.unwrap();
    assert!(
        store
            .rollups("minute", T0, T0 + 3 * DAY, None, &RollupFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    let by_hour = store
        .rollups_at(Step::Hour, T0, T0 + 3 * DAY, &RollupFilter::default())
        .await
        .unwrap();
    assert_eq!(by_hour, fold_rows(minutes.clone(), Step::Hour));
    // A hundred days on, hours are gone too, days stay.
    clock.set(T0 + 100 * DAY);
    down.run().await.unwrap();
    assert!(
        store
            .rollups("hour", T0, T0 + 3 * DAY, None, &RollupFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    let by_day = store
        .rollups_at(Step::Day, T0, T0 + 3 * DAY, &RollupFilter::default())
        .await
        .unwrap();
    assert_eq!(by_day, fold_rows(minutes, Step::Day));
}

#[tokio::test]
async fn downsampling_equals_the_direct_aggregate_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    downsampling_and_retention(&sqlite(&dir)).await;
}

#[tokio::test]
async fn downsampling_equals_the_direct_aggregate_on_postgres() {
    let schema = Schema::create();
    downsampling_and_retention(&schema.url()).await;
}

async fn get(e: &common::Env, path: &str) -> (u16, Value) {
    let resp = e
        .http
        .get(format!("{}{path}", e.admin))
        .bearer_auth(&e.token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Real calls through the gateway, counted by the sink on its observer, flushed, read back
/// through the Admin API's time series and top-N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_through_the_gateway_reach_timeseries_and_top() {
    let e = common::env().await;
    e.pay_service(json!({}), &[]).await;
    e.settled().await;
    let sink = Rollups::new(1000, "node-1");
    e.gw.observer().add(sink.clone());
    let start = turnpike_store::now_ms();
    for _ in 0..12 {
        assert_eq!(e.call("/pay", None).await.status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(e.call("/nowhere", None).await.status(), 404);
    }
    // Events are emitted when the response body ends; the client has read every body.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        sink.flush_all(&e.store).await.unwrap();
        let rows = e
            .store
            .rollups_at(
                Step::Minute,
                Step::Minute.floor(start),
                start + 2 * MIN,
                &RollupFilter::default(),
            )
            .await
            .unwrap();
        if rows.iter().map(|r| r.requests).sum::<i64>() == 15 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rows: {rows:?}");
        tokio::task::yield_now().await;
    }
    let from = Step::Minute.floor(start);
    let to = turnpike_store::now_ms() + MIN;
    let (status, ts) = get(
        &e,
        &format!("/analytics/timeseries?metric=requests&from={from}&to={to}&group_by=route"),
    )
    .await;
    assert_eq!(status, 200, "{ts}");
    assert_eq!(ts["step"], "minute");
    let series = ts["series"].as_array().unwrap();
    let pay = series
        .iter()
        .find(|s| s["labels"]["route"] == "acme/pay/charge")
        .unwrap_or_else(|| panic!("{ts}"));
    let total: u64 = pay["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .sum();
    assert_eq!(total, 12);
    let unrouted = series
        .iter()
        .find(|s| s["labels"]["route"].is_null())
        .unwrap();
    assert_eq!(
        unrouted["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_u64().unwrap())
            .sum::<u64>(),
        3
    );
    let (_, rate) = get(
        &e,
        &format!("/analytics/timeseries?metric=p99&from={from}&to={to}&route=acme/pay/charge"),
    )
    .await;
    let p99: Vec<f64> = rate["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[1].as_f64())
        .collect();
    assert!(!p99.is_empty() && p99.iter().all(|v| *v > 0.0), "{rate}");
    assert_eq!(rate["series"][0]["labels"]["route"], "acme/pay/charge");

    let (status, top) = get(
        &e,
        &format!("/analytics/top?by=route&order=requests&from={from}&to={to}"),
    )
    .await;
    assert_eq!(status, 200, "{top}");
    assert_eq!(top["items"][0]["key"], "acme/pay/charge");
    assert_eq!(top["items"][0]["requests"], 12);
    assert_eq!(top["items"][1]["key"], Value::Null);
    assert_eq!(top["items"][1]["errors"], 3);
    let (_, top) = get(
        &e,
        &format!("/analytics/top?by=route&order=errors&from={from}&to={to}&limit=1"),
    )
    .await;
    assert_eq!(top["items"].as_array().unwrap().len(), 1);
    assert_eq!(top["items"][0]["errors"], 3);

    // Team scoping: the team sees its service's traffic; an unknown team is 404.
    let (status, scoped) = get(
        &e,
        &format!("/analytics/top?by=service&from={from}&to={to}&team=acme"),
    )
    .await;
    assert_eq!(status, 200, "{scoped}");
    assert_eq!(scoped["items"].as_array().unwrap().len(), 1);
    assert_eq!(scoped["items"][0]["requests"], 12);
    assert_eq!(get(&e, "/analytics/top?by=service&team=nope").await.0, 404);
    // Validation names the parameter.
    let (status, bad) = get(&e, "/analytics/timeseries?metric=latency").await;
    assert_eq!(
        (status, bad["error"]["field"].as_str()),
        (422, Some("metric"))
    );
    let (status, bad) = get(&e, "/analytics/timeseries?metric=requests&from=10&to=5").await;
    assert_eq!(
        (status, bad["error"]["field"].as_str()),
        (422, Some("from"))
    );
    let (status, bad) = get(&e, "/analytics/top?by=route&limit=0").await;
    assert_eq!(
        (status, bad["error"]["field"].as_str()),
        (422, Some("limit"))
    );
}

/// A webhook receiver on port 0 handing every body it gets to a channel.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let tx = tx.clone();
            async move {
                tx.send(serde_json::from_str::<Value>(&body).unwrap())
                    .unwrap();
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

/// An error-rate rule fires, is notified, resolves with a message; a second firing within
/// the cooldown is recorded but not sent; after the cooldown it is sent again. The history
/// is read through the Admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_and_resolves_at_a_webhook_with_cooldown() {
    let e = common::env().await;
    let (url, mut hook) = receiver().await;
    let rule = AlertRule {
        name: "pay-errors".into(),
        kind: AlertKind::ErrorRate,
        threshold: 0.2,
        window: Duration::from_secs(60),
        service: Some("svc".into()),
        route: None,
        application: None,
        upstream: None,
        min_requests: 5,
        include_4xx: false,
        cooldown: Duration::from_secs(600),
        webhooks: vec![url],
    };
    let alerts = Alerts::new(
        e.store.clone(),
        AlertsConfig {
            rules: vec![rule],
            ..Default::default()
        },
    )
    .unwrap();
    let clock = ManualClock::new(T0);
    alerts.set_clock(Arc::new(clock.clone()));
    let sink = Rollups::new(1000, "n");
    // Minute m gets 10 calls; `bad` of them are 500s.
    let minute = |m: i64, bad: usize| {
        for k in 0..10 {
            let status = if k < bad { 500 } else { 200 };
            offer(
                &sink,
                event(T0 + m * MIN + 1, "svc", "r", None, status, 1000),
            );
        }
    };
    minute(0, 5);
    minute(1, 0);
    minute(2, 6);
    minute(3, 0);
    minute(20, 4);
    sink.flush_all(&e.store).await.unwrap();

    // Minute 0 closed: 50 % errors.
    clock.set(T0 + MIN + 10);
    alerts.evaluate().await;
    let fired = hook.try_recv().expect("firing notification");
    assert_eq!(fired["rule"], "pay-errors");
    assert_eq!(fired["state"], "firing");
    assert_eq!(fired["value"], 0.5);
    assert_eq!(fired["threshold"], 0.2);
    assert_eq!(fired["kind"], "error_rate");
    assert!(
        fired["time"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-05T00:01:00")
    );
    // Still firing: nothing new.
    alerts.evaluate().await;
    assert!(hook.try_recv().is_err());
    // Minute 1 clean: resolved, with a message.
    clock.set(T0 + 2 * MIN + 10);
    alerts.evaluate().await;
    let resolved = hook.try_recv().expect("resolve notification");
    assert_eq!(
        (resolved["state"].as_str(), resolved["value"].as_f64()),
        (Some("resolved"), Some(0.0))
    );
    // Minute 2 fires again within the 10-minute cooldown: recorded, not sent.
    clock.set(T0 + 3 * MIN + 10);
    alerts.evaluate().await;
    assert!(hook.try_recv().is_err());
    // Resolves without a message (its firing was not sent).
    clock.set(T0 + 4 * MIN + 10);
    alerts.evaluate().await;
    assert!(hook.try_recv().is_err());
    // Past the cooldown, a firing is sent again.
    clock.set(T0 + 21 * MIN + 10);
    alerts.evaluate().await;
    let again = hook.try_recv().expect("firing after the cooldown");
    assert_eq!(
        (again["state"].as_str(), again["value"].as_f64()),
        (Some("firing"), Some(0.4))
    );

    let (status, history) = get(&e, "/alerts/history?rule=pay-errors&limit=3").await;
    assert_eq!(status, 200, "{history}");
    let items = history["items"].as_array().unwrap();
    let seen: Vec<(&str, bool)> = items
        .iter()
        .map(|i| {
            (
                i["state"].as_str().unwrap(),
                i["notified"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("firing", true), ("resolved", false), ("firing", false)]
    );
    let cursor = history["next_cursor"].as_str().unwrap();
    let (_, rest) = get(
        &e,
        &format!("/alerts/history?rule=pay-errors&cursor={cursor}"),
    )
    .await;
    let seen: Vec<(&str, bool)> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["state"].as_str().unwrap(),
                i["notified"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("resolved", true), ("firing", true)]);
    assert!(rest["next_cursor"].is_null());
}
