//! WebSocket through the gateway: the tunnel opens only after the upstream's `101`.
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// What the echo upstream saw of a handshake: the path and the `via` header.
type Handshake = (String, Option<String>);

/// A WebSocket echo server on a raw listener: every text or binary message is sent back.
async fn ws_echo_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Handshake>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, however large clippy finds it.
                #[allow(clippy::result_large_err)]
                let cb = move |req: &WsRequest, resp: WsResponse| {
                    let via = req
                        .headers()
                        .get("via")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let _ = tx.send((req.uri().path().to_owned(), via));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        return;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn websocket_echo_through_gateway() {
    let (up, mut handshakes) = ws_echo_upstream().await;
    let gw = Gw::start(&one_route(up, "", "")).await;

    let (mut ws, resp) = within(
        "ws connect",
        tokio_tungstenite::connect_async(format!("ws://{}/chat/room1", gw.addr)),
    )
    .await
    .expect("handshake through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let (path, via) = within("upstream handshake", handshakes.recv())
        .await
        .expect("upstream saw the handshake");
    assert_eq!(path, "/chat/room1");
    assert!(
        via.as_deref().is_some_and(|v| v.contains("turnpike")),
        "upstream saw via {via:?}"
    );

    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 3, 255]),
        Message::text("ünïcödé ✓"),
        Message::binary(big),
        Message::text(""),
    ];
    for m in &messages {
        within("ws send", ws.send(m.clone())).await.expect("send");
        let echoed = within("ws echo", ws.next())
            .await
            .expect("stream ended")
            .expect("read");
        assert_eq!(&echoed, m);
    }

    // Several messages in flight at once come back in order.
    for i in 0..20 {
        within("ws send", ws.send(Message::text(format!("m{i}"))))
            .await
            .unwrap();
    }
    for i in 0..20 {
        let echoed = within("ws echo", ws.next())
            .await
            .expect("stream ended")
            .expect("read");
        assert_eq!(echoed, Message::text(format!("m{i}")));
    }

    within("ws close", ws.close(None)).await.expect("close");
    // The upstream ends the connection; the client sees the stream finish.
    while let Some(item) = within("ws drain", ws.next()).await {
        match item {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("unexpected message after close: {other:?}"),
            Err(_) => break,
        }
    }
}

#[tokio::test]
async fn refused_upgrade_is_not_tunnelled() {
    // The upstream refuses the upgrade with a plain 403 and otherwise serves HTTP.
    let up = Upstream::start(|s| {
        if s.header("upgrade").is_some() {
            status(StatusCode::FORBIDDEN, "forbidden")
        } else {
            echo_reply(s)
        }
    })
    .await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;

    // A real client: the handshake fails with the upstream's 403.
    let err = within(
        "ws connect",
        tokio_tungstenite::connect_async(format!("ws://{}/chat", gw.addr)),
    )
    .await
    .expect_err("the handshake must fail");
    match err {
        WsError::Http(resp) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
        other => panic!("expected an HTTP error, got {other:?}"),
    }

    // On a raw socket: after the 403 the connection is still HTTP. What the client sends next
    // is parsed as a new request (and reaches the upstream as one, with the gateway's own
    // headers), not copied through a tunnel.
    let mut s = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let upgrade = format!(
        "GET /chat HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    within("write", s.write_all(upgrade.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(body, b"forbidden");
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("upgrade"),
        "a refused upgrade must not look like a switch: {head}"
    );

    within(
        "write",
        s.write_all(format!("GET /after HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr).as_bytes()),
    )
    .await
    .unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-echo-path: /after"),
        "{head}"
    );

    let seen = up.seen();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let after = &seen[2];
    assert_eq!(after.path_and_query, "/after");
    assert!(
        after.header("via").is_some_and(|v| v.contains("turnpike")),
        "the follow-up was proxied, not tunnelled"
    );
    assert!(after.header("upgrade").is_none());
}

/// An upstream that writes its first frame in the same segment as its `101`: the bytes the
/// gateway read past the response head must reach the client first, not be lost.
#[tokio::test]
async fn frame_sent_together_with_101_is_delivered() {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let key = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("sec-websocket-key:")
                    .then(|| l[18..].trim().to_owned())
            })
            .unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        // An unmasked text frame "welcome" in the same write.
        out.extend_from_slice(&[0x81, 7]);
        out.extend_from_slice(b"welcome");
        let _ = tcp.write_all(&out).await;
        // Keep the connection open until the client goes away.
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await.unwrap_or(0) > 0 {}
    });
    let gw = Gw::start(&one_route(up, "", "")).await;
    let (mut ws, _) = within(
        "ws connect",
        tokio_tungstenite::connect_async(format!("ws://{}/greet", gw.addr)),
    )
    .await
    .expect("handshake");
    let first = within("greeting", ws.next())
        .await
        .expect("stream ended")
        .expect("read");
    assert_eq!(first, Message::text("welcome"));
}
