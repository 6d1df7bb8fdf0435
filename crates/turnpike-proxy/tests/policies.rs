//! Policies end to end: the real gateway in-process, a mock upstream that reports what it
//! received, and requests that exercise each policy from the declarative configuration.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use sha2::Digest;

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

async fn post_bytes(gw: &Gw, path: &str, len: usize) -> Reply {
    send(
        req("POST", &gw.url(path))
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap(),
    )
    .await
}

fn error_code(r: &Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn key_auth_in_header_query_and_cookie() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - name: shop
    groups: [gold]
    api_keys: [{{sha256: "{}"}}]
policies:
  - name: keys
    type: key_auth
    scope: route
    target: api
    config:
      sources: [{{in: header, name: X-API-Key}}, {{in: query, name: apikey}}, {{in: cookie, name: key}}]
"#,
            sha256_hex("s3cret")
        ),
    ))
    .await;

    let spoof = [
        ("x_consumer_id", "admin"),
        ("X_Consumer_Name", "admin"),
        ("x-consumer-id", "admin"),
        ("x-consumer-name", "admin"),
        ("x-authenticated-scopes", "root"),
        ("x-anonymous-consumer", "false"),
    ];
    let missing = call(&gw, "GET", "/api/a", &spoof).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&missing), "credential_missing");
    assert!(missing.json()["error"]["request_id"].as_str().is_some());

    let wrong = call(&gw, "GET", "/api/a", &[("x-api-key", "nope")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&wrong), "credential_invalid");

    let mut with_spoof = spoof.to_vec();
    with_spoof.push(("x-api-key", "s3cret"));
    let ok = call(&gw, "GET", "/api/a", &with_spoof).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let seen = ok.json();
    assert_eq!(seen["headers"]["x-consumer-name"], "shop");
    assert_eq!(seen["headers"]["x-consumer-id"], "shop");
    assert!(seen["headers"].get("x-api-key").is_none(), "key forwarded");
    assert!(seen["headers"].get("x-authenticated-scopes").is_none());
    assert!(seen["headers"].get("x-anonymous-consumer").is_none());

    let q = call(&gw, "GET", "/api/a?x=1&apikey=s3cret&y=2", &[]).await;
    assert_eq!(q.status, StatusCode::OK);
    assert_eq!(q.json()["path"], "/api/a?x=1&y=2");

    let c = call(
        &gw,
        "GET",
        "/api/a",
        &[("cookie", "theme=dark; key=s3cret")],
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.json()["headers"]["cookie"], "theme=dark");

    // A route without the policy is open, and spoofed identity headers are still removed.
    let open = call(&gw, "GET", "/open", &spoof).await;
    assert_eq!(open.status, StatusCode::OK);
    for (h, _) in spoof {
        assert!(
            open.json()["headers"].get(h).is_none(),
            "{h} reached the upstream"
        );
    }
}

fn argon2_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"turnpike-test-salt").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn basic_auth_then_key_auth_then_anonymous() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - name: alice-app
    basic_auth: [{{username: alice, password_hash: "{}"}}]
  - name: key-app
    api_keys: [{{sha256: "{}"}}]
  - name: guest
policies:
  - {{name: basic, type: basic_auth, scope: route, target: api, priority: 10, config: {{realm: shop}}}}
  - {{name: keys, type: key_auth, scope: route, target: api, config: {{anonymous: guest}}}}
