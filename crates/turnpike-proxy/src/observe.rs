//! The data plane's side of observability: what a request leaves behind as a
//! [`CallEvent`], emitted to the [`Observer`] when its response body is done.
//!
//! Nothing here runs unless a sink is registered ([`Observer::is_active`]), so a gateway
//! without metrics or logs pays one atomic load per request.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;
use turnpike_observe::trace::TraceFacts;
use turnpike_observe::trace::context::hex;
use turnpike_observe::{CallEvent, Capture, CapturedBody, Observer};

use crate::body::{BoxError, ProxyBody};
use crate::proxy::{ClientConn, LogFacts};
use crate::reqbody::BytesIn;
use crate::snapshot::Snapshot;

/// What is known of a call when it arrives; completed by [`Pending::finish`].
pub(crate) struct Pending {
    time_unix_ms: i64,
    request_id: String,
    peer: std::net::IpAddr,
    listener: Option<Arc<str>>,
    protocol: &'static str,
    method: String,
    host: Option<String>,
    path: String,
    query: Option<String>,
    user_agent: Option<String>,
    /// The caller's trace context, so logs carry its trace id even with tracing off.
    parent: Option<turnpike_observe::trace::Parent>,
    bytes_in: BytesIn,
    /// Header and body capture, when the access log asks for it.
    capture: Option<Arc<Capture>>,
    request_headers: Option<Vec<(String, String)>>,
    /// Filled by the upstream attempt as it sends the body; read when the event is emitted.
    request_body: Option<Arc<Mutex<CapturedBody>>>,
}

impl Pending {
    /// Copies what the event needs from the request before the pipeline consumes it.
    pub(crate) fn new<B>(
        req: &Request<B>,
        conn: &ClientConn,
        request_id: &str,
        capture: Option<Arc<Capture>>,
    ) -> Self {
        let bytes_in = BytesIn::default();
        let time_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let headers = req.headers();
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let host = req
            .uri()
            .host()
            .or_else(|| text(header::HOST).map(strip_port))
            .map(str::to_owned);
        Self {
            time_unix_ms,
            request_id: request_id.to_owned(),
            peer: conn.peer.ip(),
            listener: conn.listener.clone(),
            protocol: protocol(req.version()),
            method: req.method().as_str().to_owned(),
            host,
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            user_agent: text(header::USER_AGENT).map(str::to_owned),
            parent: turnpike_observe::trace::context::parent(headers),
            bytes_in,
            request_headers: capture
                .as_ref()
                .filter(|c| c.request_headers)
                .map(|c| c.headers(headers)),
            request_body: capture
                .as_ref()
                .filter(|c| c.request_body)
                .map(|c| Arc::new(Mutex::new(c.body()))),
            capture,
        }
    }

    /// The counter the body readers feed (kept in the log facts, not the request's
    /// extensions: a first extension costs the request a map of its own).
    pub(crate) fn bytes_in(&self) -> BytesIn {
        self.bytes_in.clone()
    }

    /// Where the upstream attempt copies the start of the request body, when captured.
    pub(crate) fn request_body_capture(&self) -> Option<Arc<Mutex<CapturedBody>>> {
        self.request_body.clone()
    }

