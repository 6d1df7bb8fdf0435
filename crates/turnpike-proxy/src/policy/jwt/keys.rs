//! Key material: PEM, DER and JWK parsed into keys bound to one algorithm family, and
//! signature checks with ring.
//!
//! Each key is tagged with its type when it is parsed, and [`Material::verify`] only pairs
//! an algorithm with the key type it belongs to. That pairing, not the token's header, is
//! what decides how bytes are interpreted: an RSA public key is never handed to HMAC.

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose::URL_SAFE_NO_PAD};
use ring::{hmac, signature};
use serde_json::Value;

/// The JWS algorithms the verifier accepts. Anything else, `none` included, is refused
/// before a key is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// HMAC with SHA-256.
    Hs256,
    /// HMAC with SHA-384.
    Hs384,
    /// HMAC with SHA-512.
    Hs512,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// Every accepted algorithm.
    pub const ALL: [Algorithm; 12] = [
        Algorithm::Hs256,
        Algorithm::Hs384,
        Algorithm::Hs512,
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
    ];

    /// The algorithm for a JOSE `alg` value. Names are case-sensitive (RFC 7515 §4.1.1), so
    /// `None`, `hs256` and the like are not accepted spellings.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The JOSE `alg` value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Hs384 => "HS384",
            Algorithm::Hs512 => "HS512",
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// RFC 7518 §3.2 asks for an HMAC key at least as long as the hash; 32 bytes covers HS256,
/// and a shorter secret is brute-forceable offline from any one token.
pub(crate) const MIN_HMAC_SECRET: usize = 32;

/// One verification key.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// The JWK `kid`, if any.
    pub kid: Option<String>,
    /// The JWK `alg`, if any: then only that algorithm may be used with the key.
    pub alg: Option<Algorithm>,
    pub material: Material,
}

impl Key {
    fn new(material: Material) -> Self {
        Self {
            kid: None,
            alg: None,
            material,
        }
    }

    /// Whether a token signed with `alg` may be checked against this key at all.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.alg.is_none_or(|a| a == alg) && self.material.supports(alg)
    }
}

/// Key bytes, tagged with the key type they were parsed as.
#[derive(Clone)]
pub(crate) enum Material {
    Hmac(Vec<u8>),
    /// Modulus and exponent, big-endian without leading zeros (as ring wants them).
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point (`04 || x || y`).
    EcP256(Vec<u8>),
    /// Uncompressed point (`04 || x || y`).
    EcP384(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets must never reach logs; public keys are summarised since they are long.
        match self {
            Material::Hmac(_) => f.write_str("Hmac(<redacted>)"),
            Material::Rsa { n, .. } => write!(f, "Rsa({} bits)", bit_len(n)),
            Material::EcP256(_) => f.write_str("EcP256"),
            Material::EcP384(_) => f.write_str("EcP384"),
            Material::Ed25519(_) => f.write_str("Ed25519"),
        }
    }
}

