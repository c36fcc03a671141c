//! Compatibility: every `:authority` form real clients send, KMS v1, abstract sockets, a
//! non-Rust gRPC client, and a test that plays kube-apiserver's part with its own checks.

mod common;
mod support;

use std::process::Command;
use std::time::Duration;

use common::{bin, client, Server, Workspace};
use localkms::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use localkms::proto::v2::StatusResponse;
use prost::Message;

use common::raw_h2::raw_call;

#[tokio::test(flavor = "multi_thread")]
async fn every_authority_form_is_answered() {
    let server = support::InProcess::start().await;
    let socket = server.socket.clone();
    // The raw HTTP/2 client blocks: off the runtime the server runs on.
    tokio::task::spawn_blocking(move || authority_forms(&socket))
        .await
        .expect("authority forms");
}

fn authority_forms(socket: &std::path::Path) {
    let path_authority = socket.display().to_string();
    let percent: String = path_authority.replace('/', "%2F");
    let forms: Vec<(&str, Option<&[u8]>)> = vec![
        ("socket path", Some(path_authority.as_bytes())),
        (
            "kube-apiserver style path",
            Some(b"/var/run/localkms/kms.sock"),
        ),
        ("percent-encoded path", Some(percent.as_bytes())),
        ("empty", Some(b"")),
        ("localhost", Some(b"localhost")),
        ("absent", None),
    ];
    for (name, authority) in forms {
        let reply = raw_call(socket, authority, "/v2.KeyManagementService/Status", &[]);
        assert!(!reply.reset, "{name}: stream was reset: {reply:?}");
        assert_eq!(reply.status.as_deref(), Some("200"), "{name}: {reply:?}");
        assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{name}: {reply:?}");
        assert!(reply.body.len() >= 5, "{name}: no message");
        let status = StatusResponse::decode(&reply.body[5..]).expect("StatusResponse");
        assert_eq!(status.healthz, "ok", "{name}");
        assert!(status.key_id.starts_with("kek-"), "{name}");
    }
    // KMS v1 behind a path authority too.
    let version = localkms::proto::v1beta1::VersionRequest {
        version: "v1beta1".into(),
    };
    let reply = raw_call(
        socket,
        Some(path_authority.as_bytes()),
        "/v1beta1.KeyManagementService/Version",
        &version.encode_to_vec(),
    );
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
}

/// python3 with grpcio: the system one if it has grpcio, else a private venv.
fn python_with_grpcio() -> String {
    let has = Command::new("python3")
        .args(["-c", "import grpc"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if has {
        return "python3".into();
    }
    common::python_venv_with(&["grpcio"])
        .join("python3")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_with_its_default_unix_channel_works() {
    let server = support::InProcess::start().await;
    let endpoint = server.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        let py = python_with_grpcio();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpcio_client.py");
        Command::new(py)
            .arg(script)
            .arg(endpoint)
            .output()
            .expect("run python")
    })
    .await
    .expect("python");
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["version"], "v2");
    assert_eq!(v["healthz"], "ok");
    assert_eq!(v["encrypt_key_id"], v["key_id"]);
    assert_eq!(v["round_trip"], true);
    assert_eq!(v["v1_version"], "v1beta1");
    assert_eq!(v["v1_runtime_name"], "localkms");
    assert_eq!(v["v1_round_trip"], true);
    assert_eq!(v["bad_decrypt_code"], "INVALID_ARGUMENT");
}

