//! Test harness for the management plane: a store in a temporary directory, the Admin API,
//! the control plane and a gateway in-process, against a demo upstream.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use turnpike_control::{ControlPlane, spawn_sync};
use turnpike_model::{Config, ListenerConfig, ServerConfig};
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;
use turnpike_store::Store;

pub struct Env {
    pub _dir: tempfile::TempDir,
    pub store: Store,
    pub control: Arc<ControlPlane>,
    pub gw: Arc<Gateway>,
    pub _upstream: DemoServer,
    pub upstream: String,
    pub gateway: String,
    pub gateway_addr: std::net::SocketAddr,
    pub admin: String,
    pub token: String,
    pub http: reqwest::Client,
}

pub async fn env() -> Env {
    env_with_listener(ListenerConfig {
        address: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await
}

/// Like [`env`], the gateway on `listener` (TLS, client certificates).
pub async fn env_with_listener(listener: ListenerConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
        .await
        .unwrap();
    let token = turnpike_admin::bootstrap(&store).await.unwrap().unwrap();
    let upstream = DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let file = Config {
        server: ServerConfig {
            listeners: vec![listener],
            ..Default::default()
        },
        ..Default::default()
    };
    let gw = Gateway::start(&file).await.unwrap();
    let control = ControlPlane::new(gw.clone(), file, None, None);
    spawn_sync(control.clone(), store.clone(), Duration::from_secs(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}/admin/v1", listener.local_addr().unwrap());
    let app = turnpike_admin::router(turnpike_admin::AdminState::new(store.clone()));
    tokio::spawn(async move { axum_serve(listener, app).await });
    Env {
        _dir: dir,
        store,
        control,
        gw: gw.clone(),
        upstream: upstream.local_addr().to_string(),
        _upstream: upstream,
        gateway: format!("http://{}", gw.local_addrs()[0].1),
        gateway_addr: gw.local_addrs()[0].1,
        admin,
        token,
        http: reqwest::Client::new(),
    }
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.unwrap();
}

impl Env {
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// Team `acme` with upstream `backend` and a service `pay` (fields of `service` added to
    /// its spec) with one route under `/pay` forwarded to the demo's `/echo`, and `policies`
    /// of the team; then published.
    pub async fn pay_service(&self, service: Value, policies: &[Value]) {
        self.post("/teams", serde_json::json!({"name": "acme"}))
            .await;
        self.post(
            "/teams/acme/upstreams",
            serde_json::json!({"name": "backend", "targets": [{"address": self.upstream}]}),
        )
        .await;
        let mut spec = serde_json::json!({"name": "pay", "upstream": "backend",
                                          "visibility": "public"});
        if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), service) {
            spec.extend(extra);
        }
        self.post("/teams/acme/services", spec).await;
        self.post(
            "/teams/acme/routes",
            serde_json::json!({"name": "charge", "service": "pay", "paths": [{"prefix": "/pay"}],
                               "rewrite": {"template": "/echo"}}),
        )
        .await;
        for policy in policies {
            self.post("/teams/acme/policies", policy.clone()).await;
        }
        self.post("/teams/acme/services/pay/publish", serde_json::json!({}))
            .await;
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.admin(reqwest::Method::POST, path, body).await
    }

    /// Waits until the gateway serves everything committed so far; returns how long.
    pub async fn settled(&self) -> Duration {
        let v = self.store.current_version().await.unwrap();
        let start = Instant::now();
        let mut rx = self.control.applied();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|seen| *seen >= v))
            .await
            .expect("change not applied within 5 s")
            .unwrap();
        start.elapsed()
    }

    pub async fn call(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.gateway));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }

    pub async fn code(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let resp = self.call(path, key).await;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    }
}
