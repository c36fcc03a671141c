//! Command-line definitions. Every flag can also come from a `LOCALKMS_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::server::StatusVersion;

/// localkms: a Kubernetes KMS v2 plugin with locally managed, rotatable key-encryption keys.
#[derive(Debug, Parser)]
#[command(name = "localkms", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS API on a Unix socket.
    Serve(ServeArgs),
    /// Create a root key file (if missing) and a new keystore with one primary KEK.
    Init(KeystoreArgs),
    /// List or change the KEKs in a keystore.
    Keys {
        /// What to do with the keys.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the Status of any KMS v2 plugin.
    Status {
        /// The plugin's socket.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Status → Encrypt → Decrypt against any KMS v2 plugin; exits 0 only if all of it holds.
    Check {
        /// The plugin's socket.
        #[command(flatten)]
        socket: SocketArgs,
        /// Give up after this many seconds.
        #[arg(long, env = "LOCALKMS_TIMEOUT", default_value_t = 5)]
        timeout: u64,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// One line per KEK: id, state, creation time.
    List {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Print `{"keys": [...]}` instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create a new KEK and make it primary; the old primary stays for decryption.
    Rotate {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// Where the keystore and its root key are.
#[derive(Debug, Args)]
pub struct KeystoreArgs {
    /// Keystore file.
    #[arg(long, env = "LOCALKMS_KEYSTORE")]
    pub keystore: PathBuf,
    /// File holding the 32-byte root key (raw or base64), mode 0600 or 0400.
    #[arg(long, env = "LOCALKMS_ROOT_KEY_FILE")]
    pub root_key_file: PathBuf,
}

/// A plugin socket.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Socket: `unix:///path/kms.sock` or `/path/kms.sock`.
    #[arg(long, env = "LOCALKMS_SOCKET")]
    pub socket: String,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Development mode: create or reuse ./localkms-dev/ (root key, keystore, socket). Not for
    /// production.
    #[arg(long, conflicts_with_all = ["keystore", "root_key_file"])]
    pub dev: bool,
    /// Socket to listen on: `unix:///path/kms.sock` or `/path/kms.sock`.
    #[arg(long, env = "LOCALKMS_SOCKET", required_unless_present = "dev")]
    pub socket: Option<String>,
    /// Keystore file.
    #[arg(long, env = "LOCALKMS_KEYSTORE", required_unless_present = "dev")]
    pub keystore: Option<PathBuf>,
    /// Root key file.
    #[arg(long, env = "LOCALKMS_ROOT_KEY_FILE", required_unless_present = "dev")]
    pub root_key_file: Option<PathBuf>,
    /// Version string Status reports: `v2` (Kubernetes 1.29+) or `v2beta1` (1.27–1.28).
    #[arg(long, env = "LOCALKMS_STATUS_VERSION", value_enum, default_value_t = StatusVersionArg::V2)]
    pub status_version: StatusVersionArg,
}

/// `--status-version` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusVersionArg {
    /// Kubernetes 1.29 and later.
    V2,
    /// Kubernetes 1.27 and 1.28.
    V2beta1,
}

impl From<StatusVersionArg> for StatusVersion {
    fn from(v: StatusVersionArg) -> Self {
        match v {
            StatusVersionArg::V2 => StatusVersion::V2,
            StatusVersionArg::V2beta1 => StatusVersion::V2beta1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_requires_paths_unless_dev() {
        assert!(Cli::try_parse_from(["localkms", "serve", "--dev"]).is_ok());
        assert!(Cli::try_parse_from(["localkms", "serve", "--socket", "/tmp/x.sock"]).is_err());
        assert!(
            Cli::try_parse_from(["localkms", "serve", "--dev", "--keystore", "/tmp/ks"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "localkms",
            "serve",
            "--socket",
            "unix:///tmp/x.sock",
            "--keystore",
            "/tmp/ks",
            "--root-key-file",
            "/tmp/rk",
            "--status-version",
            "v2beta1",
        ])
        .expect("full serve");
        match cli.command {
            Command::Serve(a) => {
                assert_eq!(a.socket.as_deref(), Some("unix:///tmp/x.sock"));
                assert!(matches!(a.status_version, StatusVersionArg::V2beta1));
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
