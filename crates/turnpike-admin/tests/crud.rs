//! CRUD and validation for every kind, table-driven, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};
use turnpike_model::mgmt::Kind;

/// One kind's test data. Specs live in team `t1`, whose fixtures `fixtures` creates.
struct Case {
    kind: Kind,
    valid: Value,
    /// An invalid spec and the field the 422 must name.
    invalid: (Value, &'static str),
    /// A spec with a missing reference and the field the 422 must name.
    bad_ref: Option<(Value, &'static str)>,
    /// A merge patch, and (JSON pointer into the spec, expected value) after it.
    patch: (Value, &'static str, Value),
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            kind: Kind::Team,
            valid: json!({ "name": "x-team", "description": "d" }),
            invalid: (json!({ "name": "x team" }), "name"),
            bad_ref: None,
            patch: (
                json!({ "description": "changed" }),
                "/description",
                json!("changed"),
            ),
        },
        Case {
            kind: Kind::User,
            valid: json!({ "name": "x-user", "email": "x@example.com" }),
            invalid: (
                json!({ "name": "x-user", "super_admin": "yes" }),
                "super_admin",
            ),
            bad_ref: None,
            patch: (json!({ "email": null }), "/email", Value::Null),
        },
        Case {
            kind: Kind::Member,
            valid: json!({ "name": "bob", "role": "viewer" }),
            invalid: (json!({ "name": "bob", "role": "super_admin" }), "role"),
            bad_ref: Some((json!({ "name": "nobody", "role": "viewer" }), "name")),
            patch: (json!({ "role": "api_owner" }), "/role", json!("api_owner")),
        },
        Case {
            kind: Kind::Secret,
            valid: json!({ "name": "x-secret", "source": { "env": "X_KEY" } }),
            invalid: (json!({ "name": "x-secret", "source": 5 }), "source"),
            bad_ref: None,
            // Objects merge: the old variant must be removed explicitly.
            patch: (
                json!({ "source": { "env": null, "file": "/k.pem" } }),
                "/source",
                json!({ "file": "/k.pem" }),
            ),
        },
        Case {
            kind: Kind::Certificate,
            valid: json!({ "name": "x-cert", "cert": "PEM", "key_secret": "key1" }),
            invalid: (
                json!({ "name": "x-cert", "cert": 5, "key_secret": "key1" }),
                "cert",
            ),
            bad_ref: Some((
                json!({ "name": "x-cert", "cert": "PEM", "key_secret": "nope" }),
                "key_secret",
            )),
            patch: (
                json!({ "server_names": ["a.example"] }),
                "/server_names/0",
                json!("a.example"),
            ),
        },
        Case {
            kind: Kind::Upstream,
            valid: json!({ "name": "x-up", "targets": [{ "address": "127.0.0.1:9" }] }),
            invalid: (
                json!({ "name": "x-up", "targets": [{ "address": "a:1", "weight": "heavy" }] }),
                "targets[0].weight",
            ),
            bad_ref: None,
            patch: (json!({ "http2": true }), "/http2", json!(true)),
        },
        Case {
            kind: Kind::Service,
            valid: json!({ "name": "x-svc", "upstream": "up1" }),
            invalid: (
                json!({ "name": "x-svc", "upstream": "up1", "approval": "sometimes" }),
                "approval",
            ),
            bad_ref: Some((json!({ "name": "x-svc", "upstream": "nope" }), "upstream")),
            patch: (json!({ "tags": ["a", "b"] }), "/tags/1", json!("b")),
        },
        Case {
            kind: Kind::Route,
            valid: json!({ "name": "x-route", "service": "svc1", "paths": [{ "prefix": "/x" }] }),
            invalid: (
                json!({ "name": "x-route", "service": "svc1", "priority": "high" }),
                "priority",
            ),
            bad_ref: Some((json!({ "name": "x-route", "service": "nope" }), "service")),
            patch: (json!({ "methods": ["GET"] }), "/methods/0", json!("GET")),
        },
        Case {
            kind: Kind::Plan,
            valid: json!({ "name": "x-plan", "rate_limits": [{ "requests": 10, "per": "1m" }] }),
            invalid: (
                json!({ "name": "x-plan", "quotas": [{ "requests": 1, "period": "year" }] }),
                "quotas[0].period",
            ),
            bad_ref: None,
            patch: (
                json!({ "description": "gold" }),
                "/description",
                json!("gold"),
            ),
        },
        Case {
            kind: Kind::Application,
            valid: json!({ "name": "x-app" }),
            invalid: (json!({ "name": "x-app", "description": 5 }), "description"),
            bad_ref: None,
            patch: (
                json!({ "description": "mobile" }),
                "/description",
                json!("mobile"),
            ),
        },
        Case {
            kind: Kind::Credential,
            valid: json!({ "name": "x-cred", "application": "app1", "type": "basic",
                           "username": "u", "password": "secret-pw" }),
            invalid: (
                json!({ "name": "x-cred", "application": "app1", "type": "basic" }),
                "username",
            ),
            bad_ref: Some((
                json!({ "name": "x-cred", "application": "nope", "type": "api_key" }),
                "application",
            )),
            patch: (json!({ "username": "u2" }), "/username", json!("u2")),
        },
        Case {
            kind: Kind::ConsumerGroup,
            valid: json!({ "name": "x-cg", "applications": ["app1"] }),
            invalid: (
                json!({ "name": "x-cg", "applications": "app1" }),
                "applications",
            ),
            bad_ref: Some((
                json!({ "name": "x-cg", "applications": ["app1", "nope"] }),
                "applications[1]",
            )),
            patch: (json!({ "applications": [] }), "/applications", json!([])),
        },
        Case {
            kind: Kind::Subscription,
            valid: json!({ "name": "x-sub", "application": "app1", "service_team": "t1", "service": "svc1" }),
            invalid: (
                json!({ "name": "x-sub", "application": "app1", "service_team": "t1", "service": "svc1", "plan": 7 }),
                "plan",
            ),
            bad_ref: Some((
                json!({ "name": "x-sub", "application": "app1", "service_team": "t1", "service": "nope" }),
                "service",
            )),
            patch: (json!({ "plan": "gold" }), "/plan", json!("gold")),
        },
        Case {
            kind: Kind::Policy,
            valid: json!({ "name": "x-pol", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "service", "target": "svc1" }),
            invalid: (
                json!({ "name": "x-pol", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "service", "target": "svc1", "priority": "top" }),
                "priority",
            ),
            bad_ref: Some((
                json!({ "name": "x-pol", "type": "cors", "config": { "allow_origins": ["https://a.example"] }, "scope": "route", "target": "nope" }),
                "target",
            )),
            patch: (json!({ "enabled": false }), "/enabled", json!(false)),
        },
    ]
}

fn collection(kind: Kind) -> String {
    match kind {
        Kind::Team | Kind::User => format!("/admin/v1/{}", kind.collection()),
        _ => format!("/admin/v1/teams/t1/{}", kind.collection()),
    }
}

/// Team `t1` with one object of each kind the cases refer to.
async fn fixtures(s: &Server) {
    let a = &s.admin;
    s.team("t1").await;
    s.post("/admin/v1/users", a, json!({ "name": "bob" }))
        .await
        .expect(201);
    let t = "/admin/v1/teams/t1";
    s.post(
        &format!("{t}/secrets"),
        a,
        json!({ "name": "key1", "source": { "file": "/k" } }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{t}/upstreams"),
        a,
        json!({ "name": "up1", "targets": [{ "address": "127.0.0.1:9" }] }),
    )
    .await
    .expect(201);
    s.post(
        &format!("{t}/services"),
        a,
        json!({ "name": "svc1", "upstream": "up1" }),
    )
    .await
    .expect(201);
    s.post(&format!("{t}/plans"), a, json!({ "name": "gold" }))
        .await
        .expect(201);
    s.post(&format!("{t}/applications"), a, json!({ "name": "app1" }))
        .await
        .expect(201);
}

async fn crud_every_kind(s: &Server) {
    fixtures(s).await;
    let a = s.admin.as_str();
    for case in cases() {
        let kind = case.kind;
        let coll = collection(kind);
        let name = case.valid["name"].as_str().unwrap().to_owned();
        let item = format!("{coll}/{name}");
        let ctx = kind.as_str();

        let r = s
            .post(&coll, a, case.invalid.0.clone())
            .await
            .expect_error(422, "validation_failed");
        assert_eq!(
            r.body["error"]["field"], case.invalid.1,
            "{ctx}: {:#}",
            r.body
        );
        if let Some((spec, field)) = &case.bad_ref {
            let r = s
                .post(&coll, a, spec.clone())
                .await
                .expect_error(422, "validation_failed");
            assert_eq!(r.body["error"]["field"], *field, "{ctx}: {:#}", r.body);
        }

        let r = s.post(&coll, a, case.valid.clone()).await.expect(201);
        assert_eq!(r.header("location"), Some(item.as_str()), "{ctx}");
        assert_eq!(r.header("etag"), Some("\"1\""), "{ctx}");
        assert_eq!(r.body["revision"], 1, "{ctx}");
        assert_eq!(r.body["kind"], kind.as_str());
        assert_eq!(r.body["name"], name.as_str());
        let expected_team = if kind.team_scoped() {
            json!("t1")
        } else {
            Value::Null
        };
        assert_eq!(r.body["team"], expected_team, "{ctx}");
        assert!(
            r.body["created_at"].as_str().unwrap().ends_with('Z'),
            "{ctx}"
        );
        match kind {
            Kind::Service => assert_eq!(r.body["state"], "draft"),
            // svc1 approves automatically.
            Kind::Subscription => {
                assert_eq!(r.body["state"], "approved");
                assert_eq!(r.body["spec"]["decision"]["by"], "system");
            }
            Kind::Credential => {
                let spec = r.body["spec"].as_object().unwrap();
                for hidden in ["password", "password_hash", "hash"] {
                    assert!(!spec.contains_key(hidden), "{hidden} leaked: {:#}", r.body);
                }
            }
            _ => {}
        }

        s.post(&coll, a, case.valid.clone())
            .await
            .expect_error(409, "conflict");

        let r = s.get(&item, a).await.expect(200);
        assert_eq!(r.header("etag"), Some("\"1\""), "{ctx}");
        assert_eq!(r.body["name"], name.as_str());
        if kind == Kind::Credential {
            assert!(r.body["spec"].get("password_hash").is_none());
            assert!(!r.body.to_string().contains("secret-pw"));
        }

        let r = s.get(&coll, a).await.expect(200);
        let names: Vec<&str> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&name.as_str()), "{ctx}: {names:?}");

        // PUT the same spec: revision 2 (without password: a basic credential keeps its hash).
        let mut spec = case.valid.clone();
        if let Some(o) = spec.as_object_mut() {
            o.remove("password");
        }
        let r = s
            .call(
                Method::PUT,
                &item,
                Some(a),
                Some(&spec),
                &[("if-match", "\"1\"")],
            )
            .await
            .expect(200);
        assert_eq!(r.body["revision"], 2, "{ctx}");
        assert_eq!(r.header("etag"), Some("\"2\""));
        s.call(
            Method::PUT,
            &item,
            Some(a),
            Some(&spec),
            &[("if-match", "\"1\"")],
        )
        .await
        .expect_error(412, "precondition_failed");

        // PATCH (merge patch).
        let (patch, pointer, expected) = &case.patch;
        let r = s
            .call(
                Method::PATCH,
                &item,
                Some(a),
                None,
                &[
                    ("if-match", "\"2\""),
                    ("content-type", "application/merge-patch+json"),
                ],
            )
            .await;
        // No body: a 400, not a change.
        r.expect_error(400, "bad_request");
        if !matches!(case.kind, Kind::Credential | Kind::Policy) {
            // A member the spec does not have is refused even when the patch removes it
            // (null), which the merged spec alone would never show.
            let r = s
                .patch(&item, a, json!({ "no_such_member": null }))
                .await
                .expect_error(422, "validation_failed");
            assert_eq!(r.body["error"]["field"], "no_such_member", "{ctx}");
        }
        let r = s.patch(&item, a, patch.clone()).await.expect(200);
        assert_eq!(r.body["revision"], 3, "{ctx}");
        assert_eq!(
            r.body["spec"].pointer(pointer),
            Some(expected),
            "{ctx}: {:#}",
            r.body
        );
        if let Some((bad, field)) = case.bad_ref.as_ref().filter(|(_, f)| *f != "name") {
            // Updates are checked like creations.
            let mut bad = bad.clone();
            bad["name"] = json!(name);
            let r = s
                .put(&item, a, bad)
                .await
                .expect_error(422, "validation_failed");
            assert_eq!(r.body["error"]["field"], *field, "{ctx}");
        }

        s.call(
            Method::DELETE,
            &item,
            Some(a),
            None,
            &[("if-match", "\"1\"")],
        )
        .await
        .expect_error(412, "precondition_failed");
        s.call(
            Method::DELETE,
            &item,
            Some(a),
            None,
            &[("if-match", "\"3\"")],
        )
        .await
        .expect(204);
        s.get(&item, a).await.expect_error(404, "not_found");
        s.delete(&item, a).await.expect_error(404, "not_found");
    }

