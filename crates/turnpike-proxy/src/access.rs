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
use crate::clientcert::{ClientCert, ascii_escaped};
use crate::error::{ErrorKind, GatewayError, error_response};
use crate::policy::Identity;

/// Header that carries an application's API key.
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Identity headers the gateway sets upstream; always removed from client requests so a
/// client cannot claim an identity.
pub static CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
/// See [`CONSUMER_ID`].
pub static CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
/// See [`CONSUMER_ID`]: application names are unique only within a team.
pub static CONSUMER_TEAM: HeaderName = HeaderName::from_static("x-consumer-team");
/// See [`CONSUMER_ID`]: the scopes of the credential, space-separated.
pub static AUTHENTICATED_SCOPES: HeaderName = HeaderName::from_static("x-authenticated-scopes");
/// See [`CONSUMER_ID`]: `true` when the application is a route's anonymous one.
pub static ANONYMOUS_CONSUMER: HeaderName = HeaderName::from_static("x-anonymous-consumer");

/// The identity headers the gateway sets.
const IDENTITY: [&HeaderName; 5] = [
    &CONSUMER_ID,
    &CONSUMER_NAME,
    &CONSUMER_TEAM,
    &AUTHENTICATED_SCOPES,
    &ANONYMOUS_CONSUMER,
];

/// The client certificate headers of the `mtls` policy's `upstream_headers` share this
/// prefix; every client-sent header with it is removed, whatever follows.
const CLIENT_CERT_PREFIX: &str = "x-client-cert-";
/// See [`CLIENT_CERT_PREFIX`]: the subject DN (RFC 4514, non-ASCII bytes `\hh`-escaped).
pub static CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
/// See [`CLIENT_CERT_PREFIX`]: one field line per SAN, `DNS:`/`URI:`/`email:`/`IP:` typed.
pub static CLIENT_CERT_SAN: HeaderName = HeaderName::from_static("x-client-cert-san");
/// See [`CLIENT_CERT_PREFIX`]: SHA-256 of the DER certificate, lower-case hex.
pub static CLIENT_CERT_FINGERPRINT: HeaderName =
    HeaderName::from_static("x-client-cert-fingerprint");
/// See [`CLIENT_CERT_PREFIX`]: the serial number, upper-case hex.
pub static CLIENT_CERT_SERIAL: HeaderName = HeaderName::from_static("x-client-cert-serial");
/// See [`CLIENT_CERT_PREFIX`]: `notAfter`, RFC 3339.
pub static CLIENT_CERT_NOT_AFTER: HeaderName = HeaderName::from_static("x-client-cert-not-after");

/// Whether `name` (lower case, as `HeaderName` keeps it) is one the gateway sets, with `_`
/// read as `-`.
pub(crate) fn is_gateway_header(name: &str) -> bool {
    let same = |a: &str, b: &str| {
        a.len() == b.len()
            && a.bytes()
                .zip(b.bytes())
                .all(|(x, y)| x == y || (x == b'_' && y == b'-'))
    };
    name.get(..CLIENT_CERT_PREFIX.len())
        .is_some_and(|p| same(p, CLIENT_CERT_PREFIX))
        || IDENTITY.iter().any(|n| same(name, n.as_str()))
}

/// Removes identity and client certificate headers a client may have sent, also spelled
/// with `_` for `-`: CGI-style servers (PHP, WSGI, nginx with `underscores_in_headers`) read
/// `X_Consumer_Id` as `X-Consumer-Id`.
pub fn strip_identity(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-") || k.as_str().starts_with("x_"))
        .filter(|k| is_gateway_header(k.as_str()))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(&name);
    }
}

/// Sets the `X-Client-Cert-*` headers for the upstream (`mtls` with `upstream_headers`).
pub fn client_cert_headers(headers: &mut HeaderMap, cert: &ClientCert) {
    let value = |v: &str| HeaderValue::from_str(&ascii_escaped(v)).ok();
    for (name, v) in [
        (&CLIENT_CERT_SUBJECT, cert.subject.as_str()),
        (&CLIENT_CERT_FINGERPRINT, cert.fingerprint.as_str()),
        (&CLIENT_CERT_SERIAL, cert.serial.as_str()),
        (&CLIENT_CERT_NOT_AFTER, cert.not_after.as_str()),
    ] {
        if let Some(v) = value(v) {
            headers.insert(name.clone(), v);
        }
    }
    for san in &cert.sans {
        if let Some(v) = value(&format!("{}:{}", san.kind(), san.value())) {
            headers.append(CLIENT_CERT_SAN.clone(), v);
        }
    }
}

