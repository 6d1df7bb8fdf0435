//! Configuration of the transformation policies: `request_transform`, `response_transform`
//! and `compression`, and the template language their values are written in.
//!
//! # Templates
//!
//! Header and query values, the rewritten path and the string values of body operations are
//! templates: text with `${variable}` placeholders, resolved per request. `$${` writes a
//! literal `${`. A variable with no value (a missing header, an anonymous caller's
//! application) renders as the empty string, or as `null` where a whole JSON value is
//! expected. The variables ([`Var`]):
//!
//! | variable | value |
//! |---|---|
//! | `request_id`, `client_ip`, `method`, `path`, `route` | the request's |
//! | `app.id`, `app.name` | the identified application |
//! | `jwt.<claim>` | a claim of the verified JWT (non-strings as JSON) |
//! | `param.<name>` | a route path parameter (`/users/{id}` → `param.id`) |
//! | `header.<name>`, `query.<name>` | a request header or query parameter |
//! | `status`, `response.header.<name>` | the upstream's answer (`response_transform` only) |
//! | `body`, `body/<json pointer>` | the parsed body (body values only) |

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Headers the gateway writes upstream about the caller and the hops. A request transform
/// may not write them (it could forge an identity); `X-Client-Cert-*` too.
pub const GATEWAY_WRITTEN: [&str; 9] = [
    "x-consumer-id",
    "x-consumer-name",
    "x-consumer-team",
    "x-authenticated-scopes",
    "x-anonymous-consumer",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Whether the gateway writes header `name` upstream (see [`GATEWAY_WRITTEN`]); `_` is read
/// as `-`, as CGI-style servers do.
pub fn gateway_written(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('_', "-");
    name.starts_with("x-client-cert-") || GATEWAY_WRITTEN.contains(&name.as_str())
}

/// Header or query-parameter operations, applied in this order: `remove`, `rename`, `set`,
/// `add`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldOps {
    /// Names removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Names renamed (`old: new`), keeping their values.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Values set (templates), replacing any present.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values added (templates) after any present.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

impl FieldOps {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }

    fn check(&self, at: &str, header: bool, response: bool) -> Result<(), (String, String)> {
        let name_ok = |n: &str| {
            if header {
                http::HeaderName::from_bytes(n.as_bytes()).is_ok()
            } else {
                !n.is_empty()
            }
        };
        let what = if header { "header" } else { "query parameter" };
        for (i, n) in self.remove.iter().enumerate() {
            if !name_ok(n) {
                return Err((
                    format!("{at}.remove[{i}]"),
                    format!("`{n}` is not a valid {what} name"),
                ));
            }
        }
        let forged = |n: &str| header && !response && gateway_written(n);
        let forbidden =
            |n: &str| format!("`{n}` is written by the gateway and cannot be set by a transform");
        for (from, to) in &self.rename {
            if forged(to) {
                return Err((format!("{at}.rename.{from}"), forbidden(to)));
            }
            for n in [from, to] {
                if !name_ok(n) {
                    return Err((
                        format!("{at}.rename.{from}"),
                        format!("`{n}` is not a valid {what} name"),
                    ));
                }
            }
        }
        for (field, map) in [("set", &self.set), ("add", &self.add)] {
            for (n, v) in map {
                if !name_ok(n) {
                    return Err((
                        format!("{at}.{field}.{n}"),
                        format!("`{n}` is not a valid {what} name"),
                    ));
                }
                if forged(n) {
                    return Err((format!("{at}.{field}.{n}"), forbidden(n)));
                }
                Template::parse(
                    v,
                    Scope {
                        response,
                        body: false,
                    },
                )
                .map_err(|e| (format!("{at}.{field}.{n}"), e))?;
            }
        }
        Ok(())
    }
}

/// A body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// JSON (`application/json`, `*+json`).
    #[default]
    Json,
    /// XML (`application/xml`, `text/xml`, `*+xml`), read into JSON by the mapping in
    /// [`XmlOptions`].
    Xml,
}

