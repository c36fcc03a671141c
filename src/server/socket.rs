//! The Unix socket the apiserver connects to: endpoint parsing, safe binding and cleanup.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the socket cannot be bound. Every message names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Not a Unix socket endpoint.
    #[error("endpoint {0:?} is not a Unix socket path: use unix:///path/to/kms.sock or /path/to/kms.sock")]
    BadEndpoint(String),
    /// An abstract socket name longer than `sun_path` holds.
    #[error("abstract socket name {0:?} is {1} bytes; Linux allows at most 107 (sun_path is 108 bytes, one of which marks the name as abstract): use a shorter name")]
    AbstractNameTooLong(String, usize),
    /// Another live server answers on the path.
    #[error(
        "another server is already listening on {0}; stop it first or pass a different --socket"
    )]
    InUse(PathBuf),
    /// Something other than a socket occupies the path.
    #[error("{0} exists and is not a socket; refusing to replace it: remove it or pass a different --socket")]
    NotASocket(PathBuf),
    /// The socket (or its directory) cannot be given to `--socket-group`.
    #[error("cannot give {path} to group {gid} (--socket-group): {source}. Changing a file's group to one this process is not a member of needs CAP_CHOWN: add it (systemd: CapabilityBoundingSet=CAP_IPC_LOCK CAP_CHOWN and AmbientCapabilities=CAP_CHOWN; a pod: securityContext.capabilities.add: [CHOWN]), or run localkms with that group as a supplementary group (systemd: SupplementaryGroups=), or create the socket directory beforehand owned by that group with mode 2750 (setgid), so the socket inherits the group with no chown")]
    Group {
        /// The file.
        path: PathBuf,
        /// The group.
        gid: u32,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The socket or its directory cannot be created by this user.
    #[error("cannot listen on {path}: permission denied; this process runs as uid {uid}, which cannot create files in {dir}. Run localkms as root (or as the user the directory belongs to), create {dir} beforehand owned by this user with mode 0700, or pass a --socket in a directory this user owns", dir = .dir.display())]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
        /// The directory that could not be written.
        dir: PathBuf,
        /// This process's uid.
        uid: u32,
    },
    /// Any other I/O failure.
    #[error("cannot listen on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Where the server listens: a socket file, or a Linux abstract socket (no file at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A filesystem path.
    Path(PathBuf),
    /// An abstract socket name (written `@name` or `unix:///@name`).
    Abstract(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Path(p) => write!(f, "{}", p.display()),
            Endpoint::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

impl Endpoint {
    /// The endpoint as an EncryptionConfiguration writes it.
    pub fn uri(&self) -> String {
        match self {
            Endpoint::Path(p) => format!("unix://{}", p.display()),
            Endpoint::Abstract(name) => format!("unix:///@{name}"),
        }
    }

    /// Connects as a client, for `status`, `check` and the tests.
    pub fn connect_std(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        match self {
            Endpoint::Path(p) => std::os::unix::net::UnixStream::connect(p),
            Endpoint::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                std::os::unix::net::UnixStream::connect_addr(&addr)
            }
        }
    }
}

/// Parses an endpoint as written in an EncryptionConfiguration (`unix:///path`,
/// `unix:///@name`) or given plainly (`/path`, `@name`).
pub fn parse_endpoint(endpoint: &str) -> Result<Endpoint, SocketError> {
    let bad = || SocketError::BadEndpoint(endpoint.to_owned());
    let rest = match endpoint.strip_prefix("unix://") {
        Some(rest) => rest,
        None if endpoint.contains("://") => return Err(bad()),
        None => endpoint,
    };
    if rest.contains('\0') {
        return Err(bad());
    }
    if let Some(name) = rest.strip_prefix("/@").or_else(|| rest.strip_prefix('@')) {
        // sun_path holds 108 bytes, one of which marks the name as abstract.
        if name.is_empty() {
            return Err(bad());
        }
        if name.len() > 107 {
            return Err(SocketError::AbstractNameTooLong(
                name.chars().take(120).collect(),
                name.len(),
            ));
        }
        return Ok(Endpoint::Abstract(name.to_owned()));
    }
    if rest.is_empty() {
        return Err(bad());
    }
    Ok(Endpoint::Path(PathBuf::from(rest)))
}

