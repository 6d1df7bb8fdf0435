//! The management workflows driven through the Admin API and seen at the gateway: a
//! subscription requested, approved and revoked; a service published, rolled back,
//! deprecated and retired.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Env, env};
use serde_json::{Value, json};
use std::time::Duration;
use turnpike_proxy::demo::DemoServer;

/// Team `acme` with upstream `backend` and a service `pay` with one route under `/pay`.
async fn provider(e: &Env, approval: &str) {
    e.pay_service(
        json!({"approval": approval, "successor": "https://example.com/pay/v2",
               "sunset": "2031-06-30T00:00:00Z"}),
        &[],
    )
    .await;
}

/// Team `shop` with application `web` and an API key for it; returns the key.
async fn consumer(e: &Env) -> String {
    e.post("/teams", json!({"name": "shop"})).await;
    e.post("/teams/shop/applications", json!({"name": "web"}))
        .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "web-key", "application": "web", "type": "api_key"}),
    )
    .await["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_approval_and_revocation_reach_the_gateway() {
    let e = env().await;
    provider(&e, "manual").await;
    let key = consumer(&e).await;
    e.post(
        "/teams/shop/subscriptions",
        json!({"name": "web-pay", "application": "web", "service_team": "acme", "service": "pay"}),
    )
    .await;
    e.settled().await;
    assert_eq!(
        e.code("/pay", None).await,
        (401, "credential_missing".into())
    );
    assert_eq!(
        e.code("/pay", Some(&key)).await,
        (403, "subscription_required".into())
    );

    e.post(
        "/teams/shop/subscriptions/web-pay/approve",
        json!({"reason": "contract signed"}),
    )
    .await;
    let took = e.settled().await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    let resp = e.call("/pay", Some(&key)).await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    assert!(
        echo["headers"].get("x-api-key").is_none(),
        "the key must not reach the upstream"
    );
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    assert!(
        echo["headers"].get("x-api-key").is_none(),
        "the key must not reach the upstream"
    );

    e.post("/teams/shop/subscriptions/web-pay/revoke", json!({}))
        .await;
    e.settled().await;
    assert_eq!(
        e.code("/pay", Some(&key)).await,
        (403, "subscription_required".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_rollback_deprecation_and_retirement_at_the_gateway() {
    let e = env().await;
    provider(&e, "auto").await;
    e.settled().await;
    let echo: Value = e.call("/pay/x", None).await.json().await.unwrap();
    assert_eq!(echo["path"], "/echo");

    // Editing the route changes nothing until the service is published again.
    e.admin(
        reqwest::Method::PATCH,
        "/teams/acme/routes/charge",
        json!({"rewrite": {"template": "/anything/v2"}}),
    )
    .await;
    e.settled().await;
    let echo: Value = e.call("/pay/x", None).await.json().await.unwrap();
    assert_eq!(echo["path"], "/echo", "a draft edit must not be served");
    e.post("/teams/acme/services/pay/publish", json!({"note": "v2"}))
        .await;
    e.settled().await;
    let echo: Value = e.call("/pay/x", None).await.json().await.unwrap();
    assert_eq!(echo["path"], "/anything/v2");

    // Rolling back to release 1 serves its content again.
    e.post("/teams/acme/services/pay/rollback", json!({"release": 1}))
        .await;
    e.settled().await;
    let echo: Value = e.call("/pay/x", None).await.json().await.unwrap();
    assert_eq!(echo["path"], "/echo");

    e.post("/teams/acme/services/pay/deprecate", json!({}))
        .await;
    e.settled().await;
    let resp = e.call("/pay/x", None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("deprecation"));
    assert_eq!(resp.headers()["sunset"], "Mon, 30 Jun 2031 00:00:00 GMT");
    assert_eq!(
        resp.headers()["link"],
        "<https://example.com/pay/v2>; rel=\"successor-version\""
    );

    e.post("/teams/acme/services/pay/retire", json!({})).await;
    e.settled().await;
    assert_eq!(e.code("/pay/x", None).await, (410, "api_retired".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_routes_only_within_its_space() {
    let e = env().await;
    e.post(
        "/teams",
        json!({"name": "acme", "path_prefixes": ["/acme"]}),
    )
    .await;
    e.post(
        "/teams/acme/upstreams",
        json!({"name": "backend", "targets": [{"address": e.upstream}]}),
    )
    .await;
    e.post(
        "/teams/acme/services",
        json!({"name": "svc", "upstream": "backend"}),
    )
    .await;
    // A catch-all route would take every other team's traffic: refused.
    let resp = e
        .http
        .post(format!("{}/teams/acme/routes", e.admin))
        .bearer_auth(&e.token)
        .json(&json!({"name": "all", "service": "svc", "priority": 1000000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "paths", "{body}");
    e.post(
        "/teams/acme/routes",
        json!({"name": "own", "service": "svc", "paths": [{"prefix": "/acme"}],
               "rewrite": {"template": "/echo"}}),
    )
    .await;
    e.post("/teams/acme/services/svc/publish", json!({})).await;
    e.settled().await;
    assert_eq!(e.call("/acme/x", None).await.status(), 200);

    // Narrowing the space later takes the route out at the gateway, whatever was released.
    e.admin(
        reqwest::Method::PATCH,
        "/teams/acme",
        json!({"path_prefixes": ["/elsewhere"]}),
    )
    .await;
    e.settled().await;
    assert_eq!(e.call("/acme/x", None).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_manual_approval_applies_without_a_new_release() {
    let e = env().await;
    provider(&e, "auto").await;
    e.settled().await;
    assert_eq!(e.call("/pay", None).await.status(), 200);
    e.admin(
        reqwest::Method::PATCH,
        "/teams/acme/services/pay",
        json!({"approval": "manual"}),
    )
    .await;
    e.settled().await;
    assert_eq!(
        e.code("/pay", None).await,
        (401, "credential_missing".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_the_admin_api_reach_the_gateway() {
    let e = env().await;
    provider(&e, "auto").await;
    e.post("/teams", json!({"name": "shop"})).await;
    e.post("/teams/shop/applications", json!({"name": "web"}))
        .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "web-basic", "application": "web", "type": "basic",
               "username": "web", "password": "pw-123456"}),
    )
    .await;

    // The schemas of the policy types are published.
    let types = e
        .admin(reqwest::Method::GET, "/schemas/policies", Value::Null)
        .await;
    assert!(
        types["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["type"] == "rate_limit" && t["stage"] == "limit")
    );
    let schema = e
        .admin(
            reqwest::Method::GET,
            "/schemas/policies/rate_limit",
            Value::Null,
        )
        .await;
    assert!(schema["properties"]["limits"].is_object(), "{schema}");
    let resp = e
        .http
        .get(format!("{}/schemas/policies/teleport", e.admin))
        .bearer_auth(&e.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // A bad config is refused with the field named.
    let resp = e
        .http
        .post(format!("{}/teams/acme/policies", e.admin))
        .bearer_auth(&e.token)
        .json(
            &json!({"name": "bad", "type": "rate_limit", "scope": "route", "target": "charge",
                      "config": {"limits": [{"requests": 0, "per": "1s"}]}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body.to_string().contains("config.limits[0].requests"),
        "{body}"
    );

    // Service and route policies ship with a release.
    e.post(
        "/teams/acme/policies",
        json!({"name": "login", "type": "basic_auth", "scope": "service", "target": "pay"}),
    )
    .await;
    e.post(
        "/teams/acme/policies",
        json!({"name": "per-app", "type": "rate_limit", "scope": "route", "target": "charge",
               "config": {"key": {"by": "application"}, "limits": [{"requests": 2, "per": "1000s"}]}}),
    )
    .await;
    e.settled().await;
    assert_eq!(
        e.call("/pay", None).await.status(),
        200,
        "not published yet"
    );
    e.post("/teams/acme/services/pay/publish", json!({})).await;
    e.settled().await;
    assert_eq!(
        e.code("/pay", None).await,
        (401, "credential_missing".into())
    );
    let basic = |user: &str, pw: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };
    let with_basic = |pw: &'static str| {
        e.http
            .get(format!("{}/pay", e.gateway))
            .header("authorization", basic("web", pw))
            .send()
    };
    assert_eq!(with_basic("wrong").await.unwrap().status(), 401);
    let ok = with_basic("pw-123456").await.unwrap();
    assert_eq!(ok.status(), 200);
    let echo: Value = ok.json().await.unwrap();
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    assert_eq!(with_basic("pw-123456").await.unwrap().status(), 200);
    let limited = with_basic("pw-123456").await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));

    // The consumer's team cannot lift the provider's limit with a lenient one of its own:
    // an application's limits add to the route's.
    e.post(
        "/teams/shop/policies",
        json!({"name": "web-limit", "type": "rate_limit", "scope": "application", "target": "web",
               "config": {"key": {"by": "application"}, "limits": [{"requests": 1000, "per": "1000s"}]}}),
    )
    .await;
    e.settled().await;
    for _ in 0..3 {
        assert_eq!(with_basic("pw-123456").await.unwrap().status(), 429);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_teams_groups_and_broken_policies_cannot_open_a_route() {
    let e = env().await;
    provider(&e, "auto").await;
    let key = consumer(&e).await;
    // shop's own group called `partners` is not acme's `partners`.
    e.post(
        "/teams/shop/consumer-groups",
        json!({"name": "partners", "applications": ["web"]}),
    )
    .await;
    e.post(
        "/teams/acme/policies",
        json!({"name": "keys", "type": "key_auth", "scope": "service", "target": "pay"}),
    )
    .await;
    e.post(
        "/teams/acme/policies",
        json!({"name": "partners-only", "type": "acl", "scope": "service", "target": "pay",
               "config": {"allow_groups": ["partners"]}}),
    )
    .await;
    e.post("/teams/acme/services/pay/publish", json!({})).await;
    e.settled().await;
    assert_eq!(
        e.code("/pay", Some(&key)).await,
        (403, "access_denied".into())
    );

    // A policy naming an application that does not exist cannot be compiled: the routes it
    // covers refuse requests rather than lose their guard (and the store's other changes
    // still reach the gateway).
    e.admin(
        reqwest::Method::PATCH,
        "/teams/acme/policies/keys",
        json!({"config": {"anonymous": "acme/ghost"}}),
    )
    .await;
    e.post("/teams/acme/services/pay/publish", json!({})).await;
    e.settled().await;
    assert_eq!(e.code("/pay", None).await, (403, "ip_denied".into()));
    assert_eq!(e.code("/pay", Some(&key)).await, (403, "ip_denied".into()));
}

#[tokio::test]
async fn blue_green_is_one_call_and_store_policies_split_traffic() {
    let e = env().await;
    provider(&e, "auto").await;
    let green = DemoServer::start("127.0.0.1:0".parse().unwrap(), "green")
        .await
        .unwrap();
    e.post(
        "/teams/acme/upstreams",
        json!({"name": "green", "targets": [{"address": green.local_addr().to_string()}]}),
    )
    .await;
    e.settled().await;
    let served_by = |r: reqwest::Response| {
        r.headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(served_by(e.call("/pay/x", None).await), "up");

    // Blue/green: one call releases the service on the other upstream.
    let switched = e
        .post(
            "/teams/acme/services/pay/switch",
            json!({"upstream": "green"}),
        )
        .await;
    assert_eq!(switched["release"]["number"], 2, "{switched}");
    e.settled().await;
    assert_eq!(served_by(e.call("/pay/x", None).await), "green");
    // The working spec followed: publishing again does not switch back.
    e.post("/teams/acme/services/pay/publish", json!({})).await;
    e.settled().await;
    assert_eq!(served_by(e.call("/pay/x", None).await), "green");
    // An unknown upstream is refused and changes nothing.
    let bad = e
        .http
        .post(format!("{}/teams/acme/services/pay/switch", e.admin))
        .bearer_auth(&e.token)
        .json(&json!({"upstream": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    e.post(
        "/teams/acme/services/pay/switch",
        json!({"upstream": "backend"}),
    )
    .await;
    e.settled().await;
    assert_eq!(served_by(e.call("/pay/x", None).await), "up");

    // A/B from the store: the team's upstream names are its own.
    e.post(
        "/teams/acme/policies",
        json!({"name": "beta", "type": "traffic_split", "scope": "service", "target": "pay",
               "config": {"rules": [{"headers": [{"name": "x-beta", "equals": "1"}],
                                     "upstream": "green"}]}}),
    )
    .await;
    e.post("/teams/acme/services/pay/publish", json!({})).await;
    e.settled().await;
    assert_eq!(served_by(e.call("/pay/x", None).await), "up");
    let beta = e
        .http
        .get(format!("{}/pay/x", e.gateway))
        .header("x-beta", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(beta), "green");
}

/// `waf` and `request_validation` (against the service's own OpenAPI document) created
/// through the Admin API, shipped with a release, enforced at the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_policies_from_the_admin_api() {
    let e = env().await;
    e.post("/teams", json!({"name": "acme"})).await;
    e.post(
        "/teams/acme/upstreams",
        json!({"name": "backend", "targets": [{"address": e.upstream}]}),
    )
    .await;
    let openapi = json!({
        "openapi": "3.1.0",
        "info": {"title": "Orders", "version": "1"},
        "servers": [{"url": "/orders"}],
        "paths": {"/items/{id}": {"get": {"parameters": [
            {"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}
        ]}}}
    });
    e.post(
        "/teams/acme/services",
        json!({"name": "orders", "upstream": "backend", "visibility": "public", "openapi": openapi}),
    )
    .await;
    e.post(
        "/teams/acme/routes",
        json!({"name": "items", "service": "orders", "paths": [{"prefix": "/orders"}],
               "rewrite": {"template": "/echo"}}),
    )
    .await;
    // The schema is published, and a bad config is refused naming the field.
    let schema = e
        .admin(reqwest::Method::GET, "/schemas/policies/waf", Value::Null)
        .await;
    assert!(schema["properties"]["exclusions"].is_object(), "{schema}");
    let resp = e
        .http
        .post(format!("{}/teams/acme/policies", e.admin))
        .bearer_auth(&e.token)
        .json(
            &json!({"name": "bad", "type": "waf", "scope": "service", "target": "orders",
                      "config": {"max_args": 0}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("config.max_args"));

    e.post(
        "/teams/acme/policies",
        json!({"name": "contract", "type": "request_validation", "scope": "service",
               "target": "orders", "config": {"use_service_openapi": true}}),
    )
    .await;
    e.post(
        "/teams/acme/policies",
        json!({"name": "firewall", "type": "waf", "scope": "route", "target": "items"}),
    )
    .await;
    e.post("/teams/acme/services/orders/publish", json!({}))
        .await;
    e.settled().await;

    assert_eq!(e.call("/orders/items/7", None).await.status(), 200);
    assert_eq!(
        e.code("/orders/items/seven", None).await,
        (400, "request_invalid".into())
    );
    assert_eq!(
        e.code("/orders/nothing", None).await,
        (400, "request_invalid".into())
    );
    assert_eq!(
        e.code("/orders/items/7?q=%3Cscript%3Ealert(1)%3C/script%3E", None)
            .await,
        (403, "waf_blocked".into())
    );
}
