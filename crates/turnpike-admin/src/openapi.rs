//! The OpenAPI 3.1 document, generated from the endpoint table.
//!
//! Spec schemas come from `turnpike_model::mgmt::spec_schema` (schemars: serde-aware JSON
//! Schema 2020-12, which is OpenAPI 3.1's schema dialect). Each kind's `$defs` move to
//! `components/schemas` and their `$ref`s are rewritten; a definition whose name another
//! kind already used for a different schema is prefixed with the kind's name.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use turnpike_model::mgmt::{Kind, spec_schema};

use crate::endpoints::{BodySpec, ENDPOINTS, Endpoint, Op, QuerySpec, pascal};

static DOCUMENT: LazyLock<Value> = LazyLock::new(build);

/// The document (built once).
pub(crate) fn document() -> &'static Value {
    &DOCUMENT
}

/// The members a merge patch of `kind` may name, from the patch schema this document
/// publishes; `None` when that schema is open (specs whose members depend on a tag).
pub(crate) fn patch_members(kind: Kind) -> Option<&'static Map<String, Value>> {
    let schema = DOCUMENT.pointer(&format!("/components/schemas/{}Patch", pascal(kind)))?;
    if schema.get("additionalProperties") != Some(&Value::Bool(false)) {
        return None;
    }
    schema.get("properties")?.as_object()
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Rewrites `#/$defs/X` references in `value` to their component names.
fn rewrite_refs(value: &mut Value, renamed: &HashMap<String, String>) {
    match value {
        Value::Object(members) => {
            for (key, item) in members.iter_mut() {
                if key == "$ref" {
                    if let Some(target) = item.as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
                        let name = renamed.get(target).map_or(target, String::as_str);
                        *item = Value::String(format!("#/components/schemas/{name}"));
                    }
                } else {
                    rewrite_refs(item, renamed);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite_refs(i, renamed)),
        _ => {}
    }
}

/// What `mgmt::check_name` accepts, as a JSON Schema pattern.
const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";
/// Strings the store can keep: PostgreSQL refuses NUL in JSON text.
const NO_NUL_PATTERN: &str = "^[^\\u0000]*$";

/// Makes schemas say what serde accepts: no NUL in plain strings (a NUL anywhere in a spec
/// is a 422), and the range of each integer format (schemars states only the minimum).
fn tighten(value: &mut Value) {
    match value {
        Value::Object(members) => {
            let range: Option<(i128, i128)> = match members.get("format").and_then(Value::as_str) {
                Some("uint8") => Some((0, u8::MAX.into())),
                Some("uint16") => Some((0, u16::MAX.into())),
                Some("uint32") => Some((0, u32::MAX.into())),
                Some("uint64" | "uint") => Some((0, u64::MAX.into())),
                Some("int32") => Some((i32::MIN.into(), i32::MAX.into())),
                Some("int64" | "int") => Some((i64::MIN.into(), i64::MAX.into())),
                _ => None,
            };
            if let Some((min, max)) = range {
                members.entry("minimum").or_insert_with(|| json!(min));
                members.entry("maximum").or_insert_with(|| json!(max));
            }
            let is_string = match members.get("type") {
                Some(Value::String(t)) => t == "string",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            let constrained = ["pattern", "enum", "const", "format"]
                .iter()
                .any(|k| members.contains_key(*k));
            if is_string && !constrained {
                members.insert("pattern".into(), Value::String(NO_NUL_PATTERN.into()));
            }
            members.values_mut().for_each(tighten);
        }
        Value::Array(items) => items.iter_mut().for_each(tighten),
        _ => {}
    }
}

/// Adds `kind`'s spec schema and its definitions to `schemas`, as `<Kind>Spec`.
fn add_spec_schema(
    kind: Kind,
    schemas: &mut Map<String, Value>,
    raw_defs: &mut HashMap<String, Value>,
) {
    let mut root = spec_schema(kind);
    let defs = root
        .as_object_mut()
        .and_then(|o| {
            o.remove("$schema");
            o.remove("$defs")
        })
        .and_then(|d| match d {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    let mut renamed = HashMap::new();
    for (name, def) in &defs {
        let clash = raw_defs.get(name).is_some_and(|seen| seen != def);
        let component = if clash {
            format!("{}{name}", pascal(kind))
        } else {
            name.clone()
        };
        raw_defs
            .entry(component.clone())
            .or_insert_with(|| def.clone());
        renamed.insert(name.clone(), component);
    }
    for (name, mut def) in defs {
        rewrite_refs(&mut def, &renamed);
        tighten(&mut def);
        let component = renamed.get(&name).cloned().unwrap_or(name);
        schemas.entry(component).or_insert(def);
    }
    rewrite_refs(&mut root, &renamed);
    tighten(&mut root);
    if let Some(name) = root.pointer_mut("/properties/name") {
        name["pattern"] = json!(NAME_PATTERN);
    }
    if kind == Kind::Member {
        if let Some(role) = root.pointer_mut("/properties/role") {
            role["not"] = json!({ "const": "super_admin" });
        }
    }
    schemas.insert(format!("{}Spec", pascal(kind)), root);
}

fn nullable(t: &str) -> Value {
    json!({ "type": [t, "null"] })
}

fn page_of(item: Value) -> Value {
    json!({
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": { "type": "array", "items": item },
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as `cursor` for the next page; null on the last page."
            }
        }
    })
}

fn object_schema(kind: Kind) -> Value {
    let mut schema = json!({
        "type": "object",
        "description": "An object envelope: server-managed fields around the spec.",
        "required": ["id", "kind", "team", "name", "revision", "state", "created_at",
                     "updated_at", "created_by", "updated_by", "spec"],
        "properties": {
            "id": { "type": "string" },
            "kind": { "type": "string", "const": kind.as_str() },
            "team": { "type": ["string", "null"], "description": "The owning team's name." },
            "name": { "type": "string" },
            "revision": { "type": "integer", "description": "Also the ETag." },
            "state": nullable("string"),
            "created_at": { "type": "string", "format": "date-time" },
            "updated_at": { "type": "string", "format": "date-time" },
            "created_by": { "type": ["string", "null"], "description": "Actor: a user id, or `system`." },
            "updated_by": nullable("string"),
            "spec": schema_ref(&format!("{}Spec", pascal(kind))),
        }
    });
    if kind == Kind::Credential {
        schema["properties"]["secret"] = json!({
            "type": "string",
            "description": "A generated API key, present only in the response that created it."
        });
    }
    schema
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "request_id"],
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Stable: bad_request, unauthorized, forbidden, not_found, \
                            route_not_found, method_not_allowed, conflict, precondition_failed, \
                            payload_too_large, unsupported_media_type, validation_failed, \
                            too_many_points, too_many_series, too_many_rows, too_many_calls, \
                            store_unavailable, internal."
                    },
                    "message": { "type": "string" },
                    "request_id": { "type": "string" },
                    "field": { "type": "string", "description": "For validation_failed and the too_many_* codes: the offending field or parameter." }
                }
            }
        }
    })
}

