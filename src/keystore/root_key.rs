//! The root key: the one secret kept outside the keystore, which seals it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use zeroize::Zeroizing;

use crate::crypto::{SecretKey, KEY_LEN};

/// Why the root key file cannot be used. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// The file is not there.
    #[error("root key file {0} does not exist; create one with `localkms init --keystore PATH --root-key-file {0}`")]
    NotFound(PathBuf),
    /// Group or others could read or write the key.
    #[error("root key file {path} has mode {mode:04o}, so other users can reach the key; run `chmod 600 {path}` (or 400)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Neither 32 raw bytes nor base64 of 32 bytes.
    #[error("root key file {0} must hold exactly 32 raw bytes or their base64 encoding; it holds something else")]
    BadContents(PathBuf),
    /// Any other I/O failure.
    #[error("cannot use root key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The random source failed while making a new key.
    #[error(
        "cannot create root key file {0}: the operating system's random number generator failed"
    )]
    Random(PathBuf),
}

/// The 32-byte key that seals the keystore; wiped on drop, never printed.
pub struct RootKey(SecretKey);

/// Longest file accepted: base64 of 32 bytes with surrounding whitespace fits easily.
const MAX_FILE_LEN: usize = 128;

impl RootKey {
    /// Reads a root key file: 32 raw bytes, or base64 of them (whitespace around it ignored).
    /// Refuses a file that group or others may read or write.
    pub fn load(path: &Path) -> Result<Self, RootKeyError> {
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                RootKeyError::NotFound(path.to_owned())
            } else {
                RootKeyError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let mut file = File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(RootKeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut buf = Zeroizing::new([0u8; MAX_FILE_LEN + 1]);
        let mut len = 0;
        loop {
            let n = file.read(&mut buf[len..]).map_err(io)?;
            if n == 0 {
                break;
            }
            len += n;
            if len > MAX_FILE_LEN {
                return Err(RootKeyError::BadContents(path.to_owned()));
            }
        }
        Self::parse(&buf[..len]).ok_or_else(|| RootKeyError::BadContents(path.to_owned()))
    }

    fn parse(contents: &[u8]) -> Option<Self> {
        if contents.len() == KEY_LEN {
            return SecretKey::from_slice(contents).map(RootKey);
        }
        let text = contents.trim_ascii();
        let mut decoded = Zeroizing::new([0u8; MAX_FILE_LEN]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(text, &mut decoded[..])
            .ok()?;
        SecretKey::from_slice(&decoded[..n]).map(RootKey)
    }

    /// Creates `path` with 32 fresh random bytes, mode 0600, refusing to replace any file.
    pub fn create_new(path: &Path) -> Result<Self, RootKeyError> {
        let key = SecretKey::generate().map_err(|_| RootKeyError::Random(path.to_owned()))?;
        let io = |source| RootKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // The umask may only remove bits; make the mode exact regardless.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        file.write_all(key.expose()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(RootKey(key))
    }

    /// Loads `path` if it exists, otherwise creates it; the flag says which happened.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), RootKeyError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(RootKeyError::NotFound(_)) => Self::create_new(path).map(|k| (k, true)),
            Err(e) => Err(e),
        }
    }

    /// The key, for deriving the keystore's sealing key.
    pub(crate) fn key(&self) -> &SecretKey {
        &self.0
    }

    /// A root key held in memory only, for tests.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        RootKey(SecretKey::from_slice(&bytes).expect("32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.key");
        let created = RootKey::create_new(&path).expect("create");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let loaded = RootKey::load(&path).expect("load");
        assert_eq!(created.key().expose(), loaded.key().expose());
        assert!(matches!(
            RootKey::create_new(&path),
            Err(RootKeyError::Io { .. })
        ));
    }

    #[test]
    fn base64_root_key_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.b64");
        let text = format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode([5u8; 32])
        );
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        let key = RootKey::load(&path).expect("load");
        assert_eq!(key.key().expose(), &[5u8; 32]);
    }

    #[test]
    fn bad_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.key");
        let err = RootKey::load(&missing).err().expect("missing");
        assert!(err.to_string().contains("localkms init"), "{err}");

        let open = dir.path().join("open.key");
        std::fs::write(&open, [1u8; 32]).expect("write");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = RootKey::load(&open).err().expect("mode");
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 31]).expect("write");
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            RootKey::load(&short),
            Err(RootKeyError::BadContents(_))
        ));
    }
}
