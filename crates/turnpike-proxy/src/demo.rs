//! A small built-in upstream, so a new user sees real traffic through the gateway with no
//! other service, and tests have a realistic upstream on port 0.
//!
//! Endpoints (every response carries `x-served-by: <name>`):
//! - `GET /` — a welcome document.
//! - `/echo[/...]`, `/anything[/...]` — any method; echoes method, path, query, headers, body.
//! - `/status/{code}` — answers that status.
//! - `/delay/{ms}` — answers after that many milliseconds (capped at 60 s).
//! - `/stream/{n}` — `n` JSON lines, one chunk each.
//! - `/sse?n=3&interval_ms=100` — `n` server-sent events, flushed one by one.
//! - `/health` — `200 ok`.
//! - gRPC (HTTP/2), service `demo.v1.Greeter` of [`GREETER_PROTO`]: `SayHello` (unary) and
//!   `Countdown` (server streaming, one message each 100 ms).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, ProxyBody};

/// A running demo upstream. Stops when dropped.
pub struct DemoServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl DemoServer {
    /// Binds `addr` (port 0 allowed) and serves until dropped.
    pub async fn start(addr: SocketAddr, name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let name: Arc<str> = Arc::from(name);
        let (count, token) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = token.cancelled() => break,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let _ = stream.set_nodelay(true);
                let (name, count, token) = (name.clone(), count.clone(), token.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        count.fetch_add(1, Ordering::Relaxed);
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(respond(&name, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            stop,
        })
    }

    /// Bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn respond(name: &str, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let first = segments.next().unwrap_or("");
    let rest = segments.next().unwrap_or("");
    let mut resp = match first {
        "" => json(
            StatusCode::OK,
            serde_json::json!({
                "service": "turnpike-demo",
                "served_by": name,
                "message": "Hello from the demo upstream, through Turnpike.",
                "try": ["/echo", "/status/418", "/delay/200", "/stream/5", "/sse?n=3", "/cached/60"],
            }),
        ),
        "health" => text(StatusCode::OK, "ok"),
        "echo" | "anything" => echo(name, req).await,
        "status" => {
            let code = rest
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            json(code, serde_json::json!({ "status": code.as_u16() }))
        }
        "delay" => {
            let ms = rest.parse::<u64>().unwrap_or(0).min(60_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, serde_json::json!({ "delayed_ms": ms }))
        }
        "stream" => {
            let n = rest.parse::<usize>().unwrap_or(3).min(10_000);
            let frames = futures_util::stream::iter((0..n).map(|i| {
                Ok::<_, crate::body::BoxError>(Frame::data(Bytes::from(format!(
                    "{{\"line\":{i}}}\n"
                ))))
            }));
            let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/x-ndjson"
                    .parse()
                    .unwrap_or(header::HeaderValue::from_static("text/plain")),
            );
            r
        }
        "sse" => sse(req.uri().query().unwrap_or("")),
        "demo.v1.Greeter" => greeter(rest, req).await,
        "cached" => {
            // Cacheable for `rest` seconds; the time shows whether a cache answered.
            let secs = rest.parse::<u64>().unwrap_or(60).min(86_400);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let mut r = json(
                StatusCode::OK,
                serde_json::json!({ "served_by": name, "generated_at_ms": now_ms, "max_age": secs }),
            );
            if let Ok(v) = header::HeaderValue::from_str(&format!("public, max-age={secs}")) {
                r.headers_mut().insert(header::CACHE_CONTROL, v);
            }
            r.headers_mut()
                .insert("cache-tag", header::HeaderValue::from_static("demo"));
            r
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no such demo endpoint", "path": path }),
        ),
    };
    if let Ok(v) = header::HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

/// The demo's gRPC service, as a `.proto` (the quickstart's `grpc_transcode` carries the same
/// text, with its HTTP annotations).
pub const GREETER_PROTO: &str = r#"syntax = "proto3";
package demo.v1;

service Greeter {
  rpc SayHello(HelloRequest) returns (HelloReply);
  rpc Countdown(CountdownRequest) returns (stream HelloReply);
}

message HelloRequest { string name = 1; }
message HelloReply { string message = 1; }
message CountdownRequest { uint32 from = 1; }
"#;

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountdownRequest {
    #[prost(uint32, tag = "1")]
    from: u32,
}

/// `demo.v1.Greeter`: one framed request message in, framed replies and a status out.
async fn greeter(method: &str, req: Request<Incoming>) -> Response<ProxyBody> {
    use prost::Message as _;
    let status_only = |code: u8, msg: &'static str| {
        let mut r = Response::new(body::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", header::HeaderValue::from(u16::from(code)));
        h.insert("grpc-message", header::HeaderValue::from_static(msg));
        r
    };
    let Ok(bytes) = Limited::new(req.into_body(), 64 * 1024).collect().await else {
        return status_only(8, "request too large");
    };
    let bytes = bytes.to_bytes();
    let Some(msg) = bytes.get(5..).filter(|_| bytes.first() == Some(&0)) else {
        return status_only(13, "not a gRPC message");
    };
    let frame = |reply: &HelloReply| {
        let body = reply.encode_to_vec();
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(0);
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&body);
        Frame::data(Bytes::from(out))
    };
    let mut ok = http::HeaderMap::new();
    ok.insert("grpc-status", header::HeaderValue::from_static("0"));
    let frames: Vec<Frame<Bytes>> = match method {
        "SayHello" => {
            let Ok(r) = HelloRequest::decode(msg) else {
                return status_only(13, "not a HelloRequest");
            };
            if r.name.is_empty() {
                return status_only(3, "name is required");
            }
            vec![frame(&HelloReply {
                message: format!("Hello, {}!", r.name),
            })]
        }
        "Countdown" => {
            let Ok(r) = CountdownRequest::decode(msg) else {
                return status_only(13, "not a CountdownRequest");
            };
            (1..=r.from.min(10))
                .rev()
                .map(|n| {
                    frame(&HelloReply {
                        message: n.to_string(),
                    })
                })
                .collect()
        }
        _ => return status_only(12, "no such method"),
    };
    let spaced = method == "Countdown";
    use futures_util::StreamExt as _;
    let stream = futures_util::stream::iter(frames.into_iter().chain([Frame::trailers(ok)]))
        .enumerate()
        .then(move |(i, f)| async move {
            if spaced && i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, crate::body::BoxError>(f)
        });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    r
}

async fn echo(name: &str, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 1024 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({ "error": "body over 1 MiB" }),
            );
        }
    };
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_owned(), serde_json::Value::String(v));
            }
        }
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "served_by": name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
            "body_bytes": body.len(),
        }),
    )
}

fn sse(query: &str) -> Response<ProxyBody> {
    let mut n = 3u64;
    let mut interval = 100u64;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => n = v.parse().unwrap_or(3).min(1000),
            Some(("interval_ms", v)) => interval = v.parse().unwrap_or(100).min(10_000),
            _ => {}
        }
    }
    let stream = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
        let event = Frame::data(Bytes::from(format!("id: {i}\ndata: {{\"n\":{i}}}\n\n")));
        Some((Ok::<_, crate::body::BoxError>(event), i + 1))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, s: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(s));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}
