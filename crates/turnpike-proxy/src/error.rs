//! Errors the gateway answers itself, in the project's JSON shape.
//!
//! Every failure kind has a stable `code` that clients and dashboards can rely on, an HTTP
//! status, where it came from, and whether retrying is safe.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// Where a failure came from; also a low-cardinality metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we refuse.
    Client,
    /// The upstream failed or could not be reached.
    Upstream,
    /// The gateway itself.
    Internal,
}

/// A failure the gateway answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matches the request.
    RouteNotFound,
    /// A route matches the path but not the method.
    MethodNotAllowed,
    /// The path cannot be normalised safely (encoded slash, NUL, bad escape).
    InvalidPath,
    /// Malformed request (framing, headers).
    BadRequest,
    /// Request target longer than the limit.
    UriTooLong,
    /// Request head larger than the limit.
    HeadersTooLarge,
    /// Request body larger than the limit.
    BodyTooLarge,
    /// The client stopped sending its body.
    ClientTimeout,
    /// No connection could be made to any target.
    UpstreamUnreachable,
    /// The upstream broke the exchange (reset, protocol error).
    UpstreamError,
    /// No healthy target in the pool.
    NoHealthyUpstream,
    /// The pool's concurrency limit is reached.
    UpstreamOverloaded,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The route's service was retired (410, with its successor when it has one).
    ApiRetired,
    /// The service requires a credential and the request carries none.
    CredentialMissing,
    /// The request's credential is not known.
    CredentialInvalid,
    /// The application has no approved subscription to the service.
    SubscriptionRequired,
    /// The client IP is denied by an `ip_restriction` policy.
    IpDenied,
    /// The `User-Agent` is denied by a `user_agent` policy.
    UserAgentDenied,
    /// The application's groups do not allow this route (`acl`).
    AccessDenied,
    /// The credential lacks a required scope or claim (`acl`).
    InsufficientScope,
    /// A CORS preflight from an origin that is not allowed.
    CorsDenied,
    /// A rate limit is exhausted.
    RateLimited,
    /// The shared rate-limit store is unreachable and the policy fails closed.
    RateLimiterUnavailable,
    /// Credentials cannot be checked now (an issuer's JWKS cannot be fetched).
    AuthUnavailable,
    /// A circuit breaker is open: the upstream is not called.
    CircuitOpen,
    /// A bulkhead is full: too many requests in flight.
    BulkheadFull,
    /// The `fault_injection` policy failed the request on purpose.
    FaultInjected,
    /// A bug or an unexpected state.
    Internal,
    /// The subscription's plan quota for the current day or month is used up.
    QuotaExceeded,
    /// A `waf` rule matched the request.
    WafBlocked,
    /// The request does not match its schema (`request_validation`).
    RequestInvalid,
    /// The request's `Content-Type` is not one the route accepts.
    UnsupportedMediaType,
    /// A `request_transform` could not apply to the request (its body is not the JSON or
    /// XML the transform reads, or a template rendered an invalid header value).
    RequestTransformFailed,
    /// A `response_transform` could not apply to the upstream's answer.
    ResponseTransformFailed,
    /// The upstream's answer is larger than a `response_transform` reads.
    ResponseTooLarge,
    /// A required call of an `aggregate` route failed.
    AggregateFailed,
    /// A `grpc_transcode` request could not be made into the method's message.
    GrpcRequestInvalid,
    /// A `grpc_transcode` upstream's answer is not a gRPC answer the gateway can read.
    GrpcResponseInvalid,
}

