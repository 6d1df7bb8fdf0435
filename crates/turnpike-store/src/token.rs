//! Admin token secrets: generated from the OS random source, stored only as SHA-256.

use ring::rand::SecureRandom;

use crate::error::{Result, StoreError};

/// Every secret starts with this, so secret scanners and humans recognise a leaked token.
pub const TOKEN_PREFIX: &str = "tp_";

/// A new secret: the prefix and 32 random bytes in hex (256 bits: not guessable, so a plain
/// hash without salt or stretching is enough, and lookups can go by hash).
pub(crate) fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StoreError::Other("the OS random source failed".into()))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

/// What the store keeps of a token secret: its SHA-256, in lower-case hex. Public so that
/// other high-entropy secrets (API keys) are kept the same way.
pub fn sha256_hex(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_are_fresh_and_hash_is_sha256() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
