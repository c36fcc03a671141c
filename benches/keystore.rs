//! Keystore load: what a server pays at start and on every reload (file root key; a
//! passphrase adds one Argon2id run, cached across reloads).

use criterion::{criterion_group, criterion_main, Criterion};
use localkms::keystore::{self, Actor, Kdf, Keystore, RootKeyProvider, RootKeySource};
use time::OffsetDateTime;

fn load(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keystore.lkms");
    let root_path = dir.path().join("root.key");
    let (root, _) =
        RootKeyProvider::open_or_create(&RootKeySource::KeyFile(root_path)).expect("root");
    let actor = Actor::current();
    let mut ks =
        Keystore::new_with_primary(OffsetDateTime::now_utc(), Kdf::KeyFile, &actor).expect("new");
    // A keystore after a few years of quarterly rotation.
    for _ in 0..15 {
        ks.rotate(OffsetDateTime::now_utc(), &actor)
            .expect("rotate");
    }
    keystore::create(&path, &root, &ks).expect("create");
    c.bench_function("keystore load (16 KEKs)", |b| {
        b.iter(|| keystore::load(&path, &root).expect("load"))
    });
}

criterion_group!(benches, load);
criterion_main!(benches);
