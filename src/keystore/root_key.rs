//! The root key: the one secret kept outside the keystore, which seals it.
//!
//! It comes from a key file (32 raw bytes or their base64) or from a passphrase file run through
//! Argon2id with the parameters and salt recorded in the keystore header. Either way it is held
//! only in a [`SecretKey`] and never written into the keystore.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use zeroize::Zeroizing;

use crate::crypto::{fill_random, SecretKey, KEY_LEN};

/// Why a root key or passphrase cannot be used. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// The file is not there.
    #[error("root key file {0} does not exist; create one with `localkms init --keystore PATH --root-key-file {0}`")]
    NotFound(PathBuf),
    /// Group or others could read or write the secret.
    #[error("{path} has mode {mode:04o}, so other users can reach the secret in it; run `chmod 600 {path}` (or 400)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by someone other than the user running localkms.
    #[error("{path} is owned by uid {owner}, not by the user running localkms (uid {me}); run `chown {me} {path}`")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The running user.
        me: u32,
    },
    /// Neither 32 raw bytes nor base64 of 32 bytes.
    #[error("root key file {0} must hold exactly 32 raw bytes or their base64 encoding; it holds something else")]
    BadContents(PathBuf),
    /// An empty or oversized passphrase.
    #[error("passphrase file {0} must hold a passphrase of 12 to 1024 bytes (one trailing newline is ignored)")]
    BadPassphrase(PathBuf),
    /// Any other I/O failure.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The random source failed while making a new key or salt.
    #[error("the operating system's random number generator failed")]
    Random,
    /// The keystore was sealed with the other kind of root key.
    #[error("{0}")]
    WrongKind(String),
    /// The keystore header asks for more Argon2 work than localkms allows.
    #[error("the keystore's Argon2id parameters (m={m_kib} KiB, t={t}, p={p}) exceed the allowed bounds (m ≤ {max_m} KiB, t ≤ {max_t}, p ≤ {max_p}); refusing to run them")]
    KdfTooExpensive {
        /// Memory in KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
        /// Bound on memory.
        max_m: u32,
        /// Bound on passes.
        max_t: u32,
        /// Bound on lanes.
        max_p: u32,
    },
    /// Argon2 rejected the parameters.
    #[error("Argon2id failed: {0}")]
    Argon2(String),
}

/// The 32-byte key that seals the keystore; wiped on drop, never printed.
pub struct RootKey(SecretKey);

/// Longest key file accepted: base64 of 32 bytes with surrounding whitespace fits easily.
const MAX_KEY_FILE_LEN: usize = 128;
/// Longest passphrase accepted.
const MAX_PASSPHRASE_LEN: usize = 1024;
/// Shortest passphrase accepted.
const MIN_PASSPHRASE_LEN: usize = 12;

/// How the root key is obtained, as recorded in the keystore header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kdf {
    /// The key comes straight from a root key file.
    KeyFile,
    /// The key is Argon2id(passphrase, salt) with these parameters.
    Argon2id {
        /// Memory cost in KiB.
        m_kib: u32,
        /// Number of passes.
        t: u32,
        /// Degree of parallelism.
        p: u32,
        /// Random salt, fresh for every keystore and every root-key rotation.
        salt: [u8; 16],
    },
}

/// Argon2id memory for new keystores: 64 MiB.
pub const ARGON2_M_KIB: u32 = 64 * 1024;
/// Argon2id passes for new keystores.
pub const ARGON2_T: u32 = 3;
/// Argon2id lanes for new keystores.
pub const ARGON2_P: u32 = 1;
/// Upper bounds checked before running Argon2 on a header's parameters: an edited or hostile
/// header must not make localkms allocate more than `init` ever asks for (the static pod's
/// memory limit is 128 Mi) or spin for minutes.
pub const ARGON2_MAX_M_KIB: u32 = ARGON2_M_KIB;
/// See [`ARGON2_MAX_M_KIB`].
pub const ARGON2_MAX_T: u32 = 16;
/// See [`ARGON2_MAX_M_KIB`].
pub const ARGON2_MAX_P: u32 = 16;

