//! Strict HTTP/1 request framing in front of hyper.
//!
//! hyper's HTTP/1 parser is lenient where a gateway must not be: it accepts bare LF line endings
//! and lets `Transfer-Encoding: chunked` win over a `Content-Length` in the same request. A
//! gateway that forwards such a request to an upstream which frames it differently lets a client
//! smuggle a second request past every policy. [`H1Guard`] sits between the accepted socket and
//! hyper and validates the client's byte stream with its own small framing state machine before
//! hyper sees a byte of it. Anything ambiguous ends the connection with a JSON `400` (or `431` /
//! `414` for oversized heads), and nothing after the offending message ever reaches hyper.
//!
//! # How the listener uses it
//!
//! ```text
//! let io = TokioIo::new(H1Guard::new(tcp_or_tls_stream, limits));
//! auto_builder.serve_connection_with_upgrades(io, service).await;
//! ```
//!
//! Nothing else is needed. hyper calls `poll_shutdown` when it closes the connection and that is
//! where the guard writes its error response. If hyper drops the connection without calling
//! shutdown (it does when the service or the connection fails), `Drop` makes one non-blocking
//! attempt to write the pending response, which succeeds whenever the socket has room.
//!
//! # Why hyper only sees EOF when it is idle
//!
//! With `half_close(false)` (hyper's default) hyper polls the socket while the service is still
//! working on a request and treats EOF there as an aborted request, dropping its response. So
//! after a violation the guard hands hyper every byte before the offending message and then
//! answers reads with `Pending` until the write side has seen a complete response for every
//! request hyper received (a small response framing tracker watches what hyper writes). Only
//! then does hyper get EOF, which it treats as the client closing an idle connection: it shuts
//! down, and the guard's error response follows the last legitimate response on the wire.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorKind;

/// The HTTP/2 connection preface a client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A chunk-size line (size and extensions) longer than this is refused; real clients send a few
/// bytes, and without a cap a client could make us buffer without bound.
const MAX_CHUNK_LINE: usize = 4096;
/// How much we try to read from the socket at once.
const READ_CHUNK: usize = 8192;
/// Caps the response head we buffer while tracking hyper's output; hyper never writes more, and
/// past it we stop tracking rather than grow.
const MAX_TRACKED_RESPONSE_HEAD: usize = 1024 * 1024;
/// After an error response we discard at most this much already-received input, so closing the
/// socket does not turn into a RST that could destroy the response on the client's side.
const MAX_DRAIN: usize = 256 * 1024;

/// Limits applied to each request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Largest request head (request line, headers and the final empty line) in bytes; past it
    /// the client gets `431 headers_too_large`. Also caps a chunked body's trailer section.
    pub max_header_bytes: usize,
    /// Most header lines in one head (and trailer lines in one chunked body); past it `431`.
    pub max_headers: usize,
    /// Longest request target in bytes; past it `414 uri_too_long`.
    pub max_uri_length: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_length: 8 * 1024,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rejection {
    kind: ErrorKind,
    message: &'static str,
}

impl Rejection {
    const fn bad(message: &'static str) -> Self {
        Self {
            kind: ErrorKind::BadRequest,
            message,
        }
    }

    const fn too_large(message: &'static str) -> Self {
        Self {
            kind: ErrorKind::HeadersTooLarge,
            message,
        }
    }

    /// The complete HTTP/1.1 response, in the project's JSON error shape.
    fn response_bytes(&self) -> Vec<u8> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "error": {
                "code": self.kind.code(),
                "message": self.message,
                "request_id": request_id,
            }
        })
        .to_string();
        let status = self.kind.status();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
             x-request-id: {request_id}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            body.len(),
        )
        .into_bytes()
    }
}

/// Incremental state while a request head (or a trailer section) is being accumulated.
///
/// Offsets are relative to the start of the message, which is always the first byte not yet
/// validated; they survive hyper consuming validated bytes in front of it.
#[derive(Debug, Default)]
struct HeadScan {
    /// Where the search for the next LF resumes, so each byte is scanned once.
    scan: usize,
    /// Start of the line being accumulated.
    line_start: usize,
    /// Field lines seen.
    lines: usize,
    request_line_done: bool,
    http10: bool,
    method_head: bool,
    method_connect: bool,
    content_length: Option<u64>,
    content_length_count: usize,
    chunked: bool,
    transfer_encoding_count: usize,
    upgrade: bool,
    conn_close: bool,
    conn_keep_alive: bool,
}

/// What the reader does with the next bytes from the client.
#[derive(Debug)]
enum ReadState {
    /// Connection start: is this HTTP/2 with prior knowledge?
    Preface,
    /// Accumulating and validating a request head.
    Head(HeadScan),
    /// Passing this many body bytes.
    Fixed(u64),
    /// Waiting for a complete chunk-size line; `scan` is where the LF search resumes.
    ChunkSize { scan: usize },
    /// Passing this many chunk data bytes.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkDataEnd,
    /// Validating the trailer section after the last chunk.
    Trailers(HeadScan),
    /// An upgrade request was passed on; nothing more is read until hyper's answer is seen.
    AwaitUpgrade,
    /// Not HTTP/1 any more (h2 prior knowledge or an upgraded connection).
    PassThrough,
    /// No more client bytes will be passed on (violation, or a request that closes the
    /// connection). `eof_now`: hyper is inside a message body and must see EOF at once.
    Stopped { eof_now: bool },
}

/// What happens after the current request's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterBody {
    NextHead,
    AwaitUpgrade,
    Stop,
}

/// The result of one validation step over buffered bytes.
enum Step {
    Progress,
    NeedMore,
    Reject {
        rejection: Rejection,
        mid_body: bool,
    },
}

/// What the response tracker must know about a request to frame its response.
#[derive(Debug, Clone, Copy, Default)]
struct ReqKind {
    head: bool,
    connect: bool,
    upgrade: bool,
}

/// Response framing as the tracker follows hyper's output.
#[derive(Debug, Clone, Copy, Default)]
enum RespState {
    #[default]
    Head,
    Fixed(u64),
    ChunkSize {
        size: u64,
    },
    ChunkData(u64),
    ChunkDataEnd,
    Trailer {
        line_len: usize,
    },
    /// Close-delimited body, or protocol switched: nothing more to frame.
    Untracked,
}

/// What a batch of written bytes meant.
#[derive(Debug, Default, Clone, Copy)]
struct RespEvents {
    completed: bool,
    switched: bool,
    refused: bool,
}

/// Follows the responses hyper writes, just enough to know where each one ends.
///
/// hyper's output is well formed, so this is far simpler than the request side; it exists to
/// tell when hyper is idle (every request it received has been answered) and to find the
/// response to an upgrade request.
#[derive(Debug, Clone, Default)]
struct RespTracker {
    pending: VecDeque<ReqKind>,
    /// Requests handed to hyper.
    requests: u64,
    /// Final responses completely written.
    completed: u64,
    state: RespState,
    head: Vec<u8>,
    /// The last complete response carried `connection: close`.
    last_closes: bool,
}

impl RespTracker {
    fn push(&mut self, kind: ReqKind) {
        self.pending.push_back(kind);
        self.requests += 1;
    }

