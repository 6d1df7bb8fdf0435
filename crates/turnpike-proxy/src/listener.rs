//! Listeners: the `accept` phase. One socket per [`ListenerConfig`], serving HTTP/1.1 and
//! HTTP/2 on the same port (h2c prior knowledge in plain text, ALPN over TLS), with connection
//! limits, SNI certificate selection and reload, per-connection timeouts and graceful drain.
//!
//! # Timeouts
//!
//! hyper 1.x's own HTTP/1 `header_read_timeout` is armed whenever the connection waits for a
//! request head, *including while idle between keep-alive requests*, so it closes idle
//! connections after `header_read_timeout` and cannot express "idle for `keepalive_timeout`,
//! but a head that has started must complete within `header_read_timeout`". It also does not
//! run while `auto::Builder` is still sniffing the protocol, so a client that connects and sends
//! nothing is never cut off. Both are measured in `tests::hyper_header_read_timeout_behaviour`.
//! We therefore switch hyper's timer off and run a small watchdog per connection, fed by an IO
//! wrapper (bytes received) and a service wrapper (requests in flight):
//!
//! - no request in flight and a request head (or the HTTP/2 preface) has started: the head must
//!   complete within `header_read_timeout`, else the connection is dropped. A fresh connection
//!   counts as a started head (after the TLS handshake, which has its own budget of the same
//!   length), so silent clients are cut off too;
//! - no request in flight and nothing received: the connection is closed after
//!   `keepalive_timeout` (HTTP/2: GOAWAY first, since pings and window updates keep arriving);
//! - a request in flight: no connection timer (request and body timeouts belong to the
//!   pipeline). Bytes of a pipelined next request that arrive while a response is still in
//!   flight therefore fall under `keepalive_timeout`, not `header_read_timeout`.

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use turnpike_model::{Limits, ListenerConfig};

use crate::body::{BoxError, ProxyBody};
use crate::clientcert::ClientCert;
use crate::h1guard::{GuardLimits, H1Guard};
use crate::tls::ServerCertificates;

/// What a connection tells the request handler.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address (the TCP peer; real client IP resolution happens later).
    pub peer: SocketAddr,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
    /// The listener's configured name.
    pub listener: Arc<str>,
    /// Whether TLS was terminated on this connection.
    pub tls: bool,
    /// The server name the client sent in SNI, if any.
    pub sni: Option<Arc<str>>,
    /// Whether ALPN negotiated `h2` (TLS only; h2c prior knowledge is visible in the request
    /// version instead).
    pub alpn_h2: bool,
    /// The client certificate the listener's `client_auth` verified, read once here for
    /// every request of the connection.
    pub client_cert: Option<Arc<ClientCert>>,
}

/// A bound listening socket with its certificates, ready to [`serve`](Listener::serve).
pub struct Listener {
    name: Arc<str>,
    socket: TcpListener,
    local: SocketAddr,
    limits: Limits,
    max_connections: usize,
    tls: Option<TlsState>,
}

/// TLS pieces of a listener.
struct TlsState {
    certs: Arc<ServerCertificates>,
    reload_interval: Duration,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("local", &self.local)
            .field("tls", &self.tls.is_some())
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Shortest interval between certificate file checks, so a zero in the config cannot spin.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);
/// First pause after a failing `accept(2)` (EMFILE and friends), doubled up to the maximum.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// hyper refuses an HTTP/1 read buffer smaller than this.
const HYPER_MIN_BUF: usize = 8192;
/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Listener {
    /// Binds the socket (port 0 allowed) and loads TLS certificates; errors name the listener
    /// and file.
    pub async fn bind(cfg: &ListenerConfig, limits: &Limits) -> Result<Listener, String> {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let tls = match &cfg.tls {
            None => None,
            Some(tls) => {
                let certs = Arc::new(ServerCertificates::load(&cfg.name, tls)?);
                Some(TlsState {
                    certs,
                    reload_interval: tls.reload_interval.max(MIN_RELOAD_INTERVAL),
                })
            }
        };
        let socket = TcpListener::bind(&cfg.address).await.map_err(|e| {
            format!(
                "listener `{}`: cannot bind `{}`: {e}",
                cfg.name, cfg.address
            )
        })?;
        let local = socket
            .local_addr()
            .map_err(|e| format!("listener `{}`: {e}", cfg.name))?;
        let max_connections = cfg
            .max_connections
            .unwrap_or(limits.max_connections)
            .clamp(1, Semaphore::MAX_PERMITS);
        Ok(Listener {
            name,
            socket,
            local,
            limits: limits.clone(),
            max_connections,
            tls,
        })
    }

    /// The bound address (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The listener's certificates, to reload them while [`serve`](Listener::serve) runs.
    /// `None` for plain-text listeners.
    pub fn certificates(&self) -> Option<Arc<ServerCertificates>> {
        self.tls.as_ref().map(|t| Arc::clone(&t.certs))
    }

    /// Loads the certificate files again now and swaps them in atomically; on error the
    /// running certificates stay.
    pub fn reload_certificates(&self) -> Result<(), String> {
        match &self.tls {
            Some(tls) => tls.certs.reload(),
            None => Err(format!("listener `{}` has no TLS", self.name)),
        }
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, asks every connection to
    /// close gracefully (HTTP/1: after the in-flight response; HTTP/2: GOAWAY), and returns
    /// when all connections have finished or `drain_timeout` elapsed (then remaining
    /// connections are dropped).
    pub async fn serve<F, S>(
        self,
        make_service: F,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) where
        F: Fn(ConnInfo) -> S + Send + Sync + 'static,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Listener {
            name,
            socket,
            local: _,
            limits,
            max_connections,
            tls,
        } = self;
        let reload_task = tls.as_ref().map(|t| {
            tokio::spawn(reload_loop(
                Arc::clone(&t.certs),
                t.reload_interval,
                shutdown.clone(),
            ))
        });
        let shared = Arc::new(Shared {
            protocols: Protocols::new(&limits),
            name,
            limits,
            tls: tls.map(|t| t.certs),
            make_service,
        });
        let permits = Arc::new(Semaphore::new(max_connections));
        let mut conns = JoinSet::new();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => log_join(done),
                accepted = accept(&socket, &permits) => match accepted {
                    Ok((stream, peer, permit)) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        conns.spawn(connection(
                            Arc::clone(&shared),
                            stream,
                            peer,
                            permit,
                            shutdown.clone(),
                        ));
                    }
                    // The peer gave up before we accepted: nothing wrong with the listener.
                    Err(e) if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => tracing::debug!(listener = %shared.name, error = %e, "accept"),
                    Err(e) => {
                        // EMFILE/ENFILE/ENOBUFS: retrying at once would spin; wait for
                        // connections to close and free descriptors.
                        tracing::error!(
                            listener = %shared.name,
                            error = %e,
                            retry_in = ?backoff,
                            "accept failed"
                        );
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
            }
        }
        // Closing the socket makes new connections fail fast instead of queueing unserved.
        drop(socket);
        tracing::info!(
            listener = %shared.name,
            connections = conns.len(),
            "listener stopped accepting; draining"
        );
        let mut deadline = pin!(tokio::time::sleep(drain_timeout));
        loop {
            tokio::select! {
                done = conns.join_next() => match done {
                    Some(done) => log_join(done),
                    None => break,
                },
                () = deadline.as_mut() => {
                    tracing::warn!(
                        listener = %shared.name,
                        connections = conns.len(),
                        "drain timeout elapsed; dropping remaining connections"
                    );
                    conns.shutdown().await;
                    break;
                }
            }
        }
        if let Some(task) = reload_task {
            task.abort();
        }
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "connection task panicked");
    }
}

