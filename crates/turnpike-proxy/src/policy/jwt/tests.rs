//! Tests of the JWT verifier: every algorithm family, the known attacks, the time
//! boundaries, and the remote JWKS cache against a local mock server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

use super::*;

const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://issuer.example";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs";

// RSA-2048 test key, generated with `openssl genpkey -algorithm RSA`; test use only.
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC4OV6tT1ixtF5f
Jbirxa1ugavmBhAbl6wvyQL81u6FSUTm+22Fgb3Py8E5GSV/GQZl56MYOTmse+x7
UvKOYviuPoop/2AbdVF/2p6L28iiTHA+P/7KcqDSZ36zSUN+3YfDQR6SlPbVa3wM
CBEe8UWPsF2C6bplewAko+c+EnVuN2aSuVB1SFJ4FSVlOGoAb1trKZMHsS3+R5D5
UMau+YxWS/24Mj3SDRIMGVKY3qiK69mcElKlsZQJgoANx7UbeLj5lnkd9sLd6zEn
lqilTtQmdjCOVOtbDV37zqCp+lrsPfy6SxUESPl0LTThokG9QQVkgQrEjuEJpPRY
5FLxS4j3AgMBAAECggEAHSyEqEiBAL9SFJpKKPWole/2E3rRUTVPQNAB551372af
gT6+5N4be41GX67yR7LkVv38T4k8b2q+k/caT18wB5QC2EzHYQHOssMhyX84Qi99
tPX4eQH3Iurd3zGSfURCzDKDT25Eup6HafZbE73cqLkizekKqih06NiF9cgBjb72
WSVbqOTE7QmPNr0+23gxXg6tSL+z2VkhnVDVv+a7TPTsQ9LKrffiUr/kWkSaJN+T
W5utmzfxbbgpmB9IckWk5BpAUqYuAZ1lm0+ZPQctIu1qaVMg69mqCUgj1sJ8NCl6
AdjH2hNU9aqLNqJrxUDSaH/jAk/izg1dXq4Y9U1h3QKBgQDmjLyWG/V5GqQGvJ5i
fdXB6IagPs4g+UZCL7L95YYppctQ6FSbZ+y/A4HiazLa5kUzI4LWXAjBWKY/daSe
Et6cwyQJrkgkekw+nAVFRd7n5dxnaGuw+bc+e3R6qVJSQulXgSU9nMiLykq9fMmQ
0bE4ZwzEffTBENDyWkZ6pGovEwKBgQDMj3wfSjRzxNskWWL4us0VGFLGM7rK/IU2
TrelOXk5+RPz2FZW2uMVN2DcfzHRYXd4WkTwPA4DYNcjfkcDzgeJ35GKm9W5Mbkj
Pms0Emf9En97pxmnh4rjIbpCDPtIpHRf4MknEWMGcnvemyJCyvZ7nr2Ij9B/wMgu
o78Xf3/nDQKBgQCCnjWyLgDzLd7EWlS5pGVYyO6NF0gdcl0V3oRgSIusSNxZ6GcW
7Ng6mDgcGXPkhRWrlXDpFZd4Q0tdJL+xNyucUQq32V/SGt/bkPWDe8SAScCHbael
yrTA15z0ab3UEUi2ZNq+f3c3i9KwbGSegc8QD4IySNJEF8zpoa/QiBoItQKBgQDE
TGTF+gV/msbYiNaK7Wdj+OVlwbpclBqZVMyyRwbn9PeKpm2kB4SmlW/j6EM8NBXb
bnR9PIQOBd4t9z3ajtl5GwulQYnEn8yT35AsdgVIO3oOhPn/Y/iJoZIFVEPHH9l1
MFaXoP2v8CiiI6irA+2oD1q+M5PXJH51EzmLKRTp+QKBgDGkzDtOHEOhh3G/lgM8
UJBuMNHmTUiVewDFcgXg1hG1Pcb7RKayvL8t3V7m9zNewFulJfavqsQdThC+leuY
kAbVUdzeMmErMqs1thICcNis9amiJ8PrtFq7+pyhPjhjiu8UxIu7Gs82hg/jZzLt
aCKBojyee4dnqArjL0q10o5H
-----END PRIVATE KEY-----
";

// Its public key as SubjectPublicKeyInfo (`openssl pkey -pubout`).
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAuDlerU9YsbReXyW4q8Wt
boGr5gYQG5esL8kC/NbuhUlE5vtthYG9z8vBORklfxkGZeejGDk5rHvse1LyjmL4
rj6KKf9gG3VRf9qei9vIokxwPj/+ynKg0md+s0lDft2Hw0EekpT21Wt8DAgRHvFF
j7Bdgum6ZXsAJKPnPhJ1bjdmkrlQdUhSeBUlZThqAG9baymTB7Et/keQ+VDGrvmM
Vkv9uDI90g0SDBlSmN6oiuvZnBJSpbGUCYKADce1G3i4+ZZ5HfbC3esxJ5aopU7U
JnYwjlTrWw1d+86gqfpa7D38uksVBEj5dC004aJBvUEFZIEKxI7hCaT0WORS8UuI
9wIDAQAB
-----END PUBLIC KEY-----
";

// The same public key as PKCS#1 (`openssl rsa -RSAPublicKey_out`).
const RSA_PUBLIC_PKCS1_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAuDlerU9YsbReXyW4q8WtboGr5gYQG5esL8kC/NbuhUlE5vtthYG9
z8vBORklfxkGZeejGDk5rHvse1LyjmL4rj6KKf9gG3VRf9qei9vIokxwPj/+ynKg
0md+s0lDft2Hw0EekpT21Wt8DAgRHvFFj7Bdgum6ZXsAJKPnPhJ1bjdmkrlQdUhS
eBUlZThqAG9baymTB7Et/keQ+VDGrvmMVkv9uDI90g0SDBlSmN6oiuvZnBJSpbGU
CYKADce1G3i4+ZZ5HfbC3esxJ5aopU7UJnYwjlTrWw1d+86gqfpa7D38uksVBEj5
dC004aJBvUEFZIEKxI7hCaT0WORS8UuI9wIDAQAB
-----END RSA PUBLIC KEY-----
";

// A 1024-bit RSA public key, too weak to be accepted.
const RSA_1024_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDGkG/1nKTz1rDJoJdeu2sSfM62
4YImUFMwqF5fv1y4KyVOgMfOGPxxWD7NjsI5hrDzF2jXL0rUE6BwnwWVX+bkHrpG
HAVcvBFbVh37ofL4riJOdqu5LbGLvlRLhAQ7f7gqveKOSQyVUB5SpxP9YrvlJisR
N+27fDzY+e9p3/OabQIDAQAB
-----END PUBLIC KEY-----
";

