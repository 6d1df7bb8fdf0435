//! Client certificates (mTLS) at the gateway's listener: verification in `required` and
//! `optional` mode, and the `mtls` policy mapping a certificate's subject or SAN to a file
//! consumer, over HTTP/1.1 and HTTP/2. Every certificate is generated here by `rcgen`.
// Tests fail by panicking; the workspace lints against that in library code only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use turnpike_proxy::gateway::Gateway;

/// The gateway's server certificate and the CA clients trust it by, the client CA, and the
/// certificates issued to clients.
struct Certs {
    server_pki: Pki,
    server: Leaf,
    client_pki: Pki,
    /// Mapped to consumer `alice` by its subject.
    alice: Leaf,
    /// Mapped to consumer `bob` by its DNS SAN.
    bob: Leaf,
    /// Issued by the client CA, mapped to no consumer.
    stranger: Leaf,
    /// Issued by a CA the listener does not trust.
    intruder: Leaf,
    _other_pki: Pki,
}

impl Certs {
    fn new() -> Self {
        let server_pki = Pki::new("server");
        let server = server_pki.issue("gateway", &["gateway.test"], false);
        let client_pki = Pki::new("clients");
        let alice = client_pki.issue("alice", &["alice.clients.test"], true);
        let bob = client_pki.issue("bob", &["bob.clients.test"], true);
        let stranger = client_pki.issue("stranger", &["stranger.clients.test"], true);
        let other_pki = Pki::new("other");
        // Same names as alice: only the issuer differs.
        let intruder = other_pki.issue("intruder", &["alice.clients.test"], true);
        Self {
            server_pki,
            server,
            client_pki,
            alice,
            bob,
            stranger,
            intruder,
            _other_pki: other_pki,
        }
    }
}

