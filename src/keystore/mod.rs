//! The keystore: every KEK, sealed in one file under the root key, and the rules for changing it.
//!
//! [`model`] holds the in-memory keystore and its lifecycle operations, [`format`] the byte
//! layout, [`file`] the locked, atomic reads and writes, and [`root_key`] the key that seals it.

pub mod backend;
pub mod format;
pub mod model;
pub mod root_key;

/// The file backend's functions, for tests, benches and fuzz targets that work on files.
pub use backend::file;

use std::path::PathBuf;

pub use backend::etcd::{EtcdError, EtcdTarget, EtcdTls};
pub use backend::{KeystoreLocation, Store};
pub use file::{create, load, reseal, update};
pub use model::{
    Action, Actor, DestroyEvidence, DestroyGuard, HistoryEntry, KekRecord, KeyState, Keystore,
    LifecycleError, DEFAULT_MIN_RETIRED_AGE,
};
pub use root_key::{Kdf, RootKey, RootKeyError, RootKeyProvider, RootKeySource};

use crate::crypto::CryptoError;

/// Why a keystore cannot be read, written or changed. Every message names where, as the
/// operator wrote it (a file path, or the etcd endpoints and key), through
/// [`KeystoreLocation`].
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// There is no keystore at the path.
    #[error("keystore {0} does not exist; create it with `localkms init --keystore {0} --root-key-file PATH`")]
    NotFound(KeystoreLocation),
    /// `init` would overwrite keys.
    #[error("keystore {0} already exists; refusing to overwrite it (it may hold the only copy of keys that decrypt your data)")]
    AlreadyExists(KeystoreLocation),
    /// The file does not start with the keystore magic.
    #[error("{0} is not a localkms keystore (wrong magic bytes)")]
    NotAKeystore(KeystoreLocation),
    /// Written by a newer localkms.
    #[error("keystore {path} has format version {version}, written by a newer localkms; this build (localkms {}) reads versions 1 to {supported}: run the newer release here too (going back to an older release after `localkms upgrade finalize` is not supported)", crate::release::VERSION)]
    UnsupportedVersion {
        /// The keystore.
        path: KeystoreLocation,
        /// Version found.
        version: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The header or body is malformed.
    #[error("keystore {path} is corrupted ({reason}){hint}", hint = backup_hint(path, "; restore it from"))]
    Corrupted {
        /// The keystore.
        path: KeystoreLocation,
        /// What is wrong with it.
        reason: String,
    },
    /// The sealed body did not authenticate.
    #[error("cannot open keystore {0}: the root key does not match it, or the file is corrupted (check --root-key-file{hint})", hint = backup_hint(.0, ", or restore"))]
    WrongRootKey(KeystoreLocation),
    /// Another process holds the keystore lock.
    #[error("keystore {0} is locked by another localkms command (lock file {0}.lock); try again when it finishes")]
    Locked(KeystoreLocation),
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
    Etcd(#[from] backend::etcd::EtcdError),
    /// Older than (or diverged from) the newest keystore this node has served.
    #[error("keystore {location} is at generation {found}{what}, but this node has already served generation {seen} (high-water mark in {state}): a restored backup or an old etcd revision could bring back keys that were destroyed, disabled or replaced. If this is deliberate disaster recovery, start once with --allow-rollback (it is logged), which also resets the mark", what = if *diverged { " with different contents" } else { "" }, state = state.display())]
    RolledBack {
        /// The keystore.
        location: KeystoreLocation,
        /// The generation found.
        found: u64,
        /// The newest generation served.
        seen: u64,
        /// The state file.
        state: PathBuf,
        /// Same generation, different write.
        diverged: bool,
    },
    /// Another keystore than the one this node has served.
    #[error("keystore {location} is another keystore (keystore id {found}) than the one this node has served (keystore id {seen}, recorded in {state}): a keystore from another cluster or another `init`, even one sealed under the same root key, is refused. If you are replacing the keystore deliberately, start once with --allow-rollback (it is logged), which also resets the mark", state = state.display())]
    OtherKeystore {
        /// The keystore.
        location: KeystoreLocation,
        /// Its id.
        found: Box<str>,
        /// The id served before.
        seen: Box<str>,
        /// The state file.
        state: Box<std::path::Path>,
    },
    /// The command's own rule refused the change (the message says which and what to do);
    /// nothing was written.
    #[error("{0}")]
    Refused(String),
    /// Concurrent writers kept winning the compare-and-swap.
    #[error(
        "keystore {0} kept changing under us ({1} attempts); another writer is busy: try again"
    )]
    Conflict(KeystoreLocation, usize),
}

/// Names the backups of a keystore file that exist (`PATH.bak.N`), after `lead`; nothing when
/// there are none (after `root-key rotate` removed them, or for etcd), so an error never
/// suggests restoring a file that is not there.
fn backup_hint(location: &KeystoreLocation, lead: &str) -> String {
    let KeystoreLocation::File(path) = location else {
        return String::new();
    };
    let mut gens = file::backups(path);
    if gens.is_empty() {
        return String::new();
    }
    gens.sort_unstable();
    let names: Vec<String> = gens
        .iter()
        .rev()
        .map(|g| format!("{}.bak.{g}", path.display()))
        .collect();
    format!("{lead} one of its backups ({})", names.join(", "))
}

/// Opens `path` for reading without ever blocking on it: with `O_NONBLOCK`, so a FIFO or a
/// device at the path cannot wedge the caller, then refuses anything but a regular file (a
/// symlink to one is fine).
pub(crate) fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a regular file ({}); replace it with the real file",
                describe(kind)
            ),
        ));
    }
    Ok(file)
}

/// Reads a small regular file (a state file, a usage file, a certificate) through
/// [`open_regular`], so a FIFO or a device planted at the path is refused instead of wedging the
/// reader, and refuses one longer than `max` bytes.
pub(crate) fn read_regular(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// A file type in words, for error messages.
pub(crate) fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_symlink() {
        "a symlink"
    } else {
        "a regular file"
    }
}