/// Takes a connection permit, then accepts. At the limit we stop calling `accept(2)`, so
/// excess connections wait in the kernel backlog instead of being accepted and starved.
async fn accept(
    socket: &TcpListener,
    permits: &Arc<Semaphore>,
) -> io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = Arc::clone(permits)
        .acquire_owned()
        .await
        .map_err(|_| io::Error::other("connection semaphore closed"))?;
    let (stream, peer) = socket.accept().await?;
    Ok((stream, peer, permit))
}

/// Checks the certificate files every `every` and swaps in a new set when they changed.
async fn reload_loop(certs: Arc<ServerCertificates>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let certs = Arc::clone(&certs);
        // File reads and key parsing are blocking work; keep them off the reactor threads.
        match tokio::task::spawn_blocking(move || certs.reload_if_changed()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "TLS certificate reload failed; keeping the current certificates"
            ),
            Err(e) => tracing::error!(error = %e, "TLS certificate reload task failed"),
        }
    }
}

/// Everything connection tasks share.
struct Shared<F> {
    name: Arc<str>,
    limits: Limits,
    protocols: Protocols,
    /// The listener's certificates; each handshake takes the server configuration in use
    /// at its start (reloads replace it).
    tls: Option<Arc<ServerCertificates>>,
    make_service: F,
}

/// Connection builders, configured once per listener.
struct Protocols {
    /// Plain text: HTTP/1.1 or h2c prior knowledge, sniffed from the first bytes.
    auto: auto::Builder<TokioExecutor>,
    /// TLS with ALPN `http/1.1` or no ALPN.
    h1: http1::Builder,
    /// TLS with ALPN `h2`.
    h2: http2::Builder<TokioExecutor>,
}

/// The same HTTP/1 settings on hyper's builder and hyper-util's auto builder (their methods
/// share names but not a trait).
macro_rules! h1_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .keep_alive(true)
            // Replaced by the connection watchdog; see the module docs.
            .header_read_timeout(None::<Duration>)
            .max_buf_size($limits.max_header_bytes.max(HYPER_MIN_BUF))
            .max_headers($limits.max_headers)
    };
}

/// Same for HTTP/2.
macro_rules! h2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams($limits.h2_max_pending_reset_streams)
            .max_local_error_reset_streams($limits.h2_max_local_error_reset_streams)
            .max_header_list_size(u32::try_from($limits.max_header_bytes).unwrap_or(u32::MAX))
            // Pings find dead peers under long-lived streams; idleness is the watchdog's job.
            .keep_alive_interval($limits.keepalive_timeout)
            .keep_alive_timeout($limits.keepalive_timeout)
    };
}

impl Protocols {
    fn new(limits: &Limits) -> Self {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        h1_settings!(auto.http1(), limits);
        h2_settings!(auto.http2(), limits);
        let mut h1 = http1::Builder::new();
        h1_settings!(h1, limits);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2_settings!(h2, limits);
        Self { auto, h1, h2 }
    }
}

/// Which connection driver serves a stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Auto,
    H1,
    H2,
}

/// The single place where a stream that may carry HTTP/1 (plain TCP, or TLS whose ALPN is
/// not `h2`) is wrapped before hyper parses it: the request-smuggling guard. It passes HTTP/2
/// prior knowledge and upgraded connections through untouched, and writes its own error
/// response when hyper shuts the stream down (or on drop), so no finish call is needed.
///
/// It sits above [`TrackedIo`] so the watchdog sees the client's raw bytes even while the
/// guard holds back an incomplete head.
fn guard_h1<IO>(io: IO, limits: &Limits) -> H1Guard<IO>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    H1Guard::new(
        io,
        GuardLimits {
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            max_uri_length: limits.max_uri_length,
        },
    )
}

