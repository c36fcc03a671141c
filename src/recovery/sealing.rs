//! Backups are age files (<https://age-encryption.org>): encrypted to X25519 recipients
//! (`age1…`) or to one passphrase, so the standard `age` CLI can open them in an emergency
//! and the recovery identity never has to be on a control-plane node.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// Largest identity file read: an age identity file is a few lines.
const MAX_IDENTITY_FILE: u64 = 64 * 1024;
/// Largest passphrase file read.
const MAX_PASSPHRASE_FILE: u64 = 4096;
/// Largest backup file read: an export is at most 16 MiB, plus age's small overhead.
pub const MAX_BACKUP_FILE: u64 = 17 * 1024 * 1024;

/// Why a backup cannot be sealed or opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A secret file others can reach, or another user's (the root key's rule).
    #[error(transparent)]
    NotPrivate(#[from] crate::keystore::RootKeyError),
    /// No usable identity in the identity file.
    #[error("{} holds no age identity (a line starting with AGE-SECRET-KEY-1); use the file `localkms recovery keygen` or `age-keygen` wrote, or rebuild it with `localkms recovery combine`", path.display())]
    NoIdentity {
        /// The file.
        path: PathBuf,
    },
    /// A line that looks like an identity but does not parse.
    #[error("{} line {line}: not a valid age identity ({why})", path.display())]
    BadIdentity {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What age said.
        why: &'static str,
    },
    /// The passphrase file is empty.
    #[error("{} is empty: put the backup passphrase in it", path.display())]
    EmptyPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// age refused to encrypt.
    #[error("cannot encrypt the backup: {0}")]
    Encrypt(String),
    /// The file is not an age file, is truncated or was tampered with.
    #[error("{}: {why}", path.display())]
    Decrypt {
        /// The backup.
        path: PathBuf,
        /// What went wrong, in an operator's words.
        why: String,
    },
}

/// Who can open a backup.
#[derive(Clone)]
pub enum Recipients {
    /// X25519 public keys (`age1…`); any one identity opens the file.
    Keys(Vec<age::x25519::Recipient>),
    /// One passphrase (age allows a passphrase only as the sole recipient).
    Passphrase(std::sync::Arc<SecretString>),
}

impl Recipients {
    /// For log lines and messages: the public keys, or that a passphrase is used.
    pub fn describe(&self) -> String {
        match self {
            Recipients::Keys(keys) => keys
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Recipients::Passphrase(_) => "a passphrase".into(),
        }
    }
}

/// Parses an `age1…` recipient (a clap value parser).
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient, String> {
    age::x25519::Recipient::from_str(s.trim()).map_err(|why| {
        format!("{s:?} is not an age X25519 recipient ({why}); it looks like age1… and is printed by `localkms recovery keygen` or `age-keygen -y IDENTITY`")
    })
}

/// Checks a secret file is owned by us and private, by the rule root key files follow.
fn check_secret_file(path: &Path, file: &std::fs::File) -> Result<(), SealError> {
    let meta = file.metadata().map_err(|source| SealError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(crate::keystore::root_key::check_private(path, &meta)?)
}

/// Reads a private file (owner-only, regular, bounded) into a wiped-on-drop buffer.
pub fn read_secret_file(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let io = |source| SealError::Io {
        path: path.to_owned(),
        source,
    };
    let file = crate::keystore::open_regular(path).map_err(io)?;
    check_secret_file(path, &file)?;
    let len = file.metadata().map_err(io)?.len();
    if len > max {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {max} expected; is this the right file?"),
        )));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(len as usize + 1));
    file.take(max).read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

/// A passphrase from a file (first line, trailing newline dropped).
pub fn read_passphrase(path: &Path) -> Result<SecretString, SealError> {
    let bytes = read_secret_file(path, MAX_PASSPHRASE_FILE)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SealError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(SealError::EmptyPassphrase {
            path: path.to_owned(),
        });
    }
    Ok(SecretString::from(line.to_owned()))
}

/// Encrypts `plaintext` to `recipients` as a binary age file.
pub fn seal(plaintext: &[u8], recipients: &Recipients) -> Result<Vec<u8>, SealError> {
    let encryptor = match recipients {
        Recipients::Keys(keys) => {
            age::Encryptor::with_recipients(keys.iter().map(|k| k as &dyn age::Recipient))
                .map_err(|e| SealError::Encrypt(e.to_string()))?
        }
        Recipients::Passphrase(p) => age::Encryptor::with_user_passphrase((**p).clone()),
    };
    let mut out = Vec::with_capacity(plaintext.len() + 1024);
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|e| SealError::Encrypt(e.to_string()))?;
    writer
        .write_all(plaintext)
        .and_then(|()| writer.finish().map(drop))
        .map_err(|e| SealError::Encrypt(e.to_string()))?;
    Ok(out)
}

