//! TLS at both ends: termination at the gateway's listener (ALPN h2 and HTTP/1.1), and TLS /
//! mutual TLS from the gateway to an upstream.
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn tls_listener_config(leaf: &Leaf, upstream: SocketAddr) -> String {
    format!(
        r#"
server:
  listeners:
    - name: tls
      address: "127.0.0.1:0"
      tls:
        certificates: [{{cert: "{}", key: "{}"}}]
upstreams:
  - name: up
    targets: [{{address: "{upstream}"}}]
routes:
  - name: all
    paths: [{{prefix: /}}]
    upstream: up
"#,
        p(&leaf.cert_path),
        p(&leaf.key_path)
    )
}

/// A TLS connection to the gateway offering `alpn`, verifying the gateway against `pki`.
async fn tls_connect(
    gw: SocketAddr,
    pki: &Pki,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = within("connect", TcpStream::connect(gw)).await.unwrap();
    let name = ServerName::try_from("gateway.test").unwrap();
    let tls = within(
        "tls handshake",
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake with the gateway");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "negotiated ALPN"
    );
    tls
}

#[tokio::test]
async fn tls_termination_http1_and_h2() {
    let pki = Pki::new("listener");
    let leaf = pki.issue("gateway", &["gateway.test"], false);
    let up = Upstream::echo().await;
    let gw = Gw::start(&tls_listener_config(&leaf, up.addr)).await;

    // HTTP/1.1 over TLS.
    let io = tls_connect(gw.addr, &pki, b"http/1.1").await;
    let (mut h1, conn) = within(
        "h1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/over/tls1?x=1")
        .header("host", "gateway.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within("h1 request", h1.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.headers()["x-echo-path"], "/over/tls1?x=1");
    assert_eq!(resp.headers()["x-echo-proto"], "https");

    // HTTP/2 over TLS, chosen by ALPN.
    let io = tls_connect(gw.addr, &pki, b"h2").await;
    let (mut h2, conn) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::post("https://gateway.test/over/tls2")
        .body(Full::new(Bytes::from_static(b"secret body")))
        .unwrap();
    let resp = within("h2 request", h2.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["x-echo-proto"], "https");
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"secret body");

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.header("x-forwarded-proto"), Some("https"), "{s:?}");
        assert!(
            s.header("forwarded")
                .is_some_and(|f| f.contains("proto=https")),
            "{s:?}"
        );
    }
    assert_eq!(seen[1].path_and_query, "/over/tls2");
}

