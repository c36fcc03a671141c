//! The KMS v2 contract over a real socket: Status, Encrypt, Decrypt, and every error code.
//! The server runs in-process (`tests/support`): these tests need the RPC surface, not a
//! process.

mod support;

use localkms::keyring::Keyring;
use localkms::keystore::{Kdf, Keystore};
use localkms::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use time::OffsetDateTime;
use tonic::Code;

fn enc(plaintext: &[u8]) -> EncryptRequest {
    EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: "test-uid".into(),
    }
}

fn dec(ciphertext: &[u8], key_id: &str) -> DecryptRequest {
    DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        uid: "test-uid".into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_encrypt_decrypt_follow_the_apiserver_contract() {
    let server = support::InProcess::start().await;
    let mut c = server.client().await;

    let status = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.version, "v2");
    assert_eq!(status.healthz, "ok");
    assert!(status.key_id.starts_with("kek-"), "{}", status.key_id);
    assert!(!status.key_id.is_empty() && status.key_id.len() <= 1024);

    let seed = [0x42u8; 32];
    let a = c.encrypt(enc(&seed)).await.expect("encrypt").into_inner();
    let b = c.encrypt(enc(&seed)).await.expect("encrypt").into_inner();
    assert_eq!(
        a.key_id, status.key_id,
        "Encrypt key_id must equal Status key_id"
    );
    assert!(!a.ciphertext.is_empty() && a.ciphertext.len() <= 1024);
    assert_ne!(
        a.ciphertext, b.ciphertext,
        "same plaintext must give distinct ciphertexts"
    );
    assert!(a.annotations.is_empty());
    assert!(!a.ciphertext.windows(32).any(|w| w == seed));

    for ct in [&a, &b] {
        let out = c
            .decrypt(dec(&ct.ciphertext, &ct.key_id))
            .await
            .expect("decrypt")
            .into_inner();
        assert_eq!(out.plaintext, seed);
    }
}

