//! `hmac_auth`: HTTP Message Signatures (RFC 9421) made with `hmac-sha256`.
//!
//! The client lists what it signed in `Signature-Input` and sends the MAC in `Signature`,
//! both under a label. The gateway rebuilds the signature base from the request *as the
//! client sent it* (this runs in the access phase, before any path rewrite), looks the
//! `keyid` up among `hmac` credentials and file consumers' `hmac` keys, and compares MACs in
//! constant time (`ring::hmac::verify`).
//!
//! A signature proves the body only through `Content-Digest` (RFC 9530): when it covers that
//! field, the digest is checked against the body once the body has been read, in the
//! inspection stage ([`BodyCheck`], run by [`super::inspect::run`]), still before the
//! upstream is called. When the policy requires a digest and the signature covers none, the
//! body must be empty.
//!
//! Nonces are remembered only after a signature verifies, so only holders of a key can fill
//! the bounded nonce memory; each is forgotten when a signature carrying it could no longer
//! be accepted anyway (`created` + `max_age` + `clock_skew`, or `expires` + `clock_skew`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use turnpike_model::managed::Managed;
use turnpike_model::policy::HmacAuthConfig;

use super::Identity;
use super::sf::{self, Bare, Item, Member, Params};
use crate::error::{ErrorKind, GatewayError};

/// `Signature-Input`.
pub static SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
/// `Signature`.
pub static SIGNATURE: HeaderName = HeaderName::from_static("signature");
/// `Accept-Signature` (RFC 9421 §5.1), sent with 401 answers.
pub static ACCEPT_SIGNATURE: HeaderName = HeaderName::from_static("accept-signature");
/// `Content-Digest` (RFC 9530).
static CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");

/// The only algorithm accepted.
const ALG: &str = "hmac-sha256";

/// Longest nonce accepted: nonces are kept in memory until their signature expires.
const MAX_NONCE_BYTES: usize = 128;

/// `hmac_auth`.
pub struct HmacAuth {
    pub(super) config: HmacAuthConfig,
    /// `Accept-Signature` for 401 answers: what a signature must cover.
    pub(super) accept: HeaderValue,
    nonces: Mutex<HashMap<(String, String), i64>>,
    /// When a full nonce memory was last swept (Unix seconds).
    swept_at: AtomicI64,
}

/// What the body must satisfy, decided by a verified signature and checked once the body is
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyCheck {
    /// The body must match every `sha-256`/`sha-512` digest of the signed `Content-Digest`.
    Digest {
        /// Expected SHA-256, if sent.
        sha256: Option<Vec<u8>>,
        /// Expected SHA-512, if sent.
        sha512: Option<Vec<u8>>,
        /// Largest body read to check it (413 past it).
        max_body_bytes: u64,
    },
    /// The signature covers no digest, so the body must be empty.
    Empty,
}

impl BodyCheck {
    /// How much of the body must be read.
    pub fn bound(&self) -> u64 {
        match self {
            Self::Digest { max_body_bytes, .. } => *max_body_bytes,
            Self::Empty => 0,
        }
    }

    /// The error when the body is longer than [`BodyCheck::bound`].
    pub fn over_bound(&self) -> GatewayError {
        match self {
            Self::Digest { max_body_bytes, .. } => GatewayError::new(
                ErrorKind::BodyTooLarge,
                format!(
                    "request body exceeds the {max_body_bytes} bytes the signature check reads"
                ),
            ),
            Self::Empty => {
                invalid("the signature does not cover content-digest, yet the request has a body")
            }
        }
    }

    /// Checks the whole body.
    pub fn verify(&self, body: &[u8]) -> Result<(), GatewayError> {
        if body.len() as u64 > self.bound() {
            return Err(self.over_bound());
        }
        let Self::Digest { sha256, sha512, .. } = self else {
            return Ok(());
        };
        let pairs = [
            (sha256, &ring::digest::SHA256),
            (sha512, &ring::digest::SHA512),
        ];
        for (expected, alg) in pairs {
            if let Some(expected) = expected
                && ring::digest::digest(alg, body).as_ref() != expected.as_slice()
            {
                return Err(invalid(
                    "the request body does not match its Content-Digest",
                ));
            }
        }
        Ok(())
    }
}

