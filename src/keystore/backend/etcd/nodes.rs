//! What each server on an etcd keystore publishes about itself, and convergence across them.
//!
//! Every server writes `PREFIX/nodes/NODE` under a lease it keeps alive: the keystore
//! generation and KEK ids it has loaded, its primary, and its per-KEK decrypt usage. A node
//! that dies stops renewing; its record vanishes when the lease expires, so it stops blocking
//! convergence on its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::client::{Etcd, EtcdError};
use crate::keyring::usage::{UsageFile, UsageRecord};

/// One server's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name (`serve --node-name`, default the hostname).
    pub node: String,
    /// Keystore generation loaded.
    pub generation: u64,
    /// Every KEK id loaded, in any state.
    pub key_ids: Vec<String>,
    /// The primary KEK.
    pub primary: String,
    /// When this record was written, Unix seconds.
    pub updated_unix: i64,
    /// Decrypt usage per KEK on this node.
    pub usage: BTreeMap<String, UsageRecord>,
    /// Since when this node's usage counts run, Unix seconds (absent from older servers).
    #[serde(default)]
    pub counting_since_unix: Option<i64>,
    /// HMAC-SHA256 (hex) of the record without this field, under [`RecordKey`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Authenticates node records. They steer two-phase rotation (which node has loaded what) and
/// the destroy guard (decrypt usage), so a record anyone with etcd write access could forge
/// must not count: each is MACed with HMAC-SHA256 under a key derived (HKDF, its own label)
/// from the keystore's root key, which only the nodes and operators hold. The capability and
/// known-node records (see [`super::registry`]) have keys of their own labels.
#[derive(Clone)]
pub struct RecordKey {
    records: crate::crypto::MacKey,
    pub(super) capabilities: crate::crypto::MacKey,
    pub(super) known: crate::crypto::MacKey,
}

impl RecordKey {
    /// The record keys for a keystore sealed under `root`.
    pub fn derive(root: &crate::keystore::RootKey) -> Result<Self, crate::crypto::CryptoError> {
        use crate::crypto::MacKey;
        Ok(RecordKey {
            records: MacKey::derive(root.key(), b"localkms/node-records/v1")?,
            capabilities: MacKey::derive(root.key(), b"localkms/node-capabilities/v1")?,
            known: MacKey::derive(root.key(), b"localkms/known-nodes/v1")?,
        })
    }

    /// The bytes the MAC covers: the record without its MAC, serialized exactly as 64507fe
    /// (release 0.3.0) does, which re-encodes a record the same way to verify it: a field
    /// added here would make every record this build writes fail on such a node. A plain
    /// struct of strings, numbers and a BTreeMap serializes deterministically, and cannot fail.
    fn signed_bytes(record: &NodeRecord) -> Vec<u8> {
        let mut unsigned = record.clone();
        unsigned.mac = None;
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }

    /// Sets `record.mac`.
    pub fn sign(&self, record: &mut NodeRecord) {
        record.mac = Some(self.records.sign_hex(&Self::signed_bytes(record)));
    }

    /// Whether `record.mac` is right (ring compares in constant time).
    pub fn verify(&self, record: &NodeRecord) -> bool {
        record
            .mac
            .as_deref()
            .is_some_and(|mac| self.records.verify_hex(&Self::signed_bytes(record), mac))
    }
}

/// The node records of one etcd keystore: what `localkms nodes`, two-phase rotation and the
/// destroy guard read, and what each server publishes.
#[derive(Clone)]
pub struct Nodes {
    etcd: Etcd,
    key: RecordKey,
}

impl Nodes {
    pub(crate) fn new(etcd: Etcd, key: RecordKey) -> Self {
        Nodes { etcd, key }
    }

    /// Every live node's record whose MAC verifies, sorted by name. A record that fails is
    /// left out and reported (logged at warn, with its etcd key).
    pub async fn list(&self) -> Result<Vec<NodeRecord>, EtcdError> {
        list(&self.etcd, &self.key).await
    }

    /// Every record, capability and registry entry, for the key-change and finalize guards
    /// (see [`super::registry::survey`]).
    pub async fn survey(&self) -> Result<super::registry::Survey, EtcdError> {
        super::registry::survey(&self.etcd, &self.key).await
    }

    /// `nodes forget NODE`.
    pub async fn forget(&self, node: &str) -> Result<(), super::registry::ForgetError> {
        super::registry::forget(&self.etcd, node).await
    }

    /// Publishes this server's state as `node` under a lease of `ttl` until `shutdown`
    /// (see [`run_publisher`]).
    pub async fn publish_until(
        self,
        node: String,
        ttl: std::time::Duration,
        keyring: crate::keyring::SharedKeyring,
        metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        run_publisher(self, node, ttl, keyring, metrics, shutdown).await
    }
}

