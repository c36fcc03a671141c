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
        KeyringError::Disabled(_)
        | KeyringError::Destroyed { .. }
        | KeyringError::LegacyRefused => Code::FailedPrecondition,
        KeyringError::NoPrimary => Code::Unavailable,
    }
}

/// Converts a keyring error into the status sent to the client.
pub(super) fn to_status(err: KeyringError) -> Status {
    Status::new(code_for(&err), err.to_string())
}

/// The per-request debug line: uid, method, key id, code and latency; never key material or
/// plaintext.
pub(super) fn log_request(
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
        uid = %printable(uid, 128),
        key_id = %printable(key_id, 80),
        code = crate::telemetry::metrics::code_name(code),
        latency_us = start.elapsed().as_micros() as u64,
        "request"
    );
}

/// A caller-supplied string made safe for a log line: at most `max` characters, with control
/// characters (newlines, ANSI escapes) and quotes escaped, so a caller cannot forge lines or
/// recolour a terminal.
pub(super) fn printable(s: &str, max: usize) -> String {
    s.chars().take(max).flat_map(char::escape_debug).collect()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        let forged = "abc\n2026-11-27T00:00:00Z  INFO fake line \u{1b}[31mred";
        let out = printable(forged, 128);
        assert!(!out.contains('\n') && !out.contains('\u{1b}'), "{out}");
        assert!(out.contains("\\n") && out.contains("\\u{1b}"), "{out}");
        assert_eq!(printable("uid-1234", 128), "uid-1234");
        assert_eq!(printable(&"x".repeat(500), 128).len(), 128);
    }
}
