//! A tonic channel over a Unix socket (file or abstract).

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use super::ClientError;
use crate::server::socket::parse_endpoint;

/// Connects to the plugin at `endpoint` (`unix:///path`, `/path`, `unix:///@name`, `@name`),
/// sending `:authority` `localhost` as kube-apiserver does.
pub async fn connect(endpoint: &str) -> Result<Channel, ClientError> {
    let target = parse_endpoint(endpoint)?;
    let shown = std::path::PathBuf::from(target.to_string());
    TonicEndpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move {
                let std_stream = target.connect_std()?;
                std_stream.set_nonblocking(true)?;
                UnixStream::from_std(std_stream).map(TokioIo::new)
            }
        }))
        .await
        .map_err(|source| ClientError::connect(shown, source))
}