/// One accepted connection: socket options, TLS handshake, then HTTP until done.
async fn connection<F, S>(
    shared: Arc<Shared<F>>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) where
    F: Fn(ConnInfo) -> S + Send + Sync + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    // Responses are written in few large writes; Nagle would only delay the last segment.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(listener = %shared.name, %peer, error = %e, "TCP_NODELAY");
    }
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(e) => {
            tracing::debug!(listener = %shared.name, %peer, error = %e, "local address");
            return;
        }
    };
    let mut info = ConnInfo {
        peer,
        local,
        listener: Arc::clone(&shared.name),
        tls: false,
        sni: None,
        alpn_h2: false,
        client_cert: None,
    };
    let Some(certs) = &shared.tls else {
        drive(&shared, Proto::Auto, stream, info, permit, &shutdown).await;
        return;
    };
    // A handshake is part of "receiving the request head": same budget.
    let acceptor = TlsAcceptor::from(certs.server_config());
    let handshake =
        tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        () = shutdown.cancelled() => return,
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(listener = %shared.name, %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %shared.name, %peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let session = tls.get_ref().1;
    info.tls = true;
    info.sni = session.server_name().map(Arc::from);
    info.alpn_h2 = session.alpn_protocol() == Some(b"h2".as_slice());
    // Only a listener with `client_auth` asks for a certificate, and rustls has verified any
    // it got; parsing here, once, spares every request of the connection.
    if let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) {
        match ClientCert::from_der(leaf) {
            Ok(cert) => info.client_cert = Some(Arc::new(cert)),
            Err(e) => {
                // Fail closed: the client meant to be identified, and serving it as
                // anonymous would hide the problem.
                tracing::debug!(listener = %shared.name, %peer, error = %e, "client certificate");
                return;
            }
        }
    }
    let proto = if info.alpn_h2 { Proto::H2 } else { Proto::H1 };
    drive(&shared, proto, tls, info, permit, &shutdown).await;
}

/// Runs HTTP on an established stream with the watchdog and drain handling.
async fn drive<F, S, IO>(
    shared: &Shared<F>,
    proto: Proto,
    io: IO,
    info: ConnInfo,
    permit: OwnedSemaphorePermit,
    shutdown: &CancellationToken,
) where
    F: Fn(ConnInfo) -> S + Send + Sync + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let peer = info.peer;
    let activity = Arc::new(Activity::new());
    let io = TrackedIo {
        inner: io,
        activity: Arc::clone(&activity),
        // Only streams that may turn out to be HTTP/2 need their preface recognised.
        sniff: (proto != Proto::H1).then_some(0),
        _permit: permit,
    };
    let service = TrackedService {
        inner: (shared.make_service)(info),
        activity: Arc::clone(&activity),
    };
    let watch = Watch {
        activity: &activity,
        limits: &shared.limits,
        shutdown,
    };
    let result = match proto {
        Proto::Auto => {
            let conn = shared.protocols.auto.serve_connection_with_upgrades(
                TokioIo::new(guard_h1(io, &shared.limits)),
                service,
            );
            watch.run(conn, |c| c.graceful_shutdown()).await
        }
        Proto::H1 => {
            let conn = shared
                .protocols
                .h1
                .serve_connection(TokioIo::new(guard_h1(io, &shared.limits)), service)
                .with_upgrades();
            watch.run(conn, |c| c.graceful_shutdown()).await
        }
        Proto::H2 => {
            let conn = shared
                .protocols
                .h2
                .serve_connection(TokioIo::new(io), service);
            watch.run(conn, |c| c.graceful_shutdown()).await
        }
    };
    match result {
        Ok(()) => {}
        Err(Closed::Error(e)) => {
            tracing::debug!(listener = %shared.name, %peer, error = %e, "connection error");
        }
        Err(Closed::HeaderTimeout) => {
            tracing::debug!(listener = %shared.name, %peer, "request head not received in time");
        }
        Err(Closed::Idle) => {
            tracing::debug!(listener = %shared.name, %peer, "idle connection closed");
        }
    }
}

/// Why a connection ended other than cleanly.
enum Closed {
    Error(String),
    HeaderTimeout,
    Idle,
}

/// The per-connection watchdog: polls the connection and enforces the timeouts and drain.
struct Watch<'a> {
    activity: &'a Arc<Activity>,
    limits: &'a Limits,
    shutdown: &'a CancellationToken,
}

