//! The `cache` policy end to end: the real gateway in front of mock upstreams whose answers
//! carry the caching headers under test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::{Response, StatusCode};
use turnpike_proxy::cache::Purge;

/// A gateway whose route `api` (`/api`) has a `cache` policy with `config`.
async fn cached_gw(upstream: std::net::SocketAddr, config: &str, extra: &str) -> Gw {
    Gw::start(&yaml(
        upstream,
        &format!(
            r#"{extra}
policies:
  - name: c
    type: cache
    scope: route
    target: api
    config: {config}
"#
        ),
    ))
    .await
}

/// An upstream answering `GET /api/...` with `headers` and a body counting its calls
/// (`n=1`, `n=2`, ...).
async fn counting(headers: &'static [(&'static str, &'static str)]) -> Mock {
    let n = Arc::new(AtomicUsize::new(0));
    Mock::start(move |_req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut r = Response::new(full(format!("n={n}")));
            for (k, v) in headers {
                r.headers_mut().append(*k, v.parse().unwrap());
            }
            r
        }
    })
    .await
}

fn x_cache(r: &Reply) -> &str {
    r.header("x-cache").unwrap_or("-")
}

#[tokio::test]
async fn max_age_is_a_hit_with_age_and_the_same_body() {
    let up = counting(&[
        ("cache-control", "max-age=60"),
        ("content-type", "text/plain"),
    ])
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let a = call(&gw, "GET", "/api/x", &[]).await;
    assert_eq!(
        (a.status, x_cache(&a), a.text().as_str()),
        (StatusCode::OK, "MISS", "n=1")
    );
    let b = call(&gw, "GET", "/api/x", &[]).await;
    assert_eq!(
        (b.status, x_cache(&b), b.text().as_str()),
        (StatusCode::OK, "HIT", "n=1")
    );
    assert!(b.header("age").unwrap().parse::<u64>().unwrap() < 60);
    assert_eq!(b.header("content-type"), Some("text/plain"));
    assert_eq!(b.header("content-length"), Some("3"));
    // Another path is another entry; a route without the policy is not cached at all.
    assert_eq!(x_cache(&call(&gw, "GET", "/api/y", &[]).await), "MISS");
    let open = call(&gw, "GET", "/open/x", &[]).await;
    assert_eq!(open.header("x-cache"), None);
    assert_eq!(up.hits(), 3);
    // HEAD is answered from the GET entry, without a body.
    let h = call(&gw, "HEAD", "/api/x", &[]).await;
    assert_eq!((h.status, x_cache(&h)), (StatusCode::OK, "HIT"));
    assert!(h.body.is_empty());
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn event_streams_and_upgrades_are_not_cached() {
    let sse = counting(&[
        ("cache-control", "max-age=60"),
        ("content-type", "text/event-stream"),
    ])
    .await;
    let gw = cached_gw(sse.addr, "{}", "").await;
    call(&gw, "GET", "/api/events", &[]).await;
    let r = call(&gw, "GET", "/api/events", &[]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
    // An upgrade request keeps its Upgrade and Connection headers, and bypasses the cache.
    let up = echo().await;
    let gw = cached_gw(up.addr, "{default_ttl: 60s}", "").await;
    let r = call(
        &gw,
        "GET",
        "/api/ws",
        &[("upgrade", "websocket"), ("connection", "upgrade")],
    )
    .await;
    assert_eq!(x_cache(&r), "BYPASS");
    assert_eq!(r.json()["headers"]["upgrade"], "websocket");
}

#[tokio::test]
async fn an_empty_answer_is_stored_too() {
    let up = Mock::start(|_req| async move {
        let mut r = Response::new(turnpike_proxy::body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    assert_eq!(x_cache(&call(&gw, "GET", "/api/e", &[]).await), "MISS");
    let r = call(&gw, "GET", "/api/e", &[]).await;
    assert_eq!((r.status, x_cache(&r)), (StatusCode::NO_CONTENT, "HIT"));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn responses_that_forbid_sharing_are_not_stored() {
    let no_store = counting(&[("cache-control", "no-store, max-age=60")]).await;
    let private = counting(&[("cache-control", "private, max-age=60")]).await;
    let cookie = counting(&[("cache-control", "max-age=60"), ("set-cookie", "s=1")]).await;
    let silent = counting(&[("content-type", "text/css")]).await;
    for up in [&no_store, &private, &cookie, &silent] {
        let gw = cached_gw(up.addr, "{}", "").await;
        for _ in 0..2 {
            let r = call(&gw, "GET", "/api/account.css", &[]).await;
            assert_eq!(x_cache(&r), "MISS");
        }
        assert_eq!(up.hits(), 2);
    }
}

#[tokio::test]
async fn a_dynamic_account_css_is_never_served_to_another_client() {
    // The classic deception: a personal page reached under a static-looking path, with no
    // caching headers. Each client gets its own answer.
    let up = Mock::start(|req| async move {
        let who = req
            .headers()
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nobody")
            .to_owned();
        let mut r = Response::new(full(format!("account of {who}")));
        r.headers_mut()
            .insert("content-type", "text/css".parse().unwrap());
        r
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let alice = call(&gw, "GET", "/api/account.css", &[("cookie", "user=alice")]).await;
    let bob = call(&gw, "GET", "/api/account.css", &[("cookie", "user=bob")]).await;
    assert_eq!(alice.text(), "account of user=alice");
    assert_eq!(bob.text(), "account of user=bob");
    assert_eq!(x_cache(&bob), "MISS");
    // Even an upstream that says max-age for it does not make one cookie's answer shared.
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    call(&gw, "GET", "/api/account.css", &[("cookie", "user=alice")]).await;
    let r = call(&gw, "GET", "/api/account.css", &[("cookie", "user=bob")]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
}

#[tokio::test]
async fn an_unkeyed_forwarded_host_never_poisons_the_entry() {
    // An upstream that builds links from X-Forwarded-Host (and reflects another header),
    // behind a gateway that trusts this client as a proxy: the worst case.
    let up = Mock::start(|req| async move {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let body = format!(
            "link=https://{}/x evil={}",
            h("x-forwarded-host"),
            h("x-evil")
        );
        let mut r = Response::new(full(body));
        r.headers_mut()
            .insert("cache-control", "public, max-age=60".parse().unwrap());
        r
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "server: {trusted_proxies: [127.0.0.1/32]}").await;
    let first = call(
        &gw,
        "GET",
        "/api/page",
        &[
            ("host", "shop.example"),
            ("x-forwarded-host", "evil.example"),
            ("x-evil", "1"),
        ],
    )
    .await;
    assert_eq!(x_cache(&first), "MISS");
    assert!(!first.text().contains("evil.example"), "{}", first.text());
    assert!(first.text().contains("evil=-"), "{}", first.text());
    let clean = call(&gw, "GET", "/api/page", &[("host", "shop.example")]).await;
    assert_eq!(x_cache(&clean), "HIT");
    assert_eq!(clean.text(), "link=https://shop.example/x evil=-");
}

#[tokio::test]
async fn vary_keeps_one_variant_per_negotiated_value() {
    let up = Mock::start(|req| async move {
        let lang = req
            .headers()
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let mut r = Response::new(full(format!("hello in {lang}")));
        r.headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        r.headers_mut()
            .insert("vary", "Accept-Language".parse().unwrap());
        r
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let get = |lang: &'static str| {
        let gw = &gw;
        async move { call(gw, "GET", "/api/v", &[("accept-language", lang)]).await }
    };
    assert_eq!(x_cache(&get("en").await), "MISS");
    assert_eq!(x_cache(&get("fr").await), "MISS");
    let en = get("en").await;
    assert_eq!((x_cache(&en), en.text().as_str()), ("HIT", "hello in en"));
    let fr = get("fr").await;
    assert_eq!((x_cache(&fr), fr.text().as_str()), ("HIT", "hello in fr"));
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_with_its_etag_and_a_304_refreshes_it() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let up = Mock::start(move |req| {
        let inm = req
            .headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        s.lock().unwrap().push(inm.clone());
        async move {
            let mut r = if inm == "\"v1\"" {
                let mut r = Response::new(turnpike_proxy::body::empty());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else {
                Response::new(full("version one"))
            };
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            r.headers_mut()
                .insert("cache-control", "no-cache".parse().unwrap());
            r
        }
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let a = call(&gw, "GET", "/api/doc", &[]).await;
    assert_eq!((x_cache(&a), a.text().as_str()), ("MISS", "version one"));
    let b = call(&gw, "GET", "/api/doc", &[]).await;
    assert_eq!(
        (b.status, x_cache(&b), b.text().as_str()),
        (StatusCode::OK, "REVALIDATED", "version one")
    );
    assert_eq!(b.header("etag"), Some("\"v1\""));
    // The client's own condition is answered from the cache after revalidation.
    let c = call(&gw, "GET", "/api/doc", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(
        (c.status, x_cache(&c)),
        (StatusCode::NOT_MODIFIED, "REVALIDATED")
    );
    assert!(c.body.is_empty());
    // The upstream got the gateway's conditional requests, never the client's.
    assert_eq!(*seen.lock().unwrap(), vec!["-", "\"v1\"", "\"v1\""]);
}

#[tokio::test]
async fn a_fresh_entry_answers_client_conditions_with_304() {
    let up = counting(&[
        ("cache-control", "max-age=60"),
        ("etag", "W/\"e1\""),
        ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT"),
    ])
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    call(&gw, "GET", "/api/c", &[]).await;
    let r = call(&gw, "GET", "/api/c", &[("if-none-match", "\"e1\"")]).await;
    assert_eq!((r.status, x_cache(&r)), (StatusCode::NOT_MODIFIED, "HIT"));
    assert_eq!(r.header("etag"), Some("W/\"e1\""));
    let r = call(
        &gw,
        "GET",
        "/api/c",
        &[("if-modified-since", "Mon, 14 Nov 1994 00:00:00 GMT")],
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "n=1"));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn stale_if_error_serves_the_stored_answer_when_the_upstream_fails() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let up = Mock::start(move |_req| {
        let fail = f.load(Ordering::SeqCst);
        async move {
            let mut r = if fail {
                let mut r = Response::new(full("upstream broke"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            } else {
                Response::new(full("good copy"))
            };
            r.headers_mut().insert(
                "cache-control",
                "max-age=0, stale-if-error=60".parse().unwrap(),
            );
            r
        }
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    assert_eq!(call(&gw, "GET", "/api/s", &[]).await.text(), "good copy");
    failing.store(true, Ordering::SeqCst);
    let r = call(&gw, "GET", "/api/s", &[]).await;
    assert_eq!(
        (r.status, x_cache(&r), r.text().as_str()),
        (StatusCode::OK, "STALE", "good copy")
    );
    // An upstream that cannot be reached at all: the same stand-in.
    drop(up);
    let r = call(&gw, "GET", "/api/s", &[]).await;
    assert_eq!(
        (r.status, x_cache(&r), r.text().as_str()),
        (StatusCode::OK, "STALE", "good copy")
    );
    // Not for a path that was never stored.
    let r = call(&gw, "GET", "/api/other", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn must_revalidate_passes_the_failure_through() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let up = Mock::start(move |_req| {
        let fail = f.load(Ordering::SeqCst);
        async move {
            let mut r = Response::new(full("copy"));
            if fail {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r.headers_mut().insert(
                "cache-control",
                "max-age=0, must-revalidate, stale-if-error=60"
                    .parse()
                    .unwrap(),
            );
            r.headers_mut().insert("etag", "\"x\"".parse().unwrap());
            r
        }
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    call(&gw, "GET", "/api/m", &[]).await;
    failing.store(true, Ordering::SeqCst);
    let r = call(&gw, "GET", "/api/m", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    // The upstream answers with the forwarded host it was told, so a refresh sent without
    // the gateway's forwarding headers would show.
    let n = Arc::new(AtomicUsize::new(0));
    let up = Mock::start(move |req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        let host = req
            .headers()
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        async move {
            let mut r = Response::new(full(format!("n={n} host={host}")));
            r.headers_mut().insert(
                "cache-control",
                "max-age=0, stale-while-revalidate=60".parse().unwrap(),
            );
            r
        }
    })
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let h = [("host", "shop.example")];
    assert_eq!(
        call(&gw, "GET", "/api/w", &h).await.text(),
        "n=1 host=shop.example"
    );
    let r = call(&gw, "GET", "/api/w", &h).await;
    assert_eq!(
        (x_cache(&r), r.text().as_str()),
        ("STALE", "n=1 host=shop.example")
    );
    // The background refresh stores the upstream's next answer, asked like a client's miss.
    assert!(
        eventually(Duration::from_secs(10), || async {
            call(&gw, "GET", "/api/w", &h).await.text() == "n=2 host=shop.example"
        })
        .await
    );
}

#[tokio::test]
async fn a_hundred_concurrent_identical_misses_make_one_upstream_request() {
    let up = Mock::start(|_req| async move {
        // Slow enough that the other requests arrive while this one is in flight.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut r = Response::new(full("shared"));
        r.headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let gw = Arc::new(cached_gw(up.addr, "{}", "").await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            call(&gw, "GET", "/api/hot", &[]).await
        }));
    }
    let mut misses = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "shared"));
        misses += usize::from(x_cache(&r) == "MISS");
    }
    assert_eq!(up.hits(), 1);
    assert_eq!(misses, 1);
}

#[tokio::test]
async fn unsafe_methods_invalidate_and_bypass() {
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    call(&gw, "GET", "/api/item", &[]).await;
    assert_eq!(x_cache(&call(&gw, "GET", "/api/item", &[]).await), "HIT");
    let post = call(&gw, "POST", "/api/item", &[]).await;
    assert_eq!(x_cache(&post), "BYPASS");
    let r = call(&gw, "GET", "/api/item", &[]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=3"));
    // A request that refuses storage bypasses too.
    let r = call(&gw, "GET", "/api/item", &[("cache-control", "no-store")]).await;
    assert_eq!(x_cache(&r), "BYPASS");
}

#[tokio::test]
async fn request_directives_no_cache_and_only_if_cached() {
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let r = call(&gw, "GET", "/api/o", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(up.hits(), 0);
    call(&gw, "GET", "/api/o", &[]).await;
    let r = call(&gw, "GET", "/api/o", &[("cache-control", "no-cache")]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
    // A policy that does not let clients force upstream calls.
    let gw = cached_gw(up.addr, "{honor_request_no_cache: false}", "").await;
    call(&gw, "GET", "/api/o", &[]).await;
    let r = call(&gw, "GET", "/api/o", &[("cache-control", "no-cache")]).await;
    assert_eq!(x_cache(&r), "HIT");
}

#[tokio::test]
async fn authorization_is_shared_only_when_the_response_says_public() {
    let private_by_default = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(private_by_default.addr, "{}", "").await;
    call(&gw, "GET", "/api/me", &[("authorization", "Bearer a")]).await;
    let r = call(&gw, "GET", "/api/me", &[("authorization", "Bearer b")]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
    let public = counting(&[("cache-control", "public, max-age=60")]).await;
    let gw = cached_gw(public.addr, "{}", "").await;
    call(&gw, "GET", "/api/me", &[("authorization", "Bearer a")]).await;
    let r = call(&gw, "GET", "/api/me", &[("authorization", "Bearer b")]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("HIT", "n=1"));
}

#[tokio::test]
async fn keyed_query_parameters_and_headers() {
    let up = echo().await;
    // The echo upstream says nothing about caching: the policy's default_ttl stands in.
    let gw = cached_gw(
        up.addr,
        "{default_ttl: 60s, key: {query: {only: [page]}, headers: [x-tenant]}}",
        "",
    )
    .await;
    let a = call(&gw, "GET", "/api/list?utm=a&page=2", &[("x-tenant", "t1")]).await;
    assert_eq!(x_cache(&a), "MISS");
    // The unkeyed parameter never reached the upstream; the keyed header did.
    assert_eq!(a.json()["path"], "/api/list?page=2");
    assert_eq!(a.json()["headers"]["x-tenant"], "t1");
    let b = call(&gw, "GET", "/api/list?page=2&utm=b", &[("x-tenant", "t1")]).await;
    assert_eq!(x_cache(&b), "HIT");
    let c = call(&gw, "GET", "/api/list?page=2", &[("x-tenant", "t2")]).await;
    assert_eq!(x_cache(&c), "MISS");
    let d = call(&gw, "GET", "/api/list?page=3", &[("x-tenant", "t1")]).await;
    assert_eq!(x_cache(&d), "MISS");
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn purge_by_key_prefix_and_tag_in_memory() {
    let up = counting(&[
        ("cache-control", "max-age=60"),
        ("cache-tag", "catalog, p1"),
    ])
    .await;
    let gw = cached_gw(up.addr, "{}", "").await;
    for p in ["/api/p/1", "/api/p/2", "/api/q"] {
        call(&gw, "GET", p, &[]).await;
    }
    let url = |p: &str| format!("http://{}:{}{p}", gw.addr.ip(), gw.addr.port());
    let cache = gw.gateway.cache();
    let report = cache.purge(&Purge::Key(url("/api/p/1"))).await;
    assert_eq!(report.memory, 1);
    assert_eq!(x_cache(&call(&gw, "GET", "/api/p/1", &[]).await), "MISS");
    assert_eq!(x_cache(&call(&gw, "GET", "/api/p/2", &[]).await), "HIT");
    assert_eq!(cache.purge(&Purge::Prefix(url("/api/p/"))).await.memory, 2);
    assert_eq!(x_cache(&call(&gw, "GET", "/api/p/2", &[]).await), "MISS");
    assert_eq!(x_cache(&call(&gw, "GET", "/api/q", &[]).await), "HIT");
    cache.purge(&Purge::Tag("catalog".into())).await;
    assert_eq!(x_cache(&call(&gw, "GET", "/api/q", &[]).await), "MISS");
}

fn redis_url() -> String {
    std::env::var("TURNPIKE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test]
async fn two_nodes_share_entries_and_purges_through_redis() {
    let up = counting(&[("cache-control", "max-age=60"), ("cache-tag", "shared")]).await;
    let prefix = format!("turnpike:test:cache:{}:", uuid::Uuid::new_v4());
    let extra = format!(
        "cache: {{redis: {{url: \"{}\", prefix: \"{prefix}\", timeout: 2s}}}}",
        redis_url()
    );
    let a = cached_gw(up.addr, "{}", &extra).await;
    let b = cached_gw(up.addr, "{}", &extra).await;
    // Both nodes must address the entry the same way: same Host.
    let host = [("host", "api.example")];
    let r = call(&a, "GET", "/api/s", &host).await;
    assert_eq!(x_cache(&r), "MISS");
    // Node A writes Redis in the background: wait for the entry to be there.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{prefix}e:*");
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut conn = conn.clone();
            let pattern = pattern.clone();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                keys.len() == 1
            }
        })
        .await,
        "node A never stored its entry in Redis"
    );
    // Node B has never seen the URL: it finds node A's entry there.
    let r = call(&b, "GET", "/api/s", &host).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("HIT", "n=1"));
    assert_eq!(up.hits(), 1);
    // A purge on node A reaches node B's memory tier.
    let report = a.gateway.cache().purge(&Purge::Tag("shared".into())).await;
    assert_eq!(report.shared, Some(2), "the entry and its tag set");
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.gateway.cache().memory_usage().0 == 0
        })
        .await,
        "the purge never reached node B"
    );
    let r = call(&b, "GET", "/api/s", &host).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
    assert_eq!(x_cache(&call(&b, "GET", "/api/s", &host).await), "HIT");
    // A successful POST through node A invalidates the URL on node B too, without a scan.
    assert_eq!(x_cache(&call(&a, "POST", "/api/s", &host).await), "BYPASS");
    assert!(
        eventually(Duration::from_secs(10), || async {
            x_cache(&call(&b, "GET", "/api/s", &host).await) == "MISS"
        })
        .await,
        "the invalidation never reached node B"
    );
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}t:shared"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dead_redis_tier_costs_nothing_but_sharing() {
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let dead = dead_addr().await;
    let extra = format!("cache: {{redis: {{url: \"redis://{dead}\", timeout: 100ms}}}}");
    let gw = cached_gw(up.addr, "{}", &extra).await;
    assert_eq!(x_cache(&call(&gw, "GET", "/api/d", &[]).await), "MISS");
    assert_eq!(x_cache(&call(&gw, "GET", "/api/d", &[]).await), "HIT");
}

#[tokio::test]
async fn cache_outcomes_are_counted_in_metrics() {
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(
        up.addr,
        "{}",
        "observability:\n  metrics:\n    listen: \"127.0.0.1:0\"",
    )
    .await;
    call(&gw, "GET", "/api/m", &[]).await;
    call(&gw, "GET", "/api/m", &[]).await;
    call(&gw, "GET", "/api/m", &[]).await;
    call(&gw, "POST", "/api/m", &[]).await;
    let status = gw.gateway.status_addr().unwrap();
    let count = |text: &str, result: &str| {
        turnpike_observe::metrics::sample(
            text,
            "turnpike_cache_requests_total",
            &[("route", "api"), ("result", result)],
        )
    };
    // Events are emitted as bodies end, a moment after the client has read them.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = get(&format!("http://{status}/metrics")).await.text();
            count(&text, "hit") == Some(2.0)
                && count(&text, "miss") == Some(1.0)
                && count(&text, "bypass") == Some(1.0)
        })
        .await
    );
}

#[tokio::test]
async fn a_request_target_naming_another_host_than_host_bypasses() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = counting(&[("cache-control", "public, max-age=60")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"GET http://shop.example/api/abs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.to_ascii_lowercase().contains("x-cache: bypass"),
        "{out}"
    );
}

#[tokio::test]
async fn a_vary_on_a_header_the_gateway_sets_is_not_stored() {
    let up = counting(&[("cache-control", "max-age=60"), ("vary", "X-Forwarded-For")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    call(&gw, "GET", "/api/geo", &[]).await;
    let r = call(&gw, "GET", "/api/geo", &[]).await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "n=2"));
}

#[tokio::test]
async fn an_http2_get_with_a_body_and_no_length_bypasses() {
    use http_body_util::BodyExt;
    let up = counting(&[("cache-control", "max-age=60")]).await;
    let gw = cached_gw(up.addr, "{}", "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>>(
        );
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
        http_body::Frame::data(bytes::Bytes::from_static(b"q=evil")),
    )]);
    let body = http_body_util::StreamBody::new(frames).boxed();
    let req = http::Request::get(gw.url("/api/search"))
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers().get("x-cache").unwrap(), "BYPASS");
    // Nothing was stored for the body-less request either.
    let r = call(&gw, "GET", "/api/search", &[]).await;
    assert_eq!(x_cache(&r), "MISS");
}
