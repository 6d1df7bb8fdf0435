//! The store, compiled and followed by a running gateway: publication, lifecycle and
//! subscription enforcement seen through real requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnpike_control::{ControlPlane, StoreState, compile, fetch, spawn_sync};
use turnpike_model::{Config, ListenerConfig};
use turnpike_proxy::access::api_key_hash;
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;
use turnpike_store::{NewObject, Object, ObjectPatch, Store};

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    control: Arc<ControlPlane>,
    gateway: Arc<Gateway>,
    _upstream: DemoServer,
    upstream_addr: String,
    base: String,
    http: reqwest::Client,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .unwrap();
    let upstream = DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let file = Config {
        server: turnpike_model::ServerConfig {
            listeners: vec![ListenerConfig {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let gateway = Gateway::start(&file).await.unwrap();
    let control = ControlPlane::new(gateway.clone(), file, None, Some(dir.path().to_path_buf()));
    spawn_sync(control.clone(), store.clone(), Duration::from_secs(1));
    let base = format!("http://{}", gateway.local_addrs()[0].1);
    World {
        upstream_addr: upstream.local_addr().to_string(),
        _upstream: upstream,
        _dir: dir,
        store,
        control,
        gateway,
        base,
        http: reqwest::Client::new(),
    }
}

impl World {
    async fn create(
        &self,
        kind: &str,
        team: Option<&str>,
        spec: Value,
        state: Option<&str>,
    ) -> Object {
        let mut tx = self.store.begin("test").await.unwrap();
        let o = tx
            .create(NewObject {
                kind: kind.into(),
                team_id: team.map(Into::into),
                name: spec["name"].as_str().unwrap().into(),
                state: state.map(Into::into),
                spec,
                ..Default::default()
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
        o
    }

    async fn set_state(&self, o: &Object, state: &str) -> i64 {
        let mut tx = self.store.begin("test").await.unwrap();
        tx.update(
            &o.kind,
            &o.id,
            None,
            ObjectPatch {
                state: Some(Some(state.into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap()
    }

    async fn release(&self, service: &Object, routes: Vec<Value>) -> i64 {
        let mut tx = self.store.begin("test").await.unwrap();
        tx.create_release(
            "service",
            &service.id,
            &json!({"service": service.spec, "routes": routes, "policies": []}),
            None,
        )
        .await
        .unwrap();
        tx.update(
            "service",
            &service.id,
            None,
            ObjectPatch {
                state: Some(Some("published".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap()
    }

    /// Waits until the gateway serves store version `v` or later; returns how long it took.
    async fn applied(&self, v: i64) -> Duration {
        let start = Instant::now();
        let mut rx = self.control.applied();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|seen| *seen >= v))
            .await
            .expect("store change not applied within 5 s")
            .unwrap();
        start.elapsed()
    }

    async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }

    /// A team with an upstream pointing at the demo server and a service with one route
    /// under `/orders`.
    async fn team_with_service(&self, approval: &str) -> (Object, Object) {
        let team = self
            .create("team", None, json!({"name": "acme"}), None)
            .await;
        self.create(
            "upstream",
            Some(&team.id),
            json!({"name": "backend", "targets": [{"address": self.upstream_addr}]}),
            None,
        )
        .await;
        let service = self
            .create(
                "service",
                Some(&team.id),
                json!({"name": "orders", "upstream": "backend", "approval": approval,
                       "successor": "https://api.example.com/v2/orders",
                       "sunset": "2030-01-01T00:00:00Z"}),
                Some("draft"),
            )
            .await;
        (team, service)
    }
}

fn orders_route() -> Value {
    json!({"name": "list", "service": "orders", "paths": [{"prefix": "/orders"}],
           "rewrite": {"template": "/echo"}})
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn publishing_serves_the_release_and_drafts_are_not_served() {
    let w = world().await;
    let (_team, service) = w.team_with_service("auto").await;
    // A draft service is not served.
    assert_eq!(w.get("/orders", None).await.status(), 404);

    let v = w.release(&service, vec![orders_route()]).await;
    let took = w.applied(v).await;
    eprintln!("store commit to served snapshot: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let resp = w.get("/orders", None).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "/echo");
    assert!(resp_has_no_deprecation(&body));

    // The saved state compiles to what is served.
    let saved = turnpike_control::load_saved_state(w._dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(saved.version, v);
    assert_eq!(compile(&saved), compile(&fetch(&w.store).await.unwrap()));
    assert!(w.gateway.version() >= 2);
}

fn resp_has_no_deprecation(echo: &Value) -> bool {
    echo["headers"].get("deprecation").is_none()
}

#[tokio::test]
async fn deprecated_services_announce_it_and_retired_ones_answer_410() {
    let w = world().await;
    let (_team, service) = w.team_with_service("auto").await;
    w.release(&service, vec![orders_route()]).await;
    let v = w.set_state(&service, "deprecated").await;
    w.applied(v).await;
    let resp = w.get("/orders", None).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert!(h["deprecation"].to_str().unwrap().starts_with('@'), "{h:?}");
    assert_eq!(h["sunset"], "Tue, 01 Jan 2030 00:00:00 GMT");
    assert_eq!(
        h["link"],
        "<https://api.example.com/v2/orders>; rel=\"successor-version\""
    );

    let v = w.set_state(&service, "retired").await;
    w.applied(v).await;
    let resp = w.get("/orders", None).await;
    assert_eq!(resp.status(), 410);
    assert_eq!(
        resp.headers()["link"],
        "<https://api.example.com/v2/orders>; rel=\"successor-version\""
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "api_retired");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("https://api.example.com/v2/orders")
    );
}

#[tokio::test]
async fn manual_approval_requires_an_approved_subscription() {
    let w = world().await;
    let (team, service) = w.team_with_service("manual").await;
    w.release(&service, vec![orders_route()]).await;
    let consumer_team = w.create("team", None, json!({"name": "shop"}), None).await;
    w.create(
        "application",
        Some(&consumer_team.id),
        json!({"name": "webshop"}),
        None,
    )
    .await;
    let key = "tpk_test_key_1";
    w.create(
        "credential",
        Some(&consumer_team.id),
        json!({"name": "webshop-key", "application": "webshop", "type": "api_key",
               "prefix": "tpk_test", "hash": api_key_hash(key.as_bytes())}),
        None,
    )
    .await;
    let sub = w
        .create(
            "subscription",
            Some(&consumer_team.id),
            json!({"name": "webshop-orders", "application": "webshop",
                   "service_team": "acme", "service": "orders"}),
            Some("requested"),
        )
        .await;
    let v = w.store.current_version().await.unwrap();
    w.applied(v).await;

    assert_eq!(
        error_code(w.get("/orders", None).await).await,
        (401, "credential_missing".into())
    );
    assert_eq!(
        error_code(w.get("/orders", Some("tpk_wrong")).await).await,
        (401, "credential_invalid".into())
    );
    assert_eq!(
        error_code(w.get("/orders", Some(key)).await).await,
        (403, "subscription_required".into())
    );

    let v = w.set_state(&sub, "approved").await;
    let took = w.applied(v).await;
    eprintln!("approval to enforcement: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let resp = w.get("/orders", Some(key)).await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    let app_id = fetch(&w.store)
        .await
        .unwrap()
        .objects
        .into_iter()
        .find(|o| o.kind == "application")
        .unwrap()
        .id;
    assert_eq!(echo["headers"]["x-consumer-id"], app_id.as_str());
    assert_eq!(echo["headers"]["x-consumer-name"], "webshop");

    // A client cannot claim an identity.
    let resp = w
        .http
        .get(format!("{}/orders", w.base))
        .header("x-api-key", key)
        .header("x-consumer-name", "admin")
        .send()
        .await
        .unwrap();
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-consumer-name"], "webshop");

    let v = w.set_state(&sub, "revoked").await;
    w.applied(v).await;
    assert_eq!(
        error_code(w.get("/orders", Some(key)).await).await,
        (403, "subscription_required".into())
    );
    let _ = team;
}

#[tokio::test]
async fn a_release_naming_a_missing_upstream_is_left_out_not_fatal() {
    let w = world().await;
    let (_team, service) = w.team_with_service("auto").await;
    let mut bad = orders_route();
    bad["name"] = json!("broken");
    bad["paths"] = json!([{"prefix": "/broken"}]);
    bad["upstream"] = json!("gone");
    let v = w.release(&service, vec![orders_route(), bad]).await;
    w.applied(v).await;
    assert_eq!(w.get("/orders", None).await.status(), 200);
    assert_eq!(w.get("/broken", None).await.status(), 404);
    let part = compile(&fetch(&w.store).await.unwrap());
    assert!(
        part.warnings.iter().any(|w| w.contains("gone")),
        "{:?}",
        part.warnings
    );
}

#[test]
fn an_empty_state_compiles_to_nothing() {
    let part = compile(&StoreState::default());
    assert!(part.routes.is_empty() && part.upstreams.is_empty() && part.warnings.is_empty());
}