impl ErrorKind {
    /// The stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidPath => "invalid_path",
            Self::BadRequest => "bad_request",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::BodyTooLarge => "body_too_large",
            Self::ClientTimeout => "client_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamError => "upstream_error",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::UpstreamOverloaded => "upstream_overloaded",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::ApiRetired => "api_retired",
            Self::CredentialMissing => "credential_missing",
            Self::CredentialInvalid => "credential_invalid",
            Self::SubscriptionRequired => "subscription_required",
            Self::IpDenied => "ip_denied",
            Self::UserAgentDenied => "user_agent_denied",
            Self::AccessDenied => "access_denied",
            Self::InsufficientScope => "insufficient_scope",
            Self::CorsDenied => "cors_denied",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::RateLimiterUnavailable => "rate_limiter_unavailable",
            Self::AuthUnavailable => "auth_unavailable",
            Self::CircuitOpen => "circuit_open",
            Self::BulkheadFull => "bulkhead_full",
            Self::FaultInjected => "fault_injected",
            Self::Internal => "internal_error",
            Self::WafBlocked => "waf_blocked",
            Self::RequestInvalid => "request_invalid",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RequestTransformFailed => "request_transform_failed",
            Self::ResponseTransformFailed => "response_transform_failed",
            Self::ResponseTooLarge => "response_too_large",
            Self::AggregateFailed => "aggregate_failed",
            Self::GrpcRequestInvalid => "grpc_request_invalid",
            Self::GrpcResponseInvalid => "grpc_response_invalid",
        }
    }

    /// HTTP status answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidPath | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamUnreachable | Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::NoHealthyUpstream | Self::UpstreamOverloaded | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ApiRetired => StatusCode::GONE,
            Self::CredentialMissing | Self::CredentialInvalid => StatusCode::UNAUTHORIZED,
            Self::SubscriptionRequired
            | Self::IpDenied
            | Self::UserAgentDenied
            | Self::AccessDenied
            | Self::InsufficientScope
            | Self::CorsDenied => StatusCode::FORBIDDEN,
            Self::RateLimited | Self::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::RateLimiterUnavailable
            | Self::AuthUnavailable
            | Self::CircuitOpen
            | Self::BulkheadFull
            | Self::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::WafBlocked => StatusCode::FORBIDDEN,
            Self::RequestInvalid => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTransformFailed | Self::GrpcRequestInvalid => StatusCode::BAD_REQUEST,
            Self::ResponseTransformFailed
            | Self::ResponseTooLarge
            | Self::AggregateFailed
            | Self::GrpcResponseInvalid => StatusCode::BAD_GATEWAY,
        }
    }

    /// Where the failure came from.
    pub fn origin(self) -> Origin {
        match self {
            Self::RouteNotFound
            | Self::MethodNotAllowed
            | Self::InvalidPath
            | Self::BadRequest
            | Self::UriTooLong
            | Self::HeadersTooLarge
            | Self::BodyTooLarge
            | Self::ClientTimeout
            | Self::ApiRetired
            | Self::CredentialMissing
            | Self::CredentialInvalid
            | Self::SubscriptionRequired
            | Self::IpDenied
            | Self::UserAgentDenied
            | Self::AccessDenied
            | Self::InsufficientScope
            | Self::CorsDenied
            | Self::RateLimited
            | Self::QuotaExceeded => Origin::Client,
            Self::UpstreamUnreachable
            | Self::UpstreamError
            | Self::NoHealthyUpstream
            | Self::UpstreamOverloaded
            | Self::UpstreamTimeout
            | Self::CircuitOpen
            | Self::BulkheadFull
            | Self::FaultInjected => Origin::Upstream,
            Self::ShuttingDown
            | Self::Internal
            | Self::RateLimiterUnavailable
            | Self::AuthUnavailable => Origin::Internal,
            Self::WafBlocked
            | Self::RequestInvalid
            | Self::UnsupportedMediaType
            | Self::RequestTransformFailed
            | Self::GrpcRequestInvalid => Origin::Client,
            Self::ResponseTransformFailed
            | Self::ResponseTooLarge
            | Self::AggregateFailed
            | Self::GrpcResponseInvalid => Origin::Upstream,
        }
    }

    /// The gRPC status code for this failure (gRPC clients read `grpc-status`, not HTTP).
    pub fn grpc_status(self) -> u8 {
        match self {
            Self::RouteNotFound | Self::MethodNotAllowed => 12, // UNIMPLEMENTED
            Self::InvalidPath | Self::BadRequest => 3,          // INVALID_ARGUMENT
            Self::UriTooLong | Self::HeadersTooLarge | Self::BodyTooLarge => 8, // RESOURCE_EXHAUSTED
            Self::ClientTimeout | Self::UpstreamTimeout => 4,                   // DEADLINE_EXCEEDED
            Self::UpstreamUnreachable
            | Self::UpstreamError
            | Self::NoHealthyUpstream
            | Self::UpstreamOverloaded
            | Self::ShuttingDown => 14, // UNAVAILABLE
            Self::ApiRetired => 5,                                              // NOT_FOUND
            Self::CredentialMissing | Self::CredentialInvalid => 16,            // UNAUTHENTICATED
            Self::SubscriptionRequired
            | Self::IpDenied
            | Self::UserAgentDenied
            | Self::AccessDenied
            | Self::InsufficientScope
            | Self::CorsDenied => 7, // PERMISSION_DENIED
            Self::RateLimited | Self::QuotaExceeded => 8, // RESOURCE_EXHAUSTED
            Self::RateLimiterUnavailable
            | Self::AuthUnavailable
            | Self::CircuitOpen
            | Self::BulkheadFull
            | Self::FaultInjected => 14, // UNAVAILABLE
            Self::Internal => 13,                         // INTERNAL
            Self::WafBlocked => 7,                        // PERMISSION_DENIED
            Self::RequestInvalid
            | Self::UnsupportedMediaType
            | Self::RequestTransformFailed
            | Self::GrpcRequestInvalid => 3, // INVALID_ARGUMENT
            Self::ResponseTransformFailed | Self::ResponseTooLarge | Self::GrpcResponseInvalid => {
                13 // INTERNAL
            }
            Self::AggregateFailed => 14, // UNAVAILABLE
        }
    }

    /// Whether a client may safely retry the same request.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::UpstreamUnreachable
                | Self::NoHealthyUpstream
                | Self::UpstreamOverloaded
                | Self::ShuttingDown
                | Self::RateLimited
                | Self::RateLimiterUnavailable
                | Self::AuthUnavailable
                | Self::CircuitOpen
                | Self::BulkheadFull
                | Self::QuotaExceeded
        )
    }
}

