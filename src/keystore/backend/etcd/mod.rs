//! The etcd backend: one key (`PREFIX/keystore`) holds the sealed keystore that every node
//! shares. Writes are compare-and-swap transactions on the key's modification revision,
//! retried on conflict; each server watches the key, keeps a sealed copy in its cache
//! directory to start from when etcd is down, and publishes what it has loaded under
//! `PREFIX/nodes/` ([`nodes`]).

pub mod client;
pub mod nodes;
pub mod registry;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{Etcd, EtcdError, EtcdTarget, EtcdTls, Expect};

use super::file;
use crate::keystore::format;
use crate::keystore::model::Keystore;
use crate::keystore::root_key::RootKeyProvider;
use crate::keystore::{KeystoreError, KeystoreLocation};

/// How many times a conflicting etcd transaction is retried before giving up.
pub const CAS_RETRIES: usize = 32;
/// Name of the sealed keystore copy kept in `--cache-dir`.
pub const CACHE_FILE: &str = "keystore.cache.lkms";
/// How long start-up waits for etcd when there is no cache to serve from instead.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up waits for etcd when it could serve from the cache: a first round over
/// the members (a refused connection fails at once), not an election's wait. A node restarted
/// while etcd has lost quorum serves at once; the watch catches up when etcd answers again.
const START_TIMEOUT_WITH_CACHE: Duration = Duration::from_millis(1500);

/// The cached copy of an etcd keystore in `dir`.
pub fn cache_path(dir: &Path) -> PathBuf {
    dir.join(CACHE_FILE)
}

/// The sealed bytes and their modification revision.
pub(super) async fn read_raw(
    e: &Etcd,
    location: &KeystoreLocation,
) -> Result<(Vec<u8>, i64), KeystoreError> {
    let kv = e
        .get(&e.target().keystore_key())
        .await?
        .ok_or_else(|| KeystoreError::NotFound(location.clone()))?;
    Ok((kv.value, kv.mod_revision))
}

/// Loads and opens the keystore, with its revision.
pub(super) async fn load_with_revision(
    e: &Etcd,
    location: &KeystoreLocation,
    root: &RootKeyProvider,
) -> Result<(Keystore, i64), KeystoreError> {
    let (bytes, rev) = read_raw(e, location).await?;
    // Deriving the root key may run Argon2id: off the async workers.
    Ok((
        super::blocking(|| file::decode_with(location, &bytes, root))?,
        rev,
    ))
}

/// Writes sealed bytes as a new keystore, refusing to replace one.
pub(super) async fn create_raw(
    e: &Etcd,
    location: &KeystoreLocation,
    bytes: Vec<u8>,
) -> Result<(), KeystoreError> {
    if e.put_if(&e.target().keystore_key(), bytes, Expect::Absent)
        .await?
    {
        Ok(())
    } else {
        Err(KeystoreError::AlreadyExists(location.clone()))
    }
}

/// Seals `ks` under `root` and writes it as a new keystore.
pub(super) async fn create(
    e: &Etcd,
    location: &KeystoreLocation,
    root: &RootKeyProvider,
    ks: &Keystore,
) -> Result<(), KeystoreError> {
    let key = super::blocking(|| root.key_for(ks.kdf()))?;
    let bytes = format::encode(ks, &key).map_err(|err| file::format_err(location, err))?;
    create_raw(e, location, bytes).await
}

