//! Protection policies end to end: `waf` and `request_validation` in the real gateway,
//! in front of an upstream that echoes what it received.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// An upstream answering 200 with the request's path and body.
async fn echo() -> Mock {
    Mock::start(|req| async move {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::json!({"path": path, "body": String::from_utf8_lossy(&body)});
        let mut r = Response::new(full(v.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await
}

fn yaml(upstream: &str, policies: &str) -> String {
    format!(
        r#"
upstreams:
  - name: up
    targets: [{upstream}]
    retries: {{attempts: 2}}
routes:
  - {{name: api, paths: [{{prefix: /api}}], upstream: up}}
  - {{name: open, paths: [{{prefix: /open}}], upstream: up}}
policies:
{policies}"#
    )
}

fn target(m: &Mock) -> String {
    format!("{{address: \"{}\"}}", m.addr)
}

async fn post(gw: &Gw, path: &str, ct: &str, body: impl Into<Bytes>) -> Reply {
    send(
        req("POST", &gw.url(path))
            .header("content-type", ct)
            .body(Full::new(body.into()))
            .unwrap(),
    )
    .await
}

/// Bytes a URI cannot carry are percent-encoded; escapes already written stay as they are,
/// so the corpus decides the obfuscation.
fn wire(s: &str, query: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*+,;=:@/?%".contains(&b) || (b == b'&' && !query)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Case {
    location: String,
    payload: String,
}

fn corpus(name: &str) -> Vec<Case> {
    let path = format!("{}/tests/waf/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (loc, payload) = l
                .split_once('\t')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            Case {
                location: loc.to_owned(),
                payload: payload.to_owned(),
            }
        })
        .collect()
}

async fn run_case(gw: &Gw, c: &Case) -> Reply {
    let (kind, name) = c.location.split_once(':').unwrap_or((&c.location, ""));
    let r = match kind {
        "query" => req(
            "GET",
            &gw.url(&format!("/api/search?{name}={}", wire(&c.payload, true))),
        ),
        "path" => req(
            "GET",
            &gw.url(&format!("/api/files/{}", wire(&c.payload, false))),
        ),
        "header" => req("GET", &gw.url("/api/x")).header(name, c.payload.as_str()),
        "cookie" => req("GET", &gw.url("/api/x")).header("cookie", format!("{name}={}", c.payload)),
        "json" => {
            let text = c.payload.replace("\\n", "\n");
            let body = serde_json::json!({ name: text, "other": "plain" }).to_string();
            return post(gw, "/api/x", "application/json", body).await;
        }
        "form" => {
            let body = format!("{name}={}&other=plain", c.payload);
            return post(gw, "/api/x", "application/x-www-form-urlencoded", body).await;
        }
        "raw" => return post(gw, "/api/x", "text/plain", c.payload.clone()).await,
        other => panic!("unknown location {other}"),
    };
    send(r.body(Full::new(Bytes::new())).unwrap()).await
}

const CORPUS_WAF: &str = r#"  - name: waf
    type: waf
    scope: route
    target: api
    config:
      headers: [cookie, user-agent, referer, x-file, x-forwarded-host, x-search]
"#;

/// The attack corpus is blocked and the benign corpus passes, through the whole gateway.
#[tokio::test]
async fn corpora_detection_and_false_positive_rates() {
    let up = echo().await;
    let gw = Gw::start(&yaml(&target(&up), CORPUS_WAF)).await;

    let attacks = corpus("attacks.txt");
    let mut blocked = 0;
    let mut missed = Vec::new();
    let mut by_category: std::collections::BTreeMap<String, usize> = Default::default();
    for c in &attacks {
        let r = run_case(&gw, c).await;
        if r.status == StatusCode::FORBIDDEN && r.json()["error"]["code"] == "waf_blocked" {
            blocked += 1;
            let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
            let rule = msg.split('`').nth(1).unwrap().to_owned();
            *by_category
                .entry(rule.split('-').next().unwrap().to_owned())
                .or_default() += 1;
            assert!(
                !msg.contains(&c.payload),
                "the message echoes the payload: {msg}"
            );
            assert!(msg.contains(" in "), "{msg}");
        } else {
            missed.push(format!("{} {:?} -> {}", c.location, c.payload, r.status));
        }
    }
    let benign = corpus("benign.txt");
    let mut false_positives = Vec::new();
    for c in &benign {
        let r = run_case(&gw, c).await;
        if r.status != StatusCode::OK {
            false_positives.push(format!(
                "{} {:?} -> {} {}",
                c.location,
                c.payload,
                r.status,
                r.text()
            ));
        }
    }
    let detection = blocked as f64 / attacks.len() as f64;
    let fp = false_positives.len() as f64 / benign.len() as f64;
    println!(
        "WAF corpus: {blocked}/{} attacks blocked ({:.1}%), {}/{} benign requests refused ({:.1}%); blocked by category: {by_category:?}",
        attacks.len(),
        detection * 100.0,
        false_positives.len(),
        benign.len(),
        fp * 100.0
    );
    for m in &missed {
        println!("  missed: {m}");
    }
    for f in &false_positives {
        println!("  false positive: {f}");
    }
    assert!(attacks.len() >= 150 && benign.len() >= 150);
    assert!(detection >= 0.95, "detection {detection}");
    assert!(fp <= 0.02, "false positives {fp}");
}

#[tokio::test]
async fn block_log_only_and_exclusions() {
    let up = echo().await;
    let policies = r#"  - name: waf
    type: waf
    scope: route
    target: api
    config:
      headers: [x-search]
      exclusions:
        - {rules: [sqli-union-select], locations: ["query:q", "header:x-search", "body:/comment"]}
        - {rules: [xss], path_prefixes: [/api/cms]}
        - {path_prefixes: [/api/files]}
  - name: watch
    type: waf
    scope: route
    target: open
    config: {mode: log_only}
"#;
    let gw = Gw::start(&yaml(&target(&up), policies)).await;
    let attack = "1%20UNION%20SELECT%20password%20FROM%20users";

    // Blocked: 403 naming the rule and the location, never the payload.
    let r = get(&gw.url(&format!("/api/s?other={attack}"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let e = r.json();
    assert_eq!(e["error"]["code"], "waf_blocked");
    assert_eq!(
        e["error"]["message"],
        "request blocked by WAF rule `sqli-union-select` in query:other"
    );
    assert!(!r.text().to_ascii_lowercase().contains("password"));
    assert_eq!(up.hits(), 0);

    // The exclusion switches the rule off for `q`, `x-search` and `body:/comment` only.
    let r = get(&gw.url(&format!("/api/s?q={attack}"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(
        req("GET", &gw.url("/api/s"))
            .header("x-search", "1 union select 2")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = post(
        &gw,
        "/api/s",
        "application/json",
        r#"{"comment": "1 union select 2"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body"], r#"{"comment": "1 union select 2"}"#);
    let r = post(
        &gw,
        "/api/s",
        "application/json",
        r#"{"title": "1 union select 2"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text().contains("in body:/title"), "{}", r.text());
    // Another rule on the excluded location still blocks.
    let r = get(&gw.url("/api/s?q=1%27%20or%20%271%27%3D%271")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A path-prefix exclusion for a category.
    let r = post(
        &gw,
        "/api/cms/page",
        "application/json",
        r#"{"html": "<script>x()</script>"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = post(
        &gw,
        "/api/blog",
        "application/json",
        r#"{"html": "<script>x()</script>"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Path exclusions match the normalised path: an escaped `s` is still under `/api/cms`,
    // and a path that climbs out of `/api/files` is not excluded from any rule.
    let r = post(
        &gw,
        "/api/cm%73/page",
        "application/json",
        r#"{"html": "<script>x()</script>"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/api/cms/page");
    let r = post(
        &gw,
        "/api/files/../blog",
        "application/json",
        r#"{"html": "<script>x()</script>"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());

    // Log-only: the request goes through.
    let before = up.hits();
    let r = get(&gw.url(&format!("/open/s?q={attack}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.hits(), before + 1);
}

#[tokio::test]
async fn bodies_too_large_for_inspection() {
    let up = echo().await;
    let policies = r#"  - {name: strict, type: waf, scope: route, target: api, config: {max_body_bytes: 64}}
  - {name: lenient, type: waf, scope: route, target: open, config: {max_body_bytes: 64, oversize: skip_body}}
"#;
    let gw = Gw::start(&yaml(&target(&up), policies)).await;
    let big = format!("{{\"text\": \"{}\"}}", "a".repeat(100));

    let r = post(&gw, "/api/x", "application/json", big.clone()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert_eq!(up.hits(), 0);

    // skip_body: the head is still inspected, the body streams upstream whole.
    let r = post(&gw, "/open/x", "application/json", big.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body"], big);
    let r = post(
        &gw,
        "/open/x?q=%3Cscript%3E",
        "application/json",
        big.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Without Content-Length (chunked), the bound holds while reading.
    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b'a'; 20])))
    }));
    let r = send_stream(&gw, "/open/x", &[("content-type", "text/plain")], chunks).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body"].as_str().unwrap().len(), 200);

    // A small body is inspected, then forwarded byte for byte.
    let r = post(&gw, "/api/x", "text/plain", "hello").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body"], "hello");
    let r = post(&gw, "/api/x", "text/plain", "x; cat /etc/passwd").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

/// A buffered body survives a retry: the first target refuses connections, the second gets
/// the same bytes.
#[tokio::test]
async fn buffered_body_is_resent_on_retry() {
    let up = echo().await;
    let dead = dead_addr().await;
    let targets = format!("{{address: \"{dead}\"}}, {}", target(&up));
    let gw = Gw::start(&yaml(
        &targets,
        "  - {name: waf, type: waf, scope: route, target: api}\n",
    ))
    .await;
    for i in 0..4 {
        let body = format!("{{\"n\": {i}, \"text\": \"hello\"}}");
        let r = post(&gw, "/api/x", "application/json", body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["body"], body);
    }
}

const SCHEMA_POLICY: &str = r#"  - name: orders
    type: request_validation
    scope: route
    target: api
    config:
      max_errors: 5
      body_required: true
      body_schema:
        type: object
        required: [email, items]
        properties:
          email: {type: string, format: email}
          age: {type: integer, minimum: 0}
          items:
            type: array
            minItems: 1
            items: {type: object, required: [sku], properties: {sku: {type: string, pattern: "^[A-Z]+-[0-9]+$"}, qty: {type: integer, minimum: 1}}}
      query_schema:
        type: object
        properties:
          dry_run: {type: boolean}
          limit: {type: integer, maximum: 100}
"#;

#[tokio::test]
async fn json_schema_validation() {
    let up = echo().await;
    let gw = Gw::start(&yaml(&target(&up), SCHEMA_POLICY)).await;

    let good = r#"{"email": "a@example.com", "items": [{"sku": "AB-1", "qty": 2}]}"#;
    let r = post(
        &gw,
        "/api/orders?dry_run=true&limit=10",
        "application/json",
        good,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["body"], good);

    let bad = r#"{"email": "nope", "age": -1, "items": [{"sku": "x1", "qty": 0}, {}]}"#;
    let r = post(&gw, "/api/orders?limit=500", "application/json", bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let e = r.json();
    assert_eq!(e["error"]["code"], "request_invalid");
    let details = e["error"]["details"].as_array().unwrap();
    let mut paths: Vec<String> = details
        .iter()
        .map(|d| {
            format!(
                "{}:{}",
                d["location"].as_str().unwrap(),
                d["path"].as_str().unwrap()
            )
        })
        .collect();
    paths.sort();
    assert_eq!(details.len(), 5, "bounded by max_errors: {details:?}");
    let all_expected = [
        "body:/age",
        "body:/email",
        "body:/items/0/qty",
        "body:/items/0/sku",
        "body:/items/1",
        "query:/limit",
    ];
    for p in &paths {
        assert!(all_expected.contains(&p.as_str()), "{p}");
    }
    assert!(
        !r.text().contains("nope"),
        "values are not echoed: {}",
        r.text()
    );
    assert_eq!(up.hits(), 1);

    // Not JSON: 415; broken JSON: 400; missing body: 400.
    let r = post(&gw, "/api/orders", "text/plain", "hello").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
    let r = post(&gw, "/api/orders", "application/json", "{\"email\": ").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = post(&gw, "/api/orders", "application/json", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json()["error"]["details"][0]["message"],
        "a request body is required"
    );

    // An invalid schema is a configuration error naming the path.
    let broken = SCHEMA_POLICY.replace("minimum: 0}", "minimum: zero}");
    let e = gw.reload(&yaml(&target(&up), &broken)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("policies[0].config.body_schema"), "{text}");
}

const OPENAPI_POLICY: &str = r##"  - name: contract
    type: request_validation
    scope: route
    target: api
    config:
      openapi:
        openapi: 3.0.3
        info: {title: Pets, version: "1"}
        servers: [{url: "https://pets.example.com/api"}]
        paths:
          /pets:
            post:
              requestBody:
                required: true
                content:
                  application/json:
                    schema: {$ref: "#/components/schemas/Pet"}
          /pets/mine:
            get: {}
          /pets/{petId}:
            parameters:
              - {name: petId, in: path, required: true, schema: {type: integer, minimum: 1}}
            get:
              parameters:
                - {name: fields, in: query, schema: {type: string, enum: [name, tag]}}
                - {name: x-tenant, in: header, required: true, schema: {type: string}}
        components:
          schemas:
            Pet:
              type: object
              required: [name]
              properties:
                name: {type: string, minLength: 1}
                tag: {type: string, nullable: true}
                kind: {type: string, enum: [cat, dog], nullable: true}
"##;

#[tokio::test]
async fn openapi_validation() {
    let up = echo().await;
    let gw = Gw::start(&yaml(&target(&up), OPENAPI_POLICY)).await;
    let get_with = |path: &str, tenant: bool| {
        let mut r = req("GET", &gw.url(path));
        if tenant {
            r = r.header("x-tenant", "acme");
        }
        send(r.body(Full::new(Bytes::new())).unwrap())
    };

    let r = get_with("/api/pets/42?fields=name", true).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Literal segments win over the template.
    let r = get_with("/api/pets/mine", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let r = get_with("/api/pets/abc?fields=owner", false).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let e = r.json();
    assert_eq!(e["error"]["code"], "request_invalid");
    let got: Vec<String> = e["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}:{}",
                d["location"].as_str().unwrap(),
                d["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        got,
        ["path:petId", "query:fields", "header:x-tenant"],
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/pets/{petId}")
    );

    let r = post(&gw, "/api/pets", "application/json", r#"{"name": "Rex"}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    // OpenAPI 3.0 `nullable`: null is accepted where it is set, and only there; an `enum`
    // beside it still applies (OpenAPI 3.0.3), so `kind` takes null only if listed.
    let r = post(
        &gw,
        "/api/pets",
        "application/json",
        r#"{"name": "Rex", "tag": null}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for bad in [
        r#"{"name": null}"#,
        r#"{"name": "Rex", "kind": "cow"}"#,
        r#"{"name": "Rex", "kind": null}"#,
    ] {
        let r = post(&gw, "/api/pets", "application/json", bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = post(
        &gw,
        "/api/pets",
        "application/json",
        r#"{"name": "", "tag": 3}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let got: Vec<&str> = r.json()["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_owned())
        .map(|s| Box::leak(s.into_boxed_str()) as &str)
        .collect();
    assert!(got.contains(&"/name") && got.contains(&"/tag"), "{got:?}");
    let r = post(&gw, "/api/pets", "application/xml", "<pet/>").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // No operation for it: refused by default.
    let r = post(&gw, "/api/owners", "application/json", "{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = send(
        req("DELETE", &gw.url("/api/pets/1"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn config_errors_name_the_field() {
    let up = echo().await;
    let gw = Gw::start(&yaml(
        &target(&up),
        "  - {name: ok, type: waf, scope: route, target: open}\n",
    ))
    .await;
    for (policy, path) in [
        (
            "{name: w, type: waf, scope: global, config: {disabled_rules: [sqli-nope]}}",
            "policies[0].config.disabled_rules[0]",
        ),
        (
            "{name: w, type: waf, scope: global, config: {exclusions: [{rules: [nope]}]}}",
            "policies[0].config.exclusions[0].rules[0]",
        ),
        (
            "{name: w, type: waf, scope: global, config: {exclusions: [{locations: [query]}]}}",
            "policies[0].config.exclusions[0].locations[0]",
        ),
        (
            "{name: w, type: waf, scope: global, config: {mode: loud}}",
            "policies[0].config.mode",
        ),
        (
            "{name: v, type: request_validation, scope: global, config: {}}",
            "policies[0].config",
        ),
        (
            "{name: v, type: request_validation, scope: global, config: {openapi: {swagger: '2.0'}}}",
            "policies[0].config.openapi",
        ),
    ] {
        let e = gw
            .reload(&yaml(&target(&up), &format!("  - {policy}\n")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(path), "{policy}: {e}");
    }
}
