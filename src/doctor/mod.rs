//! `localkms doctor`: diagnose a control-plane node. Each check prints ✓ or ✗, and every ✗
//! says how to fix it: the encryption configuration ([`config`]), the apiserver manifest
//! ([`manifest`]), the running plugin, the keystore and root-key files, the primary's age,
//! backups, and etcd-node convergence.

pub mod config;
pub mod manifest;
mod yaml_bounds;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::keystore::{EtcdTls, KeyState, KeystoreLocation, RootKeyProvider, RootKeySource, Store};

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// It holds.
    Pass(String),
    /// It does not; `fix` says what to do.
    Fail {
        /// What is wrong.
        what: String,
        /// What to do.
        fix: String,
    },
    /// Not checked, and why.
    Skip(String),
}

impl Check {
    /// A passing check.
    pub fn pass(what: impl Into<String>) -> Self {
        Check::Pass(what.into())
    }

    /// A failing check and its fix.
    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::Fail {
            what: what.into(),
            fix: fix.into(),
        }
    }

    /// Not a failure.
    pub fn ok(&self) -> bool {
        !matches!(self, Check::Fail { .. })
    }

    /// The printed line(s).
    pub fn line(&self) -> String {
        match self {
            Check::Pass(w) => format!("✓ {w}"),
            Check::Fail { what, fix } => format!("✗ {what}\n    fix: {fix}"),
            Check::Skip(w) => format!("- {w}"),
        }
    }
}

/// What to check.
#[derive(Default)]
pub struct DoctorRequest {
    /// The apiserver's EncryptionConfiguration.
    pub encryption_config: Option<PathBuf>,
    /// The kube-apiserver static-pod manifest.
    pub apiserver_manifest: Option<PathBuf>,
    /// The plugin's socket (default: the endpoint the configuration names).
    pub socket: Option<String>,
    /// The keystore, its root key and etcd TLS.
    pub keystore: Option<(KeystoreLocation, RootKeySource, EtcdTls)>,
    /// Rotation is overdue after this long (the plugin's --rotate-after, or 90 days).
    pub rotate_after: Duration,
    /// `serve --backup-dir`, to check backups are current.
    pub backup_dir: Option<PathBuf>,
    /// A `localkms scan --json` report, to catch a renamed provider.
    pub scan_report: Option<PathBuf>,
}

fn read_text(path: &Path, what: &str) -> Result<String, Check> {
    crate::keystore::read_regular(path, 4 * 1024 * 1024)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| {
            Check::fail(
                format!("cannot read {what} {}: {e}", path.display()),
                format!(
                    "check the path (and run as a user who can read {})",
                    path.display()
                ),
            )
        })
}

