//! The ciphertext parser and opener on arbitrary bytes: errors only, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localkms::crypto::envelope::Envelope;
use localkms::crypto::SecretKey;

fn kek() -> &'static SecretKey {
    static K: OnceLock<SecretKey> = OnceLock::new();
    K.get_or_init(|| SecretKey::from_slice(&[7u8; 32]).expect("32 bytes"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        // Forging a valid tag by chance is not a finding; a panic is.
        let _ = env.open(kek());
    }
});
