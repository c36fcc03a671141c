//! `localkms check`: the round trip kube-apiserver makes, with the apiserver's own checks.

use super::{connect, ClientError, StatusReport};
use crate::crypto::fill_random;
use crate::proto::v2::key_management_service_client::KeyManagementServiceClient;
use crate::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use zeroize::Zeroizing;

/// The apiserver's limit on ciphertext and key_id length.
const APISERVER_MAX_LEN: usize = 1024;

/// What a successful check saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The Status answer.
    pub status: StatusReport,
    /// Length of the ciphertext for a 32-byte seed.
    pub ciphertext_len: usize,
}

/// Status → Encrypt(32 random bytes) → Decrypt, holding the plugin to what kube-apiserver
/// checks: healthz `ok`, a key_id of 1–1024 bytes, Encrypt's key_id equal to Status's, a
/// ciphertext of 1–1024 bytes, and the seed back unchanged.
pub async fn check(endpoint: &str) -> Result<CheckReport, ClientError> {
    let mut client = KeyManagementServiceClient::new(connect(endpoint).await?);
    let status = client
        .status(StatusRequest {})
        .await
        .map_err(|s| ClientError::first_call(endpoint, "Status", s))?
        .into_inner();
    if status.healthz != "ok" {
        return Err(ClientError::Contract(format!(
            "Status healthz is {:?}, not \"ok\"",
            status.healthz
        )));
    }
    if status.key_id.is_empty() || status.key_id.len() > APISERVER_MAX_LEN {
        return Err(ClientError::Contract(format!(
            "Status key_id must be 1..={APISERVER_MAX_LEN} bytes; it is {}",
            status.key_id.len()
        )));
    }
    let mut seed = Zeroizing::new(vec![0u8; 32]);
    fill_random(&mut seed).map_err(|e| ClientError::Contract(e.to_string()))?;
    let uid = format!("localkms-check-{}", std::process::id());
    let enc = client
        .encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: uid.clone(),
        })
        .await
        .map_err(|s| ClientError::rpc("Encrypt", s))?
        .into_inner();
    if enc.key_id != status.key_id {
        return Err(ClientError::Contract(format!(
            "Encrypt returned key_id {:?} but Status reported {:?}; the apiserver would discard this response",
            enc.key_id, status.key_id
        )));
    }
    if enc.ciphertext.is_empty() || enc.ciphertext.len() > APISERVER_MAX_LEN {
        return Err(ClientError::Contract(format!(
            "Encrypt ciphertext must be 1..={APISERVER_MAX_LEN} bytes; it is {}",
            enc.ciphertext.len()
        )));
    }
    if enc.ciphertext.windows(seed.len()).any(|w| w == &seed[..]) {
        return Err(ClientError::Contract(
            "Encrypt returned the seed in the clear inside the ciphertext".to_owned(),
        ));
    }
    let dec = client
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext.clone(),
            uid,
            key_id: enc.key_id.clone(),
            annotations: enc.annotations,
        })
        .await
        .map_err(|s| ClientError::rpc("Decrypt", s))?
        .into_inner();
    let plain = Zeroizing::new(dec.plaintext);
    if plain[..] != seed[..] {
        return Err(ClientError::Contract(
            "Decrypt did not return the seed that was encrypted".to_owned(),
        ));
    }
    Ok(CheckReport {
        status: StatusReport {
            version: status.version,
            healthz: status.healthz,
            key_id: status.key_id,
        },
        ciphertext_len: enc.ciphertext.len(),
    })
}
