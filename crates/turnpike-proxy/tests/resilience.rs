//! Resilience and traffic policies end to end: circuit breaker, bulkhead, fallback, fault
//! injection, traffic split and mirroring, through the real gateway against mock upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Mutex, Notify};

/// An upstream whose status can be changed while it runs.
async fn switchable(status: u16) -> (Mock, Arc<AtomicU16>) {
    let s = Arc::new(AtomicU16::new(status));
    let s2 = s.clone();
    let mock = Mock::start(move |_req| {
        let s = s2.clone();
        async move {
            let mut r = Response::new(full("switchable"));
            *r.status_mut() = StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap();
            r
        }
    })
    .await;
    (mock, s)
}

/// An upstream that holds every request until `release` is notified.
async fn gated(release: Arc<Notify>) -> Mock {
    Mock::start(move |_req| {
        let release = release.clone();
        async move {
            release.notified().await;
            Response::new(full("released"))
        }
    })
    .await
}

fn upstream(name: &str, addrs: &[SocketAddr]) -> String {
    let targets: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{address: \"{a}\"}}"))
        .collect();
    format!(
        "  - name: {name}\n    targets: [{}]\n    retries: {{attempts: 0}}\n",
        targets.join(", ")
    )
}

async fn get_path(gw: &Gw, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut r = req("GET", &gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn route_breaker_opens_on_failures_and_a_good_probe_closes_it() {
    let (up, status) = switchable(500).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: up}}
policies:
  - name: cb
    type: circuit_breaker
    scope: route
    target: api
    config: {{consecutive_failures: 3, open_for: 300ms}}
"#,
        upstream("up", &[up.addr])
    ))
    .await;

    for _ in 0..3 {
        assert_eq!(get_path(&gw, "/x", &[]).await.status, 500);
    }
    // Open: the upstream is not called, the client is told when to come back.
    let r = get_path(&gw, "/x", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"]["code"], "circuit_open");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(up.hits(), 3);

    // A failing probe after the cool-down opens it again.
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_path(&gw, "/x", &[]).await.status == 500
        })
        .await
    );
    assert_eq!(up.hits(), 4);
    assert_eq!(
        get_path(&gw, "/x", &[]).await.json()["error"]["code"],
        "circuit_open"
    );

    // The upstream recovers: the next probe closes the breaker and traffic flows again.
    status.store(200, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_path(&gw, "/x", &[]).await.status == 200
        })
        .await
    );
    for _ in 0..5 {
        assert_eq!(get_path(&gw, "/x", &[]).await.status, 200);
    }
}

#[tokio::test]
async fn error_ratio_breaker_opens_at_the_ratio() {
    let (up, status) = switchable(200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: up}}
policies:
  - name: cb
    type: circuit_breaker
    scope: global
    config: {{error_ratio: 0.5, min_requests: 10, window: 60s, open_for: 60s}}
"#,
        upstream("up", &[up.addr])
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get_path(&gw, "/", &[]).await.status, 200);
    }
    status.store(503, Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(get_path(&gw, "/", &[]).await.status, 503);
    }
    // 4 failures in 9: still closed; the 10th request (a failure) makes it 5 in 10.
    assert_eq!(get_path(&gw, "/", &[]).await.status, 503);
    let r = get_path(&gw, "/", &[]).await;
    assert_eq!(r.json()["error"]["code"], "circuit_open");
    assert_eq!(up.hits(), 10);
}

#[tokio::test]
async fn target_breaker_takes_a_failing_target_out_of_rotation() {
    let bad = Mock::fixed("bad", 502).await;
    let good = Mock::fixed("good", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: up}}
policies:
  - name: cb
    type: circuit_breaker
    scope: global
    config: {{per: target, consecutive_failures: 2, open_for: 60s}}
