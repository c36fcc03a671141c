//! The keystore-administration commands (init, keys, keystore, root-key, nodes) over either
//! backend, and what they print: listings that merge the sealed keystore with decrypt usage,
//! and the audit history.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::key_id::KeyId;
use crate::keyring::usage::{UsageError, UsageFile};
use crate::keystore::backend::etcd::nodes;
use crate::keystore::backend::{Scrubbed, UsageOrEtcdError};
use crate::keystore::{
    Actor, DestroyEvidence, DestroyGuard, HistoryEntry, KeyState, Keystore, KeystoreError,
    KeystoreLocation, RootKeyError, RootKeyProvider, RootKeySource, Store,
};
use crate::keystore::{EtcdError, EtcdTls};
use crate::timefmt::rfc3339;

/// One KEK as `keys list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyListing {
    /// Key id.
    pub id: String,
    /// Lifecycle state.
    pub state: String,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Last state change, RFC 3339.
    pub changed_at: String,
    /// Destruction time for a tombstone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<String>,
    /// Decrypts served, per the usage file.
    pub decrypts: u64,
    /// Last decrypt, RFC 3339, per the usage file.
    pub last_decrypt_at: Option<String>,
}

/// Builds the listing for every KEK, oldest first.
pub fn list(ks: &Keystore, usage: &UsageFile) -> Vec<KeyListing> {
    ks.records()
        .iter()
        .map(|r| {
            let used = usage.keys.get(r.id.as_str());
            KeyListing {
                id: r.id.to_string(),
                state: r.state.to_string(),
                created_at: rfc3339(r.created_at),
                changed_at: rfc3339(r.changed_at),
                destroyed_at: (r.state == KeyState::Destroyed).then(|| rfc3339(r.changed_at)),
                decrypts: used.map_or(0, |u| u.decrypts),
                last_decrypt_at: used.and_then(|u| u.last_decrypt_at.clone()),
            }
        })
        .collect()
}

/// The text table `keys list` prints.
pub fn list_table(keys: &[KeyListing]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:<21} {:>9}  {}\n",
        "ID", "STATE", "CREATED", "DECRYPTS", "LAST DECRYPT"
    );
    for k in keys {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<21} {:>9}  {}",
            k.id,
            k.state,
            k.created_at,
            k.decrypts,
            k.last_decrypt_at.as_deref().unwrap_or("never")
        );
    }
    out
}

/// One audit entry as `keys history --json` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HistoryListing {
    /// When, RFC 3339.
    pub at: String,
    /// What.
    pub action: String,
    /// Which key.
    pub key_id: Option<String>,
    /// Who.
    pub user: String,
    /// Where.
    pub host: String,
}

/// The audit trail, oldest first.
pub fn history(entries: &[HistoryEntry]) -> Vec<HistoryListing> {
    entries
        .iter()
        .map(|h| HistoryListing {
            at: rfc3339(h.at),
            action: h.action.as_str().to_owned(),
            key_id: h.key_id.as_ref().map(|k| k.to_string()),
            user: h.actor.user.clone(),
            host: h.actor.host.clone(),
        })
        .collect()
}

/// The text table `keys history` prints.
pub fn history_table(entries: &[HistoryListing]) -> String {
    let mut out = format!("{:<21} {:<19} {:<24} {}\n", "TIME", "ACTION", "KEY", "BY");
    for h in entries {
        let _ = writeln!(
            out,
            "{:<21} {:<19} {:<24} {} on {}",
            h.at,
            h.action,
            h.key_id.as_deref().unwrap_or("-"),
            h.user,
            h.host
        );
    }
    out
}