impl Watch<'_> {
    /// Polls the connection to its end, closing it when [`Activity`] says it expired and
    /// draining it on shutdown.
    ///
    /// This runs on every wake-up of every connection, so it avoids the costs a `select!`
    /// loop would pay each time: the shutdown token (whose `cancelled()` and `is_cancelled()`
    /// both take a lock shared by all connections) is polled once, with a waker of our own
    /// that raises a flag of this connection, the timer is re-armed only when the deadline
    /// moves earlier (a later one is picked up when it fires), and changes made while the
    /// watchdog itself is polling do not wake the task again.
    async fn run<C, E>(self, conn: C, graceful: impl Fn(Pin<&mut C>)) -> Result<(), Closed>
    where
        C: Future<Output = Result<(), E>>,
        E: Display,
    {
        let activity = self.activity;
        let mut conn = pin!(conn);
        let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
        // When the timer is set to fire; `None` while it is not armed.
        let mut armed: Option<Instant> = None;
        let mut draining = false;
        // Set once an idle HTTP/2 connection was sent GOAWAY: the client gets this long to
        // close before the connection is dropped.
        let mut hard_stop: Option<Instant> = None;
        let mut cancelled = pin!(self.shutdown.cancelled());
        let shutdown_waker = std::task::Waker::from(Arc::new(ShutdownWake(Arc::clone(activity))));
        let mut token_cancelled = cancelled
            .as_mut()
            .poll(&mut Context::from_waker(&shutdown_waker))
            .is_ready();
        std::future::poll_fn(|cx| {
            activity.watcher.register(cx.waker());
            activity.watching.store(true, Ordering::SeqCst);
            let outcome = loop {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    break Poll::Ready(result.map_err(|e| Closed::Error(e.to_string())));
                }
                if !draining {
                    if !token_cancelled && activity.shutdown_woke.swap(false, Ordering::AcqRel) {
                        token_cancelled = cancelled
                            .as_mut()
                            .poll(&mut Context::from_waker(&shutdown_waker))
                            .is_ready();
                    }
                    if token_cancelled {
                        draining = true;
                        graceful(conn.as_mut());
                        continue;
                    }
                }
                let deadline = hard_stop.or_else(|| activity.deadline(self.limits));
                if let Some(d) = deadline
                    && armed.is_none_or(|at| d < at)
                {
                    timer.as_mut().reset(d);
                    armed = Some(d);
                }
                if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                    armed = None;
                    if hard_stop.is_some() {
                        break Poll::Ready(Err(Closed::Idle));
                    }
                    match activity.expired(Instant::now(), self.limits) {
                        // Fired for a deadline that has moved: arm for the new one.
                        None => continue,
                        Some(Closed::HeaderTimeout) => {
                            break Poll::Ready(Err(Closed::HeaderTimeout));
                        }
                        Some(_) if activity.h2.load(Ordering::Acquire) && !draining => {
                            draining = true;
                            graceful(conn.as_mut());
                            hard_stop = Some(Instant::now() + self.limits.header_read_timeout);
                            continue;
                        }
                        Some(closed) => break Poll::Ready(Err(closed)),
                    }
                }
                // Changes made from here on wake the task; one made since the deadline was
                // read did not, so read it again.
                activity.watching.store(false, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                if hard_stop.or_else(|| activity.deadline(self.limits)) == deadline {
                    break Poll::Pending;
                }
                activity.watching.store(true, Ordering::SeqCst);
            };
            activity.watching.store(false, Ordering::SeqCst);
            outcome
        })
        .await
    }
}

/// "No value" for the millisecond timestamps in [`Activity`].
const NEVER: u64 = u64::MAX;

/// What the watchdog needs to know about a connection, updated from the IO and service
/// wrappers (possibly on other threads: HTTP/2 responses run in their own tasks).
struct Activity {
    start: Instant,
    /// Requests whose response has not been fully handed to hyper yet.
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when the pending request head began arriving, or [`NEVER`].
    head_since: AtomicU64,
    /// Milliseconds since `start` when the connection last became idle.
    idle_since: AtomicU64,
    /// The stream turned out to be HTTP/2 (idle rules differ: control frames keep arriving).
    h2: AtomicBool,
    /// The watchdog's task, woken when the deadline may have moved.
    watcher: AtomicWaker,
    /// The watchdog is polling and reads the state again before it sleeps, so a change needs
    /// no wake-up (most changes happen inside the connection's own poll).
    watching: AtomicBool,
    /// The shutdown token woke this connection's waiter: the watchdog polls it again.
    shutdown_woke: AtomicBool,
}

/// The waker the shutdown token's waiter is registered with: raises the connection's flag and
/// wakes its watchdog, so the watchdog never polls the token (and takes its lock) otherwise.
struct ShutdownWake(Arc<Activity>);

impl std::task::Wake for ShutdownWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.shutdown_woke.store(true, Ordering::Release);
        self.0.watcher.wake();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            // A fresh connection is opened to send a request: its head is already due.
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            watcher: AtomicWaker::new(),
            watching: AtomicBool::new(false),
            shutdown_woke: AtomicBool::new(false),
        }
    }

    /// The deadline may have moved: wake the watchdog unless it will look anyway.
    fn changed(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.watching.load(Ordering::SeqCst) {
            self.watcher.wake();
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64, plus: Duration) -> Instant {
        self.start + Duration::from_millis(ms) + plus
    }

    /// Bytes arrived. If the connection was idle, they start a request head.
    fn on_bytes(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Acquire)
            && self.head_since.load(Ordering::Acquire) == NEVER
            && self
                .head_since
                .compare_exchange(NEVER, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.changed();
        }
    }

    /// The HTTP/2 preface completed: from now on only streams count as activity.
    fn on_h2_preface(&self) {
        self.h2.store(true, Ordering::Release);
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.head_since.store(NEVER, Ordering::Release);
        self.changed();
    }

    /// A request head is complete and handed to the service.
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NEVER, Ordering::Release);
    }

    /// A response finished (or was abandoned).
    fn end(&self) {
        // Stamped before the count drops, so a watchdog on another thread that sees no request
        // in flight never reads the idle time of before this request (it would close, or send
        // GOAWAY to, a connection just used). Harmless while others are still in flight: the
        // last one to end stamps it again.
        self.idle_since.store(self.now_ms(), Ordering::Release);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.changed();
        }
    }

    /// When the connection must close if nothing changes, and why.
    fn next_expiry(&self, limits: &Limits) -> Option<(Instant, Closed)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire);
        if head != NEVER && !self.h2.load(Ordering::Acquire) {
            return Some((
                self.at(head, limits.header_read_timeout),
                Closed::HeaderTimeout,
            ));
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        Some((self.at(idle, limits.keepalive_timeout), Closed::Idle))
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        self.next_expiry(limits).map(|(at, _)| at)
    }

    fn expired(&self, now: Instant, limits: &Limits) -> Option<Closed> {
        match self.next_expiry(limits) {
            Some((at, why)) if at <= now => Some(why),
            _ => None,
        }
    }
}

