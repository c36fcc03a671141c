//! The keystore file's byte layout.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "LOCALKMS"
//! 8       2     format version, big-endian: 3 once the upgrade to this release is finalized
//!               (`localkms upgrade finalize`, or a fresh `init`), else 2, which release
//!               0.3.0 reads; 1 lacks the keystore id below and is still read. 2 and 3 share
//!               one layout: the number itself, bound into the AAD, records the finalize
//! 10      1     KDF id: 0 = root key file (the key is used directly, via HKDF),
//!                1 = Argon2id over a passphrase
//! 11      2     KDF parameter length P, big-endian (0 for KDF 0, 28 for KDF 1)
//! 13      P     KDF parameters: Argon2id memory KiB, passes, lanes (u32 each), 16-byte salt
//! 13+P    8     generation, big-endian
//! 21+P    16    keystore id, random, made by `init` (versions 2 and 3)
//! 37+P    12    nonce, random per write
//! 49+P    n+16  AES-256-GCM sealed body and tag
//! ```
//! The sealing key is HKDF-SHA256(root key, salt = nonce, "localkms/keystore/v1"); the AAD is
//! every byte before the body, so the generation cannot be rolled back by editing the header.
//!
//! The body, once opened, is a record count (u32) and one record per KEK: id length (u8), id,
//! state (u8: 1 staged, 2 primary, 3 retired, 4 disabled, 5 destroyed), created_at and
//! changed_at (i64 Unix seconds), the state a disabled key returns to (u8, 0 = none), a
//! material flag (u8) and, when set, 32 bytes of key. Then the audit history: an entry count
//! (u32) and per entry the time (i64), action (u8), key id (u8 length, 0 = none, and bytes),
//! user and host (u16 length and UTF-8 each).

use std::collections::HashSet;

use zeroize::Zeroizing;

use super::model::{Action, Actor, HistoryEntry, KekRecord, KeyState, Keystore};
use super::root_key::{Kdf, RootKey};
use crate::crypto::{
    fill_random, open_in_place, seal_in_place, CryptoError, SecretKey, KEY_LEN, NONCE_LEN, TAG_LEN,
};
use crate::key_id::KeyId;

/// First eight bytes of every keystore file.
pub const MAGIC: &[u8; 8] = b"LOCALKMS";
/// The newest keystore format this build reads, and the one it writes once the upgrade is
/// finalized. It also reads [`PRE_FINALIZE_FORMAT`] and version 1 (no keystore id).
pub const FORMAT_VERSION: u16 = 3;
/// The format the previous release (0.3.0, 64507fe) writes and reads, and so the one this
/// build writes until the upgrade is finalized: a keystore in it can still be served by a
/// node not yet upgraded.
pub const PRE_FINALIZE_FORMAT: u16 = 2;
const KEYSTORE_ID_LEN: usize = 16;
const KDF_ROOT_KEY_FILE: u8 = 0;
const KDF_ARGON2ID: u8 = 1;
const ARGON2_PARAMS_LEN: u16 = 28;
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

/// The unsealed part of a keystore file: what is needed to find the root key.
pub struct Header {
    /// Write generation.
    pub generation: u64,
    /// The keystore id (versions 2 and 3).
    pub keystore_id: Option<[u8; KEYSTORE_ID_LEN]>,
    /// The format version.
    pub version: u16,
    /// How the root key is derived.
    pub kdf: Kdf,
    nonce: [u8; NONCE_LEN],
    len: usize,
}

impl Header {
    /// The random nonce of this write: the keystore's write id.
    pub fn write_id(&self) -> [u8; NONCE_LEN] {
        self.nonce
    }
}

