//! `request_transform`, `response_transform` and `compression` end to end: the real gateway
//! in front of mock upstreams that report what they received or answer what a test needs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// An upstream answering with what it received: method, path and query, headers, body.
async fn inspector() -> Mock {
    Mock::start(|req| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), json!(v.to_str().unwrap_or(""))))
            .collect();
        let answer = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        let mut r = Response::new(full(answer.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await
}

/// A gateway whose route `api` (`/api`, plus `/users/{id}` as route `users`) has the
/// policies in `policies` (YAML list items).
async fn gw(upstream: std::net::SocketAddr, policies: &str) -> Gw {
    Gw::start(&format!(
        r#"
upstreams:
  - name: up
    targets: [{{address: "{upstream}"}}]
routes:
  - {{name: api, paths: [{{prefix: /api}}], upstream: up}}
  - {{name: users, paths: [{{template: "/users/{{id}}"}}], upstream: up}}
consumers:
  - {{name: shop}}
policies:
  - name: tokens
    type: jwt
    scope: global
    config:
      issuers: [{{issuer: "https://idp.test", secret: "{SECRET}"}}]
      consumer_claim: azp
{policies}"#
    ))
    .await
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn token(claims: Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(json!({"alg": "HS256", "typ": "JWT"}).to_string().as_bytes());
    let payload = b64(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn bearer() -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    format!(
        "Bearer {}",
        token(
            json!({"iss": "https://idp.test", "sub": "user-7", "azp": "shop", "exp": exp, "tier": "gold", "roles": ["a", "b"]})
        )
    )
}

async fn post(gw: &Gw, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut r = req("POST", &gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

#[tokio::test]
async fn request_headers_with_every_template_variable() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: request_transform
    scope: route
    target: users
    config:
      headers:
        remove: [x-debug]
        rename: {x-old: x-new}
        set:
          x-app: "${app.id}/${app.name}"
          x-user: "${jwt.sub} ${jwt.tier} ${jwt.roles}"
          x-id: "user-${param.id}"
          x-from: "${client_ip} ${request_id}"
          x-echo: "${header.x-in}|${query.q}|${method}|${path}|${route}|${header.absent}"
          x-replaced: new
        add:
          x-multi: two
"#,
    )
    .await;
    let auth = bearer();
    let r = call(
        &gw,
        "GET",
        "/users/42?q=a%20b",
        &[
            ("authorization", &auth),
            ("x-debug", "1"),
            ("x-old", "kept"),
            ("x-in", "hello"),
            ("x-replaced", "old"),
            ("x-multi", "one"),
            ("x-request-id", "rid-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-app"], "shop/shop");
    assert_eq!(h["x-user"], r#"user-7 gold ["a","b"]"#);
    assert_eq!(h["x-id"], "user-42");
    assert_eq!(h["x-from"], "127.0.0.1 rid-1");
    assert_eq!(h["x-echo"], "hello|a b|GET|/users/42|users|");
    assert_eq!(h["x-replaced"], "new");
    assert_eq!(h["x-new"], "kept");
    assert!(h.get("x-old").is_none() && h.get("x-debug").is_none());
    // The mock joins repeated headers by keeping the last: check both arrived another way.
    assert!(h["x-multi"] == "one" || h["x-multi"] == "two");
}

#[tokio::test]
async fn query_path_and_method_rewrites() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: request_transform
    scope: route
    target: users
    config:
      method: POST
      path: "/v2/accounts/${param.id}/${header.x-part}"
      query:
        remove: [secret]
        rename: {q: search}
        set: {page: "1"}
        add: {by: "${jwt.sub}"}
"#,
    )
    .await;
    let auth = bearer();
    let r = call(
        &gw,
        "GET",
        "/users/7?q=x%26y&secret=s&page=9",
        &[("authorization", &auth), ("x-part", "a b/c")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(
        j["path"], "/v2/accounts/7/a%20b/c?search=x%26y&page=1&by=user-7",
        "variables are percent-encoded in the path; untouched parameters keep their bytes"
    );
    // A value cannot climb out of the template's prefix.
    for part in ["../../admin", "%2e%2e"] {
        let r = call(
            &gw,
            "GET",
            "/users/7",
            &[("authorization", &auth), ("x-part", part)],
        )
        .await;
        assert_eq!(r.status, 400, "{part}");
        assert_eq!(r.json()["error"]["code"], "request_transform_failed");
    }
    // Untouched parameters keep their exact bytes: bare flags, escapes, `+`.
    let r = call(
        &gw,
        "GET",
        "/users/7?flag&name=%FF%FE&s=a+b%20c",
        &[("authorization", &auth), ("x-part", "p")],
    )
    .await;
    assert_eq!(
        r.json()["path"],
        "/v2/accounts/7/p?flag&name=%FF%FE&s=a+b%20c&page=1&by=user-7"
    );
}

#[tokio::test]
async fn json_request_body_operations() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: request_transform
    scope: route
    target: api
    config:
      body:
        ops:
          - {op: add, path: /meta/tenant, value: "${app.id}"}
          - {op: add, path: /meta/roles, value: "${jwt.roles}"}
          - {op: add, path: /items/-, value: {sku: "z", by: "${jwt.sub}"}}
          - {op: remove, path: /password}
          - {op: rename, path: /user_name, to: username}
          - {op: move, from: /legacy/email, path: /contact/email}
          - {op: copy, from: /username, path: /contact/name}
"#,
    )
    .await;
    let auth = bearer();
    let sent = json!({"user_name": "ada", "password": "p", "items": [{"sku": "a"}],
        "legacy": {"email": "ada@example.com"}});
    let r = post(
        &gw,
        "/api/orders",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-digest", "sha-256=:stale:"),
        ],
        &sent.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let body: Value = serde_json::from_str(j["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"username": "ada", "items": [{"sku": "a"}, {"sku": "z", "by": "user-7"}],
            "legacy": {}, "meta": {"tenant": "shop", "roles": ["a", "b"]},
            "contact": {"email": "ada@example.com", "name": "ada"}})
    );
    assert_eq!(
        j["headers"]["content-length"],
        j["body"].as_str().unwrap().len().to_string()
    );
    assert!(
        j["headers"].get("content-digest").is_none(),
        "a digest of the old bytes is dropped"
    );
    // Member order is kept: `username` took `user_name`'s place.
    assert!(
        j["body"]
            .as_str()
            .unwrap()
            .starts_with(r#"{"username":"ada""#)
    );

    // A body the transform cannot read is refused: a client must not slip past the rewrite
    // by mislabelling or encoding its body.
    for ct in [("content-type", "text/plain"), ("content-encoding", "gzip")] {
        let r = post(
            &gw,
            "/api/x",
            &[("authorization", &auth), ct],
            r#"{"password":"p"}"#,
        )
        .await;
        assert_eq!(r.status, 415, "{ct:?}");
        assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
    }
    // An empty body stays empty (only `shape` builds one).
    let r = call(
        &gw,
        "DELETE",
        "/api/x",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], "");
    // `Connection` cannot take away what the transform wrote.
    let r = post(
        &gw,
        "/api/x",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("connection", "content-type, content-length"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.json()["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn request_body_bounds_and_bad_bodies() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: request_transform
    scope: route
    target: api
    config:
      body:
        max_bytes: 64
        ops: [{op: remove, path: /a}]
"#,
    )
    .await;
    let auth = bearer();
    let json_ct = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(100));
    let r = post(&gw, "/api/x", &json_ct, &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    let r = post(&gw, "/api/x", &json_ct, "{not json").await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "request_transform_failed");
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"));
    assert!(e["request_id"].as_str().is_some());
    // A streamed body (no Content-Length) past the bound too.
    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b' '; 16])))
    }));
    let r = send_stream(&gw, "/api/x", &json_ct, chunks).await;
    assert_eq!(r.status, 413);
    assert_eq!(up.hits(), 0, "nothing refused reached the upstream");
}

