//! Plans' rate limits and quotas, end to end: plans and subscriptions made through the Admin
//! API, requests through the real gateway, counts flushed to a real store (SQLite file or
//! PostgreSQL) by the quota sync, read back through the usage API. Each gateway's quota clock
//! is a manual one, so periods end when a test says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use turnpike_control::quota::QuotaSync;
use turnpike_control::{ControlPlane, spawn_sync};
use turnpike_model::{Config, ListenerConfig, ServerConfig};
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;
use turnpike_proxy::quota::ManualClock;
use turnpike_store::Store;

fn file() -> Config {
    Config {
        server: ServerConfig {
            listeners: vec![ListenerConfig {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    turnpike_store::now_ms()
}

/// One gateway node: a gateway following `store`, with a quota sync the test drives.
struct Node {
    gw: Arc<Gateway>,
    control: Arc<ControlPlane>,
    store: Store,
    sync: Arc<QuotaSync>,
    base: String,
    http: reqwest::Client,
}

impl Node {
    async fn start(url: &str, clock: &Arc<ManualClock>) -> Node {
        let store = Store::open(url).await.unwrap();
        let gw = Gateway::start(&file()).await.unwrap();
        gw.quotas().set_clock(clock.clone());
        let control = ControlPlane::new(gw.clone(), file(), None, None);
        spawn_sync(control.clone(), store.clone(), Duration::from_millis(200));
        let sync = QuotaSync::new(store.clone(), gw.quotas(), Duration::from_secs(5));
        // What a node does before its first interval: load the totals.
        sync.sync().await.unwrap();
        Node {
            base: format!("http://{}", gw.local_addrs()[0].1),
            gw,
            control,
            store,
            sync,
            http: reqwest::Client::new(),
        }
    }

    /// Waits until the gateway serves everything committed so far.
    async fn settled(&self) {
        let v = self.store.current_version().await.unwrap();
        let mut rx = self.control.applied();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|seen| *seen >= v))
            .await
            .expect("change not applied within 5 s")
            .unwrap();
    }

    async fn call(&self, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/pay", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }

    /// Calls until refused; returns how many were admitted and the refusal.
    async fn admitted_until_refused(&self, key: &str, max: usize) -> (usize, reqwest::Response) {
        for n in 0..max {
            let resp = self.call(key).await;
            if resp.status() != 200 {
                return (n, resp);
            }
        }
        panic!("{max} requests admitted, none refused");
    }
}

/// An Admin API on `store`, with the bootstrap super admin's token.
struct Admin {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    async fn start(store: &Store) -> Admin {
        let token = turnpike_admin::bootstrap(store).await.unwrap().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/admin/v1", listener.local_addr().unwrap());
        let app = turnpike_admin::router(turnpike_admin::AdminState::new(store.clone()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Admin {
            url,
            token,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// Provider `acme` (service `pay` at `/pay`, plan `gold` = `plan`), consumer `shop`
    /// with applications subscribed under `gold`; returns their API keys.
    async fn setup(&self, upstream: &str, plan: Value, apps: &[&str]) -> Vec<String> {
        self.post("/teams", json!({"name": "acme"})).await;
        self.post(
            "/teams/acme/upstreams",
            json!({"name": "backend", "targets": [{"address": upstream}]}),
        )
        .await;
        self.post(
            "/teams/acme/services",
            json!({"name": "pay", "upstream": "backend", "visibility": "public",
                   "approval": "manual"}),
        )
        .await;
        self.post(
            "/teams/acme/routes",
            json!({"name": "charge", "service": "pay", "paths": [{"prefix": "/pay"}],
                   "rewrite": {"template": "/echo"}}),
        )
        .await;
        let mut plan = plan;
        plan["name"] = json!("gold");
        self.post("/teams/acme/plans", plan).await;
        self.post("/teams/acme/services/pay/publish", json!({}))
            .await;
        self.post("/teams", json!({"name": "shop"})).await;
        let mut keys = Vec::new();
        for app in apps {
            self.post("/teams/shop/applications", json!({"name": app}))
                .await;
            let key = self
                .post(
                    "/teams/shop/credentials",
                    json!({"name": format!("{app}-key"), "application": app, "type": "api_key"}),
                )
                .await["secret"]
                .as_str()
                .unwrap()
                .to_owned();
            keys.push(key);
            let sub = format!("{app}-pay");
            self.post(
                "/teams/shop/subscriptions",
                json!({"name": sub, "application": app, "service_team": "acme",
                       "service": "pay", "plan": "gold"}),
            )
            .await;
            self.post(
                &format!("/teams/shop/subscriptions/{sub}/approve"),
                json!({}),
            )
            .await;
        }
        keys
    }
}

async fn upstream() -> DemoServer {
    DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap()
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("s.db").display())
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no {name} header"))
}

async fn code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.unwrap();
    body["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_rate_limits_apply_per_application() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let clock = ManualClock::new(now_ms());
    let node = Node::start(&sqlite_url(&dir), &clock).await;
    let admin = Admin::start(&node.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"rate_limits": [{"requests": 3, "per": "1h"}]}),
            &["web", "mobile"],
        )
        .await;
    node.settled().await;

    let (n, refused) = node.admitted_until_refused(&keys[0], 10).await;
    assert_eq!(n, 3);
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() > 0);
    assert!(
        header(&refused, "ratelimit-policy").contains("q=3;w=3600"),
        "{refused:?}"
    );
    assert!(header(&refused, "ratelimit").contains("r=0"));
    assert_eq!(code(refused).await, "rate_limited");
    // The other application under the same plan has its own limit.
    let resp = node.call(&keys[1]).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "ratelimit").contains("r=2"), "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhausted_is_429_quota_exceeded_until_the_period_ends() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    // 2026-03-31T23:00:00Z: one hour before both the day and the month end.
    let start = 1_774_998_000_000;
    let clock = ManualClock::new(start);
    let node = Node::start(&sqlite_url(&dir), &clock).await;
    let admin = Admin::start(&node.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 3, "period": "day"},
                              {"requests": 100, "period": "month"}]}),
            &["web"],
        )
        .await;
    node.settled().await;

    for left in ["2", "1", "0"] {
        let resp = node.call(&keys[0]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-quota-limit"), "3");
        assert_eq!(header(&resp, "x-quota-remaining"), left);
        assert_eq!(header(&resp, "x-quota-period"), "day");
        assert_eq!(header(&resp, "x-quota-reset"), "3600");
    }
    let refused = node.call(&keys[0]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-quota-remaining"), "0");
    assert_eq!(header(&refused, "retry-after"), "3600");
    assert_eq!(code(refused).await, "quota_exceeded");

    // A second before midnight: still refused. At midnight: a new day (and month).
    clock.set(start + 3_599_000);
    assert_eq!(node.call(&keys[0]).await.status(), 429);
    clock.set(start + 3_600_000);
    let resp = node.call(&keys[0]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-quota-remaining"), "2");
    assert_eq!(header(&resp, "x-quota-reset"), "86400");

    // The flushed counts are per period: 3 on March 31st, 1 on April 1st.
    node.sync.sync().await.unwrap();
    let mut rows: Vec<(String, i64, i64)> = node
        .store
        .usage_since(0)
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.period, u.period_start, u.used))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("day".into(), 1_774_915_200_000, 3),
            ("day".into(), 1_775_001_600_000, 1),
            ("month".into(), 1_772_323_200_000, 3),
            ("month".into(), 1_775_001_600_000, 1),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_restart_and_show_in_the_usage_api() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let clock = ManualClock::new(now_ms());
    let url = sqlite_url(&dir);
    let first = Node::start(&url, &clock).await;
    // The Admin API outlives the first node: a store handle of its own.
    let admin = Admin::start(&Store::open(&url).await.unwrap()).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 5, "period": "day"}]}),
            &["web"],
        )
        .await;
    first.settled().await;
    for _ in 0..3 {
        assert_eq!(first.call(&keys[0]).await.status(), 200);
    }
    // A clean shutdown flushes what is pending, however long the interval.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = first.sync.spawn(Duration::from_secs(3600), stop_rx);
    first.gw.shutdown().await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    first.store.close().await;
    drop(first);

    let usage = admin.get("/teams/shop/applications/web/usage").await;
    assert_eq!(usage["application"], "web");
    let q = &usage["items"][0]["quotas"][0];
    assert_eq!(usage["items"][0]["plan"], "gold");
    assert_eq!(usage["items"][0]["service"], "pay");
    assert_eq!(q["period"], "day");
    assert_eq!(q["limit"], 5);
    assert_eq!(q["used"], 3);
    assert_eq!(q["remaining"], 2);
    assert!(
        q["reset_at"].as_str().unwrap().ends_with("T00:00:00.000Z"),
        "{q}"
    );

    // A new control plane and gateway on the same file start from the stored count.
    let second = Node::start(&url, &clock).await;
    second.settled().await;
    let (n, refused) = second.admitted_until_refused(&keys[0], 10).await;
    assert_eq!(n, 2);
    assert_eq!(code(refused).await, "quota_exceeded");
    second.sync.sync().await.unwrap();
    let usage = admin.get("/teams/shop/applications/web/usage").await;
    assert_eq!(usage["items"][0]["quotas"][0]["used"], 5);
    assert_eq!(usage["items"][0]["quotas"][0]["remaining"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_api_is_for_the_applications_team() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(now_ms());
    let node = Node::start(&sqlite_url(&dir), &clock).await;
    let admin = Admin::start(&node.store).await;
    admin.post("/teams", json!({"name": "shop"})).await;
    admin
        .post("/teams/shop/applications", json!({"name": "web"}))
        .await;
    let usage = admin.get("/teams/shop/applications/web/usage").await;
    assert_eq!(usage, json!({"application": "web", "items": []}));
    let status = |resp: reqwest::Response| resp.status().as_u16();
    let anonymous = admin
        .http
        .get(format!("{}/teams/shop/applications/web/usage", admin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(status(anonymous), 401);
    let missing = admin
        .http
        .get(format!("{}/teams/shop/applications/nope/usage", admin.url))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(status(missing), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_while_the_store_is_down_and_counts_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let clock = ManualClock::new(now_ms());
    let url = sqlite_url(&dir);
    let node = Node::start(&url, &clock).await;
    let admin = Admin::start(&node.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 4, "period": "month"}]}),
            &["web"],
        )
        .await;
    node.settled().await;
    // The quota sync's own connection to the store goes away.
    let lost = Store::open(&url).await.unwrap();
    let broken = QuotaSync::new(lost.clone(), node.gw.quotas(), Duration::from_secs(1));
    lost.close().await;

    assert_eq!(node.call(&keys[0]).await.status(), 200);
    assert_eq!(node.call(&keys[0]).await.status(), 200);
    assert!(broken.sync().await.is_err());
    // Still counted, still enforced, in memory.
    let (n, refused) = node.admitted_until_refused(&keys[0], 10).await;
    assert_eq!(n, 2);
    assert_eq!(code(refused).await, "quota_exceeded");
    assert!(broken.sync().await.is_err());
    assert!(node.store.usage_since(0).await.unwrap().is_empty());

    // Back: every count kept through the failures reaches the store once.
    node.sync.sync().await.unwrap();
    let rows = node.store.usage_since(0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].used, 4);
}

