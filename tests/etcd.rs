//! The etcd keystore backend against a real etcd: shared keystores across servers, two-phase
//! rotation with zero failed decrypts, compare-and-swap under concurrent writers, serving from
//! the cache while etcd is down, lease expiry of vanished nodes, copying, and quorum loss.
//!
//! Needs the `etcd` binary (Debian: `apt-get install etcd-server`; `.ci/run` installs it). When
//! it is missing these tests say so and pass, unless LOCALKMS_REQUIRE_ETCD is set (CI sets it),
//! in which case they fail.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::*;
use common::{bin, client, free_port, localkms, status_key_id, Server};
use localkms::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};

/// Held by the heavy tests (several etcd members, or several servers): run side by side on a
/// loaded 2-core machine, their elections and leases time out; one at a time they do not.
/// (A tokio mutex: async tests hold it across awaits.)
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each server encrypts and the next one decrypts, until stopped; returns (successes, failures).
fn cross_traffic(
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut good, mut bad) = (0u32, Vec::new());
        let mut i = 0u8;
        while !stop.load(Ordering::Relaxed) {
            for k in 0..endpoints.len() {
                i = i.wrapping_add(1);
                let (enc, dec) = (&endpoints[k], &endpoints[(k + 1) % endpoints.len()]);
                let r = client(enc)
                    .await
                    .expect("connect")
                    .encrypt(EncryptRequest {
                        plaintext: vec![i; 32],
                        uid: "x".into(),
                    })
                    .await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        bad.push(format!("encrypt on {enc}: {e}"));
                        continue;
                    }
                };
                match client(dec)
                    .await
                    .expect("connect")
                    .decrypt(DecryptRequest {
                        ciphertext: r.ciphertext,
                        uid: "x".into(),
                        key_id: r.key_id.clone(),
                        annotations: Default::default(),
                    })
                    .await
                {
                    Ok(d) if d.get_ref().plaintext == vec![i; 32] => good += 1,
                    Ok(_) => bad.push("wrong plaintext".into()),
                    Err(e) => bad.push(format!("decrypt of {} on {dec}: {e}", r.key_id)),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (good, bad)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn three_servers_share_one_keystore_and_rotate_without_a_failed_decrypt() {
    if !etcd_available() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let (_etcd, url, node) = initialised("cluster-a");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let servers = [
        node.serve(&url, "a", &["--metrics-addr", &metrics]),
        node.serve(&url, "b", &[]),
        node.serve(&url, "c", &[]),
    ];
    let eps: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let first = status_key_id(&eps[0]).await;
    for ep in &eps {
        assert_eq!(status_key_id(ep).await, first);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = cross_traffic(eps.clone(), stop.clone());
    let mut ids = vec![first];
    for _ in 0..2 {
        let start = Instant::now();
        let id = ok(&node.run(&url, &["keys", "rotate", "--timeout", "20s"]));
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "two-phase rotation took {:?}",
            start.elapsed()
        );
        for ep in &eps {
            let t = Instant::now();
            while status_key_id(ep).await != id {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "{ep} did not pick up {id} within 15 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (good, bad) = traffic.await.expect("traffic");
    assert!(bad.is_empty(), "failed requests during rotation: {bad:?}");
    assert!(good > 30, "too little traffic: {good}");

    // Every node reports the final generation (each publishes within half a second of a
    // reload); the keystore's history shows stage → promote.
    let t = Instant::now();
    loop {
        let nodes: serde_json::Value =
            serde_json::from_str(&ok(&node.run(&url, &["nodes", "--json"]))).expect("json");
        let list = nodes["nodes"].as_array().expect("nodes");
        assert_eq!(list.len(), 3, "{nodes}");
        if list.iter().all(|n| n["current"] == true) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nodes did not converge: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let history = ok(&node.run(&url, &["keys", "history"]));
    assert!(
        history.contains("stage") && history.contains("promote"),
        "{history}"
    );
    // Usage is summed over the nodes.
    let keys: serde_json::Value =
        serde_json::from_str(&ok(&node.run(&url, &["keys", "list", "--json"]))).expect("json");
    let total: u64 = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["decrypts"].as_u64().unwrap_or(0))
        .sum();
    let _ = total; // written at most once a minute; presence of the field is what matters here
    assert!(keys["keys"][0].get("decrypts").is_some());

    // The convergence metric, refreshed with each publication (a third of the node TTL).
    let scrape = || common::http_get(port, "/metrics").1;
    let t = Instant::now();
    loop {
        let text = scrape();
        if text.contains("localkms_cluster_nodes 3")
            && text.contains("localkms_cluster_converged 1")
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "convergence metric never showed 3 converged nodes:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[test]
fn concurrent_mutations_are_retried_never_lost() {
    if !etcd_available() {
        return;
    }
    let _heavy = HEAVY.blocking_lock();
    let (_etcd, url, node) = initialised("cas");
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let mut cmd = Command::new(bin());
            cmd.args(["keys", "rotate", "--stage"])
                .args(node.args(&url))
                .arg("--etcd-insecure")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("spawn")
        })
        .collect();
    let mut staged = Vec::new();
    for w in writers {
        let out = w.wait_with_output().expect("wait");
        staged.push(ok(&out));
    }
    let verify = ok(&node.run(&url, &["keystore", "verify"]));
    assert!(
        verify.contains("generation: 9"),
        "8 changes on generation 1: {verify}"
    );
    for id in &staged {
        assert!(
            verify.contains(&format!("key: {id} staged")),
            "{id} was lost: {verify}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_starts_and_serves_from_its_cache_while_etcd_is_down() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::start(1);
    let url = etcd.url("cache");
    let node = Node::new();
    ok(&node.run(&url, &["init"]));
    let mut server = node.serve(&url, "a", &[]);
    let (ct, id) = {
        let r = client(&server.endpoint())
            .await
            .expect("c")
            .encrypt(EncryptRequest {
                plaintext: vec![9; 32],
                uid: "u".into(),
            })
            .await
            .expect("enc")
            .into_inner();
        (r.ciphertext, r.key_id)
    };
    assert_eq!(server.stop("TERM").code(), Some(0));
    etcd.stop(0);

    let server = node.serve(&url, "a", &[]);
    let log = server.log_text();
    assert!(
        log.contains("serving from the local keystore cache"),
        "{log}"
    );
    let ep = server.endpoint();
    let mut c = client(&ep).await.expect("connect");
    assert_eq!(
        c.status(StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .healthz,
        "ok"
    );
    let d = c
        .decrypt(DecryptRequest {
            ciphertext: ct,
            uid: "u".into(),
            key_id: id.clone(),
            annotations: Default::default(),
        })
        .await
        .expect("decrypt from cache");
    assert_eq!(d.into_inner().plaintext, vec![9; 32]);
    // Mutations need etcd, and say so.
    let out = node.run(&url, &["keys", "rotate", "--stage"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("is etcd running") && !err.contains("--etcd-cacert"),
        "{err}"
    );

    // etcd comes back: the server reconnects and follows a rotation.
    etcd.restart(0);
    let new = ok(&node.run(&url, &["keys", "rotate", "--timeout", "20s"]));
    let t = Instant::now();
    while status_key_id(&ep).await != new {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not picked up after etcd came back: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and says so once.
    server.wait_log("etcd answers again");
}

#[test]
fn a_vanished_node_blocks_key_changes_until_it_is_forgotten() {
    if !etcd_available() {
        return;
    }
    let _heavy = HEAVY.blocking_lock();
    let (_etcd, url, node) = initialised("lease");
    // A lease long enough that b's record is surely still live when the first rotation runs,
    // however loaded the machine.
    let _a = node.serve(&url, "a", &["--node-ttl", "5s"]);
    let mut b = node.serve(&url, "b", &["--node-ttl", "5s"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&node.run(&url, &["nodes"])).contains("\nb ") {
        assert!(Instant::now() < deadline, "b never reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    b.signal("KILL");
    let _ = common::wait_with_timeout(&mut b.child, Duration::from_secs(5));

    // Immediately: b's record is still live and has not loaded the new key.
    let out = node.run(&url, &["keys", "rotate", "--timeout", "1s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("stopped at staged") && err.contains(" b") && err.contains("keys promote"),
        "{err}"
    );
    let staged = err
        .split_whitespace()
        .find(|w| w.starts_with("kek-"))
        .expect("key id in message")
        .trim_end_matches(':')
        .to_owned();
    let verify = ok(&node.run(&url, &["keystore", "verify"]));
    assert!(
        verify.contains(&format!("key: {staged} staged")),
        "{verify}"
    );

    // Once the lease expires, b is missing, not gone: it is known to the keystore, and a node
    // that is merely stopped must not be promoted past (it would restart without the key).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok(&node.run(&url, &["nodes"])).contains("\nb ") {
        assert!(Instant::now() < deadline, "b's record never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = ok(&node.run(&url, &["keystore", "verify"]));
    for cmd in [
        vec!["keys", "rotate", "--timeout", "5s"],
        vec!["keys", "promote", staged.as_str()],
        vec!["keys", "destroy", staged.as_str(), "--force"],
    ] {
        let out = node.run(&url, &cmd);
        assert!(
            !out.status.success(),
            "{cmd:?} went ahead past a stopped node"
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("node b")
                && err.contains("nodes forget b")
                && err.contains("nothing was written"),
            "{cmd:?}: {err}"
        );
    }
    assert_eq!(
        ok(&node.run(&url, &["keystore", "verify"])),
        before,
        "nothing was written"
    );

    // Once the operator says b is gone for good, a rotation completes.
    ok(&node.run(&url, &["nodes", "forget", "b"]));
    let new = ok(&node.run(&url, &["keys", "rotate", "--timeout", "40s"]));
    let verify = ok(&node.run(&url, &["keystore", "verify"]));
    assert!(verify.contains(&format!("key: {new} primary")), "{verify}");
    assert!(!ok(&node.run(&url, &["nodes"])).contains("\nb "));
    let out = node.run(&url, &["nodes", "forget", "b"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in this keystore's known-node registry"),
        "forgetting twice says so"
    );
}

#[test]
fn keystore_copy_moves_a_file_keystore_into_etcd_and_back_unchanged() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let url = etcd.url("copy");
    let ws = common::Workspace::new();
    assert!(ws.keys(&["rotate"]).status.success());
    let rk = ws.root_key.to_str().expect("utf8");
    let file = ws.keystore.to_str().expect("utf8");
    let before = ok(&localkms(&[
        "keys",
        "list",
        "--json",
        "--keystore",
        file,
        "--root-key-file",
        rk,
    ]));
    ok(&localkms(&[
        "keystore",
        "copy",
        "--from",
        file,
        "--to",
        &url,
        "--etcd-insecure",
        "--root-key-file",
        rk,
    ]));
    let in_etcd = ok(&localkms(&[
        "keys",
        "list",
        "--json",
        "--keystore",
        &url,
        "--etcd-insecure",
        "--root-key-file",
        rk,
    ]));
    let ids = |s: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(s).expect("json");
        v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| format!("{} {}", k["id"], k["state"]))
            .collect()
    };
    assert_eq!(ids(&before), ids(&in_etcd));
    // Copying onto an existing keystore is refused.
    let out = localkms(&[
        "keystore",
        "copy",
        "--from",
        file,
        "--to",
        &url,
        "--etcd-insecure",
        "--root-key-file",
        rk,
    ]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists")
    );
    // And back out to a new file: byte for byte the same sealed keystore.
    let back = ws.dir.path().join("back.lkms");
    ok(&localkms(&[
        "keystore",
        "copy",
        "--from",
        &url,
        "--etcd-insecure",
        "--to",
        back.to_str().expect("utf8"),
        "--root-key-file",
        rk,
    ]));
    assert_eq!(
        std::fs::read(&back).expect("back"),
        std::fs::read(&ws.keystore).expect("orig")
    );
}

#[test]
fn a_backup_restores_into_etcd_and_merges_into_it() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let url = etcd.url("restored");
    let ws = common::Workspace::new();
    assert!(ws.keys(&["rotate"]).status.success());
    let dir = ws.dir.path();
    let identity = dir.join("id.txt");
    let recipient = ok(&localkms(&[
        "recovery",
        "keygen",
        "--out",
        identity.to_str().expect("utf8"),
    ]));
    let backup = dir.join("b.age");
    let ks = ws.keystore_args();
    let mut export = vec![
        "keystore",
        "export",
        "--recipient",
        recipient.trim(),
        "--out",
        backup.to_str().expect("utf8"),
    ];
    export.extend(ks.iter().map(String::as_str));
    ok(&localkms(&export));
    let new_root = dir.join("etcd-root.key");
    let import = |extra: &[&str]| {
        let mut args = vec![
            "keystore",
            "import",
            "--in",
            backup.to_str().expect("utf8"),
            "--identity",
            identity.to_str().expect("utf8"),
            "--keystore",
            &url,
            "--etcd-insecure",
            "--root-key-file",
            new_root.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        localkms(&args)
    };
    ok(&import(&[]));
    let listed = |keystore: &str, root: &str| {
        let mut args = vec![
            "keys",
            "list",
            "--json",
            "--keystore",
            keystore,
            "--root-key-file",
            root,
        ];
        if keystore.starts_with("etcd://") {
            args.push("--etcd-insecure");
        }
        let v: serde_json::Value = serde_json::from_str(&ok(&localkms(&args))).expect("json");
        v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| format!("{} {}", k["id"], k["state"]))
            .collect::<Vec<_>>()
    };
    let rk = ws.root_key.to_str().expect("utf8");
    let nr = new_root.to_str().expect("utf8");
    assert_eq!(
        listed(&url, nr),
        listed(ws.keystore.to_str().expect("utf8"), rk)
    );
    // A second import onto it is refused; a merge adds nothing and changes nothing.
    let out = import(&[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let merged = ok(&import(&["--merge"]));
    assert!(merged.contains("0 key(s) added"), "{merged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_member_etcd_keeps_working_without_one_member() {
    if !etcd_available() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let mut etcd = Etcd::start(3);
    let url = etcd.url("quorum");
    let node = Node::new();
    // Wait for a leader: the first write may need a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if node.run(&url, &["init"]).status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "3-member etcd never accepted a write"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let server = node.serve(&url, "a", &[]);
    let ep = server.endpoint();
    etcd.stop(0);
    // Two of three members still form a quorum: mutations and the watch keep working.
    let new = ok(&node.run(&url, &["keys", "rotate", "--timeout", "20s"]));
    let t = Instant::now();
    while status_key_id(&ep).await != new {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "rotation not picked up with one member down: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without quorum, mutations fail cleanly, naming each member's own error and not
    // blaming TLS (there is none), and the server keeps serving.
    etcd.stop(1);
    let out = node.run(&url, &["keys", "rotate", "--stage"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    for m in &etcd.members {
        assert!(err.contains(&format!("127.0.0.1:{}:", m.client)), "{err}");
    }
    assert!(!err.contains("--etcd-cacert"), "{err}");
    assert_eq!(status_key_id(&ep).await, new);
    // A restart during quorum loss serves from the cache without waiting out etcd.
    let mut server = server;
    assert_eq!(server.stop("TERM").code(), Some(0));
    let server = node.serve(&url, "a", &[]);
    let log = server.log_text();
    assert!(
        log.contains("serving from the local keystore cache"),
        "{log}"
    );
    assert_eq!(status_key_id(&server.endpoint()).await, new);
}

/// A CA, an etcd server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install -y openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for who in ["server", "client"] {
        run(&[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.crt"),
            "-days",
            "1",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

#[test]
fn etcd_with_tls_and_client_certificates_as_on_a_control_plane() {
    if !etcd_available() {
        return;
    }
    let node = Node::new();
    let certs = node.dir.path().join("pki");
    std::fs::create_dir(&certs).expect("mkdir");
    make_certs(&certs);
    let etcd = Etcd::start_with(1, Some(&certs));
    let url = etcd.url("tls");
    let p = |f: &str| certs.join(f).display().to_string();
    let tls = [
        "--etcd-cacert",
        &p("ca.crt"),
        "--etcd-cert",
        &p("client.crt"),
        "--etcd-key",
        &p("client.key"),
    ];
    let with_tls = |cmd: &[&str]| {
        let mut all = cmd.to_vec();
        all.extend(node.args(&url));
        all.extend(tls.iter().copied());
        localkms(&all)
    };
    // Leader election may take a moment.
    let t = Instant::now();
    while !with_tls(&["init"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "init over TLS never succeeded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&with_tls(&["keys", "list"]));
    // Without a client certificate etcd refuses, and the error says where to look.
    let out = node.run(&url, &["keys", "list", "--etcd-cacert", &p("ca.crt")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--etcd-cert"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A server over TLS follows a two-phase rotation.
    let socket = node.dir.path().join("tls.sock");
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(node.args(&url))
        .args(tls)
        .arg("--node-name")
        .arg("tls-node");
    let server = Server::spawn(cmd, socket, node.dir.path().join("tls.log"));
    let new = ok(&with_tls(&["keys", "rotate", "--timeout", "20s"]));
    let out = localkms(&["status", "--socket", &server.endpoint(), "--json"]);
    let t = Instant::now();
    let mut status = String::from_utf8_lossy(&out.stdout).to_string();
    while !status.contains(&new) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "TLS server did not follow: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
        status = String::from_utf8_lossy(
            &localkms(&["status", "--socket", &server.endpoint(), "--json"]).stdout,
        )
        .to_string();
    }
    drop(server);
}

#[test]
fn every_keys_command_and_root_key_rotation_work_on_etcd() {
    if !etcd_available() {
        return;
    }
    let (_etcd, url, node) = initialised("lifecycle");
    let first = ok(&node.run(&url, &["keystore", "verify"]))
        .lines()
        .find_map(|l| {
            l.strip_prefix("key: ")
                .and_then(|r| r.strip_suffix(" primary"))
                .map(str::to_owned)
        })
        .expect("primary");
    let staged = ok(&node.run(&url, &["keys", "rotate", "--stage"]));
    ok(&node.run(&url, &["keys", "promote", &staged]));
    ok(&node.run(&url, &["keys", "disable", &first]));
    ok(&node.run(&url, &["keys", "enable", &first]));
    ok(&node.run(&url, &["keys", "disable", &first]));
    // It was primary seconds ago and no live node has counted usage: destroy wants --force.
    let out = node.run(&url, &["keys", "destroy", &first]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("destroy refused") && err.contains("--min-retired-age"),
        "{err}"
    );
    ok(&node.run(&url, &["keys", "destroy", &first, "--force"]));
    let verify = ok(&node.run(&url, &["keystore", "verify"]));
    assert!(
        verify.contains(&format!("key: {first} destroyed"))
            && verify.contains(&format!("key: {staged} primary")),
        "{verify}"
    );
    let history = ok(&node.run(&url, &["keys", "history"]));
    for action in ["init", "stage", "promote", "disable", "enable", "destroy"] {
        assert!(history.contains(action), "{action} missing: {history}");
    }

    // Root-key rotation on etcd: re-sealed in one transaction; the old key stops working.
    let new_key = node.dir.path().join("new-root.key");
    let new_key_s = new_key.to_str().expect("utf8");
    ok(&node.run(
        &url,
        &["root-key", "rotate", "--new-root-key-file", new_key_s],
    ));
    assert!(!node.run(&url, &["keys", "list"]).status.success());
    let after = ok(&localkms(&[
        "keystore",
        "verify",
        "--keystore",
        &url,
        "--etcd-insecure",
        "--root-key-file",
        new_key_s,
    ]));
    assert!(after.contains(&format!("key: {staged} primary")), "{after}");
}

/// Without TLS flags the client refuses plaintext, names the fix, and changes nothing;
/// `--etcd-insecure` allows it only to loopback; a client key others can read is refused.
#[test]
fn plaintext_etcd_needs_an_explicit_flag_and_loopback() {
    if !etcd_available() {
        return;
    }
    let (_etcd, url, node) = initialised("plain");
    let mut args = vec!["keys", "list"];
    args.extend(node.args(&url));
    let out = localkms(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("--etcd-insecure") && err.contains(&url),
        "{err}"
    );
    let remote = url.replacen("127.0.0.1", "192.0.2.1", 1);
    let out = node.run(&remote, &["keys", "list"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback endpoints only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client key file with group/other access is refused like a root key file.
    let key = node.dir.path().join("client.key");
    let cert = node.dir.path().join("client.crt");
    std::fs::write(&key, b"not really a key").expect("key");
    std::fs::write(&cert, b"not really a cert").expect("cert");
    let mut perms = std::fs::metadata(&key).expect("key").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&key, perms).expect("chmod");
    let mut args = vec!["keys", "list"];
    args.extend(node.args(&url));
    args.extend([
        "--etcd-cert",
        cert.to_str().expect("utf8"),
        "--etcd-key",
        key.to_str().expect("utf8"),
    ]);
    let out = localkms(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.key") && err.contains("chmod"), "{err}");
}

/// Node records steer two-phase rotation and the destroy guard, so they are MACed under a
/// key derived from the root key: a record written straight into etcd (claiming a node that
/// has loaded everything and decrypted nothing) is ignored and reported, never counted.
#[tokio::test(flavor = "multi_thread")]
async fn forged_node_records_are_ignored_and_reported() {
    if !etcd_available() {
        return;
    }
    let (_etcd, url, node) = initialised("forge");
    let server = node.serve(&url, "a", &[]);
    let (target, etcd) = raw_etcd(&url);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&node.run(&url, &["nodes"])).contains("\na ") {
        assert!(
            Instant::now() < deadline,
            "a never reported: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, mac) in [("evil", ",\"mac\":\"00\""), ("nomac", "")] {
        let forged = format!(
            "{{\"node\":\"{name}\",\"generation\":99,\"key_ids\":[],\"primary\":\"\",\"updated_unix\":0,\"usage\":{{}},\"counting_since_unix\":0{mac}}}"
        );
        etcd.put(
            &format!("{}{name}", target.nodes_prefix()),
            forged.into_bytes(),
            0,
        )
        .await
        .expect("put");
    }
    let out = node.run(&url, &["nodes", "--json"]);
    let listed = ok(&out);
    let v: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["a"], "{listed}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MAC does not verify") && err.contains("evil") && err.contains("nomac"),
        "{err}"
    );

    // Not counted is not absent: a record that does not verify blocks a key change, named.
    let staged = ok(&node.run(&url, &["keys", "rotate", "--stage"]));
    for cmd in [
        vec!["keys", "rotate", "--timeout", "2s"],
        vec!["keys", "promote", staged.as_str()],
    ] {
        let out = node.run(&url, &cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("node evil's record does not verify")
                && err.contains("node nomac's record does not verify"),
            "{cmd:?}: {err}"
        );
    }
    for name in ["evil", "nomac"] {
        etcd.delete(&format!("{}{name}", target.nodes_prefix()))
            .await
            .expect("delete");
    }
    // A forged registry entry counts as a known node (it can only make an operator look)
    // and is named as unverifiable until forgotten.
    etcd.put(
        &format!("{}ghost", target.known_prefix()),
        b"{\"node\":\"ghost\",\"first_seen_unix\":0}".to_vec(),
        0,
    )
    .await
    .expect("put");
    let out = node.run(&url, &["keys", "promote", staged.as_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node ghost"), "{err}");
    ok(&node.run(&url, &["nodes", "forget", "ghost"]));
    ok(&node.run(&url, &["keys", "promote", staged.as_str()]));
}

/// Putting an old revision of the keystore back into etcd does not roll a node back: the next
/// start is refused (the node's high-water mark lives in its --cache-dir), and the cache is
/// not overwritten with the older copy.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_etcd_revision_is_refused_at_restart() {
    if !etcd_available() {
        return;
    }
    let (_etcd, url, node) = initialised("rollback");
    let (target, etcd) = raw_etcd(&url);
    let old = etcd
        .get(&target.keystore_key())
        .await
        .expect("get")
        .expect("keystore")
        .value;
    let mut server = node.serve(&url, "a", &[]);
    let new = ok(&node.run(&url, &["keys", "rotate", "--timeout", "30s"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_key_id(&server.endpoint()).await != new {
        assert!(Instant::now() < deadline, "rotation not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.stop("TERM").code(), Some(0));

    etcd.put(&target.keystore_key(), old, 0)
        .await
        .expect("put back");
    let socket = node.dir.path().join("a.sock");
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(node.args(&url))
        .arg("--etcd-insecure")
        .arg("--cache-dir")
        .arg(node.dir.path().join("cache-a"));
    let (status, err) = common::run_to_exit(cmd);
    assert!(!status.success(), "an old etcd revision was served");
    assert!(
        err.contains("high-water") && err.contains("--allow-rollback"),
        "{err}"
    );
    assert!(
        err.contains("keeping the cache"),
        "the cache must not be overwritten by the older copy: {err}"
    );
}

/// Writes `kvs` into etcd in transactions of 128 puts (etcd's default --max-txn-ops).
async fn bulk_put(port: u16, kvs: Vec<(String, Vec<u8>)>) {
    use localkms::proto::etcd::kv_client::KvClient;
    use localkms::proto::etcd::request_op::Request;
    use localkms::proto::etcd::{PutRequest, RequestOp, TxnRequest};
    let mut kv = KvClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect etcd");
    for chunk in kvs.chunks(128) {
        let success = chunk
            .iter()
            .map(|(k, v)| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: k.clone().into_bytes(),
                    value: v.clone(),
                    lease: 0,
                })),
            })
            .collect();
        kv.txn(TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        })
        .await
        .expect("txn");
    }
}

/// A value as kube-apiserver writes it under a KMS v2 provider: the prefix
/// `k8s:enc:kms:v2:<provider>:` and a `v2.EncryptedObject` (proto/v2_storage.proto, from
/// ../shared/kms/PROTOCOL.md): field 1 encryptedData, field 2 keyID (clear), field 3
/// encryptedDEKSource (the plugin's Encrypt ciphertext), field 5 encryptedDEKSourceType
/// (1 = HKDF_SHA256_XNONCE_AES_GCM_SEED, what current apiservers write).
fn kms_v2_value(provider: &str, key_id: &str, dek_source: &[u8]) -> Vec<u8> {
    use prost::Message as _;
    let obj = localkms::proto::v2::EncryptedObject {
        encrypted_data: b"\x01\x02ciphertext of the object".to_vec(),
        key_id: key_id.into(),
        encrypted_dek_source: dek_source.to_vec(),
        annotations: Default::default(),
        encrypted_dek_source_type: 1,
    };
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    v.extend(obj.encode_to_vec());
    v
}

/// A KMS v1 value: `k8s:enc:kms:v1:<provider>:`, the 2-byte big-endian length of the plugin's
/// ciphertext of the DEK, that ciphertext, then the data.
fn kms_v1_value(provider: &str, dek_ciphertext: &[u8]) -> Vec<u8> {
    let mut v = format!("k8s:enc:kms:v1:{provider}:").into_bytes();
    v.extend(
        u16::try_from(dek_ciphertext.len())
            .expect("len")
            .to_be_bytes(),
    );
    v.extend(dek_ciphertext);
    v.extend(b"aes-cbc data");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_counts_every_kek_format_and_resource_over_20000_keys_and_gates_destroy() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let port = etcd.members[0].client;
    let ws = common::Workspace::new();
    let server = ws.serve();
    let endpoint = server.endpoint();
    // Real ciphertexts from the plugin, before and after a rotation, v2 and v1.
    let (seed_k1, k1) = common::encrypt(&endpoint, &[1u8; 32]).await;
    let channel = localkms::client::connect(&endpoint).await.expect("connect");
    let mut v1 =
        localkms::proto::v1beta1::key_management_service_client::KeyManagementServiceClient::new(
            channel,
        );
    let dek_k1 = v1
        .encrypt(localkms::proto::v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: vec![2u8; 32],
        })
        .await
        .expect("v1 encrypt")
        .into_inner()
        .cipher;
    ok(&ws.keys(&["rotate"]));
    let start = Instant::now();
    let mut k2 = k1.clone();
    while k2 == k1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "rotation not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        k2 = status_key_id(&endpoint).await;
    }
    let (seed_k2, k2_again) = common::encrypt(&endpoint, &[3u8; 32]).await;
    assert_eq!(k2, k2_again);

    let mut kvs: Vec<(String, Vec<u8>)> = Vec::with_capacity(20_100);
    let mut add = |n: usize, resource: &str, value: Vec<u8>| {
        for i in 0..n {
            kvs.push((
                format!("/registry/{resource}/ns-{}/obj-{i}", i % 7),
                value.clone(),
            ));
        }
    };
    add(8000, "secrets", kms_v2_value("localkms", &k1, &seed_k1));
    add(4000, "secrets-k2", kms_v2_value("localkms", &k2, &seed_k2));
    add(1000, "configmaps", kms_v2_value("localkms", &k2, &seed_k2));
    add(
        3000,
        "configmaps-plain",
        b"k8s\x00\n\x0fv1\x12\tConfigMap".to_vec(),
    );
    add(
        1000,
        "secrets-v1",
        kms_v1_value("localkms-old-name", &dek_k1),
    );
    add(
        1000,
        "aescbc",
        b"k8s:enc:aescbc:v1:key1:\x00\x01\x02".to_vec(),
    );
    add(
        500,
        "secretbox",
        b"k8s:enc:secretbox:v1:key1:\x00\x01".to_vec(),
    );
    add(
        1500,
        "other-plugin",
        kms_v2_value("aws", "arn:aws:kms:eu-west-1:1:key/x", b"opaque"),
    );
    // Outside the prefix: never counted.
    kvs.push((
        "/registryX/secrets/a".into(),
        b"k8s:enc:aescbc:v1:k:x".to_vec(),
    ));
    kvs.push(("/other/x".into(), b"x".to_vec()));
    bulk_put(port, kvs).await;

    let url = format!("http://127.0.0.1:{port}");
    let scan = |extra: &[&str]| {
        let mut args = vec![
            "scan",
            "--etcd-endpoints",
            &url,
            "--etcd-insecure",
            "--json",
            "--page-size",
            "700",
        ];
        args.extend_from_slice(extra);
        localkms(&args)
    };
    let ks = ws.keystore_args();
    let ks: Vec<&str> = ks.iter().map(String::as_str).collect();
    let out = scan(&ks);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).expect("json");
    assert_eq!(report["objects"], 20_000);
    assert_eq!(report["complete"], true);
    assert_eq!(report["formats"]["identity"], 3000);
    assert_eq!(report["formats"]["aescbc"], 1000);
    assert_eq!(report["formats"]["secretbox"], 500);
    assert_eq!(report["formats"]["kms:v2:localkms"], 13_000);
    assert_eq!(report["formats"]["kms:v1:localkms-old-name"], 1000);
    assert_eq!(report["formats"]["kms:v2:aws"], 1500);
    let kek = |id: &str| {
        report["keks"]
            .as_array()
            .expect("keks")
            .iter()
            .find(|k| k["key_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {report}"))
    };
    assert_eq!(
        kek(&k1)["objects"],
        9000,
        "8000 v2 + 1000 v1 (renamed provider)"
    );
    assert_eq!(kek(&k1)["state"], "retired");
    assert_eq!(kek(&k1)["by_resource"]["secrets-v1"], 1000);
    assert_eq!(kek(&k2)["objects"], 5000);
    assert_eq!(kek(&k2)["by_resource"]["configmaps"], 1000);
    assert_eq!(kek(&k2)["state"], "primary");
    assert_eq!(
        kek("arn:aws:kms:eu-west-1:1:key/x")["state"],
        "not in keystore"
    );

    // --fail-on-key: exit 3 while objects depend on K1; 0 for a key nothing uses.
    let mut fail = ks.clone();
    fail.extend(["--fail-on-key", &k1]);
    let out = scan(&fail);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("9000 object(s)"));

    // destroy --scan-report: refused while anything depends on K1.
    let report_file = ws.dir.path().join("scan.json");
    std::fs::write(&report_file, ok(&scan(&ks))).expect("write report");
    let rf = report_file.to_str().expect("utf8");
    let destroy = |extra: &[&str]| {
        let mut args = vec![
            "destroy",
            &k1,
            "--min-retired-age",
            "1s",
            "--scan-report",
            rf,
        ];
        args.extend_from_slice(extra);
        ws.keys(&args)
    };
    let out = destroy(&[]);
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && why.contains("9000 object(s) still depend"),
        "{why}"
    );

    // "Rewrite" everything under K1 (delete those objects), scan again: zero, destroy proceeds.
    let mut kv = localkms::proto::etcd::kv_client::KvClient::connect(url.clone())
        .await
        .expect("connect");
    for prefix in ["/registry/secrets/", "/registry/secrets-v1/"] {
        kv.delete_range(localkms::proto::etcd::DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: localkms::keystore::backend::etcd::client::prefix_end(prefix.as_bytes()),
        })
        .await
        .expect("delete");
    }
    let mut fail = ks.clone();
    fail.extend(["--fail-on-key", &k1]);
    std::fs::write(&report_file, ok(&scan(&fail))).expect("write report");
    let out = ok(&destroy(&[]));
    assert!(out.contains("destroyed"), "{out}");
    drop(server);
}

#[test]
fn scan_reads_a_tls_etcd_with_client_certificates_and_refuses_without_them() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let certs = dir.path().join("pki");
    std::fs::create_dir(&certs).expect("mkdir");
    make_certs(&certs);
    let etcd = Etcd::start_with(1, Some(&certs));
    let url = format!("https://127.0.0.1:{}", etcd.members[0].client);
    let p = |f: &str| certs.join(f).display().to_string();
    let with = |extra: &[&str]| {
        let mut args = vec!["scan", "--etcd-endpoints", &url, "--prefix", "/"];
        args.extend_from_slice(extra);
        localkms(&args)
    };
    let (ca, cert, key) = (p("ca.crt"), p("client.crt"), p("client.key"));
    let tls = [
        "--etcd-cacert",
        ca.as_str(),
        "--etcd-cert",
        cert.as_str(),
        "--etcd-key",
        key.as_str(),
    ];
    let t = Instant::now();
    loop {
        let out = with(&tls);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("scanned 0 keys"));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = with(&["--etcd-cacert", ca.as_str()]);
    assert!(!out.status.success());
}

/// `localkms_*`/`process_*` names in a PromQL expression.
fn metric_names(expr: &str) -> std::collections::BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("localkms_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` string in a Grafana dashboard.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_dashboard_use_is_exported() {
    if !etcd_available() {
        return;
    }
    let (etcd, url, node) = initialised("monitoring");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = yaml_rust2::YamlLoader::load_from_str(
        &std::fs::read_to_string(repo.join("deploy/monitoring/prometheus-rules.yaml"))
            .expect("rules"),
    )
    .expect("yaml");
    let mut exprs: Vec<String> = rules[0]["groups"]
        .as_vec()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_vec().cloned().unwrap_or_default())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned))
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("deploy/monitoring/grafana-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("json");
    dashboard_exprs(&dashboard, &mut exprs);
    let used: std::collections::BTreeSet<String> =
        exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 10, "{used:?}");
    // An etcd keystore (cluster metrics) with backups on (backup metrics), after requests.
    let identity = node.dir.path().join("id.txt");
    let recipient = ok(&localkms(&[
        "recovery",
        "keygen",
        "--out",
        identity.to_str().expect("utf8"),
    ]));
    let port = free_port();
    let backups = node.dir.path().join("backups");
    let addr = format!("127.0.0.1:{port}");
    let server = node.serve(
        &url,
        "monitoring",
        &[
            "--metrics-addr",
            &addr,
            "--backup-dir",
            backups.to_str().expect("utf8"),
            "--backup-recipient",
            recipient.trim(),
        ],
    );
    let endpoint = server.endpoint();
    let (ct, key_id) = common::encrypt(&endpoint, b"seed").await;
    common::decrypt(&endpoint, &ct, &key_id)
        .await
        .expect("decrypt");
    let (_, metrics) = common::http_get(port, "/metrics");
    let exported: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\n{metrics}"
    );
    // doctor on an etcd keystore: node convergence and current backups.
    let socket = node.dir.path().join("monitoring.sock");
    let mut args = vec!["doctor", "--socket", socket.to_str().expect("utf8")];
    args.extend(node.args(&url));
    args.extend([
        "--etcd-insecure",
        "--backup-dir",
        backups.to_str().expect("utf8"),
    ]);
    let out = localkms(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("node(s) have loaded generation"), "{text}");
    assert!(text.contains("is of the current generation"), "{text}");
    drop(server);
    drop(etcd);
}

/// A node frozen (SIGSTOP) across a stage and promote, with a Decrypt for the new key already
/// waiting on its socket when it resumes: it reads the keystore before answering, rather than
/// answer NOT_FOUND a few milliseconds before its watch would have loaded the key.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_frozen_past_a_promote_reloads_before_answering_not_found() {
    if !etcd_available() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let (_etcd, url, node) = initialised("frozen");
    // A lease long enough that b's record stays live (and fresh) while it is stopped.
    let a = node.serve(&url, "a", &["--node-ttl", "30s"]);
    let b = node.serve(&url, "b", &["--node-ttl", "30s"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&node.run(&url, &["nodes"])).contains("\nb ") {
        assert!(Instant::now() < deadline, "b never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A connection to b made (and used) before it stops, as the apiserver's is.
    let mut to_b = client(&b.endpoint()).await.expect("connect");
    to_b.status(StatusRequest {}).await.expect("status");
    b.signal("STOP");
    let staged = ok(&node.run(&url, &["keys", "rotate", "--stage"]));
    ok(&node.run(&url, &["keys", "promote", &staged]));
    while status_key_id(&a.endpoint()).await != staged {
        assert!(Instant::now() < deadline, "a never loaded {staged}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ct, key_id) = common::encrypt(&a.endpoint(), b"frozen").await;
    assert_eq!(key_id, staged);
    // The Decrypt is sent while b is still stopped; b finds it waiting when it resumes.
    let waiting = tokio::spawn(async move {
        to_b.decrypt(DecryptRequest {
            ciphertext: ct,
            uid: "frozen".into(),
            key_id,
            annotations: Default::default(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.signal("CONT");
    let plain = waiting
        .await
        .expect("join")
        .expect("decrypt on the resumed node");
    assert_eq!(plain, b"frozen");
    // A key no keystore holds still gets NOT_FOUND, naming the possibilities, within the bound.
    let unknown = "kek-20990101-00000000";
    // A well-formed envelope (version 2, the id, salt, nonce, sealed seed and tag) under it.
    let mut envelope = vec![2u8, unknown.len() as u8];
    envelope.extend_from_slice(unknown.as_bytes());
    envelope.extend_from_slice(&[0u8; 16 + 12 + 32 + 16]);
    let started = Instant::now();
    let err = common::decrypt(&b.endpoint(), &envelope, unknown)
        .await
        .expect_err("unknown key");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("not yet loaded here"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
