//! The ciphertext format returned to the apiserver: a self-describing, versioned envelope.
//!
//! ```text
//! offset        size  field
//! 0             1     format version: 2 = a KMS v2 seed, 3 = a KMS v1 DEK (1 = written by
//!                     builds before the API was bound in; accepted by both APIs)
//! 1             1     key id length L (1..=64)
//! 2             L     key id (ASCII)
//! 2+L           16    salt: random per message
//! 18+L          12    nonce: random per message
//! 30+L          n     AES-256-GCM ciphertext of the plaintext
//! 30+L+n        16    GCM tag
//! ```
//! The header (everything before the ciphertext) is the AAD, so the version, key id, salt and
//! nonce cannot be altered without failing authentication. Because the version names the API
//! that sealed it, a KMS v1 DEK ciphertext cannot be passed off as a KMS v2 seed or the other
//! way round. Each message is sealed under its own
//! key, HKDF-SHA256(KEK, salt, "localkms/envelope/v1"), so the 2^32-messages bound on random
//! 96-bit nonces applies per message key rather than per KEK. A 32-byte seed under a 21-byte
//! key id takes 99 bytes.

use zeroize::Zeroizing;

use super::aead::derive_key;
use super::{
    fill_random, open_in_place, seal_in_place, CryptoError, SecretKey, NONCE_LEN, TAG_LEN,
};
use crate::key_id::{KeyId, KeyIdError};

/// The envelope version written before ciphertexts were bound to their API: still read, by
/// both APIs, so data stored by earlier builds keeps decrypting.
pub const FORMAT_LEGACY: u8 = 1;
/// The newest format this build writes (for KMS v2; KMS v1 writes the version after it).
pub const FORMAT_VERSION: u8 = 2;

/// Which KMS API a ciphertext belongs to; bound into the envelope's authenticated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// KMS v1 (`v1beta1`): the apiserver's per-object DEK.
    V1,
    /// KMS v2: the apiserver's DEK seed.
    V2,
}

impl Api {
    fn version(self) -> u8 {
        match self {
            Api::V2 => 2,
            Api::V1 => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Api::V1 => "KMS v1",
            Api::V2 => "KMS v2",
        }
    }
}
/// The apiserver discards ciphertexts longer than this.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// Per-message salt length.
pub const SALT_LEN: usize = 16;
const INFO: &[u8] = b"localkms/envelope/v1";

/// Why a plaintext cannot be sealed or a ciphertext cannot be opened.
///
/// Messages describe the input's shape only; they never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Nothing to encrypt.
    #[error("plaintext is empty")]
    EmptyPlaintext,
    /// The sealed result would exceed [`MAX_CIPHERTEXT_LEN`].
    #[error("plaintext is {len} bytes; at most {max} bytes fit in a {MAX_CIPHERTEXT_LEN}-byte ciphertext")]
    PlaintextTooLarge {
        /// Bytes received.
        len: usize,
        /// Largest plaintext that fits under the current key id.
        max: usize,
    },
    /// Nothing to decrypt.
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    /// Longer than any ciphertext localkms produces.
    #[error(
        "ciphertext is {0} bytes; localkms ciphertexts are at most {MAX_CIPHERTEXT_LEN} bytes"
    )]
    CiphertextTooLarge(usize),
    /// First byte names a format this build does not know.
    #[error("ciphertext has format version {0}; this build reads versions 1 to 3 only (was it made by another KMS plugin?)")]
    UnknownVersion(u8),
    /// Sealed for the other API.
    #[error("ciphertext was sealed by {sealed} and cannot be opened through {asked}")]
    WrongApi {
        /// The API that sealed it.
        sealed: &'static str,
        /// The API asked to open it.
        asked: &'static str,
    },
    /// Shorter than its own header says it must be.
    #[error("ciphertext is truncated: {len} bytes, but its header needs at least {need}")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes the header implies.
        need: usize,
    },
    /// The key id field is not a valid key id.
    #[error("ciphertext header holds an invalid key id: {0}")]
    BadKeyId(#[from] KeyIdError),
    /// The tag did not verify: tampered, corrupted, or sealed under a different KEK.
    #[error("ciphertext failed authentication: it was altered, corrupted, or sealed under a different key with the same id")]
    Tampered,
    /// The primitives failed (random source).
    #[error(transparent)]
    Crypto(CryptoError),
}

/// Bytes an envelope adds around a plaintext for a key id of `key_id_len` bytes.
pub const fn overhead(key_id_len: usize) -> usize {
    2 + key_id_len + SALT_LEN + NONCE_LEN + TAG_LEN
}

/// The largest plaintext [`seal`] accepts under `key_id`.
pub fn max_plaintext_len(key_id: &KeyId) -> usize {
    MAX_CIPHERTEXT_LEN - overhead(key_id.as_str().len())
}

