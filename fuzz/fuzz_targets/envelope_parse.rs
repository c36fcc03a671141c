//! The ciphertext parser and opener on arbitrary bytes: errors only, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use localkms::crypto::envelope::Envelope;
use localkms::crypto::SecretKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        let kek = SecretKey::from_slice(&[7u8; 32]).expect("32 bytes");
        // Forging a valid tag by chance is not a finding; a panic is.
        let _ = env.open(&kek);
    }
});
