//! Authentication policies: `key_auth`, `basic_auth`, `jwt` and `mtls`
//! (`oauth2_introspection` is in [`super::introspection`], `hmac_auth` in [`super::hmac`]),
//! and the rule that picks among several methods on one route (see the module docs of
//! [`crate::policy`]).
//!
//! API keys are looked up by their SHA-256 digest, never compared in clear: the comparison
//! an attacker can time is between digests of their own guesses and stored digests, which
//! tells them nothing about any key. Basic-auth passwords are checked against Argon2
//! hashes off the async runtime, a few at a time, and the outcome is remembered for the
//! (user, password, stored hash) triple so a client sending the same credentials on every
//! request does not pay Argon2 each time; a changed password changes the stored hash and so
//! misses the memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use turnpike_model::managed::{Consumer, Managed};
use turnpike_model::policy::{
    BasicAuthConfig, JwtConfig, KeyAuthConfig, KeyLocation, MtlsConfig, MtlsField,
};

use super::jwt::{IssuerConfig, KeySource, Verifier, VerifierConfig};
use super::{Compiled, Identity, Policy, Request};
use crate::error::{ErrorKind, GatewayError};

/// Tries `methods` in order; see the module docs for the rules.
pub async fn authenticate(
    methods: &[Arc<Compiled>],
    managed: &Managed,
    req: &Request<'_>,
    parts: &mut Parts,
    identity: &mut Identity,
    out_headers: &mut HeaderMap,
) -> Result<(), GatewayError> {
    if req.client_cert.is_none()
        && methods
            .iter()
            .any(|m| matches!(&m.policy, Policy::Mtls(t) if t.config.required))
    {
        return Err(GatewayError::new(
            ErrorKind::CredentialMissing,
            "this API requires a client certificate",
        ));
    }
    for m in methods {
        let found = match &m.policy {
            Policy::Mtls(t) => t.identify(managed, req, parts),
            Policy::KeyAuth(k) => k.identify(managed, parts),
            Policy::BasicAuth(b) => b.identify(managed, parts).await,
            Policy::Jwt(j) => j.identify(managed, parts).await,
            Policy::Oauth2Introspection(o) => o.identify(managed, parts).await,
            Policy::HmacAuth(h) => h.identify(managed, parts, req.tls),
            _ => Err(GatewayError::new(
                ErrorKind::Internal,
                "not an authentication policy",
            )),
        };
        match found {
            Ok(Some(id)) => {
                *identity = id;
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => {
                challenge(methods, out_headers);
                return Err(e);
            }
        }
    }
    for m in methods {
        let anonymous = match &m.policy {
            Policy::KeyAuth(k) => k.config.anonymous.as_deref(),
            Policy::BasicAuth(b) => b.config.anonymous.as_deref(),
            Policy::Jwt(j) => j.config.anonymous.as_deref(),
            Policy::Oauth2Introspection(o) => o.config.anonymous.as_deref(),
            Policy::HmacAuth(h) => h.config.anonymous.as_deref(),
            Policy::Mtls(t) => t.config.anonymous.as_deref(),
            _ => None,
        };
        if let Some(app) = anonymous.and_then(|a| managed.consumers.get(a)) {
            identity.consumer = Some(app.clone());
            identity.authenticated = true;
            identity.anonymous = true;
            return Ok(());
        }
    }
    challenge(methods, out_headers);
    let what: Vec<&str> = methods
        .iter()
        .filter_map(|m| match &m.policy {
            Policy::KeyAuth(_) => Some("an API key"),
            Policy::BasicAuth(_) => Some("basic credentials"),
            Policy::Jwt(_) => Some("a bearer token"),
            Policy::Oauth2Introspection(_) => Some("an OAuth2 bearer token"),
            Policy::HmacAuth(_) => Some("an HTTP message signature"),
            Policy::Mtls(_) => Some("a client certificate"),
            _ => None,
        })
        .collect();
    Err(GatewayError::new(
        ErrorKind::CredentialMissing,
        format!("this API requires {}", what.join(" or ")),
    ))
}

/// `WWW-Authenticate` for the methods that have a challenge (RFC 9110 §11.6.1), and
/// `Accept-Signature` (RFC 9421 §5.1) for message signatures, which have no auth scheme.
fn challenge(methods: &[Arc<Compiled>], out: &mut HeaderMap) {
    for m in methods {
        let value = match &m.policy {
            Policy::HmacAuth(h) => {
                out.append(super::hmac::ACCEPT_SIGNATURE.clone(), h.accept.clone());
                continue;
            }
            Policy::BasicAuth(b) => b.challenge.clone(),
            Policy::Jwt(_) | Policy::Oauth2Introspection(_) => HeaderValue::from_static("Bearer"),
            _ => continue,
        };
        out.append(header::WWW_AUTHENTICATE, value);
    }
}

/// The identity of an application found by a credential.
fn identified(consumer: Arc<Consumer>, credential: String) -> Identity {
    Identity {
        consumer: Some(consumer),
        credential: Some(credential),
        authenticated: true,
        ..Identity::default()
    }
}

/// `key_auth`.
pub struct KeyAuth {
    config: KeyAuthConfig,
    headers: Vec<Option<HeaderName>>,
}

impl KeyAuth {
    /// Compiles the policy.
    pub fn new(config: KeyAuthConfig) -> Self {
        let headers = config
            .sources
            .iter()
            .map(|s| {
                (s.location == KeyLocation::Header)
                    .then(|| HeaderName::from_bytes(s.name.as_bytes()).ok())
                    .flatten()
            })
            .collect();
        Self { config, headers }
    }

    fn identify(
        &self,
        managed: &Managed,
        parts: &mut Parts,
    ) -> Result<Option<Identity>, GatewayError> {
        for (source, header_name) in self.config.sources.iter().zip(&self.headers) {
            let key: Option<String> = match source.location {
                KeyLocation::Header => header_name
                    .as_ref()
                    .and_then(|h| parts.headers.get(h))
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                KeyLocation::Query => query_param(parts.uri.query(), &source.name),
                KeyLocation::Cookie => cookie(&parts.headers, &source.name),
            };
            let Some(key) = key else { continue };
            if self.config.hide_credentials {
                match source.location {
                    KeyLocation::Header => {
                        if let Some(h) = header_name {
                            parts.headers.remove(h);
                        }
                    }
                    KeyLocation::Query => remove_query_param(&mut parts.uri, &source.name),
                    KeyLocation::Cookie => remove_cookie(&mut parts.headers, &source.name),
                }
            }
            let hash = crate::access::api_key_hash(key.as_bytes());
            return match managed.api_keys.get(&hash) {
                Some(app) => Ok(Some(identified(
                    app.clone(),
                    format!("key:{}", &hash[..16]),
                ))),
                None => Err(GatewayError::new(
                    ErrorKind::CredentialInvalid,
                    "the API key is not valid",
                )),
            };
        }
        Ok(None)
    }
}

/// `basic_auth`.
pub struct BasicAuth {
    config: BasicAuthConfig,
    challenge: HeaderValue,
    verified: Mutex<HashMap<[u8; 32], bool>>,
}

/// Argon2 checks running at once, process-wide. A permit travels with the blocking task, so a
/// client that hangs up does not free a slot while its hash still runs.
static HASHING: std::sync::LazyLock<Arc<Semaphore>> = std::sync::LazyLock::new(|| {
    Arc::new(Semaphore::new(
        std::thread::available_parallelism().map_or(2, usize::from),
    ))
});

/// Checked for unknown users, so a reply's timing does not tell which user names exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$dHVybnBpa2UtZHVtbXk$jT6ZfS1fKc6uT2Yx6sQ2YQ0rjXh7wO3Z3o8m0n3ZbJg";

/// Most remembered password checks per policy; the memory is cleared when full.
const VERIFIED_MEMORY: usize = 10_000;

impl BasicAuth {
    /// Compiles the policy.
    pub fn new(config: BasicAuthConfig) -> Self {
        let realm = config.realm.replace(['"', '\\'], "");
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .unwrap_or(HeaderValue::from_static("Basic"));
        Self {
            config,
            challenge,
            verified: Mutex::new(HashMap::new()),
        }
    }

    async fn identify(
        &self,
        managed: &Managed,
        parts: &mut Parts,
    ) -> Result<Option<Identity>, GatewayError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let Some(encoded) = strip_scheme(value.as_bytes(), b"basic") else {
            return Ok(None);
        };
        let invalid = || {
            GatewayError::new(
                ErrorKind::CredentialInvalid,
                "the credentials are not valid",
            )
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim_ascii())
            .map_err(|_| invalid())?;
        let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
        let (user, password) = decoded.split_once(':').ok_or_else(invalid)?;
        if self.config.hide_credentials {
            parts.headers.remove(header::AUTHORIZATION);
        }
        let entry = managed.basic_users.get(user);
        let stored = entry.map_or(DUMMY_HASH, |e| e.password_hash.as_str());
        let memo: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(stored.as_bytes())
            .finalize()
            .into();
        let known = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(&memo).copied());
        let ok = match known {
            Some(ok) => ok,
            None => {
                let permit = HASHING
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| GatewayError::new(ErrorKind::Internal, "hashing closed"))?;
                let hash = stored.to_owned();
                let password = password.to_owned();
                let ok = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    verify_password(&password, &hash)
                })
                .await
                .unwrap_or(false);
                if let Ok(mut m) = self.verified.lock() {
                    if m.len() >= VERIFIED_MEMORY {
                        m.clear();
                    }
                    m.insert(memo, ok);
                }
                ok
            }
        };
        let Some(entry) = entry.filter(|_| ok) else {
            return Err(invalid());
        };
        Ok(Some(identified(
            entry.consumer.clone(),
            format!("basic:{user}"),
        )))
    }
}

fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// `jwt`.
pub struct JwtAuth {
    config: JwtConfig,
    /// `None` when no issuer is trusted yet (only store credentials, none registered): every
    /// token is then refused.
    verifier: Option<Verifier>,
    header: HeaderName,
    /// Issuer → application, for issuers that name one.
    applications: HashMap<String, String>,
    /// Issuers that come from store credentials: their tokens identify the credential's
    /// application and nothing else.
    credential_issuers: std::collections::HashSet<String>,
}

/// Where OpenID Connect Discovery §4 puts an issuer's configuration: the issuer URL without
/// a trailing `/`, then `/.well-known/openid-configuration`.
fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

impl JwtAuth {
    /// Compiles the policy: the configured issuers plus the store's `jwt` credentials.
    pub fn new(config: JwtConfig, managed: &Managed) -> Result<Self, (String, String)> {
        let mut issuers = Vec::new();
        let mut applications = HashMap::new();
        for (i, iss) in config.issuers.iter().enumerate() {
            let keys = if let Some(var) = &iss.secret_env {
                let secret = std::env::var(var).map_err(|_| {
                    (
                        format!("issuers[{i}].secret_env"),
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                KeySource::Secret(secret.into_bytes())
            } else if let Some(s) = &iss.secret {
                KeySource::Secret(s.clone().into_bytes())
            } else if let Some(pem) = &iss.public_key {
                KeySource::Pem(pem.clone())
            } else if let Some(jwks) = &iss.jwks {
                KeySource::Jwks(jwks.to_string())
            } else if let Some(url) = &iss.jwks_url {
                KeySource::JwksUrl {
                    url: url.clone(),
                    cache_ttl: config.jwks_cache_ttl,
                    min_refresh_interval: config.jwks_min_refresh,
                }
            } else if iss.discovery || iss.discovery_url.is_some() {
                KeySource::Discovery {
                    url: iss
                        .discovery_url
                        .clone()
                        .unwrap_or_else(|| discovery_url(&iss.issuer)),
                    cache_ttl: config.jwks_cache_ttl,
                    min_refresh_interval: config.jwks_min_refresh,
                }
            } else {
                return Err((format!("issuers[{i}]"), "no keys given".into()));
            };
            issuers.push(IssuerConfig {
                issuer: iss.issuer.clone(),
                keys,
                audiences: if iss.audiences.is_empty() {
                    config.audiences.clone()
                } else {
                    iss.audiences.clone()
                },
            });
            if let Some(app) = &iss.application {
                if !managed.consumers.contains_key(app) {
                    return Err((
                        format!("issuers[{i}].application"),
                        format!("unknown application `{app}`"),
                    ));
                }
                applications.insert(iss.issuer.clone(), app.clone());
            }
        }
        let mut credential_issuers = std::collections::HashSet::new();
        let trusted = if config.trust_credentials {
            managed.jwt_issuers.as_slice()
        } else {
            &[]
        };
        for binding in trusted {
            // An issuer the policy names is the policy's: a credential cannot claim it.
            if issuers.iter().any(|i| i.issuer == binding.issuer) {
                continue;
            }
            let keys = match (&binding.public_key, &binding.jwks_url, &binding.secret) {
                (Some(pem), _, _) => KeySource::Pem(pem.clone()),
                (None, Some(url), _) => KeySource::JwksUrl {
                    url: url.clone(),
                    cache_ttl: config.jwks_cache_ttl,
                    min_refresh_interval: config.jwks_min_refresh,
                },
                (None, None, _) if binding.discovery => KeySource::Discovery {
                    url: discovery_url(&binding.issuer),
                    cache_ttl: config.jwks_cache_ttl,
                    min_refresh_interval: config.jwks_min_refresh,
                },
                (None, None, Some(secret)) => KeySource::Secret(secret.clone().into_bytes()),
                (None, None, None) => continue,
            };
            let issuer = IssuerConfig {
                issuer: binding.issuer.clone(),
                keys,
                audiences: config.audiences.clone(),
            };
            // One team's unusable credential must not disable the policy for everyone.
            if let Err(e) = Verifier::new(VerifierConfig {
                issuers: vec![issuer.clone()],
                ..VerifierConfig::default()
            }) {
                tracing::warn!(issuer = %binding.issuer, error = %e, "jwt credential left out");
                continue;
            }
            issuers.push(issuer);
            applications.insert(binding.issuer.clone(), binding.consumer.id.to_string());
            credential_issuers.insert(binding.issuer.clone());
        }
        let verifier = (!issuers.is_empty())
            .then(|| {
                Verifier::new(VerifierConfig {
                    issuers,
                    leeway: config.leeway,
                    require_exp: config.require_exp,
                    required_claims: config.required_claims.clone(),
                    ..VerifierConfig::default()
                })
            })
            .transpose()
            .map_err(|e| ("issuers".to_owned(), e))?;
        let header = HeaderName::from_bytes(config.header.as_bytes())
            .map_err(|_| ("header".to_owned(), "not a valid header name".to_owned()))?;
        Ok(Self {
            config,
            verifier,
            header,
            applications,
            credential_issuers,
        })
    }

    async fn identify(
        &self,
        managed: &Managed,
        parts: &mut Parts,
    ) -> Result<Option<Identity>, GatewayError> {
        let from_header = parts
            .headers
            .get(&self.header)
            .and_then(|v| strip_scheme(v.as_bytes(), b"bearer"))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).into_owned());
        let token = match from_header {
            Some(t) => Some(t),
            None => self
                .config
                .cookie
                .as_deref()
                .and_then(|c| cookie(&parts.headers, c)),
        };
        let Some(token) = token else {
            return Ok(None);
        };
        let Some(verifier) = &self.verifier else {
            return Err(GatewayError::new(
                ErrorKind::CredentialInvalid,
                "the bearer token is not valid: no issuer is trusted",
            ));
        };
        let verified = verifier.verify(&token).await.map_err(|e| match e {
            // The token may well be good: the issuer's keys cannot be had right now.
            super::jwt::JwtError::KeysUnavailable => GatewayError::new(
                ErrorKind::AuthUnavailable,
                "the token issuer's keys cannot be fetched now; retry later",
            ),
            e => GatewayError::new(
                ErrorKind::CredentialInvalid,
                format!("the bearer token is not valid: {e}"),
            ),
        })?;
        if self.config.hide_credentials {
            parts.headers.remove(&self.header);
            if let Some(c) = &self.config.cookie {
                remove_cookie(&mut parts.headers, c);
            }
        }
        let from_credential = self.credential_issuers.contains(&verified.issuer);
        let app_ref = match &self.config.consumer_claim {
            Some(claim) if !from_credential => match verified.claims.get(claim) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            _ => self.applications.get(&verified.issuer).cloned(),
        };
        let consumer = match app_ref {
            Some(r) => Some(managed.consumers.get(&r).cloned().ok_or_else(|| {
                GatewayError::new(
                    ErrorKind::CredentialInvalid,
                    "the bearer token names no known application",
                )
            })?),
            None => None,
        };
        let credential = format!(
            "jwt:{}:{}",
            verified.issuer,
            verified.subject.as_deref().unwrap_or("-")
        );
        Ok(Some(Identity {
            consumer,
            credential: Some(credential),
            scopes: verified.scopes,
            claims: Some(verified.claims),
            authenticated: true,
            ..Identity::default()
        }))
    }
}

/// `mtls`: the client certificate the listener verified names the application.
pub struct MtlsAuth {
    config: MtlsConfig,
}

impl MtlsAuth {
    /// Compiles the policy.
    pub fn new(config: MtlsConfig) -> Self {
        Self { config }
    }

