//! `serve --dev`: a development keystore in `./localkms-dev/`, created on first run.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::keystore::{self, Actor, Keystore, KeystoreError, RootKeyProvider, RootKeySource};

/// Directory `serve --dev` uses, relative to the working directory.
pub const DEV_DIR: &str = "localkms-dev";

/// The files of a development setup.
pub struct DevSetup {
    /// Absolute directory.
    pub dir: PathBuf,
    /// Root key file.
    pub root_key_file: PathBuf,
    /// Keystore file.
    pub keystore: PathBuf,
    /// Socket path.
    pub socket: PathBuf,
    /// Whether this run created the keystore.
    pub created: bool,
}

/// Creates (or reuses) `dir` (0700) with a root key and a keystore holding one primary KEK.
pub fn prepare(dir: &Path) -> Result<DevSetup, KeystoreError> {
    let io = |source| KeystoreError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let dir = std::fs::canonicalize(dir).map_err(io)?;
    let root_key_file = dir.join("root.key");
    let keystore_path = dir.join("keystore.lkms");
    let (root, _) =
        RootKeyProvider::open_or_create(&RootKeySource::KeyFile(root_key_file.clone()))?;
    let created = if keystore_path.exists() {
        false
    } else {
        let ks = Keystore::new_with_primary(
            OffsetDateTime::now_utc(),
            root.new_kdf()?,
            &Actor::current(),
        )?;
        keystore::create(&keystore_path, &root, &ks)?;
        true
    };
    Ok(DevSetup {
        socket: dir.join("kms.sock"),
        root_key_file,
        keystore: keystore_path,
        dir,
        created,
    })
}

/// The loud warning printed to stderr at dev start-up.
pub fn banner(setup: &DevSetup) -> String {
    format!(
        r#"
################################################################################
#  localkms DEVELOPMENT MODE: NOT FOR PRODUCTION                               #
#  The root key sits unprotected beside the keystore in                        #
#  {dir}
#  Anyone who can read that directory can decrypt everything sealed with it.   #
################################################################################
{state} keystore: {keystore}
root key file:    {root}
The EncryptionConfiguration for kube-apiserver (--encryption-provider-config) is printed on
stdout: `localkms serve --dev > encryption-config.yaml` saves it.

"#,
        dir = setup.dir.display(),
        state = if setup.created { "created" } else { "reusing" },
        keystore = setup.keystore.display(),
        root = setup.root_key_file.display(),
    )
}

/// The EncryptionConfiguration that points kube-apiserver at `endpoint` (a `unix://` URI),
/// printed to stdout at dev start-up.
pub fn encryption_config(endpoint: &str) -> String {
    format!(
        r#"apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps]
    providers:
      - kms:
          apiVersion: v2
          name: localkms
          endpoint: {endpoint}
          timeout: 3s
      - identity: {{}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn prepare_creates_then_reuses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev");
        let first = prepare(&dir).expect("first");
        assert!(first.created);
        assert_eq!(std::fs::metadata(&dir).expect("stat").mode() & 0o777, 0o700);
        let root = RootKeyProvider::open(&RootKeySource::KeyFile(first.root_key_file.clone()))
            .expect("root");
        let id = keystore::load(&first.keystore, &root)
            .expect("load")
            .primary()
            .expect("primary")
            .id
            .clone();
        let second = prepare(&dir).expect("second");
        assert!(!second.created);
        let again = keystore::load(&second.keystore, &root).expect("load");
        assert_eq!(again.primary().expect("primary").id, id);
        let text = banner(&second);
        assert!(text.contains("NOT FOR PRODUCTION"));
        let config = encryption_config("unix:///tmp/x.sock");
        assert!(config.contains("endpoint: unix:///tmp/x.sock"), "{config}");
        assert!(config.contains("[secrets, configmaps]"), "{config}");
    }
}
