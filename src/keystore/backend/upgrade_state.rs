//! This node's record that the upgrade to this release was finalized for a keystore: a small
//! 0600 file beside the high-water mark (beside a file keystore, or in an etcd keystore's
//! `--cache-dir`), MACed under a key derived from the root key.
//!
//! Once it is there, a keystore with the same id in the previous release's format is refused:
//! an old file copied back into place (a restored `.bak`, an old etcd revision) must not get
//! around the protections that need this release's format. The previous release never reads
//! this file, so it is written from the first finalized load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::high_water::hex;
use super::KeystoreLocation;
use crate::crypto::MacKey;
use crate::keystore::format::{FORMAT_VERSION, PRE_FINALIZE_FORMAT};
use crate::keystore::model::Keystore;
use crate::keystore::{KeystoreError, RootKey};

/// Name of the state file in an etcd keystore's cache directory.
pub const STATE_FILE: &str = "upgrade-state.json";

const LABEL: &[u8] = b"localkms/upgrade-state/v1";

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The keystore (hex id) it is about.
    keystore_id: String,
    /// The format the keystore was finalized into.
    finalized_format: u16,
    /// When this node first served it finalized, Unix seconds.
    finalized_unix: i64,
    /// HMAC-SHA256 (hex) over the fields above, under a key derived from the root key.
    mac: String,
}

impl State {
    fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "localkms upgrade state\n{}\n{}\n{}",
            self.keystore_id, self.finalized_format, self.finalized_unix
        )
        .into_bytes()
    }
}

/// This node's upgrade state for one keystore.
pub struct UpgradeState {
    path: PathBuf,
}

/// What [`UpgradeState::status`] found, for `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// No state file: this node has not served the keystore finalized.
    None,
    /// This node has served the keystore finalized.
    Finalized,
    /// A file that does not verify under this root key (written under another root key, or
    /// edited), or is about another keystore.
    Unverified(String),
}

impl UpgradeState {
    /// The state kept at `path`.
    pub(crate) fn at(path: PathBuf) -> Self {
        UpgradeState { path }
    }

    /// The state file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<State>, KeystoreError> {
        super::high_water::read_state(&self.path, "an upgrade state file")
    }

    /// Whether the file records the keystore `keystore_id` as finalized under `root`.
    pub fn status(
        &self,
        keystore_id: Option<[u8; 16]>,
        root: &RootKey,
    ) -> Result<Recorded, KeystoreError> {
        let Some(state) = self.read()? else {
            return Ok(Recorded::None);
        };
        let key = MacKey::derive(root.key(), LABEL)?;
        if !key.verify_hex(&state.signed_bytes(), &state.mac) {
            return Ok(Recorded::Unverified(
                "its MAC does not verify under this root key (written under another root key, or edited)".into(),
            ));
        }
        if keystore_id.map(|id| hex(&id)).as_deref() != Some(state.keystore_id.as_str()) {
            return Ok(Recorded::Unverified(format!(
                "it is about another keystore (id {})",
                state.keystore_id
            )));
        }
        Ok(Recorded::Finalized)
    }

    /// Refuses `ks` (read from `location`) when this node has served it finalized and it is
    /// now in the previous release's format: an old copy put back in place.
    pub fn check(
        &self,
        ks: &Keystore,
        root: &RootKey,
        location: &KeystoreLocation,
    ) -> Result<(), KeystoreError> {
        match self.status(ks.keystore_id(), root)? {
            Recorded::Finalized if !ks.finalized() => Err(KeystoreError::Refused(format!(
                "keystore {location} is in the format of the release before the upgrade (format {PRE_FINALIZE_FORMAT}), but this node has served it finalized (format {FORMAT_VERSION}, recorded in {}): an old copy put back in place would get around the protections of this release's format. To recover from that copy deliberately, export it (`localkms keystore export --keystore COPY …`) and restore the export with `localkms keystore import`, which writes this release's format; do not copy an old file or etcd revision into place",
                self.path.display()
            ))),
            Recorded::Unverified(why) => {
                tracing::warn!(state = %self.path.display(), reason = %why, "ignoring this node's upgrade state file; it is rewritten when a finalized keystore is served");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records that this node serves `ks` finalized (atomic, 0600); a no-op for a keystore
    /// not finalized, or one already recorded.
    pub fn record(&self, ks: &Keystore, root: &RootKey) -> Result<(), KeystoreError> {
        self.record_id(ks.finalized(), ks.keystore_id(), root)
    }

    /// As [`Self::record`], from what a write left: whether it was finalized, and the id.
    pub fn record_id(
        &self,
        finalized: bool,
        keystore_id: Option<[u8; 16]>,
        root: &RootKey,
    ) -> Result<(), KeystoreError> {
        if !finalized {
            return Ok(());
        }
        let Some(id) = keystore_id else {
            return Ok(());
        };
        if self.status(keystore_id, root).ok() == Some(Recorded::Finalized) {
            return Ok(());
        }
        let mut state = State {
            keystore_id: hex(&id),
            finalized_format: FORMAT_VERSION,
            finalized_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
            mac: String::new(),
        };
        state.mac = MacKey::derive(root.key(), LABEL)?.sign_hex(&state.signed_bytes());
        super::high_water::write_state(&self.path, &state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finalized_node_refuses_the_old_format_of_the_same_keystore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = UpgradeState::at(dir.path().join(STATE_FILE));
        let root = RootKey::from_bytes([3; 32]);
        let loc = KeystoreLocation::file(dir.path().join("ks"));
        let mut ks = crate::keystore::model::tests::fresh();
        ks.finalized = false;
        state.record(&ks, &root).expect("record");
        assert_eq!(
            state.status(ks.keystore_id(), &root).expect("status"),
            Recorded::None
        );
        state.check(&ks, &root, &loc).expect("nothing recorded yet");

        ks.finalized = true;
        state.record(&ks, &root).expect("record");
        assert_eq!(
            state.status(ks.keystore_id(), &root).expect("status"),
            Recorded::Finalized
        );
        state.check(&ks, &root, &loc).expect("finalized is fine");
        ks.finalized = false;
        let err = state
            .check(&ks, &root, &loc)
            .expect_err("old format refused");
        assert!(err.to_string().contains("keystore import"), "{err}");

        // Under another root key the file does not count (and is not trusted to refuse).
        let other = RootKey::from_bytes([4; 32]);
        assert!(matches!(
            state.status(ks.keystore_id(), &other).expect("status"),
            Recorded::Unverified(_)
        ));
        // An edit breaks the MAC.
        let text = std::fs::read_to_string(state.path()).expect("read");
        std::fs::write(
            state.path(),
            text.replace("\"finalized_format\": 3", "\"finalized_format\": 2"),
        )
        .expect("write");
        assert!(matches!(
            state.status(ks.keystore_id(), &root).expect("status"),
            Recorded::Unverified(_)
        ));
    }
}
