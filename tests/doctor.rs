//! `localkms doctor` on a real node layout: a running plugin, its keystore, an
//! EncryptionConfiguration and a kube-apiserver manifest written for it (good, then each kind
//! of bad), as the release binary sees them.

mod common;

use std::path::Path;
use std::process::Output;

use common::{localkms, Workspace};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The shipped configuration and manifest fixture, pointed at `socket` and `config`.
fn layout(dir: &Path, socket: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = dir.join("enc/encryption-config.yaml");
    std::fs::create_dir_all(config.parent().expect("parent")).expect("mkdir");
    let shipped = include_str!("../deploy/kubernetes/encryption-config.yaml");
    std::fs::write(
        &config,
        shipped.replace("/var/run/localkms/kms.sock", s(socket)),
    )
    .expect("write config");
    let manifest = dir.join("kube-apiserver.yaml");
    let fixture = include_str!("fixtures/doctor/kube-apiserver.yaml");
    std::fs::write(
        &manifest,
        fixture
            .replace("/etc/kubernetes/enc", s(config.parent().expect("dir")))
            .replace("/var/run/localkms", s(socket.parent().expect("dir"))),
    )
    .expect("write manifest");
    (config, manifest)
}

#[test]
fn a_healthy_node_passes_and_each_fault_is_named_with_its_fix() {
    let ws = Workspace::new();
    let (config, manifest) = layout(ws.dir.path(), &ws.socket);
    let mut server = ws.serve();
    let ks = ws.keystore_args();
    let doctor = |extra: &[&str]| {
        let mut args = vec![
            "doctor",
            "--encryption-config",
            s(&config),
            "--apiserver-manifest",
            s(&manifest),
        ];
        args.extend(ks.iter().map(String::as_str));
        args.extend_from_slice(extra);
        localkms(&args)
    };
    let out = doctor(&[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains('✗'), "{t}");
    for needle in [
        "parses as an EncryptionConfiguration",
        "is first: every new write is encrypted",
        "reads --encryption-provider-config=",
        "plugin socket",
        "answers Status",
        "is owned by this user and private",
        "days old",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in\n{t}");
    }

    // Rotation overdue.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = doctor(&["--rotate-after", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("fix: rotate"), "{}", text(&out));

    // identity first: nothing is encrypted.
    let good = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        good.replacen("      - kms:", "      - identity: {}\n      - kms:", 1),
    )
    .expect("write");
    let t = text(&doctor(&[]));
    assert!(
        t.contains("✗ identity is listed before") && t.contains("fix: move"),
        "{t}"
    );
    std::fs::write(&config, &good).expect("write");

    // The socket directory is not mounted into the apiserver.
    let m = std::fs::read_to_string(&manifest).expect("read");
    let unmounted: String = m
        .lines()
        .filter(|l| !l.contains("name: localkms-socket"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&manifest, unmounted).expect("write");
    let t = text(&doctor(&[]));
    assert!(
        t.contains("✗ no volumeMount of kube-apiserver covers the plugin socket"),
        "{t}"
    );
    std::fs::write(&manifest, &m).expect("write");

    // The plugin is down.
    server.stop("TERM");
    let out = doctor(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("✗ the plugin does not answer"),
        "{}",
        text(&out)
    );

    // A keystore other users can read.
    std::fs::set_permissions(
        &ws.keystore,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let t = text(&doctor(&[]));
    assert!(t.contains("✗") && t.contains("chmod 600"), "{t}");
}

#[test]
fn doctor_with_nothing_to_check_and_scan_without_tls_refuse_with_what_to_pass() {
    // (Run where kubeadm's files are absent, as on a build machine.)
    if !Path::new("/etc/kubernetes/manifests/kube-apiserver.yaml").exists() {
        let out = localkms(&["doctor"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out).contains("nothing to check"), "{}", text(&out));
    }
    let out = localkms(&["scan", "--etcd-endpoints", "https://192.0.2.1:2379"]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains("without TLS") && t.contains("apiserver-etcd-client"),
        "{t}"
    );
}

/// A 1 KB YAML alias bomb as the configuration or the manifest: a ✗ naming the file, at once,
/// without the memory its expansion would take.
#[test]
fn an_alias_bomb_is_a_cross_not_an_out_of_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (i, prev) in ('b'..='k').zip('a'..='j') {
        bomb.push_str(&format!(
            "{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let path = dir.path().join("bomb.yaml");
    std::fs::write(&path, &bomb).expect("write");
    for flag in ["--encryption-config", "--apiserver-manifest"] {
        let out = localkms(&["doctor", flag, s(&path)]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(
            said.contains("✗") && said.contains(s(&path)) && said.contains("alias bomb"),
            "{flag}: {said}"
        );
    }
}
