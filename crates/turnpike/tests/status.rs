//! The status endpoints of the real binary: on the dedicated status listener of a file-only
//! gateway, and on the Admin API listener, with `/readyz` following the store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Gateway, config, http_get, poll_until, runtime};
use turnpike_proxy::demo::DemoServer;

fn listener_addr(gw: &mut Gateway, name: &str) -> SocketAddr {
    let line = gw
        .wait_for(
            &format!("\"listening\",\"listener\":\"{name}\""),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("no {name} listener"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["fields"]["addr"].as_str().unwrap().parse().unwrap()
}

fn body(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn a_file_only_gateway_serves_status_on_its_own_listener() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    let yaml = format!(
        "{}observability:\n  metrics:\n    listen: \"127.0.0.1:0\"\n",
        config(up.local_addr())
    );
    std::fs::write(&path, yaml).unwrap();
    let mut gw = Gateway::start(&path);
    let status = listener_addr(&mut gw, "status");

    assert_eq!(http_get(gw.addr, "/").unwrap().0, 200);
    let counted = poll_until(Duration::from_secs(10), || {
        let (code, text) = http_get(status, "/metrics").unwrap();
        code == 200
            && turnpike_observe::metrics::sample(
                body(&text),
                "turnpike_http_requests_total",
                &[("route", "all"), ("status_class", "2xx")],
            ) == Some(1.0)
    });
    assert!(counted, "the request never showed in /metrics");
    let (code, text) = http_get(status, "/healthz").unwrap();
    assert_eq!(code, 200, "{text}");
    let (code, text) = http_get(status, "/readyz").unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(body(&text).contains("\"ready\""), "{text}");
}

#[test]
fn the_admin_listener_serves_status_and_readyz_follows_the_store() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    std::fs::write(&path, config(up.local_addr())).unwrap();

    // A store that answers: ready.
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut gw = Gateway::start_with(&path, &[("TURNPIKE_STORE", store.as_str())]);
    let admin = listener_addr(&mut gw, "admin");
    let (code, text) = http_get(admin, "/readyz").unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(body(&text).contains("\"store\""), "{text}");
    let (code, text) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(body(&text).contains("turnpike_config_version"), "{text}");
    drop(gw);

    // A store that cannot be reached: alive, still ready (it serves its last snapshot),
    // and the store check says it is failing.
    let mut gw = Gateway::start_with(
        &path,
        &[
            ("TURNPIKE_STORE", "postgres://turnpike@127.0.0.1:1/none"),
            ("TURNPIKE_STORE_CONNECT_TIMEOUT", "1s"),
        ],
    );
    let admin = listener_addr(&mut gw, "admin");
    let (code, text) = http_get(admin, "/healthz").unwrap();
    assert_eq!(code, 200, "{text}");
    let (code, text) = http_get(admin, "/readyz").unwrap();
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(body(&text)).unwrap();
    assert_eq!(v["status"], "degraded", "{v}");
    let store = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "store")
        .unwrap();
    assert_eq!(store["ok"], false, "{v}");
    // The rest of the Admin API still says the store is unavailable.
    let (code, _) = http_get(admin, "/admin/v1/services").unwrap();
    assert_eq!(code, 503);
}

#[test]
fn tracing_and_access_log_sinks_report_their_counters_as_metrics() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    let log = dir.path().join("access.log");
    // The demo upstream stands in for the collector: it answers the export POST with 200.
    let yaml = format!(
        "{}observability:\n  metrics:\n    listen: \"127.0.0.1:0\"\n  tracing:\n    enabled: true\n    otlp:\n      endpoint: \"http://{}/status/200\"\n      batch: {{batch_size: 1, max_delay: 10ms}}\n  access_log:\n    sinks:\n      - {{type: file, path: \"{}\"}}\n",
        config(up.local_addr()),
        up.local_addr(),
        log.display()
    );
    std::fs::write(&path, yaml).unwrap();
    let mut gw = Gateway::start(&path);
    let status = listener_addr(&mut gw, "status");
    let (code, text) = http_get(gw.addr, "/").unwrap();
    assert_eq!(code, 200, "{text}");
    let sent = |kind: &str, sink: &str, want: f64| {
        poll_until(Duration::from_secs(10), || {
            let (_, text) = http_get(status, "/metrics").unwrap();
            turnpike_observe::metrics::sample(
                body(&text),
                "turnpike_observability_sink_records_total",
                &[("sink", sink), ("kind", kind), ("outcome", "sent")],
            ) == Some(want)
        })
    };
    // One call: a server span and one attempt span exported, one access-log record written.
    assert!(
        sent("otlp_traces", "otlp-traces", 2.0),
        "spans never counted"
    );
    assert!(sent("file", "file-0", 1.0), "the access log never counted");
    let record = std::fs::read_to_string(&log).unwrap();
    let v: serde_json::Value = serde_json::from_str(record.lines().next().unwrap()).unwrap();
    assert_eq!(v["trace_id"].as_str().map(str::len), Some(32), "{record}");
}
