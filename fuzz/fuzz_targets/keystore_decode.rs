//! The keystore parser on arbitrary bytes, under a fixed root key: errors only, never a panic
//! (including hostile Argon2 parameters in the header, which must be refused, not run).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localkms::keystore::file::decode_with;
use localkms::keystore::{KeystoreLocation, RootKeyProvider, RootKeySource};

fn provider() -> &'static RootKeyProvider {
    static P: OnceLock<(tempfile::TempDir, RootKeyProvider)> = OnceLock::new();
    &P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.key");
        let (p, _) = RootKeyProvider::open_or_create(&RootKeySource::KeyFile(path)).expect("root key");
        (dir, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    static AT: OnceLock<KeystoreLocation> = OnceLock::new();
    let at = AT.get_or_init(|| KeystoreLocation::file("fuzz".into()));
    let _ = decode_with(at, data, provider());
});
