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
        .map_err(|s| ClientError::rpc("Status", s))?
        .into_inner();
    Ok(StatusReport {
        version: resp.version,
        healthz: resp.healthz,
        key_id: resp.key_id,
    })
}
