//! Who shares an etcd keystore, beyond who is live: the known-node registry, each node's
//! release and capability, and the survey that promote, destroy and `upgrade finalize` act on.
//!
//! Node records (see [`super::nodes`]) live under a lease, so a stopped node's record
//! vanishes; that is right for convergence, but a promote must not take a node that is merely
//! stopped (or frozen past its lease) as gone, or it restarts without the new key. So every
//! node that has ever published is also written to `PREFIX/known-nodes/NODE` (no lease) until
//! an operator runs `localkms nodes forget NODE`. Capabilities go under
//! `PREFIX/node-capabilities/NODE`, beside the records rather than in them: release 0.3.0
//! verifies a record's MAC over its own re-encoding, so a new field would make every record
//! fail there. Every entry is MACed under its own key derived from the root key.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::client::{Etcd, EtcdError, Expect};
use super::nodes::{NodeRecord, RecordKey};

/// A node's release and capability, published under the node record's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityRecord {
    /// Node name.
    pub node: String,
    /// Release (crate version).
    pub version: String,
    /// Capability number (see [`crate::release::CAPABILITY`]).
    pub capability: u32,
    /// Whether the keystore this node has loaded is finalized.
    pub finalized: bool,
    /// The node's record lease, seconds: how old its record may get before it is stale.
    pub ttl_s: i64,
    /// When written, Unix seconds.
    pub updated_unix: i64,
    /// HMAC-SHA256 (hex) of the record without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// One entry of the known-node registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownNode {
    /// Node name.
    pub node: String,
    /// When first seen publishing, Unix seconds.
    pub first_seen_unix: i64,
    /// HMAC-SHA256 (hex) of the entry without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

fn unsigned_bytes<T: Serialize + Clone>(value: &T, clear: impl FnOnce(&mut T)) -> Vec<u8> {
    let mut v = value.clone();
    clear(&mut v);
    // Plain structs of strings, numbers and booleans: serializing cannot fail.
    serde_json::to_vec(&v).unwrap_or_default()
}

impl RecordKey {
    /// Sets `record.mac`.
    pub fn sign_capability(&self, record: &mut CapabilityRecord) {
        record.mac = Some(
            self.capabilities
                .sign_hex(&unsigned_bytes(record, |r| r.mac = None)),
        );
    }

    /// Whether `record.mac` is right.
    pub fn verify_capability(&self, record: &CapabilityRecord) -> bool {
        record.mac.as_deref().is_some_and(|mac| {
            self.capabilities
                .verify_hex(&unsigned_bytes(record, |r| r.mac = None), mac)
        })
    }

    /// Sets `entry.mac`.
    pub fn sign_known(&self, entry: &mut KnownNode) {
        entry.mac = Some(
            self.known
                .sign_hex(&unsigned_bytes(entry, |e| e.mac = None)),
        );
    }

    /// Whether `entry.mac` is right.
    pub fn verify_known(&self, entry: &KnownNode) -> bool {
        entry.mac.as_deref().is_some_and(|mac| {
            self.known
                .verify_hex(&unsigned_bytes(entry, |e| e.mac = None), mac)
        })
    }
}

/// The lease assumed for a node that does not say (release 0.3.0): `serve --node-ttl`'s
/// default.
pub const DEFAULT_TTL_S: i64 = 10;

/// How old a live record may be before it counts as stale: a node refreshes it every third
/// of its lease, so three leases (at least 30 s, for clock differences) is a node that has
/// stopped refreshing while its lease somehow lives on, or whose clock is far off.
pub fn stale_after(ttl_s: i64) -> i64 {
    ttl_s.saturating_mul(3).max(30)
}

/// The name in an etcd key under `prefix`, bounded and printable, for messages.
fn name_in(key: &[u8], prefix: &str) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(prefix)
        .unwrap_or(&key)
        .chars()
        .take(200)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// Everything known about the nodes sharing a keystore, read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Survey {
    /// Live node records that verify, sorted by name.
    pub live: Vec<NodeRecord>,
    /// Names of live records that do not parse or verify.
    pub unverifiable: BTreeSet<String>,
    /// Verified capability records, by node.
    pub capabilities: BTreeMap<String, CapabilityRecord>,
    /// Every node in the registry (an entry that does not verify still counts: a forged
    /// entry can only make an operator look, never let a change past a node).
    pub known: BTreeSet<String>,
    /// Registry entries that do not verify.
    pub unverified_known: BTreeSet<String>,
    /// The reader's clock when read, Unix seconds.
    pub now_unix: i64,
}

/// Why a promote, destroy or finalize cannot go ahead beside a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// Known, but no live record: stopped, or frozen past its lease.
    Missing(String),
    /// A live record older than [`stale_after`].
    Stale {
        /// The node.
        node: String,
        /// How old its record is, seconds.
        age_s: i64,
    },
    /// A live record, or registry entry, that does not verify.
    Unverifiable(String),
    /// A node on a release without the capability needed.
    Older {
        /// The node.
        node: String,
        /// Its capability.
        capability: u32,
    },
}