"#,
            argon2_hash("correct horse"),
            sha256_hex("k1")
        ),
    ))
    .await;

    let ok = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &basic("alice", "correct horse"))],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["headers"]["x-consumer-name"], "alice-app");
    assert!(ok.json()["headers"].get("authorization").is_none());
    // Remembered: the second check gives the same answer without hashing again.
    let again = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &basic("alice", "correct horse"))],
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);

    let bad = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &basic("alice", "wrong"))],
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&bad), "credential_invalid");
    assert!(
        bad.header("www-authenticate")
            .unwrap()
            .contains("realm=\"shop\"")
    );
    let nobody = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &basic("mallory", "x"))],
    )
    .await;
    assert_eq!(nobody.status, StatusCode::UNAUTHORIZED);

    // Basic (higher priority) finds no credential; key_auth's key decides.
    let key = call(&gw, "GET", "/api", &[("x-api-key", "k1")]).await;
    assert_eq!(key.json()["headers"]["x-consumer-name"], "key-app");

    // No credential at all: the anonymous application.
    let anon = call(&gw, "GET", "/api", &[]).await;
    assert_eq!(anon.status, StatusCode::OK);
    assert_eq!(anon.json()["headers"]["x-consumer-name"], "guest");
    assert_eq!(anon.json()["headers"]["x-anonymous-consumer"], "true");
}

