//! Shared harness: the real gateway in-process on 127.0.0.1:0, plain and TLS mock upstreams,
//! a test PKI written to a temporary directory, and a timeout wrapper for every await that
//! could hang.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use turnpike_model::{Config, Format, Source};
use turnpike_proxy::gateway::Gateway;

/// The longest any single step of a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// The crypto provider of the whole workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses YAML into a config, forcing every listener onto 127.0.0.1:0.
pub fn config(yaml: &str) -> Config {
    let source = Source {
        file: "e2e.yaml".into(),
        text: yaml.into(),
    };
    let mut c = turnpike_model::parse(&source, Format::Yaml)
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{yaml}"));
    if c.server.listeners.is_empty() {
        c.server.listeners.push(Default::default());
    }
    for l in &mut c.server.listeners {
        l.address = "127.0.0.1:0".into();
    }
    c
}

/// A running gateway.
pub struct Gw {
    pub gateway: Arc<Gateway>,
    pub addr: SocketAddr,
}

impl Gw {
    pub async fn start(yaml: &str) -> Self {
        let cfg = config(yaml);
        let gateway = within("gateway start", Gateway::start(&cfg))
            .await
            .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
        let addr = gateway.local_addrs()[0].1;
        Self { gateway, addr }
    }
}

/// A gateway config with one upstream `up` (extra upstream keys indented by 4 spaces, e.g.
/// `    http2: true`) and one catch-all route to it (extra route keys indented by 4 spaces).
pub fn one_route(upstream: SocketAddr, extra_upstream: &str, extra_route: &str) -> String {
    format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{upstream}"}}]
{extra_upstream}
routes:
  - name: all
    paths: [{{prefix: /}}]
    upstream: up
{extra_route}
"#
    )
}

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub path_and_query: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Requests seen by a mock upstream, in arrival order.
pub type Log = Arc<Mutex<Vec<Seen>>>;

pub fn seen(log: &Log) -> Vec<Seen> {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A plain HTTP/1.1 + h2c upstream on 127.0.0.1:0 that records every request (with its whole
/// body) and answers with `reply(&seen)`. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub log: Log,
    tasks: JoinSet<()>,
}

impl Upstream {
    pub async fn start<F>(reply: F) -> Self
    where
        F: Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let mut tasks = JoinSet::new();
        let (reply, l) = (Arc::new(reply), log.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (reply, l) = (reply.clone(), l.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (reply, l) = (reply.clone(), l.clone());
                        async move { Ok::<_, Infallible>(record_and_reply(req, &l, &*reply).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, log, tasks }
    }

    /// An upstream answering 200 with the request body, plus `x-echo-*` headers describing
    /// what it saw.
    pub async fn echo() -> Self {
        Self::start(echo_reply).await
    }

    pub fn seen(&self) -> Vec<Seen> {
        seen(&self.log)
    }
}

/// Reads the whole request, records it and builds the reply.
pub async fn record_and_reply(
    req: Request<Incoming>,
    log: &Log,
    reply: &(dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync),
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(STEP, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => return status(StatusCode::BAD_REQUEST, "request body failed"),
    };
    let s = Seen {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".into(), |p| p.as_str().to_owned()),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let resp = reply(&s);
    log.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    resp
}

/// 200 with the request body; `x-echo-path`, `x-echo-host`, `x-echo-proto` (the
/// `x-forwarded-proto` seen) and `x-echo-version` describe the request.
pub fn echo_reply(s: &Seen) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(200)
        .header("x-echo-path", s.path_and_query.as_str())
        .header("x-echo-version", format!("{:?}", s.version));
    if let Some(h) = s.header("host") {
        b = b.header("x-echo-host", h);
    }
    if let Some(p) = s.header("x-forwarded-proto") {
        b = b.header("x-echo-proto", p);
    }
    b.body(Full::new(s.body.clone())).unwrap()
}

pub fn status(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A test PKI: one CA, certificates it signs, and files in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem_path: PathBuf,
}

/// A certificate and key, in memory and on disk.
pub struct Leaf {
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivatePkcs8KeyDer<'static>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }
}

impl Pki {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        Self::in_dir(dir, name)
    }

    pub fn in_dir(dir: tempfile::TempDir, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem_path = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem_path, cert.pem()).unwrap();
        Self {
            ca_der: cert.der().clone(),
            ca: rcgen::Issuer::new(params, key),
            dir,
            ca_pem_path,
        }
    }

    /// A certificate for `names` signed by the CA; `client` selects the clientAuth usage
    /// instead of serverAuth. Files: `<dir>/<file>.pem` and `<dir>/<file>-key.pem`.
    pub fn issue(&self, file: &str, names: &[&str], client: bool) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or(file),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        write_leaf(self.dir.path(), file, &cert, &key)
    }

    /// A root store trusting only this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }
}

fn write_leaf(dir: &Path, file: &str, cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Leaf {
    let cert_path = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Leaf {
        cert_der: cert.der().clone(),
        key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        cert_path,
        key_path,
    }
}

/// YAML-safe rendering of a path.
pub fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// Reads one HTTP/1.1 response (head and a Content-Length or chunked body) from `s`, keeping
/// bytes that follow it in `buf`.
pub async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = within("read head", s.read(&mut chunk)).await.expect("read");
        assert!(
            n > 0,
            "connection closed before a full head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().expect("content-length"))
    {
        fill(s, buf, len).await;
        body.extend(buf.drain(..len));
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf, buf.len() + 1).await;
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&buf[..line_end]).trim(), 16)
                .expect("chunk size");
            buf.drain(..line_end + 2);
            fill(s, buf, size + 2).await;
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    (head, body)
}

pub async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, want: usize) {
    while buf.len() < want {
        let mut chunk = [0u8; 4096];
        let n = within("read body", s.read(&mut chunk)).await.expect("read");
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
}
