//! Reading and writing the keystore file: exclusive lock, atomic replace, backups.
//!
//! A write goes to a 0600 temp file in the same directory, is fsynced, renamed over the
//! keystore, and the directory is fsynced, so a crash at any instant leaves either the old or
//! the new file. Before the rename the old file is hard-linked to `PATH.bak.GENERATION`; the
//! newest [`BACKUPS_KEPT`] backups are kept.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::keystore::format::{self, FormatError, MAX_FILE_LEN};
use crate::keystore::model::Keystore;
use crate::keystore::root_key::{RootKey, RootKeyProvider};
use crate::keystore::{KeystoreError, KeystoreLocation};

/// How many previous generations stay on disk as `PATH.bak.N`.
pub const BACKUPS_KEPT: usize = 3;
/// How long a command waits for another one to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The location of a keystore file, for messages.
fn loc(path: &Path) -> KeystoreLocation {
    KeystoreLocation::File(path.to_owned())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> KeystoreError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeystoreError::NotFound(loc(path))
        } else {
            KeystoreError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Names the file in a format error.
pub(crate) fn format_err(location: &KeystoreLocation, e: FormatError) -> KeystoreError {
    let path = location.clone();
    match e {
        FormatError::NotAKeystore => KeystoreError::NotAKeystore(path),
        FormatError::UnsupportedVersion(version) => KeystoreError::UnsupportedVersion {
            path,
            version,
            supported: format::FORMAT_VERSION,
        },
        FormatError::Corrupted(reason) => KeystoreError::Corrupted { path, reason },
        FormatError::WrongRootKey => KeystoreError::WrongRootKey(path),
        FormatError::Random => KeystoreError::Crypto(crate::crypto::CryptoError::Random),
    }
}

/// Refuses to serve a keystore file that other users could read or replace: the same check at
/// start-up and on every reload.
pub fn check_private_file(path: &Path) -> Result<(), KeystoreError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(KeystoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "not a regular file ({}); replace it with the real file",
                    crate::keystore::describe(meta.file_type())
                ),
            ),
        });
    }
    crate::keystore::root_key::check_private(path, &meta).map_err(KeystoreError::from)
}

/// Reads and opens the keystore at `path`, deriving the root key as its header says.
pub fn load(path: &Path, root: &RootKeyProvider) -> Result<Keystore, KeystoreError> {
    let bytes = read_bounded(path)?;
    decode_with(&loc(path), &bytes, root)
}

/// Opens keystore bytes read from `location` (which is for messages).
pub fn decode_with(
    location: &KeystoreLocation,
    bytes: &[u8],
    root: &RootKeyProvider,
) -> Result<Keystore, KeystoreError> {
    let header = format::peek(bytes).map_err(|e| format_err(location, e))?;
    let key = root.key_for(&header.kdf)?;
    format::decode(bytes, &key).map_err(|e| format_err(location, e))
}

