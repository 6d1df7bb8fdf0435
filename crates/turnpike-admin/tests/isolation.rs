//! Team isolation over every endpoint of the table, and the role gates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};
use turnpike_model::mgmt::Kind;

/// One object of every team-scoped kind in team `b`, named `<collection>-b` where free, and
/// a published service with a release.
async fn populate_b(s: &Server) {
    let a = &s.admin;
    s.team("b").await;
    s.post("/admin/v1/users", a, json!({ "name": "bob" }))
        .await
        .expect(201);
    let t = "/admin/v1/teams/b";
    let objects = [
        ("members", json!({ "name": "bob", "role": "viewer" })),
        (
            "secrets",
            json!({ "name": "sec-b", "source": { "env": "K" } }),
        ),
        (
            "certificates",
            json!({ "name": "cert-b", "cert": "PEM", "key_secret": "sec-b" }),
        ),
        (
            "upstreams",
            json!({ "name": "up-b", "targets": [{ "address": "127.0.0.1:9" }] }),
        ),
        (
            "services",
            json!({ "name": "svc-b", "upstream": "up-b", "visibility": "public", "approval": "manual" }),
        ),
        ("routes", json!({ "name": "route-b", "service": "svc-b" })),
        ("plans", json!({ "name": "plan-b" })),
        ("applications", json!({ "name": "app-b" })),
        (
            "credentials",
            json!({ "name": "cred-b", "application": "app-b", "type": "api_key" }),
        ),
        (
            "consumer-groups",
            json!({ "name": "cg-b", "applications": ["app-b"] }),
        ),
        (
            "subscriptions",
            json!({ "name": "sub-b", "application": "app-b", "service_team": "b", "service": "svc-b" }),
        ),
        (
            "policies",
            json!({ "name": "pol-b", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "service", "target": "svc-b" }),
        ),
    ];
    for (collection, spec) in objects {
        s.post(&format!("{t}/{collection}"), a, spec)
            .await
            .expect(201);
    }
    s.call(
        Method::POST,
        &format!("{t}/services/svc-b/publish"),
        Some(a),
        None,
        &[],
    )
    .await
    .expect(200);
}

/// The name of team b's object of the collection in `path`.
fn b_name(path: &str) -> &'static str {
    let collection = path.split('/').nth(5).unwrap_or("");
    match collection {
        "members" => "bob",
        "secrets" => "sec-b",
        "certificates" => "cert-b",
        "upstreams" => "up-b",
        "services" => "svc-b",
        "routes" => "route-b",
        "plans" => "plan-b",
        "applications" => "app-b",
        "credentials" => "cred-b",
        "consumer-groups" => "cg-b",
        "subscriptions" => "sub-b",
        "policies" => "pol-b",
        _ => "b",
    }
}

/// Revisions of everything team b holds, plus its service's releases and bob's tokens.
async fn snapshot_b(s: &Server) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.team_scoped()) {
        let r = s
            .get(
                &format!("/admin/v1/teams/b/{}?limit=500", kind.collection()),
                &s.admin,
            )
            .await
            .expect(200);
        for item in r.body["items"].as_array().unwrap() {
            out.insert(
                format!("{} {}", kind.as_str(), item["name"].as_str().unwrap()),
                json!([item["revision"], item["state"]]),
            );
        }
    }
    let team = s.get("/admin/v1/teams/b", &s.admin).await.expect(200);
    out.insert("team".into(), team.body["revision"].clone());
    let releases = s
        .get("/admin/v1/teams/b/services/svc-b/releases", &s.admin)
        .await
        .expect(200);
    out.insert(
        "releases".into(),
        json!(releases.body["items"].as_array().unwrap().len()),
    );
    let tokens = s
        .get("/admin/v1/users/bob/tokens", &s.admin)
        .await
        .expect(200);
    out.insert("tokens".into(), tokens.body["items"].clone());
    let bob = s.get("/admin/v1/users/bob", &s.admin).await.expect(200);
    out.insert("bob".into(), bob.body["revision"].clone());
    out
}

