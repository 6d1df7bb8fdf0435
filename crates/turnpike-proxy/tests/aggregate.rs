//! `aggregate` end to end: a composite route calling several mock upstreams concurrently,
//! with a slow part, a failing part, templated calls, merges and fan-out writes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// An upstream answering `status` with JSON: the fixed `body` merged with what it received.
async fn part(status: u16, body: Value, delay: Duration) -> Mock {
    Mock::start(move |req| {
        let body = body.clone();
        async move {
            let (parts, b) = req.into_parts();
            let got = b.collect().await.unwrap().to_bytes();
            tokio::time::sleep(delay).await;
            let mut answer = body;
            if let Value::Object(m) = &mut answer {
                m.insert(
                    "_seen".into(),
                    json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.path_and_query().map(|p| p.as_str()),
                        "tenant": parts.headers.get("x-tenant").map(|v| v.to_str().unwrap()),
                        "xff": parts.headers.get("x-forwarded-for").map(|v| v.to_str().unwrap()),
                        "body": String::from_utf8_lossy(&got),
                    }),
                );
            }
            let mut r = Response::new(full(answer.to_string()));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
    })
    .await
}

fn gw_yaml(ups: &[(&str, std::net::SocketAddr)], policy: &str) -> String {
    let upstreams: String = ups
        .iter()
        .map(|(n, a)| {
            format!(
                "  - {{name: {n}, targets: [{{address: \"{a}\"}}], retries: {{attempts: 0}}}}\n"
            )
        })
        .collect();
    format!(
        r#"
upstreams:
{upstreams}routes:
  - {{name: profile, paths: [{{template: "/profile/{{id}}"}}], upstream: {first}}}
policies:
  - name: agg
    type: aggregate
    scope: route
    target: profile
    config:
{policy}"#,
        first = ups[0].0
    )
}

#[tokio::test]
async fn keys_merge_with_one_slow_and_one_failing_optional_part() {
    let user = part(200, json!({"id": 7, "name": "Ada"}), Duration::ZERO).await;
    // Slow, but within its timeout: it is waited for.
    let orders = part(200, json!({"count": 3}), Duration::from_millis(300)).await;
    // Far slower than its timeout: cut off, and optional.
    let recs = part(200, json!({"items": []}), Duration::from_secs(30)).await;
    // Failing (500), optional.
    let ads = part(500, json!({"oops": true}), Duration::ZERO).await;
    let gw = Gw::start(&gw_yaml(
        &[("users", user.addr), ("orders", orders.addr), ("recs", recs.addr), ("ads", ads.addr)],
        r#"      calls:
        - {name: user, upstream: users, path: "/users/${param.id}", headers: {x-tenant: "${header.x-tenant}"}}
        - {name: orders, upstream: orders, path: "/orders?user=${param.id}", timeout: 5s}
        - {name: recs, upstream: recs, path: "/recs/${param.id}", timeout: 200ms, required: false}
        - {name: ads, upstream: ads, path: "/ads", required: false}
"#,
    ))
    .await;
    let started = std::time::Instant::now();
    let r = call(&gw, "GET", "/profile/7", &[("x-tenant", "acme")]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        took < Duration::from_secs(10),
        "the slow optional part is cut off: {took:?}"
    );
    let j = r.json();
    assert_eq!(j["user"]["name"], "Ada");
    assert_eq!(j["user"]["_seen"]["path"], "/users/7");
    assert_eq!(j["user"]["_seen"]["tenant"], "acme");
    assert_eq!(
        j["user"]["_seen"]["xff"], "127.0.0.1",
        "calls carry the forwarding headers"
    );
    assert_eq!(j["orders"]["count"], 3);
    assert_eq!(j["orders"]["_seen"]["path"], "/orders?user=7");
    assert_eq!(j["recs"], Value::Null);
    assert_eq!(j["ads"], Value::Null);
    assert_eq!(j["_partial"]["recs"]["code"], "upstream_timeout");
    assert_eq!(j["_partial"]["ads"]["status"], 500);
    assert_eq!(r.header("x-partial-response"), Some("recs, ads"));
}

