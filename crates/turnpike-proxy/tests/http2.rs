//! HTTP/2 protections at the listener, observed by a raw h2 client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use turnpike_proxy::demo::DemoServer;

async fn gateway(limits: &str) -> (Gw, DemoServer) {
    let up = DemoServer::start("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let gw = Gw::start(&format!(
        "server: {{limits: {limits}}}\nupstreams: [{{name: up, targets: [{{address: \"{}\"}}]}}]\nroutes: [{{name: all, paths: [{{prefix: /}}], upstream: up}}]\n",
        up.local_addr()
    ))
    .await;
    (gw, up)
}

#[tokio::test]
async fn advertises_the_configured_stream_limit() {
    let (gw, _up) = gateway("{h2_max_concurrent_streams: 7}").await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // The server's SETTINGS arrive with the first exchange.
    let req = http::Request::get(format!("http://{}/echo", gw.addr))
        .body(())
        .unwrap();
    client = client.ready().await.unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(client.current_max_send_streams(), 7);
}

#[tokio::test]
async fn rapid_reset_flood_closes_the_connection() {
    let (gw, _up) = gateway("{h2_max_pending_reset_streams: 5}").await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut closed = false;
    // Bounded: the server must give up long before 1000 resets.
    for _ in 0..1000 {
        let req = http::Request::get(format!("http://{}/delay/1000", gw.addr))
            .body(())
            .unwrap();
        client = match client.ready().await {
            Ok(c) => c,
            Err(_) => {
                closed = true;
                break;
            }
        };
        match client.send_request(req, true) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let result = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("connection still open")
        .unwrap();
    assert!(
        closed || result.is_err(),
        "server tolerated a rapid-reset flood"
    );
    if let Err(e) = result {
        assert!(e.is_go_away() || e.is_io() || e.reason().is_some(), "{e:?}");
    }
}