/// Reads a keystore file, refusing anything larger than a keystore can be.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, KeystoreError> {
    let file = crate::keystore::open_regular(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > MAX_FILE_LEN {
        return Err(KeystoreError::Corrupted {
            path: loc(path),
            reason: format!("{len} bytes is larger than any keystore ({MAX_FILE_LEN} at most)"),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    Ok(bytes)
}

/// Writes a brand-new keystore at `path`, refusing to replace an existing file.
pub fn create(path: &Path, root: &RootKeyProvider, ks: &Keystore) -> Result<(), KeystoreError> {
    let _lock = Lock::acquire(path)?;
    if path.exists() {
        return Err(KeystoreError::AlreadyExists(loc(path)));
    }
    let key = root.key_for(ks.kdf())?;
    write_atomic(path, &key, ks, false)
}

/// Writes already-sealed bytes as a new keystore file (`keystore copy`), refusing to replace
/// one.
pub fn create_raw(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    let _lock = Lock::acquire(path)?;
    if path.exists() {
        return Err(KeystoreError::AlreadyExists(loc(path)));
    }
    write_bytes(path, bytes, false, 0)
}

/// Replaces a file with already-sealed bytes (the etcd keystore's local cache): atomic, with
/// no backups.
pub fn replace_raw(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    write_atomically(path, &temp_prefix(path), bytes, true, || {}).map_err(io_err(path))
}

/// Loads the keystore under the lock, lets `change` edit it, and saves it as the next
/// generation. Nothing is written when `change` fails.
pub fn update<T>(
    path: &Path,
    root: &RootKeyProvider,
    change: impl FnOnce(&mut Keystore) -> Result<T, KeystoreError>,
) -> Result<T, KeystoreError> {
    rewrite(path, root, root, change)
}

/// Under the lock: opens with `old`, applies `change`, and seals the next generation with
/// `new` (the same provider, except when re-sealing).
fn rewrite<T>(
    path: &Path,
    old: &RootKeyProvider,
    new: &RootKeyProvider,
    change: impl FnOnce(&mut Keystore) -> Result<T, KeystoreError>,
) -> Result<T, KeystoreError> {
    let _lock = Lock::acquire(path)?;
    let mut ks = load(path, old)?;
    let out = change(&mut ks)?;
    bump_generation(&loc(path), &mut ks)?;
    let key = new.key_for(ks.kdf())?;
    write_atomic(path, &key, &ks, true)?;
    Ok(out)
}

/// Re-seals the keystore under a new root key, atomically: afterwards `old` no longer opens
/// it and every KEK is unchanged. `record` adds the history entry.
pub fn reseal(
    path: &Path,
    old: &RootKeyProvider,
    new: &RootKeyProvider,
    record: impl FnOnce(&mut Keystore),
) -> Result<(), KeystoreError> {
    rewrite(path, old, new, |ks| {
        ks.kdf = new.new_kdf()?;
        record(ks);
        Ok(())
    })?;
    // The backups are sealed under the old root key, which may be why it is being replaced.
    for generation in backups(path) {
        let p = backup_path(path, generation);
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(backup = %p.display(), error = %e, "could not remove a backup sealed under the old root key; delete it by hand");
        }
    }
    Ok(())
}

/// Moves a keystore to its next generation before it is written.
pub(crate) fn bump_generation(
    location: &KeystoreLocation,
    ks: &mut Keystore,
) -> Result<(), KeystoreError> {
    ks.generation = ks
        .generation
        .checked_add(1)
        .ok_or_else(|| KeystoreError::Corrupted {
            path: location.clone(),
            reason: "generation counter overflow".to_owned(),
        })?;
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The one atomic write every file localkms keeps goes through: a 0600 temp file named
/// `prefix…` in the same directory, written and fsynced, `before_rename` (a backup, say), then
/// renamed over `path` (or, unless `replace`, into place only if nothing is there), and the
/// directory fsynced. A crash leaves the old file or the new one, never neither.
pub(crate) fn write_atomically(
    path: &Path,
    prefix: &str,
    bytes: &[u8],
    replace: bool,
    before_rename: impl FnOnce(),
) -> std::io::Result<()> {
    let dir = dir_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(TEMP_SUFFIX)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    before_rename();
    if replace {
        tmp.persist(path).map_err(|e| e.error)?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| e.error)?;
    }
    File::open(dir).and_then(|d| d.sync_all())
}

fn write_atomic(
    path: &Path,
    root: &RootKey,
    ks: &Keystore,
    replace: bool,
) -> Result<(), KeystoreError> {
    let bytes = Zeroizing::new(format::encode(ks, root).map_err(|e| format_err(&loc(path), e))?);
    write_bytes(path, &bytes, replace, ks.generation)
}

/// Writes sealed keystore bytes atomically ([`write_atomically`]), keeping a backup of the
/// file it replaces.
fn write_bytes(
    path: &Path,
    bytes: &[u8],
    replace: bool,
    generation: u64,
) -> Result<(), KeystoreError> {
    remove_stale_temp_files(path);
    write_atomically(path, &temp_prefix(path), bytes, replace, || {
        if replace {
            backup(path, generation.saturating_sub(1));
        }
    })
    .map_err(|e| {
        if !replace && e.kind() == std::io::ErrorKind::AlreadyExists {
            KeystoreError::AlreadyExists(loc(path))
        } else {
            io_err(path)(e)
        }
    })
}

const TEMP_SUFFIX: &str = ".tmp";

/// Temp files for `path` are named `.NAME.XXXXXX.tmp`, so cleaning up after one keystore never
/// touches another keystore's in-flight write in the same directory.
pub(crate) fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or_else(|| "keystore".into(), |n| n.to_string_lossy());
    format!(".{name}.")
}

/// Removes temp files left by a writer of `path` that died mid-write. Called under the lock,
/// so no live writer owns one.
pub(crate) fn remove_stale_temp_files(path: &Path) {
    let Ok(entries) = std::fs::read_dir(dir_of(path)) else {
        return;
    };
    let prefix = temp_prefix(path);
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&prefix) && name.ends_with(TEMP_SUFFIX) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a stale keystore temp file");
            }
        }
    }
}

/// Hard-links the current file as a backup and prunes old ones. Best effort: a failed backup
/// must not block a key change, so failures are logged.
fn backup(path: &Path, generation: u64) {
    let target = backup_path(path, generation);
    match std::fs::hard_link(path, &target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            tracing::warn!(backup = %target.display(), error = %e, "could not keep a keystore backup")
        }
    }
    let mut gens: Vec<u64> = backups(path);
    gens.sort_unstable_by(|a, b| b.cmp(a));
    for old in gens.into_iter().skip(BACKUPS_KEPT) {
        let p = backup_path(path, old);
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(backup = %p.display(), error = %e, "could not prune an old keystore backup");
        }
    }
}