impl Material {
    /// The key-type binding: which algorithms this key may verify.
    pub fn supports(&self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Material::Hmac(_) => matches!(alg, Hs256 | Hs384 | Hs512),
            Material::Rsa { .. } => matches!(alg, Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512),
            Material::EcP256(_) => alg == Es256,
            Material::EcP384(_) => alg == Es384,
            Material::Ed25519(_) => alg == EdDsa,
        }
    }

    /// Checks `sig` over `msg`. Every (key type, algorithm) pair is spelled out so that a
    /// mismatched pair can only ever fall through to `false`.
    pub fn verify(&self, alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
        use Algorithm::*;
        match (self, alg) {
            (Material::Hmac(secret), Hs256 | Hs384 | Hs512) => {
                let h = match alg {
                    Hs256 => hmac::HMAC_SHA256,
                    Hs384 => hmac::HMAC_SHA384,
                    _ => hmac::HMAC_SHA512,
                };
                // ring compares in constant time.
                hmac::verify(&hmac::Key::new(h, secret), msg, sig).is_ok()
            }
            (Material::Rsa { n, e }, Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512) => {
                let params: &signature::RsaParameters = match alg {
                    Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (Material::EcP256(point), Es256) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::EcP384(point), Es384) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::Ed25519(key), EdDsa) => {
                signature::UnparsedPublicKey::new(&signature::ED25519, key)
                    .verify(msg, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

/// An HMAC secret, refused when too short to resist guessing.
pub(crate) fn hmac_key(secret: &[u8]) -> Result<Key, String> {
    if secret.len() < MIN_HMAC_SECRET {
        return Err(format!(
            "HMAC secret is {} bytes; at least {MIN_HMAC_SECRET} are required",
            secret.len()
        ));
    }
    Ok(Key::new(Material::Hmac(secret.to_vec())))
}

// --- PEM -------------------------------------------------------------------------------

/// Every key in a PEM text: `PUBLIC KEY` (SubjectPublicKeyInfo), `RSA PUBLIC KEY` (PKCS#1)
/// or `CERTIFICATE` (only its public key is used; the certificate itself is not validated).
pub(crate) fn keys_from_pem(text: &str) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let Some(label_end) = after.find("-----") else {
            return Err("PEM has an unterminated BEGIN line".into());
        };
        let label = &after[..label_end];
        let body_and_rest = &after[label_end + "-----".len()..];
        let end_marker = format!("-----END {label}-----");
        let Some(body_end) = body_and_rest.find(&end_marker) else {
            return Err(format!("PEM block `{label}` has no END line"));
        };
        let body = &body_and_rest[..body_end];
        rest = &body_and_rest[body_end + end_marker.len()..];

        if label.contains("PRIVATE KEY") {
            return Err("PEM holds a private key; configure the issuer's public key only".into());
        }
        if body.contains(':') {
            return Err(format!(
                "PEM block `{label}` has headers, which are not supported"
            ));
        }
        let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| format!("PEM block `{label}` is not valid base64"))?;
        let material = match label {
            "PUBLIC KEY" => spki(&der)?,
            "RSA PUBLIC KEY" => pkcs1_rsa(&der)?,
            "CERTIFICATE" => spki(certificate_spki(&der)?)?,
            other => return Err(format!("unsupported PEM block `{other}`")),
        };
        keys.push(Key::new(material));
    }
    if keys.is_empty() {
        return Err("no PEM public key found".into());
    }
    Ok(keys)
}

// --- DER -------------------------------------------------------------------------------

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_CONTEXT_0: u8 = 0xA0;

/// rsaEncryption, 1.2.840.113549.1.1.1.
const OID_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
/// id-ecPublicKey, 1.2.840.10045.2.1.
const OID_EC: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
/// prime256v1, 1.2.840.10045.3.1.7.
const OID_P256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// secp384r1, 1.3.132.0.34.
const OID_P384: &[u8] = &[0x2B, 0x81, 0x04, 0x00, 0x22];
/// id-Ed25519, 1.3.101.112.
const OID_ED25519: &[u8] = &[0x2B, 0x65, 0x70];

/// A minimal DER reader: only definite lengths up to four bytes, which covers any key.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn read(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 {
                return None;
            }
            let (len_bytes, rest) = rest.split_at_checked(count)?;
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        };
        let (value, rest) = rest.split_at_checked(len)?;
        self.rest = rest;
        Some((tag, value))
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.read()? {
            (t, value) if t == tag => Some(value),
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// The SubjectPublicKeyInfo inside an X.509 certificate.
fn certificate_spki(der: &[u8]) -> Result<&[u8], String> {
    let bad = || "certificate is not valid DER".to_string();
    let cert = Der::new(der).expect(TAG_SEQUENCE).ok_or_else(bad)?;
    let tbs = Der::new(cert).expect(TAG_SEQUENCE).ok_or_else(bad)?;
    let mut fields = Der::new(tbs);
    let (mut tag, _) = fields.read().ok_or_else(bad)?;
    if tag == TAG_CONTEXT_0 {
        // The explicit version; the serial number follows.
        (tag, _) = fields.read().ok_or_else(bad)?;
    }
    if tag != TAG_INTEGER {
        return Err(bad());
    }
    // signature algorithm, issuer, validity, subject
    for _ in 0..4 {
        fields.expect(TAG_SEQUENCE).ok_or_else(bad)?;
    }
    // Hand back the whole SEQUENCE (tag and length included) for `spki`.
    let before = fields.rest;
    fields.expect(TAG_SEQUENCE).ok_or_else(bad)?;
    let used = before.len() - fields.rest.len();
    before.get(..used).ok_or_else(bad)
}

/// A SubjectPublicKeyInfo: RSA, EC P-256/P-384 or Ed25519.
fn spki(der: &[u8]) -> Result<Material, String> {
    let bad = || "public key is not a valid SubjectPublicKeyInfo".to_string();
    let mut outer = Der::new(der);
    let body = outer.expect(TAG_SEQUENCE).ok_or_else(bad)?;
    if !outer.is_empty() {
        return Err(bad());
    }
    let mut fields = Der::new(body);
    let alg_id = fields.expect(TAG_SEQUENCE).ok_or_else(bad)?;
    let bits = fields.expect(TAG_BIT_STRING).ok_or_else(bad)?;
    if !fields.is_empty() {
        return Err(bad());
    }
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err(bad()),
    };
    let mut alg = Der::new(alg_id);
    let oid = alg.expect(TAG_OID).ok_or_else(bad)?;
    let params = alg.read();
    if !alg.is_empty() {
        return Err(bad());
    }
    match oid {
        OID_RSA => match params {
            None | Some((TAG_NULL, [])) => pkcs1_rsa(key),
            _ => Err(bad()),
        },
        OID_EC => match params {
            Some((TAG_OID, OID_P256)) => ec_point(key, 32).map(Material::EcP256),
            Some((TAG_OID, OID_P384)) => ec_point(key, 48).map(Material::EcP384),
            _ => Err("unsupported elliptic curve; P-256 and P-384 are supported".into()),
        },
        OID_ED25519 if params.is_none() => ed25519(key),
        _ => Err(format!(
            "unsupported public key algorithm (OID {}); RSA, EC P-256/P-384 and Ed25519 are \
             supported",
            hex::encode(oid)
        )),
    }
}

