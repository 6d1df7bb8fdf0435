//! Phase `access` for routes of services managed in the store: a retired service answers 410,
//! a deprecated one announces it, and a service with manual approval admits only applications
//! with an approved subscription.
//!
//! Identification here is the API key in `X-API-Key`, the one credential every application
//! gets from the Admin API. The general authentication policies build on the same
//! [`Managed`] index.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Response, header};
use sha2::{Digest, Sha256};
use turnpike_model::managed::{Consumer, Managed, ServiceBinding};
use turnpike_model::mgmt::{Approval, Lifecycle};

use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError, error_response};

/// Header that carries an application's API key.
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Identity headers the gateway sets upstream; always removed from client requests so a
/// client cannot claim an identity.
pub static CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
/// See [`CONSUMER_ID`].
pub static CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
/// See [`CONSUMER_ID`]: application names are unique only within a team.
pub static CONSUMER_TEAM: HeaderName = HeaderName::from_static("x-consumer-team");

/// Removes identity headers a client may have sent.
pub fn strip_identity(headers: &mut HeaderMap) {
    for name in [&CONSUMER_ID, &CONSUMER_NAME, &CONSUMER_TEAM] {
        headers.remove(name);
    }
}

/// What the access phase decided for a request to a managed service.
pub enum Access {
    /// Answer with this response (410 for a retired service).
    Respond(Response<ProxyBody>),
    /// Forward, as this consumer when one was identified.
    Forward(Option<Arc<Consumer>>),
}

/// Runs the checks for `service` on a request with `headers`.
pub fn check(
    managed: &Managed,
    service: &ServiceBinding,
    headers: &HeaderMap,
    request_id: &str,
) -> Result<Access, GatewayError> {
    if service.lifecycle == Lifecycle::Retired {
        return Ok(Access::Respond(retired(service, request_id)));
    }
    let Some(key) = headers.get(&API_KEY) else {
        if service.approval == Approval::Manual {
            return Err(GatewayError::new(
                ErrorKind::CredentialMissing,
                format!("this API requires an API key in the `{API_KEY}` header"),
            ));
        }
        return Ok(Access::Forward(None));
    };
    let Some(consumer) = managed.api_keys.get(&api_key_hash(key.as_bytes())) else {
        return Err(GatewayError::new(
            ErrorKind::CredentialInvalid,
            "the API key is not valid",
        ));
    };
    if service.approval == Approval::Manual
        && !managed
            .subscriptions
            .contains(&(consumer.id.clone(), service.id.clone()))
    {
        return Err(GatewayError::new(
            ErrorKind::SubscriptionRequired,
            format!(
                "application `{}` has no approved subscription to service `{}/{}`",
                consumer.name, service.team, service.name
            ),
        ));
    }
    Ok(Access::Forward(Some(consumer.clone())))
}

/// The form API keys are indexed by: lower-case hex SHA-256.
pub fn api_key_hash(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

/// Sets the identity headers for the upstream.
pub fn identify(headers: &mut HeaderMap, consumer: &Consumer) {
    for (name, value) in [
        (&CONSUMER_ID, &consumer.id),
        (&CONSUMER_NAME, &consumer.name),
        (&CONSUMER_TEAM, &consumer.team),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), v);
        }
    }
}

/// Adds `Deprecation`, `Sunset` and the successor `Link` to a deprecated service's responses.
pub fn announce(service: &ServiceBinding, headers: &mut HeaderMap) {
    if service.lifecycle != Lifecycle::Deprecated {
        return;
    }
    let deprecation = service.deprecation.as_deref().unwrap_or("true");
    if let Ok(v) = HeaderValue::from_str(deprecation) {
        headers.insert(HeaderName::from_static("deprecation"), v);
    }
    if let Some(v) = service
        .sunset
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        headers.insert(HeaderName::from_static("sunset"), v);
    }
    if let Some(v) = successor_link(service) {
        headers.append(header::LINK, v);
    }
}

fn successor_link(service: &ServiceBinding) -> Option<HeaderValue> {
    let url = service.successor.as_deref()?;
    HeaderValue::from_str(&format!("<{url}>; rel=\"successor-version\"")).ok()
}

fn retired(service: &ServiceBinding, request_id: &str) -> Response<ProxyBody> {
    let message = match &service.successor {
        Some(url) => format!(
            "service `{}/{}` is retired; use {url}",
            service.team, service.name
        ),
        None => format!("service `{}/{}` is retired", service.team, service.name),
    };
    let mut resp = error_response(ErrorKind::ApiRetired, &message, request_id);
    if let Some(v) = successor_link(service) {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}
