//! What a backup holds once decrypted: every KEK with its material, state, timestamps and
//! the audit history, plus the keystore id and generation, as versioned JSON.
//!
//! JSON so an operator can read a backup in an emergency with nothing but the `age` CLI and a
//! text editor (the layout is documented in the README, "Backup and recovery"). The material
//! is base64 of the 32 KEK bytes. The whole document is written into one buffer of exactly
//! the right size (measured by a first, counting pass), so it is never reallocated and the
//! one copy is wiped when dropped.

use std::io::Write;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::crypto::SecretKey;
use crate::key_id::KeyId;
use crate::keystore::{Actor, HistoryEntry, KekRecord, KeyState, Keystore};
use crate::timefmt::rfc3339;

/// The `format` field: tells a localkms export from any other JSON.
pub const FORMAT_NAME: &str = "localkms-keystore-export";
/// The `version` field this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest decrypted export accepted: far above any real keystore (1000 history entries and
/// hundreds of keys take well under 1 MiB), small enough that a hostile file cannot exhaust
/// memory.
pub const MAX_EXPORT_LEN: usize = 16 * 1024 * 1024;

/// Why a decrypted backup is not a usable export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Not JSON of the expected shape.
    #[error("it is not a localkms keystore export ({0})")]
    NotAnExport(String),
    /// Written by a newer localkms.
    #[error("it is export format version {0}; this build reads version {FORMAT_VERSION}: use a newer localkms")]
    UnsupportedVersion(u32),
    /// Well-formed but inconsistent (a key without material, two primaries…).
    #[error("it is inconsistent: {0}")]
    Invalid(String),
    /// Serialising failed (cannot happen for a valid keystore).
    #[error("cannot write the export: {0}")]
    Write(String),
}

/// A decoded export: what `keystore import` restores and `verify-backup` compares.
pub struct Export {
    /// The exported keystore's id.
    pub keystore_id: Option<[u8; 16]>,
    /// The generation it was exported at.
    pub generation: u64,
    /// When it was exported, Unix seconds.
    pub exported_unix: i64,
    /// Every KEK, destroyed tombstones included (without material).
    pub records: Vec<KekRecord>,
    /// The audit history, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// Lowercase hex, as keystore ids are shown everywhere.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[derive(Serialize)]
struct ExportOut<'a> {
    format: &'static str,
    version: u32,
    keystore_id: Option<String>,
    generation: u64,
    exported_at: String,
    exported_unix: i64,
    keys: Vec<KeyOut<'a>>,
    history: Vec<HistoryOut<'a>>,
}

#[derive(Serialize)]
struct KeyOut<'a> {
    id: &'a str,
    state: &'static str,
    created_at: i64,
    changed_at: i64,
    disabled_from: Option<&'static str>,
    material: Option<MaterialOut<'a>>,
}

#[derive(Serialize)]
struct HistoryOut<'a> {
    at: i64,
    action: &'static str,
    key_id: Option<&'a str>,
    user: &'a str,
    host: &'a str,
}

/// A KEK's material as base64, encoded on the stack into a buffer wiped afterwards.
struct MaterialOut<'a>(&'a SecretKey);

