//! The v2 Decrypt handler end to end (minus transport) on arbitrary ciphertext and key_id:
//! every input gets a status, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localkms::keyring::{Keyring, SharedKeyring};
use localkms::keystore::{Actor, Kdf, Keystore};
use localkms::proto::v2::key_management_service_server::KeyManagementService;
use localkms::proto::v2::DecryptRequest;
use localkms::server::{StatusVersion, V2Service};

struct World {
    rt: tokio::runtime::Runtime,
    service: V2Service,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let actor = Actor { user: "fuzz".into(), host: "fuzz".into() };
        let ks = Keystore::new_with_primary(time_now(), Kdf::KeyFile, &actor).expect("keystore");
        let ring = Keyring::from_keystore(ks, Default::default());
        World {
            rt: tokio::runtime::Builder::new_current_thread().build().expect("runtime"),
            service: V2Service::new(SharedKeyring::new(ring), StatusVersion::V2),
        }
    })
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many of the following bytes form the key_id; the rest is the ciphertext.
    let Some((&n, rest)) = data.split_first() else { return };
    let (key_id, ciphertext) = rest.split_at(usize::from(n).min(rest.len()));
    let w = world();
    let request = tonic::Request::new(DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        uid: "fuzz".into(),
        key_id: String::from_utf8_lossy(key_id).into_owned(),
        annotations: Default::default(),
    });
    let _ = w.rt.block_on(w.service.decrypt(request));
});