    /// The event as the log phase knows it; byte counts and the total time are filled in
    /// when the body ends (the request body may still be streaming now).
    pub(crate) fn finish(
        self,
        _snap: &Snapshot,
        facts: &LogFacts,
        trace: Option<Box<TraceFacts>>,
        status: StatusCode,
    ) -> (Arc<CallEvent>, BytesIn) {
        let consumer = facts.consumer.as_deref();
        let (trace_id, span_id) = match (&trace, &self.parent) {
            (Some(t), _) => (Some(hex(&t.trace_id)), Some(hex(&t.span_id))),
            (None, Some(p)) => (Some(hex(&p.trace_id)), None),
            (None, None) => (None, None),
        };
        // Built in its shared allocation now, so the event is not copied again on its way
        // to the sinks (it is several hundred bytes).
        let event = Arc::new(CallEvent {
            time_unix_ms: self.time_unix_ms,
            request_id: self.request_id,
            trace_id,
            span_id,
            client_ip: facts.client_ip.unwrap_or(self.peer),
            listener: self.listener,
            protocol: self.protocol,
            method: self.method,
            host: self.host,
            path: self.path,
            query: self.query,
            route: facts.route.clone(),
            // Shared with the snapshot: a reference count each, no copy.
            service: facts.service.as_ref().map(|s| Arc::clone(&s.id)),
            application: consumer.map(|c| Arc::clone(&c.id)),
            application_name: consumer.map(|c| Arc::clone(&c.name)),
            team: consumer.map(|c| Arc::clone(&c.team)),
            status: status.as_u16(),
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
            upstream_us: facts
                .upstream_time
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            upstream: facts.upstream.as_ref().map(|u| Arc::clone(&u.name)),
            upstream_target: facts.target,
            attempts: facts.attempts,
            cache: facts.cache,
            error: facts.error,
            user_agent: self.user_agent,
            completed: false,
            request_headers: self.request_headers,
            response_headers: None,
            request_body: None,
            response_body: None,
            trace,
            redact: facts.redact.clone(),
        });
        (event, self.bytes_in)
    }

    /// Splits off the capture state the response wrapper needs.
    pub(crate) fn take_capture(&mut self) -> Captured {
        Captured {
            capture: self.capture.take(),
            request_body: self.request_body.take(),
        }
    }
}

/// Capture state carried from the request to the end of the response.
pub(crate) struct Captured {
    capture: Option<Arc<Capture>>,
    request_body: Option<Arc<Mutex<CapturedBody>>>,
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
    (mut event, bytes_in): (Arc<CallEvent>, BytesIn),
    captured: Captured,
    started: Instant,
    observer: Arc<Observer>,
) -> Response<ProxyBody> {
    let capture = captured.capture.as_deref();
    if let Some(c) = capture.filter(|c| c.response_headers) {
        Arc::make_mut(&mut event).response_headers = Some(c.headers(resp.headers()));
    }
    let response_body = capture.filter(|c| c.response_body).map(Capture::body);
    resp.map(|inner| {
        Observed {
            inner,
            pending: Some((event, observer)),
            started,
            bytes: 0,
            bytes_in,
            request_body: captured.request_body,
            response_body,
        }
        .boxed_unsync()
    })
}

pin_project_lite::pin_project! {
    /// The request body on its way upstream, keeping its first bytes for the access log.
    /// Each attempt starts the copy again (a retry resends the same body).
    pub(crate) struct CaptureRequestBody<B> {
        #[pin]
        inner: B,
        into: Arc<Mutex<CapturedBody>>,
    }
}

impl<B> CaptureRequestBody<B> {
    pub(crate) fn new(inner: B, into: Arc<Mutex<CapturedBody>>) -> Self {
        if let Ok(mut b) = into.lock() {
            b.clear();
        }
        Self { inner, into }
    }
}

impl<B: Body<Data = Bytes>> Body for CaptureRequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Ok(mut b) = this.into.lock()
        {
            b.push(data);
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

/// A response body that counts what it sends and emits the call event once.
struct Observed {
    inner: ProxyBody,
    /// Not shared until emitted, so filling it in never clones it.
    pending: Option<(Arc<CallEvent>, Arc<Observer>)>,
    started: Instant,
    bytes: u64,
    bytes_in: BytesIn,
    /// Captured as the upstream attempt sent it.
    request_body: Option<Arc<Mutex<CapturedBody>>>,
    /// The start of the response body, when captured.
    response_body: Option<CapturedBody>,
}

impl Observed {
    fn emit(&mut self, completed: bool) {
        if let Some((mut shared, observer)) = self.pending.take() {
            let event = Arc::make_mut(&mut shared);
            event.request_body = self
                .request_body
                .take()
                .and_then(|b| b.lock().ok().map(|b| b.clone()))
                .filter(|b| !b.data.is_empty() || b.truncated);
            event.response_body = self.response_body.take();
            event.bytes_out = self.bytes;
            event.bytes_in = self.bytes_in.get();
            event.duration_us =
                u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
            event.completed = completed;
            observer.emit(shared);
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
                    if let Some(b) = &mut this.response_body {
                        b.push(data);
                    }
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