/// Seals a ciphertext under a KEK that the server's keystore has never held.
fn foreign_ciphertext() -> (Vec<u8>, String) {
    let actor = localkms::keystore::Actor::current();
    let ks = Keystore::new_with_primary(OffsetDateTime::now_utc(), Kdf::KeyFile, &actor)
        .expect("keystore");
    let ring = Keyring::from_keystore(ks, Default::default());
    let (ct, id) = ring.encrypt(&[1u8; 32]).expect("encrypt");
    (ct, id.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_request_gets_the_right_code_and_the_server_keeps_serving() {
    let server = support::InProcess::start().await;
    let mut c = server.client().await;
    let seed = [0x17u8; 32];
    let good = c.encrypt(enc(&seed)).await.expect("encrypt").into_inner();
    let key_id = good.key_id.clone();
    let ct = good.ciphertext.clone();

    let mut tampered = ct.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let mut body_flip = ct.clone();
    body_flip[60] ^= 0x80;
    let mut wrong_version = ct.clone();
    wrong_version[0] = 9;
    let (foreign, foreign_id) = foreign_ciphertext();

    // (case, request, expected code, words the message must contain)
    let encrypt_cases: Vec<(&str, EncryptRequest, Code, &str)> = vec![
        (
            "empty plaintext",
            enc(&[]),
            Code::InvalidArgument,
            "plaintext is empty",
        ),
        (
            "oversized plaintext",
            enc(&[0u8; 1000]),
            Code::InvalidArgument,
            "at most",
        ),
    ];
    for (case, req, code, words) in encrypt_cases {
        let err = c.encrypt(req).await.expect_err(case);
        assert_eq!(err.code(), code, "{case}: {}", err.message());
        assert!(err.message().contains(words), "{case}: {}", err.message());
    }

    let decrypt_cases: Vec<(&str, DecryptRequest, Code, &str)> = vec![
        (
            "empty ciphertext",
            dec(&[], &key_id),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "garbage",
            dec(b"not a ciphertext at all", &key_id),
            Code::InvalidArgument,
            "version",
        ),
        (
            "truncated",
            dec(&ct[..40], &key_id),
            Code::InvalidArgument,
            "truncated",
        ),
        (
            "tampered tag",
            dec(&tampered, &key_id),
            Code::InvalidArgument,
            "authentication",
        ),
        (
            "tampered body",
            dec(&body_flip, &key_id),
            Code::InvalidArgument,
            "authentication",
        ),
        (
            "unknown version",
            dec(&wrong_version, &key_id),
            Code::InvalidArgument,
            "format version 9",
        ),
        (
            "oversized",
            dec(&[1u8; 2000], &key_id),
            Code::InvalidArgument,
            "at most 1024",
        ),
        (
            "key_id mismatch",
            dec(&ct, "kek-20000101-00000000"),
            Code::InvalidArgument,
            "does not match",
        ),
        (
            "empty key_id",
            dec(&ct, ""),
            Code::InvalidArgument,
            "key_id is empty",
        ),
        (
            "unknown KEK",
            dec(&foreign, &foreign_id),
            Code::NotFound,
            "not in this plugin's keystore",
        ),
    ];
    let seed_hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    for (case, req, code, words) in decrypt_cases {
        let err = c.decrypt(req).await.expect_err(case);
        assert_eq!(err.code(), code, "{case}: {}", err.message());
        assert!(err.message().contains(words), "{case}: {}", err.message());
        assert!(
            !err.message().contains(&seed_hex),
            "{case} leaked plaintext"
        );
        // Still serving after each refusal.
        let status = c
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.healthz, "ok", "after {case}");
    }

    // A fresh connection still works and the good ciphertext still opens.
    let mut fresh = server.client().await;
    let out = fresh
        .decrypt(dec(&ct, &key_id))
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(out.plaintext, seed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_round_trips_from_sixteen_tasks() {
    let server = support::InProcess::start().await;
    let channel = localkms::client::connect(&server.endpoint())
        .await
        .expect("connect");
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut c =
                localkms::proto::v2::key_management_service_client::KeyManagementServiceClient::new(
                    channel,
                );
            let mut ok = 0usize;
            for i in 0..63u16 {
                let mut seed = [t; 32];
                seed[..2].copy_from_slice(&i.to_be_bytes());
                let e = c.encrypt(enc(&seed)).await.expect("encrypt").into_inner();
                let d = c
                    .decrypt(dec(&e.ciphertext, &e.key_id))
                    .await
                    .expect("decrypt")
                    .into_inner();
                assert_eq!(d.plaintext, seed);
                ok += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    // 16 × 63 = 1008 round trips.
    assert!(total >= 1000, "{total}");
    server.stop().await.expect("clean stop");
}

/// A KMS v1 DEK ciphertext is not a KMS v2 seed, nor the other way round: the envelope binds
/// the API that sealed it, and each API refuses the other's with InvalidArgument, naming both.
#[tokio::test(flavor = "multi_thread")]
async fn v1_and_v2_ciphertexts_are_not_interchangeable() {
    use localkms::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
    use localkms::proto::v1beta1::{DecryptRequest as V1Decrypt, EncryptRequest as V1Encrypt};
    let server = support::InProcess::start().await;
    let mut v2 = server.client().await;
    let mut v1 = V1Client::new(
        localkms::client::connect(&server.endpoint())
            .await
            .expect("connect"),
    );
    let v1_ct = v1
        .encrypt(V1Encrypt {
            version: "v1beta1".into(),
            plain: vec![3u8; 32],
        })
        .await
        .expect("v1 encrypt")
        .into_inner()
        .cipher;
    let v2_ct = v2
        .encrypt(enc(&[4u8; 32]))
        .await
        .expect("v2 encrypt")
        .into_inner();

    let err = v2
        .decrypt(dec(&v1_ct, &v2_ct.key_id))
        .await
        .expect_err("a v1 DEK is not a v2 seed");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("KMS v1") && err.message().contains("KMS v2"),
        "{}",
        err.message()
    );
    let err = v1
        .decrypt(V1Decrypt {
            version: "v1beta1".into(),
            cipher: v2_ct.ciphertext.clone(),
        })
        .await
        .expect_err("a v2 seed is not a v1 DEK");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Each still opens through its own API.
    let plain = v1
        .decrypt(V1Decrypt {
            version: "v1beta1".into(),
            cipher: v1_ct,
        })
        .await
        .expect("v1 decrypt")
        .into_inner()
        .plain;
    assert_eq!(plain, vec![3u8; 32]);
    let out = v2
        .decrypt(dec(&v2_ct.ciphertext, &v2_ct.key_id))
        .await
        .expect("v2 decrypt")
        .into_inner();
    assert_eq!(out.plaintext, vec![4u8; 32]);
}
