//! gRPC protocol translation.
//!
//! `grpc_transcode` answers JSON over HTTP from a gRPC upstream: the `.proto` files are
//! compiled at load (`protox`, no `protoc`), each method is reached through its
//! `google.api.http` rule or an explicit mapping, the request's path variables, query
//! parameters and JSON body become the request message (`prost-reflect`'s proto3 JSON
//! mapping), and the answer's messages become JSON — one document for a unary method, JSON
//! lines or server-sent events for a server-streaming one. gRPC errors become the HTTP status
//! their code maps to, with the gateway's JSON error body. `grpc_web` (in [`web`]) translates
//! gRPC-Web framing.

mod protos;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::BodyExt;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ReflectMessage as _, SerializeOptions, Value,
};
use turnpike_model::grpc::{GrpcTranscodeConfig, NativeGrpc, PathTemplate, StreamFormat};

use crate::body::{BoxError, ProxyBody};
use crate::error::{ErrorKind, GatewayError};
use crate::policy::inspect::ReqBody;

/// A compiled `grpc_transcode`.
pub struct Transcoder {
    /// Most specific first.
    rules: Vec<Rule>,
    stream: StreamFormat,
    ser: SerializeOptions,
    proto_names: bool,
    ignore_unknown: bool,
    max_message: u64,
    native: NativeGrpc,
}

/// One HTTP form of one method.
struct Rule {
    verb: Method,
    template: PathTemplate,
    /// The template as written, for messages.
    path: String,
    method: MethodDescriptor,
    /// `/package.Service/Method`.
    grpc_path: Arc<str>,
    body: BodyTo,
    response_body: Option<FieldDescriptor>,
    /// The fields the path variables and the body field set, as descriptor chains: query
    /// parameters cannot reach them (by either of their names) or their oneof siblings.
    bound: Vec<Vec<FieldDescriptor>>,
}

enum BodyTo {
    /// No body: fields outside the path come from the query.
    Nothing,
    /// `*`: the body is the whole message.
    Whole,
    /// The body is this top-level field.
    Field(FieldDescriptor),
}

