//! Test harness: the real gateway in-process, mock upstreams on port 0, a small HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use turnpike_model::{Config, Format, Source};
use turnpike_proxy::body::ProxyBody;
use turnpike_proxy::gateway::Gateway;

/// Parses YAML into a config, forcing every listener onto 127.0.0.1:0.
pub fn config(yaml: &str) -> Config {
    let source = Source {
        file: "test.yaml".into(),
        text: yaml.into(),
    };
    let mut c = turnpike_model::parse(&source, Format::Yaml)
        .unwrap_or_else(|e| panic!("bad test config: {e}"));
    if c.server.listeners.is_empty() {
        c.server.listeners.push(Default::default());
    }
    for l in &mut c.server.listeners {
        l.address = "127.0.0.1:0".into();
    }
    c
}

/// A running gateway and its base URL.
pub struct Gw {
    pub gateway: Arc<Gateway>,
    pub addr: SocketAddr,
}

impl Gw {
    pub async fn start(yaml: &str) -> Self {
        let cfg = config(yaml);
        let gateway = Gateway::start(&cfg)
            .await
            .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
        let addr = gateway.local_addrs()[0].1;
        Self { gateway, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn reload(&self, yaml: &str) -> Result<u64, turnpike_model::ConfigErrors> {
        self.gateway.reload(&config(yaml)).await
    }
}

/// A collected response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    collect(resp).await
}

pub async fn collect(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

pub fn req(method: &str, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// A mock upstream whose behaviour is a closure.
pub struct Mock {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Mock {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let handler = Arc::new(handler);
        let (h, s) = (hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => break,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (handler, h, s) = (handler.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! { _ = conn => {}, _ = s.cancelled() => {} }
                });
            }
        });
        Self { addr, hits, stop }
    }

    /// An upstream that answers `status` with a body naming itself.
    pub async fn fixed(name: &'static str, status: u16) -> Self {
        Self::start(move |_req| async move {
            let mut r = Response::new(full(name));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r.headers_mut().insert("x-served-by", name.parse().unwrap());
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub use turnpike_proxy::body::full;

/// An address on which nothing listens (bound then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Polls `cond` until it holds or `within` elapses.
pub async fn eventually<F: FnMut() -> Fut, Fut: Future<Output = bool>>(
    within: Duration,
    mut cond: F,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream answering 200 with the request's headers and path as JSON.
pub async fn echo() -> Mock {
    Mock::start(|req| async move {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
                )
            })
            .collect();
        let body = serde_json::json!({
            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "headers": headers,
        });
        // An upstream with its own, careless CORS answer, on request.
        let careless = req.headers().contains_key("x-upstream-cors");
        let mut r = Response::new(full(body.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        if careless {
            r.headers_mut()
                .insert("access-control-allow-origin", "*".parse().unwrap());
            r.headers_mut()
                .insert("access-control-allow-credentials", "true".parse().unwrap());
        }
        r
    })
    .await
}

/// One upstream `up` with routes `api` (`/api`) and `open` (`/open`), then `rest`.
pub fn yaml(upstream: std::net::SocketAddr, rest: &str) -> String {
    format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{upstream}"}}]
routes:
  - {{name: api, paths: [{{prefix: /api}}], upstream: up}}
  - {{name: open, paths: [{{prefix: /open}}], upstream: up}}
{rest}"#
    )
}

/// A GET of `path` with `headers`.
pub async fn call(gw: &Gw, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut r = req(method, &gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(Full::new(Bytes::new())).unwrap()).await
}

/// Times `n` sequential `GET /api/t` requests, each answered 200.
pub async fn timed(gw: &Gw, n: usize) -> Duration {
    let start = tokio::time::Instant::now();
    for _ in 0..n {
        let r = call(gw, "GET", "/api/t", &[]).await;
        assert_eq!(r.status, 200);
    }
    start.elapsed()
}

/// A server that accepts connections and never reads or answers: a sink or collector that
/// hangs. Accepted connections arrive on the receiver (and stay open while it holds them).
pub async fn silent_server() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<tokio::net::TcpStream>,
) {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let (hold_tx, hold_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            let _ = hold_tx.send(s);
        }
    });
    (addr, hold_rx)
}

/// A POST of `path` with `headers` whose body streams from `chunks` (no `Content-Length`).
pub async fn send_stream<S>(gw: &Gw, path: &str, headers: &[(&str, &str)], chunks: S) -> Reply
where
    S: futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>>
        + Send
        + Unpin
        + 'static,
{
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<S>>();
    let mut r = req("POST", &gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = client
        .request(r.body(http_body_util::StreamBody::new(chunks)).unwrap())
        .await
        .unwrap();
    collect(resp).await
}
