//! A JWKS fetched from a URL: cached, refreshed in the background when stale, refreshed on
//! demand for an unknown `kid` at most once per interval, one fetch in flight at a time.
//!
//! The refresh interval applies to every attempt, failed ones included, so neither a flood
//! of made-up key ids nor an unreachable JWKS endpoint turns into a flood of fetches.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use super::keys::{self, JwksRules, Key};
use super::{Clock, JwtError};
use crate::body::BoxError;

/// What a JWKS request accepts.
const JWKS_TYPES: &str = "application/jwk-set+json, application/json;q=0.9";

/// Keys of one document, shared by the requests that use them.
pub(crate) type KeySet = Arc<Vec<Key>>;

/// A fetch that every waiting request awaits; `None` when it failed.
type Pending = Shared<BoxFuture<'static, Option<KeySet>>>;

/// Where a remote key set is found.
pub(crate) enum Location {
    /// The JWKS itself.
    Jwks(Uri),
    /// An OpenID Connect discovery document naming the JWKS in `jwks_uri`.
    Discovery(Uri),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Jwks(url) => write!(f, "{url}"),
            Location::Discovery(url) => write!(f, "{url} (discovery)"),
        }
    }
}

/// One issuer's remote JWKS.
pub(crate) struct RemoteJwks {
    issuer: String,
    location: Location,
    cache_ttl: Duration,
    min_refresh_interval: Duration,
    fetcher: Fetcher,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: Option<KeySet>,
    /// Monotonic time of the last successful fetch.
    fetched_at: Option<Duration>,
    /// Monotonic time of the last attempt, successful or not.
    attempted_at: Option<Duration>,
    in_flight: Option<Pending>,
}

impl RemoteJwks {
    pub(crate) fn new(
        issuer: String,
        location: Location,
        cache_ttl: Duration,
        min_refresh_interval: Duration,
        fetcher: Fetcher,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            issuer,
            location,
            cache_ttl,
            min_refresh_interval,
            fetcher,
            clock,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent field by field, so a panic elsewhere while the lock was
        // held leaves nothing to repair.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys to verify with: the cached set (starting a background refresh when it is
    /// stale), or the first fetch's result.
    pub(crate) async fn keys(self: &Arc<Self>) -> Result<KeySet, JwtError> {
        let pending = {
            let mut st = self.state();
            let now = self.clock.monotonic();
            if let Some(keys) = st.keys.clone() {
                let stale = st
                    .fetched_at
                    .is_none_or(|t| now.saturating_sub(t) >= self.cache_ttl);
                if stale && st.in_flight.is_none() && self.may_attempt(&st, now) {
                    // Requests go on with the cached keys; the refresh runs as its own task.
                    drop(self.start_fetch(&mut st, now));
                }
                return Ok(keys);
            }
            match st.in_flight.clone() {
                Some(pending) => pending,
                None if self.may_attempt(&st, now) => self.start_fetch(&mut st, now),
                None => return Err(JwtError::KeysUnavailable),
            }
        };
        pending.await.ok_or(JwtError::KeysUnavailable)
    }

    /// A refresh for a `kid` that `seen` lacks: the newer set if one has arrived since, or
    /// the result of a fetch (shared, and only if the interval allows one); `None` when no
    /// newer keys can be had now.
    pub(crate) async fn refresh_for_unknown_kid(self: &Arc<Self>, seen: &KeySet) -> Option<KeySet> {
        let pending = {
            let mut st = self.state();
            if let Some(keys) = st.keys.as_ref().filter(|k| !Arc::ptr_eq(k, seen)) {
                return Some(keys.clone());
            }
            let now = self.clock.monotonic();
            match st.in_flight.clone() {
                Some(pending) => pending,
                None if self.may_attempt(&st, now) => self.start_fetch(&mut st, now),
                None => return None,
            }
        };
        pending.await
    }

    fn may_attempt(&self, st: &State, now: Duration) -> bool {
        st.attempted_at
            .is_none_or(|t| now.saturating_sub(t) >= self.min_refresh_interval)
    }

    /// Starts a fetch as its own task, so a request that gives up waiting does not cancel it
    /// for the others.
    fn start_fetch(self: &Arc<Self>, st: &mut State, now: Duration) -> Pending {
        st.attempted_at = Some(now);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Without a runtime there is nothing to fetch with; nothing is left in flight.
            return async { None }.boxed().shared();
        };
        let this = Arc::clone(self);
        let task = runtime.spawn(async move { this.fetch_and_store().await });
        let pending = async move { task.await.ok().flatten() }.boxed().shared();
        st.in_flight = Some(pending.clone());
        pending
    }