fn release_schema() -> Value {
    json!({
        "type": "object",
        "required": ["number", "note", "created_at", "created_by", "content"],
        "properties": {
            "number": { "type": "integer", "minimum": 1 },
            "note": nullable("string"),
            "created_at": { "type": "string", "format": "date-time" },
            "created_by": nullable("string"),
            "content": {
                "type": "object",
                "description": "`service` (its spec), `routes` and `policies` (specs) as released."
            }
        }
    })
}

fn token_schema(with_secret: bool) -> Value {
    let mut schema = json!({
        "type": "object",
        "required": ["id", "name", "created_at", "expires_at", "last_used_at", "revoked"],
        "properties": {
            "id": { "type": "string" },
            "name": { "type": "string" },
            "created_at": { "type": "string", "format": "date-time" },
            "expires_at": { "type": ["string", "null"], "format": "date-time" },
            "last_used_at": { "type": ["string", "null"], "format": "date-time" },
            "revoked": { "type": "boolean" }
        }
    });
    if with_secret {
        schema["required"]
            .as_array_mut()
            .into_iter()
            .for_each(|r| r.push(json!("secret")));
        schema["properties"]["secret"] =
            json!({ "type": "string", "description": "The bearer token; shown only here." });
    }
    schema
}

const MERGE_PATCH_DOC: &str = "A JSON Merge Patch (RFC 7396) of a spec: null removes a \
    member, objects merge recursively, arrays and other values replace. The result must be a \
    valid spec.";

