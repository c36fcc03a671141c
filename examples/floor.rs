//! The floor: the cheapest KMS v2 server the stack allows, to measure localkms against.
//!
//! Same protos, same tonic and tokio, the same kind of Unix socket; constant answers, and none
//! of localkms's layers (no guard, no `:authority` shim, no metrics, no logging, no crypto).
//! What localkms costs beyond this is its own:
//!
//! ```sh
//! cargo run --release --example floor -- /tmp/floor.sock &
//! localkms bench --socket /tmp/floor.sock --op status --compare localkms-dev/kms.sock \
//!   --server-pid "$(pgrep -f 'examples/floor')" --compare-pid "$(pgrep -f 'serve --dev')"
//! ```

use localkms::proto::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use localkms::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

/// Answers every call with a constant.
struct Floor;

#[tonic::async_trait]
impl KeyManagementService for Floor {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "floor".into(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        // The same size as a localkms ciphertext for a 32-byte seed, so the transport carries
        // as much.
        let len = request.get_ref().plaintext.len() + 67;
        Ok(Response::new(EncryptResponse {
            ciphertext: vec![1u8; len],
            key_id: "floor".into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        _: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        Ok(Response::new(DecryptResponse {
            plaintext: vec![2u8; 32],
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: floor SOCKET_PATH")?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(Floor))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
