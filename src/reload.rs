//! Keeps the server's keyring in step with the keystore file.
//!
//! The file is polled (cheap `stat`, every [`POLL_INTERVAL`]) and reloaded on SIGHUP. Polling
//! rather than inotify because keystore writes replace the file by rename (a new inode each
//! time), because it works the same on hostPath, NFS and overlay mounts, and because it bounds
//! the time to notice a change with no moving parts. A keystore that fails to load, goes back
//! in generation, or drops a KEK is refused: the server keeps the keyring it has and says why.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::keyring::{Keyring, SharedKeyring};
use crate::keystore::{self, KeystoreError, RootKey};

/// How often the keystore file's metadata is checked; well inside the 2 s promise.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// A new keyring is in use.
    Swapped {
        /// Generation before.
        from: u64,
        /// Generation now.
        to: u64,
    },
    /// The file holds the generation already loaded.
    Unchanged,
    /// The file loaded but was refused by a safety rule.
    Refused(String),
    /// The file could not be loaded.
    Failed(KeystoreError),
}

/// Identity and version of the file on disk, for change detection without reading it.
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

/// Reloads the keystore into a [`SharedKeyring`].
pub struct Reloader {
    path: PathBuf,
    root: Arc<RootKey>,
    keyring: SharedKeyring,
}

impl Reloader {
    /// Watches `path`, opening it with `root`, feeding `keyring`.
    pub fn new(path: PathBuf, root: Arc<RootKey>, keyring: SharedKeyring) -> Self {
        Reloader {
            path,
            root,
            keyring,
        }
    }

    /// Loads the file now and swaps it in if the safety rules allow. `force` reloads even
    /// when the generation is unchanged (SIGHUP).
    pub async fn reload(&self, force: bool) -> ReloadOutcome {
        let path = self.path.clone();
        let root = Arc::clone(&self.root);
        let loaded = tokio::task::spawn_blocking(move || keystore::load(&path, &root)).await;
        let ks = match loaded {
            Ok(Ok(ks)) => ks,
            Ok(Err(e)) => return ReloadOutcome::Failed(e),
            Err(join) => {
                return ReloadOutcome::Refused(format!("reload task failed: {join}"));
            }
        };
        let current = self.keyring.load();
        let (from, to) = (current.generation(), ks.generation());
        if to < from {
            return ReloadOutcome::Refused(format!(
                "keystore generation {to} is older than the loaded generation {from} (a restored backup or a stale copy?)"
            ));
        }
        if to == from && !force {
            return ReloadOutcome::Unchanged;
        }
        let next = Keyring::from_keystore(ks);
        let dropped: Vec<String> = current
            .key_ids()
            .filter(|id| !next.key_ids().any(|n| n == *id))
            .map(|id| id.to_string())
            .collect();
        if !dropped.is_empty() {
            return ReloadOutcome::Refused(format!(
                "keystore no longer holds key(s) {} that the loaded keyring has; a key may only leave as a destroyed tombstone",
                dropped.join(", ")
            ));
        }
        if !next.healthy() {
            return ReloadOutcome::Refused(
                "the new keyring failed its self-test round trip".to_owned(),
            );
        }
        self.keyring.store(next);
        ReloadOutcome::Swapped { from, to }
    }

    async fn reload_and_log(&self, force: bool) {
        match self.reload(force).await {
            ReloadOutcome::Swapped { from, to } => {
                let ring = self.keyring.load();
                let primary = ring
                    .primary_id()
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                tracing::info!(keystore = %self.path.display(), from, to, primary_key_id = %primary, "keystore reloaded");
            }
            ReloadOutcome::Unchanged => {
                tracing::debug!(keystore = %self.path.display(), "keystore unchanged");
            }
            ReloadOutcome::Refused(why) => {
                let kept = self.keyring.load().generation();
                tracing::error!(keystore = %self.path.display(), kept_generation = kept, "keystore reload refused: {why}; still serving the loaded keyring");
            }
            ReloadOutcome::Failed(e) => {
                let kept = self.keyring.load().generation();
                tracing::error!(keystore = %self.path.display(), kept_generation = kept, "keystore reload failed: {e}; still serving the loaded keyring");
            }
        }
    }

    /// Polls the file and listens for SIGHUP until `shutdown` resolves.
    pub async fn watch(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; relying on file polling only");
                None
            }
        };
        let mut last = fingerprint(&self.path);
        tokio::pin!(shutdown);
        loop {
            let force = tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {
                    let now = fingerprint(&self.path);
                    if now == last {
                        continue;
                    }
                    last = now;
                    false
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!("SIGHUP received: reloading the keystore");
                    last = fingerprint(&self.path);
                    true
                }
            };
            self.reload_and_log(force).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::{Keystore, RootKey};
    use time::OffsetDateTime;

    fn setup() -> (tempfile::TempDir, PathBuf, Arc<RootKey>, SharedKeyring) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let root = Arc::new(RootKey::from_bytes([8u8; 32]));
        let ks = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        keystore::create(&path, &root, &ks).expect("create");
        let ring = Keyring::from_keystore(keystore::load(&path, &root).expect("load"));
        (dir, path, root, SharedKeyring::new(ring))
    }

    #[tokio::test]
    async fn rotation_is_picked_up_and_rollback_refused() {
        let (_dir, path, root, shared) = setup();
        let reloader = Reloader::new(path.clone(), Arc::clone(&root), shared.clone());
        assert!(matches!(
            reloader.reload(false).await,
            ReloadOutcome::Unchanged
        ));
        let backup = std::fs::read(&path).expect("read");
        let new = keystore::update(&path, &root, |ks| Ok(ks.rotate(OffsetDateTime::now_utc())?))
            .expect("rotate");
        assert!(matches!(
            reloader.reload(false).await,
            ReloadOutcome::Swapped { from: 1, to: 2 }
        ));
        assert_eq!(shared.load().primary_id(), Some(&new));
        // Putting the old generation back is refused and the new keyring stays.
        std::fs::write(&path, &backup).expect("write");
        assert!(matches!(
            reloader.reload(true).await,
            ReloadOutcome::Refused(_)
        ));
        assert_eq!(shared.load().primary_id(), Some(&new));
    }

    #[tokio::test]
    async fn broken_file_keeps_the_keyring() {
        let (_dir, path, root, shared) = setup();
        let before = shared.load().primary_id().cloned();
        std::fs::write(&path, b"garbage").expect("write");
        let reloader = Reloader::new(path, root, shared.clone());
        assert!(matches!(
            reloader.reload(true).await,
            ReloadOutcome::Failed(_)
        ));
        assert_eq!(shared.load().primary_id().cloned(), before);
        assert!(shared.load().healthy());
    }

    #[tokio::test]
    async fn dropped_key_is_refused() {
        let (_dir, path, root, shared) = setup();
        // A different keystore at a higher generation that lacks the loaded key.
        let mut other = Keystore::new_with_primary(OffsetDateTime::now_utc()).expect("new");
        other.generation = 5;
        std::fs::remove_file(&path).expect("rm");
        keystore::create(&path, &root, &other).expect("create");
        let reloader = Reloader::new(path, root, shared.clone());
        match reloader.reload(false).await {
            ReloadOutcome::Refused(why) => assert!(why.contains("tombstone"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(shared.load().generation(), 1);
    }
}
