//! A rolling upgrade on one etcd keystore: the previous release (0.3.0, built from 64507fe by
//! `.ci/run build-prev` into `target/compat/`) and this build serve side by side, decrypt each
//! other's ciphertexts, rotate in two phases started from either binary, and the old node
//! restarts; `upgrade finalize` is refused while it is live or stopped, and once every node
//! runs this build it moves the keystore to this release's format, which the old binary then
//! refuses by name. This test follows the README's upgrade runbook.
//!
//! The old binary comes from `LOCALKMS_PREV_BIN` (`.ci/run` sets it, and
//! `LOCALKMS_REQUIRE_PREV=1`, so CI cannot skip this). Without either, the test uses
//! `target/compat/64507fe/target/release/localkms` if it exists, and otherwise says SKIPPED.
//! Build it with `bash .ci/build-prev`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::etcd::{etcd_available, ok, Etcd, Node};
use common::{decrypt, encrypt, status_key_id, Server};

fn prev_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOCALKMS_PREV_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "LOCALKMS_PREV_BIN={} is not a file: build it with `bash .ci/build-prev`",
            p.display()
        );
        return Some(p);
    }
    let default =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/compat/64507fe/target/release/localkms");
    if default.is_file() {
        return Some(default);
    }
    assert!(
        std::env::var_os("LOCALKMS_REQUIRE_PREV").is_none(),
        "LOCALKMS_REQUIRE_PREV is set but LOCALKMS_PREV_BIN is not: run `bash .ci/build-prev` and point LOCALKMS_PREV_BIN at what it prints"
    );
    eprintln!("SKIPPED: no previous-release binary (run `bash .ci/build-prev`, or set LOCALKMS_PREV_BIN); set LOCALKMS_REQUIRE_PREV=1 to make this a failure");
    None
}

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every ciphertext decrypts to its plaintext on every server.
async fn decrypt_all(sealed: &[(Vec<u8>, String, Vec<u8>)], servers: &[&Server]) {
    for s in servers {
        let ep = s.endpoint();
        for (ct, key_id, plain) in sealed {
            let got = decrypt(&ep, ct, key_id)
                .await
                .unwrap_or_else(|e| panic!("decrypt under {key_id} on {ep}: {e}"));
            assert_eq!(&got, plain, "plaintext under {key_id} on {ep}");
        }
    }
}

/// Each server encrypts one value and keeps it, with its plaintext.
async fn seal_on_each(sealed: &mut Vec<(Vec<u8>, String, Vec<u8>)>, servers: &[&Server]) {
    for s in servers {
        let plain = format!("secret {} via {}", sealed.len(), s.endpoint()).into_bytes();
        let (ct, key_id) = encrypt(&s.endpoint(), &plain).await;
        sealed.push((ct, key_id, plain));
    }
}

/// Waits until every server's Status names `key_id`.
async fn converge(servers: &[&Server], key_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in servers {
        while status_key_id(&s.endpoint()).await != key_id {
            assert!(
                Instant::now() < deadline,
                "{} never served {key_id}",
                s.endpoint()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until `upgrade status --json` lists `node` as live (or not).
fn wait_live(node: &Node, url: &str, name: &str, live: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = node.run(url, &["upgrade", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let now = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["node"] == name && n["live"] == true);
        if now == live {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {name} never became live={live}: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_from_the_previous_release_never_fails_a_decrypt() {
    if !etcd_available() {
        return;
    }
    let Some(old) = prev_bin() else { return };
    let etcd = Etcd::start(1);
    let url = etcd.url("rolling");
    let node = Node::new();
    // Short leases: a stopped node's record expires in seconds.
    let ttl = ["--node-ttl", "3s"];

    // The cluster as it was: set up with the previous release.
    ok(&node.run_bin(&old, &url, &["init"]));
    let mut a = node.serve_bin(&old, &url, "a", &ttl);
    // Runbook step: check the config with the new binary before restarting a node on it.
    ok(&node.run(
        &url,
        &[
            "serve",
            "--check-config",
            "--socket",
            node.socket("b").to_str().expect("utf8"),
            "--cache-dir",
            node.dir.path().join("cache-b").to_str().expect("utf8"),
        ],
    ));
    let b = node.serve(&url, "b", &ttl);
    wait_live(&node, &url, "a", true);
    wait_live(&node, &url, "b", true);

    let mut sealed = Vec::new();
    seal_on_each(&mut sealed, &[&a, &b]).await;
    decrypt_all(&sealed, &[&a, &b]).await;

    // Two-phase rotation started from the new binary converges on both nodes.
    let new_id = ok(&node.run(&url, &["keys", "rotate", "--timeout", "20s"]));
    converge(&[&a, &b], &new_id).await;
    seal_on_each(&mut sealed, &[&a, &b]).await;
    decrypt_all(&sealed, &[&a, &b]).await;

    // ...and one started from the old binary, which must verify the new node's record.
    let old_id = ok(&node.run_bin(&old, &url, &["keys", "rotate", "--timeout", "20s"]));
    assert_ne!(old_id, new_id);
    converge(&[&a, &b], &old_id).await;
    seal_on_each(&mut sealed, &[&a, &b]).await;
    decrypt_all(&sealed, &[&a, &b]).await;

    // Finalize is refused while the old node is live, naming it and its release.
    let refused = fails(&node.run(&url, &["upgrade", "finalize"]));
    assert!(
        refused.contains("node a") && refused.contains("0.3.0"),
        "{refused}"
    );

    // The old node restarts fine before finalize: everything written so far is its format.
    a.stop("TERM");
    a = node.serve_bin(&old, &url, "a", &ttl);
    decrypt_all(&sealed, &[&a, &b]).await;

    // A stopped old node is not finalized past, nor promoted past.
    a.stop("TERM");
    wait_live(&node, &url, "a", false);
    let refused = fails(&node.run(&url, &["upgrade", "finalize"]));
    assert!(
        refused.contains("node a") && refused.contains("nodes forget a"),
        "{refused}"
    );
    let refused = fails(&node.run(&url, &["keys", "rotate", "--timeout", "5s"]));
    assert!(
        refused.contains("node a") && refused.contains("nodes forget a"),
        "{refused}"
    );

    // Upgrade the old node: same name, same cache, the new binary.
    let a = node.serve(&url, "a", &ttl);
    decrypt_all(&sealed, &[&a, &b]).await;
    wait_live(&node, &url, "a", true);
    let status = ok(&node.run(&url, &["upgrade", "status"]));
    assert!(status.contains("NOT finalized"), "{status}");
    let done = ok(&node.run(&url, &["upgrade", "finalize"]));
    assert!(done.contains("format 3"), "{done}");

    // Both nodes load the finalized keystore and go on serving everything.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = node.run(&url, &["upgrade", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["finalized"], true);
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() == 2 && nodes.iter().all(|n| n["finalized"] == true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never loaded the finalize: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let id = ok(&node.run(&url, &["keys", "rotate", "--timeout", "20s"]));
    converge(&[&a, &b], &id).await;
    seal_on_each(&mut sealed, &[&a, &b]).await;
    decrypt_all(&sealed, &[&a, &b]).await;

    // A downgrade after finalize is refused at start, by name, rather than failing later.
    let (status, log) = common::run_to_exit(node.serve_command(&old, &url, "c", &ttl));
    assert!(
        !status.success(),
        "the old release served a finalized keystore: {log}"
    );
    assert!(log.contains("format version 3"), "{log}");

    // A live node cannot be forgotten.
    let refused = fails(&node.run(&url, &["nodes", "forget", "a"]));
    assert!(refused.contains("is live"), "{refused}");
    drop(etcd);
}