#[tokio::test]
async fn xml_request_to_json_and_json_to_a_soap_envelope() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: to-json
    type: request_transform
    scope: route
    target: api
    config:
      body: {from: xml, to: json, xml: {strip_namespaces: true}}
  - name: to-soap
    type: request_transform
    scope: route
    target: users
    config:
      body:
        to: xml
        shape: {GetUser: {"@xmlns": "urn:users", id: "${param.id}", fields: "${body/fields}"}}
        xml: {soap: "1.1"}
"#,
    )
    .await;
    let auth = bearer();
    let r = post(
        &gw,
        "/api/x",
        &[("authorization", &auth), ("content-type", "text/xml")],
        r#"<m:order xmlns:m="urn:m" id="3"><m:line>1</m:line><m:line>2</m:line></m:order>"#,
    )
    .await;
    let j = r.json();
    assert_eq!(j["headers"]["content-type"], "application/json");
    assert_eq!(
        serde_json::from_str::<Value>(j["body"].as_str().unwrap()).unwrap(),
        json!({"order": {"@id": 3, "line": [1, 2]}})
    );

    let r = post(
        &gw,
        "/users/9",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"fields": ["name", "email"]}"#,
    )
    .await;
    let j = r.json();
    assert_eq!(j["headers"]["content-type"], "text/xml; charset=utf-8");
    assert_eq!(
        j["body"],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body><GetUser xmlns=\"urn:users\"><id>9</id><fields>name</fields><fields>email</fields></GetUser></soap:Body></soap:Envelope>"
    );
}

