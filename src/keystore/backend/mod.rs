//! Where a keystore lives: a file on this node, or a key in etcd shared by every node. This
//! module is the only place that knows which: everything else holds a [`Store`] and asks it to
//! load, update, report changes, start up from its cache, and say where usage is kept.
//!
//! Both backends hold the same sealed bytes. File writes go through the lock-and-rename path
//! in [`file`]; etcd writes are compare-and-swap transactions on the blob's modification
//! revision, retried on conflict, so two operators or nodes never lose each other's changes.
//! Blocking work (locks with waits, fsync, Argon2id) runs through [`blocking`], never directly
//! on an async worker.

pub mod etcd;
pub mod file;
pub mod high_water;
pub mod upgrade_state;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::model::Keystore;
use super::root_key::RootKeyProvider;
use super::KeystoreError;
use crate::keyring::usage::{UsageError, UsageFile};
use etcd::{Etcd, EtcdError, EtcdTarget, EtcdTls};

pub use etcd::nodes::{Nodes, RecordKey};

/// How often a file keystore's metadata is checked for changes; well inside the 2 s promise.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a keystore file read may take before a reload gives up (a hung NFS mount, say);
/// the server keeps serving what it has meanwhile.
pub const KEYSTORE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A keystore location as given to `--keystore`: shown in every message about it.
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

    /// A file keystore at `path` (for `serve --dev`).
    pub fn file(path: PathBuf) -> Self {
        KeystoreLocation::File(path)
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
pub struct Store {
    kind: Kind,
    location: KeystoreLocation,
}

#[derive(Clone)]
enum Kind {
    File(PathBuf),
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

/// Why a reload could not use what the store holds.
#[derive(Debug)]
pub enum ReloadError {
    /// It could not be read or opened.
    Failed(KeystoreError),
    /// It was read but a safety check refuses it.
    Refused(String),
}

/// A keystore read for a reload, with what it takes to refresh the start-up cache.
pub struct Reloaded {
    /// The keystore.
    pub keystore: Keystore,
    /// For etcd: the sealed copy to keep in the cache once the keystore is in use.
    pub cache: Option<CachedCopy>,
}

/// Sealed keystore bytes to keep as the start-up cache (see [`Store::keep_cache`]).
pub struct CachedCopy(Vec<u8>);

/// Tells the reload loop when the keystore may have changed: a cheap `stat` of a file (polled
/// every [`POLL_INTERVAL`]; writes replace the file by rename, and this works the same on
/// hostPath, NFS and overlay mounts), or an etcd watch.
pub struct Changes {
    kind: ChangesKind,
}

enum ChangesKind {
    File { path: PathBuf, last: Fingerprint },
    Etcd(tokio::sync::mpsc::Receiver<()>),
}

/// Identity and version of a file, for change detection without reading it.
type Fingerprint = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    })
}

