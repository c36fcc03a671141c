//! Disaster recovery end to end, with real processes: continuous backups while serving,
//! losing the node, restoring onto a new root key (with the whole identity and with 3 of 5
//! shares), `verify-backup`, tampered and foreign backups, merge conflicts, a killed import,
//! and the standard `age` CLI opening a backup.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{decrypt, encrypt, localkms, status_key_id, Server, Workspace};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "command succeeded but should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `recovery keygen` into `dir`: the identity file and its recipient.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let id = dir.join(name);
    let recipient = ok(&localkms(&["recovery", "keygen", "--out", s(&id)]))
        .trim()
        .to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    (id, recipient)
}

/// `keystore export` of `ws`'s keystore to `recipient` into `out`.
fn export(ws: &Workspace, recipient: &str, out: &Path) -> Output {
    let ks = ws.keystore_args();
    let mut args = vec![
        "keystore",
        "export",
        "--recipient",
        recipient,
        "--out",
        s(out),
    ];
    args.extend(ks.iter().map(String::as_str));
    localkms(&args)
}

/// The newest backup in `dir`.
fn newest_backup(dir: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("backup dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "age"))
        .collect();
    names.sort();
    names.pop().expect("a backup")
}

fn backup_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "age"))
            })
            .count()
        })
        .unwrap_or(0)
}