/// Reads a secret file into a fixed, zeroizing buffer after checking that only its owner, the
/// running user, can reach it.
fn read_private_file(path: &Path, max: usize) -> Result<Zeroizing<Vec<u8>>, RootKeyError> {
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
    let mut file = super::open_regular(path).map_err(io)?;
    check_private(path, &file.metadata().map_err(io)?)?;
    let mut buf = Zeroizing::new(vec![0u8; max + 1]);
    let mut len = 0;
    loop {
        let n = file.read(&mut buf[len..]).map_err(io)?;
        if n == 0 {
            break;
        }
        len += n;
        if len > max {
            break;
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Refuses a secret file that group or others may read or write, or that another user owns.
pub fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), RootKeyError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RootKeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(RootKeyError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

impl RootKey {
    /// Reads a root key file: 32 raw bytes, or base64 of them (whitespace around it ignored).
    pub fn load(path: &Path) -> Result<Self, RootKeyError> {
        let contents = read_private_file(path, MAX_KEY_FILE_LEN)?;
        Self::parse(&contents).ok_or_else(|| RootKeyError::BadContents(path.to_owned()))
    }

    fn parse(contents: &[u8]) -> Option<Self> {
        if contents.len() == KEY_LEN {
            return SecretKey::from_slice(contents).map(RootKey);
        }
        let text = contents.trim_ascii();
        let mut decoded = Zeroizing::new([0u8; MAX_KEY_FILE_LEN]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(text, &mut decoded[..])
            .ok()?;
        SecretKey::from_slice(&decoded[..n]).map(RootKey)
    }

    /// Creates `path` with 32 fresh random bytes, mode 0600, refusing to replace any file.
    pub fn create_new(path: &Path) -> Result<Self, RootKeyError> {
        let key = SecretKey::generate().map_err(|_| RootKeyError::Random)?;
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
        // The directory entry too: a keystore sealed under this key must never outlive it.
        File::open(crate::keystore::file::dir_of(path))
            .and_then(|d| d.sync_all())
            .map_err(io)?;
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

/// Where the root key comes from, for every command that opens a keystore.
pub enum RootKeySource {
    /// A root key file.
    KeyFile(PathBuf),
    /// A passphrase file, stretched with Argon2id.
    PassphraseFile(PathBuf),
}

impl RootKeySource {
    /// The file, for messages.
    pub fn path(&self) -> &Path {
        match self {
            RootKeySource::KeyFile(p) | RootKeySource::PassphraseFile(p) => p,
        }
    }
}

enum Secret {
    Key(Arc<RootKey>),
    /// The passphrase file: read (into a wiped buffer) only when a key must be derived, so the
    /// passphrase does not sit in ordinary heap memory for the life of the process.
    Passphrase(PathBuf),
}

/// Turns a keystore header's [`Kdf`] into the root key. For a passphrase, the derived key is
/// cached per salt and parameters, so a server reloading its keystore runs Argon2 only when
/// the root key actually changed.
pub struct RootKeyProvider {
    source_path: PathBuf,
    secret: Secret,
    cache: Mutex<Option<(Kdf, Arc<RootKey>)>>,
}

impl RootKeyProvider {
    /// Reads the secret named by `source` (the key file, or the passphrase).
    pub fn open(source: &RootKeySource) -> Result<Self, RootKeyError> {
        let secret = match source {
            RootKeySource::KeyFile(path) => Secret::Key(Arc::new(RootKey::load(path)?)),
            RootKeySource::PassphraseFile(path) => {
                // Checked now, so a bad file is reported at once; read again when needed.
                drop(read_passphrase(path)?);
                Secret::Passphrase(path.clone())
            }
        };
        Ok(RootKeyProvider {
            source_path: source.path().to_owned(),
            secret,
            cache: Mutex::new(None),
        })
    }

    /// As [`open`](Self::open), but creates a missing root key file (never a passphrase).
    pub fn open_or_create(source: &RootKeySource) -> Result<(Self, bool), RootKeyError> {
        match source {
            RootKeySource::KeyFile(path) => {
                let (key, created) = RootKey::load_or_create(path)?;
                Ok((
                    RootKeyProvider {
                        source_path: path.clone(),
                        secret: Secret::Key(Arc::new(key)),
                        cache: Mutex::new(None),
                    },
                    created,
                ))
            }
            RootKeySource::PassphraseFile(_) => Ok((Self::open(source)?, false)),
        }
    }

    /// A provider around an in-memory key, for tests.
    #[cfg(test)]
    pub(crate) fn from_key(key: RootKey) -> Self {
        RootKeyProvider {
            source_path: PathBuf::from("<memory>"),
            secret: Secret::Key(Arc::new(key)),
            cache: Mutex::new(None),
        }
    }

    /// The KDF descriptor for a keystore sealed fresh with this secret (a new random salt for a
    /// passphrase).
    pub fn new_kdf(&self) -> Result<Kdf, RootKeyError> {
        match self.secret {
            Secret::Key(_) => Ok(Kdf::KeyFile),
            Secret::Passphrase(_) => {
                let mut salt = [0u8; 16];
                fill_random(&mut salt).map_err(|_| RootKeyError::Random)?;
                Ok(Kdf::Argon2id {
                    m_kib: ARGON2_M_KIB,
                    t: ARGON2_T,
                    p: ARGON2_P,
                    salt,
                })
            }
        }
    }

    /// The root key for a keystore whose header says `kdf`.
    pub fn key_for(&self, kdf: &Kdf) -> Result<Arc<RootKey>, RootKeyError> {
        match (&self.secret, kdf) {
            (Secret::Key(key), Kdf::KeyFile) => Ok(Arc::clone(key)),
            (Secret::Key(_), Kdf::Argon2id { .. }) => Err(RootKeyError::WrongKind(format!(
                "this keystore is sealed with a passphrase; pass --passphrase-file instead of --root-key-file {}",
                self.source_path.display()
            ))),
            (Secret::Passphrase(_), Kdf::KeyFile) => Err(RootKeyError::WrongKind(format!(
                "this keystore is sealed with a root key file; pass --root-key-file instead of --passphrase-file {}",
                self.source_path.display()
            ))),
            (Secret::Passphrase(path), Kdf::Argon2id { m_kib, t, p, salt }) => {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((cached_kdf, key)) = cache.as_ref() {
                    if cached_kdf == kdf {
                        return Ok(Arc::clone(key));
                    }
                }
                let pass = read_passphrase(path)?;
                let key = Arc::new(derive_from_passphrase(&pass, *m_kib, *t, *p, salt)?);
                *cache = Some((kdf.clone(), Arc::clone(&key)));
                Ok(key)
            }
        }
    }
}

fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>, RootKeyError> {
    let mut pass = read_private_file(path, MAX_PASSPHRASE_LEN)?;
    if pass.last() == Some(&b'\n') {
        pass.pop();
        if pass.last() == Some(&b'\r') {
            pass.pop();
        }
    }
    if pass.len() < MIN_PASSPHRASE_LEN || pass.len() > MAX_PASSPHRASE_LEN {
        return Err(RootKeyError::BadPassphrase(path.to_owned()));
    }
    Ok(pass)
}

fn derive_from_passphrase(
    pass: &[u8],
    m_kib: u32,
    t: u32,
    p: u32,
    salt: &[u8; 16],
) -> Result<RootKey, RootKeyError> {
    if m_kib > ARGON2_MAX_M_KIB || t > ARGON2_MAX_T || p > ARGON2_MAX_P {
        return Err(RootKeyError::KdfTooExpensive {
            m_kib,
            t,
            p,
            max_m: ARGON2_MAX_M_KIB,
            max_t: ARGON2_MAX_T,
            max_p: ARGON2_MAX_P,
        });
    }
    let params = argon2::Params::new(m_kib, t, p, Some(KEY_LEN))
        .map_err(|e| RootKeyError::Argon2(e.to_string()))?;
    // The working memory is enough to recompute the key: ours, so it is wiped after.
    let mut memory = Zeroizing::new(vec![argon2::Block::default(); params.block_count()]);
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = SecretKey::zeroed();
    argon
        .hash_password_into_with_memory(pass, salt, key.expose_mut(), &mut *memory)
        .map_err(|e| RootKeyError::Argon2(e.to_string()))?;
    Ok(RootKey(key))
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

    fn passphrase_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("pass");
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    #[test]
    fn passphrase_derivation_is_deterministic_per_salt_and_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = passphrase_file(dir.path(), "correct horse battery staple\n");
        let provider =
            RootKeyProvider::open(&RootKeySource::PassphraseFile(path.clone())).expect("open");
        let kdf = Kdf::Argon2id {
            m_kib: 1024,
            t: 1,
            p: 1,
            salt: [7u8; 16],
        };
        let a = provider.key_for(&kdf).expect("derive");
        let b = provider.key_for(&kdf).expect("cached");
        assert!(Arc::ptr_eq(&a, &b), "second call must hit the cache");
        let other = Kdf::Argon2id {
            m_kib: 1024,
            t: 1,
            p: 1,
            salt: [8u8; 16],
        };
        let c = provider.key_for(&other).expect("derive");
        assert_ne!(a.key().expose(), c.key().expose());
        // The same passphrase without its newline derives the same key.
        let path2 = dir.path().join("pass2");
        std::fs::write(&path2, "correct horse battery staple").expect("write");
        std::fs::set_permissions(&path2, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let p2 = RootKeyProvider::open(&RootKeySource::PassphraseFile(path2)).expect("open");
        assert_eq!(
            p2.key_for(&kdf).expect("derive").key().expose(),
            a.key().expose()
        );
        assert!(matches!(
            provider.key_for(&Kdf::KeyFile),
            Err(RootKeyError::WrongKind(_))
        ));
    }

    #[test]
    fn expensive_or_bad_passphrases_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = passphrase_file(dir.path(), "long enough passphrase");
        let provider = RootKeyProvider::open(&RootKeySource::PassphraseFile(path)).expect("open");
        let hostile = Kdf::Argon2id {
            m_kib: u32::MAX,
            t: 1,
            p: 1,
            salt: [0u8; 16],
        };
        assert!(matches!(
            provider.key_for(&hostile),
            Err(RootKeyError::KdfTooExpensive { .. })
        ));
        // Anything above what init writes (64 MiB) is refused before Argon2 allocates it.
        let just_over = Kdf::Argon2id {
            m_kib: ARGON2_M_KIB + 1,
            t: 1,
            p: 1,
            salt: [0u8; 16],
        };
        assert!(matches!(
            provider.key_for(&just_over),
            Err(RootKeyError::KdfTooExpensive { .. })
        ));
        let short = passphrase_file(dir.path(), "short\n");
        assert!(matches!(
            RootKeyProvider::open(&RootKeySource::PassphraseFile(short)),
            Err(RootKeyError::BadPassphrase(_))
        ));
    }
}
