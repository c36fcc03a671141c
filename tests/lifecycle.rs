//! The key lifecycle end to end: every `keys` command against a running server, HA rotation
//! across two nodes, passphrases and root-key rotation, scheduled rotation, usage, history.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{bin, decrypt, encrypt, localkms, status_key_id, Server, Workspace};
use tonic::Code;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "command unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn list(ws: &Workspace) -> serde_json::Value {
    let out = ws.keys(&["list", "--json"]);
    serde_json::from_str(&ok(&out)).expect("json")
}

fn state_of(ws: &Workspace, id: &str) -> String {
    list(ws)["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id)
        .map(|k| k["state"].as_str().expect("state").to_owned())
        .expect("key listed")
}

async fn wait_for_key_id(endpoint: &str, want: &str) {
    let start = Instant::now();
    while status_key_id(endpoint).await != want {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{want} not reported within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries until the server reflects a keystore change (at most 2 s).
async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "server did not pick up the change within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_lifecycle_command_works_against_a_running_server() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let ep = server.endpoint();
    let first = status_key_id(&ep).await;
    let (ct_first, _) = encrypt(&ep, &[1u8; 32]).await;

    // Stage: decrypts, never encrypts.
    let staged = ok(&ws.keys(&["rotate", "--stage"]));
    assert_eq!(state_of(&ws, &staged), "staged");
    // Loaded (the reload is logged), yet not encrypting.
    server.wait_log("to=2");
    assert_eq!(
        status_key_id(&ep).await,
        first,
        "a staged key must not become current"
    );
    let (_, enc_id) = encrypt(&ep, &[2u8; 32]).await;
    assert_eq!(enc_id, first);

    // Promote.
    ok(&ws.keys(&["promote", &staged]));
    wait_for_key_id(&ep, &staged).await;
    assert_eq!(state_of(&ws, &first), "retired");
    assert_eq!(
        decrypt(&ep, &ct_first, &first)
            .await
            .expect("retired decrypts"),
        [1u8; 32]
    );

    // Disable the retired key: decrypt fails with FailedPrecondition, reversibly.
    ok(&ws.keys(&["disable", &first]));
    eventually(|| async { decrypt(&ep, &ct_first, &first).await.is_err() }).await;
    let e = decrypt(&ep, &ct_first, &first).await.expect_err("disabled");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("disabled") && e.message().contains("keys enable"),
        "{}",
        e.message()
    );
    ok(&ws.keys(&["enable", &first]));
    eventually(|| async { decrypt(&ep, &ct_first, &first).await.is_ok() }).await;
    assert_eq!(state_of(&ws, &first), "retired");

    // Refusals explain themselves.
    let m = err(&ws.keys(&["disable", &staged]));
    assert!(
        m.contains("primary") && m.contains("rotate or promote another key first"),
        "{m}"
    );
    let m = err(&ws.keys(&["destroy", &staged, "--force"]));
    assert!(m.contains("primary"), "{m}");
    let m = err(&ws.keys(&["promote", "kek-19700101-deadbeef"]));
    assert!(m.contains("keys list"), "{m}");
    let m = err(&ws.keys(&["enable", &staged]));
    assert!(m.contains("not disabled"), "{m}");

    // Destroy: refused while the usage file shows a recent decrypt, allowed with --force.
    assert_eq!(server.stop("TERM").code(), Some(0)); // flushes the usage file
    let usage = list(&ws);
    let first_entry = usage["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == first.as_str())
        .cloned()
        .expect("first");
    assert!(
        first_entry["decrypts"].as_u64().expect("decrypts") >= 2,
        "{first_entry}"
    );
    assert!(first_entry["last_decrypt_at"].is_string(), "{first_entry}");
    // Retired seconds ago: refused, whatever the usage says, and the refusal says how to
    // get the evidence it wants.
    let m = err(&ws.keys(&["destroy", &first]));
    assert!(
        m.contains("destroy refused")
            && m.contains("7d ")
            && m.contains("--force")
            && m.contains("keys disable"),
        "{m}"
    );
    let server = ws.serve();
    let ep = server.endpoint();
    ok(&ws.keys(&["destroy", &first, "--force"]));
    assert_eq!(state_of(&ws, &first), "destroyed");
    eventually(|| async {
        matches!(decrypt(&ep, &ct_first, &first).await, Err(e) if e.code() == Code::FailedPrecondition && e.message().contains("destroyed at"))
    })
    .await;
    let listed = list(&ws);
    let tomb = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == first.as_str())
        .cloned()
        .expect("tombstone");
    assert!(tomb["destroyed_at"].is_string());
    let m = err(&ws.keys(&["enable", &first]));
    assert!(m.contains("destroyed"), "{m}");

    // The audit trail has every step, with who and where; the server logged what it picked up.
    let out = ws.keys(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&ok(&out)).expect("json");
    let actions: Vec<&str> = h["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        ["init", "stage", "promote", "disable", "enable", "destroy"]
    );
    let entry = &h["history"][1];
    assert_eq!(entry["key_id"], staged.as_str());
    assert!(entry["user"].as_str().expect("user").contains("uid"));
    assert!(!entry["host"].as_str().expect("host").is_empty());
    assert!(
        server.log_text().contains("keystore change picked up"),
        "{}",
        server.log_text()
    );
    assert!(
        server.log_text().contains("action=destroy"),
        "{}",
        server.log_text()
    );
    let text = ok(&ws.keys(&["history"]));
    assert!(text.contains("promote") && text.contains(&staged));

    // keystore verify prints the generation and every id.
    let ks = ws.keystore_args();
    let out = localkms(&["keystore", "verify", &ks[0], &ks[1], &ks[2], &ks[3]]);
    let text = ok(&out);
    assert!(text.contains("generation: 6"), "{text}");
    assert!(text.contains(&first) && text.contains(&staged));
}

/// Copies a keystore the way a distribution script should: temp file, then rename.
fn distribute(from: &Path, to: &Path) {
    let tmp = to.with_extension("incoming");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

#[tokio::test(flavor = "multi_thread")]
async fn ha_rotation_across_two_nodes_never_fails_a_decrypt() {
    let node_a = Workspace::new();
    let node_b_dir = tempfile::tempdir().expect("tempdir");
    let ks_b = node_b_dir.path().join("keystore.lkms");
    let sock_b = node_b_dir.path().join("kms.sock");
    distribute(&node_a.keystore, &ks_b);
    let server_a = node_a.serve();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&sock_b)
        .arg("--keystore")
        .arg(&ks_b)
        .arg("--root-key-file")
        .arg(&node_a.root_key);
    let server_b = Server::spawn(cmd, sock_b.clone(), node_b_dir.path().join("b.log"));
    let (ep_a, ep_b) = (server_a.endpoint(), server_b.endpoint());
    let old = status_key_id(&ep_a).await;
    assert_eq!(status_key_id(&ep_b).await, old);

    // Background traffic: each node encrypts, the other decrypts, the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (ep_a, ep_b, stop) = (ep_a.clone(), ep_b.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok_count, mut failures) = (0u32, Vec::new());
            let mut i = 0u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (enc_ep, dec_ep) in [(&ep_a, &ep_b), (&ep_b, &ep_a)] {
                    i = i.wrapping_add(1);
                    let (ct, id) = encrypt(enc_ep, &[i; 32]).await;
                    match decrypt(dec_ep, &ct, &id).await {
                        Ok(p) if p == [i; 32] => ok_count += 1,
                        Ok(_) => failures.push(format!("{id}: wrong plaintext")),
                        Err(e) => failures.push(format!("{id}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok_count, failures)
        })
    };

    // Phase 1: stage on A and distribute to B; nobody encrypts with it yet.
    let new = ok(&node_a.keys(&["rotate", "--stage"]));
    distribute(&node_a.keystore, &ks_b);
    let out = localkms(&[
        "keystore",
        "verify",
        "--keystore",
        ks_b.to_str().expect("utf8"),
        "--root-key-file",
        node_a.root_key.to_str().expect("utf8"),
    ]);
    assert!(ok(&out).contains(&new), "B's copy must hold the staged key");
    // Both have loaded the staged key (each logs the reload), and neither encrypts with it.
    server_a.wait_log("to=2");
    server_b.wait_log("to=2");
    assert_eq!(status_key_id(&ep_a).await, old);
    assert_eq!(status_key_id(&ep_b).await, old);

    // Phase 2: promote on A, then distribute. A encrypts under the new key before B has the
    // promotion, and B can already decrypt it because it holds the staged key.
    ok(&node_a.keys(&["promote", &new]));
    wait_for_key_id(&ep_a, &new).await;
    let (ct, id) = encrypt(&ep_a, &[0xabu8; 32]).await;
    assert_eq!(id, new);
    assert_eq!(
        decrypt(&ep_b, &ct, &id)
            .await
            .expect("B decrypts A's new ciphertext"),
        [0xabu8; 32]
    );
    distribute(&node_a.keystore, &ks_b);
    wait_for_key_id(&ep_b, &new).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok_count, failures) = traffic.await.expect("traffic");
    assert!(
        failures.is_empty(),
        "failed decrypts during HA rotation: {failures:?}"
    );
    assert!(
        ok_count > 20,
        "too little traffic to prove anything: {ok_count}"
    );
}

fn passphrase_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn passphrase_keystores_and_root_key_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ks = dir.path().join("keystore.lkms");
    let pass = passphrase_file(dir.path(), "pass", "first passphrase, long enough\n");
    let ks_s = ks.to_str().expect("utf8");
    let pass_s = pass.to_str().expect("utf8");
    ok(&localkms(&[
        "init",
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass_s,
    ]));
    let before = ok(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass_s,
    ]));

    // The wrong kind of root key is refused with the fix.
    let stray_key = dir.path().join("stray.key");
    ok(&localkms(&[
        "init",
        "--keystore",
        dir.path().join("other.lkms").to_str().expect("utf8"),
        "--root-key-file",
        stray_key.to_str().expect("utf8"),
    ]));
    let m = err(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--root-key-file",
        stray_key.to_str().expect("utf8"),
    ]));
    assert!(m.contains("--passphrase-file"), "{m}");
    let wrong = passphrase_file(dir.path(), "wrong", "not the right passphrase\n");
    let m = err(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--passphrase-file",
        wrong.to_str().expect("utf8"),
    ]));
    assert!(m.contains("root key does not match"), "{m}");

    // Serve with the passphrase.
    let sock = dir.path().join("kms.sock");
    let mut cmd = Command::new(bin());
    cmd.args([
        "serve",
        "--socket",
        sock.to_str().expect("utf8"),
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass_s,
    ]);
    let server = Server::spawn(cmd, sock.clone(), dir.path().join("serve.log"));
    let ep = server.endpoint();
    let (ct, id) = encrypt(&ep, &[4u8; 32]).await;
    drop(server);

    // Rotate the root key to a new key file: the old passphrase stops working, KEKs stay.
    let new_key = dir.path().join("new-root.key");
    let new_key_s = new_key.to_str().expect("utf8");
    ok(&localkms(&[
        "root-key",
        "rotate",
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass_s,
        "--new-root-key-file",
        new_key_s,
    ]));
    assert!(new_key.exists());
    err(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass_s,
    ]));
    let after = ok(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--root-key-file",
        new_key_s,
    ]));
    assert_eq!(
        before.lines().nth(1),
        after.lines().nth(1),
        "KEKs must be unchanged"
    );
    let history = ok(&localkms(&[
        "keys",
        "history",
        "--keystore",
        ks_s,
        "--root-key-file",
        new_key_s,
    ]));
    assert!(history.contains("root-key-rotate"), "{history}");

    // And back to a passphrase; the old ciphertext still opens under the same KEK.
    let pass2 = passphrase_file(dir.path(), "pass2", "second passphrase, also long\n");
    ok(&localkms(&[
        "root-key",
        "rotate",
        "--keystore",
        ks_s,
        "--root-key-file",
        new_key_s,
        "--new-passphrase-file",
        pass2.to_str().expect("utf8"),
    ]));
    err(&localkms(&[
        "keys",
        "list",
        "--keystore",
        ks_s,
        "--root-key-file",
        new_key_s,
    ]));
    let mut cmd = Command::new(bin());
    cmd.args([
        "serve",
        "--socket",
        sock.to_str().expect("utf8"),
        "--keystore",
        ks_s,
        "--passphrase-file",
        pass2.to_str().expect("utf8"),
    ]);
    let server = Server::spawn(cmd, sock, dir.path().join("serve2.log"));
    assert_eq!(
        decrypt(&server.endpoint(), &ct, &id)
            .await
            .expect("decrypt"),
        [4u8; 32]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_rotation_rotates_the_primary() {
    let ws = Workspace::new();
    let server = ws.serve_with(&["--rotate-after", "2s"]);
    let ep = server.endpoint();
    let first = status_key_id(&ep).await;
    let (ct, _) = encrypt(&ep, &[6u8; 32]).await;
    let start = Instant::now();
    while status_key_id(&ep).await == first {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no scheduled rotation: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        decrypt(&ep, &ct, &first).await.expect("old still decrypts"),
        [6u8; 32]
    );
    assert!(server.log_text().contains("scheduled rotation"));
    let h = ok(&ws.keys(&["history"]));
    assert!(
        h.contains("scheduled-rotation") && h.contains("localkms serve"),
        "{h}"
    );
}