impl Transcoder {
    /// Compiles the `.proto` files and the method mappings; errors name the field at fault.
    pub fn new(c: &GrpcTranscodeConfig) -> Result<Self, (String, String)> {
        let pool = compile(c)?;
        let mut rules = Vec::new();
        let services: Vec<_> = if c.services.is_empty() {
            let named: Vec<String> = c
                .proto_files
                .iter()
                .filter_map(|f| file_name(c, f))
                .chain(c.proto_sources.keys().cloned())
                .collect();
            pool.services()
                .filter(|s| named.iter().any(|n| n == s.parent_file().name()))
                .collect()
        } else {
            c.services
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    pool.get_service_by_name(name).ok_or_else(|| {
                        (
                            format!("services[{i}]"),
                            format!("no service `{name}` in the .proto files"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        for (i, m) in c.methods.iter().enumerate() {
            let at = format!("methods[{i}]");
            let (service, method) = turnpike_model::grpc::split_grpc_method(&m.grpc)
                .map_err(|e| (format!("{at}.grpc"), e))?;
            let method = pool
                .get_service_by_name(service)
                .and_then(|s| s.methods().find(|x| x.name() == method))
                .ok_or_else(|| {
                    (
                        format!("{at}.grpc"),
                        format!("no method `{}` in the .proto files", m.grpc),
                    )
                })?;
            let verb = Method::from_bytes(m.method.as_bytes()).map_err(|_| {
                (
                    format!("{at}.method"),
                    format!("`{}` is not a method", m.method),
                )
            })?;
            rules.push(
                Rule::new(
                    method,
                    verb,
                    &m.path,
                    m.body.as_deref(),
                    m.response_body.as_deref(),
                )
                .map_err(|e| (at, e))?,
            );
        }
        if c.use_annotations
            && let Some(ext) = pool.get_extension_by_name("google.api.http")
        {
            for service in &services {
                for method in service.methods() {
                    let opts = method.options();
                    if !opts.has_extension(&ext) {
                        continue;
                    }
                    if method.is_client_streaming() {
                        // Annotated, but not something JSON over HTTP can carry: the rest of
                        // the service still loads.
                        tracing::warn!(
                            method = method.full_name(),
                            "grpc_transcode skips a client-streaming method"
                        );
                        continue;
                    }
                    let at = format!("{} (google.api.http)", method.full_name());
                    let Some(rule) = opts.get_extension(&ext).as_message().cloned() else {
                        continue;
                    };
                    let mut forms = vec![rule.clone()];
                    if let Some(Value::List(more)) =
                        rule.get_field_by_name("additional_bindings").as_deref()
                    {
                        forms.extend(more.iter().filter_map(|v| v.as_message().cloned()));
                    }
                    for form in forms {
                        let (verb, path) = http_pattern(&form).map_err(|e| (at.clone(), e))?;
                        let text = |name: &str| {
                            form.get_field_by_name(name)
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .filter(|s| !s.is_empty())
                        };
                        rules.push(
                            Rule::new(
                                method.clone(),
                                verb,
                                &path,
                                text("body").as_deref(),
                                text("response_body").as_deref(),
                            )
                            .map_err(|e| (at.clone(), e))?,
                        );
                    }
                }
            }
        }
        if rules.is_empty() {
            return Err((
                "methods".into(),
                "no method is reachable: none has a `google.api.http` annotation and none is \
                 mapped"
                    .into(),
            ));
        }
        // Stable: among equally specific templates, the explicit mapping (listed first) wins.
        rules.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        Ok(Self {
            rules,
            stream: c.stream,
            ser: SerializeOptions::new()
                .use_proto_field_name(c.json.proto_names)
                .skip_default_fields(!c.json.emit_defaults)
                .use_enum_numbers(c.json.enums_as_numbers),
            proto_names: c.json.proto_names,
            ignore_unknown: c.ignore_unknown_fields,
            max_message: c.max_message_bytes,
            native: c.native_grpc,
        })
    }

    /// Whether a native gRPC (or gRPC-Web) call to `path` (`/pkg.Service/Method`) may pass.
    pub fn passes_native(&self, path: &str) -> bool {
        match self.native {
            NativeGrpc::All => true,
            NativeGrpc::None => false,
            NativeGrpc::Mapped => self.rules.iter().any(|r| &*r.grpc_path == path),
        }
    }

    /// Turns the client's JSON request into the gRPC call: the method, path, headers and
    /// framed message sent upstream. `path` is the request's normalised path.
    pub async fn request(
        &self,
        parts: &mut Parts,
        path: &str,
        forward_path: &mut String,
        body: ReqBody,
        read: &crate::transform::BodyRead,
    ) -> Result<(ReqBody, Pending), GatewayError> {
        let mut allowed: Vec<&Method> = Vec::new();
        let mut found = None;
        for rule in &self.rules {
            if let Some(vars) = rule.template.matches(path) {
                // HEAD asks what GET would answer (the body is not sent).
                if rule.verb == parts.method
                    || (parts.method == Method::HEAD && rule.verb == Method::GET)
                {
                    found = Some((rule, vars));
                    break;
                }
                if !allowed.contains(&&rule.verb) {
                    allowed.push(&rule.verb);
                }
            }
        }
        let Some((rule, vars)) = found else {
            if allowed.is_empty() {
                return Err(GatewayError::new(
                    ErrorKind::RouteNotFound,
                    "no gRPC method is mapped to this path",
                ));
            }
            let list: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
            return Err(GatewayError::new(
                ErrorKind::MethodNotAllowed,
                format!(
                    "method {} is not mapped here; allowed: {}",
                    parts.method,
                    list.join(", ")
                ),
            ));
        };
        let invalid = |e: String| GatewayError::new(ErrorKind::GrpcRequestInvalid, e);
        let input = rule.method.input();
        let mut msg = match &rule.body {
            BodyTo::Nothing => {
                // A body sent where none is mapped is not silently dropped. A chunked or
                // HTTP/2 body may turn out empty: it is read to know.
                if !body.is_empty() {
                    let bytes = self.read(body, parts, read).await?;
                    if !bytes.is_empty() {
                        return Err(invalid(format!(
                            "{} {} takes no body",
                            rule.verb, rule.path
                        )));
                    }
                }
                DynamicMessage::new(input.clone())
            }
            BodyTo::Whole | BodyTo::Field(_) => {
                let bytes = self.read_json(body, parts, read).await?;
                let json: serde_json::Value = if bytes.is_empty() {
                    serde_json::Value::Object(Default::default())
                } else {
                    serde_json::from_slice(&bytes)
                        .map_err(|e| invalid(format!("the body is not JSON: {e}")))?
                };
                let json = match &rule.body {
                    BodyTo::Field(f) if !bytes.is_empty() => {
                        serde_json::json!({ f.name(): json })
                    }
                    _ => json,
                };
                let opts = DeserializeOptions::new().deny_unknown_fields(!self.ignore_unknown);
                DynamicMessage::deserialize_with_options(input.clone(), json, &opts)
                    .map_err(|e| invalid(format!("the body does not fit {}: {e}", input.name())))?
            }
        };
        for (field, value) in &vars {
            set_field(&mut msg, field, value, false)
                .map_err(|e| invalid(format!("path variable `{}`: {e}", field.join("."))))?;
        }
        if !matches!(rule.body, BodyTo::Whole)
            && let Some(q) = parts.uri.query()
        {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                let field: Vec<String> = k.split('.').map(str::to_owned).collect();
                let chain = match resolve(&input, &field) {
                    Ok(c) => c,
                    Err(FieldError::Unknown(_)) if self.ignore_unknown => continue,
                    Err(e) => return Err(invalid(format!("query parameter `{k}`: {e}"))),
                };
                // A parameter for a field the path or the body sets is not the client's to
                // override; nor may it set a oneof sibling, which would clear that field.
                match rule.conflict(&chain) {
                    Some(Conflict::Same) => continue,
                    Some(Conflict::Oneof(other)) => {
                        return Err(invalid(format!(
                            "query parameter `{k}` is in a oneof with `{other}`, which the \
                             path or body sets"
                        )));
                    }
                    None => {}
                }
                match set_field(&mut msg, &field, &v, true) {
                    Ok(()) => {}
                    Err(FieldError::Unknown(_)) if self.ignore_unknown => {}
                    Err(e) => return Err(invalid(format!("query parameter `{k}`: {e}"))),
                }
            }
        }

        let len = msg.encoded_len();
        let mut framed = BytesMut::with_capacity(5 + len);
        framed.put_u8(0);
        framed.put_u32(u32::try_from(len).map_err(|_| invalid("message too large".into()))?);
        msg.encode(&mut framed)
            .map_err(|e| invalid(format!("message not encoded: {e}")))?;

        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let stream = rule.method.is_server_streaming().then(|| {
            if accepts(accept, "text/event-stream") {
                StreamFormat::Sse
            } else if accepts(accept, "application/x-ndjson") {
                StreamFormat::Ndjson
            } else {
                self.stream
            }
        });
        parts.method = Method::POST;
        forward_path.clear();
        forward_path.push_str(&rule.grpc_path);
        // The query was read into the message; the gRPC path carries none.
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query =
            http::uri::PathAndQuery::from_maybe_shared(Bytes::from(rule.grpc_path.to_string()))
                .ok();
        if let Ok(u) = http::Uri::from_parts(uri) {
            parts.uri = u;
        }
        let h = &mut parts.headers;
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::TRANSFER_ENCODING,
            header::ACCEPT,
            header::ACCEPT_ENCODING,
            header::RANGE,
            header::IF_RANGE,
        ] {
            h.remove(name);
        }
        h.remove("grpc-encoding");
        h.remove("grpc-accept-encoding");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(framed.len()));
        let pending = Pending {
            output: rule.method.output(),
            response_body: rule.response_body.clone(),
            stream,
            ser: self.ser.clone(),
            proto_names: self.proto_names,
            max_message: self.max_message,
        };
        Ok((ReqBody::Buffered(framed.freeze()), pending))
    }

    async fn read_json(
        &self,
        body: ReqBody,
        parts: &Parts,
        read: &crate::transform::BodyRead,
    ) -> Result<Bytes, GatewayError> {
        if let Some(ct) = parts.headers.get(header::CONTENT_TYPE)
            && !crate::transform::is_format(
                ct.to_str().unwrap_or(""),
                turnpike_model::transform::BodyFormat::Json,
            )
        {
            return Err(GatewayError::new(
                ErrorKind::UnsupportedMediaType,
                "a transcoded gRPC method takes a JSON body",
            ));
        }
        if parts.headers.contains_key(header::CONTENT_ENCODING) {
            return Err(GatewayError::new(
                ErrorKind::UnsupportedMediaType,
                "an encoded body cannot be transcoded",
            ));
        }
        self.read(body, parts, read).await
    }

    /// Reads the whole body within `max_message_bytes` and the route's limits.
    async fn read(
        &self,
        body: ReqBody,
        parts: &Parts,
        read: &crate::transform::BodyRead,
    ) -> Result<Bytes, GatewayError> {
        crate::policy::inspect::read_whole(
            body,
            self.max_message.min(read.limit),
            parts,
            read,
            "the gRPC transcoder reads",
        )
        .await
    }
}

impl Rule {
    fn new(
        method: MethodDescriptor,
        verb: Method,
        path: &str,
        body: Option<&str>,
        response_body: Option<&str>,
    ) -> Result<Self, String> {
        let name = method.full_name().to_owned();
        if method.is_client_streaming() {
            return Err(format!(
                "{name} is client-streaming: only unary and server-streaming methods can be \
                 transcoded"
            ));
        }
        let template = PathTemplate::parse(path)?;
        let input = method.input();
        for v in &template.variables {
            check_path(&input, &v.field)
                .map_err(|e| format!("{path}: `{}` {e}", v.field.join(".")))?;
        }
        let mut bound = Vec::new();
        for v in &template.variables {
            bound.push(resolve(&input, &v.field).map_err(|e| e.to_string())?);
        }
        let body = match body {
            None => BodyTo::Nothing,
            Some("*") => BodyTo::Whole,
            Some(f) => BodyTo::Field(
                input
                    .get_field_by_name(f)
                    .ok_or_else(|| format!("body: {} has no field `{f}`", input.full_name()))?,
            ),
        };
        let output = method.output();
        let response_body = response_body
            .map(|f| {
                output.get_field_by_name(f).ok_or_else(|| {
                    format!("response_body: {} has no field `{f}`", output.full_name())
                })
            })
            .transpose()?;
        let grpc_path = format!("/{}/{}", method.parent_service().full_name(), method.name());
        Ok(Self {
            verb,
            template,
            path: path.to_owned(),
            method,
            grpc_path: grpc_path.into(),
            body,
            response_body,
            bound,
        })
    }

    /// How a query parameter's field chain meets the fields the path and body set.
    fn conflict(&self, chain: &[FieldDescriptor]) -> Option<Conflict> {
        let body = match &self.body {
            BodyTo::Field(f) => Some(vec![f.clone()]),
            _ => None,
        };
        for b in self.bound.iter().chain(body.as_ref()) {
            if b.starts_with(chain) || chain.starts_with(b) {
                return Some(Conflict::Same);
            }
            // Where the chains part: two members of one oneof.
            if let Some((x, y)) = b.iter().zip(chain).find(|(x, y)| x != y)
                && let (Some(ox), Some(oy)) = (x.containing_oneof(), y.containing_oneof())
                && ox == oy
            {
                let at = b.iter().position(|f| f == x).unwrap_or(0);
                let name: Vec<&str> = b[..=at].iter().map(FieldDescriptor::name).collect();
                return Some(Conflict::Oneof(name.join(".")));
            }
        }
        None
    }
}

/// Where the `.proto` files come from, compiled into one pool.
fn compile(c: &GrpcTranscodeConfig) -> Result<DescriptorPool, (String, String)> {
    use protox::file::{ChainFileResolver, GoogleFileResolver, IncludeFileResolver};
    let mut resolver = ChainFileResolver::new();
    resolver.add(protos::Inline(c.proto_sources.clone()));
    for p in &c.import_paths {
        resolver.add(IncludeFileResolver::new(p.into()));
    }
    for f in &c.proto_files {
        if let Some(dir) = std::path::Path::new(f).parent() {
            resolver.add(IncludeFileResolver::new(dir.to_owned()));
        }
    }
    resolver.add(GoogleFileResolver::new());
    resolver.add(protos::GoogleApi);
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    for (i, f) in c.proto_files.iter().enumerate() {
        compiler
            .open_file(f)
            .map_err(|e| (format!("proto_files[{i}]"), format!("{f}: {e}")))?;
    }
    for name in c.proto_sources.keys() {
        compiler
            .open_file(name)
            .map_err(|e| (format!("proto_sources.{name}"), e.to_string()))?;
    }
    Ok(compiler.descriptor_pool())
}

/// The name a `.proto` file has in the pool: its path under the first import path holding
/// it, else its file name (its own directory is an import path).
fn file_name(c: &GrpcTranscodeConfig, f: &str) -> Option<String> {
    let p = std::path::Path::new(f);
    for dir in &c.import_paths {
        if let Ok(rel) = p.strip_prefix(dir) {
            return Some(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    if p.is_absolute() || p.parent().is_some_and(|d| !d.as_os_str().is_empty()) {
        return p.file_name().map(|n| n.to_string_lossy().into_owned());
    }
    Some(f.to_owned())
}

/// The verb and path of an `HttpRule`.
fn http_pattern(rule: &DynamicMessage) -> Result<(Method, String), String> {
    for (field, verb) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field)
            && let Some(p) = rule
                .get_field_by_name(field)
                .and_then(|v| v.as_str().map(str::to_owned))
        {
            return Ok((verb, p));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(custom) = rule
            .get_field_by_name("custom")
            .and_then(|v| v.as_message().cloned())
    {
        let get = |n: &str| {
            custom
                .get_field_by_name(n)
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let verb = Method::from_bytes(get("kind").as_bytes())
            .map_err(|_| format!("custom kind `{}` is not a method", get("kind")))?;
        return Ok((verb, get("path")));
    }
    Err("the rule names no HTTP method and path".into())
}

/// Checks a path variable's field path: messages down to a singular field.
fn check_path(msg: &MessageDescriptor, field: &[String]) -> Result<(), String> {
    let mut cur = msg.clone();
    for (i, name) in field.iter().enumerate() {
        let f = cur
            .get_field_by_name(name)
            .ok_or_else(|| format!("is not a field of {}", cur.full_name()))?;
        if f.is_list() || f.is_map() {
            return Err("must be a singular field".into());
        }
        match f.kind() {
            Kind::Message(m) if i + 1 < field.len() => cur = m,
            _ if i + 1 < field.len() => return Err(format!("`{name}` is not a message")),
            // The last field takes text: a scalar, an enum, or a well-known type written as
            // text (`Timestamp`, wrappers), not a message of the user's.
            Kind::Message(m) if !m.full_name().starts_with("google.protobuf.") => {
                return Err("must be a scalar, an enum or a well-known type".into());
            }
            _ => {}
        }
    }
    Ok(())
}

enum Conflict {
    /// The same field (or one inside it, or its parent).
    Same,
    /// A member of the same oneof as this bound field.
    Oneof(String),
}

/// The field descriptors along `path` (proto or JSON names), through singular messages.
fn resolve(input: &MessageDescriptor, path: &[String]) -> Result<Vec<FieldDescriptor>, FieldError> {
    let mut cur = input.clone();
    let mut out = Vec::with_capacity(path.len());
    for (i, name) in path.iter().enumerate() {
        let f = cur
            .get_field_by_name(name)
            .or_else(|| cur.get_field_by_json_name(name))
            .ok_or_else(|| {
                FieldError::Unknown(format!("{} has no field `{name}`", cur.full_name()))
            })?;
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => cur = m,
                _ => {
                    return Err(FieldError::Bad(format!(
                        "`{name}` is not a singular message"
                    )));
                }
            }
        }
        out.push(f);
    }
    Ok(out)
}

#[derive(Debug)]
enum FieldError {
    Unknown(String),
    Bad(String),
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown(s) | Self::Bad(s) => f.write_str(s),
        }
    }
}

/// Sets the field at `path` (proto or JSON names) from text, converted to the field's type;
/// `append` adds to a repeated field.
fn set_field(
    msg: &mut DynamicMessage,
    path: &[String],
    raw: &str,
    append: bool,
) -> Result<(), FieldError> {
    let Some((last, parents)) = path.split_last() else {
        return Err(FieldError::Bad("empty field path".into()));
    };
    let lookup = |d: &MessageDescriptor, name: &str| {
        d.get_field_by_name(name)
            .or_else(|| d.get_field_by_json_name(name))
            .ok_or_else(|| FieldError::Unknown(format!("{} has no field `{name}`", d.full_name())))
    };
    let mut cur = msg;
    for name in parents {
        let f = lookup(&cur.descriptor(), name)?;
        if f.is_list() || f.is_map() || !matches!(f.kind(), Kind::Message(_)) {
            return Err(FieldError::Bad(format!(
                "`{name}` is not a singular message"
            )));
        }
        cur = cur
            .get_field_mut(&f)
            .as_message_mut()
            .ok_or_else(|| FieldError::Bad(format!("`{name}` is not a message")))?;
    }
    let f = lookup(&cur.descriptor(), last)?;
    if f.is_map() {
        return Err(FieldError::Bad(format!("`{last}` is a map")));
    }
    let value = scalar(&f.kind(), raw).map_err(FieldError::Bad)?;
    if f.is_list() {
        if !append {
            return Err(FieldError::Bad(format!("`{last}` is repeated")));
        }
        if let Some(list) = cur.get_field_mut(&f).as_list_mut() {
            list.push(value);
        }
    } else {
        cur.set_field(&f, value);
    }
    Ok(())
}

/// Text (a path segment or query value) as a value of `kind`.
fn scalar(kind: &Kind, raw: &str) -> Result<Value, String> {
    let bad = || format!("`{raw}` is not a valid {kind:?}");
    let float = |s: &str| match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse::<f64>().ok(),
    };
    Ok(match kind {
        Kind::Double => Value::F64(float(raw).ok_or_else(bad)?),
        #[allow(clippy::cast_possible_truncation)]
        Kind::Float => Value::F32(float(raw).ok_or_else(bad)? as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(raw.parse().map_err(|_| bad())?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(raw.parse().map_err(|_| bad())?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(raw.parse().map_err(|_| bad())?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(raw.parse().map_err(|_| bad())?),
        Kind::Bool => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad()),
        },
        Kind::String => Value::String(raw.to_owned()),
        Kind::Bytes => {
            use base64::Engine as _;
            let e = base64::engine::general_purpose::STANDARD;
            let u = base64::engine::general_purpose::URL_SAFE;
            let trimmed = raw.trim_end_matches('=');
            let nopad = base64::engine::general_purpose::STANDARD_NO_PAD;
            let unopad = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let b = e
                .decode(raw)
                .or_else(|_| u.decode(raw))
                .or_else(|_| nopad.decode(trimmed))
                .or_else(|_| unopad.decode(trimmed))
                .map_err(|_| format!("`{raw}` is not base64"))?;
            Value::Bytes(b.into())
        }
        Kind::Enum(e) => match e.get_value_by_name(raw) {
            Some(v) => Value::EnumNumber(v.number()),
            None => Value::EnumNumber(
                raw.parse()
                    .map_err(|_| format!("`{raw}` is not a value of {}", e.full_name()))?,
            ),
        },
        Kind::Message(m) => {
            // Well-known types read from text (`Timestamp`, `Duration`, `FieldMask`) or JSON
            // (wrappers: `Int32Value` from `5`).
            let as_text =
                DynamicMessage::deserialize(m.clone(), serde_json::Value::String(raw.to_owned()));
            let msg = match as_text {
                Ok(msg) => msg,
                Err(_) => serde_json::from_str::<serde_json::Value>(raw)
                    .ok()
                    .and_then(|j| DynamicMessage::deserialize(m.clone(), j).ok())
                    .ok_or_else(|| format!("`{raw}` is not a valid {}", m.full_name()))?,
            };
            Value::Message(msg)
        }
    })
}

/// Whether an `Accept` value names `media` with a non-zero quality.
fn accepts(accept: &str, media: &str) -> bool {
    accept.split(',').any(|range| {
        let mut params = range.split(';');
        let name = params.next().unwrap_or("").trim();
        let q_zero = params.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        name.eq_ignore_ascii_case(media) && !q_zero
    })
}

/// What the answer to a transcoded call is turned into.
pub struct Pending {
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
    /// `Some` for a server-streaming method.
    stream: Option<StreamFormat>,
    ser: SerializeOptions,
    proto_names: bool,
    max_message: u64,
}

/// The gRPC status names, by code, as error codes (`grpc_not_found`).
const STATUS_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// The HTTP status a gRPC status code maps to (the mapping `google.api.http` gateways share).
fn http_status(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A gRPC status read from headers or trailers.
struct Status {
    code: u32,
    message: String,
}

impl Status {
    fn from(h: &HeaderMap) -> Option<Result<Self, String>> {
        let raw = h.get("grpc-status")?;
        let code = match raw.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(c) => c,
            None => return Some(Err("the upstream sent an invalid grpc-status".into())),
        };
        let message = h
            .get("grpc-message")
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default();
        Some(Ok(Self { code, message }))
    }

    fn error_json(&self, request_id: &str) -> serde_json::Value {
        let name = STATUS_NAMES
            .get(self.code as usize)
            .copied()
            .unwrap_or("unknown");
        serde_json::json!({
            "error": {
                "code": format!("grpc_{name}"),
                "message": self.message,
                "request_id": request_id,
                "grpc_status": self.code,
            }
        })
    }
}

fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn invalid_answer(why: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorKind::GrpcResponseInvalid, why)
}

/// Response headers that describe the gRPC exchange, not the JSON answer.
fn is_grpc_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("grpc-")
        || *name == header::CONTENT_TYPE
        || *name == header::CONTENT_LENGTH
        || *name == header::TRAILER
        || *name == header::TE
}

impl Pending {
    /// Turns the upstream's gRPC answer into the client's JSON one.
    pub async fn response(
        self,
        resp: Response<ProxyBody>,
        request_id: &str,
        idle: Duration,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let (parts, mut body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            // Not a gRPC answer (a proxy or load balancer in between): its status read as
            // gRPC clients read it.
            let code = match parts.status.as_u16() {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502..=504 => 14,
                _ => 2,
            };
            let status = Status {
                code,
                message: format!("the gRPC upstream answered HTTP {}", parts.status.as_u16()),
            };
            return Ok(self.error(&status, HeaderMap::new(), request_id));
        }
        let ct = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/grpc") {
            return Err(invalid_answer(format!(
                "the upstream answered `{ct}`, not gRPC"
            )));
        }
        if parts
            .headers
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() != b"identity")
        {
            return Err(invalid_answer("the upstream compressed its messages"));
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if !is_grpc_header(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        // Trailers-only: the status came with the headers.
        if let Some(status) = Status::from(&parts.headers) {
            let status = status.map_err(invalid_answer)?;
            if status.code != 0 {
                return Ok(self.error(&status, headers, request_id));
            }
            if self.stream.is_none() {
                return Err(invalid_answer("the upstream answered no message"));
            }
            // An empty stream, already complete.
            return Ok(self.stream_response(headers, None, request_id));
        }
        if self.stream.is_some() {
            return Ok(self.stream_response(headers, Some(body), request_id));
        }

        // Unary: one message, then the trailers.
        let mut buf = BytesMut::new();
        let mut trailers = None;
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => {
                    return Err(GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        "the gRPC upstream stopped sending its answer",
                    ));
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    return Err(GatewayError::new(
                        ErrorKind::UpstreamError,
                        "the gRPC answer could not be read",
                    ));
                }
                Ok(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(d) => {
                    buf.extend_from_slice(&d);
                    if buf.len() as u64 > self.max_message + 5 {
                        return Err(GatewayError::new(
                            ErrorKind::ResponseTooLarge,
                            format!(
                                "the gRPC answer exceeds max_message_bytes ({})",
                                self.max_message
                            ),
                        ));
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        let trailers =
            trailers.ok_or_else(|| invalid_answer("the gRPC answer ended without a status"))?;
        let status = Status::from(&trailers)
            .ok_or_else(|| invalid_answer("the gRPC answer ended without a status"))?
            .map_err(invalid_answer)?;
        for (k, v) in &trailers {
            if !is_grpc_header(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        if status.code != 0 {
            return Ok(self.error(&status, headers, request_id));
        }
        let mut data = buf.freeze();
        let msg = next_message(&mut data, self.max_message)
            .map_err(invalid_answer)?
            .ok_or_else(|| invalid_answer("the upstream answered no message"))?;
        if !data.is_empty() {
            return Err(invalid_answer(
                "the upstream answered more than one message",
            ));
        }
        let json = self.to_json(msg).map_err(invalid_answer)?;
        let mut resp = Response::new(crate::body::full(json));
        *resp.headers_mut() = headers;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }

    fn to_json(&self, msg: Bytes) -> Result<Vec<u8>, String> {
        let msg = DynamicMessage::decode(self.output.clone(), msg).map_err(|e| {
            format!(
                "the upstream's message is not a {}: {e}",
                self.output.name()
            )
        })?;
        let json = msg
            .serialize_with_options(serde_json::value::Serializer, &self.ser)
            .map_err(|e| format!("the upstream's message cannot be written as JSON: {e}"))?;
        let json = match &self.response_body {
            Some(f) => {
                let key = if self.proto_names {
                    f.name()
                } else {
                    f.json_name()
                };
                match json.get(key) {
                    Some(v) => v.clone(),
                    // Left out as a default value: the field's default, not `null`.
                    None => DynamicMessage::new(self.output.clone())
                        .serialize_with_options(
                            serde_json::value::Serializer,
                            &self.ser.clone().skip_default_fields(false),
                        )
                        .ok()
                        .and_then(|all| all.get(key).cloned())
                        .unwrap_or(serde_json::Value::Null),
                }
            }
            None => json,
        };
        serde_json::to_vec(&json).map_err(|e| e.to_string())
    }

    fn error(&self, status: &Status, headers: HeaderMap, request_id: &str) -> Response<ProxyBody> {
        let mut resp =
            crate::error::json_error(http_status(status.code), status.error_json(request_id));
        // The upstream's headers, with the error's own type and caching.
        let ours = std::mem::replace(resp.headers_mut(), headers);
        resp.headers_mut().extend(ours);
        resp
    }

    /// A server-streaming answer: each message of `body` written as it arrives, the status
    /// last (an error as a final JSON line or an `error` event); `None`: an empty stream
    /// whose OK status came with the headers.
    fn stream_response(
        self,
        mut headers: HeaderMap,
        body: Option<ProxyBody>,
        request_id: &str,
    ) -> Response<ProxyBody> {
        let format = self.stream.unwrap_or_default();
        let ct = match format {
            StreamFormat::Ndjson => "application/x-ndjson",
            StreamFormat::Sse => "text/event-stream",
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let body = match body {
            Some(body) => chunked(StreamState {
                body,
                buf: BytesMut::new(),
                pending: self,
                format,
                request_id: request_id.to_owned(),
                done: false,
            }),
            None => crate::body::empty(),
        };
        let mut resp = Response::new(body);
        *resp.headers_mut() = headers;
        resp
    }
}

/// A stream of chunks written one at a time until the writer is done.
pub(crate) trait Chunks: Send + 'static {
    /// Whether the last chunk was written.
    fn done(&self) -> bool;
    /// The next chunk (the last one sets `done`).
    fn next_chunk(&mut self) -> impl std::future::Future<Output = Result<Bytes, BoxError>> + Send;
}

/// A response body that writes what `chunks` produces, as it comes.
pub(crate) fn chunked<C: Chunks>(chunks: C) -> ProxyBody {
    let stream = futures_util::stream::unfold(chunks, |mut c| async move {
        if c.done() {
            return None;
        }
        let out = c.next_chunk().await;
        Some((out.map(http_body::Frame::data), c))
    });
    BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream))
}

struct StreamState {
    body: ProxyBody,
    buf: BytesMut,
    pending: Pending,
    format: StreamFormat,
    request_id: String,
    done: bool,
}

impl Chunks for StreamState {
    fn done(&self) -> bool {
        self.done
    }

    /// The next piece of the client's stream: a message, or the closing error.
    async fn next_chunk(&mut self) -> Result<Bytes, BoxError> {
        loop {
            match frame_len(&self.buf, self.pending.max_message) {
                Err(e) => return Ok(self.close_with(&e)),
                Ok(Some(len)) => {
                    let mut frame = self.buf.split_to(len);
                    frame.advance(5);
                    return Ok(match self.pending.to_json(frame.freeze()) {
                        Ok(json) => self.event(&json, None),
                        Err(e) => self.close_with(&e),
                    });
                }
                Ok(None) => {}
            }
            // Wait for more: the body's own read timeout applies.
            match self.body.frame().await {
                None => {
                    return Ok(self.close_with("the gRPC stream ended without a status"));
                }
                Some(Err(e)) => {
                    // Cut short (the read timeout, a reset): the client learns why in the
                    // stream's own terms, as with a status.
                    let s = Status {
                        code: 14,
                        message: format!("the upstream stream failed: {e}"),
                    };
                    self.done = true;
                    return Ok(self.error_event(&s));
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        let Ok(trailers) = f.into_trailers() else {
                            continue;
                        };
                        self.done = true;
                        return Ok(match Status::from(&trailers) {
                            Some(Ok(s)) if s.code == 0 && self.buf.is_empty() => Bytes::new(),
                            Some(Ok(s)) if s.code == 0 => {
                                self.close_with("the gRPC stream ended inside a message")
                            }
                            Some(Ok(s)) => self.error_event(&s),
                            Some(Err(e)) => self.close_with(&e),
                            None => self.close_with("the gRPC stream ended without a status"),
                        });
                    }
                },
            }
        }
    }
}

impl StreamState {
    fn event(&self, json: &[u8], event: Option<&str>) -> Bytes {
        let mut out = BytesMut::with_capacity(json.len() + 16);
        match self.format {
            StreamFormat::Ndjson => {
                out.extend_from_slice(json);
                out.put_u8(b'\n');
            }
            StreamFormat::Sse => {
                if let Some(e) = event {
                    out.extend_from_slice(b"event: ");
                    out.extend_from_slice(e.as_bytes());
                    out.put_u8(b'\n');
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(json);
                out.extend_from_slice(b"\n\n");
            }
        }
        out.freeze()
    }

    fn error_event(&self, s: &Status) -> Bytes {
        let json = s.error_json(&self.request_id).to_string();
        self.event(json.as_bytes(), Some("error"))
    }

    fn close_with(&mut self, why: &str) -> Bytes {
        self.done = true;
        let s = Status {
            code: 13,
            message: why.to_owned(),
        };
        self.error_event(&s)
    }
}

/// Takes one length-prefixed message off the front of `data`, if it is all there.
fn next_message(data: &mut Bytes, max: u64) -> Result<Option<Bytes>, String> {
    let Some(len) = frame_len(data, max)? else {
        return Ok(None);
    };
    let mut frame = data.split_to(len);
    frame.advance(5);
    Ok(Some(frame))
}

/// The length (prefix included) of the message frame at the front of `data`, if it is all
/// there.
fn frame_len(data: &[u8], max: u64) -> Result<Option<usize>, String> {
    if data.len() < 5 {
        return Ok(None);
    }
    if data[0] & 1 != 0 {
        return Err("the upstream sent a compressed message".into());
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
    if u64::from(len) > max {
        return Err(format!(
            "a message of {len} bytes exceeds max_message_bytes ({max})"
        ));
    }
    let len = 5 + len as usize;
    Ok((data.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn store_policies_cannot_read_files_of_the_gateway() {
        let kind = |config: serde_json::Value| {
            turnpike_model::policy::PolicyKind::parse_attachment("grpc_transcode", &config).unwrap()
        };
        let managed = turnpike_model::managed::Managed::default();
        let scope = turnpike_model::mgmt::PolicyScope::Global;
        for config in [
            serde_json::json!({"proto_files": ["/etc/x.proto"]}),
            serde_json::json!({"proto_sources": {"a.proto": "syntax = \"proto3\";"}, "import_paths": ["/"]}),
        ] {
            let e = crate::policy::precheck(&kind(config), &scope, &managed).unwrap_err();
            assert!(e.1.contains("inline"), "{e:?}");
        }
        // Inline sources compile; an import outside them is not found.
        let ok = serde_json::json!({
            "proto_sources": {"a.proto": "syntax = \"proto3\"; package a; message M {} service S { rpc Get(M) returns (M); }"},
            "use_annotations": false,
            "methods": [{"grpc": "a.S/Get", "path": "/m"}]
        });
        assert!(crate::policy::precheck(&kind(ok), &scope, &managed).is_ok());
        let escape = serde_json::json!({
            "proto_sources": {"a.proto": "syntax = \"proto3\"; import \"etc/passwd\";"},
            "use_annotations": false,
            "methods": [{"grpc": "a.S/Get", "path": "/m"}]
        });
        let e = crate::policy::precheck(&kind(escape), &scope, &managed).unwrap_err();
        assert!(e.1.contains("etc/passwd"), "{e:?}");
    }

    #[test]
    fn accept_ranges_with_zero_quality_do_not_choose() {
        assert!(accepts("text/event-stream", "text/event-stream"));
        assert!(accepts(
            "application/json, Text/Event-Stream;q=0.5",
            "text/event-stream"
        ));
        assert!(!accepts("text/event-stream;q=0", "text/event-stream"));
        assert!(!accepts("text/event-streamx", "text/event-stream"));
    }

    #[test]
    fn statuses_map_to_http() {
        assert_eq!(http_status(5), StatusCode::NOT_FOUND);
        assert_eq!(http_status(3), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(16), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(14), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(99), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn messages_are_unframed_only_when_whole() {
        let mut d = Bytes::from_static(&[0, 0, 0, 0, 2, 8]);
        assert_eq!(next_message(&mut d, 10).unwrap(), None);
        let mut d = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1, 0]);
        assert_eq!(next_message(&mut d, 10).unwrap().unwrap().as_ref(), &[8, 1]);
        assert_eq!(d.as_ref(), &[0]);
        let mut d = Bytes::from_static(&[0, 0, 0, 1, 0]);
        assert!(next_message(&mut d, 10).unwrap_err().contains("exceeds"));
        let mut d = Bytes::from_static(&[1, 0, 0, 0, 0]);
        assert!(next_message(&mut d, 10).is_err());
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode(b"caf%C3%A9 %zz"), "café %zz");
    }
}