fn invalid(why: impl std::fmt::Display) -> GatewayError {
    GatewayError::new(
        ErrorKind::CredentialInvalid,
        format!("the HTTP message signature is not valid: {why}"),
    )
}

impl HmacAuth {
    /// Compiles the policy.
    pub fn new(config: HmacAuthConfig) -> Self {
        let items: Vec<Item> = config
            .required_components
            .iter()
            .map(|c| Item {
                bare: Bare::String(c.clone()),
                params: Vec::new(),
            })
            .collect();
        let mut params: Params = vec![("alg".into(), Bare::String(ALG.into()))];
        if config.require_created {
            params.push(("created".into(), Bare::Boolean(true)));
        }
        if config.require_nonce {
            params.push(("nonce".into(), Bare::Boolean(true)));
        }
        let mut accept = config.label.clone().unwrap_or_else(|| "sig1".into());
        accept.push('=');
        sf::write_inner_list(&mut accept, &items, &params);
        let accept = HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("sig1=()"));
        Self {
            config,
            accept,
            nonces: Mutex::new(HashMap::new()),
            swept_at: AtomicI64::new(0),
        }
    }

    /// Verifies the request's signature; `Ok(None)` when it carries none.
    pub(super) fn identify(
        &self,
        managed: &Managed,
        parts: &mut Parts,
        tls: bool,
    ) -> Result<Option<Identity>, GatewayError> {
        let input = joined(&parts.headers, &SIGNATURE_INPUT);
        let signature = joined(&parts.headers, &SIGNATURE);
        let (input, signature) = match (input, signature) {
            (None, None) => return Ok(None),
            (Some(i), Some(s)) => (i, s),
            (Some(_), None) => return Err(invalid("`Signature-Input` without `Signature`")),
            (None, Some(_)) => return Err(invalid("`Signature` without `Signature-Input`")),
        };
        let inputs = sf::parse_dictionary(&input)
            .map_err(|e| invalid(format!("`Signature-Input` does not parse: {}", e.0)))?;
        let signatures = sf::parse_dictionary(&signature)
            .map_err(|e| invalid(format!("`Signature` does not parse: {}", e.0)))?;
        let (label, member) = match &self.config.label {
            Some(l) => inputs
                .iter()
                .find(|(k, _)| k == l)
                .ok_or_else(|| invalid(format!("no signature labelled `{l}`")))?,
            None => inputs
                .first()
                .ok_or_else(|| invalid("`Signature-Input` is empty"))?,
        };
        let Member::InnerList(components, params) = member else {
            return Err(invalid(format!(
                "`Signature-Input` member `{label}` is not a list of components"
            )));
        };
        let mac = match signatures.iter().find(|(k, _)| k == label) {
            Some((
                _,
                Member::Item(Item {
                    bare: Bare::Bytes(b),
                    ..
                }),
            )) => b,
            Some(_) => {
                return Err(invalid(format!(
                    "`Signature` member `{label}` is not a byte sequence"
                )));
            }
            None => return Err(invalid(format!("`Signature` has no member `{label}`"))),
        };
        let p = SignatureParams::read(params)?;
        if let Some(alg) = &p.alg
            && alg != ALG
        {
            return Err(invalid(format!(
                "algorithm `{alg}` is not supported (only {ALG})"
            )));
        }
        let forget_at = self.check_times(&p, unix_now())?;
        if self.config.require_nonce && p.nonce.is_none() {
            return Err(invalid("the signature has no nonce"));
        }
        if p.nonce.as_ref().is_some_and(|n| n.len() > MAX_NONCE_BYTES) {
            return Err(invalid(format!(
                "the nonce is longer than {MAX_NONCE_BYTES} bytes"
            )));
        }

        let covered: HashSet<&str> = components
            .iter()
            .filter(|c| c.params.is_empty())
            .filter_map(|c| match &c.bare {
                Bare::String(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        if let Some(missing) = self.missing_component(&covered) {
            return Err(invalid(format!("the signature does not cover `{missing}`")));
        }
        let digest_covered = covered.contains("content-digest");
        let body_check = if digest_covered {
            Some(self.expected_digest(&parts.headers)?)
        } else if self.config.require_content_digest {
            if has_body(&parts.headers) {
                return Err(invalid(
                    "the request has a body and the signature does not cover `content-digest`",
                ));
            }
            // Headers may say nothing of a body (HTTP/2 without content-length): make sure.
            Some(BodyCheck::Empty)
        } else {
            None
        };

        let key = managed
            .hmac_keys
            .get(&p.key_id)
            .ok_or_else(|| invalid(format!("unknown key id `{}`", p.key_id)))?;
        let base = signature_base(parts, tls, components, params).map_err(invalid)?;
        let key_ring = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.secret);
        ring::hmac::verify(&key_ring, base.as_bytes(), mac)
            .map_err(|_| invalid("the signature does not match the request"))?;

        if let Some(nonce) = &p.nonce {
            self.remember_nonce(&p.key_id, nonce, forget_at)?;
        }
        if self.config.hide_credentials {
            parts.headers.remove(&SIGNATURE);
            parts.headers.remove(&SIGNATURE_INPUT);
        }
        Ok(Some(Identity {
            consumer: Some(key.consumer.clone()),
            credential: Some(format!("hmac:{}", p.key_id)),
            authenticated: true,
            body_check,
            ..Identity::default()
        }))
    }

    /// Checks `created` and `expires` against `now`; returns when a nonce of this signature
    /// can be forgotten.
    fn check_times(&self, p: &SignatureParams, now: i64) -> Result<i64, GatewayError> {
        let skew = secs(self.config.clock_skew);
        let max_age = secs(self.config.max_age);
        let mut forget_at = now.saturating_add(max_age).saturating_add(skew);
        match p.created {
            Some(created) => {
                if created > now.saturating_add(skew) {
                    return Err(invalid("`created` is in the future"));
                }
                if now.saturating_sub(created) > max_age.saturating_add(skew) {
                    return Err(invalid(format!(
                        "`created` is older than {max_age} seconds"
                    )));
                }
                forget_at = created.saturating_add(max_age).saturating_add(skew);
            }
            None if self.config.require_created => {
                return Err(invalid("the signature has no `created` time"));
            }
            // Without `created`, only `expires` bounds how long the signature (and its nonce)
            // can be used: it must be there, and no later than a fresh signature's life.
            None => match p.expires {
                None => {
                    return Err(invalid(
                        "the signature has neither a `created` nor an `expires` time",
                    ));
                }
                Some(expires) if expires > now.saturating_add(max_age).saturating_add(skew) => {
                    return Err(invalid(format!(
                        "`expires` is more than {max_age} seconds away"
                    )));
                }
                Some(_) => {}
            },
        }
        if let Some(expires) = p.expires {
            if now > expires.saturating_add(skew) {
                return Err(invalid("the signature has expired"));
            }
            forget_at = forget_at.min(expires.saturating_add(skew));
        }
        Ok(forget_at)
    }

    /// The first required component the signature leaves out.
    fn missing_component<'a>(&'a self, covered: &HashSet<&str>) -> Option<&'a str> {
        let target_parts = covered.contains("@authority")
            && (covered.contains("@request-target")
                || (covered.contains("@path") && covered.contains("@query")));
        self.config
            .required_components
            .iter()
            .map(String::as_str)
            .find(|r| !(covered.contains(r) || (*r == "@target-uri" && target_parts)))
    }

    fn expected_digest(&self, headers: &HeaderMap) -> Result<BodyCheck, GatewayError> {
        let value = joined(headers, &CONTENT_DIGEST)
            .ok_or_else(|| invalid("the signed `content-digest` field is missing"))?;
        let dict = sf::parse_dictionary(&value)
            .map_err(|e| invalid(format!("`Content-Digest` does not parse: {}", e.0)))?;
        let mut sha256 = None;
        let mut sha512 = None;
        for (alg, member) in dict {
            let Member::Item(Item {
                bare: Bare::Bytes(b),
                ..
            }) = member
            else {
                continue;
            };
            match alg.as_str() {
                "sha-256" => sha256 = Some(b),
                "sha-512" => sha512 = Some(b),
                _ => {}
            }
        }
        if sha256.is_none() && sha512.is_none() {
            return Err(invalid("`Content-Digest` has no sha-256 or sha-512 digest"));
        }
        Ok(BodyCheck::Digest {
            sha256,
            sha512,
            max_body_bytes: self.config.max_body_bytes,
        })
    }

    fn remember_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        forget_at: i64,
    ) -> Result<(), GatewayError> {
        let now = unix_now();
        let mut seen = self
            .nonces
            .lock()
            .map_err(|_| GatewayError::new(ErrorKind::Internal, "nonce memory poisoned"))?;
        let k = (key_id.to_owned(), nonce.to_owned());
        if seen.get(&k).is_some_and(|t| *t >= now) {
            return Err(invalid("the nonce was already used"));
        }
        // Sweeping a full memory walks all of it: at most once a second, so a key holder
        // filling it cannot make every request pay for a walk.
        if seen.len() >= self.config.nonce_cache_size
            && self.swept_at.swap(now, Ordering::Relaxed) != now
        {
            seen.retain(|_, t| *t >= now);
        }
        if seen.len() >= self.config.nonce_cache_size {
            return Err(GatewayError::new(
                ErrorKind::AuthUnavailable,
                "too many recent signature nonces to remember; retry later",
            ));
        }
        seen.insert(k, forget_at);
        Ok(())
    }
}

