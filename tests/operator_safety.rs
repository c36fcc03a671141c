//! What an operator's commands must never do: destroy a key on missing evidence, lose a
//! committed change's answer to a full or closed stdout, or greet a first run with a riddle.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, decrypt, encrypt, localkms, Workspace};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn keys_with(ws: &Workspace, sub: &[&str], stdout: Stdio) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("keys").args(sub).args(ws.keystore_args());
    cmd.stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run")
}

fn generation(ws: &Workspace) -> u64 {
    let ks = ws.keystore_args();
    let out = localkms(&["keystore", "verify", &ks[0], &ks[1], &ks[2], &ks[3]]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("generation: ")?.parse().ok())
        .expect("generation")
}

/// `localkms serve` on `ws`'s socket and keystore, not yet started.
fn serve_command(ws: &Workspace) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&ws.socket)
        .args(ws.keystore_args());
    cmd
}

/// A workspace rotated once; returns it and the now-retired first key.
fn rotated_workspace() -> (Workspace, String) {
    let ws = Workspace::new();
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing: serde_json::Value =
        serde_json::from_slice(&ws.keys(&["list", "--json"]).stdout).expect("json");
    let old = listing["keys"][0]["id"].as_str().expect("id").to_owned();
    (ws, old)
}

/// The reproduction from the field: encrypt once, rotate, stop the server, destroy the old key
/// seconds after it was primary. Under KMS v2 the apiserver rarely calls Decrypt, so "no
/// decrypts" proved nothing, and the ciphertext became unreadable. Now destroy refuses, names
/// the evidence it lacks, and the ciphertext still decrypts.
#[tokio::test(flavor = "multi_thread")]
async fn destroy_refuses_a_key_that_was_primary_moments_ago() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let ep = server.endpoint();
    let (ct, old) = encrypt(&ep, &[7u8; 32]).await;
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.stop("TERM").code(), Some(0));

    let out = ws.keys(&["destroy", &old]);
    assert!(!out.status.success(), "destroyed a key that protects data");
    let m = text(&out);
    for needle in [
        "destroy refused",
        "7d ",
        "--min-retired-age",
        "kubectl replace",
        "keys disable",
        "--force",
    ] {
        assert!(m.contains(needle), "{needle} missing: {m}");
    }
    // disable is the reversible first step, and says so.
    let out = ws.keys(&["disable", &old]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("reversible"), "{}", text(&out));
    assert!(!ws.keys(&["destroy", &old]).status.success());
    let out = ws.keys(&["enable", &old]);
    assert!(out.status.success(), "{}", text(&out));

    let server = ws.serve();
    assert_eq!(
        decrypt(&server.endpoint(), &ct, &old)
            .await
            .expect("still decrypts"),
        [7u8; 32]
    );
}

/// A corrupt usage file is neither read as zeros nor overwritten: destroy refuses while it is
/// unreadable, and the server moves it aside (with a warning) and counts afresh.
#[test]
fn a_corrupt_usage_file_blocks_destroy_and_is_moved_aside() {
    let (ws, old) = rotated_workspace();
    let usage = {
        let mut p = ws.keystore.as_os_str().to_owned();
        p.push(".usage.json");
        std::path::PathBuf::from(p)
    };
    let corrupt = format!(r#"{{"written_at":"x","keys":{{"{old}":{{"decrypts":772,"#);
    std::fs::write(&usage, &corrupt).expect("write");

    let out = ws.keys(&["destroy", &old, "--min-retired-age", "1s"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot be read") && text(&out).contains(usage.to_str().expect("utf8")),
        "{}",
        text(&out)
    );

    let mut server = ws.serve();
    assert!(
        server.log_text().contains("moved it aside"),
        "{}",
        server.log_text()
    );
    assert_eq!(server.stop("TERM").code(), Some(0));
    let aside: Vec<_> = std::fs::read_dir(ws.dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".usage.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside");
    assert_eq!(
        std::fs::read_to_string(aside[0].path()).expect("read"),
        corrupt,
        "never overwritten"
    );
    let fresh: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&usage).expect("new usage file")).expect("json");
    assert!(fresh["counting_since_unix"].is_i64(), "{fresh}");
}