/// A gateway error with a human-readable message.
#[derive(Debug, Clone)]
pub struct GatewayError {
    /// The failure kind.
    pub kind: ErrorKind,
    /// Message for humans; never contains secrets or upstream internals.
    pub message: String,
    /// Structured detail added to the JSON error as `error.details` (the failing locations
    /// of a `request_validation`).
    pub details: Option<Box<serde_json::Value>>,
}

impl GatewayError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            details: None,
        }
    }

    /// The same error with `error.details` in its JSON body.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    /// The JSON error response, tagged with the request id.
    pub fn into_response(self, request_id: &str) -> Response<ProxyBody> {
        match self.details {
            None => error_response(self.kind, &self.message, request_id),
            Some(details) => {
                let body = serde_json::json!({
                    "error": {
                        "code": self.kind.code(),
                        "message": self.message,
                        "request_id": request_id,
                        "details": details,
                    }
                });
                json_error(self.kind.status(), body)
            }
        }
    }

    /// The error in the shape the client understands: a gRPC trailers-only response for gRPC
    /// requests, JSON otherwise.
    pub fn into_response_for(self, grpc: bool, request_id: &str) -> Response<ProxyBody> {
        if grpc {
            grpc_error_response(self.kind, &self.message)
        } else {
            self.into_response(request_id)
        }
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)
    }
}

impl std::error::Error for GatewayError {}

/// Builds `{"error":{"code","message","request_id"}}` with the kind's status.
pub fn error_response(kind: ErrorKind, message: &str, request_id: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "code": kind.code(), "message": message, "request_id": request_id }
    });
    json_error(kind.status(), body)
}

/// A JSON error body with `status`, not to be stored by caches.
pub(crate) fn json_error(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/grpc") && !ct.starts_with("application/grpc-web")
        })
}

/// A gRPC "trailers-only" response: HTTP 200 whose headers carry `grpc-status` and
/// `grpc-message`, which is how gRPC servers report an error before any message.
pub fn grpc_error_response(kind: ErrorKind, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        HeaderValue::from(u16::from(kind.grpc_status())),
    );
    let msg = format!("{}: {message}", kind.code());
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&msg)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: everything outside
/// printable ASCII, and `%` itself.
pub(crate) fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn grpc_errors_are_trailers_only() {
        let resp = grpc_error_response(ErrorKind::UpstreamUnreachable, "café 100%");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(
            resp.headers()["grpc-message"],
            "upstream_unreachable: caf%C3%A9 100%25"
        );
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }

    #[tokio::test]
    async fn error_body_shape() {
        let resp = error_response(ErrorKind::UpstreamTimeout, "too slow", "rid-1");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "upstream_timeout");
        assert_eq!(v["error"]["message"], "too slow");
        assert_eq!(v["error"]["request_id"], "rid-1");
    }
}