fn serve_at(ws_dir: &Path, socket: &Path, keystore: &Path, root: &Path, extra: &[&str]) -> Server {
    let mut cmd = Command::new(common::bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(format!("unix://{}", socket.display()))
        .args(["--keystore", s(keystore), "--root-key-file", s(root)])
        .args(extra);
    Server::spawn(
        cmd,
        socket.to_owned(),
        ws_dir.join(format!("serve-{}.log", std::process::id())),
    )
}

/// Waits until the server reports `key_id` other than `old` (it loaded a rotation).
async fn wait_new_primary(endpoint: &str, old: &str) -> String {
    let start = Instant::now();
    loop {
        let now = status_key_id(endpoint).await;
        if now != old {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every saved (ciphertext, key id, plaintext) decrypts through `endpoint`; returns failures.
async fn failures(endpoint: &str, saved: &[(Vec<u8>, String, Vec<u8>)]) -> usize {
    let mut failed = 0;
    for (ct, key_id, plain) in saved {
        match decrypt(endpoint, ct, key_id).await {
            Ok(p) if &p == plain => {}
            _ => failed += 1,
        }
    }
    failed
}

/// `keystore import --in BACKUP --identity IDENTITY`, for the caller to add the target to.
fn import_args<'a>(backup: &'a Path, identity: &'a Path) -> Vec<&'a str> {
    vec![
        "keystore",
        "import",
        "--in",
        s(backup),
        "--identity",
        s(identity),
    ]
}

/// A backup's decrypted JSON, opened with the library as `keystore import` opens it.
fn open_backup(backup: &Path, identity: &Path) -> serde_json::Value {
    use localkms::recovery::sealing;
    let opener = sealing::read_identity_file(identity).expect("identity");
    let plain =
        sealing::open(backup, &std::fs::read(backup).expect("read"), &opener).expect("open");
    serde_json::from_slice(&plain).expect("json")
}

/// Imports `backup` with `identity` into a fresh keystore under a fresh root key in `dir`.
fn import_fresh(dir: &Path, backup: &Path, identity: &Path) -> (PathBuf, PathBuf) {
    let keystore = dir.join("restored/keystore.lkms");
    let root = dir.join("restored/root.key");
    let mut args = import_args(backup, identity);
    args.extend(["--keystore", s(&keystore), "--root-key-file", s(&root)]);
    let out = ok(&localkms(&args));
    assert!(out.contains("restored"), "{out}");
    (keystore, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_lose_the_node_and_restore_every_key_from_backups() {
    let ws = Workspace::new();
    let offsite = tempfile::tempdir().expect("offsite");
    let backups = offsite.path().join("backups");
    let (identity, recipient) = keygen(offsite.path(), "identity.txt");
    let backup_flags = [
        "--backup-dir",
        s(&backups),
        "--backup-recipient",
        &recipient,
    ];
    let mut server = ws.serve_with(&backup_flags);
    let endpoint = server.endpoint();
    assert_eq!(backup_count(&backups), 1, "a backup is written at start");

    let mut saved = Vec::new();
    let mut key_id = status_key_id(&endpoint).await;
    let mut before_last_rotation = None;
    for phase in 0..4u8 {
        for i in 0..50u8 {
            let plain = vec![phase, i, 0xAB, 0xCD];
            let (ct, kid) = encrypt(&endpoint, &plain).await;
            saved.push((ct, kid, plain));
        }
        if phase < 3 {
            before_last_rotation = Some(newest_backup(&backups));
            ok(&ws.keys(&["rotate"]));
            key_id = wait_new_primary(&endpoint, &key_id).await;
        }
    }
    let stale = before_last_rotation.expect("a backup before the last rotation");
    let stale_copy = offsite.path().join("stale.age");
    std::fs::copy(&stale, &stale_copy).expect("copy");

    // One root-key rotation; the server restarts on the new key and backs it up.
    server.stop("TERM");
    let new_root = ws.dir.path().join("root2.key");
    ok(&localkms(&[
        "root-key",
        "rotate",
        "--keystore",
        s(&ws.keystore),
        "--root-key-file",
        s(&ws.root_key),
        "--new-root-key-file",
        s(&new_root),
    ]));
    let mut server = serve_at(
        ws.dir.path(),
        &ws.socket,
        &ws.keystore,
        &new_root,
        &backup_flags,
    );
    assert_eq!(status_key_id(&server.endpoint()).await, key_id);
    let metrics_gen = ok(&localkms(&[
        "keystore",
        "verify",
        "--keystore",
        s(&ws.keystore),
        "--root-key-file",
        s(&new_root),
    ]));
    let generation: u64 = metrics_gen
        .lines()
        .find_map(|l| l.strip_prefix("generation: "))
        .and_then(|g| g.trim().parse().ok())
        .expect("generation");
    let newest = newest_backup(&backups);
    assert!(
        newest
            .display()
            .to_string()
            .ends_with(&format!("{generation:020}.age")),
        "newest backup {} is not of generation {generation}",
        newest.display()
    );

    // verify-backup: the newest covers everything; one made before the last rotation is
    // behind (exit 5) and names the missing key.
    let verify = |backup: &Path| {
        localkms(&[
            "keystore",
            "verify-backup",
            "--in",
            s(backup),
            "--identity",
            s(&identity),
            "--keystore",
            s(&ws.keystore),
            "--root-key-file",
            s(&new_root),
        ])
    };
    assert!(ok(&verify(&newest)).starts_with("ok:"));
    let behind = verify(&stale_copy);
    assert_eq!(
        behind.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&behind.stderr)
    );
    let why = String::from_utf8_lossy(&behind.stderr);
    assert!(why.contains("behind") && why.contains(&key_id), "{why}");

    // The node is lost: keystore, root keys, usage and marks all gone.
    server.stop("TERM");
    let lost = ws.dir.path().to_owned();
    for entry in std::fs::read_dir(&lost).expect("dir") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            std::fs::remove_file(&p).expect("rm");
        }
    }
    drop(ws);

    // Restore with the identity, on a new node with a new root key; everything decrypts.
    let node_b = tempfile::tempdir().expect("node b");
    let (keystore, root) = import_fresh(node_b.path(), &newest, &identity);
    let socket = node_b.path().join("kms.sock");
    let mut restored = serve_at(node_b.path(), &socket, &keystore, &root, &[]);
    assert_eq!(status_key_id(&restored.endpoint()).await, key_id);
    assert_eq!(failures(&restored.endpoint(), &saved).await, 0);
    restored.stop("TERM");

    // The same restore with split custody: 3 of 5 shares rebuild the identity, 2 do not.
    let shares_dir = offsite.path().join("shares");
    let listed = ok(&localkms(&[
        "recovery",
        "split",
        "--identity",
        s(&identity),
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out-dir",
        s(&shares_dir),
    ]));
    let shares: Vec<&str> = listed.lines().collect();
    assert_eq!(shares.len(), 5);
    std::fs::remove_file(&identity).expect("identity leaves the machine");
    let two = offsite.path().join("two.txt");
    let refused = err(&localkms(&[
        "recovery",
        "combine",
        "--out",
        s(&two),
        shares[0],
        shares[3],
    ]));
    assert!(refused.contains("needs 3 of 5"), "{refused}");
    assert!(!two.exists());
    let rebuilt = offsite.path().join("rebuilt.txt");
    let back = ok(&localkms(&[
        "recovery",
        "combine",
        "--out",
        s(&rebuilt),
        shares[4],
        shares[1],
        shares[2],
    ]));
    assert_eq!(back.trim(), recipient);
    let node_c = tempfile::tempdir().expect("node c");
    let (keystore, root) = import_fresh(node_c.path(), &newest, &rebuilt);
    let socket = node_c.path().join("kms.sock");
    let mut restored = serve_at(node_c.path(), &socket, &keystore, &root, &[]);
    assert_eq!(failures(&restored.endpoint(), &saved).await, 0);
    restored.stop("TERM");
}

#[test]
fn bad_backups_wrong_identities_and_foreign_keystores_are_refused_without_writing() {
    let ws = Workspace::new();
    let (identity, recipient) = keygen(ws.dir.path(), "id.txt");
    let (other_identity, _) = keygen(ws.dir.path(), "other.txt");
    let backup = ws.dir.path().join("b.age");
    let ks = ws.keystore_args();
    let ks: Vec<&str> = ks.iter().map(String::as_str).collect();
    ok(&export(&ws, &recipient, &backup));
    // Never overwritten without --force; the identity file neither.
    assert!(err(&export(&ws, &recipient, &backup)).contains("--force"));
    // Written, then stdout is full: exit 4, and the file and recipient are on stderr.
    let id2 = ws.dir.path().join("id2.txt");
    let full = Command::new(common::bin())
        .args(["recovery", "keygen", "--out", s(&id2)])
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .expect("run");
    assert_eq!(full.status.code(), Some(4));
    let why = String::from_utf8_lossy(&full.stderr);
    assert!(
        why.contains("committed: wrote recovery identity") && why.contains("age1"),
        "{why}"
    );
    assert!(id2.exists());
    assert!(
        err(&localkms(&["recovery", "keygen", "--out", s(&identity)])).contains("already exists")
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let target = ws.dir.path().join("new/ks.lkms");
    let target_root = ws.dir.path().join("new/root.key");
    let import = |input: &Path, id: &Path| {
        let mut args = import_args(input, id);
        args.extend(["--keystore", s(&target), "--root-key-file", s(&target_root)]);
        localkms(&args)
    };
    let e = err(&import(&backup, &other_identity));
    assert!(
        e.contains(s(&backup)) && e.contains("no identity given opens it"),
        "{e}"
    );

    let bytes = std::fs::read(&backup).expect("read");
    let tampered = ws.dir.path().join("tampered.age");
    let mut t = bytes.clone();
    let n = t.len() - 10;
    t[n] ^= 0x01;
    std::fs::write(&tampered, &t).expect("write");
    let e = err(&import(&tampered, &identity));
    assert!(e.contains("tampered") || e.contains("damaged"), "{e}");
    let truncated = ws.dir.path().join("truncated.age");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let e = err(&import(&truncated, &identity));
    assert!(e.contains("truncated") || e.contains("damaged"), "{e}");
    assert!(!target.exists(), "a failed import leaves no keystore");

    // A backup of another keystore is refused when merging into this one, unless allowed.
    let other = Workspace::new();
    let other_backup = ws.dir.path().join("other.age");
    ok(&export(&other, &recipient, &other_backup));
    let mut merge = import_args(&other_backup, &identity);
    merge.push("--merge");
    merge.extend(&ks);
    let e = err(&localkms(&merge));
    assert!(e.contains("--allow-different-keystore"), "{e}");
    merge.push("--allow-different-keystore");
    let out = ok(&localkms(&merge));
    assert!(out.contains("1 key(s) added"), "{out}");
    // Importing it over the existing keystore is refused: it exists.
    let mut over = import_args(&backup, &identity);
    over.extend(&ks);
    assert!(err(&localkms(&over)).contains("already exists"));
}

#[test]
fn a_merge_with_the_same_key_id_and_other_material_is_refused() {
    use localkms::recovery::sealing;
    let ws = Workspace::new();
    let (identity, recipient) = keygen(ws.dir.path(), "id.txt");
    let backup = ws.dir.path().join("b.age");
    let ks = ws.keystore_args();
    let ks: Vec<&str> = ks.iter().map(String::as_str).collect();
    ok(&export(&ws, &recipient, &backup));
    // Forge a backup: same key id, other material, sealed to the same recipient.
    let mut doc = open_backup(&backup, &identity);
    doc["keys"][0]["material"] = serde_json::Value::String(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        [7u8; 32],
    ));
    let forged = ws.dir.path().join("forged.age");
    let to = sealing::Recipients::Keys(vec![sealing::parse_recipient(&recipient).expect("r")]);
    std::fs::write(
        &forged,
        sealing::seal(doc.to_string().as_bytes(), &to).expect("seal"),
    )
    .expect("write");
    let before = std::fs::read(&ws.keystore).expect("read");
    let mut merge = import_args(&forged, &identity);
    merge.push("--merge");
    merge.extend(&ks);
    let e = err(&localkms(&merge));
    assert!(e.contains("DIFFERENT material"), "{e}");
    assert_eq!(
        std::fs::read(&ws.keystore).expect("read"),
        before,
        "nothing written"
    );
    // verify-backup says it does not match (exit 1, not "behind").
    let mut verify = vec![
        "keystore",
        "verify-backup",
        "--in",
        s(&forged),
        "--identity",
        s(&identity),
    ];
    verify.extend(&ks);
    let out = localkms(&verify);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does NOT match"));
}

#[test]
fn an_import_killed_midway_never_leaves_a_keystore_that_opens_incomplete() {
    let ws = Workspace::new();
    let (identity, recipient) = keygen(ws.dir.path(), "id.txt");
    for _ in 0..2 {
        ok(&ws.keys(&["rotate"]));
    }
    let backup = ws.dir.path().join("b.age");
    ok(&export(&ws, &recipient, &backup));
    // A passphrase root key makes the import spend most of its time in Argon2 and the write,
    // so the kills land before, during and after the write.
    let pass = ws.dir.path().join("pass");
    std::fs::write(&pass, "a long enough passphrase\n").expect("write");
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let mut completed = 0;
    for i in 0..12u64 {
        let target = ws.dir.path().join(format!("kill-{i}/ks.lkms"));
        let mut child = Command::new(common::bin())
            .args(import_args(&backup, &identity))
            .args(["--keystore", s(&target), "--passphrase-file", s(&pass)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(i * 40));
        let _ = child.kill();
        let _ = child.wait();
        if target.exists() {
            let out = ok(&localkms(&[
                "keystore",
                "verify",
                "--keystore",
                s(&target),
                "--passphrase-file",
                s(&pass),
            ]));
            assert_eq!(
                out.matches("key: ").count(),
                3,
                "a complete keystore: {out}"
            );
            completed += 1;
        }
    }
    eprintln!("{completed} of 12 imports completed before the kill");
}

#[test]
fn the_age_cli_opens_a_backup() {
    if std::process::Command::new("age")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("LOCALKMS_REQUIRE_AGE").is_none(),
            "LOCALKMS_REQUIRE_AGE is set but the age CLI is not installed"
        );
        eprintln!("SKIPPED: the age CLI is not installed (apt-get install age)");
        return;
    }
    let ws = Workspace::new();
    let (identity, recipient) = keygen(ws.dir.path(), "id.txt");
    let backup = ws.dir.path().join("b.age");
    ok(&export(&ws, &recipient, &backup));
    let out = Command::new("age")
        .args(["-d", "-i", s(&identity), s(&backup)])
        .output()
        .expect("age");
    let json: serde_json::Value = serde_json::from_slice(&ok_age(&out)).expect("json");
    assert_eq!(json["format"], "localkms-keystore-export");
    assert_eq!(json["version"], 1);
    assert_eq!(json["keys"][0]["state"], "primary");
    assert!(json["keys"][0]["material"]
        .as_str()
        .is_some_and(|m| m.len() == 44));
}

fn ok_age(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

#[test]
fn a_failed_backup_is_logged_counted_and_retried_and_serving_goes_on_without_leaking_keys() {
    let ws = Workspace::new();
    let (identity, recipient) = keygen(ws.dir.path(), "id.txt");
    let backups = ws.dir.path().join("backups");
    std::fs::write(&backups, b"in the way").expect("write");
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = ws.serve_with(&[
        "--backup-dir",
        s(&backups),
        "--backup-recipient",
        &recipient,
        "--metrics-addr",
        &addr,
        "--log-level",
        "debug",
    ]);
    assert!(common::blocking_status_ok(&ws.socket));
    server.wait_log("keystore backup FAILED");
    let (_, metrics) = common::http_get(port, "/metrics");
    assert!(
        metrics.contains("localkms_backup_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("localkms_backup_generation 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("localkms_keystore_generation 1"),
        "{metrics}"
    );

    // The cause goes away: the server retries on its own (every 10 s), no key change needed.
    std::fs::remove_file(&backups).expect("rm");
    let start = Instant::now();
    loop {
        let (_, metrics) = common::http_get(port, "/metrics");
        if metrics.contains("localkms_backup_generation 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "backup never retried: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    server.stop("TERM");

    // No key material in the (debug) log.
    let log = server.log_text();
    let backup = newest_backup(&backups);
    let doc = open_backup(&backup, &identity);
    let material = doc["keys"][0]["material"]
        .as_str()
        .expect("material")
        .to_owned();
    assert!(!log.contains(&material), "key material in the log");
}

/// An export killed mid-write (SIGKILL) leaves its temp file beside the output; the next
/// export of that file removes it, and leaves other files' temp files alone.
#[test]
fn an_export_removes_the_temp_file_a_killed_export_left() {
    let ws = Workspace::new();
    let (_identity, recipient) = keygen(ws.dir.path(), "id.txt");
    let backup = ws.dir.path().join("b.age");
    let stale = ws.dir.path().join(".b.age.Xk3jQ9.tmp");
    let other = ws.dir.path().join(".other.age.Zz81aa.tmp");
    std::fs::write(&stale, b"half an export").expect("stale");
    std::fs::write(&other, b"someone else's").expect("other");
    ok(&export(&ws, &recipient, &backup));
    assert!(
        !stale.exists(),
        "the stale temp file of this export was removed"
    );
    assert!(other.exists(), "another file's temp file is not touched");
    assert!(backup.is_file());
}

/// Three good shares and a damaged fourth (K = 3): the identity is rebuilt from the good ones
/// and the damaged share is named; an altered threshold line is named as altered.
#[test]
fn combine_rebuilds_from_any_k_good_shares_and_names_the_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = keygen(dir.path(), "id.txt");
    let shares_dir = dir.path().join("shares");
    let listed = ok(&localkms(&[
        "recovery",
        "split",
        "--identity",
        s(&identity),
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out-dir",
        s(&shares_dir),
    ]));
    let shares: Vec<String> = listed.lines().map(str::to_owned).collect();
    // Damage share 2's data (flip one base64 character) and alter share 4's threshold.
    let text = std::fs::read_to_string(&shares[1]).expect("read");
    let data_line = text
        .lines()
        .find(|l| l.starts_with("data: "))
        .expect("data");
    let mut chars: Vec<char> = data_line.chars().collect();
    let at = 10;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    let damaged: String = chars.into_iter().collect();
    std::fs::write(&shares[1], text.replace(data_line, &damaged)).expect("damage");
    let text = std::fs::read_to_string(&shares[3]).expect("read");
    std::fs::write(&shares[3], text.replace("threshold: 3", "threshold: 2")).expect("alter");

    let out_file = dir.path().join("rebuilt.txt");
    let out = localkms(&[
        "recovery",
        "combine",
        "--out",
        s(&out_file),
        &shares[0],
        &shares[1],
        &shares[2],
        &shares[3],
        &shares[4],
    ]);
    assert_eq!(ok(&out).trim(), recipient);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("left out {}: damaged", shares[1]))
            && said.contains(&format!("left out {}: altered", shares[3])),
        "{said}"
    );
}
