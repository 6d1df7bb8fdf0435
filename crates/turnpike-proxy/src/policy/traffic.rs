//! Traffic management: choosing the upstream per request (`traffic_split`: A/B rules, then a
//! weighted canary split) and copying requests to a shadow upstream (`mirror`).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use turnpike_model::ConfigError;
use turnpike_model::policy::{MirrorConfig, Sticky, TrafficSplitConfig};

use crate::body::BoxError;
use crate::router::Conditions;

/// A compiled `traffic_split`.
pub struct Split {
    rules: Vec<(Conditions, String)>,
    /// Upstream names with cumulative weights.
    weighted: Vec<(String, u64)>,
    total: u64,
    sticky: Option<StickyKey>,
}

enum StickyKey {
    Ip,
    Header(HeaderName),
    Cookie(String),
}

impl Split {
    /// Compiles the policy.
    pub fn new(cfg: TrafficSplitConfig) -> Result<Self, (String, String)> {
        let mut errors: Vec<ConfigError> = Vec::new();
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.iter().enumerate() {
            let c = Conditions::compile(
                &r.headers,
                &r.query,
                &r.cookies,
                &format!("rules[{i}]"),
                &mut errors,
            );
            rules.push((c, r.upstream.clone()));
        }
        if let Some(e) = errors.into_iter().next() {
            return Err((e.path, e.message));
        }
        let mut total = 0u64;
        let weighted = cfg
            .weighted
            .iter()
            .filter(|w| w.weight > 0)
            .map(|w| {
                total += u64::from(w.weight);
                (w.upstream.clone(), total)
            })
            .collect();
        let sticky = match cfg.sticky {
            None => None,
            Some(Sticky::Ip) => Some(StickyKey::Ip),
            Some(Sticky::Header { name }) => Some(StickyKey::Header(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| ("sticky.name".to_owned(), "not a header name".to_owned()))?,
            )),
            Some(Sticky::Cookie { name }) => Some(StickyKey::Cookie(name)),
        };
        Ok(Self {
            rules,
            weighted,
            total,
            sticky,
        })
    }

    /// The upstream for this request, or `None` for the route's own.
    pub fn choose(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: IpAddr,
    ) -> Option<&str> {
        for (c, upstream) in &self.rules {
            if c.hold(headers, query) {
                return Some(upstream);
            }
        }
        if self.total == 0 {
            return None;
        }
        let point = match self.sticky_hash(headers, client_ip) {
            Some(h) => h % self.total,
            None => fastrand::u64(0..self.total),
        };
        self.weighted
            .iter()
            .find(|(_, upto)| point < *upto)
            .map(|(u, _)| u.as_str())
    }

    fn sticky_hash(&self, headers: &HeaderMap, client_ip: IpAddr) -> Option<u64> {
        // A hash defined by a standard, not by the toolchain: the same client lands on the
        // same side on every node, after restarts and across upgrades.
        use sha2::Digest;
        let ip;
        let key: &[u8] = match self.sticky.as_ref()? {
            StickyKey::Ip => {
                ip = client_ip.to_string();
                ip.as_bytes()
            }
            StickyKey::Header(name) => headers.get(name)?.as_bytes(),
            StickyKey::Cookie(name) => cookie(headers, name)?.as_bytes(),
        };
        let digest = sha2::Sha256::digest(key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Some(u64::from_be_bytes(first))
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n.trim() == name).then(|| v.trim())
        })
}

/// A compiled `mirror`.
pub struct Mirror {
    /// The configuration.
    pub cfg: MirrorConfig,
    in_flight: Arc<AtomicU32>,
    /// Copies sent.
    pub sent: AtomicU64,
    /// Copies not sent or abandoned: over `max_in_flight`, body too large or too slow.
    pub dropped: Arc<AtomicU64>,
}