fn backup_path(path: &Path, generation: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".bak.{generation}"));
    PathBuf::from(name)
}

/// Generations of the backups beside `path`.
pub fn backups(path: &Path) -> Vec<u64> {
    let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = format!("{file_name}.bak.");
    let Ok(entries) = std::fs::read_dir(dir_of(path)) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|g| g.parse().ok())
        })
        .collect()
}

/// After `id` was destroyed in the keystore at `path`: rewrites every backup beside it that
/// still holds the KEK's material with the material wiped, and removes a backup that cannot
/// be opened with `root` (it cannot be checked) or whose primary was that KEK (it cannot be
/// valid without it). Returns how many were rewritten and removed.
/// The files are replaced, so their old blocks are freed by the filesystem, not overwritten.
pub fn scrub_backups(
    path: &Path,
    root: &RootKeyProvider,
    id: &str,
) -> Result<(usize, usize), KeystoreError> {
    let _lock = Lock::acquire(path)?;
    let (mut rewritten, mut removed) = (0, 0);
    for generation in backups(path) {
        let copy = backup_path(path, generation);
        let opened = load(&copy, root);
        // A copy whose primary is the destroyed key cannot be valid without it.
        let was_primary = opened
            .as_ref()
            .is_ok_and(|ks| ks.primary().is_some_and(|p| p.id.as_str() == id));
        match opened {
            Ok(mut ks) if !was_primary => {
                if ks.scrub(id) {
                    let key = root.key_for(ks.kdf())?;
                    let bytes = Zeroizing::new(
                        format::encode(&ks, &key).map_err(|e| format_err(&loc(&copy), e))?,
                    );
                    write_atomically(&copy, &temp_prefix(path), &bytes, true, || {})
                        .map_err(io_err(&copy))?;
                    rewritten += 1;
                }
            }
            _ => {
                std::fs::remove_file(&copy).map_err(io_err(&copy))?;
                removed += 1;
            }
        }
    }
    Ok((rewritten, removed))
}

/// An exclusive advisory lock on `PATH.lock`, held for the life of the value.
pub struct Lock {
    _file: File,
}

