//! gRPC through the gateway: tonic client → gateway (h2c) → tonic server (h2c upstream).
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;

use common::*;
use futures_util::Stream;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

mod pb {
    tonic::include_proto!("echo");
}

use pb::Msg;
use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};

/// Text that makes `Unary` answer `NOT_FOUND "x"`.
const MISSING: &str = "missing";
/// Text that makes `ServerStream` end, after its messages, with `ABORTED` and custom
/// metadata in the trailers.
const FAIL_AFTER: &str = "fail-after";

struct Svc;

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        // `te: trailers` must survive the gateway's hop-by-hop stripping.
        let te = req
            .metadata()
            .get("te")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let msg = req.into_inner();
        if msg.text == MISSING {
            return Err(Status::not_found("x"));
        }
        let mut resp = Response::new(Msg {
            text: format!("echo: {}", msg.text),
            count: msg.count + 1,
        });
        resp.metadata_mut().insert(
            "x-upstream-te",
            te.parse().map_err(|_| Status::internal("bad te"))?,
        );
        Ok(resp)
    }

    type ServerStreamStream = MsgStream;

    async fn server_stream(&self, req: Request<Msg>) -> Result<Response<MsgStream>, Status> {
        let msg = req.into_inner();
        let mut items: Vec<Result<Msg, Status>> = (0..msg.count)
            .map(|i| {
                Ok(Msg {
                    text: format!("{} #{i}", msg.text),
                    count: i,
                })
            })
            .collect();
        if msg.text == FAIL_AFTER {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert(
                "x-trailer-note",
                "from-upstream"
                    .parse()
                    .map_err(|_| Status::internal("bad md"))?,
            );
            md.insert_bin(
                "x-trailer-bin",
                tonic::metadata::MetadataValue::from_bytes(&[0, 1, 2, 255]),
            );
            items.push(Err(Status::with_metadata(
                Code::Aborted,
                "stopped on purpose",
                md,
            )));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
    }
}

/// A tonic server on 127.0.0.1:0.
async fn grpc_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming(EchoServer::new(Svc), incoming),
    );
    addr
}

/// Gateway with an HTTP/2 (h2c) upstream in front of the tonic server, and a client to it.
async fn setup() -> (Gw, EchoClient<Channel>) {
    let up = grpc_upstream().await;
    let gw = Gw::start(&one_route(up, "    http2: true", "")).await;
    let channel = within(
        "grpc connect",
        Channel::from_shared(format!("http://{}", gw.addr))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect to gateway");
    (gw, EchoClient::new(channel))
}

#[tokio::test]
async fn unary_call_through_gateway() {
    let (_gw, mut client) = setup().await;
    let resp = within(
        "unary",
        client.unary(Msg {
            text: "hello".into(),
            count: 41,
        }),
    )
    .await
    .expect("unary call");
    assert_eq!(
        resp.metadata()
            .get("x-upstream-te")
            .and_then(|v| v.to_str().ok()),
        Some("trailers")
    );
    assert_eq!(
        resp.into_inner(),
        Msg {
            text: "echo: hello".into(),
            count: 42
        }
    );

    // The same channel (one HTTP/2 connection to the gateway) carries further calls.
    for i in 0..5u32 {
        let r = within(
            "unary again",
            client.unary(Msg {
                text: format!("n{i}"),
                count: i,
            }),
        )
        .await
        .unwrap();
        assert_eq!(r.into_inner().text, format!("echo: n{i}"));
    }
}

#[tokio::test]
async fn server_streaming_delivers_all_messages_in_order_then_ok() {
    let (_gw, mut client) = setup().await;
    const N: u32 = 50;
    let mut stream = within(
        "stream open",
        client.server_stream(Msg {
            text: "tick".into(),
            count: N,
        }),
    )
    .await
    .expect("open stream")
    .into_inner();
    let mut got = Vec::new();
    // `message()` yields `Ok(None)` only after a trailer with `grpc-status: 0`; a missing or
    // failed status would surface as `Err`.
    while let Some(m) = within("stream message", stream.message())
        .await
        .expect("stream item")
    {
        got.push(m);
    }
    let want: Vec<Msg> = (0..N)
        .map(|i| Msg {
            text: format!("tick #{i}"),
            count: i,
        })
        .collect();
    assert_eq!(got, want);
    let trailers = within("trailers", stream.trailers())
        .await
        .expect("trailers")
        .expect("trailers present");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "{trailers:?}"
    );
}

#[tokio::test]
async fn error_status_arrives_as_sent() {
    let (_gw, mut client) = setup().await;
    let status = within(
        "unary error",
        client.unary(Msg {
            text: MISSING.into(),
            count: 0,
        }),
    )
    .await
    .expect_err("NOT_FOUND expected");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "x");
}

#[tokio::test]
async fn custom_metadata_in_trailers_arrives() {
    let (_gw, mut client) = setup().await;
    let mut stream = within(
        "stream open",
        client.server_stream(Msg {
            text: FAIL_AFTER.into(),
            count: 3,
        }),
    )
    .await
    .expect("open stream")
    .into_inner();
    for i in 0..3u32 {
        let m = within("stream message", stream.message())
            .await
            .expect("message")
            .expect("not the end yet");
        assert_eq!(m.count, i);
    }
    // After the messages, the error status and its metadata come in the HTTP/2 trailers.
    let status = within("stream end", stream.message())
        .await
        .expect_err("ABORTED expected");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "stopped on purpose");
    let md = status.metadata();
    assert_eq!(
        md.get("x-trailer-note").and_then(|v| v.to_str().ok()),
        Some("from-upstream"),
        "{md:?}"
    );
    let bin = md
        .get_bin("x-trailer-bin")
        .expect("binary trailer")
        .to_bytes()
        .expect("base64");
    assert_eq!(&bin[..], &[0, 1, 2, 255]);
}

#[tokio::test]
async fn large_messages_and_long_streams_respect_flow_control() {
    let (_gw, mut client) = setup().await;
    // Well past HTTP/2's default 64 KiB windows, in both directions.
    let text = "0123456789abcdef".repeat(64 * 1024);
    let resp = within(
        "large unary",
        client.unary(Msg {
            text: text.clone(),
            count: 1,
        }),
    )
    .await
    .expect("large unary");
    assert_eq!(resp.into_inner().text.len(), text.len() + "echo: ".len());

    const N: u32 = 2000;
    let padding = "p".repeat(1000);
    let mut stream = within(
        "stream open",
        client.server_stream(Msg {
            text: padding.clone(),
            count: N,
        }),
    )
    .await
    .expect("open stream")
    .into_inner();
    let mut n = 0;
    while let Some(m) = within("stream message", stream.message())
        .await
        .expect("stream item")
    {
        assert_eq!(m.count, n);
        assert_eq!(m.text, format!("{padding} #{n}"));
        n += 1;
    }
    assert_eq!(n, N);
}

/// Errors the gateway makes itself reach gRPC clients as gRPC statuses (a trailers-only
/// response), not as JSON bodies a gRPC client cannot read.
#[tokio::test]
async fn unreachable_upstream_is_unavailable() {
    // Bind then drop: nothing listens there any more.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gw::start(&one_route(dead, "    http2: true", "")).await;
    let channel = within(
        "grpc connect",
        Channel::from_shared(format!("http://{}", gw.addr))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect to gateway");
    let status = within("unary", EchoClient::new(channel).unary(Msg::default()))
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream_unreachable"),
        "{status:?}"
    );
}