/// The signature parameters the gateway reads.
struct SignatureParams {
    key_id: String,
    alg: Option<String>,
    created: Option<i64>,
    expires: Option<i64>,
    nonce: Option<String>,
}

impl SignatureParams {
    fn read(params: &Params) -> Result<Self, GatewayError> {
        let mut p = SignatureParams {
            key_id: String::new(),
            alg: None,
            created: None,
            expires: None,
            nonce: None,
        };
        let mut key_id = None;
        for (k, v) in params {
            match (k.as_str(), v) {
                ("keyid", Bare::String(s)) => key_id = Some(s.clone()),
                ("alg", Bare::String(s)) => p.alg = Some(s.clone()),
                ("nonce", Bare::String(s)) => p.nonce = Some(s.clone()),
                ("created", Bare::Integer(n)) => p.created = Some(*n),
                ("expires", Bare::Integer(n)) => p.expires = Some(*n),
                ("keyid" | "alg" | "nonce", _) => {
                    return Err(invalid(format!("`{k}` must be a string")));
                }
                ("created" | "expires", _) => {
                    return Err(invalid(format!("`{k}` must be an integer")));
                }
                // `tag` and extensions are signed like the rest; nothing to check here.
                _ => {}
            }
        }
        p.key_id = key_id.ok_or_else(|| invalid("the signature has no `keyid`"))?;
        Ok(p)
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, secs)
}

