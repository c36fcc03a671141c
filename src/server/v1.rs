//! `v1beta1.KeyManagementService`: KMS v1, for clusters that still run it or still hold data
//! written under it while they migrate to v2. Same envelope format, same KEKs.

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::status::{log_request, to_status};
use crate::crypto::envelope::Api;
use crate::keyring::refresh::MISS_WAIT;
use crate::keyring::{KeyringError, SharedKeyring};
use crate::proto::v1beta1::key_management_service_server::KeyManagementService;
use crate::proto::v1beta1::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, VersionRequest,
    VersionResponse,
};

/// The only KMS v1 API version there is.
pub(super) const V1_VERSION: &str = "v1beta1";
/// Reported as `runtime_name`.
pub(super) const RUNTIME_NAME: &str = "localkms";

/// The KMS v1 service over the shared keyring.
pub struct V1Service {
    keyring: SharedKeyring,
}

impl V1Service {
    /// Serves `keyring`.
    pub fn new(keyring: SharedKeyring) -> Self {
        V1Service { keyring }
    }
}

fn check_version(version: &str) -> Result<(), Status> {
    if version == V1_VERSION {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported KMS API version {:?}; this endpoint speaks {V1_VERSION}",
            version.chars().take(40).collect::<String>()
        )))
    }
}

#[tonic::async_trait]
impl KeyManagementService for V1Service {
    async fn version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let start = std::time::Instant::now();
        check_version(&request.into_inner().version).inspect_err(|s| {
            log_request("v1", "Version", "", "", s.code(), start);
        })?;
        log_request("v1", "Version", "", "", tonic::Code::Ok, start);
        Ok(Response::new(VersionResponse {
            version: V1_VERSION.to_owned(),
            runtime_name: RUNTIME_NAME.to_owned(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let start = std::time::Instant::now();
        let req = request.into_inner();
        let plain = Zeroizing::new(req.plain);
        let ring = self.keyring.load();
        let (cipher, key_id) = check_version(&req.version)
            .and_then(|()| ring.encrypt_for(&plain, Api::V1).map_err(to_status))
            .inspect_err(|s| log_request("v1", "Encrypt", "", "", s.code(), start))?;
        log_request("v1", "Encrypt", "", key_id.as_str(), tonic::Code::Ok, start);
        Ok(Response::new(EncryptResponse { cipher }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let start = std::time::Instant::now();
        let req = request.into_inner();
        check_version(&req.version)
            .inspect_err(|s| log_request("v1", "Decrypt", "", "", s.code(), start))?;
        let mut result = self.keyring.load().decrypt_v1(&req.cipher);
        if matches!(result, Err(KeyringError::UnknownKey(_)))
            && self.keyring.refresh().reload_and_wait(MISS_WAIT).await
        {
            result = self.keyring.load().decrypt_v1(&req.cipher);
        }
        let mut plain = result
            .map_err(to_status)
            .inspect_err(|s| log_request("v1", "Decrypt", "", "", s.code(), start))?;
        log_request("v1", "Decrypt", "", "", tonic::Code::Ok, start);
        Ok(Response::new(DecryptResponse {
            plain: std::mem::take(&mut *plain),
        }))
    }
}