"#,
        upstream("up", &[bad.addr, good.addr])
    ))
    .await;
    let mut ok = 0;
    for _ in 0..30 {
        if get_path(&gw, "/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(
        bad.hits(),
        2,
        "the bad target is skipped once its breaker opens"
    );
    assert_eq!(ok, 28);

    // With every target open, the route answers circuit_open.
    let only_bad = Mock::fixed("bad", 500).await;
    gw.reload(&format!(
        r#"
upstreams:
{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: solo}}
policies:
  - name: cb
    type: circuit_breaker
    scope: global
    config: {{per: target, consecutive_failures: 1, open_for: 60s}}
"#,
        upstream("solo", &[only_bad.addr])
    ))
    .await
    .unwrap();
    assert_eq!(get_path(&gw, "/", &[]).await.status, 500);
    let r = get_path(&gw, "/", &[]).await;
    assert_eq!(r.json()["error"]["code"], "circuit_open");
    assert_eq!(only_bad.hits(), 1);
}

#[tokio::test]
async fn bulkhead_refuses_past_its_limit_and_a_fallback_answers_instead() {
    let release = Arc::new(Notify::new());
    let slow = gated(release.clone()).await;
    let gw = Arc::new(
        Gw::start(&format!(
            r#"
upstreams:
{}
routes:
  - {{name: plain, paths: [{{prefix: /plain}}], upstream: slow}}
  - {{name: soft, paths: [{{prefix: /soft}}], upstream: slow}}
policies:
  - name: bh
    type: bulkhead
    scope: global
    config: {{max_concurrent: 1, max_queue: 0}}
  - name: fb
    type: fallback
    scope: route
    target: soft
    config:
      on: [bulkhead_full]
      response: {{status: 200, body: '{{"items":[],"degraded":true}}', headers: {{cache-control: no-store}}}}
"#,
            upstream("slow", &[slow.addr])
        ))
        .await,
    );

    for path in ["/plain", "/soft"] {
        let before = slow.hits();
        let g = gw.clone();
        let first = tokio::spawn(async move { get_path(&g, path, &[]).await });
        assert!(eventually(Duration::from_secs(5), || async { slow.hits() > before }).await);
        let r = get_path(&gw, path, &[]).await;
        if path == "/plain" {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.json()["error"]["code"], "bulkhead_full");
        } else {
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["degraded"], true);
            assert_eq!(r.header("x-turnpike-fallback"), Some("bulkhead_full"));
            assert_eq!(r.header("cache-control"), Some("no-store"));
        }
        release.notify_one();
        assert_eq!(first.await.unwrap().status, 200);
    }
    // The slot is free again once the first response ended.
    let g = gw.clone();
    let third = tokio::spawn(async move { get_path(&g, "/plain", &[]).await });
    assert!(eventually(Duration::from_secs(5), || async { slow.hits() == 3 }).await);
    release.notify_one();
    assert_eq!(third.await.unwrap().status, 200);
}

#[tokio::test]
async fn bulkhead_queue_waits_for_a_slot() {
    let release = Arc::new(Notify::new());
    let slow = gated(release.clone()).await;
    let gw = Arc::new(
        Gw::start(&format!(
            r#"
upstreams:
{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: slow}}
policies:
  - {{name: bh, type: bulkhead, scope: global, config: {{max_concurrent: 1, max_queue: 1, queue_timeout: 10s}}}}
"#,
            upstream("slow", &[slow.addr])
        ))
        .await,
    );
    let g = gw.clone();
    let first = tokio::spawn(async move { get_path(&g, "/", &[]).await });
    assert!(eventually(Duration::from_secs(5), || async { slow.hits() == 1 }).await);
    // Two more: the queue holds one of them, the other is refused at once.
    let g = gw.clone();
    let mut a = tokio::spawn(async move { get_path(&g, "/", &[]).await });
    let g = gw.clone();
    let mut b = tokio::spawn(async move { get_path(&g, "/", &[]).await });
    let (refused, waiting) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            r = &mut a => (r.unwrap(), b),
            r = &mut b => (r.unwrap(), a),
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.json()["error"]["code"], "bulkhead_full");
    assert_eq!(slow.hits(), 1);
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    assert!(eventually(Duration::from_secs(5), || async { slow.hits() == 2 }).await);
    release.notify_one();
    assert_eq!(waiting.await.unwrap().status, 200);
}

#[tokio::test]
async fn fallback_upstream_serves_while_the_breaker_is_open() {
    let (main, _) = switchable(500).await;
    let backup = Mock::fixed("backup", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: main}}
