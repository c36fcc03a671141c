//! Seal and open of a 32-byte DEK seed: the whole cost of Encrypt and Decrypt minus transport.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use localkms::crypto::envelope::{seal, Api, Envelope};
use localkms::crypto::SecretKey;
use localkms::key_id::KeyId;

fn envelope(c: &mut Criterion) {
    let kek = SecretKey::generate().expect("rng");
    let id = KeyId::parse("kek-20261126-3f2a9c1e").expect("id");
    let seed = [0x42u8; 32];
    let ct = seal(&kek, &id, &seed, Api::V2).expect("seal");
    c.bench_function("seal 32-byte seed", |b| {
        b.iter(|| seal(&kek, &id, black_box(&seed), Api::V2).expect("seal"))
    });
    c.bench_function("open 32-byte seed", |b| {
        b.iter(|| {
            let env = Envelope::parse(black_box(&ct)).expect("parse");
            env.open(&kek).expect("open")
        })
    });
}

criterion_group!(benches, envelope);
criterion_main!(benches);
