//! The HTTP client to one upstream: its connection pool, TLS and connect timeout.
//!
//! Requests are addressed to a target's socket address (`http://10.0.0.7:8080/...`), so the
//! pool is keyed per target. The connector dials that address and, for TLS, presents the
//! server name configured for the upstream (or the target's host name) in SNI — never the IP
//! when a name is known.
//!
//! HTTP/1.1 upstreams go through [`H1Pool`], our own pool over hyper's connection API: each
//! connection has its task (which writes requests and reads answers), and a connection goes
//! back to the pool when its answer's body has been read to the end, without a task per
//! request to watch for that. (hyper-util's pooled client spawned one per request and cost
//! about a sixth of the proxy's CPU.) HTTP/2 upstreams keep hyper-util's client, which
//! multiplexes requests over one connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use turnpike_model::{UpstreamConfig, UpstreamScheme};

use crate::body::{BoxError, ProxyBody};

/// Longest a request waits for a pooled connection to accept it. Connections are pooled only
/// once ready, so this is a safety net for one that turns busy or closes meanwhile: past it,
/// the request gives that connection up and takes the next one, or dials.
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

/// Client for one upstream.
#[derive(Clone)]
pub struct UpstreamClient {
    transport: Transport,
    names: Arc<RwLock<HashMap<SocketAddr, String>>>,
    scheme: &'static str,
}

/// How requests reach the upstream.
#[derive(Clone)]
enum Transport {
    /// HTTP/1.1, one request at a time per connection, through our pool.
    Http1(Arc<H1Pool>),
    /// HTTP/2, multiplexed by hyper-util's client.
    Http2(Box<Client<Connector, ProxyBody>>),
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// Builds the client from the upstream's pool, TLS and timeout settings.
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let tls = match config.scheme {
            UpstreamScheme::Http => None,
            UpstreamScheme::Https => {
                let cfg = crate::tls::client_config(&config.tls, config.http2)?;
                Some(TlsConnector::from(Arc::new(cfg)))
            }
        };
        let names = Arc::new(RwLock::new(HashMap::new()));
        let connector = Connector {
            connect_timeout: config.timeouts.connect,
            tls,
            sni: config.tls.sni.clone(),
            names: names.clone(),
        };
        let transport = if config.http2 {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(config.pool.idle_timeout)
                .pool_max_idle_per_host(config.pool.max_idle_per_target)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .set_host(false)
                // We retry ourselves, with the budget and idempotency rules in one place.
                .retry_canceled_requests(false);
            if config.scheme == UpstreamScheme::Http {
                builder.http2_only(true);
            }
            Transport::Http2(Box::new(builder.build(connector)))
        } else {
            Transport::Http1(Arc::new(H1Pool::new(
                connector,
                config.pool.max_idle_per_target,
                config.pool.idle_timeout,
            )))
        };
        let scheme = match config.scheme {
            UpstreamScheme::Http => "http",
            UpstreamScheme::Https => "https",
        };
        Ok(Self {
            transport,
            names,
            scheme,
        })
    }

    /// Records the host names of targets, for SNI.
    pub fn set_server_names(&self, targets: &[Arc<crate::upstream::Target>]) {
        if let Ok(mut names) = self.names.write() {
            names.clear();
            for t in targets {
                names.insert(t.addr, t.host.clone());
            }
        }
    }

    /// The URI addressing `addr` with `path_and_query`.
    pub fn uri_for(&self, addr: SocketAddr, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme)
            .authority(addr.to_string())
            .path_and_query(path_and_query)
            .build()
    }

    /// The URI addressing `target` with `path_and_query`, from parts prepared when the target
    /// was resolved (no formatting or re-parsing of the address per request).
    pub fn uri_for_target(
        &self,
        target: &crate::upstream::Target,
        path_and_query: String,
    ) -> Result<Uri, http::Error> {
        let Some(authority) = target.uri_authority.clone() else {
            return self.uri_for(target.addr, &path_and_query);
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if self.scheme == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        parts.authority = Some(authority);
        parts.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(
            bytes::Bytes::from(path_and_query),
        )?);
        Ok(Uri::from_parts(parts)?)
    }

    /// Sends a request whose URI came from [`UpstreamClient::uri_for`] or
    /// [`UpstreamClient::uri_for_target`]. The caller sets `Host`.
    pub async fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        match &self.transport {
            Transport::Http1(pool) => pool.send(req).await,
            Transport::Http2(client) => match client.request(req).await {
                Ok(resp) => Ok(resp.map(UpstreamBody::plain)),
                Err(e) => Err(ClientError {
                    connect: e.is_connect(),
                    inner: Box::new(e),
                }),
            },
        }
    }

    /// Idle pooled HTTP/1 connections to `addr` (tests and diagnostics).
    pub fn idle_connections(&self, addr: SocketAddr) -> usize {
        match &self.transport {
            Transport::Http1(pool) => pool.idle_count(addr),
            Transport::Http2(_) => 0,
        }
    }
}