impl Serialize for MaterialOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = Zeroizing::new([0u8; 64]);
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(self.0.expose(), &mut buf[..])
            .map_err(ser::Error::custom)?;
        let text = std::str::from_utf8(&buf[..n]).map_err(ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

/// Counts bytes without keeping them: the first pass that sizes the real buffer.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes `ks` (every record, tombstones included, and the history) as of `now`, into a
/// buffer that is wiped when dropped.
pub fn encode(ks: &Keystore, now: OffsetDateTime) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    let doc = ExportOut {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        keystore_id: ks.keystore_id().map(|id| hex(&id)),
        generation: ks.generation(),
        exported_at: rfc3339(now.unix_timestamp()),
        exported_unix: now.unix_timestamp(),
        keys: ks
            .records()
            .iter()
            .map(|r| KeyOut {
                id: r.id.as_str(),
                state: r.state.as_str(),
                created_at: r.created_at,
                changed_at: r.changed_at,
                disabled_from: r.disabled_from.map(KeyState::as_str),
                material: r.material.as_ref().map(MaterialOut),
            })
            .collect(),
        history: ks
            .history()
            .iter()
            .map(|h| HistoryOut {
                at: h.at,
                action: h.action.as_str(),
                key_id: h.key_id.as_ref().map(KeyId::as_str),
                user: &h.actor.user,
                host: &h.actor.host,
            })
            .collect(),
    };
    let mut counter = Counter(0);
    serde_json::to_writer_pretty(&mut counter, &doc)
        .map_err(|e| ExportError::Write(e.to_string()))?;
    let mut out = Zeroizing::new(Vec::with_capacity(counter.0 + 1));
    serde_json::to_writer_pretty(&mut *out, &doc).map_err(|e| ExportError::Write(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

#[derive(Deserialize)]
struct ExportIn {
    format: String,
    version: u32,
    keystore_id: Option<String>,
    generation: u64,
    exported_unix: i64,
    keys: Vec<KeyIn>,
    history: Vec<HistoryIn>,
}

#[derive(Deserialize)]
struct KeyIn {
    id: String,
    state: String,
    created_at: i64,
    changed_at: i64,
    disabled_from: Option<String>,
    material: Option<MaterialIn>,
}

#[derive(Deserialize)]
struct HistoryIn {
    at: i64,
    action: String,
    key_id: Option<String>,
    user: String,
    host: String,
}

/// A KEK's material decoded straight from the JSON text into a wiped-on-drop key.
struct MaterialIn(SecretKey);

impl<'de> Deserialize<'de> for MaterialIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MaterialIn;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("base64 of a 32-byte key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaterialIn, E> {
                let mut buf = Zeroizing::new([0u8; 48]);
                let n = base64::engine::general_purpose::STANDARD
                    .decode_slice(v.as_bytes(), &mut buf[..])
                    .map_err(|_| E::custom("key material is not base64 of 32 bytes"))?;
                SecretKey::from_slice(&buf[..n])
                    .map(MaterialIn)
                    .ok_or_else(|| E::custom("key material is not 32 bytes"))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Decodes and checks an export: the format name and version, ids, states, material present
/// exactly when not destroyed, and exactly one primary.
pub fn decode(bytes: &[u8]) -> Result<Export, ExportError> {
    if bytes.len() > MAX_EXPORT_LEN {
        return Err(ExportError::NotAnExport(format!(
            "{} bytes, more than the {MAX_EXPORT_LEN} an export can be",
            bytes.len()
        )));
    }
    // The format and version first, so a newer export says so instead of failing on a field.
    #[derive(Deserialize)]
    struct Head {
        format: Option<String>,
        version: Option<u32>,
    }
    let head: Head =
        serde_json::from_slice(bytes).map_err(|e| ExportError::NotAnExport(e.to_string()))?;
    if head.format.as_deref() != Some(FORMAT_NAME) {
        return Err(ExportError::NotAnExport(format!(
            "its \"format\" is not \"{FORMAT_NAME}\""
        )));
    }
    match head.version {
        Some(FORMAT_VERSION) => {}
        Some(v) => return Err(ExportError::UnsupportedVersion(v)),
        None => return Err(ExportError::NotAnExport("it has no \"version\"".into())),
    }
    let doc: ExportIn =
        serde_json::from_slice(bytes).map_err(|e| ExportError::NotAnExport(e.to_string()))?;
    let _ = (&doc.format, doc.version);
    let keystore_id = match &doc.keystore_id {
        None => None,
        Some(s) => Some(unhex16(s).ok_or_else(|| {
            ExportError::Invalid(format!("keystore_id {s:?} is not 32 hex digits"))
        })?),
    };
    let mut records: Vec<KekRecord> = Vec::with_capacity(doc.keys.len());
    for k in doc.keys {
        let id = KeyId::parse(&k.id)
            .map_err(|e| ExportError::Invalid(format!("key id {:?}: {e}", k.id)))?;
        if records.iter().any(|r| r.id == id) {
            return Err(ExportError::Invalid(format!("key {id} appears twice")));
        }
        let state = KeyState::parse(&k.state).ok_or_else(|| {
            ExportError::Invalid(format!("key {id} has unknown state {:?}", k.state))
        })?;
        let disabled_from = match (&k.disabled_from, state) {
            (None, _) => None,
            (Some(s), KeyState::Disabled) => Some(
                KeyState::parse(s)
                    .filter(|s| {
                        matches!(s, KeyState::Staged | KeyState::Retired | KeyState::Primary)
                    })
                    .ok_or_else(|| {
                        ExportError::Invalid(format!("key {id} has disabled_from {s:?}"))
                    })?,
            ),
            (Some(_), _) => {
                return Err(ExportError::Invalid(format!(
                    "key {id} is {state} but has disabled_from"
                )))
            }
        };
        let material = k.material.map(|m| m.0);
        if material.is_none() != (state == KeyState::Destroyed) {
            return Err(ExportError::Invalid(format!(
                "key {id} is {state} but {} material",
                if material.is_some() { "has" } else { "has no" }
            )));
        }
        records.push(KekRecord {
            id,
            state,
            created_at: k.created_at,
            changed_at: k.changed_at,
            disabled_from,
            material,
        });
    }
    let primaries = crate::keystore::model::primaries(&records);
    if primaries != 1 {
        return Err(ExportError::Invalid(format!(
            "it has {primaries} primary keys instead of one"
        )));
    }
    let mut history = Vec::with_capacity(doc.history.len());
    for h in doc.history {
        let action = crate::keystore::Action::parse(&h.action).ok_or_else(|| {
            ExportError::Invalid(format!("history has unknown action {:?}", h.action))
        })?;
        let key_id = match h.key_id {
            None => None,
            Some(s) => Some(
                KeyId::parse(&s)
                    .map_err(|e| ExportError::Invalid(format!("history key id {s:?}: {e}")))?,
            ),
        };
        history.push(HistoryEntry {
            at: h.at,
            action,
            key_id,
            actor: Actor {
                user: h.user,
                host: h.host,
            },
        });
    }
    Ok(Export {
        keystore_id,
        generation: doc.generation,
        exported_unix: doc.exported_unix,
        records,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A decrypted backup is attacker-shaped input too: decoding never panics.
        #[test]
        fn any_bytes_decode_to_an_error_or_an_export(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }

        /// Damage anywhere in a real export: an error or a consistent export, never a panic.
        #[test]
        fn a_damaged_export_never_panics(at in 0usize..2000, byte in any::<u8>()) {
            let ks = crate::keystore::model::tests::fresh();
            let mut bytes = encode(&ks, OffsetDateTime::now_utc()).expect("encode").to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Ok(e) = decode(&bytes) {
                prop_assert_eq!(crate::keystore::model::primaries(&e.records), 1);
            }
        }
    }
    use crate::keystore::model::tests::{actor, fresh};

    #[test]
    fn round_trips_every_record_and_the_history() {
        let mut ks = fresh();
        let old = ks.primary().expect("primary").id.to_string();
        ks.rotate(OffsetDateTime::now_utc(), &actor())
            .expect("rotate");
        ks.disable(&old, OffsetDateTime::now_utc(), &actor())
            .expect("disable");
        let bytes = encode(&ks, OffsetDateTime::now_utc()).expect("encode");
        assert_eq!(
            bytes.len(),
            bytes.capacity(),
            "sized exactly, never reallocated"
        );
        let text = std::str::from_utf8(&bytes).expect("utf-8");
        assert!(text.contains(FORMAT_NAME) && text.contains("\"disabled\""));
        let back = decode(&bytes).expect("decode");
        assert_eq!(back.generation, ks.generation());
        assert_eq!(back.keystore_id, ks.keystore_id());
        assert_eq!(back.records.len(), 2);
        for (a, b) in ks.records().iter().zip(&back.records) {
            assert_eq!((a.id.as_str(), a.state), (b.id.as_str(), b.state));
            assert_eq!(a.disabled_from, b.disabled_from);
            let (ma, mb) = (
                a.material.as_ref().expect("m"),
                b.material.as_ref().expect("m"),
            );
            assert_eq!(ma.expose(), mb.expose());
        }
        assert_eq!(back.history, ks.history());
    }

    #[test]
    fn refuses_what_is_not_a_consistent_export() {
        let ks = fresh();
        let good = encode(&ks, OffsetDateTime::now_utc()).expect("encode");
        let text = std::str::from_utf8(&good).expect("utf-8").to_owned();
        let cases = [
            ("{}".to_owned(), "not a localkms keystore export"),
            (
                text.replace("\"version\": 1", "\"version\": 9"),
                "version 9",
            ),
            (text.replace("\"primary\"", "\"retired\""), "0 primary"),
            (text.replace("\"primary\"", "\"destroyed\""), "has material"),
            (text.replace("\"primary\"", "\"sideways\""), "unknown state"),
            (text.replace("\"init\"", "\"explode\""), "unknown action"),
            ("[1,2".to_owned(), "not a localkms keystore export"),
        ];
        for (bad, want) in cases {
            match decode(bad.as_bytes()) {
                Err(e) => assert!(e.to_string().contains(want), "{e} (wanted {want})"),
                Ok(_) => panic!("accepted: {want}"),
            }
        }
        let material = ks.records()[0].material.as_ref().expect("m");
        let b64 = base64::engine::general_purpose::STANDARD.encode(material.expose());
        let short = text.replace(&b64, "AAAA");
        assert!(decode(short.as_bytes()).is_err());
    }
}
