//! What one etcd value is: which encryption provider wrote it and, for a KMS provider, which
//! KEK it depends on. Only prefixes and key ids are read; the values are never kept.
//!
//! The formats (`../shared/kms/PROTOCOL.md`, "What kube-apiserver writes to etcd"):
//! - `k8s:enc:kms:v2:<provider>:` then a protobuf `v2.EncryptedObject` (`proto/v2_storage.proto`:
//!   field 2 `keyID`, field 3 `encryptedDEKSource`);
//! - `k8s:enc:kms:v1:<provider>:` then a 2-byte big-endian length and that many bytes of the
//!   plugin's ciphertext of the DEK, then the data;
//! - `k8s:enc:aescbc:v1:<key>:`, `k8s:enc:aesgcm:v1:<key>:`, `k8s:enc:secretbox:v1:<key>:`;
//! - no `k8s:enc:` prefix: `identity` (stored in clear).

use prost::Message as _;

use crate::crypto::envelope::Envelope;
use crate::proto::v2::EncryptedObject;

/// The prefix every encrypted value starts with.
const ENC: &[u8] = b"k8s:enc:";

/// One stored value, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Written by a KMS v2 provider.
    KmsV2 {
        /// The provider's name in the EncryptionConfiguration.
        provider: String,
        /// The key id the apiserver recorded, in clear (`EncryptedObject.keyID`).
        key_id: String,
        /// The KEK id inside the plugin's ciphertext, when it is a localkms envelope.
        envelope_key: Option<String>,
    },
    /// Written by a KMS v1 provider.
    KmsV1 {
        /// The provider's name.
        provider: String,
        /// The KEK id inside the plugin's ciphertext of the DEK, when it is a localkms one.
        envelope_key: Option<String>,
    },
    /// Written by a local-key provider (`aescbc`, `aesgcm`, `secretbox`) or another
    /// `k8s:enc:` type.
    Other {
        /// The provider type.
        kind: String,
    },
    /// No `k8s:enc:` prefix: stored unencrypted (the `identity` provider).
    Identity,
    /// A KMS prefix whose body does not parse.
    Malformed {
        /// The provider type and version (`kms:v2`, `kms:v1`).
        kind: &'static str,
        /// The provider's name.
        provider: String,
    },
}

impl Stored {
    /// The format name used in reports: `kms:v2:NAME`, `kms:v1:NAME`, `aescbc`, `identity`.
    pub fn format(&self) -> String {
        match self {
            Stored::KmsV2 { provider, .. } => format!("kms:v2:{provider}"),
            Stored::KmsV1 { provider, .. } => format!("kms:v1:{provider}"),
            Stored::Other { kind } => kind.clone(),
            Stored::Identity => "identity".into(),
            Stored::Malformed { kind, provider } => format!("{kind}:{provider} (malformed)"),
        }
    }

    /// The KMS provider name, for a KMS value.
    pub fn provider(&self) -> Option<&str> {
        match self {
            Stored::KmsV2 { provider, .. }
            | Stored::KmsV1 { provider, .. }
            | Stored::Malformed { provider, .. } => Some(provider),
            _ => None,
        }
    }

    /// The KEK the value depends on: the id inside localkms's own (authenticated) envelope
    /// when there is one, else the apiserver's clear `keyID` (KMS v2).
    pub fn kek(&self) -> Option<&str> {
        match self {
            Stored::KmsV2 {
                envelope_key,
                key_id,
                ..
            } => Some(envelope_key.as_deref().unwrap_or(key_id)),
            Stored::KmsV1 { envelope_key, .. } => envelope_key.as_deref(),
            _ => None,
        }
    }

    /// A KMS v2 value whose clear `keyID` disagrees with the KEK inside the envelope (the
    /// value was tampered with, or written by something that is not kube-apiserver).
    pub fn mismatched(&self) -> bool {
        matches!(self, Stored::KmsV2 { key_id, envelope_key: Some(inner), .. } if inner != key_id)
    }
}

/// Splits `name:` off `rest`: the provider name and what follows.
fn name(rest: &[u8]) -> Option<(String, &[u8])> {
    let end = rest.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&rest[..end]).ok()?.to_owned();
    Some((name, &rest[end + 1..]))
}

fn localkms_key(ciphertext: &[u8]) -> Option<String> {
    Envelope::parse(ciphertext)
        .ok()
        .map(|e| e.key_id().to_string())
}

