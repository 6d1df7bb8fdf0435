//! JWT verification for the `jwt` authentication policy.
//!
//! A token is accepted only when its signature verifies with a key configured for the issuer
//! named in its `iss`, and its `exp`, `nbf`, `aud` and required claims pass. The classic
//! attacks on JWT verifiers, and what stops each here:
//!
//! - **`alg: none` and unknown algorithms.** Only twelve algorithm names are recognised,
//!   compared case-sensitively; anything else is refused before any key is looked at.
//! - **Key confusion** (an `HS256` token whose "secret" is the issuer's RSA public key, which
//!   is public). Every key is tagged with its type when the configuration is parsed, and an
//!   algorithm is only ever paired with keys of its own family: HMAC runs with configured
//!   secrets only, never with bytes of a public key. A JWK's own `alg`, when present, narrows
//!   the key further to exactly that algorithm.
//! - **Keys chosen by the token.** `jku`, `x5u`, `jwk` and `x5c` headers are ignored: keys
//!   come from configuration only. `kid` merely picks among the issuer's keys.
//! - **Issuer confusion.** The unverified payload is read for `iss` only to choose the
//!   issuer's configuration; the token is then verified with that issuer's keys alone, so a
//!   key trusted for one issuer cannot vouch for another's tokens.
//! - **Unknown extensions.** A header with `crit` is refused (RFC 7515 §4.1.11): we
//!   understand no extension, so we cannot honour one.
//! - **Ambiguous encodings.** Segments must be canonical unpadded base64url; duplicate JSON
//!   members resolve to the last one, in the claims checked and in the claims handed on
//!   alike.
//! - **Denial of service.** Tokens over `max_token_bytes` are refused before decoding; JSON
//!   nesting is bounded by the parser; without `kid`, at most `max_keys_without_kid` keys are
//!   tried; claims are checked only after the signature. A remote JWKS is fetched with a
//!   timeout and a body cap, one fetch at a time, and at most once per
//!   `min_refresh_interval`, so a flood of tokens with made-up `kid`s causes a bounded
//!   number of fetches, and a failing refresh keeps the cached keys in service.
//!
//! Errors say what kind of check failed and never echo token contents.

mod keys;
pub(crate) mod remote;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

pub use keys::Algorithm;
use keys::{JwksRules, Key};
pub use remote::JsonPoster;
use remote::{Fetcher, KeySet, Location, RemoteJwks};

/// Default for [`KeySource::JwksUrl`]'s `cache_ttl`.
pub const DEFAULT_JWKS_CACHE_TTL: Duration = Duration::from_secs(300);
/// Default for [`KeySource::JwksUrl`]'s `min_refresh_interval`.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Where keys come from for one issuer.
#[derive(Clone)]
pub enum KeySource {
    /// HMAC secret (HS256/384/512), at least 32 bytes.
    Secret(Vec<u8>),
    /// One or more PEM blocks: `PUBLIC KEY` (RSA for RS*/PS*, EC P-256/P-384 for
    /// ES256/ES384, Ed25519 for EdDSA), `RSA PUBLIC KEY`, or a `CERTIFICATE` whose public
    /// key is used (the certificate itself is not validated).
    Pem(String),
    /// A JWKS document given inline. `oct` keys are accepted here, as HMAC secrets.
    Jwks(String),
    /// A JWKS URL (http or https), fetched and cached. `oct` keys from it are ignored.
    JwksUrl {
        /// The document's URL.
        url: String,
        /// How long fetched keys are used before a background refresh.
        cache_ttl: Duration,
        /// The least time between two fetches, whatever triggers them.
        min_refresh_interval: Duration,
    },
    /// OpenID Connect discovery: the JWKS at the `jwks_uri` of the discovery document at
    /// `url`, whose `issuer` must be this issuer. The document is read again before every
    /// JWKS fetch, so a provider that moves its keys is followed.
    Discovery {
        /// The discovery document's URL.
        url: String,
        /// As for [`KeySource::JwksUrl`].
        cache_ttl: Duration,
        /// As for [`KeySource::JwksUrl`]; one attempt is both requests.
        min_refresh_interval: Duration,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret(<redacted>)"),
            KeySource::Pem(_) => f.write_str("Pem(..)"),
            // An inline JWKS may hold `oct` secrets.
            KeySource::Jwks(_) => f.write_str("Jwks(..)"),
            KeySource::JwksUrl {
                url,
                cache_ttl,
                min_refresh_interval,
            } => f
                .debug_struct("JwksUrl")
                .field("url", url)
                .field("cache_ttl", cache_ttl)
                .field("min_refresh_interval", min_refresh_interval)
                .finish(),
            KeySource::Discovery {
                url,
                cache_ttl,
                min_refresh_interval,
            } => f
                .debug_struct("Discovery")
                .field("url", url)
                .field("cache_ttl", cache_ttl)
                .field("min_refresh_interval", min_refresh_interval)
                .finish(),
        }
    }
}