// Tokens signed by `openssl dgst -sign` with the key above (PSS with salt length = digest
// length), so interoperability does not rest on our own signing code.
const OPENSSL_ISS: &str = "https://openssl.example";
const OPENSSL_RS256: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL29wZW5zc2wuZXhhbXBsZSIsInN1YiI6ImludGVyb3AiLCJhdWQiOiJhcGkiLCJleHAiOjE3MDAwMDA2MDB9.Kyd4exWg8hYE8iEfxCl2gJ1GieBlk61KHkyP1bJqDf8vpjuIoJGOGUzme1g08obAMGo4aD65YayfU2h2OYi5B2Asjo22Ud3uBEZDG5KcRTXW5Pm0zKcWmbaWKRGsuoYvMn6al5r0v8IpUSCYi1h-B4yRzgvGXIeaqTbkORwSVu3bLBLBQofV9R_a2dXcgDH99riEgSqeJNCdAU-MJgXvgBa2rBSjq7mSjDEZw2i9gpzjz0XUILe67L4T8JTOWWwnRggD7hzE6Fllv9FLe7-wcbxXo0JxC_k7INZ98hYYotC_7fSqAxrQwYVP-D3yC7FKeOE7DWtdEFbpm8b-iMJ7hw";
const OPENSSL_PS256: &str = "eyJhbGciOiJQUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL29wZW5zc2wuZXhhbXBsZSIsInN1YiI6ImludGVyb3AiLCJhdWQiOiJhcGkiLCJleHAiOjE3MDAwMDA2MDB9.MxIH7mylnTS0LHlduy7vhc-johXRxo0ja8iDXt8L4ZrsuCk2qMZ_bcPoNZ49YaGvZVhUzofvsSdGcJnuBvtrv8gG7IejrF-V73a-PD_hB_iMvfSzc8DClimAm1XgARKEAvxWpPz8RHZFAeVcnHGwASsnlSf-F3ShOSsj669iNr9EbR2YSeSMbZK5mc9kM1Q9V5fzNgsG9CYLYQ6kTT2Q1pCtm8RczujaOqmupdAidcTGBDLQlm6R8NzSkMikvV0PImj5_syXepRORwcgau_OVHgE52MksfyjOj2ngXfG5IrNo2xbaSz6sSFcfijgsiXqqPqJQ2Yec19pSWb7zJMLeg";

// --- helpers ---------------------------------------------------------------------------

/// A clock that moves only when told to.
struct ManualClock {
    unix_ms: AtomicU64,
    mono_ms: AtomicU64,
}

impl ManualClock {
    fn at(unix_secs: u64) -> Arc<Self> {
        Arc::new(Self {
            unix_ms: AtomicU64::new(unix_secs * 1000),
            mono_ms: AtomicU64::new(0),
        })
    }

    fn advance(&self, by: Duration) {
        let ms = by.as_millis() as u64;
        self.unix_ms.fetch_add(ms, Ordering::SeqCst);
        self.mono_ms.fetch_add(ms, Ordering::SeqCst);
    }

    fn set_unix(&self, secs: u64) {
        self.unix_ms.store(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_time(&self) -> Duration {
        Duration::from_millis(self.unix_ms.load(Ordering::SeqCst))
    }

    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.mono_ms.load(Ordering::SeqCst))
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact token from raw header and payload JSON, signed by `sign`.
fn token_raw(header: &str, payload: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

fn token(header: Value, claims: Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    token_raw(&header.to_string(), &claims.to_string(), sign)
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "sub": "alice",
        "aud": "api",
        "exp": NOW + 600,
        "scope": "read write",
    })
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn hs(alg: &str, secret: &[u8]) -> impl FnOnce(&[u8]) -> Vec<u8> {
    let h = match alg {
        "HS256" => ring::hmac::HMAC_SHA256,
        "HS384" => ring::hmac::HMAC_SHA384,
        _ => ring::hmac::HMAC_SHA512,
    };
    let key = ring::hmac::Key::new(h, secret);
    move |msg| ring::hmac::sign(&key, msg).as_ref().to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    STANDARD.decode(body).unwrap()
}

fn rsa_key() -> RsaKeyPair {
    RsaKeyPair::from_pkcs8(&pem_der(RSA_PRIVATE_PEM)).unwrap()
}

fn rsa_sign<'a>(
    key: &'a RsaKeyPair,
    pad: &'static dyn signature::RsaEncoding,
) -> impl FnOnce(&[u8]) -> Vec<u8> + 'a {
    move |msg| {
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(pad, &SystemRandom::new(), msg, &mut sig).unwrap();
        sig
    }
}

fn rsa_padding(alg: &str) -> &'static dyn signature::RsaEncoding {
    match alg {
        "RS256" => &signature::RSA_PKCS1_SHA256,
        "RS384" => &signature::RSA_PKCS1_SHA384,
        "RS512" => &signature::RSA_PKCS1_SHA512,
        "PS256" => &signature::RSA_PSS_SHA256,
        "PS384" => &signature::RSA_PSS_SHA384,
        _ => &signature::RSA_PSS_SHA512,
    }
}

/// The RSA key as a JWK, with its modulus taken from ring (not from our DER reader).
fn rsa_jwk(kid: &str, alg: Option<&str>) -> Value {
    let parts: ring::rsa::PublicKeyComponents<Vec<u8>> = rsa_key().public().into();
    let mut jwk = json!({"kty": "RSA", "kid": kid, "n": b64(&parts.n), "e": b64(&parts.e)});
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    jwk
}

/// An ECDSA key generated by rcgen (whose PEM writer is independent of our parser).
struct EcKey {
    pair: EcdsaKeyPair,
    pem: String,
    crv: &'static str,
}

impl EcKey {
    fn p256() -> Self {
        Self::generate(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            "P-256",
        )
    }

    fn p384() -> Self {
        Self::generate(
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            "P-384",
        )
    }

    fn generate(
        rc: &'static rcgen::SignatureAlgorithm,
        alg: &'static signature::EcdsaSigningAlgorithm,
        crv: &'static str,
    ) -> Self {
        let kp = rcgen::KeyPair::generate_for(rc).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(alg, &kp.serialize_der(), &SystemRandom::new()).unwrap();
        Self {
            pair,
            pem: kp.public_key_pem(),
            crv,
        }
    }

    fn sign(&self) -> impl FnOnce(&[u8]) -> Vec<u8> + '_ {
        |msg| {
            self.pair
                .sign(&SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec()
        }
    }

    fn jwk(&self, kid: &str) -> Value {
        let point = self.pair.public_key().as_ref();
        let coord = (point.len() - 1) / 2;
        json!({
            "kty": "EC",
            "crv": self.crv,
            "kid": kid,
            "x": b64(&point[1..1 + coord]),
            "y": b64(&point[1 + coord..]),
        })
    }
}

struct EdKey {
    pair: Ed25519KeyPair,
    pem: String,
}