    // Referenced objects cannot go, and say who refers to them.
    let r = s
        .delete("/admin/v1/teams/t1/upstreams/up1", a)
        .await
        .expect_error(409, "conflict");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("svc1"),
        "{:#}",
        r.body
    );
    s.delete("/admin/v1/teams/t1", a)
        .await
        .expect_error(409, "conflict");
    s.delete("/admin/v1/users/bob", a).await.expect(204);
}

async fn rename_moves_the_url(s: &Server) {
    s.team("t1").await;
    let a = &s.admin;
    let r = s
        .post(
            "/admin/v1/teams/t1/applications",
            a,
            json!({ "name": "old" }),
        )
        .await
        .expect(201);
    assert_eq!(r.body["revision"], 1);
    let r = s
        .put(
            "/admin/v1/teams/t1/applications/old",
            a,
            json!({ "name": "new" }),
        )
        .await
        .expect(200);
    assert_eq!(
        r.header("location"),
        Some("/admin/v1/teams/t1/applications/new")
    );
    s.get("/admin/v1/teams/t1/applications/old", a)
        .await
        .expect(404);
    s.get("/admin/v1/teams/t1/applications/new", a)
        .await
        .expect(200);
    // A referenced object cannot be renamed.
    s.post(
        "/admin/v1/teams/t1/credentials",
        a,
        json!({ "name": "k", "application": "new", "type": "api_key" }),
    )
    .await
    .expect(201);
    s.patch(
        "/admin/v1/teams/t1/applications/new",
        a,
        json!({ "name": "newer" }),
    )
    .await
    .expect_error(409, "conflict");
    // A PUT onto a taken name is a conflict too.
    s.post(
        "/admin/v1/teams/t1/applications",
        a,
        json!({ "name": "other" }),
    )
    .await
    .expect(201);
    s.put(
        "/admin/v1/teams/t1/applications/other",
        a,
        json!({ "name": "new" }),
    )
    .await
    .expect_error(409, "conflict");
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crud_every_kind() {
        let s = Server::sqlite().await;
        super::crud_every_kind(&s).await;
        s.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rename_moves_the_url() {
        let s = Server::sqlite().await;
        super::rename_moves_the_url(&s).await;
        s.close().await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crud_every_kind() {
        let s = Server::postgres().await;
        super::crud_every_kind(&s).await;
        s.close().await;
    }
}