    fn identify(
        &self,
        managed: &Managed,
        req: &Request<'_>,
        parts: &mut Parts,
    ) -> Result<Option<Identity>, GatewayError> {
        let Some(cert) = req.client_cert else {
            return Ok(None);
        };
        let consumer = self.config.match_fields.iter().find_map(|f| match f {
            MtlsField::Subject => managed.mtls_subjects.get(&cert.subject),
            MtlsField::San => cert
                .san_keys()
                .iter()
                .find_map(|k| managed.mtls_sans.get(k)),
        });
        if consumer.is_none() && self.config.require_application {
            return Err(GatewayError::new(
                ErrorKind::CredentialInvalid,
                "the client certificate identifies no application",
            ));
        }
        if self.config.upstream_headers {
            crate::access::client_cert_headers(&mut parts.headers, cert);
        }
        Ok(Some(Identity {
            consumer: consumer.cloned(),
            credential: Some(format!(
                "mtls:{}",
                cert.fingerprint.get(..16).unwrap_or(&cert.fingerprint)
            )),
            authenticated: true,
            ..Identity::default()
        }))
    }
}

/// The rest of an `Authorization` value after `scheme` (case-insensitive) and a space.
pub(super) fn strip_scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let n = scheme.len();
    (value.len() > n && value[..n].eq_ignore_ascii_case(scheme) && value[n] == b' ')
        .then(|| &value[n + 1..])
}

