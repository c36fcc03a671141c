//! The gRPC server on the Unix socket: the KMS services, limits, and graceful drain.

mod authority;

/// The request path's pieces, exposed for the criterion benches (`benches/hot_path.rs`) and
/// the fuzz targets (`fuzz/`) only.
#[doc(hidden)]
pub mod bench_support {
    /// Runs a fresh `:authority` shim over `client_bytes` fed in pieces of `chunk` bytes (as
    /// reads split them); the bytes handed to the HTTP/2 server, or `None` when the shim
    /// refused the connection. For the `authority_rewrite` fuzz target.
    pub fn shim_in_pieces(client_bytes: &[u8], chunk: usize) -> Option<Vec<u8>> {
        let mut rw = super::authority::Rewriter::new();
        for piece in client_bytes.chunks(chunk.max(1)) {
            rw.feed(piece).ok()?;
        }
        rw.finish();
        Some(rw.output().to_vec())
    }

    /// Runs a fresh `:authority` shim over one connection's client bytes; returns the bytes
    /// it hands to the HTTP/2 server (0 on a framing error).
    pub fn shim(client_bytes: &[u8]) -> usize {
        let mut rw = super::authority::Rewriter::new();
        match rw.feed(client_bytes) {
            Ok(()) => rw.output().len(),
            Err(_) => 0,
        }
    }

    /// What the guard works out before a call: the method's labels and whether the client's
    /// own deadline spares the server a timer.
    pub fn guard_decision<B>(req: &http::Request<B>) -> (&'static str, &'static str, bool) {
        let (api, method) = super::guard::classify(req.uri().path());
        let spared = super::guard::client_deadline_within(req, std::time::Duration::from_secs(5));
        (api, method, spared)
    }
}
mod guard;
mod hpack_work;
mod incoming;
mod preflight;
pub mod socket;
mod socket_watch;
mod status;
mod v1;
mod v2;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;

use crate::keyring::usage::{self, UsageTracker};
use crate::keyring::{Keyring, SharedKeyring};
use crate::keystore::backend::RecordKey;
use crate::keystore::EtcdTls;
use crate::keystore::{
    Keystore, KeystoreError, KeystoreLocation, RootKeyProvider, RootKeySource, Store,
};
use crate::proto::v1beta1::key_management_service_server::KeyManagementServiceServer as V1Server;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::reload::Reloader;
use crate::telemetry::http as endpoints;
use crate::telemetry::metrics::Metrics;
pub use guard::{GuardConfig, GuardLayer};
pub use incoming::AcceptPolicy;
pub use status::code_for;
pub use v1::V1Service;
pub use v2::{StatusVersion, V2Service};