/// KMS provider names found in a scan report's formats (`kms:v2:NAME`, `kms:v1:NAME`).
fn stored_provider_names(report: &Path) -> Result<Vec<String>, Check> {
    let text = read_text(report, "scan report")?;
    let report: crate::scan::ScanReport = serde_json::from_str(&text).map_err(|e| {
        Check::fail(
            format!(
                "{} is not a `localkms scan --json` report ({e})",
                report.display()
            ),
            "make one with `localkms scan … --json > scan.json`",
        )
    })?;
    let mut names: Vec<String> = report
        .formats
        .keys()
        .filter_map(|f| {
            f.strip_prefix("kms:v2:")
                .or_else(|| f.strip_prefix("kms:v1:"))
        })
        .map(|n| n.trim_end_matches(" (malformed)").to_owned())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Runs every check the request allows, in order.
pub async fn run(req: &DoctorRequest) -> Vec<Check> {
    let mut out = Vec::new();
    let stored = match &req.scan_report {
        Some(r) => match stored_provider_names(r) {
            Ok(n) => Some(n),
            Err(c) => {
                out.push(c);
                None
            }
        },
        None => None,
    };
    let mut facts = config::ConfigFacts::default();
    match &req.encryption_config {
        Some(path) => match read_text(path, "encryption configuration") {
            Ok(text) => {
                let (checks, f) = config::check(&text, path, req.socket.as_deref(), stored.as_deref());
                out.extend(checks);
                facts = f;
            }
            Err(c) => out.push(c),
        },
        None => out.push(Check::Skip(
            "encryption configuration not checked (pass --encryption-config /etc/kubernetes/enc/encryption-config.yaml)".into(),
        )),
    }
    let socket = req
        .socket
        .as_deref()
        .map(config::socket_of_endpoint)
        .or(facts.socket.clone());
    match &req.apiserver_manifest {
        Some(path) => match read_text(path, "apiserver manifest") {
            Ok(text) => out.extend(manifest::check(
                &text,
                path,
                req.encryption_config
                    .as_deref()
                    .and_then(Path::to_str),
                socket.as_deref().filter(|s| !s.starts_with('@')),
            )),
            Err(c) => out.push(c),
        },
        None => out.push(Check::Skip(
            "apiserver manifest not checked (pass --apiserver-manifest /etc/kubernetes/manifests/kube-apiserver.yaml)".into(),
        )),
    }
    let serving = match &socket {
        Some(s) => plugin(s, &mut out).await,
        None => {
            out.push(Check::Skip(
                "plugin not checked (pass --socket, or --encryption-config to find it)".into(),
            ));
            None
        }
    };
    match &req.keystore {
        Some((location, source, tls)) => {
            keystore(location, source, tls, req, serving.as_deref(), &mut out).await
        }
        None => out.push(Check::Skip(
            "keystore not checked (pass --keystore K --root-key-file R)".into(),
        )),
    }
    out
}

/// Status over the socket; returns the key_id served.
async fn plugin(socket: &str, out: &mut Vec<Check>) -> Option<String> {
    let status = tokio::time::timeout(Duration::from_secs(5), crate::client::status(socket)).await;
    match status {
        Ok(Ok(s)) if s.healthz == "ok" && !s.key_id.is_empty() => {
            out.push(Check::pass(format!(
                "the plugin answers Status on {socket}: healthz ok, version {}, key_id {}",
                s.version, s.key_id
            )));
            if s.version != "v2" && s.version != "v2beta1" {
                out.push(Check::fail(
                    format!("the plugin reports version {:?}; kube-apiserver expects v2 (1.29+) or v2beta1 (1.27–1.28)", s.version),
                    "set --status-version to match the Kubernetes version",
                ));
            }
            Some(s.key_id)
        }
        Ok(Ok(s)) => {
            out.push(Check::fail(
                format!(
                    "the plugin on {socket} is unhealthy: healthz {:?}, key_id {:?}",
                    s.healthz, s.key_id
                ),
                "read its log; `localkms keys list` shows whether the keystore has a primary",
            ));
            None
        }
        Ok(Err(e)) => {
            out.push(Check::fail(
                format!("the plugin does not answer on {socket}: {e}"),
                "start it (systemctl status localkms, or the localkms static pod) and check the socket path matches its --socket",
            ));
            None
        }
        Err(_) => {
            out.push(Check::fail(
                format!("the plugin on {socket} did not answer Status within 5 s"),
                "check its log and load; kube-apiserver gives up after the provider's timeout",
            ));
            None
        }
    }
}

async fn keystore(
    location: &KeystoreLocation,
    source: &RootKeySource,
    tls: &EtcdTls,
    req: &DoctorRequest,
    serving: Option<&str>,
    out: &mut Vec<Check>,
) {
    let store = match Store::open(location, tls) {
        Ok(s) => s,
        Err(e) => return out.push(Check::fail(e.to_string(), "fix the --keystore argument")),
    };
    match store.check_private() {
        Ok(()) if !store.is_shared() => out.push(Check::pass(format!(
            "keystore {location} is owned by this user and private"
        ))),
        Ok(()) => {}
        Err(e) => out.push(Check::fail(
            e.to_string(),
            format!("chown and `chmod 600` {location}"),
        )),
    }
    let root = match RootKeyProvider::open(source) {
        Ok(r) => {
            out.push(Check::pass(format!(
                "root key {} is owned by this user and private",
                source.path().display()
            )));
            r
        }
        Err(e) => {
            return out.push(Check::fail(
                e.to_string(),
                format!("chown and `chmod 600` {}", source.path().display()),
            ))
        }
    };
    let ks = match store.load(&root).await {
        Ok(ks) => {
            out.push(Check::pass(format!(
                "keystore {location} opens (generation {})",
                ks.generation()
            )));
            ks
        }
        Err(e) => {
            return out.push(Check::fail(
                e.to_string(),
                "see the message; `localkms keystore verify` shows the same",
            ))
        }
    };
    // Which upgrade protections are on: those that need this release's keystore format only
    // once the upgrade is finalized.
    if ks.finalized() {
        out.push(Check::pass(format!(
            "keystore {location} is finalized for localkms {} (format {}): a node that has served it refuses an old-format copy",
            crate::release::VERSION,
            crate::keystore::format::FORMAT_VERSION
        )));
    } else {
        out.push(Check::Skip(format!(
            "the upgrade to localkms {} is not finalized: keystore {location} is in release {}'s format ({}), so either release can serve it; the old-format-copy refusal is off until `localkms upgrade finalize`",
            crate::release::VERSION,
            crate::release::PREVIOUS,
            crate::keystore::format::PRE_FINALIZE_FORMAT
        )));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(p) = ks.primary() {
        let age = Duration::from_secs(u64::try_from(now.saturating_sub(p.changed_at)).unwrap_or(0));
        let days = age.as_secs() / 86_400;
        if age >= req.rotate_after {
            out.push(Check::fail(
                format!("the primary {} is {days} days old, older than {}", p.id, humantime::format_duration(req.rotate_after)),
                "rotate: `localkms keys rotate` (HA: --stage, then promote), then rewrite and scan (README: Rotation, end to end)",
            ));
        } else {
            out.push(Check::pass(format!(
                "the primary {} is {days} days old",
                p.id
            )));
        }
        if let Some(served) = serving {
            if !ks
                .records()
                .iter()
                .any(|r| r.id.as_str() == served && r.state != KeyState::Destroyed)
            {
                out.push(Check::fail(
                    format!("the plugin serves key_id {served}, which this keystore does not hold"),
                    "the plugin serves another keystore: check its --keystore",
                ));
            } else if served != p.id.as_str() {
                out.push(Check::fail(
                    format!("the plugin still serves {served} as primary; the keystore's primary is {}", p.id),
                    "the plugin has not loaded the latest change: check its log for a refused reload, or send it SIGHUP",
                ));
            }
        }
    }
    if let Some(dir) = &req.backup_dir {
        match crate::recovery::backup::list(dir) {
            Ok(list) => match list.first() {
                Some((g, path)) if *g >= ks.generation() => out.push(Check::pass(format!(
                    "the newest backup {} is of the current generation {}",
                    path.display(),
                    ks.generation()
                ))),
                Some((g, _)) => out.push(Check::fail(
                    format!("the newest backup in {} is of generation {g}; the keystore is at {}", dir.display(), ks.generation()),
                    "check the plugin log for `keystore backup FAILED`; a running plugin retries every 10 s",
                )),
                None => out.push(Check::fail(
                    format!("no backups in {}", dir.display()),
                    "run the plugin with --backup-dir and --backup-recipient (README: Backup and recovery)",
                )),
            },
            Err(e) => out.push(Check::fail(
                format!("cannot list backups in {}: {e}", dir.display()),
                "check --backup-dir",
            )),
        }
    }
    if store.is_shared() {
        match store.nodes(&root).await {
            Ok(Some(nodes)) => match nodes.survey().await {
                Ok(survey) => {
                    let blockers = survey.blockers(crate::release::KEY_CHANGE_NEEDS);
                    if blockers.is_empty() {
                        out.push(Check::pass(format!(
                            "every known node ({}) is live with a verified record",
                            survey.known.len()
                        )));
                    } else {
                        for b in &blockers {
                            out.push(Check::fail(
                                b.to_string(),
                                "promote and destroy are refused until it is fixed (README: Upgrading, one node at a time)",
                            ));
                        }
                    }
                    let list = survey.live;
                    let behind: Vec<String> = list
                        .iter()
                        .filter(|n| n.generation != ks.generation())
                        .map(|n| format!("{} (generation {})", n.node, n.generation))
                        .collect();
                    if list.is_empty() {
                        out.push(Check::fail(
                            "no plugin is reporting to this etcd keystore",
                            "start the plugins; `localkms nodes` lists them",
                        ));
                    } else if behind.is_empty() {
                        out.push(Check::pass(format!(
                            "all {} node(s) have loaded generation {}",
                            list.len(),
                            ks.generation()
                        )));
                    } else {
                        out.push(Check::fail(
                            format!("node(s) {} have not loaded generation {}", behind.join(", "), ks.generation()),
                            "check those nodes' plugins (`localkms nodes`, their logs); do not promote a staged key until they converge",
                        ));
                    }
                }
                Err(e) => out.push(Check::fail(e.to_string(), "check etcd")),
            },
            Ok(None) => {}
            Err(e) => out.push(Check::fail(e.to_string(), "check etcd")),
        }
    }
}