/// A PKCS#1 RSAPublicKey.
fn pkcs1_rsa(der: &[u8]) -> Result<Material, String> {
    let bad = || "RSA public key is not valid PKCS#1 DER".to_string();
    let mut outer = Der::new(der);
    let body = outer.expect(TAG_SEQUENCE).ok_or_else(bad)?;
    if !outer.is_empty() {
        return Err(bad());
    }
    let mut fields = Der::new(body);
    let n = fields.expect(TAG_INTEGER).ok_or_else(bad)?;
    let e = fields.expect(TAG_INTEGER).ok_or_else(bad)?;
    if !fields.is_empty() {
        return Err(bad());
    }
    rsa(n, e)
}

/// Size and exponent checks ring would otherwise only make per token, so a weak or broken
/// key is reported when the configuration is loaded.
fn rsa(n: &[u8], e: &[u8]) -> Result<Material, String> {
    let n = strip_zeros(n);
    let e = strip_zeros(e);
    let bits = bit_len(n);
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "RSA key is {bits} bits; 2048 to 8192 bits are supported"
        ));
    }
    let odd = e.last().is_some_and(|b| b & 1 == 1);
    if e.len() > 4 || !odd || (e.len() == 1 && e[0] < 3) {
        return Err("RSA public exponent is not supported".into());
    }
    Ok(Material::Rsa {
        n: n.to_vec(),
        e: e.to_vec(),
    })
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    &bytes[zeros..]
}

fn bit_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        Some(&first) => bytes.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// An uncompressed point of a curve with `coord`-byte coordinates.
fn ec_point(key: &[u8], coord: usize) -> Result<Vec<u8>, String> {
    if key.len() != 1 + 2 * coord || key.first() != Some(&0x04) {
        return Err("EC public key must be an uncompressed point".into());
    }
    Ok(key.to_vec())
}

