//! Protocol-level behaviour: pagination, error shapes for malformed requests, body cap,
//! request ids, and admin tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use common::Server;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_object_once() {
    let s = Server::sqlite().await;
    s.team("t").await;
    let coll = "/admin/v1/teams/t/applications";
    for i in 0..120 {
        s.post(coll, &s.admin, json!({ "name": format!("app-{i:03}") }))
            .await
            .expect(201);
    }
    let mut seen = HashSet::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("{coll}?limit=50&cursor={c}"),
            None => format!("{coll}?limit=50"),
        };
        let r = s.get(&path, &s.admin).await.expect(200);
        let items = r.body["items"].as_array().unwrap();
        pages.push(items.len());
        for item in items {
            assert!(seen.insert(item["name"].as_str().unwrap().to_owned()));
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, [50, 50, 20]);
    assert_eq!(seen.len(), 120);

    let r = s
        .get(&format!("{coll}?name_prefix=app-11"), &s.admin)
        .await
        .expect(200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 10);
    for bad in ["0", "501", "-1", "ten", ""] {
        let r = s
            .get(&format!("{coll}?limit={bad}"), &s.admin)
            .await
            .expect_error(422, "validation_failed");
        assert_eq!(r.body["error"]["field"], "limit");
    }
    // Nothing stored holds a NUL, so such filters match nothing (and never reach the store).
    let r = s
        .get(&format!("{coll}?name_prefix=app%00"), &s.admin)
        .await
        .expect(200);
    assert_eq!(r.body["items"], serde_json::json!([]));
    let r = s
        .get(&format!("{coll}?limit=10&cursor=%00"), &s.admin)
        .await
        .expect(200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 10);
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors() {
    let s = Server::sqlite_with(|state| state.with_max_body_bytes(1024)).await;
    let a = s.admin.clone();
    let url = |p: &str| format!("{}{p}", s.base);

    // Bad JSON.
    let r = s
        .client
        .post(url("/admin/v1/teams"))
        .bearer_auth(&a)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    // Wrong content type.
    let r = s
        .client
        .post(url("/admin/v1/teams"))
        .bearer_auth(&a)
        .header("content-type", "text/plain")
        .body("{\"name\": \"t\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // A body that is JSON but not an object of the right shape.
    s.post("/admin/v1/teams", &a, json!([1, 2]))
        .await
        .expect_error(422, "validation_failed");
    s.post("/admin/v1/teams", &a, json!({ "name": "nul\u{0}" }))
        .await
        .expect_error(422, "validation_failed");

    // Too large, declared or streamed.
    let big = json!({ "name": "t", "description": "x".repeat(2000) });
    s.post("/admin/v1/teams", &a, big)
        .await
        .expect_error(413, "payload_too_large");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b' '; 512])).collect();
    let r = s
        .client
        .post(url("/admin/v1/teams"))
        .bearer_auth(&a)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Unknown paths and methods.
    let r = s
        .get("/admin/v1/nothing/here", &a)
        .await
        .expect_error(404, "route_not_found");
    assert!(r.header("x-request-id").is_some());
    s.call(Method::GET, "/elsewhere", None, None, &[])
        .await
        .expect_error(404, "route_not_found");
    let r = s
        .call(Method::PUT, "/admin/v1/teams", Some(&a), None, &[])
        .await
        .expect_error(405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST"));

    // Request ids are echoed, or made up.
    let r = s
        .call(
            Method::GET,
            "/admin/v1/teams/none",
            Some(&a),
            None,
            &[("x-request-id", "abc-123")],
        )
        .await
        .expect_error(404, "not_found");
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(r.body["error"]["request_id"], "abc-123");
    let r = s.get("/admin/v1/me", &a).await.expect(200);
    assert_eq!(r.header("x-request-id").unwrap().len(), 36);

    // Bad If-Match.
    s.post("/admin/v1/teams", &a, json!({ "name": "t" }))
        .await
        .expect(201);
    s.call(
        Method::PATCH,
        "/admin/v1/teams/t",
        Some(&a),
        Some(&json!({})),
        &[("if-match", "soon")],
    )
    .await
    .expect_error(412, "precondition_failed");
    let r = s
        .call(
            Method::PATCH,
            "/admin/v1/teams/t",
            Some(&a),
            Some(&json!({})),
            &[("if-match", "*")],
        )
        .await
        .expect(200);
    assert_eq!(r.body["revision"], 2);

    // The unauthenticated document and the schemas.
    let r = s
        .call(Method::GET, "/admin/v1/openapi.json", None, None, &[])
        .await
        .expect(200);
    assert_eq!(r.body["openapi"], "3.1.0");
    let r = s.get("/admin/v1/schemas/service", &a).await.expect(200);
    assert_eq!(r.body["title"], "ServiceSpec");
    s.call(Method::GET, "/admin/v1/schemas/service", None, None, &[])
        .await
        .expect_error(401, "unauthorized");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_until_revoked_or_expired() {
    let s = Server::sqlite().await;
    let a = s.admin.clone();

    // No token, a malformed one, an unknown one.
    let r = s
        .call(Method::GET, "/admin/v1/me", None, None, &[])
        .await
        .expect_error(401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    s.call(
        Method::GET,
        "/admin/v1/me",
        None,
        None,
        &[("authorization", "Basic YTpi")],
    )
    .await
    .expect_error(401, "unauthorized");
    s.get("/admin/v1/me", "tp_0000")
        .await
        .expect_error(401, "unauthorized");

    s.post("/admin/v1/users", &a, json!({ "name": "kim" }))
        .await
        .expect(201);
    let r = s
        .post(
            "/admin/v1/users/kim/tokens",
            &a,
            json!({ "name": "laptop", "expires_in": "30d" }),
        )
        .await
        .expect(201);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(r.body["expires_at"].is_string());
    let r = s.get("/admin/v1/me", &secret).await.expect(200);
    assert_eq!(r.body["user"]["name"], "kim");

    // A user manages its own tokens, not others'.
    let r = s
        .post(
            "/admin/v1/users/kim/tokens",
            &secret,
            json!({ "name": "ci" }),
        )
        .await
        .expect(201);
    let ci = r.body["secret"].as_str().unwrap().to_owned();
    s.post(
        "/admin/v1/users/admin/tokens",
        &secret,
        json!({ "name": "x" }),
    )
    .await
    .expect_error(403, "forbidden");
    let r = s
        .get("/admin/v1/users/kim/tokens", &secret)
        .await
        .expect(200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    assert!(!r.body.to_string().contains(&secret));
    for bad in [
        json!({ "name": "x", "expires_in": "soon" }),
        json!({ "name": "x y" }),
        json!({ "name": "x", "scope": 1 }),
    ] {
        s.post("/admin/v1/users/kim/tokens", &secret, bad)
            .await
            .expect_error(422, "validation_failed");
    }

    // Revoked: 401 from then on; other tokens keep working.
    s.delete(&format!("/admin/v1/users/kim/tokens/{id}"), &ci)
        .await
        .expect(204);
    s.get("/admin/v1/me", &secret)
        .await
        .expect_error(401, "unauthorized");
    s.get("/admin/v1/me", &ci).await.expect(200);
    s.delete("/admin/v1/users/kim/tokens/nope", &ci)
        .await
        .expect_error(404, "not_found");
    let r = s.get("/admin/v1/users/kim/tokens", &ci).await.expect(200);
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["revoked"] == true)
    );

    // Expired.
    let kim = s
        .store
        .get_by_name("user", None, "kim")
        .await
        .unwrap()
        .unwrap();
    let mut tx = s.store.begin("test").await.unwrap();
    let (_, expired) = tx
        .create_token(&kim.id, "old", Some(turnpike_store::now_ms() - 1_000))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    s.get("/admin/v1/me", &expired)
        .await
        .expect_error(401, "unauthorized");

    // The library entry point used by `turnpike token create`.
    let cli = turnpike_admin::create_token(
        &s.store,
        "kim",
        "cli",
        Some(std::time::Duration::from_secs(60)),
    )
    .await
    .unwrap();
    s.get("/admin/v1/me", &cli).await.expect(200);
    assert!(
        turnpike_admin::create_token(&s.store, "nobody", "cli", None)
            .await
            .is_err()
    );

    // Disabled users are locked out.
    s.patch("/admin/v1/users/kim", &a, json!({ "disabled": true }))
        .await
        .expect(200);
    s.get("/admin/v1/me", &ci)
        .await
        .expect_error(401, "unauthorized");

    // Deleting a user with memberships is refused; without, allowed.
    s.team("t").await;
    s.post(
        "/admin/v1/teams/t/members",
        &a,
        json!({ "name": "kim", "role": "viewer" }),
    )
    .await
    .expect(201);
    s.delete("/admin/v1/users/kim", &a)
        .await
        .expect_error(409, "conflict");
    s.delete("/admin/v1/teams/t/members/kim", &a)
        .await
        .expect(204);
    s.delete("/admin/v1/users/kim", &a).await.expect(204);
    s.get("/admin/v1/me", &cli)
        .await
        .expect_error(401, "unauthorized");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_super_admin_sets_a_team_route_space() {
    let s = Server::sqlite().await;
    s.team("a").await;
    let ta = s.member("tina", "a", "team_admin").await;
    s.patch("/admin/v1/teams/a", &ta, json!({"path_prefixes": ["/a"]}))
        .await
        .expect_error(403, "forbidden");
    s.patch("/admin/v1/teams/a", &ta, json!({"description": "ours"}))
        .await
        .expect(200);
    let admin = s.admin.clone();
    s.patch(
        "/admin/v1/teams/a",
        &admin,
        json!({"path_prefixes": ["/a"]}),
    )
    .await
    .expect(200);
    // Within the space the team admin still edits freely; the space itself stays put.
    s.patch(
        "/admin/v1/teams/a",
        &ta,
        json!({"description": "still ours"}),
    )
    .await
    .expect(200);
}

/// One stored minute row of `route` at `bucket`.
fn minute_row(bucket: i64, route: &str) -> turnpike_store::RollupRow {
    let mut sketch = turnpike_store::sketch::LatencySketch::new();
    sketch.add(1_000);
    turnpike_store::RollupRow {
        resolution: "minute".into(),
        node: "n1".into(),
        bucket,
        service: "t/svc".into(),
        route: route.into(),
        application: String::new(),
        status: 200,
        requests: 1,
        errors_4xx: 0,
        errors_5xx: 0,
        bytes_in: 0,
        bytes_out: 0,
        latency_sum_us: 1_000,
        sketch: sketch.to_text(),
    }
}

/// Each configured bound on an analytics query answers 422 with its own code and names the
/// parameter to narrow; a query inside the bounds is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_queries_are_bounded_by_configured_limits() {
    let s = Server::sqlite_with(|state| {
        state.with_analytics_limits(turnpike_model::observe::analytics::AnalyticsQueryLimits {
            max_points: 60,
            max_series: 3,
            max_rows: 9,
        })
    })
    .await;
    let t0: i64 = 1_700_000_040_000; // a minute boundary
    // Five routes in the first minute, one more row in each of the next four minutes, and a
    // tenth row after them.
    let mut rows: Vec<_> = (0..5)
        .map(|i| minute_row(t0, &format!("t/svc/r{i}")))
        .collect();
    rows.extend((1..5).map(|m| minute_row(t0 + m * 60_000, "t/svc/r0")));
    rows.push(minute_row(t0 + 7 * 60_000, "t/svc/r0"));
    s.store.put_rollups(&rows).await.unwrap();
    let ts = "/admin/v1/analytics/timeseries?metric=requests";

    let ok = s
        .get(&format!("{ts}&from={t0}&to={}", t0 + 5 * 60_000), &s.admin)
        .await
        .expect(200);
    let points = ok.body["series"][0]["points"].as_array().unwrap();
    let total: u64 = points.iter().map(|p| p[1].as_u64().unwrap()).sum();
    assert_eq!((points.len(), total), (5, 9));

    let r = s
        .get(&format!("{ts}&from={t0}&to={}", t0 + 61 * 60_000), &s.admin)
        .await
        .expect_error(422, "too_many_points");
    assert_eq!(r.body["error"]["field"], "from", "{:#}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_points")
    );

    s.get(
        &format!("{ts}&from={t0}&to={}&group_by=route", t0 + 60_000),
        &s.admin,
    )
    .await
    .expect_error(422, "too_many_series");
    // Filtered to fewer series, the same grouping is answered.
    s.get(
        &format!(
            "{ts}&from={t0}&to={}&group_by=route&route=t/svc/r0",
            t0 + 60_000
        ),
        &s.admin,
    )
    .await
    .expect(200);

    // Ten rows in the range, nine allowed: time series and top-N both refuse.
    s.get(&format!("{ts}&from={t0}&to={}", t0 + 10 * 60_000), &s.admin)
        .await
        .expect_error(422, "too_many_rows");
    s.get(
        &format!(
            "/admin/v1/analytics/top?by=route&from={t0}&to={}",
            t0 + 10 * 60_000
        ),
        &s.admin,
    )
    .await
    .expect_error(422, "too_many_rows");
    s.close().await;
}