/// Largest request accepted: a Decrypt with the apiserver's 32 KiB of annotations fits; a
/// larger message is refused from its 5-byte length prefix, before it is read.
pub const MAX_REQUEST_BYTES: usize = 40 * 1024;
/// How long in-flight calls may take to finish after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Concurrent streams one HTTP/2 connection may open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// The keystore or root key could not be loaded at start.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// `--backup-dir` cannot be used (`--check-config`; when serving, a failed backup is
    /// logged and counted instead).
    #[error(transparent)]
    Backup(#[from] crate::recovery::backup::BackupError),
    /// The keystore loaded but cannot serve.
    #[error("keystore {0} loaded but its primary key failed the self-test round trip")]
    SelfTest(KeystoreLocation),
    /// `--require-mlock` and key pages cannot be locked.
    #[error("--require-mlock is set, but key pages cannot be locked in memory here: raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=), grant CAP_IPC_LOCK, or run on a kernel with 4096-byte pages; refusing to start with keys that could be swapped to disk")]
    NoMlock,
    /// A world-writable socket with no allow list.
    #[error("--socket-mode {0:04o} lets every local user call the plugin and there is no --allow-uid/--allow-gid list: anyone on the node could decrypt the cluster's secrets. Use --socket-mode 0600 (or 0660 with --socket-group), add --allow-uid/--allow-gid, or pass --allow-world if that is really intended")]
    WorldSocket(u32),
    /// An abstract socket with no allow list.
    #[error("abstract socket @{0} has no file mode, so every process in this network namespace can call the plugin (with hostNetwork, every process on the node) and there is no --allow-uid/--allow-gid list: anyone could decrypt the cluster's secrets. Add --allow-uid/--allow-gid with the apiserver's uid or gid, use a socket file, or pass --allow-world if that is really intended")]
    OpenAbstractSocket(String),
    /// Another file or process took the socket path over while serving.
    #[error("the socket {0} was replaced by another file or another process's socket while serving; stopped so that a supervisor restarts this server (find what bound it: `ss -xlp | grep kms.sock`)")]
    SocketTakenOver(String),
    /// The metrics listener could not start.
    #[error(transparent)]
    Http(#[from] endpoints::HttpError),
    /// `serve --check-config` found refusals (each listed, with its fix).
    #[error("serve would refuse to start; fix each ✗ below and run --check-config again:\n{0}")]
    Preflight(String),
    /// The HTTP/2 server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Limits applied to every connection and request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Who may connect, how many at once, and the handshake deadline.
    pub accept: AcceptPolicy,
    /// Requests in flight across all connections before new ones are shed.
    pub max_in_flight: usize,
    /// The fraction of `max_in_flight` one peer uid may hold.
    pub max_in_flight_share: f64,
    /// Longest a single request may take.
    pub request_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings; a peer that does not answer within
    /// `keepalive_timeout` is disconnected.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            accept: AcceptPolicy::default(),
            max_in_flight: 1024,
            max_in_flight_share: 0.5,
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves the KMS API on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight calls finish, for at most [`DRAIN_DEADLINE`].
pub async fn run(
    listener: UnixListener,
    keyring: SharedKeyring,
    version: StatusVersion,
    limits: &Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_rebinding(listener, None, keyring, version, limits, metrics, shutdown).await
}

/// As [`run`], also accepting from each listener sent on `rebound` (the socket file bound
/// again after it was removed), in place of the one before.
async fn run_rebinding(
    listener: UnixListener,
    rebound: Option<tokio::sync::mpsc::Receiver<UnixListener>>,
    keyring: SharedKeyring,
    version: StatusVersion,
    limits: &Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let v2 = KeyManagementServiceServer::new(V2Service::new(keyring.clone(), version))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let v1 = V1Server::new(V1Service::new(keyring)).max_decoding_message_size(MAX_REQUEST_BYTES);
    let guard = GuardLayer::new(GuardConfig {
        max_in_flight: limits.max_in_flight,
        max_in_flight_share: limits.max_in_flight_share,
        timeout: limits.request_timeout,
        metrics: Arc::clone(&metrics),
    });
    let in_flight = guard.clone();
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = draining_tx.send(());
    };
    let incoming = incoming::accept_stream(
        listener,
        rebound,
        limits.accept.clone(),
        limits.max_in_flight_share,
        metrics,
    );
    // HTTP/2 itself holds each connection to MAX_STREAMS_PER_CONNECTION streams; a tower
    // concurrency limit on top would only add a semaphore to every request.
    let serve = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(guard)
        .add_service(v2)
        .add_service(v1)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        drained = async {
            if draining_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            // Connections close as their clients take the GOAWAY; one that ignores it must not
            // hold the exit for the whole deadline once nothing is in flight.
            let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
            tokio::time::sleep(Duration::from_millis(100)).await;
            while tokio::time::Instant::now() < deadline {
                if in_flight.in_flight() == 0 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        } => {
            if drained {
                tracing::info!("nothing in flight: closing the connections still open");
            } else {
                tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "in-flight calls did not finish before the drain deadline; stopping anyway");
            }
        }
    }
    Ok(())
}

