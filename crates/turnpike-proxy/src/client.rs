//! The HTTP client to one upstream: its connection pool, TLS and connect timeout.
//!
//! Requests are addressed to a target's socket address (`http://10.0.0.7:8080/...`), so the
//! pool is keyed per target. The connector dials that address and, for TLS, presents the
//! server name configured for the upstream (or the target's host name) in SNI — never the IP
//! when a name is known.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use turnpike_model::{UpstreamConfig, UpstreamScheme};

use crate::body::{BoxError, ProxyBody};

/// Client for one upstream.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<Connector, ProxyBody>,
    names: Arc<RwLock<HashMap<SocketAddr, String>>>,
    scheme: &'static str,
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
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(config.pool.idle_timeout)
            .pool_max_idle_per_host(config.pool.max_idle_per_target)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            // We retry ourselves, with the budget and idempotency rules in one place.
            .retry_canceled_requests(false);
        if config.http2 && config.scheme == UpstreamScheme::Http {
            builder.http2_only(true);
        }
        let scheme = match config.scheme {
            UpstreamScheme::Http => "http",
            UpstreamScheme::Https => "https",
        };
        Ok(Self {
            inner: builder.build(connector),
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

    /// Sends a request whose URI came from [`UpstreamClient::uri_for`].
    pub fn request(
        &self,
        req: http::Request<ProxyBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.inner.request(req)
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
            let connect = async {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                match &this.tls {
                    None => Ok::<_, BoxError>(Conn {
                        io: TokioIo::new(Either::Left(tcp)),
                        h2: false,
                    }),
                    Some(tls) => {
                        let name = this
                            .sni
                            .clone()
                            .or_else(|| this.names.read().ok().and_then(|n| n.get(&addr).cloned()))
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
            match tokio::time::timeout(this.connect_timeout, connect).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
            }
        })
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