/// Why an upstream exchange failed.
#[derive(Debug)]
pub struct ClientError {
    connect: bool,
    inner: BoxError,
}

impl ClientError {
    /// Whether the connection could not be made (nothing of the request was sent).
    pub fn is_connect(&self) -> bool {
        self.connect
    }

    fn connect(inner: impl Into<BoxError>) -> Self {
        Self {
            connect: true,
            inner: inner.into(),
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.connect {
            write!(f, "cannot connect: {}", self.inner)
        } else {
            write!(f, "exchange failed: {}", self.inner)
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.inner)
    }
}

/// Idle HTTP/1 connections per target, most recently used last.
pub(crate) struct H1Pool {
    connector: Connector,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
    reaper: AtomicBool,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl H1Pool {
    fn new(connector: Connector, max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            connector,
            idle: Mutex::new(HashMap::new()),
            max_idle,
            idle_timeout,
            reaper: AtomicBool::new(false),
        }
    }

    async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        let addr: SocketAddr = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| ClientError::connect("upstream URI is not a socket address"))?;
        // HTTP/1 requests carry the path only (origin form); the authority picked the target.
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
        loop {
            let (mut sender, reused) = match self.take(addr) {
                Some(sender) => (sender, true),
                None => (self.dial(addr).await?, false),
            };
            if reused && !sender.is_ready() {
                match tokio::time::timeout(POOLED_READY_WAIT, sender.ready()).await {
                    Ok(Ok(())) => {}
                    // Closed, or still busy: try the next idle one, or a new connection.
                    _ => continue,
                }
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.answer(addr, sender, resp)),
                Err(mut e) => {
                    // An idle connection the upstream closed just as we picked it: the
                    // request was never written, so it goes out on another one, whatever
                    // its method.
                    if let Some(unsent) = e.take_message() {
                        if reused {
                            req = unsent;
                            continue;
                        }
                        // A new connection that ended before the request was written:
                        // nothing was sent, which the caller may retry whatever the method.
                        return Err(ClientError::connect(e.into_error()));
                    }
                    return Err(ClientError {
                        connect: false,
                        inner: Box::new(e.into_error()),
                    });
                }
            }
        }
    }

    /// Wraps the answer so that its connection returns to the pool once the body is read.
    fn answer(
        self: &Arc<Self>,
        addr: SocketAddr,
        sender: SendRequest<ProxyBody>,
        resp: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        let (parts, body) = resp.into_parts();
        // A 101 hands the connection to the tunnel; it never serves another request.
        let back = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            None
        } else if body.is_end_stream() {
            self.checkin(addr, sender);
            None
        } else {
            Some(Checkin {
                pool: Arc::clone(self),
                addr,
                sender,
            })
        };
        Response::from_parts(parts, UpstreamBody { inner: body, back })
    }

    async fn dial(&self, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, ClientError> {
        let conn = self
            .connector
            .dial(addr)
            .await
            .map_err(ClientError::connect)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(conn)
            .await
            .map_err(ClientError::connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The most recently used idle connection to `addr` that is still open and fresh.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&addr)?;
        while let Some(entry) = list.pop() {
            if !entry.sender.is_closed() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Pools a connection whose answer has been read. One that cannot take a request yet is
    /// pooled only once it can: usually hyper's connection task has just not marked it idle
    /// yet, but after an early answer (a 413 or 401 while the client still uploads) it may
    /// still be sending the request body, and a request picking it would wait for the upload.
    fn checkin(self: &Arc<Self>, addr: SocketAddr, mut sender: SendRequest<ProxyBody>) {
        if sender.is_ready() {
            self.put(addr, sender);
            return;
        }
        if self.max_idle == 0 || sender.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::clone(self);
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(pool.idle_timeout, sender.ready()).await {
                pool.put(addr, sender);
            }
        });
    }

    fn put(self: &Arc<Self>, addr: SocketAddr, sender: SendRequest<ProxyBody>) {
        if self.max_idle == 0 || sender.is_closed() {
            return;
        }
        self.start_reaper();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let list = idle.entry(addr).or_default();
        if list.len() >= self.max_idle {
            // Connections the upstream closed since the last sweep do not hold a place.
            list.retain(|e| !e.sender.is_closed());
        }
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn idle_count(&self, addr: SocketAddr) -> usize {
        self.idle
            .lock()
            .map(|idle| {
                idle.get(&addr)
                    .map_or(0, |l| l.iter().filter(|e| !e.sender.is_closed()).count())
            })
            .unwrap_or(0)
    }

    /// Closes connections idle past the timeout (dropping the sender ends the connection's
    /// task, which closes the socket) and forgets the ones the upstream closed.
    fn sweep(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let timeout = self.idle_timeout;
        for list in idle.values_mut() {
            list.retain(|e| !e.sender.is_closed() && e.since.elapsed() < timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Starts the task that sweeps the pool, once, from the first connection pooled (the
    /// pool may be built outside a runtime). The task ends when the pool is dropped.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.load(Ordering::Relaxed) || self.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaper.store(false, Ordering::Release);
            return;
        };
        let pool = Arc::downgrade(self);
        let every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.sweep();
            }
        });
    }
}

