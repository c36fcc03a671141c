//! Keeps the server's keyring in step with the keystore, and runs scheduled rotation.
//!
//! The store reports possible changes (a polled file, an etcd watch; see
//! [`crate::keystore::backend::Changes`]), and SIGHUP forces a reload. The rules are the same
//! for every backend: a keystore that fails to load, goes back in generation, diverged, or
//! drops a KEK is refused, and the server keeps the keyring it has and says why.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::keyring::refresh::MIN_INTERVAL;
use crate::keyring::usage::{UsageTracker, FLUSH_INTERVAL};
use crate::keyring::{Keyring, SharedKeyring};
use crate::keystore::backend::{blocking, ReloadError, POLL_INTERVAL};
use crate::keystore::{Actor, HistoryEntry, KeyState, KeystoreError, RootKeyProvider, Store};

/// How often a failed backup of the generation in use is retried.
const BACKUP_RETRY: Duration = Duration::from_secs(10);

/// What one reload attempt did.
#[derive(Debug)]
pub(crate) enum ReloadOutcome {
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

/// Reload results since start, for metrics.
#[derive(Default, Debug)]
pub struct ReloadCounters {
    /// New keyrings swapped in.
    pub ok: AtomicU64,
    /// Refused by a safety rule.
    pub refused: AtomicU64,
    /// Failed to load.
    pub failed: AtomicU64,
}

/// Reloads the keystore into a [`SharedKeyring`].
pub(crate) struct Reloader {
    store: Store,
    /// For etcd keystores: a sealed copy of the last keystore loaded, to start from when etcd
    /// is down.
    cache_dir: Option<PathBuf>,
    /// Where decrypt usage is written.
    usage_path: PathBuf,
    root: Arc<RootKeyProvider>,
    keyring: SharedKeyring,
    usage: Arc<UsageTracker>,
    counters: Arc<ReloadCounters>,
    history: std::sync::Mutex<Vec<HistoryEntry>>,
    rotate_after: Option<Duration>,
    /// Apply the start-up ownership and mode checks to every reloaded keystore file.
    check_files: bool,
    /// Raised to every keystore swapped in.
    high_water: Option<crate::keystore::backend::high_water::HighWater>,
    /// The key derivation of the keystore in use: a change waits for SIGHUP or a restart.
    kdf: std::sync::Mutex<Option<crate::keystore::Kdf>>,
    /// Backs up every keystore before it is swapped in (`--backup-dir`).
    backups: Option<Arc<crate::recovery::backup::Backups>>,
}

impl Reloader {
    /// Watches `path`, opening it with `root`, feeding `keyring`. `history` is the audit trail
    /// of the keystore already loaded, so only later entries are logged.
    pub(crate) fn new(
        store: Store,
        root: Arc<RootKeyProvider>,
        keyring: SharedKeyring,
        history: Vec<HistoryEntry>,
    ) -> Self {
        let usage = Arc::clone(keyring.load().usage());
        let usage_path = store.usage_path(None);
        Reloader {
            store,
            cache_dir: None,
            usage_path,
            root,
            keyring,
            usage,
            counters: Arc::default(),
            history: std::sync::Mutex::new(history),
            rotate_after: None,
            check_files: true,
            high_water: None,
            kdf: std::sync::Mutex::new(None),
            backups: None,
        }
    }

    /// The key derivation of the keystore already loaded; a routine reload refuses another.
    pub(crate) fn with_kdf(self, kdf: crate::keystore::Kdf) -> Self {
        *self.kdf.lock().unwrap_or_else(|e| e.into_inner()) = Some(kdf);
        self
    }

    /// Raise this node's high-water mark to every keystore swapped in.
    pub(crate) fn with_high_water(
        mut self,
        mark: Option<crate::keystore::backend::high_water::HighWater>,
    ) -> Self {
        self.high_water = mark;
        self
    }

    /// Whether each reloaded keystore file must pass the ownership and mode checks start-up
    /// applies (on unless `--insecure-skip-file-checks`).
    pub(crate) fn with_file_checks(mut self, check: bool) -> Self {
        self.check_files = check;
        self
    }