    async fn fetch_and_store(self: Arc<Self>) -> Option<KeySet> {
        // Should the task die early, the next request must be able to start another fetch
        // rather than wait on this one forever.
        let mut guard = InFlightGuard {
            jwks: &self,
            armed: true,
        };
        let result = self.fetch().await;
        let mut st = self.state();
        st.in_flight = None;
        guard.armed = false;
        match result {
            Ok(keys) => {
                let keys = Arc::new(keys);
                st.keys = Some(keys.clone());
                st.fetched_at = Some(self.clock.monotonic());
                tracing::debug!(issuer = %self.issuer, keys = keys.len(), "JWKS refreshed");
                Some(keys)
            }
            Err(e) => {
                tracing::warn!(
                    issuer = %self.issuer,
                    url = %self.location,
                    error = %e,
                    cached = st.keys.is_some(),
                    "JWKS fetch failed; keeping the cached keys"
                );
                None
            }
        }
    }

    /// The key set at the location, after discovery if configured.
    pub(super) async fn fetch(&self) -> Result<Vec<Key>, String> {
        let jwks = match &self.location {
            Location::Jwks(url) => url.clone(),
            Location::Discovery(url) => self.discover(url).await?,
        };
        let body = self.fetcher.get(&jwks, JWKS_TYPES).await?;
        let rules = JwksRules {
            strict: false,
            symmetric: false,
        };
        keys::keys_from_jwks(&body, rules)
    }

    /// The `jwks_uri` of the discovery document at `url`. The document must name this
    /// issuer exactly (OpenID Connect Discovery §4.3): a document served for another issuer
    /// would otherwise hand its keys to this one. A document fetched over https may not
    /// send the keys over plain http.
    async fn discover(&self, url: &Uri) -> Result<Uri, String> {
        let body = self.fetcher.get(url, "application/json").await?;
        let doc: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("discovery document is not JSON: {e}"))?;
        let issuer = doc.get("issuer").and_then(serde_json::Value::as_str);
        if issuer != Some(self.issuer.as_str()) {
            return Err(format!(
                "discovery document names issuer {}, not `{}`",
                issuer.map_or_else(|| "none".to_owned(), |i| format!("`{i}`")),
                self.issuer
            ));
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(serde_json::Value::as_str)
            .ok_or("discovery document has no `jwks_uri`")?;
        let jwks = super::remote_url("jwks_uri", jwks)?;
        if url.scheme_str() == Some("https") && jwks.scheme_str() != Some("https") {
            return Err(format!(
                "discovery over https names a plain-http jwks_uri `{jwks}`"
            ));
        }
        Ok(jwks)
    }

    /// Waits for a fetch in flight, if any; lets tests observe background refreshes
    /// without sleeping.
    #[cfg(test)]
    pub(crate) async fn settle(&self) {
        let pending = self.state().in_flight.clone();
        if let Some(pending) = pending {
            let _ = pending.await;
        }
    }
}

/// Clears the in-flight marker unless disarmed.
struct InFlightGuard<'a> {
    jwks: &'a RemoteJwks,
    armed: bool,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.jwks.state().in_flight = None;
        }
    }
}