/// Reads only the header, for the KDF and a cheap generation check without the root key.
pub fn peek(bytes: &[u8]) -> Result<Header, FormatError> {
    parse_header(bytes)
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
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kdf_id = r.u8().ok_or_else(|| corrupted("truncated header"))?;
    let params_len = r.u16().ok_or_else(|| corrupted("truncated header"))?;
    let params = r
        .take(usize::from(params_len))
        .ok_or_else(|| corrupted("truncated header"))?;
    let kdf = match (kdf_id, params_len) {
        (KDF_ROOT_KEY_FILE, 0) => Kdf::KeyFile,
        (KDF_ARGON2ID, ARGON2_PARAMS_LEN) => {
            let mut p = Reader::new(params);
            let bad = || corrupted("bad Argon2id parameters");
            Kdf::Argon2id {
                m_kib: p.u32().ok_or_else(bad)?,
                t: p.u32().ok_or_else(bad)?,
                p: p.u32().ok_or_else(bad)?,
                salt: p.array().ok_or_else(bad)?,
            }
        }
        _ => {
            return Err(corrupted(&format!(
                "unknown key derivation {kdf_id} with {params_len} parameter bytes"
            )))
        }
    };
    let generation = r.u64().ok_or_else(|| corrupted("truncated header"))?;
    let keystore_id = if version >= 2 {
        Some(
            r.take(KEYSTORE_ID_LEN)
                .and_then(|n| n.try_into().ok())
                .ok_or_else(|| corrupted("truncated header"))?,
        )
    } else {
        None
    };
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
        keystore_id,
        version,
        kdf,
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
    let (records, history) = decode_body(&plain)?;
    Ok(Keystore {
        generation: header.generation,
        write_id: header.nonce,
        keystore_id: header.keystore_id,
        finalized: header.version >= 3,
        kdf: header.kdf,
        records,
        history,
    })
}

