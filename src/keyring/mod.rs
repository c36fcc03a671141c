//! The in-memory, read-only view of the keystore that the RPC hot path uses.
//!
//! A reload builds a whole new [`Keyring`] and swaps it in with one atomic pointer store
//! ([`SharedKeyring`]); requests load the current pointer without a lock and never touch disk.
//! Decrypt usage per KEK is counted here too ([`usage`]), with two atomic stores per request.

pub mod refresh;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::crypto::envelope::{self, Api, Envelope, EnvelopeError};
use crate::crypto::SecretKey;
use crate::key_id::KeyId;
use crate::keystore::{KeyState, Keystore};
use usage::{KeyUsage, UsageTracker};

/// Why the keyring refused an Encrypt or Decrypt; the server maps each to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The ciphertext or plaintext is malformed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A legacy format-1 ciphertext, and `--refuse-legacy-envelopes` is set.
    #[error("this ciphertext is in the legacy envelope format 1 (written by localkms before 0.3.0, and openable through both KMS APIs), which --refuse-legacy-envelopes refuses; if objects still hold such values, rewrite them (`kubectl get secrets -A -o json | kubectl replace -f -`) or serve without the flag")]
    LegacyRefused,
    /// The request's key_id differs from the one inside the ciphertext.
    #[error(
        "request key_id {requested:?} does not match the key id {inside} inside the ciphertext"
    )]
    KeyIdMismatch {
        /// What the request said (public, safe to echo; truncated).
        requested: String,
        /// What the ciphertext says.
        inside: KeyId,
    },
    /// The request carried no key_id.
    #[error("request key_id is empty; send the key_id that Encrypt returned with this ciphertext")]
    MissingKeyId,
    /// The keystore has never held this KEK.
    #[error(
        "key {0} is not in this plugin's keystore (not yet loaded here, or a keystore from another cluster or node?)"
    )]
    UnknownKey(KeyId),
    /// The KEK exists but is disabled.
    #[error("key {0} is disabled; `localkms keys enable {0}` makes it decrypt again")]
    Disabled(KeyId),
    /// The KEK was destroyed; only its tombstone remains.
    #[error("key {id} was destroyed at {at}; data sealed under it cannot be recovered")]
    Destroyed {
        /// The key.
        id: KeyId,
        /// RFC 3339 destruction time.
        at: String,
    },
    /// No primary key is loaded, so nothing can be encrypted.
    #[error("no primary key is loaded")]
    NoPrimary,
}

enum Entry {
    Usable(SecretKey, Arc<KeyUsage>),
    Disabled,
    Destroyed { at: i64 },
}

/// Public facts about one KEK, for metrics and logs.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    /// The id.
    pub id: KeyId,
    /// Its state.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last state change, Unix seconds.
    pub changed_at: i64,
}

/// Every KEK the plugin may use, as of one keystore generation.
pub struct Keyring {
    generation: u64,
    write_id: [u8; 12],
    finalized: bool,
    primary: Option<KeyId>,
    keys: HashMap<KeyId, Entry>,
    info: Vec<KeyInfo>,
    usage: Arc<UsageTracker>,
    legacy: Arc<LegacyPolicy>,
    self_test_passed: bool,
}

/// What happens to legacy format-1 ciphertexts: counted (`localkms_legacy_envelope_decrypts`,
/// so an operator sees when none are left) and, once the operator says so, refused. Shared by
/// every keyring a server loads, like the usage counts.
#[derive(Debug, Default)]
pub struct LegacyPolicy {
    refuse: std::sync::atomic::AtomicBool,
    decrypts: std::sync::atomic::AtomicU64,
}

