//! The high-water mark: the newest keystore this node has served, kept in a small 0600 state
//! file (beside a file keystore, or in an etcd keystore's `--cache-dir`). A server refuses to
//! start on anything older, so a restored backup or an old etcd revision cannot bring back a
//! KEK that was destroyed, disabled or replaced; `--allow-rollback` is the explicit, logged
//! way back for disaster recovery.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::file;
use super::KeystoreLocation;
use crate::keystore::model::Keystore;
use crate::keystore::KeystoreError;

/// Name of the state file in an etcd keystore's cache directory.
pub const STATE_FILE: &str = "high-water.json";

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Mark {
    /// The newest generation served.
    generation: u64,
    /// The write id (hex) of that generation, to tell a diverged copy at the same generation.
    write_id: String,
    /// The keystore id (hex): another keystore, even a newer one, is not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keystore_id: Option<String>,
}

/// Lowercase hex, as the state files hold ids.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a node's small JSON state file at `path` (`what` it should be, for the message): none
/// when it does not exist, and an error naming it when it cannot be read or parsed, which is
/// never taken as absent.
pub(super) fn read_state<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Option<T>, KeystoreError> {
    match crate::keystore::read_regular(path, 64 * 1024) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeystoreError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not {what} ({e}); move it aside only if you know why it is wrong"),
                ),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeystoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A node's high-water mark for one keystore.
pub struct HighWater {
    path: PathBuf,
    /// For a file keystore: the keystore, whose lock serialises writers of the mark (the
    /// server's reloads and this node's CLI changes).
    keystore: Option<PathBuf>,
}

impl HighWater {
    /// The mark kept at `path`; `keystore` is the file keystore it belongs to, if any.
    pub(crate) fn at(path: PathBuf, keystore: Option<PathBuf>) -> Self {
        HighWater { path, keystore }
    }

    /// The state file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<Mark>, KeystoreError> {
        read_state(&self.path, "a high-water state file")
    }

    /// Refuses `ks` (read from `location`) when it is another keystore than the one this node
    /// has served (a different keystore id).
    pub fn check_identity(
        &self,
        ks: &Keystore,
        location: &KeystoreLocation,
    ) -> Result<(), KeystoreError> {
        let Some(mark) = self.read()? else {
            return Ok(());
        };
        match (&mark.keystore_id, ks.keystore_id()) {
            (Some(seen), found) if found.map(|f| hex(&f)).as_deref() != Some(seen.as_str()) => {
                Err(KeystoreError::OtherKeystore {
                    location: location.clone(),
                    found: found
                        .map_or_else(|| "none (an old file)".to_owned(), |f| hex(&f))
                        .into(),
                    seen: seen.as_str().into(),
                    state: self.path.clone().into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Refuses `ks` (read from `location`) when it is another keystore than the one this node
    /// has served, older than the newest it has served, or a different write at the same
    /// generation.
    pub fn check(&self, ks: &Keystore, location: &KeystoreLocation) -> Result<(), KeystoreError> {
        self.check_identity(ks, location)?;
        let Some(mark) = self.read()? else {
            return Ok(());
        };
        let older = ks.generation() < mark.generation;
        let diverged = ks.generation() == mark.generation && hex(&ks.write_id()) != mark.write_id;
        if older || diverged {
            return Err(KeystoreError::RolledBack {
                location: location.clone(),
                found: ks.generation(),
                seen: mark.generation,
                state: self.path.clone(),
                diverged,
            });
        }
        Ok(())
    }

    /// Records the keystore at `generation` with `write_id` as served (atomic, 0600); never
    /// lowers the mark unless `force` (after an explicit `--allow-rollback`).
    pub fn record(
        &self,
        generation: u64,
        write_id: [u8; 12],
        keystore_id: Option<[u8; 16]>,
        force: bool,
    ) -> Result<(), KeystoreError> {
        let _lock = match &self.keystore {
            Some(ks) => Some(file::Lock::acquire(ks)?),
            None => None,
        };
        // A writer killed mid-write leaves a temp file; under the lock, none is in progress.
        file::remove_stale_temp_files(&self.path);
        if !force {
            if let Some(mark) = self.read()? {
                if mark.generation > generation {
                    return Ok(());
                }
            }
        }
        let mark = Mark {
            generation,
            write_id: hex(&write_id),
            keystore_id: keystore_id.map(|id| hex(&id)),
        };
        write_state(&self.path, &mark)
    }
}

/// Writes a node's JSON state file at `path` atomically, 0600 (the counterpart of
/// [`read_state`]).
pub(super) fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<(), KeystoreError> {
    // A plain struct of strings and numbers serializes infallibly.
    let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
    file::write_atomically(path, &file::temp_prefix(path), &bytes, true, || {}).map_err(|source| {
        KeystoreError::Io {
            path: path.to_owned(),
            source,
        }
    })
}