impl EdKey {
    fn generate() -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&kp.serialize_der()).unwrap();
        Self {
            pair,
            pem: kp.public_key_pem(),
        }
    }

    fn sign(&self) -> impl FnOnce(&[u8]) -> Vec<u8> + '_ {
        |msg| self.pair.sign(msg).as_ref().to_vec()
    }

    fn jwk(&self, kid: &str) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(self.pair.public_key().as_ref())})
    }
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn issuer(name: &str, keys: KeySource) -> IssuerConfig {
    IssuerConfig {
        issuer: name.into(),
        keys,
        audiences: vec!["api".into()],
    }
}

fn config(issuers: Vec<IssuerConfig>) -> VerifierConfig {
    VerifierConfig {
        issuers,
        ..VerifierConfig::default()
    }
}

fn verifier_at(keys: KeySource, clock: Arc<ManualClock>) -> Verifier {
    Verifier::with_clock(config(vec![issuer(ISS, keys)]), clock).unwrap()
}

fn verifier(keys: KeySource) -> Verifier {
    verifier_at(keys, ManualClock::at(NOW))
}

fn rsa_verifier() -> Verifier {
    verifier(KeySource::Pem(RSA_PUBLIC_PEM.into()))
}

fn header(alg: &str) -> Value {
    json!({"alg": alg, "typ": "JWT"})
}

fn header_kid(alg: &str, kid: &str) -> Value {
    json!({"alg": alg, "typ": "JWT", "kid": kid})
}

/// Replaces the signature with one that differs in its first byte.
fn corrupt_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[0] ^= 0x01;
    format!("{input}.{}", b64(&sig))
}

// --- every family verifies -------------------------------------------------------------

#[tokio::test]
async fn hmac_tokens_verify() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    for alg in ["HS256", "HS384", "HS512"] {
        let t = token(header(alg), claims(), hs(alg, SECRET));
        let ok = v.verify(&t).await.unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(ok.issuer, ISS);
        assert_eq!(ok.subject.as_deref(), Some("alice"));
        assert_eq!(ok.scopes, ["read", "write"]);
        assert_eq!(ok.claims["aud"], "api");
    }
}

#[tokio::test]
async fn rsa_tokens_verify_with_spki_and_pkcs1_pem() {
    let key = rsa_key();
    for pem in [RSA_PUBLIC_PEM, RSA_PUBLIC_PKCS1_PEM] {
        let v = verifier(KeySource::Pem(pem.into()));
        for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
            let t = token(header(alg), claims(), rsa_sign(&key, rsa_padding(alg)));
            v.verify(&t).await.unwrap_or_else(|e| panic!("{alg}: {e}"));
        }
    }
}

#[tokio::test]
async fn openssl_signed_tokens_verify() {
    let cfg = VerifierConfig {
        issuers: vec![issuer(OPENSSL_ISS, KeySource::Pem(RSA_PUBLIC_PEM.into()))],
        ..VerifierConfig::default()
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    for t in [OPENSSL_RS256, OPENSSL_PS256] {
        let ok = v.verify(t).await.unwrap();
        assert_eq!(ok.subject.as_deref(), Some("interop"));
    }
}

#[tokio::test]
async fn ecdsa_tokens_verify() {
    let p256 = EcKey::p256();
    let v = verifier(KeySource::Pem(p256.pem.clone()));
    v.verify(&token(header("ES256"), claims(), p256.sign()))
        .await
        .unwrap();

    let p384 = EcKey::p384();
    let v = verifier(KeySource::Pem(p384.pem.clone()));
    v.verify(&token(header("ES384"), claims(), p384.sign()))
        .await
        .unwrap();
}

#[tokio::test]
async fn eddsa_tokens_verify() {
    let ed = EdKey::generate();
    let v = verifier(KeySource::Pem(ed.pem.clone()));
    v.verify(&token(header("EdDSA"), claims(), ed.sign()))
        .await
        .unwrap();
}

#[tokio::test]
async fn certificate_pem_supplies_its_public_key() {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["issuer.example".into()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &kp.serialize_der(),
        &SystemRandom::new(),
    )
    .unwrap();
    let v = verifier(KeySource::Pem(cert.pem()));
    let t = token(header("ES256"), claims(), |m| {
        pair.sign(&SystemRandom::new(), m)
            .unwrap()
            .as_ref()
            .to_vec()
    });
    v.verify(&t).await.unwrap();
}

#[tokio::test]
async fn several_pem_keys_are_all_candidates() {
    let old = EcKey::p256();
    let new = EcKey::p256();
    let v = verifier(KeySource::Pem(format!("{}\n{}", old.pem, new.pem)));
    v.verify(&token(header("ES256"), claims(), old.sign()))
        .await
        .unwrap();
    // A `kid` means nothing to PEM keys and must not get in the way.
    v.verify(&token(
        header_kid("ES256", "whatever"),
        claims(),
        new.sign(),
    ))
    .await
    .unwrap();
}

// --- signatures ------------------------------------------------------------------------

#[tokio::test]
async fn wrong_signatures_are_rejected() {
    let rsa = rsa_key();
    let ec = EcKey::p256();
    let ed = EdKey::generate();
    let cases = [
        (
            verifier(KeySource::Secret(SECRET.to_vec())),
            token(header("HS256"), claims(), hs("HS256", SECRET)),
        ),
        (
            rsa_verifier(),
            token(
                header("RS256"),
                claims(),
                rsa_sign(&rsa, rsa_padding("RS256")),
            ),
        ),
        (
            rsa_verifier(),
            token(
                header("PS256"),
                claims(),
                rsa_sign(&rsa, rsa_padding("PS256")),
            ),
        ),
        (
            verifier(KeySource::Pem(ec.pem.clone())),
            token(header("ES256"), claims(), ec.sign()),
        ),
        (
            verifier(KeySource::Pem(ed.pem.clone())),
            token(header("EdDSA"), claims(), ed.sign()),
        ),
    ];
    for (v, good) in cases {
        v.verify(&good).await.unwrap();
        assert_eq!(
            v.verify(&corrupt_signature(&good)).await,
            Err(JwtError::BadSignature)
        );
        // Same signature, different claims.
        let (h, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged_claims = with(claims(), json!({"sub": "mallory"}));
        let forged = format!("{h}.{}.{sig}", b64(forged_claims.to_string().as_bytes()));
        assert_eq!(v.verify(&forged).await, Err(JwtError::BadSignature));
        // No signature at all.
        let (input, _) = good.rsplit_once('.').unwrap();
        assert_eq!(
            v.verify(&format!("{input}.")).await,
            Err(JwtError::BadSignature)
        );
    }
}

#[tokio::test]
async fn hmac_with_another_secret_is_rejected() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let other = b"another-secret-of-sufficient-length!!";
    let t = token(header("HS256"), claims(), hs("HS256", other));
    assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
}

#[tokio::test]
async fn alg_none_is_rejected_in_every_spelling() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    for alg in [
        "none", "None", "NONE", "nOnE", "", "hs256", "HS1", "RS1", "ES512",
    ] {
        let t = token(header(alg), claims(), |_| Vec::new());
        assert_eq!(
            v.verify(&t).await,
            Err(JwtError::UnsupportedAlgorithm),
            "{alg}"
        );
        let t = token(header(alg), claims(), hs("HS256", SECRET));
        assert_eq!(
            v.verify(&t).await,
            Err(JwtError::UnsupportedAlgorithm),
            "{alg}"
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let v = rsa_verifier();
    let pkcs1 = pem_der(RSA_PUBLIC_PKCS1_PEM);
    let parts: ring::rsa::PublicKeyComponents<Vec<u8>> = rsa_key().public().into();
    // Every byte string a confused verifier might use as the "secret".
    let secrets: [&[u8]; 5] = [
        RSA_PUBLIC_PEM.as_bytes(),
        RSA_PUBLIC_PEM.trim_end().as_bytes(),
        &pem_der(RSA_PUBLIC_PEM),
        &pkcs1,
        &parts.n,
    ];
    for secret in secrets {
        for alg in ["HS256", "HS384", "HS512"] {
            let t = token(header(alg), claims(), hs(alg, secret));
            assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmMismatch));
        }
    }
    // Same through a JWKS: the RSA JWK is not an HMAC key either.
    let v = verifier(KeySource::Jwks(jwks(&[rsa_jwk("r1", None)])));
    let t = token(
        header_kid("HS256", "r1"),
        claims(),
        hs("HS256", RSA_PUBLIC_PEM.as_bytes()),
    );
    assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmMismatch));
}

