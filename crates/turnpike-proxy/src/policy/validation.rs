//! `request_validation`: the request checked against JSON Schemas or an OpenAPI 3 document.
//!
//! Schemas are compiled once, when the policy is built. With an OpenAPI document, the
//! request's method and path (less the path of the document's first `servers` URL, when the
//! request starts with it) select an operation: literal segments win over `{templated}` ones.
//! Its path, query and header parameters (`required`, and their `schema`) and its request
//! body (`required`, and the schema of its `application/json` or `*+json` content) are
//! checked. `$ref`s inside the document resolve against the document itself.
//!
//! Failures answer 400 `request_invalid` with `error.details`: a list of
//! `{location, path, message}` (at most `max_errors`); messages name the rule broken, never
//! the submitted value. A body that is not JSON where JSON is required answers 415
//! `unsupported_media_type` (wrong `Content-Type`) or 400 (unparseable).

use std::collections::HashMap;

use http::Method;
use http::request::Parts;
use jsonschema::Validator;
use serde_json::{Map, Value, json};
use turnpike_model::policy::{RequestValidationConfig, UnknownOperation, compile_schema};

use crate::error::{ErrorKind, GatewayError};

/// Query parameters or headers as one object, with the schema's property types for
/// converting the string values.
struct Params {
    validator: Validator,
    types: HashMap<String, String>,
}

enum In {
    Path,
    Query,
    Header,
}

struct Param {
    name: String,
    at: In,
    required: bool,
    validator: Option<Validator>,
    ty: Option<String>,
}

struct BodySpec {
    required: bool,
    /// Schema of the JSON content, when the operation has one.
    json: Option<Validator>,
    /// Whether the operation accepts only JSON content types.
    json_only: bool,
}

enum Seg {
    Lit(String),
    Var(String),
}

struct Operation {
    method: Method,
    template: String,
    segs: Vec<Seg>,
    params: Vec<Param>,
    body: Option<BodySpec>,
}

/// A compiled `request_validation` policy.
pub struct Validation {
    body: Option<Validator>,
    body_required: bool,
    query: Option<Params>,
    headers: Option<Params>,
    ops: Vec<Operation>,
    base_path: String,
    openapi: bool,
    unknown: UnknownOperation,
    max_body_bytes: u64,
    max_errors: usize,
}

