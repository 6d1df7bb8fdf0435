//! Response compression (`compression`): gzip, Brotli or zstd, the best the client accepts,
//! streamed through the encoder as the upstream sends.
//!
//! A response is left alone when it is already encoded, says `Cache-Control: no-transform`,
//! has no body (1xx, 204), is a range (206), an event stream or gRPC, is of a type not
//! listed, or declares a length under `min_bytes`. A HEAD answer gets the headers its GET
//! would, and a 304 the weak `ETag` and `Vary` of the compressed answer it confirms. When the type qualifies the
//! answer gets `Vary: Accept-Encoding`, compressed or not, so a shared cache keeps the
//! variants apart. A compressed answer loses `Content-Length` and `Accept-Ranges`, and a
//! strong `ETag` becomes weak: the bytes differ, the content does not.

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use turnpike_model::policy::{Algorithm, CompressionConfig, CompressionLevel};

use crate::body::{BoxError, ProxyBody};

/// A compiled `compression` policy.
pub struct Compression {
    cfg: CompressionConfig,
}

impl Compression {
    /// Compiles `cfg` (checked when it was parsed).
    pub fn new(cfg: CompressionConfig) -> Self {
        Self { cfg }
    }

    /// Whether `content_type` is one of the listed media types.
    fn compressible(&self, content_type: &str) -> bool {
        let media = super::media_type(content_type);
        if media == "text/event-stream" || media.starts_with("application/grpc") {
            return false;
        }
        let Some((ty, sub)) = media.split_once('/') else {
            return false;
        };
        self.cfg.content_types.iter().any(|pattern| {
            let Some((pty, psub)) = pattern.split_once('/') else {
                return false;
            };
            if !pty.eq_ignore_ascii_case(ty) {
                return false;
            }
            if psub == "*" {
                return true;
            }
            // `*+json` matches every `+json` suffix type.
            match psub.strip_prefix('*') {
                Some(suffix) => sub.ends_with(&suffix.to_ascii_lowercase()),
                None => psub.eq_ignore_ascii_case(sub),
            }
        })
    }

    /// The algorithm to use for a client sending `accept`, if any.
    pub fn negotiate(&self, accept: Option<&HeaderValue>) -> Option<Algorithm> {
        let accept = accept?.to_str().ok()?;
        let mut best: Option<(Algorithm, u16)> = None;
        for alg in &self.cfg.algorithms {
            let q = quality(accept, alg.token());
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((*alg, q));
            }
        }
        best.map(|(a, _)| a)
    }

    /// Compresses `resp` when it qualifies (see the module docs).
    pub fn apply(
        &self,
        mut resp: Response<ProxyBody>,
        accept: Option<&HeaderValue>,
        method: &Method,
    ) -> Response<ProxyBody> {
        let status = resp.status();
        let h = resp.headers();
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::PARTIAL_CONTENT
            || h.get(header::CONTENT_ENCODING)
                .is_some_and(|v| v.as_bytes() != b"identity")
            || no_transform(h)
        {
            return resp;
        }
        let content_type = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if status == StatusCode::NOT_MODIFIED {
            // A 304 carries what the 200 would: the weak validator and `Vary` of a
            // compressed answer (its type is often not repeated; then a negotiable client
            // is enough to tell).
            if content_type.is_none_or(|t| self.compressible(t)) && self.negotiate(accept).is_some()
            {
                resp.headers_mut()
                    .append(header::VARY, HeaderValue::from_static("accept-encoding"));
                weaken_etag(resp.headers_mut());
            }
            return resp;
        }
        if !content_type.is_some_and(|t| self.compressible(t)) {
            return resp;
        }
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
        let small = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n < self.cfg.min_bytes);
        let Some(alg) = (!small).then(|| self.negotiate(accept)).flatten() else {
            return resp;
        };
        let (mut parts, body) = resp.into_parts();
        let h = &mut parts.headers;
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::ACCEPT_RANGES);
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(alg.token()),
        );
        weaken_etag(h);
        // A HEAD answer gets the headers the GET would have, and no body.
        if *method == Method::HEAD {
            return Response::from_parts(parts, body);
        }
        Response::from_parts(parts, encode(body, alg, self.cfg.level))
    }
}