    fn at_boundary(&self) -> bool {
        matches!(self.state, RespState::Head) && self.head.is_empty()
    }

    fn idle(&self) -> bool {
        self.at_boundary() && self.completed >= self.requests
    }

    fn complete(&mut self, ev: &mut RespEvents) {
        if self.pending.pop_front().is_some() {
            self.completed += 1;
        }
        self.state = RespState::Head;
        ev.completed = true;
    }

    /// Follows `data`; with `stop_at`, stops (returning how much it consumed) at the first
    /// response boundary where `stop_at` responses are complete.
    fn advance(&mut self, data: &[u8], stop_at: Option<u64>) -> (usize, RespEvents) {
        let mut ev = RespEvents::default();
        let mut i = 0;
        while i < data.len() {
            if let Some(k) = stop_at
                && self.completed >= k
                && self.at_boundary()
            {
                break;
            }
            let rest = data.get(i..).unwrap_or_default();
            match self.state {
                RespState::Head => {
                    // Only the head is copied, never the body bytes written along with it.
                    match head_end_in(&self.head, rest) {
                        Some(end) => {
                            self.head.extend_from_slice(rest.get(..end).unwrap_or(rest));
                            i += end.max(1);
                            self.on_head(&mut ev);
                            self.head.clear();
                        }
                        None => {
                            self.head.extend_from_slice(rest);
                            i = data.len();
                            if self.head.len() > MAX_TRACKED_RESPONSE_HEAD {
                                self.head.clear();
                                self.state = RespState::Untracked;
                            }
                        }
                    }
                }
                RespState::Fixed(n) => {
                    let k = n.min(rest.len() as u64);
                    i += k as usize;
                    if n == k {
                        self.complete(&mut ev);
                    } else {
                        self.state = RespState::Fixed(n - k);
                    }
                }
                RespState::ChunkData(n) => {
                    let k = n.min(rest.len() as u64);
                    i += k as usize;
                    self.state = if n == k {
                        RespState::ChunkDataEnd
                    } else {
                        RespState::ChunkData(n - k)
                    };
                }
                RespState::ChunkSize { size } => {
                    // Byte by byte, but these lines are a few bytes per chunk.
                    i += 1;
                    let b = rest.first().copied().unwrap_or(b'\n');
                    if b == b'\n' {
                        self.state = if size == 0 {
                            RespState::Trailer { line_len: 0 }
                        } else {
                            RespState::ChunkData(size)
                        };
                    } else if let Some(d) = hex_value(b) {
                        self.state = RespState::ChunkSize {
                            size: size.saturating_mul(16).saturating_add(u64::from(d)),
                        };
                    } else {
                        // Extensions or CR: skip to the LF. A later hex digit cannot occur in
                        // hyper's output, which writes no extensions.
                    }
                }
                RespState::ChunkDataEnd => {
                    i += 1;
                    if rest.first() == Some(&b'\n') {
                        self.state = RespState::ChunkSize { size: 0 };
                    }
                }
                RespState::Trailer { line_len } => {
                    i += 1;
                    match rest.first() {
                        Some(b'\n') if line_len == 0 => self.complete(&mut ev),
                        Some(b'\n') => self.state = RespState::Trailer { line_len: 0 },
                        Some(b'\r') => {}
                        _ => {
                            self.state = RespState::Trailer {
                                line_len: line_len + 1,
                            }
                        }
                    }
                }
                RespState::Untracked => i = data.len(),
            }
        }
        (i, ev)
    }

    /// A complete response head is in `self.head`: decide how its body is framed.
    fn on_head(&mut self, ev: &mut RespEvents) {
        let req = self.pending.front().copied().unwrap_or_default();
        let head = std::mem::take(&mut self.head);
        let status = head
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(500);
        let mut content_length = None;
        let mut chunked = false;
        let mut close = false;
        for line in head.split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = find_byte(line, b':') else {
                continue;
            };
            let name = line.get(..colon).unwrap_or_default();
            let value = trim_ows(line.get(colon + 1..).unwrap_or_default());
            if name.eq_ignore_ascii_case(b"content-length") {
                content_length = parse_decimal(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| trim_ows(t).eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                close |= value
                    .split(|&b| b == b',')
                    .any(|t| trim_ows(t).eq_ignore_ascii_case(b"close"));
            }
        }
        self.head = head;
        if status == 101 || (req.connect && (200..300).contains(&status)) {
            self.pending.pop_front();
            self.completed += 1;
            self.state = RespState::Untracked;
            ev.switched = true;
            return;
        }
        if (100..200).contains(&status) {
            // Interim response (100 Continue): the final one follows for the same request.
            self.state = RespState::Head;
            return;
        }
        if req.upgrade || req.connect {
            ev.refused = true;
        }
        self.last_closes = close;
        if req.head || status == 204 || status == 304 {
            self.complete(ev);
        } else if chunked {
            self.state = RespState::ChunkSize { size: 0 };
        } else if let Some(n) = content_length {
            if n == 0 {
                self.complete(ev);
            } else {
                self.state = RespState::Fixed(n);
            }
        } else {
            self.state = RespState::Untracked;
        }
    }
}

/// Where the guard's own error response stands.
#[derive(Debug)]
enum RejectOut {
    None,
    /// Refused; `at` is the index of the request our response answers, `None` when hyper had
    /// already started answering the offending request and ours would be a second response.
    Pending {
        rejection: Rejection,
        at: Option<u64>,
    },
    Writing {
        bytes: Vec<u8>,
        pos: usize,
    },
    Done,
}

/// An IO wrapper that lets through only unambiguous HTTP/1 requests.
///
/// Wrap the accepted stream (TCP or TLS) and hand the guard to hyper (through
/// `hyper_util::rt::TokioIo`). HTTP/2 with prior knowledge and upgraded connections
/// (WebSocket, CONNECT tunnels) pass through untouched once detected.
pub struct H1Guard<IO: AsyncWrite + Unpin> {
    io: IO,
    limits: GuardLimits,
    /// Raw client bytes; the first `out` of them are validated and waiting for hyper.
    buf: BytesMut,
    out: usize,
    state: ReadState,
    after_body: AfterBody,
    /// What to do when an upgrade request is answered without switching protocols.
    after_refused_upgrade: AfterBody,
    client_eof: bool,
    read_waker: Option<Waker>,
    /// Whether hyper's output is still HTTP/1 we follow.
    tracking: bool,
    tracker: RespTracker,
    /// Index of the request whose response hyper must not send: its body was cut off by a
    /// violation and our error response stands in for it.
    swallow_from: Option<u64>,
    reject: RejectOut,
}