/// A file's identity: device, inode, and the change time, since a deleted file's inode
/// number is often given at once to the next file created (another process's socket at the
/// same path would otherwise look like ours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId(u64, u64, i64, i64);

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileId(meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
    }
}

/// Removes the socket file when the server stops, unless another server has replaced it.
pub struct SocketGuard {
    file: Option<(PathBuf, FileId)>,
}

impl SocketGuard {
    /// The socket file and its identity, for a path socket.
    pub fn file(&self) -> Option<&(PathBuf, FileId)> {
        self.file.as_ref()
    }

    /// Leaves the file in place when dropped (it is another process's now).
    pub fn disarm(&mut self) {
        self.file = None;
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let Some((path, id)) = &self.file else {
            return;
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if FileId::of(&meta) == *id {
                match std::fs::remove_file(path) {
                    Ok(()) => tracing::info!(socket = %path.display(), "socket removed"),
                    Err(e) => {
                        tracing::warn!(socket = %path.display(), error = %e, "could not remove the socket file")
                    }
                }
            }
        }
    }
}

/// Binds `path` with the given file mode: creates the parent directory if missing (0700, or
/// setgid 2750 owned by `group` when one is given, so its members can reach the socket),
/// removes a stale socket left by a dead process, and refuses a live one or a non-socket file.
/// With `group`, the socket file is given to that group (unless it inherited it already).
///
/// The socket is created under a restrictive umask, so it is never reachable with a wider
/// mode, not even for the instant before `chmod`.
pub fn bind(
    endpoint: &Endpoint,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketGuard), SocketError> {
    match endpoint {
        Endpoint::Path(path) => bind_path(path, mode, group),
        Endpoint::Abstract(name) => bind_abstract(name),
    }
}

/// Gives `path` to `gid` unless it already belongs to it.
fn give_to_group(path: &Path, gid: u32) -> Result<(), SocketError> {
    let meta = std::fs::metadata(path).map_err(|source| SocketError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.gid() == gid {
        return Ok(());
    }
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| {
        SocketError::Group {
            path: path.to_owned(),
            gid,
            source: e.into(),
        }
    })
}

/// Abstract sockets have no file: nothing to chmod, nothing stale to remove (the kernel drops
/// the name with the last listener), and a live name fails to bind.
fn bind_abstract(name: &str) -> Result<(UnixListener, SocketGuard), SocketError> {
    use std::os::linux::net::SocketAddrExt;
    let shown = PathBuf::from(format!("@{name}"));
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            SocketError::InUse(shown.clone())
        } else {
            SocketError::Io {
                path: shown.clone(),
                source,
            }
        }
    };
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(io)?;
    std_listener.set_nonblocking(true).map_err(io)?;
    let listener = UnixListener::from_std(std_listener).map_err(io)?;
    Ok((listener, SocketGuard { file: None }))
}

fn bind_path(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketGuard), SocketError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            let mut dir = crate::keystore::file::dir_of(path);
            // The nearest directory that exists is the one that could not be written.
            while !dir.exists() {
                match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => dir = p,
                    _ => break,
                }
            }
            return SocketError::PermissionDenied {
                path: path.to_owned(),
                dir: dir.to_owned(),
                uid: rustix::process::geteuid().as_raw(),
            };
        }
        SocketError::Io {
            path: path.to_owned(),
            source,
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            if let Some(gid) = group {
                // Members of the group may enter the directory (not list or write it); setgid
                // so a socket created here later inherits the group.
                give_to_group(dir, gid)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2750))
                    .map_err(io)?;
                tracing::info!(dir = %dir.display(), gid, "created the socket directory with mode 2750 for --socket-group");
            }
        }
    }
    remove_if_stale(path)?;
    let old_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old_umask);
    let std_listener = bound.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            SocketError::InUse(path.to_owned())
        } else {
            io(e)
        }
    })?;
    // Until its identity is known (after the group and mode change it), the file is removed
    // by path if this fails half-way.
    let mut guard = SocketGuard { file: None };
    let cleanup = |e: SocketError| {
        let _ = std::fs::remove_file(path);
        e
    };
    if let Some(gid) = group {
        give_to_group(path, gid).map_err(cleanup)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| cleanup(io(e)))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| cleanup(io(e)))?;
    guard.file = Some((path.to_owned(), FileId::of(&meta)));
    std_listener.set_nonblocking(true).map_err(io)?;
    let listener = UnixListener::from_std(std_listener).map_err(io)?;
    Ok((listener, guard))
}

