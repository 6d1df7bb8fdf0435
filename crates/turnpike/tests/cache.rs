//! The response cache in the real binary: a route's `cache` policy answers from memory, and
//! the Admin API's purge empties it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Gateway, http_get, http_json, listener_addr, runtime};
use serde_json::json;
use std::time::Duration;
use turnpike_proxy::demo::DemoServer;

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn the_admin_api_purges_the_gateways_cache() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    let yaml = format!(
        "{}policies:\n  - {{name: c, type: cache, scope: route, target: all}}\n",
        common::config(up.local_addr())
    );
    std::fs::write(&path, yaml).unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut gw = Gateway::start_with(&path, &[("TURNPIKE_STORE", store.as_str())]);
    let token = gw
        .wait_for("    tp_", Duration::from_secs(10))
        .expect("the bootstrap token")
        .trim()
        .to_owned();
    let admin = listener_addr(&mut gw, "admin");

    let (_, first) = http_get(gw.addr, "/cached/60").unwrap();
    assert_eq!(header(&first, "x-cache"), Some("MISS"), "{first}");
    let (_, second) = http_get(gw.addr, "/cached/60").unwrap();
    assert_eq!(header(&second, "x-cache"), Some("HIT"), "{second}");

    let auth = format!("Bearer {token}");
    let h = [("Authorization", auth.as_str())];
    let (status, body) = http_json(
        admin,
        "POST",
        "/admin/v1/cache/purge",
        &h,
        &json!({"tag": "demo"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"]["memory"], 1, "{body}");
    assert_eq!(body["purged"]["shared"], serde_json::Value::Null, "{body}");
    let (_, third) = http_get(gw.addr, "/cached/60").unwrap();
    assert_eq!(header(&third, "x-cache"), Some("MISS"), "{third}");

    // Two targets at once is a validation error naming the rule.
    let (status, body) = http_json(
        admin,
        "POST",
        "/admin/v1/cache/purge",
        &h,
        &json!({"tag": "demo", "prefix": "http://"}),
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
}
