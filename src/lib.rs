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
pub mod key_id;
pub mod keyring;
pub mod keystore;
mod reload;
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
    /// The subset of etcd's v3 API the etcd keystore backend uses.
    #[allow(missing_docs, clippy::all)]
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }
}
