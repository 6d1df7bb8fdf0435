//! HTTP/2 with prior knowledge (h2c) from the client to the gateway, HTTP/1.1 to the upstream.
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    let (sender, conn) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
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
    let resp = within("h2 request", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"payload");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.version, Version::HTTP_11, "the upstream speaks HTTP/1.1");
    assert_eq!(s.method, http::Method::POST);
    assert_eq!(s.path_and_query, "/svc/items?q=1&r=two");
    assert_eq!(
        s.header("host"),
        Some("api.example.test"),
        "the :authority becomes Host"
    );
    assert_eq!(s.header("x-forwarded-host"), Some("api.example.test"));
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-custom"), Some("kept"));
    assert_eq!(&s.body[..], b"payload");

    // A host the route does not serve is a 404 from the gateway, on the same connection.
    let req = Request::get("http://other.test/svc/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within("h2 request", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn many_concurrent_streams_on_one_connection() {
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;
    let sender = h2c(gw.addr).await;
    within("ready", sender.clone().ready())
        .await
        .expect("connection ready");

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
            let path = resp
                .headers()
                .get("x-echo-path")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(status, StatusCode::OK, "stream {i}");
            assert_eq!(path.as_deref(), Some(format!("/stream/{i}").as_str()));
            assert_eq!(got, Bytes::from(body), "stream {i}");
            i
        });
    }
    let mut done = [false; N];
    while let Some(r) = within("concurrent streams", calls.join_next()).await {
        done[r.expect("stream task")] = true;
    }
    assert!(done.iter().all(|d| *d));
    assert_eq!(up.seen().len(), N);
}

#[tokio::test]
async fn large_bodies_both_ways_over_h2c() {
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;
    let mut sender = h2c(gw.addr).await;
    // 4 MiB: far past the 64 KiB initial windows, under the 10 MiB default body limit.
    let body: Bytes = (0..4 * 1024 * 1024u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let req = Request::put("http://gw.test/big")
        .body(Full::new(body.clone()))
        .unwrap();
    let resp = within("h2 request", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let got = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(got.len(), body.len());
    assert!(got == body, "echoed body differs");
}

/// `Upgrade: h2c` must not reach the upstream: an upstream that accepted it would turn the
/// connection into a tunnel past the gateway's routing ("h2c smuggling").
#[tokio::test]
async fn h2c_upgrade_header_is_not_forwarded() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;
    let mut s = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let req = format!(
        "GET /h2c HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        gw.addr
    );
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("upgrade"),
        None,
        "upstream saw {:?}",
        seen[0].headers
    );
    assert_eq!(
        seen[0].header("http2-settings"),
        None,
        "upstream saw {:?}",
        seen[0].headers
    );
}

/// Even an upstream willing to switch to h2c never gets the chance: the request reaches it
/// without `Upgrade`, so the client's connection stays HTTP/1.1 through the gateway and no raw
/// tunnel to the upstream opens.
#[tokio::test]
async fn h2c_upgrade_never_opens_a_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw upstream that switches to "h2c" whenever asked, then echoes raw bytes; otherwise
    // it answers a plain 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if tcp.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if head.contains("\r\nupgrade: h2c") {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                        .await;
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                } else {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain")
                        .await;
                }
            });
        }
    });
    let gw = Gw::start(&one_route(up, "", "")).await;
    let mut s = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        gw.addr
    );
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the gateway must not switch protocols: {head}"
    );
    assert_eq!(body, b"plain");
}
