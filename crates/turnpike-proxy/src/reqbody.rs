//! Request bodies on their way upstream: a size limit enforced while streaming, an idle
//! timeout between chunks, and a slot that lets a retry reuse a body no attempt has read.
//!
//! Retrying is only safe while nothing of the body has been sent. Instead of buffering
//! bodies, every attempt gets an [`AttemptBody`] that takes the real body from a shared slot
//! on its first poll and flags the slot as started. A failed attempt that never polled leaves
//! the body in the slot for the next one; once started, the proxy does not retry.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The client paused longer than the write timeout while sending its body.
#[derive(Debug)]
pub struct BodyIdleTimeout;

impl std::fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client body stalled")
    }
}

impl std::error::Error for BodyIdleTimeout {}

/// The client's body on its way upstream: the byte limit (`http_body_util::Limited`, whose
/// `LengthLimitError` becomes 413) inside the write timeout between chunks (408).
pub type LimitedBody = IdleTimeoutBody<http_body_util::Limited<Prefixed>>;

/// Request body bytes read from the client so far, shared between the body wrappers that
/// read it and the call event. Made only when a sink listens (and carried in the log facts
/// to each reader), so the usual path counts nothing.
#[derive(Clone, Debug, Default)]
pub struct BytesIn(pub Arc<AtomicU64>);

impl BytesIn {
    /// Adds `n` bytes read.
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes read so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Wraps the client's body with its limit and idle timeout; `counted` (when the call is
/// observed) learns every byte read.
pub fn limited(
    inner: Incoming,
    limit: u64,
    idle: Duration,
    counted: Option<BytesIn>,
) -> LimitedBody {
    limited_after(Bytes::new(), inner, limit, idle, counted)
}

/// Like [`limited`], for a body whose first bytes (`head`) were already read by the gateway
/// (body inspection that gave up past its bound); `head` counts against the limit (and was
/// counted as read when it was).
pub fn limited_after(
    head: Bytes,
    inner: Incoming,
    limit: u64,
    idle: Duration,
    counted: Option<BytesIn>,
) -> LimitedBody {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let body = Prefixed {
        head: (!head.is_empty()).then_some(head),
        rest: inner,
        counted,
    };
    IdleTimeoutBody::new(http_body_util::Limited::new(body, limit), idle, || {
        Box::new(BodyIdleTimeout)
    })
}

pin_project_lite::pin_project! {
    /// The client's body, after bytes the gateway already read from it (none on the usual,
    /// streaming path).
    pub struct Prefixed {
        head: Option<Bytes>,
        #[pin]
        rest: Incoming,
        counted: Option<BytesIn>,
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let polled = this.rest.poll_frame(cx);
        if let (Some(counted), Poll::Ready(Some(Ok(frame)))) = (this.counted.as_ref(), &polled)
            && let Some(data) = frame.data_ref()
        {
            counted.add(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(head));
        if let Some(u) = rest.upper() {
            hint.set_upper(u.saturating_add(head));
        }
        hint
    }
}

/// Holds the request body until an attempt starts sending it.
#[derive(Clone)]
pub struct BodySlot {
    body: Arc<Mutex<Option<Pin<Box<LimitedBody>>>>>,
    /// A body the gateway read whole (for inspection): every attempt sends these bytes, so
    /// a retry never loses it.
    buffered: Option<Bytes>,
    started: Arc<AtomicBool>,
    end_stream: bool,
    hint: SizeHint,
}

impl BodySlot {
    /// A slot holding `body`.
    pub fn new(body: LimitedBody) -> Self {
        let end_stream = body.is_end_stream();
        let hint = body.size_hint();
        Self {
            body: Arc::new(Mutex::new(Some(Box::pin(body)))),
            buffered: None,
            started: Arc::new(AtomicBool::new(false)),
            end_stream,
            hint,
        }
    }

    /// A slot holding a body already read whole.
    pub fn buffered(bytes: Bytes) -> Self {
        Self {
            body: Arc::new(Mutex::new(None)),
            end_stream: bytes.is_empty(),
            hint: SizeHint::with_exact(bytes.len() as u64),
            buffered: Some(bytes),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether any attempt has begun reading the body. A body known to be empty never counts
    /// as started: there is nothing to lose by sending it again.
    pub fn started(&self) -> bool {
        self.buffered.is_none() && !self.end_stream && self.started.load(Ordering::Acquire)
    }

    /// The whole body, when the gateway read it for inspection.
    pub fn buffered_bytes(&self) -> Option<&Bytes> {
        self.buffered.as_ref()
    }

    /// Whether the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.end_stream
    }

    /// A body for one attempt.
    pub fn attempt(&self) -> AttemptBody {
        AttemptBody {
            slot: self.clone(),
            taken: None,
            sent: false,
        }
    }
}

/// The body given to one upstream attempt.
pub struct AttemptBody {
    slot: BodySlot,
    taken: Option<Pin<Box<LimitedBody>>>,
    /// A buffered body was sent.
    sent: bool,
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.slot.end_stream {
            return Poll::Ready(None);
        }
        if let Some(b) = &self.slot.buffered {
            if self.sent {
                return Poll::Ready(None);
            }
            let b = b.clone();
            self.sent = true;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.taken.is_none() {
            self.slot.started.store(true, Ordering::Release);
            let body = self.slot.body.lock().ok().and_then(|mut b| b.take());
            match body {
                Some(b) => self.taken = Some(b),
                // Another attempt already consumed it; the proxy never retries then, so this
                // only happens if that rule is broken. Fail instead of sending a truncated body.
                None => return Poll::Ready(Some(Err("request body already consumed".into()))),
            }
        }
        match self.taken.as_mut() {
            Some(b) => b.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.slot.buffered.is_some() {
            return self.sent || self.slot.end_stream;
        }
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.slot.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.slot.buffered.is_some() && self.sent {
            return SizeHint::with_exact(0);
        }
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.slot.hint,
        }
    }
}

pin_project_lite::pin_project! {
    /// A body with an idle timeout between frames: the upstream read timeout on responses,
    /// the write timeout on client bodies. The clock starts at the first poll, so time spent
    /// connecting upstream does not count against a request body.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        idle: Duration,
        armed: bool,
        on_timeout: fn() -> BoxError,
        #[pin]
        timer: Sleep,
    }
}

impl<B> IdleTimeoutBody<B> {
    /// Wraps `inner`; `on_timeout` makes the error reported when the body stalls.
    pub fn new(inner: B, idle: Duration, on_timeout: fn() -> BoxError) -> Self {
        Self {
            inner,
            idle,
            armed: false,
            on_timeout,
            timer: tokio::time::sleep(idle),
        }
    }
}

/// The upstream paused longer than the read timeout while sending its body.
#[derive(Debug)]
pub struct UpstreamBodyTimeout;

impl std::fmt::Display for UpstreamBodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream body stalled")
    }
}

impl std::error::Error for UpstreamBodyTimeout {}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if !*this.armed {
            *this.armed = true;
            this.timer.as_mut().reset(Instant::now() + *this.idle);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = Instant::now() + *this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err((this.on_timeout)()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
