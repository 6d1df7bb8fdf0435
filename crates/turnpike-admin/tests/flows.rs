//! The workflows: subscriptions with approval, the service lifecycle and its releases,
//! OpenAPI import.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

async fn post_empty(s: &Server, path: &str, token: &str) -> common::Resp {
    s.call(Method::POST, path, Some(token), None, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_with_manual_approval() {
    let s = Server::sqlite().await;
    let admin = s.admin.clone();
    s.team("a").await;
    s.team("b").await;
    s.team("c").await;
    let olga = s.member("olga", "a", "api_owner").await;
    let carl = s.member("carl", "b", "consumer_developer").await;
    let chris = s.member("chris", "c", "team_admin").await;
    let a = "/admin/v1/teams/a";
    let b = "/admin/v1/teams/b";
    s.post(
        &format!("{a}/upstreams"),
        &olga,
        json!({ "name": "up", "targets": [] }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{a}/services"),
        &olga,
        json!({ "name": "pay", "upstream": "up", "visibility": "public", "approval": "manual" }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{a}/services"),
        &olga,
        json!({ "name": "secret-svc", "upstream": "up" }),
    )
    .await
    .expect(201);
    s.post(&format!("{a}/plans"), &olga, json!({ "name": "basic" }))
        .await
        .expect(201);

    // The consumer: an application and an API key, whose secret is shown once.
    s.post(
        &format!("{b}/applications"),
        &carl,
        json!({ "name": "shop" }),
    )
    .await
    .expect(201);
    let r = s
        .post(
            &format!("{b}/credentials"),
            &carl,
            json!({ "name": "shop-key", "application": "shop", "type": "api_key", "hash": "forged" }),
        )
        .await
        .expect(201);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("tpk_") && secret.len() == 4 + 64,
        "{secret}"
    );
    assert_eq!(r.body["spec"]["prefix"], &secret[..8]);
    assert!(r.body["spec"].get("hash").is_none());
    let r = s
        .get(&format!("{b}/credentials/shop-key"), &carl)
        .await
        .expect(200);
    assert!(r.body.get("secret").is_none());
    assert!(!r.body.to_string().contains(&secret));
    assert!(r.body["spec"].get("hash").is_none());
    let r = s.get(&format!("{b}/credentials"), &carl).await.expect(200);
    assert!(!r.body.to_string().contains(&secret));
    // The store keeps the key's SHA-256 (and prefix), not what the client sent.
    let team_b = s.get(b, &admin).await.expect(200).body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = s
        .store
        .get_by_name("credential", Some(&team_b), "shop-key")
        .await
        .unwrap()
        .unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(stored.spec["hash"], hex);

    // Internal services of other teams are invisible to subscribers.
    let r = s
        .post(
            &format!("{b}/subscriptions"),
            &carl,
            json!({ "name": "x", "application": "shop", "service_team": "a", "service": "secret-svc" }),
        )
        .await
        .expect_error(422, "validation_failed");
    assert_eq!(r.body["error"]["field"], "service");

    // A forged decision is ignored: the request waits for the API owners.
    let r = s
        .post(
            &format!("{b}/subscriptions"),
            &carl,
            json!({ "name": "shop-pay", "application": "shop", "service_team": "a", "service": "pay",
                    "plan": "basic", "decision": { "by": "carl", "reason": "self-approved", "at": "now" } }),
        )
        .await
        .expect(201);
    assert_eq!(r.body["state"], "requested");
    assert_eq!(r.body["spec"]["decision"], Value::Null);
    let sub_id = r.body["id"].as_str().unwrap().to_owned();

    let sub = format!("{b}/subscriptions/shop-pay");
    // The subscriber cannot approve itself; a stranger does not even see it.
    post_empty(&s, &format!("{sub}/approve"), &carl)
        .await
        .expect_error(403, "forbidden");
    post_empty(&s, &format!("{sub}/approve"), &chris)
        .await
        .expect_error(404, "not_found");
    s.get("/admin/v1/teams/a/subscription-requests", &carl)
        .await
        .expect_error(404, "not_found");

    // The API owners see the request and approve it.
    let r = s
        .get("/admin/v1/teams/a/subscription-requests", &olga)
        .await
        .expect(200);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "shop-pay");
    assert_eq!(items[0]["team"], "b");
    let r = s
        .get(
            "/admin/v1/teams/a/subscription-requests?state=approved",
            &olga,
        )
        .await
        .expect(200);
    assert_eq!(r.body["items"], json!([]));

    let r = s
        .post(
            &format!("{sub}/approve"),
            &olga,
            json!({ "reason": "looks fine" }),
        )
        .await
        .expect(200);
    assert_eq!(r.body["state"], "approved");
    assert_eq!(r.body["spec"]["decision"]["by"], "olga");
    assert_eq!(r.body["spec"]["decision"]["reason"], "looks fine");
    post_empty(&s, &format!("{sub}/approve"), &olga)
        .await
        .expect_error(409, "conflict");
    post_empty(&s, &format!("{sub}/reject"), &olga)
        .await
        .expect_error(409, "conflict");

    // The subscriber cannot rewrite the decision, and a same-target edit keeps the approval.
    let r = s
        .patch(
            &sub,
            &carl,
            json!({ "decision": { "by": "carl", "reason": "mine", "at": "now" } }),
        )
        .await
        .expect(200);
    assert_eq!(r.body["state"], "approved");
    assert_eq!(r.body["spec"]["decision"]["by"], "olga");
    // Asking for another plan is a new request.
    s.post(&format!("{a}/plans"), &olga, json!({ "name": "pro" }))
        .await
        .expect(201);
    let r = s
        .patch(&sub, &carl, json!({ "plan": "pro" }))
        .await
        .expect(200);
    assert_eq!(r.body["state"], "requested");
    let r = s
        .post(&format!("{sub}/approve"), &olga, json!({}))
        .await
        .expect(200);
    assert_eq!(r.body["state"], "approved");

    let r = s
        .post(
            &format!("{sub}/revoke"),
            &olga,
            json!({ "reason": "abuse" }),
        )
        .await
        .expect(200);
    assert_eq!(r.body["state"], "revoked");
    post_empty(&s, &format!("{sub}/revoke"), &olga)
        .await
        .expect_error(409, "conflict");

    // The audit log of the subscribing team has the decisions.
    let r = s
        .get(&format!("/admin/v1/audit?team=b&object_id={sub_id}"), &carl)
        .await
        .expect(200);
    let actions: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"approve"), "{actions:?}");
    assert!(actions.contains(&"revoke"), "{actions:?}");
    let olga_id = s.get("/admin/v1/me", &olga).await.body["user"]["id"].clone();
    let revoke = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "revoke")
        .unwrap();
    assert_eq!(revoke["actor"], olga_id);
    assert_eq!(revoke["after"]["decision"]["reason"], "abuse");
    // Audit entries never show credential secrets.
    let r = s
        .get("/admin/v1/audit?kind=credential", &admin)
        .await
        .expect(200);
    assert!(!r.body.to_string().contains("\"hash\""), "{:#}", r.body);

    // A service with subscribers cannot be deleted.
    let r = s
        .delete(&format!("{a}/services/pay"), &olga)
        .await
        .expect_error(409, "conflict");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shop-pay")
    );

    // Automatic approval.
    s.post(
        &format!("{a}/services"),
        &olga,
        json!({ "name": "free", "upstream": "up", "visibility": "public" }),
    )
    .await
    .expect(201);
    let r = s
        .post(
            &format!("{b}/subscriptions"),
            &carl,
            json!({ "name": "shop-free", "application": "shop", "service_team": "a", "service": "free" }),
        )
        .await
        .expect(201);
    assert_eq!(r.body["state"], "approved");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lifecycle_and_releases() {
    let s = Server::sqlite().await;
    s.team("a").await;
    let o = s.member("olga", "a", "api_owner").await;
    let t = "/admin/v1/teams/a";
    let svc = format!("{t}/services/orders");
    s.post(
        &format!("{t}/upstreams"),
        &o,
        json!({ "name": "up", "targets": [] }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{t}/services"),
        &o,
        json!({ "name": "orders", "upstream": "up", "visibility": "public" }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{t}/routes"),
        &o,
        json!({ "name": "orders-list", "service": "orders", "paths": [{ "prefix": "/orders" }] }),
    )
    .await
    .expect(201);

    // Nothing but publishing leaves draft.
    post_empty(&s, &format!("{svc}/deprecate"), &o)
        .await
        .expect_error(409, "conflict");
    post_empty(&s, &format!("{svc}/retire"), &o)
        .await
        .expect_error(409, "conflict");
    s.post(&format!("{svc}/rollback"), &o, json!({ "release": 1 }))
        .await
        .expect_error(409, "conflict");
    // Drafts are not in the catalogue.
    let r = s.get("/admin/v1/catalog", &o).await.expect(200);
    assert_eq!(r.body["items"], json!([]));

    let r = s
        .post(&format!("{svc}/publish"), &o, json!({ "note": "first" }))
        .await
        .expect(200);
    assert_eq!(r.body["service"]["state"], "published");
    assert_eq!(r.body["release"]["number"], 1);
    assert_eq!(r.body["release"]["note"], "first");
    let first = r.body["release"]["content"].clone();
    assert_eq!(first["service"]["name"], "orders");
    assert_eq!(first["routes"][0]["name"], "orders-list");
    assert_eq!(first["policies"], json!([]));
    let r = s.get("/admin/v1/catalog", &o).await.expect(200);
    assert_eq!(r.body["items"][0]["name"], "orders");
    assert_eq!(r.body["items"][0]["team"], "a");

    // Edit a route and attach a policy to it; publish again.
    s.patch(
        &format!("{t}/routes/orders-list"),
        &o,
        json!({ "methods": ["GET"] }),
    )
    .await
    .expect(200);
    s.post(
        &format!("{t}/policies"),
        &o,
        json!({ "name": "cors", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "route", "target": "orders-list" }),
    )
    .await
    .expect(201);
    let r = post_empty(&s, &format!("{svc}/publish"), &o)
        .await
        .expect(200);
    assert_eq!(r.body["release"]["number"], 2);
    assert_eq!(
        r.body["release"]["content"]["routes"][0]["methods"],
        json!(["GET"])
    );
    assert_eq!(r.body["release"]["content"]["policies"][0]["name"], "cors");

    // Rolling back creates release 3 with release 1's content.
    let r = s
        .post(&format!("{svc}/rollback"), &o, json!({ "release": 1 }))
        .await
        .expect(200);
    assert_eq!(r.body["release"]["number"], 3);
    assert_eq!(r.body["release"]["note"], "rollback to 1");
    assert_eq!(r.body["release"]["content"], first);
    let r = s
        .post(&format!("{svc}/rollback"), &o, json!({ "release": 99 }))
        .await
        .expect_error(422, "validation_failed");
    assert_eq!(r.body["error"]["field"], "release");
    s.post(&format!("{svc}/rollback"), &o, json!({ "release": "one" }))
        .await
        .expect_error(422, "validation_failed");

    let r = s.get(&format!("{svc}/releases"), &o).await.expect(200);
    let numbers: Vec<i64> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    let r = s.get(&format!("{svc}/releases/3"), &o).await.expect(200);
    assert_eq!(r.body["content"], first);
    s.get(&format!("{svc}/releases/9"), &o)
        .await
        .expect_error(404, "not_found");
    s.get(&format!("{svc}/releases/x"), &o)
        .await
        .expect_error(404, "not_found");

    // Deprecation can be withdrawn; retirement is final.
    let r = post_empty(&s, &format!("{svc}/deprecate"), &o)
        .await
        .expect(200);
    assert_eq!(r.body["service"]["state"], "deprecated");
    assert_eq!(r.body["release"], Value::Null);
    let r = post_empty(&s, &format!("{svc}/publish"), &o)
        .await
        .expect(200);
    assert_eq!(r.body["release"]["number"], 4);
    let r = post_empty(&s, &format!("{svc}/retire"), &o)
        .await
        .expect(200);
    assert_eq!(r.body["service"]["state"], "retired");
    let r = post_empty(&s, &format!("{svc}/publish"), &o)
        .await
        .expect_error(409, "conflict");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retired")
    );
    post_empty(&s, &format!("{svc}/deprecate"), &o)
        .await
        .expect_error(409, "conflict");
    // Lifecycle state is the server's: a PUT does not change it.
    let r = s
        .put(&svc, &o, json!({ "name": "orders", "upstream": "up" }))
        .await
        .expect(200);
    assert_eq!(r.body["state"], "retired");

    // Viewers read releases but cannot publish.
    let v = s.member("vic", "a", "viewer").await;
    s.get(&format!("{svc}/releases"), &v).await.expect(200);
    post_empty(&s, &format!("{t}/services/orders/publish"), &v)
        .await
        .expect_error(403, "forbidden");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_import_creates_routes_idempotently() {
    let s = Server::sqlite().await;
    s.team("a").await;
    let o = s.member("olga", "a", "api_owner").await;
    let t = "/admin/v1/teams/a";
    s.post(
        &format!("{t}/upstreams"),
        &o,
        json!({ "name": "up", "targets": [] }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{t}/services"),
        &o,
        json!({ "name": "pets", "upstream": "up" }),
    )
    .await
    .expect(201);
    let doc = json!({
        "openapi": "3.0.3",
        "info": { "title": "Pets", "version": "1" },
        "servers": [{ "url": "https://api.example.com/v1" }],
        "paths": {
            "/pets": { "get": {}, "post": {} },
            "/pets/{petId}": { "get": {}, "delete": {}, "parameters": [] },
        }
    });
    let import = format!("{t}/services/pets/import-openapi");
    let r = s.post(&import, &o, doc.clone()).await.expect(200);
    let routes = r.body["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0]["name"], "pets-pets");
    assert_eq!(
        routes[0]["spec"]["paths"],
        json!([{ "template": "/v1/pets" }])
    );
    assert_eq!(routes[0]["spec"]["methods"], json!(["GET", "POST"]));
    assert_eq!(routes[1]["name"], "pets-pets-petid");
    assert_eq!(
        routes[1]["spec"]["paths"],
        json!([{ "template": "/v1/pets/{petId}" }])
    );
    assert_eq!(routes[1]["spec"]["methods"], json!(["GET", "DELETE"]));
    assert_eq!(routes[1]["spec"]["service"], "pets");
    assert_eq!(r.body["service"]["spec"]["openapi"], doc);

    // Again: the same routes, unchanged.
    let r = s.post(&import, &o, doc.clone()).await.expect(200);
    let again = r.body["routes"].as_array().unwrap();
    assert_eq!(again.len(), 2);
    for (first, second) in routes.iter().zip(again) {
        assert_eq!(first["id"], second["id"]);
        assert_eq!(second["revision"], 1);
    }
    assert_eq!(r.body["service"]["revision"], 2);
    let r = s.get(&format!("{t}/routes"), &o).await.expect(200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);

    // Not OpenAPI 3, or no paths.
    let r = s
        .post(&import, &o, json!({ "swagger": "2.0", "paths": {} }))
        .await
        .expect_error(422, "validation_failed");
    assert_eq!(r.body["error"]["field"], "openapi");
    let r = s
        .post(&import, &o, json!({ "openapi": "3.1.0" }))
        .await
        .expect_error(422, "validation_failed");
    assert_eq!(r.body["error"]["field"], "paths");
    s.post(&format!("{t}/services/nope/import-openapi"), &o, doc)
        .await
        .expect_error(404, "not_found");
    s.close().await;
}
