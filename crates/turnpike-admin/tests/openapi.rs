//! The OpenAPI document: well-formed, self-consistent, and describing exactly the router.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use common::Server;
use reqwest::Method;
use serde_json::Value;

fn document() -> Value {
    turnpike_admin::openapi_document()
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(members) => {
            for (key, item) in members {
                match (key.as_str(), item) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(item, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
        _ => {}
    }
}

fn operations(doc: &Value) -> Vec<(String, Method, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            out.push((path.clone(), method, op));
        }
    }
    out
}

#[test]
fn document_parses_as_openapi_3_1() {
    let doc = document();
    if let Ok(path) = std::env::var("TURNPIKE_DUMP_OPENAPI") {
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }
    assert_eq!(doc["openapi"], "3.1.0");
    let text = serde_json::to_string(&doc).unwrap();
    let spec = oas3::from_json(&text).expect("the document is an OpenAPI 3.1 document");
    assert_eq!(spec.info.title, "Turnpike Admin API");
    // Every operation and every schema can be resolved by a typed reader.
    for (path, method, _) in operations(&doc) {
        let op = spec
            .operations()
            .find(|(p, m, _)| *p == path && *m == method)
            .unwrap_or_else(|| panic!("oas3 does not see {method} {path}"));
        for param in &op.2.parameters {
            param.resolve(&spec).expect("parameter resolves");
        }
    }
}

#[test]
fn every_ref_resolves() {
    let doc = document();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 100, "suspiciously few refs: {}", all.len());
    for r in all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("external ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        assert!(!r.contains("$defs"), "{r} was not moved to components");
    }
}

#[test]
fn path_parameters_and_operation_ids_are_consistent() {
    let doc = document();
    let mut ids = HashSet::new();
    for (path, method, op) in operations(&doc) {
        let id = op["operationId"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
        let in_path: HashSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let declared: HashSet<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(in_path, declared, "{method} {path}");
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|k| k.starts_with('2')),
            "{method} {path}: no success response"
        );
        for (status, response) in responses {
            if !status.starts_with('2') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {path} {status}"
                );
            }
        }
        let secured = op.get("security").is_none();
        if secured {
            assert!(
                responses.contains_key("401"),
                "{method} {path}: authenticated but no 401"
            );
        }
    }
    assert!(ids.len() > 90, "{} operations", ids.len());
}

#[test]
fn every_kind_has_spec_object_and_page_schemas() {
    let doc = document();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for kind in turnpike_model::mgmt::Kind::ALL {
        let collection = kind.collection();
        let pascal: String = kind
            .as_str()
            .split('_')
            .map(|p| p[..1].to_uppercase() + &p[1..])
            .collect();
        for suffix in ["Spec", "Object", "Page"] {
            assert!(
                schemas.contains_key(&format!("{pascal}{suffix}")),
                "{pascal}{suffix} ({collection})"
            );
        }
        assert!(schemas[&format!("{pascal}Spec")].get("$schema").is_none());
    }
}

/// Every documented operation reaches its handler: with names that do not exist it answers a
/// JSON error of its own (or success), never the router's "no such route" or 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let s = Server::sqlite().await;
    let doc = document();
    let mut count = 0;
    for (path, method, op) in operations(&doc) {
        let concrete = path
            .split('/')
            .map(|seg| match seg {
                "{number}" => "7",
                "{kind}" => "no-such-kind",
                s if s.starts_with('{') => "no-such-name",
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/");
        let token = op.get("security").is_none().then_some(s.admin.as_str());
        let r = s.call(method.clone(), &concrete, token, None, &[]).await;
        let code = r.code().to_owned();
        assert!(
            !matches!(
                code.as_str(),
                "route_not_found" | "method_not_allowed" | "internal"
            ),
            "{method} {concrete}: {:#}",
            r.body
        );
        let documented = op["responses"].as_object().unwrap();
        assert!(
            documented.contains_key(r.status.as_str()),
            "{method} {concrete}: status {} is not documented",
            r.status
        );
        assert!(r.header("x-request-id").is_some());
        count += 1;
    }
    assert!(count > 90);
    s.close().await;
}
