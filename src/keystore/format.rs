//! The keystore file's byte layout.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "LOCALKMS"
//! 8       2     format version, big-endian (1)
//! 10      1     KDF id: 0 = root key file (the key is used directly, via HKDF)
//! 11      2     KDF parameter length P, big-endian (0 for KDF 0)
//! 13      P     KDF parameters (reserved for a passphrase KDF)
//! 13+P    8     generation, big-endian
//! 21+P    12    nonce, random per write
//! 33+P    n+16  AES-256-GCM sealed body and tag
//! ```
//! The sealing key is HKDF-SHA256(root key, salt = nonce, "localkms/keystore/v1"); the AAD is
//! every byte before the body, so the generation cannot be rolled back by editing the header.
//!
//! The body, once opened, is a record count (u32) and one record per KEK: id length (u8), id,
//! state (u8: 1 staged, 2 primary, 3 retired, 4 disabled, 5 destroyed), created_at and
//! changed_at (i64 Unix seconds), a material flag (u8) and, when set, 32 bytes of key.

use std::collections::HashSet;

use zeroize::Zeroizing;

use super::model::{KekRecord, KeyState, Keystore};
use super::root_key::RootKey;
use crate::crypto::{
    fill_random, open_in_place, seal_in_place, CryptoError, SecretKey, KEY_LEN, NONCE_LEN, TAG_LEN,
};
use crate::key_id::KeyId;

/// First eight bytes of every keystore file.
pub const MAGIC: &[u8; 8] = b"LOCALKMS";
/// The keystore format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const KDF_ROOT_KEY_FILE: u8 = 0;
const INFO: &[u8] = b"localkms/keystore/v1";
/// Files larger than this are refused before they are read into memory.
pub const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Why bytes are not a keystore; the file layer adds the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Wrong magic.
    #[error("not a localkms keystore")]
    NotAKeystore,
    /// Newer format.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    /// Malformed header or body.
    #[error("{0}")]
    Corrupted(String),
    /// The body did not authenticate.
    #[error("authentication failed")]
    WrongRootKey,
    /// The random source failed while sealing.
    #[error("random number generator failed")]
    Random,
}

/// Reads only the header, for a cheap generation check without the root key.
pub fn peek_generation(bytes: &[u8]) -> Result<u64, FormatError> {
    parse_header(bytes).map(|h| h.generation)
}

struct Header {
    generation: u64,
    nonce: [u8; NONCE_LEN],
    len: usize,
}

fn corrupted(reason: &str) -> FormatError {
    FormatError::Corrupted(reason.to_owned())
}

fn parse_header(bytes: &[u8]) -> Result<Header, FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NotAKeystore);
    }
    let mut r = Reader::new(&bytes[MAGIC.len()..]);
    let version = r.u16().ok_or_else(|| corrupted("truncated header"))?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kdf = r.u8().ok_or_else(|| corrupted("truncated header"))?;
    if kdf != KDF_ROOT_KEY_FILE {
        return Err(corrupted(&format!("unknown key derivation id {kdf}")));
    }
    let params_len = r.u16().ok_or_else(|| corrupted("truncated header"))?;
    r.take(usize::from(params_len))
        .ok_or_else(|| corrupted("truncated header"))?;
    let generation = r.u64().ok_or_else(|| corrupted("truncated header"))?;
    let nonce: [u8; NONCE_LEN] = r
        .take(NONCE_LEN)
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| corrupted("truncated header"))?;
    let len = MAGIC.len() + r.pos;
    if bytes.len() < len + TAG_LEN {
        return Err(corrupted("truncated body"));
    }
    Ok(Header {
        generation,
        nonce,
        len,
    })
}

/// Opens a keystore file's bytes with the root key.
pub fn decode(bytes: &[u8], root: &RootKey) -> Result<Keystore, FormatError> {
    let header = parse_header(bytes)?;
    let (aad, sealed) = bytes.split_at(header.len);
    let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| corrupted("truncated body"))?;
    let key = body_key(root, &header.nonce).map_err(|_| FormatError::Random)?;
    let mut plain = Zeroizing::new(Vec::with_capacity(body.len()));
    plain.extend_from_slice(body);
    open_in_place(&key, &header.nonce, aad, &mut plain, tag)
        .map_err(|_| FormatError::WrongRootKey)?;
    let records = decode_body(&plain)?;
    Ok(Keystore {
        generation: header.generation,
        records,
    })
}

