//! Authentication methods end to end: the real gateway in-process against mock upstreams and
//! mock identity services (an OAuth2 introspection endpoint) on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

fn error_code(r: &Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// OAuth2 token introspection (RFC 7662)
// ---------------------------------------------------------------------------------------

const SECRET_ENV: &str = "TURNPIKE_TEST_INTROSPECTION_SECRET";
const SECRET: &str = "gw-s3cret:&";

fn set_secret() {
    // SAFETY: each test runs in its own process under nextest, and this runs before the
    // gateway (and any thread that reads the environment) starts; the value is the same
    // in every test, so a concurrent writer under `cargo test` writes what is there.
    unsafe { std::env::set_var(SECRET_ENV, SECRET) };
}

/// A mock introspection endpoint. It checks the gateway's client authentication and form,
/// answers by token, and counts its calls per token.
struct Idp {
    mock: Mock,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    down: Arc<AtomicBool>,
}

impl Idp {
    async fn start() -> Self {
        let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let (c, d) = (calls.clone(), down.clone());
        let expected_auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("gateway:gw-s3cret%3A%26")
        );
        let mock = Mock::start(move |req| {
            let (calls, down, expected_auth) = (c.clone(), d.clone(), expected_auth.clone());
            async move {
                let auth_ok = req
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v == expected_auth.as_str());
                let form_type = req
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/x-www-form-urlencoded");
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let form: HashMap<String, String> = form_urlencoded::parse(&body)
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                let token = form.get("token").cloned().unwrap_or_default();
                *calls.lock().unwrap().entry(token.clone()).or_default() += 1;
                let status = |s: u16, body: &str| {
                    let mut r = Response::new(full(body.to_owned()));
                    *r.status_mut() = StatusCode::from_u16(s).unwrap();
                    r
                };
                if down.load(Ordering::SeqCst) {
                    return status(500, "down");
                }
                if !auth_ok || !form_type {
                    return status(401, r#"{"error":"invalid_client"}"#);
                }
                if form.get("token_type_hint").map(String::as_str) != Some("access_token") {
                    return status(400, r#"{"error":"invalid_request"}"#);
                }
                let base = serde_json::json!({
                    "active": true, "client_id": "mobile-app", "sub": "user-1",
                    "iss": "https://idp.test", "aud": ["shop", "other"],
                    "scope": "orders:read orders:write", "exp": now() + 300,
                    "tenant": "acme",
                });
                let mut answer = base.clone();
                match token.as_str() {
                    "good" | "good2" | "query-token" => {}
                    "readonly" => answer["scope"] = "orders:list".into(),
                    "tok-expired" => answer["exp"] = (now() - 600).into(),
                    "tok-future" => answer["nbf"] = (now() + 600).into(),
                    "tok-stranger" => answer["client_id"] = "nobody-knows".into(),
                    "tok-web" => answer["aud"] = "web".into(),
                    "garbage" => return status(200, "<html>not json</html>"),
                    _ => answer = serde_json::json!({"active": false}),
                }
                status(200, &answer.to_string())
            }
        })
        .await;
        Self { mock, calls, down }
    }

    fn calls(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }

    fn url(&self) -> String {
        format!("http://{}/introspect", self.mock.addr)
    }
}

fn introspection_policy(name: &str, scope: &str, endpoint: &str, extra: &str) -> String {
    format!(
        r#"
  - name: {name}
    type: oauth2_introspection
    {scope}
    config:
      endpoint: "{endpoint}"
      client_id: gateway
      client_secret_env: {SECRET_ENV}
      issuer: "https://idp.test"
      audiences: [shop]
      leeway: 5s
{extra}"#
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn introspection_valid_inactive_expired_unmapped_and_wrong_audience() {
    set_secret();
    let up = echo().await;
    let idp = Idp::start().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            "consumers:\n  - {{name: mobile, oauth_clients: [mobile-app]}}\npolicies:{}",
            introspection_policy(
                "introspect",
                "scope: global",
                &idp.url(),
                "      query: access_token\n      hide_credentials: true\n"
            )
        ),
    ))
    .await;

    let ok = call(&gw, "GET", "/api", &[("authorization", &bearer("good"))]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let seen = ok.json();
    assert_eq!(seen["headers"]["x-consumer-name"], "mobile");
    assert_eq!(seen["headers"]["x-consumer-id"], "mobile");
    assert_eq!(
        seen["headers"]["x-authenticated-scopes"],
        "orders:read orders:write"
    );
    assert!(
        seen["headers"].get("authorization").is_none(),
        "hide_credentials removes the token: {seen}"
    );

    // The token may come in the configured query parameter, removed before the upstream.
    let q = call(&gw, "GET", "/api/x?a=1&access_token=query-token", &[]).await;
    assert_eq!(q.status, StatusCode::OK, "{}", q.text());
    assert_eq!(q.json()["path"], "/api/x?a=1");
    assert_eq!(idp.calls("query-token"), 1);

    for (token, why) in [
        ("tok-revoked", "not active"),
        ("tok-expired", "expired"),
        ("tok-future", "not valid yet"),
        ("tok-stranger", "no application"),
        ("tok-web", "audience"),
    ] {
        let r = call(&gw, "GET", "/api", &[("authorization", &bearer(token))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token}: {}", r.text());
        assert_eq!(error_code(&r), "credential_invalid", "{token}");
        assert!(r.text().contains(why), "{token}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{token}");
        assert!(!r.text().contains(token), "the token is never echoed");
    }

    let none = call(&gw, "GET", "/api", &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&none), "credential_missing");
    // No token, no call.
    assert_eq!(idp.calls(""), 0);

    // A malformed answer is the endpoint's failure, not the client's.
    let garbage = call(&gw, "GET", "/api", &[("authorization", &bearer("garbage"))]).await;
    assert_eq!(garbage.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&garbage), "auth_unavailable");
}