/// Every line of field `name`, joined with `, ` (RFC 9110 §5.3).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = String::from_utf8_lossy(v.as_bytes());
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(s.trim());
            }
            None => out = Some(s.trim().to_owned()),
        }
    }
    out
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// The signature base (RFC 9421 §2.5) of `components` with `params`, for the request in
/// `parts` received over TLS or not. Errors name the component that cannot be had.
pub fn signature_base(
    parts: &Parts,
    tls: bool,
    components: &[Item],
    params: &Params,
) -> Result<String, String> {
    let mut base = String::new();
    let mut seen = HashSet::new();
    for c in components {
        let mut id = String::new();
        sf::write_item(&mut id, c);
        if !seen.insert(id.clone()) {
            return Err(format!("component {id} is listed twice"));
        }
        let value = component_value(parts, tls, c)?;
        base.push_str(&id);
        base.push_str(": ");
        base.push_str(&value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    sf::write_inner_list(&mut base, components, params);
    Ok(base)
}

fn component_value(parts: &Parts, tls: bool, c: &Item) -> Result<String, String> {
    let Bare::String(name) = &c.bare else {
        return Err("component identifiers must be strings".into());
    };
    if name == "@query-param" {
        return match c.params.as_slice() {
            [(k, Bare::String(n))] if k == "name" => query_param(parts, n),
            _ => Err("`@query-param` takes exactly one parameter, `name`".into()),
        };
    }
    if let Some((k, _)) = c.params.first() {
        return Err(format!(
            "component parameter `{k}` (on `{name}`) is not supported"
        ));
    }
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match parts.uri.path() {
        "" => "/",
        p => p,
    };
    Ok(match name.as_str() {
        "@method" => parts.method.as_str().to_owned(),
        "@scheme" => scheme(tls),
        "@authority" => authority(parts, tls)?,
        "@target-uri" => {
            let authority = authority(parts, tls)?;
            let pq = if pq.starts_with('/') {
                pq.to_owned()
            } else {
                format!("/{pq}")
            };
            format!("{}://{authority}{pq}", scheme(tls))
        }
        "@request-target" => pq.to_owned(),
        "@path" => path.to_owned(),
        "@query" => format!("?{}", parts.uri.query().unwrap_or("")),
        n if n.starts_with('@') => return Err(format!("component `{n}` is not supported")),
        n => {
            if n.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("component `{n}` must be lower case"));
            }
            let mut lines = parts.headers.get_all(n).iter().peekable();
            if lines.peek().is_none() {
                return Err(format!("the signed field `{n}` is missing"));
            }
            let mut value = Vec::new();
            for (i, line) in lines.enumerate() {
                if i > 0 {
                    value.extend_from_slice(b", ");
                }
                value.extend_from_slice(line.as_bytes().trim_ascii());
            }
            String::from_utf8(value).map_err(|_| format!("the field `{n}` is not text"))?
        }
    })
}