/// A body that would succeed if authorisation let it through.
fn body_for(path: &str, method: &Method) -> Option<Value> {
    let name = b_name(path);
    let last = path.rsplit('/').next().unwrap_or("");
    match (method.as_str(), last) {
        ("POST", "tokens") => Some(json!({ "name": "stolen" })),
        ("POST", "rollback") => Some(json!({ "release": 1 })),
        ("POST", "import-openapi") => {
            Some(json!({ "openapi": "3.1.0", "paths": { "/x": { "get": {} } } }))
        }
        ("POST", "approve" | "reject" | "revoke" | "publish" | "deprecate" | "retire") => None,
        ("POST", _) => Some(json!({ "name": "intruder" })),
        ("PUT", _) => Some(json!({ "name": name })),
        ("PATCH", _) => Some(json!({})),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_admin_cannot_see_or_touch_another_team() {
    let s = Server::sqlite().await;
    s.team("a").await;
    let alice = s.member("alice", "a", "team_admin").await;
    populate_b(&s).await;
    let bob_token_id = s.get("/admin/v1/users/bob/tokens", &s.admin).await.body["items"]
        .as_array()
        .unwrap()
        .first()
        .map(|t| t["id"].as_str().unwrap().to_owned());
    let bob_token_id = match bob_token_id {
        Some(id) => id,
        None => {
            s.token("bob").await;
            let r = s.get("/admin/v1/users/bob/tokens", &s.admin).await;
            r.body["items"][0]["id"].as_str().unwrap().to_owned()
        }
    };
    let before = snapshot_b(&s).await;

    let doc = turnpike_admin::openapi_document();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let concrete = path
                .replace("{team}", "b")
                .replace("{user}", "bob")
                .replace("{id}", &bob_token_id)
                .replace("{number}", "1")
                .replace("{kind}", "service")
                .replace("{policy_type}", "rate_limit")
                .replace("{name}", b_name(path));
            // A well-formed query, so the answer is about who asks, not what is asked.
            let concrete = match path.as_str() {
                "/admin/v1/analytics/timeseries" => format!("{concrete}?metric=requests"),
                "/admin/v1/analytics/top" => format!("{concrete}?by=route"),
                _ => concrete,
            };
            let body = body_for(path, &method);
            let r = s
                .call(method.clone(), &concrete, Some(&alice), body.as_ref(), &[])
                .await;
            let what = format!("{method} {concrete}");
            if path.starts_with("/admin/v1/teams/{team}")
                || path == "/admin/v1/call-logs/{request_id}"
            {
                // Another team's call answers as if it did not exist.
                r.expect_error(404, "not_found");
            } else if path.starts_with("/admin/v1/users")
                || (path == "/admin/v1/teams" && method == Method::POST)
            {
                r.expect_error(403, "forbidden");
            } else if path == "/admin/v1/audit"
                || path.starts_with("/admin/v1/analytics/")
                || path == "/admin/v1/alerts/history"
                || path == "/admin/v1/cache/purge"
            {
                // Without `team` only super admins may read them (alert history and cache
                // purges: only they).
                r.expect_error(403, "forbidden");
            } else {
                assert!(r.status.is_success(), "{what}: {:#}", r.body);
                if path == "/admin/v1/teams" {
                    let teams: Vec<&str> = r.body["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t["name"].as_str().unwrap())
                        .collect();
                    assert_eq!(teams, ["a"], "{what}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 90, "{checked}");
    s.get("/admin/v1/audit?team=b", &alice)
        .await
        .expect_error(404, "not_found");
    // A subscription of b's naming a's team is not a way in either.
    s.get("/admin/v1/teams/b/subscription-requests", &alice)
        .await
        .expect_error(404, "not_found");

    assert_eq!(snapshot_b(&s).await, before, "team b changed");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_gate_writes() {
    let s = Server::sqlite().await;
    s.team("a").await;
    let a = s.admin.clone();
    s.post(
        "/admin/v1/teams/a/upstreams",
        &a,
        json!({ "name": "up", "targets": [] }),
    )
    .await
    .expect(201);
    let viewer = s.member("vera", "a", "viewer").await;
    let dev = s.member("dave", "a", "consumer_developer").await;
    let owner = s.member("olga", "a", "api_owner").await;
    let admin = s.member("adam", "a", "team_admin").await;

    // A viewer reads but never writes.
    s.get("/admin/v1/teams/a/upstreams", &viewer)
        .await
        .expect(200);
    s.get("/admin/v1/teams/a/upstreams/up", &viewer)
        .await
        .expect(200);
    s.post(
        "/admin/v1/teams/a/applications",
        &viewer,
        json!({ "name": "app" }),
    )
    .await
    .expect_error(403, "forbidden");
    s.delete("/admin/v1/teams/a/upstreams/up", &viewer)
        .await
        .expect_error(403, "forbidden");
    s.patch("/admin/v1/teams/a", &viewer, json!({ "description": "x" }))
        .await
        .expect_error(403, "forbidden");

    // A consumer developer manages applications, not services.
    s.post(
        "/admin/v1/teams/a/services",
        &dev,
        json!({ "name": "svc", "upstream": "up" }),
    )
    .await
    .expect_error(403, "forbidden");
    s.post(
        "/admin/v1/teams/a/applications",
        &dev,
        json!({ "name": "app" }),
    )
    .await
    .expect(201);

    // An API owner manages services, not members.
    s.post(
        "/admin/v1/teams/a/services",
        &owner,
        json!({ "name": "svc", "upstream": "up" }),
    )
    .await
    .expect(201);
    s.post(
        "/admin/v1/teams/a/members",
        &owner,
        json!({ "name": "vera", "role": "api_owner" }),
    )
    .await
    .expect_error(403, "forbidden");
    // Global policies are for super admins only.
    s.post(
        "/admin/v1/teams/a/policies",
        &owner,
        json!({ "name": "g", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "global" }),
    )
    .await
    .expect_error(403, "forbidden");

    // A team admin manages members and its team, but cannot delete it or create teams.
    s.patch(
        "/admin/v1/teams/a/members/vera",
        &admin,
        json!({ "role": "api_owner" }),
    )
    .await
    .expect(200);
    s.patch(
        "/admin/v1/teams/a",
        &admin,
        json!({ "description": "ours" }),
    )
    .await
    .expect(200);
    s.delete("/admin/v1/teams/a", &admin)
        .await
        .expect_error(403, "forbidden");
    s.post("/admin/v1/teams", &admin, json!({ "name": "mine" }))
        .await
        .expect_error(403, "forbidden");

    // The promotion took effect: vera now writes services.
    s.post(
        "/admin/v1/teams/a/services",
        &viewer,
        json!({ "name": "svc2", "upstream": "up" }),
    )
    .await
    .expect(201);

    // Everyone sees itself.
    let me = s.get("/admin/v1/me", &dev).await.expect(200);
    assert_eq!(me.body["user"]["name"], "dave");
    assert_eq!(me.body["super_admin"], false);
    assert_eq!(me.body["memberships"], json!({ "a": "consumer_developer" }));
    s.get("/admin/v1/users/dave", &dev).await.expect(200);
    s.get("/admin/v1/users/vera", &dev)
        .await
        .expect_error(403, "forbidden");
    s.patch("/admin/v1/users/dave", &dev, json!({ "super_admin": true }))
        .await
        .expect_error(403, "forbidden");
    let me = s.get("/admin/v1/me", &a).await.expect(200);
    assert_eq!(me.body["super_admin"], true);
    s.close().await;
}