/// Counts a request as in flight from the service call until its response body is done.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.begin();
        Self(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

pin_project_lite::pin_project! {
    /// The accepted stream as hyper sees it: reports received bytes to the watchdog, spots
    /// the HTTP/2 preface, and holds the connection permit (so an upgraded WebSocket that
    /// outlives the HTTP connection still counts against `max_connections`).
    struct TrackedIo<IO> {
        #[pin]
        inner: IO,
        activity: Arc<Activity>,
        // Bytes of the HTTP/2 preface matched so far; `None` once decided.
        sniff: Option<usize>,
        _permit: OwnedSemaphorePermit,
    }
}

impl<IO: AsyncRead> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(matched) = *this.sniff {
            let n = new.len().min(H2_PREFACE.len() - matched);
            if new[..n] == H2_PREFACE[matched..matched + n] {
                if matched + n == H2_PREFACE.len() {
                    *this.sniff = None;
                    this.activity.on_h2_preface();
                    return Poll::Ready(Ok(()));
                }
                *this.sniff = Some(matched + n);
            } else {
                *this.sniff = None;
            }
        }
        this.activity.on_bytes();
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Wraps the handler's service to track requests in flight.
struct TrackedService<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> hyper::service::Service<Request<Incoming>> for TrackedService<S>
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        >,
{
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = RequestGuard::new(Arc::clone(&self.activity));
        TrackedFuture {
            inner: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future; moves the request guard into the response body.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<RequestGuard>,
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody {
            inner,
            _guard: guard,
        })))
    }
}