/// Every live node's record that parses and verifies under `key`, sorted by name.
async fn list(etcd: &Etcd, key: &RecordKey) -> Result<Vec<NodeRecord>, EtcdError> {
    let mut nodes = Vec::new();
    for kv in etcd.list(&etcd.target().nodes_prefix()).await? {
        let name = String::from_utf8_lossy(&kv.key)
            .chars()
            .take(200)
            .collect::<String>();
        match serde_json::from_slice::<NodeRecord>(&kv.value) {
            Ok(record) if key.verify(&record) => nodes.push(record),
            Ok(_) => tracing::warn!(
                record = %name.escape_debug(),
                "ignoring a node record whose MAC does not verify: forged, or written under another root key (a node not restarted after root-key rotate?)"
            ),
            Err(e) => {
                tracing::warn!(record = %name.escape_debug(), error = %e, "ignoring a node record that does not parse")
            }
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(nodes)
}

/// Publishes `record` under `lease`.
async fn publish(etcd: &Etcd, record: &NodeRecord, lease: i64) -> Result<(), EtcdError> {
    let key = format!("{}{}", etcd.target().nodes_prefix(), record.node);
    // Serializing a plain struct of strings and numbers cannot fail.
    let value = serde_json::to_vec(record).unwrap_or_default();
    etcd.put(&key, value, lease).await
}

/// The nodes that have not loaded `key_id`.
pub fn lagging<'a>(nodes: &'a [NodeRecord], key_id: &str) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|n| !n.key_ids.iter().any(|k| k == key_id))
        .map(|n| n.node.as_str())
        .collect()
}

/// Whether every node has loaded the same generation.
pub fn converged(nodes: &[NodeRecord]) -> bool {
    nodes.windows(2).all(|w| w[0].generation == w[1].generation)
}

/// Usage summed over every node: total decrypts, latest last-decrypt, and the latest start of
/// counting (unknown when any node does not say, or when no node reports at all).
pub fn merged_usage(nodes: &[NodeRecord]) -> UsageFile {
    let mut out = UsageFile {
        counting_since_unix: nodes
            .iter()
            .map(|n| n.counting_since_unix)
            .try_fold(None::<i64>, |acc, s| {
                s.map(|s| Some(acc.map_or(s, |a| a.max(s))))
            })
            .flatten(),
        ..UsageFile::default()
    };
    for n in nodes {
        for (id, u) in &n.usage {
            let e = out.keys.entry(id.clone()).or_default();
            e.decrypts = e.decrypts.saturating_add(u.decrypts);
            if u.last_decrypt_unix > e.last_decrypt_unix {
                e.last_decrypt_unix = u.last_decrypt_unix;
                e.last_decrypt_at = u.last_decrypt_at.clone();
            }
        }
    }
    out
}

