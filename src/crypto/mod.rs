//! The only code in localkms that touches AES-GCM, HKDF, HMAC or the random number generator.
//!
//! Keeping every primitive behind this module means one place to audit for nonce handling,
//! key derivation and buffer hygiene; the rest of the crate sees sealed bytes and
//! [`SecretKey`]s only.

mod aead;
pub mod envelope;
mod key;
mod locked;
mod mac;
mod wipe_on_free;

pub use aead::{derive_key, open_in_place, seal_in_place, NONCE_LEN, TAG_LEN};
pub use key::{fill_random, SecretKey, KEY_LEN};
pub use locked::can_lock_keys;
pub use mac::MacKey;
pub use wipe_on_free::WipeOnFree;

/// A failure inside a primitive: the OS random source or the AEAD refused to work.
///
/// Kept separate from format errors so callers can tell "this input is bad" from "this
/// machine cannot do crypto right now".
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The OS CSPRNG did not deliver bytes; nothing can be sealed safely without it.
    #[error("the operating system's random number generator failed")]
    Random,
    /// Authentication failed: the bytes were altered or sealed under another key.
    #[error("authentication failed: the data was altered or sealed under a different key")]
    Authentication,
    /// HKDF refused the requested output (cannot happen for 32-byte keys, but is not unwrapped).
    #[error("key derivation failed")]
    Derivation,
}
