//! Structured access logs: fields and sinks.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Structured access logs: one JSON record per request, sent to every configured sink.
/// No sink, no records (and no cost on the request path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// The fields each record carries. Default: [`AccessField::BASIC`].
    pub fields: Vec<AccessField>,
    /// Query parameters whose values are written as `***` in the `query` field (compared
    /// without regard to case). Credentials sent in the query (`key_auth` with
    /// `in: query`, tokens) must be listed here.
    pub mask_query_params: Vec<String>,
    /// Opt-in capture of request and response headers and bodies.
    pub capture: CaptureConfig,
    /// Where records go; several sinks may run at once, each with its own queue.
    pub sinks: Vec<SinkConfig>,
    /// How long shutdown waits for the sinks to send what they have queued.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Duration,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            fields: AccessField::BASIC.to_vec(),
            mask_query_params: DEFAULT_MASK_QUERY_PARAMS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            capture: CaptureConfig::default(),
            sinks: Vec::new(),
            flush_timeout: Duration::from_secs(5),
        }
    }
}

/// Query parameters masked in access logs unless configured otherwise: the names API keys
/// and tokens are usually sent under.
pub const DEFAULT_MASK_QUERY_PARAMS: &[&str] = &[
    "apikey",
    "api_key",
    "api-key",
    "key",
    "access_token",
    "token",
    "id_token",
    "refresh_token",
    "client_secret",
    "password",
    "secret",
    "sig",
    "signature",
];

/// One field of an access-log record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessField {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    Time,
    /// The request id.
    RequestId,
    /// W3C trace id, when traced.
    TraceId,
    /// W3C span id of the gateway's span, when traced.
    SpanId,
    /// The real client IP.
    ClientIp,
    /// The listener that accepted the connection.
    Listener,
    /// `HTTP/1.1`, `HTTP/2`, ...
    Protocol,
    /// Request method.
    Method,
    /// Requested host, without port.
    Host,
    /// Request path as sent.
    Path,
    /// Raw query string.
    Query,
    /// Matched route name.
    Route,
    /// Managed service id.
    Service,
    /// Application id.
    Application,
    /// Application name.
    ApplicationName,
    /// Application team.
    Team,
    /// Response status.
    Status,
    /// Request body bytes.
    BytesIn,
    /// Response body bytes.
    BytesOut,
    /// Total latency in milliseconds (fractional).
    DurationMs,
    /// Upstream latency in milliseconds (fractional), when an upstream answered.
    UpstreamMs,
    /// Upstream pool name.
    Upstream,
    /// Upstream target address.
    UpstreamTarget,
    /// Upstream attempts.
    Attempts,
    /// Cache outcome.
    Cache,
    /// Gateway error code.
    Error,
    /// Client `User-Agent`.
    UserAgent,
    /// Whether the response body was sent to its end.
    Completed,
}

impl AccessField {
    /// The default field set: everything but the rarely wanted ones (span id, listener,
    /// protocol, application name, team, completed).
    pub const BASIC: &'static [AccessField] = &[
        Self::Time,
        Self::RequestId,
        Self::TraceId,
        Self::ClientIp,
        Self::Method,
        Self::Host,
        Self::Path,
        Self::Query,
        Self::Route,
        Self::Service,
        Self::Application,
        Self::Status,
        Self::BytesIn,
        Self::BytesOut,
        Self::DurationMs,
        Self::UpstreamMs,
        Self::Upstream,
        Self::UpstreamTarget,
        Self::Attempts,
        Self::Cache,
        Self::Error,
        Self::UserAgent,
    ];

    /// The key the field has in a record.
    pub fn key(self) -> &'static str {
        match self {
            Self::Time => "time",
            Self::RequestId => "request_id",
            Self::TraceId => "trace_id",
            Self::SpanId => "span_id",
            Self::ClientIp => "client_ip",
            Self::Listener => "listener",
            Self::Protocol => "protocol",
            Self::Method => "method",
            Self::Host => "host",
            Self::Path => "path",
            Self::Query => "query",
            Self::Route => "route",
            Self::Service => "service",
            Self::Application => "application",
            Self::ApplicationName => "application_name",
            Self::Team => "team",
            Self::Status => "status",
            Self::BytesIn => "bytes_in",
            Self::BytesOut => "bytes_out",
            Self::DurationMs => "duration_ms",
            Self::UpstreamMs => "upstream_ms",
            Self::Upstream => "upstream",
            Self::UpstreamTarget => "upstream_target",
            Self::Attempts => "attempts",
            Self::Cache => "cache",
            Self::Error => "error",
            Self::UserAgent => "user_agent",
            Self::Completed => "completed",
        }
    }
}

