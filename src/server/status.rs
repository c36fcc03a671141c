//! Mapping keyring errors to the gRPC status codes the design promises.

use tonic::{Code, Status};

use crate::crypto::envelope::EnvelopeError;
use crate::keyring::KeyringError;

/// The gRPC code for each refusal: malformed input is `InvalidArgument`, an unknown KEK
/// `NotFound`, a disabled or destroyed KEK `FailedPrecondition`, no usable keyring
/// `Unavailable`. The message is the error's own text, which never holds key material.
pub fn code_for(err: &KeyringError) -> Code {
    match err {
        KeyringError::Envelope(EnvelopeError::Crypto(_)) => Code::Internal,
        KeyringError::Envelope(_)
        | KeyringError::KeyIdMismatch { .. }
        | KeyringError::MissingKeyId => Code::InvalidArgument,
        KeyringError::UnknownKey(_) => Code::NotFound,
        KeyringError::Disabled(_) | KeyringError::Destroyed { .. } => Code::FailedPrecondition,
        KeyringError::NoPrimary => Code::Unavailable,
    }
}

/// Converts a keyring error into the status sent to the client.
pub fn to_status(err: KeyringError) -> Status {
    Status::new(code_for(&err), err.to_string())
}

/// The per-request debug line: uid, method, key id, code and latency; never key material or
/// plaintext.
pub fn log_request(
    api: &'static str,
    method: &'static str,
    uid: &str,
    key_id: &str,
    code: Code,
    start: std::time::Instant,
) {
    tracing::debug!(
        api,
        method,
        uid = %uid.chars().take(128).collect::<String>(),
        key_id = %key_id.chars().take(80).collect::<String>(),
        code = crate::telemetry::metrics::code_name(code),
        latency_us = start.elapsed().as_micros() as u64,
        "request"
    );
}