#[tokio::test]
async fn algorithm_must_fit_the_key_type() {
    let rsa = rsa_key();
    let ec = EcKey::p256();
    let p384 = EcKey::p384();
    let ed = EdKey::generate();

    // An RS token against an HMAC secret.
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let t = token(
        header("RS256"),
        claims(),
        rsa_sign(&rsa, rsa_padding("RS256")),
    );
    assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmMismatch));

    // ES256 against RSA, P-384 and Ed25519 keys; EdDSA against P-256.
    let es256 = token(header("ES256"), claims(), ec.sign());
    for pem in [RSA_PUBLIC_PEM, p384.pem.as_str(), ed.pem.as_str()] {
        let v = verifier(KeySource::Pem(pem.to_string()));
        assert_eq!(v.verify(&es256).await, Err(JwtError::AlgorithmMismatch));
    }
    let v = verifier(KeySource::Pem(ec.pem.clone()));
    let t = token(header("EdDSA"), claims(), ed.sign());
    assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmMismatch));
}

#[tokio::test]
async fn jwk_alg_pins_the_algorithm() {
    let rsa = rsa_key();
    let v = verifier(KeySource::Jwks(jwks(&[rsa_jwk("r1", Some("RS256"))])));
    let rs = token(
        header_kid("RS256", "r1"),
        claims(),
        rsa_sign(&rsa, rsa_padding("RS256")),
    );
    v.verify(&rs).await.unwrap();
    // Validly signed with the very same key, but not with the algorithm the JWK names.
    let ps = token(
        header_kid("PS256", "r1"),
        claims(),
        rsa_sign(&rsa, rsa_padding("PS256")),
    );
    assert_eq!(v.verify(&ps).await, Err(JwtError::AlgorithmMismatch));
}

#[tokio::test]
async fn kid_selects_the_key_in_a_jwks() {
    let a = EcKey::p256();
    let b = EcKey::p256();
    let ed = EdKey::generate();
    let v = verifier(KeySource::Jwks(jwks(&[
        a.jwk("a"),
        b.jwk("b"),
        ed.jwk("e"),
    ])));
    v.verify(&token(header_kid("ES256", "b"), claims(), b.sign()))
        .await
        .unwrap();
    v.verify(&token(header_kid("EdDSA", "e"), claims(), ed.sign()))
        .await
        .unwrap();
    // The right key under the wrong name.
    assert_eq!(
        v.verify(&token(header_kid("ES256", "a"), claims(), b.sign()))
            .await,
        Err(JwtError::BadSignature)
    );
    assert_eq!(
        v.verify(&token(header_kid("ES256", "zzz"), claims(), b.sign()))
            .await,
        Err(JwtError::UnknownKey)
    );
    assert_eq!(
        v.verify(&token(header_kid("ES256", "e"), claims(), b.sign()))
            .await,
        Err(JwtError::AlgorithmMismatch)
    );
    // Without `kid`, compatible keys are tried in turn.
    v.verify(&token(header("ES256"), claims(), b.sign()))
        .await
        .unwrap();
}

#[tokio::test]
async fn keys_tried_without_kid_are_bounded() {
    let keys: Vec<EcKey> = (0..3).map(|_| EcKey::p256()).collect();
    let doc = jwks(&keys.iter().map(|k| k.jwk("k")).collect::<Vec<_>>());
    let cfg = VerifierConfig {
        max_keys_without_kid: 2,
        ..config(vec![issuer(ISS, KeySource::Jwks(doc))])
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    for (i, key) in keys.iter().enumerate() {
        let result = v
            .verify(&token(header("ES256"), claims(), key.sign()))
            .await;
        if i < 2 {
            result.unwrap();
        } else {
            assert_eq!(result, Err(JwtError::BadSignature));
        }
    }
}

#[tokio::test]
async fn key_headers_in_the_token_are_ignored() {
    // An attacker's own key offered in the header does not make its signature acceptable.
    let attacker = EcKey::p256();
    let v = verifier(KeySource::Pem(EcKey::p256().pem));
    let h = json!({
        "alg": "ES256",
        "jwk": attacker.jwk("x"),
        "jku": "http://127.0.0.1:1/jwks",
        "x5u": "http://127.0.0.1:1/cert",
    });
    let t = token(h, claims(), attacker.sign());
    assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
}

// --- issuer and claims -----------------------------------------------------------------

#[tokio::test]
async fn issuer_must_be_configured_exactly() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    for iss in [
        json!("https://issuer.example/"),
        json!("https://ISSUER.example"),
        json!("https://evil.example"),
    ] {
        let t = token(
            header("HS256"),
            with(claims(), json!({ "iss": iss })),
            hs("HS256", SECRET),
        );
        assert_eq!(v.verify(&t).await, Err(JwtError::UnknownIssuer));
    }
    let t = token(
        header("HS256"),
        with(claims(), json!({"iss": 7})),
        hs("HS256", SECRET),
    );
    assert_eq!(
        v.verify(&t).await,
        Err(JwtError::InvalidClaim("iss".into()))
    );
    let t = token(
        header("HS256"),
        with(claims(), json!({"iss": null})),
        hs("HS256", SECRET),
    );
    assert_eq!(
        v.verify(&t).await,
        Err(JwtError::MissingClaim("iss".into()))
    );
}

