//! The data plane's side of observability: what a request leaves behind as a
//! [`CallEvent`], emitted to the [`Observer`] when its response body is done.
//!
//! Nothing here runs unless a sink is registered ([`Observer::is_active`]), so a gateway
//! without metrics or logs pays one atomic load per request.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;
use turnpike_observe::{CallEvent, Observer};

use crate::body::{BoxError, ProxyBody};
use crate::proxy::{ClientConn, LogFacts};
use crate::reqbody::BytesIn;
use crate::snapshot::Snapshot;

/// What is known of a call when it arrives; completed by [`Pending::finish`].
pub(crate) struct Pending {
    time_unix_ms: i64,
    request_id: String,
    peer: std::net::IpAddr,
    protocol: &'static str,
    method: String,
    host: Option<String>,
    path: String,
    query: Option<String>,
    user_agent: Option<String>,
    bytes_in: BytesIn,
}

impl Pending {
    /// Copies what the event needs from the request before the pipeline consumes it, and
    /// leaves a [`BytesIn`] counter in its extensions for the body wrappers to feed.
    pub(crate) fn new<B>(req: &mut Request<B>, conn: &ClientConn, request_id: &str) -> Self {
        let bytes_in = BytesIn::default();
        req.extensions_mut().insert(bytes_in.clone());
        let time_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let headers = req.headers();
        let text = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let host = req
            .uri()
            .host()
            .map(str::to_owned)
            .or_else(|| text(header::HOST).map(|h| strip_port(&h).to_owned()));
        Self {
            time_unix_ms,
            request_id: request_id.to_owned(),
            peer: conn.peer.ip(),
            protocol: protocol(req.version()),
            method: req.method().as_str().to_owned(),
            host,
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            user_agent: text(header::USER_AGENT),
            bytes_in,
        }
    }

    /// The event as the log phase knows it; byte counts and the total time are filled in
    /// when the body ends (the request body may still be streaming now).
    pub(crate) fn finish(
        self,
        _snap: &Snapshot,
        facts: &LogFacts,
        status: StatusCode,
    ) -> (CallEvent, BytesIn) {
        let consumer = facts.consumer.as_deref();
        let event = CallEvent {
            time_unix_ms: self.time_unix_ms,
            request_id: self.request_id,
            trace_id: None,
            span_id: None,
            client_ip: facts.client_ip.unwrap_or(self.peer),
            listener: None,
            protocol: self.protocol,
            method: self.method,
            host: self.host,
            path: self.path,
            query: self.query,
            route: facts.route.clone(),
            service: facts.service.as_ref().map(|s| Arc::from(s.id.as_str())),
            application: consumer.map(|c| Arc::from(c.id.as_str())),
            application_name: consumer.map(|c| Arc::from(c.name.as_str())),
            team: consumer.map(|c| Arc::from(c.team.as_str())),
            status: status.as_u16(),
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
            upstream_us: facts
                .upstream_time
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            upstream: facts.upstream.as_ref().map(|u| Arc::from(u.name.as_str())),
            upstream_target: facts.target,
            attempts: facts.attempts,
            cache: None,
            error: facts.error,
            user_agent: self.user_agent,
            completed: false,
        };
        (event, self.bytes_in)
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

/// Wraps the response body so the event is emitted when it ends, fails or is dropped.
pub(crate) fn wrap(
    resp: Response<ProxyBody>,
    (event, bytes_in): (CallEvent, BytesIn),
    started: Instant,
    observer: Arc<Observer>,
) -> Response<ProxyBody> {
    resp.map(|inner| {
        Observed {
            inner,
            pending: Some((event, observer)),
            started,
            bytes: 0,
            bytes_in,
        }
        .boxed_unsync()
    })
}

/// A response body that counts what it sends and emits the call event once.
struct Observed {
    inner: ProxyBody,
    pending: Option<(CallEvent, Arc<Observer>)>,
    started: Instant,
    bytes: u64,
    bytes_in: BytesIn,
}

impl Observed {
    fn emit(&mut self, completed: bool) {
        if let Some((mut event, observer)) = self.pending.take() {
            event.bytes_out = self.bytes;
            event.bytes_in = self.bytes_in.get();
            event.duration_us =
                u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
            event.completed = completed;
            observer.emit(event);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.emit(true);
                }
            }
            Poll::Ready(None) => this.emit(true),
            Poll::Ready(Some(Err(_))) => this.emit(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is already at its end (HEAD, 204, 304).
        let completed = self.inner.is_end_stream();
        self.emit(completed);
    }
}
