//! Turning an export back into a keystore (`keystore import`), merging one into an existing
//! keystore (`--merge`), and checking a backup covers a live keystore (`verify-backup`).

use ring::hmac;
use time::OffsetDateTime;

use super::export::{hex, Export};
use crate::crypto::SecretKey;
use crate::keystore::{Action, Actor, Kdf, KekRecord, KeyState, Keystore};

/// Why an import or a comparison cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The backup is of another keystore than the target.
    #[error("the backup is of keystore {backup}, but {target} is keystore {theirs}: refusing to mix two keystores. If you really mean to (say, merging the keys of a keystore that was re-created by mistake), pass --allow-different-keystore")]
    DifferentKeystore {
        /// The backup's keystore id.
        backup: String,
        /// Where the other keystore is.
        target: String,
        /// Its id.
        theirs: String,
    },
    /// `--merge` found a key with the same id and other material.
    #[error("merge refused, nothing written: key(s) {0} exist in both with DIFFERENT material. Two keys with one id cannot both be kept; find out which copy is right before going on")]
    Conflict(String),
    /// The keyed digest could not be computed.
    #[error("cannot compare keys: the OS random source failed")]
    Random,
}

/// Which KEKs a merge added, and which it left alone.
#[derive(Debug, Default)]
pub struct MergeReport {
    /// Added from the backup.
    pub added: Vec<String>,
    /// Present in both with the same material: unchanged.
    pub unchanged: Vec<String>,
    /// Destroyed in the target: they stay destroyed.
    pub kept_destroyed: Vec<String>,
}

/// The keystore a fresh import writes: the backup's keys, states and history under a new
/// key derivation `kdf`, at the next generation, with an `import` entry appended.
pub fn restored(export: Export, kdf: Kdf, now: OffsetDateTime, actor: &Actor) -> Keystore {
    let mut ks = Keystore {
        generation: export.generation.saturating_add(1),
        write_id: [0; 12],
        keystore_id: export.keystore_id,
        // A fresh import, like `init`, starts a keystore's life on this release.
        finalized: true,
        kdf,
        records: export.records,
        history: export.history,
    };
    ks.record(now, Action::Import, None, actor);
    ks
}

/// Refuses a backup of another keystore than `target_id` (unless `allow`).
pub fn check_same_keystore(
    export: &Export,
    target_id: Option<[u8; 16]>,
    target: &str,
    allow: bool,
) -> Result<(), RestoreError> {
    match (export.keystore_id, target_id) {
        (Some(a), Some(b)) if a != b && !allow => Err(RestoreError::DifferentKeystore {
            backup: hex(&a),
            target: target.to_owned(),
            theirs: hex(&b),
        }),
        _ => Ok(()),
    }
}

fn copy(key: &SecretKey) -> SecretKey {
    // SecretKey has no Clone on purpose; this is the one deliberate copy, into another
    // locked, wiped-on-drop page.
    let mut out = SecretKey::zeroed();
    out.expose_mut().copy_from_slice(key.expose());
    out
}

/// Adds the backup's keys missing from `ks` without changing any key `ks` has. A key present
/// in both with different material fails the whole merge. An added primary joins as retired
/// (the target keeps its own primary); tombstones are added as tombstones.
pub fn merge(
    ks: &mut Keystore,
    export: &Export,
    now: OffsetDateTime,
    actor: &Actor,
) -> Result<MergeReport, RestoreError> {
    let mut report = MergeReport::default();
    let mut conflicts = Vec::new();
    for r in &export.records {
        match ks.records.iter().find(|k| k.id == r.id) {
            Some(existing) => match (&existing.material, &r.material) {
                (Some(a), Some(b)) if a.expose() != b.expose() => conflicts.push(r.id.to_string()),
                (None, _) => report.kept_destroyed.push(r.id.to_string()),
                _ => report.unchanged.push(r.id.to_string()),
            },
            None => report.added.push(r.id.to_string()),
        }
    }
    if !conflicts.is_empty() {
        return Err(RestoreError::Conflict(conflicts.join(", ")));
    }
    let demote = |s: KeyState| {
        if s == KeyState::Primary {
            KeyState::Retired
        } else {
            s
        }
    };
    for r in export
        .records
        .iter()
        .filter(|r| report.added.contains(&r.id.to_string()))
    {
        ks.records.push(KekRecord {
            id: r.id.clone(),
            state: demote(r.state),
            created_at: r.created_at,
            changed_at: r.changed_at,
            disabled_from: r.disabled_from.map(demote),
            material: r.material.as_ref().map(copy),
        });
        ks.record(now, Action::Import, Some(r.id.clone()), actor);
    }
    Ok(report)
}

