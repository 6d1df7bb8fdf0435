//! Configuration of the body-inspecting policies: `waf` and `request_validation`.
//!
//! Kept apart from `policy.rs` so the request-protection types read as one unit; they are
//! re-exported from [`crate::policy`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the WAF does with a request a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WafMode {
    /// Refuse it: 403 `waf_blocked`.
    #[default]
    Block,
    /// Log a warning (rule id, location, request id) and let it through.
    LogOnly,
}

/// Families of WAF rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WafCategory {
    /// SQL injection (`sqli-*`).
    Sqli,
    /// Cross-site scripting (`xss-*`).
    Xss,
    /// Path traversal and local file inclusion (`traversal-*`).
    Traversal,
    /// OS command injection (`cmdi-*`).
    Cmdi,
}

/// What happens to a body larger than an inspecting policy's `max_body_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Oversize {
    /// 413 `body_too_large`: what cannot be inspected does not pass.
    #[default]
    Block,
    /// Inspect the head only and stream the body upstream uninspected (also: arguments
    /// past `max_args` are not inspected).
    SkipBody,
}

/// Rules switched off for some parts of some requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WafExclusion {
    /// Rule ids (`sqli-tautology`) or categories (`sqli`); empty: every rule.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Locations: `path`, `query:NAME`, `header:NAME`, `cookie:NAME`, `body` (the whole
    /// body), `body:/json/pointer` or `body:/form_field`. A trailing `*` matches any rest
    /// (`body:/comments/*`). Empty: every location.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Request paths this exclusion applies to (prefixes); empty: every path.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_inspect_bytes() -> u64 {
    1 << 20
}
fn default_waf_headers() -> Vec<String> {
    vec!["cookie".into(), "user-agent".into(), "referer".into()]
}
fn default_max_args() -> usize {
    512
}
fn default_decode_passes() -> u8 {
    3
}
fn default_max_errors() -> usize {
    10
}

/// `waf`: a rule set for SQL injection, XSS, path traversal and command injection, matched
/// on normalised values of the path, query, chosen headers, cookies and the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WafConfig {
    /// `block` (default) or `log_only`.
    #[serde(default)]
    pub mode: WafMode,
    /// Categories enabled (default: all four).
    #[serde(default)]
    pub categories: Vec<WafCategory>,
    /// Only these rule ids (default: every rule of the enabled categories).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Rule ids switched off.
    #[serde(default)]
    pub disabled_rules: Vec<String>,
    /// Rules switched off for given locations or paths.
    #[serde(default)]
    pub exclusions: Vec<WafExclusion>,
    /// Inspect the request path (default true).
    #[serde(default = "yes")]
    pub inspect_path: bool,
    /// Inspect query parameter names and values (default true).
    #[serde(default = "yes")]
    pub inspect_query: bool,
    /// Headers inspected (`cookie` is split into cookies); default `cookie`, `user-agent`,
    /// `referer`.
    #[serde(default = "default_waf_headers")]
    pub headers: Vec<String>,
    /// Inspect the body: JSON keys and string values, form fields, or raw text (default true).
    #[serde(default = "yes")]
    pub inspect_body: bool,
    /// Most body bytes buffered for inspection (default 1 MiB).
    #[serde(default = "default_inspect_bytes")]
    pub max_body_bytes: u64,
    /// Past `max_body_bytes` or `max_args`: `block` (413 / 403) or `skip_body`.
    #[serde(default)]
    pub oversize: Oversize,
    /// Most values inspected per request (query parameters, cookies, form fields, JSON
    /// values; default 512).
    #[serde(default = "default_max_args")]
    pub max_args: usize,
    /// Rounds of percent-decoding (default 3; `%252e` needs 2).
    #[serde(default = "default_decode_passes")]
    pub max_decode_passes: u8,
}