#[tokio::test]
async fn each_issuer_is_verified_with_its_own_keys() {
    let a = EcKey::p256();
    let b = EcKey::p256();
    let cfg = config(vec![
        issuer("https://a.example", KeySource::Pem(a.pem.clone())),
        issuer("https://b.example", KeySource::Pem(b.pem.clone())),
    ]);
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    let as_b = with(claims(), json!({"iss": "https://b.example"}));
    // Signed by A's key while claiming to come from B.
    let t = token(header("ES256"), as_b.clone(), a.sign());
    assert_eq!(v.verify(&t).await, Err(JwtError::BadSignature));
    let ok = v
        .verify(&token(header("ES256"), as_b, b.sign()))
        .await
        .unwrap();
    assert_eq!(ok.issuer, "https://b.example");
}

#[tokio::test]
async fn exp_and_nbf_hold_exactly_at_the_leeway_boundary() {
    let clock = ManualClock::at(NOW);
    let cfg = VerifierConfig {
        leeway: Duration::from_secs(30),
        ..config(vec![issuer(ISS, KeySource::Secret(SECRET.to_vec()))])
    };
    let v = Verifier::with_clock(cfg, clock.clone()).unwrap();
    let sign = |c: Value| token(header("HS256"), c, hs("HS256", SECRET));

    // Accepted while now <= exp + leeway.
    let exp = NOW - 30;
    let t = sign(with(claims(), json!({ "exp": exp })));
    v.verify(&t).await.unwrap();
    assert_eq!(
        v.verify(&sign(with(claims(), json!({"exp": exp - 1}))))
            .await,
        Err(JwtError::Expired)
    );
    // The same boundary, approached by the clock.
    clock.set_unix(exp + 30 - 1);
    v.verify(&t).await.unwrap();
    clock.set_unix(exp + 30);
    v.verify(&t).await.unwrap();
    clock.set_unix(exp + 30 + 1);
    assert_eq!(v.verify(&t).await, Err(JwtError::Expired));
    clock.advance(Duration::from_millis(1));
    assert_eq!(v.verify(&t).await, Err(JwtError::Expired));

    // Accepted once now >= nbf - leeway.
    clock.set_unix(NOW);
    let nbf = NOW + 30;
    let t = sign(with(claims(), json!({ "nbf": nbf })));
    v.verify(&t).await.unwrap();
    assert_eq!(
        v.verify(&sign(with(claims(), json!({"nbf": nbf + 1}))))
            .await,
        Err(JwtError::NotYetValid)
    );
    let later = sign(with(claims(), json!({"nbf": nbf + 1})));
    clock.set_unix(nbf + 1 - 30);
    v.verify(&later).await.unwrap();

    // Fractional NumericDates count to the fraction.
    clock.set_unix(NOW);
    let half_past = sign(with(claims(), json!({"exp": NOW as f64 - 30.5})));
    assert_eq!(v.verify(&half_past).await, Err(JwtError::Expired));
    let half_to = sign(with(claims(), json!({"exp": NOW as f64 - 29.5})));
    v.verify(&half_to).await.unwrap();
}