/// The scheme of the connection the request came on. A client's absolute-form `https://`
/// (or HTTP/2 `:scheme`) on a plain connection says nothing about how it travelled.
fn scheme(tls: bool) -> String {
    if tls { "https" } else { "http" }.into()
}

/// The target's authority, lower-cased, without the scheme's default port (RFC 9110 §4.2.3).
fn authority(parts: &Parts, tls: bool) -> Result<String, &'static str> {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::trim);
    let raw = match (parts.uri.authority(), host) {
        // The upstream gets `Host`: a signature over another authority must not vouch for
        // it (RFC 9113 §8.3.1 wants them equal anyway).
        (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h) => {
            return Err("`Host` does not match the request target's authority");
        }
        (Some(a), _) => a.as_str().to_owned(),
        (None, Some(h)) => h.to_owned(),
        (None, None) => return Err("the request has no authority"),
    };
    let raw = raw.to_ascii_lowercase();
    let default = if scheme(tls) == "https" {
        ":443"
    } else {
        ":80"
    };
    Ok(match raw.strip_suffix(default) {
        Some(host) => host.to_owned(),
        None => raw,
    })
}

/// `@query-param;name=` (RFC 9421 §2.2.8): `name` is the encoded name; the value is the
/// decoded value re-encoded. A parameter that occurs more than once cannot be signed alone.
fn query_param(parts: &Parts, name: &str) -> Result<String, String> {
    let query = parts.uri.query().unwrap_or("");
    let mut found = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| encode_query(k) == name)
        .map(|(_, v)| encode_query(&v));
    match (found.next(), found.next()) {
        (Some(v), None) => Ok(v),
        (None, _) => Err(format!("query parameter `{name}` is missing")),
        (Some(_), Some(_)) => Err(format!(
            "query parameter `{name}` occurs more than once; sign `@query` instead"
        )),
    }
}

