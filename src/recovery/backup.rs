//! Continuous backup (`serve --backup-dir`): an age-encrypted export written for every
//! keystore generation the server loads, before the new keyring encrypts anything, so a
//! backup holding the current primary always exists. Writes are atomic (0600), the newest
//! `--backup-keep` are kept, and the backup of the generation in use is never removed. A
//! failed write is logged and counted, and never stops serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use time::OffsetDateTime;

use super::export::{self, ExportError};
use super::sealing::{self, Recipients, SealError};
use crate::keystore::Keystore;

/// File names are `localkms-backup-<generation, 20 digits>.age`, so they sort by generation.
const PREFIX: &str = "localkms-backup-";
const SUFFIX: &str = ".age";

/// Default `--backup-keep`.
pub const DEFAULT_KEEP: usize = 10;

/// Why a backup was not written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The directory or file could not be written.
    #[error("cannot write backup {}: {source}. Check that the directory exists (or can be created), is writable by this user and has free space", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The export could not be made.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// It could not be encrypted.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Where and to whom backups are written.
#[derive(Clone)]
pub struct BackupConfig {
    /// The directory (created 0700 if missing).
    pub dir: PathBuf,
    /// Who can open them.
    pub recipients: Recipients,
    /// How many to keep (the current generation's is kept in any case).
    pub keep: usize,
}

/// Backup progress, for metrics and alerts: an alert fires when the backed-up generation
/// trails the keystore's.
#[derive(Debug, Default)]
pub struct BackupStatus {
    /// Generation of the newest backup written (0 before the first).
    pub generation: AtomicU64,
    /// Unix time of the last successful write (0 before the first).
    pub last_success_unix: AtomicI64,
    /// Failed writes since start.
    pub failures: AtomicU64,
}

/// The backup writer a server holds.
pub struct Backups {
    config: BackupConfig,
    status: Arc<BackupStatus>,
}

/// The file a generation's backup is written to.
pub fn file_name(generation: u64) -> String {
    format!("{PREFIX}{generation:020}{SUFFIX}")
}

fn generation_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

/// The backups in `dir`, newest generation first.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(g) = entry.file_name().to_str().and_then(generation_of) {
            found.push((g, entry.path()));
        }
    }
    found.sort_by_key(|b| std::cmp::Reverse(b.0));
    Ok(found)
}

/// A backup encrypted and ready to write: holds no secret (it is the age file).
pub struct Sealed {
    generation: u64,
    bytes: Vec<u8>,
}

/// Encrypts the export of `ks` to `recipients`.
pub fn seal(ks: &Keystore, recipients: &Recipients) -> Result<Sealed, BackupError> {
    let plain = export::encode(ks, OffsetDateTime::now_utc())?;
    Ok(Sealed {
        generation: ks.generation(),
        bytes: sealing::seal(&plain, recipients)?,
    })
}

/// Writes `sealed` to `dir` (atomically, 0600; replacing the same generation's backup),
/// creating `dir` (0700) if missing. Returns the file written.
pub fn store(dir: &Path, sealed: &Sealed) -> Result<PathBuf, BackupError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io { path, source }
    };
    check_dir(dir)?;
    let path = dir.join(file_name(sealed.generation));
    crate::keystore::file::write_atomically(&path, ".localkms-backup-", &sealed.bytes, true, || {})
        .map_err(io(&path))?;
    Ok(path)
}

