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
}

/// The node records of one etcd keystore: what `localkms nodes`, two-phase rotation and the
/// destroy guard read, and what each server publishes.
#[derive(Clone)]
pub struct Nodes {
    etcd: Etcd,
}

impl Nodes {
    pub(crate) fn new(etcd: Etcd) -> Self {
        Nodes { etcd }
    }

    /// Every live node's record, sorted by name.
    pub async fn list(&self) -> Result<Vec<NodeRecord>, EtcdError> {
        list(&self.etcd).await
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
        run_publisher(self.etcd, node, ttl, keyring, metrics, shutdown).await
    }
}

/// Every live node's record, sorted by name.
pub async fn list(etcd: &Etcd) -> Result<Vec<NodeRecord>, EtcdError> {
    let mut nodes: Vec<NodeRecord> = etcd
        .list(&etcd.target().nodes_prefix())
        .await?
        .into_iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(nodes)
}

/// Publishes `record` under `lease`.
pub async fn publish(etcd: &Etcd, record: &NodeRecord, lease: i64) -> Result<(), EtcdError> {
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
pub async fn run_publisher(
    etcd: Etcd,
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
            match publish_once(&etcd, &node, ttl_s, &mut lease, &keyring).await {
                Ok(()) => {
                    published = Some((generation, Instant::now()));
                    warned = false;
                    if let Ok(all) = list(&etcd).await {
                        metrics.set_cluster(all.len(), converged(&all));
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
    etcd: &Etcd,
    node: &str,
    ttl_s: i64,
    lease: &mut i64,
    keyring: &crate::keyring::SharedKeyring,
) -> Result<(), EtcdError> {
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
    let record = NodeRecord {
        node: node.to_owned(),
        generation: ring.generation(),
        key_ids: ring.key_info().iter().map(|k| k.id.to_string()).collect(),
        primary: ring.primary_id().map(|k| k.to_string()).unwrap_or_default(),
        updated_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        usage,
        counting_since_unix: Some(ring.usage().counting_since()),
    };
    publish(etcd, &record, *lease).await
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
        }
    }

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
