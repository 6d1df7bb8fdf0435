//! `Expect: 100-continue` on a raw socket: the interim 100 arrives before the body is sent.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn expect_100_continue_then_body_then_echo() {
    let up = Upstream::echo().await;
    let gw = Gw::start(&one_route(up.addr, "", "")).await;

    let body = b"hello after continue";
    let mut s = within("connect", TcpStream::connect(gw.addr)).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        gw.addr,
        body.len()
    );
    within("write head", s.write_all(head.as_bytes())).await.unwrap();

    // Nothing of the body has been sent: the gateway must ask for it.
    let mut buf = Vec::new();
    let (interim, interim_body) = read_response(&mut s, &mut buf).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim:?}");
    assert!(interim_body.is_empty());
    assert!(buf.is_empty(), "nothing may follow the 100 before the body is sent: {buf:?}");

    within("write body", s.write_all(body)).await.unwrap();
    let (head, got) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(got, body);

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/upload");
    assert_eq!(&seen[0].body[..], body);
    assert!(seen[0].header("expect").is_none(), "the gateway answers Expect itself");
}