/// A gateway with one TLS listener verifying client certificates in `mode`, consumers
/// `alice` (by subject) and `bob` (by SAN), and three routes: `/secure` (mtls with upstream
/// headers), `/strict` (key_auth, and mtls with `required: true`), `/public` (none).
fn gateway_config(certs: &Certs, mode: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
server:
  listeners:
    - name: tls
      address: "127.0.0.1:0"
      tls:
        certificates: [{{cert: "{cert}", key: "{key}"}}]
        client_auth: {{ca: "{ca}", mode: {mode}}}
upstreams:
  - name: up
    targets: [{{address: "{upstream}"}}]
routes:
  - {{name: secure, paths: [{{prefix: /secure}}], upstream: up}}
  - {{name: strict, paths: [{{prefix: /strict}}], upstream: up}}
  - {{name: public, paths: [{{prefix: /public}}], upstream: up}}
consumers:
  - name: alice
    mtls: [{{subject: "CN=alice.clients.test"}}]
  - name: bob
    mtls: [{{san: "DNS:bob.clients.test"}}]
    api_keys: [{{sha256: "{bob_key}"}}]
policies:
  - name: certs
    type: mtls
    scope: route
    target: secure
    config: {{upstream_headers: true}}
  - name: strict-certs
    type: mtls
    scope: route
    target: strict
    config: {{required: true}}
  - name: strict-keys
    type: key_auth
    scope: route
    target: strict
    priority: 10
"#,
        cert = p(&certs.server.cert_path),
        key = p(&certs.server.key_path),
        ca = p(&certs.client_pki.ca_pem_path),
        bob_key = sha256_hex(b"bob-key"),
    )
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    sha2::Sha256::digest(data)
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// TLS to the gateway offering `alpn`, with `client` as the client certificate if given.
/// `Err` when the handshake fails on the client's side.
async fn connect(
    gw: SocketAddr,
    certs: &Certs,
    client: Option<&Leaf>,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(certs.server_pki.roots());
    let mut cfg = match client {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = within("connect", TcpStream::connect(gw)).await.unwrap();
    let name = ServerName::try_from("gateway.test").unwrap();
    within(
        "tls handshake",
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
}

/// One request over a new connection: `Ok((status, body))`, or `Err` when the TLS handshake
/// or the connection failed (a TLS 1.3 client learns that its certificate was refused only
/// when it reads).
async fn request(
    gw: SocketAddr,
    certs: &Certs,
    client: Option<&Leaf>,
    h2: bool,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, serde_json::Value), String> {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let io = connect(gw, certs, client, alpn)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut req = Request::get(format!("https://gateway.test{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = if h2 {
        let (mut s, conn) = within(
            "h2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
        )
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let resp = within("h2 request", s.send_request(req))
            .await
            .map_err(|e| format!("request: {e}"))?;
        assert_eq!(resp.version(), Version::HTTP_2);
        resp
    } else {
        let (mut s, conn) = within(
            "h1 handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(io)),
        )
        .await
        .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        within("h1 request", s.send_request(req))
            .await
            .map_err(|e| format!("request: {e}"))?
    };
    let status = resp.status();
    let body = within("body", resp.into_body().collect())
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn certificates_map_to_consumers_by_subject_and_by_san() {
    let certs = Certs::new();
    let up = Upstream::echo().await;
    let gw = Gw::start(&gateway_config(&certs, "required", up.addr)).await;

    let spoof = [
        ("x-client-cert-subject", "CN=admin"),
        ("x_client_cert_fingerprint", "00"),
        ("x-client-cert-anything", "x"),
    ];
    let (status, body) = request(
        gw.addr,
        &certs,
        Some(&certs.alice),
        false,
        "/secure/a",
        &spoof,
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = request(gw.addr, &certs, Some(&certs.bob), true, "/secure/b", &spoof)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let (a, b) = (&seen[0], &seen[1]);
    assert_eq!(a.header("x-consumer-id"), Some("alice"));
    assert_eq!(
        a.header("x-client-cert-subject"),
        Some("CN=alice.clients.test")
    );
    assert_eq!(
        a.header("x-client-cert-fingerprint"),
        Some(sha256_hex(&certs.alice.cert_der).as_str())
    );
    assert_eq!(
        a.header("x-client-cert-san"),
        Some("DNS:alice.clients.test")
    );
    assert!(a.header("x-client-cert-not-after").is_some(), "{a:?}");
    assert!(a.header("x-client-cert-serial").is_some(), "{a:?}");
    assert_eq!(b.header("x-consumer-id"), Some("bob"));
    assert_eq!(
        b.header("x-client-cert-subject"),
        Some("CN=bob.clients.test")
    );
    for s in [a, b] {
        // The client's own values were removed, in every spelling, whatever the suffix.
        assert!(s.header("x_client_cert_fingerprint").is_none(), "{s:?}");
        assert!(s.header("x-client-cert-anything").is_none(), "{s:?}");
        assert_ne!(s.header("x-client-cert-subject"), Some("CN=admin"));
    }
}

#[tokio::test]
async fn certificates_the_listener_does_not_trust_are_refused_at_the_handshake() {
    let certs = Certs::new();
    let up = Upstream::echo().await;
    for mode in ["required", "optional"] {
        let gw = Gw::start(&gateway_config(&certs, mode, up.addr)).await;
        for h2 in [false, true] {
            let refused = request(gw.addr, &certs, Some(&certs.intruder), h2, "/public", &[]).await;
            assert!(refused.is_err(), "{mode} h2={h2}: {refused:?}");
        }
    }
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn a_required_listener_refuses_clients_without_a_certificate() {
    let certs = Certs::new();
    let up = Upstream::echo().await;
    let gw = Gw::start(&gateway_config(&certs, "required", up.addr)).await;
    for h2 in [false, true] {
        let refused = request(gw.addr, &certs, None, h2, "/public", &[]).await;
        assert!(refused.is_err(), "h2={h2}: {refused:?}");
    }
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn an_optional_listener_serves_public_routes_without_a_certificate() {
    let certs = Certs::new();
    let up = Upstream::echo().await;
    let gw = Gw::start(&gateway_config(&certs, "optional", up.addr)).await;
    for h2 in [false, true] {
        let (status, body) = request(gw.addr, &certs, None, h2, "/secure", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(error_code(&body), "credential_missing");
        assert!(body["error"]["request_id"].is_string(), "{body}");

        let (status, body) = request(
            gw.addr,
            &certs,
            None,
            h2,
            "/public",
            &[("x-client-cert-subject", "CN=alice.clients.test")],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");

        // `required: true` needs the certificate even though bob's API key identifies him.
        let (status, body) = request(
            gw.addr,
            &certs,
            None,
            h2,
            "/strict",
            &[("x-api-key", "bob-key")],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(error_code(&body), "credential_missing");
        let (status, body) = request(
            gw.addr,
            &certs,
            Some(&certs.alice),
            h2,
            "/strict",
            &[("x-api-key", "bob-key")],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    // The public route's caller claimed a certificate it does not have.
    assert!(
        seen[0].header("x-client-cert-subject").is_none(),
        "{seen:?}"
    );
    // On /strict the key method has the higher priority and decides.
    assert_eq!(seen[1].header("x-consumer-id"), Some("bob"));
}

#[tokio::test]
async fn a_trusted_certificate_mapped_to_no_consumer_is_credential_invalid() {
    let certs = Certs::new();
    let up = Upstream::echo().await;
    let gw = Gw::start(&gateway_config(&certs, "required", up.addr)).await;
    for h2 in [false, true] {
        let (status, body) = request(gw.addr, &certs, Some(&certs.stranger), h2, "/secure", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(error_code(&body), "credential_invalid");
        // The certificate is fine for routes that do not authenticate.
        let (status, _) = request(gw.addr, &certs, Some(&certs.stranger), h2, "/public", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn a_bad_client_ca_file_is_refused_naming_the_field_and_file() {
    let certs = Certs::new();
    let yaml = gateway_config(&certs, "required", "127.0.0.1:9".parse().unwrap()).replace(
        &p(&certs.client_pki.ca_pem_path),
        "/nonexistent/clients-ca.pem",
    );
    let err = Gateway::start(&config(&yaml)).await.err().expect("refused");
    let err = err.to_string();
    assert!(err.contains("tls.client_auth.ca"), "{err}");
    assert!(err.contains("/nonexistent/clients-ca.pem"), "{err}");
}
