//! HTTP/2 with prior knowledge (h2c) from the client to the gateway, HTTP/1.1 to the upstream.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

async fn h2c(addr: std::net::SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (sender, conn) = within("h2 handshake", hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)))
        .await
        .expect("h2c handshake with the gateway");
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn h2c_client_reaches_http1_upstream_with_path_and_host() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
routes:
  - name: api
    hosts: [api.example.test]
    paths: [{{prefix: /svc}}]
    upstream: up
    upstream_host: preserve
"#,
        up.addr
    );
    let gw = Gw::start(&yaml).await;
    let mut sender = h2c(gw.addr).await;

    let req = Request::post("http://api.example.test/svc/items?q=1&r=two")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let resp = within("h2 request", sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = within("body", resp.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"payload");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.version, Version::HTTP_11, "the upstream speaks HTTP/1.1");
    assert_eq!(s.method, http::Method::POST);
    assert_eq!(s.path_and_query, "/svc/items?q=1&r=two");
    assert_eq!(s.header("host"), Some("api.example.test"), "the :authority becomes Host");
    assert_eq!(s.header("x-forwarded-host"), Some("api.example.test"));
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-custom"), Some("kept"));
    assert_eq!(&s.body[..], b"payload");

    // A host the route does not serve is a 404 from the gateway, on the same connection.
    let req = Request::get("http://other.test/svc/x").body(Full::new(Bytes::new())).unwrap();
    let resp = within("h2 request", sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn many_concurrent_streams_on_one_connection() {
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;
    let sender = h2c(gw.addr).await;
    within("ready", sender.clone().ready()).await.expect("connection ready");

    const N: usize = 100;
    let mut calls = JoinSet::new();
    for i in 0..N {
        let mut sender = sender.clone();
        calls.spawn(async move {
            let body = format!("body-{i}-").repeat(i + 1);
            let req = Request::post(format!("http://gw.test/stream/{i}"))
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let resp = sender.send_request(req).await.expect("response");
            let status = resp.status();
            let path = resp.headers().get("x-echo-path").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(status, StatusCode::OK, "stream {i}");
            assert_eq!(path.as_deref(), Some(format!("/stream/{i}").as_str()));
            assert_eq!(got, Bytes::from(body), "stream {i}");
            i
        });
    }
    let mut done = vec![false; N];
    while let Some(r) = within("concurrent streams", calls.join_next()).await {
        done[r.expect("stream task")] = true;
    }
    assert!(done.iter().all(|d| *d));
    assert_eq!(up.seen().len(), N);
}