/// How XML maps to JSON and back: an element is an object keyed by its children's names;
/// attributes are keys with [`XmlOptions::attribute_prefix`]; text beside attributes or
/// children is under [`XmlOptions::text_key`]; an element with only text is that text;
/// repeated children are an array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XmlOptions {
    /// The root element written for a JSON document that is not an object with one key.
    #[serde(default = "default_root")]
    pub root: String,
    /// Prefix of attribute keys.
    #[serde(default = "default_attribute_prefix")]
    pub attribute_prefix: String,
    /// Key of an element's text when it also has attributes or children.
    #[serde(default = "default_text_key")]
    pub text_key: String,
    /// Read numbers, `true`, `false` and empty elements (`null`) as JSON types, where the
    /// text is exactly the JSON form (`007` stays a string).
    #[serde(default = "yes")]
    pub infer_types: bool,
    /// Drop namespace prefixes from element and attribute names (`soap:Body` → `Body`), and
    /// `xmlns` declarations.
    #[serde(default)]
    pub strip_namespaces: bool,
    /// Elements that are always arrays, even with one occurrence.
    #[serde(default)]
    pub arrays: Vec<String>,
    /// When writing XML: wrap the document in a SOAP envelope of this version (`1.1` or
    /// `1.2`).
    #[serde(default)]
    pub soap: Option<String>,
}

fn default_root() -> String {
    "root".into()
}
fn default_attribute_prefix() -> String {
    "@".into()
}
fn default_text_key() -> String {
    "#text".into()
}
fn yes() -> bool {
    true
}

impl Default for XmlOptions {
    fn default() -> Self {
        Self {
            root: default_root(),
            attribute_prefix: default_attribute_prefix(),
            text_key: default_text_key(),
            infer_types: true,
            strip_namespaces: false,
            arrays: Vec::new(),
            soap: None,
        }
    }
}

/// One operation on a JSON body. Paths are JSON pointers (RFC 6901).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum JsonOp {
    /// Sets `value` at `path`, creating missing parent objects. In an array, an index inserts
    /// and `-` appends. String values are templates; a string that is one variable alone
    /// (`"${jwt.roles}"`) takes that variable's JSON value.
    Add {
        /// Where.
        path: String,
        /// What.
        value: Value,
    },
    /// Removes `path` (nothing if it is absent).
    Remove {
        /// What.
        path: String,
    },
    /// Renames the member at `path` to `to`, in the same object.
    Rename {
        /// The member.
        path: String,
        /// Its new name.
        to: String,
    },
    /// Moves the value at `from` to `path` (nothing if `from` is absent).
    Move {
        /// Where it is.
        from: String,
        /// Where it goes.
        path: String,
    },
    /// Copies the value at `from` to `path` (nothing if `from` is absent).
    Copy {
        /// Where it is.
        from: String,
        /// Where the copy goes.
        path: String,
    },
}

/// What to do with a body: read it (JSON, or XML turned into JSON), apply `ops` in order,
/// optionally reshape it with `shape`, and write it (JSON or XML). Bodies of other types pass
/// untouched and streamed; a body is read whole only up to `max_bytes` (413 for a request,
/// 502 for a response past it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BodyTransform {
    /// The format read; the body's `Content-Type` must be of it.
    #[serde(default)]
    pub from: BodyFormat,
    /// The format written (and its `Content-Type`). Defaults to `from`.
    #[serde(default)]
    pub to: Option<BodyFormat>,
    /// Operations, in order.
    #[serde(default)]
    pub ops: Vec<JsonOp>,
    /// A new document built from the (transformed) body: a JSON value whose strings are
    /// templates, `${body/...}` picking from the body (`{"id": "${body/data/0/id}"}`).
    #[serde(default)]
    pub shape: Option<Value>,
    /// Largest body read.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// The XML mapping.
    #[serde(default)]
    pub xml: XmlOptions,
}

fn default_max_bytes() -> u64 {
    1024 * 1024
}

