//! The call-log store end to end: requests through the real gateway, written to a real store
//! (SQLite file or PostgreSQL) by the call-log writer, searched through the Admin API with
//! every filter, paged, scoped by team; retention; a full queue and a failing store never
//! holding up a request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use turnpike_control::calllog::{CallLogStats, CallLogWriter};
use turnpike_control::{ControlPlane, spawn_sync};
use turnpike_model::observe::{CallLogConfig, CallLogSearchLimits};
use turnpike_model::{Config, ListenerConfig, ServerConfig};
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;
use turnpike_store::{CallLogRecord, CallLogRow, Store};

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

fn fast() -> CallLogConfig {
    CallLogConfig {
        flush_interval: Duration::from_millis(20),
        ..CallLogConfig::default()
    }
}

/// A gateway following `store`, the Admin API on it, and a demo upstream.
struct Env {
    gw: Arc<Gateway>,
    control: Arc<ControlPlane>,
    store: Store,
    _upstream: DemoServer,
    upstream: String,
    base: String,
    admin: String,
    token: String,
    http: reqwest::Client,
}

impl Env {
    async fn start(url: &str) -> Env {
        Self::start_with(url, CallLogSearchLimits::default()).await
    }

    /// With these bounds on a search page.
    async fn start_with(url: &str, search: CallLogSearchLimits) -> Env {
        let store = Store::open(url).await.unwrap();
        let token = turnpike_admin::bootstrap(&store).await.unwrap().unwrap();
        let gw = Gateway::start(&file()).await.unwrap();
        let control = ControlPlane::new(gw.clone(), file(), None, None);
        spawn_sync(control.clone(), store.clone(), Duration::from_millis(200));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = format!("http://{}/admin/v1", listener.local_addr().unwrap());
        let app = turnpike_admin::router(
            turnpike_admin::AdminState::new(store.clone()).with_call_log_search(search),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let upstream = DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
            .await
            .unwrap();
        Env {
            base: format!("http://{}", gw.local_addrs()[0].1),
            gw,
            control,
            store,
            upstream: upstream.local_addr().to_string(),
            _upstream: upstream,
            admin,
            token,
            http: reqwest::Client::new(),
        }
    }

    /// A writer with `config`, registered on the gateway; its tasks run unless `run` is false.
    fn writer(&self, config: &CallLogConfig, run: bool) -> Arc<CallLogWriter> {
        let writer = CallLogWriter::new(self.store.clone(), config);
        if run {
            let (stop, rx) = tokio::sync::watch::channel(false);
            writer.spawn(rx);
            // The tasks live as long as the test.
            std::mem::forget(stop);
        }
        self.gw.observer().add(writer.clone());
        writer
    }

    async fn send(&self, token: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.send(&self.token, reqwest::Method::POST, path, body)
            .await
    }

    /// `GET /admin/v1{path}` as `token`: status and body.
    async fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn search(&self, query: &str) -> Vec<Value> {
        let (status, body) = self
            .get_as(&self.token, &format!("/call-logs?limit=500&{query}"))
            .await;
        assert_eq!(status, 200, "{query}: {body}");
        body["items"].as_array().unwrap().clone()
    }

    /// Provider `acme` (service `pay`, route `charge` at `/pay`, plan `gold`), consumer `shop`
    /// (application `web`, subscribed); returns web's API key.
    async fn setup(&self) -> String {
        self.post("/teams", json!({"name": "acme"})).await;
        self.post(
            "/teams/acme/upstreams",
            json!({"name": "backend", "targets": [{"address": self.upstream}]}),
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
        self.post(
            "/teams/acme/plans",
            json!({"name": "gold", "rate_limits": [{"requests": 1000, "per": "1h"}]}),
        )
        .await;
        self.post("/teams/acme/services/pay/publish", json!({}))
            .await;
        self.post("/teams", json!({"name": "shop"})).await;
        self.post("/teams/shop/applications", json!({"name": "web"}))
            .await;
        let key = self
            .post(
                "/teams/shop/credentials",
                json!({"name": "web-key", "application": "web", "type": "api_key"}),
            )
            .await["secret"]
            .as_str()
            .unwrap()
            .to_owned();
        self.post(
            "/teams/shop/subscriptions",
            json!({"name": "web-pay", "application": "web", "service_team": "acme",
                   "service": "pay", "plan": "gold"}),
        )
        .await;
        self.post("/teams/shop/subscriptions/web-pay/approve", json!({}))
            .await;
        let v = self.store.current_version().await.unwrap();
        let mut rx = self.control.applied();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|seen| *seen >= v))
            .await
            .expect("change not applied within 5 s")
            .unwrap();
        key
    }