/// The merge patch schema of a spec: any of its members, with any value (null deletes).
/// Specs whose members depend on a tag (credentials, policies) take any object.
fn patch_schema(spec: &Value) -> Value {
    let closed = spec.get("additionalProperties") == Some(&Value::Bool(false));
    match spec.get("properties").and_then(Value::as_object) {
        Some(properties) if closed => json!({
            "type": "object",
            "description": MERGE_PATCH_DOC,
            "additionalProperties": false,
            "properties": properties.keys().map(|k| (k.clone(), json!({}))).collect::<Map<_, _>>(),
        }),
        _ => json!({
            "type": "object",
            "description": MERGE_PATCH_DOC,
            "propertyNames": { "pattern": NO_NUL_PATTERN },
        }),
    }
}

fn components() -> Map<String, Value> {
    let mut schemas = Map::new();
    let mut raw_defs = HashMap::new();
    for kind in Kind::ALL {
        add_spec_schema(kind, &mut schemas, &mut raw_defs);
        let p = pascal(kind);
        schemas.insert(format!("{p}Object"), object_schema(kind));
        schemas.insert(
            format!("{p}Page"),
            page_of(schema_ref(&format!("{p}Object"))),
        );
        let patch = patch_schema(&schemas[&format!("{p}Spec")]);
        schemas.insert(format!("{p}Patch"), patch);
    }
    let extra = [
        ("Error", error_schema()),
        (
            "DecisionRequest",
            json!({
                "type": "object",
                "additionalProperties": false,
                "properties": { "reason": { "type": "string", "maxLength": 4096 } }
            }),
        ),
        (
            "PublishRequest",
            json!({
                "type": "object",
                "additionalProperties": false,
                "properties": { "note": { "type": "string", "maxLength": 4096 } }
            }),
        ),
        (
            "SwitchRequest",
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["upstream"],
                "properties": {
                    "upstream": { "type": "string", "minLength": 1, "maxLength": 63 },
                    "note": { "type": "string", "maxLength": 4096 }
                }
            }),
        ),
        (
            "RollbackRequest",
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["release"],
                "properties": { "release": { "type": "integer", "minimum": 1 } }
            }),
        ),
        ("Release", release_schema()),
        ("ReleasePage", page_of(schema_ref("Release"))),
        (
            "LifecycleResult",
            json!({
                "type": "object",
                "required": ["service", "release"],
                "properties": {
                    "service": schema_ref("ServiceObject"),
                    "release": { "oneOf": [schema_ref("Release"), { "type": "null" }] }
                }
            }),
        ),
        (
            "ImportResult",
            json!({
                "type": "object",
                "required": ["service", "routes"],
                "properties": {
                    "service": schema_ref("ServiceObject"),
                    "routes": { "type": "array", "items": schema_ref("RouteObject") }
                }
            }),
        ),
        (
            "TokenRequest",
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["name"],
                "properties": {
                    "name": { "type": "string" },
                    "expires_in": { "type": "string", "description": "A duration like `30d` or `12h`." }
                }
            }),
        ),
        ("Token", token_schema(false)),
        ("TokenCreated", token_schema(true)),
        ("TokenPage", page_of(schema_ref("Token"))),
        (
            "Me",
            json!({
                "type": "object",
                "required": ["user", "super_admin", "memberships"],
                "properties": {
                    "user": schema_ref("UserObject"),
                    "super_admin": { "type": "boolean" },
                    "memberships": {
                        "type": "object",
                        "description": "Team name to role.",
                        "additionalProperties": {
                            "enum": ["viewer", "consumer_developer", "api_owner", "team_admin"]
                        }
                    }
                }
            }),
        ),
        (
            "AuditEntry",
            json!({
                "type": "object",
                "required": ["id", "at", "actor", "action", "kind", "object_id", "team", "before",
                             "after", "store_version"],
                "properties": {
                    "id": { "type": "integer" },
                    "at": { "type": "string", "format": "date-time" },
                    "actor": { "type": "string", "description": "A user id, or `system`." },
                    "action": { "type": "string" },
                    "kind": { "type": "string" },
                    "object_id": { "type": "string" },
                    "team": nullable("string"),
                    "before": {},
                    "after": {},
                    "store_version": { "type": "integer" }
                }
            }),
        ),
        ("AuditPage", page_of(schema_ref("AuditEntry"))),
        (
            "JsonSchema",
            json!({ "type": "object", "description": "A JSON Schema (2020-12)." }),
        ),
        (
            "PolicyTypeList",
            json!({
                "type": "object",
                "required": ["items"],
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "stage", "schema"],
                            "properties": {
                                "type": { "type": "string" },
                                "stage": { "type": "string", "enum": turnpike_model::policy::Stage::ALL.map(|s| s.name()) },
                                "schema": { "type": "string" }
                            }
                        }
                    }
                }
            }),
        ),
        (
            "ApplicationUsage",
            json!({
                "type": "object",
                "required": ["application", "items"],
                "properties": {
                    "application": { "type": "string" },
                    "items": {
                        "type": "array",
                        "description": "One per approved subscription of the application.",
                        "items": {
                            "type": "object",
                            "required": ["subscription", "service_team", "service", "plan", "quotas"],
                            "properties": {
                                "subscription": { "type": "string" },
                                "service_team": { "type": "string" },
                                "service": { "type": "string" },
                                "plan": nullable("string"),
                                "quotas": {
                                    "type": "array",
                                    "description": "One per quota of the plan (none without a plan).",
                                    "items": {
                                        "type": "object",
                                        "required": ["period", "limit", "used", "remaining",
                                                     "period_start", "reset_at"],
                                        "properties": {
                                            "period": { "type": "string", "enum": ["day", "month"] },
                                            "limit": { "type": "integer", "minimum": 0 },
                                            "used": { "type": "integer", "minimum": 0 },
                                            "remaining": { "type": "integer", "minimum": 0 },
                                            "period_start": { "type": "string", "format": "date-time" },
                                            "reset_at": { "type": "string", "format": "date-time" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }),
        ),
        (
            "AnalyticsTimeseries",
            json!({
                "type": "object",
                "required": ["metric", "step", "from", "to", "series"],
                "properties": {
                    "metric": { "type": "string", "enum": crate::analytics::METRICS },
                    "step": { "type": "string", "enum": ["minute", "hour", "day"] },
                    "from": { "type": "integer", "description": "Epoch milliseconds, aligned to the step." },
                    "to": { "type": "integer", "description": "Epoch milliseconds, exclusive." },
                    "series": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["labels", "points"],
                            "properties": {
                                "labels": {
                                    "type": "object",
                                    "description": "The filters given and the `group_by` label (null: none).",
                                    "additionalProperties": { "type": ["string", "integer", "null"] }
                                },
                                "points": {
                                    "type": "array",
                                    "description": "`[time, value]` per step: time in epoch milliseconds (an integer), value null where a ratio or latency has no requests.",
                                    "items": {
                                        "type": "array",
                                        "items": { "type": ["number", "null"] },
                                        "minItems": 2,
                                        "maxItems": 2
                                    }
                                }
                            }
                        }
                    }
                }
            }),
        ),
        (
            "AnalyticsTop",
            json!({
                "type": "object",
                "required": ["by", "order", "step", "from", "to", "items"],
                "properties": {
                    "by": { "type": "string", "enum": ["application", "route", "service"] },
                    "order": { "type": "string", "enum": ["requests", "errors", "p99"] },
                    "step": { "type": "string", "enum": ["minute", "hour", "day"] },
                    "from": { "type": "integer" },
                    "to": { "type": "integer" },
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["key", "requests", "errors", "error_rate", "p50", "p95",
                                         "p99", "bytes_in", "bytes_out"],
                            "properties": {
                                "key": { "type": ["string", "null"], "description": "null: calls without one." },
                                "requests": { "type": "integer", "minimum": 0 },
                                "errors": { "type": "integer", "minimum": 0, "description": "4xx and 5xx." },
                                "error_rate": { "type": ["number", "null"] },
                                "p50": { "type": ["number", "null"], "description": "Milliseconds." },
                                "p95": { "type": ["number", "null"] },
                                "p99": { "type": ["number", "null"] },
                                "bytes_in": { "type": "integer", "minimum": 0 },
                                "bytes_out": { "type": "integer", "minimum": 0 }
                            }
                        }
                    }
                }
            }),
        ),
        (
            "CachePurgeRequest",
            json!({
                "type": "object",
                "description": "Exactly one of the fields.",
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": false,
                "properties": {
                    "key": { "type": "string", "minLength": 1, "description": "A URL: `scheme://host:port/path?query` (the port always given)." },
                    "prefix": { "type": "string", "minLength": 1, "description": "The start of the URLs to purge." },
                    "tag": { "type": "string", "minLength": 1, "description": "A value of the upstream's `cache-tag` response header." },
                    "all": { "type": "boolean", "const": true, "description": "Everything." }
                }
            }),
        ),
        (
            "CachePurgeReport",
            json!({
                "type": "object",
                "required": ["purged"],
                "properties": {
                    "purged": {
                        "type": "object",
                        "required": ["memory", "shared"],
                        "properties": {
                            "memory": { "type": "integer", "minimum": 0, "description": "Entries removed from this node's memory." },
                            "shared": { "type": ["integer", "null"], "minimum": 0, "description": "Keys deleted in Redis; null without a Redis tier, or when it could not be reached." }
                        }
                    }
                }
            }),
        ),
        (
            "AlertHistoryPage",
            json!({
                "type": "object",
                "required": ["items", "next_cursor"],
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["id", "rule", "kind", "state", "value", "threshold", "at", "notified"],
                            "properties": {
                                "id": { "type": "string" },
                                "rule": { "type": "string" },
                                "kind": { "type": "string" },
                                "state": { "type": "string", "enum": ["firing", "resolved"] },
                                "value": { "type": ["number", "null"] },
                                "threshold": { "type": ["number", "null"] },
                                "at": { "type": "string", "format": "date-time" },
                                "notified": { "type": "boolean" }
                            }
                        }
                    },
                    "next_cursor": nullable("string")
                }
            }),
        ),
        (
            "OpenApiDocument",
            json!({ "type": "object", "description": "An OpenAPI 3 document." }),
        ),
        ("CallLog", call_log_schema()),
        ("CallLogPage", call_log_page_schema()),
    ];
    for (name, schema) in extra {
        schemas.insert(name.to_owned(), schema);
    }
    schemas
}

