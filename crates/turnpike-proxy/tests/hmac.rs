//! `hmac_auth` end to end: HTTP message signatures (RFC 9421, hmac-sha256) made by a small
//! signer written here from the RFC's rules, sent to the real gateway in-process, with a
//! mock upstream on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;

const SECRET_ENV: &str = "TURNPIKE_TEST_HMAC_SECRET";
const SECRET: &str = "partner-shared-s3cret";

fn set_secret() {
    // SAFETY: each test runs in its own process under nextest, and this runs before the
    // gateway starts; the value is the same in every test.
    unsafe { std::env::set_var(SECRET_ENV, SECRET) };
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A request to sign and send.
struct Signed {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Signed {
    fn new(method: &'static str, path: &str) -> Self {
        Self {
            method,
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }

    /// A body with its `Content-Digest` (RFC 9530) of `alg`.
    fn body(mut self, body: &str, alg: &str) -> Self {
        let digest = match alg {
            "sha-256" => ring::digest::digest(&ring::digest::SHA256, body.as_bytes()),
            _ => ring::digest::digest(&ring::digest::SHA512, body.as_bytes()),
        };
        self.body = body.as_bytes().to_vec();
        self.header(
            "content-digest",
            &format!("{alg}=:{}:", b64(digest.as_ref())),
        )
    }

    /// Signs `components` under label `sig1` with `params` (`;created=...;keyid="..."`) and
    /// `secret`, following RFC 9421 §2.5: one line per component, then
    /// `"@signature-params"`.
    fn sign(self, gw: &Gw, components: &[&str], params: &str, secret: &str) -> Self {
        let authority = gw.addr.to_string();
        let (path, query) = match self.path.split_once('?') {
            Some((p, q)) => (p.to_owned(), format!("?{q}")),
            None => (self.path.clone(), "?".to_owned()),
        };
        let list = components
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(" ");
        let sig_params = format!("({list}){params}");
        let mut base = String::new();
        for c in components {
            let value = match *c {
                "@method" => self.method.to_owned(),
                "@target-uri" => format!("http://{authority}{}", self.path),
                "@authority" => authority.clone(),
                "@path" => path.clone(),
                "@query" => query.clone(),
                "@request-target" => self.path.clone(),
                name => self
                    .headers
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.trim().to_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            base.push_str(&format!("\"{c}\": {value}\n"));
        }
        base.push_str(&format!("\"@signature-params\": {sig_params}"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mac = ring::hmac::sign(&key, base.as_bytes());
        self.header("signature-input", &format!("sig1={sig_params}"))
            .header("signature", &format!("sig1=:{}:", b64(mac.as_ref())))
    }

    /// Sends the request as it is now; `path` and `method` may have been changed after
    /// signing to tamper with it.
    async fn send(&self, gw: &Gw) -> Reply {
        let mut r = req(self.method, &gw.url(&self.path)).header("host", gw.addr.to_string());
        for (k, v) in &self.headers {
            r = r.header(k.as_str(), v.as_str());
        }
        send(r.body(Full::new(Bytes::from(self.body.clone()))).unwrap()).await
    }
}

fn params(key_id: &str) -> String {
    format!(";created={};keyid=\"{key_id}\";alg=\"hmac-sha256\"", now())
}

fn config(upstream: std::net::SocketAddr, policy: &str) -> String {
    yaml(
        upstream,
        &format!(
            r#"  - {{name: rw, paths: [{{prefix: /rw}}], upstream: up, rewrite: {{strip_prefix: true}}}}
consumers:
  - name: partner
    hmac: [{{key_id: partner-key, secret_env: {SECRET_ENV}}}]
  - name: other
    hmac: [{{key_id: other-key, secret: other-secret}}]
policies:
  - name: signatures
    type: hmac_auth
    scope: global
    config: {{{policy}}}
"#
        ),
    )
}

/// The echo upstream and a gateway whose `hmac_auth` has `policy` (YAML flow mapping
/// members) as its configuration.
async fn start(policy: &str) -> (Mock, Gw) {
    set_secret();
    let up = echo().await;
    let gw = Gw::start(&config(up.addr, policy)).await;
    (up, gw)
}

fn code(r: &Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn signed_get_and_post_reach_the_upstream_identified() {
    let (up, gw) = start("").await;
    let p = params("partner-key");

    let get = Signed::new("GET", "/api/orders?limit=5&from=x%20y")
        .sign(&gw, &["@method", "@target-uri"], &p, SECRET)
        .send(&gw)
        .await;
    assert_eq!(get.status, StatusCode::OK, "{}", get.text());
    let seen = get.json();
    assert_eq!(seen["headers"]["x-consumer-name"], "partner");
    assert_eq!(seen["path"], "/api/orders?limit=5&from=x%20y");
    // The signature goes upstream unless hide_credentials: the upstream may verify it too.
    assert!(seen["headers"].get("signature").is_some(), "{seen}");

    for alg in ["sha-256", "sha-512"] {
        let post = Signed::new("POST", "/api/orders")
            .header("content-type", "application/json")
            .body(r#"{"item": 42}"#, alg)
            .sign(
                &gw,
                &["@method", "@target-uri", "content-type", "content-digest"],
                &p,
                SECRET,
            )
            .send(&gw)
            .await;
        assert_eq!(post.status, StatusCode::OK, "{alg}: {}", post.text());
        assert_eq!(post.json()["headers"]["x-consumer-name"], "partner");
    }

    // `@authority`, `@path` and `@query` together stand for `@target-uri`; a second key
    // identifies its own consumer.
    let parts = Signed::new("GET", "/api/x?a=1")
        .sign(
            &gw,
            &["@method", "@authority", "@path", "@query"],
            &params("other-key"),
            "other-secret",
        )
        .send(&gw)
        .await;
    assert_eq!(parts.status, StatusCode::OK, "{}", parts.text());
    assert_eq!(parts.json()["headers"]["x-consumer-name"], "other");

    // No signature: 401 missing, with what a signature must cover.
    let none = call(&gw, "GET", "/api/orders", &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&none), "credential_missing");
    assert_eq!(
        none.header("accept-signature"),
        Some(r#"sig1=("@method" "@target-uri");alg="hmac-sha256";created"#)
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        4,
        "the four signed requests"
    );
}

#[tokio::test]
async fn tampered_stale_and_incomplete_signatures_are_refused_before_the_upstream() {
    let (up, gw) = start("").await;
    let p = params("partner-key");
    let full = ["@method", "@target-uri"];
    let get = |path: &str| Signed::new("GET", path);

    let mut cases: Vec<(&str, Signed, &str)> = Vec::new();
    let mut s = get("/api/a").sign(&gw, &full, &p, SECRET);
    s.method = "DELETE";
    cases.push(("tampered method", s, "does not match the request"));
    let mut s = get("/api/a").sign(&gw, &full, &p, SECRET);
    s.path = "/api/b".into();
    cases.push(("tampered path", s, "does not match the request"));
    let mut s = get("/api/a?amount=1").sign(&gw, &full, &p, SECRET);
    s.path = "/api/a?amount=100".into();
    cases.push(("tampered query", s, "does not match the request"));
    let mut s = get("/api/a").header("x-amount", "10").sign(
        &gw,
        &["@method", "@target-uri", "x-amount"],
        &p,
        SECRET,
    );
    s.headers[0].1 = "11".into();
    cases.push(("tampered header", s, "does not match the request"));
    let mut s = Signed::new("POST", "/api/a")
        .body("pay 10", "sha-256")
        .sign(
            &gw,
            &["@method", "@target-uri", "content-digest"],
            &p,
            SECRET,
        );
    s.body = b"pay 99".to_vec();
    cases.push(("tampered body", s, "body does not match its Content-Digest"));
    cases.push((
        "wrong key",
        get("/api/a").sign(&gw, &full, &p, "not-the-secret"),
        "does not match the request",
    ));
    cases.push((
        "unknown key id",
        get("/api/a").sign(&gw, &full, &params("nobody"), SECRET),
        "unknown key id `nobody`",
    ));
    cases.push((
        "too old",
        get("/api/a").sign(
            &gw,
            &full,
            &format!(";created={};keyid=\"partner-key\"", now() - 400),
            SECRET,
        ),
        "older than 300 seconds",
    ));
    cases.push((
        "expired",
        get("/api/a").sign(
            &gw,
            &full,
            &format!(
                ";created={};expires={};keyid=\"partner-key\"",
                now() - 100,
                now() - 60
            ),
            SECRET,
        ),
        "has expired",
    ));
    cases.push((
        "future created",
        get("/api/a").sign(
            &gw,
            &full,
            &format!(";created={};keyid=\"partner-key\"", now() + 120),
            SECRET,
        ),
        "in the future",
    ));
    cases.push((
        "no created",
        get("/api/a").sign(&gw, &full, ";keyid=\"partner-key\"", SECRET),
        "no `created`",
    ));
    cases.push((
        "other algorithm",
        get("/api/a").sign(
            &gw,
            &full,
            &format!(
                ";created={};keyid=\"partner-key\";alg=\"rsa-pss-sha512\"",
                now()
            ),
            SECRET,
        ),
        "only hmac-sha256",
    ));
    cases.push((
        "target not covered",
        get("/api/a").sign(&gw, &["@method"], &p, SECRET),
        "does not cover `@target-uri`",
    ));
    cases.push((
        "body digest not covered",
        Signed::new("POST", "/api/a")
            .body("pay 10", "sha-256")
            .sign(&gw, &full, &p, SECRET),
        "does not cover `content-digest`",
    ));

    for (what, s, why) in &cases {
        let r = s.send(&gw).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        assert_eq!(code(&r), "credential_invalid", "{what}");
        assert!(r.text().contains(why), "{what}: {}", r.text());
        assert!(
            !r.text().contains(SECRET),
            "{what}: the secret is never echoed"
        );
        // The body is judged after authentication, in the inspection stage: no challenge.
        if *what != "tampered body" {
            assert!(r.header("accept-signature").is_some(), "{what}");
        }
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "no refused request reached the upstream"
    );
}

#[tokio::test]
async fn replayed_nonces_are_refused() {
    let (up, gw) = start("require_nonce: true").await;
    let full = ["@method", "@target-uri"];
    let with_nonce = |n: &str| format!("{};nonce=\"{n}\"", params("partner-key"));

    let first = Signed::new("GET", "/api/a").sign(&gw, &full, &with_nonce("n-1"), SECRET);
    assert_eq!(first.send(&gw).await.status, StatusCode::OK);
    let again = first.send(&gw).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert!(
        again.text().contains("nonce was already used"),
        "{}",
        again.text()
    );
    // Another nonce is fine; no nonce is refused when the policy requires one.
    let other = Signed::new("GET", "/api/a").sign(&gw, &full, &with_nonce("n-2"), SECRET);
    assert_eq!(other.send(&gw).await.status, StatusCode::OK);
    let bare = Signed::new("GET", "/api/a").sign(&gw, &full, &params("partner-key"), SECRET);
    let r = bare.send(&gw).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text().contains("no nonce"), "{}", r.text());
    // A nonce is kept in memory until its signature expires: long ones are refused.
    let long = Signed::new("GET", "/api/a").sign(&gw, &full, &with_nonce(&"n".repeat(129)), SECRET);
    let r = long.send(&gw).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text().contains("longer than 128 bytes"), "{}", r.text());
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_signature_covers_the_path_the_client_sent_not_the_rewritten_one() {
    let (up, gw) = start("hide_credentials: true").await;
    let r = Signed::new("POST", "/rw/orders?id=7")
        .body("{}", "sha-512")
        .sign(
            &gw,
            &["@method", "@target-uri", "@path", "content-digest"],
            &params("partner-key"),
            SECRET,
        )
        .send(&gw)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["path"], "/orders?id=7", "the route strips its prefix");
    assert_eq!(seen["headers"]["x-consumer-name"], "partner");
    assert!(
        seen["headers"].get("signature").is_none()
            && seen["headers"].get("signature-input").is_none(),
        "hide_credentials removes the signature: {seen}"
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_past_the_digest_bound_are_refused() {
    let (up, gw) = start("max_body_bytes: 16").await;
    let signed = |body: &str| {
        Signed::new("POST", "/api/a").body(body, "sha-256").sign(
            &gw,
            &["@method", "@target-uri", "content-digest"],
            &params("partner-key"),
            SECRET,
        )
    };
    assert_eq!(signed("0123456789").send(&gw).await.status, StatusCode::OK);
    let big = signed("0123456789abcdefXYZ").send(&gw).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", big.text());
    assert_eq!(code(&big), "body_too_large");
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unset_secret_variable_refuses_the_configuration_naming_it() {
    let (up, gw) = start("").await;
    let broken = config(up.addr, "").replace(SECRET_ENV, "TURNPIKE_TEST_HMAC_NEVER_SET");
    let e = gw.reload(&broken).await.unwrap_err();
    assert!(
        e.0.iter()
            .any(|e| e.path == "consumers[0].hmac[0].secret_env" && e.message.contains("not set")),
        "{e:?}"
    );
    // The running configuration stays.
    let ok = Signed::new("GET", "/api/a")
        .sign(
            &gw,
            &["@method", "@target-uri"],
            &params("partner-key"),
            SECRET,
        )
        .send(&gw)
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
}