    /// Shares `counters` (so they survive a restart of the reload task).
    pub(crate) fn with_counters(mut self, counters: Arc<ReloadCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// For etcd keystores: keep a sealed copy of every keystore loaded in `dir`, and write
    /// decrypt usage there.
    pub(crate) fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.usage_path = self.store.usage_path(dir.as_deref());
        self.cache_dir = dir;
        self
    }

    /// Backs up every keystore accepted, before its keyring is swapped in, so no key
    /// encrypts data before a backup holding it exists (a failed backup is logged and
    /// counted; the swap goes ahead).
    pub(crate) fn with_backups(
        mut self,
        backups: Option<Arc<crate::recovery::backup::Backups>>,
    ) -> Self {
        self.backups = backups;
        self
    }

    /// Rotates automatically once the primary has been primary for `after`.
    pub(crate) fn with_rotate_after(mut self, after: Option<Duration>) -> Self {
        self.rotate_after = after;
        self
    }

    /// Loads the file now and swaps it in if the safety rules allow. `force` reloads even
    /// when the generation is unchanged (SIGHUP).
    pub(crate) async fn reload(&self, force: bool) -> ReloadOutcome {
        let expected_kdf = if force {
            None
        } else {
            self.kdf.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        let reloaded = match self
            .store
            .read_for_reload(&self.root, self.check_files, expected_kdf.as_ref())
            .await
        {
            Ok(r) => r,
            Err(ReloadError::Failed(e)) => return ReloadOutcome::Failed(e),
            Err(ReloadError::Refused(why)) => return ReloadOutcome::Refused(why),
        };
        let (ks, cached) = (reloaded.keystore, reloaded.cache);
        let current = self.keyring.load();
        let (from, to) = (current.generation(), ks.generation());
        if to < from {
            return ReloadOutcome::Refused(format!(
                "keystore generation {to} is older than the loaded generation {from} (a restored backup or a stale copy?)"
            ));
        }
        if to == from && ks.write_id() == current.write_id() {
            if !force {
                return ReloadOutcome::Unchanged;
            }
        } else if to == from && !force {
            return ReloadOutcome::Refused(format!(
                "keystore generation {to} has different contents from the loaded generation {from}: the copies diverged (a change made on two nodes separately?). Make every change on one node and distribute that file; send SIGHUP to load this one anyway"
            ));
        }
        if let Some(mark) = &self.high_water {
            if let Err(e) = blocking(|| mark.check_identity(&ks, self.store.location())) {
                return ReloadOutcome::Refused(e.to_string());
            }
        }
        let upgrade_state = self.store.upgrade_state(self.cache_dir.as_deref());
        let root_key = match self.root.key_for(ks.kdf()) {
            Ok(key) => key,
            Err(e) => return ReloadOutcome::Refused(e.to_string()),
        };
        if let Some(state) = &upgrade_state {
            if let Err(e) = blocking(|| state.check(&ks, &root_key, self.store.location())) {
                return ReloadOutcome::Refused(e.to_string());
            }
        }
        let finalized = ks.finalized();
        let backup = self.backups.as_ref().and_then(|b| b.seal_logged(&ks));
        let history = ks.history().to_vec();
        let (generation, write_id, keystore_id) =
            (ks.generation(), ks.write_id(), ks.keystore_id());
        let new_kdf = ks.kdf().clone();
        let next = Keyring::from_keystore(ks, Arc::clone(&self.usage))
            .with_legacy(Arc::clone(current.legacy()));
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
        if let (Some(b), Some(sealed)) = (&self.backups, &backup) {
            blocking(|| b.store_logged(sealed));
        }
        self.keyring.store(next);
        *self.kdf.lock().unwrap_or_else(|e| e.into_inner()) = Some(new_kdf);
        if let Some(mark) = &self.high_water {
            if let Err(e) = blocking(|| mark.record(generation, write_id, keystore_id, false)) {
                tracing::warn!(error = %e, "could not raise the high-water mark");
            }
        }
        if let Some(state) = &upgrade_state {
            if let Err(e) = blocking(|| state.record_id(finalized, keystore_id, &root_key)) {
                tracing::warn!(error = %e, "could not record this node's upgrade state");
            }
        }
        self.log_new_history(history);
        self.store.keep_cache(cached, self.cache_dir.as_deref());
        ReloadOutcome::Swapped { from, to }
    }

    /// When the backup of the generation in use failed (a full disk, a directory that was
    /// missing): reads the keystore again and retries, so a backup appears once the cause is
    /// fixed instead of at the next key change.
    async fn retry_backup(&self) {
        let Some(b) = &self.backups else { return };
        let serving = self.keyring.load().generation();
        if b.status()
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
            == serving
        {
            return;
        }
        match self.store.load(&self.root).await {
            Ok(ks) if ks.generation() == serving => blocking(|| b.write_logged(&ks)),
            // A newer generation is on its way through a reload, which backs it up.
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the keystore to retry its backup"),
        }
    }

    /// Logs the audit entries added since the last keystore this server loaded.
    fn log_new_history(&self, history: Vec<HistoryEntry>) {
        let mut seen = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let start = match seen.last() {
            Some(last) => history.iter().rposition(|h| h == last).map_or(0, |i| i + 1),
            None => 0,
        };
        for h in &history[start..] {
            tracing::info!(
                action = %h.action.as_str(),
                key_id = %h.key_id.as_ref().map(|k| k.as_str()).unwrap_or("-"),
                by = %h.actor.user,
                host = %h.actor.host,
                at = %crate::timefmt::rfc3339(h.at),
                "keystore change picked up"
            );
        }
        *seen = history;
    }

    async fn reload_and_log(&self, force: bool) {
        let outcome = self.reload(force).await;
        let kept = self.keyring.load().generation();
        match &outcome {
            ReloadOutcome::Swapped { from, to } => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                let ring = self.keyring.load();
                let primary = ring
                    .primary_id()
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                tracing::info!(keystore = %self.store.location(), from, to, primary_key_id = %primary, "keystore reloaded");
            }
            ReloadOutcome::Unchanged => {
                tracing::debug!(keystore = %self.store.location(), "keystore unchanged");
            }
            ReloadOutcome::Refused(why) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(keystore = %self.store.location(), kept_generation = kept, "keystore reload refused: {why}; still serving the loaded keyring");
            }
            ReloadOutcome::Failed(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(keystore = %self.store.location(), kept_generation = kept, "keystore reload failed: {e}; still serving the loaded keyring");
            }
        }
    }

