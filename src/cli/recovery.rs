//! The disaster-recovery commands: `recovery keygen|split|combine` and `keystore
//! export|import|verify-backup`. Every file they write is created 0600 without replacing
//! anything (unless `--force`), atomically, so a killed command leaves no partial file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;

use super::admin::{AdminError, Opened, Printed};
use crate::keystore::{
    Actor, KeystoreError, KeystoreLocation, RootKeyProvider, RootKeySource, Store,
};
use crate::keystore::{EtcdTls, KeyState, Keystore};
use crate::recovery::export::{self, hex, ExportError};
use crate::recovery::restore::{self, RestoreError};
use crate::recovery::sealing::{self, Opener, Recipients, SealError};
use crate::recovery::shares::{self, ShareError};
use crate::recovery::BackupBehind;

/// Largest share file read.
const MAX_SHARE_FILE: u64 = 64 * 1024;

/// Why a recovery command failed. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Opening or changing the keystore failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Sealing or opening the age file failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Splitting or combining failed.
    #[error(transparent)]
    Shares(#[from] ShareError),
    /// Import refused.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The backup decrypted but is not a usable export.
    #[error("{}: decrypted, but {source}", file.display())]
    Export {
        /// The backup.
        file: PathBuf,
        /// What is wrong.
        source: ExportError,
    },
    /// An output file exists.
    #[error("{} already exists; refusing to overwrite it{hint}", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The backup is behind the keystore (exit code 5).
    #[error(transparent)]
    Behind(#[from] BackupBehind),
    /// The backup holds a key with other material than the live keystore.
    #[error("backup {file} does NOT match the keystore: key(s) {differ} have different material in it. Do not rely on this backup; make a fresh one and find out where this one came from")]
    Differs {
        /// The backup.
        file: String,
        /// The keys.
        differ: String,
    },
}

impl From<KeystoreError> for RecoveryError {
    fn from(e: KeystoreError) -> Self {
        RecoveryError::Admin(AdminError::Keystore(e))
    }
}

/// Writes `bytes` to `path` with mode 0600, atomically (a temp file beside it, renamed);
/// never replaces a file unless `replace`.
fn write_private(
    path: &Path,
    bytes: &[u8],
    replace: bool,
    hint: &'static str,
) -> Result<(), RecoveryError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) if !replace => {
            return Err(RecoveryError::Exists {
                path: path.to_owned(),
                hint,
            })
        }
        // --force replaces a file, never a device, FIFO, directory or symlink (renaming
        // over /dev/full as root would replace the device node itself).
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(RecoveryError::Write {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "it is {}, not a regular file; --force only replaces regular files",
                        crate::keystore::describe(meta.file_type())
                    ),
                ),
            });
        }
        _ => {}
    }
    // A writer of this file killed mid-write (SIGKILL) left its temp file: remove it. Temp
    // files are named after the file they become, so no other file's write is touched.
    crate::keystore::file::remove_stale_temp_files(path);
    let prefix = crate::keystore::file::temp_prefix(path);
    crate::keystore::file::write_atomically(path, &prefix, bytes, replace, || {}).map_err(
        |source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                RecoveryError::Exists {
                    path: path.to_owned(),
                    hint,
                }
            } else {
                RecoveryError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        },
    )
}

/// `recovery keygen`.
pub fn keygen(out: &Path) -> Result<Printed, RecoveryError> {
    let (text, recipient) = sealing::generate_identity(OffsetDateTime::now_utc());
    write_private(out, text.as_bytes(), false, "; pick another --out (an identity is never replaced: it may be the only key to your backups)")?;
    Ok(Printed {
        stdout: format!("{recipient}\n"),
        stderr: format!(
            "wrote the recovery identity to {} (mode 0600). Its recipient, printed above, is what --recipient and --backup-recipient take. Move the identity OFF this machine (offline storage, or split it with `localkms recovery split`): anyone holding it can open every backup",
            out.display()
        ),
        committed: Some(format!("wrote recovery identity {} (recipient {recipient})", out.display())),
    })
}

/// `recovery split`.
pub fn split(
    identity: &Path,
    n: usize,
    k: usize,
    out_dir: &Path,
) -> Result<Printed, RecoveryError> {
    let bytes = sealing::read_secret_file(identity, 64 * 1024)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ShareError::NotOneIdentity)?;
    let parts = shares::split(text, k, n)?;
    let names: Vec<PathBuf> = parts
        .iter()
        .map(|(number, _)| out_dir.join(format!("share-{number}-of-{n}.txt")))
        .collect();
    if let Some(existing) = names.iter().find(|p| p.exists()) {
        return Err(RecoveryError::Exists {
            path: existing.clone(),
            hint: "; use an empty --out-dir",
        });
    }
    let mut builder = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(builder.recursive(true), 0o700);
    builder
        .create(out_dir)
        .map_err(|source| RecoveryError::Write {
            path: out_dir.to_owned(),
            source,
        })?;
    let mut out = String::new();
    for ((_, share), path) in parts.iter().zip(&names) {
        write_private(path, share.as_bytes(), false, "; use an empty --out-dir")?;
        let _ = writeln!(out, "{}", path.display());
    }
    Ok(Printed {
        stdout: out,
        stderr: format!(
            "split {} into {n} shares; any {k} rebuild it with `localkms recovery combine --out FILE SHARE...`. Give each share to a different person, then delete the identity file and this directory from this machine",
            identity.display()
        ),
        committed: Some(format!("wrote {n} shares to {}", out_dir.display())),
    })
}