impl Blocker {
    /// The node it names.
    pub fn node(&self) -> &str {
        match self {
            Blocker::Missing(n) | Blocker::Unverifiable(n) => n,
            Blocker::Stale { node, .. } | Blocker::Older { node, .. } => node,
        }
    }
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocker::Missing(n) => write!(f, "node {n} has published to this keystore before but has no live record now (stopped, or frozen past its lease): start it again, or if it is gone for good, run `localkms nodes forget {n}`"),
            Blocker::Stale { node, age_s } => write!(f, "node {node}'s record is {age_s} s old (a frozen node, or a clock far off): wait for it, or once it is stopped for good run `localkms nodes forget {node}`"),
            Blocker::Unverifiable(n) => write!(f, "node {n}'s record does not verify (forged, or written under another root key: a node not restarted after `root-key rotate`?); it is never taken as absent: fix or stop that node, and once it is stopped for good run `localkms nodes forget {n}`"),
            Blocker::Older { node, capability } => write!(f, "node {node} runs localkms {} (capability {capability}), which lacks what this needs (capability {}): upgrade it first", crate::release::release_of(*capability), crate::release::FINALIZE_NEEDS),
        }
    }
}

impl Survey {
    /// The capability `node` reported: 0 for a node without a (verified) capability record,
    /// which is release 0.3.0 or older.
    pub fn capability(&self, node: &str) -> u32 {
        self.capabilities.get(node).map_or(0, |c| c.capability)
    }

    fn ttl_s(&self, node: &str) -> i64 {
        self.capabilities
            .get(node)
            .map_or(DEFAULT_TTL_S, |c| c.ttl_s.max(1))
    }

    /// What blocks a change needing capability `needs` beside every node: known nodes with
    /// no live record, stale or unverifiable records, nodes below `needs`. Sorted by node.
    pub fn blockers(&self, needs: u32) -> Vec<Blocker> {
        let mut out = Vec::new();
        let live: BTreeSet<&str> = self.live.iter().map(|n| n.node.as_str()).collect();
        for n in &self.unverifiable {
            out.push(Blocker::Unverifiable(n.clone()));
        }
        for n in &self.unverified_known {
            if !live.contains(n.as_str()) && !self.unverifiable.contains(n) {
                out.push(Blocker::Unverifiable(n.clone()));
            }
        }
        for n in &self.known {
            if !live.contains(n.as_str())
                && !self.unverifiable.contains(n)
                && !self.unverified_known.contains(n)
            {
                out.push(Blocker::Missing(n.clone()));
            }
        }
        for r in &self.live {
            let age_s = self.now_unix.saturating_sub(r.updated_unix);
            if age_s > stale_after(self.ttl_s(&r.node)) {
                out.push(Blocker::Stale {
                    node: r.node.clone(),
                    age_s,
                });
            }
            let capability = self.capability(&r.node);
            if capability < needs {
                out.push(Blocker::Older {
                    node: r.node.clone(),
                    capability,
                });
            }
        }
        out.sort_by(|a, b| a.node().cmp(b.node()));
        out
    }
}

/// Reads every record, capability and registry entry under `etcd`'s prefix, and registers any
/// live verified node the registry lacks (so a node of release 0.3.0, which does not register
/// itself, is known from the first time a newer node or command sees it).
pub async fn survey(etcd: &Etcd, key: &RecordKey) -> Result<Survey, EtcdError> {
    let target = etcd.target().clone();
    let mut survey = Survey {
        now_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        ..Survey::default()
    };
    let nodes_prefix = target.nodes_prefix();
    for kv in etcd.list(&nodes_prefix).await? {
        let name = name_in(&kv.key, &nodes_prefix);
        match serde_json::from_slice::<NodeRecord>(&kv.value) {
            Ok(r) if key.verify(&r) && r.node == name => survey.live.push(r),
            _ => {
                survey.unverifiable.insert(name);
            }
        }
    }
    survey.live.sort_by(|a, b| a.node.cmp(&b.node));
    let caps_prefix = target.capabilities_prefix();
    for kv in etcd.list(&caps_prefix).await? {
        let name = name_in(&kv.key, &caps_prefix);
        match serde_json::from_slice::<CapabilityRecord>(&kv.value) {
            Ok(c) if key.verify_capability(&c) && c.node == name => {
                survey.capabilities.insert(name, c);
            }
            _ => {
                tracing::warn!(record = %name, "ignoring a node capability record that does not verify; that node counts as release 0.3.0")
            }
        }
    }
    let known_prefix = target.known_prefix();
    for kv in etcd.list(&known_prefix).await? {
        let name = name_in(&kv.key, &known_prefix);
        match serde_json::from_slice::<KnownNode>(&kv.value) {
            Ok(k) if key.verify_known(&k) && k.node == name => {}
            _ => {
                survey.unverified_known.insert(name.clone());
            }
        }
        survey.known.insert(name);
    }
    let unregistered: Vec<String> = survey
        .live
        .iter()
        .map(|r| r.node.clone())
        .filter(|n| !survey.known.contains(n))
        .collect();
    for node in unregistered {
        register(etcd, key, &node, survey.now_unix).await?;
        survey.known.insert(node);
    }
    Ok(survey)
}