fn pg_base() -> String {
    std::env::var("TURNPIKE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own in the test database, dropped at the end.
struct Schema(String);

impl Schema {
    fn create() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("tp_quota_{}_{nanos}", std::process::id());
        psql(&format!("CREATE SCHEMA {name}"));
        Self(name)
    }

    fn url(&self) -> String {
        format!("{}?options=-c%20search_path%3D{}", pg_base(), self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(pg_base())
            .args(["-qc", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0)])
            .output();
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .arg(pg_base())
        .args(["-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql must be installed (scripts/services.sh installs PostgreSQL)");
    assert!(
        out.status.success(),
        "PostgreSQL at {} is required for this test: {}",
        pg_base(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_postgres_share_one_quota() {
    let schema = Schema::create();
    let up = upstream().await;
    let clock = ManualClock::new(now_ms());
    let a = Node::start(&schema.url(), &clock).await;
    let b = Node::start(&schema.url(), &clock).await;
    let admin = Admin::start(&a.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 10, "period": "day"}]}),
            &["web"],
        )
        .await;
    a.settled().await;
    b.settled().await;

    // Between syncs each node only knows its own counts: 3 + 3 admitted.
    for _ in 0..3 {
        assert_eq!(a.call(&keys[0]).await.status(), 200);
        assert_eq!(b.call(&keys[0]).await.status(), 200);
    }
    a.sync.sync().await.unwrap();
    b.sync.sync().await.unwrap();
    a.sync.sync().await.unwrap();
    // Both now see 6 used: 4 remain, for the cluster.
    let resp = b.call(&keys[0]).await;
    assert_eq!(header(&resp, "x-quota-remaining"), "3");
    b.sync.sync().await.unwrap();
    a.sync.sync().await.unwrap();
    let (n, refused) = a.admitted_until_refused(&keys[0], 20).await;
    assert_eq!(n, 3);
    assert_eq!(code(refused).await, "quota_exceeded");
    a.sync.sync().await.unwrap();
    b.sync.sync().await.unwrap();
    assert_eq!(b.call(&keys[0]).await.status(), 429);

    // The overshoot is what the other node admits between syncs: with no sync at all in a
    // new day (the clock moved to tomorrow), each node admits the whole quota on its own.
    clock.set(now_ms() + 86_400_000);
    let (na, _) = a.admitted_until_refused(&keys[0], 20).await;
    let (nb, _) = b.admitted_until_refused(&keys[0], 20).await;
    assert_eq!((na, nb), (10, 10));
    a.sync.sync().await.unwrap();
    b.sync.sync().await.unwrap();
    let usage = admin.get("/teams/shop/applications/web/usage").await;
    // The usage API reads today's count (10), not tomorrow's.
    assert_eq!(usage["items"][0]["quotas"][0]["used"], 10);
    let total: i64 = a
        .store
        .usage_since(0)
        .await
        .unwrap()
        .iter()
        .map(|u| u.used)
        .sum();
    assert_eq!(total, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refusals_in_front_of_the_upstream_use_no_quota() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let clock = ManualClock::new(now_ms());
    let node = Node::start(&sqlite_url(&dir), &clock).await;
    let admin = Admin::start(&node.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 3, "period": "day"}]}),
            &["web"],
        )
        .await;
    // Requests marked `x-chaos` are failed by the gateway before the upstream.
    admin
        .post(
            "/teams/acme/policies",
            json!({"name": "chaos", "type": "fault_injection", "scope": "service",
                   "target": "pay", "config": {"abort": {"percent": 100.0},
                                               "only_with_header": "x-chaos"}}),
        )
        .await;
    admin
        .post("/teams/acme/services/pay/publish", json!({}))
        .await;
    node.settled().await;

    for _ in 0..5 {
        let resp = node
            .http
            .get(format!("{}/pay", node.base))
            .header("x-api-key", &keys[0])
            .header("x-chaos", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(code(resp).await, "fault_injected");
    }
    // All three of the day's requests are still there.
    let (n, refused) = node.admitted_until_refused(&keys[0], 10).await;
    assert_eq!(n, 3);
    assert_eq!(code(refused).await, "quota_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_past_the_retention_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let start = now_ms();
    let clock = ManualClock::new(start);
    let node = Node::start(&sqlite_url(&dir), &clock).await;
    let admin = Admin::start(&node.store).await;
    let keys = admin
        .setup(
            &up.local_addr().to_string(),
            json!({"quotas": [{"requests": 100, "period": "day"}]}),
            &["web"],
        )
        .await;
    node.settled().await;
    assert_eq!(node.call(&keys[0]).await.status(), 200);
    node.sync.sync().await.unwrap();
    node.sync.prune().await;
    assert_eq!(node.store.usage_since(0).await.unwrap().len(), 1);

    // 401 days later (the default retention is 400): the old day's counter goes, the new
    // day's stays.
    clock.set(start + 401 * 86_400_000);
    assert_eq!(node.call(&keys[0]).await.status(), 200);
    node.sync.sync().await.unwrap();
    node.sync.prune().await;
    let rows = node.store.usage_since(0).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].period_start > start, "{rows:?}");
}