/// A response body that keeps its request counted until hyper is done with it.
struct TrackedBody {
    inner: ProxyBody,
    _guard: Option<RequestGuard>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty};
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;
    use turnpike_model::{CertificateConfig, ListenerTls};

    use super::*;

    /// Generous upper bounds: the CI machine has two noisy cores.
    const WAIT: Duration = Duration::from_secs(10);

    fn limits() -> Limits {
        Limits {
            keepalive_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    /// Test handler state: how many requests reached the service.
    #[derive(Default)]
    struct Seen {
        started: AtomicUsize,
    }

    type BoxedResponse =
        Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    /// Answers with the connection facts; `/slow/<ms>` sleeps first.
    struct InfoService {
        info: ConnInfo,
        seen: Arc<Seen>,
    }

    impl hyper::service::Service<Request<Incoming>> for InfoService {
        type Response = Response<ProxyBody>;
        type Error = Infallible;
        type Future = BoxedResponse;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            let info = self.info.clone();
            let seen = Arc::clone(&self.seen);
            Box::pin(async move {
                seen.started.fetch_add(1, Ordering::SeqCst);
                if req.uri().path() == "/ws" {
                    return Ok(websocket_echo(req));
                }
                if let Some(ms) = req.uri().path().strip_prefix("/slow/") {
                    let ms: u64 = ms.parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let text = format!(
                    "listener={} peer={} tls={} sni={} alpn_h2={} version={:?}",
                    info.listener,
                    info.peer,
                    info.tls,
                    info.sni.as_deref().unwrap_or("-"),
                    info.alpn_h2,
                    req.version()
                );
                let cert = info
                    .client_cert
                    .as_ref()
                    .map_or("-", |c| c.subject.as_str());
                let text = format!("{text} cert={cert}");
                Ok(Response::new(crate::body::full(text)))
            })
        }
    }

    /// Accepts a WebSocket handshake and echoes one message.
    fn websocket_echo(mut req: Request<Incoming>) -> Response<ProxyBody> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
        use tokio_tungstenite::tungstenite::protocol::Role;

        let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = upgrade.await.unwrap();
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            if let Some(Ok(msg)) = ws.next().await {
                ws.send(msg).await.unwrap();
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(&key))
            .body(crate::body::empty())
            .unwrap()
    }

    fn make_service(seen: Arc<Seen>) -> impl Fn(ConnInfo) -> InfoService + Send + Sync + 'static {
        move |info| InfoService {
            info,
            seen: Arc::clone(&seen),
        }
    }

    struct Running {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
        seen: Arc<Seen>,
        certs: Option<Arc<ServerCertificates>>,
    }

    async fn start(cfg: ListenerConfig, limits: Limits, drain: Duration) -> Running {
        let listener = Listener::bind(&cfg, &limits).await.unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let certs = listener.certificates();
        let shutdown = CancellationToken::new();
        let seen = Arc::new(Seen::default());
        let task =
            tokio::spawn(listener.serve(make_service(Arc::clone(&seen)), shutdown.clone(), drain));
        Running {
            addr,
            shutdown,
            task,
            seen,
            certs,
        }
    }

    fn plain(name: &str) -> ListenerConfig {
        ListenerConfig {
            name: name.to_owned(),
            address: "127.0.0.1:0".to_owned(),
            tls: None,
            max_connections: None,
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

    async fn h1_client<IO>(io: IO) -> (H1Sender, JoinHandle<()>)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, task)
    }

    async fn h1_get(sender: &mut H1Sender, path: &str) -> String {
        let req = Request::get(path)
            .header("host", "test")
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn h2_get<IO>(io: IO, path: &str) -> String
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(format!("http://test{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Reads until the server closes; returns how long that took.
    async fn time_to_close(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("connection not closed within {WAIT:?}"),
            }
        }
    }

    /// Reads one HTTP/1 response (head + content-length body) from a raw stream.
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before a full response");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    }

    #[tokio::test]
    async fn h1_and_h2c_on_one_port() {
        let srv = start(plain("main"), limits(), WAIT).await;

        let stream = TcpStream::connect(srv.addr).await.unwrap();
        let client_addr = stream.local_addr().unwrap();
        let (mut sender, _conn) = h1_client(stream).await;
        let body = h1_get(&mut sender, "/").await;
        assert!(body.contains("listener=main"), "{body}");
        assert!(body.contains(&format!("peer={client_addr}")), "{body}");
        assert!(
            body.contains("tls=false sni=- alpn_h2=false version=HTTP/1.1"),
            "{body}"
        );
        // Keep-alive: a second request on the same connection.
        let body = h1_get(&mut sender, "/again").await;
        assert!(body.contains("version=HTTP/1.1"), "{body}");

        let stream = TcpStream::connect(srv.addr).await.unwrap();
        let body = h2_get(stream, "/").await;
        assert!(
            body.contains("tls=false sni=- alpn_h2=false version=HTTP/2.0"),
            "{body}"
        );

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn request_smuggling_guard_is_in_front_of_hyper() {
        let srv = start(plain("guarded"), limits(), WAIT).await;
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        stream
            .write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        let reply = read_response(&mut stream).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert_eq!(srv.seen.started.load(Ordering::SeqCst), 0);
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn websocket_upgrade_works() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let srv = start(plain("ws"), limits(), WAIT).await;
        let stream = TcpStream::connect(srv.addr).await.unwrap();
        let (mut ws, resp) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async("ws://test/ws", stream),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("ping")).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text("ping"));
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    struct TestCert {
        der: CertificateDer<'static>,
    }

    fn write_cert(dir: &std::path::Path, file: &str, names: &[&str]) -> TestCert {
        let generated = rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), generated.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{file}.key")),
            generated.signing_key.serialize_pem(),
        )
        .unwrap();
        TestCert {
            der: generated.cert.der().clone(),
        }
    }

    fn cert_config(dir: &std::path::Path, file: &str) -> CertificateConfig {
        CertificateConfig {
            cert: dir.join(format!("{file}.crt")).display().to_string(),
            key: dir.join(format!("{file}.key")).display().to_string(),
            server_names: Vec::new(),
        }
    }

    fn tls_listener(dir: &std::path::Path) -> ListenerConfig {
        ListenerConfig {
            name: "tls".to_owned(),
            address: "127.0.0.1:0".to_owned(),
            tls: Some(ListenerTls {
                certificates: vec![cert_config(dir, "a"), cert_config(dir, "b")],
                reload_interval: Duration::from_secs(3600),
                client_auth: None,
            }),
            max_connections: None,
        }
    }

    /// A client that trusts the test certificates as roots.
    fn verifying_client(roots: &[&TestCert], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut store = rustls::RootCertStore::empty();
        for cert in roots {
            store.add(cert.der.clone()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A client that accepts any certificate (to see which one an unknown or absent SNI
    /// gets), optionally without SNI.
    fn trusting_client(sni: bool) -> tokio_rustls::TlsConnector {
        let tls = turnpike_model::UpstreamTls {
            insecure_skip_verify: true,
            ..Default::default()
        };
        let mut config = crate::tls::client_config(&tls, false).unwrap();
        config.enable_sni = sni;
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn tls_connect(
        connector: &tokio_rustls::TlsConnector,
        addr: SocketAddr,
        name: &str,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap()
    }

    fn served_cert(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    #[tokio::test]
    async fn tls_sni_picks_certificate_and_alpn_picks_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["*.b.test"]);
        let srv = start(tls_listener(dir.path()), limits(), WAIT).await;

        let h1 = verifying_client(&[&a, &b], &[b"http/1.1"]);
        let tls = tls_connect(&h1, srv.addr, "a.test").await;
        assert_eq!(served_cert(&tls), a.der);
        let (mut sender, _conn) = h1_client(tls).await;
        let body = h1_get(&mut sender, "/").await;
        assert!(
            body.contains("tls=true sni=a.test alpn_h2=false version=HTTP/1.1"),
            "{body}"
        );

        let tls = tls_connect(&h1, srv.addr, "x.b.test").await;
        assert_eq!(served_cert(&tls), b.der);

        let h2 = verifying_client(&[&a, &b], &[b"h2", b"http/1.1"]);
        let tls = tls_connect(&h2, srv.addr, "x.b.test").await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
        let body = h2_get(tls, "/").await;
        assert!(
            body.contains("tls=true sni=x.b.test alpn_h2=true version=HTTP/2.0"),
            "{body}"
        );

        // Unknown names, a wildcard more than one label deep, and no SNI: the first cert.
        let any = trusting_client(true);
        for name in ["unknown.test", "y.x.b.test", "b.test"] {
            let tls = tls_connect(&any, srv.addr, name).await;
            assert_eq!(served_cert(&tls), a.der, "{name}");
        }
        let no_sni = trusting_client(false);
        let tls = tls_connect(&no_sni, srv.addr, "x.b.test").await;
        assert_eq!(served_cert(&tls), a.der);
        let (mut sender, _conn) = h1_client(tls).await;
        let body = h1_get(&mut sender, "/").await;
        assert!(body.contains("tls=true sni=- alpn_h2=false"), "{body}");

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn tls_handshake_times_out() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.test"]);
        write_cert(dir.path(), "b", &["*.b.test"]);
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..limits()
        };
        let srv = start(tls_listener(dir.path()), limits, WAIT).await;
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        // Start a ClientHello record header and stall.
        stream.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        let took = time_to_close(&mut stream).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn explicit_server_names_override_san() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["b.test"]);
        let mut cfg = tls_listener(dir.path());
        if let Some(tls) = cfg.tls.as_mut() {
            tls.certificates[1].server_names = vec!["other.test".to_owned()];
        }
        let srv = start(cfg, limits(), WAIT).await;
        let any = trusting_client(true);
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "other.test").await),
            b.der
        );
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "b.test").await),
            a.der
        );
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_errors_name_listener_and_file() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.test"]);
        let mut cfg = tls_listener(dir.path());
        let err = Listener::bind(&cfg, &limits()).await.unwrap_err();
        assert!(
            err.contains("listener `tls`") && err.contains("b.crt"),
            "{err}"
        );

        cfg.tls = None;
        cfg.address = "256.0.0.1:0".to_owned();
        let err = Listener::bind(&cfg, &limits()).await.unwrap_err();
        assert!(
            err.contains("listener `tls`") && err.contains("256.0.0.1"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn certificate_reload_swaps_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["*.b.test"]);
        let srv = start(tls_listener(dir.path()), limits(), WAIT).await;
        let certs = srv.certs.clone().unwrap();
        let any = trusting_client(true);
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "a.test").await),
            a.der
        );

        // Nothing changed: a periodic check does nothing.
        assert!(!certs.reload_if_changed().unwrap());

        let a2 = write_cert(dir.path(), "a", &["a.test"]);
        certs.reload().unwrap();
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "a.test").await),
            a2.der
        );
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "x.b.test").await),
            b.der
        );

        // A broken file: the reload fails, is reported once by the periodic check, and the
        // running certificates stay.
        std::fs::write(dir.path().join("a.crt"), "not a certificate").unwrap();
        let err = certs.reload().unwrap_err();
        assert!(err.contains("a.crt"), "{err}");
        assert!(!certs.reload_if_changed().unwrap());
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "a.test").await),
            a2.der
        );

        // A fixed file is picked up by the periodic check.
        let a3 = write_cert(
            dir.path(),
            "a",
            &["a.test", "longer-name-to-change-length.test"],
        );
        assert!(certs.reload_if_changed().unwrap());
        assert_eq!(
            served_cert(&tls_connect(&any, srv.addr, "a.test").await),
            a3.der
        );

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    /// A CA for client certificates, its certificate written to `<file>.pem`.
    fn client_ca(dir: &std::path::Path, file: &str) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{file} CA"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        rcgen::Issuer::new(params, key)
    }

    /// A client (trusting any server) presenting a certificate for `cn` signed by `ca`.
    fn client_with_cert(
        dir: &std::path::Path,
        ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
        cn: &str,
    ) -> tokio_rustls::TlsConnector {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let tls = turnpike_model::UpstreamTls {
            insecure_skip_verify: true,
            client_cert: Some(cert_path.display().to_string()),
            client_key: Some(key_path.display().to_string()),
            ..Default::default()
        };
        tokio_rustls::TlsConnector::from(Arc::new(crate::tls::client_config(&tls, false).unwrap()))
    }

    /// One GET over a new connection with `connector`; `None` when the listener refused the
    /// client (a TLS 1.3 client learns it when it reads).
    async fn get_as(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Option<String> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("a.test").unwrap();
        let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .unwrap()
            .ok()?;
        let (mut sender, _conn) = h1_client(tls).await;
        let req = Request::get("/")
            .header("host", "test")
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn client_certificates_are_verified_and_the_ca_reloads() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.test"]);
        write_cert(dir.path(), "b", &["*.b.test"]);
        let old_ca = client_ca(dir.path(), "old");
        let new_ca = client_ca(dir.path(), "new");
        let ca_path = dir.path().join("clients.pem");
        std::fs::copy(dir.path().join("old.pem"), &ca_path).unwrap();
        let mut cfg = tls_listener(dir.path());
        if let Some(tls) = cfg.tls.as_mut() {
            tls.client_auth = Some(turnpike_model::ClientAuthConfig {
                ca: ca_path.display().to_string(),
                mode: turnpike_model::ClientAuthMode::Required,
                crls: Vec::new(),
            });
        }
        let srv = start(cfg, limits(), WAIT).await;
        let old_client = client_with_cert(dir.path(), &old_ca, "old client");
        let new_client = client_with_cert(dir.path(), &new_ca, "new client");
        let body = get_as(&old_client, srv.addr).await.expect("old CA trusted");
        assert!(body.contains("cert=CN=old client"), "{body}");
        assert_eq!(get_as(&new_client, srv.addr).await, None);
        assert_eq!(get_as(&trusting_client(true), srv.addr).await, None);

        std::fs::copy(dir.path().join("new.pem"), &ca_path).unwrap();
        srv.certs.clone().unwrap().reload().unwrap();
        let body = get_as(&new_client, srv.addr).await.expect("new CA trusted");
        assert!(body.contains("cert=CN=new client"), "{body}");
        assert_eq!(get_as(&old_client, srv.addr).await, None);

        // A broken bundle is refused naming the field and the file; the new CA stays.
        std::fs::write(&ca_path, "not a certificate").unwrap();
        let err = srv.certs.clone().unwrap().reload().unwrap_err();
        assert!(
            err.contains("tls.client_auth.ca") && err.contains("clients.pem"),
            "{err}"
        );
        assert!(get_as(&new_client, srv.addr).await.is_some());

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn periodic_reload_picks_up_new_files() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.test"]);
        write_cert(dir.path(), "b", &["*.b.test"]);
        let mut cfg = tls_listener(dir.path());
        if let Some(tls) = cfg.tls.as_mut() {
            tls.reload_interval = Duration::from_millis(100);
        }
        let srv = start(cfg, limits(), WAIT).await;
        let a2 = write_cert(dir.path(), "a", &["a.test", "another-name.test"]);
        let any = trusting_client(true);
        let deadline = Instant::now() + WAIT;
        loop {
            if served_cert(&tls_connect(&any, srv.addr, "a.test").await) == a2.der {
                break;
            }
            assert!(Instant::now() < deadline, "new certificate not loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn max_connections_queues_excess_connections() {
        let mut cfg = plain("limited");
        cfg.max_connections = Some(1);
        let srv = start(cfg, limits(), WAIT).await;

        let (mut first, first_conn) = h1_client(TcpStream::connect(srv.addr).await.unwrap()).await;
        h1_get(&mut first, "/").await;

        // The kernel completes the handshake, but nobody serves the second connection.
        let (mut second, _second_conn) =
            h1_client(TcpStream::connect(srv.addr).await.unwrap()).await;
        let req = Request::get("/")
            .header("host", "test")
            .body(Empty::new())
            .unwrap();
        let mut pending = Box::pin(second.send_request(req));
        let early = tokio::time::timeout(Duration::from_millis(300), &mut pending).await;
        assert!(
            early.is_err(),
            "second connection served while the first is open"
        );
        assert_eq!(srv.seen.started.load(Ordering::SeqCst), 1);

        drop(first);
        first_conn.abort();
        let resp = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn slow_request_heads_are_cut_off() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            keepalive_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let srv = start(plain("slow"), limits, WAIT).await;

        // Half a head, then silence.
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let took = time_to_close(&mut stream).await;
        assert!(took < Duration::from_secs(5), "{took:?}");

        // Trickling a byte every 50 ms does not extend the deadline.
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        let started = Instant::now();
        let mut closed = false;
        for byte in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if stream.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !closed {
            time_to_close(&mut stream).await;
        }
        let took = started.elapsed();
        eprintln!("listener: trickling head cut off after {took:?}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "{took:?}"
        );

        // A connection that never sends anything is cut off too.
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        let took = time_to_close(&mut stream).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Same for HTTP/2: half a preface.
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        stream.write_all(&H2_PREFACE[..10]).await.unwrap();
        let took = time_to_close(&mut stream).await;
        assert!(took < Duration::from_secs(5), "{took:?}");

        assert_eq!(srv.seen.started.load(Ordering::SeqCst), 0);
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn idle_keepalive_connections_close_after_keepalive_timeout() {
        // keep-alive longer than the head timeout: idling past the head timeout is fine.
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(1000),
            ..Limits::default()
        };
        let srv = start(plain("idle"), limits, WAIT).await;
        let mut stream = TcpStream::connect(srv.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut stream).await;
        // Idle for longer than header_read_timeout: still served.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream
            .write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let second = read_response(&mut stream).await;
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        let took = time_to_close(&mut stream).await;
        eprintln!("listener: idle HTTP/1 keep-alive closed after {took:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "{took:?}"
        );

        // HTTP/2 with no streams: GOAWAY and close, although pings keep flowing.
        let stream = TcpStream::connect(srv.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("http://test/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let started = Instant::now();
        let _ = tokio::time::timeout(WAIT, conn).await.unwrap().unwrap();
        let took = started.elapsed();
        eprintln!("listener: idle HTTP/2 connection closed after {took:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "{took:?}"
        );

        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
        let srv = start(plain("drain"), limits(), WAIT).await;
        let (mut h1, _h1_conn) = h1_client(TcpStream::connect(srv.addr).await.unwrap()).await;
        let in_flight = tokio::spawn(async move { h1_get(&mut h1, "/slow/800").await });
        let h2_stream = TcpStream::connect(srv.addr).await.unwrap();
        let h2_in_flight = tokio::spawn(async move { h2_get(h2_stream, "/slow/800").await });
        // An idle keep-alive connection is closed at once.
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut idle).await;
        let seen = Arc::clone(&srv.seen);
        wait_until("both slow requests started", || {
            seen.started.load(Ordering::SeqCst) == 3
        })
        .await;

        let triggered = Instant::now();
        srv.shutdown.cancel();
        let took = time_to_close(&mut idle).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        // New connections are refused once the accept loop has stopped.
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(srv.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting after shutdown");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let body = tokio::time::timeout(WAIT, in_flight)
            .await
            .unwrap()
            .unwrap();
        assert!(body.contains("version=HTTP/1.1"), "{body}");
        let body = tokio::time::timeout(WAIT, h2_in_flight)
            .await
            .unwrap()
            .unwrap();
        assert!(body.contains("version=HTTP/2.0"), "{body}");
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
        assert!(triggered.elapsed() < WAIT);
    }

    #[tokio::test]
    async fn drain_timeout_drops_slow_requests() {
        let srv = start(plain("drain"), limits(), Duration::from_millis(300)).await;
        let (mut h1, _h1_conn) = h1_client(TcpStream::connect(srv.addr).await.unwrap()).await;
        let in_flight = tokio::spawn(async move {
            let req = Request::get("/slow/60000")
                .header("host", "test")
                .body(Empty::new())
                .unwrap();
            h1.send_request(req).await
        });
        let seen = Arc::clone(&srv.seen);
        wait_until("slow request started", || {
            seen.started.load(Ordering::SeqCst) == 1
        })
        .await;
        let triggered = Instant::now();
        srv.shutdown.cancel();
        tokio::time::timeout(WAIT, srv.task).await.unwrap().unwrap();
        let took = triggered.elapsed();
        eprintln!("listener: serve returned {took:?} after shutdown (drain_timeout 300ms)");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // The dropped connection fails the client's request instead of hanging.
        let result = tokio::time::timeout(WAIT, in_flight)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_err());
    }

    /// Measures what hyper's own HTTP/1 `header_read_timeout` does, which is why the listener
    /// switches it off and runs its own watchdog (see the module docs).
    #[tokio::test]
    async fn hyper_header_read_timeout_behaviour() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let timeout = Duration::from_millis(300);
        tokio::spawn(async move {
            loop {
                let (stream, _) = socket.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout);
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(crate::body::empty()))
                    });
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        // 1. After a complete request, the *idle* keep-alive connection is closed after
        //    header_read_timeout: hyper has no separate idle timeout.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut stream).await;
        let took = time_to_close(&mut stream).await;
        eprintln!("hyper: idle keep-alive closed after {took:?} (header_read_timeout {timeout:?})");
        assert!(took < Duration::from_secs(3), "{took:?}");

        // 2. With auto::Builder, a connection that sends nothing (or less than the 24-byte
        //    HTTP/2 preface) is still in protocol detection, where no timer runs.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let still_open = tokio::time::timeout(timeout * 4, silent.read(&mut buf)).await;
        assert!(still_open.is_err(), "hyper closed a silent connection");
    }
}