/// Whether `bind` would succeed, without binding: no live server on it, nothing but a socket
/// in the way, and a parent directory that exists or can be created.
pub fn check_bindable(endpoint: &Endpoint) -> Result<(), SocketError> {
    let Endpoint::Path(path) = endpoint else {
        return match endpoint.connect_std() {
            Ok(_) => Err(SocketError::InUse(PathBuf::from(endpoint.to_string()))),
            Err(_) => Ok(()),
        };
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.clone()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.clone()));
        }
    }
    let mut dir = crate::keystore::file::dir_of(path);
    while !dir.exists() {
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p,
            _ => break,
        }
    }
    let meta = std::fs::metadata(dir).map_err(|source| SocketError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(SocketError::Io {
            path: path.clone(),
            source: std::io::Error::other(format!("{} is not a directory", dir.display())),
        });
    }
    // The socket (or the directories above it) must be creatable by this user.
    if rustix::fs::access(
        dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .is_err()
    {
        return Err(SocketError::PermissionDenied {
            path: path.clone(),
            dir: dir.to_owned(),
            uid: rustix::process::geteuid().as_raw(),
        });
    }
    Ok(())
}

fn remove_if_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale socket left by a stopped server");
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(SocketError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Endpoint {
        Endpoint::Path(PathBuf::from(p))
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("unix:///var/run/kms.sock").expect("uri"),
            path("/var/run/kms.sock")
        );
        assert_eq!(
            parse_endpoint("/var/run/kms.sock").expect("path"),
            path("/var/run/kms.sock")
        );
        assert_eq!(
            parse_endpoint("kms.sock").expect("relative"),
            path("kms.sock")
        );
        assert_eq!(
            parse_endpoint("unix:///@kms").expect("abstract uri"),
            Endpoint::Abstract("kms".into())
        );
        assert_eq!(
            parse_endpoint("@kms").expect("abstract"),
            Endpoint::Abstract("kms".into())
        );
        assert!(parse_endpoint("@").is_err());
        assert_eq!(Endpoint::Abstract("kms".into()).uri(), "unix:///@kms");
        assert!(parse_endpoint("tcp://127.0.0.1:1").is_err());
        assert!(parse_endpoint("unix://").is_err());
        assert!(parse_endpoint("").is_err());
    }

    #[tokio::test]
    async fn bind_sets_mode_and_guard_removes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("kms.sock");
        let ep = Endpoint::Path(path.clone());
        let (listener, guard) = bind(&ep, 0o600, None).expect("bind");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("stat")
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // A second bind while the first listens is refused.
        assert!(matches!(bind(&ep, 0o600, None), Err(SocketError::InUse(_))));
        drop(listener);
        drop(guard);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        drop(stale); // the file stays, nobody listens
        assert!(path.exists());
        let (_listener, _guard) =
            bind(&Endpoint::Path(path), 0o600, None).expect("stale socket replaced");

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            bind(&Endpoint::Path(file.clone()), 0o600, None),
            Err(SocketError::NotASocket(_))
        ));
        assert!(file.exists());
    }
}

#[cfg(test)]
mod abstract_tests {
    use super::*;

    #[tokio::test]
    async fn abstract_sockets_bind_connect_and_refuse_a_second_server() {
        let name = format!("localkms-test-{}", std::process::id());
        let ep = Endpoint::Abstract(name);
        let (_listener, _guard) = bind(&ep, 0o600, None).expect("bind");
        ep.connect_std().expect("connect");
        assert!(matches!(bind(&ep, 0o600, None), Err(SocketError::InUse(_))));
    }
}
