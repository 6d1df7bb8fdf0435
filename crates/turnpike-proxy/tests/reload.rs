//! Hot reload under load, and routing consistency of normalised paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use turnpike_proxy::demo::DemoServer;

fn config_for(a: std::net::SocketAddr, b: std::net::SocketAddr, generation: usize) -> String {
    // Alternate targets and add/remove a route every generation so each reload really changes
    // the route table and the upstream pool.
    let (primary, extra) = if generation % 2 == 0 {
        (a, "")
    } else {
        (
            b,
            "  - {name: extra, paths: [{exact: /extra}], upstream: up}\n",
        )
    };
    format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{primary}"}}]
routes:
  - {{name: all, paths: [{{prefix: /}}], upstream: up}}
{extra}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_no_request() {
    let a = DemoServer::start("127.0.0.1:0".parse().unwrap(), "a")
        .await
        .unwrap();
    let b = DemoServer::start("127.0.0.1:0".parse().unwrap(), "b")
        .await
        .unwrap();
    let gw = Arc::new(Gw::start(&config_for(a.local_addr(), b.local_addr(), 0)).await);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            // Bounded: the loop ends when reloads are done, or after 20k requests at most.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = req("GET", &gw.url("/echo"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                        let _ = collect(resp).await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("request failed during reload: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Reload only while traffic flows: wait for the first successes.
    assert!(
        eventually(Duration::from_secs(10), || async {
            ok.load(Ordering::Relaxed) > 20
        })
        .await
    );
    let v0 = gw.gateway.version();
    for generation in 1..=20 {
        let before = ok.load(Ordering::Relaxed);
        gw.reload(&config_for(a.local_addr(), b.local_addr(), generation))
            .await
            .unwrap();
        // Let some requests run on each snapshot before the next swap.
        assert!(
            eventually(Duration::from_secs(10), || async {
                ok.load(Ordering::Relaxed) >= before + 10
            })
            .await
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(gw.gateway.version(), v0 + 20);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(ok.load(Ordering::Relaxed) >= 200);
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "both generations served traffic"
    );
}

#[tokio::test]
async fn in_flight_request_finishes_on_its_snapshot() {
    let a = DemoServer::start("127.0.0.1:0".parse().unwrap(), "a")
        .await
        .unwrap();
    let b = DemoServer::start("127.0.0.1:0".parse().unwrap(), "b")
        .await
        .unwrap();
    let gw = Arc::new(Gw::start(&config_for(a.local_addr(), b.local_addr(), 0)).await);
    let slow = {
        let url = gw.url("/delay/500");
        tokio::spawn(async move { get(&url).await })
    };
    assert!(eventually(Duration::from_secs(5), || async { a.requests() >= 1 }).await);
    gw.reload(&config_for(a.local_addr(), b.local_addr(), 1))
        .await
        .unwrap();
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-served-by"),
        Some("a"),
        "started on the old snapshot, finished there"
    );
    assert_eq!(get(&gw.url("/echo")).await.header("x-served-by"), Some("b"));
}

/// Paths that try to escape a route: each must be routed by its normalised form, and the
/// upstream must receive exactly that normalised form.
#[tokio::test]
async fn normalised_paths_route_and_forward_consistently() {
    let public = DemoServer::start("127.0.0.1:0".parse().unwrap(), "public")
        .await
        .unwrap();
    let admin = DemoServer::start("127.0.0.1:0".parse().unwrap(), "admin")
        .await
        .unwrap();
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - {{name: public, targets: [{{address: "{}"}}]}}
  - {{name: admin, targets: [{{address: "{}"}}]}}
routes:
  - {{name: admin, paths: [{{prefix: /admin}}], upstream: admin, rewrite: {{add_prefix: /echo}}}}
  - {{name: public, paths: [{{prefix: /}}], upstream: public, rewrite: {{add_prefix: /echo}}}}
"#,
        public.local_addr(),
        admin.local_addr()
    ))
    .await;

    for (raw, route_to, forwarded) in [
        ("/a/../admin", "admin", "/echo/admin"),
        ("//admin", "admin", "/echo/admin"),
        ("/%2e%2e/admin", "admin", "/echo/admin"),
        ("/%2E%2e/admin/x", "admin", "/echo/admin/x"),
        ("/public/./x", "public", "/echo/public/x"),
        ("/adminx", "public", "/echo/adminx"),
        ("/%61dmin", "admin", "/echo/admin"),
    ] {
        let r = get(&gw.url(raw)).await;
        assert_eq!(r.status, StatusCode::OK, "{raw}: {}", r.text());
        assert_eq!(r.header("x-served-by"), Some(route_to), "{raw}");
        assert_eq!(r.json()["path"], forwarded, "{raw}");
    }

    // An encoded slash cannot be normalised without changing meaning: refused.
    for raw in ["/admin%2f..", "/public/..%2fadmin", "/x%5c..%5cadmin"] {
        let r = get(&gw.url(raw)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw}");
        assert_eq!(r.json()["error"]["code"], "invalid_path", "{raw}");
    }
    assert_eq!(
        admin.requests(),
        5,
        "only the five admin paths reached the admin upstream"
    );
}
