//! The Admin API's error type and its JSON shape.
//!
//! Every failure leaves as `{"error": {"code", "message", "request_id", "field"?}}` with a
//! stable `code`. Handlers do not know the request id, so an error response first carries an
//! [`ErrorBody`] extension with an empty body; the request-context middleware
//! (`http::request_context`) renders it with the id. That one place also covers axum's own
//! responses (fallback, 405) and panics.

use std::fmt;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use turnpike_model::ConfigErrors;
use turnpike_store::StoreError;

/// Why an Admin API request failed: an HTTP status, a stable code, a message for people and,
/// for validation errors, the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code (`not_found`, `validation_failed`, ...).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The field a validation error is about (`upstream`, `paths[0].template`, ...).
    pub field: Option<String>,
    /// For 405: the methods the path allows.
    pub allow: Option<String>,
}

/// What the request-context middleware renders into the JSON error body.
#[derive(Debug, Clone)]
pub(crate) struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl AdminError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            allow: None,
        }
    }

    /// 400 `bad_request`: the request cannot be read (malformed JSON, bad query string).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 `unauthorized`: no valid bearer token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`: authenticated, but the role does not allow it.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 404 `route_not_found`: no such path in the Admin API at all.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            format!("no Admin API endpoint at {path}"),
        )
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed(method: &str, allow: String) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed here; allowed: {allow}"),
        );
        e.allow = Some(allow);
        e
    }

    /// 409 `conflict`: a duplicate name, a referenced object, an illegal state transition.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 412 `precondition_failed`: `If-Match` names another revision.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            message,
        )
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 422 `validation_failed` about `field` (empty: the whole body).
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        );
        let field = field.into();
        e.field = (!field.is_empty()).then_some(field);
        e
    }

    /// 422 with `code` (`too_many_points`, ...): a well-formed query whose answer would pass
    /// a configured bound; `field` names the parameter to narrow.
    pub fn too_large(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
        e.field = Some(field.to_owned());
        e
    }

    /// 503 `store_unavailable`: retry later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            message,
        )
    }

    /// 503 `cache_unavailable`: no response cache to act on in this process.
    pub fn cache_unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache_unavailable",
            message,
        )
    }

    /// 500 `internal`. The detail is logged, not sent: it may name internals.
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(error = %detail, "admin API internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code,
            self.status.as_u16(),
            self.message
        )?;
        if let Some(field) = &self.field {
            write!(f, " [field {field}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for AdminError {}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { kind, .. } => Self::not_found(format!("{kind} not found")),
            StoreError::Conflict { .. } => Self::precondition_failed(e.to_string()),
            StoreError::Duplicate { .. } | StoreError::DuplicateId { .. } => {
                Self::conflict(e.to_string())
            }
            StoreError::Invalid(message) => Self::bad_request(message.clone()),
            StoreError::Unavailable(_) => Self::unavailable(e.to_string()),
            _ => Self::internal(e),
        }
    }
}

impl From<ConfigErrors> for AdminError {
    fn from(e: ConfigErrors) -> Self {
        let Some(first) = e.0.first() else {
            return Self::validation("", "invalid spec");
        };
        // serde reports a missing or unknown member at its parent; the member itself is the
        // field a client needs to fix.
        let member = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| first.message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next());
        let field = match member {
            Some(member) if first.path.is_empty() => member.to_owned(),
            Some(member) => format!("{}.{member}", first.path),
            None => first.path.clone(),
        };
        Self::validation(field, first.message.clone())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(allow) = self
            .allow
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response.extensions_mut().insert(ErrorBody {
            code: self.code,
            message: self.message,
            field: self.field,
        });
        response
    }
}

/// The Admin API's result type.
pub type AdminResult<T> = Result<T, AdminError>;
