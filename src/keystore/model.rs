//! The keystore in memory: KEK records, their audit history, and the lifecycle rules.

use std::fmt;

use time::OffsetDateTime;

use super::root_key::Kdf;
use crate::crypto::{CryptoError, SecretKey};
use crate::key_id::KeyId;
use crate::timefmt::rfc3339;

/// Where a KEK is in its life (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Decrypts; not yet used to encrypt (distributed ahead of a switch).
    Staged,
    /// The one key that encrypts.
    Primary,
    /// An older key: decrypts only.
    Retired,
    /// Decrypt refused, reversibly.
    Disabled,
    /// Material wiped; only the id and time remain.
    Destroyed,
}

impl KeyState {
    /// The lowercase name used in the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Staged => "staged",
            KeyState::Primary => "primary",
            KeyState::Retired => "retired",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The state named `name` (as [`KeyState::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Every state, for metrics and listings.
    pub const ALL: [KeyState; 5] = [
        KeyState::Staged,
        KeyState::Primary,
        KeyState::Retired,
        KeyState::Disabled,
        KeyState::Destroyed,
    ];
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One KEK: its public metadata and, unless destroyed, its material.
pub struct KekRecord {
    /// Public id, the apiserver's key_id.
    pub id: KeyId,
    /// Lifecycle state.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Time of the last state change, Unix seconds (the destruction time for a tombstone, the
    /// promotion time for the primary).
    pub changed_at: i64,
    /// For a disabled key, the state `keys enable` restores.
    pub disabled_from: Option<KeyState>,
    /// The key; `None` only for a destroyed tombstone.
    pub material: Option<SecretKey>,
}

impl fmt::Debug for KekRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the material: only whether it is there.
        f.debug_struct("KekRecord")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("changed_at", &self.changed_at)
            .field("has_material", &self.material.is_some())
            .finish()
    }
}

/// What a history entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The keystore was created.
    Init,
    /// A KEK was created as primary (by `keys rotate`).
    Create,
    /// A KEK was created as staged.
    Stage,
    /// A KEK became primary.
    Promote,
    /// A KEK was disabled.
    Disable,
    /// A KEK was re-enabled.
    Enable,
    /// A KEK's material was destroyed.
    Destroy,
    /// The keystore was re-sealed under a new root key.
    RootKeyRotate,
    /// The server rotated on its `--rotate-after` schedule.
    ScheduledRotation,
    /// The keystore was restored (or KEKs merged into it) from a backup by `keystore import`.
    Import,
    /// `localkms upgrade finalize`: from here on the keystore is written in this release's
    /// format. Only ever in a finalized (format 3) keystore, which the previous release does
    /// not read, so it never meets a build that lacks the code.
    UpgradeFinalize,
}

impl Action {
    /// The name shown in `keys history`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Init => "init",
            Action::Create => "create",
            Action::Stage => "stage",
            Action::Promote => "promote",
            Action::Disable => "disable",
            Action::Enable => "enable",
            Action::Destroy => "destroy",
            Action::RootKeyRotate => "root-key-rotate",
            Action::ScheduledRotation => "scheduled-rotation",
            Action::Import => "import",
            Action::UpgradeFinalize => "upgrade-finalize",
        }
    }

    /// Every action, to parse the names back ([`Action::parse`]).
    pub const ALL: [Action; 11] = [
        Action::Init,
        Action::Create,
        Action::Stage,
        Action::Promote,
        Action::Disable,
        Action::Enable,
        Action::Destroy,
        Action::RootKeyRotate,
        Action::ScheduledRotation,
        Action::Import,
        Action::UpgradeFinalize,
    ];

    /// The action named `name` (as [`Action::as_str`] writes it): backups store names, not
    /// codes, so an operator can read them without localkms.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Action::Init => 1,
            Action::Create => 2,
            Action::Stage => 3,
            Action::Promote => 4,
            Action::Disable => 5,
            Action::Enable => 6,
            Action::Destroy => 7,
            Action::RootKeyRotate => 8,
            Action::ScheduledRotation => 9,
            Action::Import => 10,
            Action::UpgradeFinalize => 11,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Action::Init,
            2 => Action::Create,
            3 => Action::Stage,
            4 => Action::Promote,
            5 => Action::Disable,
            6 => Action::Enable,
            7 => Action::Destroy,
            8 => Action::RootKeyRotate,
            9 => Action::ScheduledRotation,
            10 => Action::Import,
            11 => Action::UpgradeFinalize,
            _ => return None,
        })
    }
}

/// Who made a change, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// User name and uid, e.g. `alice (uid 1000)`.
    pub user: String,
    /// Host name.
    pub host: String,
}

impl Actor {
    /// The user and host running this process. The uid is the kernel's; the name comes from
    /// `SUDO_USER` or `USER` when set, since there is no passwd lookup without libc.
    pub fn current() -> Self {
        let uid = rustix::process::getuid().as_raw();
        let name = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_default();
        let user = if name.is_empty() {
            format!("uid {uid}")
        } else {
            format!("{name} (uid {uid})")
        };
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        Actor { user, host }
    }

    /// The running server, for scheduled rotations.
    pub fn server() -> Self {
        let mut actor = Self::current();
        actor.user = format!("localkms serve, {}", actor.user);
        actor
    }
}

/// One line of the audit trail kept inside the sealed keystore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// When, Unix seconds.
    pub at: i64,
    /// What.
    pub action: Action,
    /// Which KEK, when the action concerns one.
    pub key_id: Option<KeyId>,
    /// Who and where.
    pub actor: Actor,
}

/// How many history entries the keystore keeps; older ones are dropped first.
pub const HISTORY_KEPT: usize = 1000;

/// A lifecycle rule refused a change. Each message says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The random source failed while creating a key.
    #[error("cannot create a key: {0}")]
    Crypto(#[from] CryptoError),
    /// Could not find an unused key id (astronomically unlikely).
    #[error("cannot pick an unused key id; try again")]
    IdExhausted,
    /// No such key.
    #[error("there is no key {0} in this keystore; `localkms keys list` shows the ids")]
    UnknownKey(String),
    /// The key is already in the requested state.
    #[error("key {id} is already {state}; nothing to do")]
    AlreadyInState {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
    },
    /// Promote from a state that cannot encrypt.
    #[error("key {id} is {state}; only a staged or retired key can be promoted{hint}")]
    CannotPromote {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
        /// What to do.
        hint: &'static str,
    },
    /// The primary must keep encrypting.
    #[error("key {0} is the primary and encrypts every new write; rotate or promote another key first, then {1} it")]
    PrimaryRefused(KeyId, &'static str),
    /// Only disabled keys can be enabled.
    #[error("key {id} is {state}, not disabled; `keys enable` only undoes `keys disable`")]
    NotDisabled {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
    },
    /// A destroyed key cannot change state.
    #[error("key {0} was destroyed at {1}; its material is gone and it cannot be used again")]
    Destroyed(KeyId, String),
    /// Destroy refused: no server has a usage record for the key.
    #[error("destroy refused: no decrypt usage has been recorded for key {0}, so nothing shows it is unused (the usage file is written by the running server at most once a minute and at shutdown; on etcd, only live nodes report). Run the server with this keystore for a while, or pass --force if you are sure nothing is sealed under it. `localkms keys disable {0}` is the reversible first step")]
    NoUsageRecord(KeyId),
    /// Destroy refused: the key decrypted within the window.
    #[error("destroy refused: key {id} decrypted data at {last}, within the last {window} (--min-retired-age), so data is still sealed under it. Rewrite every object sealed under it (`kubectl get secrets,configmaps -A -o json | kubectl replace -f -`), `localkms keys disable {id}` (reversible) and watch for decrypt errors, then destroy once {window} have passed without a decrypt; or pass --force")]
    RecentlyUsed {
        /// The key.
        id: KeyId,
        /// Last decrypt, RFC 3339.
        last: String,
        /// The window, as given.
        window: String,
    },
    /// Destroy refused: the key left primary or staged too recently.
    #[error("destroy refused: key {id} was {was} until {since}, less than {window} ago (--min-retired-age). Under KMS v2 the apiserver caches data keys and rarely calls Decrypt, so data sealed under it shows no decrypts; no recorded use is not proof of no use. Rewrite every object sealed under it (`kubectl get secrets,configmaps -A -o json | kubectl replace -f -`), `localkms keys disable {id}` (reversible) meanwhile, and destroy after {earliest}; or pass --force")]
    RetiredTooRecently {
        /// The key.
        id: KeyId,
        /// `primary or staged`, or what the key is now.
        was: &'static str,
        /// When it stopped being primary or staged, RFC 3339.
        since: String,
        /// The window, as given.
        window: String,
        /// The earliest time destroy can proceed, RFC 3339.
        earliest: String,
    },
    /// Destroy refused: the key is staged (another node may promote it at any moment).
    #[error("destroy refused: key {0} is staged and may be promoted at any moment; `localkms keys disable {0}` (reversible) first, or pass --force")]
    StagedRefused(KeyId),
    /// Destroy refused: usage has not been counted for the whole window.
    #[error("destroy refused: decrypt usage has only been counted since {since}, which does not cover the last {window} (--min-retired-age): the usage record was started afresh (a new server, or a corrupt usage file moved aside), so a missing decrypt proves nothing yet. Wait until {earliest} with the server running, or pass --force")]
    UsageNotCovering {
        /// Since when usage is counted, RFC 3339 (or `never`).
        since: String,
        /// The window, as given.
        window: String,
        /// When the count will cover the window, RFC 3339.
        earliest: String,
    },
}

/// A whole-unit duration as the flag takes it (`7d`, `36h`, `90m`, `45s`), for messages that
/// name the window next to `--min-retired-age`.
fn flag_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// What `keys destroy` weighs before wiping a KEK. Evidence of disuse must be positive:
/// a key with no recorded decrypts may still protect data (KMS v2 caches DEKs), so the guard
/// asks for time out of service and for a usage count that covered all that time.
#[derive(Clone, Debug)]
pub enum DestroyGuard {
    /// `--force`: the operator takes responsibility (the primary is still refused).
    Force,
    /// Destroy only on the evidence given.
    Evidence(DestroyEvidence),
    /// A scan of the apiserver's etcd found nothing that depends on the key (checked by the
    /// caller, `keys destroy --scan-report`); that replaces the decrypt-usage evidence, and
    /// the key must still have been out of service for this long.
    Scanned {
        /// `--min-retired-age`.
        min_retired_age: std::time::Duration,
    },
}

/// The usage evidence for one key, gathered outside the keystore.
#[derive(Clone, Debug)]
pub struct DestroyEvidence {
    /// How long the key must have been out of service, and decrypt-free.
    pub min_retired_age: std::time::Duration,
    /// Since when (Unix seconds) decrypt usage has been counted without a restart from zero;
    /// `None` when unknown.
    pub usage_counted_since: Option<i64>,
    /// The key's last decrypt: `None` when no usage record names the key, `Some(None)` when
    /// one does and it never decrypted, `Some(Some(t))` for a decrypt at Unix time `t`.
    pub last_decrypt_at: Option<Option<i64>>,
}

/// How many of `records` are primary: a keystore read from anywhere (a file, a backup) must
/// have exactly one.
pub fn primaries(records: &[KekRecord]) -> usize {
    records
        .iter()
        .filter(|r| r.state == KeyState::Primary)
        .count()
}

/// Every KEK the cluster's data may be sealed under, the audit trail, and the write generation.
#[derive(Debug)]
pub struct Keystore {
    pub(crate) generation: u64,
    /// The random nonce of the write this keystore was read from (zeros before its first
    /// write): two copies with one generation but different write ids have diverged.
    pub(crate) write_id: [u8; 12],
    /// Random, made by `init` and kept for the keystore's life; bound into the authenticated
    /// header, so a node can tell another keystore (another `init`, another cluster) sealed
    /// under the same root key. `None` only for a file written before ids existed, until its
    /// next write.
    pub(crate) keystore_id: Option<[u8; 16]>,
    /// Whether the upgrade to this release is finalized for this keystore: it is then written
    /// in this release's format ([`crate::keystore::format::FORMAT_VERSION`]), which the
    /// previous release cannot read; until then in the previous release's. A fresh `init` or
    /// import starts finalized; `localkms upgrade finalize` sets it; nothing clears it.
    pub(crate) finalized: bool,
    pub(crate) kdf: Kdf,
    pub(crate) records: Vec<KekRecord>,
    pub(crate) history: Vec<HistoryEntry>,
}

/// Default `--min-retired-age`: how long a key must be out of service, and decrypt-free, before
/// `keys destroy` proceeds without `--force`.
pub const DEFAULT_MIN_RETIRED_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

impl Keystore {
    /// A new keystore holding one fresh primary KEK, at generation 1.
    pub fn new_with_primary(
        now: OffsetDateTime,
        kdf: Kdf,
        actor: &Actor,
    ) -> Result<Self, LifecycleError> {
        let mut keystore_id = [0u8; 16];
        crate::crypto::fill_random(&mut keystore_id)?;
        let mut ks = Keystore {
            generation: 1,
            write_id: [0; 12],
            keystore_id: Some(keystore_id),
            finalized: true,
            kdf,
            records: Vec::new(),
            history: Vec::new(),
        };
        let id = ks.create_key(now, KeyState::Primary)?;
        ks.record(now, Action::Init, Some(id), actor);
        Ok(ks)
    }

    /// Write generation: grows by one on every saved change, so a reload can refuse going back.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Identifies the exact write this keystore was read from (see the field's docs).
    pub fn write_id(&self) -> [u8; 12] {
        self.write_id
    }

    /// The keystore's identity (see the field), if it has one yet.
    pub fn keystore_id(&self) -> Option<[u8; 16]> {
        self.keystore_id
    }

    /// How the root key is derived for this keystore.
    pub fn kdf(&self) -> &Kdf {
        &self.kdf
    }

    /// All records, oldest first.
    pub fn records(&self) -> &[KekRecord] {
        &self.records
    }

    /// The audit trail, oldest first.
    pub fn history(&self) -> &[HistoryEntry] {
        &self.history
    }

    /// The primary record, if any.
    pub fn primary(&self) -> Option<&KekRecord> {
        self.records.iter().find(|r| r.state == KeyState::Primary)
    }

    /// Gives up the records (and their material) to build a keyring without copying keys.
    pub fn into_records(self) -> Vec<KekRecord> {
        self.records
    }

    /// Creates a new KEK and makes it primary; the old primary becomes retired (decrypt only).
    pub fn rotate(&mut self, now: OffsetDateTime, actor: &Actor) -> Result<KeyId, LifecycleError> {
        let id = self.create_key(now, KeyState::Staged)?;
        self.record(now, Action::Create, Some(id.clone()), actor);
        self.promote(id.as_str(), now, actor)?;
        Ok(id)
    }

    /// Creates a new KEK as staged: it decrypts but does not encrypt until promoted, so it can
    /// reach every node before any node uses it.
    pub fn stage(&mut self, now: OffsetDateTime, actor: &Actor) -> Result<KeyId, LifecycleError> {
        let id = self.create_key(now, KeyState::Staged)?;
        self.record(now, Action::Stage, Some(id.clone()), actor);
        Ok(id)
    }

    /// Makes a staged or retired KEK primary; the old primary becomes retired.
    pub fn promote(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        actor: &Actor,
    ) -> Result<(), LifecycleError> {
        let idx = self.find(id)?;
        let rec = &self.records[idx];
        match rec.state {
            KeyState::Staged | KeyState::Retired => {}
            KeyState::Primary => {
                return Err(LifecycleError::AlreadyInState {
                    id: rec.id.clone(),
                    state: rec.state,
                })
            }
            KeyState::Disabled => {
                return Err(LifecycleError::CannotPromote {
                    id: rec.id.clone(),
                    state: rec.state,
                    hint: "; `localkms keys enable` it first",
                })
            }
            KeyState::Destroyed => return Err(self.destroyed_error(idx)),
        }
        let ts = now.unix_timestamp();
        for r in self
            .records
            .iter_mut()
            .filter(|r| r.state == KeyState::Primary)
        {
            r.state = KeyState::Retired;
            r.changed_at = ts;
        }
        let rec = &mut self.records[idx];
        rec.state = KeyState::Primary;
        rec.changed_at = ts;
        let key_id = rec.id.clone();
        self.record(now, Action::Promote, Some(key_id), actor);
        Ok(())
    }

    /// Stops a KEK from decrypting, reversibly: the safe way to prove nothing needs it.
    pub fn disable(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        actor: &Actor,
    ) -> Result<(), LifecycleError> {
        let idx = self.find(id)?;
        let rec = &self.records[idx];
        match rec.state {
            KeyState::Primary => {
                return Err(LifecycleError::PrimaryRefused(rec.id.clone(), "disable"))
            }
            KeyState::Disabled => {
                return Err(LifecycleError::AlreadyInState {
                    id: rec.id.clone(),
                    state: rec.state,
                })
            }
            KeyState::Destroyed => return Err(self.destroyed_error(idx)),
            KeyState::Staged | KeyState::Retired => {}
        }
        let rec = &mut self.records[idx];
        rec.disabled_from = Some(rec.state);
        rec.state = KeyState::Disabled;
        rec.changed_at = now.unix_timestamp();
        let key_id = rec.id.clone();
        self.record(now, Action::Disable, Some(key_id), actor);
        Ok(())
    }

    /// Undoes [`disable`](Self::disable): the KEK returns to the state it had.
    pub fn enable(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        actor: &Actor,
    ) -> Result<(), LifecycleError> {
        let idx = self.find(id)?;
        let rec = &self.records[idx];
        match rec.state {
            KeyState::Disabled => {}
            KeyState::Destroyed => return Err(self.destroyed_error(idx)),
            state => {
                return Err(LifecycleError::NotDisabled {
                    id: rec.id.clone(),
                    state,
                })
            }
        }
        let rec = &mut self.records[idx];
        rec.state = rec.disabled_from.take().unwrap_or(KeyState::Retired);
        rec.changed_at = now.unix_timestamp();
        let key_id = rec.id.clone();
        self.record(now, Action::Enable, Some(key_id), actor);
        Ok(())
    }

    /// In an old copy of the keystore (a backup), wipes the material of a KEK destroyed since,
    /// leaving a tombstone and the copy's history as they were. Returns whether anything
    /// changed. Not a lifecycle change: the current keystore records the destroy.
    pub fn scrub(&mut self, id: &str) -> bool {
        let Ok(idx) = self.find(id) else {
            return false;
        };
        let rec = &mut self.records[idx];
        if rec.material.is_none() {
            return false;
        }
        rec.state = KeyState::Destroyed;
        rec.disabled_from = None;
        // Dropping the key wipes it.
        rec.material = None;
        true
    }

    /// Wipes a KEK's material, keeping a tombstone (id and time) so errors can say what
    /// happened. Refuses the primary always; unless `guard` is [`DestroyGuard::Force`], also
    /// refuses a staged key, a key that left service less than `min_retired_age` ago, a key
    /// that decrypted within that window, and any key when usage was not counted for the
    /// whole window or has no record of it.
    pub fn destroy(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        actor: &Actor,
        guard: &DestroyGuard,
    ) -> Result<(), LifecycleError> {
        let idx = self.find(id)?;
        let rec = &self.records[idx];
        match rec.state {
            KeyState::Primary => {
                return Err(LifecycleError::PrimaryRefused(rec.id.clone(), "destroy"))
            }
            KeyState::Destroyed => return Err(self.destroyed_error(idx)),
            _ => {}
        }
        let ts = now.unix_timestamp();
        match guard {
            DestroyGuard::Force => {}
            DestroyGuard::Evidence(evidence) => self.check_destroy_evidence(idx, ts, evidence)?,
            DestroyGuard::Scanned { min_retired_age } => {
                self.check_out_of_service(idx, ts, *min_retired_age)?;
            }
        }
        let rec = &mut self.records[idx];
        rec.state = KeyState::Destroyed;
        rec.disabled_from = None;
        rec.changed_at = ts;
        // Dropping the key wipes it.
        rec.material = None;
        let key_id = rec.id.clone();
        self.record(now, Action::Destroy, Some(key_id), actor);
        Ok(())
    }

    fn check_destroy_evidence(
        &self,
        idx: usize,
        now: i64,
        evidence: &DestroyEvidence,
    ) -> Result<(), LifecycleError> {
        self.check_out_of_service(idx, now, evidence.min_retired_age)?;
        let rec = &self.records[idx];
        let window_s = i64::try_from(evidence.min_retired_age.as_secs()).unwrap_or(i64::MAX);
        let window = flag_duration(evidence.min_retired_age);
        match evidence.usage_counted_since {
            Some(counted) if now.saturating_sub(counted) >= window_s => {}
            counted => {
                return Err(LifecycleError::UsageNotCovering {
                    since: counted.map_or_else(|| "never".to_owned(), rfc3339),
                    earliest: rfc3339(counted.unwrap_or(now).saturating_add(window_s)),
                    window,
                })
            }
        }
        match evidence.last_decrypt_at {
            None => Err(LifecycleError::NoUsageRecord(rec.id.clone())),
            Some(Some(last)) if now.saturating_sub(last) < window_s => {
                Err(LifecycleError::RecentlyUsed {
                    id: rec.id.clone(),
                    last: rfc3339(last),
                    window,
                })
            }
            Some(_) => Ok(()),
        }
    }

    /// The part of the guard no evidence replaces: a staged key (another node may promote it)
    /// is refused, and the key must have been out of service for `min_retired_age`.
    fn check_out_of_service(
        &self,
        idx: usize,
        now: i64,
        min_retired_age: std::time::Duration,
    ) -> Result<(), LifecycleError> {
        let rec = &self.records[idx];
        let window_s = i64::try_from(min_retired_age.as_secs()).unwrap_or(i64::MAX);
        if rec.state == KeyState::Staged
            || (rec.state == KeyState::Disabled && rec.disabled_from == Some(KeyState::Staged))
        {
            return Err(LifecycleError::StagedRefused(rec.id.clone()));
        }
        let since = self.out_of_service_since(idx);
        if now.saturating_sub(since) < window_s {
            return Err(LifecycleError::RetiredTooRecently {
                id: rec.id.clone(),
                was: "primary or staged",
                since: rfc3339(since),
                window: flag_duration(min_retired_age),
                earliest: rfc3339(since.saturating_add(window_s)),
            });
        }
        Ok(())
    }

    /// When the key at `idx` last stopped being primary or staged (Unix seconds), read from
    /// the history. Where the history cannot say (it never names the key, or older entries
    /// were dropped), the key's last state change, which is never earlier, stands in.
    fn out_of_service_since(&self, idx: usize) -> i64 {
        let rec = &self.records[idx];
        let id = &rec.id;
        let mut primary: Option<&KeyId> = None;
        let mut staged: Vec<&KeyId> = Vec::new();
        let mut last_active: Option<i64> = None;
        for h in &self.history {
            if primary == Some(id) || staged.contains(&id) {
                last_active = Some(h.at);
            }
            let Some(k) = h.key_id.as_ref() else { continue };
            match h.action {
                Action::Init | Action::Promote | Action::ScheduledRotation => {
                    staged.retain(|s| *s != k);
                    primary = Some(k);
                }
                Action::Create | Action::Stage => staged.push(k),
                Action::Disable | Action::Destroy => staged.retain(|s| *s != k),
                Action::Enable
                | Action::RootKeyRotate
                | Action::Import
                | Action::UpgradeFinalize => {}
            }
        }
        let truncated = self.history.len() >= HISTORY_KEPT;
        match last_active {
            Some(t) if !truncated => t.max(rec.created_at),
            Some(t) => t.max(rec.changed_at),
            None => rec.changed_at.max(rec.created_at),
        }
    }

    /// Whether the primary has been primary for at least `max_age_secs`.
    pub fn rotation_due(&self, max_age_secs: i64, now: OffsetDateTime) -> bool {
        self.primary()
            .is_some_and(|p| now.unix_timestamp().saturating_sub(p.changed_at) >= max_age_secs)
    }

    /// If the primary has been primary for longer than `max_age_secs`, rotates and returns the
    /// new id. Checked under the keystore lock, so two servers cannot both rotate.
    pub fn rotate_if_older(
        &mut self,
        max_age_secs: i64,
        now: OffsetDateTime,
        actor: &Actor,
    ) -> Result<Option<KeyId>, LifecycleError> {
        if !self.rotation_due(max_age_secs, now) {
            return Ok(None);
        }
        let id = self.create_key(now, KeyState::Staged)?;
        self.promote(id.as_str(), now, actor)?;
        // Replace the promote entry with one that says why.
        if let Some(last) = self.history.last_mut() {
            last.action = Action::ScheduledRotation;
        }
        Ok(Some(id))
    }

    /// Whether the upgrade to this release is finalized (see the field): written in this
    /// release's format, which the previous release does not read.
    pub fn finalized(&self) -> bool {
        self.finalized
    }

    /// `upgrade finalize`: from the next write on, this release's format. Returns whether it
    /// changed anything (finalizing twice is not an error, and writes nothing new).
    pub fn finalize(&mut self, now: OffsetDateTime, actor: &Actor) -> bool {
        if self.finalized {
            return false;
        }
        self.finalized = true;
        self.record(now, Action::UpgradeFinalize, None, actor);
        true
    }

    /// Records a root-key rotation in the history; the caller swaps the KDF.
    pub fn record_root_key_rotation(&mut self, now: OffsetDateTime, actor: &Actor) {
        self.record(now, Action::RootKeyRotate, None, actor);
    }

    fn destroyed_error(&self, idx: usize) -> LifecycleError {
        let rec = &self.records[idx];
        LifecycleError::Destroyed(rec.id.clone(), rfc3339(rec.changed_at))
    }

    fn find(&self, id: &str) -> Result<usize, LifecycleError> {
        self.records
            .iter()
            .position(|r| r.id.as_str() == id)
            .ok_or_else(|| LifecycleError::UnknownKey(id.chars().take(80).collect()))
    }

    pub(crate) fn record(
        &mut self,
        now: OffsetDateTime,
        action: Action,
        key_id: Option<KeyId>,
        actor: &Actor,
    ) {
        self.history.push(HistoryEntry {
            at: now.unix_timestamp(),
            action,
            key_id,
            actor: actor.clone(),
        });
        if self.history.len() > HISTORY_KEPT {
            let excess = self.history.len() - HISTORY_KEPT;
            self.history.drain(..excess);
        }
    }

    fn create_key(
        &mut self,
        now: OffsetDateTime,
        state: KeyState,
    ) -> Result<KeyId, LifecycleError> {
        let id = self.unused_id(now)?;
        let ts = now.unix_timestamp();
        self.records.push(KekRecord {
            id: id.clone(),
            state,
            created_at: ts,
            changed_at: ts,
            disabled_from: None,
            material: Some(SecretKey::generate()?),
        });
        Ok(id)
    }

    fn unused_id(&self, now: OffsetDateTime) -> Result<KeyId, LifecycleError> {
        for _ in 0..16 {
            let id = KeyId::generate(now)?;
            if self.records.iter().all(|r| r.id != id) {
                return Ok(id);
            }
        }
        Err(LifecycleError::IdExhausted)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn actor() -> Actor {
        Actor {
            user: "tester (uid 1)".into(),
            host: "node-1".into(),
        }
    }

    pub(crate) fn fresh() -> Keystore {
        Keystore::new_with_primary(OffsetDateTime::now_utc(), Kdf::KeyFile, &actor()).expect("new")
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// A deep copy, keys included: tests only (the product never clones key material).
    pub(crate) fn clone_for_test(ks: &Keystore) -> Keystore {
        Keystore {
            generation: ks.generation,
            write_id: ks.write_id,
            keystore_id: ks.keystore_id,
            finalized: ks.finalized,
            kdf: ks.kdf.clone(),
            records: ks
                .records
                .iter()
                .map(|r| KekRecord {
                    id: r.id.clone(),
                    state: r.state,
                    created_at: r.created_at,
                    changed_at: r.changed_at,
                    disabled_from: r.disabled_from,
                    material: r
                        .material
                        .as_ref()
                        .and_then(|k| SecretKey::from_slice(k.expose())),
                })
                .collect(),
            history: ks.history.clone(),
        }
    }

    fn state_of(ks: &Keystore, id: &KeyId) -> KeyState {
        ks.records()
            .iter()
            .find(|r| &r.id == id)
            .expect("present")
            .state
    }

    #[test]
    fn new_keystore_has_one_primary_and_an_init_entry() {
        let ks = fresh();
        assert_eq!(ks.records().len(), 1);
        assert_eq!(ks.records()[0].state, KeyState::Primary);
        assert_eq!(ks.generation(), 1);
        assert_eq!(ks.history().len(), 1);
        assert_eq!(ks.history()[0].action, Action::Init);
        assert_eq!(ks.history()[0].actor, actor());
    }

    #[test]
    fn rotate_retires_the_old_primary() {
        let mut ks = fresh();
        let old = ks.records()[0].id.clone();
        let new = ks.rotate(now(), &actor()).expect("rotate");
        assert_ne!(old, new);
        assert_eq!(ks.primary().map(|r| &r.id), Some(&new));
        assert_eq!(state_of(&ks, &old), KeyState::Retired);
        assert_eq!(
            ks.records()
                .iter()
                .filter(|r| r.state == KeyState::Primary)
                .count(),
            1
        );
        let actions: Vec<_> = ks.history().iter().map(|h| h.action).collect();
        assert_eq!(actions, vec![Action::Init, Action::Create, Action::Promote]);
    }

    #[test]
    fn stage_then_promote() {
        let mut ks = fresh();
        let old = ks.primary().expect("primary").id.clone();
        let staged = ks.stage(now(), &actor()).expect("stage");
        assert_eq!(state_of(&ks, &staged), KeyState::Staged);
        assert_eq!(
            ks.primary().expect("primary").id,
            old,
            "staging must not switch"
        );
        ks.promote(staged.as_str(), now(), &actor())
            .expect("promote");
        assert_eq!(state_of(&ks, &staged), KeyState::Primary);
        assert_eq!(state_of(&ks, &old), KeyState::Retired);
        // And back: a retired key can be promoted again.
        ks.promote(old.as_str(), now(), &actor())
            .expect("promote back");
        assert_eq!(state_of(&ks, &staged), KeyState::Retired);
    }

    #[test]
    fn disable_enable_restores_the_previous_state() {
        let mut ks = fresh();
        let primary = ks.primary().expect("primary").id.clone();
        let staged = ks.stage(now(), &actor()).expect("stage");
        let err = ks
            .disable(primary.as_str(), now(), &actor())
            .expect_err("primary");
        assert!(
            err.to_string()
                .contains("rotate or promote another key first"),
            "{err}"
        );
        ks.disable(staged.as_str(), now(), &actor())
            .expect("disable");
        assert_eq!(state_of(&ks, &staged), KeyState::Disabled);
        assert!(ks.promote(staged.as_str(), now(), &actor()).is_err());
        assert!(ks.disable(staged.as_str(), now(), &actor()).is_err());
        ks.enable(staged.as_str(), now(), &actor()).expect("enable");
        assert_eq!(state_of(&ks, &staged), KeyState::Staged);
        let err = ks
            .enable(staged.as_str(), now(), &actor())
            .expect_err("not disabled");
        assert!(matches!(err, LifecycleError::NotDisabled { .. }));
    }

    #[test]
    fn destroy_rules() {
        let mut ks = fresh();
        let old = ks.primary().expect("primary").id.clone();
        let new = ks.rotate(now(), &actor()).expect("rotate");
        assert!(matches!(
            ks.destroy(new.as_str(), now(), &actor(), &DestroyGuard::Force),
            Err(LifecycleError::PrimaryRefused(..))
        ));
        let week = DEFAULT_MIN_RETIRED_AGE;
        let evidence = |counted: Option<i64>, last: Option<Option<i64>>| {
            DestroyGuard::Evidence(DestroyEvidence {
                min_retired_age: week,
                usage_counted_since: counted,
                last_decrypt_at: last,
            })
        };
        let t0 = now().unix_timestamp();
        // Retired seconds ago: refused however clean the usage looks.
        let err = ks
            .destroy(
                old.as_str(),
                now(),
                &actor(),
                &evidence(Some(t0 - 30 * 86_400), Some(None)),
            )
            .expect_err("just retired");
        assert!(
            matches!(err, LifecycleError::RetiredTooRecently { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("keys disable")
                && err.to_string().contains("less than 7d ago"),
            "{err}"
        );
        // Eight days later: still refused when usage was not counted over the window...
        let later = OffsetDateTime::from_unix_timestamp(t0 + 8 * 86_400).expect("time");
        let err = ks
            .destroy(
                old.as_str(),
                later,
                &actor(),
                &evidence(Some(t0 + 7 * 86_400), Some(None)),
            )
            .expect_err("usage restarted yesterday");
        assert!(
            matches!(err, LifecycleError::UsageNotCovering { .. }),
            "{err}"
        );
        assert!(matches!(
            ks.destroy(old.as_str(), later, &actor(), &evidence(None, Some(None))),
            Err(LifecycleError::UsageNotCovering { .. })
        ));
        // ...or when no record names the key, or it decrypted within the window.
        assert!(matches!(
            ks.destroy(old.as_str(), later, &actor(), &evidence(Some(t0), None)),
            Err(LifecycleError::NoUsageRecord(_))
        ));
        let err = ks
            .destroy(
                old.as_str(),
                later,
                &actor(),
                &evidence(Some(t0), Some(Some(t0 + 2 * 86_400))),
            )
            .expect_err("recently used");
        assert!(err.to_string().contains("--force"), "{err}");
        // Out of service and unused for the whole window: destroyed.
        ks.destroy(
            old.as_str(),
            later,
            &actor(),
            &evidence(Some(t0), Some(Some(t0 - 86_400))),
        )
        .expect("old enough");
        let rec = ks
            .records()
            .iter()
            .find(|r| r.id == old)
            .expect("tombstone kept");
        assert_eq!(rec.state, KeyState::Destroyed);
        assert!(rec.material.is_none());
        let err = ks
            .enable(old.as_str(), now(), &actor())
            .expect_err("destroyed");
        assert!(err.to_string().contains("destroyed at"), "{err}");
        assert!(matches!(
            ks.destroy("kek-nope", now(), &actor(), &DestroyGuard::Force),
            Err(LifecycleError::UnknownKey(_))
        ));
    }

    #[test]
    fn out_of_service_time_comes_from_the_history() {
        let t = |s: i64| OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).expect("time");
        let mut ks = Keystore::new_with_primary(t(0), Kdf::KeyFile, &actor()).expect("new");
        let a = ks.primary().expect("primary").id.clone();
        let b = ks.rotate(t(100), &actor()).expect("rotate");
        // Disabling later does not move the retirement time.
        ks.disable(a.as_str(), t(500), &actor()).expect("disable");
        let ia = ks.find(a.as_str()).expect("a");
        assert_eq!(ks.out_of_service_since(ia), 1_800_000_100);
        // A retired key promoted again and retired again counts from its last service.
        ks.enable(a.as_str(), t(600), &actor()).expect("enable");
        ks.promote(a.as_str(), t(700), &actor()).expect("promote a");
        ks.promote(b.as_str(), t(900), &actor()).expect("promote b");
        assert_eq!(ks.out_of_service_since(ia), 1_800_000_900);
        // A staged key is refused even with old, clean evidence.
        let c = ks.stage(t(1000), &actor()).expect("stage");
        let guard = DestroyGuard::Evidence(DestroyEvidence {
            min_retired_age: std::time::Duration::from_secs(1),
            usage_counted_since: Some(0),
            last_decrypt_at: Some(None),
        });
        assert!(matches!(
            ks.destroy(c.as_str(), t(100_000), &actor(), &guard),
            Err(LifecycleError::StagedRefused(_))
        ));
    }

    #[test]
    fn scheduled_rotation_only_when_due() {
        let mut ks = fresh();
        assert!(ks
            .rotate_if_older(3600, now(), &actor())
            .expect("check")
            .is_none());
        let later = now() + time::Duration::hours(2);
        let id = ks
            .rotate_if_older(3600, later, &actor())
            .expect("rotate")
            .expect("due");
        assert_eq!(ks.primary().expect("primary").id, id);
        assert_eq!(
            ks.history().last().expect("entry").action,
            Action::ScheduledRotation
        );
        assert!(ks
            .rotate_if_older(3600, later, &actor())
            .expect("check")
            .is_none());
    }

    #[test]
    fn history_is_bounded() {
        let mut ks = fresh();
        for _ in 0..(HISTORY_KEPT / 2 + 10) {
            ks.rotate(now(), &actor()).expect("rotate");
        }
        assert_eq!(ks.history().len(), HISTORY_KEPT);
    }

    #[test]
    fn debug_never_shows_material() {
        let ks = fresh();
        let text = format!("{ks:?}");
        assert!(text.contains("has_material: true"));
        let key = ks.records()[0]
            .material
            .as_ref()
            .expect("material")
            .expose();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex));
        assert!(!text.contains(&format!("{key:?}")));
    }
}