/// One trusted issuer.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The exact `iss` value of its tokens.
    pub issuer: String,
    /// Its signing keys.
    pub keys: KeySource,
    /// Accepted `aud` values; a token must name one of them. Empty: `aud` is not checked.
    pub audiences: Vec<String>,
}

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Trusted issuers, each with its own keys.
    pub issuers: Vec<IssuerConfig>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Longer tokens are refused before any decoding.
    pub max_token_bytes: usize,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
    /// Claims that must be present (and not `null`).
    pub required_claims: Vec<String>,
    /// For tokens without `kid`: how many keys compatible with the algorithm are tried.
    pub max_keys_without_kid: usize,
    /// Overall time limit of one JWKS fetch.
    pub jwks_fetch_timeout: Duration,
    /// Largest JWKS document accepted from a URL.
    pub jwks_max_bytes: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            leeway: Duration::from_secs(30),
            max_token_bytes: 8 * 1024,
            require_exp: true,
            required_claims: Vec::new(),
            max_keys_without_kid: 4,
            jwks_fetch_timeout: Duration::from_secs(5),
            jwks_max_bytes: 1024 * 1024,
        }
    }
}

/// Time as the verifier sees it; injectable so tests can stand exactly on the leeway and
/// refresh boundaries.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time since the Unix epoch, for `exp` and `nbf`.
    fn unix_time(&self) -> Duration;
    /// Monotonic time since a fixed origin, for cache ages and refresh intervals (which must
    /// not jump with the wall clock).
    fn monotonic(&self) -> Duration;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn unix_time(&self) -> Duration {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The issuer (`iss`) whose keys verified the token.
    pub issuer: String,
    /// `sub`, when it is a string.
    pub subject: Option<String>,
    /// Scopes from `scope` and `scp`, each either a space-separated string or an array of
    /// strings; duplicates removed, first occurrence kept.
    pub scopes: Vec<String>,
    /// All claims of the payload.
    pub claims: Map<String, Value>,
}