#[tokio::test]
async fn exp_is_required_unless_configured_otherwise() {
    let t = token(
        header("HS256"),
        with(claims(), json!({"exp": null})),
        hs("HS256", SECRET),
    );
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    assert_eq!(
        v.verify(&t).await,
        Err(JwtError::MissingClaim("exp".into()))
    );
    let cfg = VerifierConfig {
        require_exp: false,
        ..config(vec![issuer(ISS, KeySource::Secret(SECRET.to_vec()))])
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    v.verify(&t).await.unwrap();
}

#[tokio::test]
async fn odd_time_claims_do_not_panic() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let sign = |payload: String| token_raw(r#"{"alg":"HS256"}"#, &payload, hs("HS256", SECRET));
    let base = format!(r#""iss":"{ISS}","aud":"api""#);
    let cases: [(&str, Result<(), JwtError>); 12] = [
        (
            r#""exp":"1700000600""#,
            Err(JwtError::InvalidClaim("exp".into())),
        ),
        (r#""exp":true"#, Err(JwtError::InvalidClaim("exp".into()))),
        (r#""exp":[1]"#, Err(JwtError::InvalidClaim("exp".into()))),
        (
            r#""exp":{"a":1}"#,
            Err(JwtError::InvalidClaim("exp".into())),
        ),
        (r#""exp":null"#, Err(JwtError::InvalidClaim("exp".into()))),
        (r#""exp":1e308"#, Ok(())),
        (r#""exp":184467440737095516150000"#, Ok(())),
        (r#""exp":-9223372036854775809"#, Err(JwtError::Expired)),
        (r#""exp":0"#, Err(JwtError::Expired)),
        (r#""exp":1e400"#, Err(JwtError::Malformed)),
        (r#""exp":1e308,"nbf":1e308"#, Err(JwtError::NotYetValid)),
        (
            r#""exp":1e308,"nbf":"later""#,
            Err(JwtError::InvalidClaim("nbf".into())),
        ),
    ];
    for (claim, expected) in cases {
        let t = sign(format!("{{{base},{claim}}}"));
        assert_eq!(v.verify(&t).await.map(|_| ()), expected, "{claim}");
    }
}

#[tokio::test]
async fn audience_is_checked_when_configured() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let sign = |aud: Value| {
        token(
            header("HS256"),
            with(claims(), json!({ "aud": aud })),
            hs("HS256", SECRET),
        )
    };
    v.verify(&sign(json!("api"))).await.unwrap();
    v.verify(&sign(json!(["other", "api"]))).await.unwrap();
    for aud in [json!("API"), json!("other"), json!(["x", "y"]), json!([])] {
        assert_eq!(v.verify(&sign(aud)).await, Err(JwtError::WrongAudience));
    }
    for aud in [json!(1), json!({"api": true})] {
        assert_eq!(
            v.verify(&sign(aud)).await,
            Err(JwtError::InvalidClaim("aud".into()))
        );
    }
    assert_eq!(
        v.verify(&sign(Value::Null)).await,
        Err(JwtError::MissingClaim("aud".into()))
    );

    // No audiences configured: `aud` is not looked at.
    let cfg = config(vec![IssuerConfig {
        audiences: Vec::new(),
        ..issuer(ISS, KeySource::Secret(SECRET.to_vec()))
    }]);
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    v.verify(&sign(json!("anything"))).await.unwrap();
    v.verify(&sign(Value::Null)).await.unwrap();
}

#[tokio::test]
async fn required_claims_must_be_present() {
    let cfg = VerifierConfig {
        required_claims: vec!["sub".into(), "tenant".into()],
        ..config(vec![issuer(ISS, KeySource::Secret(SECRET.to_vec()))])
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    let sign = |c: Value| token(header("HS256"), c, hs("HS256", SECRET));
    v.verify(&sign(with(claims(), json!({"tenant": "t1"}))))
        .await
        .unwrap();
    assert_eq!(
        v.verify(&sign(claims())).await,
        Err(JwtError::MissingClaim("tenant".into()))
    );
}

#[tokio::test]
async fn scopes_come_from_scope_and_scp() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let sign = |c: Value| token(header("HS256"), c, hs("HS256", SECRET));
    let cases = [
        (json!({"scope": "  a b\tc "}), vec!["a", "b", "c"]),
        (json!({"scope": null, "scp": ["x", "y", 3]}), vec!["x", "y"]),
        (json!({"scope": null, "scp": "x y"}), vec!["x", "y"]),
        (
            json!({"scope": "a b", "scp": ["b", "c"]}),
            vec!["a", "b", "c"],
        ),
        (json!({"scope": 5}), vec![]),
    ];
    for (patch, expected) in cases {
        let ok = v.verify(&sign(with(claims(), patch))).await.unwrap();
        assert_eq!(ok.scopes, expected);
    }
}

// --- hostile input ---------------------------------------------------------------------

#[tokio::test]
async fn oversized_tokens_are_refused_before_decoding() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let padding = "x".repeat(9000);
    let t = token(
        header("HS256"),
        with(claims(), json!({ "pad": padding })),
        hs("HS256", SECRET),
    );
    assert_eq!(v.verify(&t).await, Err(JwtError::TooLarge));
    assert_eq!(
        v.verify(&"a".repeat(8 * 1024 + 1)).await,
        Err(JwtError::TooLarge)
    );
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let v = verifier(KeySource::Secret(SECRET.to_vec()));
    let good = token(header("HS256"), claims(), hs("HS256", SECRET));
    let (h, rest) = good.split_once('.').unwrap();
    let (p, s) = rest.split_once('.').unwrap();
    let seg = |text: &str| b64(text.as_bytes());
    let cases: Vec<String> = vec![
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "a.b.c".into(),
        good.replacen('.', "", 1),
        format!("{good}."),
        format!("{h}.{p}.{s}.{s}.{s}"),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}=.{s}"),
        format!("{h}.{p}.{s}="),
        format!("{h}.{p}.{s}+"),
        format!(" {good}"),
        format!("{good}\n"),
        format!("{}.{p}.{s}", seg("not json")),
        format!("{}.{p}.{s}", seg("[\"alg\",\"HS256\"]")),
        format!("{}.{p}.{s}", seg("{\"alg\":256}")),
        format!("{}.{p}.{s}", seg("{\"typ\":\"JWT\"}")),
        format!("{}.{p}.{s}", seg("{\"alg\":\"HS256\",\"kid\":7}")),
        format!(
            "{}.{p}.{s}",
            seg("{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}")
        ),
        format!("{}.{p}.{s}", b64(&[0xff, 0xfe, 0x00])),
        format!("{h}.{}.{s}", seg("[1,2,3]")),
        format!("{h}.{}.{s}", seg("\"claims\"")),
        format!("{h}.{}.{s}", seg(&"[".repeat(5000))),
        format!(
            "{h}.{}.{s}",
            seg(&format!("{}1{}", "[".repeat(200), "]".repeat(200)))
        ),
        format!("{h}.{}.{s}", seg("{\"iss\":\"x\",")),
        format!("{h}.%%%.{s}"),
        format!("{h}.{p}.!!"),
        "é.é.é".into(),
    ];
    for t in cases {
        let result = v.verify(&t).await;
        assert!(
            matches!(
                result,
                Err(JwtError::Malformed | JwtError::BadSignature | JwtError::TooLarge)
            ),
            "{t:?} gave {result:?}"
        );
    }
}

#[tokio::test]
async fn no_mutation_of_a_valid_token_verifies_or_panics() {
    let ec = EcKey::p256();
    let v = verifier(KeySource::Pem(ec.pem.clone()));
    let good = token(header("ES256"), claims(), ec.sign());
    v.verify(&good).await.unwrap();
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \u{e9}"
            .chars()
            .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..3000 {
        let mut chars: Vec<char> = good.chars().collect();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(..chars.len());
            match rng.u8(..3) {
                0 => chars[i] = alphabet[rng.usize(..alphabet.len())],
                1 => {
                    chars.remove(i);
                }
                _ => chars.insert(i, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        let mutated: String = chars.into_iter().collect();
        if mutated != good {
            assert!(v.verify(&mutated).await.is_err(), "{mutated}");
        }
    }
    for _ in 0..500 {
        let len = rng.usize(..300);
        let junk: String = (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        assert!(v.verify(&junk).await.is_err());
    }
}

#[test]
fn errors_display_without_token_contents() {
    assert_eq!(JwtError::BadSignature.to_string(), "invalid signature");
    assert_eq!(
        JwtError::MissingClaim("exp".into()).to_string(),
        "missing claim `exp`"
    );
    let debug = format!("{:?}", KeySource::Secret(SECRET.to_vec()));
    assert!(!debug.contains("0123"), "{debug}");
}

// --- configuration ---------------------------------------------------------------------

#[test]
fn configuration_errors_name_the_problem() {
    let err = |keys: KeySource| {
        Verifier::new(config(vec![issuer(ISS, keys)]))
            .map(|_| ())
            .unwrap_err()
    };
    assert!(err(KeySource::Secret(b"short".to_vec())).contains("at least 32"));
    assert!(err(KeySource::Pem(RSA_PRIVATE_PEM.into())).contains("private key"));
    assert!(err(KeySource::Pem(RSA_1024_PUBLIC_PEM.into())).contains("1024 bits"));
    assert!(err(KeySource::Pem("hello".into())).contains("no PEM public key"));
    assert!(
        err(KeySource::Pem(
            "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n".into()
        ))
        .contains("base64")
    );
    assert!(
        err(KeySource::Pem(
            "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n".into()
        ))
        .contains("SubjectPublicKeyInfo")
    );
    assert!(err(KeySource::Pem(RSA_PUBLIC_PEM.replace("-----END", "----"))).contains("END"));
    assert!(err(KeySource::Jwks("{".into())).contains("not valid JSON"));
    assert!(err(KeySource::Jwks("{}".into())).contains("`keys` array"));
    assert!(err(KeySource::Jwks(jwks(&[]))).contains("no usable signing key"));
    assert!(
        err(KeySource::Jwks(jwks(&[json!({"kty": "RSA", "n": "AQAB"})])))
            .contains("`e` is missing")
    );
    let mut bad_alg = rsa_jwk("r", None);
    bad_alg["alg"] = json!("ES256");
    assert!(err(KeySource::Jwks(jwks(&[bad_alg]))).contains("does not fit"));
    let url = |url: &str| KeySource::JwksUrl {
        url: url.into(),
        cache_ttl: DEFAULT_JWKS_CACHE_TTL,
        min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
    };
    assert!(err(url("ftp://example.com/jwks")).contains("http or https"));
    assert!(err(url("not a url")).contains("invalid"));
    assert!(Verifier::new(config(vec![issuer(ISS, url(&format!("{ISS}/jwks")))])).is_ok());

    let dup = config(vec![
        issuer(ISS, KeySource::Secret(SECRET.to_vec())),
        issuer(ISS, KeySource::Secret(SECRET.to_vec())),
    ]);
    assert!(Verifier::new(dup).unwrap_err().contains("twice"));
    assert!(Verifier::new(config(Vec::new())).is_err());
}

#[test]
fn jwks_skips_keys_it_cannot_use() {
    let ec = EcKey::p256();
    let doc = jwks(&[
        json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}),
        json!({"kty": "RSA", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"}),
        json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
        json!({"kty": "OKP", "crv": "X25519", "x": "AA"}),
        json!({"kty": "EC", "crv": "P-256", "key_ops": ["encrypt"], "x": "AA", "y": "AA"}),
        ec.jwk("good"),
    ]);
    let v = Verifier::new(config(vec![issuer(ISS, KeySource::Jwks(doc))])).unwrap();
    assert!(format!("{v:?}").contains(ISS));
}

#[tokio::test]
async fn inline_jwks_accepts_oct_keys() {
    let doc = jwks(&[json!({"kty": "oct", "kid": "h", "k": b64(SECRET)})]);
    let v = verifier(KeySource::Jwks(doc));
    v.verify(&token(
        header_kid("HS256", "h"),
        claims(),
        hs("HS256", SECRET),
    ))
    .await
    .unwrap();
}

// --- remote JWKS -----------------------------------------------------------------------

#[derive(Clone)]
enum Reply {
    Body(String),
    Status(u16),
    Hang,
}

/// A JWKS endpoint on 127.0.0.1 that counts its requests.
struct MockJwks {
    url: String,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Reply>>,
    task: tokio::task::JoinHandle<()>,
}

impl MockJwks {
    async fn start(reply: Reply) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let hits = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(Mutex::new(reply));
        let (h, r) = (hits.clone(), reply.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, r) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let reply = r.lock().unwrap().clone();
                        async move {
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            match reply {
                                Reply::Body(body) => *response.body_mut() = Full::new(body.into()),
                                Reply::Status(code) => {
                                    *response.status_mut() =
                                        http::StatusCode::from_u16(code).unwrap();
                                }
                                Reply::Hang => std::future::pending::<()>().await,
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url,
            hits,
            reply,
            task,
        }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for MockJwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TTL: Duration = Duration::from_secs(300);
const INTERVAL: Duration = Duration::from_secs(10);

fn remote_config(url: &str) -> VerifierConfig {
    config(vec![issuer(
        ISS,
        KeySource::JwksUrl {
            url: url.into(),
            cache_ttl: TTL,
            min_refresh_interval: INTERVAL,
        },
    )])
}

fn remote_verifier(mock: &MockJwks, clock: Arc<ManualClock>) -> Verifier {
    Verifier::with_clock(remote_config(&mock.url), clock).unwrap()
}

async fn settle(v: &Verifier) {
    v.remote(ISS).unwrap().settle().await;
}

#[tokio::test]
async fn remote_jwks_picks_up_a_rotated_key() {
    let (k1, k2) = (EcKey::p256(), EcKey::p256());
    let mock = MockJwks::start(Reply::Body(jwks(&[k1.jwk("k1")]))).await;
    let clock = ManualClock::at(NOW);
    let v = remote_verifier(&mock, clock.clone());
    let t1 = token(header_kid("ES256", "k1"), claims(), k1.sign());
    let t2 = token(header_kid("ES256", "k2"), claims(), k2.sign());

    v.verify(&t1).await.unwrap();
    v.verify(&t1).await.unwrap();
    assert_eq!(mock.hits(), 1, "cached after the first fetch");

    mock.set(Reply::Body(jwks(&[k1.jwk("k1"), k2.jwk("k2")])));
    // Too soon after the last fetch to look again.
    assert_eq!(v.verify(&t2).await, Err(JwtError::UnknownKey));
    assert_eq!(mock.hits(), 1);

    clock.advance(INTERVAL);
    v.verify(&t2).await.unwrap();
    assert_eq!(mock.hits(), 2, "the unknown kid triggered one refresh");
    v.verify(&t1).await.unwrap();

    // k1 retired; after the TTL a background refresh notices.
    mock.set(Reply::Body(jwks(&[k2.jwk("k2")])));
    clock.advance(TTL);
    v.verify(&t1).await.unwrap(); // still cached while the refresh runs
    settle(&v).await;
    assert_eq!(mock.hits(), 3);
    assert_eq!(v.verify(&t1).await, Err(JwtError::UnknownKey));
    v.verify(&t2).await.unwrap();
    assert_eq!(mock.hits(), 3);
}

#[tokio::test]
async fn failed_refresh_keeps_the_cached_keys() {
    let k1 = EcKey::p256();
    let mock = MockJwks::start(Reply::Body(jwks(&[k1.jwk("k1")]))).await;
    let clock = ManualClock::at(NOW);
    let v = remote_verifier(&mock, clock.clone());
    // The clock moves on by several TTLs here.
    let long_lived = with(claims(), json!({"exp": NOW + 86_400}));
    let t1 = token(header_kid("ES256", "k1"), long_lived.clone(), k1.sign());
    v.verify(&t1).await.unwrap();

    for broken in [
        Reply::Status(500),
        Reply::Body("<html>oops</html>".into()),
        Reply::Body(jwks(&[])),
    ] {
        mock.set(broken);
        clock.advance(TTL);
        let before = mock.hits();
        v.verify(&t1).await.unwrap();
        settle(&v).await;
        assert_eq!(mock.hits(), before + 1);
        v.verify(&t1).await.unwrap();
        // An unknown kid may not even retry before the interval passes.
        let stranger = token(header_kid("ES256", "k9"), long_lived.clone(), k1.sign());
        assert_eq!(v.verify(&stranger).await, Err(JwtError::UnknownKey));
        assert_eq!(mock.hits(), before + 1);
    }
}

#[tokio::test]
async fn unreachable_jwks_is_retried_only_after_the_interval() {
    let k1 = EcKey::p256();
    let mock = MockJwks::start(Reply::Status(503)).await;
    let clock = ManualClock::at(NOW);
    let v = remote_verifier(&mock, clock.clone());
    let t1 = token(header_kid("ES256", "k1"), claims(), k1.sign());
    assert_eq!(v.verify(&t1).await, Err(JwtError::KeysUnavailable));
    assert_eq!(v.verify(&t1).await, Err(JwtError::KeysUnavailable));
    assert_eq!(mock.hits(), 1);

    mock.set(Reply::Body(jwks(&[k1.jwk("k1")])));
    clock.advance(INTERVAL - Duration::from_millis(1));
    assert_eq!(v.verify(&t1).await, Err(JwtError::KeysUnavailable));
    assert_eq!(mock.hits(), 1);
    clock.advance(Duration::from_millis(1));
    v.verify(&t1).await.unwrap();
    assert_eq!(mock.hits(), 2);
}

#[tokio::test]
async fn remote_oct_keys_are_not_trusted() {
    let doc = jwks(&[json!({"kty": "oct", "kid": "h", "k": b64(SECRET)})]);
    let mock = MockJwks::start(Reply::Body(doc)).await;
    let v = remote_verifier(&mock, ManualClock::at(NOW));
    let t = token(header_kid("HS256", "h"), claims(), hs("HS256", SECRET));
    assert_eq!(v.verify(&t).await, Err(JwtError::KeysUnavailable));
}

#[tokio::test]
async fn oversized_jwks_is_refused() {
    let k1 = EcKey::p256();
    let mut doc = jwks(&[k1.jwk("k1")]);
    doc.push_str(&" ".repeat(4096));
    let mock = MockJwks::start(Reply::Body(doc)).await;
    let cfg = VerifierConfig {
        jwks_max_bytes: 1024,
        ..remote_config(&mock.url)
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    let t = token(header_kid("ES256", "k1"), claims(), k1.sign());
    assert_eq!(v.verify(&t).await, Err(JwtError::KeysUnavailable));
    assert_eq!(mock.hits(), 1);
}

#[tokio::test]
async fn hanging_jwks_times_out() {
    let k1 = EcKey::p256();
    let mock = MockJwks::start(Reply::Hang).await;
    let cfg = VerifierConfig {
        jwks_fetch_timeout: Duration::from_millis(200),
        ..remote_config(&mock.url)
    };
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    let t = token(header_kid("ES256", "k1"), claims(), k1.sign());
    let started = std::time::Instant::now();
    assert_eq!(v.verify(&t).await, Err(JwtError::KeysUnavailable));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_unknown_kids_causes_bounded_fetches() {
    let k1 = EcKey::p256();
    let mock = MockJwks::start(Reply::Body(jwks(&[k1.jwk("k1")]))).await;
    let clock = ManualClock::at(NOW);
    let v = Arc::new(remote_verifier(&mock, clock.clone()));
    let flood = |seed: u64| {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..200)
            .map(|_| {
                let kid = format!("{:016x}", rng.u64(..));
                token(header_kid("ES256", &kid), claims(), k1.sign())
            })
            .collect::<Vec<_>>()
    };
    let run = |tokens: Vec<String>| {
        let v = v.clone();
        async move {
            let tasks: Vec<_> = tokens
                .into_iter()
                .map(|t| {
                    let v = v.clone();
                    tokio::spawn(async move { v.verify(&t).await })
                })
                .collect();
            for task in tasks {
                assert_eq!(task.await.unwrap(), Err(JwtError::UnknownKey));
            }
        }
    };

    // From a cold cache: the first fetch is shared by all, and none may refresh after it.
    run(flood(1)).await;
    assert_eq!(mock.hits(), 1);

    // Once the interval has passed: one refresh, shared by all.
    clock.advance(INTERVAL);
    run(flood(2)).await;
    assert_eq!(mock.hits(), 2);

    // And the genuine key still works throughout.
    let t1 = token(header_kid("ES256", "k1"), claims(), k1.sign());
    v.verify(&t1).await.unwrap();
    assert_eq!(mock.hits(), 2);
}

/// An HTTPS server on 127.0.0.1 with a fresh self-signed certificate; returns its URL and
/// the certificate.
async fn tls_jwks_server(
    body: String,
) -> (
    String,
    rustls::pki_types::CertificateDer<'static>,
    tokio::task::JoinHandle<()>,
) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let der = cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/jwks", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, der, task)
}

#[tokio::test]
async fn https_jwks_is_fetched_over_verified_tls() {
    let k1 = EcKey::p256();
    let (url, cert, task) = tls_jwks_server(jwks(&[k1.jwk("k1")])).await;
    let uri: http::Uri = url.parse().unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let trusting = remote::Fetcher::with_roots(Duration::from_secs(5), 1 << 20, roots).unwrap();
    let body = trusting.get(&uri, "application/json").await.unwrap();
    assert!(body.contains("\"k1\""), "{body}");

    // The production client trusts the public roots only, so a self-signed server fails
    // the handshake and the keys stay unavailable.
    let public = remote::Fetcher::new(Duration::from_secs(5), 1 << 20).unwrap();
    let err = public.get(&uri, "application/json").await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    let cfg = remote_config(&url);
    let v = Verifier::with_clock(cfg, ManualClock::at(NOW)).unwrap();
    let t = token(header_kid("ES256", "k1"), claims(), k1.sign());
    assert_eq!(v.verify(&t).await, Err(JwtError::KeysUnavailable));
    task.abort();
}

#[tokio::test]
async fn discovery_over_https_refuses_a_plain_http_jwks_uri() {
    let doc = |jwks_uri: &str| json!({"issuer": ISS, "jwks_uri": jwks_uri}).to_string();
    let trusting = |cert| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        remote::Fetcher::with_roots(Duration::from_secs(5), 1 << 20, roots).unwrap()
    };
    let remote = |url: &str, fetcher| {
        remote::RemoteJwks::new(
            ISS.into(),
            Location::Discovery(url.parse().unwrap()),
            TTL,
            INTERVAL,
            fetcher,
            ManualClock::at(NOW),
        )
    };

    // An https document may not send the keys over plain http, where they can be swapped.
    let (url, cert, task) = tls_jwks_server(doc("http://127.0.0.1:9/keys")).await;
    let err = remote(&url, trusting(cert)).fetch().await.unwrap_err();
    assert!(err.contains("plain-http jwks_uri"), "{err}");
    task.abort();

    // A document without `jwks_uri`, or naming no issuer, gives no keys.
    let (url, cert, task) = tls_jwks_server(json!({"issuer": ISS}).to_string()).await;
    let err = remote(&url, trusting(cert)).fetch().await.unwrap_err();
    assert!(err.contains("no `jwks_uri`"), "{err}");
    task.abort();
    let (url, cert, task) =
        tls_jwks_server(json!({"jwks_uri": "https://x.test/k"}).to_string()).await;
    let err = remote(&url, trusting(cert)).fetch().await.unwrap_err();
    assert!(err.contains("names issuer none"), "{err}");
    task.abort();
}