/// A connection to hand back to its pool.
struct Checkin {
    pool: Arc<H1Pool>,
    addr: SocketAddr,
    sender: SendRequest<ProxyBody>,
}

/// The body of an upstream's answer. For a pooled HTTP/1 connection, reading it to the end
/// returns the connection to the pool; dropping it earlier lets the connection close.
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<Checkin>,
}

impl UpstreamBody {
    fn plain(inner: Incoming) -> Self {
        Self { inner, back: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            // Trailers end the body (readers stop there), though hyper's HTTP/1 body only
            // reports its end on the next poll.
            Some(Ok(f)) if !f.is_trailers() && !this.inner.is_end_stream() => {}
            Some(Err(_)) => this.back = None,
            // The last frame, or the end: the exchange is complete on our side.
            _ => {
                if let Some(c) = this.back.take() {
                    c.pool.checkin(c.addr, c.sender);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

/// Dials target addresses, with optional TLS.
#[derive(Clone)]
struct Connector {
    connect_timeout: Duration,
    tls: Option<TlsConnector>,
    sni: Option<String>,
    names: Arc<RwLock<HashMap<SocketAddr, String>>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or("request URI has no authority")?;
            let addr: SocketAddr = authority
                .as_str()
                .parse()
                .map_err(|_| "upstream URI is not a socket address")?;
            this.dial(addr).await
        })
    }
}

impl Connector {
    /// Connects to `addr` (and shakes hands, for TLS) within the connect timeout.
    async fn dial(&self, addr: SocketAddr) -> Result<Conn, BoxError> {
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok::<_, BoxError>(Conn {
                    io: TokioIo::new(Either::Left(tcp)),
                    h2: false,
                }),
                Some(tls) => {
                    let name = self
                        .sni
                        .clone()
                        .or_else(|| self.names.read().ok().and_then(|n| n.get(&addr).cloned()))
                        .unwrap_or_else(|| addr.ip().to_string());
                    let server_name = ServerName::try_from(name)?;
                    let stream = tls.connect(server_name, tcp).await?;
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    Ok(Conn {
                        io: TokioIo::new(Either::Right(stream)),
                        h2,
                    })
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
        }
    }
}

/// The connect (or TLS handshake) timeout elapsed.
#[derive(Debug)]
pub struct ConnectTimeout;

impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connect timeout")
    }
}

