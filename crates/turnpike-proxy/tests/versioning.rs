//! Versioned APIs end to end: a version chosen by path, header, vendor media type or query
//! reaches its own route (upstream and policies); deprecated versions announce it, retired
//! ones answer 410 with their successor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http::Response;
use serde_json::json;

/// An upstream answering with its name and the path it got.
async fn named(name: &'static str) -> Mock {
    Mock::start(move |req| async move {
        let body = json!({"served_by": name, "path": req.uri().path()});
        let mut r = Response::new(full(body.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r.headers_mut()
            .insert("link", "</users?page=2>; rel=\"next\"".parse().unwrap());
        r
    })
    .await
}

async fn gateway(v1: &Mock, v2: &Mock) -> Gw {
    Gw::start(&format!(
        r#"
upstreams:
  - {{name: v1, targets: [{{address: "{}"}}]}}
  - {{name: v2, targets: [{{address: "{}"}}]}}
versioning:
  - name: users
    default: "2"
    versions:
      - {{name: "0", retired: true, successor: "2"}}
      - name: "1"
        deprecated: "2026-06-01T00:00:00Z"
        sunset: "2027-01-01T00:00:00Z"
        link: https://docs.example.com/users/v1-deprecation
        successor: "2"
      - {{name: "2"}}
routes:
  - {{name: users-v0, paths: [{{prefix: /users}}], upstream: v1, api_version: {{api: users, name: "0"}}}}
  - {{name: users-v1, paths: [{{prefix: /users}}], upstream: v1, api_version: {{api: users, name: "1"}}}}
  - {{name: users-v2, paths: [{{prefix: /users}}], upstream: v2, api_version: {{api: users, name: "v2"}}}}
  - {{name: static, paths: [{{prefix: /v9/static}}], upstream: v1}}
policies:
  - name: v2-only
    type: response_transform
    scope: route
    target: users-v2
    config: {{headers: {{set: {{x-version-policy: "v2"}}}}}}
"#,
        v1.addr, v2.addr
    ))
    .await
}

#[tokio::test]
async fn each_strategy_reaches_its_version() {
    let (v1, v2) = (named("v1").await, named("v2").await);
    let gw = gateway(&v1, &v2).await;
    // (request path, headers, upstream that answers, path it gets)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case<'_>] = &[
        ("/v1/users/7", &[], "v1", "/users/7"),
        ("/v2/users/7", &[], "v2", "/users/7"),
        ("/V1/users", &[], "v1", "/users"),
        ("/users/7", &[("x-api-version", "1")], "v1", "/users/7"),
        ("/users/7", &[("x-api-version", "v1")], "v1", "/users/7"),
        (
            "/users/7",
            &[("accept", "text/html, application/vnd.users.v1+json;q=0.9")],
            "v1",
            "/users/7",
        ),
        (
            "/users/7?api-version=1",
            &[],
            "v1",
            "/users/7?api-version=1",
        ),
        ("/users/7", &[], "v2", "/users/7"),
        // The first strategy that names a version decides: the path before the header.
        ("/v2/users", &[("x-api-version", "1")], "v2", "/users"),
    ];
    for (path, headers, want, upstream_path) in cases {
        let r = call(&gw, "GET", path, headers).await;
        assert_eq!(r.status, 200, "{path} {headers:?}: {}", r.text());
        let j = r.json();
        assert_eq!(j["served_by"], *want, "{path} {headers:?}");
        assert_eq!(
            j["path"].as_str().unwrap(),
            upstream_path.split('?').next().unwrap(),
            "{path}"
        );
        // Each version has its own policies.
        assert_eq!(
            r.header("x-version-policy"),
            (*want == "v2").then_some("v2"),
            "{path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn deprecated_versions_announce_it_and_retired_ones_answer_410() {
    let (v1, v2) = (named("v1").await, named("v2").await);
    let gw = gateway(&v1, &v2).await;
    let r = call(&gw, "GET", "/v1/users/7", &[]).await;
    assert_eq!(r.status, 200);
    // 2026-06-01T00:00:00Z
    assert_eq!(r.header("deprecation"), Some("@1780272000"));
    assert_eq!(r.header("sunset"), Some("Fri, 01 Jan 2027 00:00:00 GMT"));
    let links: Vec<&str> = r
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        links.contains(&"</users?page=2>; rel=\"next\""),
        "the upstream's links stay: {links:?}"
    );
    assert!(links.contains(&"<https://docs.example.com/users/v1-deprecation>; rel=\"deprecation\"; type=\"text/html\""), "{links:?}");
    assert!(
        links.contains(&"</v2/users/7>; rel=\"successor-version\""),
        "{links:?}"
    );
    // By header: announced too, without a successor URL (the path does not name it).
    let r = call(&gw, "GET", "/users/7", &[("x-api-version", "1")]).await;
    assert_eq!(r.header("deprecation"), Some("@1780272000"));
    // The current version says nothing.
    let r = call(&gw, "GET", "/v2/users/7", &[]).await;
    assert!(r.header("deprecation").is_none() && r.header("sunset").is_none());

    let r = call(&gw, "GET", "/v0/users/7", &[]).await;
    assert_eq!(r.status, 410);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "api_retired");
    assert!(
        e["message"].as_str().unwrap().contains("use version `2`"),
        "{e}"
    );
    assert_eq!(
        r.header("link"),
        Some("</v2/users/7>; rel=\"successor-version\"")
    );
    assert_eq!(
        v1.hits() + v2.hits(),
        3,
        "the retired version reached no upstream"
    );
}

#[tokio::test]
async fn unversioned_paths_and_unknown_versions() {
    let (v1, v2) = (named("v1").await, named("v2").await);
    let gw = gateway(&v1, &v2).await;
    // `/v9/...` names no version of the API: routed as it is.
    let r = call(&gw, "GET", "/v9/static/x", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/v9/static/x");
    let r = call(&gw, "GET", "/v9/users", &[]).await;
    assert_eq!(r.status, 404);
    let r = call(&gw, "GET", "/users", &[("x-api-version", "9")]).await;
    assert_eq!(r.status, 404);
}

/// A path naming a version no route serves is not taken by the default version's catch-all,
/// and versioned answers vary by the headers that choose them.
#[tokio::test]
async fn unserved_path_versions_do_not_fall_to_the_default_and_answers_vary() {
    let v2 = named("v2").await;
    let gw = Gw::start(&format!(
        r#"
upstreams: [{{name: v2, targets: [{{address: "{}"}}]}}]
versioning:
  - {{name: api, default: "2", versions: [{{name: "0", retired: true}}, {{name: "2"}}]}}
routes:
  - {{name: all-v2, paths: [{{prefix: /}}], upstream: v2, api_version: {{api: api, name: "2"}}}}
"#,
        v2.addr
    ))
    .await;
    assert_eq!(call(&gw, "GET", "/v0/users", &[]).await.status, 404);
    let r = call(&gw, "GET", "/users", &[]).await;
    assert_eq!(r.status, 200);
    let vary: Vec<&str> = r
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        vary.contains(&"x-api-version") && vary.contains(&"accept"),
        "{vary:?}"
    );
    // `q=0` refuses a media type: it names no version.
    let r = call(
        &gw,
        "GET",
        "/users",
        &[("accept", "application/vnd.api.v0+json;q=0")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["served_by"], "v2");
    assert_eq!(v2.hits(), 2);
}

#[tokio::test]
async fn bad_versioning_is_refused_naming_the_field() {
    for (versioning, route_version, path) in [
        (
            r#"[{name: users, versions: [{name: "1"}]}]"#,
            r#"{api: nope, name: "1"}"#,
            "routes[0].api_version.api",
        ),
        (
            r#"[{name: users, versions: [{name: "1"}]}]"#,
            r#"{api: users, name: "3"}"#,
            "routes[0].api_version.name",
        ),
        (
            r#"[{name: users, default: "2", versions: [{name: "1"}]}]"#,
            r#"{api: users, name: "1"}"#,
            "versioning[0].default",
        ),
        (
            r#"[{name: users, versions: [{name: "1", sunset: "soon"}]}]"#,
            r#"{api: users, name: "1"}"#,
            "versioning[0].versions[0].sunset",
        ),
        (
            r#"[{name: users, versions: [{name: "1", successor: "5"}]}]"#,
            r#"{api: users, name: "1"}"#,
            "versioning[0].versions[0].successor",
        ),
        (
            r#"[{name: users, versions: [{name: "1"}, {name: "v1"}]}]"#,
            r#"{api: users, name: "1"}"#,
            "versioning[0].versions[1].name",
        ),
    ] {
        let cfg = config(&format!(
            r#"
upstreams: [{{name: up, targets: [{{address: "127.0.0.1:9"}}]}}]
versioning: {versioning}
routes: [{{name: r, paths: [{{prefix: /users}}], upstream: up, api_version: {route_version}}}]
"#
        ));
        let err = turnpike_model::validate(&cfg).unwrap_err().to_string();
        assert!(err.contains(path), "{path}: {err}");
    }
}