/// Everything `serve` needs.
pub struct ServeConfig {
    /// Where to listen.
    pub socket: socket::Endpoint,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Group to give the socket file, for an apiserver running as another user.
    pub socket_group: Option<u32>,
    /// Allow a socket any local user can connect to, with no allow list.
    pub allow_world: bool,
    /// Start on a keystore older than this node's high-water mark (disaster recovery; logged).
    pub allow_rollback: bool,
    /// Refuse to start unless key pages can be locked in memory.
    pub require_mlock: bool,
    /// Keystore: a file, or a key in etcd.
    pub keystore: KeystoreLocation,
    /// TLS for an etcd keystore.
    pub etcd_tls: EtcdTls,
    /// etcd keystores: where the sealed cache and decrypt usage live.
    pub cache_dir: Option<PathBuf>,
    /// etcd keystores: this server's name in the node records.
    pub node_name: String,
    /// etcd keystores: lease on the node record.
    pub node_ttl: Duration,
    /// Where the root key comes from.
    pub root: RootKeySource,
    /// What Status reports as version.
    pub status_version: StatusVersion,
    /// Rotate when the primary has been primary this long (single-node clusters).
    pub rotate_after: Option<Duration>,
    /// Connection and request limits.
    pub limits: Limits,
    /// Optional loopback listener for /metrics and health.
    pub metrics_addr: Option<SocketAddr>,
    /// Allow `metrics_addr` beyond loopback.
    pub metrics_allow_non_loopback: bool,
    /// Skip the keystore ownership and mode check (loudly).
    pub insecure_skip_file_checks: bool,
    /// Refuse legacy format-1 ciphertexts (`--refuse-legacy-envelopes`).
    pub refuse_legacy_envelopes: bool,
    /// Continuous backup of every keystore generation loaded (`--backup-dir`).
    pub backup: Option<crate::recovery::backup::BackupConfig>,
}

/// Refuses a socket every local process may connect to with no caller allow list (a
/// world-writable socket file, or an abstract socket, which has no file mode at all), unless
/// the operator said so with `--allow-world`.
fn check_socket_exposure(config: &ServeConfig) -> Result<(), ServerError> {
    if config.limits.accept.restricts_peers() || config.allow_world {
        return Ok(());
    }
    match &config.socket {
        socket::Endpoint::Path(_) if config.socket_mode & 0o002 != 0 => {
            Err(ServerError::WorldSocket(config.socket_mode))
        }
        socket::Endpoint::Abstract(name) => Err(ServerError::OpenAbstractSocket(name.clone())),
        socket::Endpoint::Path(_) => Ok(()),
    }
}

/// What `serve` starts from once every check has passed: the configuration validated, the
/// root key open, and the keystore loaded. `serve --check-config` stops here.
pub struct Prepared {
    store: Store,
    root: Arc<RootKeyProvider>,
    keystore: Keystore,
}

impl Prepared {
    /// The keyring to serve, counting usage into `usage`; refused unless its primary passes
    /// the self-test round trip.
    fn keyring(
        self,
        usage: UsageTracker,
    ) -> Result<(Keyring, Store, Arc<RootKeyProvider>), ServerError> {
        let ring = Keyring::from_keystore(self.keystore, Arc::new(usage));
        if !ring.healthy() {
            return Err(ServerError::SelfTest(self.store.location().clone()));
        }
        Ok((ring, self.store, self.root))
    }
}

/// Everything `serve` checks before it binds: socket exposure, the keystore's owner and mode,
/// the metrics address rule, the root key, the keystore itself (from etcd, or its cache) and
/// this node's high-water mark and upgrade state. Writes nothing but an etcd keystore's
/// existing cache, which it refreshes as `serve` would. [`preflight`] runs the same steps
/// without stopping at the first refusal.
pub async fn prepare(config: &ServeConfig) -> Result<Prepared, ServerError> {
    check_socket_exposure(config)?;
    check_mlock(config)?;
    let store = Store::open(&config.keystore, &config.etcd_tls)?;
    check_keystore_file(config, &store)?;
    check_metrics_rule(config)?;
    let root = Arc::new(RootKeyProvider::open(&config.root).map_err(KeystoreError::from)?);
    let keystore = load_initial(config, &store, &root).await?;
    check_mark(config, &store, &keystore)?;
    check_upgrade_state(config, &store, &root, &keystore)?;
    Ok(Prepared {
        store,
        root,
        keystore,
    })
}

fn check_mlock(config: &ServeConfig) -> Result<(), ServerError> {
    if config.require_mlock && !crate::crypto::can_lock_keys() {
        return Err(ServerError::NoMlock);
    }
    Ok(())
}