/// `recovery combine`.
pub fn combine(out: &Path, files: &[PathBuf]) -> Result<Printed, RecoveryError> {
    let mut parsed = Vec::with_capacity(files.len());
    for f in files {
        let bytes =
            crate::keystore::read_regular(f, MAX_SHARE_FILE).map_err(|source| SealError::Io {
                path: f.clone(),
                source,
            })?;
        let name = f.display().to_string();
        let text = String::from_utf8_lossy(&bytes);
        parsed.push((name.clone(), shares::parse(&name, &text)?));
    }
    let combined = shares::combine(&parsed)?;
    let identity = &combined.identity;
    write_private(out, identity.as_bytes(), false, "; pick another --out")?;
    let recipient = sealing::recipient_of(identity).unwrap_or_default();
    let mut note = format!(
        "rebuilt the recovery identity for {recipient} into {} (mode 0600); delete it once the restore is done",
        out.display()
    );
    for (name, why) in &combined.left_out {
        note.push_str(&format!(
            "\nwarning: left out {name}: {why}. Replace it: split the rebuilt identity again (`localkms recovery split`) and hand out the new set"
        ));
    }
    Ok(Printed {
        stdout: format!("{recipient}\n"),
        stderr: note,
        committed: Some(format!("wrote rebuilt identity {}", out.display())),
    })
}

/// The recipients `--recipient` or `--backup-passphrase-file` name.
pub fn recipients(
    keys: &[age::x25519::Recipient],
    passphrase: Option<&Path>,
) -> Result<Recipients, RecoveryError> {
    Ok(match passphrase {
        Some(p) => Recipients::Passphrase(Arc::new(sealing::read_passphrase(p)?)),
        None => Recipients::Keys(keys.to_vec()),
    })
}

/// What `--identity` or `--backup-passphrase-file` name.
pub fn opener(identity: Option<&Path>, passphrase: Option<&Path>) -> Result<Opener, RecoveryError> {
    Ok(match (identity, passphrase) {
        (Some(id), _) => sealing::read_identity_file(id)?,
        (None, Some(p)) => Opener::Passphrase(sealing::read_passphrase(p)?),
        (None, None) => {
            return Err(RecoveryError::Seal(SealError::NoIdentity {
                path: PathBuf::from("(none given: pass --identity)"),
            }))
        }
    })
}

fn summary(ks: &Keystore) -> String {
    let tombstones = ks
        .records()
        .iter()
        .filter(|r| r.state == KeyState::Destroyed)
        .count();
    format!(
        "keystore {} generation {}, {} keys{}, primary {}",
        ks.keystore_id()
            .map_or_else(|| "(no id yet)".to_owned(), |id| hex(&id)),
        ks.generation(),
        ks.records().len() - tombstones,
        if tombstones > 0 {
            format!(" (+{tombstones} destroyed, without material)")
        } else {
            String::new()
        },
        ks.primary().map(|p| p.id.to_string()).unwrap_or_default()
    )
}

/// `keystore export`.
pub async fn export(
    o: &Opened,
    to: &Recipients,
    out: &Path,
    force: bool,
) -> Result<Printed, RecoveryError> {
    let ks = o.store.load(&o.root).await?;
    let plain =
        export::encode(&ks, OffsetDateTime::now_utc()).map_err(|source| RecoveryError::Export {
            file: out.to_owned(),
            source,
        })?;
    let sealed = sealing::seal(&plain, to)?;
    drop(plain);
    write_private(
        out,
        &sealed,
        force,
        "; pass --force to replace it, or pick another --out",
    )?;
    Ok(Printed {
        stdout: format!("{}\n", out.display()),
        stderr: format!(
            "wrote backup {} (mode 0600): {}, encrypted to {}. `age -d -i IDENTITY {}` shows its JSON; `localkms keystore import` restores it",
            out.display(),
            summary(&ks),
            to.describe(),
            out.display()
        ),
        committed: Some(format!("wrote backup {}", out.display())),
    })
}

/// Reads, decrypts and decodes a backup file.
fn read_export(input: &Path, with: &Opener) -> Result<export::Export, RecoveryError> {
    let sealed = sealing::read_backup(input)?;
    let plain = sealing::open(input, &sealed, with)?;
    export::decode(&plain).map_err(|source| RecoveryError::Export {
        file: input.to_owned(),
        source,
    })
}