/// Percent-encodes all but ASCII letters, digits and `*-._` (the
/// `application/x-www-form-urlencoded` set, with a space as `%20` as RFC 9421 wants).
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use base64::Engine;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn input(field: &str) -> (Vec<Item>, Params) {
        let d = sf::parse_dictionary(field).unwrap();
        let Member::InnerList(items, params) = d[0].1.clone() else {
            panic!("not an inner list");
        };
        (items, params)
    }

    /// RFC 9421 appendix B.2.5: hmac-sha256 with the shared secret `test-shared-secret`
    /// (appendix B.1.5) over the test request of appendix B.2.
    #[test]
    fn rfc9421_b25_test_vector_verifies() {
        let parts = request(
            "POST",
            "/foo?param=Value&Pet=dog",
            &[
                ("host", "example.com"),
                ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
                ("content-type", "application/json"),
                (
                    "content-digest",
                    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
                ),
                ("content-length", "18"),
            ],
        );
        let (items, params) = input(
            r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#,
        );
        let base = signature_base(&parts, true, &items, &params).unwrap();
        assert_eq!(
            base,
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\
             \"content-type\": application/json\n\"@signature-params\": (\"date\" \
             \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
        );
        let secret = base64::engine::general_purpose::STANDARD
            .decode("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")
            .unwrap();
        let sig =
            sf::parse_dictionary("sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:").unwrap();
        let Member::Item(Item {
            bare: Bare::Bytes(mac),
            ..
        }) = &sig[0].1
        else {
            panic!("not bytes");
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        ring::hmac::verify(&key, base.as_bytes(), mac).unwrap();
        assert!(
            ring::hmac::verify(&key, base.replace("example", "exampl3").as_bytes(), mac).is_err()
        );
        // The body's digest from the same appendix.
        let check = BodyCheck::Digest {
            sha256: None,
            sha512: Some(
                base64::engine::general_purpose::STANDARD
                    .decode("WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==")
                    .unwrap(),
            ),
            max_body_bytes: 100,
        };
        check.verify(b"{\"hello\": \"world\"}").unwrap();
        assert!(check.verify(b"{\"hello\": \"world!\"}").is_err());
        assert!(check.verify(&[b' '; 101]).is_err());
    }

    /// Derived components of RFC 9421 §2.2, with the values its examples give.
    #[test]
    fn derived_components_follow_the_rfc() {
        let parts = request(
            "GET",
            "/path?param=value&foo=bar&baz=batman&qux=",
            &[
                ("host", "www.example.com:443"),
                ("x-multi", " a "),
                ("x-multi", "b"),
            ],
        );
        let (items, params) = input(
            r#"s=("@method" "@target-uri" "@authority" "@scheme" "@request-target" "@path" "@query" "@query-param";name="baz" "@query-param";name="qux" "x-multi")"#,
        );
        let base = signature_base(&parts, true, &items, &params).unwrap();
        let lines: Vec<&str> = base.lines().collect();
        assert_eq!(
            lines[..10],
            [
                "\"@method\": GET",
                "\"@target-uri\": https://www.example.com/path?param=value&foo=bar&baz=batman&qux=",
                "\"@authority\": www.example.com",
                "\"@scheme\": https",
                "\"@request-target\": /path?param=value&foo=bar&baz=batman&qux=",
                "\"@path\": /path",
                "\"@query\": ?param=value&foo=bar&baz=batman&qux=",
                "\"@query-param\";name=\"baz\": batman",
                "\"@query-param\";name=\"qux\": ",
                "\"x-multi\": a, b",
            ]
        );
        let parts = request(
            "GET",
            "/p?var=this%20is%20a%20big%0Avalue&bar=with+plus+whitespace&fa%C3%A7ade%22%3A%20=something&d=1&d=2",
            &[("host", "example.com")],
        );
        let (items, params) = input(
            r#"s=("@query-param";name="var" "@query-param";name="bar" "@query-param";name="fa%C3%A7ade%22%3A%20")"#,
        );
        let base = signature_base(&parts, false, &items, &params).unwrap();
        assert!(base.starts_with(
            "\"@query-param\";name=\"var\": this%20is%20a%20big%0Avalue\n\
             \"@query-param\";name=\"bar\": with%20plus%20whitespace\n\
             \"@query-param\";name=\"fa%C3%A7ade%22%3A%20\": something\n"
        ));
        let parts2 = request("GET", "/", &[("host", "example.com")]);
        assert_eq!(
            component_value(&parts2, false, &input(r#"s=("@query")"#).0[0]).unwrap(),
            "?"
        );
        for bad in [
            r#"s=("@query-param";name="d")"#,
            r#"s=("@query-param";name="nope")"#,
            r#"s=("@status")"#,
            r#"s=("content-type";sf)"#,
            r#"s=("x-missing")"#,
            r#"s=("@method" "@method")"#,
        ] {
            let (items, params) = input(bad);
            assert!(
                signature_base(&parts, false, &items, &params).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn times_are_checked_with_skew() {
        let auth = HmacAuth::new(
            serde_json::from_value(serde_json::json!({"max_age": "300s", "clock_skew": "30s"}))
                .unwrap(),
        );
        let p = |created: Option<i64>, expires: Option<i64>| SignatureParams {
            key_id: "k".into(),
            alg: None,
            created,
            expires,
            nonce: None,
        };
        let now = 1_000_000;
        assert_eq!(
            auth.check_times(&p(Some(now), None), now).unwrap(),
            now + 330
        );
        assert!(auth.check_times(&p(Some(now + 30), None), now).is_ok());
        assert!(auth.check_times(&p(Some(now + 31), None), now).is_err());
        assert!(auth.check_times(&p(Some(now - 330), None), now).is_ok());
        assert!(auth.check_times(&p(Some(now - 331), None), now).is_err());
        assert!(auth.check_times(&p(None, None), now).is_err());
        assert_eq!(
            auth.check_times(&p(Some(now), Some(now + 10)), now)
                .unwrap(),
            now + 40
        );
        assert!(
            auth.check_times(&p(Some(now - 100), Some(now - 31)), now)
                .is_err()
        );
    }

    #[test]
    fn without_created_expires_bounds_the_signature() {
        let auth = HmacAuth::new(
            serde_json::from_value(serde_json::json!({"require_created": false})).unwrap(),
        );
        let p = |expires: Option<i64>| SignatureParams {
            key_id: "k".into(),
            alg: None,
            created: None,
            expires,
            nonce: None,
        };
        let now = 1_000_000;
        // Valid for ever (and a nonce forgotten while it still is) is not allowed.
        let e = auth.check_times(&p(None), now).unwrap_err();
        assert!(e.message.contains("neither"), "{}", e.message);
        let e = auth.check_times(&p(Some(now + 331)), now).unwrap_err();
        assert!(
            e.message.contains("more than 300 seconds away"),
            "{}",
            e.message
        );
        assert_eq!(
            auth.check_times(&p(Some(now + 300)), now).unwrap(),
            now + 330
        );
    }

    #[test]
    fn the_authority_is_the_one_the_upstream_gets() {
        let (items, params) = input(r#"s=("@authority" "@scheme")"#);
        // Absolute form naming one host with `Host` naming another: no signature over
        // either can vouch for the request.
        let parts = request("GET", "http://a.example/x", &[("host", "b.example")]);
        let e = signature_base(&parts, false, &items, &params).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        // The scheme is the connection's, whatever the request line claims.
        let parts = request("GET", "https://a.example/x", &[("host", "a.example")]);
        let base = signature_base(&parts, false, &items, &params).unwrap();
        assert!(base.contains("\"@scheme\": http\n"), "{base}");
        assert!(base.contains("\"@authority\": a.example\n"), "{base}");
    }

    #[test]
    fn the_nonce_memory_is_bounded() {
        let auth = HmacAuth::new(
            serde_json::from_value(serde_json::json!({"nonce_cache_size": 2})).unwrap(),
        );
        let later = unix_now() + 100;
        auth.remember_nonce("k", "a", later).unwrap();
        let e = auth.remember_nonce("k", "a", later).unwrap_err();
        assert_eq!(e.kind, ErrorKind::CredentialInvalid);
        auth.remember_nonce("other", "a", later).unwrap();
        let e = auth.remember_nonce("k", "b", later).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AuthUnavailable);
        // Expired nonces make room.
        let auth = HmacAuth::new(
            serde_json::from_value(serde_json::json!({"nonce_cache_size": 1})).unwrap(),
        );
        auth.remember_nonce("k", "a", unix_now() - 1).unwrap();
        auth.remember_nonce("k", "b", later).unwrap();
    }
}