impl Lock {
    fn open(keystore: &Path) -> Result<(File, PathBuf), KeystoreError> {
        let mut name = keystore.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let not_a_file = |kind: std::fs::FileType| KeystoreError::Io {
            path: lock_path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the lock file is {}, not a regular file; remove it",
                    crate::keystore::describe(kind)
                ),
            ),
        };
        // Said by name before opening (opening a FIFO for writing with no reader fails with a
        // puzzling ENXIO); the open is non-blocking anyway, and checked again after.
        if let Ok(meta) = std::fs::metadata(&lock_path) {
            if !meta.is_file() {
                return Err(not_a_file(meta.file_type()));
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let kind = file.metadata().map_err(io_err(&lock_path))?.file_type();
        if !kind.is_file() {
            return Err(not_a_file(kind));
        }
        Ok((file, lock_path))
    }

    /// Takes the lock, waiting up to ten seconds for another holder.
    pub fn acquire(keystore: &Path) -> Result<Lock, KeystoreError> {
        let (file, lock_path) = Self::open(keystore)?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Lock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(KeystoreError::Locked(loc(keystore)))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
            }
        }
    }

    /// Takes the lock only if it is free right now.
    pub fn try_acquire(keystore: &Path) -> Result<Option<Lock>, KeystoreError> {
        let (file, lock_path) = Self::open(keystore)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&lock_path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use time::OffsetDateTime;

    fn root() -> RootKeyProvider {
        RootKeyProvider::from_key(RootKey::from_bytes([3u8; 32]))
    }

    fn fresh() -> Keystore {
        crate::keystore::model::tests::fresh()
    }

    fn actor() -> crate::keystore::model::Actor {
        crate::keystore::model::tests::actor()
    }

    #[test]
    fn create_load_update_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let ks = fresh();
        let first = ks.primary().expect("primary").id.clone();
        create(&path, &root(), &ks).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        assert!(matches!(
            create(&path, &root(), &ks),
            Err(KeystoreError::AlreadyExists(_))
        ));
        let new = update(&path, &root(), |ks| {
            Ok(ks.rotate(OffsetDateTime::now_utc(), &actor())?)
        })
        .expect("rotate");
        let loaded = load(&path, &root()).expect("load");
        assert_eq!(loaded.generation(), 2);
        assert_eq!(loaded.primary().expect("primary").id, new);
        assert!(loaded.records().iter().any(|r| r.id == first));
        assert_eq!(backups(&path), vec![1]);
        // The backup is the previous generation, still readable.
        let old = load(&backup_path(&path, 1), &root()).expect("backup");
        assert_eq!(old.generation(), 1);
    }

    #[test]
    fn failed_change_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let ks = fresh();
        create(&path, &root(), &ks).expect("create");
        let before = std::fs::read(&path).expect("read");
        let result: Result<(), _> = update(&path, &root(), |_| {
            Err(KeystoreError::Locked(loc(Path::new("refused on purpose"))))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read(&path).expect("read"), before);
    }

    #[test]
    fn backups_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let ks = fresh();
        create(&path, &root(), &ks).expect("create");
        for _ in 0..6 {
            update(&path, &root(), |ks| {
                Ok(ks.rotate(OffsetDateTime::now_utc(), &actor())?)
            })
            .expect("rotate");
        }
        let mut gens = backups(&path);
        gens.sort_unstable();
        assert_eq!(gens, vec![4, 5, 6]);
        // No temp files left behind.
        let leftovers = std::fs::read_dir(dir.path())
            .expect("readdir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let err = load(&path, &root()).expect_err("missing");
        assert!(matches!(err, KeystoreError::NotFound(_)));
        assert!(err.to_string().contains(&path.display().to_string()));

        let ks = fresh();
        create(&path, &root(), &ks).expect("create");
        let other = RootKeyProvider::from_key(RootKey::from_bytes([4u8; 32]));
        let err = load(&path, &other).expect_err("wrong key");
        assert!(matches!(err, KeystoreError::WrongRootKey(_)), "{err}");
        // No backups yet: the message must not send anyone looking for one.
        assert!(!err.to_string().contains(".bak"), "{err}");
        update(&path, &root(), |ks| {
            Ok(ks.rotate(OffsetDateTime::now_utc(), &actor())?)
        })
        .expect("rotate");
        let err = load(&path, &other).expect_err("wrong key");
        assert!(
            err.to_string()
                .contains(&format!("{}.bak.1", path.display())),
            "{err}"
        );

        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            load(&path, &root()),
            Err(KeystoreError::WrongRootKey(_))
        ));
        std::fs::write(&path, &bytes[..20]).expect("write");
        assert!(matches!(
            load(&path, &root()),
            Err(KeystoreError::Corrupted { .. })
        ));
    }

    #[test]
    fn a_fifo_at_the_lock_path_is_named_not_waited_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let lock = dir.path().join("keystore.lock");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &lock,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let err = Lock::acquire(&path).err().expect("refused");
        assert!(err.to_string().contains("the lock file is a FIFO"), "{err}");
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let held = Lock::acquire(&path).expect("first lock");
        assert!(Lock::try_acquire(&path).expect("try").is_none());
        drop(held);
        assert!(Lock::try_acquire(&path).expect("try").is_some());
    }
}

#[cfg(test)]
mod reseal_tests {
    use super::*;
    use crate::keystore::root_key::RootKeySource;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn reseal_moves_to_a_passphrase_and_keeps_every_kek() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let old = RootKeyProvider::from_key(RootKey::from_bytes([3u8; 32]));
        let mut ks = crate::keystore::model::tests::fresh();
        ks.rotate(
            time::OffsetDateTime::now_utc(),
            &crate::keystore::model::tests::actor(),
        )
        .expect("rotate");
        create(&path, &old, &ks).expect("create");
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "a long enough passphrase").expect("write");
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let new = RootKeyProvider::open(&RootKeySource::PassphraseFile(pass)).expect("open");
        reseal(&path, &old, &new, |_| {}).expect("reseal");
        assert!(
            load(&path, &old).is_err(),
            "the old root key must no longer open it"
        );
        let back = load(&path, &new).expect("new key opens it");
        assert!(matches!(
            back.kdf(),
            crate::keystore::root_key::Kdf::Argon2id { .. }
        ));
        for (a, b) in ks.records().iter().zip(back.records()) {
            assert_eq!(a.id, b.id);
            assert_eq!(
                a.material.as_ref().map(|k| *k.expose()),
                b.material.as_ref().map(|k| *k.expose())
            );
        }
    }

    #[test]
    fn stale_temp_files_are_cleaned_under_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        let root = RootKeyProvider::from_key(RootKey::from_bytes([3u8; 32]));
        create(&path, &root, &crate::keystore::model::tests::fresh()).expect("create");
        let stale = dir.path().join(".keystore.dead.tmp");
        std::fs::write(&stale, b"half a keystore").expect("write");
        update(&path, &root, |_| Ok(())).expect("update");
        assert!(!stale.exists());
    }
}
