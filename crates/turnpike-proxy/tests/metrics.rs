//! Prometheus metrics and the status endpoints, scraped through the real status listener
//! after real requests through the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use common::*;
use http::{Response, StatusCode};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnpike_observe::metrics::sample;
use turnpike_proxy::status::ReadinessCheck;

/// `observability.metrics` with a status listener on a free port, then `extra` keys.
fn metrics(extra: &str) -> String {
    format!("observability:\n  metrics:\n    listen: \"127.0.0.1:0\"\n{extra}")
}

async fn scrape(gw: &Gw) -> String {
    let addr = gw.gateway.status_addr().expect("a status listener");
    let r = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some(turnpike_observe::metrics::CONTENT_TYPE)
    );
    r.text()
}

/// Scrapes until `name{labels}` reads `want` (events are emitted as response bodies end,
/// which can be a moment after the client has read them).
async fn wait_for(gw: &Gw, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(gw).await;
        if sample(&text, name, labels) == Some(want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a chunked request body (no `Content-Length`) over a raw connection and reads the
/// whole answer.
async fn post_chunked(gw: &Gw, path: &str, chunks: &[&str]) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for c in chunks {
        req.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn answer(status: u16, body: &'static str) -> Response<turnpike_proxy::body::ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// Scrapes until the route's request-body byte counter reads `want`.
async fn wait_for_request_bytes(gw: &Gw, route: &str, want: f64) {
    wait_for(
        gw,
        "turnpike_http_request_bytes_total",
        &[("route", route)],
        want,
    )
    .await;
}

/// An upstream that reads each request body to the end (so the gateway streams all of
/// it), then answers 200 with `body`.
async fn draining(body: &'static str) -> Mock {
    Mock::start(move |req| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        answer(200, body)
    })
    .await
}

#[tokio::test]
async fn a_known_sequence_of_requests_gives_exact_metrics() {
    let up = draining("hello").await;
    let missing = Mock::start(|_req| async move { answer(404, "no") }).await;
    let bad = Mock::start(|req| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        answer(502, "bad")
    })
    .await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - {{name: up, targets: [{{address: "{}"}}]}}
  - {{name: missing, targets: [{{address: "{}"}}]}}
  - {{name: bad, targets: [{{address: "{}"}}]}}
routes:
  - {{name: ok, paths: [{{prefix: /ok}}], upstream: up}}
  - {{name: gone, paths: [{{prefix: /gone}}], upstream: missing}}
  - {{name: broken, paths: [{{prefix: /broken}}], upstream: bad}}
{}"#,
        up.addr,
        missing.addr,
        bad.addr,
        metrics("")
    ))
    .await;

    for _ in 0..3 {
        assert_eq!(call(&gw, "GET", "/ok", &[]).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(call(&gw, "GET", "/gone", &[]).await.status, 404);
    }
    let raw = post_chunked(&gw, "/broken", &["abcde", "fgh"]).await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    assert_eq!(call(&gw, "GET", "/nowhere", &[]).await.status, 404);
    assert_eq!(call(&gw, "BREW", "/ok", &[]).await.status, 200);

    // Events are emitted as response bodies end: wait until every request is counted.
    let requests = "turnpike_http_requests_total";
    for (labels, n) in [
        (&[("route", "ok"), ("method", "GET")][..], 3.0),
        (&[("route", "ok"), ("method", "other")][..], 1.0),
        (&[("route", "gone")][..], 2.0),
        (&[("route", "broken")][..], 1.0),
        (&[("route", "")][..], 1.0),
    ] {
        wait_for(&gw, requests, labels, n).await;
    }
    let text = scrape(&gw).await;
    let count = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        count(
            requests,
            &[("route", "ok"), ("method", "GET"), ("status_class", "2xx")]
        ),
        Some(3.0)
    );
    assert_eq!(
        count(
            requests,
            &[
                ("route", "ok"),
                ("method", "other"),
                ("status_class", "2xx")
            ]
        ),
        Some(1.0),
        "BREW is not a standard method"
    );
    assert_eq!(
        count(
            requests,
            &[
                ("route", "gone"),
                ("method", "GET"),
                ("status_class", "4xx")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        count(
            requests,
            &[
                ("route", "broken"),
                ("method", "POST"),
                ("status_class", "5xx")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        count(
            "turnpike_gateway_errors_total",
            &[("code", "route_not_found")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count("turnpike_gateway_errors_total", &[("route", "broken")]),
        None
    );

    // Histograms: one observation per request, in the +Inf bucket and the count.
    let total = "turnpike_http_request_duration_seconds";
    for (route, n) in [("ok", 4.0), ("gone", 2.0), ("broken", 1.0)] {
        assert_eq!(
            count(&format!("{total}_count"), &[("route", route)]),
            Some(n)
        );
        assert_eq!(
            count(
                &format!("{total}_bucket"),
                &[("route", route), ("le", "+Inf")]
            ),
            Some(n)
        );
        let upstream = "turnpike_upstream_duration_seconds_count";
        assert_eq!(count(upstream, &[("route", route)]), Some(n));
    }
    assert_eq!(
        count(
            "turnpike_upstream_duration_seconds_count",
            &[("route", "ok"), ("upstream", "up")]
        ),
        Some(4.0)
    );

    // Bytes: the chunked body is counted as read (8 bytes), not as declared (nothing).
    assert_eq!(
        count("turnpike_http_request_bytes_total", &[("route", "broken")]),
        Some(8.0)
    );
    assert_eq!(
        count("turnpike_http_request_bytes_total", &[("route", "ok")]),
        None
    );
    assert_eq!(
        count("turnpike_http_response_bytes_total", &[("route", "ok")]),
        Some(20.0)
    );
    assert_eq!(
        count("turnpike_http_response_bytes_total", &[("route", "gone")]),
        Some(4.0)
    );
    assert_eq!(
        count("turnpike_http_response_bytes_total", &[("route", "broken")]),
        Some(3.0)
    );

    // State read at scrape time.
    let target = up.addr.to_string();
    assert_eq!(
        count(
            "turnpike_upstream_target_healthy",
            &[("upstream", "up"), ("target", &target)]
        ),
        Some(1.0)
    );
    assert_eq!(
        count("turnpike_upstream_in_flight", &[("upstream", "up")]),
        Some(0.0)
    );
    assert_eq!(
        count("turnpike_config_version", &[]),
        Some(gw.gateway.version() as f64)
    );
    assert!(text.contains("turnpike_build_info{version=\""));
    assert!(count("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(count("process_open_fds", &[]).unwrap() > 0.0);
}

#[tokio::test]
async fn request_bodies_are_counted_exactly_as_read() {
    let up = draining("").await;
    let gw = Gw::start(&yaml(up.addr, &metrics(""))).await;
    let r = send(
        req("PUT", &gw.url("/api/x"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"0123456789",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    post_chunked(&gw, "/api/y", &["ab", "cd", "ef"]).await;
    wait_for_request_bytes(&gw, "api", 16.0).await;
}

/// Bodies read by the gateway itself before they go upstream (a WAF inspecting the start,
/// a transform reading it whole) are counted once, as read.
#[tokio::test]
async fn request_bodies_read_by_policies_are_counted() {
    let up = draining("").await;
    let gw = Gw::start(&yaml(
        up.addr,
        &metrics(
            r#"policies:
  - {name: waf, type: waf, scope: route, target: api}
  - name: t
    type: request_transform
    scope: route
    target: open
    config:
      body:
        ops: [{op: remove, path: /a}]
"#,
        ),
    ))
    .await;
    let put = |path: &str, body: &'static str| {
        req("PUT", &gw.url(path))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap()
    };
    // 16 bytes through the WAF's inspection, then upstream.
    assert_eq!(send(put("/api/x", r#"{"q":"harmless"}"#)).await.status, 200);
    // 21 bytes read whole by the transform (what goes upstream is shorter).
    assert_eq!(
        send(put("/open/x", r#"{"a":1,"b":"kept..."}"#))
            .await
            .status,
        200
    );
    wait_for_request_bytes(&gw, "api", 16.0).await;
    wait_for_request_bytes(&gw, "open", 21.0).await;
}

#[tokio::test]
async fn applications_are_labelled_on_request_and_capped() {
    let up = echo().await;
    let sha = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    let gw = Gw::start(&format!(
        r#"{}
consumers:
  - {{name: app-a, api_keys: [{{sha256: "{}"}}]}}
  - {{name: app-b, api_keys: [{{sha256: "{}"}}]}}
  - {{name: app-c, api_keys: [{{sha256: "{}"}}]}}
policies:
  - {{name: keys, type: key_auth, scope: route, target: api}}
{}"#,
        yaml(up.addr, ""),
        sha("ka"),
        sha("kb"),
        sha("kc"),
        metrics("    per_application: true\n    max_applications: 2\n")
    ))
    .await;
    for key in ["ka", "kb", "kc", "kc", "ka"] {
        assert_eq!(
            call(&gw, "GET", "/api/x", &[("x-api-key", key)])
                .await
                .status,
            200
        );
    }
    assert_eq!(call(&gw, "GET", "/api/x", &[]).await.status, 401);
    assert_eq!(
        call(&gw, "GET", "/api/x", &[("x-api-key", "nope")])
            .await
            .status,
        401
    );
    wait_for(
        &gw,
        "turnpike_auth_rejections_total",
        &[("code", "credential_invalid")],
        1.0,
    )
    .await;
    wait_for(
        &gw,
        "turnpike_auth_rejections_total",
        &[("code", "credential_missing")],
        1.0,
    )
    .await;
    wait_for(
        &gw,
        "turnpike_http_requests_total",
        &[("application", "other")],
        2.0,
    )
    .await;
    wait_for(
        &gw,
        "turnpike_http_requests_total",
        &[("application", "app-b")],
        1.0,
    )
    .await;
    let text = wait_for(
        &gw,
        "turnpike_http_requests_total",
        &[("application", "app-a")],
        2.0,
    )
    .await;
    let apps = |app: &str| {
        sample(
            &text,
            "turnpike_http_requests_total",
            &[
                ("route", "api"),
                ("application", app),
                ("status_class", "2xx"),
            ],
        )
    };
    // The first two applications seen get their own series; the third is `other`.
    assert_eq!(apps("app-a"), Some(2.0), "{text}");
    assert_eq!(apps("app-b"), Some(1.0), "{text}");
    assert_eq!(apps("other"), Some(2.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "turnpike_auth_rejections_total",
            &[("route", "api"), ("code", "credential_missing")]
        ),
        Some(1.0)
    );
    let series = text
        .lines()
        .filter(|l| l.starts_with("turnpike_http_requests_total{"))
        .count();
    assert_eq!(
        series, 4,
        "two applications, other, and the unidentified:\n{text}"
    );
}

#[tokio::test]
async fn the_health_gauge_follows_active_health_checks() {
    let health = Arc::new(AtomicU16::new(200));
    let h = health.clone();
    let up = Mock::start(move |_req| {
        let status = h.load(Ordering::SeqCst);
        async move { answer(status, "") }
    })
    .await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
    health_check: {{active: {{path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1}}}}
routes: [{{name: api, paths: [{{prefix: /}}], upstream: up}}]
{}"#,
        up.addr,
        metrics("")
    ))
    .await;
    let target = up.addr.to_string();
    let labels = [("upstream", "up"), ("target", target.as_str())];
    wait_for(&gw, "turnpike_upstream_target_healthy", &labels, 1.0).await;
    health.store(500, Ordering::SeqCst);
    let text = wait_for(&gw, "turnpike_upstream_target_healthy", &labels, 0.0).await;
    assert_eq!(
        sample(&text, "turnpike_upstream_target_available", &labels),
        Some(0.0)
    );
    health.store(200, Ordering::SeqCst);
    wait_for(&gw, "turnpike_upstream_target_healthy", &labels, 1.0).await;
}

#[tokio::test]
async fn breaker_states_are_exported() {
    let up = Mock::fixed("sick", 500).await;
    let gw = Gw::start(&format!(
        r#"{}
policies:
  - name: cb
    type: circuit_breaker
    scope: route
    target: api
    config: {{consecutive_failures: 1, open_for: 60s}}
"#,
        yaml(up.addr, &metrics(""))
    ))
    .await;
    let open = [("route", "api"), ("target", ""), ("state", "open")];
    let closed = [("route", "api"), ("target", ""), ("state", "closed")];
    let text = scrape(&gw).await;
    assert_eq!(
        sample(&text, "turnpike_circuit_breaker_state", &closed),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "turnpike_circuit_breaker_state", &open),
        Some(0.0)
    );
    assert_eq!(call(&gw, "GET", "/api/x", &[]).await.status, 500);
    let r = call(&gw, "GET", "/api/x", &[]).await;
    assert_eq!(r.json()["error"]["code"], "circuit_open");
    let text = scrape(&gw).await;
    assert_eq!(
        sample(&text, "turnpike_circuit_breaker_state", &open),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "turnpike_circuit_breaker_state", &closed),
        Some(0.0)
    );
}

#[tokio::test]
async fn reloads_are_counted() {
    let up = echo().await;
    let gw = Gw::start(&yaml(up.addr, &metrics(""))).await;
    let text = scrape(&gw).await;
    let reloads = "turnpike_config_reloads_total";
    assert_eq!(sample(&text, reloads, &[("result", "success")]), Some(0.0));
    assert_eq!(sample(&text, reloads, &[("result", "failure")]), Some(0.0));

    let v = gw.reload(&yaml(up.addr, &metrics(""))).await.unwrap();
    let broken = format!(
        "{}  - {{name: extra, paths: [{{prefix: /x}}], upstream: missing}}\n",
        yaml(up.addr, "")
    );
    assert!(gw.reload(&broken).await.is_err());
    gw.gateway.count_failed_reload();

    let text = scrape(&gw).await;
    assert_eq!(sample(&text, reloads, &[("result", "success")]), Some(1.0));
    assert_eq!(sample(&text, reloads, &[("result", "failure")]), Some(2.0));
    assert_eq!(
        sample(&text, "turnpike_config_version", &[]),
        Some(v as f64)
    );
    assert!(
        sample(
            &text,
            "turnpike_config_last_reload_success_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 1.7e9
    );
}

struct Switch(Arc<std::sync::atomic::AtomicBool>);

impl ReadinessCheck for Switch {
    fn name(&self) -> &'static str {
        "store"
    }
    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        let up = self.0.load(Ordering::SeqCst);
        Box::pin(async move {
            if up {
                Ok(())
            } else {
                Err("connection refused".to_owned())
            }
        })
    }
}

#[tokio::test]
async fn health_readiness_and_version() {
    let up = echo().await;
    let gw = Gw::start(&yaml(up.addr, &metrics(""))).await;
    let base = format!("http://{}", gw.gateway.status_addr().unwrap());

    let r = get(&format!("{base}/healthz")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let r = get(&format!("{base}/version")).await;
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));

    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["checks"][0]["name"], "snapshot");

    let store_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    gw.gateway
        .status()
        .set_readiness_check(Arc::new(Switch(store_up.clone())));
    // A failing store degrades readiness but does not fail it: the node keeps serving.
    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"][1]["name"], "store");
    assert_eq!(body["checks"][1]["ok"], false);
    assert_eq!(body["checks"][1]["detail"], "connection refused");
    // Alive all the same.
    assert_eq!(get(&format!("{base}/healthz")).await.status, 200);

    store_up.store(true, Ordering::SeqCst);
    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");

    // Only GET and HEAD; nothing but the status paths.
    let r = send(
        req("POST", &format!("{base}/metrics"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = get(&format!("{base}/admin/v1/services")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "route_not_found");
    // The proxy listener does not serve them: `/metrics` there is a route like any other.
    assert_eq!(call(&gw, "GET", "/metrics", &[]).await.status, 404);
}

#[tokio::test]
async fn readiness_fails_while_draining() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let up = Mock::start(move |_req| {
        let mut rx = release_rx.clone();
        async move {
            let _ = rx.wait_for(|r| *r).await;
            answer(200, "late")
        }
    })
    .await;
    let gw = Gw::start(&yaml(up.addr, &metrics(""))).await;
    let base = format!("http://{}", gw.gateway.status_addr().unwrap());
    let url = gw.url("/api/slow");
    let slow = tokio::spawn(async move { get(&url).await });
    assert!(eventually(Duration::from_secs(10), || async { up.hits() == 1 }).await);
    let gateway = gw.gateway.clone();
    let stopping = tokio::spawn(async move { gateway.shutdown().await });
    let draining = eventually(Duration::from_secs(10), || async {
        get(&format!("{base}/readyz")).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(draining, "readyz never reported the drain");
    let r = get(&format!("{base}/readyz")).await;
    assert!(r.text().contains("shutting down"), "{}", r.text());
    release_tx.send(true).unwrap();
    assert_eq!(slow.await.unwrap().status, 200);
    stopping.await.unwrap();
    // Drained: the status listener is gone too.
    assert!(
        tokio::net::TcpStream::connect(gw.gateway.status_addr().unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn disabled_metrics_register_no_sink() {
    let up = echo().await;
    let gw = Gw::start(&yaml(up.addr, &metrics("    enabled: false\n"))).await;
    assert!(!gw.gateway.observer().is_active());
    assert_eq!(call(&gw, "GET", "/api/x", &[]).await.status, 200);
    let text = scrape(&gw).await;
    assert!(!text.contains("turnpike_http_requests"));
    assert_eq!(
        sample(&text, "turnpike_config_version", &[]),
        Some(gw.gateway.version() as f64)
    );
}

#[tokio::test]
async fn bad_metrics_config_is_refused_with_its_path() {
    let up = echo().await;
    let mut cfg = config(&yaml(
        up.addr,
        "observability: {metrics: {buckets: [1, 0.5]}}",
    ));
    let err = match turnpike_proxy::gateway::Gateway::start(&cfg).await {
        Ok(_) => panic!("started with decreasing buckets"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("observability.metrics.buckets[1]"),
        "{err}"
    );
    cfg.observability.metrics.buckets = vec![0.5, 1.0];
    // A status address already taken fails the start, naming the key.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.observability.metrics.listen = Some(taken.local_addr().unwrap().to_string());
    let err = match turnpike_proxy::gateway::Gateway::start(&cfg).await {
        Ok(_) => panic!("started on a taken address"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("observability.metrics.listen"),
        "{err}"
    );
}