#[tokio::test]
async fn introspection_answers_are_cached_and_calls_shared() {
    set_secret();
    let up = echo().await;
    let idp = Idp::start().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            "consumers:\n  - {{name: mobile, oauth_clients: [mobile-app]}}\npolicies:{}",
            introspection_policy(
                "introspect",
                "scope: global",
                &idp.url(),
                "      negative_cache_ttl: 1h\n"
            )
        ),
    ))
    .await;

    // Many requests at once with one uncached token: one call.
    let auth = bearer("good");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (url, auth) = (gw.url("/api"), auth.clone());
        tasks.push(tokio::spawn(async move {
            send(
                req("GET", &url)
                    .header("authorization", auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(idp.calls("good"), 1);
    // And later ones hit the cache.
    for _ in 0..5 {
        assert_eq!(
            call(&gw, "GET", "/api", &[("authorization", &auth)])
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(idp.calls("good"), 1);

    // Inactive answers are cached too (for `negative_cache_ttl`).
    for _ in 0..3 {
        let r = call(&gw, "GET", "/api", &[("authorization", &bearer("revoked"))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(idp.calls("revoked"), 1);
    // Another token is another call.
    assert_eq!(
        call(&gw, "GET", "/api", &[("authorization", &bearer("good2"))])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(idp.calls("good2"), 1);
}

#[tokio::test]
async fn introspection_endpoint_down_is_503_with_a_short_backoff() {
    set_secret();
    let up = echo().await;
    let idp = Idp::start().await;
    let dead = format!("http://{}/introspect", dead_addr().await);
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            "consumers:\n  - {{name: mobile, oauth_clients: [mobile-app]}}\npolicies:{}{}",
            // No backoff: every request after a failure calls again.
            introspection_policy(
                "flaky",
                "scope: route\n    target: api",
                &idp.url(),
                "      failure_backoff: 0s\n"
            ),
            // A long backoff: after a failure, no call for a while.
            introspection_policy(
                "patient",
                "scope: route\n    target: open",
                &idp.url(),
                "      failure_backoff: 1h\n"
            ),
        ),
    ))
    .await;
    let auth = bearer("good");

    idp.down.store(true, Ordering::SeqCst);
    let r = call(&gw, "GET", "/open", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(error_code(&r), "auth_unavailable");
    assert_eq!(idp.calls("good"), 1);
    // Within the backoff, no new call.
    let r = call(&gw, "GET", "/open", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(idp.calls("good"), 1);

    let r = call(&gw, "GET", "/api", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(idp.calls("good"), 2);
    // The failure was not cached: once the endpoint is back, the token works.
    idp.down.store(false, Ordering::SeqCst);
    let r = call(&gw, "GET", "/api", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(idp.calls("good"), 3);

    // An endpoint nobody listens on: a clear 503, not a hang.
    let gw2 = Gw::start(&yaml(
        up.addr,
        &format!(
            "consumers:\n  - {{name: mobile, oauth_clients: [mobile-app]}}\npolicies:{}",
            introspection_policy("unreachable", "scope: global", &dead, "      timeout: 2s\n"),
        ),
    ))
    .await;
    let r = call(&gw2, "GET", "/api", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(error_code(&r), "auth_unavailable");
}

#[tokio::test]
async fn introspected_scopes_and_claims_reach_an_acl() {
    set_secret();
    let up = echo().await;
    let idp = Idp::start().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"consumers:
  - {{name: mobile, groups: [partners], oauth_clients: [mobile-app]}}
policies:{}
  - name: rules
    type: acl
    scope: route
    target: api
    config: {{allow_groups: [partners], required_scopes: [orders:read], required_claims: {{tenant: [acme]}}}}
"#,
            introspection_policy("introspect", "scope: global", &idp.url(), "")
        ),
    ))
    .await;
    let ok = call(&gw, "GET", "/api", &[("authorization", &bearer("good"))]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let narrow = call(
        &gw,
        "GET",
        "/api",
        &[("authorization", &bearer("readonly"))],
    )
    .await;
    assert_eq!(narrow.status, StatusCode::FORBIDDEN, "{}", narrow.text());
    assert_eq!(error_code(&narrow), "insufficient_scope");
    // The other route has no acl: the narrower token is fine there.
    let open = call(
        &gw,
        "GET",
        "/open",
        &[("authorization", &bearer("readonly"))],
    )
    .await;
    assert_eq!(open.status, StatusCode::OK);
}

#[tokio::test]
async fn introspection_config_errors_name_the_field() {
    let up = echo().await;
    let cfg = config(&yaml(
        up.addr,
        r#"
policies:
  - name: introspect
    type: oauth2_introspection
    scope: global
    config:
      endpoint: "http://127.0.0.1:9/introspect"
      client_id: gateway
      client_secret_env: TURNPIKE_TEST_UNSET_SECRET_VARIABLE
"#,
    ));
    let err = turnpike_proxy::gateway::Gateway::start(&cfg)
        .await
        .err()
        .expect("a missing secret must fail the configuration")
        .to_string();
    assert!(
        err.contains("policies[0].config.client_secret_env"),
        "{err}"
    );
    let cfg = yaml(
        up.addr,
        r#"
consumers:
  - {name: a, oauth_clients: [same]}
  - {name: b, oauth_clients: [same]}
policies:
  - name: introspect
    type: oauth2_introspection
    scope: global
    config: {endpoint: "ftp://x/introspect", client_id: gateway, client_secret_env: X}
"#,
    );
    let source = turnpike_model::Source {
        file: "t.yaml".into(),
        text: cfg,
    };
    let parsed = turnpike_model::parse(&source, turnpike_model::Format::Yaml).unwrap();
    let errs = turnpike_model::validate(&parsed).unwrap_err().to_string();
    assert!(errs.contains("consumers[1].oauth_clients[0]"), "{errs}");
    assert!(errs.contains("policies[0].config.endpoint"), "{errs}");
}

// ---------------------------------------------------------------------------------------
// JWT with keys from a JWKS URL
// ---------------------------------------------------------------------------------------

/// An Ed25519 signing key and its JWK.
struct SigningKey {
    pair: ring::signature::Ed25519KeyPair,
    kid: String,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Self {
            pair,
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        use ring::signature::KeyPair;
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": self.kid, "alg": "EdDSA", "use": "sig",
            "x": b64url(self.pair.public_key().as_ref()),
        })
    }

    fn sign(&self, claims: serde_json::Value) -> String {
        let header = b64url(
            serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid})
                .to_string()
                .as_bytes(),
        );
        let input = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
        let sig = self.pair.sign(input.as_bytes());
        format!("{input}.{}", b64url(sig.as_ref()))
    }
}

fn b64url(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A JWKS endpoint serving whatever `keys` holds now; 503 while `down`.
async fn jwks_server(keys: Arc<Mutex<Vec<serde_json::Value>>>, down: Arc<AtomicBool>) -> Mock {
    Mock::start(move |_req| {
        let (keys, down) = (keys.clone(), down.clone());
        async move {
            if down.load(Ordering::SeqCst) {
                let mut r = Response::new(full("down"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            let doc = serde_json::json!({"keys": *keys.lock().unwrap()});
            Response::new(full(doc.to_string()))
        }
    })
    .await
}

#[tokio::test]
async fn jwt_keys_from_a_jwks_url_with_rotation() {
    let up = echo().await;
    let old = SigningKey::new("k-old");
    let new = SigningKey::new("k-new");
    let stranger = SigningKey::new("k-old");
    let keys = Arc::new(Mutex::new(vec![old.jwk()]));
    let down = Arc::new(AtomicBool::new(false));
    let jwks = jwks_server(keys.clone(), down.clone()).await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: partner}}
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers:
        - {{issuer: "https://idp.test", jwks_url: "http://{}/jwks.json", application: partner}}
      audiences: [shop]
      jwks_min_refresh: 0s
"#,
            jwks.addr
        ),
    ))
    .await;
    let claims = |aud: &str| {
        serde_json::json!({"iss": "https://idp.test", "aud": aud, "sub": "u1",
                           "exp": now() + 60, "scope": "a b"})
    };

    // The first token fetches the JWKS; the next ones use the cached keys.
    let token = format!("Bearer {}", old.sign(claims("shop")));
    let ok = call(&gw, "GET", "/api", &[("authorization", &token)]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.json()["headers"]["x-consumer-name"], "partner");
    assert_eq!(ok.json()["headers"]["x-authenticated-scopes"], "a b");
    assert_eq!(
        call(&gw, "GET", "/api", &[("authorization", &token)])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(jwks.hits(), 1);

    // Invalid: a key with the right kid but another secret, the wrong audience.
    let forged = format!("Bearer {}", stranger.sign(claims("shop")));
    let r = call(&gw, "GET", "/api", &[("authorization", &forged)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(error_code(&r), "credential_invalid");
    let r = call(
        &gw,
        "GET",
        "/api",
        &[(
            "authorization",
            &format!("Bearer {}", old.sign(claims("web"))),
        )],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Rotation: a token with a kid the cache lacks makes the gateway fetch again.
    keys.lock().unwrap().push(new.jwk());
    let before = jwks.hits();
    let rotated = format!("Bearer {}", new.sign(claims("shop")));
    let r = call(&gw, "GET", "/api", &[("authorization", &rotated)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(jwks.hits(), before + 1);

    // The JWKS endpoint failing does not break tokens whose keys are cached.
    down.store(true, Ordering::SeqCst);
    assert_eq!(
        call(&gw, "GET", "/api", &[("authorization", &token)])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn jwt_jwks_url_unreachable_is_503() {
    let up = echo().await;
    let key = SigningKey::new("k1");
    let dead = dead_addr().await;
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers: [{{issuer: "https://idp.test", jwks_url: "http://{dead}/jwks.json"}}]
"#
        ),
    ))
    .await;
    let token = format!(
        "Bearer {}",
        key.sign(serde_json::json!({"iss": "https://idp.test", "exp": now() + 60}))
    );
    let r = call(&gw, "GET", "/api", &[("authorization", &token)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(error_code(&r), "auth_unavailable");
}

/// An OpenID provider on 127.0.0.1: `/realm/.well-known/openid-configuration` names the
/// issuer `issuer` holds and `jwks_uri` (relative to the server, set by the test), and any
/// other path serves the JWKS of `keys`. Every path asked for is recorded.
struct OpenIdProvider {
    mock: Mock,
    issuer: Arc<Mutex<String>>,
    jwks_path: Arc<Mutex<String>>,
    keys: Arc<Mutex<HashMap<String, Vec<serde_json::Value>>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl OpenIdProvider {
    async fn start() -> Self {
        let issuer: Arc<Mutex<String>> = Arc::default();
        let jwks_path = Arc::new(Mutex::new("/realm/keys".to_owned()));
        let keys: Arc<Mutex<HashMap<String, Vec<serde_json::Value>>>> = Arc::default();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let (i, j, k, a) = (
            issuer.clone(),
            jwks_path.clone(),
            keys.clone(),
            asked.clone(),
        );
        let mock = Mock::start(move |req| {
            let (issuer, jwks_path, keys, asked) = (i.clone(), j.clone(), k.clone(), a.clone());
            async move {
                let path = req.uri().path().to_owned();
                asked.lock().unwrap().push(path.clone());
                let host = req.headers()["host"].to_str().unwrap().to_owned();
                let body = if path == "/realm/.well-known/openid-configuration" {
                    serde_json::json!({
                        "issuer": *issuer.lock().unwrap(),
                        "jwks_uri": format!("http://{host}{}", jwks_path.lock().unwrap()),
                        "id_token_signing_alg_values_supported": ["EdDSA"],
                    })
                } else {
                    let keys = keys.lock().unwrap().get(&path).cloned().unwrap_or_default();
                    serde_json::json!({ "keys": keys })
                };
                Response::new(full(body.to_string()))
            }
        })
        .await;
        *issuer.lock().unwrap() = format!("http://{}/realm", mock.addr);
        Self {
            mock,
            issuer,
            jwks_path,
            keys,
            asked,
        }
    }

    fn issuer(&self) -> String {
        format!("http://{}/realm", self.mock.addr)
    }

    fn asked(&self) -> Vec<String> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }
}

#[tokio::test]
async fn jwt_keys_through_openid_connect_discovery() {
    let up = echo().await;
    let idp = OpenIdProvider::start().await;
    let (first, moved) = (SigningKey::new("k1"), SigningKey::new("k2"));
    idp.keys
        .lock()
        .unwrap()
        .insert("/realm/keys".into(), vec![first.jwk()]);
    let iss = idp.issuer();
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
consumers:
  - {{name: partner}}
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers: [{{issuer: "{iss}/", discovery: true, application: partner}}]
      jwks_min_refresh: 0s
"#
        ),
    ))
    .await;
    let bearer = |key: &SigningKey| {
        format!(
            "Bearer {}",
            key.sign(serde_json::json!({"iss": format!("{iss}/"), "exp": now() + 60}))
        )
    };

    // The issuer's trailing `/` is dropped before the well-known path (OIDC Discovery §4);
    // the document's `issuer` must still be the configured one, so the provider says it
    // with the `/` too.
    *idp.issuer.lock().unwrap() = format!("{iss}/");
    let r = call(&gw, "GET", "/api", &[("authorization", &bearer(&first))]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer-name"], "partner");
    assert_eq!(
        idp.asked(),
        ["/realm/.well-known/openid-configuration", "/realm/keys"]
    );

    // The provider moves its keys: a token with an unknown kid makes the gateway read the
    // discovery document again and follow the new `jwks_uri`.
    *idp.jwks_path.lock().unwrap() = "/realm/keys-v2".into();
    idp.keys
        .lock()
        .unwrap()
        .insert("/realm/keys-v2".into(), vec![moved.jwk()]);
    let r = call(&gw, "GET", "/api", &[("authorization", &bearer(&moved))]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        idp.asked(),
        ["/realm/.well-known/openid-configuration", "/realm/keys-v2"]
    );
}

#[tokio::test]
async fn jwt_discovery_document_for_another_issuer_gives_no_keys() {
    let up = echo().await;
    let idp = OpenIdProvider::start().await;
    let key = SigningKey::new("k1");
    idp.keys
        .lock()
        .unwrap()
        .insert("/realm/keys".into(), vec![key.jwk()]);
    // The document at the configured URL claims to be another issuer's: its keys must not
    // become this issuer's.
    *idp.issuer.lock().unwrap() = "https://evil.test".into();
    let gw = Gw::start(&yaml(
        up.addr,
        &format!(
            r#"
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers:
        - issuer: "https://idp.test"
          discovery_url: "{}/.well-known/openid-configuration"
"#,
            idp.issuer()
        ),
    ))
    .await;
    let token = format!(
        "Bearer {}",
        key.sign(serde_json::json!({"iss": "https://idp.test", "exp": now() + 60}))
    );
    let r = call(&gw, "GET", "/api", &[("authorization", &token)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(error_code(&r), "auth_unavailable");
    // The keys were never fetched.
    assert_eq!(idp.asked(), ["/realm/.well-known/openid-configuration"]);
}

#[tokio::test]
async fn introspection_calls_in_flight_are_capped() {
    set_secret();
    let up = echo().await;
    // Permits, not notifications: a handler that reaches the wait late still gets one.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let r2 = release.clone();
    // An authorization server that holds `slow-*` tokens until released.
    let idp = Mock::start(move |req| {
        let release = r2.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let slow = String::from_utf8_lossy(&body).contains("token=slow");
            if slow {
                let _ = release.acquire().await;
            }
            let answer = serde_json::json!({
                "active": !slow, "client_id": "mobile-app", "iss": "https://idp.test",
                "aud": "shop", "exp": now() + 300,
            });
            Response::new(full(answer.to_string()))
        }
    })
    .await;
    let gw = Arc::new(
        Gw::start(&yaml(
            up.addr,
            &format!(
                "consumers:\n  - {{name: mobile, oauth_clients: [mobile-app]}}\npolicies:{}",
                introspection_policy(
                    "introspect",
                    "scope: global",
                    &format!("http://{}/introspect", idp.addr),
                    "      max_concurrent_calls: 2\n      timeout: 30s\n"
                )
            ),
        ))
        .await,
    );
    let mut slow = Vec::new();
    for t in ["slow-a", "slow-b"] {
        let gw = gw.clone();
        slow.push(tokio::spawn(async move {
            call(&gw, "GET", "/api", &[("authorization", &bearer(t))])
                .await
                .status
        }));
    }
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            idp.hits() == 2
        })
        .await
    );
    // Two calls in flight: a third uncached token is refused without a call.
    let r = call(&gw, "GET", "/api", &[("authorization", &bearer("good"))]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&r), "auth_unavailable");
    assert_eq!(idp.hits(), 2);
    release.add_permits(2);
    for t in slow {
        assert_eq!(t.await.unwrap(), StatusCode::UNAUTHORIZED);
    }
    // No failure backoff was entered: the token works as soon as a slot is free.
    let r = call(&gw, "GET", "/api", &[("authorization", &bearer("good"))]).await;
    assert_eq!(r.status, StatusCode::OK);
}