/// Why a token was refused. The display text is short and safe to log or return: it never
/// contains token contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Longer than `max_token_bytes`.
    TooLarge,
    /// Not three base64url segments of a JSON header, a JSON object payload and a
    /// signature, or a header we cannot honour (`crit`).
    Malformed,
    /// `alg` is `none` or not an algorithm we accept.
    UnsupportedAlgorithm,
    /// No issuer is configured for the token's `iss`.
    UnknownIssuer,
    /// No key of the issuer has the token's `kid`.
    UnknownKey,
    /// No key of the issuer may be used with the token's algorithm.
    AlgorithmMismatch,
    /// The signature does not verify.
    BadSignature,
    /// `exp` (plus leeway) has passed.
    Expired,
    /// `nbf` (minus leeway) is still ahead.
    NotYetValid,
    /// `aud` names none of the accepted audiences.
    WrongAudience,
    /// A required claim is absent.
    MissingClaim(String),
    /// A claim has the wrong type.
    InvalidClaim(String),
    /// The issuer's JWKS could not be fetched and none is cached.
    KeysUnavailable,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::TooLarge => f.write_str("token too large"),
            JwtError::Malformed => f.write_str("malformed token"),
            JwtError::UnsupportedAlgorithm => f.write_str("unsupported signing algorithm"),
            JwtError::UnknownIssuer => f.write_str("unknown issuer"),
            JwtError::UnknownKey => f.write_str("unknown signing key"),
            JwtError::AlgorithmMismatch => f.write_str("algorithm does not match the key"),
            JwtError::BadSignature => f.write_str("invalid signature"),
            JwtError::Expired => f.write_str("token expired"),
            JwtError::NotYetValid => f.write_str("token not yet valid"),
            JwtError::WrongAudience => f.write_str("audience not accepted"),
            JwtError::MissingClaim(name) => write!(f, "missing claim `{name}`"),
            JwtError::InvalidClaim(name) => write!(f, "invalid claim `{name}`"),
            JwtError::KeysUnavailable => f.write_str("signing keys unavailable"),
        }
    }
}

impl std::error::Error for JwtError {}

/// Verifies JWTs against a fixed set of issuers. Cheap to share behind an `Arc`; remote
/// key sets are cached inside.
pub struct Verifier {
    issuers: HashMap<String, Issuer>,
    leeway: f64,
    max_token_bytes: usize,
    require_exp: bool,
    required_claims: Vec<String>,
    max_keys_without_kid: usize,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Issuer {
    name: String,
    audiences: Vec<String>,
    keys: IssuerKeys,
}

enum IssuerKeys {
    /// A secret or PEM keys, which carry no `kid`: a token's `kid` is ignored.
    Fixed(KeySet),
    /// An inline JWKS: a token's `kid` must match.
    Jwks(KeySet),
    Remote(Arc<RemoteJwks>),
}

/// The parts of a token that signature and claim checks need.
struct Token<'t> {
    alg: Algorithm,
    kid: Option<String>,
    signing_input: &'t str,
    signature: Vec<u8>,
    claims: Map<String, Value>,
}

impl Verifier {
    /// Builds a verifier on the system clock. Secrets, PEM and inline JWKS are parsed here;
    /// the error names the issuer and what is wrong.
    pub fn new(cfg: VerifierConfig) -> Result<Self, String> {
        Self::with_clock(cfg, Arc::new(SystemClock::default()))
    }

    /// Like [`Verifier::new`], with the given clock.
    pub fn with_clock(cfg: VerifierConfig, clock: Arc<dyn Clock>) -> Result<Self, String> {
        if cfg.issuers.is_empty() {
            return Err("no issuer configured".into());
        }
        let mut fetcher = None;
        let mut issuers = HashMap::with_capacity(cfg.issuers.len());
        for issuer in cfg.issuers {
            if issuer.issuer.is_empty() {
                return Err("issuer name must not be empty".into());
            }
            let name = issuer.issuer;
            let context = |e: String| format!("issuer `{name}`: {e}");
            let keys = match issuer.keys {
                KeySource::Secret(secret) => {
                    IssuerKeys::Fixed(Arc::new(vec![keys::hmac_key(&secret).map_err(context)?]))
                }
                KeySource::Pem(pem) => {
                    IssuerKeys::Fixed(Arc::new(keys::keys_from_pem(&pem).map_err(context)?))
                }
                KeySource::Jwks(doc) => {
                    let rules = JwksRules {
                        strict: true,
                        symmetric: true,
                    };
                    IssuerKeys::Jwks(Arc::new(
                        keys::keys_from_jwks(&doc, rules).map_err(context)?,
                    ))
                }
                KeySource::JwksUrl {
                    url,
                    cache_ttl,
                    min_refresh_interval,
                } => remote_keys(
                    &name,
                    Location::Jwks(remote_url("JWKS URL", &url).map_err(context)?),
                    (cache_ttl, min_refresh_interval),
                    &mut fetcher,
                    (cfg.jwks_fetch_timeout, cfg.jwks_max_bytes),
                    &clock,
                )?,
                KeySource::Discovery {
                    url,
                    cache_ttl,
                    min_refresh_interval,
                } => remote_keys(
                    &name,
                    Location::Discovery(remote_url("discovery URL", &url).map_err(context)?),
                    (cache_ttl, min_refresh_interval),
                    &mut fetcher,
                    (cfg.jwks_fetch_timeout, cfg.jwks_max_bytes),
                    &clock,
                )?,
            };
            let entry = Issuer {
                name: name.clone(),
                audiences: issuer.audiences,
                keys,
            };
            if issuers.insert(name.clone(), entry).is_some() {
                return Err(format!("issuer `{name}` is configured twice"));
            }
        }
        Ok(Self {
            issuers,
            leeway: cfg.leeway.as_secs_f64(),
            max_token_bytes: cfg.max_token_bytes,
            require_exp: cfg.require_exp,
            required_claims: cfg.required_claims,
            max_keys_without_kid: cfg.max_keys_without_kid.max(1),
            clock,
        })
    }

