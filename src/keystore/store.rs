//! Where a keystore lives: a file on this node, or a key in etcd shared by every node.
//!
//! Both hold the same sealed bytes. File writes go through the lock-and-rename path in
//! [`super::file`]; etcd writes are compare-and-swap transactions on the blob's modification
//! revision, retried on conflict, so two operators or nodes never lose each other's changes.

use std::path::PathBuf;

use super::file;
use super::format;
use super::model::Keystore;
use super::root_key::RootKeyProvider;
use super::KeystoreError;
use crate::etcd::{Etcd, EtcdError, EtcdTarget, EtcdTls, Expect};

/// How many times a conflicting etcd transaction is retried before giving up.
pub const CAS_RETRIES: usize = 32;

/// A keystore location as given to `--keystore`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeystoreLocation {
    /// A file.
    File(PathBuf),
    /// A key in etcd.
    Etcd(EtcdTarget),
}

impl KeystoreLocation {
    /// `etcd://…` is etcd; anything else is a file path.
    pub fn parse(s: &str) -> Result<Self, EtcdError> {
        if s.starts_with("etcd://") {
            EtcdTarget::parse(s).map(KeystoreLocation::Etcd)
        } else {
            Ok(KeystoreLocation::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for KeystoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeystoreLocation::File(p) => write!(f, "{}", p.display()),
            KeystoreLocation::Etcd(t) => write!(f, "{t}"),
        }
    }
}

/// An opened keystore location.
#[derive(Clone)]
pub enum Store {
    /// A file.
    File(PathBuf),
    /// etcd.
    Etcd(Etcd),
}

/// Runs blocking file work (locks with waits, fsync, Argon2id) without stalling the async
/// workers: on a multi-threaded runtime the worker hands its other tasks over first
/// (`block_in_place`); elsewhere (a current-thread runtime, or none) it simply runs.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

impl Store {
    /// Opens `location` (for etcd, with `tls`; the connection is made on first use).
    pub fn open(location: &KeystoreLocation, tls: &EtcdTls) -> Result<Self, KeystoreError> {
        Ok(match location {
            KeystoreLocation::File(p) => Store::File(p.clone()),
            KeystoreLocation::Etcd(t) => Store::Etcd(Etcd::connect(t, tls)?),
        })
    }

    /// The location, for messages (a path-like value naming the etcd key).
    pub fn name(&self) -> PathBuf {
        match self {
            Store::File(p) => p.clone(),
            Store::Etcd(e) => PathBuf::from(format!("{}", e.target())),
        }
    }

    /// The sealed bytes and, for etcd, their modification revision.
    pub async fn read_raw(&self) -> Result<(Vec<u8>, i64), KeystoreError> {
        match self {
            Store::File(p) => Ok((blocking(|| file::read_bounded(p))?, 0)),
            Store::Etcd(e) => {
                let kv = e
                    .get(&e.target().keystore_key())
                    .await?
                    .ok_or_else(|| KeystoreError::NotFound(self.name()))?;
                Ok((kv.value, kv.mod_revision))
            }
        }
    }

    /// Loads and opens the keystore.
    pub async fn load(&self, root: &RootKeyProvider) -> Result<Keystore, KeystoreError> {
        Ok(self.load_with_revision(root).await?.0)
    }

    /// Loads and opens the keystore, with its etcd revision (0 for files).
    pub async fn load_with_revision(
        &self,
        root: &RootKeyProvider,
    ) -> Result<(Keystore, i64), KeystoreError> {
        match self {
            Store::File(p) => Ok((blocking(|| file::load(p, root))?, 0)),
            Store::Etcd(_) => {
                let (bytes, rev) = self.read_raw().await?;
                // Deriving the root key may run Argon2id: off the async workers.
                Ok((
                    blocking(|| file::decode_with(&self.name(), &bytes, root))?,
                    rev,
                ))
            }
        }
    }