/// Seals a keystore into file bytes under the root key, with a fresh nonce.
pub fn encode(ks: &Keystore, root: &RootKey) -> Result<Vec<u8>, FormatError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce).map_err(|_| FormatError::Random)?;
    let kdf_params_len = match ks.kdf {
        Kdf::KeyFile => 0,
        Kdf::Argon2id { .. } => usize::from(ARGON2_PARAMS_LEN),
    };
    let header_len = MAGIC.len() + 2 + 1 + 2 + kdf_params_len + 8 + KEYSTORE_ID_LEN + NONCE_LEN;
    // A keystore read from a version-1 file gets its id at this, its first version-2 write.
    let keystore_id = match ks.keystore_id {
        Some(id) => id,
        None => {
            let mut id = [0u8; KEYSTORE_ID_LEN];
            fill_random(&mut id).map_err(|_| FormatError::Random)?;
            id
        }
    };
    let records_len: usize = ks
        .records
        .iter()
        .map(|r| {
            1 + r.id.as_str().len() + 1 + 8 + 8 + 1 + 1 + r.material.as_ref().map_or(0, |_| KEY_LEN)
        })
        .sum();
    let history_len: usize = ks
        .history
        .iter()
        .map(|h| {
            8 + 1
                + 1
                + h.key_id.as_ref().map_or(0, |k| k.as_str().len())
                + 2
                + clip(&h.actor.user).len()
                + 2
                + clip(&h.actor.host).len()
        })
        .sum();
    let body_len = 4 + records_len + 4 + history_len;
    // Exact capacity: the buffer never reallocates, so no unwiped copy of a key is left behind.
    let mut out = Zeroizing::new(Vec::with_capacity(header_len + body_len + TAG_LEN));
    out.extend_from_slice(MAGIC);
    // Until the upgrade is finalized, the previous release's format: a node not yet upgraded
    // must keep reading every write.
    let version = if ks.finalized {
        FORMAT_VERSION
    } else {
        PRE_FINALIZE_FORMAT
    };
    out.extend_from_slice(&version.to_be_bytes());
    match &ks.kdf {
        Kdf::KeyFile => {
            out.push(KDF_ROOT_KEY_FILE);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        Kdf::Argon2id { m_kib, t, p, salt } => {
            out.push(KDF_ARGON2ID);
            out.extend_from_slice(&ARGON2_PARAMS_LEN.to_be_bytes());
            out.extend_from_slice(&m_kib.to_be_bytes());
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&p.to_be_bytes());
            out.extend_from_slice(salt);
        }
    }
    out.extend_from_slice(&ks.generation.to_be_bytes());
    out.extend_from_slice(&keystore_id);
    out.extend_from_slice(&nonce);
    debug_assert_eq!(out.len(), header_len);
    let count = u32::try_from(ks.records.len()).map_err(|_| corrupted("too many keys"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for r in &ks.records {
        put_id(&mut out, Some(&r.id));
        out.push(state_code(r.state));
        out.extend_from_slice(&r.created_at.to_be_bytes());
        out.extend_from_slice(&r.changed_at.to_be_bytes());
        out.push(r.disabled_from.map_or(0, state_code));
        match &r.material {
            Some(key) => {
                out.push(1);
                out.extend_from_slice(key.expose());
            }
            None => out.push(0),
        }
    }
    let count = u32::try_from(ks.history.len()).map_err(|_| corrupted("history too long"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for h in &ks.history {
        out.extend_from_slice(&h.at.to_be_bytes());
        out.push(h.action.code());
        put_id(&mut out, h.key_id.as_ref());
        put_text(&mut out, &h.actor.user);
        put_text(&mut out, &h.actor.host);
    }
    let key = body_key(root, &nonce).map_err(|_| FormatError::Random)?;
    let (aad, body) = out.split_at_mut(header_len);
    let tag = seal_in_place(&key, &nonce, aad, body).map_err(|_| FormatError::Random)?;
    out.extend_from_slice(&tag);
    // The buffer now holds only sealed bytes; hand it out without a copy.
    Ok(std::mem::take(&mut *out))
}

/// Longest user or host string kept in the history.
const MAX_TEXT_LEN: usize = 255;

fn clip(s: &str) -> &str {
    if s.len() <= MAX_TEXT_LEN {
        return s;
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_id(out: &mut Vec<u8>, id: Option<&KeyId>) {
    match id {
        // KeyId guarantees 1..=64 bytes.
        Some(id) => {
            out.push(id.as_str().len() as u8);
            out.extend_from_slice(id.as_str().as_bytes());
        }
        None => out.push(0),
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let s = clip(s);
    // clip bounds the length to 255.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
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

fn read_id(r: &mut Reader<'_>) -> Result<Option<KeyId>, FormatError> {
    let len = r.u8().ok_or_else(|| corrupted("truncated key id"))?;
    if len == 0 {
        return Ok(None);
    }
    let bytes = r
        .take(usize::from(len))
        .ok_or_else(|| corrupted("truncated key id"))?;
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| KeyId::parse(s).ok())
        .map(Some)
        .ok_or_else(|| corrupted("invalid key id"))
}

fn read_text(r: &mut Reader<'_>) -> Result<String, FormatError> {
    let len = r.u16().ok_or_else(|| corrupted("truncated history"))?;
    let bytes = r
        .take(usize::from(len))
        .ok_or_else(|| corrupted("truncated history"))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupted("history text is not UTF-8"))
}

type Body = (Vec<KekRecord>, Vec<HistoryEntry>);

fn decode_body(body: &[u8]) -> Result<Body, FormatError> {
    let mut r = Reader::new(body);
    let count = r.u32().ok_or_else(|| corrupted("truncated body"))?;
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..count {
        let id = read_id(&mut r)?.ok_or_else(|| corrupted("record without a key id"))?;
        let state = r
            .u8()
            .and_then(state_from_code)
            .ok_or_else(|| corrupted("invalid key state"))?;
        let created_at = r.i64().ok_or_else(|| corrupted("truncated record"))?;
        let changed_at = r.i64().ok_or_else(|| corrupted("truncated record"))?;
        let disabled_from = match r.u8() {
            Some(0) => None,
            Some(code) => {
                Some(state_from_code(code).ok_or_else(|| corrupted("invalid prior state"))?)
            }
            None => return Err(corrupted("truncated record")),
        };
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
            disabled_from,
            material,
        });
    }
    let primaries = crate::keystore::model::primaries(&records);
    if primaries != 1 {
        return Err(corrupted(&format!(
            "{primaries} primary keys; exactly one is required"
        )));
    }
    let count = r.u32().ok_or_else(|| corrupted("truncated history"))?;
    let mut history = Vec::new();
    for _ in 0..count {
        let at = r.i64().ok_or_else(|| corrupted("truncated history"))?;
        let action = r
            .u8()
            .and_then(Action::from_code)
            .ok_or_else(|| corrupted("invalid history action"))?;
        let key_id = read_id(&mut r)?;
        let user = read_text(&mut r)?;
        let host = read_text(&mut r)?;
        history.push(HistoryEntry {
            at,
            action,
            key_id,
            actor: Actor { user, host },
        });
    }
    if r.pos != body.len() {
        return Err(corrupted("trailing bytes after the history"));
    }
    Ok((records, history))
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

    #[test]
    fn the_previous_releases_format_is_written_until_finalized() {
        let root = root(5);
        let mut ks = sample();
        ks.finalized = false;
        let bytes = encode(&ks, &root).expect("encode");
        assert_eq!(
            &bytes[8..10],
            &PRE_FINALIZE_FORMAT.to_be_bytes(),
            "release 0.3.0 reads only format 2"
        );
        let back = decode(&bytes, &root).expect("decode");
        assert!(!back.finalized());
        let mut ks = back;
        assert!(ks.finalize(
            OffsetDateTime::now_utc(),
            &crate::keystore::model::tests::actor()
        ));
        assert!(!ks.finalize(
            OffsetDateTime::now_utc(),
            &crate::keystore::model::tests::actor()
        ));
        let bytes = encode(&ks, &root).expect("encode");
        assert_eq!(&bytes[8..10], &3u16.to_be_bytes());
        let back = decode(&bytes, &root).expect("decode");
        assert!(
            back.finalized(),
            "the format number is the record of the finalize"
        );
        assert_eq!(
            back.history().last().map(|h| h.action),
            Some(crate::keystore::Action::UpgradeFinalize)
        );
        // The version is bound into the AAD: editing 3 back to 2 does not open.
        let mut edited = bytes.clone();
        edited[9] = 2;
        assert_eq!(
            decode(&edited, &root).err(),
            Some(FormatError::WrongRootKey)
        );
        // A newer format is named, not misread.
        let mut newer = bytes;
        newer[9] = 4;
        assert_eq!(peek(&newer).err(), Some(FormatError::UnsupportedVersion(4)));
    }

    fn sample() -> Keystore {
        let actor = crate::keystore::model::tests::actor();
        let mut ks = crate::keystore::model::tests::fresh();
        ks.rotate(OffsetDateTime::now_utc(), &actor)
            .expect("rotate");
        let staged = ks.stage(OffsetDateTime::now_utc(), &actor).expect("stage");
        ks.disable(staged.as_str(), OffsetDateTime::now_utc(), &actor)
            .expect("disable");
        ks.generation = 7;
        ks
    }

    /// Re-seals a version-2 file as version 1 (no keystore id), as builds before ids wrote.
    fn as_version_1(bytes: &[u8], root: &RootKey) -> Vec<u8> {
        let h = peek(bytes).expect("header");
        let (aad, sealed) = bytes.split_at(h.len);
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let key = body_key(root, &h.nonce).expect("key");
        let mut plain = body.to_vec();
        open_in_place(
            &key,
            &h.nonce,
            aad,
            &mut plain,
            tag.try_into().expect("tag"),
        )
        .expect("open");
        let id_at = h.len - NONCE_LEN - KEYSTORE_ID_LEN;
        let mut v1 = aad[..id_at].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_be_bytes());
        v1.extend_from_slice(&h.nonce);
        let tag = seal_in_place(&key, &h.nonce, &v1.clone(), &mut plain).expect("seal");
        v1.extend_from_slice(&plain);
        v1.extend_from_slice(&tag);
        v1
    }

    #[test]
    fn keystore_ids_are_authenticated_and_version_1_still_opens() {
        let ks = crate::keystore::model::tests::fresh();
        let id = ks.keystore_id().expect("init makes an id");
        let bytes = encode(&ks, &root(1)).expect("encode");
        assert_eq!(peek(&bytes).expect("peek").keystore_id, Some(id));
        assert_eq!(
            decode(&bytes, &root(1)).expect("decode").keystore_id(),
            Some(id)
        );
        // The id is in the AAD: changing it fails authentication.
        let at = peek(&bytes).expect("peek").len - NONCE_LEN - KEYSTORE_ID_LEN;
        let mut swapped = bytes.clone();
        swapped[at] ^= 1;
        assert!(matches!(
            decode(&swapped, &root(1)),
            Err(FormatError::WrongRootKey)
        ));
        // A version-1 file opens without an id, and gets a fresh one when written again.
        let v1 = as_version_1(&bytes, &root(1));
        let old = decode(&v1, &root(1)).expect("version 1 opens");
        assert_eq!(old.keystore_id(), None);
        assert_eq!(old.generation(), ks.generation());
        let rewritten = decode(&encode(&old, &root(1)).expect("encode"), &root(1)).expect("decode");
        assert!(rewritten.keystore_id().is_some());
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let ks = sample();
        let bytes = encode(&ks, &root(1)).expect("encode");
        assert_eq!(peek(&bytes).map(|h| h.generation), Ok(7));
        let back = decode(&bytes, &root(1)).expect("decode");
        assert_eq!(back.generation, 7);
        assert_eq!(back.kdf, Kdf::KeyFile);
        assert_eq!(back.records.len(), 3);
        assert_eq!(back.history, ks.history);
        for (a, b) in ks.records.iter().zip(&back.records) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.state, b.state);
            assert_eq!(a.created_at, b.created_at);
            assert_eq!(a.changed_at, b.changed_at);
            assert_eq!(a.disabled_from, b.disabled_from);
            assert_eq!(
                a.material.as_ref().map(|k| *k.expose()),
                b.material.as_ref().map(|k| *k.expose())
            );
        }
    }

    #[test]
    fn argon2_header_round_trips() {
        let mut ks = sample();
        ks.kdf = Kdf::Argon2id {
            m_kib: 1024,
            t: 2,
            p: 1,
            salt: [9u8; 16],
        };
        let bytes = encode(&ks, &root(1)).expect("encode");
        assert_eq!(peek(&bytes).map(|h| h.kdf), Ok(ks.kdf.clone()));
        assert_eq!(decode(&bytes, &root(1)).expect("decode").kdf, ks.kdf);
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
        for r in ks.records.iter().filter(|r| r.material.is_some()) {
            let key = r.material.as_ref().expect("material").expose();
            assert!(!bytes.windows(KEY_LEN).any(|w| w == key));
            assert!(bytes
                .windows(r.id.as_str().len())
                .all(|w| w != r.id.as_str().as_bytes()));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::keystore::model::tests::{actor, fresh};
    use proptest::prelude::*;
    use time::OffsetDateTime;

    fn root() -> RootKey {
        RootKey::from_bytes([0x22u8; 32])
    }

    proptest! {
        /// Any bytes at all, with or without the magic: errors, never panics.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), magic in any::<bool>()) {
            let mut input = if magic { MAGIC.to_vec() } else { Vec::new() };
            input.extend_from_slice(&bytes);
            let _ = peek(&input);
            prop_assert!(decode(&input, &root()).is_err());
        }

        /// Any sequence of lifecycle operations yields a keystore that round-trips exactly.
        #[test]
        fn every_valid_keystore_round_trips(ops in proptest::collection::vec(0u8..5, 0..12), generation in 1u64..u64::MAX) {
            let now = OffsetDateTime::now_utc();
            let mut ks = fresh();
            for op in ops {
                let ids: Vec<String> = ks.records().iter().map(|r| r.id.to_string()).collect();
                let target = ids.first().cloned().unwrap_or_default();
                let _ = match op {
                    0 => ks.rotate(now, &actor()).map(|_| ()),
                    1 => ks.stage(now, &actor()).map(|_| ()),
                    2 => ks.disable(&target, now, &actor()),
                    3 => ks.enable(&target, now, &actor()),
                    _ => ks.destroy(&target, now, &actor(), &crate::keystore::DestroyGuard::Force),
                };
            }
            ks.generation = generation;
            let bytes = encode(&ks, &root()).expect("encode");
            let back = decode(&bytes, &root()).expect("decode");
            prop_assert_eq!(back.generation, ks.generation);
            prop_assert_eq!(&back.history, &ks.history);
            prop_assert_eq!(back.records.len(), ks.records.len());
            for (a, b) in ks.records.iter().zip(&back.records) {
                prop_assert_eq!(&a.id, &b.id);
                prop_assert_eq!(a.state, b.state);
                prop_assert_eq!(a.disabled_from, b.disabled_from);
                prop_assert_eq!(a.material.as_ref().map(|k| *k.expose()), b.material.as_ref().map(|k| *k.expose()));
            }
        }
    }
}