/// What of the request and response is copied into the record. Everything is off by
/// default: captured headers and bodies cost memory and may carry personal data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Record the request headers (`request_headers`).
    pub request_headers: bool,
    /// Record the response headers (`response_headers`).
    pub response_headers: bool,
    /// Record the first `max_body_bytes` of the request body (`request_body`).
    pub request_body: bool,
    /// Record the first `max_body_bytes` of the response body (`response_body`).
    pub response_body: bool,
    /// How much of each body is kept; the record says when a body was cut.
    pub max_body_bytes: usize,
    /// Headers whose values are replaced by `***` (case-insensitive).
    pub mask_headers: Vec<String>,
    /// JSON field names whose values are replaced by `***` in captured JSON bodies, at
    /// any depth.
    pub mask_fields: Vec<String>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            request_headers: false,
            response_headers: false,
            request_body: false,
            response_body: false,
            max_body_bytes: 4096,
            mask_headers: [
                "authorization",
                "cookie",
                "set-cookie",
                "x-api-key",
                "proxy-authorization",
            ]
            .map(String::from)
            .to_vec(),
            mask_fields: Vec::new(),
        }
    }
}

impl CaptureConfig {
    /// Whether anything at all is captured.
    pub fn any(&self) -> bool {
        self.request_headers || self.response_headers || self.request_body || self.response_body
    }
}

/// One sink: where records go and how they are queued. Unknown keys are rejected by the
/// sink type's own struct (serde cannot deny them on a struct with a flattened part).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct SinkConfig {
    /// A name for stats and log messages; defaults to the sink's type and index.
    #[serde(default)]
    pub name: Option<String>,
    /// Records waiting to be written; when full, new records are dropped and counted.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// The sink itself.
    #[serde(flatten)]
    pub kind: SinkKind,
}

fn default_queue_size() -> usize {
    10_000
}

/// The kinds of sink.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkKind {
    /// JSON lines on standard output.
    Stdout(StdoutSink),
    /// JSON lines in a file, rotated by size and/or daily.
    File(FileSink),
    /// Batches POSTed to an HTTP endpoint.
    Http(HttpSink),
    /// RFC 5424 syslog messages.
    Syslog(SyslogSink),
    /// OTLP/HTTP JSON logs (`/v1/logs`).
    Otlp(OtlpSink),
    /// `XADD` to a Redis stream.
    Redis(RedisSink),
    /// Publish to a NATS subject.
    Nats(NatsSink),
}

impl SinkKind {
    /// The type name as written in the config.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Stdout(_) => "stdout",
            Self::File(_) => "file",
            Self::Http(_) => "http",
            Self::Syslog(_) => "syslog",
            Self::Otlp(_) => "otlp",
            Self::Redis(_) => "redis",
            Self::Nats(_) => "nats",
        }
    }
}

/// JSON lines on standard output (no settings).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSink {}

/// A JSON-lines file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// The file written to; rotated files get a `.1`, `.2`, ... suffix (`.1` the newest).
    pub path: String,
    /// Rotate when the file would grow past this many bytes (0: never by size).
    #[serde(default = "default_max_file_bytes")]
    pub max_bytes: u64,
    /// Also rotate when the UTC date changes.
    #[serde(default)]
    pub daily: bool,
    /// Rotated files kept (older ones are deleted).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_max_file_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_keep() -> usize {
    5
}

/// How an HTTP batch body is laid out.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HttpFormat {
    /// One JSON array of records (`application/json`).
    #[default]
    JsonArray,
    /// One record per line (`application/x-ndjson`).
    Ndjson,
}

/// Batches POSTed to an HTTP endpoint (Loki, Vector, Logstash, a SIEM, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSink {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// Batch layout.
    #[serde(default)]
    pub format: HttpFormat,
    /// Extra request headers (e.g. `authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Batching, timeout and retries.
    #[serde(default)]
    pub batch: BatchConfig,
}