/// A page of `GET /call-logs`: a page of calls that also says whether the search bounds
/// cut it short.
fn call_log_page_schema() -> Value {
    let mut page = page_of(schema_ref("CallLog"));
    page["required"] = json!(["items", "next_cursor", "partial"]);
    page["properties"]["partial"] = json!({
        "type": "boolean",
        "description": "True when the page stopped at the work bounds of a search \
            (`observability.call_log.search`) before it was full: it holds the matching calls \
            newer than every stored call it did not read, and `next_cursor` goes on from there."
    });
    page
}

/// One call as `GET /call-logs` shows it.
fn call_log_schema() -> Value {
    let text = |d: &str| json!({ "type": "string", "description": d });
    let maybe = |d: &str| json!({ "type": ["string", "null"], "description": d });
    let int = |d: &str| json!({ "type": "integer", "minimum": 0, "description": d });
    let properties = json!({
        "id": int("Row id; increases as calls are written."),
        "time": { "type": "string", "format": "date-time", "description": "When the request arrived." },
        "request_id": text("The request id (`X-Request-Id`)."),
        "trace_id": maybe("W3C trace id, when traced."),
        "client_ip": text("The client's IP (after trusted proxies)."),
        "protocol": text("`HTTP/1.1`, `HTTP/2`, ..."),
        "method": text("Request method."),
        "host": maybe("Requested host."),
        "path": text("Request path, without the query."),
        "route": maybe("The matched route's name."),
        "service": maybe("The service's store id."),
        "service_name": maybe("`team/name` of the service, while it exists."),
        "application": maybe("The identified application's store id."),
        "application_name": maybe("The application's name."),
        "team": maybe("The application's team."),
        "status": { "type": "integer", "minimum": 100, "maximum": 599, "description": "Response status." },
        "bytes_in": int("Request body bytes."),
        "bytes_out": int("Response body bytes sent."),
        "duration_us": int("From arrival to the end of the response body, microseconds."),
        "upstream_us": { "type": ["integer", "null"], "minimum": 0, "description": "Upstream time to response headers, microseconds." },
        "upstream": maybe("The upstream pool."),
        "upstream_target": maybe("The upstream target that answered."),
        "attempts": int("Upstream attempts."),
        "cache": maybe("Response cache outcome."),
        "error": maybe("The gateway's error code, when it answered with an error."),
        "user_agent": maybe("The client's User-Agent."),
        "completed": { "type": "boolean", "description": "Whether the response body was sent to the end." }
    });
    let required: Vec<String> = properties
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    json!({ "type": "object", "required": required, "properties": properties })
}

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            let (schema, description) = match name {
                "number" => (json!({ "type": "integer", "minimum": 1 }), "Release number."),
                "team" => (json!({ "type": "string", "pattern": NAME_PATTERN }), "Team name."),
                "user" => (json!({ "type": "string", "pattern": NAME_PATTERN }), "User name."),
                "id" => (json!({ "type": "string" }), "Token id."),
                "request_id" => (json!({ "type": "string" }), "Request id."),
                "kind" => (
                    json!({ "type": "string", "enum": Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>() }),
                    "Kind name.",
                ),
                "policy_type" => (
                    json!({ "type": "string", "enum": turnpike_model::policy::POLICY_TYPES }),
                    "Policy type.",
                ),
                _ => (json!({ "type": "string", "pattern": NAME_PATTERN }), "Object name."),
            };
            json!({ "name": name, "in": "path", "required": true, "schema": schema, "description": description })
        })
        .collect()
}