/// With the evidence in hand (out of service and decrypt-free for the window, usage counted
/// over all of it), destroy proceeds without --force.
#[test]
fn destroy_proceeds_on_positive_evidence() {
    let (ws, old) = rotated_workspace();
    // A server counts usage for a while; the old key stays unused.
    let mut server = ws.serve();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(server.stop("TERM").code(), Some(0));
    let out = ws.keys(&["destroy", &old, "--min-retired-age", "2s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("destroyed {old}")),
        "{}",
        text(&out)
    );
}

/// `keys rotate >/dev/full` and into a closed pipe: the change is committed, said on stderr
/// first, and the exit code says "committed, but output failed" (4) instead of a panic (101).
/// Read-only commands fail with 1 and a message.
#[test]
fn a_full_or_closed_stdout_loses_no_committed_change() {
    let ws = Workspace::new();
    let before = generation(&ws);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = keys_with(&ws, &["rotate"], Stdio::from(full));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("committed: rotated"), "{err}");
    assert_eq!(generation(&ws), before + 1, "the rotation is committed");
    let new_id = err
        .split("new primary ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("new key id on stderr")
        .to_owned();
    let history = text(&ws.keys(&["history"]));
    assert!(history.contains(&new_id), "{history}");

    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = keys_with(&ws, &["rotate", "--stage"], Stdio::from(writer));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("committed: staged"), "{err}");

    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = keys_with(&ws, &["list"], Stdio::from(writer));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write the output") && !err.contains("panicked"),
        "{err}"
    );

    // status and --version into /dev/full: no panic either.
    for args in [
        vec!["--version"],
        vec!["status", "--socket", "/nonexistent.sock"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = Command::new(bin())
            .args(&args)
            .stdout(Stdio::from(full))
            .output()
            .expect("run");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {}", text(&out));
    }
}

