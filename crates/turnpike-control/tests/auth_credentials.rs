//! Credentials of the newer authentication methods, created through the Admin API and
//! enforced by the gateway: an `oauth_client` credential maps introspected tokens to its
//! application, a `jwt` credential's issuer is trusted where a policy says so, an `hmac`
//! credential verifies message signatures with a secret the store only points to, an `mtls`
//! credential maps a client certificate to its application.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Env, env, env_with_listener};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Team `acme` with service `pay` (route `/pay` → the demo's `/echo`) guarded by `policy`
/// (a policy object of the team), published; team `shop` with application `web`.
async fn guarded_pay(e: &Env, policy: Value) {
    e.pay_service(json!({"approval": "auto"}), &[policy]).await;
    e.post("/teams", json!({"name": "shop"})).await;
    e.post("/teams/shop/applications", json!({"name": "web"}))
        .await;
}

/// A bearer token on the `/pay` route: the status and the JSON body.
async fn bearer(e: &Env, token: &str) -> (u16, Value) {
    let resp = e
        .http
        .get(format!("{}/pay", e.gateway))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// An introspection endpoint that knows two tokens: one of client `web-client`, one of a
/// client no application has.
async fn idp() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/introspect",
        axum::routing::post(move |body: String| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let token = body
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("token="))
                    .unwrap_or("");
                let client = match token {
                    "web-token" => "web-client",
                    "alien-token" => "alien-client",
                    _ => return axum::Json(json!({"active": false})),
                };
                axum::Json(json!({
                    "active": true, "client_id": client, "scope": "pay:charge",
                    "exp": std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() + 300,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/introspect", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_client_credentials_map_introspected_tokens_to_their_application() {
    // SAFETY: set before the gateway starts, to the same value in every test of the file;
    // under nextest each test is its own process.
    unsafe { std::env::set_var("TURNPIKE_TEST_CONTROL_IDP_SECRET", "s3cret") };
    let (idp_url, calls) = idp().await;
    let e = env().await;
    guarded_pay(
        &e,
        json!({"name": "oauth", "type": "oauth2_introspection", "scope": "service",
               "target": "pay",
               "config": {"endpoint": idp_url, "client_id": "gateway",
                          "client_secret_env": "TURNPIKE_TEST_CONTROL_IDP_SECRET"}}),
    )
    .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "web-oauth", "application": "web", "type": "oauth_client",
               "client_id": "web-client"}),
    )
    .await;
    e.settled().await;

    let (status, echo) = bearer(&e, "web-token").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    assert_eq!(echo["headers"]["x-authenticated-scopes"], "pay:charge");

    let (status, body) = bearer(&e, "alien-token").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "credential_invalid");
    let (status, body) = bearer(&e, "revoked-token").await;
    assert_eq!(status, 401, "{body}");
    // Three tokens, three calls: the second use of a token would be answered from the cache.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(bearer(&e, "web-token").await.0, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