impl Changes {
    /// Resolves when the keystore may have changed since the last call (or [`Self::seen`]).
    pub async fn next(&mut self) {
        match &mut self.kind {
            // Checks at once, then every POLL_INTERVAL: a caller that drops this future and
            // calls again never delays the check.
            ChangesKind::File { path, last } => loop {
                let now = fingerprint(path);
                if now != *last {
                    *last = now;
                    return;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            },
            ChangesKind::Etcd(rx) => {
                if rx.recv().await.is_none() {
                    // The watch task is gone: nothing will ever change.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Marks the current state as seen (after a reload made for another reason), so the
    /// same change is not reported again.
    pub fn seen(&mut self) {
        if let ChangesKind::File { path, last } = &mut self.kind {
            *last = fingerprint(path);
        }
    }
}

impl Store {
    /// Opens `location` (for etcd, with `tls`; the connection is made on first use).
    pub fn open(location: &KeystoreLocation, tls: &EtcdTls) -> Result<Self, KeystoreError> {
        Ok(Store {
            kind: match location {
                KeystoreLocation::File(p) => Kind::File(p.clone()),
                KeystoreLocation::Etcd(t) => Kind::Etcd(Etcd::connect(t, tls)?),
            },
            location: location.clone(),
        })
    }

    /// Where the keystore is, as the operator wrote it: what every message names.
    pub fn location(&self) -> &KeystoreLocation {
        &self.location
    }

    /// Whether several nodes share this keystore (etcd): rotations are then two-phase and
    /// the cluster metrics mean something.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Etcd(_))
    }

    /// The other servers sharing this keystore, when it is shared; their records are
    /// authenticated with `key` (see [`RecordKey`]).
    pub fn nodes_with(&self, key: &RecordKey) -> Option<Nodes> {
        match &self.kind {
            Kind::File(_) => None,
            Kind::Etcd(e) => Some(Nodes::new(e.clone(), key.clone())),
        }
    }

    /// As [`Store::nodes_with`], deriving the record key from the keystore under `root`
    /// (read only when the keystore is shared: a file keystore has no node records).
    pub async fn nodes(&self, root: &RootKeyProvider) -> Result<Option<Nodes>, KeystoreError> {
        if !self.is_shared() {
            return Ok(None);
        }
        let ks = self.load(root).await?;
        let key = RecordKey::derive(&*root.key_for(ks.kdf())?)?;
        Ok(self.nodes_with(&key))
    }

    /// The sealed bytes and, for etcd, their modification revision.
    pub async fn read_raw(&self) -> Result<(Vec<u8>, i64), KeystoreError> {
        match &self.kind {
            Kind::File(p) => Ok((blocking(|| file::read_bounded(p))?, 0)),
            Kind::Etcd(e) => etcd::read_raw(e, &self.location).await,
        }
    }

    /// Loads and opens the keystore.
    pub async fn load(&self, root: &RootKeyProvider) -> Result<Keystore, KeystoreError> {
        match &self.kind {
            Kind::File(p) => blocking(|| {
                let ks = file::load(p, root)?;
                if let Some(state) = self.upgrade_state(None) {
                    state.check(&ks, &*root.key_for(ks.kdf())?, &self.location)?;
                }
                Ok(ks)
            }),
            Kind::Etcd(e) => Ok(etcd::load_with_revision(e, &self.location, root).await?.0),
        }
    }

    /// Opens sealed bytes read from this store.
    pub fn decode(&self, bytes: &[u8], root: &RootKeyProvider) -> Result<Keystore, KeystoreError> {
        blocking(|| file::decode_with(&self.location, bytes, root))
    }

    /// Refuses to create a keystore over an existing one, and creates a file keystore's
    /// missing directories (0700, as they will hold key material). Returns the directory it
    /// created, if any, so the command can say so.
    pub fn prepare_create(&self) -> Result<Option<PathBuf>, KeystoreError> {
        match &self.kind {
            Kind::File(p) if p.exists() => Err(KeystoreError::AlreadyExists(self.location.clone())),
            Kind::File(p) => create_parent_dir(p),
            Kind::Etcd(_) => Ok(None),
        }
    }

    /// Writes a brand-new keystore, refusing to replace one.
    pub async fn create(&self, root: &RootKeyProvider, ks: &Keystore) -> Result<(), KeystoreError> {
        match &self.kind {
            Kind::File(p) => blocking(|| {
                file::create(p, root, ks)?;
                self.raise_mark_from_file(p);
                self.record_upgrade_state(
                    self.upgrade_state(None).as_ref(),
                    Some((ks.finalized(), ks.keystore_id(), ks.kdf().clone())),
                    root,
                );
                Ok(())
            }),
            Kind::Etcd(e) => etcd::create(e, &self.location, root, ks).await,
        }
    }

    /// Writes sealed bytes as a new keystore, refusing to replace one (`keystore copy`).
    pub async fn create_raw(&self, bytes: Vec<u8>) -> Result<(), KeystoreError> {
        match &self.kind {
            Kind::File(p) => blocking(|| file::create_raw(p, &bytes)),
            Kind::Etcd(e) => etcd::create_raw(e, &self.location, bytes).await,
        }
    }

    /// After a write to a file keystore on this node: raises the node's high-water mark to
    /// what was written, so a backup restored while no server runs is still refused at the
    /// next start. The write is committed either way; a failure here is only logged.
    fn raise_mark_from_file(&self, path: &Path) {
        let raised = file::read_bounded(path)
            .and_then(|bytes| {
                crate::keystore::format::peek(&bytes)
                    .map_err(|e| file::format_err(&self.location, e))
            })
            .and_then(|h| match self.high_water(None) {
                Some(mark) => mark.record(h.generation, h.write_id(), h.keystore_id, false),
                None => Ok(()),
            });
        if let Err(e) = raised {
            tracing::warn!(error = %e, "could not raise this node's high-water mark");
        }
    }

    /// After a committed write to a file keystore on this node: records a finalized one in
    /// the node's upgrade state. Only logged on failure, like the mark.
    fn record_upgrade_state(
        &self,
        state: Option<&upgrade_state::UpgradeState>,
        written: Option<(bool, Option<[u8; 16]>, crate::keystore::Kdf)>,
        root: &RootKeyProvider,
    ) {
        let (Some(state), Some((finalized, keystore_id, kdf))) = (state, written) else {
            return;
        };
        let recorded = root
            .key_for(&kdf)
            .map_err(KeystoreError::from)
            .and_then(|key| state.record_id(finalized, keystore_id, &key));
        if let Err(e) = recorded {
            tracing::warn!(error = %e, state = %state.path().display(), "could not record this node's upgrade state");
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
        match &self.kind {
            Kind::File(p) => blocking(|| {
                let mut change = change;
                let state = self.upgrade_state(None);
                let mut written = None;
                let out = file::update(p, root, |ks| {
                    // A write must not carry an old copy put back in place past the check
                    // a server would make on it.
                    if let Some(state) = &state {
                        state.check(ks, &*root.key_for(ks.kdf())?, &self.location)?;
                    }
                    let out = change(ks)?;
                    written = Some((ks.finalized(), ks.keystore_id(), ks.kdf().clone()));
                    Ok(out)
                })?;
                self.raise_mark_from_file(p);
                self.record_upgrade_state(state.as_ref(), written, root);
                Ok(out)
            }),
            Kind::Etcd(e) => etcd::cas_rewrite(e, &self.location, root, root, change).await,
        }
    }

    /// Re-seals under a new root key (see [`file::reseal`]); on etcd, as a compare-and-swap.
    pub async fn reseal(
        &self,
        old: &RootKeyProvider,
        new: &RootKeyProvider,
        mut record: impl FnMut(&mut Keystore),
    ) -> Result<(), KeystoreError> {
        match &self.kind {
            Kind::File(p) => blocking(|| {
                file::reseal(p, old, new, record)?;
                self.raise_mark_from_file(p);
                Ok(())
            }),
            Kind::Etcd(e) => {
                etcd::cas_rewrite(e, &self.location, old, new, |ks| {
                    ks.kdf = new.new_kdf()?;
                    record(ks);
                    Ok(())
                })
                .await
            }
        }
    }

    /// After the KEK `id` was destroyed: removes it from every other copy this node controls
    /// (a file keystore's backups), and says where copies it cannot reach remain.
    pub async fn scrub_destroyed(
        &self,
        root: &RootKeyProvider,
        id: &str,
    ) -> Result<Scrubbed, KeystoreError> {
        match &self.kind {
            Kind::File(p) => {
                let (rewritten, removed) = blocking(|| file::scrub_backups(p, root, id))?;
                Ok(Scrubbed::Backups { rewritten, removed })
            }
            Kind::Etcd(e) => {
                let (_, revision) = etcd::read_raw(e, &self.location).await?;
                Ok(Scrubbed::Shared { revision })
            }
        }
    }

    /// Refuses a keystore file that other users could read or replace (a no-op for etcd,
    /// whose access control is etcd's).
    pub fn check_private(&self) -> Result<(), KeystoreError> {
        match &self.kind {
            Kind::File(p) => file::check_private_file(p),
            Kind::Etcd(_) => Ok(()),
        }
    }

    /// The keystore a server starts from: the file, or etcd's copy, falling back to the
    /// sealed cache in `cache_dir` when etcd does not answer.
    pub async fn initial(
        &self,
        root: &RootKeyProvider,
        cache_dir: Option<&Path>,
    ) -> Result<Keystore, KeystoreError> {
        match &self.kind {
            Kind::File(_) => self.load(root).await,
            Kind::Etcd(e) => etcd::initial(e, &self.location, root, cache_dir).await,
        }
    }

    /// Reads the keystore for a reload: a file must pass the start-up owner and mode checks
    /// (with `check_files`) and is read off the runtime within [`KEYSTORE_READ_TIMEOUT`].
    ///
    /// With `same_kdf`, a keystore whose key derivation differs (a root-key rotation) is
    /// refused from its header, before any Argon2id runs: that change takes effect on SIGHUP
    /// or restart, never on a routine reload.
    pub async fn read_for_reload(
        &self,
        root: &Arc<RootKeyProvider>,
        check_files: bool,
        same_kdf: Option<&crate::keystore::Kdf>,
    ) -> Result<Reloaded, ReloadError> {
        let kdf_changed = |bytes: &[u8], expected: Option<&crate::keystore::Kdf>| {
            match (crate::keystore::format::peek(bytes), expected) {
                (Ok(h), Some(k)) if &h.kdf != k => Some(
                    "the keystore's key derivation changed (a root-key rotation?); it takes effect on SIGHUP or restart, not on a routine reload"
                        .to_owned(),
                ),
                _ => None,
            }
        };
        match &self.kind {
            Kind::File(path) => {
                let file = path.clone();
                let root = Arc::clone(root);
                let expected = same_kdf.cloned();
                let at = self.location.clone();
                let task = tokio::task::spawn_blocking(move || {
                    if check_files {
                        file::check_private_file(&file).map_err(|e| {
                            Err(format!(
                                "{e} (the same check start-up applies; fix the file's owner and mode)"
                            ))
                        })?;
                    }
                    let bytes = file::read_bounded(&file).map_err(Ok)?;
                    if let Some(why) = kdf_changed(&bytes, expected.as_ref()) {
                        return Err(Err(why));
                    }
                    file::decode_with(&at, &bytes, &root).map_err(Ok)
                });
                match tokio::time::timeout(KEYSTORE_READ_TIMEOUT, task).await {
                    Ok(Ok(Ok(keystore))) => Ok(Reloaded {
                        keystore,
                        cache: None,
                    }),
                    Ok(Ok(Err(Ok(e)))) => Err(ReloadError::Failed(e)),
                    Ok(Ok(Err(Err(why)))) => Err(ReloadError::Refused(why)),
                    Ok(Err(join)) => {
                        Err(ReloadError::Refused(format!("reload task failed: {join}")))
                    }
                    Err(_) => Err(ReloadError::Failed(KeystoreError::Io {
                        path: path.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "reading it took longer than {} s",
                                KEYSTORE_READ_TIMEOUT.as_secs()
                            ),
                        ),
                    })),
                }
            }
            Kind::Etcd(_) => {
                let (bytes, _) = self.read_raw().await.map_err(ReloadError::Failed)?;
                if let Some(why) = kdf_changed(&bytes, same_kdf) {
                    return Err(ReloadError::Refused(why));
                }
                let keystore = self.decode(&bytes, root).map_err(ReloadError::Failed)?;
                Ok(Reloaded {
                    keystore,
                    cache: Some(CachedCopy(bytes)),
                })
            }
        }
    }

    /// Once a reloaded keystore is in use: keeps its sealed copy as the start-up cache in
    /// `cache_dir` (etcd).
    pub fn keep_cache(&self, copy: Option<CachedCopy>, cache_dir: Option<&Path>) {
        if let (Some(CachedCopy(bytes)), Some(dir)) = (copy, cache_dir) {
            etcd::update_cache(dir, &bytes);
        }
    }

    /// A feed of "the keystore may have changed" events. For etcd, a watch task runs until
    /// the feed is dropped.
    pub fn changes(&self) -> Changes {
        Changes {
            kind: match &self.kind {
                Kind::File(p) => ChangesKind::File {
                    path: p.clone(),
                    last: fingerprint(p),
                },
                Kind::Etcd(e) => {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(etcd::watch(e.clone(), tx));
                    ChangesKind::Etcd(rx)
                }
            },
        }
    }

    /// Where a server writes decrypt usage: beside a file keystore, or in the cache directory
    /// of an etcd one (each node counts its own; `keys list` sums them from the node records).
    pub fn usage_path(&self, cache_dir: Option<&Path>) -> PathBuf {
        match (&self.kind, cache_dir) {
            (Kind::File(p), _) => crate::keyring::usage::usage_path(p),
            (Kind::Etcd(_), Some(dir)) => dir.join("usage.json"),
            (Kind::Etcd(_), None) => std::env::temp_dir().join("localkms-usage.json"),
        }
    }

    /// Decrypt usage as the commands see it: the usage file beside a file keystore, or every
    /// live node's authenticated report summed for an etcd keystore.
    pub async fn usage(&self, root: &RootKeyProvider) -> Result<UsageFile, UsageOrEtcdError> {
        if let Kind::File(p) = &self.kind {
            return Ok(crate::keyring::usage::read_usage(
                &crate::keyring::usage::usage_path(p),
            )?);
        }
        match self.nodes(root).await.map_err(Box::new)? {
            Some(nodes) => Ok(etcd::nodes::merged_usage(&nodes.list().await?)),
            None => Ok(UsageFile::default()),
        }
    }

    /// Where this node keeps its high-water mark for the keystore: beside a file keystore,
    /// in `cache_dir` for etcd (none without one).
    pub fn high_water(&self, cache_dir: Option<&Path>) -> Option<high_water::HighWater> {
        match (&self.kind, cache_dir) {
            (Kind::File(p), _) => {
                let mut name = p.as_os_str().to_owned();
                name.push(".high-water.json");
                Some(high_water::HighWater::at(
                    PathBuf::from(name),
                    Some(p.clone()),
                ))
            }
            (Kind::Etcd(_), Some(dir)) => Some(high_water::HighWater::at(
                dir.join(high_water::STATE_FILE),
                None,
            )),
            (Kind::Etcd(_), None) => None,
        }
    }

    /// Where this node records that it has served the keystore finalized (beside the
    /// high-water mark; none for etcd without a cache directory).
    pub fn upgrade_state(&self, cache_dir: Option<&Path>) -> Option<upgrade_state::UpgradeState> {
        match (&self.kind, cache_dir) {
            (Kind::File(p), _) => {
                let mut name = p.as_os_str().to_owned();
                name.push(".upgrade-state.json");
                Some(upgrade_state::UpgradeState::at(PathBuf::from(name)))
            }
            (Kind::Etcd(_), Some(dir)) => Some(upgrade_state::UpgradeState::at(
                dir.join(upgrade_state::STATE_FILE),
            )),
            (Kind::Etcd(_), None) => None,
        }
    }

    /// What to tell an operator after staging `id`.
    pub fn staged_hint(&self, id: &str) -> String {
        let at = &self.location;
        match &self.kind {
            Kind::File(_) => format!("staged {id} in {at}: it decrypts but does not encrypt. Copy the keystore to every node, check each with `localkms keystore verify`, then `localkms keys promote {id}`."),
            Kind::Etcd(_) => format!("staged {id} in {at}: it decrypts but does not encrypt. `localkms nodes` shows when every node has it; then `localkms keys promote {id}`."),
        }
    }
}

/// What [`Store::scrub_destroyed`] did, for the command to report truthfully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scrubbed {
    /// A file keystore: backups rewritten without the key, and backups removed because they
    /// could not be opened to check.
    Backups {
        /// Rewritten.
        rewritten: usize,
        /// Removed.
        removed: usize,
    },
    /// etcd: the key's older revisions stay in etcd's history until it is compacted past
    /// `revision`, and every node's cache until its server loads the change.
    Shared {
        /// The keystore key's revision holding the destroy.
        revision: i64,
    },
}

/// Why usage could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum UsageOrEtcdError {
    /// The keystore (needed to authenticate node records) could not be read.
    #[error(transparent)]
    Keystore(#[from] Box<KeystoreError>),
    /// The usage file is unreadable.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The node records could not be read.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// Creates the missing directories above `file` with mode 0700 (they will hold key material);
/// returns the directory when it had to be created.
pub(crate) fn create_parent_dir(file: &Path) -> Result<Option<PathBuf>, KeystoreError> {
    let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(None);
    };
    if dir.exists() {
        return Ok(None);
    }
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(|source| KeystoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
    Ok(Some(dir.to_owned()))
}
