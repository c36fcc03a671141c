//! The keystore: every KEK, sealed in one file under the root key, and the rules for changing it.
//!
//! [`model`] holds the in-memory keystore and its lifecycle operations, [`format`] the byte
//! layout, [`file`] the locked, atomic reads and writes, and [`root_key`] the key that seals it.

pub mod file;
pub mod format;
pub mod model;
pub mod root_key;
pub mod store;

use std::path::PathBuf;

pub use file::{create, load, reseal, update};
pub use model::{Action, Actor, HistoryEntry, KekRecord, KeyState, Keystore, LifecycleError};
pub use root_key::{Kdf, RootKey, RootKeyError, RootKeyProvider, RootKeySource};
pub use store::{KeystoreLocation, Store};

use crate::crypto::CryptoError;

/// Why a keystore cannot be read, written or changed. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// There is no keystore at the path.
    #[error("keystore {0} does not exist; create it with `localkms init --keystore {0} --root-key-file PATH`")]
    NotFound(PathBuf),
    /// `init` would overwrite keys.
    #[error("keystore {0} already exists; refusing to overwrite it (it may hold the only copy of keys that decrypt your data)")]
    AlreadyExists(PathBuf),
    /// The file does not start with the keystore magic.
    #[error("{0} is not a localkms keystore (wrong magic bytes)")]
    NotAKeystore(PathBuf),
    /// Written by a newer localkms.
    #[error("keystore {path} has format version {version}; this build reads version {supported}: upgrade localkms")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found.
        version: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The header or body is malformed.
    #[error("keystore {path} is corrupted ({reason}); restore it from one of its backups ({path}.bak.N)")]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The sealed body did not authenticate.
    #[error("cannot open keystore {0}: the root key does not match it, or the file is corrupted (check --root-key-file, or restore {0}.bak.N)")]
    WrongRootKey(PathBuf),
    /// Another process holds the keystore lock.
    #[error("keystore {0} is locked by another localkms command (lock file {0}.lock); try again when it finishes")]
    Locked(PathBuf),
    /// Any other I/O failure.
    #[error("cannot access keystore {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The root key file cannot be used.
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    /// A lifecycle rule refuses the change.
    #[error(transparent)]
    Lifecycle(#[from] model::LifecycleError),
    /// The random source failed.
    #[error("keystore operation failed: {0}")]
    Crypto(#[from] CryptoError),
    /// etcd could not be reached or refused the request.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// Concurrent writers kept winning the compare-and-swap.
    #[error(
        "keystore {0} kept changing under us ({1} attempts); another writer is busy: try again"
    )]
    Conflict(PathBuf, usize),
}