fn b64url(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// An EdDSA-signed token over `claims` with key id `kid`.
fn sign(pair: &ring::signature::Ed25519KeyPair, kid: &str, claims: Value) -> String {
    let header = b64url(json!({"alg": "EdDSA", "kid": kid}).to_string().as_bytes());
    let input = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    format!("{input}.{}", b64url(pair.sign(input.as_bytes()).as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_credentials_are_trusted_only_where_the_policy_says_so() {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
                                "x": b64url(pair.public_key().as_ref())}]});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    // A second issuer whose keys are found through OpenID Connect discovery.
    let realm = format!("http://{}/realm", listener.local_addr().unwrap());
    let discovery = json!({"issuer": realm, "jwks_uri": jwks_url});
    let app = axum::Router::new()
        .route(
            "/jwks.json",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move { axum::Json(jwks) }
            }),
        )
        .route(
            "/realm/.well-known/openid-configuration",
            axum::routing::get(move || {
                let discovery = discovery.clone();
                async move { axum::Json(discovery) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let e = env().await;
    guarded_pay(
        &e,
        json!({"name": "tokens", "type": "jwt", "scope": "service", "target": "pay",
               "config": {"trust_credentials": true, "audiences": ["pay"]}}),
    )
    .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "web-idp", "application": "web", "type": "jwt",
               "issuer": "https://idp.shop.test", "jwks_url": jwks_url}),
    )
    .await;
    e.post("/teams/shop/applications", json!({"name": "mobile"}))
        .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "mobile-idp", "application": "mobile", "type": "jwt",
               "issuer": realm, "discovery": true}),
    )
    .await;
    // Two key sources at once are ambiguous: the credential is left out.
    e.post(
        "/teams/shop/credentials",
        json!({"name": "both", "application": "mobile", "type": "jwt",
               "issuer": "https://both.test", "jwks_url": jwks_url, "discovery": true}),
    )
    .await;
    e.settled().await;

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let token = sign(
        &pair,
        "k1",
        json!({"iss": "https://idp.shop.test", "aud": "pay", "sub": "u", "exp": exp}),
    );
    let (status, echo) = bearer(&e, &token).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    let discovered = sign(
        &pair,
        "k1",
        json!({"iss": realm, "aud": "pay", "sub": "u", "exp": exp}),
    );
    let (status, echo) = bearer(&e, &discovered).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "mobile");
    let ambiguous = sign(
        &pair,
        "k1",
        json!({"iss": "https://both.test", "aud": "pay", "exp": exp}),
    );
    assert_eq!(bearer(&e, &ambiguous).await.0, 401);

    // An issuer no credential names is not trusted; nor is a wrong audience.
    let other = sign(
        &pair,
        "k1",
        json!({"iss": "https://idp.other.test", "aud": "pay", "exp": exp}),
    );
    let (status, body) = bearer(&e, &other).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "credential_invalid");
    let wrong_aud = sign(
        &pair,
        "k1",
        json!({"iss": "https://idp.shop.test", "aud": "web", "exp": exp}),
    );
    assert_eq!(bearer(&e, &wrong_aud).await.0, 401);
}

