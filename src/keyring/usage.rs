//! Per-KEK decrypt counts and last-use times: what tells an operator an old KEK is unused.
//!
//! The hot path bumps atomics only. The running server writes the totals to a non-secret JSON
//! file beside the keystore (`KEYSTORE.usage.json`) at most once a minute and at shutdown;
//! `keys list` and `keys destroy` read it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::key_id::KeyId;

/// How often the server writes the usage file, at most.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counters for one KEK.
#[derive(Default)]
pub struct KeyUsage {
    decrypts: AtomicU64,
    last_decrypt_at: AtomicI64,
}

impl KeyUsage {
    /// Decrypts served so far.
    pub fn decrypts(&self) -> u64 {
        self.decrypts.load(Ordering::Relaxed)
    }

    /// Unix seconds of the last decrypt, 0 when none.
    pub fn last_decrypt_at(&self) -> i64 {
        self.last_decrypt_at.load(Ordering::Relaxed)
    }
}

/// One KEK's line in the usage file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Decrypts served.
    pub decrypts: u64,
    /// RFC 3339 time of the last decrypt, if any.
    pub last_decrypt_at: Option<String>,
    /// The same as Unix seconds, for scripts and the destroy check.
    pub last_decrypt_unix: Option<i64>,
}

/// The usage file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFile {
    /// When the server last wrote it, RFC 3339.
    pub written_at: String,
    /// Since when (Unix seconds) these counts run without a restart from zero: the destroy
    /// guard only trusts "no decrypt" over a window the count covered. Absent in files
    /// written before it existed, which count from the next server start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counting_since_unix: Option<i64>,
    /// Per key id.
    pub keys: BTreeMap<String, UsageRecord>,
}

/// Why the usage file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// I/O failure.
    #[error("cannot access usage file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not valid JSON of the expected shape.
    #[error("usage file {path} is not valid: {source}. The server moves such a file aside at start and counts afresh; until the new count covers --min-retired-age, `keys destroy` refuses without --force")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// Where the usage file for `keystore` lives.
pub fn usage_path(keystore: &Path) -> PathBuf {
    let mut name = keystore.as_os_str().to_owned();
    name.push(".usage.json");
    PathBuf::from(name)
}

/// Reads the usage file; a missing file is empty usage.
pub fn read_usage(path: &Path) -> Result<UsageFile, UsageError> {
    match crate::keystore::read_regular(path, 16 * 1024 * 1024) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| UsageError::Parse {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UsageFile::default()),
        Err(source) => Err(UsageError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Moves an unreadable usage file aside (to `PATH.corrupt-UNIXTIME`) so the server can count
/// afresh without overwriting what was there; returns where it went.
pub fn move_aside(path: &Path) -> Result<PathBuf, UsageError> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".corrupt-{}",
        time::OffsetDateTime::now_utc().unix_timestamp()
    ));
    let aside = PathBuf::from(name);
    std::fs::rename(path, &aside).map_err(|source| UsageError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(aside)
}

/// All KEKs' counters, shared by every keyring the server builds so counts survive reloads.
pub struct UsageTracker {
    keys: RwLock<HashMap<KeyId, Arc<KeyUsage>>>,
    dirty: AtomicBool,
    /// Since when the counts run (Unix seconds).
    counting_since: i64,
}

impl Default for UsageTracker {
    fn default() -> Self {
        UsageTracker {
            keys: RwLock::default(),
            dirty: AtomicBool::new(false),
            counting_since: time::OffsetDateTime::now_utc().unix_timestamp(),
        }
    }
}

impl UsageTracker {
    /// Starts from the counts in a usage file, so totals are cumulative across restarts.
    pub fn from_file(file: &UsageFile) -> Self {
        let mut tracker = UsageTracker::default();
        if let Some(since) = file.counting_since_unix {
            tracker.counting_since = tracker.counting_since.min(since);
        }
        for (id, rec) in &file.keys {
            if let Ok(id) = KeyId::parse(id) {
                let usage = tracker.handle(&id);
                usage.decrypts.store(rec.decrypts, Ordering::Relaxed);
                usage
                    .last_decrypt_at
                    .store(rec.last_decrypt_unix.unwrap_or(0), Ordering::Relaxed);
            }
        }
        tracker
    }