    /// Whether the loaded primary is older than `--rotate-after`.
    fn rotation_due(&self) -> Option<i64> {
        let after = i64::try_from(self.rotate_after?.as_secs()).ok()?;
        let ring = self.keyring.load();
        let primary = ring
            .key_info()
            .iter()
            .find(|k| k.state == KeyState::Primary)?;
        (OffsetDateTime::now_utc().unix_timestamp() - primary.changed_at >= after).then_some(after)
    }

    async fn scheduled_rotation(&self, after: i64) {
        // Decide from the keystore itself, not the loaded keyring (which may be stale after a
        // refused reload): a rotation that is not due must not write a new generation.
        match self.store.load(&self.root).await {
            Ok(ks) if !ks.rotation_due(after, OffsetDateTime::now_utc()) => {
                self.reload_and_log(false).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "scheduled rotation: cannot read the keystore; will retry");
                return;
            }
        }
        let actor = Actor::server();
        let result = self
            .store
            .update(&self.root, |ks| {
                Ok(ks.rotate_if_older(after, OffsetDateTime::now_utc(), &actor)?)
            })
            .await;
        match result {
            Ok(Some(id)) => {
                tracing::info!(new_primary = %id, after_s = after, "scheduled rotation: the primary reached --rotate-after");
                self.reload_and_log(false).await;
            }
            Ok(None) => self.reload_and_log(false).await,
            Err(e) => tracing::error!(error = %e, "scheduled rotation failed; will retry"),
        }
    }

    fn flush_usage(&self, force: bool) {
        // A write and an fsync: off the async workers.
        let result = blocking(|| self.usage.flush(&self.usage_path, force));
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not write key usage");
        }
    }

    /// Polls the file, listens for SIGHUP, writes usage and runs scheduled rotation until
    /// `shutdown` resolves; writes usage once more on the way out.
    pub(crate) async fn watch(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; relying on file polling only");
                None
            }
        };
        let mut changes = self.store.changes();
        let mut last_flush = Instant::now();
        let mut last_rotation_attempt: Option<Instant> = None;
        let mut last_backup_retry = Instant::now();
        tokio::pin!(shutdown);
        enum Event {
            Tick,
            Changed,
            Hangup,
            Missed,
        }
        let refresh = self.keyring.refresh();
        let mut last_miss_reload: Option<Instant> = None;
        loop {
            let event = tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(POLL_INTERVAL) => Event::Tick,
                () = changes.next() => Event::Changed,
                () = refresh.requested() => Event::Missed,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => Event::Hangup,
            };
            match event {
                Event::Tick => {
                    if last_flush.elapsed() >= FLUSH_INTERVAL {
                        last_flush = Instant::now();
                        self.flush_usage(false);
                    }
                    if last_backup_retry.elapsed() >= BACKUP_RETRY {
                        last_backup_retry = Instant::now();
                        self.retry_backup().await;
                    }
                    if let Some(after) = self.rotation_due() {
                        // Retry a failed rotation at most every 30 s (or every --rotate-after,
                        // if that is shorter, so a short schedule is kept too).
                        let retry =
                            Duration::from_secs(30).min(self.rotate_after.unwrap_or(Duration::MAX));
                        if last_rotation_attempt.is_none_or(|t| t.elapsed() >= retry) {
                            last_rotation_attempt = Some(Instant::now());
                            self.scheduled_rotation(after).await;
                            changes.seen();
                        }
                    }
                }
                Event::Changed => self.reload_and_log(false).await,
                Event::Missed => {
                    // A Decrypt named a key the keyring lacks: read the keystore now rather
                    // than wait for the watch, at most once per MIN_INTERVAL.
                    if let Some(wait) =
                        last_miss_reload.and_then(|t| MIN_INTERVAL.checked_sub(t.elapsed()))
                    {
                        tokio::time::sleep(wait).await;
                    }
                    last_miss_reload = Some(Instant::now());
                    tracing::debug!("a Decrypt named a key not loaded here: reading the keystore before answering");
                    let ticket = refresh.begin();
                    self.reload_and_log(false).await;
                    changes.seen();
                    refresh.finish(ticket);
                }
                Event::Hangup => {
                    tracing::info!("SIGHUP received: reloading the keystore");
                    changes.seen();
                    self.reload_and_log(true).await;
                }
            }
        }
        refresh.stop_listening();
        self.flush_usage(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore;
    use crate::keystore::model::tests::{actor, fresh};
    use crate::keystore::{RootKey, RootKeyProvider};

    fn file_store(path: &std::path::Path) -> Store {
        Store::open(
            &crate::keystore::KeystoreLocation::parse(path.to_str().expect("utf8")).expect("path"),
            &Default::default(),
        )
        .expect("store")
    }

    fn setup() -> (
        tempfile::TempDir,
        PathBuf,
        Arc<RootKeyProvider>,
        SharedKeyring,
        Vec<HistoryEntry>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let root = Arc::new(RootKeyProvider::from_key(RootKey::from_bytes([8u8; 32])));
        keystore::create(&path, &root, &fresh()).expect("create");
        let ks = keystore::load(&path, &root).expect("load");
        let history = ks.history().to_vec();
        let ring = Keyring::from_keystore(ks, Arc::new(UsageTracker::default()));
        (dir, path, root, SharedKeyring::new(ring), history)
    }

    #[tokio::test]
    async fn rotation_is_picked_up_and_rollback_refused() {
        let (_dir, path, root, shared, history) = setup();
        let reloader = Reloader::new(
            file_store(&path),
            Arc::clone(&root),
            shared.clone(),
            history,
        );
        assert!(matches!(
            reloader.reload(false).await,
            ReloadOutcome::Unchanged
        ));
        let backup = std::fs::read(&path).expect("read");
        let new = keystore::update(&path, &root, |ks| {
            Ok(ks.rotate(OffsetDateTime::now_utc(), &actor())?)
        })
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
    async fn diverged_copies_at_one_generation_are_refused_unless_forced() {
        let (_dir, path, root, shared, history) = setup();
        let loaded = shared.load().primary_id().cloned();
        // A different keystore written at the same generation.
        let other =
            keystore::model::tests::clone_for_test(&keystore::load(&path, &root).expect("load"));
        std::fs::remove_file(&path).expect("rm");
        keystore::create(&path, &root, &other).expect("create");
        let reloader = Reloader::new(file_store(&path), root, shared.clone(), history);
        match reloader.reload(false).await {
            ReloadOutcome::Refused(why) => assert!(why.contains("diverged"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            reloader.reload(true).await,
            ReloadOutcome::Swapped { .. }
        ));
        assert_eq!(shared.load().primary_id().cloned(), loaded);
    }

    #[tokio::test]
    async fn a_changed_key_derivation_waits_for_sighup() {
        let (_dir, path, root, shared, history) = setup();
        let loaded_under_a_passphrase = crate::keystore::Kdf::Argon2id {
            m_kib: 1024,
            t: 1,
            p: 1,
            salt: [3u8; 16],
        };
        let reloader = Reloader::new(file_store(&path), root, shared, history)
            .with_kdf(loaded_under_a_passphrase);
        match reloader.reload(false).await {
            ReloadOutcome::Refused(why) => assert!(why.contains("key derivation"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // SIGHUP (force) loads it, and from then on it is the expected derivation.
        assert!(!matches!(
            reloader.reload(true).await,
            ReloadOutcome::Refused(_) | ReloadOutcome::Failed(_)
        ));
        assert!(matches!(
            reloader.reload(false).await,
            ReloadOutcome::Unchanged
        ));
    }

    #[tokio::test]
    async fn broken_file_keeps_the_keyring() {
        let (_dir, path, root, shared, history) = setup();
        let before = shared.load().primary_id().cloned();
        std::fs::write(&path, b"garbage").expect("write");
        let reloader = Reloader::new(file_store(&path), root, shared.clone(), history);
        assert!(matches!(
            reloader.reload(true).await,
            ReloadOutcome::Failed(_)
        ));
        assert_eq!(shared.load().primary_id().cloned(), before);
        assert!(shared.load().healthy());
    }

    #[tokio::test]
    async fn dropped_key_is_refused() {
        let (_dir, path, root, shared, history) = setup();
        // A different keystore at a higher generation that lacks the loaded key.
        let mut other = fresh();
        other.generation = 5;
        std::fs::remove_file(&path).expect("rm");
        keystore::create(&path, &root, &other).expect("create");
        let reloader = Reloader::new(file_store(&path), root, shared.clone(), history);
        match reloader.reload(false).await {
            ReloadOutcome::Refused(why) => assert!(why.contains("tombstone"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(shared.load().generation(), 1);
    }

    #[tokio::test]
    async fn scheduled_rotation_rotates_when_due() {
        let (_dir, path, root, shared, history) = setup();
        let old = shared.load().primary_id().cloned();
        let reloader = Reloader::new(file_store(&path), root, shared.clone(), history)
            .with_rotate_after(Some(Duration::from_secs(0)));
        let after = reloader.rotation_due().expect("due");
        reloader.scheduled_rotation(after).await;
        assert_ne!(shared.load().primary_id().cloned(), old);
        assert_eq!(shared.load().generation(), 2);
    }
}
