//! End-to-end proxy behaviour through real sockets: the gateway in-process, upstreams on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use turnpike_proxy::demo::DemoServer;

async fn demo(name: &str) -> DemoServer {
    DemoServer::start("127.0.0.1:0".parse().unwrap(), name)
        .await
        .unwrap()
}

fn one_route(
    upstream_addr: std::net::SocketAddr,
    extra_upstream: &str,
    extra_route: &str,
) -> String {
    format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{upstream_addr}"}}]
{extra_upstream}
routes:
  - name: all
    paths: [{{prefix: /}}]
    upstream: up
{extra_route}
"#
    )
}

#[tokio::test]
async fn proxies_and_sets_forwarding_headers() {
    let up = demo("d1").await;
    let gw = Gw::start(&one_route(up.local_addr(), "", "")).await;
    let r = send(
        req("GET", &gw.url("/echo/a?x=1"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-request-id", "req-abc")
            .header("connection", "x-drop-me")
            .header("x-drop-me", "secret")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["path"], "/echo/a");
    assert_eq!(v["query"], "x=1");
    let h = &v["headers"];
    // The untrusted client's X-Forwarded-For is replaced, not extended.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], format!("{}", gw.addr));
    assert!(
        h["forwarded"]
            .as_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=http")
    );
    assert_eq!(h["via"], "1.1 turnpike");
    assert_eq!(h["x-request-id"], "req-abc");
    assert!(
        h.get("x-drop-me").is_none(),
        "header named in Connection must not be forwarded"
    );
    assert_eq!(
        h["host"],
        up.local_addr().to_string(),
        "default Host is the target"
    );
    assert_eq!(r.header("x-request-id"), Some("req-abc"));
    assert_eq!(r.header("via"), Some("1.1 turnpike"));
}

#[tokio::test]
async fn request_id_is_generated_when_absent() {
    let up = demo("d1").await;
    let gw = Gw::start(&one_route(up.local_addr(), "", "")).await;
    let r = get(&gw.url("/echo")).await;
    let rid = r.header("x-request-id").expect("request id").to_owned();
    assert_eq!(rid.len(), 36, "uuid: {rid}");
    assert_eq!(r.json()["headers"]["x-request-id"], rid.as_str());
}

#[tokio::test]
async fn not_found_is_json_with_request_id() {
    let up = demo("d1").await;
    let gw = Gw::start(&format!(
        r#"
upstreams: [{{name: up, targets: [{{address: "{}"}}]}}]
routes:
  - {{name: only, paths: [{{exact: /only}}], methods: [GET, POST], upstream: up}}
"#,
        up.local_addr()
    ))
    .await;
    let r = get(&gw.url("/nope")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let v = r.json();
    assert_eq!(v["error"]["code"], "route_not_found");
    assert_eq!(v["error"]["request_id"], r.header("x-request-id").unwrap());

    let r = send(
        req("DELETE", &gw.url("/only"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    let allow = r.header("allow").unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let dead = dead_addr().await;
    let gw = Gw::start(&one_route(dead, "    retries: {attempts: 0}", "")).await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let up = demo("slow").await;
    let gw = Gw::start(&one_route(
        up.local_addr(),
        "    timeouts: {read: 200ms}\n    retries: {attempts: 0}",
        "",
    ))
    .await;
    let r = get(&gw.url("/delay/3000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn total_timeout_bounds_the_exchange() {
    let up = demo("slow").await;
    let gw = Gw::start(&one_route(
        up.local_addr(),
        "    timeouts: {read: 10s, total: 200ms}\n    retries: {attempts: 0}",
        "",
    ))
    .await;
    let r = get(&gw.url("/delay/3000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_target() {
    let dead = dead_addr().await;
    let live = Mock::fixed("live", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{dead}"}}, {{address: "{}"}}]
    retries: {{attempts: 2, backoff: 1ms}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        live.addr
    ))
    .await;
    // Non-idempotent too: nothing was sent on a connect failure, so a retry is safe.
    for _ in 0..10 {
        let r = send(
            req("POST", &gw.url("/x"))
                .body(Full::new(Bytes::from_static(b"payload")))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "live");
    }
    assert_eq!(live.hits(), 10);
}

#[tokio::test]
async fn post_is_not_retried_after_it_was_sent() {
    // The first target reads the request and then drops the connection without answering.
    let breaker = Mock::start(|req| async move {
        let _ = req.into_body().collect().await;
        panic!("drop the connection without a response");
    })
    .await;
    let live = Mock::fixed("live", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}]
    retries: {{attempts: 3, backoff: 1ms}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        breaker.addr, live.addr
    ))
    .await;
    let mut failures = 0;
    for _ in 0..6 {
        let r = send(
            req("POST", &gw.url("/x"))
                .body(Full::new(Bytes::from_static(b"payload")))
                .unwrap(),
        )
        .await;
        if r.status == StatusCode::BAD_GATEWAY {
            failures += 1;
            assert_eq!(r.json()["error"]["code"], "upstream_error");
        }
    }
    // Round robin sends half the POSTs to the breaker; none of those may be re-sent.
    assert!(
        failures >= 1,
        "some POSTs must have hit the breaking target"
    );
    assert_eq!(
        breaker.hits() + live.hits(),
        6,
        "each POST reached exactly one target"
    );
}

#[tokio::test]
async fn idempotent_get_is_retried_on_503() {
    let bad = Mock::fixed("bad", 503).await;
    let good = Mock::fixed("good", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}]
    retries: {{attempts: 1, backoff: 1ms}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        bad.addr, good.addr
    ))
    .await;
    for _ in 0..6 {
        let r = get(&gw.url("/x")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(bad.hits() >= 1);
}

#[tokio::test]
async fn body_limit_enforced_while_streaming() {
    let up = demo("d").await;
    let gw = Gw::start(&format!(
        "server: {{limits: {{max_body_bytes: 1000}}}}\n{}",
        one_route(up.local_addr(), "    retries: {attempts: 0}", "")
    ))
    .await;
    // Declared too large: refused before the upstream is contacted.
    let r = send(
        req("POST", &gw.url("/echo"))
            .body(Full::new(Bytes::from(vec![b'a'; 2000])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "body_too_large");

    // Chunked, no length: caught while streaming.
    let chunks = futures_util::stream::iter(
        (0..10)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'b'; 300])))),
    );
    let body = StreamBody::new(chunks);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(http::Request::post(gw.url("/echo")).body(body).unwrap())
        .await
        .unwrap();
    let r = collect(resp).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());

    // Within the limit: fine.
    let r = send(
        req("POST", &gw.url("/echo"))
            .body(Full::new(Bytes::from(vec![b'c'; 900])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body_bytes"], 900);
}

#[tokio::test]
async fn long_uri_is_414() {
    let up = demo("d").await;
    let gw = Gw::start(&format!(
        "server: {{limits: {{max_uri_length: 100}}}}\n{}",
        one_route(up.local_addr(), "", "")
    ))
    .await;
    let long = format!("/echo?{}", "a".repeat(200));
    let r = get(&gw.url(&long)).await;
    assert_eq!(r.status, StatusCode::URI_TOO_LONG);
    assert_eq!(r.json()["error"]["code"], "uri_too_long");
}

#[tokio::test]
async fn sse_events_arrive_as_sent() {
    let up = demo("d").await;
    let gw = Gw::start(&one_route(up.local_addr(), "", "")).await;
    let client = client();
    let resp = client
        .request(
            http::Request::get(gw.url("/sse?n=3&interval_ms=300"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let start = tokio::time::Instant::now();
    // The first event must arrive long before the last one is sent (600 ms later): the
    // gateway forwards each event as it comes instead of buffering the stream.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first_at = start.elapsed();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("id: 0"));
    let mut rest = Vec::new();
    while let Some(f) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
    {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    let total = start.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("id: 2"));
    assert!(total >= Duration::from_millis(550), "stream took {total:?}");
    assert!(
        first_at + Duration::from_millis(400) < total,
        "first event at {first_at:?}, all at {total:?}"
    );
}

#[tokio::test]
async fn host_rewrite_and_preserve() {
    let up = demo("d").await;
    let gw = Gw::start(&format!(
        r#"
upstreams: [{{name: up, targets: [{{address: "{a}"}}]}}]
routes:
  - {{name: keep, paths: [{{prefix: /keep}}], upstream: up, upstream_host: preserve, rewrite: {{add_prefix: /echo}}}}
  - {{name: fixed, paths: [{{prefix: /fixed}}], upstream: up, upstream_host: {{rewrite: backend.internal}}, rewrite: {{add_prefix: /echo}}}}
"#,
        a = up.local_addr()
    ))
    .await;
    let r = send(
        req("GET", &gw.url("/keep"))
            .header("host", "api.example.com")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["headers"]["host"], "api.example.com");
    let r = get(&gw.url("/fixed")).await;
    assert_eq!(r.json()["headers"]["host"], "backend.internal");
}

#[tokio::test]
async fn invalid_reload_keeps_serving_and_valid_reload_applies() {
    let a = Mock::fixed("a", 200).await;
    let b = Mock::fixed("b", 200).await;
    let gw = Gw::start(&one_route(a.addr, "", "")).await;
    assert_eq!(get(&gw.url("/")).await.text(), "a");
    let v0 = gw.gateway.version();

    let err = gw
        .reload("upstreams: []\nroutes: [{name: r, paths: [{prefix: /}], upstream: missing}]\n")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown upstream `missing`"),
        "{err}"
    );
    assert_eq!(gw.gateway.version(), v0);
    assert_eq!(get(&gw.url("/")).await.text(), "a");

    let v1 = gw.reload(&one_route(b.addr, "", "")).await.unwrap();
    assert!(v1 > v0);
    assert_eq!(get(&gw.url("/")).await.text(), "b");
}

#[tokio::test]
async fn no_healthy_target_is_503() {
    let sick = Mock::fixed("sick", 500).await;
    let gw = Gw::start(&one_route(
        sick.addr,
        "    health_check: {active: {path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 1}}",
        "",
    ))
    .await;
    let ok = eventually(Duration::from_secs(10), || async {
        get(&gw.url("/x")).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(ok, "target never marked unhealthy");
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.json()["error"]["code"], "no_healthy_upstream");
}

/// An open response stream keeps counting as in flight on its target until it ends.
#[tokio::test]
async fn least_connections_sees_open_streams() {
    let a = demo("a").await;
    let b = demo("b").await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}]
    load_balancer: {{algorithm: least_connections}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        a.local_addr(),
        b.local_addr()
    ))
    .await;
    let client = client();
    let resp = client
        .request(
            http::Request::get(gw.url("/sse?n=100&interval_ms=100"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let busy = resp.headers()["x-served-by"].to_str().unwrap().to_owned();
    let mut body = resp.into_body();
    let _first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap();
    for _ in 0..6 {
        let r = get(&gw.url("/echo")).await;
        assert_ne!(
            r.header("x-served-by"),
            Some(busy.as_str()),
            "least-connections sent a request to the busy target"
        );
    }
    drop(body);
}

#[tokio::test]
async fn upstream_request_limit_holds_for_the_whole_stream() {
    let up = demo("a").await;
    let gw = Gw::start(&one_route(
        up.local_addr(),
        "    pool: {max_requests: 1}\n    retries: {attempts: 0}",
        "",
    ))
    .await;
    let client = client();
    let resp = client
        .request(
            http::Request::get(gw.url("/sse?n=100&interval_ms=100"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let _first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap();
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"]["code"], "upstream_overloaded");
    drop(body);
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&gw.url("/echo")).await.status == StatusCode::OK
        })
        .await
    );
}

/// A listener that never accepts, with its accept queue filled: Linux drops further SYNs, so
/// connecting hangs, which is what a black-holed upstream looks like.
async fn blackhole() -> (
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
    std::net::SocketAddr,
) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    (listener, fillers, addr)
}

#[tokio::test]
async fn connect_timeout_is_502() {
    let (_l, _fill, addr) = blackhole().await;
    let gw = Gw::start(&one_route(
        addr,
        "    timeouts: {connect: 200ms}\n    retries: {attempts: 0}",
        "",
    ))
    .await;
    let start = tokio::time::Instant::now();
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "connect timeout not applied: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn stalled_request_body_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = demo("d").await;
    let gw = Gw::start(&one_route(
        up.local_addr(),
        "    timeouts: {write: 200ms}\n    retries: {attempts: 0}",
        "",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("client_timeout"), "{reply}");
}

#[tokio::test]
async fn weighted_round_robin_through_the_gateway() {
    let a = Mock::fixed("a", 200).await;
    let b = Mock::fixed("b", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}", weight: 3}}, {{address: "{}", weight: 1}}]
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        a.addr, b.addr
    ))
    .await;
    for _ in 0..400 {
        get(&gw.url("/")).await;
    }
    // Smooth WRR is deterministic over a full cycle: exactly 3:1.
    assert_eq!((a.hits(), b.hits()), (300, 100));
}

#[tokio::test]
async fn consistent_hash_on_header_is_sticky() {
    let ups = [
        Mock::fixed("a", 200).await,
        Mock::fixed("b", 200).await,
        Mock::fixed("c", 200).await,
    ];
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}, {{address: "{}"}}]
    load_balancer: {{algorithm: consistent_hash, hash_on: {{header: x-user}}}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        ups[0].addr, ups[1].addr, ups[2].addr
    ))
    .await;
    let mut owners = std::collections::HashMap::new();
    for round in 0..3 {
        for user in 0..30 {
            let r = send(
                req("GET", &gw.url("/"))
                    .header("x-user", format!("user-{user}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            let who = r.text();
            let first = owners.entry(user).or_insert_with(|| who.clone());
            assert_eq!(*first, who, "user-{user} moved in round {round}");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "30 keys all on one target: {owners:?}");
}

#[tokio::test]
async fn passive_ejection_takes_a_failing_target_out() {
    let bad = Mock::fixed("bad", 500).await;
    let good = Mock::fixed("good", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}]
    retries: {{attempts: 0}}
    health_check: {{passive: {{consecutive_failures: 2, ejection_time: 60s}}}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        bad.addr, good.addr
    ))
    .await;
    // Round robin alternates until the bad target has failed twice; then it is ejected.
    for _ in 0..4 {
        get(&gw.url("/")).await;
    }
    assert_eq!(bad.hits(), 2);
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(bad.hits(), 2, "an ejected target received traffic");
}

#[tokio::test]
async fn p2c_ewma_prefers_the_faster_target() {
    let slow = Mock::start(|_req| async {
        // Far slower than any scheduling stall of the fast target on a loaded CI machine,
        // so a stall cannot make the fast target's estimate pass the slow one's.
        tokio::time::sleep(Duration::from_millis(250)).await;
        http::Response::new(full("slow"))
    })
    .await;
    let fast = Mock::fixed("fast", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}, {{address: "{}"}}]
    load_balancer: {{algorithm: p2c_ewma}}
routes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]
"#,
        slow.addr, fast.addr
    ))
    .await;
    for _ in 0..60 {
        get(&gw.url("/")).await;
    }
    // With two targets P2C compares both every time. The slow target is tried while it has
    // no estimate (an unmeasured target looks fastest); after that the 250 ms target loses
    // every comparison.
    assert!(slow.hits() <= 2, "slow target got {} of 60", slow.hits());
    assert_eq!(slow.hits() + fast.hits(), 60);
}
