//! Request-smuggling vectors and request limits, sent as raw bytes to the full gateway.
//! Each malformed request must get 400 (or its limit status) with the JSON error shape and
//! a closed connection, and the upstream must never receive the smuggled request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turnpike_proxy::demo::DemoServer;

async fn setup(server: &str) -> (Gw, DemoServer) {
    let up = DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let gw = Gw::start(&format!(
        "{server}\nupstreams: [{{name: up, targets: [{{address: \"{}\"}}]}}]\nroutes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]\n",
        up.local_addr()
    ))
    .await;
    (gw, up)
}

/// Sends raw bytes and reads until the gateway closes the connection.
async fn raw(gw: &Gw, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await {
        Ok(_) => {}
        Err(_) => panic!(
            "connection not closed; got so far: {}",
            String::from_utf8_lossy(&out)
        ),
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(reply: &str) -> u16 {
    reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn smuggling_vectors_get_400_and_close() {
    let (gw, up) = setup("").await;
    let cases: Vec<(&str, String)> = vec![
        (
            "CL+TE",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE+CL",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "duplicate CL",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 36\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "CL list",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 36\r\n\r\n{SMUGGLED}"),
        ),
        (
            "CL sign",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +36\r\n\r\n{SMUGGLED}"),
        ),
        (
            "CL hex",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x24\r\n\r\n{SMUGGLED}"),
        ),
        (
            "TE unknown",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{SMUGGLED}"),
        ),
        (
            "TE obfuscated",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE list",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE space before colon",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE vertical tab",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE on HTTP/1.0",
            format!(
                "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "bare LF",
            format!("POST /a HTTP/1.1\nHost: x\nContent-Length: 0\n\n{SMUGGLED}"),
        ),
        (
            "bare LF in one header",
            format!("POST /a HTTP/1.1\r\nHost: x\nContent-Length: 0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "obs-fold",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "bad chunk size",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n{SMUGGLED}"
            ),
        ),
    ];
    for (name, bytes) in &cases {
        let reply = raw(&gw, bytes.as_bytes()).await;
        assert_eq!(status_of(&reply), 400, "{name}: {reply}");
        assert!(
            reply.contains("\"code\":\"bad_request\""),
            "{name}: {reply}"
        );
        assert!(
            reply.to_ascii_lowercase().contains("connection: close"),
            "{name}: {reply}"
        );
    }
    assert_eq!(
        up.requests(),
        0,
        "a malformed or smuggled request reached the upstream"
    );

    // A valid request on the same connection before a smuggling attempt is still answered.
    let reply = raw(
        &gw,
        format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\n\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
        )
        .as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("HTTP/1.1 400"), "{reply}");
    assert_eq!(
        up.requests(),
        1,
        "only the valid request reached the upstream"
    );
}

#[tokio::test]
async fn valid_pipelined_requests_all_reach_the_upstream() {
    let (gw, up) = setup("").await;
    let reply = raw(
        &gw,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nGET / HTTP/1.1\nX: y\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n\
          GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 3, "{reply}");
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn header_and_target_limits() {
    let (gw, up) =
        setup("server: {limits: {max_headers: 20, max_header_bytes: 4096, max_uri_length: 200}}")
            .await;
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let reply = raw(
        &gw,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&reply), 431, "{reply}");
    assert!(reply.contains("\"code\":\"headers_too_large\""), "{reply}");

    let big = format!("X-Big: {}\r\n", "a".repeat(5000));
    let reply = raw(
        &gw,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{big}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&reply), 431, "{reply}");

    let reply = raw(
        &gw,
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300)).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&reply), 414, "{reply}");
    assert!(reply.contains("\"code\":\"uri_too_long\""), "{reply}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn slow_client_is_cut_off() {
    let (gw, _up) = setup("server: {limits: {header_read_timeout: 300ms}}").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = tokio::time::Instant::now();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "slow client was never cut off");
    assert!(start.elapsed() < Duration::from_secs(5));
}