/// `"x"` → `W/"x"`: the compressed bytes differ, the content does not.
fn weaken_etag(h: &mut HeaderMap) {
    if let Some(etag) = h.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
        && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat())
    {
        h.insert(header::ETAG, weak);
    }
}

fn no_transform(h: &HeaderMap) -> bool {
    h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// The q-value (in thousandths) `accept` gives `token`: its own entry, else `*`'s, else 0.
fn quality(accept: &str, token: &str) -> u16 {
    let mut star = None;
    for item in accept.split(',') {
        let mut params = item.split(';');
        let name = params.next().unwrap_or("").trim();
        let q = params
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .next()
            .map_or(1000, parse_q);
        if name.eq_ignore_ascii_case(token) {
            return q;
        }
        if name == "*" {
            star = Some(q);
        }
    }
    star.unwrap_or(0)
}

/// `0.5` → 500; anything malformed → 0 (RFC 9110 §12.4.2 allows three decimals).
fn parse_q(s: &str) -> u16 {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let thousandths = format!("{frac:0<3}").parse::<u16>().unwrap_or(0);
    match int {
        "0" => thousandths,
        "1" if thousandths == 0 => 1000,
        _ => 0,
    }
}

fn level(alg: Algorithm, level: CompressionLevel) -> Level {
    let n = match (level, alg) {
        (CompressionLevel::Fastest, _) => 1,
        (CompressionLevel::Default, Algorithm::Gzip) => 6,
        (CompressionLevel::Default, Algorithm::Br) => 4,
        (CompressionLevel::Default, Algorithm::Zstd) => 3,
        (CompressionLevel::Best, Algorithm::Gzip) => 9,
        (CompressionLevel::Best, Algorithm::Br) => 11,
        (CompressionLevel::Best, Algorithm::Zstd) => 19,
    };
    Level::Precise(n)
}

/// The body compressed as it streams. Trailers are dropped (no compressible type has them).
fn encode(body: ProxyBody, alg: Algorithm, lvl: CompressionLevel) -> ProxyBody {
    let input =
        tokio_util::io::StreamReader::new(BodyDataStream::new(body).map_err(std::io::Error::other));
    let level = level(alg, lvl);
    match alg {
        Algorithm::Gzip => frames(GzipEncoder::with_quality(input, level)),
        Algorithm::Br => frames(BrotliEncoder::with_quality(input, level)),
        Algorithm::Zstd => frames(ZstdEncoder::with_quality(input, level)),
    }
}

fn frames<R: tokio::io::AsyncRead + Send + 'static>(encoder: R) -> ProxyBody {
    let stream = tokio_util::io::ReaderStream::new(encoder)
        .map_ok(http_body::Frame::data)
        .map_err(BoxError::from);
    StreamBody::new(stream).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values_choose_the_algorithm() {
        let c = Compression::new(CompressionConfig::default());
        let n = |s: &str| c.negotiate(Some(&HeaderValue::from_str(s).unwrap()));
        assert_eq!(n("gzip, deflate, br, zstd"), Some(Algorithm::Zstd));
        assert_eq!(n("gzip, br"), Some(Algorithm::Br));
        assert_eq!(n("gzip"), Some(Algorithm::Gzip));
        assert_eq!(n("br;q=0.5, gzip;q=0.8"), Some(Algorithm::Gzip));
        assert_eq!(n("br;q=0, zstd;q=0, gzip;q=0"), None);
        assert_eq!(n("*"), Some(Algorithm::Zstd));
        assert_eq!(n("*;q=0.1, br;q=0.2"), Some(Algorithm::Br));
        assert_eq!(n("identity"), None);
        assert_eq!(n("gzip;q=2"), None, "a malformed q-value refuses");
        assert_eq!(c.negotiate(None), None);
        assert_eq!(parse_q("0.125"), 125);
        assert_eq!(parse_q("1.000"), 1000);
        assert_eq!(parse_q("0.1234"), 0);
    }

    #[test]
    fn media_types_match_patterns() {
        let c = Compression::new(CompressionConfig::default());
        for t in [
            "text/html; charset=utf-8",
            "application/json",
            "application/problem+json",
            "image/svg+xml",
        ] {
            assert!(c.compressible(t), "{t}");
        }
        for t in [
            "image/png",
            "text/event-stream",
            "application/grpc",
            "application/octet-stream",
            "nonsense",
        ] {
            assert!(!c.compressible(t), "{t}");
        }
    }
}