    /// The counters for `id`, created at zero if new. Called when a keyring is built, never on
    /// the request path.
    pub fn handle(&self, id: &KeyId) -> Arc<KeyUsage> {
        if let Some(u) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Arc::clone(u);
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(keys.entry(id.clone()).or_default())
    }

    /// Counts one decrypt under `usage` at `now` (Unix seconds): two atomic stores.
    pub fn record(&self, usage: &KeyUsage, now: i64) {
        usage.decrypts.fetch_add(1, Ordering::Relaxed);
        usage.last_decrypt_at.store(now, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Since when the counts run, Unix seconds.
    pub fn counting_since(&self) -> i64 {
        self.counting_since
    }

    /// A snapshot of every KEK's counters, sorted by id.
    pub fn snapshot(&self) -> Vec<(KeyId, u64, i64)> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = keys
            .iter()
            .map(|(id, u)| (id.clone(), u.decrypts(), u.last_decrypt_at()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes the usage file atomically if anything changed since the last write (or always,
    /// with `force`).
    pub fn flush(&self, path: &Path, force: bool) -> Result<bool, UsageError> {
        if !self.dirty.swap(false, Ordering::Relaxed) && !force {
            return Ok(false);
        }
        let mut file = UsageFile {
            written_at: crate::timefmt::rfc3339(time::OffsetDateTime::now_utc().unix_timestamp()),
            counting_since_unix: Some(self.counting_since),
            keys: BTreeMap::new(),
        };
        for (id, decrypts, last) in self.snapshot() {
            let last = (last > 0).then_some(last);
            file.keys.insert(
                id.to_string(),
                UsageRecord {
                    decrypts,
                    last_decrypt_at: last.map(crate::timefmt::rfc3339),
                    last_decrypt_unix: last,
                },
            );
        }
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| UsageError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        // Atomic and fsynced, directory included, like every other file localkms keeps.
        crate::keystore::file::write_atomically(path, ".localkms-usage-", &bytes, true, || {})
            .map_err(|source| UsageError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_flush_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = usage_path(&dir.path().join("keystore"));
        let tracker = UsageTracker::default();
        let id = KeyId::parse("kek-20261126-00000001").expect("id");
        let h = tracker.handle(&id);
        assert!(
            !tracker.flush(&path, false).expect("flush"),
            "nothing to write yet"
        );
        tracker.record(&h, 1_800_000_000);
        tracker.record(&h, 1_800_000_100);
        assert!(tracker.flush(&path, false).expect("flush"));
        let file = read_usage(&path).expect("read");
        let rec = &file.keys["kek-20261126-00000001"];
        assert_eq!(rec.decrypts, 2);
        assert_eq!(rec.last_decrypt_unix, Some(1_800_000_100));
        assert!(rec
            .last_decrypt_at
            .as_deref()
            .is_some_and(|s| s.starts_with("2027-01-15")));
        let again = UsageTracker::from_file(&file);
        assert_eq!(again.handle(&id).decrypts(), 2);
        assert_eq!(again.counting_since(), tracker.counting_since());
        assert_eq!(file.counting_since_unix, Some(tracker.counting_since()));
    }

    #[test]
    fn a_file_without_a_start_counts_from_now_and_garbage_moves_aside() {
        let old: UsageFile =
            serde_json::from_str(r#"{"written_at":"x","keys":{}}"#).expect("old format");
        let before = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(UsageTracker::from_file(&old).counting_since() >= before);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.json");
        std::fs::write(&path, b"{nope").expect("write");
        let aside = move_aside(&path).expect("aside");
        assert!(!path.exists());
        assert_eq!(std::fs::read(&aside).expect("kept"), b"{nope");
    }

    #[test]
    fn missing_file_is_empty_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.json");
        assert_eq!(read_usage(&path).expect("missing"), UsageFile::default());
        std::fs::write(&path, b"{nope").expect("write");
        let err = read_usage(&path).expect_err("garbage");
        assert!(err.to_string().contains("moves such a file aside"), "{err}");
    }
}
