//! Hardening under proof: bad input over v1 and v2, peer credentials, file permissions,
//! process limits, secrets kept out of logs, floods, a soak under rotation, and SIGKILL.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{bin, client, localkms, Server, Workspace};
use localkms::keystore::{self, RootKeyProvider, RootKeySource};
use localkms::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use localkms::proto::v1beta1::{
    DecryptRequest as V1Decrypt, EncryptRequest as V1Encrypt, VersionRequest,
};
use localkms::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::Code;

fn is_root() -> bool {
    common::root_or_skip(module_path!())
}

async fn v1(ep: &str) -> V1Client<tonic::transport::Channel> {
    V1Client::new(localkms::client::connect(ep).await.expect("connect"))
}

fn v1enc(version: &str, plain: &[u8]) -> V1Encrypt {
    V1Encrypt {
        version: version.into(),
        plain: plain.to_vec(),
    }
}

fn v1dec(version: &str, cipher: &[u8]) -> V1Decrypt {
    V1Decrypt {
        version: version.into(),
        cipher: cipher.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_and_oversized_bad_input_matrix() {
    let ws = Workspace::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let mut c1 = v1(&ep).await;
    let good = c1
        .encrypt(v1enc("v1beta1", &[7u8; 32]))
        .await
        .expect("encrypt")
        .into_inner()
        .cipher;
    let mut tampered = good.clone();
    let n = tampered.len() - 1;
    tampered[n] ^= 1;
    let mut wrong_format = good.clone();
    wrong_format[0] = 0x42;
    let foreign = {
        let other = Workspace::new();
        let s = other.serve();
        let mut c = v1(&s.endpoint()).await;
        c.encrypt(v1enc("v1beta1", &[1u8; 32]))
            .await
            .expect("encrypt")
            .into_inner()
            .cipher
    };

    let cases: Vec<(&str, V1Decrypt, Code, &str)> = vec![
        (
            "empty",
            v1dec("v1beta1", &[]),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "garbage",
            v1dec("v1beta1", b"garbage!"),
            Code::InvalidArgument,
            "format version",
        ),
        (
            "truncated",
            v1dec("v1beta1", &good[..30]),
            Code::InvalidArgument,
            "truncated",
        ),
        (
            "tampered",
            v1dec("v1beta1", &tampered),
            Code::InvalidArgument,
            "authentication",
        ),
        (
            "wrong format version",
            v1dec("v1beta1", &wrong_format),
            Code::InvalidArgument,
            "format version 66",
        ),
        (
            "oversized ciphertext",
            v1dec("v1beta1", &[1u8; 1500]),
            Code::InvalidArgument,
            "at most 1024",
        ),
        (
            "wrong API version",
            v1dec("v2", &good),
            Code::InvalidArgument,
            "v1beta1",
        ),
        (
            "unknown KEK",
            v1dec("v1beta1", &foreign),
            Code::NotFound,
            "not in this plugin's keystore",
        ),
    ];
    for (case, req, code, words) in cases {
        let e = c1.decrypt(req).await.expect_err(case);
        assert_eq!(e.code(), code, "{case}: {}", e.message());
        assert!(e.message().contains(words), "{case}: {}", e.message());
        c1.version(VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .expect("still serving");
    }
    let e = c1.encrypt(v1enc("v1beta1", &[])).await.expect_err("empty");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c1
        .encrypt(v1enc("v1beta1", &[0u8; 2000]))
        .await
        .expect_err("too big");
    assert_eq!(e.code(), Code::InvalidArgument);

    // A message over the gRPC size limit is refused from its length prefix, v2 and v1 alike.
    let mut c2 = client(&ep).await.expect("connect");
    let e = c2
        .encrypt(EncryptRequest {
            plaintext: vec![0u8; 100 * 1024],
            uid: "big".into(),
        })
        .await
        .expect_err("oversized");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let e = c1
        .encrypt(v1enc("v1beta1", &vec![0u8; 100 * 1024]))
        .await
        .expect_err("oversized");
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = c2
        .decrypt(DecryptRequest {
            ciphertext: good.clone(),
            uid: "u".into(),
            key_id: "kek-x".into(),
            annotations: [("a.b.example".to_owned(), vec![0u8; 64 * 1024])].into(),
        })
        .await
        .expect_err("huge annotations");
    assert_eq!(e.code(), Code::ResourceExhausted);
    let status = c2
        .status(StatusRequest {})
        .await
        .expect("alive")
        .into_inner();
    assert_eq!(status.healthz, "ok");
}

#[test]
fn refuses_keystore_and_root_key_files_others_can_reach() {
    let ws = Workspace::new();
    let ks = ws.keystore.to_str().expect("utf8");
    let rk = ws.root_key.to_str().expect("utf8");
    let sock = ws.socket.to_str().expect("utf8");
    // One `serve` attempt that is expected to be refused before it binds.
    let serve_once = || {
        localkms(&[
            "serve",
            "--socket",
            sock,
            "--keystore",
            ks,
            "--root-key-file",
            rk,
        ])
    };

    std::fs::set_permissions(&ws.keystore, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = serve_once();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(ks) && err.contains("chmod 600"), "{err}");

    // The loudly named override lets it start anyway.
    let mut cmd = Command::new(bin());
    cmd.args([
        "serve",
        "--socket",
        sock,
        "--keystore",
        ks,
        "--root-key-file",
        rk,
        "--insecure-skip-file-checks",
    ]);
    let server = Server::spawn(cmd, ws.socket.clone(), ws.dir.path().join("insecure.log"));
    assert!(
        server.log_text().contains("NOT checking"),
        "{}",
        server.log_text()
    );
    drop(server);
    std::fs::set_permissions(&ws.keystore, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    std::fs::set_permissions(&ws.root_key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = serve_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(rk) && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&ws.root_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    if is_root() {
        // Owned by someone else: refused with the chown that fixes it.
        rustix::fs::chown(&ws.root_key, Some(rustix::fs::Uid::from_raw(65534)), None)
            .expect("chown");
        let out = serve_once();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("chown 0") && err.contains(rk),
            "{err}"
        );
    } else {
        eprintln!("not root: the ownership refusal is covered only when the suite runs as root");
    }
}

#[test]
fn peer_credentials_gate_every_connection() {
    let ws = Workspace::new();
    let port = common::free_port();
    let me = rustix::process::geteuid().as_raw().to_string();
    // The socket is world-writable here so that only the peer check stands in the way.
    let server = ws.serve_with(&[
        "--allow-uid",
        &me,
        "--socket-mode",
        "0666",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let ep = server.endpoint();
    assert_eq!(
        std::fs::metadata(&ws.socket)
            .map(|m| m.permissions().mode() & 0o777)
            .expect("mode"),
        0o666
    );
    assert!(
        server.log_text().contains("only these peers may call"),
        "{}",
        server.log_text()
    );
    let out = localkms(&["check", "--socket", &ep]);
    assert!(
        out.status.success(),
        "the allowed uid must be served: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    if !is_root() {
        eprintln!("not root: cannot run a client as another uid; the refusal half needs root");
        return;
    }
    let out = Command::new(bin())
        .args(["check", "--socket", &ep, "--timeout", "3"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    assert!(!out.status.success(), "uid 65534 must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not allow this process (uid 65534") && err.contains("--allow-uid"),
        "the refused client is told why, not asked whether the plugin runs: {err}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server.log_text().contains("uid=65534") {
        assert!(
            Instant::now() < deadline,
            "refusal not logged: {}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log_text();
    assert!(
        log.contains("refused a connection") && log.contains("gid=65534") && log.contains("pid="),
        "{log}"
    );
    let metrics = common::http_get(port, "/metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("localkms_rejected_peers_total") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Allowed by group instead of uid.
    let ws2 = Workspace::new();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&ws2.socket)
        .args(ws2.keystore_args())
        .args([
            "--allow-uid",
            "4242",
            "--allow-gid",
            "65534",
            "--socket-mode",
            "0666",
        ]);
    let server2 =
        Server::spawn_without_probe(cmd, ws2.socket.clone(), ws2.dir.path().join("gid.log"));
    let out = Command::new(bin())
        .args(["check", "--socket", &server2.endpoint(), "--timeout", "3"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    assert!(
        out.status.success(),
        "gid 65534 is allowed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = localkms(&["check", "--socket", &server2.endpoint(), "--timeout", "3"]);
    assert!(!out.status.success(), "root is in neither list");

    // A socket file this uid may not open: permission denied, named as such.
    let private = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let closed = private.path().join("closed.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&closed).expect("bind");
    let out = Command::new(bin())
        .args(["status", "--socket", closed.to_str().expect("utf8")])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied on") && err.contains("uid 65534"),
        "{err}"
    );
}

/// `status` gives up on a socket that accepts and never answers, as `check` does.
#[test]
fn status_gives_up_on_a_socket_that_never_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let out = localkms(&[
        "status",
        "--socket",
        path.to_str().expect("utf8"),
        "--timeout",
        "1s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no answer from"), "{err}");
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn no_core_dumps_and_locked_key_pages() {
    let ws = Workspace::new();
    let server = ws.serve();
    let pid = server.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    if is_root() {
        let locked = proc_status(pid, "VmLck:").expect("VmLck");
        assert!(
            locked >= 4,
            "key pages must be locked as root: VmLck {locked} kB"
        );
    }
}

fn encodings(bytes: &[u8]) -> Vec<String> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        hex.clone(),
        hex.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(bytes),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        format!("{:?}", &bytes[..8])
            .trim_end_matches(']')
            .to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn key_material_and_plaintext_never_reach_logs_or_output() {
    let ws = Workspace::new();
    let mut outputs = String::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let mut c = client(&ep).await.expect("connect");
    let secrets_plain: Vec<[u8; 32]> = (0..4u8)
        .map(|i| [0xc0 ^ i; 32].map(|b| b.wrapping_mul(i + 3)))
        .collect();
    let mut cts = Vec::new();
    for p in &secrets_plain {
        let r = c
            .encrypt(EncryptRequest {
                plaintext: p.to_vec(),
                uid: "leak-test".into(),
            })
            .await
            .expect("enc")
            .into_inner();
        cts.push(r);
    }
    for r in &cts {
        c.decrypt(DecryptRequest {
            ciphertext: r.ciphertext.clone(),
            uid: "leak-test".into(),
            key_id: r.key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .expect("dec");
        // Errors too: tampered and mismatched.
        let mut bad = r.ciphertext.clone();
        bad[40] ^= 1;
        let _ = c
            .decrypt(DecryptRequest {
                ciphertext: bad,
                uid: "leak-test".into(),
                key_id: r.key_id.clone(),
                annotations: Default::default(),
            })
            .await;
    }
    let _ = c
        .encrypt(EncryptRequest {
            plaintext: vec![0xee; 5000],
            uid: "too-big".into(),
        })
        .await;
    for args in [
        vec!["rotate"],
        vec!["rotate", "--stage"],
        vec!["list", "--json"],
        vec!["history", "--json"],
    ] {
        let out = ws.keys(&args);
        outputs.push_str(&String::from_utf8_lossy(&out.stdout));
        outputs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let ks = ws.keystore_args();
    let out = localkms(&["keystore", "verify", &ks[0], &ks[1], &ks[2], &ks[3]]);
    outputs.push_str(&String::from_utf8_lossy(&out.stdout));
    // Both changes picked up (and logged, which is what this test greps).
    server.wait_log("to=3");
    drop(c);
    let mut server = server;
    assert_eq!(server.stop("TERM").code(), Some(0));
    outputs.push_str(&server.log_text());

    let root = RootKeyProvider::open(&RootKeySource::KeyFile(ws.root_key.clone())).expect("root");
    let loaded = keystore::load(&ws.keystore, &root).expect("load");
    let mut secrets: Vec<(String, Vec<u8>)> = vec![(
        "root key".into(),
        std::fs::read(&ws.root_key).expect("root key"),
    )];
    for r in loaded.records() {
        if let Some(k) = &r.material {
            secrets.push((format!("KEK {}", r.id), k.expose().to_vec()));
        }
    }
    for (i, p) in secrets_plain.iter().enumerate() {
        secrets.push((format!("plaintext {i}"), p.to_vec()));
    }
    assert!(outputs.len() > 1000, "expected a real amount of log output");
    for (what, bytes) in secrets {
        for enc in encodings(&bytes) {
            assert!(
                !outputs.contains(&enc),
                "{what} appears in logs or output as {enc}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn floods_neither_grow_memory_without_bound_nor_starve_a_good_client() {
    let ws = Workspace::new();
    // The default 10 s handshake timeout: idle connections are not simply waited out.
    let server = ws.serve_with(&["--max-connections", "16"]);
    let ep = server.endpoint();
    let pid = server.child.id();
    let rss_before = proc_status(pid, "VmRSS:").expect("rss");

    // 300 connections that never speak: at most 16 open; when a new client arrives, the oldest
    // one that has not even sent its HTTP/2 preface is evicted to make room.
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&ws.socket) {
            idle.push(s);
        }
    }
    // A request flood on top, from 8 busy clients (half the slots: a cap this low is only
    // fair to clients that fit under it).
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..8 {
        let (ep, stop) = (ep.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let Ok(mut c) = client(&ep).await else {
                return 0u32;
            };
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let ok = c
                    .encrypt(EncryptRequest {
                        plaintext: vec![1u8; 32],
                        uid: "flood".into(),
                    })
                    .await
                    .is_ok();
                if ok {
                    n += 1;
                } else {
                    // A refused or shed request returns at once: do not spin the runtime.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            n
        }));
    }
    // The well-behaved client: 20 sequential round trips, each answered.
    let start = Instant::now();
    let mut good = None;
    while good.is_none() {
        good = client(&ep).await.ok();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "good client could not connect during the flood"
        );
    }
    let mut good = good.expect("client");
    for i in 0..20u8 {
        let r = good
            .encrypt(EncryptRequest {
                plaintext: vec![i; 32],
                uid: "good".into(),
            })
            .await
            .expect("good client served")
            .into_inner();
        let d = good
            .decrypt(DecryptRequest {
                ciphertext: r.ciphertext,
                uid: "good".into(),
                key_id: r.key_id,
                annotations: Default::default(),
            })
            .await
            .expect("good client served");
        assert_eq!(d.into_inner().plaintext, vec![i; 32]);
    }
    // Not kept waiting behind the idle connections: waiting them out with the 10 s handshake
    // timeout would take 300 / 16 × 10 s = 187 s. The deadline is generous for a loaded
    // machine; speed itself is for benchmarks.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the good client took {:?}",
        start.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for f in flood {
        total += f.await.expect("flood task");
    }
    let rss_after = proc_status(pid, "VmRSS:").expect("rss");
    drop(idle);
    assert!(total > 0, "the flood made no requests");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    assert_eq!(
        client(&ep)
            .await
            .expect("after")
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .healthz,
        "ok"
    );
}

#[test]
fn a_server_at_its_in_flight_limit_sheds_with_resource_exhausted() {
    let ws = Workspace::new();
    let server = ws.serve_with(&["--max-in-flight", "1"]);
    let v = common::localkms_json(&[
        "bench",
        "--socket",
        &server.endpoint(),
        "--op",
        "mixed",
        "--concurrency",
        "32",
        "--connections",
        "8",
        "--requests",
        "3000",
        "--json",
    ]);
    let errors = v["errors"].as_object().expect("errors");
    assert!(errors.keys().all(|k| k == "ResourceExhausted"), "{v}");
    // Some shedding is expected with 32 concurrent callers and one slot, but never all.
    assert!(
        v["requests"].as_u64().expect("n")
            > errors.values().filter_map(|n| n.as_u64()).sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_under_rotation_and_reloads_loses_nothing() {
    let ws = Workspace::new();
    let server = ws.serve();
    let ep = server.endpoint();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..32u8 {
        let (ep, stop, done) = (ep.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut c = client(&ep).await.expect("connect");
            let mut made = Vec::new();
            let mut failures = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut seed = [w; 32];
                seed[..4].copy_from_slice(&i.to_be_bytes());
                match c
                    .encrypt(EncryptRequest {
                        plaintext: seed.to_vec(),
                        uid: "soak".into(),
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        match c
                            .decrypt(DecryptRequest {
                                ciphertext: r.ciphertext.clone(),
                                uid: "soak".into(),
                                key_id: r.key_id.clone(),
                                annotations: Default::default(),
                            })
                            .await
                        {
                            Ok(d) if d.get_ref().plaintext == seed => {
                                done.fetch_add(1, Ordering::Relaxed);
                                made.push((seed, r.ciphertext, r.key_id))
                            }
                            Ok(_) => failures.push("wrong plaintext".to_owned()),
                            Err(e) => failures.push(format!("decrypt: {e}")),
                        }
                    }
                    Err(e) => failures.push(format!("encrypt: {e}")),
                }
            }
            (made, failures)
        }));
    }
    // Five rotations, each picked up (SIGHUP, or the poll) and each carrying traffic before the
    // next: conditions with generous deadlines, not a wall-clock budget.
    for _ in 0..5 {
        let out = ws.keys(&["rotate"]);
        assert!(out.status.success());
        let new = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        server.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(30);
        while common::status_key_id(&ep).await != new {
            assert!(
                Instant::now() < deadline,
                "rotation to {new} never picked up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = done.load(Ordering::Relaxed);
        while done.load(Ordering::Relaxed) < before + 20 {
            assert!(Instant::now() < deadline, "no traffic under {new}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        let (made, failures) = w.await.expect("worker");
        assert!(failures.is_empty(), "unexpected failures: {failures:?}");
        all.extend(made);
    }
    let key_ids: std::collections::HashSet<_> = all.iter().map(|m| m.2.clone()).collect();
    assert!(
        key_ids.len() >= 3,
        "traffic should span several KEKs, saw {}",
        key_ids.len()
    );
    // Every ciphertext ever produced still decrypts.
    let mut c = client(&ep).await.expect("connect");
    for (seed, ct, key_id) in &all {
        let d = c
            .decrypt(DecryptRequest {
                ciphertext: ct.clone(),
                uid: "verify".into(),
                key_id: key_id.clone(),
                annotations: Default::default(),
            })
            .await
            .expect("every ciphertext still decrypts");
        assert_eq!(&d.into_inner().plaintext, seed);
    }
    assert!(
        all.len() >= 100,
        "only {} round trips in the soak",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_load_leaves_a_loadable_keystore_and_a_removable_socket() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let ep = server.endpoint();
    let load = {
        let ep = ep.clone();
        tokio::spawn(async move {
            let mut c = client(&ep).await.expect("connect");
            let mut made = Vec::new();
            for i in 0..10_000u32 {
                match c
                    .encrypt(EncryptRequest {
                        plaintext: i.to_be_bytes().repeat(8),
                        uid: "k".into(),
                    })
                    .await
                {
                    Ok(r) => made.push((i, r.into_inner())),
                    Err(_) => break,
                }
            }
            made
        })
    };
    // Rotate while loaded, then kill -9 mid-traffic.
    assert!(ws.keys(&["rotate"]).status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("KILL");
    let _ = common::wait_with_timeout(&mut server.child, Duration::from_secs(5));
    let made = load.await.expect("load");
    assert!(!made.is_empty());
    assert!(ws.socket.exists(), "SIGKILL leaves the socket file behind");
    let ks = ws.keystore_args();
    let out = localkms(&["keystore", "verify", &ks[0], &ks[1], &ks[2], &ks[3]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = ws.serve();
    assert!(
        server.log_text().contains("stale socket"),
        "{}",
        server.log_text()
    );
    let mut c = client(&server.endpoint()).await.expect("connect");
    for (i, r) in made.iter().step_by(97) {
        let d = c
            .decrypt(DecryptRequest {
                ciphertext: r.ciphertext.clone(),
                uid: "k".into(),
                key_id: r.key_id.clone(),
                annotations: Default::default(),
            })
            .await
            .expect("decrypt after restart");
        assert_eq!(d.into_inner().plaintext, i.to_be_bytes().repeat(8));
    }
}

#[allow(dead_code)]
fn _unused(_: Command) {}

#[test]
fn socket_mode_and_group_are_applied() {
    use std::os::unix::fs::MetadataExt;
    let ws = Workspace::new();
    let gid = rustix::process::getegid().as_raw().to_string();
    let server = ws.serve_with(&["--socket-mode", "0660", "--socket-group", &gid]);
    let meta = std::fs::metadata(&ws.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid().to_string(), gid);
    drop(server);
    if is_root() {
        // A group other than the server's own, by name.
        let ws = Workspace::new();
        let server = ws.serve_with(&["--socket-mode", "0660", "--socket-group", "nogroup"]);
        let meta = std::fs::metadata(&ws.socket).expect("socket");
        assert_eq!(meta.gid(), 65534, "nogroup is gid 65534 on Debian");
        drop(server);
    }
    let out = localkms(&[
        "serve",
        "--socket",
        "/tmp/x.sock",
        "--keystore",
        "k",
        "--root-key-file",
        "r",
        "--socket-group",
        "no-such-group-anywhere",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no group named"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `serve` as a user who cannot create its socket (an unprivileged user under /run): the
/// message names the uid, the directory and the ways out, not a bare "permission denied".
#[test]
fn serve_names_the_directory_it_cannot_create_the_socket_in() {
    if !common::root_or_skip("running serve as another uid") {
        return;
    }
    let ws = Workspace::new();
    let nobody = Some(rustix::fs::Uid::from_raw(65534));
    let group = Some(rustix::fs::Gid::from_raw(65534));
    rustix::fs::chown(ws.dir.path(), nobody, group).expect("chown");
    for entry in std::fs::read_dir(ws.dir.path()).expect("list") {
        rustix::fs::chown(entry.expect("entry").path(), nobody, group).expect("chown");
    }
    let socket = format!("/run/localkms-test-{}/kms.sock", std::process::id());
    let out = Command::new(bin())
        .args(["serve", "--check-config", "--socket", &socket])
        .args(ws.keystore_args())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("uid 65534")
            && text.contains("/run")
            && text.contains("--socket in a directory this user owns"),
        "{text}"
    );
}
