//! Several `turnpike` processes sharing one PostgreSQL store: a change made through one node's
//! Admin API is served by the others within a second, and a node restarted while the store is
//! unreachable serves the store state it saved.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Gateway, http_get, http_json, listener_addr, runtime};
use serde_json::json;
use turnpike_proxy::demo::DemoServer;

fn pg_base() -> String {
    std::env::var("TURNPIKE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own in the test database, dropped at the end.
struct Schema(String);

impl Schema {
    fn create() -> Self {
        let name = format!("tp_cluster_{}", uuid_like());
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

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

fn node(config: &Path, store: &str, data: &Path) -> Gateway {
    let data = data.to_str().unwrap();
    Gateway::start_with(
        config,
        &[
            ("TURNPIKE_STORE", store),
            ("TURNPIKE_DATA_DIR", data),
            ("TURNPIKE_STORE_CONNECT_TIMEOUT", "2s"),
        ],
    )
}

#[test]
fn nodes_sharing_postgres_follow_each_other_and_survive_its_absence() {
    let schema = Schema::create();
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        "server:\n  listeners: [{name: public, address: \"127.0.0.1:0\"}]\n",
    )
    .unwrap();
    let data: Vec<_> = (1..=3)
        .map(|i| dir.path().join(format!("node{i}")))
        .collect();

    let mut n1 = node(&config, &schema.url(), &data[0]);
    let token = n1
        .wait_for("    tp_", Duration::from_secs(10))
        .expect("the first node prints the bootstrap token")
        .trim()
        .to_owned();
    let admin = listener_addr(&mut n1, "admin");
    let n2 = node(&config, &schema.url(), &data[1]);
    let n3 = node(&config, &schema.url(), &data[2]);
    // Only the first start bootstraps.
    assert!(!n2.seen.iter().any(|l| l.contains("    tp_")));

    let auth = format!("Bearer {token}");
    let h = [("Authorization", auth.as_str())];
    let post = |path: &str, body: serde_json::Value| {
        let (status, resp) = http_json(admin, "POST", path, &h, &body);
        assert!(status == 200 || status == 201, "{path}: {status} {resp}");
    };
    post("/admin/v1/teams", json!({"name": "acme"}));
    post(
        "/admin/v1/teams/acme/upstreams",
        json!({"name": "backend", "targets": [{"address": up.local_addr().to_string()}]}),
    );
    post(
        "/admin/v1/teams/acme/services",
        json!({"name": "orders", "upstream": "backend"}),
    );
    post(
        "/admin/v1/teams/acme/routes",
        json!({"name": "list", "service": "orders", "paths": [{"prefix": "/orders"}],
               "rewrite": {"template": "/echo"}}),
    );
    for n in [&n1, &n2, &n3] {
        assert_eq!(
            http_get(n.addr, "/orders").unwrap().0,
            404,
            "drafts are not served"
        );
    }
    post("/admin/v1/teams/acme/services/orders/publish", json!({}));
    let published = Instant::now();
    for (i, n) in [&n1, &n2, &n3].into_iter().enumerate() {
        let served = common::poll_until(Duration::from_secs(1), || {
            http_get(n.addr, "/orders").is_ok_and(|(s, _)| s == 200)
        });
        assert!(
            served,
            "node {} did not serve the release within 1 s",
            i + 1
        );
        eprintln!(
            "node {} serves the release after {:?}",
            i + 1,
            published.elapsed()
        );
    }

    // Node 3 restarts while the store is unreachable: it serves what it saved.
    drop(n3);
    let mut n3 = node(&config, "postgres://postgres@127.0.0.1:1/test", &data[2]);
    assert!(
        n3.wait_for("serving the last store state", Duration::from_secs(5))
            .is_some()
    );
    assert_eq!(http_get(n3.addr, "/orders").unwrap().0, 200);
    // Its Admin API says why changes cannot be made, in the usual error shape.
    let admin3 = listener_addr(&mut n3, "admin");
    let (status, body) = http_json(admin3, "POST", "/admin/v1/teams", &h, &json!({"name": "x"}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(
        body["error"]["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    drop((n1, n2));
}