fn query_param(name: &str, schema: Value, description: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": schema, "description": description })
}

fn query_params(spec: QuerySpec) -> Vec<Value> {
    let limit = || {
        query_param(
            "limit",
            json!({ "type": "integer", "minimum": 1, "maximum": turnpike_store::MAX_LIMIT }),
            "Page size (default 50).",
        )
    };
    let cursor = || {
        query_param(
            "cursor",
            json!({ "type": "string" }),
            "`next_cursor` of the previous page.",
        )
    };
    let state = || {
        query_param(
            "state",
            json!({ "type": "string" }),
            "Only objects in this state.",
        )
    };
    let time = |name: &str, what: &str| {
        query_param(
            name,
            json!({ "type": "string" }),
            &format!("{what}: epoch milliseconds or an RFC 3339 time."),
        )
    };
    let label = |name: &str, what: &str| {
        query_param(name, json!({ "type": "string", "maxLength": 512 }), what)
    };
    let team = || {
        query_param(
            "team",
            json!({ "type": "string" }),
            "Only this team's services and applications (required unless super admin).",
        )
    };
    let labels = || {
        vec![
            label("service", "Only this service (store id)."),
            label(
                "route",
                "Only this route (gateway route name, `team/service/route`).",
            ),
            label("application", "Only this application (store id)."),
        ]
    };
    match spec {
        QuerySpec::None => Vec::new(),
        QuerySpec::Timeseries => {
            let mut v = vec![
                json!({
                    "name": "metric", "in": "query", "required": true,
                    "schema": { "type": "string", "enum": crate::analytics::METRICS },
                    "description": "What each point measures."
                }),
                time("from", "Start (default: 60 steps before `to`)"),
                time("to", "End, exclusive (default: now)"),
                query_param(
                    "step",
                    json!({ "type": "string", "enum": ["minute", "hour", "day"] }),
                    "Bucket width (default minute).",
                ),
                query_param(
                    "group_by",
                    json!({ "type": "string", "enum": crate::analytics::GROUP_BY }),
                    "One series per value of this label.",
                ),
            ];
            v.extend(labels());
            v.push(team());
            v
        }
        QuerySpec::Top => {
            let mut v = vec![
                json!({
                    "name": "by", "in": "query", "required": true,
                    "schema": { "type": "string", "enum": ["application", "route", "service"] },
                    "description": "What is ranked."
                }),
                query_param(
                    "order",
                    json!({ "type": "string", "enum": ["requests", "errors", "p99"] }),
                    "Ranked by (default requests), highest first.",
                ),
                time("from", "Start (default: 24 hours before `to`)"),
                time("to", "End, exclusive (default: now)"),
                query_param(
                    "limit",
                    json!({ "type": "integer", "minimum": 1, "maximum": 100 }),
                    "How many (default 10).",
                ),
            ];
            v.extend(labels());
            v.push(team());
            v
        }
        QuerySpec::AlertHistory => vec![
            query_param("rule", json!({ "type": "string" }), "Only this rule."),
            time("from", "Only transitions at or after"),
            time("to", "Only transitions before"),
            limit(),
            cursor(),
        ],
        QuerySpec::List => vec![
            limit(),
            cursor(),
            state(),
            query_param(
                "name_prefix",
                json!({ "type": "string" }),
                "Only names starting with this.",
            ),
        ],
        QuerySpec::Filtered => vec![limit(), cursor(), state()],
        QuerySpec::CallLogs => vec![
            query_param(
                "from",
                json!({ "type": "string" }),
                "Calls that arrived at or after this: an RFC 3339 date-time or epoch milliseconds.",
            ),
            query_param(
                "to",
                json!({ "type": "string" }),
                "Calls that arrived before this: an RFC 3339 date-time or epoch milliseconds.",
            ),
            query_param(
                "service",
                json!({ "type": "string" }),
                "Only calls to this service: a store id or `team/name`.",
            ),
            query_param(
                "route",
                json!({ "type": "string" }),
                "Only calls matched by this route (its gateway name, `team/service/route` for managed routes).",
            ),
            query_param(
                "application",
                json!({ "type": "string" }),
                "Only calls by this application: a store id or `team/name`.",
            ),
            query_param(
                "status",
                json!({ "type": "integer", "minimum": 100, "maximum": 599 }),
                "Only calls answered with this status.",
            ),
            query_param(
                "status_class",
                json!({ "type": "string", "enum": ["1xx", "2xx", "3xx", "4xx", "5xx"] }),
                "Only calls answered with a status of this class.",
            ),
            query_param(
                "request_id",
                json!({ "type": "string" }),
                "Only calls with this request id.",
            ),
            limit(),
            query_param(
                "cursor",
                json!({ "type": "string", "pattern": "^[0-9]+\\.[0-9]+$" }),
                "`next_cursor` of the previous page.",
            ),
        ],
        QuerySpec::Audit => vec![
            query_param(
                "kind",
                json!({ "type": "string" }),
                "Only entries about this kind.",
            ),
            query_param(
                "team",
                json!({ "type": "string" }),
                "Only this team's entries (required unless super admin).",
            ),
            query_param(
                "object_id",
                json!({ "type": "string" }),
                "Only entries about this object id.",
            ),
            limit(),
            query_param(
                "cursor",
                json!({ "type": "string", "pattern": "^[0-9]+$" }),
                "`next_cursor` of the previous page.",
            ),
        ],
    }
}