/// What opens a backup: the identities of an identity file, or a passphrase.
pub enum Opener {
    /// X25519 identities.
    Identities(Vec<age::x25519::Identity>),
    /// A passphrase, for a backup sealed to one.
    Passphrase(SecretString),
}

/// Reads an age identity file (as `recovery keygen`, `recovery combine` or `age-keygen`
/// write it): comments and blank lines are skipped, every other line must be an identity.
pub fn read_identity_file(path: &Path) -> Result<Opener, SealError> {
    let bytes = read_secret_file(path, MAX_IDENTITY_FILE)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SealError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    let mut identities = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let id = age::x25519::Identity::from_str(line).map_err(|why| SealError::BadIdentity {
            path: path.to_owned(),
            line: n + 1,
            why,
        })?;
        identities.push(id);
    }
    if identities.is_empty() {
        return Err(SealError::NoIdentity {
            path: path.to_owned(),
        });
    }
    Ok(Opener::Identities(identities))
}

/// Reads a backup file (regular, bounded; it is encrypted, so any mode is allowed).
pub fn read_backup(path: &Path) -> Result<Vec<u8>, SealError> {
    crate::keystore::read_regular(path, MAX_BACKUP_FILE).map_err(|source| SealError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Decrypts the age file `ciphertext` (read from `path`, for messages) into a wiped-on-drop
/// buffer. A wrong identity, a truncated file and a tampered one each get their own message.
pub fn open(
    path: &Path,
    ciphertext: &[u8],
    opener: &Opener,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let fail = |why: String| SealError::Decrypt {
        path: path.to_owned(),
        why,
    };
    let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|e| {
        fail(match e {
            age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => {
                "not an age file (or its header is damaged); is this a localkms backup?".into()
            }
            age::DecryptError::Io(_) => {
                "the age header is truncated: the file was cut short".into()
            }
            age::DecryptError::InvalidMac => {
                "the age header was tampered with (its MAC does not match); use another backup"
                    .into()
            }
            other => format!("cannot read the age header: {other}"),
        })
    })?;
    let passphrase;
    let reader = match opener {
        Opener::Identities(ids) => {
            if decryptor.is_scrypt() {
                return Err(fail("this backup is sealed to a passphrase: pass --backup-passphrase-file instead of --identity".into()));
            }
            decryptor.decrypt(ids.iter().map(|i| i as &dyn age::Identity))
        }
        Opener::Passphrase(p) => {
            if !decryptor.is_scrypt() {
                return Err(fail(
                    "this backup is sealed to age recipients, not a passphrase: pass --identity"
                        .into(),
                ));
            }
            let mut id = age::scrypt::Identity::new(p.clone());
            // Work factors above 2^22 take minutes: a hostile file must not hang the restore.
            id.set_max_work_factor(22);
            passphrase = id;
            decryptor.decrypt(std::iter::once(&passphrase as &dyn age::Identity))
        }
    };
    let mut reader = reader.map_err(|e| {
        fail(match e {
            age::DecryptError::NoMatchingKeys => "no identity given opens it: it was sealed to other recipients. Use the recovery identity whose public key was passed as --recipient/--backup-recipient (or rebuild it with `localkms recovery combine`)".into(),
            age::DecryptError::DecryptionFailed | age::DecryptError::KeyDecryptionFailed => "the passphrase or identity does not open it".into(),
            age::DecryptError::InvalidMac => "the age header was tampered with (its MAC does not match); use another backup".into(),
            other => format!("cannot decrypt: {other}"),
        })
    })?;
    let mut out = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    // Read into the pre-sized buffer in steps so it never grows (and never leaves a copy
    // behind in a reallocated block): the plaintext is shorter than the ciphertext. Each
    // step zero-fills at most one age chunk, not the whole remaining capacity.
    const STEP: usize = 64 * 1024;
    loop {
        if out.len() == out.capacity() {
            return Err(fail(
                "the decrypted contents are larger than the file; it is damaged".into(),
            ));
        }
        let start = out.len();
        let room = (out.capacity() - start).min(STEP);
        out.resize(start + room, 0);
        match reader.read(&mut out[start..]) {
            Ok(0) => {
                out.truncate(start);
                break;
            }
            Ok(n) => out.truncate(start + n),
            Err(e) => {
                out.truncate(start);
                return Err(fail(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the backup is truncated: its last part is missing. Use another backup".into()
                } else {
                    format!("the backup is damaged or was tampered with ({e}). Use another backup")
                }));
            }
        }
    }
    Ok(out)
}