fn check_keystore_file(config: &ServeConfig, store: &Store) -> Result<(), ServerError> {
    if config.insecure_skip_file_checks {
        tracing::warn!(
            "--insecure-skip-file-checks: NOT checking who owns or can read the keystore"
        );
        return Ok(());
    }
    Ok(store.check_private()?)
}

fn check_metrics_rule(config: &ServeConfig) -> Result<(), ServerError> {
    if let Some(addr) = config.metrics_addr {
        if !addr.ip().is_loopback() && !config.metrics_allow_non_loopback {
            return Err(endpoints::HttpError::NotLoopback(addr).into());
        }
    }
    Ok(())
}

async fn load_initial(
    config: &ServeConfig,
    store: &Store,
    root: &RootKeyProvider,
) -> Result<Keystore, ServerError> {
    let cache_dir = config.cache_dir.as_deref().filter(|d| d.is_dir());
    Ok(store.initial(root, cache_dir).await?)
}

/// This node's high-water mark refuses an older, diverged or other keystore, unless
/// `--allow-rollback` (logged).
fn check_mark(config: &ServeConfig, store: &Store, keystore: &Keystore) -> Result<(), ServerError> {
    match store.high_water(config.cache_dir.as_deref()) {
        Some(mark) => match mark.check(keystore, store.location()) {
            Ok(()) => {}
            Err(e @ (KeystoreError::RolledBack { .. } | KeystoreError::OtherKeystore { .. }))
                if config.allow_rollback =>
            {
                tracing::warn!(error = %e, "--allow-rollback: serving an OLDER keystore than this node has served before; the high-water mark is reset to it");
            }
            Err(e) => return Err(e.into()),
        },
        None => tracing::warn!(
            "no --cache-dir: no high-water mark is kept, so a rolled-back etcd keystore would be accepted at start"
        ),
    }
    Ok(())
}

/// This node's upgrade state refuses an old-format copy of a keystore it served finalized.
fn check_upgrade_state(
    config: &ServeConfig,
    store: &Store,
    root: &RootKeyProvider,
    keystore: &Keystore,
) -> Result<(), ServerError> {
    if let Some(state) = store.upgrade_state(config.cache_dir.as_deref()) {
        let key = root.key_for(keystore.kdf()).map_err(KeystoreError::from)?;
        state.check(keystore, &key, store.location())?;
    }
    Ok(())
}

/// `serve --check-config`: every refusal [`prepare`], the self-test and a trial bind of the
/// metrics address and the socket would make, all listed (see [`preflight`]). Returns the
/// report and a summary of what would be served, or every refusal as an error.
pub async fn check_config(config: &ServeConfig) -> Result<String, ServerError> {
    preflight::run(config).await
}

/// The decrypt usage counts a server starts from. An unreadable usage file is never
/// overwritten (it may be the only record of a key's use): it is moved aside, and the fresh
/// count starts now, so `keys destroy` waits a full window before trusting it.
fn starting_usage(path: &std::path::Path) -> UsageTracker {
    match usage::read_usage(path) {
        Ok(file) => UsageTracker::from_file(&file),
        Err(e) => {
            match usage::move_aside(path) {
                Ok(aside) => {
                    tracing::warn!(error = %e, moved_to = %aside.display(), "the usage file is unreadable: moved it aside and counting decrypt usage afresh from now")
                }
                Err(move_err) => {
                    tracing::warn!(error = %e, move_error = %move_err, "the usage file is unreadable and could not be moved aside; counting afresh from now")
                }
            }
            UsageTracker::default()
        }
    }
}