/// Makes sure `dir` is a directory, creating it (0700, with its parents) if missing.
pub fn check_dir(dir: &Path) -> Result<(), BackupError> {
    let err = |source| BackupError::Io {
        path: dir.to_owned(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(meta) => Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "it is {}, not a directory; point --backup-dir at a directory",
                crate::keystore::describe(meta.file_type())
            ),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(builder.recursive(true), 0o700);
            builder.create(dir).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Removes all but the newest `keep` backups in `dir`, never the one of `current`.
pub fn prune(dir: &Path, keep: usize, current: u64) -> Result<usize, BackupError> {
    let io = |source| BackupError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut removed = 0;
    for (g, path) in list(dir).map_err(io)?.into_iter().skip(keep) {
        if g == current {
            continue;
        }
        std::fs::remove_file(&path).map_err(|source| BackupError::Io { path, source })?;
        removed += 1;
    }
    Ok(removed)
}

impl Backups {
    /// A writer for `config`, reporting into `status`.
    pub fn new(config: BackupConfig, status: Arc<BackupStatus>) -> Self {
        Backups { config, status }
    }

    /// The progress figures.
    pub fn status(&self) -> &Arc<BackupStatus> {
        &self.status
    }

    /// Backs up `ks` and prunes old backups. Blocking (file writes, fsync).
    pub fn write(&self, ks: &Keystore) -> Result<PathBuf, BackupError> {
        self.store(&seal(ks, &self.config.recipients)?)
    }

    /// Writes an already sealed backup and prunes old ones. Blocking.
    pub fn store(&self, sealed: &Sealed) -> Result<PathBuf, BackupError> {
        let path = store(&self.config.dir, sealed)?;
        self.status
            .generation
            .store(sealed.generation, Ordering::Relaxed);
        self.status.last_success_unix.store(
            OffsetDateTime::now_utc().unix_timestamp(),
            Ordering::Relaxed,
        );
        prune(&self.config.dir, self.config.keep, sealed.generation)?;
        Ok(path)
    }

    fn failed(&self, generation: u64, e: &BackupError) {
        self.status.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %e,
            generation,
            "keystore backup FAILED; still serving. Until a backup succeeds, losing this node's keystore or root key loses the keys of this generation"
        );
    }

    /// Encrypts the backup of `ks` (while the caller still holds the keystore); a failure is
    /// logged and counted, and gives `None`.
    pub fn seal_logged(&self, ks: &Keystore) -> Option<Sealed> {
        seal(ks, &self.config.recipients)
            .map_err(|e| self.failed(ks.generation(), &e))
            .ok()
    }

    /// [`Backups::store`], logging the outcome and counting a failure; never fails the
    /// caller, which goes on serving either way.
    pub fn store_logged(&self, sealed: &Sealed) {
        match self.store(sealed) {
            Ok(path) => tracing::info!(
                backup = %path.display(),
                generation = sealed.generation,
                recipients = %self.config.recipients.describe(),
                "wrote keystore backup"
            ),
            Err(e) => self.failed(sealed.generation, &e),
        }
    }

    /// Seals and stores `ks`'s backup, logging and counting any failure.
    pub fn write_logged(&self, ks: &Keystore) {
        if let Some(sealed) = self.seal_logged(ks) {
            self.store_logged(&sealed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::model::tests::{actor, fresh};

    fn recipients() -> (Recipients, String) {
        let (id, r) = sealing::generate_identity(OffsetDateTime::now_utc());
        (
            Recipients::Keys(vec![sealing::parse_recipient(&r).expect("r")]),
            id.to_string(),
        )
    }

    #[test]
    fn keeps_the_newest_and_always_the_current_generation() {
        let dir = tempfile::tempdir().expect("tmp");
        let backups_dir = dir.path().join("backups");
        let (r, _) = recipients();
        let status = Arc::new(BackupStatus::default());
        let b = Backups::new(
            BackupConfig {
                dir: backups_dir.clone(),
                recipients: r,
                keep: 2,
            },
            Arc::clone(&status),
        );
        let mut ks = fresh();
        for _ in 0..4 {
            b.write(&ks).expect("write");
            ks.rotate(OffsetDateTime::now_utc(), &actor())
                .expect("rotate");
            ks.generation += 1;
        }
        let kept: Vec<u64> = list(&backups_dir)
            .expect("list")
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(kept, vec![4, 3]);
        assert_eq!(status.generation.load(Ordering::Relaxed), 4);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(backups_dir.join(file_name(4)))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Gone back in generation (a restore): the current one stays even if older.
        ks.generation = 1;
        b.write(&ks).expect("write");
        let kept: Vec<u64> = list(&backups_dir)
            .expect("list")
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(kept, vec![4, 3, 1]);
    }

    #[test]
    fn an_unwritable_directory_is_reported_and_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        let (r, _) = recipients();
        let status = Arc::new(BackupStatus::default());
        let b = Backups::new(
            BackupConfig {
                dir: file.clone(),
                recipients: r,
                keep: 2,
            },
            Arc::clone(&status),
        );
        let e = b.write(&fresh()).expect_err("not a dir").to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("writable"),
            "{e}"
        );
        b.write_logged(&fresh());
        assert_eq!(status.failures.load(Ordering::Relaxed), 1);
    }
}
