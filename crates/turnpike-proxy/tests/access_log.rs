//! Structured access logs through the real gateway: each sink receives the records, fields
//! are selected, headers and bodies are captured and masked, and a sink that never answers
//! costs requests nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::sync::mpsc;
use turnpike_observe::access_log::{AccessLog, AccessLogs};

/// The access-log section of a full gateway config (so it goes through parsing and
/// validation like a real one), plus the gateway running it.
async fn start(up: std::net::SocketAddr, access_log: &str) -> (Gw, AccessLogs) {
    let text = yaml(up, &format!("observability:\n  access_log:\n{access_log}"));
    let cfg = config(&text);
    turnpike_model::validate(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gw::start(&text).await;
    let logs = AccessLogs::new(gw.gateway.observer());
    logs.apply(&cfg.observability.access_log).unwrap();
    (gw, logs)
}

fn running(logs: &AccessLogs) -> Arc<AccessLog> {
    logs.current().expect("an access log runs")
}

async fn post(gw: &Gw, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut r = req("POST", &gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

/// A receiver that answers 200 and hands each request (path, headers, body) to a channel.
async fn receiver() -> (
    Mock,
    mpsc::UnboundedReceiver<(String, http::HeaderMap, Bytes)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mock = Mock::start(move |req| {
        let tx = tx.clone();
        async move {
            let path = req.uri().path().to_owned();
            let headers = req.headers().clone();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let _ = tx.send((path, headers, body));
            http::Response::new(full(""))
        }
    })
    .await;
    (mock, rx)
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the receiver is running")
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn file_sink_writes_selected_fields_and_rotates() {
    let up = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let (gw, logs) = start(
        up.addr,
        &format!(
            "    fields: [time, request_id, method, path, route, status, bytes_out, duration_ms, upstream_target, user_agent]\n    sinks:\n      - {{type: file, path: \"{}\", max_bytes: 400, keep: 10}}\n",
            path.display()
        ),
    )
    .await;
    for i in 0..6 {
        let rid = format!("rid-{i}");
        let r = call(
            &gw,
            "GET",
            "/api/items",
            &[("x-request-id", &rid), ("user-agent", "probe/1")],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = call(&gw, "GET", "/nowhere", &[("x-request-id", "rid-404")]).await;
    assert_eq!(r.status, 404);
    let log = running(&logs);
    assert!(
        eventually(Duration::from_secs(10), || async {
            log.stats()[0].sent == 7
        })
        .await,
        "{:?}",
        log.stats()
    );
    logs.shutdown().await;

    // Oldest rotated file first, the live file last.
    let mut records = Vec::new();
    let mut files = 0;
    for n in (1..=10).rev() {
        let p = dir.path().join(format!("access.log.{n}"));
        if let Ok(text) = std::fs::read_to_string(&p) {
            assert!(
                text.len() <= 400,
                "{} has {} bytes",
                p.display(),
                text.len()
            );
            files += 1;
            records.extend(lines(&text));
        }
    }
    records.extend(lines(&std::fs::read_to_string(&path).unwrap()));
    assert!(
        files >= 2,
        "the file rotated by size ({files} rotated files)"
    );
    assert_eq!(records.len(), 7);
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "rid-0", "rid-1", "rid-2", "rid-3", "rid-4", "rid-5", "rid-404"
        ]
    );
    let first = records[0].as_object().unwrap();
    let mut keys: Vec<&str> = first.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bytes_out",
            "duration_ms",
            "method",
            "path",
            "request_id",
            "route",
            "status",
            "time",
            "upstream_target",
            "user_agent"
        ]
    );
    assert_eq!(first["route"], "api");
    assert_eq!(first["upstream_target"], up.addr.to_string());
    assert_eq!(first["user_agent"], "probe/1");
    let time = first["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == 24, "{time}");
    let last = &records[6];
    assert_eq!(last["status"], 404);
    assert!(last.get("route").is_none(), "absent values are left out");
}

#[tokio::test]
async fn capture_masks_headers_and_json_fields_and_caps_bodies() {
    let up = echo().await;
    let (rx_mock, mut rx) = receiver().await;
    let (gw, logs) = start(
        up.addr,
        &format!(
            r#"    fields: [request_id, status]
    capture:
      request_headers: true
      response_headers: true
      request_body: true
      response_body: true
      max_body_bytes: 64
      mask_fields: [password]
    sinks:
      - {{type: http, url: "http://{}/ingest", format: ndjson, batch: {{batch_size: 1, max_delay: 10ms}}}}
"#,
            rx_mock.addr
        ),
    )
    .await;
    let r = post(
        &gw,
        "/api/login",
        &[
            ("x-request-id", "cap-1"),
            ("authorization", "Bearer secret-token"),
            ("x-api-key", "k-123"),
            ("content-type", "application/json"),
        ],
        r#"{"user":"ann","password":"hunter2"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let (_, headers, body) = recv(&mut rx).await;
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let rec: Value = serde_json::from_slice(body.strip_suffix(b"\n").unwrap()).unwrap();
    assert_eq!(rec["request_id"], "cap-1");
    assert_eq!(rec["request_headers"]["authorization"], "***");
    assert_eq!(rec["request_headers"]["x-api-key"], "***");
    assert_eq!(rec["request_headers"]["content-type"], "application/json");
    assert_eq!(rec["response_headers"]["content-type"], "application/json");
    // The request body as JSON, its password masked.
    assert_eq!(
        rec["request_body"],
        serde_json::json!({"user": "ann", "password": "***"})
    );
    // The echo's answer is longer than 64 bytes: cut, marked, kept as text.
    let resp_body = rec["response_body"].as_str().unwrap();
    assert_eq!(resp_body.len(), 64);
    assert!(r.body.starts_with(resp_body.as_bytes()));
    assert_eq!(rec["response_body_truncated"], true);
    // Field selection still applies to the rest.
    assert!(rec.get("method").is_none());

    // Capture follows the access log: with it gone, events carry nothing extra.
    logs.shutdown().await;
    assert!(gw.gateway.observer().capture().is_none());
    drop(rx_mock);
}

#[tokio::test]
async fn http_sink_posts_json_array_batches_with_headers() {
    let up = echo().await;
    let (rx_mock, mut rx) = receiver().await;
    let (gw, logs) = start(
        up.addr,
        &format!(
            r#"    sinks:
      - name: collector
        type: http
        url: "http://{}/logs"
        headers: {{authorization: "Bearer sink-token"}}
        batch: {{batch_size: 3, max_delay: 5s}}
"#,
            rx_mock.addr
        ),
    )
    .await;
    for i in 0..3 {
        call(&gw, "GET", &format!("/api/{i}"), &[]).await;
    }
    // Three records fill one batch: sent at once, long before the 5 s delay.
    let (path, headers, body) = recv(&mut rx).await;
    assert_eq!(path, "/logs");
    assert_eq!(headers["authorization"], "Bearer sink-token");
    assert_eq!(headers["content-type"], "application/json");
    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let paths: Vec<&str> = batch.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/api/0", "/api/1", "/api/2"]);
    assert_eq!(batch[0]["method"], "GET");
    assert_eq!(batch[0]["status"], 200);
    assert_eq!(batch[0]["route"], "api");
    // A lone record waits for max_delay or shutdown; shutdown flushes it.
    call(&gw, "GET", "/api/last", &[]).await;
    logs.shutdown().await;
    let (_, _, body) = recv(&mut rx).await;
    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch[0]["path"], "/api/last");
}

#[tokio::test]
async fn syslog_udp_receives_rfc5424_messages() {
    let up = echo().await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (gw, _logs) = start(
        up.addr,
        &format!(
            "    fields: [request_id, status]\n    sinks:\n      - {{type: syslog, address: \"{}\", facility: 16, app_name: gw1}}\n",
            sock.local_addr().unwrap()
        ),
    )
    .await;
    call(&gw, "GET", "/nowhere", &[("x-request-id", "sys-1")]).await;
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("a datagram within 10 s")
        .unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    // local0 (16) * 8 + warning (4): a 404.
    assert!(msg.starts_with("<132>1 "), "{msg}");
    let parts: Vec<&str> = msg.splitn(8, ' ').collect();
    assert_eq!(parts[3], "gw1");
    assert_eq!(parts[4], std::process::id().to_string());
    assert_eq!(parts[5], "access");
    assert_eq!(parts[6], "-");
    let rec: Value = serde_json::from_str(parts[7]).unwrap();
    assert_eq!(
        rec,
        serde_json::json!({"request_id": "sys-1", "status": 404})
    );
}

#[tokio::test]
async fn otlp_sink_exports_log_records() {
    let up = echo().await;
    let (rx_mock, mut rx) = receiver().await;
    let (gw, _logs) = start(
        up.addr,
        &format!(
            "    sinks:\n      - {{type: otlp, endpoint: \"http://{}\", service_name: edge, batch: {{batch_size: 1}}}}\n",
            rx_mock.addr
        ),
    )
    .await;
    call(&gw, "GET", "/api/otlp", &[("x-request-id", "otlp-1")]).await;
    let (path, headers, body) = recv(&mut rx).await;
    assert_eq!(path, "/v1/logs");
    assert_eq!(headers["content-type"], "application/json");
    let req: Value = serde_json::from_slice(&body).unwrap();
    let rl = &req["resourceLogs"][0];
    assert_eq!(
        rl["resource"]["attributes"][0],
        serde_json::json!({"key": "service.name", "value": {"stringValue": "edge"}})
    );
    let rec = &rl["scopeLogs"][0]["logRecords"][0];
    assert_eq!(rec["severityText"], "INFO");
    assert_eq!(rec["severityNumber"], 9);
    assert_eq!(rec["body"]["stringValue"], "GET /api/otlp 200");
    let nanos: u128 = rec["timeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(nanos > 1_600_000_000_000_000_000);
    let attr = |k: &str| {
        rec["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
    };
    assert_eq!(attr("request_id").unwrap()["stringValue"], "otlp-1");
    assert_eq!(attr("status").unwrap()["intValue"], "200");
    assert!(attr("duration_ms").unwrap()["doubleValue"].is_f64());
}

#[tokio::test]
async fn redis_sink_adds_to_a_stream() {
    let up = echo().await;
    let url =
        std::env::var("TURNPIKE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stream = format!("turnpike:test:access:{}", uuid::Uuid::new_v4());
    let (gw, logs) = start(
        up.addr,
        &format!(
            "    sinks:\n      - {{type: redis, url: \"{url}\", stream: \"{stream}\", max_len: 1000, batch: {{batch_size: 1}}}}\n"
        ),
    )
    .await;
    call(&gw, "GET", "/api/r", &[("x-request-id", "redis-1")]).await;
    let log = running(&logs);
    assert!(
        eventually(Duration::from_secs(10), || async {
            log.stats()[0].sent == 1
        })
        .await,
        "{:?}",
        log.stats()
    );
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    // One entry, field `event`, the JSON record.
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1[0], "event");
    let rec: Value = serde_json::from_str(&entries[0].1[1]).unwrap();
    assert_eq!(rec["request_id"], "redis-1");
    assert_eq!(rec["path"], "/api/r");
}

#[tokio::test]
async fn nats_sink_publishes_to_the_subject() {
    let up = echo().await;
    let addr = std::env::var("TURNPIKE_TEST_NATS").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let nats = async_nats::connect(addr.as_str())
        .await
        .unwrap_or_else(|e| panic!("NATS must run on {addr} (scripts/services.sh): {e}"));
    let subject = format!("turnpike.test.{}", uuid::Uuid::new_v4().simple());
    let mut sub = nats.subscribe(subject.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let (gw, _logs) = start(
        up.addr,
        &format!(
            "    sinks:\n      - {{type: nats, url: \"{addr}\", subject: \"{subject}\", batch: {{batch_size: 1}}}}\n"
        ),
    )
    .await;
    call(&gw, "GET", "/api/n", &[("x-request-id", "nats-1")]).await;
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::StreamExt::next(&mut sub),
    )
    .await
    .expect("a message within 10 s")
    .unwrap();
    let rec: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(rec["request_id"], "nats-1");
    assert_eq!(rec["path"], "/api/n");
}

#[tokio::test]
async fn a_sink_that_never_answers_costs_requests_nothing_and_drops_are_counted() {
    let up = echo().await;
    let (silent_addr, mut hold_rx) = silent_server().await;

    let baseline_gw = Gw::start(&yaml(up.addr, "")).await;
    timed(&baseline_gw, 5).await; // warm up connections
    let baseline = timed(&baseline_gw, 30).await;

    let (gw, logs) = start(
        up.addr,
        &format!(
            "    sinks:\n      - {{type: http, url: \"http://{silent_addr}/\", queue_size: 4, batch: {{batch_size: 1, timeout: 60s, max_retries: 0}}}}\n"
        ),
    )
    .await;
    timed(&gw, 5).await;
    let with_sink = timed(&gw, 30).await;
    // The worker is stuck on its first POST; the connection reached the silent server.
    let _held = recv(&mut hold_rx).await;

    let stats = running(&logs).stats();
    assert_eq!(stats[0].sent, 0);
    assert_eq!(stats[0].queued, 4, "{stats:?}");
    // 35 requests: (at most) one in flight at the sink, four queued, the rest dropped.
    assert!((30..=31).contains(&stats[0].dropped), "{stats:?}");
    // Generous bound: the stuck sink must not make requests wait on it.
    assert!(
        with_sink < baseline * 3 + Duration::from_millis(500),
        "with a stuck sink {with_sink:?}, without {baseline:?}"
    );
    // Shutdown gives up on the stuck sink at its flush deadline instead of hanging.
    let log = running(&logs);
    tokio::time::timeout(
        Duration::from_secs(10),
        log.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown is bounded");
}

/// A route's `data_masking` masks the client's answer and, with `logs` (the default), the
/// bodies the access log captures — the request body included, which goes upstream as is.
#[tokio::test]
async fn data_masking_reaches_captured_bodies() {
    let up = echo().await;
    let (rx_mock, mut rx) = receiver().await;
    let (gw, _logs) = start(
        up.addr,
        &format!(
            r#"    fields: [request_id]
    capture: {{request_body: true, response_body: true, max_body_bytes: 4096}}
    sinks:
      - {{type: http, url: "http://{}/ingest", format: ndjson, batch: {{batch_size: 1, max_delay: 10ms}}}}
policies:
  - name: m
    type: data_masking
    scope: route
    target: api
    config:
      detectors: [email, card]
      fields: [{{name: password, action: remove}}]
"#,
            rx_mock.addr
        ),
    )
    .await;
    let r = post(
        &gw,
        "/api/pay",
        &[
            ("x-request-id", "mask-1"),
            ("x-contact", "ada@example.com"),
            ("content-type", "application/json"),
        ],
        r#"{"card":"4111 1111 1111 1111","password":"hunter2","note":"ok"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let answer = r.json();
    assert_eq!(answer["headers"]["x-contact"], "a***@example.com");
    let (_, _, body) = recv(&mut rx).await;
    let rec: Value = serde_json::from_slice(body.strip_suffix(b"\n").unwrap()).unwrap();
    assert_eq!(rec["request_id"], "mask-1");
    assert_eq!(
        rec["request_body"],
        serde_json::json!({"card": "**** **** **** 1111", "note": "ok"})
    );
    assert_eq!(
        rec["response_body"]["headers"]["x-contact"],
        "a***@example.com"
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("ada@example.com")
            && !text.contains("hunter2")
            && !text.contains("4111 1111 1111 1111"),
        "{text}"
    );
}
