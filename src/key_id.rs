//! Key-encryption-key identifiers: the public `key_id` the apiserver stores beside every object.

use std::fmt;

use time::OffsetDateTime;

use crate::crypto::{fill_random, CryptoError};

/// Longest key id localkms accepts; keeps ciphertexts far below the apiserver's 1024-byte cap.
pub const MAX_KEY_ID_LEN: usize = 64;

/// A KEK's public, stable identifier, such as `kek-20261126-3f2a9c1e`.
///
/// Parsed once at the boundary ("parse, don't validate"): every `KeyId` in the program is
/// 1–64 bytes of lowercase ASCII letters, digits, `-`, `_` or `.`, so it is safe to log, to put in a
/// ciphertext header and to hand to the apiserver. It carries no secret.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KeyId(String);

/// Why a string is not a key id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyIdError {
    /// Empty ids cannot name a key.
    #[error("key id is empty")]
    Empty,
    /// Longer than [`MAX_KEY_ID_LEN`].
    #[error("key id is {0} bytes long; at most {MAX_KEY_ID_LEN} are allowed")]
    TooLong(usize),
    /// Contains a byte outside `[a-z0-9._-]`.
    #[error("key id may only contain lowercase letters, digits, '-', '_' and '.'")]
    BadCharacter,
}

impl KeyId {
    /// Checks `s` and wraps it.
    pub fn parse(s: &str) -> Result<Self, KeyIdError> {
        if s.is_empty() {
            return Err(KeyIdError::Empty);
        }
        if s.len() > MAX_KEY_ID_LEN {
            return Err(KeyIdError::TooLong(s.len()));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        }) {
            return Err(KeyIdError::BadCharacter);
        }
        Ok(KeyId(s.to_owned()))
    }

    /// A new id `kek-YYYYMMDD-xxxxxxxx`: the creation date for humans, 32 random bits so two
    /// nodes creating keys on the same day do not collide. Callers check uniqueness in their
    /// keystore.
    pub fn generate(now: OffsetDateTime) -> Result<Self, CryptoError> {
        let mut rnd = [0u8; 4];
        fill_random(&mut rnd)?;
        Ok(KeyId(format!(
            "kek-{:04}{:02}{:02}-{:08x}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            u32::from_be_bytes(rnd)
        )))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so `{:<24}` in tables aligns.
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn generated_ids_have_the_documented_shape() {
        let id = KeyId::generate(datetime!(2026-11-26 12:00 UTC)).expect("rng");
        let s = id.as_str();
        assert!(s.starts_with("kek-20261126-"), "{s}");
        assert_eq!(s.len(), "kek-20261126-3f2a9c1e".len());
        assert_eq!(KeyId::parse(s).expect("valid"), id);
    }

    #[test]
    fn parse_rejects_bad_ids() {
        assert_eq!(KeyId::parse(""), Err(KeyIdError::Empty));
        assert_eq!(KeyId::parse(&"a".repeat(65)), Err(KeyIdError::TooLong(65)));
        assert_eq!(KeyId::parse("KEK"), Err(KeyIdError::BadCharacter));
        assert_eq!(KeyId::parse("a b"), Err(KeyIdError::BadCharacter));
        assert!(KeyId::parse(&"a".repeat(64)).is_ok());
    }
}