    /// A user who is a `role` of `team`; returns its token.
    async fn member(&self, user: &str, team: &str, role: &str) -> String {
        self.post("/users", json!({"name": user})).await;
        if !team.is_empty() {
            self.post(
                &format!("/teams/{team}/members"),
                json!({"name": user, "role": role}),
            )
            .await;
        }
        self.post(&format!("/users/{user}/tokens"), json!({"name": "t"}))
            .await["secret"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn call(&self, path: &str, key: Option<&str>, request_id: &str) -> u16 {
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .header("x-request-id", request_id)
            .header("user-agent", "calllog-test");
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        resp.bytes().await.unwrap();
        status
    }
}

/// Polls `stats` until `done` holds, for at most 10 s.
async fn until(writer: &CallLogWriter, what: &str, done: impl Fn(&CallLogStats) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = writer.stats();
        if done(&stats) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s ({stats:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["request_id"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Requests through the gateway, found by every filter, paged, scoped by team.
async fn search_scenario(url: &str) {
    let env = Env::start(url).await;
    let writer = env.writer(&fast(), true);
    let key = env.setup().await;
    let before = turnpike_store::now_ms();
    for i in 0..3 {
        assert_eq!(env.call("/pay", Some(&key), &format!("ok-{i}")).await, 200);
    }
    assert_eq!(env.call("/pay", None, "no-key").await, 401);
    assert_eq!(env.call("/nowhere", None, "no-route").await, 404);
    until(&writer, "5 calls written", |s| s.written == 5).await;
    let after = turnpike_store::now_ms() + 1;

    // Everything, newest first, with what a call carries.
    let all = env.search("").await;
    assert_eq!(
        ids(&all),
        ["no-route", "no-key", "ok-2", "ok-1", "ok-0"],
        "{all:?}"
    );
    let ok = &all[2];
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/pay");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["route"], "acme/pay/charge");
    assert_eq!(ok["service_name"], "acme/pay");
    assert_eq!(ok["application_name"], "web");
    assert_eq!(ok["team"], "shop");
    assert_eq!(ok["user_agent"], "calllog-test");
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["upstream_target"], env.upstream.as_str());
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["completed"], true);
    assert!(ok["bytes_out"].as_i64().unwrap() > 0, "{ok}");
    assert!(ok["duration_us"].as_i64().unwrap() > 0, "{ok}");
    assert!(ok["upstream_us"].as_i64().unwrap() > 0, "{ok}");
    assert_eq!(all[0]["error"], "route_not_found", "{}", all[0]);
    assert_eq!(all[0]["service"], Value::Null);

    // Each filter.
    let pay_id = ok["service"].as_str().unwrap().to_owned();
    let web_id = ok["application"].as_str().unwrap().to_owned();
    let service_calls = sorted(vec![
        "no-key".into(),
        "ok-0".into(),
        "ok-1".into(),
        "ok-2".into(),
    ]);
    let web_calls = sorted(vec!["ok-0".into(), "ok-1".into(), "ok-2".into()]);
    assert_eq!(
        sorted(ids(&env.search("service=acme/pay").await)),
        service_calls
    );
    assert_eq!(
        sorted(ids(&env.search(&format!("service={pay_id}")).await)),
        service_calls
    );
    assert_eq!(
        sorted(ids(&env.search("route=acme/pay/charge").await)),
        service_calls
    );
    assert_eq!(
        sorted(ids(&env.search("application=shop/web").await)),
        web_calls
    );
    assert_eq!(
        sorted(ids(&env.search(&format!("application={web_id}")).await)),
        web_calls
    );
    assert!(env.search("application=shop/nope").await.is_empty());
    assert!(env.search("service=nope/pay").await.is_empty());
    assert_eq!(ids(&env.search("status=401").await), ["no-key"]);
    assert_eq!(
        sorted(ids(&env.search("status_class=4xx").await)),
        ["no-key", "no-route"]
    );
    assert_eq!(
        sorted(ids(&env.search("status_class=2xx").await)),
        web_calls
    );
    assert!(env.search("status_class=5xx").await.is_empty());
    assert_eq!(ids(&env.search("request_id=ok-1").await), ["ok-1"]);
    assert_eq!(
        env.search(&format!("from={before}&to={after}")).await.len(),
        5
    );
    assert!(env.search(&format!("from={after}")).await.is_empty());
    assert!(env.search(&format!("to={before}")).await.is_empty());
    let first = all[4]["time"].as_str().unwrap();
    assert_eq!(
        env.search(&format!("from={first}&route=acme/pay/charge&status=200"))
            .await
            .len(),
        3
    );
    let (status, one) = env.get_as(&env.token, "/call-logs/ok-1").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["request_id"], "ok-1");
    assert_eq!(one["id"], all[3]["id"]);

    // Bad parameters: 422 naming the parameter.
    for (query, field) in [
        ("status=abc", "status"),
        ("status=99", "status"),
        ("status_class=6xx", "status_class"),
        ("cursor=nope", "cursor"),
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("limit=0", "limit"),
    ] {
        let (status, body) = env.get_as(&env.token, &format!("/call-logs?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }

    // Pages of two: every call once, in order, over three pages.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/call-logs?limit=2&cursor={c}"),
            None => "/call-logs?limit=2".to_owned(),
        };
        let (status, page) = env.get_as(&env.token, &q).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        seen.extend(ids(page["items"].as_array().unwrap()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids(&all));

    // Team scoping: the provider sees calls to its service, the consumer its application's,
    // an outsider nothing; super admins everything (above).
    let provider = env.member("alice", "acme", "viewer").await;
    let consumer = env.member("bob", "shop", "consumer_developer").await;
    env.post("/teams", json!({"name": "other"})).await;
    let outsider = env.member("carol", "other", "team_admin").await;
    let nobody = env.member("dave", "", "").await;
    let visible = |token: String| {
        let env = &env;
        async move {
            let (status, body) = env.get_as(&token, "/call-logs").await;
            assert_eq!(status, 200, "{body}");
            sorted(ids(body["items"].as_array().unwrap()))
        }
    };
    assert_eq!(visible(provider.clone()).await, service_calls);
    assert_eq!(visible(consumer.clone()).await, web_calls);
    assert!(visible(outsider.clone()).await.is_empty());
    assert!(visible(nobody).await.is_empty());
    assert_eq!(env.get_as(&provider, "/call-logs/no-key").await.0, 200);
    assert_eq!(env.get_as(&consumer, "/call-logs/no-key").await.0, 404);
    assert_eq!(env.get_as(&outsider, "/call-logs/ok-0").await.0, 404);
    assert_eq!(env.get_as(&provider, "/call-logs/no-route").await.0, 404);
    assert_eq!(env.get_as(&env.token, "/call-logs/no-route").await.0, 200);
    assert_eq!(env.get_as(&env.token, "/call-logs/unknown").await.0, 404);
    // A filter cannot widen the scope.
    let (_, body) = env
        .get_as(&consumer, "/call-logs?service=acme/pay&status=401")
        .await;
    assert_eq!(body["items"], json!([]));
    let anonymous = env
        .http
        .get(format!("{}/call-logs", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

/// Old calls go, new ones stay; the row cap keeps the newest.
async fn retention_scenario(url: &str) {
    let env = Env::start(url).await;
    let config = CallLogConfig {
        retention: Duration::from_secs(3600),
        max_rows: Some(3),
        ..fast()
    };
    let writer = env.writer(&config, true);
    let now = turnpike_store::now_ms();
    let row = |at: i64, id: &str| CallLogRecord {
        at,
        request_id: id.into(),
        client_ip: "10.0.0.1".into(),
        protocol: "HTTP/1.1".into(),
        method: "GET".into(),
        path: "/old".into(),
        status: 200,
        completed: true,
        ..CallLogRecord::default()
    };
    let old = [
        row(now - 3 * 3_600_000, "very-old"),
        row(now - 2 * 3_600_000, "old"),
        row(now - 1_800_000, "recent"),
    ];
    let old: Vec<CallLogRow<'_>> = old.iter().map(CallLogRow::from).collect();
    env.store.insert_call_logs(&old).await.unwrap();
    for i in 0..3 {
        assert_eq!(env.call("/nowhere", None, &format!("new-{i}")).await, 404);
    }
    until(&writer, "3 calls written", |s| s.written == 3).await;
    // Two past the retention, then one past the cap of three.
    // The periodic task runs once at start and may still be deleting when this prune returns
    // (it counts when it ends): together they delete three, each call once.
    writer.prune().await.unwrap();
    until(&writer, "3 calls pruned", |s| s.pruned >= 3).await;
    assert_eq!(writer.stats().pruned, 3);
    assert_eq!(
        sorted(ids(&env.search("").await)),
        ["new-0", "new-1", "new-2"]
    );
    assert_eq!(writer.prune().await.unwrap(), 0);
}

/// A call the writer has taken off the queue into a batch that is still gathering counts as
/// waiting until it is written: a reader of the gauge (the bench waits for it to reach 0)
/// must not take an unwritten batch for a drained writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_a_gathering_batch_count_as_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start(&sqlite_url(&dir)).await;
    let config = CallLogConfig {
        batch_size: 2,
        flush_interval: Duration::from_secs(600),
        ..CallLogConfig::default()
    };
    let writer = env.writer(&config, true);
    for i in 0..3 {
        assert_eq!(env.call("/nowhere", None, &format!("w{i}")).await, 404);
    }
    // The first two fill a batch and go at once; the third waits for the next batch to fill
    // or come due, in ten minutes.
    until(&writer, "a full batch written", |s| s.written == 2).await;
    let stats = writer.stats();
    assert_eq!((stats.queued, stats.written, stats.queue_len), (3, 2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_calls_are_searchable_paged_and_team_scoped() {
    let dir = tempfile::tempdir().unwrap();
    search_scenario(&sqlite_url(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_calls_are_searchable_paged_and_team_scoped() {
    let schema = Schema::create();
    search_scenario(&schema.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_deletes_old_calls_and_keeps_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    retention_scenario(&sqlite_url(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_deletes_old_calls_and_keeps_new_ones() {
    let schema = Schema::create();
    retention_scenario(&schema.url()).await;
}

/// With a budget of two segments a page, a search that every segment's summary lets through
/// answers in pages of what two segments hold, each with a cursor that goes on, and the pages
/// together are the whole answer; a lookup by request id is not cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_page_stops_at_its_segment_budget_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start_with(
        &sqlite_url(&dir),
        CallLogSearchLimits {
            max_segments: 2,
            ..CallLogSearchLimits::default()
        },
    )
    .await;
    let writer = env.writer(&fast(), true);
    // One call per segment: each is written before the next is sent.
    for i in 0..5 {
        assert_eq!(env.call("/nowhere", None, &format!("b{i}")).await, 404);
        until(&writer, "the call written", |s| s.written == i + 1).await;
    }
    let mut pages = Vec::new();
    let mut partial = Vec::new();
    let mut query = "/call-logs?status=404&limit=50".to_owned();
    loop {
        let (status, page) = env.get_as(&env.token, &query).await;
        assert_eq!(status, 200, "{page}");
        pages.push(ids(page["items"].as_array().unwrap()));
        partial.push(page["partial"].as_bool().unwrap());
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("/call-logs?status=404&limit=50&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, [vec!["b4", "b3"], vec!["b2", "b1"], vec!["b0"]]);
    // Cut short by the bounds, then the last page.
    assert_eq!(partial, [true, true, false]);
    // A page filled before the bounds is not partial, though it goes on.
    let (status, full) = env
        .get_as(&env.token, "/call-logs?status=404&limit=1")
        .await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(ids(full["items"].as_array().unwrap()), ["b4"]);
    assert!(full["next_cursor"].is_string(), "{full}");
    assert_eq!(full["partial"], false, "{full}");
    let (status, oldest) = env.get_as(&env.token, "/call-logs/b0").await;
    assert_eq!(status, 200, "{oldest}");
    assert_eq!(oldest["request_id"], "b0");
}

/// A request id a client reused: looking it up follows pages cut short by the search
/// bounds up to a limit, then answers 422 `too_many_calls` instead of a false 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_of_a_reused_request_id_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start_with(
        &sqlite_url(&dir),
        CallLogSearchLimits {
            max_summaries: 1,
            ..CallLogSearchLimits::default()
        },
    )
    .await;
    let writer = env.writer(&fast(), true);
    let key = env.setup().await;
    let provider = env.member("alice", "acme", "viewer").await;
    // The provider sees the first call (to its service) and none of the nine after it; each
    // call is a segment of its own.
    assert_eq!(env.call("/pay", Some(&key), "dup").await, 200);
    until(&writer, "the call written", |s| s.written == 1).await;
    for i in 0..9 {
        assert_eq!(env.call("/nowhere", None, "dup").await, 404);
        until(&writer, "the call written", |s| s.written == i + 2).await;
    }
    let (status, newest) = env.get_as(&env.token, "/call-logs/dup").await;
    assert_eq!((status, &newest["status"]), (200, &json!(404)), "{newest}");
    let (status, body) = env.get_as(&provider, "/call-logs/dup").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "too_many_calls", "{body}");
    assert_eq!(body["error"]["field"], "request_id", "{body}");
    // A search with that id, followed to its end, finds the provider's call.
    let mut found = Vec::new();
    let mut query = "/call-logs?request_id=dup".to_owned();
    loop {
        let (status, page) = env.get_as(&provider, &query).await;
        assert_eq!(status, 200, "{page}");
        found.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["status"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("/call-logs?request_id=dup&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(found, [json!(200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_without_holding_requests() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start(&sqlite_url(&dir)).await;
    let config = CallLogConfig {
        queue_size: 2,
        ..fast()
    };
    // Registered but not running: nothing drains the queue.
    let writer = env.writer(&config, false);
    for i in 0..10 {
        assert_eq!(env.call("/nowhere", None, &format!("c{i}")).await, 404);
    }
    until(&writer, "10 calls offered", |s| s.queued + s.dropped == 10).await;
    let stats = writer.stats();
    assert_eq!((stats.queued, stats.dropped, stats.queue_len), (2, 8, 2));
    // Once the writer runs, what was queued is written.
    let (_stop, rx) = tokio::sync::watch::channel(false);
    writer.spawn(rx);
    until(&writer, "2 calls written", |s| s.written == 2).await;
    assert_eq!(sorted(ids(&env.search("").await)), ["c0", "c1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_never_fails_requests_and_counts_its_batches() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let env = Env::start(&url).await;
    // The writer's own store handle, closed: every insert fails at once.
    let broken = Store::open(&url).await.unwrap();
    broken.close().await;
    let config = CallLogConfig {
        retries: 1,
        ..fast()
    };
    let writer = CallLogWriter::new(broken, &config);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = writer.spawn(rx);
    env.gw.observer().add(writer.clone());
    for i in 0..4 {
        assert_eq!(env.call("/nowhere", None, &format!("f{i}")).await, 404);
    }
    until(&writer, "4 calls failed", |s| s.failed == 4).await;
    assert_eq!(writer.stats().written, 0);
    // Stopping still ends promptly.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_errors_and_shutdown_flushes_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start(&sqlite_url(&dir)).await;
    let config = CallLogConfig {
        sample: 0.0,
        // Nothing would be written before shutdown but for the final flush.
        flush_interval: Duration::from_secs(3600),
        ..CallLogConfig::default()
    };
    let handle =
        turnpike_control::calllog::start(env.store.clone(), &config, &env.gw.observer()).unwrap();
    let key = env.setup().await;
    assert_eq!(env.call("/pay", Some(&key), "kept-out").await, 200);
    assert_eq!(env.call("/nowhere", None, "kept").await, 404);
    let writer = handle.writer.clone();
    until(&writer, "2 calls offered", |s| {
        s.queued + s.sampled_out == 2
    })
    .await;
    assert_eq!((writer.stats().queued, writer.stats().sampled_out), (1, 1));
    env.gw.shutdown().await;
    handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(writer.stats().written, 1);
    assert_eq!(ids(&env.search("").await), ["kept"]);
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("s.db").display())
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
        let name = format!("tp_calllog_{}_{nanos}", std::process::id());
        let out = Command::new("psql")
            .arg(pg_base())
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                &format!("CREATE SCHEMA {name}"),
            ])
            .output()
            .expect("psql must be installed (scripts/services.sh installs PostgreSQL)");
        assert!(
            out.status.success(),
            "PostgreSQL must be running at {} (scripts/services.sh starts it): {}",
            pg_base(),
            String::from_utf8_lossy(&out.stderr)
        );
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