fn ed25519(key: &[u8]) -> Result<Material, String> {
    if key.len() != 32 {
        return Err("Ed25519 public key must be 32 bytes".into());
    }
    Ok(Material::Ed25519(key.to_vec()))
}

// --- JWK -------------------------------------------------------------------------------

/// JWK members are base64url; some publishers pad them, which is harmless to accept.
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How a JWKS is read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JwksRules {
    /// Any malformed key is an error (inline configuration), rather than skipped (a remote
    /// document we do not control, where one odd key must not hide the others).
    pub strict: bool,
    /// Accept `oct` (HMAC) keys. Only for inline documents: a secret fetched from a URL is
    /// one anybody who can read that URL could sign with.
    pub symmetric: bool,
}

/// The usable signing keys of a JWKS document.
pub(crate) fn keys_from_jwks(text: &str, rules: JwksRules) -> Result<Vec<Key>, String> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| format!("JWKS is not valid JSON: {e}"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err("JWKS must be a JSON object with a `keys` array".into());
    };
    let mut keys = Vec::new();
    let mut first_error = None;
    for (i, jwk) in list.iter().enumerate() {
        match jwk_key(jwk, rules) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => tracing::debug!(index = i, "JWKS key skipped: not a usable signing key"),
            Err(e) => {
                let e = format!("JWKS key {i}: {e}");
                if rules.strict {
                    return Err(e);
                }
                tracing::debug!(error = %e, "JWKS key skipped");
                first_error.get_or_insert(e);
            }
        }
    }
    if keys.is_empty() {
        return Err(first_error.unwrap_or_else(|| "JWKS has no usable signing key".into()));
    }
    Ok(keys)
}

/// One JWK: `Ok(None)` for keys that are well-formed but not for us (encryption keys,
/// unsupported types or curves).
fn jwk_key(jwk: &Value, rules: JwksRules) -> Result<Option<Key>, String> {
    let Some(obj) = jwk.as_object() else {
        return Err("not a JSON object".into());
    };
    let text = |name: &str| -> Result<Option<&str>, String> {
        match obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("`{name}` must be a string")),
        }
    };
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        let value = text(name)?.ok_or_else(|| format!("`{name}` is missing"))?;
        JWK_B64
            .decode(value)
            .map_err(|_| format!("`{name}` is not valid base64url"))
    };
    if text("use")?.is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if let Some(ops) = obj.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verify {
            return Ok(None);
        }
    }
    let alg = match text("alg")? {
        None => None,
        Some(name) => match Algorithm::from_name(name) {
            Some(alg) => Some(alg),
            // An encryption algorithm, or a signature one we do not do.
            None => return Ok(None),
        },
    };
    let kid = text("kid")?.map(str::to_owned);
    let material = match text("kty")?.ok_or("`kty` is missing")? {
        "RSA" => rsa(&bytes("n")?, &bytes("e")?)?,
        "EC" => {
            let (coord, p384) = match text("crv")?.ok_or("`crv` is missing")? {
                "P-256" => (32, false),
                "P-384" => (48, true),
                _ => return Ok(None),
            };
            let x = bytes("x")?;
            let y = bytes("y")?;
            if x.len() != coord || y.len() != coord {
                return Err("EC coordinates have the wrong length for the curve".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * coord);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if p384 {
                Material::EcP384(point)
            } else {
                Material::EcP256(point)
            }
        }
        "OKP" => match text("crv")?.ok_or("`crv` is missing")? {
            "Ed25519" => ed25519(&bytes("x")?)?,
            _ => return Ok(None),
        },
        "oct" if rules.symmetric => hmac_key(&bytes("k")?)?.material,
        _ => return Ok(None),
    };
    if let Some(alg) = alg.filter(|&a| !material.supports(a)) {
        return Err(format!("`alg` {alg} does not fit the key type"));
    }
    Ok(Some(Key { kid, alg, material }))
}

/// Token segments must be unpadded, canonical base64url (RFC 7515 §2), so one token has one
/// spelling.
pub(crate) fn decode_segment(segment: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(segment).ok()
}