/// HTTP(S) GET (JWKS) and form POST (token introspection) with an overall timeout and a cap
/// on the body.
#[derive(Clone)]
pub(crate) struct Fetcher {
    client: Client<JwksConnector, Full<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

impl Fetcher {
    /// A client trusting the webpki roots, with ring as the TLS provider.
    pub(crate) fn new(timeout: Duration, max_bytes: usize) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Self::with_roots(timeout, max_bytes, roots)
    }

    /// A client trusting `roots` only.
    pub(crate) fn with_roots(
        timeout: Duration,
        max_bytes: usize,
        roots: rustls::RootCertStore,
    ) -> Result<Self, String> {
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = JwksConnector {
            http,
            tls: TlsConnector::from(Arc::new(tls)),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Ok(Self {
            client,
            timeout,
            max_bytes,
        })
    }

    /// The body of a successful GET of `url`, asking for `accept`.
    pub(crate) async fn get(&self, url: &Uri, accept: &'static str) -> Result<String, String> {
        let request = Request::get(url.clone())
            .header(header::ACCEPT, accept)
            .header(header::USER_AGENT, "turnpike")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("cannot build request: {e}"))?;
        self.send(request).await
    }

    /// POSTs `form` (`application/x-www-form-urlencoded`) to `url` with `authorization`,
    /// as the OAuth2 introspection policy does; the body of a successful answer.
    pub(crate) async fn post_form(
        &self,
        url: &Uri,
        authorization: &http::HeaderValue,
        form: String,
    ) -> Result<String, String> {
        let request = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, authorization.clone())
            .header(header::USER_AGENT, "turnpike")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| format!("cannot build request: {e}"))?;
        self.send(request).await
    }

    /// POSTs a JSON body to `url`; the body of a successful answer.
    pub(crate) async fn post_json(&self, url: &Uri, body: String) -> Result<String, String> {
        let request = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "turnpike")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build request: {e}"))?;
        self.send(request).await
    }

    /// Sends `request` under the timeout and body cap.
    async fn send(&self, request: Request<Full<Bytes>>) -> Result<String, String> {
        let work = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
            if !response.status().is_success() {
                return Err(format!("unexpected status {}", response.status()));
            }
            let body = Limited::new(response.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|e| format!("cannot read body: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_string())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("timed out after {:?}", self.timeout))?
    }
}

/// An error and its sources on one line: hyper's own message alone ("client error
/// (Connect)") does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Resolves and dials with hyper-util's connector, then adds TLS for `https` URLs.
#[derive(Clone)]
struct JwksConnector {
    http: HttpConnector,
    tls: TlsConnector,
}

impl Service<Uri> for JwksConnector {
    type Response = TokioIo<JwksStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().map(|h| h.trim_matches(['[', ']']).to_owned());
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            if !https {
                return Ok(TokioIo::new(JwksStream::Plain(tcp)));
            }
            let host = host.ok_or("JWKS URL has no host")?;
            let name = ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(JwksStream::Tls(Box::new(stream))))
        })
    }
}

/// A connection to the JWKS server, plain or TLS.
enum JwksStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for JwksStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for JwksStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            JwksStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            JwksStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for JwksStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            JwksStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            JwksStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            JwksStream::Plain(s) => Pin::new(s).poll_flush(cx),
            JwksStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            JwksStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            JwksStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP(S) client for small JSON POSTs made off the request path (alert webhooks): the
/// same connector, webpki roots, timeout and answer cap as the JWKS fetcher, so the
/// workspace keeps one outbound HTTP stack.
#[derive(Clone)]
pub struct JsonPoster(Fetcher);

impl std::fmt::Debug for JsonPoster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonPoster")
    }
}

impl JsonPoster {
    /// A poster whose calls give up after `timeout`; answers over 64 KiB are an error.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        Fetcher::new(timeout, 64 * 1024).map(Self)
    }

    /// POSTs `body` (JSON) to `url`; `Ok` on a 2xx answer.
    pub async fn post(&self, url: &str, body: String) -> Result<(), String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        self.0.post_json(&uri, body).await.map(|_| ())
    }
}