    /// Writes a brand-new keystore, refusing to replace one.
    pub async fn create(&self, root: &RootKeyProvider, ks: &Keystore) -> Result<(), KeystoreError> {
        match self {
            Store::File(p) => blocking(|| file::create(p, root, ks)),
            Store::Etcd(_) => {
                let key = blocking(|| root.key_for(ks.kdf()))?;
                let bytes =
                    format::encode(ks, &key).map_err(|e| file::format_err(&self.name(), e))?;
                self.create_raw(bytes).await
            }
        }
    }

    /// Writes sealed bytes as a new keystore, refusing to replace one (`keystore copy`).
    pub async fn create_raw(&self, bytes: Vec<u8>) -> Result<(), KeystoreError> {
        match self {
            Store::File(p) => blocking(|| file::create_raw(p, &bytes)),
            Store::Etcd(e) => {
                if e.put_if(&e.target().keystore_key(), bytes, Expect::Absent)
                    .await?
                {
                    Ok(())
                } else {
                    Err(KeystoreError::AlreadyExists(self.name()))
                }
            }
        }
    }

    /// Applies `change` and saves the next generation: under the file lock, or as an etcd
    /// compare-and-swap retried (re-reading and re-applying `change`) when another writer got
    /// there first. Nothing is written when `change` fails.
    pub async fn update<T>(
        &self,
        root: &RootKeyProvider,
        change: impl FnMut(&mut Keystore) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        match self {
            Store::File(p) => blocking(|| file::update(p, root, change)),
            Store::Etcd(e) => self.cas_rewrite(e, root, root, change).await,
        }
    }

    /// Re-seals under a new root key (see [`file::reseal`]); on etcd, as a compare-and-swap.
    pub async fn reseal(
        &self,
        old: &RootKeyProvider,
        new: &RootKeyProvider,
        mut record: impl FnMut(&mut Keystore),
    ) -> Result<(), KeystoreError> {
        match self {
            Store::File(p) => blocking(|| file::reseal(p, old, new, record)),
            Store::Etcd(e) => {
                self.cas_rewrite(e, old, new, |ks| {
                    ks.kdf = new.new_kdf()?;
                    record(ks);
                    Ok(())
                })
                .await
            }
        }
    }

    /// The etcd read-modify-write: opens with `old`, applies `change`, seals the next
    /// generation with `new`, and writes it only if nobody else wrote since the read; retried
    /// from a fresh read otherwise.
    async fn cas_rewrite<T>(
        &self,
        e: &Etcd,
        old: &RootKeyProvider,
        new: &RootKeyProvider,
        mut change: impl FnMut(&mut Keystore) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        for attempt in 0..CAS_RETRIES {
            let (mut ks, rev) = self.load_with_revision(old).await?;
            let out = change(&mut ks)?;
            file::bump_generation(&self.name(), &mut ks)?;
            let key = blocking(|| new.key_for(ks.kdf()))?;
            let bytes =
                format::encode(&ks, &key).map_err(|err| file::format_err(&self.name(), err))?;
            if cas_write(e, bytes, rev).await? {
                return Ok(out);
            }
            tracing::debug!(attempt, "keystore changed under us in etcd; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(20 * (attempt as u64 + 1))).await;
        }
        Err(KeystoreError::Conflict(self.name(), CAS_RETRIES))
    }
}

/// Writes `bytes` over the keystore key if it is still at revision `rev`. When the answer is
/// lost (etcd unreachable mid-call), reads the key back: if our bytes are there the write
/// happened and must not be applied a second time.
async fn cas_write(e: &Etcd, bytes: Vec<u8>, rev: i64) -> Result<bool, KeystoreError> {
    let key = e.target().keystore_key();
    match e
        .put_if(&key, bytes.clone(), Expect::ModRevision(rev))
        .await
    {
        Ok(true) => Ok(true),
        // A failover may have re-sent a transaction whose first copy committed: its compare
        // then fails against our own write. The bytes (with their random nonce) tell.
        Ok(false) => Ok(e.get(&key).await?.is_some_and(|kv| kv.value == bytes)),
        Err(err) => {
            let written = e.get(&key).await.ok().flatten();
            if written.is_some_and(|kv| kv.value == bytes) {
                Ok(true)
            } else {
                Err(err.into())
            }
        }
    }
}