fn property_types(schema: &Value) -> HashMap<String, String> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .filter_map(|(k, v)| {
                    v.get("type")
                        .and_then(Value::as_str)
                        .map(|t| (k.to_ascii_lowercase(), t.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A string from the query or a header, as the JSON value its schema type says it is
/// (left a string when it does not parse, so the schema reports the mismatch).
fn convert(raw: &str, ty: Option<&str>) -> Value {
    match ty {
        Some("integer") => raw
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(raw.into())),
        Some("number") => raw
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(raw.into())),
        Some("boolean") => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(raw.into()),
        },
        _ => Value::String(raw.into()),
    }
}

fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Validation {
    /// Compiles a configuration. `service_openapi` is the route's managed service's OpenAPI
    /// document, for `use_service_openapi`.
    pub fn new(
        c: &RequestValidationConfig,
        service_openapi: Option<&Value>,
    ) -> Result<Self, (String, String)> {
        let at = |field: &'static str| {
            move |(p, why): (String, String)| {
                (
                    if p.is_empty() {
                        field.to_owned()
                    } else {
                        format!("{field}.{p}")
                    },
                    why,
                )
            }
        };
        let body = c
            .body_schema
            .as_ref()
            .map(compile_schema)
            .transpose()
            .map_err(at("body_schema"))?;
        let params =
            |s: &Option<Value>, field: &'static str| -> Result<Option<Params>, (String, String)> {
                s.as_ref()
                    .map(|s| {
                        Ok(Params {
                            validator: compile_schema(s).map_err(at(field))?,
                            types: property_types(s),
                        })
                    })
                    .transpose()
            };
        let query = params(&c.query_schema, "query_schema")?;
        let headers = params(&c.headers_schema, "headers_schema")?;
        let doc = match (&c.openapi, c.use_service_openapi) {
            (Some(d), _) => Some(d),
            (None, true) => Some(service_openapi.ok_or_else(|| {
                (
                    "use_service_openapi".to_owned(),
                    "the route's service has no OpenAPI document (or the policy is not attached to a managed service)".to_owned(),
                )
            })?),
            (None, false) => None,
        };
        let (ops, base_path) = match doc {
            Some(d) => compile_openapi(d).map_err(at("openapi"))?,
            None => (Vec::new(), String::new()),
        };
        Ok(Self {
            body,
            body_required: c.body_required,
            query,
            headers,
            ops,
            base_path,
            openapi: doc.is_some(),
            unknown: c.unknown_operation,
            max_body_bytes: c.max_body_bytes,
            max_errors: c.max_errors,
        })
    }

    /// The body bound, when this policy reads the body.
    pub fn body_bound(&self) -> Option<u64> {
        (self.body.is_some() || self.openapi).then_some(self.max_body_bytes)
    }

    /// Validates the request (the body as buffered; empty when there is none).
    /// `path` is the normalised path the route matched (what the upstream sees), not the
    /// raw one: `//v1/%75sers/1` must find the operation of `/v1/users/1`.
    pub fn validate(&self, parts: &Parts, path: &str, body: &[u8]) -> Result<(), GatewayError> {
        let mut errors: Vec<Value> = Vec::new();
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        if self.openapi {
            let path = path
                .strip_prefix(self.base_path.as_str())
                .filter(|p| p.starts_with('/'))
                .unwrap_or(path);
            let Some((op, vars)) = self.find(&parts.method, path) else {
                if self.unknown == UnknownOperation::Allow {
                    return Ok(());
                }
                return Err(GatewayError::new(
                    ErrorKind::RequestInvalid,
                    format!(
                        "no operation of the API's OpenAPI document matches {} {path}",
                        parts.method
                    ),
                ));
            };
            for p in &op.params {
                let raw: Vec<&str> = match p.at {
                    In::Path => vars
                        .iter()
                        .filter(|(n, _)| *n == p.name)
                        .map(|(_, v)| v.as_str())
                        .collect(),
                    In::Query => query
                        .iter()
                        .filter(|(n, _)| *n == p.name)
                        .map(|(_, v)| v.as_str())
                        .collect(),
                    In::Header => parts
                        .headers
                        .get_all(p.name.as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect(),
                };
                let location = match p.at {
                    In::Path => "path",
                    In::Query => "query",
                    In::Header => "header",
                };
                if raw.is_empty() {
                    if p.required {
                        errors.push(json!({"location": location, "path": p.name, "message": "required parameter is missing"}));
                    }
                    continue;
                }
                let value = if p.ty.as_deref() == Some("array") {
                    Value::Array(
                        raw.iter()
                            .flat_map(|r| r.split(','))
                            .map(|r| Value::String(r.into()))
                            .collect(),
                    )
                } else {
                    convert(raw.first().copied().unwrap_or(""), p.ty.as_deref())
                };
                if let Some(v) = &p.validator {
                    for e in v.iter_errors(&value) {
                        let sub = e.instance_path().as_str().to_owned();
                        errors.push(json!({"location": location, "path": format!("{}{sub}", p.name), "message": e.masked().to_string()}));
                    }
                }
            }
            if let Some(spec) = &op.body {
                self.check_body(
                    parts,
                    body,
                    spec.required,
                    spec.json.as_ref(),
                    spec.json_only,
                    &mut errors,
                )?;
            }
            let template = op.template.clone();
            return self.finish(errors, Some(&template));
        }
        if let Some(q) = &self.query {
            let mut obj = Map::new();
            for (n, v) in &query {
                let ty = q.types.get(&n.to_ascii_lowercase()).map(String::as_str);
                let value = if ty == Some("array") {
                    let item = Value::String(v.clone());
                    match obj.remove(n) {
                        Some(Value::Array(mut a)) => {
                            a.push(item);
                            Value::Array(a)
                        }
                        _ => Value::Array(vec![item]),
                    }
                } else {
                    convert(v, ty)
                };
                obj.insert(n.clone(), value);
            }
            collect(&q.validator, &Value::Object(obj), "query", &mut errors);
        }
        if let Some(h) = &self.headers {
            let mut obj = Map::new();
            for (n, v) in &parts.headers {
                if let Ok(v) = v.to_str() {
                    obj.insert(
                        n.as_str().to_owned(),
                        convert(v, h.types.get(n.as_str()).map(String::as_str)),
                    );
                }
            }
            collect(&h.validator, &Value::Object(obj), "header", &mut errors);
        }
        if self.body.is_some() {
            self.check_body(
                parts,
                body,
                self.body_required,
                self.body.as_ref(),
                true,
                &mut errors,
            )?;
        }
        self.finish(errors, None)
    }

    fn check_body(
        &self,
        parts: &Parts,
        body: &[u8],
        required: bool,
        schema: Option<&Validator>,
        json_only: bool,
        errors: &mut Vec<Value>,
    ) -> Result<(), GatewayError> {
        if body.is_empty() {
            if required {
                errors.push(json!({"location": "body", "path": "", "message": "a request body is required"}));
            }
            return Ok(());
        }
        let ct = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_json = essence == "application/json" || essence.ends_with("+json");
        if !is_json {
            if json_only {
                return Err(GatewayError::new(
                    ErrorKind::UnsupportedMediaType,
                    format!(
                        "the request body must be JSON (Content-Type: application/json), not `{}`",
                        if essence.is_empty() {
                            "none"
                        } else {
                            essence.as_str()
                        }
                    ),
                ));
            }
            return Ok(());
        }
        let Some(schema) = schema else {
            return Ok(());
        };
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            GatewayError::new(
                ErrorKind::RequestInvalid,
                format!(
                    "the request body is not valid JSON: line {}, column {}",
                    e.line(),
                    e.column()
                ),
            )
            .with_details(json!([{"location": "body", "path": "", "message": "not valid JSON"}]))
        })?;
        collect(schema, &value, "body", errors);
        Ok(())
    }

    fn finish(&self, mut errors: Vec<Value>, operation: Option<&str>) -> Result<(), GatewayError> {
        if errors.is_empty() {
            return Ok(());
        }
        let total = errors.len();
        let more = total >= ERRORS_KEPT || total > self.max_errors;
        errors.truncate(self.max_errors.min(ERRORS_KEPT - 1));
        let first = errors
            .first()
            .map(|e| {
                format!(
                    "{} {}: {}",
                    e["location"].as_str().unwrap_or(""),
                    e["path"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default();
        let count = if total >= ERRORS_KEPT {
            format!("more than {} errors", ERRORS_KEPT - 1)
        } else if total == 1 {
            "1 error".to_owned()
        } else {
            format!("{total} errors")
        };
        let shown = if more {
            format!(", the first {} listed", errors.len())
        } else {
            String::new()
        };
        let mut msg = format!("the request does not match its schema ({count}{shown}): {first}");
        if let Some(op) = operation {
            msg = format!("{msg} [operation {op}]");
        }
        Err(GatewayError::new(ErrorKind::RequestInvalid, msg).with_details(Value::Array(errors)))
    }

    fn find(&self, method: &Method, path: &str) -> Option<(&Operation, Vec<(String, String)>)> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        'ops: for op in &self.ops {
            if op.method != *method || op.segs.len() != segs.len() {
                continue;
            }
            let mut vars = Vec::new();
            for (s, r) in op.segs.iter().zip(&segs) {
                match s {
                    Seg::Lit(l) if l == r => {}
                    Seg::Lit(_) => continue 'ops,
                    Seg::Var(_) if r.is_empty() => continue 'ops,
                    Seg::Var(n) => {
                        let v = percent_encoding_decode(r);
                        vars.push((n.clone(), v));
                    }
                }
            }
            return Some((op, vars));
        }
        None
    }
}

fn percent_encoding_decode(s: &str) -> String {
    form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Errors kept per request: enough to report `max_errors` (capped at this) and to know
/// there were more, without letting a hostile body (a million wrong array items) make
/// a million error objects.
const ERRORS_KEPT: usize = 101;

fn collect(v: &Validator, instance: &Value, location: &str, errors: &mut Vec<Value>) {
    let room = ERRORS_KEPT.saturating_sub(errors.len());
    for e in v.iter_errors(instance).take(room) {
        errors.push(json!({
            "location": location,
            "path": e.instance_path().as_str(),
            "message": e.masked().to_string(),
        }));
    }
}

/// A schema inside the document, compiled with the document as its root so `$ref`s to
/// `#/components/...` resolve.
fn doc_schema(
    doc: &Value,
    pointer: &str,
    draft: jsonschema::Draft,
) -> Result<Validator, (String, String)> {
    let mut root = doc.clone();
    if let Some(o) = root.as_object_mut() {
        o.insert(
            "$ref".into(),
            Value::String(format!("#{}", fragment(pointer))),
        );
        o.remove("$schema");
        o.remove("$id");
    }
    jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        .build(&root)
        .map_err(|e| {
            (
                pointer.trim_start_matches('/').replace('/', "."),
                format!("invalid schema: {}", e.masked()),
            )
        })
}

/// A JSON pointer as a URI fragment: bytes a fragment cannot hold (`{`, `}`, spaces, …)
/// percent-encoded.
fn fragment(pointer: &str) -> String {
    let mut out = String::with_capacity(pointer.len());
    for b in pointer.bytes() {
        if b.is_ascii_alphanumeric() || b"/~-._!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
    {
        Some(p) => doc.pointer(p).unwrap_or(v),
        None => v,
    }
}

/// Rewrites OpenAPI 3.0's `nullable: true` into draft 4 as OpenAPI 3.0.3 defines it: it
/// adds `null` to the `type` of the same schema, and only when that schema has a `type`;
/// every other keyword (an `enum`, say) still applies and may refuse `null`. Values that are
/// not schemas (`example`, `default`, `enum`, `x-` extensions) are left alone.
fn nullable_to_draft4(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(nullable_to_draft4),
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                match k.as_str() {
                    // Maps of names to schemas: a property may be called `example`.
                    "properties" | "patternProperties" | "schemas" => {
                        if let Value::Object(named) = child {
                            named.values_mut().for_each(nullable_to_draft4);
                        }
                    }
                    "example" | "examples" | "default" | "enum" | "const" => {}
                    k if k.starts_with("x-") => {}
                    _ => nullable_to_draft4(child),
                }
            }
            if o.get("nullable") != Some(&Value::Bool(true)) {
                return;
            }
            o.remove("nullable");
            if let Some(Value::String(t)) = o.get_mut("type") {
                let t = Value::String(std::mem::take(t));
                o.insert("type".into(), Value::Array(vec![t, "null".into()]));
            }
        }
        _ => {}
    }
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn compile_openapi(doc: &Value) -> Result<(Vec<Operation>, String), (String, String)> {
    turnpike_model::policy::check_openapi(doc)?;
    let v31 = doc
        .get("openapi")
        .and_then(Value::as_str)
        .is_some_and(|v| v.starts_with("3.1"));
    // OpenAPI 3.0 schemas are a dialect of draft 4 (with `nullable`); 3.1 uses 2020-12.
    let draft = if v31 {
        jsonschema::Draft::Draft202012
    } else {
        jsonschema::Draft::Draft4
    };
    let converted;
    let doc = if v31 {
        doc
    } else {
        let mut d = doc.clone();
        nullable_to_draft4(&mut d);
        converted = d;
        &converted
    };
    let base_path = doc
        .pointer("/servers/0/url")
        .and_then(Value::as_str)
        .map(|u| {
            let rest = u.split_once("://").map_or(u, |(_, r)| {
                r.find('/').map_or("", |i| r.get(i..).unwrap_or(""))
            });
            rest.trim_end_matches('/').to_owned()
        })
        .unwrap_or_default();
    let mut ops = Vec::new();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Ok((ops, base_path));
    };
    for (template, item) in paths {
        let item = resolve(doc, item);
        let item_ptr = format!("/paths/{}", pointer_escape(template));
        let shared: Vec<(String, &Value)> = item
            .get("parameters")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, p)| (format!("{item_ptr}/parameters/{i}"), p))
                    .collect()
            })
            .unwrap_or_default();
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let op_ptr = format!("{item_ptr}/{m}");
            let mut params = Vec::new();
            let own: Vec<(String, &Value)> = op
                .get("parameters")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .map(|(i, p)| (format!("{op_ptr}/parameters/{i}"), p))
                        .collect()
                })
                .unwrap_or_default();
            for (ptr, p) in shared.iter().chain(own.iter()) {
                let (ptr, p) = match p
                    .get("$ref")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix('#'))
                {
                    Some(r) => (r.to_owned(), doc.pointer(r).unwrap_or(p)),
                    None => (ptr.clone(), *p),
                };
                let name = p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let at = match p.get("in").and_then(Value::as_str) {
                    Some("path") => In::Path,
                    Some("query") => In::Query,
                    Some("header") => In::Header,
                    _ => continue,
                };
                let schema = p.get("schema");
                let ty = schema
                    .map(|s| resolve(doc, s))
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let validator = match schema {
                    Some(_) => Some(doc_schema(doc, &format!("{ptr}/schema"), draft)?),
                    None => None,
                };
                let name = if matches!(at, In::Header) {
                    name.to_ascii_lowercase()
                } else {
                    name
                };
                // An operation's own parameter replaces the path item's of the same name.
                params.retain(|q: &Param| q.name != name);
                params.push(Param {
                    required: matches!(at, In::Path)
                        || p.get("required").and_then(Value::as_bool).unwrap_or(false),
                    name,
                    at,
                    validator,
                    ty,
                });
            }
            let body = match op.get("requestBody") {
                None => None,
                Some(rb) => {
                    let (rb_ptr, rb) = match rb
                        .get("$ref")
                        .and_then(Value::as_str)
                        .and_then(|r| r.strip_prefix('#'))
                    {
                        Some(r) => (r.to_owned(), doc.pointer(r).unwrap_or(rb)),
                        None => (format!("{op_ptr}/requestBody"), rb),
                    };
                    let content = rb.get("content").and_then(Value::as_object);
                    let json_ct = content.and_then(|c| {
                        c.keys().find(|k| {
                            let k = k.to_ascii_lowercase();
                            k.starts_with("application/json") || k.contains("+json")
                        })
                    });
                    let json = match json_ct {
                        Some(ct)
                            if content
                                .and_then(|c| c.get(ct))
                                .and_then(|m| m.get("schema"))
                                .is_some() =>
                        {
                            Some(doc_schema(
                                doc,
                                &format!("{rb_ptr}/content/{}/schema", pointer_escape(ct)),
                                draft,
                            )?)
                        }
                        _ => None,
                    };
                    Some(BodySpec {
                        required: rb.get("required").and_then(Value::as_bool).unwrap_or(false),
                        json_only: json_ct.is_some() && content.is_some_and(|c| c.len() == 1),
                        json,
                    })
                }
            };
            let segs = template
                .trim_start_matches('/')
                .split('/')
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(n) => Seg::Var(n.to_owned()),
                        None => Seg::Lit(s.to_owned()),
                    },
                )
                .collect();
            let method =
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap_or(Method::GET);
            ops.push(Operation {
                method,
                template: template.clone(),
                segs,
                params,
                body,
            });
        }
    }
    // Literal segments before templated ones (`/pets/mine` before `/pets/{id}`).
    ops.sort_by_key(|o| {
        std::cmp::Reverse(o.segs.iter().filter(|s| matches!(s, Seg::Lit(_))).count())
    });
    Ok((ops, base_path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn nullable_becomes_draft4() {
        let mut v = json!({
            "a": {"type": "string", "nullable": true},
            "b": {"type": "string", "enum": ["x"], "nullable": true},
            "c": {"allOf": [{"$ref": "#/x"}], "nullable": true},
            "d": {"type": "string", "nullable": false},
            "properties": {
                "nullable": {"type": "integer"},
                "example": {"type": "integer", "nullable": true},
            },
            "example": {"type": "string", "nullable": true},
            "x-note": {"type": "string", "nullable": true},
        });
        nullable_to_draft4(&mut v);
        assert_eq!(
            v,
            json!({
                "a": {"type": ["string", "null"]},
                // The enum still applies (OpenAPI 3.0.3): null is not in it.
                "b": {"type": ["string", "null"], "enum": ["x"]},
                // No `type` in the same schema: `nullable` adds nothing.
                "c": {"allOf": [{"$ref": "#/x"}]},
                "d": {"type": "string", "nullable": false},
                "properties": {
                    "nullable": {"type": "integer"},
                    "example": {"type": ["integer", "null"]},
                },
                "example": {"type": "string", "nullable": true},
                "x-note": {"type": "string", "nullable": true},
            })
        );
    }
}
