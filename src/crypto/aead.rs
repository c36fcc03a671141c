//! AES-256-GCM sealing in place and HKDF-SHA256 key derivation.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use ring::hkdf;

use super::{CryptoError, SecretKey};

/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// AES-GCM authentication tag length in bytes.
pub const TAG_LEN: usize = 16;

/// Encrypts `buf` in place under `key`, binding `aad`, and returns the tag.
///
/// In place so the plaintext is never copied into a second buffer that would need wiping.
pub fn seal_in_place(
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoError> {
    let cipher = Aes256Gcm::new(key.expose().into());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        .map_err(|_| CryptoError::Authentication)?;
    Ok(tag.into())
}

/// Verifies `tag` over `aad` and `buf`, then decrypts `buf` in place.
///
/// On failure `buf` holds no plaintext: the tag is checked before anything is decrypted.
pub fn open_in_place(
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), CryptoError> {
    let cipher = Aes256Gcm::new(key.expose().into());
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
        .map_err(|_| CryptoError::Authentication)
}

/// Derives a 32-byte key from `ikm` with HKDF-SHA256 (RFC 5869), using `salt` and `info`.
pub fn derive_key(ikm: &SecretKey, salt: &[u8], info: &[u8]) -> Result<SecretKey, CryptoError> {
    let mut out = SecretKey::zeroed_ephemeral();
    hkdf_sha256(ikm.expose(), salt, info, out.expose_mut())?;
    Ok(out)
}

/// HKDF-SHA256 extract-and-expand of `ikm` into `out` (at most 255 × 32 bytes).
fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| CryptoError::Derivation)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5869 appendix A, test case 1: proves the salt, IKM and info reach HKDF in the
    /// right roles.
    #[test]
    fn hkdf_matches_rfc5869_case_1() {
        let ikm = [0x0b_u8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf_sha256(&ikm, &salt, &info, &mut okm).expect("hkdf");
        let expected =
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn derived_keys_depend_on_salt() {
        let ikm = SecretKey::from_slice(&[9u8; 32]).expect("32 bytes");
        let a = derive_key(&ikm, b"salt-a", b"info").expect("derive");
        let b = derive_key(&ikm, b"salt-b", b"info").expect("derive");
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = SecretKey::generate().expect("rng");
        let nonce = [3u8; NONCE_LEN];
        let mut buf = *b"thirty-two bytes of data seed!!!";
        let tag = seal_in_place(&key, &nonce, b"aad", &mut buf).expect("seal");
        assert_ne!(&buf, b"thirty-two bytes of data seed!!!");
        let mut copy = buf;
        assert!(open_in_place(&key, &nonce, b"aaX", &mut copy, &tag).is_err());
        open_in_place(&key, &nonce, b"aad", &mut buf, &tag).expect("open");
        assert_eq!(&buf, b"thirty-two bytes of data seed!!!");
    }
}