/// A new recovery identity in the layout `age-keygen` writes, and its recipient.
pub fn generate_identity(now: time::OffsetDateTime) -> (Zeroizing<String>, String) {
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let secret = id.to_string();
    let mut text = Zeroizing::new(String::with_capacity(256));
    text.push_str("# created: ");
    text.push_str(&crate::timefmt::rfc3339(now.unix_timestamp()));
    text.push_str(" by localkms recovery keygen\n# public key: ");
    text.push_str(&recipient);
    text.push('\n');
    text.push_str(secret.expose_secret());
    text.push('\n');
    (text, recipient)
}

/// The recipient of the single identity in an identity file's text (for split shares).
pub fn recipient_of(identity_text: &str) -> Option<String> {
    let mut ids = identity_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    age::x25519::Identity::from_str(line)
        .ok()
        .map(|id| id.to_public().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path
    }

    #[test]
    fn seals_to_recipients_and_opens_only_with_their_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        let (text, recipient) = generate_identity(time::OffsetDateTime::now_utc());
        let id_path = write_private(dir.path(), "id.txt", &text);
        let (other, _) = generate_identity(time::OffsetDateTime::now_utc());
        let other_path = write_private(dir.path(), "other.txt", &other);
        let r = Recipients::Keys(vec![parse_recipient(&recipient).expect("recipient")]);
        let sealed = seal(b"hello backup", &r).expect("seal");
        let opener = read_identity_file(&id_path).expect("identity");
        let plain = open(&id_path, &sealed, &opener).expect("open");
        assert_eq!(&plain[..], b"hello backup");

        let wrong = read_identity_file(&other_path).expect("identity");
        let e = open(&id_path, &sealed, &wrong)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("no identity given opens it"), "{e}");

        let truncated = &sealed[..sealed.len() - 5];
        let e = open(&id_path, truncated, &opener)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("truncated") || e.contains("damaged"), "{e}");

        let mut tampered = sealed.clone();
        let last = tampered.len() - 3;
        tampered[last] ^= 1;
        let e = open(&id_path, &tampered, &opener)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("tampered") || e.contains("damaged"), "{e}");

        let e = open(&id_path, b"not age at all", &opener)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("not an age file"), "{e}");
    }

    #[test]
    fn identity_files_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let empty = write_private(dir.path(), "empty.txt", "# nothing\n");
        assert!(matches!(
            read_identity_file(&empty),
            Err(SealError::NoIdentity { .. })
        ));
        let bad = write_private(dir.path(), "bad.txt", "AGE-SECRET-KEY-1NOPE\n");
        let e = read_identity_file(&bad)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("line 1"), "{e}");
        let (text, _) = generate_identity(time::OffsetDateTime::now_utc());
        let open_mode = write_private(dir.path(), "open.txt", &text);
        std::fs::set_permissions(
            &open_mode,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let e = read_identity_file(&open_mode)
            .map(drop)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(e.contains("chmod 600"), "{e}");
        assert!(parse_recipient("age1nope").is_err());
        assert!(recipient_of(&text).is_some_and(|r| r.starts_with("age1")));
    }

    #[test]
    fn passphrase_backups_need_the_passphrase() {
        let dir = tempfile::tempdir().expect("tmp");
        let pass = write_private(dir.path(), "pass", "correct horse battery staple\n");
        let p = read_passphrase(&pass).expect("pass");
        let sealed = seal(b"data", &Recipients::Passphrase(std::sync::Arc::new(p))).expect("seal");
        let opener = Opener::Passphrase(read_passphrase(&pass).expect("pass"));
        assert_eq!(&open(&pass, &sealed, &opener).expect("open")[..], b"data");
        let wrong = write_private(dir.path(), "wrong", "not the passphrase\n");
        let opener = Opener::Passphrase(read_passphrase(&wrong).expect("pass"));
        assert!(open(&wrong, &sealed, &opener).is_err());
    }
}
