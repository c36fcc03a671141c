//! localkms: a Kubernetes KMS v2 plugin that wraps the apiserver's data keys with
//! key-encryption keys it keeps in a sealed local keystore.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library, so the end-to-end tests and
//! the benchmarks drive the same code paths the plugin runs.

#![deny(unsafe_code)]
#![warn(unreachable_pub)]
#![warn(missing_docs)]

/// What `localkms --version` prints: the crate version, the git commit it was built from and
/// the build date, so the binary on a node can be traced to its source.
pub const VERSION_LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LOCALKMS_GIT_COMMIT"),
    ", built ",
    env!("LOCALKMS_BUILD_DATE"),
    ")"
);

pub mod cli;
pub mod client;
pub mod crypto;
pub mod doctor;
pub mod key_id;
pub mod keyring;
pub mod keystore;
pub mod recovery;
pub mod release;
mod reload;
pub mod scan;
pub mod server;
pub mod telemetry;
mod timefmt;

/// Code generated from `proto/` by `build.rs`.
pub mod proto {
    /// KMS v2 (`v2.KeyManagementService`).
    #[allow(missing_docs)]
    pub mod v2 {
        tonic::include_proto!("v2");
    }
    /// KMS v1 (`v1beta1.KeyManagementService`).
    #[allow(missing_docs)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
    /// Debug for the messages that carry plaintext: the sizes, never the bytes.
    mod redacted {
        use std::fmt;

        macro_rules! redacted_debug {
            ($ty:path, $name:literal, $secret:ident $(, $field:ident)*) => {
                impl fmt::Debug for $ty {
                    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.debug_struct($name)
                            .field(
                                stringify!($secret),
                                &format_args!("<{} bytes redacted>", self.$secret.len()),
                            )
                            $(.field(stringify!($field), &self.$field))*
                            .finish()
                    }
                }
            };
        }

        redacted_debug!(super::v2::EncryptRequest, "EncryptRequest", plaintext, uid);
        redacted_debug!(super::v2::DecryptResponse, "DecryptResponse", plaintext);
        redacted_debug!(
            super::v1beta1::EncryptRequest,
            "EncryptRequest",
            plain,
            version
        );
        redacted_debug!(super::v1beta1::DecryptResponse, "DecryptResponse", plain);
    }

    /// The subset of etcd's v3 API the etcd keystore backend uses.
    #[allow(missing_docs, clippy::all)]
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }
}

#[cfg(test)]
mod redaction_tests {
    #[test]
    fn plaintext_never_reaches_debug_output() {
        let secret = vec![0x41u8; 32];
        let outputs = [
            format!(
                "{:?}",
                crate::proto::v2::EncryptRequest {
                    plaintext: secret.clone(),
                    uid: "u".into(),
                }
            ),
            format!(
                "{:?}",
                crate::proto::v2::DecryptResponse {
                    plaintext: secret.clone(),
                }
            ),
            format!(
                "{:?}",
                crate::proto::v1beta1::EncryptRequest {
                    version: "v1beta1".into(),
                    plain: secret.clone(),
                }
            ),
            format!(
                "{:?}",
                crate::proto::v1beta1::DecryptResponse {
                    plain: secret.clone(),
                }
            ),
        ];
        for out in outputs {
            assert!(out.contains("<32 bytes redacted>"), "{out}");
            assert!(!out.contains("65") && !out.contains("AAAA"), "{out}");
        }
    }
}