policies:
  - {{name: cb, type: circuit_breaker, scope: global, config: {{consecutive_failures: 1, open_for: 60s}}}}
  - {{name: fb, type: fallback, scope: global, config: {{on: [circuit_open, upstream_unreachable], upstream: backup}}}}
"#,
        upstream("main", &[main.addr]),
        upstream("backup", &[backup.addr])
    ))
    .await;
    assert_eq!(get_path(&gw, "/", &[]).await.status, 500);
    let r = get_path(&gw, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "backup");
    assert_eq!(r.header("x-turnpike-fallback"), Some("circuit_open"));
    assert_eq!(main.hits(), 1);
    assert_eq!(backup.hits(), 1);
}

#[tokio::test]
async fn fault_injection_aborts_and_delays_only_marked_requests() {
    let up = Mock::fixed("up", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}
routes:
  - {{name: abort, paths: [{{prefix: /abort}}], upstream: up}}
  - {{name: delay, paths: [{{prefix: /delay}}], upstream: up}}
policies:
  - name: f1
    type: fault_injection
    scope: route
    target: abort
    config: {{abort: {{status: 418, percent: 100}}, only_with_header: x-chaos}}
  - name: f2
    type: fault_injection
    scope: route
    target: delay
    config: {{delay: {{duration: 150ms, percent: 100}}}}
"#,
        upstream("up", &[up.addr])
    ))
    .await;
    let r = get_path(&gw, "/abort", &[("x-chaos", "1")]).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.json()["error"]["code"], "fault_injected");
    assert_eq!(up.hits(), 0);
    assert_eq!(get_path(&gw, "/abort", &[]).await.status, 200);
    let t = Instant::now();
    assert_eq!(get_path(&gw, "/delay", &[]).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn canary_split_follows_the_weights() {
    let stable = Mock::fixed("stable", 200).await;
    let canary = Mock::fixed("canary", 200).await;
    let split = |stable_weight: u32, canary_weight: u32| {
        format!(
            r#"
upstreams:
{}{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: stable}}
policies:
  - name: split
    type: traffic_split
    scope: route
    target: api
    config:
      weighted: [{{upstream: stable, weight: {stable_weight}}}, {{upstream: canary, weight: {canary_weight}}}]
"#,
            upstream("stable", &[stable.addr]),
            upstream("canary", &[canary.addr])
        )
    };
    let gw = Gw::start(&split(90, 10)).await;
    let n = 2000;
    for _ in 0..n {
        assert_eq!(get_path(&gw, "/", &[]).await.status, 200);
    }
    let share = canary.hits() as f64 / n as f64;
    // Binomial(2000, 0.1): sd ≈ 0.0067, so ±0.04 is six standard deviations.
    assert!((0.06..=0.14).contains(&share), "canary share {share}");
    assert_eq!(stable.hits() + canary.hits(), n);

    // Blue/green: one change of weights moves all traffic.
    gw.reload(&split(0, 1)).await.unwrap();
    let before = stable.hits();
    for _ in 0..20 {
        assert_eq!(get_path(&gw, "/", &[]).await.text(), "canary");
    }
    assert_eq!(stable.hits(), before);
}

#[tokio::test]
async fn ab_rules_route_by_header_and_cookie() {
    let a = Mock::fixed("a", 200).await;
    let b = Mock::fixed("b", 200).await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: a}}
policies:
  - name: ab
    type: traffic_split
    scope: global
    config:
      rules:
        - {{headers: [{{name: x-beta, equals: "yes"}}], upstream: b}}
        - {{cookies: [{{name: variant, equals: b}}], upstream: b}}
"#,
        upstream("a", &[a.addr]),
        upstream("b", &[b.addr])
    ))
    .await;
    assert_eq!(get_path(&gw, "/", &[]).await.text(), "a");
    assert_eq!(get_path(&gw, "/", &[("x-beta", "yes")]).await.text(), "b");
    assert_eq!(get_path(&gw, "/", &[("x-beta", "no")]).await.text(), "a");
    assert_eq!(
        get_path(&gw, "/", &[("cookie", "session=1; variant=b")])
            .await
            .text(),
        "b"
    );
}