/// Batching and delivery of a sink that sends records in groups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Records per batch at most.
    pub batch_size: usize,
    /// How long the first record of a batch waits for others before the batch is sent.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// One send attempt's time limit.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after a failed attempt (exponential backoff from `retry_backoff`); then the
    /// batch is counted as failed.
    pub max_retries: u32,
    /// The first retry's delay; doubled for each further retry.
    #[schemars(with = "String")]
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            max_retries: 3,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

/// Syslog transport.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyslogTransport {
    /// One datagram per message.
    #[default]
    Udp,
    /// RFC 6587 octet counting over TCP.
    Tcp,
    /// A unix datagram socket (e.g. `/dev/log`).
    Unix,
}

/// RFC 5424 syslog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyslogSink {
    /// `host:port` for UDP and TCP, a socket path for `unix`.
    pub address: String,
    /// Transport.
    #[serde(default)]
    pub transport: SyslogTransport,
    /// Facility number (0..=23); default 16 (local0).
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// APP-NAME of each message.
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// How long connecting, or sending 64 KiB of a batch, may make no progress (TCP: a
    /// receiver that stops reading must not stall the sink forever); past it the batch
    /// counts as failed and the connection is opened again for the next one.
    #[schemars(with = "String")]
    #[serde(default = "default_syslog_timeout", with = "humantime_serde")]
    pub timeout: std::time::Duration,
}

fn default_syslog_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn default_facility() -> u8 {
    16
}

fn default_app_name() -> String {
    "turnpike".into()
}

/// OTLP/HTTP logs with the JSON encoding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpSink {
    /// The collector's base URL (`/v1/logs` is appended unless the URL already ends so).
    pub endpoint: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `service.name` resource attribute.
    #[serde(default = "default_app_name")]
    pub service_name: String,
    /// Batching, timeout and retries.
    #[serde(default)]
    pub batch: BatchConfig,
}

/// A Redis stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSink {
    /// `redis://host:port/db` URL.
    pub url: String,
    /// Stream key.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Approximate stream length kept (`MAXLEN ~`).
    #[serde(default = "default_maxlen")]
    pub max_len: u64,
    /// Batching, timeout and retries.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_stream() -> String {
    "turnpike:access".into()
}

fn default_maxlen() -> u64 {
    100_000
}

/// A NATS subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSink {
    /// Server address (`nats://host:port` or `host:port`).
    pub url: String,
    /// Subject each record is published to.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Batching, timeout and retries.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_subject() -> String {
    "turnpike.access".into()
}

impl AccessLogConfig {
    /// Range and reference checks; `(path, message)` for each problem, paths relative to
    /// `observability.access_log`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut err = |p: String, m: &str| out.push((p, m.to_owned()));
        if self.capture.max_body_bytes > 16 * 1024 * 1024 {
            err(
                "capture.max_body_bytes".into(),
                "must be at most 16777216 (16 MiB)",
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let p = format!("sinks[{i}]");
            if s.queue_size == 0 {
                err(format!("{p}.queue_size"), "must be at least 1");
            }
            if let Some(n) = &s.name
                && !names.insert(n.clone())
            {
                err(format!("{p}.name"), "duplicate sink name");
            }
            let batch = match &s.kind {
                SinkKind::Stdout(_) => None,
                SinkKind::File(f) => {
                    if f.path.is_empty() {
                        err(format!("{p}.path"), "must not be empty");
                    }
                    None
                }
                SinkKind::Http(h) => {
                    if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                        err(format!("{p}.url"), "must be an http:// or https:// URL");
                    }
                    check_headers(&h.headers, &format!("{p}.headers"), &mut err);
                    Some(&h.batch)
                }
                SinkKind::Syslog(s) => {
                    if s.facility > 23 {
                        err(format!("{p}.facility"), "must be 0..=23");
                    }
                    if s.transport != SyslogTransport::Unix
                        && s.address.parse::<std::net::SocketAddr>().is_err()
                        && !s.address.contains(':')
                    {
                        err(format!("{p}.address"), "must be host:port");
                    }
                    if s.app_name.is_empty()
                        || s.app_name.len() > 48
                        || !s.app_name.bytes().all(|b| (33..=126).contains(&b))
                    {
                        err(
                            format!("{p}.app_name"),
                            "must be 1..=48 printable ASCII characters without spaces",
                        );
                    }
                    if s.timeout < std::time::Duration::from_millis(10)
                        || s.timeout > std::time::Duration::from_secs(300)
                    {
                        err(format!("{p}.timeout"), "must be between 10ms and 5m");
                    }
                    None
                }
                SinkKind::Otlp(o) => {
                    if !(o.endpoint.starts_with("http://") || o.endpoint.starts_with("https://")) {
                        err(
                            format!("{p}.endpoint"),
                            "must be an http:// or https:// URL",
                        );
                    }
                    check_headers(&o.headers, &format!("{p}.headers"), &mut err);
                    Some(&o.batch)
                }
                SinkKind::Redis(r) => {
                    if !(r.url.starts_with("redis://")
                        || r.url.starts_with("rediss://")
                        || r.url.starts_with("unix://"))
                    {
                        err(format!("{p}.url"), "must be a redis:// URL");
                    }
                    if r.stream.is_empty() {
                        err(format!("{p}.stream"), "must not be empty");
                    }
                    Some(&r.batch)
                }
                SinkKind::Nats(n) => {
                    if n.subject.is_empty() || n.subject.contains(char::is_whitespace) {
                        err(
                            format!("{p}.subject"),
                            "must be a non-empty subject without spaces",
                        );
                    }
                    if n.url.is_empty() {
                        err(format!("{p}.url"), "must not be empty");
                    }
                    Some(&n.batch)
                }
            };
            if let Some(b) = batch {
                if b.batch_size == 0 {
                    err(format!("{p}.batch.batch_size"), "must be at least 1");
                }
                if b.timeout.is_zero() {
                    err(format!("{p}.batch.timeout"), "must be more than 0");
                }
                if b.max_retries > 100 {
                    err(format!("{p}.batch.max_retries"), "must be at most 100");
                }
            }
        }
        out
    }
}

