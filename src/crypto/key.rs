//! Secret key material and the random source that fills it.

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::locked::LockedPage;
use super::CryptoError;

/// Length in bytes of every symmetric key localkms holds (root key, KEKs, derived keys).
pub const KEY_LEN: usize = 32;

/// 32 bytes of key material that is wiped when dropped.
///
/// The bytes live in one heap allocation that is filled in place and never moved, so no stray
/// copy is left on the stack or in a reallocated buffer. Long-lived keys (KEKs, root keys) get
/// a page of their own, locked in memory and excluded from core dumps; short-lived per-message
/// keys skip the two system calls that costs. Deliberately without `Debug`, `Display` or
/// `Clone`: key material cannot be formatted into a log line or duplicated by accident.
pub struct SecretKey(Storage);

enum Storage {
    Locked(Box<LockedPage>),
    Ephemeral(Box<Zeroizing<[u8; KEY_LEN]>>),
}

impl SecretKey {
    /// Draws a fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Self::zeroed();
        fill_random(key.expose_mut())?;
        Ok(key)
    }

    /// Copies exactly [`KEY_LEN`] bytes into a new key; `None` when the length is wrong.
    ///
    /// The caller stays responsible for wiping its own copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut key = Self::zeroed();
        key.expose_mut().copy_from_slice(bytes);
        Some(key)
    }

    /// A long-lived key of zeros in a locked page, to be filled in place.
    pub(crate) fn zeroed() -> Self {
        SecretKey(Storage::Locked(LockedPage::new()))
    }

    /// A short-lived key of zeros (per-message keys), to be filled in place.
    pub(crate) fn zeroed_ephemeral() -> Self {
        SecretKey(Storage::Ephemeral(Box::new(Zeroizing::new([0u8; KEY_LEN]))))
    }

    /// The raw bytes, for the primitives in this module and for sealing into the keystore body.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        match &self.0 {
            Storage::Locked(page) => page.bytes(),
            Storage::Ephemeral(bytes) => bytes,
        }
    }

    /// Mutable access for code that fills a key in place (derivation, keystore decoding).
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; KEY_LEN] {
        match &mut self.0 {
            Storage::Locked(page) => page.bytes_mut(),
            Storage::Ephemeral(bytes) => bytes,
        }
    }
}

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| CryptoError::Random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().expect("rng");
        let b = SecretKey::generate().expect("rng");
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose(), &[0u8; KEY_LEN]);
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(SecretKey::from_slice(&[1u8; 31]).is_none());
        assert!(SecretKey::from_slice(&[1u8; 33]).is_none());
        let k = SecretKey::from_slice(&[7u8; 32]).expect("32 bytes");
        assert_eq!(k.expose(), &[7u8; 32]);
    }
}
