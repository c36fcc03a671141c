//! A tonic channel over a Unix socket.

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientError;
use crate::server::socket::parse_endpoint;

/// Connects to the plugin at `endpoint` (`unix:///path` or `/path`), sending `:authority`
/// `localhost` as kube-apiserver does.
pub async fn connect(endpoint: &str) -> Result<Channel, ClientError> {
    let path = parse_endpoint(endpoint)?;
    let target = path.clone();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { UnixStream::connect(target).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            socket: path,
            source,
        })
}
