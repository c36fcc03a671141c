//! `serve --check-config`: every check `serve` makes before it serves, run to the end rather
//! than stopping at the first refusal, so one run lists everything that would stop a node
//! from starting. The rolling-upgrade runbook makes it the step before each node restarts on
//! a new release: each refusal a release adds is one of these checks, and so is listed here.

use std::fmt::Write as _;
use std::sync::Arc;

use super::{
    check_keystore_file, check_mark, check_metrics_rule, check_mlock, check_socket_exposure,
    check_upgrade_state, endpoints, load_initial, socket, ServeConfig, ServerError,
};
use crate::keyring::usage::UsageTracker;
use crate::keyring::Keyring;
use crate::keystore::{KeystoreError, RootKeyProvider, Store};

/// One line of the report.
enum Finding {
    Ok(String),
    /// Serving goes on, but the operator should know (a protection that is off, an upgrade
    /// not yet finalized).
    Note(String),
    Refused(String),
}

#[derive(Default)]
struct Report(Vec<Finding>);

impl Report {
    fn check(&mut self, ok: impl Into<String>, result: Result<(), ServerError>) -> bool {
        match result {
            Ok(()) => {
                self.0.push(Finding::Ok(ok.into()));
                true
            }
            Err(e) => {
                self.0.push(Finding::Refused(e.to_string()));
                false
            }
        }
    }

    fn note(&mut self, text: impl Into<String>) {
        self.0.push(Finding::Note(text.into()));
    }

    fn refused(&self) -> usize {
        self.0
            .iter()
            .filter(|f| matches!(f, Finding::Refused(_)))
            .count()
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.0 {
            let _ = match f {
                Finding::Ok(t) => writeln!(out, "  ✓ {t}"),
                Finding::Note(t) => writeln!(out, "  ! {t}"),
                Finding::Refused(t) => writeln!(out, "  ✗ {t}"),
            };
        }
        out
    }
}

/// Runs every check; the report, then `config ok: …`, or the report as a
/// [`ServerError::Preflight`] when anything is refused.
pub(super) async fn run(config: &ServeConfig) -> Result<String, ServerError> {
    let mut r = Report::default();
    r.check(
        format!(
            "socket {} with mode {:04o} and its caller rules",
            config.socket.uri(),
            config.socket_mode
        ),
        check_socket_exposure(config),
    );
    if config.allow_world && !config.limits.accept.restricts_peers() {
        r.note("--allow-world: no caller allow list, and the socket is open to every local user or process");
    }
    r.check("--require-mlock", check_mlock(config));
    let metrics_rule = r.check("--metrics-addr rule", check_metrics_rule(config));
    if let Some(addr) = config.metrics_addr.filter(|_| metrics_rule) {
        // Binding for real (and letting go at once) is the only sure test: the port may be
        // taken, or the address not on this host.
        let bound = endpoints::bind(addr, config.metrics_allow_non_loopback)
            .await
            .map(drop)
            .map_err(ServerError::from);
        r.check(format!("--metrics-addr {addr} can be bound"), bound);
    }
    r.check(
        format!("socket {} can be bound", config.socket.uri()),
        socket::check_bindable(&config.socket).map_err(ServerError::from),
    );
    if let Some(b) = &config.backup {
        let checked = if b.dir.exists() {
            crate::recovery::backup::check_dir(&b.dir).map_err(ServerError::from)
        } else {
            Ok(())
        };
        r.check(
            format!(
                "backups to {} encrypted to {}",
                b.dir.display(),
                b.recipients.describe()
            ),
            checked,
        );
    }
    let ring = keystore_checks(config, &mut r).await;
    let report = r.text();
    if r.refused() > 0 {
        return Err(ServerError::Preflight(report));
    }
    let ring = ring.ok_or_else(|| ServerError::Preflight(report.clone()))?;
    Ok(format!(
        "preflight for localkms {}:\n{report}config ok: would serve {} (mode {:04o}) from keystore {} generation {} with primary key {}",
        crate::release::VERSION,
        config.socket.uri(),
        config.socket_mode,
        config.keystore,
        ring.generation(),
        ring.primary_id().map(|id| id.to_string()).unwrap_or_default()
    ))
}

/// The checks that need the keystore, in order (each needs the one before); the keyring
/// that would be served, when every one passed.
async fn keystore_checks(config: &ServeConfig, r: &mut Report) -> Option<Keyring> {
    let store = match Store::open(&config.keystore, &config.etcd_tls) {
        Ok(s) => s,
        Err(e) => {
            r.check("keystore location", Err(e.into()));
            return None;
        }
    };
    r.check(
        format!("keystore {} owner and mode", config.keystore),
        check_keystore_file(config, &store),
    );
    let root = match RootKeyProvider::open(&config.root) {
        Ok(root) => Arc::new(root),
        Err(e) => {
            r.check("root key", Err(KeystoreError::from(e).into()));
            return None;
        }
    };
    r.check(format!("root key {}", config.root.path().display()), Ok(()));
    let keystore = match load_initial(config, &store, &root).await {
        Ok(ks) => ks,
        Err(e) => {
            r.check("keystore", Err(e));
            return None;
        }
    };
    r.check(
        format!(
            "keystore {} opens: generation {}, {}",
            config.keystore,
            keystore.generation(),
            if keystore.finalized() {
                format!(
                    "format {} (finalized)",
                    crate::keystore::format::FORMAT_VERSION
                )
            } else {
                format!(
                    "format {} (release {}'s; not finalized)",
                    crate::keystore::format::PRE_FINALIZE_FORMAT,
                    crate::release::PREVIOUS
                )
            }
        ),
        Ok(()),
    );
    if !keystore.finalized() {
        r.note(format!(
            "the upgrade to {} is not finalized: this node writes what release {} reads; once every node runs {}, run `localkms upgrade finalize`",
            crate::release::VERSION,
            crate::release::PREVIOUS,
            crate::release::VERSION
        ));
    }
    if config.allow_rollback {
        r.note("--allow-rollback (or LOCALKMS_ALLOW_ROLLBACK) is set: an older keystore would be served and the high-water mark reset; remove it after the recovery it was set for");
    }
    if store.high_water(config.cache_dir.as_deref()).is_none() {
        r.note("no --cache-dir: no high-water mark or upgrade state is kept, so a rolled-back etcd keystore would be accepted at start");
    }
    let mark = r.check(
        "this node's high-water mark",
        check_mark(config, &store, &keystore),
    );
    let state = r.check(
        "this node's upgrade state",
        check_upgrade_state(config, &store, &root, &keystore),
    );
    let ring = Keyring::from_keystore(keystore, Arc::new(UsageTracker::default()));
    let healthy = r.check(
        "the primary key's self-test round trip",
        if ring.healthy() {
            Ok(())
        } else {
            Err(ServerError::SelfTest(config.keystore.clone()))
        },
    );
    (mark && state && healthy).then_some(ring)
}
