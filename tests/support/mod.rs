//! An in-process server for tests that only need the RPC surface: `server::run` on a real Unix
//! socket in a temp directory, stopped through a oneshot channel, with no process to spawn and
//! no keystore file (the keyring is built in memory). Tests that need a process (signals,
//! SIGKILL, CLI output, file permissions, reloads of a keystore file) use `tests/common`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use localkms::keyring::{Keyring, SharedKeyring};
use localkms::keystore::{Actor, Kdf, Keystore};
use localkms::proto::v2::key_management_service_client::KeyManagementServiceClient;
use localkms::server::{self, Limits, StatusVersion};
use localkms::telemetry::metrics::Metrics;
use tokio::sync::oneshot;
use tonic::transport::Channel;

type ServerTask = tokio::task::JoinHandle<Result<(), server::ServerError>>;

/// Sends the stop signal and waits (at most 30 s) for the server task's result.
async fn stop_and_join(
    stop: Option<oneshot::Sender<()>>,
    task: Option<ServerTask>,
) -> Result<(), server::ServerError> {
    if let Some(stop) = stop {
        let _ = stop.send(());
    }
    tokio::time::timeout(Duration::from_secs(30), task.expect("running"))
        .await
        .expect("server stopped within 30 s")
        .expect("server task")
}

/// A server running inside the test process.
pub struct InProcess {
    /// Holds the socket.
    pub dir: tempfile::TempDir,
    /// The socket path.
    pub socket: PathBuf,
    /// The keyring it serves (swap it to simulate a reload).
    pub keyring: SharedKeyring,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<ServerTask>,
}

/// A fresh in-memory keystore with one primary KEK.
pub fn fresh_keystore() -> Keystore {
    Keystore::new_with_primary(
        time::OffsetDateTime::now_utc(),
        Kdf::KeyFile,
        &Actor::current(),
    )
    .expect("keystore")
}

impl InProcess {
    /// Serves a fresh keystore with the default limits, reporting Status version `v2`.
    pub async fn start() -> Self {
        Self::start_with(StatusVersion::V2, Limits::default()).await
    }

    /// Serves a fresh keystore with `version` and `limits`.
    pub async fn start_with(version: StatusVersion, limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kms.sock");
        let keyring =
            SharedKeyring::new(Keyring::from_keystore(fresh_keystore(), Default::default()));
        let metrics = Arc::new(Metrics::new().with_state(keyring.clone(), Default::default()));
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let (ring, m) = (keyring.clone(), Arc::clone(&metrics));
        let task = tokio::spawn(async move {
            server::run(listener, ring, version, &limits, m, async move {
                let _ = stopped.await;
            })
            .await
        });
        InProcess {
            dir,
            socket,
            keyring,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The endpoint as a client dials it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A connected KMS v2 client.
    pub async fn client(&self) -> KeyManagementServiceClient<Channel> {
        KeyManagementServiceClient::new(
            localkms::client::connect(&self.endpoint())
                .await
                .expect("connect"),
        )
    }

    /// Stops the server the way SIGTERM does (drain, then return) and reports how it ended.
    pub async fn stop(mut self) -> Result<(), server::ServerError> {
        stop_and_join(self.stop.take(), self.task.take()).await
    }
}

/// The whole `serve` (keystore file, reloader, metrics endpoints, node publisher) running
/// inside the test process, stopped through a oneshot like SIGTERM stops the binary.
pub struct Serving {
    /// The socket path.
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<ServerTask>,
}

impl Serving {
    /// Serves `keystore` with `root_key_file` on `socket`, with `configure` applied to the
    /// configuration (metrics address, limits…), and waits until Status answers.
    pub async fn start(
        socket: PathBuf,
        keystore: PathBuf,
        root_key_file: PathBuf,
        configure: impl FnOnce(&mut server::ServeConfig),
    ) -> Self {
        let mut config = server::ServeConfig {
            socket: server::socket::Endpoint::Path(socket.clone()),
            socket_mode: 0o600,
            socket_group: None,
            allow_world: false,
            allow_rollback: false,
            require_mlock: false,
            keystore: localkms::keystore::KeystoreLocation::file(keystore),
            etcd_tls: Default::default(),
            cache_dir: None,
            node_name: "test".into(),
            node_ttl: Duration::from_secs(10),
            root: localkms::keystore::RootKeySource::KeyFile(root_key_file),
            status_version: StatusVersion::V2,
            rotate_after: None,
            limits: Limits::default(),
            metrics_addr: None,
            metrics_allow_non_loopback: false,
            insecure_skip_file_checks: false,
            refuse_legacy_envelopes: false,
            backup: None,
        };
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(config, async move {
            let _ = stopped.await;
        }));
        let endpoint = format!("unix://{}", socket.display());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = localkms::client::connect(&endpoint).await {
                let mut c = KeyManagementServiceClient::new(ch);
                if c.status(localkms::proto::v2::StatusRequest {})
                    .await
                    .is_ok_and(|r| r.get_ref().healthz == "ok")
                {
                    break;
                }
            }
            assert!(!task.is_finished(), "serve stopped early");
            assert!(
                tokio::time::Instant::now() < deadline,
                "serve never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Serving {
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The endpoint as a client dials it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops it as SIGTERM would and reports how it ended.
    pub async fn stop(mut self) -> Result<(), server::ServerError> {
        stop_and_join(self.stop.take(), self.task.take()).await
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
