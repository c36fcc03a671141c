//! What the keystore-administration commands print: listings that merge the sealed keystore
//! with the server's usage file, and the audit history.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::keystore::{HistoryEntry, KeyState, Keystore};
use crate::timefmt::rfc3339;
use crate::usage::UsageFile;

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
pub fn verify_report(path: &Path, ks: &Keystore) -> String {
    let mut out = format!(
        "ok: {} opens with this root key\ngeneration: {}\n",
        path.display(),
        ks.generation()
    );
    for r in ks.records() {
        let _ = writeln!(out, "key: {} {}", r.id, r.state);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageRecord;

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
