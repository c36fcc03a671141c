//! HMAC-SHA256 tags for small authenticated records (node records, capability records, the
//! known-node registry, this node's upgrade state): state that steers key-lifecycle decisions
//! and lives where others could write it, so it must not count unless a holder of the root
//! key made it.

use super::{derive_key, CryptoError, SecretKey};

/// An HMAC-SHA256 key derived (HKDF, its own label) from a root key. The derived bytes live
/// only in a wiping key type until ring has taken them into its HMAC state, which ring does
/// not wipe: one copy, held for the key's life.
#[derive(Clone)]
pub struct MacKey(std::sync::Arc<ring::hmac::Key>);

impl MacKey {
    /// The key for `label` under `root`. Each use gets its own label, so a tag made for one
    /// kind of record never verifies as another.
    pub fn derive(root: &SecretKey, label: &[u8]) -> Result<Self, CryptoError> {
        let derived = derive_key(root, b"", label)?;
        Ok(MacKey(std::sync::Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derived.expose(),
        ))))
    }

    /// The tag over `bytes`, as lowercase hex (how the JSON records carry it).
    pub fn sign_hex(&self, bytes: &[u8]) -> String {
        let tag = ring::hmac::sign(&self.0, bytes);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `tag_hex` is the tag over `bytes` (compared in constant time by ring).
    pub fn verify_hex(&self, bytes: &[u8], tag_hex: &str) -> bool {
        let Some(tag) = unhex(tag_hex) else {
            return false;
        };
        ring::hmac::verify(&self.0, bytes, &tag).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_under_the_same_key_label_and_bytes() {
        let root = SecretKey::from_slice(&[7u8; 32]).expect("key");
        let other = SecretKey::from_slice(&[8u8; 32]).expect("key");
        let k = MacKey::derive(&root, b"a").expect("derive");
        let tag = k.sign_hex(b"payload");
        assert_eq!(tag.len(), 64);
        assert!(k.verify_hex(b"payload", &tag));
        assert!(!k.verify_hex(b"payloaD", &tag));
        assert!(!MacKey::derive(&root, b"b")
            .expect("derive")
            .verify_hex(b"payload", &tag));
        assert!(!MacKey::derive(&other, b"a")
            .expect("derive")
            .verify_hex(b"payload", &tag));
        assert!(!k.verify_hex(b"payload", "zz"));
        assert!(!k.verify_hex(b"payload", &tag[..63]));
    }
}
