//! `Expect: 100-continue` on a raw socket: the interim 100 arrives before the body is sent.
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn expect_100_continue_then_body_then_echo() {
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;

    let body = b"hello after continue";
    let mut s = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        gw.addr,
        body.len()
    );
    within("write head", s.write_all(head.as_bytes()))
        .await
        .unwrap();

    // Nothing of the body has been sent: the gateway must ask for it.
    let mut buf = Vec::new();
    let (interim, interim_body) = read_response(&mut s, &mut buf).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim:?}"
    );
    assert!(interim_body.is_empty());
    assert!(
        buf.is_empty(),
        "nothing may follow the 100 before the body is sent: {buf:?}"
    );

    within("write body", s.write_all(body)).await.unwrap();
    let (head, got) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(got, body);

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/upload");
    assert_eq!(&seen[0].body[..], body);
    assert!(
        seen[0].header("expect").is_none(),
        "the gateway answers Expect itself"
    );
}

/// Sends a head with `Expect: 100-continue` and reads the first response: it must be the
/// final one, with no `100 Continue` before it, since the body will never be needed.
async fn refused_without_continue(gw: &Gw, path: &str, len: usize) -> String {
    let mut s = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n",
        gw.addr
    );
    within("write head", s.write_all(head.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf).await;
    head
}

#[tokio::test]
async fn no_continue_when_the_gateway_refuses_the_request() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
routes:
  - name: small
    paths: [{{prefix: /small}}]
    upstream: up
    max_body_bytes: 10
"#,
        up.addr
    );
    let gw = Gw::start(&yaml).await;

    let head = refused_without_continue(&gw, "/nowhere", 5).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let head = refused_without_continue(&gw, "/small", 1000).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn no_continue_when_the_upstream_is_unreachable() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gw::start(&one_route(dead, "", "")).await;
    let head = refused_without_continue(&gw, "/upload", 5).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}