impl BodyTransform {
    fn check(&self, response: bool) -> Result<(), (String, String)> {
        if self.max_bytes == 0 {
            return Err(("body.max_bytes".into(), "must be at least 1".into()));
        }
        let scope = Scope {
            response,
            body: true,
        };
        for (i, op) in self.ops.iter().enumerate() {
            let at = format!("body.ops[{i}]");
            let pointers: Vec<(&str, &str)> = match op {
                JsonOp::Add { path, value } => {
                    check_value(value, scope).map_err(|e| (format!("{at}.value"), e))?;
                    vec![("path", path)]
                }
                JsonOp::Remove { path } => vec![("path", path)],
                JsonOp::Rename { path, to } => {
                    if to.is_empty() {
                        return Err((format!("{at}.to"), "must not be empty".into()));
                    }
                    vec![("path", path)]
                }
                JsonOp::Move { from, path } | JsonOp::Copy { from, path } => {
                    vec![("from", from), ("path", path)]
                }
            };
            for (field, p) in pointers {
                if !p.starts_with('/') {
                    return Err((
                        format!("{at}.{field}"),
                        format!("`{p}` is not a JSON pointer (it starts with `/`)"),
                    ));
                }
            }
        }
        if let Some(shape) = &self.shape {
            check_value(shape, scope).map_err(|e| ("body.shape".to_owned(), e))?;
        }
        let x = &self.xml;
        if x.root.is_empty() || x.text_key.is_empty() || x.attribute_prefix.is_empty() {
            return Err((
                "body.xml".into(),
                "`root`, `text_key` and `attribute_prefix` must not be empty".into(),
            ));
        }
        if x.text_key.starts_with(&x.attribute_prefix) {
            return Err((
                "body.xml.text_key".into(),
                "must not start with `attribute_prefix`".into(),
            ));
        }
        if let Some(v) = &x.soap
            && v != "1.1"
            && v != "1.2"
        {
            return Err((
                "body.xml.soap".into(),
                format!("`{v}` is not a SOAP version (1.1 or 1.2)"),
            ));
        }
        Ok(())
    }
}

fn check_value(v: &Value, scope: Scope) -> Result<(), String> {
    match v {
        Value::String(s) => Template::parse(s, scope).map(drop),
        Value::Array(a) => a.iter().try_for_each(|v| check_value(v, scope)),
        Value::Object(o) => o.values().try_for_each(|v| check_value(v, scope)),
        _ => Ok(()),
    }
}

/// `request_transform`: change the request before it goes upstream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestTransformConfig {
    /// The method sent upstream.
    #[serde(default)]
    pub method: Option<String>,
    /// The path sent upstream (a template; variables are percent-encoded), replacing the
    /// route's rewrite.
    #[serde(default)]
    pub path: Option<String>,
    /// Header operations.
    #[serde(default)]
    pub headers: FieldOps,
    /// Query parameter operations.
    #[serde(default)]
    pub query: FieldOps,
    /// Body operations.
    #[serde(default)]
    pub body: Option<BodyTransform>,
}

impl RequestTransformConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if let Some(m) = &self.method {
            if http::Method::from_bytes(m.as_bytes()).is_err() {
                return Err(("method".into(), format!("`{m}` is not a method")));
            }
            if *m != m.to_ascii_uppercase() {
                return Err((
                    "method".into(),
                    format!(
                        "methods are case-sensitive: write `{}`",
                        m.to_ascii_uppercase()
                    ),
                ));
            }
        }
        if let Some(p) = &self.path {
            if !p.starts_with('/') {
                return Err(("path".into(), "must start with `/`".into()));
            }
            let t = Template::parse(p, Scope::default()).map_err(|e| ("path".to_owned(), e))?;
            for piece in &t.0 {
                let Piece::Text(text) = piece else {
                    continue;
                };
                if let Some(c) = text
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(*c)))
                {
                    return Err((
                        "path".into(),
                        format!("`{c}` cannot appear in a path (percent-encode it)"),
                    ));
                }
                if text.split('/').any(|seg| seg == "." || seg == "..") {
                    return Err(("path".into(), "a path has no `.` or `..` segments".into()));
                }
            }
        }
        self.headers.check("headers", true, false)?;
        self.query.check("query", false, false)?;
        if let Some(b) = &self.body {
            b.check(false)?;
        }
        Ok(())
    }
}

/// `response_transform`: change the upstream's answer before the client gets it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseTransformConfig {
    /// Status codes replaced (`{"404": 200}`).
    #[serde(default)]
    pub status: BTreeMap<u16, u16>,
    /// Header operations.
    #[serde(default)]
    pub headers: FieldOps,
    /// Body operations.
    #[serde(default)]
    pub body: Option<BodyTransform>,
}