/// How a backup compares with the live keystore.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Live keys with material that the backup does not hold (made after it).
    pub missing: Vec<String>,
    /// Live keys whose material differs from the backup's (this should never happen).
    pub differ: Vec<String>,
    /// Live keys the backup holds with identical material.
    pub covered: Vec<String>,
}

impl Coverage {
    /// Every live key is in the backup, identical.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.differ.is_empty()
    }
}

/// Compares every non-destroyed KEK of `live` with `backup`, by a keyed digest (HMAC-SHA256
/// under a key drawn for this comparison), so material is never printed or compared byte by
/// byte outside the primitive.
pub fn coverage(backup: &Export, live: &Keystore) -> Result<Coverage, RestoreError> {
    let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
        .map_err(|_| RestoreError::Random)?;
    let digest = |k: &SecretKey| hmac::sign(&key, k.expose());
    let mut out = Coverage::default();
    for r in live.records() {
        let Some(material) = &r.material else {
            continue;
        };
        let id = r.id.to_string();
        match backup
            .records
            .iter()
            .find(|b| b.id == r.id)
            .and_then(|b| b.material.as_ref())
        {
            None => out.missing.push(id),
            Some(b) if digest(b).as_ref() == digest(material).as_ref() => out.covered.push(id),
            Some(_) => out.differ.push(id),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::model::tests::{actor, clone_for_test, fresh};
    use crate::recovery::export;

    fn exported(ks: &Keystore) -> Export {
        export::decode(&export::encode(ks, OffsetDateTime::now_utc()).expect("encode"))
            .expect("decode")
    }

    #[test]
    fn a_restore_keeps_every_key_state_and_the_history() {
        let mut ks = fresh();
        ks.rotate(OffsetDateTime::now_utc(), &actor())
            .expect("rotate");
        let back = restored(
            exported(&ks),
            Kdf::KeyFile,
            OffsetDateTime::now_utc(),
            &actor(),
        );
        assert_eq!(back.generation(), ks.generation() + 1);
        assert_eq!(back.keystore_id(), ks.keystore_id());
        assert_eq!(back.records().len(), 2);
        assert_eq!(
            back.primary().map(|p| p.id.clone()),
            ks.primary().map(|p| p.id.clone())
        );
        assert_eq!(
            back.history().last().map(|h| h.action),
            Some(Action::Import)
        );
    }

    #[test]
    fn merge_adds_missing_keys_and_refuses_conflicts() {
        let mut ks = fresh();
        let backup_of_old = exported(&ks);
        let mut other = clone_for_test(&ks);
        ks.rotate(OffsetDateTime::now_utc(), &actor())
            .expect("rotate");
        let newer = exported(&ks);

        // Merging the newer backup into the older copy adds the new key as retired.
        let report = merge(&mut other, &newer, OffsetDateTime::now_utc(), &actor()).expect("merge");
        assert_eq!((report.added.len(), report.unchanged.len()), (1, 1));
        let added = other
            .records()
            .iter()
            .find(|r| r.id.to_string() == report.added[0])
            .expect("added");
        assert_eq!(added.state, KeyState::Retired);
        assert_eq!(
            other
                .records()
                .iter()
                .filter(|r| r.state == KeyState::Primary)
                .count(),
            1
        );

        // Same id, other material: refused, and nothing changed.
        let mut forged = exported(&ks);
        forged.records[0].material = Some(SecretKey::generate().expect("key"));
        let before = ks.records().len();
        let e = merge(&mut ks, &forged, OffsetDateTime::now_utc(), &actor()).expect_err("conflict");
        assert!(e.to_string().contains("DIFFERENT material"), "{e}");
        assert_eq!(ks.records().len(), before);

        // Coverage: the old backup misses the new key; the new one covers all.
        let cov = coverage(&backup_of_old, &ks).expect("coverage");
        assert_eq!(
            (cov.missing.len(), cov.covered.len(), cov.differ.len()),
            (1, 1, 0)
        );
        assert!(coverage(&newer, &ks).expect("coverage").complete());
        let cov = coverage(&forged, &ks).expect("coverage");
        assert_eq!(cov.differ.len(), 1);
    }

    #[test]
    fn another_keystore_is_refused_unless_allowed() {
        let a = exported(&fresh());
        let b = fresh();
        assert!(check_same_keystore(&a, b.keystore_id(), "ks", false).is_err());
        assert!(check_same_keystore(&a, b.keystore_id(), "ks", true).is_ok());
        assert!(check_same_keystore(&a, a.keystore_id, "ks", false).is_ok());
    }
}