/// Classifies one stored value.
pub fn classify(value: &[u8]) -> Stored {
    let Some(rest) = value.strip_prefix(ENC) else {
        return Stored::Identity;
    };
    if let Some(rest) = rest.strip_prefix(b"kms:v2:") {
        let Some((provider, body)) = name(rest) else {
            return Stored::Malformed {
                kind: "kms:v2",
                provider: String::new(),
            };
        };
        return match EncryptedObject::decode(body) {
            Ok(obj) if !obj.key_id.is_empty() => Stored::KmsV2 {
                envelope_key: localkms_key(&obj.encrypted_dek_source),
                key_id: obj.key_id,
                provider,
            },
            _ => Stored::Malformed {
                kind: "kms:v2",
                provider,
            },
        };
    }
    if let Some(rest) = rest.strip_prefix(b"kms:v1:") {
        let Some((provider, body)) = name(rest) else {
            return Stored::Malformed {
                kind: "kms:v1",
                provider: String::new(),
            };
        };
        let dek = body.get(..2).and_then(|len| {
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            body.get(2..2 + len)
        });
        return match dek {
            Some(dek) => Stored::KmsV1 {
                envelope_key: localkms_key(dek),
                provider,
            },
            None => Stored::Malformed {
                kind: "kms:v1",
                provider,
            },
        };
    }
    let kind = rest
        .iter()
        .position(|&b| b == b':')
        .and_then(|end| std::str::from_utf8(&rest[..end]).ok())
        .unwrap_or("unknown");
    Stored::Other {
        kind: kind.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever etcd holds, classifying it returns a class, never panics.
        #[test]
        fn any_value_is_classified_without_panicking(
            prefix in prop_oneof![
                Just(&b"k8s:enc:kms:v2:"[..]),
                Just(&b"k8s:enc:kms:v1:"[..]),
                Just(&b"k8s:enc:"[..]),
                Just(&b""[..]),
            ],
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut value = prefix.to_vec();
            value.extend_from_slice(&rest);
            let class = classify(&value);
            let _ = (class.format(), class.kek(), class.mismatched());
        }
    }
    use crate::crypto::envelope::{seal, Api};
    use crate::crypto::SecretKey;
    use crate::key_id::KeyId;

    fn envelope(id: &str) -> Vec<u8> {
        let kek = SecretKey::generate().expect("key");
        seal(&kek, &KeyId::parse(id).expect("id"), &[7u8; 32], Api::V2).expect("seal")
    }

    #[test]
    fn every_format_kube_apiserver_writes_is_told_apart() {
        // EncryptedObject field 2 = keyID, field 3 = encryptedDEKSource, field 5 = type.
        let obj = EncryptedObject {
            encrypted_data: vec![1, 2, 3],
            key_id: "kek-20261127-00000001".into(),
            encrypted_dek_source: envelope("kek-20261127-00000001"),
            annotations: Default::default(),
            encrypted_dek_source_type: 1,
        };
        let mut v2 = b"k8s:enc:kms:v2:localkms:".to_vec();
        v2.extend(obj.encode_to_vec());
        let s = classify(&v2);
        assert_eq!(s.kek(), Some("kek-20261127-00000001"));
        assert_eq!(s.format(), "kms:v2:localkms");
        assert!(!s.mismatched());

        let mut forged = obj.clone();
        forged.key_id = "kek-20261127-00000002".into();
        let mut v2 = b"k8s:enc:kms:v2:localkms:".to_vec();
        v2.extend(forged.encode_to_vec());
        let s = classify(&v2);
        assert!(s.mismatched());
        assert_eq!(
            s.kek(),
            Some("kek-20261127-00000001"),
            "the envelope's id wins"
        );

        let dek = envelope("kek-20261127-00000003");
        let mut v1 = b"k8s:enc:kms:v1:old-name:".to_vec();
        v1.extend(u16::try_from(dek.len()).expect("len").to_be_bytes());
        v1.extend(&dek);
        v1.extend(b"ciphertext");
        let s = classify(&v1);
        assert_eq!(s.kek(), Some("kek-20261127-00000003"));
        assert_eq!(s.provider(), Some("old-name"));

        assert_eq!(classify(b"k8s:enc:aescbc:v1:key1:xxxx").format(), "aescbc");
        assert_eq!(classify(b"k8s:enc:secretbox:v1:k:xx").format(), "secretbox");
        assert_eq!(classify(b"k8s\0\n\x0fv1").format(), "identity");
        assert_eq!(classify(b"{\"kind\":\"Secret\"}"), Stored::Identity);
        assert!(matches!(
            classify(b"k8s:enc:kms:v2:p:\xff\xff"),
            Stored::Malformed { .. }
        ));
        assert!(matches!(
            classify(b"k8s:enc:kms:v1:p:\x00"),
            Stored::Malformed { .. }
        ));
        assert!(matches!(
            classify(b"k8s:enc:kms:v2:noname"),
            Stored::Malformed { .. }
        ));
    }
}