fn check_headers(
    headers: &BTreeMap<String, String>,
    path: &str,
    err: &mut impl FnMut(String, &str),
) {
    for (k, v) in headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            err(format!("{path}.{k}"), "not a valid header name");
        }
        if http::HeaderValue::from_str(v).is_err() {
            err(format!("{path}.{k}"), "not a valid header value");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use crate::{Format, Source};

    fn parse(yaml: &str) -> Result<crate::Config, String> {
        let source = Source {
            file: "t.yaml".into(),
            text: yaml.into(),
        };
        let c = crate::parse(&source, Format::Yaml).map_err(|e| e.to_string())?;
        crate::validate(&c).map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_and_every_sink_type_parse() {
        let c = parse(
            r#"
observability:
  access_log:
    capture: {request_body: true, mask_fields: [password]}
    sinks:
      - type: stdout
      - {type: file, path: /tmp/a.log, daily: true}
      - {type: http, url: "http://h/x", format: ndjson, queue_size: 5, batch: {batch_size: 2, max_delay: 50ms}}
      - {type: syslog, address: "127.0.0.1:514", transport: tcp}
      - {type: otlp, endpoint: "http://c:4318"}
      - {type: redis, url: "redis://127.0.0.1/0"}
      - {type: nats, url: "127.0.0.1:4222", subject: a.b}
"#,
        )
        .unwrap();
        let a = &c.observability.access_log;
        assert_eq!(a.fields, super::AccessField::BASIC);
        assert_eq!(a.capture.max_body_bytes, 4096);
        assert!(a.capture.mask_headers.contains(&"authorization".to_owned()));
        assert_eq!(a.sinks.len(), 7);
        assert_eq!(a.sinks[0].queue_size, 10_000);
        assert_eq!(a.sinks[2].queue_size, 5);
        let super::SinkKind::Http(h) = &a.sinks[2].kind else {
            panic!()
        };
        assert_eq!(h.batch.batch_size, 2);
        assert_eq!(h.batch.max_delay, std::time::Duration::from_millis(50));
        assert_eq!(h.batch.max_retries, 3);
    }

    #[test]
    fn bad_values_name_their_path() {
        let e = parse(
            "observability:\n  access_log:\n    sinks:\n      - {type: http, url: ftp://x, batch: {batch_size: 0}}\n",
        )
        .unwrap_err();
        assert!(e.contains("observability.access_log.sinks[0].url"), "{e}");
        assert!(
            e.contains("observability.access_log.sinks[0].batch.batch_size"),
            "{e}"
        );
        let e = parse("observability:\n  access_log:\n    sinks:\n      - {type: file, path: a, colour: red}\n")
            .unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = parse("observability:\n  access_log:\n    fields: [nope]\n").unwrap_err();
        assert!(e.contains("fields"), "{e}");
    }
}
