//! The embedded quickstart (`examples/quickstart.yaml`) loads, and its gRPC transcoding walk-
//! through works against the built-in demo upstream, as the README shows it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use turnpike_proxy::demo::DemoServer;

async fn quickstart() -> (Gw, DemoServer) {
    let demo = DemoServer::start("127.0.0.1:0".parse().unwrap(), "demo")
        .await
        .unwrap();
    let yaml = include_str!("../../../examples/quickstart.yaml")
        .replace("127.0.0.1:8081", &demo.local_addr().to_string());
    (Gw::start(&yaml).await, demo)
}

#[tokio::test]
async fn quickstart_greeter_answers_json_from_grpc() {
    let (gw, _demo) = quickstart().await;

    let r = call(&gw, "GET", "/grpc/hello/Ada", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), serde_json::json!({"message": "Hello, Ada!"}));

    let r = send(
        req("POST", &gw.url("/grpc/hello"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"name": "Grace"}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"message": "Hello, Grace!"}));

    // The demo's own INVALID_ARGUMENT, as HTTP.
    let r = send(
        req("POST", &gw.url("/grpc/hello"))
            .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "grpc_invalid_argument");

    let r = call(&gw, "GET", "/grpc/countdown/3", &[]).await;
    assert_eq!(r.status, 200);
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&r.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"message": "3"}),
            serde_json::json!({"message": "2"}),
            serde_json::json!({"message": "1"})
        ]
    );
}
