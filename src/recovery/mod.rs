//! Disaster recovery: a lost node, disk or root key must never mean a lost cluster.
//!
//! The keyring is exported as versioned JSON ([`export`]) sealed with age to recovery
//! recipients whose private half stays offline ([`sealing`]); a serving node writes one for
//! every generation it loads ([`backup`]); `keystore import` restores one under a new root key
//! and `verify-backup` proves a backup covers the live keystore ([`restore`]); the recovery
//! identity can be split among several people ([`shares`]).

pub mod backup;
pub mod export;
pub mod restore;
pub mod sealing;
pub mod shares;

/// `verify-backup` found keys the backup does not hold: it was made before a change. Its own
/// exit code ([`crate::cli::output::EXIT_BACKUP_BEHIND`]) lets a cron job tell "make a new
/// backup" from "this backup is broken".
#[derive(Debug, thiserror::Error)]
#[error("backup {file} is behind the keystore: it lacks key(s) {missing}. Make a fresh one (`localkms keystore export`, or let `serve --backup-dir` write it)")]
pub struct BackupBehind {
    /// The backup.
    pub file: String,
    /// The keys it lacks.
    pub missing: String,
}