#[tokio::test(flavor = "multi_thread")]
async fn kms_v1_shares_keys_with_v2_and_survives_rotation() {
    use localkms::proto::v1beta1::{DecryptRequest, EncryptRequest, VersionRequest};
    let ws = Workspace::new();
    let server = ws.serve();
    let channel = localkms::client::connect(&server.endpoint())
        .await
        .expect("connect");
    let mut v1 = V1Client::new(channel);
    let version = v1
        .version(VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    assert_eq!(version.version, "v1beta1");
    assert_eq!(version.runtime_name, "localkms");
    assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));

    let dek = [0x33u8; 32];
    let cipher = v1
        .encrypt(EncryptRequest {
            version: "v1beta1".into(),
            plain: dek.to_vec(),
        })
        .await
        .expect("encrypt")
        .into_inner()
        .cipher;
    assert!(!cipher.is_empty() && cipher.len() <= 1024);

    // Rotate; the v1 ciphertext still opens.
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success());
    let new_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut v2 = client(&server.endpoint()).await.expect("v2");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while v2
        .status(localkms::proto::v2::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .key_id
        != new_id
    {
        assert!(
            std::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plain = v1
        .decrypt(DecryptRequest {
            version: "v1beta1".into(),
            cipher: cipher.clone(),
        })
        .await
        .expect("decrypt after rotation")
        .into_inner()
        .plain;
    assert_eq!(plain, dek);

    // Wrong versions are refused.
    for bad in ["", "v2", "v1"] {
        let err = v1
            .version(VersionRequest {
                version: bad.into(),
            })
            .await
            .expect_err("bad version");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        let err = v1
            .decrypt(DecryptRequest {
                version: bad.into(),
                cipher: cipher.clone(),
            })
            .await
            .expect_err("bad version");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("v1beta1"), "{}", err.message());
        let err = v1
            .encrypt(EncryptRequest {
                version: bad.into(),
                plain: dek.to_vec(),
            })
            .await
            .expect_err("bad version");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
    // v1 garbage gets the same codes as v2.
    let err = v1
        .decrypt(DecryptRequest {
            version: "v1beta1".into(),
            cipher: b"junk".to_vec(),
        })
        .await
        .expect_err("junk");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn abstract_sockets_work_end_to_end() {
    let ws = Workspace::new();
    let name = format!("localkms-e2e-{}", std::process::id());
    let endpoint = format!("unix:///@{name}");
    // Any process in the network namespace can reach an abstract socket: without an allow
    // list it is refused, as a world-writable socket file is, naming the fixes.
    let out = common::localkms(&[
        "serve",
        "--socket",
        &endpoint,
        "--keystore",
        ws.keystore.to_str().expect("utf8"),
        "--root-key-file",
        ws.root_key.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("abstract socket")
            && err.contains("--allow-uid")
            && err.contains("--allow-world"),
        "{err}"
    );
    let long = format!("@{}", "n".repeat(108));
    let out = common::localkms(&["status", "--socket", &long]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at most 107") && err.contains("108 bytes"),
        "{err}"
    );
    let uid = rustix::process::getuid().as_raw().to_string();
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--socket", &endpoint, "--allow-uid", &uid])
        .args(ws.keystore_args());
    let log = ws.dir.path().join("abstract.log");
    let mut child = cmd
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = common::localkms(&["check", "--socket", &format!("@{name}")]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "abstract server not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // No file was created, and a second server on the same name is refused.
    assert!(!std::path::Path::new(&format!("/@{name}")).exists());
    let out = common::localkms(&[
        "serve",
        "--socket",
        &endpoint,
        "--allow-uid",
        &uid,
        "--keystore",
        ws.keystore.to_str().expect("utf8"),
        "--root-key-file",
        ws.root_key.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("only these peers may call"), "{text}");
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    let status = common::wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// Plays kube-apiserver's part: the checks it applies to every response, a DEK seed per
/// Encrypt, Decrypt with the stored key_id and annotations, and its annotation rules.
#[tokio::test(flavor = "multi_thread")]
async fn the_apiserver_checks_hold() {
    use localkms::proto::v1beta1::EncryptRequest as V1Encrypt;
    use localkms::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
    let server = support::InProcess::start_with(
        localkms::server::StatusVersion::V2beta1,
        localkms::server::Limits::default(),
    )
    .await;
    let mut c = server.client().await;

    let mut versions = std::collections::HashSet::new();
    for _ in 0..3 {
        let status = c
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.healthz, "ok");
        assert!(!status.key_id.is_empty() && status.key_id.len() <= 1024);
        versions.insert(status.version);
    }
    assert_eq!(
        versions.len(),
        1,
        "the version must never change while the server runs"
    );
    assert!(versions.contains("v2beta1"));
    let status_key_id = c
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .key_id;

    let mut stored = Vec::new();
    for i in 0..8u8 {
        let seed = [i; 32];
        let r = c
            .encrypt(EncryptRequest {
                plaintext: seed.to_vec(),
                uid: format!("uid-{i}"),
            })
            .await
            .expect("encrypt")
            .into_inner();
        assert_eq!(
            r.key_id, status_key_id,
            "Encrypt key_id must equal Status key_id"
        );
        assert!(!r.ciphertext.is_empty() && r.ciphertext.len() <= 1024);
        let total: usize = r.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= 32 * 1024);
        for key in r.annotations.keys() {
            let labels: Vec<&str> = key.split('.').collect();
            assert!(
                labels.len() >= 2 && labels.iter().all(|l| !l.is_empty()),
                "annotation key {key} is not an FQDN"
            );
        }
        stored.push((seed, r));
    }
    // Distinct plaintexts give distinct ciphertexts.
    let distinct: std::collections::HashSet<_> =
        stored.iter().map(|(_, r)| r.ciphertext.clone()).collect();
    assert_eq!(distinct.len(), stored.len());
    for (seed, r) in stored {
        let out = c
            .decrypt(DecryptRequest {
                ciphertext: r.ciphertext,
                uid: "read".into(),
                key_id: r.key_id,
                annotations: r.annotations,
            })
            .await
            .expect("decrypt")
            .into_inner();
        assert_eq!(out.plaintext, seed);
    }
    // KMS v1: a 32-byte DEK per write.
    let channel = localkms::client::connect(&server.endpoint())
        .await
        .expect("connect");
    let mut v1 = V1Client::new(channel);
    let cipher = v1
        .encrypt(V1Encrypt {
            version: "v1beta1".into(),
            plain: vec![9u8; 32],
        })
        .await
        .expect("v1 encrypt")
        .into_inner()
        .cipher;
    assert!(!cipher.is_empty() && cipher.len() <= 1024);
}

#[allow(dead_code)]
fn _uses(_: Server) {}

/// A connection whose first request has a valid authority is passed through untouched; if
/// the same connection later sends a socket-path authority, only that request fails (the
/// HTTP/2 layer resets it, as it would with no shim), the first is answered, and the server
/// goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_invalid_authority_on_a_passed_through_connection_fails_alone() {
    let server = support::InProcess::start().await;
    let socket = server.socket.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        use common::raw_h2::{frame, PREFACE};
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut enc = loona_hpack::Encoder::new();
        let block = |enc: &mut loona_hpack::Encoder<'_>, authority: &[u8]| {
            enc.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/v2.KeyManagementService/Status"),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ])
        };
        let empty_message = [0u8, 0, 0, 0, 0];
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x4, 1, &block(&mut enc, b"localhost")));
        out.extend(frame(0x0, 0x1, 1, &empty_message));
        out.extend(frame(0x1, 0x4, 3, &block(&mut enc, b"/var/run/kms.sock")));
        out.extend(frame(0x0, 0x1, 3, &empty_message));
        s.write_all(&out).expect("write");
        // Read until stream 1 has its trailers and stream 3 is settled (reset, refused, or
        // the connection closed).
        let (mut one_ok, mut three_ok, mut three_failed) = (false, false, false);
        let mut dec = loona_hpack::Decoder::new();
        common::raw_h2::read_frames(&mut s, |kind, flags, stream, payload| {
            match (kind, stream) {
                (0x1, 1 | 3) if flags & 1 != 0 => {
                    let headers = dec.decode(payload).expect("hpack");
                    let ok = headers
                        .iter()
                        .any(|(n, v)| n == b"grpc-status" && v == b"0");
                    if stream == 1 {
                        one_ok = ok;
                    } else {
                        three_ok = ok;
                        three_failed = !ok;
                    }
                }
                (0x1, _) => {
                    dec.decode(payload).expect("hpack");
                }
                (0x3, 3) | (0x7, _) => three_failed = true,
                _ => {}
            }
            one_ok && (three_ok || three_failed)
        });
        // A connection closed before stream 3 was answered failed it too.
        let three_failed = three_failed || !three_ok;
        (one_ok, three_failed)
    })
    .await
    .expect("raw client");
    assert_eq!(outcome, (true, true));
    // The server is unharmed.
    let mut c = client(&server.endpoint()).await.expect("connect");
    c.status(localkms::proto::v2::StatusRequest {})
        .await
        .expect("status after the bad request");
}