impl<IO: AsyncWrite + Unpin> std::fmt::Debug for H1Guard<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Guard")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .field("validated", &self.out)
            .field("reject", &self.reject)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> H1Guard<IO> {
    /// Wraps an accepted connection.
    pub fn new(io: IO, limits: GuardLimits) -> Self {
        Self {
            io,
            limits,
            buf: BytesMut::new(),
            out: 0,
            state: ReadState::Preface,
            after_body: AfterBody::NextHead,
            after_refused_upgrade: AfterBody::NextHead,
            client_eof: false,
            read_waker: None,
            tracking: true,
            tracker: RespTracker::default(),
            swallow_from: None,
            reject: RejectOut::None,
        }
    }

    /// One validation step over the buffered, not yet validated bytes.
    fn step(&mut self) -> Step {
        let data = self.buf.get(self.out..).unwrap_or_default();
        let limits = self.limits;
        match &mut self.state {
            ReadState::Preface => {
                let n = data.len().min(H2_PREFACE.len());
                if data.get(..n) == H2_PREFACE.get(..n) {
                    if n == H2_PREFACE.len() {
                        self.state = ReadState::PassThrough;
                        self.tracking = false;
                        return Step::Progress;
                    }
                    return Step::NeedMore;
                }
                self.state = ReadState::Head(HeadScan::default());
                Step::Progress
            }
            ReadState::Head(hs) => match scan_head(data, hs, &limits) {
                Ok(None) => Step::NeedMore,
                Ok(Some(len)) => {
                    let hs = std::mem::take(hs);
                    match self.finish_head(&hs, len) {
                        Ok(()) => Step::Progress,
                        Err(rejection) => Step::Reject {
                            rejection,
                            mid_body: false,
                        },
                    }
                }
                Err(rejection) => Step::Reject {
                    rejection,
                    mid_body: false,
                },
            },
            ReadState::Fixed(n) | ReadState::ChunkData(n) => {
                if data.is_empty() {
                    return Step::NeedMore;
                }
                let k = (*n).min(data.len() as u64);
                *n -= k;
                self.out += k as usize;
                if *n == 0 {
                    if matches!(self.state, ReadState::Fixed(_)) {
                        self.finish_message();
                    } else {
                        self.state = ReadState::ChunkDataEnd;
                    }
                }
                Step::Progress
            }
            ReadState::ChunkSize { scan } => {
                let Some(lf) =
                    find_byte(data.get(*scan..).unwrap_or_default(), b'\n').map(|p| p + *scan)
                else {
                    if data.len() > MAX_CHUNK_LINE {
                        return chunk_error("chunk size line too long");
                    }
                    *scan = data.len();
                    return Step::NeedMore;
                };
                let Some(line) = data.get(..lf).and_then(|l| l.strip_suffix(b"\r")) else {
                    return chunk_error("bare LF in chunk size line");
                };
                if line.len() > MAX_CHUNK_LINE {
                    return chunk_error("chunk size line too long");
                }
                match parse_chunk_size(line) {
                    Ok(0) => self.state = ReadState::Trailers(HeadScan::default()),
                    Ok(size) => self.state = ReadState::ChunkData(size),
                    Err(message) => return chunk_error(message),
                }
                self.out += lf + 1;
                Step::Progress
            }
            ReadState::ChunkDataEnd => match (data.first(), data.get(1)) {
                (None, _) | (Some(b'\r'), None) => Step::NeedMore,
                (Some(b'\r'), Some(b'\n')) => {
                    self.out += 2;
                    self.state = ReadState::ChunkSize { scan: 0 };
                    Step::Progress
                }
                _ => chunk_error("missing CRLF after chunk data"),
            },
            ReadState::Trailers(ts) => match scan_trailer_line(data, ts, &limits) {
                Ok(None) => Step::NeedMore,
                Ok(Some((len, done))) => {
                    // Trailer lines are validated one at a time and can go on at once; only the
                    // running totals in `ts` matter for the next line.
                    self.out += len;
                    ts.scan = 0;
                    ts.line_start = 0;
                    if done {
                        self.finish_message();
                    }
                    Step::Progress
                }
                Err(rejection) => Step::Reject {
                    rejection,
                    mid_body: true,
                },
            },
            ReadState::AwaitUpgrade | ReadState::PassThrough | ReadState::Stopped { .. } => {
                Step::NeedMore
            }
        }
    }

    /// A head of `len` bytes validated line by line: check the framing as a whole and let it
    /// through.
    fn finish_head(&mut self, hs: &HeadScan, len: usize) -> Result<(), Rejection> {
        if hs.chunked && hs.content_length_count > 0 {
            return Err(Rejection::bad("both Content-Length and Transfer-Encoding"));
        }
        if hs.transfer_encoding_count > 0 && hs.http10 {
            return Err(Rejection::bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        let closes = hs.conn_close || (hs.http10 && !hs.conn_keep_alive);
        let upgrade = hs.upgrade || hs.method_connect;
        self.after_body = match (upgrade, closes) {
            (true, _) => AfterBody::AwaitUpgrade,
            (false, true) => AfterBody::Stop,
            (false, false) => AfterBody::NextHead,
        };
        self.after_refused_upgrade = if closes {
            AfterBody::Stop
        } else {
            AfterBody::NextHead
        };
        self.out += len;
        self.tracker.push(ReqKind {
            head: hs.method_head,
            connect: hs.method_connect,
            upgrade,
        });
        if hs.chunked {
            self.state = ReadState::ChunkSize { scan: 0 };
        } else {
            match hs.content_length {
                Some(n) if n > 0 => self.state = ReadState::Fixed(n),
                _ => self.finish_message(),
            }
        }
        Ok(())
    }

    fn finish_message(&mut self) {
        self.state = match self.after_body {
            AfterBody::NextHead => ReadState::Head(HeadScan::default()),
            AfterBody::AwaitUpgrade => ReadState::AwaitUpgrade,
            AfterBody::Stop => ReadState::Stopped { eof_now: false },
        };
    }

    fn on_violation(&mut self, rejection: Rejection, mid_body: bool) {
        tracing::debug!(reason = rejection.message, "h1guard: refusing request");
        let at = if mid_body {
            // The offending message's head already went to hyper.
            let k = self.tracker.requests.saturating_sub(1);
            let started = self.tracker.completed > k
                || (self.tracker.completed == k && !self.tracker.at_boundary());
            if started {
                None
            } else {
                self.swallow_from = Some(k);
                Some(k)
            }
        } else {
            Some(self.tracker.requests)
        };
        self.reject = RejectOut::Pending { rejection, at };
        self.state = ReadState::Stopped { eof_now: mid_body };
        // Bytes after the violation are never passed on.
        self.buf.truncate(self.out);
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    /// Follows bytes that reached the socket and reacts to what they mean.
    fn observe(&mut self, data: &[u8]) {
        if !self.tracking || data.is_empty() {
            return;
        }
        let (_, ev) = self.tracker.advance(data, None);
        if ev.switched {
            self.tracking = false;
            if !matches!(self.state, ReadState::Stopped { .. }) {
                self.state = ReadState::PassThrough;
            }
            self.wake_reader();
        } else if ev.refused {
            if matches!(self.state, ReadState::AwaitUpgrade) {
                self.after_body = self.after_refused_upgrade;
                self.finish_message();
                self.wake_reader();
            } else {
                // Answered before its body was through (an early error): once the body is
                // passed, go straight on.
                self.after_body = self.after_refused_upgrade;
            }
        }
        if ev.completed && matches!(self.state, ReadState::Stopped { .. }) {
            self.wake_reader();
        }
    }

    /// Whether our error response should go on the wire now: only where it answers exactly the
    /// offending request, never in the middle of or in place of a legitimate response.
    fn rejection_due(&self) -> bool {
        let RejectOut::Pending { at: Some(k), .. } = &self.reject else {
            return false;
        };
        if self.tracker.completed < *k {
            return false;
        }
        if self.swallow_from.is_some() {
            return true;
        }
        self.tracker.at_boundary() && !self.tracker.last_closes
    }

    fn start_rejection(&mut self) {
        if !self.rejection_due() {
            return;
        }
        if let RejectOut::Pending { rejection, .. } = &self.reject {
            let bytes = rejection.response_bytes();
            self.reject = RejectOut::Writing { bytes, pos: 0 };
        }
    }

    /// Writes what is left of the error response.
    fn poll_write_rejection(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let RejectOut::Writing { bytes, pos } = &mut self.reject {
            while let Some(rest) = bytes.get(*pos..).filter(|r| !r.is_empty()) {
                match Pin::new(&mut self.io).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => {
                        self.reject = RejectOut::Done;
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => *pos += n,
                    Poll::Ready(Err(e)) => {
                        self.reject = RejectOut::Done;
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let flushed = ready!(Pin::new(&mut self.io).poll_flush(cx));
            self.reject = RejectOut::Done;
            return Poll::Ready(flushed);
        }
        Poll::Ready(Ok(()))
    }

    /// Discards client input that has already arrived, so that closing the socket sends FIN
    /// rather than RST (a RST can make the client's kernel drop our response unread).
    fn drain_available(&mut self, cx: &mut Context<'_>) {
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_DRAIN {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => drained += rb.filled().len(),
                _ => break,
            }
        }
    }

    /// Reads more raw bytes from the client into `buf`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Reads into the buffer's spare capacity: zero-filling 8 KiB before every read showed
        // up as the gateway's largest single cost in profiles.
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for H1Guard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out > 0 {
                let n = this.out.min(dst.remaining());
                dst.put_slice(this.buf.get(..n).unwrap_or_default());
                this.buf.advance(n);
                this.out -= n;
                return Poll::Ready(Ok(()));
            }
            match this.state {
                ReadState::PassThrough => {
                    if !this.buf.is_empty() {
                        this.out = this.buf.len();
                        continue;
                    }
                    return Pin::new(&mut this.io).poll_read(cx, dst);
                }
                // hyper does not read the next request before it has answered this one, and
                // it answers without reading, so waiting here for the write side cannot
                // deadlock: hyper's write of the response wakes us.
                ReadState::AwaitUpgrade => {
                    this.read_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                ReadState::Stopped { eof_now } => {
                    if eof_now || this.client_eof || this.tracker.idle() {
                        return Poll::Ready(Ok(()));
                    }
                    // hyper is still answering an earlier request; EOF now would make it
                    // abort that response. A completed response wakes us.
                    this.read_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                _ => {}
            }
            if this.client_eof {
                return Poll::Ready(Ok(()));
            }
            // Body bytes need no look-ahead: with nothing buffered they go straight from the
            // socket into hyper's buffer without a copy through ours.
            if let ReadState::Fixed(n) = this.state
                && this.buf.is_empty()
            {
                let limit = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(dst.remaining());
                let mut sub = ReadBuf::new(dst.initialize_unfilled_to(limit));
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut sub))?;
                let k = sub.filled().len();
                if k == 0 {
                    this.client_eof = true;
                    return Poll::Ready(Ok(()));
                }
                dst.advance(k);
                let left = n.saturating_sub(k as u64);
                if left == 0 {
                    this.finish_message();
                } else {
                    this.state = ReadState::Fixed(left);
                }
                return Poll::Ready(Ok(()));
            }
            match this.step() {
                Step::Progress => {}
                Step::Reject {
                    rejection,
                    mid_body,
                } => this.on_violation(rejection, mid_body),
                Step::NeedMore => {
                    if ready!(this.poll_fill(cx))? == 0 {
                        // The client closed: an incomplete message is simply not passed on.
                        this.client_eof = true;
                        this.buf.truncate(this.out);
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for H1Guard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.tracking {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        if let Some(k) = this.swallow_from {
            // hyper's answer to the cut-off request (typically an error about its body) is
            // replaced by ours; earlier responses still go out in full.
            if this.tracker.completed >= k {
                this.observe(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            let mut probe = this.tracker.clone();
            let (keep, _) = probe.advance(buf, Some(k));
            let part = buf.get(..keep).unwrap_or(buf);
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, part))?;
            this.observe(buf.get(..n).unwrap_or_default());
            return Poll::Ready(Ok(n));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.observe(buf.get(..n).unwrap_or_default());
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.tracking || self.swallow_from.is_some() {
            if self.tracking {
                // Rare path: one slice at a time keeps the swallow boundary simple.
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]);
                return self.poll_write(cx, first);
            }
            return Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs);
        }
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.observe(b.get(..take).unwrap_or_default());
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.start_rejection();
        if matches!(this.reject, RejectOut::Writing { .. }) {
            ready!(this.poll_write_rejection(cx))?;
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.drain_available(cx);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: AsyncWrite + Unpin> Drop for H1Guard<IO> {
    /// hyper drops the connection without `poll_shutdown` when the service or the connection
    /// fails; a pending error response then gets one non-blocking attempt, which succeeds
    /// whenever the socket has room for a few hundred bytes.
    fn drop(&mut self) {
        let due = match &self.reject {
            RejectOut::Pending { at: Some(k), .. } => {
                self.tracker.completed >= *k
                    && (self.swallow_from.is_some()
                        || (self.tracker.at_boundary() && !self.tracker.last_closes))
            }
            RejectOut::Writing { .. } => true,
            _ => false,
        };
        if !due {
            return;
        }
        let (bytes, mut pos) = match std::mem::replace(&mut self.reject, RejectOut::Done) {
            RejectOut::Pending { rejection, .. } => (rejection.response_bytes(), 0),
            RejectOut::Writing { bytes, pos } => (bytes, pos),
            _ => return,
        };
        let mut cx = Context::from_waker(Waker::noop());
        while let Some(rest) = bytes.get(pos..).filter(|r| !r.is_empty()) {
            match Pin::new(&mut self.io).poll_write(&mut cx, rest) {
                Poll::Ready(Ok(n)) if n > 0 => pos += n,
                _ => return,
            }
        }
        let _ = Pin::new(&mut self.io).poll_flush(&mut cx);
        let _ = Pin::new(&mut self.io).poll_shutdown(&mut cx);
    }
}

fn chunk_error(message: &'static str) -> Step {
    Step::Reject {
        rejection: Rejection::bad(message),
        mid_body: true,
    }
}

/// Scans complete lines of a request head. Returns the head's length once its empty line is
/// found.
fn scan_head(
    data: &[u8],
    hs: &mut HeadScan,
    limits: &GuardLimits,
) -> Result<Option<usize>, Rejection> {
    loop {
        let Some(lf) =
            find_byte(data.get(hs.scan..).unwrap_or_default(), b'\n').map(|p| p + hs.scan)
        else {
            hs.scan = data.len();
            if data.len() > limits.max_header_bytes {
                if !hs.request_line_done
                    && partial_target_len(data.get(hs.line_start..).unwrap_or_default())
                        > limits.max_uri_length
                {
                    return Err(uri_too_long());
                }
                return Err(Rejection::too_large("request head too large"));
            }
            return Ok(None);
        };
        hs.scan = lf + 1;
        let line = data.get(hs.line_start..lf).unwrap_or_default();
        hs.line_start = lf + 1;
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(Rejection::bad("bare LF line ending in request head"));
        };
        if !hs.request_line_done {
            if !line.is_empty() {
                parse_request_line(line, hs, limits)?;
                hs.request_line_done = true;
            }
            // Empty lines before the request line are allowed (RFC 9112 section 2.2); hyper
            // skips them too.
        } else if line.is_empty() {
            if lf + 1 > limits.max_header_bytes {
                return Err(Rejection::too_large("request head too large"));
            }
            return Ok(Some(lf + 1));
        } else {
            hs.lines += 1;
            if hs.lines > limits.max_headers {
                return Err(Rejection::too_large("too many header fields"));
            }
            let (name, value) = parse_field_line(line)?;
            record_field(name, value, hs)?;
        }
        if lf + 1 > limits.max_header_bytes {
            return Err(Rejection::too_large("request head too large"));
        }
    }
}

/// Scans one trailer line; returns its length and whether it was the final empty line.
fn scan_trailer_line(
    data: &[u8],
    ts: &mut HeadScan,
    limits: &GuardLimits,
) -> Result<Option<(usize, bool)>, Rejection> {
    // `content_length` doubles as the running size of the trailer section.
    let total = ts.content_length.unwrap_or(0);
    let Some(lf) = find_byte(data.get(ts.scan..).unwrap_or_default(), b'\n').map(|p| p + ts.scan)
    else {
        if total.saturating_add(data.len() as u64) > limits.max_header_bytes as u64 {
            return Err(Rejection::too_large("trailer section too large"));
        }
        ts.scan = data.len();
        return Ok(None);
    };
    let total = total.saturating_add(lf as u64 + 1);
    if total > limits.max_header_bytes as u64 {
        return Err(Rejection::too_large("trailer section too large"));
    }
    ts.content_length = Some(total);
    let Some(line) = data.get(..lf).and_then(|l| l.strip_suffix(b"\r")) else {
        return Err(Rejection::bad("bare LF line ending in chunked trailer"));
    };
    if line.is_empty() {
        return Ok(Some((lf + 1, true)));
    }
    ts.lines += 1;
    if ts.lines > limits.max_headers {
        return Err(Rejection::too_large("too many trailer fields"));
    }
    let (name, _) = parse_field_line(line)?;
    if name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
    {
        return Err(Rejection::bad("framing header in chunked trailer"));
    }
    Ok(Some((lf + 1, false)))
}

fn uri_too_long() -> Rejection {
    Rejection {
        kind: ErrorKind::UriTooLong,
        message: "request target too long",
    }
}

/// Length of the (possibly incomplete) target in an incomplete request line.
fn partial_target_len(line: &[u8]) -> usize {
    let Some(sp) = find_byte(line, b' ') else {
        return 0;
    };
    let rest = line.get(sp + 1..).unwrap_or_default();
    find_byte(rest, b' ').unwrap_or(rest.len())
}

/// `method SP request-target SP HTTP-version`, exactly one space each.
fn parse_request_line(
    line: &[u8],
    hs: &mut HeadScan,
    limits: &GuardLimits,
) -> Result<(), Rejection> {
    let malformed = Rejection::bad("malformed request line");
    let sp1 = find_byte(line, b' ').ok_or(malformed)?;
    let method = line.get(..sp1).unwrap_or_default();
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Rejection::bad("invalid request method"));
    }
    let rest = line.get(sp1 + 1..).unwrap_or_default();
    let sp2 = find_byte(rest, b' ').ok_or(malformed)?;
    let target = rest.get(..sp2).unwrap_or_default();
    if target.len() > limits.max_uri_length {
        return Err(uri_too_long());
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(Rejection::bad("invalid request target"));
    }
    match rest.get(sp2 + 1..).unwrap_or_default() {
        b"HTTP/1.1" => {}
        b"HTTP/1.0" => hs.http10 = true,
        _ => return Err(Rejection::bad("unsupported HTTP version")),
    }
    hs.method_head = method == b"HEAD";
    hs.method_connect = method == b"CONNECT";
    Ok(())
}

/// `field-name ":" OWS field-value OWS`; returns the name and the value without leading OWS.
fn parse_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Rejection> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(Rejection::bad("obsolete line folding in header"));
    }
    let colon = find_byte(line, b':').ok_or(Rejection::bad("header line without colon"))?;
    let name = line.get(..colon).unwrap_or_default();
    if matches!(name.last(), Some(b' ' | b'\t')) {
        return Err(Rejection::bad("whitespace between header name and colon"));
    }
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Rejection::bad("invalid header name"));
    }
    let value = line.get(colon + 1..).unwrap_or_default();
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(Rejection::bad("invalid character in header value"));
    }
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    Ok((name, value.get(start..).unwrap_or_default()))
}

/// Records the header fields that decide framing and connection handling.
fn record_field(name: &[u8], value: &[u8], hs: &mut HeadScan) -> Result<(), Rejection> {
    if name.eq_ignore_ascii_case(b"content-length") {
        hs.content_length_count += 1;
        if hs.content_length_count > 1 {
            return Err(Rejection::bad("duplicate Content-Length"));
        }
        // Digits only, not even trailing whitespace: every other spelling is one some
        // upstream reads differently.
        if value.is_empty() || value.len() > 19 {
            return Err(Rejection::bad("invalid Content-Length"));
        }
        hs.content_length =
            Some(parse_decimal(value).ok_or(Rejection::bad("invalid Content-Length"))?);
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        hs.transfer_encoding_count += 1;
        if hs.transfer_encoding_count > 1 {
            return Err(Rejection::bad("duplicate Transfer-Encoding"));
        }
        if !trim_ows(value).eq_ignore_ascii_case(b"chunked") {
            return Err(Rejection::bad("unsupported Transfer-Encoding"));
        }
        hs.chunked = true;
    } else if name.eq_ignore_ascii_case(b"upgrade") {
        hs.upgrade = true;
    } else if name.eq_ignore_ascii_case(b"connection") {
        for token in value.split(|&b| b == b',').map(trim_ows) {
            if token.eq_ignore_ascii_case(b"close") {
                hs.conn_close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                hs.conn_keep_alive = true;
            }
        }
    }
    Ok(())
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`, at most 16 digits (the largest u64).
fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line
        .iter()
        .position(|&b| hex_value(b).is_none())
        .unwrap_or(line.len());
    if digits == 0 {
        return Err("invalid chunk size");
    }
    if digits > 16 {
        return Err("chunk size overflow");
    }
    let mut size: u64 = 0;
    for &b in line.get(..digits).unwrap_or_default() {
        size = (size << 4) | u64::from(hex_value(b).unwrap_or(0));
    }
    let rest = line.get(digits..).unwrap_or_default();
    let ext = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map(|p| rest.get(p..).unwrap_or_default());
    match ext {
        None if rest.is_empty() => Ok(size),
        Some(ext)
            if ext.first() == Some(&b';')
                && ext
                    .iter()
                    .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80) =>
        {
            Ok(size)
        }
        _ => Err("invalid chunk size"),
    }
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |p| p + 1);
    v.get(start..end).unwrap_or_default()
}

fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

fn find_crlfcrlf(hay: &[u8]) -> Option<usize> {
    hay.windows(4).position(|w| w == b"\r\n\r\n")
}

/// How many bytes of `rest` complete a head whose first bytes (without its end) are `head`.
fn head_end_in(head: &[u8], rest: &[u8]) -> Option<usize> {
    // An end spanning the two pieces: at most 3 bytes of each side.
    let tail = head.get(head.len().saturating_sub(3)..).unwrap_or_default();
    let front = rest.get(..rest.len().min(3)).unwrap_or(rest);
    let mut window = [0u8; 6];
    let mut len = 0;
    for (slot, &b) in window.iter_mut().zip(tail.iter().chain(front)) {
        *slot = b;
        len += 1;
    }
    if let Some(q) = find_crlfcrlf(window.get(..len).unwrap_or_default()) {
        return Some(q + 4 - tail.len());
    }
    find_crlfcrlf(rest).map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// What the test upstream saw.
    #[derive(Clone, Default)]
    struct Seen {
        count: Arc<AtomicUsize>,
        paths: Arc<Mutex<Vec<String>>>,
    }

    impl Seen {
        fn count(&self) -> usize {
            self.count.load(Ordering::SeqCst)
        }
        fn paths(&self) -> Vec<String> {
            self.paths.lock().unwrap().clone()
        }
    }

    async fn handle(
        mut req: Request<Incoming>,
        seen: Seen,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        seen.count.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_owned();
        seen.paths.lock().unwrap().push(path.clone());
        if path == "/upgrade" {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let resp = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "echo")
                .header("connection", "upgrade")
                .body(Full::new(Bytes::new()))
                .unwrap();
            return Ok(resp);
        }
        if path == "/upgrade-refused" {
            return Ok(Response::new(Full::new(Bytes::from_static(b"no upgrade"))));
        }
        if path == "/slow" {
            // Still working when the next (bad) pipelined request is found.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let method = req.method().clone();
        match req.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                let text = format!("{method} {path} {}", body.len());
                Ok(Response::new(Full::new(Bytes::from(text))))
            }
            Err(e) if path == "/fail" => Err(e),
            Err(_) => {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"body error")));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                Ok(resp)
            }
        }
    }

    fn limits() -> GuardLimits {
        GuardLimits {
            max_header_bytes: 4096,
            max_headers: 20,
            max_uri_length: 256,
        }
    }

    /// An HTTP/1 server behind the guard; `auto` serves h1 and h2c on one port.
    async fn serve_with(auto: bool) -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let io = TokioIo::new(H1Guard::new(stream, limits()));
                    let svc = service_fn(move |req| handle(req, seen.clone()));
                    if auto {
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        let _ = builder.serve_connection_with_upgrades(io, svc).await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        (addr, seen)
    }

    async fn serve() -> (SocketAddr, Seen) {
        serve_with(false).await
    }

    /// Sends raw bytes and reads everything until the server closes.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("server did not close the connection")
            .expect("read failed");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Splits a reply stream into (status, body) pairs; every test response has a
    /// content-length.
    fn responses(reply: &str) -> Vec<(u16, String)> {
        responses_with_head(reply, None)
    }

    /// Like [`responses`]; the response at index `head` answers a HEAD request (no body).
    fn responses_with_head(mut reply: &str, head_idx: Option<usize>) -> Vec<(u16, String)> {
        let mut out = Vec::new();
        while !reply.is_empty() {
            let head_end = reply.find("\r\n\r\n").expect("incomplete head") + 4;
            let head = &reply[..head_end];
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let len = if head_idx == Some(out.len()) { 0 } else { len };
            out.push((status, reply[head_end..head_end + len].to_owned()));
            reply = &reply[head_end + len..];
        }
        out
    }

    /// Asserts the reply ends with the guard's JSON error and returns the earlier responses.
    fn assert_rejected(reply: &str, status: u16, code: &str) -> Vec<(u16, String)> {
        let mut all = responses(reply);
        let (last_status, body) = all.pop().expect("no response at all");
        assert_eq!(last_status, status, "reply was {reply:?}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], code);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        let rid = v["error"]["request_id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(rid).is_ok());
        assert!(reply.contains("connection: close"));
        all
    }

    async fn assert_bad(raw: &[u8]) -> Seen {
        let (addr, seen) = serve().await;
        let reply = exchange(addr, raw).await;
        let earlier = assert_rejected(&reply, 400, "bad_request");
        assert!(
            earlier.is_empty(),
            "unexpected responses before the 400: {reply:?}"
        );
        assert_eq!(seen.count(), 0, "upstream saw {:?}", seen.paths());
        seen
    }

    #[tokio::test]
    async fn cl_then_te_is_rejected() {
        assert_bad(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
    }

    #[tokio::test]
    async fn te_then_cl_with_smuggled_request_is_rejected() {
        let seen = assert_bad(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n\
              0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        assert!(!seen.paths().iter().any(|p| p == "/smuggled"));
    }

    #[tokio::test]
    async fn legit_request_then_smuggling_attempt() {
        let (addr, seen) = serve().await;
        let reply = exchange(
            addr,
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n\
              POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        let earlier = assert_rejected(&reply, 400, "bad_request");
        assert_eq!(earlier, vec![(200, "GET /first 0".to_owned())]);
        assert_eq!(seen.paths(), vec!["/first".to_owned()]);
    }

    #[tokio::test]
    async fn duplicate_content_length_is_rejected() {
        assert_bad(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_bad(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        )
        .await;
    }

    #[tokio::test]
    async fn malformed_content_length_is_rejected() {
        for v in [
            "+5",
            "5 ",
            "0x5",
            "5, 5",
            "-5",
            "",
            "5a",
            "99999999999999999999",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\nhello");
            assert_bad(raw.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn obfuscated_transfer_encoding_is_rejected() {
        for v in [
            "xchunked",
            "chunked, identity",
            "identity",
            "gzip, chunked",
            "chunked\x0b",
            "chunk",
            "\"chunked\"",
        ] {
            let raw =
                format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n0\r\n\r\n");
            assert_bad(raw.as_bytes()).await;
        }
        assert_bad(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n")
            .await;
        assert_bad(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
    }

    #[tokio::test]
    async fn transfer_encoding_case_and_whitespace_are_fine() {
        let (addr, seen) = serve().await;
        let reply = exchange(
            addr,
            b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  ChUnKeD \t\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
              GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            responses(&reply),
            vec![(200, "POST /a 3".to_owned()), (200, "GET /b 0".to_owned())]
        );
        assert_eq!(seen.count(), 2);
    }

    #[tokio::test]
    async fn transfer_encoding_in_http10_is_rejected() {
        assert_bad(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await;
    }

    #[tokio::test]
    async fn bare_lf_is_rejected() {
        assert_bad(b"GET / HTTP/1.1\nHost: a\r\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost: a\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost: a\r\n\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n").await;
    }

    #[tokio::test]
    async fn obs_fold_and_space_before_colon_are_rejected() {
        assert_bad(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n").await;
    }

    #[tokio::test]
    async fn malformed_request_line_is_rejected() {
        assert_bad(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_bad(b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n").await;
        assert_bad(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n").await;
        assert_bad(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    }

    /// A chunked body that goes wrong after its head reached the upstream: the upstream saw the
    /// request (its head is legitimate) but its answer is replaced by the guard's 400.
    async fn assert_bad_chunks(body: &[u8]) {
        let (addr, seen) = serve().await;
        let mut raw = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        raw.extend_from_slice(body);
        raw.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
        let reply = exchange(addr, &raw).await;
        let earlier = assert_rejected(&reply, 400, "bad_request");
        assert!(earlier.is_empty(), "reply was {reply:?}");
        assert!(!seen.paths().iter().any(|p| p == "/smuggled"));
        assert!(seen.count() <= 1);
    }

    #[tokio::test]
    async fn bad_chunk_framing_is_rejected() {
        for body in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"+3\r\nabc\r\n0\r\n\r\n",
            b"-3\r\nabc\r\n0\r\n\r\n",
            b" 3\r\nabc\r\n0\r\n\r\n",
            b"3 \r\nabc\r\n0\r\n\r\n",
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\n\r\n",
            b"3\r\nabc\r\n0\r\n\n",
            b"10000000000000000\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-T : 1\r\n\r\n",
        ] {
            assert_bad_chunks(body).await;
        }
    }

    #[tokio::test]
    async fn pipelined_keep_alive_requests_pass() {
        let (addr, seen) = serve().await;
        let reply = exchange(
            addr,
            b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
              POST /two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;name=value;x\r\nabc\r\nA\r\n0123456789\r\n0;last\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n\
              \r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n\
              HEAD /four HTTP/1.1\r\nHost: a\r\n\r\n\
              GET /five HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let all = responses_with_head(&reply, Some(3));
        assert_eq!(all.len(), 5, "reply was {reply:?}");
        assert_eq!(all[0], (200, "POST /one 5".to_owned()));
        assert_eq!(all[1], (200, "POST /two 13".to_owned()));
        assert_eq!(all[2], (200, "GET /three 0".to_owned()));
        assert_eq!(all[3], (200, String::new()));
        assert_eq!(all[4], (200, "GET /five 0".to_owned()));
        assert_eq!(seen.count(), 5);
    }

    #[tokio::test]
    async fn body_bytes_are_not_parsed_as_http() {
        let (addr, seen) = serve().await;
        let body = b"line\nGET / HTTP/1.1\n\nContent-Length: 0\r\nTransfer-Encoding: chunked\n";
        let mut raw = format!(
            "POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        raw.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let reply = exchange(addr, &raw).await;
        assert_eq!(
            responses(&reply),
            vec![
                (200, format!("POST /body {}", body.len())),
                (200, "GET /after 0".to_owned())
            ]
        );
        assert_eq!(seen.paths(), vec!["/body".to_owned(), "/after".to_owned()]);
    }

    #[tokio::test]
    async fn too_many_headers_is_431() {
        let (addr, seen) = serve().await;
        let mut raw = "GET / HTTP/1.1\r\nHost: a\r\n".to_owned();
        for i in 0..30 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let reply = exchange(addr, raw.as_bytes()).await;
        assert_rejected(&reply, 431, "headers_too_large");
        assert_eq!(seen.count(), 0);
    }

    #[tokio::test]
    async fn too_large_head_is_431() {
        let (addr, seen) = serve().await;
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "b".repeat(5000)
        );
        let reply = exchange(addr, raw.as_bytes()).await;
        assert_rejected(&reply, 431, "headers_too_large");
        // Also when the head never ends.
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}", "b".repeat(5000));
        let reply = exchange(addr, raw.as_bytes()).await;
        assert_rejected(&reply, 431, "headers_too_large");
        assert_eq!(seen.count(), 0);
    }

    #[tokio::test]
    async fn long_target_is_414() {
        let (addr, seen) = serve().await;
        let raw = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(300));
        let reply = exchange(addr, raw.as_bytes()).await;
        assert_rejected(&reply, 414, "uri_too_long");
        let raw = format!("GET /{}", "a".repeat(5000));
        let reply = exchange(addr, raw.as_bytes()).await;
        assert_rejected(&reply, 414, "uri_too_long");
        assert_eq!(seen.count(), 0);
    }

    #[tokio::test]
    async fn h2_prior_knowledge_passes_through() {
        let (addr, seen) = serve_with(true).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            let req = Request::builder()
                .uri(format!("http://{addr}/h2"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"GET /h2 0");
        }
        assert_eq!(seen.count(), 2);
    }

    #[tokio::test]
    async fn auto_builder_still_guards_http1() {
        let (addr, seen) = serve_with(true).await;
        let reply = exchange(
            addr,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
        assert_rejected(&reply, 400, "bad_request");
        assert_eq!(seen.count(), 0);
    }

    async fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn upgrade_switches_to_pass_through() {
        let (addr, seen) = serve().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Raw bytes right behind the upgrade request: not HTTP, and must not be judged as such.
        s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nraw\n\x00bytes")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut buf = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"raw\n\x00bytes");
        s.write_all(b"GET / HTTP/1.1\nbare LF is fine now")
            .await
            .unwrap();
        let mut buf = [0u8; 34];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\nbare LF is fine now");
        assert_eq!(seen.count(), 1);
    }

    #[tokio::test]
    async fn refused_upgrade_keeps_validating() {
        let (addr, seen) = serve().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /upgrade-refused HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0u8; 10];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"no upgrade");
        // The connection is HTTP/1 still: a good request is served, a bad one refused.
        s.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0u8; 11];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"GET /next 0");
        s.write_all(b"GET /bad HTTP/1.1\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_rejected(&String::from_utf8_lossy(&out), 400, "bad_request");
        assert_eq!(
            seen.paths(),
            vec!["/upgrade-refused".to_owned(), "/next".to_owned()]
        );
    }

    /// The answer to an upgrade request can come before its body is through; the guard must
    /// not then wait for an answer that already went out.
    #[tokio::test]
    async fn upgrade_refused_before_body_is_read() {
        let (addr, seen) = serve().await;
        // The test service answers /upgrade-refused without reading the body; hyper then
        // drains the (already buffered) body and goes on with the next request.
        let reply = exchange(
            addr,
            b"POST /upgrade-refused HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: upgrade\r\n\
              Content-Length: 5\r\n\r\nhello\
              GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            responses(&reply),
            vec![
                (200, "no upgrade".to_owned()),
                (200, "GET /next 0".to_owned())
            ]
        );
        assert_eq!(seen.count(), 2);
    }

    #[test]
    fn response_head_end_across_writes() {
        assert_eq!(head_end_in(b"", b"HTTP/1.1 200 OK\r\n\r\nbody"), Some(19));
        assert_eq!(head_end_in(b"HTTP/1.1 200 OK\r\n", b"\r\nbody"), Some(2));
        assert_eq!(head_end_in(b"HTTP/1.1 200 OK\r\n\r", b"\nbody"), Some(1));
        assert_eq!(head_end_in(b"HTTP/1.1 200 OK\r", b"\n\r\n"), Some(3));
        assert_eq!(
            head_end_in(b"HTTP/1.1 200 OK\r", b"\nx: y\r\n\r\nb"),
            Some(9)
        );
        assert_eq!(head_end_in(b"HTTP/1.1 200 OK", b"\r\nx"), None);
    }

    #[tokio::test]
    async fn bytes_trickled_one_at_a_time() {
        let (addr, seen) = serve().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let raw = b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2;e\r\nab\r\n0\r\nX: y\r\n\r\n\
                    GET /u HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        for b in raw {
            s.write_all(&[*b]).await.unwrap();
            s.flush().await.unwrap();
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let earlier = assert_rejected(&String::from_utf8_lossy(&out), 400, "bad_request");
        assert_eq!(earlier, vec![(200, "POST /t 2".to_owned())]);
        assert_eq!(seen.count(), 1);
    }

    /// Records whether hyper called `poll_shutdown` on the stream.
    struct ShutdownSpy {
        inner: TcpStream,
        called: Arc<AtomicUsize>,
    }

    impl AsyncRead for ShutdownSpy {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for ShutdownSpy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.called.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// One connection served by plain hyper http1 over the spy; returns the reply and whether
    /// hyper called `poll_shutdown`.
    async fn exchange_spied(raw: &[u8]) -> (String, bool, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let called = Arc::new(AtomicUsize::new(0));
        let (seen2, called2) = (seen.clone(), called.clone());
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let spy = ShutdownSpy {
                inner: stream,
                called: called2,
            };
            let io = TokioIo::new(H1Guard::new(spy, limits()));
            let svc = service_fn(move |req| handle(req, seen2.clone()));
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
                .is_ok()
        });
        let reply = exchange(addr, raw).await;
        let _ = server.await;
        (reply, called.load(Ordering::SeqCst) > 0, seen)
    }

    /// hyper 1 answers read EOF on an idle connection by shutting down (it calls
    /// `poll_shutdown`), so the error response goes out there.
    #[tokio::test]
    async fn idle_eof_makes_hyper_call_shutdown() {
        let (reply, shutdown, seen) =
            exchange_spied(b"GET / HTTP/1.1\r\nHost: a\r\nHost : b\r\n\r\n").await;
        assert_rejected(&reply, 400, "bad_request");
        assert!(shutdown);
        assert_eq!(seen.count(), 0);
    }

    /// A body cut off by a violation fails the service's body stream; when the service then
    /// fails too, the client still gets the guard's 400 (hyper 1.12 still calls
    /// `poll_shutdown` here).
    #[tokio::test]
    async fn failed_service_still_gets_400() {
        let (reply, shutdown, seen) = exchange_spied(
            b"POST /fail HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
        )
        .await;
        assert_rejected(&reply, 400, "bad_request");
        assert!(shutdown);
        assert_eq!(seen.paths(), vec!["/fail".to_owned()]);
    }

    /// hyper polls the socket while the service works and treats EOF there as an aborted
    /// request; the guard must hold EOF back until the earlier response is out.
    #[tokio::test]
    async fn slow_earlier_response_is_not_aborted() {
        let (addr, seen) = serve().await;
        let reply = exchange(
            addr,
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        )
        .await;
        let earlier = assert_rejected(&reply, 400, "bad_request");
        assert_eq!(earlier, vec![(200, "GET /slow 0".to_owned())]);
        assert_eq!(seen.paths(), vec!["/slow".to_owned()]);
    }

    /// A service that answers before reading a body which then turns out malformed: its
    /// response already started, so the guard adds nothing and just closes.
    #[tokio::test]
    async fn chunk_error_after_response_started_adds_nothing() {
        let (addr, seen) = serve().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /upgrade-refused HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"3\r\nabc\r\nzz\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "no upgrade");
        assert_eq!(seen.count(), 1);
    }

    /// Whoever drops the connection without shutting it down (an aborted connection task),
    /// the pending error response still goes out from `Drop`.
    #[tokio::test]
    async fn drop_without_shutdown_writes_rejection() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut guard = H1Guard::new(server, limits());
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx")
            .await
            .unwrap();
        let mut sink = Vec::new();
        guard.read_to_end(&mut sink).await.unwrap();
        assert!(sink.is_empty());
        drop(guard);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert_rejected(&String::from_utf8_lossy(&out), 400, "bad_request");
    }

    #[test]
    fn guard_is_send_and_unpin() {
        fn check<T: Send + Unpin + 'static>() {}
        check::<H1Guard<TcpStream>>();
        check::<H1Guard<tokio_rustls::server::TlsStream<TcpStream>>>();
    }

    /// The response tracker follows hyper's output; arbitrary bytes in arbitrary splits must
    /// not panic it either.
    #[test]
    fn tracker_survives_random_output() {
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = b"HTTP/1.1 200 101 204\r\n: content-length5transfer-encoding chunkedconnection close0aZ";
        for _ in 0..500 {
            let mut t = RespTracker::default();
            for _ in 0..rng.usize(0..4) {
                t.push(ReqKind {
                    head: rng.bool(),
                    connect: rng.bool(),
                    upgrade: rng.bool(),
                });
            }
            let data: Vec<u8> = (0..rng.usize(0..300))
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            for piece in data.chunks(rng.usize(1..20)) {
                let stop = rng.bool().then(|| rng.u64(0..3));
                let (n, _) = t.advance(piece, stop);
                assert!(n <= piece.len());
            }
        }
        // And a real pipelined sequence is followed exactly.
        let mut t = RespTracker::default();
        t.push(ReqKind::default());
        t.push(ReqKind {
            head: true,
            ..ReqKind::default()
        });
        t.push(ReqKind::default());
        let out = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc\
                    HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n\
                    HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx: y\r\n\r\n";
        for b in out.chunks(1) {
            t.advance(b, None);
        }
        assert_eq!(t.completed, 3);
        assert!(t.idle());
    }

    #[test]
    fn chunk_size_parsing() {
        assert_eq!(parse_chunk_size(b"0"), Ok(0));
        assert_eq!(parse_chunk_size(b"fF"), Ok(255));
        assert_eq!(parse_chunk_size(b"a ; x=\"y\""), Ok(10));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Ok(u64::MAX));
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"1 ").is_err());
        assert!(parse_chunk_size(b"0x1").is_err());
        assert!(parse_chunk_size(b"1;\x01").is_err());
    }

    /// Arbitrary input in arbitrary splits never panics and never lets bytes past a violation.
    #[tokio::test]
    async fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = b"GET /HTTP1.0\r\n:; chunkedContent-LengthTransfer-Encoding05aF\t\x0b\x00";
        for _ in 0..300 {
            let len = rng.usize(0..400);
            let data: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let (client, server) = tokio::io::duplex(64);
            let mut guard = H1Guard::new(server, limits());
            let writer = tokio::spawn(async move {
                let mut client = client;
                for piece in data.chunks(7) {
                    if client.write_all(piece).await.is_err() {
                        break;
                    }
                }
                drop(client);
            });
            let mut sink = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), guard.read_to_end(&mut sink)).await;
            writer.abort();
        }
    }
}