/// What `keystore import` was asked to do.
pub struct ImportRequest<'a> {
    /// The backup.
    pub input: &'a Path,
    /// What opens it.
    pub with: &'a Opener,
    /// The target keystore.
    pub location: &'a KeystoreLocation,
    /// Its root key (created if missing, for a new keystore).
    pub source: &'a RootKeySource,
    /// etcd TLS.
    pub tls: &'a EtcdTls,
    /// Merge into an existing keystore.
    pub merge: bool,
    /// Accept another keystore id.
    pub allow_different_keystore: bool,
}

/// `keystore import`.
pub async fn import(req: ImportRequest<'_>) -> Result<Printed, RecoveryError> {
    let backup = read_export(req.input, req.with)?;
    let store = Store::open(req.location, req.tls)?;
    let at = req.location.to_string();
    let now = OffsetDateTime::now_utc();
    let actor = Actor::current();
    if req.merge {
        let root = RootKeyProvider::open(req.source).map_err(AdminError::from)?;
        let allow = req.allow_different_keystore;
        let report = store
            .update(&root, |ks| {
                restore::check_same_keystore(&backup, ks.keystore_id(), &at, allow)
                    .and_then(|()| restore::merge(ks, &backup, now, &actor))
                    .map_err(|e| KeystoreError::Refused(e.to_string()))
            })
            .await?;
        let mut out = format!(
            "merged {} into {at}: {} key(s) added",
            req.input.display(),
            report.added.len()
        );
        for (label, ids) in [
            ("added", &report.added),
            ("already present, unchanged", &report.unchanged),
            ("destroyed here, stay destroyed", &report.kept_destroyed),
        ] {
            if !ids.is_empty() {
                let _ = write!(out, "\n  {label}: {}", ids.join(", "));
            }
        }
        out.push('\n');
        return Ok(Printed {
            stdout: out,
            stderr: "a running server picks this up within 2 seconds".into(),
            committed: Some(format!("merged {} key(s) into {at}", report.added.len())),
        });
    }
    let mut notes = String::new();
    if let Some(dir) = store.prepare_create()? {
        let _ = writeln!(notes, "created directory {} (mode 0700)", dir.display());
    }
    if let RootKeySource::KeyFile(key) = req.source {
        if !key.exists() {
            if let Some(dir) = crate::keystore::backend::create_parent_dir(key)? {
                let _ = writeln!(notes, "created directory {} (mode 0700)", dir.display());
            }
        }
    }
    let (root, created) = RootKeyProvider::open_or_create(req.source).map_err(AdminError::from)?;
    let kdf = root.new_kdf().map_err(AdminError::from)?;
    let ks = restore::restored(backup, kdf, now, &actor);
    if let Some(mark) = store.high_water(None) {
        if let Err(e) = mark.check_identity(&ks, req.location) {
            if !req.allow_different_keystore {
                return Err(KeystoreError::Refused(format!(
                    "{e}. Importing would replace it with the backup's keystore; pass --allow-different-keystore if that is what you want"
                ))
                .into());
            }
        }
    }
    store.create(&root, &ks).await?;
    if created {
        let _ = writeln!(
            notes,
            "created root key file {} (mode 0600)",
            req.source.path().display()
        );
    }
    let text = summary(&ks);
    Ok(Printed {
        stdout: format!("restored {at} from {}: {text}\n", req.input.display()),
        stderr: format!(
            "{notes}start the server on it with the root key {}. If this node served a newer generation before, the server refuses it as a rollback: start once with --allow-rollback",
            req.source.path().display()
        ),
        committed: Some(format!("restored {at} ({text})")),
    })
}

/// `keystore verify-backup`.
pub async fn verify_backup(
    o: &Opened,
    input: &Path,
    with: &Opener,
) -> Result<Printed, RecoveryError> {
    let backup = read_export(input, with)?;
    let live = o.store.load(&o.root).await?;
    let at = o.store.location().to_string();
    restore::check_same_keystore(&backup, live.keystore_id(), &at, false)?;
    let cov = restore::coverage(&backup, &live)?;
    let file = input.display().to_string();
    if !cov.differ.is_empty() {
        return Err(RecoveryError::Differs {
            file,
            differ: cov.differ.join(", "),
        });
    }
    if !cov.missing.is_empty() {
        return Err(BackupBehind {
            file,
            missing: cov.missing.join(", "),
        }
        .into());
    }
    Ok(Printed {
        stdout: format!(
            "ok: {file} holds all {} live key(s) of {at} with identical material (backup generation {}, keystore generation {})\n",
            cov.covered.len(),
            backup.generation,
            live.generation()
        ),
        stderr: String::new(),
        committed: None,
    })
}