#[tokio::test]
async fn mirror_copies_requests_without_holding_the_client() {
    let primary = Mock::fixed("primary", 200).await;
    let seen: Arc<Mutex<Vec<(String, String, Bytes)>>> = Arc::default();
    let release = Arc::new(Notify::new());
    let (seen2, release2) = (seen.clone(), release.clone());
    // The shadow records what it got, then never answers until released.
    let shadow = Mock::start(move |req| {
        let (seen, release) = (seen2.clone(), release2.clone());
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().await.push((method, path, body));
            release.notified().await;
            Response::new(full("shadow"))
        }
    })
    .await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}{}
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: primary}}
policies:
  - {{name: m, type: mirror, scope: global, config: {{upstream: shadow, timeout: 30s}}}}
"#,
        upstream("primary", &[primary.addr]),
        upstream("shadow", &[shadow.addr])
    ))
    .await;

    let r = send(
        req("POST", &gw.url("/orders"))
            .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
            .unwrap(),
    )
    .await;
    // The client has its answer while the shadow still holds its copy.
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "primary");
    let r = get_path(&gw, "/items", &[]).await;
    assert_eq!(r.text(), "primary");
    assert!(
        eventually(Duration::from_secs(5), || async {
            seen.lock().await.len() == 2
        })
        .await
    );
    let mut got = seen.lock().await.clone();
    got.sort();
    assert_eq!(got[0], ("GET".into(), "/items".into(), Bytes::new()));
    assert_eq!(
        got[1],
        (
            "POST".into(),
            "/orders".into(),
            Bytes::from_static(b"{\"id\":1}")
        )
    );
    release.notify_waiters();
}

#[tokio::test]
async fn bad_upstream_references_are_config_errors() {
    let bad = r#"
upstreams:
  - {name: up, targets: [{address: "127.0.0.1:1"}]}
routes:
  - {name: api, paths: [{prefix: /}], upstream: up}
policies:
  - {name: s, type: traffic_split, scope: global, config: {weighted: [{upstream: up, weight: 1}, {upstream: nope, weight: 1}]}}
  - {name: m, type: mirror, scope: global, config: {upstream: ghost}}
  - {name: f, type: fallback, scope: global, config: {}}
  - {name: c, type: circuit_breaker, scope: global, config: {error_ratio: 2}}
  - {name: x, type: fault_injection, scope: global, config: {abort: {percent: 101}}}
"#;
    let source = turnpike_model::Source {
        file: "t.yaml".into(),
        text: bad.into(),
    };
    let config = turnpike_model::parse(&source, turnpike_model::Format::Yaml).unwrap();
    let errs = turnpike_model::validate(&config).unwrap_err().to_string();
    for want in [
        "policies[0].config.weighted[1].upstream",
        "policies[1].config.upstream",
        "policies[2].config",
        "policies[3].config.error_ratio",
        "policies[4].config.abort.percent",
    ] {
        assert!(errs.contains(want), "{want} missing from {errs}");
    }
}

#[tokio::test]
async fn mirrored_bodies_reach_an_http2_shadow_whole() {
    let primary = Mock::fixed("primary", 200).await;
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let seen2 = seen.clone();
    let shadow = Mock::start(move |req| {
        let seen = seen2.clone();
        async move {
            // An HTTP/2 request whose body the gateway never ended would fail here.
            if let Ok(body) = req.into_body().collect().await {
                seen.lock().await.push(body.to_bytes());
            }
            Response::new(full("shadow"))
        }
    })
    .await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
{}  - name: shadow
    targets: [{{address: "{}"}}]
    http2: true
routes:
  - {{name: api, paths: [{{prefix: /}}], upstream: primary}}
policies:
  - {{name: m, type: mirror, scope: global, config: {{upstream: shadow}}}}
"#,
        upstream("primary", &[primary.addr]),
        shadow.addr
    ))
    .await;
    for i in 0..3 {
        let r = send(
            req("POST", &gw.url("/orders"))
                .body(Full::new(Bytes::from(format!("order {i}"))))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            seen.lock().await.len() == 3
        })
        .await
    );
    let mut got = seen.lock().await.clone();
    got.sort();
    assert_eq!(
        got,
        vec![
            Bytes::from("order 0"),
            Bytes::from("order 1"),
            Bytes::from("order 2")
        ]
    );
}