/// Adds `node` to the registry unless it is there already.
pub async fn register(etcd: &Etcd, key: &RecordKey, node: &str, now: i64) -> Result<(), EtcdError> {
    let mut entry = KnownNode {
        node: node.to_owned(),
        first_seen_unix: now,
        mac: None,
    };
    key.sign_known(&mut entry);
    let value = serde_json::to_vec(&entry).unwrap_or_default();
    let at = format!("{}{node}", etcd.target().known_prefix());
    // Absent-only: an existing entry (first seen earlier) is kept.
    etcd.put_if(&at, value, Expect::Absent).await.map(|_| ())
}

/// Publishes `record` under `lease`.
pub async fn publish_capability(
    etcd: &Etcd,
    key: &RecordKey,
    mut record: CapabilityRecord,
    lease: i64,
) -> Result<(), EtcdError> {
    key.sign_capability(&mut record);
    let at = format!("{}{}", etcd.target().capabilities_prefix(), record.node);
    etcd.put(&at, serde_json::to_vec(&record).unwrap_or_default(), lease)
        .await
}

/// Why `nodes forget` refused.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// The node still publishes.
    #[error("node {0} is live (it has a record under its lease): stop it first; forget only a node that is gone for good")]
    Live(String),
    /// Not in the registry.
    #[error("node {0} is not in this keystore's known-node registry (`localkms nodes` lists the known nodes)")]
    Unknown(String),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// `nodes forget NODE`: removes a node that is gone for good from the registry.
pub async fn forget(etcd: &Etcd, node: &str) -> Result<(), ForgetError> {
    let target = etcd.target();
    if etcd
        .get(&format!("{}{node}", target.nodes_prefix()))
        .await?
        .is_some()
    {
        return Err(ForgetError::Live(node.to_owned()));
    }
    if !etcd
        .delete(&format!("{}{node}", target.known_prefix()))
        .await?
    {
        return Err(ForgetError::Unknown(node.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, updated_unix: i64) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            generation: 1,
            key_ids: vec!["k1".into()],
            primary: "k1".into(),
            updated_unix,
            usage: BTreeMap::new(),
            counting_since_unix: Some(0),
            mac: None,
        }
    }

    fn capability(node: &str, capability: u32) -> CapabilityRecord {
        CapabilityRecord {
            node: node.into(),
            version: "x".into(),
            capability,
            finalized: false,
            ttl_s: 10,
            updated_unix: 1000,
            mac: None,
        }
    }

    #[test]
    fn missing_stale_unverifiable_and_older_nodes_block() {
        let mut s = Survey {
            now_unix: 1000,
            ..Survey::default()
        };
        s.live = vec![record("a", 995), record("b", 900), record("old", 999)];
        s.capabilities.insert("a".into(), capability("a", 1));
        s.capabilities.insert("b".into(), capability("b", 1));
        s.known = ["a", "b", "c", "old", "x"].map(String::from).into();
        s.unverifiable.insert("x".into());
        let blockers = s.blockers(0);
        assert_eq!(
            blockers,
            vec![
                Blocker::Stale {
                    node: "b".into(),
                    age_s: 100
                },
                Blocker::Missing("c".into()),
                Blocker::Unverifiable("x".into()),
            ]
        );
        for b in &blockers {
            assert!(b.to_string().contains("nodes forget"), "{b}");
        }
        let finalize = s.blockers(1);
        assert!(finalize.contains(&Blocker::Older {
            node: "old".into(),
            capability: 0
        }));
        assert!(finalize
            .iter()
            .find(|b| b.node() == "old")
            .is_some_and(|b| b.to_string().contains("0.3.0")));
    }

    #[test]
    fn capability_and_registry_entries_verify_only_untouched() {
        let key = RecordKey::derive(&crate::keystore::RootKey::from_bytes([1; 32])).expect("key");
        let mut c = capability("a", 1);
        key.sign_capability(&mut c);
        assert!(key.verify_capability(&c));
        let mut forged = c.clone();
        forged.capability = 9;
        assert!(!key.verify_capability(&forged));
        let mut k = KnownNode {
            node: "a".into(),
            first_seen_unix: 5,
            mac: None,
        };
        assert!(!key.verify_known(&k));
        key.sign_known(&mut k);
        assert!(key.verify_known(&k));
        // A capability tag is not a registry tag.
        let mut as_known = k.clone();
        as_known.mac = c.mac.clone();
        assert!(!key.verify_known(&as_known));
    }
}