/// `serve`: [`prepare`], then bind and [`run`] until `shutdown`, with the background tasks
/// (reloader, node publisher, metrics endpoints) started beside it and joined after it. The
/// socket file is removed on the way out.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if let Some(dir) = &config.cache_dir {
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(builder.recursive(true), 0o700);
        builder.create(dir).map_err(|source| KeystoreError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let prepared = prepare(&config).await?;
    let high_water = prepared.store.high_water(config.cache_dir.as_deref());
    if let Some(mark) = &high_water {
        // A read-only keystore directory must not stop the plugin; it loses the rollback
        // protection, so say so loudly.
        if let Err(e) = mark.record(
            prepared.keystore.generation(),
            prepared.keystore.write_id(),
            prepared.keystore.keystore_id(),
            config.allow_rollback,
        ) {
            tracing::warn!(error = %e, state = %mark.path().display(), "cannot write this node's high-water mark: a restored backup or an old etcd revision would NOT be refused at the next start");
        }
    }
    if let Some(state) = prepared.store.upgrade_state(config.cache_dir.as_deref()) {
        let recorded = prepared
            .root
            .key_for(prepared.keystore.kdf())
            .map_err(KeystoreError::from)
            .and_then(|key| state.record(&prepared.keystore, &key));
        if let Err(e) = recorded {
            tracing::warn!(error = %e, state = %state.path().display(), "cannot write this node's upgrade state: an old-format copy of this finalized keystore would NOT be refused at the next start");
        }
    }
    // The backup of the generation about to be served is written before its keyring encrypts
    // anything; a failure is logged and counted, and serving goes on.
    let backups = config
        .backup
        .clone()
        .map(|c| Arc::new(crate::recovery::backup::Backups::new(c, Arc::default())));
    if let Some(b) = &backups {
        crate::keystore::backend::blocking(|| b.write_logged(&prepared.keystore));
    }
    let history = prepared.keystore.history().to_vec();
    let kdf = prepared.keystore.kdf().clone();
    let record_key = prepared
        .root
        .key_for(prepared.keystore.kdf())
        .map_err(KeystoreError::from)
        .and_then(|root| RecordKey::derive(&root).map_err(KeystoreError::from))?;
    let usage = starting_usage(&prepared.store.usage_path(config.cache_dir.as_deref()));
    let (ring, store, root) = prepared.keyring(usage)?;
    if config.refuse_legacy_envelopes {
        ring.legacy().refuse();
        tracing::info!("--refuse-legacy-envelopes: legacy format-1 ciphertexts are refused with FailedPrecondition");
    }
    let generation = ring.generation();
    let primary = ring
        .primary_id()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let keyring = SharedKeyring::new(ring);
    let reload_counters = Arc::new(crate::reload::ReloadCounters::default());
    let mut metrics = Metrics::for_store(store.is_shared())
        .with_state(keyring.clone(), Arc::clone(&reload_counters));
    if let Some(b) = &backups {
        metrics = metrics.with_backups(Arc::clone(b.status()));
    }
    let metrics = Arc::new(metrics);
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(endpoints::bind(addr, config.metrics_allow_non_loopback).await?),
        None => None,
    };
    let (listener, guard) = socket::bind(&config.socket, config.socket_mode, config.socket_group)?;
    tracing::info!(
        socket = %config.socket,
        keystore = %config.keystore,
        generation,
        primary_key_id = %primary,
        status_version = config.status_version.as_str(),
        "serving KMS v2 and KMS v1 (v1beta1)"
    );
    let accept = &config.limits.accept;
    match (&config.socket, accept.restricts_peers()) {
        (_, true) => tracing::info!(
            allow_uids = ?accept.allow_uids,
            allow_gids = ?accept.allow_gids,
            "only these peers may call (checked with SO_PEERCRED on every connection)"
        ),
        (socket::Endpoint::Path(_), false) if config.socket_mode & 0o002 != 0 => tracing::warn!(
            mode = format_args!("{:04o}", config.socket_mode),
            "WORLD-WRITABLE SOCKET (--allow-world) and no caller allow-list: every local user can call the plugin and decrypt the cluster's secrets"
        ),
        (socket::Endpoint::Path(_), false) => tracing::info!(
            mode = format_args!("{:04o}", config.socket_mode),
            "no caller allow-list: the socket file's mode is the only access control"
        ),
        (socket::Endpoint::Abstract(_), false) => tracing::warn!(
            "ABSTRACT SOCKET (--allow-world) and no caller allow-list: any process in this network namespace can connect and decrypt the cluster's secrets"
        ),
    }
    if let Some(after) = config.rotate_after {
        tracing::info!(
            rotate_after = %humantime::format_duration(after),
            "scheduled rotation on: safe on a single node only (other nodes would not hold the new key)"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();
    let socket_health = socket_watch::SocketHealth::default();
    let (rebound_tx, rebound_rx) = tokio::sync::mpsc::channel(1);
    background.push(tokio::spawn(socket_watch::watch(
        guard.file().cloned(),
        config.socket_mode,
        config.socket_group,
        socket_health.clone(),
        rebound_tx,
        stop_rx.clone(),
    )));
    if let Some(nodes) = store.nodes_with(&record_key) {
        if config.cache_dir.is_none() {
            tracing::warn!("no --cache-dir: this server cannot start while etcd is unreachable");
        }
        let mut publish_stop = stop_rx.clone();
        background.push(tokio::spawn(nodes.publish_until(
            config.node_name.clone(),
            config.node_ttl,
            keyring.clone(),
            Arc::clone(&metrics),
            async move {
                let _ = publish_stop.wait_for(|stop| *stop).await;
            },
        )));
    }
    background.push(tokio::spawn(supervise_reloader(
        ReloaderSpec {
            store: store.clone(),
            root: Arc::clone(&root),
            keyring: keyring.clone(),
            history,
            kdf,
            cache_dir: config.cache_dir.clone(),
            rotate_after: config.rotate_after,
            check_files: !config.insecure_skip_file_checks,
            counters: Arc::clone(&reload_counters),
            backups,
        },
        stop_rx.clone(),
    )));
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /livez");
        }
        let ep = endpoints::Endpoints {
            keyring: keyring.clone(),
            metrics: Arc::clone(&metrics),
            socket_ours: Some(socket_health.flag()),
        };
        let mut http_stop = stop_rx.clone();
        background.push(tokio::spawn(endpoints::serve(listener, ep, async move {
            let _ = http_stop.wait_for(|stop| *stop).await;
        })));
    }
    let taken = socket_health.clone();
    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            () = taken.wait_taken_over() => {}
        }
        tracing::info!("shutting down: no new connections, finishing in-flight calls");
        let _ = stop_tx.send(true);
    };
    let result = run_rebinding(
        listener,
        Some(rebound_rx),
        keyring,
        config.status_version,
        &config.limits,
        metrics,
        signal,
    )
    .await;
    drop(stop_rx);
    for task in background {
        let _ = task.await;
    }
    let mut guard = guard;
    if socket_health.taken_over() {
        guard.disarm();
    }
    drop(guard);
    tracing::info!(socket = %config.socket, "stopped");
    if socket_health.taken_over() {
        return Err(ServerError::SocketTakenOver(config.socket.to_string()));
    }
    result
}

