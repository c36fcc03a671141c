//! The keystore in memory: KEK records and the lifecycle rules that change them.

use std::fmt;

use time::OffsetDateTime;

use crate::crypto::{CryptoError, SecretKey};
use crate::key_id::KeyId;

/// Where a KEK is in its life (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Decrypts; not yet used to encrypt (distributed ahead of a switch).
    Staged,
    /// The one key that encrypts.
    Primary,
    /// An older key: decrypts only.
    Retired,
    /// Decrypt refused, reversibly.
    Disabled,
    /// Material wiped; only the id and time remain.
    Destroyed,
}

impl KeyState {
    /// The lowercase name used in the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Staged => "staged",
            KeyState::Primary => "primary",
            KeyState::Retired => "retired",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// Whether a KEK in this state may open ciphertexts.
    pub fn decrypts(self) -> bool {
        matches!(
            self,
            KeyState::Staged | KeyState::Primary | KeyState::Retired
        )
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One KEK: its public metadata and, unless destroyed, its material.
pub struct KekRecord {
    /// Public id, the apiserver's key_id.
    pub id: KeyId,
    /// Lifecycle state.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Time of the last state change, Unix seconds (the destruction time for a tombstone).
    pub changed_at: i64,
    /// The key; `None` only for a destroyed tombstone.
    pub material: Option<SecretKey>,
}

impl fmt::Debug for KekRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the material: only whether it is there.
        f.debug_struct("KekRecord")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("changed_at", &self.changed_at)
            .field("has_material", &self.material.is_some())
            .finish()
    }
}

/// A lifecycle rule refused a change.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The random source failed while creating a key.
    #[error("cannot create a key: {0}")]
    Crypto(#[from] CryptoError),
    /// Could not find an unused key id (astronomically unlikely).
    #[error("cannot pick an unused key id; try again")]
    IdExhausted,
}

/// Every KEK the cluster's data may be sealed under, plus the write generation.
#[derive(Debug)]
pub struct Keystore {
    pub(crate) generation: u64,
    pub(crate) records: Vec<KekRecord>,
}

/// The current time as Unix seconds.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl Keystore {
    /// A new keystore holding one fresh primary KEK, at generation 1.
    pub fn new_with_primary(now: OffsetDateTime) -> Result<Self, LifecycleError> {
        let mut ks = Keystore {
            generation: 1,
            records: Vec::new(),
        };
        ks.create_key(now, KeyState::Primary)?;
        Ok(ks)
    }

    /// Write generation: grows by one on every saved change, so a reload can refuse going back.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All records, oldest first.
    pub fn records(&self) -> &[KekRecord] {
        &self.records
    }

    /// The primary record, if any.
    pub fn primary(&self) -> Option<&KekRecord> {
        self.records.iter().find(|r| r.state == KeyState::Primary)
    }

    /// Gives up the records (and their material) to build a keyring without copying keys.
    pub fn into_records(self) -> Vec<KekRecord> {
        self.records
    }

    /// Creates a new KEK and makes it primary; the old primary becomes retired (decrypt only).
    pub fn rotate(&mut self, now: OffsetDateTime) -> Result<KeyId, LifecycleError> {
        let ts = now.unix_timestamp();
        for r in self
            .records
            .iter_mut()
            .filter(|r| r.state == KeyState::Primary)
        {
            r.state = KeyState::Retired;
            r.changed_at = ts;
        }
        self.create_key(now, KeyState::Primary)
    }

    fn create_key(
        &mut self,
        now: OffsetDateTime,
        state: KeyState,
    ) -> Result<KeyId, LifecycleError> {
        let id = self.unused_id(now)?;
        let ts = now.unix_timestamp();
        self.records.push(KekRecord {
            id: id.clone(),
            state,
            created_at: ts,
            changed_at: ts,
            material: Some(SecretKey::generate()?),
        });
        Ok(id)
    }

    fn unused_id(&self, now: OffsetDateTime) -> Result<KeyId, LifecycleError> {
        for _ in 0..16 {
            let id = KeyId::generate(now)?;
            if self.records.iter().all(|r| r.id != id) {
                return Ok(id);
            }
        }
        Err(LifecycleError::IdExhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keystore_has_one_primary() {
        let ks = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        assert_eq!(ks.records().len(), 1);
        assert_eq!(ks.records()[0].state, KeyState::Primary);
        assert_eq!(ks.generation(), 1);
    }

    #[test]
    fn rotate_retires_the_old_primary() {
        let mut ks = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        let old = ks.records()[0].id.clone();
        let new = ks.rotate(OffsetDateTime::now_utc()).expect("rotate");
        assert_ne!(old, new);
        assert_eq!(ks.primary().map(|r| &r.id), Some(&new));
        let old_rec = ks.records().iter().find(|r| r.id == old).expect("old kept");
        assert_eq!(old_rec.state, KeyState::Retired);
        assert!(old_rec.material.is_some());
        assert_eq!(
            ks.records()
                .iter()
                .filter(|r| r.state == KeyState::Primary)
                .count(),
            1
        );
    }

    #[test]
    fn debug_never_shows_material() {
        let ks = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        let text = format!("{ks:?}");
        assert!(text.contains("has_material: true"));
        let key = ks.records()[0]
            .material
            .as_ref()
            .expect("material")
            .expose();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex));
        assert!(!text.contains(&format!("{key:?}")));
    }
}