/// Seals a keystore into file bytes under the root key, with a fresh nonce.
pub fn encode(ks: &Keystore, root: &RootKey) -> Result<Vec<u8>, FormatError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce).map_err(|_| FormatError::Random)?;
    let body_len = 4 + ks
        .records
        .iter()
        .map(|r| {
            1 + r.id.as_str().len() + 1 + 8 + 8 + 1 + r.material.as_ref().map_or(0, |_| KEY_LEN)
        })
        .sum::<usize>();
    let header_len = MAGIC.len() + 2 + 1 + 2 + 8 + NONCE_LEN;
    // Exact capacity: the buffer never reallocates, so no unwiped copy of a key is left behind.
    let mut out = Zeroizing::new(Vec::with_capacity(header_len + body_len + TAG_LEN));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.push(KDF_ROOT_KEY_FILE);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&ks.generation.to_be_bytes());
    out.extend_from_slice(&nonce);
    let count = u32::try_from(ks.records.len()).map_err(|_| corrupted("too many keys"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for r in &ks.records {
        let id = r.id.as_str().as_bytes();
        // KeyId guarantees at most 64 bytes.
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.push(state_code(r.state));
        out.extend_from_slice(&r.created_at.to_be_bytes());
        out.extend_from_slice(&r.changed_at.to_be_bytes());
        match &r.material {
            Some(key) => {
                out.push(1);
                out.extend_from_slice(key.expose());
            }
            None => out.push(0),
        }
    }
    let key = body_key(root, &nonce).map_err(|_| FormatError::Random)?;
    let (aad, body) = out.split_at_mut(header_len);
    let tag = seal_in_place(&key, &nonce, aad, body).map_err(|_| FormatError::Random)?;
    out.extend_from_slice(&tag);
    // The buffer now holds only sealed bytes; hand it out without a copy.
    Ok(std::mem::take(&mut *out))
}

fn body_key(root: &RootKey, nonce: &[u8; NONCE_LEN]) -> Result<SecretKey, CryptoError> {
    crate::crypto::derive_key(root.key(), nonce, INFO)
}

fn state_code(state: KeyState) -> u8 {
    match state {
        KeyState::Staged => 1,
        KeyState::Primary => 2,
        KeyState::Retired => 3,
        KeyState::Disabled => 4,
        KeyState::Destroyed => 5,
    }
}

fn state_from_code(code: u8) -> Option<KeyState> {
    Some(match code {
        1 => KeyState::Staged,
        2 => KeyState::Primary,
        3 => KeyState::Retired,
        4 => KeyState::Disabled,
        5 => KeyState::Destroyed,
        _ => return None,
    })
}

fn decode_body(body: &[u8]) -> Result<Vec<KekRecord>, FormatError> {
    let mut r = Reader::new(body);
    let count = r.u32().ok_or_else(|| corrupted("truncated body"))?;
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..count {
        let id_len = r.u8().ok_or_else(|| corrupted("truncated record"))?;
        let id = r
            .take(usize::from(id_len))
            .ok_or_else(|| corrupted("truncated record"))?;
        let id = std::str::from_utf8(id)
            .ok()
            .and_then(|s| KeyId::parse(s).ok())
            .ok_or_else(|| corrupted("invalid key id"))?;
        let state = r
            .u8()
            .and_then(state_from_code)
            .ok_or_else(|| corrupted("invalid key state"))?;
        let created_at = r.i64().ok_or_else(|| corrupted("truncated record"))?;
        let changed_at = r.i64().ok_or_else(|| corrupted("truncated record"))?;
        let material = match r.u8() {
            Some(0) => None,
            Some(1) => {
                let bytes = r.take(KEY_LEN).ok_or_else(|| corrupted("truncated key"))?;
                SecretKey::from_slice(bytes)
            }
            _ => return Err(corrupted("invalid material flag")),
        };
        if material.is_none() != (state == KeyState::Destroyed) {
            return Err(corrupted(&format!(
                "key {id} is {state} but its material is {}",
                if material.is_some() {
                    "present"
                } else {
                    "missing"
                }
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(corrupted(&format!("key id {id} appears twice")));
        }
        records.push(KekRecord {
            id,
            state,
            created_at,
            changed_at,
            material,
        });
    }
    if r.pos != body.len() {
        return Err(corrupted("trailing bytes after the last record"));
    }
    let primaries = records
        .iter()
        .filter(|r| r.state == KeyState::Primary)
        .count();
    if primaries != 1 {
        return Err(corrupted(&format!(
            "{primaries} primary keys; exactly one is required"
        )));
    }
    Ok(records)
}

/// A bounds-checked cursor: every read returns `None` instead of panicking past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn root(b: u8) -> RootKey {
        RootKey::from_bytes([b; 32])
    }

    fn sample() -> Keystore {
        let mut ks = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        ks.rotate(OffsetDateTime::now_utc()).expect("rotate");
        ks.generation = 7;
        ks
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let ks = sample();
        let bytes = encode(&ks, &root(1)).expect("encode");
        assert_eq!(peek_generation(&bytes), Ok(7));
        let back = decode(&bytes, &root(1)).expect("decode");
        assert_eq!(back.generation, 7);
        assert_eq!(back.records.len(), 2);
        for (a, b) in ks.records.iter().zip(&back.records) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.state, b.state);
            assert_eq!(a.created_at, b.created_at);
            assert_eq!(a.changed_at, b.changed_at);
            assert_eq!(
                a.material.as_ref().map(|k| *k.expose()),
                b.material.as_ref().map(|k| *k.expose())
            );
        }
    }

    #[test]
    fn wrong_root_key_is_refused() {
        let bytes = encode(&sample(), &root(1)).expect("encode");
        assert_eq!(
            decode(&bytes, &root(2)).err(),
            Some(FormatError::WrongRootKey)
        );
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let bytes = encode(&sample(), &root(1)).expect("encode");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad, &root(1)).is_err(), "flip at byte {i} accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample(), &root(1)).expect("encode");
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len], &root(1)).is_err(),
                "truncation to {len} accepted"
            );
        }
        assert_eq!(decode(b"", &root(1)).err(), Some(FormatError::NotAKeystore));
        assert_eq!(
            decode(b"LOCALKMS\x00\x09", &root(1)).err(),
            Some(FormatError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn sealed_file_contains_no_key_material() {
        let ks = sample();
        let bytes = encode(&ks, &root(1)).expect("encode");
        for r in &ks.records {
            let key = r.material.as_ref().expect("material").expose();
            assert!(!bytes.windows(KEY_LEN).any(|w| w == key));
            assert!(bytes
                .windows(r.id.as_str().len())
                .all(|w| w != r.id.as_str().as_bytes()));
        }
    }
}