/// Seals `plaintext` for `api` under `kek`, naming `key_id` in the header.
pub fn seal(
    kek: &SecretKey,
    key_id: &KeyId,
    plaintext: &[u8],
    api: Api,
) -> Result<Vec<u8>, EnvelopeError> {
    // One draw from the OS for both (one system call per message, not two).
    let mut random = [0u8; SALT_LEN + NONCE_LEN];
    fill_random(&mut random).map_err(EnvelopeError::Crypto)?;
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    salt.copy_from_slice(&random[..SALT_LEN]);
    nonce.copy_from_slice(&random[SALT_LEN..]);
    seal_with(kek, key_id, plaintext, &salt, &nonce, api.version())
}

/// [`seal`] with caller-chosen salt, nonce and version byte: for frozen test vectors only.
fn seal_with(
    kek: &SecretKey,
    key_id: &KeyId,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
    version: u8,
) -> Result<Vec<u8>, EnvelopeError> {
    if plaintext.is_empty() {
        return Err(EnvelopeError::EmptyPlaintext);
    }
    let max = max_plaintext_len(key_id);
    if plaintext.len() > max {
        return Err(EnvelopeError::PlaintextTooLarge {
            len: plaintext.len(),
            max,
        });
    }
    let id = key_id.as_str().as_bytes();
    // Holds plaintext until sealed in place: wiped if anything fails before that.
    let mut out = Zeroizing::new(Vec::with_capacity(overhead(id.len()) + plaintext.len()));
    out.push(version);
    // KeyId guarantees 1..=64 bytes, so the length fits in one byte.
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(salt);
    out.extend_from_slice(nonce);
    let header_len = out.len();
    out.extend_from_slice(plaintext);
    let message_key = derive_key(kek, salt, INFO).map_err(EnvelopeError::Crypto)?;
    let (header, body) = out.split_at_mut(header_len);
    let tag = seal_in_place(&message_key, nonce, header, body).map_err(EnvelopeError::Crypto)?;
    out.extend_from_slice(&tag);
    // Only sealed bytes remain; hand them out without a copy.
    Ok(std::mem::take(&mut *out))
}