/// An HTTPS upstream that requires a client certificate signed by `pki`'s CA. Records, for
/// each request, the client certificate of its connection.
struct MtlsUpstream {
    addr: SocketAddr,
    log: Log,
    client_certs: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl MtlsUpstream {
    async fn start(pki: &Pki, server: &Leaf) -> Self {
        Self::start_alpn(pki, server, &[b"http/1.1"]).await
    }

    /// Like [`MtlsUpstream::start`], offering `alpn` and serving HTTP/1.1 or HTTP/2 by it.
    async fn start_alpn(pki: &Pki, server: &Leaf, alpn: &[&[u8]]) -> Self {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(pki.roots()),
            provider(),
        )
        .build()
        .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.cert_der.clone()], server.key())
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let (l, certs) = (log.clone(), client_certs.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, l, certs) = (acceptor.clone(), l.clone(), certs.clone());
                tokio::spawn(async move {
                    // A refused handshake simply ends the connection.
                    let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().cloned());
                    let svc = hyper::service::service_fn(move |req| {
                        let (l, certs, peer) = (l.clone(), certs.clone(), peer.clone());
                        async move {
                            if let Some(c) = peer {
                                certs.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                            }
                            Ok::<_, std::convert::Infallible>(
                                record_and_reply(req, &l, &echo_reply).await,
                            )
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        Self {
            addr,
            log,
            client_certs,
        }
    }
}

fn https_upstream_config(up: SocketAddr, ca: &std::path::Path, client: Option<&Leaf>) -> String {
    https_upstream_config_with(up, ca, client, "")
}

fn https_upstream_config_with(
    up: SocketAddr,
    ca: &std::path::Path,
    client: Option<&Leaf>,
    extra: &str,
) -> String {
    let client = client.map_or_else(String::new, |c| {
        format!(
            r#", client_cert: "{}", client_key: "{}""#,
            p(&c.cert_path),
            p(&c.key_path)
        )
    });
    one_route(
        up,
        &format!(
            r#"    scheme: https
    tls: {{ca: "{}", sni: upstream.test{client}}}
{extra}"#,
            p(ca)
        ),
        "",
    )
}

async fn get(gw: &Gw, path: &str) -> (StatusCode, Bytes) {
    let tcp = within("connect", TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let (mut s, conn) = within(
        "h1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "gw.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within("request", s.send_request(req))
        .await
        .expect("response");
    let status = resp.status();
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, body)
}

#[tokio::test]
async fn upstream_mtls_presents_the_client_certificate() {
    let pki = Pki::new("upstream");
    let server = pki.issue("server", &["upstream.test"], false);
    let client = pki.issue("gateway-client", &["gateway-client.test"], true);
    let up = MtlsUpstream::start(&pki, &server).await;
    let gw = Gw::start(&https_upstream_config(
        up.addr,
        &pki.ca_pem_path,
        Some(&client),
    ))
    .await;

    let (status, body) = get(&gw, "/secure/thing").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let seen = seen(&up.log);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/secure/thing");
    let certs = up.client_certs.lock().unwrap().clone();
    assert_eq!(
        certs,
        vec![client.cert_der.clone()],
        "the upstream saw the configured client certificate"
    );
}

#[tokio::test]
async fn upstream_mtls_without_client_certificate_is_502() {
    let pki = Pki::new("upstream");
    let server = pki.issue("server", &["upstream.test"], false);
    let up = MtlsUpstream::start(&pki, &server).await;
    let gw = Gw::start(&https_upstream_config(up.addr, &pki.ca_pem_path, None)).await;

    let (status, body) = get(&gw, "/secure/thing").await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        seen(&up.log).is_empty(),
        "no request may reach an upstream that refused the handshake"
    );
}

#[tokio::test]
async fn upstream_tls_with_wrong_ca_is_502() {
    let pki = Pki::new("upstream");
    let other = Pki::new("other");
    let server = pki.issue("server", &["upstream.test"], false);
    let client = pki.issue("gateway-client", &["gateway-client.test"], true);
    let up = MtlsUpstream::start(&pki, &server).await;
    // The gateway trusts another CA: the upstream's certificate must be refused.
    let gw = Gw::start(&https_upstream_config(
        up.addr,
        &other.ca_pem_path,
        Some(&client),
    ))
    .await;

    let (status, body) = get(&gw, "/secure/thing").await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(seen(&up.log).is_empty());
    assert!(up.client_certs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn websocket_over_tls_termination() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // A WebSocket echo upstream on a raw listener.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close()
                        || ((msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err())
                    {
                        return;
                    }
                }
            });
        }
    });
    let pki = Pki::new("listener");
    let leaf = pki.issue("gateway", &["gateway.test"], false);
    let gw = Gw::start(&tls_listener_config(&leaf, up)).await;

    let io = tls_connect(gw.addr, &pki, b"http/1.1").await;
    let (mut ws, resp) = within(
        "wss handshake",
        tokio_tungstenite::client_async("wss://gateway.test/secure-chat", io),
    )
    .await
    .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for m in [
        Message::text("over tls"),
        Message::binary(vec![9u8; 100_000]),
    ] {
        within("send", ws.send(m.clone())).await.unwrap();
        assert_eq!(
            within("echo", ws.next())
                .await
                .expect("stream ended")
                .unwrap(),
            m
        );
    }
    within("close", ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn upstream_mtls_negotiates_h2_by_alpn() {
    let pki = Pki::new("upstream");
    let server = pki.issue("server", &["upstream.test"], false);
    let client = pki.issue("gateway-client", &["gateway-client.test"], true);
    let up = MtlsUpstream::start_alpn(&pki, &server, &[b"h2", b"http/1.1"]).await;
    let gw = Gw::start(&https_upstream_config_with(
        up.addr,
        &pki.ca_pem_path,
        Some(&client),
        "    http2: true",
    ))
    .await;

    for i in 0..3 {
        let (status, body) = get(&gw, &format!("/h2/{i}")).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let seen = seen(&up.log);
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|s| s.version == Version::HTTP_2),
        "{seen:#?}"
    );
    assert_eq!(up.client_certs.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn listener_picks_certificate_by_sni() {
    let pki = Pki::new("listener");
    let a = pki.issue("a", &["a.test"], false);
    let b = pki.issue("b", &["b.test", "*.wild.test"], false);
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"
server:
  listeners:
    - name: tls
      address: "127.0.0.1:0"
      tls:
        certificates:
          - {{cert: "{}", key: "{}"}}
          - {{cert: "{}", key: "{}"}}
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
routes:
  - name: all
    upstream: up
"#,
        p(&a.cert_path),
        p(&a.key_path),
        p(&b.cert_path),
        p(&b.key_path),
        up.addr
    );
    let gw = Gw::start(&yaml).await;
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots())
            .with_no_client_auth(),
    );
    for (sni, want) in [("a.test", &a), ("b.test", &b), ("x.wild.test", &b)] {
        let tcp = within("connect", TcpStream::connect(gw.addr))
            .await
            .unwrap();
        let tls = within(
            "handshake",
            TlsConnector::from(cfg.clone()).connect(ServerName::try_from(sni).unwrap(), tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
        let served = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned());
        assert_eq!(
            served.as_ref(),
            Some(&want.cert_der),
            "certificate served for {sni}"
        );
    }
}