/// Publishes this server's record under a lease until `shutdown`: at once when the loaded
/// keystore changes, and every third of the lease otherwise (which also renews the lease).
/// Also updates the cluster-convergence metrics from every node's record.
async fn run_publisher(
    nodes: Nodes,
    node: String,
    ttl: std::time::Duration,
    keyring: crate::keyring::SharedKeyring,
    metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use std::time::{Duration, Instant};
    let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(10).max(2);
    let refresh = Duration::from_secs((ttl_s as u64 / 3).max(1));
    let mut lease = 0i64;
    let mut published: Option<(u64, Instant)> = None;
    let mut warned = false;
    tokio::pin!(shutdown);
    loop {
        let generation = keyring.load().generation();
        let due = published.is_none_or(|(g, at)| g != generation || at.elapsed() >= refresh);
        if due {
            match publish_once(&nodes, &node, ttl_s, &mut lease, &keyring).await {
                Ok(()) => {
                    published = Some((generation, Instant::now()));
                    metrics.backend_reached(time::OffsetDateTime::now_utc().unix_timestamp());
                    if warned {
                        tracing::info!(node = %node, "etcd answers again: this node's keystore state is published");
                    }
                    warned = false;
                    // The survey also registers any live node the registry lacks (a node of
                    // release 0.3.0 does not register itself).
                    if let Ok(all) = nodes.survey().await {
                        metrics.set_cluster(all.live.len(), converged(&all.live));
                    }
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, node = %node, "cannot publish this node's keystore state to etcd; retrying");
                        warned = true;
                    }
                    lease = 0;
                    published = None;
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn publish_once(
    nodes: &Nodes,
    node: &str,
    ttl_s: i64,
    lease: &mut i64,
    keyring: &crate::keyring::SharedKeyring,
) -> Result<(), EtcdError> {
    let etcd = &nodes.etcd;
    if *lease != 0 && etcd.keep_alive(*lease).await? <= 0 {
        *lease = 0;
    }
    if *lease == 0 {
        *lease = etcd.grant(ttl_s).await?;
    }
    let ring = keyring.load();
    let usage = ring
        .usage()
        .snapshot()
        .into_iter()
        .map(|(id, decrypts, last)| {
            let last = (last > 0).then_some(last);
            (
                id.to_string(),
                UsageRecord {
                    decrypts,
                    last_decrypt_at: last.map(crate::timefmt::rfc3339),
                    last_decrypt_unix: last,
                },
            )
        })
        .collect();
    let mut record = NodeRecord {
        node: node.to_owned(),
        generation: ring.generation(),
        key_ids: ring.key_info().iter().map(|k| k.id.to_string()).collect(),
        primary: ring.primary_id().map(|k| k.to_string()).unwrap_or_default(),
        updated_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        usage,
        counting_since_unix: Some(ring.usage().counting_since()),
        mac: None,
    };
    nodes.key.sign(&mut record);
    publish(etcd, &record, *lease).await?;
    // Capabilities go under their own key (see `registry`), under the same lease.
    let capability = super::registry::CapabilityRecord {
        node: node.to_owned(),
        version: crate::release::VERSION.to_owned(),
        capability: crate::release::CAPABILITY,
        finalized: ring.finalized(),
        ttl_s,
        updated_unix: record.updated_unix,
        mac: None,
    };
    super::registry::publish_capability(etcd, &nodes.key, capability, *lease).await?;
    super::registry::register(etcd, &nodes.key, node, record.updated_unix).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(
        name: &str,
        generation: u64,
        keys: &[&str],
        decrypts: u64,
        last: Option<i64>,
    ) -> NodeRecord {
        NodeRecord {
            node: name.into(),
            generation,
            key_ids: keys.iter().map(|k| k.to_string()).collect(),
            primary: keys[0].into(),
            updated_unix: 0,
            usage: [(
                keys[0].to_string(),
                UsageRecord {
                    decrypts,
                    last_decrypt_at: last.map(crate::timefmt::rfc3339),
                    last_decrypt_unix: last,
                },
            )]
            .into(),
            counting_since_unix: Some(generation as i64 * 10),
            mac: None,
        }
    }

    #[test]
    fn records_verify_only_with_the_right_key_and_untouched() {
        let key =
            |b: u8| RecordKey::derive(&crate::keystore::RootKey::from_bytes([b; 32])).expect("key");
        let mut r = node("a", 3, &["k1", "k2"], 5, Some(100));
        assert!(!key(1).verify(&r), "an unsigned record does not verify");
        key(1).sign(&mut r);
        assert!(key(1).verify(&r));
        assert!(
            !key(2).verify(&r),
            "another root key's record does not verify"
        );
        let mut forged = r.clone();
        forged.usage.clear();
        assert!(!key(1).verify(&forged), "an edited record does not verify");
        let json = serde_json::to_vec(&r).expect("json");
        let back: NodeRecord = serde_json::from_slice(&json).expect("parse");
        assert!(
            key(1).verify(&back),
            "a record survives the round trip through etcd"
        );
    }

    /// Release 0.3.0 verifies a record's MAC over its own re-encoding: the bytes signed must
    /// stay exactly these (frozen from 64507fe), or every record this build writes fails there
    /// and that node promotes past this one.
    #[test]
    fn records_keep_the_exact_shape_release_0_3_0_signs() {
        let r = node("n1", 3, &["k1"], 5, Some(100));
        assert_eq!(
            String::from_utf8(RecordKey::signed_bytes(&r)).expect("utf8"),
            r#"{"node":"n1","generation":3,"key_ids":["k1"],"primary":"k1","updated_unix":0,"usage":{"k1":{"decrypts":5,"last_decrypt_at":"1970-01-01T00:01:40Z","last_decrypt_unix":100}},"counting_since_unix":30}"#
        );
        let key = RecordKey::derive(&crate::keystore::RootKey::from_bytes([9; 32])).expect("key");
        let mut signed = r.clone();
        key.sign(&mut signed);
        assert_eq!(
            signed.mac.as_deref(),
            Some(FROZEN_MAC),
            "the record MAC under a fixed root key, as 64507fe computes it"
        );
    }

    /// Computed independently (RFC 5869 HKDF-SHA256 and HMAC-SHA256 in Python).
    const FROZEN_MAC: &str = "e66af3fd86ad29e60687155940108a89d1236ee6eef09f04dcc8b98df3dec42e";

    #[test]
    fn convergence_and_lag() {
        let a = node("a", 3, &["k1", "k2"], 5, Some(100));
        let b = node("b", 2, &["k1"], 7, Some(200));
        assert!(!converged(&[a.clone(), b.clone()]));
        assert_eq!(lagging(&[a.clone(), b.clone()], "k2"), ["b"]);
        assert!(converged(std::slice::from_ref(&a)));
        let mut c = b.clone();
        c.counting_since_unix = None;
        assert_eq!(merged_usage(&[a.clone(), c]).counting_since_unix, None);
        assert_eq!(merged_usage(&[]).counting_since_unix, None);
        let usage = merged_usage(&[a, b]);
        assert_eq!(usage.counting_since_unix, Some(30));
        assert_eq!(usage.keys["k1"].decrypts, 12);
        assert_eq!(usage.keys["k1"].last_decrypt_unix, Some(200));
    }
}