/// A parsed, not yet authenticated, ciphertext.
///
/// Parsing first lets the caller find the KEK by id (and check the request's key_id) before
/// any cryptography runs.
pub struct Envelope<'a> {
    version: u8,
    key_id: KeyId,
    header: &'a [u8],
    salt: &'a [u8; SALT_LEN],
    nonce: &'a [u8; NONCE_LEN],
    body: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> Envelope<'a> {
    /// Splits `bytes` into header fields, checking every length before it is used.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        let len = bytes.len();
        let (&version, rest) = bytes.split_first().ok_or(EnvelopeError::EmptyCiphertext)?;
        if len > MAX_CIPHERTEXT_LEN {
            return Err(EnvelopeError::CiphertextTooLarge(len));
        }
        if !(FORMAT_LEGACY..=3).contains(&version) {
            return Err(EnvelopeError::UnknownVersion(version));
        }
        let (&id_len, rest) = rest.split_first().ok_or(EnvelopeError::Truncated {
            len,
            need: overhead(1) + 1,
        })?;
        let id_len = usize::from(id_len);
        // At least one byte of sealed data: localkms never seals an empty plaintext.
        let need = overhead(id_len) + 1;
        if len < need {
            return Err(EnvelopeError::Truncated { len, need });
        }
        let (id, rest) = rest.split_at(id_len);
        let id = std::str::from_utf8(id).map_err(|_| KeyIdError::BadCharacter)?;
        let key_id = KeyId::parse(id)?;
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let header_len = 2 + id_len + SALT_LEN + NONCE_LEN;
        Ok(Envelope {
            version,
            key_id,
            header: &bytes[..header_len],
            salt: salt
                .try_into()
                .map_err(|_| EnvelopeError::Truncated { len, need })?,
            nonce: nonce
                .try_into()
                .map_err(|_| EnvelopeError::Truncated { len, need })?,
            body,
            tag: tag
                .try_into()
                .map_err(|_| EnvelopeError::Truncated { len, need })?,
        })
    }

    /// Whether this ciphertext is in the legacy format 1, which both APIs still open (it was
    /// written before the version byte named the API).
    pub fn is_legacy(&self) -> bool {
        self.version == FORMAT_LEGACY
    }

    /// The KEK this ciphertext claims to be sealed under.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// Refuses a ciphertext sealed for the other API, before any cryptography (the version
    /// byte is authenticated, so an edited one fails [`Envelope::open`] anyway).
    pub fn check_api(&self, api: Api) -> Result<(), EnvelopeError> {
        if self.version == FORMAT_LEGACY || self.version == api.version() {
            return Ok(());
        }
        let sealed = if self.version == Api::V1.version() {
            Api::V1
        } else {
            Api::V2
        };
        Err(EnvelopeError::WrongApi {
            sealed: sealed.name(),
            asked: api.name(),
        })
    }

    /// Authenticates and decrypts under `kek`; the plaintext is wiped when the result drops.
    pub fn open(&self, kek: &SecretKey) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let message_key = derive_key(kek, self.salt, INFO).map_err(EnvelopeError::Crypto)?;
        let mut buf = Zeroizing::new(Vec::with_capacity(self.body.len()));
        buf.extend_from_slice(self.body);
        open_in_place(&message_key, self.nonce, self.header, &mut buf, self.tag)
            .map_err(|_| EnvelopeError::Tampered)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> SecretKey {
        let bytes: Vec<u8> = (0u8..32).collect();
        SecretKey::from_slice(&bytes).expect("32 bytes")
    }

    fn id() -> KeyId {
        KeyId::parse("kek-20261126-3f2a9c1e").expect("valid id")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Frozen vector: KEK = 00..1f, key id kek-20261126-3f2a9c1e, salt = 16 × 0xa5,
    /// nonce = 12 × 0x5a, plaintext = 20..3f. Any change to this output breaks every
    /// ciphertext already stored in etcd; bump FORMAT_VERSION instead. The bytes were
    /// reproduced independently with Python's `cryptography` (HKDF + AESGCM) from the layout in
    /// the module docs.
    const VECTOR_V1: &str = concat!(
        "01156b656b2d32303236313132362d3366326139633165",
        "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
        "5a5a5a5a5a5a5a5a5a5a5a5a",
        "7eb73acfd46d03cf8c44885caf7f4cb7c24f9bada39e95234d45e9633ea0be1d",
        "f162fbb8508240bd89aa531a3c87ba9f",
    );

    fn vector_plaintext() -> Vec<u8> {
        (0x20u8..0x40).collect()
    }

    /// The same inputs sealed as a KMS v2 seed (version 2) and a KMS v1 DEK (version 3): the
    /// ciphertext bytes match version 1's (same key and nonce), the first byte and the tag do
    /// not. Reproduced independently with Python's `cryptography` like VECTOR_V1.
    const VECTOR_V2_SEED: &str = concat!(
        "02156b656b2d32303236313132362d3366326139633165",
        "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
        "5a5a5a5a5a5a5a5a5a5a5a5a",
        "7eb73acfd46d03cf8c44885caf7f4cb7c24f9bada39e95234d45e9633ea0be1d",
        "b86817fbeb748cf58dd788062d2d3d4e",
    );
    const VECTOR_V1_DEK: &str = concat!(
        "03156b656b2d32303236313132362d3366326139633165",
        "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
        "5a5a5a5a5a5a5a5a5a5a5a5a",
        "7eb73acfd46d03cf8c44885caf7f4cb7c24f9bada39e95234d45e9633ea0be1d",
        "3e91b3c57dd9373271fcc10dddb4bffe",
    );

    #[test]
    fn frozen_vector_seals_and_opens() {
        let sealed = seal_with(
            &kek(),
            &id(),
            &vector_plaintext(),
            &[0xa5; 16],
            &[0x5a; 12],
            1,
        )
        .expect("seal");
        assert_eq!(hex(&sealed), VECTOR_V1);
        let bytes = unhex(VECTOR_V1);
        let env = Envelope::parse(&bytes).expect("parse");
        assert_eq!(env.key_id(), &id());
        assert_eq!(
            &env.open(&kek()).expect("open")[..],
            &vector_plaintext()[..]
        );
        // Written by earlier builds: both APIs still open it.
        assert!(env.check_api(Api::V1).is_ok() && env.check_api(Api::V2).is_ok());
    }

    #[test]
    fn frozen_vectors_bind_the_api() {
        for (api, vector) in [(Api::V2, VECTOR_V2_SEED), (Api::V1, VECTOR_V1_DEK)] {
            let sealed = seal_with(
                &kek(),
                &id(),
                &vector_plaintext(),
                &[0xa5; 16],
                &[0x5a; 12],
                api.version(),
            )
            .expect("seal");
            assert_eq!(hex(&sealed), vector, "{api:?}");
            let bytes = unhex(vector);
            let env = Envelope::parse(&bytes).expect("parse");
            assert!(env.check_api(api).is_ok());
            let other = if api == Api::V1 { Api::V2 } else { Api::V1 };
            let err = env.check_api(other).expect_err("other API refused");
            assert!(
                err.to_string().contains("cannot be opened through"),
                "{err}"
            );
            assert_eq!(
                &env.open(&kek()).expect("open")[..],
                &vector_plaintext()[..]
            );
            // Relabelling the API fails authentication.
            let mut relabelled = bytes.clone();
            relabelled[0] = other.version();
            let env = Envelope::parse(&relabelled).expect("parse");
            assert!(matches!(env.open(&kek()), Err(EnvelopeError::Tampered)));
        }
    }

    #[test]
    fn round_trip_is_randomised_and_small() {
        let pt = [7u8; 32];
        let a = seal(&kek(), &id(), &pt, Api::V2).expect("seal");
        let b = seal(&kek(), &id(), &pt, Api::V2).expect("seal");
        assert_ne!(a, b, "two encryptions of one plaintext must differ");
        assert_eq!(a.len(), 99);
        for ct in [&a, &b] {
            let env = Envelope::parse(ct).expect("parse");
            assert_eq!(&env.open(&kek()).expect("open")[..], &pt);
        }
    }

    #[test]
    fn every_tampered_byte_is_detected() {
        let ct = seal(&kek(), &id(), &[1u8; 32], Api::V2).expect("seal");
        for i in 0..ct.len() {
            for flip in [0x01u8, 0x80] {
                let mut bad = ct.clone();
                bad[i] ^= flip;
                let result = Envelope::parse(&bad).and_then(|env| {
                    // A changed key id parses to a different id; the caller would refuse it
                    // as a mismatch, and it must not authenticate either.
                    env.open(&kek())
                });
                assert!(result.is_err(), "flip {flip:#x} at byte {i} was accepted");
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let ct = seal(&kek(), &id(), &[1u8; 32], Api::V2).expect("seal");
        for len in 0..ct.len() {
            let result = Envelope::parse(&ct[..len]).and_then(|env| env.open(&kek()));
            assert!(result.is_err(), "truncation to {len} bytes was accepted");
        }
        assert!(matches!(
            Envelope::parse(&[]),
            Err(EnvelopeError::EmptyCiphertext)
        ));
        assert!(matches!(
            Envelope::parse(&ct[..10]),
            Err(EnvelopeError::Truncated { len: 10, .. })
        ));
    }

    #[test]
    fn wrong_version_and_wrong_key_are_refused() {
        let mut ct = seal(&kek(), &id(), &[1u8; 32], Api::V2).expect("seal");
        let other = SecretKey::from_slice(&[9u8; 32]).expect("32 bytes");
        let env = Envelope::parse(&ct).expect("parse");
        assert!(matches!(env.open(&other), Err(EnvelopeError::Tampered)));
        ct[0] = 4;
        assert!(matches!(
            Envelope::parse(&ct),
            Err(EnvelopeError::UnknownVersion(4))
        ));
        assert!(matches!(
            Envelope::parse(&[0u8; 1025]),
            Err(EnvelopeError::CiphertextTooLarge(1025))
        ));
    }

    #[test]
    fn plaintext_limits() {
        assert!(matches!(
            seal(&kek(), &id(), &[], Api::V2),
            Err(EnvelopeError::EmptyPlaintext)
        ));
        let max = max_plaintext_len(&id());
        let ct = seal(&kek(), &id(), &vec![0u8; max], Api::V2).expect("largest plaintext fits");
        assert_eq!(ct.len(), MAX_CIPHERTEXT_LEN);
        assert!(matches!(
            seal(&kek(), &id(), &vec![0u8; max + 1], Api::V2),
            Err(EnvelopeError::PlaintextTooLarge { .. })
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn kek() -> SecretKey {
        SecretKey::from_slice(&[0x11u8; 32]).expect("32 bytes")
    }

    proptest! {
        /// Any bytes at all: parsing and opening return errors, never panic.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Ok(env) = Envelope::parse(&bytes) {
                let _ = env.open(&kek());
            }
        }

        /// Random bytes behind a valid header: still only errors.
        #[test]
        fn valid_header_random_body_never_opens(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![FORMAT_VERSION, 5];
            bytes.extend_from_slice(b"kek-a");
            bytes.extend_from_slice(&body);
            if let Ok(env) = Envelope::parse(&bytes) {
                prop_assert!(env.open(&kek()).is_err());
            }
        }

        /// Every valid plaintext under every valid key id round-trips.
        #[test]
        fn every_valid_value_round_trips(
            plaintext in proptest::collection::vec(any::<u8>(), 1..900),
            id in "[a-z0-9][a-z0-9._-]{0,40}",
        ) {
            let id = KeyId::parse(&id).expect("generated ids are valid");
            prop_assume!(plaintext.len() <= max_plaintext_len(&id));
            let ct = seal(&kek(), &id, &plaintext, Api::V2).expect("seal");
            prop_assert!(ct.len() <= MAX_CIPHERTEXT_LEN);
            let env = Envelope::parse(&ct).expect("parse");
            prop_assert_eq!(env.key_id(), &id);
            prop_assert_eq!(&env.open(&kek()).expect("open")[..], &plaintext[..]);
        }
    }
}