/// What `keystore verify` prints: proof that the file opens under the root key.
pub fn verify_report(location: &KeystoreLocation, ks: &Keystore) -> String {
    let mut out = format!(
        "ok: {location} opens with this root key\ngeneration: {}\nkeystore id: {}\n",
        ks.generation(),
        ks.keystore_id().map_or_else(
            || "none yet (written by an older build; set at its next change)".to_owned(),
            |id| id.iter().map(|b| format!("{b:02x}")).collect()
        )
    );
    for r in ks.records() {
        let _ = writeln!(out, "key: {} {}", r.id, r.state);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::usage::UsageRecord;

    #[test]
    fn listing_merges_usage() {
        let ks = crate::keystore::model::tests::fresh();
        let id = ks.records()[0].id.to_string();
        let mut usage = UsageFile::default();
        usage.keys.insert(
            id.clone(),
            UsageRecord {
                decrypts: 5,
                last_decrypt_at: Some("2026-11-26T00:00:00Z".into()),
                last_decrypt_unix: Some(1_795_651_200),
            },
        );
        let keys = list(&ks, &usage);
        assert_eq!(keys[0].decrypts, 5);
        assert_eq!(keys[0].state, "primary");
        let table = list_table(&keys);
        assert!(table.contains(&id) && table.contains("2026-11-26T00:00:00Z"));
        let json = serde_json::to_value(&keys[0]).expect("json");
        assert_eq!(json["decrypts"], 5);
        assert!(json.get("destroyed_at").is_none());
        let h = history(ks.history());
        assert_eq!(h[0].action, "init");
        assert!(history_table(&h).contains("init"));
    }
}

/// What a command prints: `stdout` for scripts, `stderr` for people.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Printed {
    /// Machine-readable or primary output.
    pub stdout: String,
    /// Hints and explanations.
    pub stderr: String,
    /// For a command that changed something: one line saying what was committed, written to
    /// stderr before anything else so the change is on record even if stdout then fails.
    pub committed: Option<String>,
}

impl Printed {
    pub(crate) fn out(stdout: impl Into<String>) -> Self {
        Printed {
            stdout: stdout.into(),
            stderr: String::new(),
            committed: None,
        }
    }

    pub(crate) fn committed(mut self, what: impl Into<String>) -> Self {
        self.committed = Some(what.into());
        self
    }

    pub(crate) fn with_note(mut self, stderr: impl Into<String>) -> Self {
        self.stderr = stderr.into();
        self
    }
}