/// An upstream answering `status`, `content-type` and `body`, with `x-up: 1`.
async fn answering(status: u16, content_type: &'static str, body: &'static str) -> Mock {
    Mock::start(move |req| async move {
        let mut r = Response::new(full(body));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        let h = r.headers_mut();
        h.insert("content-type", content_type.parse().unwrap());
        h.insert("x-up", "1".parse().unwrap());
        h.insert("etag", "\"v1\"".parse().unwrap());
        let ae = req
            .headers()
            .get("accept-encoding")
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        h.insert("x-seen-accept-encoding", ae.parse().unwrap());
        r
    })
    .await
}

#[tokio::test]
async fn response_status_headers_and_json_reshaping() {
    let up = answering(
        404,
        "application/json",
        r#"{"data": {"user": {"id": 5, "name": "Ada", "ssn": "x"}}, "debug": true}"#,
    )
    .await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: response_transform
    scope: route
    target: api
    config:
      status: {404: 200}
      headers:
        remove: [x-up]
        set: {x-upstream-status: "${status}", x-for: "${app.name} ${response.header.x-up}"}
      body:
        ops:
          - {op: remove, path: /data/user/ssn}
        shape: {id: "${body/data/user/id}", name: "${body/data/user/name}", requested: "${header.x-q}", missing: "${body/nope}"}
"#,
    )
    .await;
    let auth = bearer();
    let r = call(
        &gw,
        "GET",
        "/api/u",
        &[
            ("authorization", &auth),
            ("x-q", "q1"),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream-status"), Some("404"));
    assert_eq!(r.header("x-for"), Some("shop 1"));
    assert!(r.header("x-up").is_none());
    assert!(r.header("etag").is_none(), "the old bytes' ETag is dropped");
    assert_eq!(
        r.header("x-seen-accept-encoding"),
        Some("identity"),
        "the upstream is asked for an unencoded body"
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert_eq!(
        r.text(),
        r#"{"id":5,"name":"Ada","requested":"q1","missing":null}"#,
        "the shape's order, the values' types"
    );
}

#[tokio::test]
async fn xml_response_as_json_and_json_response_as_xml() {
    let soap = answering(
        200,
        "text/xml; charset=utf-8",
        r#"<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><GetUserResponse xmlns="urn:u"><user id="5"><name>Ada &amp; co</name><tags>a</tags></user></GetUserResponse></soap:Body></soap:Envelope>"#,
    )
    .await;
    let gw1 = gw(
        soap.addr,
        r#"
  - name: t
    type: response_transform
    scope: route
    target: api
    config:
      body:
        from: xml
        to: json
        xml: {strip_namespaces: true, arrays: [tags]}
        shape: "${body/Envelope/Body/GetUserResponse/user}"
"#,
    )
    .await;
    let auth = bearer();
    let r = call(&gw1, "GET", "/api/u", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({"@id": 5, "name": "Ada & co", "tags": ["a"]})
    );

    let json_up = answering(
        200,
        "application/json",
        r#"{"user": {"@id": 5, "name": "Ada"}}"#,
    )
    .await;
    let gw2 = gw(
        json_up.addr,
        r#"
  - name: t
    type: response_transform
    scope: route
    target: api
    config: {body: {to: xml}}
"#,
    )
    .await;
    let r = call(&gw2, "GET", "/api/u", &[("authorization", &auth)]).await;
    assert_eq!(
        r.header("content-type"),
        Some("application/xml; charset=utf-8")
    );
    assert_eq!(
        r.text(),
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><user id=\"5\"><name>Ada</name></user>"
    );
}

#[tokio::test]
async fn response_bounds_and_bad_upstream_bodies_are_502() {
    let big = answering(
        200,
        "application/json",
        r#"{"a": "0123456789012345678901234567890123456789"}"#,
    )
    .await;
    let bad = answering(200, "application/json", "{oops").await;
    let policy = r#"
  - name: t
    type: response_transform
    scope: route
    target: api
    config: {body: {max_bytes: 32, ops: [{op: remove, path: /a}]}}
"#;
    let auth = bearer();
    let g = gw(big.addr, policy).await;
    let r = call(&g, "GET", "/api/u", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_too_large");
    let g = gw(bad.addr, policy).await;
    let r = call(&g, "GET", "/api/u", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_transform_failed");
    // HEAD and other media types are not read.
    let r = call(&g, "HEAD", "/api/u", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn header_only_response_transforms_keep_the_body_streaming() {
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = std::sync::Mutex::new(Some(release_rx));
    let up = Mock::start(move |_req| {
        let rx = release.lock().unwrap().take();
        async move {
            let stream = futures_util::stream::unfold((0, rx), |(i, rx)| async move {
                match i {
                    0 => Some((
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                            Bytes::from_static(b"first;"),
                        )),
                        (1, rx),
                    )),
                    1 => {
                        if let Some(rx) = rx {
                            let _ = rx.await;
                        }
                        Some((
                            Ok(http_body::Frame::data(Bytes::from_static(b"second"))),
                            (2, None),
                        ))
                    }
                    _ => None,
                }
            });
            let body = http_body_util::StreamBody::new(stream)
                .map_err(|never| match never {})
                .boxed_unsync();
            let mut r = Response::new(body);
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
    })
    .await;
    let gw = gw(
        up.addr,
        r#"
  - name: t
    type: response_transform
    scope: route
    target: api
    config: {headers: {set: {x-shaped: "yes"}}}
"#,
    )
    .await;
    let auth = bearer();
    let resp = client()
        .request(
            req("GET", &gw.url("/api/s"))
                .header("authorization", &auth)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-shaped"], "yes");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(
        &first[..],
        b"first;",
        "the first chunk arrives while the upstream still holds the second"
    );
    release_tx.send(()).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second");
}

#[tokio::test]
async fn cached_answers_are_shaped_per_request() {
    let up = Mock::start(|_req| async move {
        let mut r = Response::new(full(r#"{"v": 1}"#));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r.headers_mut()
            .insert("cache-control", "public, max-age=60".parse().unwrap());
        r
    })
    .await;
    let gw = gw(
        up.addr,
        r#"
  - name: c
    type: cache
    scope: route
    target: api
  - name: t
    type: response_transform
    scope: route
    target: api
    config: {body: {ops: [{op: add, path: /for, value: "${header.x-user}"}]}}
"#,
    )
    .await;
    let auth = bearer();
    let a = call(
        &gw,
        "GET",
        "/api/c",
        &[("authorization", &auth), ("x-user", "a")],
    )
    .await;
    let b = call(
        &gw,
        "GET",
        "/api/c",
        &[("authorization", &auth), ("x-user", "b")],
    )
    .await;
    assert_eq!(a.header("x-cache"), Some("MISS"));
    assert_eq!(b.header("x-cache"), Some("HIT"));
    assert_eq!(a.json(), json!({"v": 1, "for": "a"}));
    assert_eq!(
        b.json(),
        json!({"v": 1, "for": "b"}),
        "the entry is stored untransformed"
    );
    assert_eq!(up.hits(), 1);
}

async fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    let mut out = Vec::new();
    match encoding {
        "gzip" => GzipDecoder::new(body).read_to_end(&mut out).await.unwrap(),
        "br" => BrotliDecoder::new(body)
            .read_to_end(&mut out)
            .await
            .unwrap(),
        "zstd" => ZstdDecoder::new(body).read_to_end(&mut out).await.unwrap(),
        other => panic!("unexpected encoding {other}"),
    };
    out
}

/// A page well over the default `min_bytes` (256).
fn page() -> String {
    format!(
        "<html><body>{}</body></html>",
        "Turnpike compresses text that repeats. ".repeat(30)
    )
}

#[tokio::test]
async fn compression_is_negotiated_with_accept_encoding() {
    let up = Mock::start(|req| async move {
        let path = req.uri().path().to_owned();
        let (ct, body): (&str, String) = match path.as_str() {
            "/api/png" => ("image/png", page()),
            "/api/small" => ("text/html", "tiny".into()),
            _ => ("text/html; charset=utf-8", page()),
        };
        let mut r = Response::new(full(body));
        if path == "/api/304" {
            *r.status_mut() = http::StatusCode::NOT_MODIFIED;
            *r.body_mut() = full("");
        } else {
            r.headers_mut().insert("content-type", ct.parse().unwrap());
        }
        r.headers_mut().insert("etag", "\"p1\"".parse().unwrap());
        if path == "/api/encoded" {
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
        }
        if path == "/api/raw" {
            r.headers_mut()
                .insert("cache-control", "no-transform".parse().unwrap());
        }
        r
    })
    .await;
    let gw = gw(
        up.addr,
        r#"
  - name: z
    type: compression
    scope: route
    target: api
"#,
    )
    .await;
    let auth = bearer();
    let get = |path: &'static str, ae: Option<&'static str>| {
        let gw = &gw;
        let auth = auth.clone();
        async move {
            let mut h = vec![("authorization", auth.as_str())];
            if let Some(ae) = ae {
                h.push(("accept-encoding", ae));
            }
            call(gw, "GET", path, &h).await
        }
    };
    for (ae, want) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip;q=1, br;q=0.5", "gzip"),
        ("*", "zstd"),
    ] {
        let r = get("/api/page", Some(ae)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(want), "{ae}");
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert!(
            r.header("content-length")
                .is_none_or(|l| l == r.body.len().to_string())
        );
        assert_eq!(r.header("etag"), Some("W/\"p1\""));
        assert!(
            r.body.len() < page().len() / 4,
            "{ae}: {} bytes",
            r.body.len()
        );
        assert_eq!(decode(want, &r.body).await, page().as_bytes(), "{ae}");
    }
    for (path, ae) in [
        ("/api/page", None),
        ("/api/page", Some("identity")),
        ("/api/page", Some("gzip;q=0, br;q=0, zstd;q=0")),
        ("/api/png", Some("gzip")),
        ("/api/small", Some("gzip")),
        ("/api/raw", Some("gzip")),
    ] {
        let r = get(path, ae).await;
        assert!(r.header("content-encoding").is_none(), "{path} {ae:?}");
        assert_eq!(r.header("etag"), Some("\"p1\""), "{path} {ae:?}");
    }
    let r = get("/api/page", None).await;
    assert_eq!(
        r.header("vary"),
        Some("accept-encoding"),
        "the answer depends on the header"
    );
    assert_eq!(r.text(), page());
    let r = get("/api/encoded", Some("br")).await;
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "never encoded twice"
    );
    // HEAD gets the GET's headers; a 304 the GET's weak validator and `Vary`.
    let r = call(
        &gw,
        "HEAD",
        "/api/page",
        &[("authorization", &auth), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("etag"), Some("W/\"p1\""));
    assert!(r.body.is_empty());
    let r = call(
        &gw,
        "GET",
        "/api/304",
        &[("authorization", &auth), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("W/\"p1\""));
    assert_eq!(r.header("vary"), Some("accept-encoding"));
}

#[tokio::test]
async fn bad_templates_are_refused_at_load_naming_the_field() {
    let cfg = config(
        r#"
upstreams: [{name: up, targets: [{address: "127.0.0.1:9"}]}]
routes: [{name: api, paths: [{prefix: /api}], upstream: up}]
policies:
  - name: t
    type: request_transform
    scope: route
    target: api
    config: {headers: {set: {x-a: "${jwt}"}}}
"#,
    );
    let err = turnpike_proxy::gateway::Gateway::start(&cfg)
        .await
        .err()
        .expect("the config is refused")
        .to_string();
    assert!(err.contains("policies[0].config.headers.set.x-a"), "{err}");
    assert!(err.contains("unknown variable `${jwt}`"), "{err}");

    let cfg = config(
        r#"
upstreams: [{name: up, targets: [{address: "127.0.0.1:9"}]}]
routes: [{name: api, paths: [{prefix: /api}], upstream: up}]
policies:
  - name: t
    type: request_transform
    scope: route
    target: api
    config: {headers: {rename: {x-user: X-Consumer-Id}}}
"#,
    );
    let err = turnpike_proxy::gateway::Gateway::start(&cfg)
        .await
        .err()
        .expect("a transform cannot forge an identity header")
        .to_string();
    assert!(err.contains("policies[0].config.headers.rename"), "{err}");
    assert!(err.contains("written by the gateway"), "{err}");
}

/// An upstream answering by path: `/api/json` a JSON document full of sensitive values,
/// `/api/text` the same as text, `/api/png` as an image, `/api/gz` an encoded body; every
/// answer cacheable.
async fn sensitive() -> Mock {
    Mock::start(|req| async move {
        let ae = req
            .headers()
            .get("accept-encoding")
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        let (ct, body) = match req.uri().path() {
            "/api/json" => (
                "application/json",
                r#"{"user": {"name": "Ada", "email": "ada@example.com", "ssn": "123-45-6789", "password": "p"},
                    "cards": [{"number": "4111 1111 1111 1111", "holder": "Ada"}],
                    "note": "call +44 20 7946 0958 or mail ada@example.com",
                    "order": "1234567890123"}"#,
            ),
            "/api/text" => ("text/plain", "Card 5500005555555559, phone (415) 555-0123."),
            "/api/png" => ("image/png", "ada@example.com"),
            "/api/broken" => ("application/json", r#"{"a": "ada@example.com""#),
            "/api/untyped" => ("", "mail ada@example.com"),
            _ => ("application/json", r#"{"a": "ada@example.com"}"#),
        };
        let mut r = Response::new(full(body));
        if !ct.is_empty() {
            r.headers_mut().insert("content-type", ct.parse().unwrap());
        }
        r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
        r.headers_mut().insert("x-upstream-saw-accept-encoding", ae.parse().unwrap());
        if req.uri().path() == "/api/gz" {
            r.headers_mut().insert("content-encoding", "gzip".parse().unwrap());
        }
        r
    })
    .await
}

#[tokio::test]
async fn data_masking_in_json_and_text_answers() {
    let up = sensitive().await;
    let gw = gw(
        up.addr,
        r#"
  - name: c
    type: cache
    scope: route
    target: api
  - name: m
    type: data_masking
    scope: route
    target: api
    config:
      detectors: [card, email, phone, national_id]
      fields:
        - {name: password, action: remove}
        - {path: /cards/*/holder, action: hash}
      hash_salt: pepper
"#,
    )
    .await;
    let auth = bearer();
    for want_cache in ["MISS", "HIT"] {
        let r = call(
            &gw,
            "GET",
            "/api/json",
            &[("authorization", &auth), ("accept-encoding", "gzip")],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some(want_cache));
        assert_eq!(r.header("x-upstream-saw-accept-encoding"), Some("identity"));
        let j = r.json();
        assert_eq!(
            j["user"],
            json!({"name": "Ada", "email": "a***@example.com", "ssn": "***-**-6789"})
        );
        assert_eq!(j["cards"][0]["number"], "**** **** **** 1111");
        let holder = j["cards"][0]["holder"].as_str().unwrap();
        assert!(
            holder.starts_with("sha256:") && holder.len() == 23,
            "{holder}"
        );
        assert_eq!(j["note"], "call +** ** **** 0958 or mail a***@example.com");
        assert_eq!(
            j["order"], "1234567890123",
            "not a card: it fails the Luhn check"
        );
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
    }
    let r = call(&gw, "GET", "/api/text", &[("authorization", &auth)]).await;
    assert_eq!(r.text(), "Card ************5559, phone (***) ***-0123.");
    let r = call(&gw, "GET", "/api/png", &[("authorization", &auth)]).await;
    assert_eq!(r.text(), "ada@example.com", "other media types pass");
    let r = call(&gw, "GET", "/api/gz", &[("authorization", &auth)]).await;
    assert_eq!(
        r.status, 502,
        "an encoded body it cannot read is refused, not leaked"
    );
    assert_eq!(r.json()["error"]["code"], "response_transform_failed");
}

#[tokio::test]
async fn data_masking_fails_closed_past_its_bound() {
    let up = sensitive().await;
    let gw = gw(
        up.addr,
        r#"
  - name: m
    type: data_masking
    scope: route
    target: api
    config: {detectors: [email], max_bytes: 64}
"#,
    )
    .await;
    let auth = bearer();
    let r = call(&gw, "GET", "/api/json", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_too_large");
    assert!(!r.text().contains("ada@example.com"));
    let r = call(&gw, "GET", "/api/other", &[("authorization", &auth)]).await;
    assert_eq!(r.json(), json!({"a": "a***@example.com"}));
    // JSON that does not parse cannot be masked field by field: refused, not leaked.
    let r = call(&gw, "GET", "/api/broken", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_transform_failed");
    // No Content-Type: masked as text.
    let r = call(&gw, "GET", "/api/untyped", &[("authorization", &auth)]).await;
    assert_eq!(r.text(), "mail a***@example.com");
}

/// A body an inspecting policy left unread (a `waf` that skips bodies) is still read whole
/// by the transform.
#[tokio::test]
async fn body_transform_after_an_inspection_that_skipped_the_body() {
    let up = inspector().await;
    let gw = gw(
        up.addr,
        r#"
  - name: w
    type: waf
    scope: route
    target: api
    config: {inspect_body: false}
  - name: t
    type: request_transform
    scope: route
    target: api
    config: {body: {ops: [{op: add, path: /seen, value: true}]}}
"#,
    )
    .await;
    let auth = bearer();
    let r = post(
        &gw,
        "/api/x",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"a": 1}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], r#"{"a":1,"seen":true}"#);
}