/// A POST to the Admin API expected to fail: the status and the error body.
async fn refused(e: &Env, path: &str, body: Value) -> (u16, Value) {
    let resp = e
        .http
        .post(format!("{}{path}", e.admin))
        .bearer_auth(&e.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A GET of `/pay` signed per RFC 9421 with hmac-sha256 over `@method` and `@target-uri`.
async fn signed_get(e: &Env, key_id: &str, secret: &[u8]) -> (u16, Value) {
    use base64::Engine;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let url = format!("{}/pay", e.gateway);
    let params = format!(r#"("@method" "@target-uri");created={created};keyid="{key_id}""#);
    let base = format!("\"@method\": GET\n\"@target-uri\": {url}\n\"@signature-params\": {params}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mac = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, base.as_bytes()).as_ref());
    let resp = e
        .http
        .get(url)
        .header("signature-input", format!("sig1={params}"))
        .header("signature", format!("sig1=:{mac}:"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_credentials_verify_message_signatures_with_a_secret_the_api_never_holds() {
    // SAFETY: set before the gateway starts, to the same value in every test of the file;
    // under nextest each test is its own process.
    unsafe { std::env::set_var("TURNPIKE_SECRET_TEST_CONTROL_HMAC", "shop-hmac-s3cret") };
    let e = env().await;
    guarded_pay(
        &e,
        json!({"name": "signed", "type": "hmac_auth", "scope": "service", "target": "pay",
               "config": {"max_age": "60s"}}),
    )
    .await;

    // A credential must name an existing secret of its team.
    let (status, body) = refused(
        &e,
        "/teams/shop/credentials",
        json!({"name": "web-sig", "application": "web", "type": "hmac",
               "key_id": "web-key-1", "secret": "nope"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "secret", "{body}");

    e.post(
        "/teams/shop/secrets",
        json!({"name": "web-hmac", "source": {"env": "TURNPIKE_SECRET_TEST_CONTROL_HMAC"}}),
    )
    .await;
    let created = e
        .post(
            "/teams/shop/credentials",
            json!({"name": "web-sig", "application": "web", "type": "hmac",
                   "key_id": "web-key-1", "secret": "web-hmac"}),
        )
        .await;
    let read = e
        .admin(
            reqwest::Method::GET,
            "/teams/shop/credentials/web-sig",
            json!(null),
        )
        .await;
    for shown in [&created, &read] {
        assert_eq!(shown["spec"]["key_id"], "web-key-1", "{shown}");
        assert!(
            !shown.to_string().contains("shop-hmac-s3cret"),
            "the secret's value never leaves: {shown}"
        );
    }
    // Key ids are unique across teams: the gateway finds a secret by key id alone.
    e.post("/teams", json!({"name": "rival"})).await;
    e.post("/teams/rival/applications", json!({"name": "bot"}))
        .await;
    e.post(
        "/teams/rival/secrets",
        json!({"name": "bot-hmac", "source": {"env": "TURNPIKE_SECRET_TEST_CONTROL_HMAC"}}),
    )
    .await;
    let (status, body) = refused(
        &e,
        "/teams/rival/credentials",
        json!({"name": "bot-sig", "application": "bot", "type": "hmac",
               "key_id": "web-key-1", "secret": "bot-hmac"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    e.settled().await;

    let (status, echo) = signed_get(&e, "web-key-1", b"shop-hmac-s3cret").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");

    let (status, body) = signed_get(&e, "web-key-1", b"guessed").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "credential_invalid");
    let (status, body) = signed_get(&e, "web-key-2", b"shop-hmac-s3cret").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key id"),
        "{body}"
    );
}

/// A CA and client certificates it signs, on disk for the listener's `client_auth`.
struct ClientPki {
    dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate (DER) and its key.
struct Issued {
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

impl ClientPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A certificate for DNS name `name` (also its CN), for a server or a client.
    fn issue(&self, name: &str, client: bool) -> Issued {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(
            self.dir.path().join(format!("{name}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
        Issued {
            cert: cert.der().clone(),
            key: key.serialize_der().into(),
        }
    }
}

/// `GET path` over TLS with `client`'s certificate, trusting `pki`'s CA for the gateway
/// (`gateway.test`): the status and the JSON body.
async fn get_with_cert(e: &Env, pki: &ClientPki, client: &Issued, path: &str) -> (u16, Value) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client.cert.clone()], client.key.clone_key().into())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(e.gateway_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("gateway.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut raw),
    );
    // A peer that closes without close_notify is fine once the whole response is in.
    let _ = read.await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_credentials_map_client_certificates_to_their_application() {
    let pki = ClientPki::new();
    pki.issue("gateway.test", false);
    let web = pki.issue("web.clients.test", true);
    let stranger = pki.issue("stranger.clients.test", true);
    let listener: turnpike_model::ListenerConfig = serde_json::from_value(json!({
        "address": "127.0.0.1:0",
        "tls": {
            "certificates": [{"cert": pki.path("gateway.test.pem"),
                              "key": pki.path("gateway.test-key.pem")}],
            "client_auth": {"ca": pki.path("ca.pem")}
        }
    }))
    .unwrap();
    let e = env_with_listener(listener).await;
    guarded_pay(
        &e,
        json!({"name": "certs", "type": "mtls", "scope": "service", "target": "pay",
               "config": {"match": ["san"]}}),
    )
    .await;
    e.post(
        "/teams/shop/credentials",
        json!({"name": "web-cert", "application": "web", "type": "mtls",
               "san": "web.clients.test"}),
    )
    .await;
    e.settled().await;

    let (status, echo) = get_with_cert(&e, &pki, &web, "/pay").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "web");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
    let (status, body) = get_with_cert(&e, &pki, &stranger, "/pay").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "credential_invalid");

    // One certificate name, one application: another team cannot claim it, in any case.
    e.post("/teams", json!({"name": "evil"})).await;
    e.post("/teams/evil/applications", json!({"name": "thief"}))
        .await;
    let claim = |name: &str, extra: Value| {
        let mut spec = json!({"name": name, "application": "thief", "type": "mtls"});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e.http
            .post(format!("{}/teams/evil/credentials", e.admin))
            .bearer_auth(&e.token)
            .json(&spec)
            .send()
    };
    let resp = claim("steal", json!({"san": "WEB.clients.test"}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let resp = claim("both", json!({"san": "x.test", "subject": "CN=x"}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "subject", "{body}");
    let resp = claim("neither", json!({})).await.unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    e.settled().await;
    let (status, echo) = get_with_cert(&e, &pki, &web, "/pay").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-team"], "shop");
}
