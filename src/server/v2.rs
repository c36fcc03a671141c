//! `v2.KeyManagementService`: the KMS v2 API kube-apiserver 1.27+ calls.

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::status::{log_request, to_status};
use crate::keyring::refresh::MISS_WAIT;
use crate::keyring::{KeyringError, SharedKeyring};
use crate::proto::v2::key_management_service_server::KeyManagementService;
use crate::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};

/// What Status reports as `version`; fixed for the life of the process, as the apiserver
/// requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StatusVersion {
    /// `v2`: Kubernetes 1.29 and later.
    #[default]
    V2,
    /// `v2beta1`: required by Kubernetes 1.27 and 1.28, accepted by later releases.
    V2beta1,
}

impl StatusVersion {
    /// The string sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusVersion::V2 => "v2",
            StatusVersion::V2beta1 => "v2beta1",
        }
    }
}

/// The KMS v2 service over the shared keyring.
pub struct V2Service {
    keyring: SharedKeyring,
    version: StatusVersion,
}

impl V2Service {
    /// Serves `keyring`, reporting `version` from Status.
    pub fn new(keyring: SharedKeyring, version: StatusVersion) -> Self {
        V2Service { keyring, version }
    }
}

#[tonic::async_trait]
impl KeyManagementService for V2Service {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let start = std::time::Instant::now();
        let ring = self.keyring.load();
        let healthz = ring.health();
        let key_id = ring
            .primary_id()
            .map(|id| id.to_string())
            .unwrap_or_default();
        log_request("v2", "Status", "", &key_id, tonic::Code::Ok, start);
        Ok(Response::new(StatusResponse {
            version: self.version.as_str().to_owned(),
            healthz: healthz.to_owned(),
            key_id,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let start = std::time::Instant::now();
        let req = request.into_inner();
        // Wiped when this handler returns, whatever the outcome.
        let plaintext = Zeroizing::new(req.plaintext);
        let ring = self.keyring.load();
        let (ciphertext, key_id) = ring.encrypt(&plaintext).map_err(|e| {
            let status = to_status(e);
            log_request("v2", "Encrypt", &req.uid, "", status.code(), start);
            status
        })?;
        log_request(
            "v2",
            "Encrypt",
            &req.uid,
            key_id.as_str(),
            tonic::Code::Ok,
            start,
        );
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id: key_id.to_string(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let start = std::time::Instant::now();
        let req = request.into_inner();
        let mut result = self.keyring.load().decrypt(&req.ciphertext, &req.key_id);
        if matches!(result, Err(KeyringError::UnknownKey(_)))
            && self.keyring.refresh().reload_and_wait(MISS_WAIT).await
        {
            // A key this node has not loaded yet (it missed a promote while frozen, say):
            // the answer comes from the keystore as it is now, not as it was.
            result = self.keyring.load().decrypt(&req.ciphertext, &req.key_id);
        }
        let mut plaintext = result.map_err(|e| {
            let status = to_status(e);
            log_request("v2", "Decrypt", &req.uid, &req.key_id, status.code(), start);
            status
        })?;
        log_request(
            "v2",
            "Decrypt",
            &req.uid,
            &req.key_id,
            tonic::Code::Ok,
            start,
        );
        // Moved, not copied, into the response; the transport owns it from here.
        Ok(Response::new(DecryptResponse {
            plaintext: std::mem::take(&mut *plaintext),
        }))
    }
}