fn status_description(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Malformed request (bad JSON, unreadable body)",
        401 => "Missing, unknown, expired or revoked token",
        403 => "The caller's role does not allow this",
        404 => "No such object, or it belongs to a team the caller is not in",
        409 => "Conflict: duplicate name, referenced object, or illegal state transition",
        412 => "If-Match names another revision",
        413 => "Request body too large",
        415 => "Unsupported content type",
        422 => "Validation failed (see `field`)",
        503 => "The store is unavailable; retry later",
        _ => "Error",
    }
}

fn operation(ep: &Endpoint) -> Value {
    let mut parameters = path_params(&ep.path);
    parameters.extend(query_params(ep.query));
    if matches!(ep.op, Op::Replace(_) | Op::Patch(_) | Op::Delete(_)) {
        parameters.push(json!({
            "name": "If-Match", "in": "header", "required": false,
            "schema": { "type": "string" },
            "description": "The ETag (revision) the change is based on, like `\"3\"`."
        }));
    }
    let mut responses = Map::new();
    let mut success = json!({ "description": status_description(ep.status) });
    if let Some(schema) = &ep.response {
        success["content"] = json!({ "application/json": { "schema": schema_ref(schema) } });
    }
    if matches!(
        ep.op,
        Op::Create(_) | Op::Get(_) | Op::Replace(_) | Op::Patch(_)
    ) {
        success["headers"] = json!({
            "ETag": { "description": "The revision, quoted.", "schema": { "type": "string" } },
            "Location": { "description": "The object's URL (on create and rename).", "schema": { "type": "string" } }
        });
    }
    responses.insert(ep.status.to_string(), success);
    for status in &ep.errors {
        responses.insert(
            status.to_string(),
            json!({
                "description": status_description(*status),
                "content": { "application/json": { "schema": schema_ref("Error") } }
            }),
        );
    }
    let mut op = json!({
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "tags": [ep.tag],
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(description) = ep.description {
        op["description"] = json!(description);
    }
    if !ep.auth {
        op["security"] = json!([]);
    }
    match &ep.body {
        BodySpec::None => {}
        BodySpec::Json { schema, required } => {
            op["requestBody"] = json!({
                "required": required,
                "content": { "application/json": { "schema": schema_ref(schema) } }
            });
        }
        BodySpec::MergePatch => {
            let schema = match ep.op {
                Op::Patch(kind) => format!("{}Patch", pascal(kind)),
                _ => "OpenApiDocument".to_owned(),
            };
            op["requestBody"] = json!({
                "required": true,
                "content": {
                    "application/merge-patch+json": { "schema": schema_ref(&schema) },
                    "application/json": { "schema": schema_ref(&schema) }
                }
            });
        }
    }
    op
}

fn build() -> Value {
    let mut paths = Map::new();
    for ep in ENDPOINTS.iter() {
        let item = paths.entry(ep.path.clone()).or_insert_with(|| json!({}));
        item[ep.method.as_str().to_ascii_lowercase()] = operation(ep);
    }
    let mut tags: Vec<&str> = ENDPOINTS.iter().map(|e| e.tag.as_str()).collect();
    tags.sort_unstable();
    tags.dedup();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Turnpike Admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Manage teams, services, routes, consumers, plans and subscriptions. \
                Objects are addressed by name; team-scoped objects live under their team. \
                Writes take the spec as body; responses wrap it in an envelope. Objects of \
                teams the caller is not a member of answer 404. See docs/ADMIN-API.md."
        },
        "tags": tags.iter().map(|t| json!({ "name": t })).collect::<Vec<_>>(),
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "schemas": components(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin token (`tp_...`)."
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_rewritten() {
        let mut v = json!({ "a": { "$ref": "#/$defs/X" }, "b": [{ "$ref": "#/$defs/Y" }] });
        let renamed = HashMap::from([("X".to_owned(), "KX".to_owned())]);
        rewrite_refs(&mut v, &renamed);
        assert_eq!(v["a"]["$ref"], "#/components/schemas/KX");
        assert_eq!(v["b"][0]["$ref"], "#/components/schemas/Y");
    }
}