#[tokio::test]
async fn a_failing_required_part_fails_the_answer() {
    let user = part(200, json!({"id": 7}), Duration::ZERO).await;
    let orders = part(503, json!({}), Duration::ZERO).await;
    let gw = Gw::start(&gw_yaml(
        &[("users", user.addr), ("orders", orders.addr)],
        r#"      calls:
        - {name: user, upstream: users, path: "/users/${param.id}"}
        - {name: orders, upstream: orders, path: "/orders"}
"#,
    ))
    .await;
    let r = call(&gw, "GET", "/profile/7", &[]).await;
    assert_eq!(r.status, 502);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "aggregate_failed");
    assert!(e["message"].as_str().unwrap().contains("`orders`"), "{e}");
}

#[tokio::test]
async fn deep_merge() {
    let a = part(
        200,
        json!({"user": {"id": 7, "name": "Ada"}, "v": 1}),
        Duration::ZERO,
    )
    .await;
    let b = part(
        200,
        json!({"user": {"email": "ada@example.com"}, "v": 2}),
        Duration::ZERO,
    )
    .await;
    let gw = Gw::start(&gw_yaml(
        &[("a", a.addr), ("b", b.addr)],
        r#"      merge: deep
      calls:
        - {name: a, upstream: a, path: "/a"}
        - {name: b, upstream: b, path: "/b"}
"#,
    ))
    .await;
    let r = call(&gw, "GET", "/profile/1", &[]).await;
    let j = r.json();
    assert_eq!(
        j["user"],
        json!({"id": 7, "name": "Ada", "email": "ada@example.com"})
    );
    assert_eq!(j["v"], 2, "later calls win");
}

#[tokio::test]
async fn fan_out_writes_report_each_status() {
    let a = part(201, json!({"ok": true}), Duration::ZERO).await;
    let b = part(409, json!({"conflict": true}), Duration::ZERO).await;
    let dead = dead_addr().await;
    let gw = Gw::start(&gw_yaml(
        &[("a", a.addr), ("b", b.addr), ("c", dead)],
        r#"      merge: statuses
      calls:
        - {name: a, upstream: a, method: PUT, path: "/items/${param.id}", body: {item: "${body}", by: "${header.x-user}"}}
        - {name: b, upstream: b, method: PUT, path: "/items/${param.id}", body: "${body/name}"}
        - {name: c, upstream: c, method: PUT, path: "/items/${param.id}", body: "${body}"}
"#,
    ))
    .await;
    let resp = send(
        req("POST", &gw.url("/profile/9"))
            .header("content-type", "application/json")
            .header("x-user", "u1")
            .body(Full::new(Bytes::from(r#"{"name":"widget"}"#)))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 207);
    let j = resp.json();
    let res = &j["results"];
    assert_eq!(res["a"]["status"], 201);
    assert_eq!(res["a"]["body"]["_seen"]["method"], "PUT");
    assert_eq!(
        serde_json::from_str::<Value>(res["a"]["body"]["_seen"]["body"].as_str().unwrap()).unwrap(),
        json!({"item": {"name": "widget"}, "by": "u1"})
    );
    assert_eq!(res["b"]["status"], 409);
    assert_eq!(res["b"]["body"]["_seen"]["body"], "\"widget\"");
    assert_eq!(res["c"]["status"], 502);
    assert_eq!(res["c"]["error"]["code"], "upstream_unreachable");
}

/// Calls default to GET whatever the client's method, and a query value cannot add
/// parameters to a call.
#[tokio::test]
async fn calls_default_to_get_and_values_stay_in_their_parameter() {
    let a = part(200, json!({}), Duration::ZERO).await;
    let gw = Gw::start(&gw_yaml(
        &[("a", a.addr)],
        r#"      calls:
        - {name: a, upstream: a, path: "/search/${param.id}?q=${query.q}&limit=10"}
"#,
    ))
    .await;
    let r = call(
        &gw,
        "DELETE",
        "/profile/x%3Fy?q=a%26limit%3D100000%26admin%3Dtrue",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &r.json()["a"]["_seen"];
    assert_eq!(seen["method"], "GET");
    assert_eq!(
        seen["path"],
        "/search/x%3Fy?q=a%26limit%3D100000%26admin%3Dtrue&limit=10"
    );
}