impl WafConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.max_body_bytes == 0 {
            return Err(("max_body_bytes".into(), "must be at least 1".into()));
        }
        if self.max_args == 0 {
            return Err(("max_args".into(), "must be at least 1".into()));
        }
        if self.max_decode_passes == 0 || self.max_decode_passes > 8 {
            return Err(("max_decode_passes".into(), "must be between 1 and 8".into()));
        }
        for (i, h) in self.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err((
                    format!("headers[{i}]"),
                    format!("`{h}` is not a header name"),
                ));
            }
        }
        for (i, e) in self.exclusions.iter().enumerate() {
            for (j, l) in e.locations.iter().enumerate() {
                let kind = l.split(':').next().unwrap_or("");
                let ok = matches!(kind, "path" | "body") && !l.contains(':') && l == kind
                    || (matches!(kind, "query" | "header" | "cookie" | "body")
                        && l.len() > kind.len() + 1);
                if !ok {
                    return Err((
                        format!("exclusions[{i}].locations[{j}]"),
                        format!(
                            "`{l}`: write `path`, `query:NAME`, `header:NAME`, `cookie:NAME`, `body` or `body:/pointer`"
                        ),
                    ));
                }
            }
            for (j, p) in e.path_prefixes.iter().enumerate() {
                if !p.starts_with('/') {
                    return Err((
                        format!("exclusions[{i}].path_prefixes[{j}]"),
                        "must start with `/`".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What happens to a request no operation of the OpenAPI document describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOperation {
    /// 400 `request_invalid`: the document is the contract.
    #[default]
    Reject,
    /// Let it through unvalidated.
    Allow,
}

/// `request_validation`: the request checked against JSON Schemas or an OpenAPI 3 document
/// before it goes upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestValidationConfig {
    /// JSON Schema of the JSON body.
    #[serde(default)]
    pub body_schema: Option<Value>,
    /// Whether a body is required when `body_schema` is given (default false: an empty
    /// body is not validated).
    #[serde(default)]
    pub body_required: bool,
    /// JSON Schema of the query parameters as one object; values are strings, converted to
    /// the `type` the schema gives a property (integer, number, boolean, array).
    #[serde(default)]
    pub query_schema: Option<Value>,
    /// JSON Schema of the headers as one object with lower-case names (values converted
    /// like the query's).
    #[serde(default)]
    pub headers_schema: Option<Value>,
    /// An OpenAPI 3.0 or 3.1 document (inline): the request's method and path select the
    /// operation whose parameters and JSON request body are checked.
    #[serde(default)]
    pub openapi: Option<Value>,
    /// For routes of a managed service: validate against the service's own OpenAPI
    /// document (from its release).
    #[serde(default)]
    pub use_service_openapi: bool,
    /// With an OpenAPI document: requests no operation describes are refused (default) or
    /// let through.
    #[serde(default)]
    pub unknown_operation: UnknownOperation,
    /// Most body bytes buffered for validation (default 1 MiB; 413 past it).
    #[serde(default = "default_inspect_bytes")]
    pub max_body_bytes: u64,
    /// Most errors listed in a 400 answer (default 10).
    #[serde(default = "default_max_errors")]
    pub max_errors: usize,
}

impl RequestValidationConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.max_body_bytes == 0 {
            return Err(("max_body_bytes".into(), "must be at least 1".into()));
        }
        if self.max_errors == 0 {
            return Err(("max_errors".into(), "must be at least 1".into()));
        }
        let sources = [
            self.body_schema.is_some()
                || self.query_schema.is_some()
                || self.headers_schema.is_some(),
            self.openapi.is_some(),
            self.use_service_openapi,
        ];
        match sources.iter().filter(|b| **b).count() {
            0 => {
                return Err((
                    String::new(),
                    "give `body_schema`/`query_schema`/`headers_schema`, `openapi`, or `use_service_openapi: true`".into(),
                ));
            }
            1 => {}
            _ => {
                return Err((
                    "openapi".into(),
                    "give schemas, `openapi` or `use_service_openapi`, not several".into(),
                ));
            }
        }
        for (field, schema) in [
            ("body_schema", &self.body_schema),
            ("query_schema", &self.query_schema),
            ("headers_schema", &self.headers_schema),
        ] {
            if let Some(s) = schema {
                compile_schema(s).map_err(|(at, why)| (join(field, &at), why))?;
            }
        }
        if let Some(doc) = &self.openapi {
            check_openapi(doc).map_err(|(at, why)| (join("openapi", &at), why))?;
        }
        Ok(())
    }
}

fn join(field: &str, at: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{field}.{at}")
    }
}

/// Compiles a JSON Schema (draft detected from `$schema`, 2020-12 by default) with no
/// network or file access. The error names the schema location (dotted) and the reason.
pub fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, (String, String)> {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| {
            let at = e
                .schema_path()
                .as_str()
                .trim_start_matches('/')
                .replace('/', ".");
            (at, format!("invalid JSON Schema: {}", e.masked()))
        })
}

/// Checks the shape the gateway relies on in an OpenAPI document: a 3.x version and a
/// `paths` object whose keys start with `/`.
pub fn check_openapi(doc: &Value) -> Result<(), (String, String)> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if !version.starts_with("3.") {
        return Err(("openapi".into(), "an OpenAPI 3.x document is needed".into()));
    }
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Err(("paths".into(), "the document has no `paths` object".into()));
    };
    for p in paths.keys() {
        if !p.starts_with('/') {
            return Err((format!("paths.{p}"), "a path must start with `/`".into()));
        }
    }
    Ok(())
}
