//! Client commands that talk to any KMS v2 plugin socket: `status` and `check`.

pub mod bench;
mod check;
mod connect;

pub use bench::{bench, BenchOptions, BenchReport};
pub use check::{check, CheckReport};
pub use connect::connect;

use std::path::PathBuf;

use crate::proto::v2::key_management_service_client::KeyManagementServiceClient;
use crate::proto::v2::StatusRequest;

/// Why a client command failed. Messages name the socket and the step.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a Unix socket.
    #[error(transparent)]
    Endpoint(#[from] crate::server::socket::SocketError),
    /// The socket file may not be opened by this process.
    #[error("permission denied on {socket}: this process (uid {uid}, gid {gid}) may not open it. Run as a uid the plugin allows: root, the owner of the socket, or a member of its --socket-group")]
    PermissionDenied {
        /// The socket.
        socket: PathBuf,
        /// This process's uid.
        uid: u32,
        /// This process's gid.
        gid: u32,
    },
    /// The plugin closed the connection before answering anything: its peer check.
    #[error("the plugin on {socket} closed the connection at once: it does not allow this process (uid {uid}, gid {gid}), or it is shutting down. Run as a uid or gid in its --allow-uid/--allow-gid list (its log names the refused peer)")]
    RefusedPeer {
        /// The socket.
        socket: PathBuf,
        /// This process's uid.
        uid: u32,
        /// This process's gid.
        gid: u32,
    },
    /// Nothing answers on the socket.
    #[error(
        "cannot connect to {socket}: {source} (is the plugin running, and is this its --socket?)"
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        source: tonic::transport::Error,
    },
    /// An RPC returned an error status.
    #[error("{method} failed: {code:?}: {message}")]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// The plugin's message.
        message: String,
    },
    /// The plugin answered, but not as the apiserver requires.
    #[error("{0}")]
    Contract(String),
    /// The whole command took too long.
    #[error("no answer from {0} within the timeout")]
    Timeout(PathBuf),
}

impl ClientError {
    /// The first call's failure: a connection the plugin closed before answering (its peer
    /// check, which may close a connection the client already thinks is up) is told apart
    /// from the plugin's own error answers.
    fn first_call(endpoint: &str, method: &'static str, status: tonic::Status) -> Self {
        let closed = matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
        ) && ["canceled", "broken pipe", "reset", "connection", "closed"]
            .iter()
            .any(|n| status.message().to_ascii_lowercase().contains(n));
        if closed {
            return ClientError::RefusedPeer {
                socket: PathBuf::from(endpoint),
                uid: rustix::process::geteuid().as_raw(),
                gid: rustix::process::getegid().as_raw(),
            };
        }
        ClientError::rpc(method, status)
    }

    /// A failed connect, told apart by the OS error under it: permission denied on the
    /// socket file, or a connection the plugin's peer check closed at once.
    fn connect(socket: PathBuf, source: tonic::transport::Error) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
        let mut kind = None;
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
                break;
            }
            cause = e.source();
        }
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        match kind {
            Some(std::io::ErrorKind::PermissionDenied) => {
                ClientError::PermissionDenied { socket, uid, gid }
            }
            Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                ClientError::RefusedPeer { socket, uid, gid }
            }
            _ => ClientError::Connect { socket, source },
        }
    }

    fn rpc(method: &'static str, status: tonic::Status) -> Self {
        ClientError::Rpc {
            method,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// A plugin's Status answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    /// Protocol version (`v2`, `v2beta1`).
    pub version: String,
    /// `ok` when healthy, otherwise the reason.
    pub healthz: String,
    /// The KEK that encrypts.
    pub key_id: String,
}

/// Calls Status on the plugin at `endpoint`.
pub async fn status(endpoint: &str) -> Result<StatusReport, ClientError> {
    let mut client = KeyManagementServiceClient::new(connect(endpoint).await?);
    let resp = client
        .status(StatusRequest {})
        .await
        .map_err(|s| ClientError::first_call(endpoint, "Status", s))?
        .into_inner();
    Ok(StatusReport {
        version: resp.version,
        healthz: resp.healthz,
        key_id: resp.key_id,
    })
}