/// `init` into a directory that does not exist creates it (0700) and says so; errors say the OS
/// error once.
#[test]
fn init_creates_missing_directories_and_errors_say_things_once() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let ks = tmp.path().join("etc/localkms/keystore.lkms");
    let rk = tmp.path().join("keys/root.key");
    let out = localkms(&[
        "init",
        "--keystore",
        ks.to_str().expect("utf8"),
        "--root-key-file",
        rk.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    for dir in [ks.parent().expect("dir"), rk.parent().expect("dir")] {
        assert_eq!(std::fs::metadata(dir).expect("dir").mode() & 0o777, 0o700);
        assert!(
            said.contains(&format!("created directory {}", dir.display())),
            "{said}"
        );
    }
    let out = localkms(&[
        "keys",
        "list",
        "--keystore",
        ks.to_str().expect("utf8"),
        "--root-key-file",
        tmp.path().join("missing.key").to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        err.matches("No such file or directory").count() <= 1,
        "the OS error is said twice: {err}"
    );
}

/// One duration syntax, resolvable metrics addresses, boolean env vars, refused zeros and a
/// bogus log level, fatal errors in JSON when logs are JSON, and a traceable --version.
#[test]
fn flags_and_messages_are_consistent() {
    let ws = Workspace::new();
    let server = ws.serve();
    let out = localkms(&["check", "--timeout", "2s", "--socket", &server.endpoint()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = localkms(&[
        "bench",
        "--socket",
        &server.endpoint(),
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for (args, needle) in [
        (
            vec!["bench", "--socket", "x", "--concurrency", "0"],
            "--concurrency",
        ),
        (
            vec!["--log-level", "bogus", "status", "--socket", "x"],
            "bogus",
        ),
    ] {
        let out = localkms(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out).contains(needle), "{}", text(&out));
    }
    let out = Command::new(bin())
        .arg("serve")
        .arg("--check-config")
        .arg("--socket")
        .arg(ws.dir.path().join("other.sock"))
        .args(ws.keystore_args())
        .args(["--metrics-addr", "localhost:0"])
        .env("LOCALKMS_METRICS_ALLOW_NON_LOOPBACK", "yes")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));

    let out = localkms(&[
        "--log-format",
        "json",
        "keys",
        "list",
        "--keystore",
        "/nonexistent/keystore.lkms",
        "--root-key-file",
        ws.root_key.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let line = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(v["level"], "ERROR", "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("/nonexistent/keystore.lkms"),
        "{v}"
    );

    let version = String::from_utf8_lossy(&localkms(&["--version"]).stdout).to_string();
    assert!(
        version.contains("commit ") && version.contains("built 20"),
        "{version}"
    );
}

/// `keys destroy` leaves no copy of the key beside the keystore: every file there that opens
/// with the root key (the keystore and each `.bak.N`) holds only a tombstone for it, and the
/// message says what was done.
#[test]
fn destroy_leaves_no_copy_of_the_key_beside_the_keystore() {
    use localkms::keystore::{self, RootKeyProvider, RootKeySource};
    let (ws, old) = rotated_workspace();
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ws.keys(&["destroy", &old, "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 rewritten without it, 1 removed"),
        "{}",
        text(&out)
    );
    let root = RootKeyProvider::open(&RootKeySource::KeyFile(ws.root_key.clone())).expect("root");
    let mut opened = 0;
    for entry in std::fs::read_dir(ws.dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        let Ok(ks) = keystore::load(&path, &root) else {
            continue;
        };
        opened += 1;
        for r in ks.records() {
            if r.id.as_str() == old {
                assert!(r.material.is_none(), "{} still holds {old}", path.display());
            }
        }
    }
    // The keystore and the two backups that could be kept (the first had it as primary).
    assert_eq!(opened, 3);
}

/// A node never goes back: after serving generation 2, a restored `.bak.1` is refused at the
/// next start with both generations and the override named; `--allow-rollback` then starts
/// (logged) and resets the mark.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_backup_is_refused_at_restart() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let first = common::status_key_id(&server.endpoint()).await;
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    server.wait_log("to=2");
    assert_eq!(server.stop("TERM").code(), Some(0));

    let mut backup = ws.keystore.as_os_str().to_owned();
    backup.push(".bak.1");
    std::fs::copy(std::path::PathBuf::from(backup), &ws.keystore).expect("restore the backup");
    let (status, err) = common::run_to_exit(serve_command(&ws));
    assert!(!status.success(), "a rolled-back keystore was served");
    assert!(
        err.contains("generation 1")
            && err.contains("generation 2")
            && err.contains("--allow-rollback"),
        "{err}"
    );

    let mut server = ws.serve_with(&["--allow-rollback"]);
    assert!(
        server
            .log_text()
            .contains("--allow-rollback: serving an OLDER keystore"),
        "{}",
        server.log_text()
    );
    assert_eq!(common::status_key_id(&server.endpoint()).await, first);
    assert_eq!(server.stop("TERM").code(), Some(0));
    // The mark was reset: a plain start works again.
    let server = ws.serve();
    assert_eq!(common::status_key_id(&server.endpoint()).await, first);
}

/// A keystore from another `init` (another cluster), sealed under the same root key and even
/// at a higher generation, is not the keystore this node served: refused at start and on
/// reload; `--allow-rollback` accepts it deliberately.
#[tokio::test(flavor = "multi_thread")]
async fn a_keystore_from_another_init_is_refused() {
    let ws = Workspace::new();
    let mut server = ws.serve();
    let ours = common::status_key_id(&server.endpoint()).await;
    // Another keystore under the same root key, pushed to a higher generation.
    let other = ws.dir.path().join("other.lkms");
    let rk = ws.root_key.to_str().expect("utf8");
    let o = other.to_str().expect("utf8");
    for args in [
        vec!["init", "--keystore", o, "--root-key-file", rk],
        vec!["keys", "rotate", "--keystore", o, "--root-key-file", rk],
        vec!["keys", "rotate", "--keystore", o, "--root-key-file", rk],
    ] {
        let out = localkms(&args);
        assert!(out.status.success(), "{}", text(&out));
    }
    // Swapped in while serving: the reload is refused.
    std::fs::copy(&other, &ws.keystore).expect("swap");
    server.wait_log("another keystore");
    assert_eq!(common::status_key_id(&server.endpoint()).await, ours);
    assert_eq!(server.stop("TERM").code(), Some(0));
    // And at the next start.
    let (status, err) = common::run_to_exit(serve_command(&ws));
    assert!(!status.success(), "another keystore was served");
    assert!(
        err.contains("another keystore")
            && err.contains("keystore id")
            && err.contains("--allow-rollback"),
        "{err}"
    );
    let server = ws.serve_with(&["--allow-rollback"]);
    assert_ne!(common::status_key_id(&server.endpoint()).await, ours);
}

/// Changes made with the CLI while no server runs raise the node's mark too: a backup
/// restored afterwards is still refused at the next start.
#[test]
fn a_backup_restored_while_no_server_ran_is_refused() {
    let ws = Workspace::new();
    for _ in 0..2 {
        let out = ws.keys(&["rotate"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let mut backup = ws.keystore.as_os_str().to_owned();
    backup.push(".bak.1");
    std::fs::copy(std::path::PathBuf::from(backup), &ws.keystore).expect("restore");
    let out = Command::new(bin())
        .arg("serve")
        .arg("--check-config")
        .arg("--socket")
        .arg(&ws.socket)
        .args(ws.keystore_args())
        .output()
        .expect("check-config");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("generation 1") && text(&out).contains("generation 3"),
        "{}",
        text(&out)
    );
}

/// `serve --check-config` is the preflight of the upgrade runbook: it lists every refusal at
/// once (here a world-writable socket, a non-loopback metrics address and a rolled-back
/// keystore), each with its fix, and exits 1; fixed, it passes.
#[test]
fn check_config_lists_every_refusal_at_once() {
    let ws = Workspace::new();
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut backup = ws.keystore.as_os_str().to_owned();
    backup.push(".bak.1");
    std::fs::copy(std::path::PathBuf::from(backup), &ws.keystore).expect("roll back");
    let check = |extra: &[&str]| {
        Command::new(bin())
            .arg("serve")
            .arg("--check-config")
            .arg("--socket")
            .arg(&ws.socket)
            .args(ws.keystore_args())
            .args(extra)
            .output()
            .expect("check-config")
    };
    let out = check(&["--socket-mode", "0666", "--metrics-addr", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert_eq!(said.matches("  ✗ ").count(), 3, "{said}");
    for needle in [
        "--socket-mode 0666",
        "--metrics-allow-non-loopback",
        "--allow-rollback",
    ] {
        assert!(said.contains(needle), "{needle}: {said}");
    }
    let out = check(&["--allow-rollback"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("  ! --allow-rollback") && said.contains("config ok"),
        "{said}"
    );
}
