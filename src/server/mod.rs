//! The gRPC server on the Unix socket: the KMS services, message limits and graceful drain.

pub mod authority;
pub mod incoming;
pub mod socket;
mod status;
pub mod v1;
pub mod v2;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;

use crate::keyring::{Keyring, SharedKeyring};
use crate::keystore::{self, KeystoreError, RootKeyProvider, RootKeySource};
use crate::proto::v1beta1::key_management_service_server::KeyManagementServiceServer as V1Server;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::reload::Reloader;
use crate::usage::{self, UsageTracker};
pub use status::code_for;
pub use v1::V1Service;
pub use v2::{StatusVersion, V2Service};

/// Largest request accepted: a Decrypt with the apiserver's 32 KiB of annotations fits, a
/// flood of megabyte messages does not.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long in-flight calls may take to finish after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// The keystore or root key could not be loaded at start.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// The keystore loaded but cannot serve.
    #[error("keystore {0} loaded but its primary key failed the self-test round trip")]
    SelfTest(PathBuf),
    /// The HTTP/2 server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the KMS API on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight calls finish, for at most [`DRAIN_DEADLINE`].
pub async fn run(
    listener: UnixListener,
    keyring: SharedKeyring,
    version: StatusVersion,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let v2 = KeyManagementServiceServer::new(V2Service::new(keyring.clone(), version))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let v1 = V1Server::new(V1Service::new(keyring)).max_decoding_message_size(MAX_REQUEST_BYTES);
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = draining_tx.send(());
    };
    let serve = tonic::transport::Server::builder()
        .add_service(v2)
        .add_service(v1)
        .serve_with_incoming_shutdown(incoming::accept_stream(listener), signal);
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        _ = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(DRAIN_DEADLINE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "in-flight calls did not finish before the drain deadline; stopping anyway");
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
    /// Keystore file.
    pub keystore: PathBuf,
    /// Where the root key comes from.
    pub root: RootKeySource,
    /// What Status reports as version.
    pub status_version: StatusVersion,
    /// Rotate when the primary has been primary this long (single-node clusters).
    pub rotate_after: Option<Duration>,
}

/// Loads the keystore, binds the socket, serves until `shutdown`, and keeps the keyring in
/// step with the keystore file meanwhile. The socket file is removed on the way out.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let root = Arc::new(RootKeyProvider::open(&config.root).map_err(KeystoreError::from)?);
    let ks = keystore::load(&config.keystore, &root)?;
    let usage_path = usage::usage_path(&config.keystore);
    let usage = match usage::read_usage(&usage_path) {
        Ok(file) => UsageTracker::from_file(&file),
        Err(e) => {
            tracing::warn!(error = %e, "starting key usage counts from zero");
            UsageTracker::default()
        }
    };
    let history = ks.history().to_vec();
    let ring = Keyring::from_keystore(ks, Arc::new(usage));
    if !ring.healthy() {
        return Err(ServerError::SelfTest(config.keystore));
    }
    let generation = ring.generation();
    let primary = ring
        .primary_id()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let keyring = SharedKeyring::new(ring);
    let (listener, guard) = socket::bind(&config.socket, config.socket_mode)?;
    tracing::info!(
        socket = %config.socket,
        keystore = %config.keystore.display(),
        generation,
        primary_key_id = %primary,
        status_version = config.status_version.as_str(),
        "serving KMS v2 and KMS v1 (v1beta1)"
    );
    match &config.socket {
        socket::Endpoint::Path(_) => tracing::info!(
            mode = format_args!("{:04o}", config.socket_mode),
            "no caller allow-list: the socket file's mode is the only access control"
        ),
        socket::Endpoint::Abstract(_) => tracing::warn!(
            "abstract socket without a caller allow-list: any process in this network namespace can connect"
        ),
    }
    if let Some(after) = config.rotate_after {
        tracing::info!(
            rotate_after = %humantime::format_duration(after),
            "scheduled rotation on: safe on a single node only (other nodes would not hold the new key)"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reloader = Reloader::new(
        config.keystore.clone(),
        Arc::clone(&root),
        keyring.clone(),
        history,
    )
    .with_rotate_after(config.rotate_after);
    let mut reload_stop = stop_rx.clone();
    let watcher = tokio::spawn(reloader.watch(async move {
        let _ = reload_stop.wait_for(|stop| *stop).await;
    }));
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight calls");
        let _ = stop_tx.send(true);
    };
    let result = run(listener, keyring, config.status_version, signal).await;
    drop(stop_rx);
    let _ = watcher.await;
    drop(guard);
    tracing::info!(socket = %config.socket, "stopped; socket removed");
    result
}