/// The first value of query parameter `name`, percent-decoded.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Removes every `name` parameter from the URI's query, keeping the others as they were.
pub(super) fn remove_query_param(uri: &mut Uri, name: &str) {
    let Some(query) = uri.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            form_urlencoded::parse(key.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect();
    let path = uri.path();
    let pq = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut p = std::mem::take(uri).into_parts();
    if let Ok(pq) = pq.parse() {
        p.path_and_query = Some(pq);
    }
    if let Ok(u) = Uri::from_parts(p) {
        *uri = u;
    }
}

/// The value of cookie `name` from the `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

/// Removes cookie `name`, keeping the others.
fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').map_or(*c, |(k, _)| k) != name)
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_removed_and_others_kept() {
        let mut uri: Uri = "/p?a=1&api_key=s%20ecret&b=2&api_key=x".parse().unwrap();
        assert_eq!(
            query_param(uri.query(), "api_key").as_deref(),
            Some("s ecret")
        );
        remove_query_param(&mut uri, "api_key");
        assert_eq!(uri.to_string(), "/p?a=1&b=2");
        let mut uri: Uri = "/p?api_key=1".parse().unwrap();
        remove_query_param(&mut uri, "api_key");
        assert_eq!(uri.to_string(), "/p");
    }

    #[test]
    fn cookies_are_found_and_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; key=abc; b=2"),
        );
        assert_eq!(cookie(&h, "key").as_deref(), Some("abc"));
        remove_cookie(&mut h, "key");
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        remove_cookie(&mut h, "a");
        remove_cookie(&mut h, "b");
        assert!(h.get(header::COOKIE).is_none());
    }

    #[test]
    fn schemes_are_case_insensitive() {
        assert_eq!(strip_scheme(b"Bearer abc", b"bearer"), Some(&b"abc"[..]));
        assert_eq!(strip_scheme(b"BASIC abc", b"basic"), Some(&b"abc"[..]));
        assert_eq!(strip_scheme(b"Bearerabc", b"bearer"), None);
        assert_eq!(strip_scheme(b"Basic", b"basic"), None);
    }
}