impl ResponseTransformConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        for (from, to) in &self.status {
            for s in [from, to] {
                if !(200..=599).contains(s) {
                    return Err((
                        format!("status.{from}"),
                        format!("{s} is not a final status"),
                    ));
                }
            }
            // 204 and 304 have no body: the upstream's would be sent as one, and a 304 would
            // claim a stored answer the client does not have.
            if matches!(to, 204 | 304) || matches!(from, 204 | 304) {
                return Err((
                    format!("status.{from}"),
                    "204 and 304 cannot be remapped (they have no body)".into(),
                ));
            }
        }
        self.headers.check("headers", true, true)?;
        if let Some(b) = &self.body {
            b.check(true)?;
        }
        Ok(())
    }
}

/// A compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// `gzip`.
    Gzip,
    /// `br` (Brotli).
    Br,
    /// `zstd`.
    Zstd,
}

impl Algorithm {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Br => "br",
            Self::Zstd => "zstd",
        }
    }
}

/// How hard to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompressionLevel {
    /// The least CPU.
    Fastest,
    /// A balance (gzip 6, brotli 4, zstd 3).
    #[default]
    Default,
    /// The smallest output (slow: for rarely changing, cached answers).
    Best,
}

/// `compression`: compress responses with the best algorithm the client accepts
/// (`Accept-Encoding`, with q-values; ties go to the order of `algorithms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Algorithms offered, by preference.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Responses whose `Content-Length` is below this are sent as they are.
    #[serde(default = "default_min_bytes")]
    pub min_bytes: u64,
    /// Media types compressed (`text/*` matches every `text/` type).
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// How hard to compress.
    #[serde(default)]
    pub level: CompressionLevel,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip]
}
fn default_min_bytes() -> u64 {
    256
}
fn default_content_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/*+json",
        "application/xml",
        "application/*+xml",
        "application/javascript",
        "application/x-ndjson",
        "image/svg+xml",
    ]
    .map(String::from)
    .to_vec()
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            algorithms: default_algorithms(),
            min_bytes: default_min_bytes(),
            content_types: default_content_types(),
            level: CompressionLevel::Default,
        }
    }
}

impl CompressionConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.algorithms.is_empty() {
            return Err((
                "algorithms".into(),
                "must name at least one algorithm".into(),
            ));
        }
        check_media_types(&self.content_types)
    }
}

/// What masking does to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaskAction {
    /// Masks all but the last `keep` letters and digits, keeping separators
    /// (`**** **** **** 1111`); an email keeps its first character and its domain.
    #[default]
    Partial,
    /// Replaces the value with `sha256:` and the first 16 hex digits of the SHA-256 of the
    /// salt and the value: a stable pseudonym that still correlates.
    Hash,
    /// Removes a field; a match inside text becomes `[REDACTED]`.
    Remove,
}

/// A built-in detector of sensitive values in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Payment card numbers: 13 to 19 digits, optionally grouped by spaces or dashes, that
    /// pass the Luhn check.
    Card,
    /// Email addresses.
    Email,
    /// Phone numbers: international (`+44 20 7946 0958`, `+14155550123`) and grouped national
    /// (`(415) 555-0123`, `415-555-0123`).
    Phone,
    /// National identifiers: US Social Security numbers (`123-45-6789`, area and group
    /// rules checked) and UK National Insurance numbers (`JG 10 37 59 A`).
    NationalId,
    /// International bank account numbers, mod-97 checked.
    Iban,
}

/// A field masked wherever it is, by JSON pointer or by member name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskField {
    /// A JSON pointer (`/user/ssn`; `*` matches any member or index: `/users/*/ssn`).
    #[serde(default)]
    pub path: Option<String>,
    /// A member name, at any depth (`password`).
    #[serde(default)]
    pub name: Option<String>,
    /// What to do; defaults to the policy's `action`.
    #[serde(default)]
    pub action: Option<MaskAction>,
}

/// A custom pattern masked in text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskPattern {
    /// A regular expression.
    pub regex: String,
    /// What to do; defaults to the policy's `action`.
    #[serde(default)]
    pub action: Option<MaskAction>,
}

/// `data_masking`: redacts sensitive data in responses (and in the bodies the access log
/// captures): fields by path or name, and values found by detectors or patterns in every
/// string of a JSON body, or in a text body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataMaskingConfig {
    /// Fields masked whatever their content.
    #[serde(default)]
    pub fields: Vec<MaskField>,
    /// Detectors run over every string.
    #[serde(default)]
    pub detectors: Vec<Detector>,
    /// Custom patterns run over every string.
    #[serde(default)]
    pub patterns: Vec<MaskPattern>,
    /// The default action.
    #[serde(default)]
    pub action: MaskAction,
    /// Letters and digits `partial` keeps at the end.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Salt of `hash`.
    #[serde(default)]
    pub hash_salt: String,
    /// Largest body masked; a larger one is refused (502 `response_too_large`) rather than
    /// sent unmasked.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Media types masked (`text/*` matches every `text/` type); other bodies pass.
    #[serde(default = "default_mask_types")]
    pub content_types: Vec<String>,
    /// Also mask the request and response bodies the access log captures on the route.
    #[serde(default = "yes")]
    pub logs: bool,
}

fn default_keep() -> usize {
    4
}

fn default_mask_types() -> Vec<String> {
    ["application/json", "application/*+json", "text/*"]
        .map(String::from)
        .to_vec()
}

impl Default for DataMaskingConfig {
    fn default() -> Self {
        Self {
            fields: Vec::new(),
            detectors: Vec::new(),
            patterns: Vec::new(),
            action: MaskAction::Partial,
            keep: default_keep(),
            hash_salt: String::new(),
            max_bytes: default_max_bytes(),
            content_types: default_mask_types(),
            logs: true,
        }
    }
}

impl DataMaskingConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        for (i, f) in self.fields.iter().enumerate() {
            match (&f.path, &f.name) {
                (Some(p), None) if p.starts_with('/') => {}
                (Some(p), None) => {
                    return Err((
                        format!("fields[{i}].path"),
                        format!("`{p}` is not a JSON pointer (it starts with `/`)"),
                    ));
                }
                (None, Some(n)) if !n.is_empty() => {}
                _ => {
                    return Err((
                        format!("fields[{i}]"),
                        "give exactly one of `path` and `name`".into(),
                    ));
                }
            }
        }
        for (i, p) in self.patterns.iter().enumerate() {
            crate::policy::user_regex(&p.regex).map_err(|e| (format!("patterns[{i}].regex"), e))?;
        }
        if self.fields.is_empty() && self.detectors.is_empty() && self.patterns.is_empty() {
            return Err((
                "fields".into(),
                "nothing to mask: give fields, detectors or patterns".into(),
            ));
        }
        if self.max_bytes == 0 {
            return Err(("max_bytes".into(), "must be at least 1".into()));
        }
        check_media_types(&self.content_types)
    }
}

fn check_media_types(types: &[String]) -> Result<(), (String, String)> {
    for (i, t) in types.iter().enumerate() {
        let ok = t
            .split_once('/')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty());
        if !ok {
            return Err((
                format!("content_types[{i}]"),
                format!("`{t}` is not a media type"),
            ));
        }
    }
    Ok(())
}

/// How `aggregate` combines its calls' answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// Each call's JSON under its name: `{"user": {...}, "orders": [...]}`.
    #[default]
    Keys,
    /// The calls' JSON objects deep-merged, in call order (later calls win on conflicts).
    Deep,
    /// Each call's status and body, for fan-out writes:
    /// `{"results": {"a": {"status": 201, "body": ...}}}`; 207 when they disagree.
    Statuses,
}

/// One call of an `aggregate` route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    /// Its name: the key of its result, and in errors.
    pub name: String,
    /// The upstream pool called.
    pub upstream: String,
    /// The method (default: the client's).
    #[serde(default)]
    pub method: Option<String>,
    /// The path and query (a template; path variables are percent-encoded).
    pub path: String,
    /// Headers set on the call (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body (strings are templates; `"${body}"` forwards the client's JSON body).
    #[serde(default)]
    pub body: Option<Value>,
    /// How long the call may take, answer body included.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: std::time::Duration,
    /// Whether the answer fails without this call (else it is left out and flagged).
    #[serde(default = "yes")]
    pub required: bool,
}

fn default_call_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

/// `aggregate`: the route answers itself by calling several upstreams concurrently and merging
/// their JSON answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The calls, made concurrently.
    pub calls: Vec<AggregateCall>,
    /// How answers combine.
    #[serde(default)]
    pub merge: MergeMode,
    /// Largest answer body read from one call (and largest client body read for templates).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

impl AggregateConfig {
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        if self.calls.is_empty() {
            return Err(("calls".into(), "name at least one call".into()));
        }
        if self.calls.len() > 32 {
            return Err(("calls".into(), "at most 32 calls".into()));
        }
        for (i, c) in self.calls.iter().enumerate() {
            let at = format!("calls[{i}]");
            if c.name.is_empty() {
                return Err((format!("{at}.name"), "must not be empty".into()));
            }
            if self.calls.iter().filter(|o| o.name == c.name).count() > 1 {
                return Err((format!("{at}.name"), format!("`{}` is used twice", c.name)));
            }
            if let Some(m) = &c.method
                && (http::Method::from_bytes(m.as_bytes()).is_err() || *m != m.to_ascii_uppercase())
            {
                return Err((
                    format!("{at}.method"),
                    format!("`{m}` is not an upper-case method"),
                ));
            }
            if !c.path.starts_with('/') {
                return Err((format!("{at}.path"), "must start with `/`".into()));
            }
            Template::parse(&c.path, Scope::default()).map_err(|e| (format!("{at}.path"), e))?;
            for (n, v) in &c.headers {
                if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                    return Err((
                        format!("{at}.headers.{n}"),
                        format!("`{n}` is not a header name"),
                    ));
                }
                if gateway_written(n) {
                    return Err((
                        format!("{at}.headers.{n}"),
                        format!("`{n}` is written by the gateway and cannot be set by a call"),
                    ));
                }
                Template::parse(v, Scope::default())
                    .map_err(|e| (format!("{at}.headers.{n}"), e))?;
            }
            if let Some(b) = &c.body {
                check_value(
                    b,
                    Scope {
                        response: false,
                        body: true,
                    },
                )
                .map_err(|e| (format!("{at}.body"), e))?;
            }
            if c.timeout.is_zero() {
                return Err((format!("{at}.timeout"), "must be longer than 0".into()));
            }
        }
        if self.max_bytes == 0 {
            return Err(("max_bytes".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Which variables a template may use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope {
    /// `status` and `response.header.*`.
    pub response: bool,
    /// `body` and `body/<pointer>`.
    pub body: bool,
}

/// A template variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// `request_id`.
    RequestId,
    /// `client_ip`.
    ClientIp,
    /// `method`.
    Method,
    /// `path` (as the client sent it, normalised).
    Path,
    /// `route`.
    Route,
    /// `app.id`.
    AppId,
    /// `app.name`.
    AppName,
    /// `jwt.<claim>`.
    Claim(String),
    /// `param.<name>`.
    Param(String),
    /// `header.<name>` (lower case).
    Header(String),
    /// `query.<name>`.
    Query(String),
    /// `status`.
    Status,
    /// `response.header.<name>` (lower case).
    ResponseHeader(String),
    /// `body` (empty pointer) or `body/<pointer>`.
    Body(String),
}

/// A piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// A variable.
    Var(Var),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template(pub Vec<Piece>);

impl Template {
    /// Parses `s`, naming the first problem.
    pub fn parse(s: &str, scope: Scope) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('$') {
            text.push_str(&rest[..i]);
            let after = &rest[i..];
            if let Some(r) = after.strip_prefix("$${") {
                text.push_str("${");
                rest = r;
            } else if let Some(r) = after.strip_prefix("${") {
                let Some(end) = r.find('}') else {
                    return Err(format!("unclosed `${{` in `{s}`"));
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Var(Self::var(r[..end].trim(), scope)?));
                rest = &r[end + 1..];
            } else {
                text.push('$');
                rest = &after[1..];
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self(pieces))
    }

    fn var(name: &str, scope: Scope) -> Result<Var, String> {
        let named = |prefix: &str, what: &str| -> Result<Option<String>, String> {
            match name.strip_prefix(prefix) {
                Some("") => Err(format!("`${{{name}}}` needs a {what} name")),
                Some(n) => Ok(Some(n.to_owned())),
                None => Ok(None),
            }
        };
        Ok(match name {
            "request_id" => Var::RequestId,
            "client_ip" => Var::ClientIp,
            "method" => Var::Method,
            "path" => Var::Path,
            "route" => Var::Route,
            "app.id" => Var::AppId,
            "app.name" => Var::AppName,
            "status" if scope.response => Var::Status,
            "body" if scope.body => Var::Body(String::new()),
            _ => {
                if let Some(n) = named("jwt.", "claim")? {
                    Var::Claim(n)
                } else if let Some(n) = named("param.", "parameter")? {
                    Var::Param(n)
                } else if let Some(n) = named("header.", "header")? {
                    Var::Header(n.to_ascii_lowercase())
                } else if let Some(n) = named("query.", "parameter")? {
                    Var::Query(n)
                } else if scope.response
                    && let Some(n) = named("response.header.", "header")?
                {
                    Var::ResponseHeader(n.to_ascii_lowercase())
                } else if scope.body && name.starts_with("body/") {
                    Var::Body(name["body".len()..].to_owned())
                } else {
                    return Err(format!("unknown variable `${{{name}}}`"));
                }
            }
        })
    }

    /// The variable, when the template is one variable alone.
    pub fn single(&self) -> Option<&Var> {
        match self.0.as_slice() {
            [Piece::Var(v)] => Some(v),
            _ => None,
        }
    }

    /// Whether the template has no variable.
    pub fn is_literal(&self) -> bool {
        self.0.iter().all(|p| matches!(p, Piece::Text(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_text_and_variables() {
        let t = Template::parse("a-${app.id}/${param.id}$${x}$", Scope::default()).unwrap();
        assert_eq!(
            t.0,
            vec![
                Piece::Text("a-".into()),
                Piece::Var(Var::AppId),
                Piece::Text("/".into()),
                Piece::Var(Var::Param("id".into())),
                Piece::Text("${x}$".into()),
            ]
        );
        let t = Template::parse("${header.X-Tenant}", Scope::default()).unwrap();
        assert_eq!(t.single(), Some(&Var::Header("x-tenant".into())));
    }

    #[test]
    fn templates_reject_unknown_or_out_of_scope_variables() {
        for (s, scope) in [
            ("${nope}", Scope::default()),
            ("${status}", Scope::default()),
            (
                "${body/a}",
                Scope {
                    response: true,
                    body: false,
                },
            ),
            ("${header.}", Scope::default()),
            ("${app.id", Scope::default()),
        ] {
            assert!(Template::parse(s, scope).is_err(), "{s}");
        }
        let body = Scope {
            response: false,
            body: true,
        };
        assert_eq!(
            Template::parse("${body/a/0}", body).unwrap().single(),
            Some(&Var::Body("/a/0".into()))
        );
    }

    #[test]
    fn configs_name_the_bad_field() {
        let c: RequestTransformConfig = serde_json::from_value(serde_json::json!({
            "headers": {"set": {"x-a": "${nope}"}}
        }))
        .unwrap();
        assert_eq!(c.check().unwrap_err().0, "headers.set.x-a");
        let c: ResponseTransformConfig = serde_json::from_value(serde_json::json!({
            "body": {"ops": [{"op": "remove", "path": "a"}]}
        }))
        .unwrap();
        assert_eq!(c.check().unwrap_err().0, "body.ops[0].path");
        let c: ResponseTransformConfig =
            serde_json::from_value(serde_json::json!({"status": {"404": 99}})).unwrap();
        assert_eq!(c.check().unwrap_err().0, "status.404");
        for (cfg, path) in [
            (
                serde_json::json!({"headers": {"set": {"X-Forwarded-For": "1.2.3.4"}}}),
                "headers.set.X-Forwarded-For",
            ),
            (
                serde_json::json!({"headers": {"add": {"x_consumer_id": "a"}}}),
                "headers.add.x_consumer_id",
            ),
            (
                serde_json::json!({"headers": {"rename": {"x-a": "x-client-cert-subject"}}}),
                "headers.rename.x-a",
            ),
            (serde_json::json!({"method": "get"}), "method"),
            (serde_json::json!({"path": "/a b"}), "path"),
            (serde_json::json!({"path": "/a/../${param.x}"}), "path"),
            (
                serde_json::json!({"body": {"xml": {"attribute_prefix": ""}}}),
                "body.xml",
            ),
        ] {
            let c: RequestTransformConfig = serde_json::from_value(cfg.clone()).unwrap();
            assert_eq!(c.check().unwrap_err().0, path, "{cfg}");
        }
        let c: ResponseTransformConfig =
            serde_json::from_value(serde_json::json!({"status": {"200": 304}})).unwrap();
        assert_eq!(c.check().unwrap_err().0, "status.200");
        // Response headers are the client's to shape: no identity is forged there.
        let c: ResponseTransformConfig =
            serde_json::from_value(serde_json::json!({"headers": {"set": {"x-consumer-id": "a"}}}))
                .unwrap();
        assert!(c.check().is_ok());
    }
}
