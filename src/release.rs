//! Which release this build is, and what it can do: what node records carry so that a node
//! can tell, during a rolling upgrade, which of its peers run an older release.
//!
//! The rule every format change follows: a release reads everything the previous release
//! writes, and until the operator runs `localkms upgrade finalize` it writes only what the
//! previous release reads (keystore, envelopes, node records, mark, backups, usage). The
//! releases and their commits are listed in `docs/RELEASES.md`.

/// This build's release (the crate version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The previous release: what this build stays readable by until the upgrade is finalized.
pub const PREVIOUS: &str = "0.3.0";

/// What this release can do, as one growing number published beside each node record:
///
/// - 0: release 0.3.0 and older, which publish no capability record;
/// - 1: release 0.4.0: publishes its capability and joins the known-node registry, refuses
///   an old-format copy of a finalized keystore, and reads keystore format 3.
pub const CAPABILITY: u32 = 1;

/// The capability every node must have before `upgrade finalize` lets the keystore move to
/// this release's format: this release's own.
pub const FINALIZE_NEEDS: u32 = CAPABILITY;

/// The capability a node must have for a promote or destroy to go ahead beside it. Every
/// release's node records say which KEKs it has loaded and what it decrypted, which is what
/// these need today; a later release whose guard needs more raises this.
pub const KEY_CHANGE_NEEDS: u32 = 0;

/// The release a capability number stands for, for messages.
pub fn release_of(capability: u32) -> &'static str {
    match capability {
        0 => "0.3.0 or older",
        CAPABILITY => VERSION,
        _ => "a newer release",
    }
}