impl std::error::Error for ConnectTimeout {}

pin_project_lite::pin_project! {
    /// A connection to a target, plain or TLS.
    pub struct Conn {
        #[pin]
        io: TokioIo<Either<TcpStream, TlsStream<TcpStream>>>,
        h2: bool,
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// An HTTP/1.1 upstream on port 0 that counts the connections it accepted and saw end.
    struct Upstream {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
        closed_note: Arc<Notify>,
    }

    impl Upstream {
        /// `/` answers `hello`; `/big` streams 64 chunks of 16 KiB.
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let closed = Arc::new(AtomicUsize::new(0));
            let closed_note = Arc::new(Notify::new());
            let (a, c, n) = (accepted.clone(), closed.clone(), closed_note.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    a.fetch_add(1, Ordering::SeqCst);
                    let (c, n) = (c.clone(), n.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(|req: Request<Incoming>| async move {
                            let body: ProxyBody = if req.uri().path() == "/big" {
                                let chunks = (0..64).map(|_| {
                                    Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 16384])))
                                });
                                StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
                            } else {
                                Full::new(Bytes::from_static(b"hello"))
                                    .map_err(|e: Infallible| match e {})
                                    .boxed_unsync()
                            };
                            Ok::<_, Infallible>(Response::new(body))
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                        c.fetch_add(1, Ordering::SeqCst);
                        n.notify_waiters();
                    });
                }
            });
            Self {
                addr,
                accepted,
                closed,
                closed_note,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        /// Waits (up to 10 s) until `n` connections have ended.
        async fn until_closed(&self, n: usize) {
            let wait = async {
                loop {
                    let note = self.closed_note.notified();
                    if self.closed.load(Ordering::SeqCst) >= n {
                        return;
                    }
                    note.await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .unwrap_or_else(|_| panic!("fewer than {n} upstream connections ended"));
        }
    }

    /// A raw TCP upstream on port 0: `serve` gets each accepted connection; also returns the
    /// count of connections accepted.
    async fn raw_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (addr, accepted)
    }

    /// Reads into `buf` until it holds a request head; the head's length, or `None` at EOF.
    async fn read_head(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(i + 4);
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn client(max_idle: usize, idle_timeout: Duration) -> UpstreamClient {
        let mut cfg: UpstreamConfig = serde_json::from_value(serde_json::json!({
            "name": "t",
            "targets": [{"address": "127.0.0.1:1"}],
        }))
        .unwrap();
        cfg.pool.max_idle_per_target = max_idle;
        cfg.pool.idle_timeout = idle_timeout;
        UpstreamClient::new(&cfg).unwrap()
    }

    async fn get(c: &UpstreamClient, addr: SocketAddr, path: &str) -> Response<UpstreamBody> {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = c.uri_for(addr, path).unwrap();
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        c.request(req).await.unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let up = Upstream::start().await;
        let c = client(8, Duration::from_secs(60));
        for _ in 0..20 {
            let resp = get(&c, up.addr, "/").await;
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
        }
        assert_eq!(up.accepted(), 1, "sequential requests share one connection");
        assert_eq!(c.idle_connections(up.addr), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_the_pool_keeps_its_cap() {
        let up = Upstream::start().await;
        let c = client(2, Duration::from_secs(60));
        // Hold ten answers unread at once: each needs a connection of its own.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(get(&c, up.addr, "/big").await);
        }
        assert_eq!(up.accepted(), 10);
        for resp in held {
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 64 * 16384);
        }
        assert_eq!(
            c.idle_connections(up.addr),
            2,
            "only max_idle_per_target stay"
        );
        up.until_closed(8).await;
        // The next requests use the two kept ones.
        for _ in 0..2 {
            let resp = get(&c, up.addr, "/").await;
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(up.accepted(), 10);
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_is_not_pooled() {
        let up = Upstream::start().await;
        let c = client(8, Duration::from_secs(60));
        let mut body = get(&c, up.addr, "/big").await.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(c.idle_connections(up.addr), 0);
        up.until_closed(1).await;
        // A new connection serves the next request, without waiting on the dropped one.
        let resp = get(&c, up.addr, "/").await;
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"hello"
        );
        assert_eq!(up.accepted(), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let up = Upstream::start().await;
        let c = client(8, Duration::from_millis(200));
        let resp = get(&c, up.addr, "/").await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(c.idle_connections(up.addr), 1);
        // The sweeper closes it; the upstream sees the connection end.
        up.until_closed(1).await;
        assert_eq!(c.idle_connections(up.addr), 0);
        let resp = get(&c, up.addr, "/").await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(up.accepted(), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
        // Answers each request with keep-alive, then closes the socket anyway.
        let (addr, accepted) = raw_upstream(|mut tcp| async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = Vec::new();
            if read_head(&mut tcp, &mut buf).await.is_none() {
                return;
            }
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = tcp.shutdown().await;
        })
        .await;
        let c = client(8, Duration::from_secs(60));
        for i in 0..5 {
            let mut req = Request::new(crate::body::full(Bytes::from_static(b"{}")));
            *req.method_mut() = http::Method::POST;
            *req.uri_mut() = c.uri_for(addr, "/").unwrap();
            req.headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("up"));
            let resp = c
                .request(req)
                .await
                .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
            assert_eq!(
                &resp.into_body().collect().await.unwrap().to_bytes()[..],
                b"ok"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_connection_still_uploading_after_an_early_answer_is_pooled_only_when_done() {
        // Answers each request as soon as its head arrives, then reads its body (keep-alive).
        let (addr, accepted) = raw_upstream(|mut tcp| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 4096];
            while let Some(head_end) = read_head(&mut tcp, &mut buf).await {
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                buf.drain(..head_end);
                if tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
                while buf.len() < length {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..length);
            }
        })
        .await;
        let c = client(8, Duration::from_secs(60));
        let post = |body: ProxyBody, length: usize| {
            let mut req = Request::new(body);
            *req.method_mut() = http::Method::POST;
            *req.uri_mut() = c.uri_for(addr, "/").unwrap();
            req.headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("up"));
            req.headers_mut()
                .insert(http::header::CONTENT_LENGTH, length.into());
            req
        };
        // An upload the client is still sending when the answer has been read.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let slow = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
            .boxed_unsync();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first half "))))
            .await
            .unwrap();
        let resp = c.request(post(slow, 22)).await.unwrap();
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(
            c.idle_connections(addr),
            0,
            "a connection still sending its request body is not offered to other requests"
        );
        // Another request meanwhile gets a connection of its own at once.
        let resp = c.request(post(crate::body::full("{}"), 2)).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The upload ends: its connection joins the pool.
        tx.send(Ok(Frame::data(Bytes::from_static(b"second half"))))
            .await
            .unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), async {
            while c.idle_connections(addr) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection that finished its upload is pooled");
    }

    #[tokio::test]
    async fn connect_failures_say_so() {
        // A port nothing listens on: bind one, then free it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let c = client(8, Duration::from_secs(60));
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = c.uri_for(addr, "/").unwrap();
        let err = c.request(req).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().starts_with("cannot connect"), "{err}");
    }
}