impl LegacyPolicy {
    /// Refuse format-1 ciphertexts from now on.
    pub fn refuse(&self) {
        self.refuse
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Format-1 ciphertexts opened so far.
    pub fn decrypts(&self) -> u64 {
        self.decrypts.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn admit(&self, env: &Envelope<'_>) -> Result<(), KeyringError> {
        if env.is_legacy() && self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(KeyringError::LegacyRefused);
        }
        Ok(())
    }

    fn opened(&self, env: &Envelope<'_>) {
        if env.is_legacy() {
            self.decrypts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Keyring {
    /// Builds a keyring from a loaded keystore, taking its key material without copying it, and
    /// runs the self-test round trip that Status reports.
    pub fn from_keystore(ks: Keystore, usage: Arc<UsageTracker>) -> Self {
        let generation = ks.generation();
        let write_id = ks.write_id();
        let finalized = ks.finalized();
        let mut primary = None;
        let mut keys = HashMap::new();
        let mut info = Vec::new();
        for rec in ks.into_records() {
            info.push(KeyInfo {
                id: rec.id.clone(),
                state: rec.state,
                created_at: rec.created_at,
                changed_at: rec.changed_at,
            });
            let entry = match (rec.state, rec.material) {
                (KeyState::Destroyed, _) | (_, None) => Entry::Destroyed { at: rec.changed_at },
                (KeyState::Disabled, Some(_)) => Entry::Disabled,
                (state, Some(key)) => {
                    if state == KeyState::Primary {
                        primary = Some(rec.id.clone());
                    }
                    Entry::Usable(key, usage.handle(&rec.id))
                }
            };
            keys.insert(rec.id, entry);
        }
        let mut ring = Keyring {
            generation,
            write_id,
            finalized,
            primary,
            keys,
            info,
            usage,
            legacy: Arc::default(),
            self_test_passed: false,
        };
        ring.self_test_passed = ring.self_test();
        ring
    }

    /// This keyring with `policy` for legacy ciphertexts: the one of the keyring it replaces,
    /// so a reload keeps the refusal and the count.
    pub fn with_legacy(mut self, policy: Arc<LegacyPolicy>) -> Self {
        self.legacy = policy;
        self
    }

    /// An empty keyring: what the server holds before any keystore loaded.
    pub fn empty() -> Self {
        Keyring {
            generation: 0,
            write_id: [0; 12],
            finalized: false,
            primary: None,
            keys: HashMap::new(),
            info: Vec::new(),
            usage: Arc::new(UsageTracker::default()),
            legacy: Arc::default(),
            self_test_passed: false,
        }
    }

    /// Seals and opens a probe under the primary, without counting it as usage.
    fn self_test(&self) -> bool {
        let probe = [0x5au8; 32];
        self.encrypt(&probe)
            .ok()
            .and_then(|(ct, _)| {
                Envelope::parse(&ct)
                    .ok()
                    .and_then(|env| self.open(&env, false).ok())
            })
            .is_some_and(|pt| pt[..] == probe)
    }

    /// Public facts about every KEK, in keystore order.
    pub fn key_info(&self) -> &[KeyInfo] {
        &self.info
    }

    /// The usage counters this keyring records into.
    pub fn usage(&self) -> &Arc<UsageTracker> {
        &self.usage
    }

    /// The keystore generation this keyring was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The write the keyring's keystore came from (see [`Keystore::write_id`]).
    pub fn write_id(&self) -> [u8; 12] {
        self.write_id
    }

    /// Whether the keystore loaded is finalized for this release (what the node's capability
    /// record reports, so `upgrade finalize` can tell when every node has loaded it).
    pub fn finalized(&self) -> bool {
        self.finalized
    }

    /// The KEK that encrypts, reported by Status as key_id.
    pub fn primary_id(&self) -> Option<&KeyId> {
        self.primary.as_ref()
    }

    /// Whether Status may say `ok`: a primary is loaded and sealed and opened a probe.
    pub fn healthy(&self) -> bool {
        self.primary.is_some() && self.self_test_passed
    }

    /// What Status's `healthz` and the `/healthz` endpoint say: `ok`, or why not.
    pub fn health(&self) -> &'static str {
        match &self.primary {
            Some(_) if self.self_test_passed => "ok",
            Some(_) => "self-test round trip failed",
            None => "no primary key loaded",
        }
    }

    /// Every key id this keyring knows, in any state.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Seals a KMS v2 seed under the primary KEK; returns the ciphertext and the primary's id.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<(Vec<u8>, &KeyId), KeyringError> {
        self.encrypt_for(plaintext, Api::V2)
    }

    /// Seals `plaintext` for `api` under the primary KEK.
    pub fn encrypt_for(
        &self,
        plaintext: &[u8],
        api: Api,
    ) -> Result<(Vec<u8>, &KeyId), KeyringError> {
        let id = self.primary.as_ref().ok_or(KeyringError::NoPrimary)?;
        match self.keys.get(id) {
            Some(Entry::Usable(key, _)) => Ok((envelope::seal(key, id, plaintext, api)?, id)),
            _ => Err(KeyringError::NoPrimary),
        }
    }

    /// Opens a KMS v2 ciphertext, refusing when `requested_key_id` differs from the id inside
    /// it, or when it was sealed for KMS v1.
    pub fn decrypt(
        &self,
        ciphertext: &[u8],
        requested_key_id: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let env = Envelope::parse(ciphertext)?;
        self.legacy.admit(&env)?;
        env.check_api(Api::V2)?;
        if requested_key_id.is_empty() {
            return Err(KeyringError::MissingKeyId);
        }
        if requested_key_id != env.key_id().as_str() {
            return Err(KeyringError::KeyIdMismatch {
                requested: requested_key_id.chars().take(80).collect(),
                inside: env.key_id().clone(),
            });
        }
        let plain = self.open(&env, true)?;
        self.legacy.opened(&env);
        Ok(plain)
    }

    /// Refuses legacy format-1 ciphertexts from now on (`--refuse-legacy-envelopes`), on this
    /// keyring and every one the reloader swaps in after it.
    pub fn legacy(&self) -> &Arc<LegacyPolicy> {
        &self.legacy
    }

    /// Opens a KMS v1 ciphertext (KMS v1 carries no key id to cross-check), refusing one
    /// sealed for KMS v2.
    pub fn decrypt_v1(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let env = Envelope::parse(ciphertext)?;
        self.legacy.admit(&env)?;
        env.check_api(Api::V1)?;
        let plain = self.open(&env, true)?;
        self.legacy.opened(&env);
        Ok(plain)
    }

    fn open(&self, env: &Envelope<'_>, count: bool) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let id = env.key_id();
        match self.keys.get(id) {
            None => Err(KeyringError::UnknownKey(id.clone())),
            Some(Entry::Disabled) => Err(KeyringError::Disabled(id.clone())),
            Some(Entry::Destroyed { at }) => Err(KeyringError::Destroyed {
                id: id.clone(),
                at: crate::timefmt::rfc3339(*at),
            }),
            Some(Entry::Usable(key, usage)) => {
                let plain = env.open(key)?;
                if count {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    self.usage.record(usage, now);
                }
                Ok(plain)
            }
        }
    }
}

/// The keyring the server reads, replaced atomically by the reloader.
#[derive(Clone)]
pub struct SharedKeyring(Arc<ArcSwap<Keyring>>, Arc<refresh::Refresh>);

impl SharedKeyring {
    /// Starts with `ring` loaded.
    pub fn new(ring: Keyring) -> Self {
        SharedKeyring(
            Arc::new(ArcSwap::from_pointee(ring)),
            Arc::new(refresh::Refresh::default()),
        )
    }

    /// The current keyring; cheap and lock-free, for every request.
    pub fn load(&self) -> Arc<Keyring> {
        self.0.load_full()
    }

    /// How a request that names a key the loaded keyring lacks asks the reload task for a
    /// fresh look first (see [`refresh`]).
    pub fn refresh(&self) -> &refresh::Refresh {
        &self.1
    }

    /// Replaces the keyring in one atomic step; in-flight requests finish on the old one.
    pub fn store(&self, ring: Keyring) {
        self.0.store(Arc::new(ring));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn ring_with_rotation() -> (Keyring, KeyId, KeyId) {
        let mut ks = crate::keystore::model::tests::fresh();
        let old = ks.primary().expect("primary").id.clone();
        let new = ks
            .rotate(
                OffsetDateTime::now_utc(),
                &crate::keystore::model::tests::actor(),
            )
            .expect("rotate");
        (
            Keyring::from_keystore(ks, Arc::new(UsageTracker::default())),
            old,
            new,
        )
    }

    /// The frozen format-1 vector of `crypto::envelope` (KEK 00..1f, key id
    /// kek-20261126-3f2a9c1e): opened through both APIs and counted, until refused.
    #[test]
    fn legacy_format_1_is_counted_and_refused_on_request() {
        let id = KeyId::parse("kek-20261126-3f2a9c1e").expect("id");
        let material: Vec<u8> = (0u8..32).collect();
        let mut ks = crate::keystore::model::tests::fresh();
        ks.records.push(crate::keystore::KekRecord {
            id: id.clone(),
            state: KeyState::Retired,
            created_at: 0,
            changed_at: 0,
            disabled_from: None,
            material: SecretKey::from_slice(&material),
        });
        let ring = Keyring::from_keystore(ks, Arc::new(UsageTracker::default()));
        let hex = concat!(
            "01156b656b2d32303236313132362d3366326139633165",
            "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
            "5a5a5a5a5a5a5a5a5a5a5a5a",
            "7eb73acfd46d03cf8c44885caf7f4cb7c24f9bada39e95234d45e9633ea0be1d",
            "f162fbb8508240bd89aa531a3c87ba9f",
        );
        let ct: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let plain: Vec<u8> = (0x20u8..0x40).collect();
        assert_eq!(&ring.decrypt(&ct, id.as_str()).expect("v2")[..], &plain[..]);
        assert_eq!(&ring.decrypt_v1(&ct).expect("v1")[..], &plain[..]);
        assert_eq!(ring.legacy().decrypts(), 2);
        // A reload keeps the policy and the count.
        let next = Keyring::from_keystore(crate::keystore::model::tests::fresh(), Arc::default())
            .with_legacy(Arc::clone(ring.legacy()));
        ring.legacy().refuse();
        assert!(matches!(
            next.decrypt(&ct, id.as_str()),
            Err(KeyringError::LegacyRefused)
        ));
        assert!(matches!(
            ring.decrypt_v1(&ct),
            Err(KeyringError::LegacyRefused)
        ));
        assert_eq!(next.legacy().decrypts(), 2);
        // Current formats are untouched by the refusal.
        let (ct2, kid) = ring.encrypt(b"seed").expect("encrypt");
        assert_eq!(&ring.decrypt(&ct2, kid.as_str()).expect("v2")[..], b"seed");
    }

    #[test]
    fn encrypts_under_primary_and_decrypts_retired() {
        let (ring, old, new) = ring_with_rotation();
        assert!(ring.healthy());
        assert_eq!(ring.primary_id(), Some(&new));
        let (ct, id) = ring.encrypt(b"seed").expect("encrypt");
        assert_eq!(id, &new);
        assert_eq!(
            &ring.decrypt(&ct, new.as_str()).expect("decrypt")[..],
            b"seed"
        );
        assert!(ring.key_ids().any(|k| k == &old));
        // Usage counts real decrypts only, not the self-test.
        let counts = ring.usage().snapshot();
        let new_count = counts.iter().find(|(id, _, _)| id == &new).map(|c| c.1);
        assert_eq!(new_count, Some(1));
    }

    #[test]
    fn disabled_and_destroyed_keys_refuse_with_failed_precondition_errors() {
        use crate::keystore::model::tests::{actor, clone_for_test, fresh};
        let mut ks = fresh();
        let old = ks.primary().expect("primary").id.clone();
        let usage = Arc::new(UsageTracker::default());
        let before = Keyring::from_keystore(clone_for_test(&ks), Arc::clone(&usage));
        let (ct, _) = before.encrypt(b"seed").expect("encrypt");
        ks.rotate(OffsetDateTime::now_utc(), &actor())
            .expect("rotate");
        ks.disable(old.as_str(), OffsetDateTime::now_utc(), &actor())
            .expect("disable");
        let mut destroyed = clone_for_test(&ks);
        let ring = Keyring::from_keystore(ks, Arc::clone(&usage));
        assert!(matches!(
            ring.decrypt(&ct, old.as_str()),
            Err(KeyringError::Disabled(_))
        ));
        destroyed
            .destroy(
                old.as_str(),
                OffsetDateTime::now_utc(),
                &actor(),
                &crate::keystore::DestroyGuard::Force,
            )
            .expect("destroy");
        let ring = Keyring::from_keystore(destroyed, usage);
        let err = ring.decrypt(&ct, old.as_str()).expect_err("destroyed");
        assert!(matches!(err, KeyringError::Destroyed { .. }));
        assert!(err.to_string().contains("destroyed at"), "{err}");
    }

    #[test]
    fn key_id_is_cross_checked() {
        let (ring, old, new) = ring_with_rotation();
        let (ct, _) = ring.encrypt(b"seed").expect("encrypt");
        assert!(matches!(
            ring.decrypt(&ct, old.as_str()),
            Err(KeyringError::KeyIdMismatch { .. })
        ));
        assert!(matches!(
            ring.decrypt(&ct, ""),
            Err(KeyringError::MissingKeyId)
        ));
        assert!(ring.decrypt(&ct, new.as_str()).is_ok());
    }

    #[test]
    fn unknown_key_is_not_found() {
        let (ring, _, _) = ring_with_rotation();
        let (other, _, _) = ring_with_rotation();
        let (ct, id) = other.encrypt(b"seed").expect("encrypt");
        assert!(matches!(
            ring.decrypt(&ct, id.as_str()),
            Err(KeyringError::UnknownKey(_))
        ));
    }

    #[test]
    fn empty_ring_is_unhealthy() {
        let ring = Keyring::empty();
        assert!(!ring.healthy());
        assert!(matches!(ring.encrypt(b"x"), Err(KeyringError::NoPrimary)));
    }
}