/// What it takes to build the reload task again.
struct ReloaderSpec {
    store: Store,
    root: Arc<RootKeyProvider>,
    keyring: SharedKeyring,
    history: Vec<crate::keystore::HistoryEntry>,
    kdf: crate::keystore::Kdf,
    cache_dir: Option<PathBuf>,
    rotate_after: Option<Duration>,
    check_files: bool,
    counters: Arc<crate::reload::ReloadCounters>,
    backups: Option<Arc<crate::recovery::backup::Backups>>,
}

/// Runs the reload task until `stop`, starting it again if it ever dies (a panic), so a bug in
/// one reload cannot leave the server deaf to rotations, SIGHUP and its own schedule.
async fn supervise_reloader(spec: ReloaderSpec, stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let history = spec.history.clone();
        let reloader = Reloader::new(
            spec.store.clone(),
            Arc::clone(&spec.root),
            spec.keyring.clone(),
            history,
        )
        .with_cache_dir(spec.cache_dir.clone())
        .with_rotate_after(spec.rotate_after)
        .with_file_checks(spec.check_files)
        .with_counters(Arc::clone(&spec.counters))
        .with_high_water(spec.store.high_water(spec.cache_dir.as_deref()))
        .with_backups(spec.backups.clone())
        .with_kdf(spec.kdf.clone());
        let mut task_stop = stop.clone();
        let task = tokio::spawn(reloader.watch(async move {
            let _ = task_stop.wait_for(|stop| *stop).await;
        }));
        match task.await {
            Ok(()) => return,
            Err(e) if *stop.borrow() => {
                tracing::error!(error = %e, "the reload task failed while stopping");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "the reload task died; starting it again (still serving the loaded keyring)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