/// Why an administration command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The keystore could not be read or changed.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// The root key could not be used.
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The usage file is unreadable.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// Destroy needs readable usage evidence.
    #[error("destroy refused: the decrypt usage record for {id} cannot be read ({reason}), so nothing shows the key is unused. Fix or move aside the usage file (a running server moves a corrupt one aside and counts afresh), or pass --force if you are sure nothing is sealed under it. `localkms keys disable {id}` is the reversible first step")]
    UsageUnreadable {
        /// The key.
        id: String,
        /// Why the usage cannot be read.
        reason: String,
    },
    /// `--scan-report` is not evidence for this destroy.
    #[error("destroy refused: the scan report {file} is not evidence that nothing depends on {id}: {reason}")]
    ScanRefused {
        /// The key.
        id: String,
        /// The report.
        file: String,
        /// Why not.
        reason: String,
    },
    /// The command needs an etcd keystore.
    #[error("{0} needs an etcd keystore (--keystore etcd://HOST:PORT/PREFIX)")]
    NeedsEtcd(&'static str),
    /// A node sharing the keystore blocks the change (see `registry::Blocker`).
    #[error("{what} refused; nothing was written: {blockers}")]
    Blocked {
        /// The change.
        what: String,
        /// Every node that blocks it, and what to do.
        blockers: String,
    },
    /// `nodes forget` refused.
    #[error(transparent)]
    Forget(#[from] crate::keystore::backend::etcd::registry::ForgetError),
    /// Two-phase rotation stopped at staged.
    #[error("rotation stopped at staged: {key_id} is in the keystore but node(s) {lagging} have not loaded it within {waited_s} s. Nothing encrypts with it yet, so no data is at risk. Check those nodes (localkms nodes), then run `localkms keys promote {key_id}`")]
    NotConverged {
        /// The staged key.
        key_id: String,
        /// Nodes that have not loaded it.
        lagging: String,
        /// How long we waited.
        waited_s: u64,
    },
}

/// A keystore and its root key, opened for a command.
pub struct Opened {
    /// Where the keystore lives.
    pub store: Store,
    /// The root key.
    pub root: RootKeyProvider,
}

impl Opened {
    /// Opens `location` with the root key from `source`.
    pub fn open(
        location: &KeystoreLocation,
        source: &RootKeySource,
        tls: &EtcdTls,
    ) -> Result<Self, AdminError> {
        Ok(Opened {
            store: Store::open(location, tls)?,
            root: RootKeyProvider::open(source)?,
        })
    }

    /// Decrypt usage: the usage file beside a file keystore, or every node's report summed
    /// for an etcd keystore.
    pub async fn usage(&self) -> Result<UsageFile, AdminError> {
        self.store.usage(&self.root).await.map_err(|e| match e {
            UsageOrEtcdError::Usage(e) => AdminError::Usage(e),
            UsageOrEtcdError::Etcd(e) => AdminError::Etcd(e),
            UsageOrEtcdError::Keystore(e) => AdminError::Keystore(*e),
        })
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `init`: a new keystore with one primary KEK (creating a missing root key file).
pub async fn init(
    location: &KeystoreLocation,
    source: &RootKeySource,
    tls: &EtcdTls,
) -> Result<Printed, AdminError> {
    let store = Store::open(location, tls)?;
    let mut out = String::new();
    if let Some(dir) = store.prepare_create()? {
        let _ = writeln!(out, "created directory {} (mode 0700)", dir.display());
    }
    if let RootKeySource::KeyFile(key) = source {
        if !key.exists() {
            if let Some(dir) = crate::keystore::backend::create_parent_dir(key)? {
                let _ = writeln!(out, "created directory {} (mode 0700)", dir.display());
            }
        }
    }
    let (root, created) = RootKeyProvider::open_or_create(source)?;
    let ks = Keystore::new_with_primary(now(), root.new_kdf()?, &Actor::current())
        .map_err(KeystoreError::from)?;
    store.create(&root, &ks).await?;
    if created {
        let _ = writeln!(
            out,
            "created root key file {} (mode 0600)",
            source.path().display()
        );
    }
    let id = ks.primary().map(|r| r.id.to_string()).unwrap_or_default();
    let _ = writeln!(out, "created keystore {location} with primary key {id}");
    Ok(Printed::out(out).committed(format!("created keystore {location} (primary {id})")))
}

/// `keys list`.
pub async fn keys_list(o: &Opened, json: bool) -> Result<Printed, AdminError> {
    let ks = o.store.load(&o.root).await?;
    let listing = list(&ks, &o.usage().await?);
    Ok(Printed::out(if json {
        format!("{}\n", serde_json::json!({ "keys": listing }))
    } else {
        list_table(&listing)
    }))
}

/// `keys history`.
pub async fn keys_history(o: &Opened, json: bool) -> Result<Printed, AdminError> {
    let ks = o.store.load(&o.root).await?;
    let entries = history(ks.history());
    Ok(Printed::out(if json {
        format!("{}\n", serde_json::json!({ "history": entries }))
    } else {
        history_table(&entries)
    }))
}

/// `keystore verify`.
pub async fn keystore_verify(o: &Opened) -> Result<Printed, AdminError> {
    let ks = o.store.load(&o.root).await?;
    Ok(Printed::out(verify_report(o.store.location(), &ks)))
}

/// `keys rotate [--stage]`. On etcd, a full rotation is two-phase: stage, wait until every
/// live node reports the new KEK (or `timeout`), then promote.
pub async fn keys_rotate(
    o: &Opened,
    stage: bool,
    timeout: Duration,
) -> Result<Printed, AdminError> {
    let actor = Actor::current();
    let name = o.store.location();
    // A shared keystore rotates in two phases: stage, wait for every node, promote.
    let cluster = if stage {
        None
    } else {
        o.store.nodes(&o.root).await?
    };
    if cluster.is_some() {
        // Refused before anything is staged: the promote that follows would be.
        super::upgrade::guard_key_change(o, &format!("keys rotate of {name}")).await?;
    }
    let id = o
        .store
        .update(&o.root, |ks| {
            Ok(if stage || cluster.is_some() {
                ks.stage(now(), &actor)?
            } else {
                ks.rotate(now(), &actor)?
            })
        })
        .await?;
    if stage {
        return Ok(Printed::out(format!("{id}\n"))
            .with_note(o.store.staged_hint(id.as_str()))
            .committed(format!("staged {id} in {name}")));
    }
    let note = match cluster {
        None => format!("rotated: {id} is now primary in {name}; the previous primary is retired and still decrypts. A running server picks this up within 2 seconds."),
        Some(cluster) => {
            let started = std::time::Instant::now();
            loop {
                let live = cluster.list().await?;
                let lagging = nodes::lagging(&live, id.as_str());
                if lagging.is_empty() {
                    break;
                }
                if started.elapsed() >= timeout {
                    return Err(AdminError::NotConverged {
                        key_id: id.to_string(),
                        lagging: lagging.join(", "),
                        waited_s: timeout.as_secs(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            super::upgrade::guard_key_change(o, &format!("promoting {id} (staged; run `localkms keys promote {id}` once fixed)")).await?;
            o.store
                .update(&o.root, |ks| Ok(ks.promote(id.as_str(), now(), &actor)?))
                .await?;
            format!("rotated: every known node is live and loaded {id} before it was promoted; it is now primary in {name}")
        }
    };
    Ok(Printed::out(format!("{id}\n"))
        .with_note(note)
        .committed(format!("rotated {name}: new primary {id}")))
}

/// A change to one KEK's state, as the `keys` subcommands name it.
#[derive(Clone, Debug)]
pub enum KeyChange {
    /// `keys promote`.
    Promote,
    /// `keys disable`: reversible.
    Disable,
    /// `keys enable`.
    Enable,
    /// `keys destroy`: irreversible; `force` skips the evidence checks (not the primary rule).
    Destroy {
        /// `--force`.
        force: bool,
        /// `--min-retired-age`.
        min_retired_age: Duration,
        /// `--scan-report`: a `localkms scan --json` report to use as evidence.
        scan_report: Option<std::path::PathBuf>,
        /// `--max-scan-age`: the oldest report accepted.
        max_scan_age: Duration,
    },
}

/// `keys promote|disable|enable|destroy`.
pub async fn keys_change(
    o: &Opened,
    change: &KeyChange,
    id: &KeyId,
) -> Result<Printed, AdminError> {
    let id = id.as_str();
    let actor = Actor::current();
    match change {
        KeyChange::Promote => {
            super::upgrade::guard_key_change(o, &format!("keys promote {id}")).await?
        }
        // --force skips the evidence checks, not the nodes: a node that lacks the key's
        // state is not evidence of anything.
        KeyChange::Destroy { .. } => {
            super::upgrade::guard_key_change(o, &format!("keys destroy {id}")).await?
        }
        KeyChange::Disable | KeyChange::Enable => {}
    }
    let guard = match change {
        KeyChange::Destroy { force: true, .. } => Some(DestroyGuard::Force),
        KeyChange::Destroy {
            force: false,
            min_retired_age,
            scan_report: Some(file),
            max_scan_age,
        } => {
            let report = read_scan_report(file)?;
            let ks = o.store.load(&o.root).await?;
            let max = i64::try_from(max_scan_age.as_secs()).unwrap_or(i64::MAX);
            if let Some(reason) =
                crate::scan::refuse_as_evidence(&report, id, &ks, max, now().unix_timestamp())
            {
                return Err(AdminError::ScanRefused {
                    id: id.to_owned(),
                    file: file.display().to_string(),
                    reason,
                });
            }
            Some(DestroyGuard::Scanned {
                min_retired_age: *min_retired_age,
            })
        }
        KeyChange::Destroy {
            force: false,
            min_retired_age,
            ..
        } => {
            // No readable usage, no destroy: the refusal says so rather than counting zero.
            let usage = o.usage().await.map_err(|e| AdminError::UsageUnreadable {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
            Some(DestroyGuard::Evidence(DestroyEvidence {
                min_retired_age: *min_retired_age,
                usage_counted_since: usage.counting_since_unix,
                last_decrypt_at: usage.keys.get(id).map(|u| u.last_decrypt_unix),
            }))
        }
        _ => None,
    };
    o.store
        .update(&o.root, |ks| {
            match (change, &guard) {
                (KeyChange::Promote, _) => ks.promote(id, now(), &actor)?,
                (KeyChange::Disable, _) => ks.disable(id, now(), &actor)?,
                (KeyChange::Enable, _) => ks.enable(id, now(), &actor)?,
                (KeyChange::Destroy { .. }, Some(guard)) => ks.destroy(id, now(), &actor, guard)?,
                (KeyChange::Destroy { .. }, None) => {
                    ks.destroy(id, now(), &actor, &DestroyGuard::Force)?
                }
            }
            Ok(())
        })
        .await?;
    let scrubbed = match change {
        KeyChange::Destroy { .. } => Some(o.store.scrub_destroyed(&o.root, id).await?),
        _ => None,
    };
    let (out, committed) = match change {
        KeyChange::Promote => (
            format!("promoted {id} to primary; the previous primary is retired and still decrypts\n"),
            format!("promoted {id}"),
        ),
        KeyChange::Disable => (
            format!("disabled {id}: decrypts under it now fail with FailedPrecondition. This is reversible: `localkms keys enable {id}` undoes it. Watch for decrypt errors before any `keys destroy`\n"),
            format!("disabled {id}"),
        ),
        KeyChange::Enable => (format!("enabled {id}\n"), format!("enabled {id}")),
        KeyChange::Destroy { .. } => (
            destroyed_message(id, o.store.location(), scrubbed),
            format!("destroyed {id}"),
        ),
    };
    let printed = Printed::out(out).committed(committed);
    Ok(match scrubbed {
        Some(Scrubbed::Shared { revision }) => printed.with_note(format!(
            "warning: copies of {id} remain outside this command's reach: in etcd's history until it is compacted past revision {revision} (kube-apiserver compacts every 5 minutes by default; or run `etcdctl compact {revision}`), in each node's --cache-dir copy until its server loads this change (seconds), and in any backup you made yourself"
        )),
        _ => printed,
    })
}

/// What `keys destroy` says it did: only what is true.
/// Reads a `localkms scan --json` report.
fn read_scan_report(file: &std::path::Path) -> Result<crate::scan::ScanReport, AdminError> {
    let refused = |reason: String| AdminError::ScanRefused {
        id: "the key".into(),
        file: file.display().to_string(),
        reason,
    };
    let bytes = crate::keystore::read_regular(file, 64 * 1024 * 1024)
        .map_err(|e| refused(format!("cannot read it: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| refused(format!("it is not a `localkms scan --json` report ({e})")))
}

fn destroyed_message(id: &str, at: &KeystoreLocation, scrubbed: Option<Scrubbed>) -> String {
    let tombstone = "a tombstone keeps the id so errors can say what happened";
    match scrubbed {
        Some(Scrubbed::Backups { rewritten, removed }) => format!(
            "destroyed {id}: its material is gone from {at} and from the backups beside it ({rewritten} rewritten without it, {removed} removed because they could not be opened or had it as their primary); {tombstone}. Copies you made yourself (other nodes' copies of the file, your own backups) still hold it until you replace them\n"
        ),
        _ => format!("destroyed {id} in {at}; {tombstone}\n"),
    }
}

/// `root-key rotate`.
pub async fn root_key_rotate(
    o: &Opened,
    new_source: &RootKeySource,
) -> Result<Printed, AdminError> {
    let (new, created) = RootKeyProvider::open_or_create(new_source)?;
    o.store
        .reseal(&o.root, &new, |ks| {
            ks.record_root_key_rotation(now(), &Actor::current())
        })
        .await?;
    let mut out = String::new();
    if created {
        let _ = writeln!(
            out,
            "created root key file {} (mode 0600)",
            new_source.path().display()
        );
    }
    let _ = writeln!(
        out,
        "re-sealed {} under {}; the old root key no longer opens it (older backups beside a keystore file were removed). Restart running servers with the new root key.",
        o.store.location(),
        new_source.path().display()
    );
    Ok(Printed::out(out).committed(format!(
        "re-sealed {} under {}",
        o.store.location(),
        new_source.path().display()
    )))
}

/// `keystore copy`: the sealed bytes, unchanged, after checking they open with the root key.
pub async fn keystore_copy(
    from: &KeystoreLocation,
    to: &KeystoreLocation,
    source: &RootKeySource,
    tls: &EtcdTls,
) -> Result<Printed, AdminError> {
    let src = Store::open(from, tls)?;
    let dst = Store::open(to, tls)?;
    let root = RootKeyProvider::open(source)?;
    let (bytes, _) = src.read_raw().await?;
    let ks = src.decode(&bytes, &root)?;
    dst.create_raw(bytes).await?;
    Ok(Printed::out(format!(
        "copied {from} to {to}: generation {}, {} keys, unchanged\n",
        ks.generation(),
        ks.records().len()
    ))
    .committed(format!("copied {from} to {to}")))
}

/// One node in `localkms nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeListing {
    /// Name.
    pub node: String,
    /// Generation it has loaded.
    pub generation: u64,
    /// Whether that is the keystore's current generation.
    pub current: bool,
    /// Its primary.
    pub primary: String,
    /// KEKs loaded.
    pub key_ids: Vec<String>,
    /// Last report, RFC 3339.
    pub last_report: String,
    /// Seconds since the last report.
    pub age_s: i64,
}

/// `localkms nodes`.
pub async fn nodes_list(o: &Opened, json: bool) -> Result<Printed, AdminError> {
    let Some(cluster) = o.store.nodes(&o.root).await? else {
        return Err(AdminError::NeedsEtcd("localkms nodes"));
    };
    let ks = o.store.load(&o.root).await?;
    let now_s = now().unix_timestamp();
    let listing: Vec<NodeListing> = cluster
        .list()
        .await?
        .into_iter()
        .map(|n| NodeListing {
            current: n.generation == ks.generation(),
            generation: n.generation,
            primary: n.primary,
            key_ids: n.key_ids,
            last_report: rfc3339(n.updated_unix),
            age_s: now_s.saturating_sub(n.updated_unix),
            node: n.node,
        })
        .collect();
    if json {
        return Ok(Printed::out(format!(
            "{}\n",
            serde_json::json!({ "generation": ks.generation(), "nodes": listing })
        )));
    }
    let mut out = format!(
        "keystore generation {}\n{:<20} {:>10} {:<8} {:<24} {}\n",
        ks.generation(),
        "NODE",
        "GENERATION",
        "CURRENT",
        "PRIMARY",
        "LAST REPORT"
    );
    for n in &listing {
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:<8} {:<24} {} ({} s ago)",
            n.node,
            n.generation,
            if n.current { "yes" } else { "NO" },
            n.primary,
            n.last_report,
            n.age_s
        );
    }
    if listing.is_empty() {
        out.push_str("(no live nodes)\n");
    }
    Ok(Printed::out(out))
}