fn hs256(secret: &[u8], claims: serde_json::Value, alg: &str) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(serde_json::json!({"alg": alg, "typ": "JWT"})
        .to_string()
        .as_bytes());
    let payload = b64(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    if alg == "none" {
        return format!("{input}.");
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn jwt_with_scopes_claims_and_groups() {
    let up = echo().await;
    let secret = "0123456789abcdef0123456789abcdef";
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: mobile, groups: [partners]}}
  - {{name: blocked, groups: [banned]}}
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers: [{{issuer: "https://idp.test", secret: "{secret}"}}]
      audiences: [shop]
      leeway: 5s
      consumer_claim: azp
  - name: rules
    type: acl
    scope: route
    target: api
    config: {{deny_groups: [banned], required_scopes: [orders:read]}}
"#
        ),
    ))
    .await;
    let token =
        |claims: serde_json::Value| format!("Bearer {}", hs256(secret.as_bytes(), claims, "HS256"));
    let good = serde_json::json!({
        "iss": "https://idp.test", "aud": "shop", "sub": "u1", "azp": "mobile",
        "exp": now() + 60, "scope": "orders:read orders:write"
    });

    let ok = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &token(good.clone()))],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let seen = ok.json();
    assert_eq!(seen["headers"]["x-consumer-name"], "mobile");
    assert_eq!(
        seen["headers"]["x-authenticated-scopes"],
        "orders:read orders:write"
    );
    assert!(
        seen["headers"].get("authorization").is_some(),
        "hide_credentials is off"
    );

    let mut no_scope = good.clone();
    no_scope["scope"] = "orders:write".into();
    let r = call(&gw, "GET", "/api", &[("authorization", &token(no_scope))]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&r), "insufficient_scope");
    // The `open` route has the global jwt policy but no acl.
    let mut blocked = good.clone();
    blocked["azp"] = "blocked".into();
    assert_eq!(
        call(
            &gw,
            "GET",
            "/open",
            &[("authorization", &token(blocked.clone()))]
        )
        .await
        .status,
        StatusCode::OK
    );
    let r = call(&gw, "GET", "/api", &[("authorization", &token(blocked))]).await;
    assert_eq!(error_code(&r), "access_denied");

    for (what, claims, alg) in [
        (
            "expired past leeway",
            {
                let mut c = good.clone();
                c["exp"] = (now() - 10).into();
                c
            },
            "HS256",
        ),
        (
            "wrong audience",
            {
                let mut c = good.clone();
                c["aud"] = "other".into();
                c
            },
            "HS256",
        ),
        (
            "wrong issuer",
            {
                let mut c = good.clone();
                c["iss"] = "https://evil.test".into();
                c
            },
            "HS256",
        ),
        ("alg none", good.clone(), "none"),
    ] {
        let t = format!("Bearer {}", hs256(secret.as_bytes(), claims, alg));
        let r = call(&gw, "GET", "/api", &[("authorization", &t)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(error_code(&r), "credential_invalid", "{what}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
    }
    let forged = format!(
        "Bearer {}",
        hs256(b"another secret of 32 bytes length", good, "HS256")
    );
    assert_eq!(
        call(&gw, "GET", "/api", &[("authorization", &forged)])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

fn limit_yaml(up: std::net::SocketAddr, algorithm: &str, extra: &str) -> String {
    yaml(
        up,
        &format!(
            r#"
policies:
  - name: rl
    type: rate_limit
    scope: route
    target: api
    config:
      limits: [{{requests: 100, per: 1000s, algorithm: {algorithm}{extra}}}]
"#
        ),
    )
}

/// Sends `n` requests, 10 at a time, and counts the statuses.
async fn burst(
    gw: &Gw,
    path: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> (usize, usize, Vec<Reply>) {
    let mut ok = 0;
    let mut limited = 0;
    let mut refusals = Vec::new();
    for chunk in 0..n.div_ceil(10) {
        let size = (n - chunk * 10).min(10);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..size {
            let mut r = req("GET", &gw.url(path));
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            set.spawn(send(r.body(Full::new(Bytes::new())).unwrap()));
        }
        while let Some(r) = set.join_next().await {
            let r = r.unwrap();
            match r.status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    limited += 1;
                    refusals.push(r);
                }
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
    }
    (ok, limited, refusals)
}

#[tokio::test]
async fn every_algorithm_is_exact() {
    let up = echo().await;
    for algorithm in ["fixed_window", "sliding_window", "token_bucket"] {
        let gw = Gw::start(&limit_yaml(up.addr, algorithm, "")).await;
        let (ok, limited, refusals) = burst(&gw, "/api", 150, &[]).await;
        assert_eq!((ok, limited), (100, 50), "{algorithm}");
        let r = &refusals[0];
        assert_eq!(error_code(r), "rate_limited");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry >= 1, "{algorithm}: Retry-After {retry}");
        assert_eq!(r.header("ratelimit-policy"), Some("\"rl\";q=100;w=1000"));
        assert!(r.header("ratelimit").unwrap().starts_with("\"rl\";r=0;t="));
        // Other routes are not limited.
        assert_eq!(call(&gw, "GET", "/open", &[]).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn leaky_bucket_delays_then_refuses() {
    let up = echo().await;
    // 10 per second: a slot every 100 ms; a request waits at most 350 ms.
    let gw = Gw::start(&yaml(
        up.addr,
        r#"
policies:
  - name: throttle
    type: rate_limit
    scope: route
    target: api
    config:
      limits: [{requests: 10, per: 1s, algorithm: leaky_bucket, max_delay: 350ms}]
"#,
    ))
    .await;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = gw.url("/api");
        set.spawn(async move {
            let r = send(req("GET", &url).body(Full::new(Bytes::new())).unwrap()).await;
            (r.status, started.elapsed())
        });
    }
    let mut passed = Vec::new();
    let mut refused = 0;
    while let Some(r) = set.join_next().await {
        let (status, at) = r.unwrap();
        match status {
            StatusCode::OK => passed.push(at),
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("{other}"),
        }
    }
    // The first goes at once, the next three wait 100, 200 and 300 ms; the rest would wait
    // more than 350 ms.
    assert_eq!((passed.len(), refused), (4, 4));
    passed.sort();
    assert!(passed[3] >= Duration::from_millis(300), "{passed:?}");
}

#[tokio::test]
async fn per_ip_limits_use_the_real_client_ip() {
    let up = echo().await;
    // 127.0.0.1 is not a trusted proxy here: X-Forwarded-For is ignored.
    let gw = Gw::start(&yaml(
        up.addr,
        r#"
policies:
  - name: per-ip
    type: rate_limit
    scope: global
    config: {key: {by: ip}, limits: [{requests: 5, per: 1000s}]}
"#,
    ))
    .await;
    let mut ok = 0;
    for i in 0..20 {
        let xff = format!("10.0.0.{i}");
        let r = call(&gw, "GET", "/api", &[("x-forwarded-for", &xff)]).await;
        if r.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 5, "a rotating X-Forwarded-For escaped the per-IP limit");

    // Behind a trusted proxy, the forwarded address is the client.
    let gw = Gw::start(&format!(
        "server: {{trusted_proxies: [127.0.0.1/32]}}\n{}",
        yaml(
            up.addr,
            r#"
policies:
  - name: per-ip
    type: rate_limit
    scope: global
    config: {key: {by: ip}, limits: [{requests: 5, per: 1000s}]}
  - {name: no-evil, type: ip_restriction, scope: route, target: open, config: {deny: [203.0.113.0/24]}}
"#
        )
    ))
    .await;
    let mut ok = 0;
    for i in 0..20 {
        let xff = format!("10.0.0.{}", i % 2);
        if call(&gw, "GET", "/api", &[("x-forwarded-for", &xff)])
            .await
            .status
            == StatusCode::OK
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "two clients, five each");
    let r = call(&gw, "GET", "/open", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&r), "ip_denied");
    // `Forwarded` is not read unless configured.
    let r = call(&gw, "GET", "/open", &[("forwarded", "for=203.0.113.9")]).await;
    assert_eq!(r.status, StatusCode::OK);

    // A proxy that sends RFC 7239 `Forwarded`: configured, its `for=` is the client, and an
    // `X-Forwarded-For` it passed through from the client is not read.
    let gw = Gw::start(&format!(
        "server: {{trusted_proxies: [127.0.0.1/32], client_ip_header: forwarded}}\n{}",
        yaml(
            up.addr,
            r#"
policies:
  - {name: no-evil, type: ip_restriction, scope: route, target: open, config: {deny: [203.0.113.0/24]}}
"#
        )
    ))
    .await;
    let r = call(
        &gw,
        "GET",
        "/open",
        &[("forwarded", "for=203.0.113.9;proto=https")],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(
        &gw,
        "GET",
        "/open",
        &[
            ("forwarded", "for=203.0.113.9"),
            ("x-forwarded-for", "198.51.100.7"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(&gw, "GET", "/open", &[("forwarded", "for=198.51.100.7")]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn application_limits_add_to_the_routes() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: small, api_keys: [{{sha256: "{}"}}]}}
  - {{name: big, api_keys: [{{sha256: "{}"}}]}}
policies:
  - {{name: keys, type: key_auth, scope: global}}
  - name: route-limit
    type: rate_limit
    scope: route
    target: api
    config: {{key: {{by: application}}, limits: [{{requests: 3, per: 1000s}}]}}
  - name: big-limit
    type: rate_limit
    scope: application
    target: big
    config: {{key: {{by: application}}, limits: [{{requests: 2, per: 1000s}}]}}
  - name: big-lenient
    type: rate_limit
    scope: application
    target: big
    config: {{key: {{by: application}}, limits: [{{requests: 1000, per: 1000s}}]}}
"#,
            sha256_hex("small-key"),
            sha256_hex("big-key")
        ),
    ))
    .await;
    let (ok, _, _) = burst(&gw, "/api", 10, &[("x-api-key", "small-key")]).await;
    assert_eq!(ok, 3);
    // The application's own limits add to the route's: the stricter one decides, and a
    // lenient one never lifts the route's.
    let (ok, _, _) = burst(&gw, "/api", 10, &[("x-api-key", "big-key")]).await;
    assert_eq!(ok, 2);
    // On a route without limits of its own, the application's still apply.
    let (ok, _, _) = burst(&gw, "/open", 5, &[("x-api-key", "big-key")]).await;
    assert_eq!(ok, 0, "big already used its 2");
}

#[tokio::test]
async fn cors_preflight_limits_and_hostile_origins() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: web, api_keys: [{{sha256: "{}"}}]}}
policies:
  - name: cors
    type: cors
    scope: global
    config:
      allow_origins: [https://app.example.com, https://*.example.org]
      allow_methods: [GET, POST]
      allow_headers: [content-type, x-api-key]
      allow_credentials: true
      max_age: 10m
  - {{name: keys, type: key_auth, scope: route, target: api}}
  - name: preflight-limit
    type: rate_limit
    scope: route
    target: api
    config: {{key: {{by: ip}}, limits: [{{requests: 3, per: 1000s}}]}}
"#,
            sha256_hex("web-key")
        ),
    ))
    .await;
    let preflight = |origin: &'static str| {
        let gw_url = gw.url("/api/items");
        async move {
            send(
                req("OPTIONS", &gw_url)
                    .header("origin", origin)
                    .header("access-control-request-method", "POST")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
        }
    };
    let p = preflight("https://app.example.com").await;
    assert_eq!(p.status, StatusCode::NO_CONTENT, "{}", p.text());
    assert_eq!(
        p.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(p.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(p.header("access-control-max-age"), Some("600"));
    assert_eq!(
        p.header("access-control-allow-headers"),
        Some("content-type, x-api-key")
    );
    assert_eq!(up.hits(), 0, "a preflight reached the upstream");

    // A 401 carries CORS headers so the browser can show it.
    let r = call(
        &gw,
        "GET",
        "/api/items",
        &[("origin", "https://a.b.example.org")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.b.example.org")
    );

    for hostile in [
        "null",
        "https://evil.com",
        "https://app.example.com.evil.com",
    ] {
        // The upstream's own CORS headers would allow anything; the policy decides alone.
        let r = call(
            &gw,
            "GET",
            "/open",
            &[("origin", hostile), ("x-upstream-cors", "1")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{hostile} reflected"
        );
        assert!(r.header("access-control-allow-credentials").is_none());
        let denied = send(
            req("OPTIONS", &gw.url("/open"))
                .header("origin", hostile)
                .header("access-control-request-method", "POST")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        let e = denied.json();
        assert_eq!(e["error"]["code"], "cors_denied");
        assert_eq!(
            e["error"]["request_id"].as_str(),
            denied.header("x-request-id"),
            "the error names the request"
        );
        assert!(denied.header("access-control-allow-origin").is_none());
    }
    // Preflights count against the route's limits: two used above (one preflight, one
    // 401), one left.
    assert_eq!(
        preflight("https://app.example.com").await.status,
        StatusCode::NO_CONTENT
    );
    let limited = preflight("https://app.example.com").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limited.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
}

#[tokio::test]
async fn body_limit_refusals_carry_cors_headers() {
    let up = echo().await;
    let gw = Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
routes:
  - {{name: small, paths: [{{prefix: /small}}], upstream: up, max_body_bytes: 8}}
policies:
  - {{name: cors, type: cors, scope: global, config: {{allow_origins: [https://app.example.com]}}}}
"#,
        up.addr
    ))
    .await;
    // The route's own limit answers 413 after the CORS headers are decided, so the
    // browser shows the 413 rather than a CORS failure.
    let r = send(
        req("POST", &gw.url("/small"))
            .header("origin", "https://app.example.com")
            .body(Full::new(Bytes::from(vec![b'x'; 9])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(up.hits(), 0);
    assert_eq!(post_bytes(&gw, "/small", 8).await.status, StatusCode::OK);
}

#[tokio::test]
async fn request_size_and_user_agent() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        r#"
policies:
  - {name: small, type: request_size, scope: route, target: api, config: {max_body_bytes: 16}}
  - {name: bots, type: user_agent, scope: global, config: {deny: ["(?i)sqlmap|nikto"]}}
"#,
    ))
    .await;
    let big = post_bytes(&gw, "/api", 17).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    let small = post_bytes(&gw, "/api", 16).await;
    assert_eq!(small.status, StatusCode::OK);
    // The other route keeps the server's default limit.
    let other = post_bytes(&gw, "/open", 1000).await;
    assert_eq!(other.status, StatusCode::OK);

    let bot = call(&gw, "GET", "/open", &[("user-agent", "sqlmap/1.7")]).await;
    assert_eq!(bot.status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&bot), "user_agent_denied");
}

#[tokio::test]
async fn scopes_override_and_disable() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: c, api_keys: [{{sha256: "{}"}}]}}
policies:
  - {{name: keys, type: key_auth, scope: global}}
  - {{name: no-keys, type: key_auth, scope: route, target: open, enabled: false}}
"#,
            sha256_hex("k")
        ),
    ))
    .await;
    assert_eq!(
        call(&gw, "GET", "/api", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(call(&gw, "GET", "/open", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_policy_config_names_the_field() {
    let bad = yaml(
        "127.0.0.1:9".parse().unwrap(),
        r#"
policies:
  - {name: rl, type: rate_limit, scope: route, target: api, config: {limits: [{requests: 0, per: 1s}]}}
  - {name: x, type: teleport, scope: global}
  - {name: k, type: key_auth, scope: route, target: nowhere}
"#,
    );
    let source = turnpike_model::Source {
        file: "t.yaml".into(),
        text: bad,
    };
    let config = turnpike_model::parse(&source, turnpike_model::Format::Yaml).unwrap();
    let errs = turnpike_model::validate(&config).unwrap_err().to_string();
    assert!(
        errs.contains("policies[0].config.limits[0].requests"),
        "{errs}"
    );
    assert!(errs.contains("policies[1].type"), "{errs}");
    assert!(errs.contains("policies[2].target"), "{errs}");
}

#[tokio::test]
async fn limits_survive_an_unrelated_reload() {
    let up = echo().await;
    let config = limit_yaml(up.addr, "sliding_window", "");
    let gw = Gw::start(&config).await;
    let (ok, _, _) = burst(&gw, "/api", 60, &[]).await;
    assert_eq!(ok, 60);
    // Same policy, another route added: the counters carry over.
    gw.reload(&format!(
        "{config}\n  - {{name: extra, type: request_size, scope: route, target: open, config: {{max_body_bytes: 5}}}}\n"
    ))
    .await
    .unwrap();
    let (ok, _, _) = burst(&gw, "/api", 60, &[]).await;
    assert_eq!(ok, 40);
}

fn redis_url() -> String {
    std::env::var("TURNPIKE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_redis_limit() {
    let up = echo().await;
    let prefix = format!("turnpike:test:{}:", uuid::Uuid::new_v4());
    let config = yaml(
        up.addr,
        &format!(
            r#"
policies:
  - name: shared
    type: rate_limit
    scope: route
    target: api
    config:
      key: {{by: global}}
      mode: redis
      redis: {{url: "{}", prefix: "{prefix}", timeout: 2s, fail_open: false}}
      limits: [{{requests: 300, per: 1000s, algorithm: sliding_window}}]
"#,
            redis_url()
        ),
    );
    let gws = [
        Gw::start(&config).await,
        Gw::start(&config).await,
        Gw::start(&config).await,
    ];
    let mut set = tokio::task::JoinSet::new();
    for i in 0..450 {
        let url = gws[i % 3].url("/api");
        set.spawn(
            async move { send(req("GET", &url).body(Full::new(Bytes::new())).unwrap()).await },
        );
        if set.len() >= 30 {
            let r = set.join_next().await.unwrap().unwrap();
            assert!(matches!(r.status.as_u16(), 200 | 429), "{}", r.text());
        }
    }
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert!(matches!(r.status.as_u16(), 200 | 429), "{}", r.text());
    }
    // The upstream counts what got through, whichever gateway it came from.
    let ok = up.hits();
    assert!(
        (297..=303).contains(&ok),
        "{ok} requests passed a shared limit of 300"
    );
}

#[tokio::test]
async fn unreachable_redis_fails_open_or_closed_as_configured() {
    let up = echo().await;
    for (fail_open, expected) in [(true, 200u16), (false, 503)] {
        let gw = Gw::start(&yaml(
            up.addr,
            &format!(
                r#"
policies:
  - name: shared
    type: rate_limit
    scope: route
    target: api
    config:
      mode: redis
      redis: {{url: "redis://127.0.0.1:1", timeout: 200ms, fail_open: {fail_open}}}
      limits: [{{requests: 1, per: 1000s}}]
"#
            ),
        ))
        .await;
        for _ in 0..3 {
            let r = call(&gw, "GET", "/api", &[]).await;
            assert_eq!(r.status.as_u16(), expected, "fail_open={fail_open}");
            if expected == 503 {
                assert_eq!(error_code(&r), "rate_limiter_unavailable");
            }
        }
    }
}
