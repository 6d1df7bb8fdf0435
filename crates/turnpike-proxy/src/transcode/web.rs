//! `grpc_web`: gRPC-Web requests (browsers cannot send HTTP/2 trailers) sent to a gRPC
//! upstream as gRPC, and the answer sent back as gRPC-Web: messages as they come, the
//! trailers as a final frame flagged `0x80`. The text form (`grpc-web-text`) is base64 both
//! ways.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use turnpike_model::grpc::GrpcWebConfig;

use crate::body::{BoxError, ProxyBody};
use crate::error::{ErrorKind, GatewayError};
use crate::policy::inspect::ReqBody;

/// A compiled `grpc_web`.
pub struct GrpcWeb {
    max_text: u64,
}

/// The gRPC-Web form a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web` or `application/grpc-web+proto`.
    Binary,
    /// `application/grpc-web-text` (base64).
    Text,
}

impl Mode {
    /// The request's gRPC-Web form, if it is one.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let ct = ct.split(';').next().unwrap_or("").trim();
        // Only protobuf messages: `+json` would reach the upstream labelled as protobuf.
        match ct {
            "application/grpc-web-text" | "application/grpc-web-text+proto" => Some(Self::Text),
            "application/grpc-web" | "application/grpc-web+proto" => Some(Self::Binary),
            _ => None,
        }
    }

    /// The content type answers in this form carry.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Binary => "application/grpc-web+proto",
            Self::Text => "application/grpc-web-text+proto",
        }
    }
}

impl GrpcWeb {
    /// Compiles the policy.
    pub fn new(c: &GrpcWebConfig) -> Self {
        Self {
            max_text: c.max_text_bytes,
        }
    }

    /// Rewrites a gRPC-Web request as gRPC. A binary body streams as it is (the framing is
    /// the same); a text body is read (within `max_text_bytes`) and decoded.
    pub async fn request(
        &self,
        mode: Mode,
        parts: &mut Parts,
        body: ReqBody,
        read: &crate::transform::BodyRead,
    ) -> Result<ReqBody, GatewayError> {
        let body = match mode {
            Mode::Binary => body,
            Mode::Text => {
                let text = crate::policy::inspect::read_whole(
                    body,
                    self.max_text.min(read.limit),
                    parts,
                    read,
                    "grpc_web decodes",
                )
                .await?;
                let raw = decode_chunks(&text).ok_or_else(|| {
                    GatewayError::new(
                        ErrorKind::BadRequest,
                        "the grpc-web-text body is not base64",
                    )
                })?;
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
                ReqBody::Buffered(raw)
            }
        };
        let h = &mut parts.headers;
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.remove("x-grpc-web");
        h.remove(header::ACCEPT);
        Ok(body)
    }
}

/// Decodes base64 that may be several padded pieces one after another (clients may encode
/// each write on its own).
fn decode_chunks(text: &[u8]) -> Option<Bytes> {
    let e = base64::engine::general_purpose::STANDARD;
    let text: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut start = 0;
    while start < text.len() {
        // A piece ends after its padding, or at the end.
        let mut end = start;
        while end < text.len() && text[end] != b'=' {
            end += 1;
        }
        while end < text.len() && text[end] == b'=' {
            end += 1;
        }
        e.decode_vec(&text[start..end], &mut out).ok()?;
        start = end;
    }
    Some(out.into())
}

/// Turns the upstream's gRPC answer into gRPC-Web for a client that asked in `mode`.
pub fn response(resp: Response<ProxyBody>, mode: Mode) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if !grpc {
        // Not a gRPC answer (a proxy in between, an error page): passed as it is.
        return Response::from_parts(parts, body);
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(mode.content_type()),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRAILER);
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only: the status is in the headers, as gRPC-Web has it too.
        return Response::from_parts(parts, body);
    }
    let state = WebState {
        body,
        mode,
        carry: BytesMut::new(),
        done: false,
    };
    Response::from_parts(parts, super::chunked(state))
}

struct WebState {
    body: ProxyBody,
    mode: Mode,
    /// Text mode: bytes not yet encoded (fewer than 3), so padding comes only at the end.
    carry: BytesMut,
    done: bool,
}

impl super::Chunks for WebState {
    fn done(&self) -> bool {
        self.done
    }

    async fn next_chunk(&mut self) -> Result<Bytes, BoxError> {
        loop {
            match self.body.frame().await {
                None => {
                    // No trailers: the upstream ended without a status.
                    let mut h = HeaderMap::new();
                    h.insert("grpc-status", HeaderValue::from_static("13"));
                    h.insert(
                        "grpc-message",
                        HeaderValue::from_static("upstream ended without a status"),
                    );
                    self.done = true;
                    return Ok(self.encode(trailer_frame(&h), true));
                }
                Some(Err(e)) => {
                    // Cut short (the read timeout, a reset): a status the client can read.
                    let mut h = HeaderMap::new();
                    h.insert("grpc-status", HeaderValue::from_static("14"));
                    let msg = format!("upstream stream failed: {e}");
                    if let Ok(v) = HeaderValue::from_str(&crate::error::grpc_percent_encode(&msg)) {
                        h.insert("grpc-message", v);
                    }
                    self.done = true;
                    return Ok(self.encode(trailer_frame(&h), true));
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => return Ok(self.encode(d, false)),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.done = true;
                            return Ok(self.encode(trailer_frame(&t), true));
                        }
                    }
                },
            }
        }
    }
}

impl WebState {
    fn encode(&mut self, data: Bytes, last: bool) -> Bytes {
        if self.mode == Mode::Binary {
            return data;
        }
        self.carry.extend_from_slice(&data);
        let whole = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        let chunk = self.carry.split_to(whole);
        base64::engine::general_purpose::STANDARD
            .encode(&chunk)
            .into_bytes()
            .into()
    }
}

/// The trailers as a gRPC-Web frame: flag `0x80`, length, then `name: value\r\n` lines.
fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (k, v) in trailers {
        block.extend_from_slice(k.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(v.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut out = BytesMut::with_capacity(5 + block.len());
    out.put_u8(0x80);
    out.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(&block);
    out.freeze()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn modes_come_from_the_content_type() {
        let h = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            Mode::of(&h)
        };
        assert_eq!(h("application/grpc-web"), Some(Mode::Binary));
        assert_eq!(h("application/grpc-web+proto"), Some(Mode::Binary));
        assert_eq!(h("application/grpc-web-text"), Some(Mode::Text));
        assert_eq!(h("application/grpc-web-text+proto"), Some(Mode::Text));
        assert_eq!(h("application/grpc"), None);
        assert_eq!(h("application/grpc-webx"), None);
    }

    #[test]
    fn padded_pieces_decode_one_after_another() {
        assert_eq!(decode_chunks(b"YQ==YmM=").unwrap().as_ref(), b"abc");
        assert_eq!(decode_chunks(b"YWJj").unwrap().as_ref(), b"abc");
        assert!(decode_chunks(b"!!!").is_none());
    }

    #[test]
    fn trailers_are_framed() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        let f = trailer_frame(&h);
        assert_eq!(f[0], 0x80);
        assert_eq!(&f[5..], b"grpc-status: 0\r\n");
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
    }
}
