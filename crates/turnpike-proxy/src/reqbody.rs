//! Request bodies on their way upstream: a size limit enforced while streaming, an idle
//! timeout between chunks, and a slot that lets a retry reuse a body no attempt has read.
//!
//! Retrying is only safe while nothing of the body has been sent. Instead of buffering
//! bodies, every attempt gets an [`AttemptBody`] that takes the real body from a shared slot
//! on its first poll and flags the slot as started. A failed attempt that never polled leaves
//! the body in the slot for the next one; once started, the proxy does not retry.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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
pub type LimitedBody = IdleTimeoutBody<http_body_util::Limited<Incoming>>;

/// Wraps the client's body with its limit and idle timeout.
pub fn limited(inner: Incoming, limit: u64, idle: Duration) -> LimitedBody {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    IdleTimeoutBody::new(http_body_util::Limited::new(inner, limit), idle, || {
        Box::new(BodyIdleTimeout)
    })
}

/// Holds the request body until an attempt starts sending it.
#[derive(Clone)]
pub struct BodySlot {
    body: Arc<Mutex<Option<Pin<Box<LimitedBody>>>>>,
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
            started: Arc::new(AtomicBool::new(false)),
            end_stream,
            hint,
        }
    }

    /// Whether any attempt has begun reading the body. A body known to be empty never counts
    /// as started: there is nothing to lose by sending it again.
    pub fn started(&self) -> bool {
        !self.end_stream && self.started.load(Ordering::Acquire)
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
        }
    }
}

/// The body given to one upstream attempt.
pub struct AttemptBody {
    slot: BodySlot,
    taken: Option<Pin<Box<LimitedBody>>>,
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
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.slot.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
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