    /// Verifies a compact JWS token (without any `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        if token.len() > self.max_token_bytes {
            return Err(JwtError::TooLarge);
        }
        let token = parse(token)?;
        let issuer = match token.claims.get("iss") {
            Some(Value::String(iss)) => self.issuers.get(iss).ok_or(JwtError::UnknownIssuer)?,
            Some(_) => return Err(JwtError::InvalidClaim("iss".into())),
            None => return Err(JwtError::MissingClaim("iss".into())),
        };
        self.check_signature(issuer, &token).await?;
        self.check_claims(issuer, &token.claims)?;
        let subject = token
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Verified {
            issuer: issuer.name.clone(),
            subject,
            scopes: scopes(&token.claims),
            claims: token.claims,
        })
    }

    async fn check_signature(&self, issuer: &Issuer, token: &Token<'_>) -> Result<(), JwtError> {
        match &issuer.keys {
            IssuerKeys::Fixed(keys) => self.check_with(keys, false, token),
            IssuerKeys::Jwks(keys) => self.check_with(keys, true, token),
            IssuerKeys::Remote(remote) => {
                let keys = remote.keys().await?;
                match self.check_with(&keys, true, token) {
                    Err(JwtError::UnknownKey) => {
                        match remote.refresh_for_unknown_kid(&keys).await {
                            Some(fresh) => self.check_with(&fresh, true, token),
                            None => Err(JwtError::UnknownKey),
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// Tries the keys that may have signed `token`: those with its `kid` when `by_kid` and
    /// it has one, otherwise any, and of those only the ones bound to its algorithm.
    fn check_with(&self, keys: &[Key], by_kid: bool, token: &Token<'_>) -> Result<(), JwtError> {
        let kid = token.kid.as_deref().filter(|_| by_kid);
        let mut named = false;
        let mut tried = 0;
        for key in keys {
            if kid.is_some() && key.kid.as_deref() != kid {
                continue;
            }
            named = true;
            if !key.accepts(token.alg) {
                continue;
            }
            if tried == self.max_keys_without_kid && kid.is_none() {
                break;
            }
            tried += 1;
            if key
                .material
                .verify(token.alg, token.signing_input.as_bytes(), &token.signature)
            {
                return Ok(());
            }
        }
        if !named {
            Err(JwtError::UnknownKey)
        } else if tried == 0 {
            Err(JwtError::AlgorithmMismatch)
        } else {
            Err(JwtError::BadSignature)
        }
    }

    fn check_claims(&self, issuer: &Issuer, claims: &Map<String, Value>) -> Result<(), JwtError> {
        let now = self.clock.unix_time().as_secs_f64();
        // Valid while now <= exp + leeway.
        match claims.get("exp") {
            Some(value) => {
                let exp = numeric_date(value).ok_or(JwtError::InvalidClaim("exp".into()))?;
                if now > exp + self.leeway {
                    return Err(JwtError::Expired);
                }
            }
            None if self.require_exp => return Err(JwtError::MissingClaim("exp".into())),
            None => {}
        }
        // Valid once now >= nbf - leeway.
        if let Some(value) = claims.get("nbf") {
            let nbf = numeric_date(value).ok_or(JwtError::InvalidClaim("nbf".into()))?;
            if now < nbf - self.leeway {
                return Err(JwtError::NotYetValid);
            }
        }
        if !issuer.audiences.is_empty() {
            let accepted = |aud: &str| issuer.audiences.iter().any(|a| a == aud);
            let ok = match claims.get("aud") {
                None => return Err(JwtError::MissingClaim("aud".into())),
                Some(Value::String(aud)) => accepted(aud),
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str().is_some_and(accepted)),
                Some(_) => return Err(JwtError::InvalidClaim("aud".into())),
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        for name in &self.required_claims {
            if claims.get(name).is_none_or(Value::is_null) {
                return Err(JwtError::MissingClaim(name.clone()));
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn remote(&self, issuer: &str) -> Option<Arc<RemoteJwks>> {
        match &self.issuers.get(issuer)?.keys {
            IssuerKeys::Remote(remote) => Some(remote.clone()),
            _ => None,
        }
    }
}

/// Splits and decodes a compact JWS. The header is judged before the payload is decoded.
fn parse(token: &str) -> Result<Token<'_>, JwtError> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
    let (header, payload) = signing_input.split_once('.').ok_or(JwtError::Malformed)?;
    if payload.contains('.') {
        // Five segments: a JWE, which we do not decrypt.
        return Err(JwtError::Malformed);
    }
    let header = keys::decode_segment(header).ok_or(JwtError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            Algorithm::from_name(name).ok_or(JwtError::UnsupportedAlgorithm)?
        }
        _ => return Err(JwtError::Malformed),
    };
    if header.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    let payload = keys::decode_segment(payload).ok_or(JwtError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
    let signature = keys::decode_segment(signature).ok_or(JwtError::Malformed)?;
    Ok(Token {
        alg,
        kid,
        signing_input,
        signature,
        claims,
    })
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional.
fn numeric_date(value: &Value) -> Option<f64> {
    value.as_f64().filter(|v| v.is_finite())
}

fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        let items: Vec<&str> = match claims.get(name) {
            Some(Value::String(s)) => s.split_whitespace().collect(),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        for item in items {
            if !item.is_empty() && seen.insert(item) {
                out.push(item.to_owned());
            }
        }
    }
    out
}

/// Keys fetched from `location`, with one fetcher shared by all of a verifier's issuers.
fn remote_keys(
    issuer: &str,
    location: Location,
    (cache_ttl, min_refresh_interval): (Duration, Duration),
    fetcher: &mut Option<Fetcher>,
    (timeout, max_bytes): (Duration, usize),
    clock: &Arc<dyn Clock>,
) -> Result<IssuerKeys, String> {
    let fetcher = match fetcher {
        Some(f) => f.clone(),
        None => fetcher.insert(Fetcher::new(timeout, max_bytes)?).clone(),
    };
    Ok(IssuerKeys::Remote(Arc::new(RemoteJwks::new(
        issuer.to_owned(),
        location,
        cache_ttl,
        min_refresh_interval,
        fetcher,
        clock.clone(),
    ))))
}

/// `url` parsed, as an http(s) URL with a host; `what` names it in errors.
pub(crate) fn remote_url(what: &str, url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{what} `{url}` is invalid: {e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            tracing::warn!(
                url,
                "{what} uses plain http; keys can be tampered with in transit"
            );
        }
        _ => return Err(format!("{what} `{url}` must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{what} `{url}` has no host"));
    }
    Ok(uri)
}
