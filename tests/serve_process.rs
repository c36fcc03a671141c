//! The server as a process: rotation under load, restarts, the socket file, signals, the CLI.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, decrypt, encrypt, localkms, status_key_id, Server, Workspace};

#[tokio::test(flavor = "multi_thread")]
async fn rotation_is_picked_up_within_two_seconds_and_old_ciphertexts_still_decrypt() {
    let ws = Workspace::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let old_id = status_key_id(&ep).await;
    let (old_ct, enc_id) = encrypt(&ep, &[1u8; 32]).await;
    assert_eq!(enc_id, old_id);

    let out = ws.keys(&["rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(new_id.starts_with("kek-") && new_id != old_id);
    let rotated_at = Instant::now();

    loop {
        if status_key_id(&ep).await == new_id {
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(15),
            "Status still reports {old_id} 15 s after rotation: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (new_ct, enc_id) = encrypt(&ep, &[2u8; 32]).await;
    assert_eq!(enc_id, new_id, "Encrypt must use the new primary");
    assert_eq!(
        decrypt(&ep, &old_ct, &old_id).await.expect("old"),
        [1u8; 32]
    );
    assert_eq!(
        decrypt(&ep, &new_ct, &new_id).await.expect("new"),
        [2u8; 32]
    );
    assert!(server.log_text().contains("keystore reloaded"));

    // keys list shows both, with the documented JSON shape.
    let out = ws.keys(&["list", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let keys = v["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["id"], old_id.as_str());
    assert_eq!(keys[0]["state"], "retired");
    assert_eq!(keys[1]["id"], new_id.as_str());
    assert_eq!(keys[1]["state"], "primary");
    assert!(time::OffsetDateTime::parse(
        keys[1]["created_at"].as_str().expect("string"),
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_keystore_on_reload_leaves_the_server_serving() {
    let ws = Workspace::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let id = status_key_id(&ep).await;
    let (ct, _) = encrypt(&ep, &[3u8; 32]).await;
    std::fs::write(&ws.keystore, b"this is not a keystore").expect("corrupt");
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("keystore reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_key_id(&ep).await, id);
    assert_eq!(decrypt(&ep, &ct, &id).await.expect("decrypt"), [3u8; 32]);
    let (_, enc_id) = encrypt(&ep, &[4u8; 32]).await;
    assert_eq!(enc_id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_survive_a_restart_and_sigterm_cleans_up() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let meta = std::fs::metadata(&ws.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600, "socket must be 0600");
    let ep = server.endpoint();
    let (ct, id) = encrypt(&ep, &[5u8; 32]).await;

    let status = server.stop("TERM");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0: {}",
        server.log_text()
    );
    assert!(
        !ws.socket.exists(),
        "socket file must be removed on SIGTERM"
    );

    let mut server = ws.serve();
    assert_eq!(status_key_id(&ep).await, id);
    assert_eq!(
        decrypt(&ep, &ct, &id).await.expect("decrypt after restart"),
        [5u8; 32]
    );
    let status = server.stop("INT");
    assert_eq!(status.code(), Some(0), "SIGINT must exit 0");
    assert!(!ws.socket.exists(), "socket file must be removed on SIGINT");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let ws = Workspace::new();
    {
        let _stale = std::os::unix::net::UnixListener::bind(&ws.socket).expect("bind");
    }
    assert!(ws.socket.exists(), "stale socket file left behind");
    let server = ws.serve();
    assert!(
        server.log_text().contains("stale socket"),
        "{}",
        server.log_text()
    );

    let mut second = Command::new(bin());
    second
        .arg("serve")
        .arg("--socket")
        .arg(&ws.socket)
        .args(ws.keystore_args());
    let out = second.output().expect("second server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first server is unharmed.
    assert!(common::blocking_status_ok(&ws.socket));
}

#[test]
fn flags_come_from_localkms_environment_variables() {
    let ws = Workspace::new();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .env("LOCALKMS_SOCKET", format!("unix://{}", ws.socket.display()))
        .env("LOCALKMS_KEYSTORE", &ws.keystore)
        .env("LOCALKMS_ROOT_KEY_FILE", &ws.root_key);
    let log = ws.dir.path().join("env.log");
    let _server = Server::spawn(cmd, ws.socket.clone(), log);
    let out = Command::new(bin())
        .arg("check")
        .env("LOCALKMS_SOCKET", &ws.socket)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_and_check_commands() {
    let ws = Workspace::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let out = localkms(&["status", "--socket", &ep, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["version"], "v2");
    assert_eq!(v["healthz"], "ok");
    assert!(v["key_id"].as_str().expect("key_id").starts_with("kek-"));

    let out = localkms(&["status", "--socket", &ep]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("healthz: ok"));

    let out = localkms(&["check", "--socket", &ep]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));

    // Against nothing, check fails with a useful message and a non-zero exit.
    let missing = ws.dir.path().join("nothing.sock");
    let out = localkms(&["check", "--socket", missing.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("nothing.sock"),
        "{err}"
    );
}

#[test]
fn status_version_v2beta1_is_reported() {
    let ws = Workspace::new();
    let server = ws.serve_with(&["--status-version", "v2beta1"]);
    let out = localkms(&["status", "--socket", &server.endpoint(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["version"], "v2beta1");
}

#[test]
fn serve_dev_creates_a_labelled_development_keystore() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let socket = cwd.path().join("localkms-dev").join("kms.sock");
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd.path()).args(["serve", "--dev"]);
    let log = cwd.path().join("dev.log");
    let stdout = cwd.path().join("enc.yaml");
    let mut server = Server::spawn_with_stdout(cmd, socket.clone(), log, &stdout);
    let text = server.log_text();
    assert!(text.contains("NOT FOR PRODUCTION"), "{text}");
    // `serve --dev > enc.yaml` captures exactly the EncryptionConfiguration.
    let config = std::fs::read_to_string(&stdout).expect("stdout");
    assert!(
        config.starts_with("apiVersion: apiserver.config.k8s.io/v1")
            && config.contains(&format!(
                "endpoint: unix://{}",
                socket.canonicalize().expect("socket").display()
            ))
            && config.contains("resources: [secrets, configmaps]")
            && !config.contains("NOT FOR PRODUCTION"),
        "{config}"
    );
    assert!(!text.contains("kind: EncryptionConfiguration"), "{text}");
    let dev = cwd.path().join("localkms-dev");
    assert_eq!(std::fs::metadata(&dev).expect("dir").mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(dev.join("root.key")).expect("key").mode() & 0o777,
        0o600
    );
    let out = localkms(&["check", "--socket", socket.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(server.stop("TERM").code(), Some(0));

    // A second run reuses the same keys.
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd.path()).args(["serve", "--dev"]);
    let mut server = Server::spawn(cmd, socket.clone(), cwd.path().join("dev2.log"));
    assert!(server.log_text().contains("reusing keystore"));
    let out = localkms(&["check", "--socket", socket.to_str().expect("utf8")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), id);
    assert_eq!(server.stop("TERM").code(), Some(0));

    // With --socket, the printed configuration points at that socket, not the default one.
    let other = cwd.path().join("elsewhere.sock");
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd.path())
        .args(["serve", "--dev", "--socket"])
        .arg(&other);
    let stdout = cwd.path().join("enc2.yaml");
    let _server =
        Server::spawn_with_stdout(cmd, other.clone(), cwd.path().join("dev3.log"), &stdout);
    let config = std::fs::read_to_string(&stdout).expect("stdout");
    assert!(
        config.contains(&format!("endpoint: unix://{}", other.display())),
        "{config}"
    );
}

#[test]
fn cli_errors_name_the_file_and_the_fix() {
    let ws = Workspace::new();
    let ks = ws.keystore.to_str().expect("utf8");
    let rk = ws.root_key.to_str().expect("utf8");

    let out = localkms(&["init", "--keystore", ks, "--root-key-file", rk]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists") && err.contains(ks), "{err}");

    let other_key = ws.dir.path().join("other.key");
    std::fs::write(&other_key, [9u8; 32]).expect("write");
    std::fs::set_permissions(
        &other_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let out = localkms(&[
        "keys",
        "list",
        "--keystore",
        ks,
        "--root-key-file",
        other_key.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root key does not match") && err.contains(ks),
        "{err}"
    );

    let missing = ws.dir.path().join("missing.lkms");
    let out = localkms(&[
        "keys",
        "list",
        "--keystore",
        missing.to_str().expect("utf8"),
        "--root-key-file",
        rk,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("localkms init"),
        "{err}"
    );

    std::fs::set_permissions(
        &ws.root_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let out = localkms(&["keys", "list", "--keystore", ks, "--root-key-file", rk]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600") && err.contains(rk), "{err}");

    let out = localkms(&[
        "serve",
        "--socket",
        "tcp://127.0.0.1:1",
        "--keystore",
        ks,
        "--root-key-file",
        rk,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unix:///"));
}

#[test]
fn sigterm_lets_an_in_flight_call_finish_before_exiting() {
    use localkms::proto::v2::{EncryptRequest, EncryptResponse};
    use prost::Message;
    let ws = Workspace::new();
    let mut server = ws.serve();
    // A call whose headers have arrived but whose body has not: in flight.
    let call = common::raw_h2::RawCall::start(
        &ws.socket,
        Some(b"localhost"),
        "/v2.KeyManagementService/Encrypt",
    );
    std::thread::sleep(Duration::from_millis(200));
    server.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "the server must wait for the in-flight call: {}",
        server.log_text()
    );
    // ...while accepting nothing new.
    assert!(
        std::os::unix::net::UnixStream::connect(&ws.socket).is_err(),
        "a draining server must not accept new connections"
    );
    let request = EncryptRequest {
        plaintext: vec![7u8; 32],
        uid: "in-flight".into(),
    };
    let reply = call.finish(&request.encode_to_vec());
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    let response = EncryptResponse::decode(&reply.body[5..]).expect("EncryptResponse");
    assert!(response.key_id.starts_with("kek-"));
    let status = common::wait_with_timeout(&mut server.child, Duration::from_secs(12));
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    assert!(!ws.socket.exists());
    assert!(server.log_text().contains("shutting down"));
}

#[test]
fn idle_connections_are_closed_and_clients_reconnect() {
    use std::io::Read;
    let ws = Workspace::new();
    let server = ws.serve_with(&["--idle-timeout", "1s"]);
    // A raw connection that made one call and then went quiet is closed by the server.
    let call = common::raw_h2::RawCall::start(&ws.socket, None, "/v2.KeyManagementService/Status");
    let (reply, mut stream) = call.finish_keep(&[]);
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                start.elapsed() < Duration::from_secs(15),
                "connection never closed"
            ),
        }
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    // A gRPC client simply reconnects.
    let out = localkms(&["check", "--socket", &server.endpoint()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