/// The etcd read-modify-write: opens with `old`, applies `change`, seals the next
/// generation with `new`, and writes it only if nobody else wrote since the read; retried
/// from a fresh read otherwise.
pub(super) async fn cas_rewrite<T>(
    e: &Etcd,
    location: &KeystoreLocation,
    old: &RootKeyProvider,
    new: &RootKeyProvider,
    mut change: impl FnMut(&mut Keystore) -> Result<T, KeystoreError>,
) -> Result<T, KeystoreError> {
    for attempt in 0..CAS_RETRIES {
        let (mut ks, rev) = load_with_revision(e, location, old).await?;
        let out = change(&mut ks)?;
        file::bump_generation(location, &mut ks)?;
        let key = super::blocking(|| new.key_for(ks.kdf()))?;
        let bytes = format::encode(&ks, &key).map_err(|err| file::format_err(location, err))?;
        if cas_write(e, bytes, rev).await? {
            return Ok(out);
        }
        tracing::debug!(attempt, "keystore changed under us in etcd; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(20 * (attempt as u64 + 1))).await;
    }
    Err(KeystoreError::Conflict(location.clone(), CAS_RETRIES))
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

/// The keystore to start from: etcd's, or when etcd does not answer within a few seconds, the
/// sealed copy in `cache_dir`. A copy from etcd refreshes the cache.
pub(super) async fn initial(
    e: &Etcd,
    location: &KeystoreLocation,
    root: &RootKeyProvider,
    cache_dir: Option<&Path>,
) -> Result<Keystore, KeystoreError> {
    let cache = cache_dir.map(cache_path);
    let (wait, waited) = if cache.as_ref().is_some_and(|c| c.is_file()) {
        (START_TIMEOUT_WITH_CACHE, "a read within 1.5 s")
    } else {
        (START_TIMEOUT, "a read within 5 s")
    };
    let from_etcd = match tokio::time::timeout(wait, read_raw(e, location)).await {
        Ok(Ok((bytes, _))) => Ok(bytes),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(KeystoreError::Etcd(EtcdError::NoAnswer(waited))),
    };
    match from_etcd {
        Ok(bytes) => {
            let ks = super::blocking(|| file::decode_with(location, &bytes, root))?;
            if let Some(dir) = cache_dir {
                // Never replace the cache with an older keystore than it holds (a rolled-back
                // etcd revision): the high-water check decides what to do about etcd's copy.
                let cached = cache
                    .as_ref()
                    .and_then(|c| super::blocking(|| file::load(c, root)).ok());
                match cached {
                    Some(c) if c.generation() > ks.generation() => tracing::warn!(
                        cache_generation = c.generation(),
                        etcd_generation = ks.generation(),
                        "etcd holds an older keystore than the local cache; keeping the cache"
                    ),
                    _ => update_cache(dir, &bytes),
                }
            }
            Ok(ks)
        }
        Err(err) => {
            let Some(cache) = cache else {
                return Err(err);
            };
            match super::blocking(|| file::load(&cache, root)) {
                Ok(ks) => {
                    tracing::warn!(error = %err, cache = %cache.display(), generation = ks.generation(), "etcd is unreachable: serving from the local keystore cache and retrying etcd in the background");
                    Ok(ks)
                }
                Err(cache_err) => {
                    tracing::error!(error = %cache_err, "no usable keystore cache either");
                    Err(err)
                }
            }
        }
    }
}

/// Replaces the sealed copy in `dir` with `bytes` (a keystore just loaded); a failure is
/// logged, never fatal.
pub(super) fn update_cache(dir: &Path, bytes: &[u8]) {
    let cache = cache_path(dir);
    if let Err(e) = super::blocking(|| file::replace_raw(&cache, bytes)) {
        tracing::warn!(cache = %cache.display(), error = %e, "could not update the keystore cache");
    }
}

/// Sends `()` on `changes` whenever the etcd keystore key changes: from a watch while one can
/// be held, otherwise by polling its revision every second. Ends when the receiver is gone.
pub(super) async fn watch(etcd: Etcd, changes: tokio::sync::mpsc::Sender<()>) {
    let key = etcd.target().keystore_key();
    // The store revision already seen: a watch resumes after it, so nothing is missed and
    // compaction of older revisions does not matter.
    let mut seen = etcd.get_with_revision(&key).await.map_or(0, |(_, rev)| rev);
    let mut warned = false;
    while !changes.is_closed() {
        match etcd.watch(&key, seen).await {
            Ok(mut watch) => {
                if warned {
                    tracing::info!("etcd answers again: watching the keystore");
                }
                warned = false;
                loop {
                    let msg = tokio::select! {
                        _ = changes.closed() => return,
                        msg = watch.stream.message() => msg,
                    };
                    match msg {
                        Ok(Some(resp)) if !resp.canceled && resp.compact_revision == 0 => {
                            if let Some(h) = &resp.header {
                                seen = seen.max(h.revision);
                            }
                            if !resp.events.is_empty() {
                                let _ = changes.send(()).await;
                            }
                        }
                        Ok(Some(resp)) if resp.compact_revision > 0 => {
                            // Our start revision was compacted away: resume from now and
                            // reload in case the key changed in between.
                            tracing::debug!(
                                compact_revision = resp.compact_revision,
                                "etcd watch compacted; resuming from the current revision"
                            );
                            if let Ok((_, rev)) = etcd.get_with_revision(&key).await {
                                seen = rev;
                            }
                            let _ = changes.send(()).await;
                            break;
                        }
                        _ => {
                            tracing::warn!("etcd watch ended; re-establishing it (still serving the loaded keyring)");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot watch the etcd keystore; polling it every second until etcd answers");
                    warned = true;
                }
            }
        }
        // Catch anything that changed while there was no watch.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok((kv, rev)) = etcd.get_with_revision(&key).await {
            if kv.is_some_and(|kv| kv.mod_revision > seen) {
                let _ = changes.send(()).await;
            }
            seen = seen.max(rev);
        }
    }
}