/// A mirrored request's slot in `max_in_flight`; released when the copy is done.
pub struct MirrorSlot {
    in_flight: Arc<AtomicU32>,
    /// Where to count the copy if it is abandoned.
    pub dropped: Arc<AtomicU64>,
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Mirror {
    /// Compiles the policy.
    pub fn new(cfg: MirrorConfig) -> Self {
        Self {
            cfg,
            in_flight: Arc::new(AtomicU32::new(0)),
            sent: AtomicU64::new(0),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether to mirror this request; `Some` holds a slot for the copy.
    pub fn pick(&self) -> Option<MirrorSlot> {
        if !super::resilience::chance(self.cfg.percent) {
            return None;
        }
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = MirrorSlot {
            in_flight: self.in_flight.clone(),
            dropped: self.dropped.clone(),
        };
        if prev >= self.cfg.max_in_flight {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }
}

/// What the tee hands the mirror.
pub enum Chunk {
    /// Body bytes.
    Data(Bytes),
    /// The body ended normally.
    End,
}

/// Frames of body the mirror may lag behind before its copy is abandoned.
const TEE_FRAMES: usize = 32;

/// A sender and the body that receives its chunks: the mirror's copy of the request body.
pub fn tee_channel() -> (mpsc::Sender<Chunk>, MirrorBody) {
    let (tx, rx) = mpsc::channel(TEE_FRAMES);
    (tx, MirrorBody { rx, done: false })
}

pin_project_lite::pin_project! {
    /// The request body on its way to the real upstream, copying each chunk to the mirror
    /// without ever waiting for it: a mirror that falls behind, or a body over its limit,
    /// loses its copy (the mirror's request fails), the client's request does not notice.
    pub struct Tee<B> {
        #[pin]
        inner: B,
        tx: Option<mpsc::Sender<Chunk>>,
        left: u64,
    }
}

impl<B> Tee<B> {
    /// Copies `inner` to `tx`, at most `max` bytes.
    pub fn new(inner: B, tx: mpsc::Sender<Chunk>, max: u64) -> Self {
        Self {
            inner,
            tx: Some(tx),
            left: max,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let result = this.inner.as_mut().poll_frame(cx);
        match &result {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    let keep = len <= *this.left
                        && this
                            .tx
                            .as_ref()
                            .is_some_and(|tx| tx.try_send(Chunk::Data(data.clone())).is_ok());
                    if keep {
                        *this.left -= len;
                        // hyper stops polling once the body says it has ended, so the last
                        // frame is the last chance to close the copy properly.
                        if this.inner.is_end_stream()
                            && let Some(tx) = this.tx.take()
                        {
                            let _ = tx.try_send(Chunk::End);
                        }
                    } else {
                        // Dropping the sender without `End` abandons the copy.
                        this.tx.take();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(tx) = this.tx.take() {
                    let _ = tx.try_send(Chunk::End);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.tx.take();
            }
            Poll::Pending => {}
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The mirror's request body, fed by a [`Tee`].
pub struct MirrorBody {
    rx: mpsc::Receiver<Chunk>,
    done: bool,
}

/// The copy of the body was abandoned.
#[derive(Debug)]
pub struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mirrored body abandoned")
    }
}

impl std::error::Error for Abandoned {}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Chunk::Data(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Chunk::End)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(Box::new(Abandoned))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use http_body_util::BodyExt;

    fn split(json: serde_json::Value) -> Split {
        Split::new(serde_json::from_value(json).unwrap()).unwrap()
    }

    #[test]
    fn rules_win_then_weights_decide() {
        let s = split(serde_json::json!({
            "rules": [{"headers": [{"name": "x-beta", "equals": "1"}], "upstream": "beta"}],
            "weighted": [{"upstream": "a", "weight": 1}, {"upstream": "b", "weight": 0}]
        }));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(s.choose(&h, None, ip), Some("a"));
        h.insert("x-beta", "1".parse().unwrap());
        assert_eq!(s.choose(&h, None, ip), Some("beta"));
    }

    #[test]
    fn sticky_cookie_keeps_a_client_on_one_side() {
        let s = split(serde_json::json!({
            "weighted": [{"upstream": "a", "weight": 50}, {"upstream": "b", "weight": 50}],
            "sticky": {"by": "cookie", "name": "uid"}
        }));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut sides = std::collections::HashSet::new();
        for user in 0..200 {
            let mut h = HeaderMap::new();
            h.insert("cookie", format!("a=1; uid=u{user}").parse().unwrap());
            let first = s.choose(&h, None, ip).unwrap().to_owned();
            for _ in 0..5 {
                assert_eq!(s.choose(&h, None, ip).unwrap(), first);
            }
            sides.insert(first);
        }
        // Different users do land on both sides.
        assert_eq!(sides.len(), 2);
    }

    #[tokio::test]
    async fn tee_copies_the_body_and_ends_it() {
        let (tx, mirror) = tee_channel();
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let tee = Tee::new(body, tx, 1024);
        let main = tee.collect().await.unwrap().to_bytes();
        assert_eq!(main, "hello");
        let copy = mirror.collect().await.unwrap().to_bytes();
        assert_eq!(copy, "hello");
    }

    #[tokio::test]
    async fn tee_abandons_a_copy_over_its_limit() {
        let (tx, mirror) = tee_channel();
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let main = Tee::new(body, tx, 3).collect().await.unwrap().to_bytes();
        assert_eq!(main, "hello");
        assert!(mirror.collect().await.is_err());
    }
}