/// What the access phase decided for a request to a managed service.
pub enum Access {
    /// Answer with this response (410 for a retired service).
    Respond(Response<ProxyBody>),
    /// Forward (as the consumer in the identity, if any).
    Forward,
}

/// Runs the checks for `service` on a request with `headers`. When the route's
/// authentication policies already decided who is calling (`identity.authenticated`), that
/// decision stands; otherwise the application's `X-API-Key` identifies it, and `identity`
/// is filled in.
pub fn check(
    managed: &Managed,
    service: &ServiceBinding,
    headers: &HeaderMap,
    request_id: &str,
    identity: &mut Identity,
) -> Result<Access, GatewayError> {
    if service.lifecycle == Lifecycle::Retired {
        return Ok(Access::Respond(retired(service, request_id)));
    }
    if identity.authenticated {
        let consumer = match &identity.consumer {
            Some(c) => c,
            None if service.approval == Approval::Manual => {
                return Err(GatewayError::new(
                    ErrorKind::CredentialMissing,
                    "this API requires a credential of a subscribed application",
                ));
            }
            None => return Ok(Access::Forward),
        };
        subscribed(managed, service, consumer)?;
        return Ok(Access::Forward);
    }
    let Some(key) = headers.get(&API_KEY) else {
        if service.approval == Approval::Manual {
            return Err(GatewayError::new(
                ErrorKind::CredentialMissing,
                format!("this API requires an API key in the `{API_KEY}` header"),
            ));
        }
        return Ok(Access::Forward);
    };
    let Some(consumer) = managed.api_keys.get(&api_key_hash(key.as_bytes())) else {
        return Err(GatewayError::new(
            ErrorKind::CredentialInvalid,
            "the API key is not valid",
        ));
    };
    subscribed(managed, service, consumer)?;
    identity.consumer = Some(consumer.clone());
    identity.credential = Some(format!("key:{}", &api_key_hash(key.as_bytes())[..16]));
    Ok(Access::Forward)
}

/// Refuses an application without an approved subscription to a service with manual
/// approval.
fn subscribed(
    managed: &Managed,
    service: &ServiceBinding,
    consumer: &Consumer,
) -> Result<(), GatewayError> {
    if service.approval == Approval::Manual
        && !managed
            .subscriptions
            .contains_key(&(Arc::clone(&consumer.id), Arc::clone(&service.id)))
    {
        return Err(GatewayError::new(
            ErrorKind::SubscriptionRequired,
            format!(
                "application `{}` has no approved subscription to service `{}/{}`",
                consumer.name, service.team, service.name
            ),
        ));
    }
    Ok(())
}

/// The form API keys are indexed by: lower-case hex SHA-256.
pub fn api_key_hash(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

/// Sets the identity headers for the upstream.
pub fn identify(headers: &mut HeaderMap, identity: &Identity) {
    if let Some(consumer) = &identity.consumer {
        for (name, value) in [
            (&CONSUMER_ID, &consumer.id),
            (&CONSUMER_NAME, &consumer.name),
            (&CONSUMER_TEAM, &consumer.team),
        ] {
            if !value.is_empty()
                && let Ok(v) = HeaderValue::from_str(value)
            {
                headers.insert(name.clone(), v);
            }
        }
    }
    if identity.anonymous {
        headers.insert(ANONYMOUS_CONSUMER.clone(), HeaderValue::from_static("true"));
    }
    if !identity.scopes.is_empty()
        && let Ok(v) = HeaderValue::from_str(&identity.scopes.join(" "))
    {
        headers.insert(AUTHENTICATED_SCOPES.clone(), v);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_knows_every_identity_header() {
        // `request_transform` refuses to write what the model lists; it must list all.
        for name in IDENTITY {
            assert!(
                turnpike_model::transform::gateway_written(name.as_str()),
                "{name}"
            );
        }
        assert!(turnpike_model::transform::gateway_written(
            CLIENT_CERT_SAN.as_str()
        ));
    }
}
