//! Command-line definitions. Every flag can also come from a `LOCALKMS_*` environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::key_id::KeyId;
use crate::keystore::RootKeySource;
use crate::server::StatusVersion;
use crate::telemetry::LogFormat;

/// localkms: a Kubernetes KMS v2 plugin with locally managed, rotatable key-encryption keys.
#[derive(Debug, Parser)]
#[command(name = "localkms", version = crate::VERSION_LONG, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, env = "LOCALKMS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `localkms=debug,h2=info`); RUST_LOG overrides it.
    #[arg(
        long,
        global = true,
        env = "LOCALKMS_LOG_LEVEL",
        default_value = "info",
        value_parser = parse_log_level
    )]
    pub log_level: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS API on a Unix socket.
    Serve(Box<ServeArgs>),
    /// Create a root key file (if missing) and a new keystore with one primary KEK.
    Init(KeystoreArgs),
    /// List or change the KEKs in a keystore.
    Keys {
        /// What to do with the keys.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check, copy, back up (export) and restore (import) a keystore.
    Keystore {
        /// What to check.
        #[command(subcommand)]
        command: KeystoreCommand,
    },
    /// The servers sharing an etcd keystore: what each has loaded, and when it last reported
    /// (with `forget NODE`: take a node that is gone for good out of the known-node registry).
    Nodes {
        /// `forget`: take NODE out of the known-node registry, so promote, destroy and
        /// `upgrade finalize` stop waiting for it (refused while it is live). Without it, list
        /// the nodes.
        #[arg(value_enum, requires = "node")]
        action: Option<NodesAction>,
        /// The node to forget (its `serve --node-name`).
        node: Option<String>,
        /// The (etcd) keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rolling upgrades: see whether every node runs this release, then finalize the upgrade
    /// so the keystore moves to this release's format.
    Upgrade {
        /// What to do.
        #[command(subcommand)]
        command: UpgradeCommand,
    },
    /// Re-seal the keystore under a new root key.
    RootKey {
        /// What to do with the root key.
        #[command(subcommand)]
        command: RootKeyCommand,
    },
    /// Count what the apiserver's etcd holds under each KEK (read-only; values are never
    /// printed or kept).
    Scan(ScanArgs),
    /// Diagnose this control-plane node: the encryption configuration, the apiserver
    /// manifest, the plugin, the keystore files, key age, backups and convergence. Exit 1 on
    /// any ✗.
    Doctor(DoctorArgs),
    /// Recovery identities: create one, split it among several people, rebuild it.
    Recovery {
        /// What to do.
        #[command(subcommand)]
        command: RecoveryCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `localkms man | man -l -`, or
    /// `localkms man keys destroy` for one command.
    Man {
        /// A command (and subcommand) to document instead of `localkms` itself.
        command: Vec<String>,
    },
    /// Print the Status of any KMS v2 plugin.
    Status {
        /// The plugin's socket.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Give up after this long (`5s`, `500ms`): a socket that accepts but never answers
        /// must not hang a probe or a script.
        #[arg(long, env = "LOCALKMS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Load-test any KMS v2 or v1 plugin socket.
    Bench(BenchArgs),
    /// Status → Encrypt → Decrypt against any KMS v2 plugin; exits 0 only if all of it holds.
    Check {
        /// The plugin's socket.
        #[command(flatten)]
        socket: SocketArgs,
        /// Give up after this long (`5s`, `500ms`; a bare number is seconds).
        #[arg(long, env = "LOCALKMS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// What `nodes` does besides listing.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NodesAction {
    /// Take NODE out of the known-node registry.
    Forget,
}

/// `upgrade` subcommands.
#[derive(Debug, Subcommand)]
pub enum UpgradeCommand {
    /// This build's release, the keystore's format, and each known node's release.
    Status {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move the keystore to this release's format. Refused while any known node is missing,
    /// stale or on an older release; afterwards the previous release cannot read it.
    Finalize {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `keys` subcommands. Every change is made under the keystore lock and picked up by a
/// running server within 2 seconds.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// One line per KEK: id, state, creation time and decrypt usage.
    List {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Print `{"keys": [...]}` instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create a new KEK and make it primary (or, with --stage, only distribute it). On an
    /// etcd keystore this is two-phase: stage, wait until every live node has loaded the new
    /// KEK, then promote.
    Rotate {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Create the KEK as `staged`: it decrypts but does not encrypt until `keys promote`.
        #[arg(long)]
        stage: bool,
        /// etcd keystores: how long to wait for every node before stopping at staged.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Make a staged or retired KEK primary; the old primary becomes retired.
    Promote {
        /// The KEK.
        #[arg(value_parser = parse_key_id)]
        id: KeyId,
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Refuse decrypts under a KEK, reversibly (not the primary).
    Disable {
        /// The KEK.
        #[arg(value_parser = parse_key_id)]
        id: KeyId,
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Undo `keys disable`.
    Enable {
        /// The KEK.
        #[arg(value_parser = parse_key_id)]
        id: KeyId,
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Wipe a KEK's material, keeping a tombstone. Irreversible: `keys disable` is the
    /// reversible first step. Refuses the primary always; without --force, also refuses a KEK
    /// that was primary or staged within --min-retired-age, decrypted within it, or whose
    /// usage was not counted over all of it (with --scan-report: that a scan still finds
    /// objects under).
    Destroy {
        /// The KEK.
        #[arg(value_parser = parse_key_id)]
        id: KeyId,
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// How long the KEK must have been out of service (not primary, not staged) with no
        /// recorded decrypt.
        #[arg(long, env = "LOCALKMS_MIN_RETIRED_AGE", default_value = "7d", value_parser = parse_duration)]
        min_retired_age: Duration,
        /// Destroy without the evidence checks (the primary is still refused).
        #[arg(long)]
        force: bool,
        /// Evidence from `localkms scan --keystore … --json`: a report showing no object
        /// depends on the KEK replaces the decrypt-usage evidence (the key must still have
        /// been out of service for --min-retired-age).
        #[arg(long, conflicts_with = "force")]
        scan_report: Option<PathBuf>,
        /// The oldest --scan-report accepted.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        max_scan_age: Duration,
    },
    /// The audit trail of every lifecycle change.
    History {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `keystore` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeystoreCommand {
    /// Open the keystore with the root key and print its generation and KEK ids.
    Verify {
        /// The keystore.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Copy a keystore, sealed bytes unchanged, between a file and etcd (either way).
    Copy {
        /// Source: a file path or etcd://…
        #[arg(long)]
        from: String,
        /// Destination (must not exist yet): a file path or etcd://…
        #[arg(long)]
        to: String,
        /// The root key, to check the source opens before copying it.
        #[command(flatten)]
        root: RootArgs,
        /// TLS for etcd.
        #[command(flatten)]
        etcd: EtcdTlsArgs,
    },
    /// Write an age-encrypted backup of every KEK (with states and history) that the `age`
    /// CLI or `keystore import` can open with the recovery identity.
    Export {
        /// The keystore to back up.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Who can open the backup.
        #[command(flatten)]
        to: SealArgs,
        /// The backup file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Restore a backup into a new keystore sealed under the given root key (created if
    /// missing), or merge its missing keys into an existing one.
    Import {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// What opens the backup.
        #[command(flatten)]
        with: OpenArgs,
        /// The keystore to create (or merge into) and its root key.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Add the backup's keys missing from an existing keystore; keys it already has are
        /// left as they are, and a key with the same id but other material refuses the merge.
        #[arg(long)]
        merge: bool,
        /// Accept a backup of another keystore (another `init`) than the target.
        #[arg(long)]
        allow_different_keystore: bool,
    },
    /// Check that a backup opens, is intact and holds every live KEK with identical material.
    /// Exit 0: it does; 5: it is behind (keys made after it); 1: anything else.
    VerifyBackup {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// What opens the backup.
        #[command(flatten)]
        with: OpenArgs,
        /// The live keystore to compare with.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `scan` options.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The apiserver's etcd: `https://HOST:PORT[,…]` (or `HOST:PORT`). The --etcd-* TLS flags
    /// apply to it (kubeadm: /etc/kubernetes/pki/etcd/ca.crt and apiserver-etcd-client.*).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd_endpoints: Vec<String>,
    /// TLS for that etcd (and for an etcd --keystore).
    #[command(flatten)]
    pub etcd: EtcdTlsArgs,
    /// The apiserver's --etcd-prefix.
    #[arg(long, default_value = "/registry/")]
    pub prefix: String,
    /// Attribute only this KMS provider's objects to KEKs (a report made with it is not
    /// evidence for `keys destroy`).
    #[arg(long)]
    pub provider: Option<String>,
    /// This plugin's keystore: adds each KEK's state, lists every KEK (zero included), and
    /// makes the report usable by `keys destroy --scan-report`.
    #[arg(long)]
    pub keystore: Option<String>,
    /// The keystore's root key.
    #[command(flatten)]
    pub root: RootArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 3 if any object still depends on this KEK (repeatable).
    #[arg(long, value_parser = parse_key_id)]
    pub fail_on_key: Vec<KeyId>,
    /// Keys read per etcd request (halved automatically for pages too large to receive).
    #[arg(long, default_value = "500", value_parser = parse_positive)]
    pub page_size: usize,
}

/// `doctor` options: every part is optional and checked only when given.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The apiserver's EncryptionConfiguration.
    #[arg(long)]
    pub encryption_config: Option<PathBuf>,
    /// The kube-apiserver static-pod manifest.
    #[arg(long)]
    pub apiserver_manifest: Option<PathBuf>,
    /// The plugin's socket (default: the kms endpoint in --encryption-config).
    #[arg(long)]
    pub socket: Option<String>,
    /// The plugin's keystore (checked with the root key).
    #[arg(long)]
    pub keystore: Option<String>,
    /// The keystore's root key.
    #[command(flatten)]
    pub root: RootArgs,
    /// TLS for an etcd keystore.
    #[command(flatten)]
    pub etcd: EtcdTlsArgs,
    /// Rotation is overdue once the primary is older than this.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub rotate_after: Duration,
    /// The plugin's --backup-dir, to check the newest backup is of the current generation.
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
    /// A `localkms scan --json` report, to catch objects under a provider name the
    /// configuration no longer lists.
    #[arg(long)]
    pub scan_report: Option<PathBuf>,
}

/// `recovery` subcommands.
#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Create a recovery identity (an age X25519 key) and print its recipient (`age1…`).
    Keygen {
        /// Where to write the identity (mode 0600; never overwritten). Keep it offline.
        #[arg(long)]
        out: PathBuf,
    },
    /// Split an identity into N share files, any K of which rebuild it.
    Split {
        /// The identity file to split.
        #[arg(long)]
        identity: PathBuf,
        /// How many shares (N, at most 255).
        #[arg(long)]
        shares: usize,
        /// How many rebuild it (K, at least 2).
        #[arg(long)]
        threshold: usize,
        /// Directory for the share files (created 0700; share-N-of-M.txt, never overwritten).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Rebuild an identity from K share files.
    Combine {
        /// Where to write the rebuilt identity (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The share files.
        #[arg(required = true, value_name = "SHARE")]
        shares: Vec<PathBuf>,
    },
}

/// Who can open a backup: age recipients, or one passphrase (age allows a passphrase only as
/// the sole recipient).
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct SealArgs {
    /// An age recipient (`age1…`) to encrypt to; repeatable, any one of them opens it.
    #[arg(long, value_parser = crate::recovery::sealing::parse_recipient)]
    pub recipient: Vec<age::x25519::Recipient>,
    /// Encrypt to the passphrase in this file (owner-only) instead.
    #[arg(long)]
    pub backup_passphrase_file: Option<PathBuf>,
}

/// What opens a backup.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct OpenArgs {
    /// The recovery identity file (from `recovery keygen`, `recovery combine` or `age-keygen`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// For a backup encrypted to a passphrase: the file holding it.
    #[arg(long)]
    pub backup_passphrase_file: Option<PathBuf>,
}

/// `root-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum RootKeyCommand {
    /// Re-seal the keystore under a new root key or passphrase; every KEK stays the same.
    Rotate {
        /// The keystore and its current root key.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// New root key file (created, mode 0600, if it does not exist).
        #[arg(
            long,
            conflicts_with = "new_passphrase_file",
            required_unless_present = "new_passphrase_file"
        )]
        new_root_key_file: Option<PathBuf>,
        /// New passphrase file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
}

/// Where the keystore and its root key are.
#[derive(Debug, Args)]
pub struct KeystoreArgs {
    /// Keystore: a file path, or `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
    #[arg(long, env = "LOCALKMS_KEYSTORE")]
    pub keystore: String,
    /// The root key.
    #[command(flatten)]
    pub root: RootArgs,
    /// TLS for an etcd keystore.
    #[command(flatten)]
    pub etcd: EtcdTlsArgs,
}

/// TLS files for an etcd keystore (control-plane etcd requires client certificates).
#[derive(Debug, Args, Default, Clone)]
pub struct EtcdTlsArgs {
    /// CA certificate that signed etcd's server certificates (PEM).
    #[arg(long, env = "LOCALKMS_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd (PEM).
    #[arg(long, env = "LOCALKMS_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd (PEM; owner-only, mode 0600 or 0400).
    #[arg(long, env = "LOCALKMS_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Reach etcd without TLS: allowed only when every endpoint is on loopback.
    #[arg(long, env = "LOCALKMS_ETCD_INSECURE", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub etcd_insecure: bool,
}

impl EtcdTlsArgs {
    /// As the etcd client takes it.
    pub fn tls(&self) -> crate::keystore::EtcdTls {
        crate::keystore::EtcdTls {
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            insecure: self.etcd_insecure,
        }
    }
}

/// The root key: a key file or a passphrase file (at most one on the command line; every
/// command that opens a keystore then needs exactly one, see [`RootArgs::source`]). Declared
/// once and flattened into every command that takes it, `serve` included.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct RootArgs {
    /// File holding the 32-byte root key (raw or base64), mode 0600 or 0400.
    #[arg(long, env = "LOCALKMS_ROOT_KEY_FILE")]
    pub root_key_file: Option<PathBuf>,
    /// File holding a passphrase (12+ bytes) stretched with Argon2id, mode 0600 or 0400.
    #[arg(long, env = "LOCALKMS_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Neither `--root-key-file` nor `--passphrase-file` was given.
#[derive(Debug, thiserror::Error)]
#[error("pass --root-key-file or --passphrase-file (or LOCALKMS_ROOT_KEY_FILE / LOCALKMS_PASSPHRASE_FILE)")]
pub struct MissingRootKey;

impl RootArgs {
    /// The chosen source: the one place the choice is resolved.
    pub fn source(&self) -> Result<RootKeySource, MissingRootKey> {
        match (&self.root_key_file, &self.passphrase_file) {
            (Some(p), _) => Ok(RootKeySource::KeyFile(p.clone())),
            (None, Some(p)) => Ok(RootKeySource::PassphraseFile(p.clone())),
            (None, None) => Err(MissingRootKey),
        }
    }
}

/// A plugin socket.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Socket: `unix:///path/kms.sock`, `/path/kms.sock`, `unix:///@name` or `@name`.
    #[arg(long, env = "LOCALKMS_SOCKET")]
    pub socket: String,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Development mode: create or reuse ./localkms-dev/ (root key, keystore, socket). Not for
    /// production.
    #[arg(long, conflicts_with_all = ["keystore", "root_key_file", "passphrase_file"])]
    pub dev: bool,
    /// Socket to listen on: `unix:///path/kms.sock`, `/path/kms.sock`, `unix:///@name`, `@name`.
    #[arg(long, env = "LOCALKMS_SOCKET", required_unless_present = "dev")]
    pub socket: Option<String>,
    /// Keystore: a file path, or `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
    #[arg(long, env = "LOCALKMS_KEYSTORE", required_unless_present = "dev")]
    pub keystore: Option<String>,
    /// TLS for an etcd keystore.
    #[command(flatten)]
    pub etcd: EtcdTlsArgs,
    /// etcd keystores: where to keep a sealed copy of the last keystore loaded, so the server
    /// can start and serve while etcd is unreachable.
    #[arg(long, env = "LOCALKMS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// etcd keystores: this server's name in `localkms nodes` (default: the hostname).
    #[arg(long, env = "LOCALKMS_NODE_NAME")]
    pub node_name: Option<String>,
    /// etcd keystores: lease on this server's node record; a node silent this long stops
    /// counting for convergence.
    #[arg(long, env = "LOCALKMS_NODE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub node_ttl: Duration,
    /// The root key.
    #[command(flatten)]
    pub root: RootArgs,
    /// Version string Status reports: `v2` (Kubernetes 1.29+) or `v2beta1` (1.27–1.28).
    #[arg(long, env = "LOCALKMS_STATUS_VERSION", value_enum, default_value_t = StatusVersionArg::V2)]
    pub status_version: StatusVersionArg,
    /// Rotate automatically when the primary is older than this (e.g. `90d`, `12h`). A failed
    /// attempt is retried every 30 s, or every --rotate-after if shorter. Single-node clusters
    /// only: other nodes would not hold the new key.
    #[arg(long, env = "LOCALKMS_ROTATE_AFTER", value_parser = parse_duration)]
    pub rotate_after: Option<Duration>,
    /// Serve only peers with this uid (SO_PEERCRED; repeatable, or comma-separated).
    #[arg(long, env = "LOCALKMS_ALLOW_UID", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
    /// Serve only peers with this gid (repeatable, or comma-separated).
    #[arg(long, env = "LOCALKMS_ALLOW_GID", value_delimiter = ',')]
    pub allow_gid: Vec<u32>,
    /// Socket file mode, in octal. A mode that lets other users write (`0666`, `0777`) is
    /// refused without --allow-uid/--allow-gid, unless --allow-world.
    #[arg(long, env = "LOCALKMS_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Refuse to start unless key pages can be locked in memory (never swapped to disk).
    #[arg(long, env = "LOCALKMS_REQUIRE_MLOCK", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub require_mlock: bool,
    /// Start even if the keystore is older than the newest one this node has served (its
    /// high-water mark): disaster recovery only; logged, and the mark is reset.
    #[arg(long, env = "LOCALKMS_ALLOW_ROLLBACK", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_rollback: bool,
    /// Allow a socket every local user can connect to (world-writable --socket-mode, or an
    /// abstract socket) with no --allow-uid/--allow-gid list.
    #[arg(long, env = "LOCALKMS_ALLOW_WORLD", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_world: bool,
    /// Group (name or gid) to own the socket file, e.g. with --socket-mode 0660 for an
    /// apiserver running as a non-root user.
    #[arg(long, env = "LOCALKMS_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Connections open at once; at the cap the oldest idle connection is closed to make
    /// room, and other clients wait in the socket backlog.
    #[arg(long, env = "LOCALKMS_MAX_CONNECTIONS", default_value = "128", value_parser = parse_positive)]
    pub max_connections: usize,
    /// Requests in flight at once; beyond it requests get ResourceExhausted.
    #[arg(long, env = "LOCALKMS_MAX_IN_FLIGHT", default_value = "1024", value_parser = parse_positive)]
    pub max_in_flight: usize,
    /// The largest fraction of --max-in-flight one peer (uid) may hold, so one greedy client
    /// cannot starve the rest (`1` turns the share off).
    #[arg(long, env = "LOCALKMS_MAX_IN_FLIGHT_SHARE", default_value = "0.5", value_parser = parse_share)]
    pub max_in_flight_share: f64,
    /// Longest a request may take.
    #[arg(long, env = "LOCALKMS_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// A client must send its HTTP/2 preface within this time.
    #[arg(long, env = "LOCALKMS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Close a connection that sends no request for this long (at most twice this; clients
    /// reconnect as needed).
    #[arg(long, env = "LOCALKMS_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Serve /metrics, /healthz, /readyz and /livez on this address (loopback only unless
    /// --metrics-allow-non-loopback). Off unless set.
    #[arg(long, env = "LOCALKMS_METRICS_ADDR", value_parser = parse_socket_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Allow --metrics-addr on a non-loopback address.
    #[arg(long, env = "LOCALKMS_METRICS_ALLOW_NON_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_allow_non_loopback: bool,
    /// Do NOT refuse a keystore that other users can read or that another user owns. For
    /// unusual setups only; the check exists because the keystore holds every KEK.
    #[arg(long)]
    pub insecure_skip_file_checks: bool,
    /// Refuse ciphertexts in the legacy envelope format 1 (written before 0.3.0, and openable
    /// through both KMS APIs) with FailedPrecondition: once every object was rewritten and
    /// `localkms_legacy_envelope_decrypts` stays at 0.
    #[arg(long, env = "LOCALKMS_REFUSE_LEGACY_ENVELOPES", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub refuse_legacy_envelopes: bool,
    /// Write an age-encrypted backup of the keystore to this directory for every generation
    /// loaded, before it is used (needs --backup-recipient or --backup-passphrase-file).
    #[arg(long, env = "LOCALKMS_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Recovery recipient (`age1…`) the backups are encrypted to; repeatable.
    #[arg(long, env = "LOCALKMS_BACKUP_RECIPIENT", value_delimiter = ',', value_parser = crate::recovery::sealing::parse_recipient, requires = "backup_dir", conflicts_with = "backup_passphrase_file")]
    pub backup_recipient: Vec<age::x25519::Recipient>,
    /// Encrypt backups to the passphrase in this file instead of recipients.
    #[arg(long, env = "LOCALKMS_BACKUP_PASSPHRASE_FILE", requires = "backup_dir")]
    pub backup_passphrase_file: Option<PathBuf>,
    /// How many backups to keep (the current generation's is always kept).
    #[arg(long, env = "LOCALKMS_BACKUP_KEEP", default_value_t = crate::recovery::backup::DEFAULT_KEEP, value_parser = parse_positive)]
    pub backup_keep: usize,
    /// Validate the flags, the root key and the keystore (and that the socket could be
    /// bound), print what would be served, and exit without serving.
    #[arg(long)]
    pub check_config: bool,
}

/// `bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The plugin's socket.
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Which API to drive.
    #[arg(long, value_enum, default_value_t = BenchApi::V2)]
    pub api: BenchApi,
    /// Which operation.
    #[arg(long, value_enum, default_value_t = BenchOp::Encrypt)]
    pub op: BenchOp,
    /// Concurrent requests.
    #[arg(long, default_value = "1", value_parser = parse_positive)]
    pub concurrency: usize,
    /// Connections (the concurrent requests share them round-robin).
    #[arg(long, default_value = "1", value_parser = parse_positive)]
    pub connections: usize,
    /// Run for this long (default 10s unless --requests is given).
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Plaintext bytes per Encrypt.
    #[arg(long, default_value_t = 32)]
    pub plaintext_size: usize,
    /// The server's process id: report its CPU time per request (read from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A second socket: run the same load against both, interleaved round by round, and
    /// print medians and the ratio (second / first).
    #[arg(long)]
    pub compare: Option<String>,
    /// The second server's process id, for its CPU per request.
    #[arg(long, requires = "compare")]
    pub compare_pid: Option<u32>,
    /// Rounds per endpoint with --compare.
    #[arg(long, default_value = "5", value_parser = parse_positive, requires = "compare")]
    pub rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `bench --api` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchApi {
    /// KMS v2.
    V2,
    /// KMS v1 (v1beta1).
    V1,
}

/// `bench --op` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// Encrypt a fresh plaintext each time.
    Encrypt,
    /// Decrypt one ciphertext made before the run.
    Decrypt,
    /// Status (v2) or Version (v1).
    Status,
    /// Encrypt then decrypt (counts as two requests).
    Mixed,
}

/// Parses an octal file mode such as `0600` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0600"))?;
    if mode > 0o777 {
        return Err(format!("{s} is not a permission mode (at most 0777)"));
    }
    Ok(mode)
}

/// Resolves a group name or numeric gid. Names go through the system's name service (NSS:
/// /etc/group, LDAP, sssd, whatever the node is configured with), as `chgrp` would.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!(
            "no group named {name:?} (looked up through the system's name service); pass a numeric gid"
        )),
        Err(e) => Err(format!(
            "cannot look up group {name:?}: {e}; pass a numeric gid"
        )),
    }
}

/// Parses the one duration syntax every flag uses: `90d`, `12h`, `5m`, `30s`, `500ms`,
/// `1h30m`, or a bare number of seconds. Zero is refused: no flag means "no time at all".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{e} (use e.g. 90d, 12h, 5m, 30s, 500ms)"))?,
    };
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// A key id, checked once here (lowercase letters, digits, `-`, `_`, `.`; at most 64 bytes).
pub fn parse_key_id(s: &str) -> Result<KeyId, String> {
    KeyId::parse(s).map_err(|e| format!("{e}; `localkms keys list` shows the ids"))
}

/// A count that must be at least one (a limit of zero would refuse everything).
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A fraction in (0, 1].
pub fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{s:?} is not a fraction between 0 (excluded) and 1"
        )),
    }
}

/// `HOST:PORT`, resolving a name such as `localhost` (the first address wins).
pub fn parse_socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT or does not resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// `--log-level`: a level or a filter, checked before anything logs.
pub fn parse_log_level(s: &str) -> Result<String, String> {
    crate::telemetry::log_directives(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
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
            "--rotate-after",
            "90d",
        ])
        .expect("full serve");
        match cli.command {
            Command::Serve(a) => {
                assert_eq!(a.socket.as_deref(), Some("unix:///tmp/x.sock"));
                assert!(matches!(a.status_version, StatusVersionArg::V2beta1));
                assert_eq!(a.rotate_after, Some(Duration::from_secs(90 * 86_400)));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn modes_and_groups() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("7777").is_err());
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags_refuse_nonsense_and_accept_the_documented_forms() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("localkms").chain(args.iter().copied()))
        };
        assert!(parse(&["check", "--socket", "x", "--timeout", "2s"]).is_ok());
        assert!(parse(&["bench", "--socket", "x", "--duration", "1s"]).is_ok());
        let serve = [
            "serve",
            "--socket",
            "x",
            "--keystore",
            "k",
            "--root-key-file",
            "r",
        ];
        for bad in [
            &["--max-in-flight", "0"][..],
            &["--max-connections", "0"],
            &["--max-in-flight-share", "0"],
            &["--rotate-after", "0s"],
            &["--log-level", "bogus"],
        ] {
            let args: Vec<&str> = serve.iter().chain(bad).copied().collect();
            let err = parse(&args).expect_err("refused");
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
        assert!(parse(&["bench", "--socket", "x", "--concurrency", "0"]).is_err());
        let args: Vec<&str> = serve
            .iter()
            .chain(&["--metrics-addr", "localhost:9464"])
            .copied()
            .collect();
        match parse(&args).expect("localhost resolves").command {
            Command::Serve(a) => {
                let addr = a.metrics_addr.expect("addr");
                assert!(addr.ip().is_loopback() && addr.port() == 9464, "{addr}");
            }
            other => panic!("parsed as {other:?}"),
        }
        for (value, expect) in [
            ("yes", true),
            ("1", true),
            ("no", false),
            ("0", false),
            ("true", true),
            ("false", false),
        ] {
            let args: Vec<&str> = serve
                .iter()
                .chain(&["--metrics-allow-non-loopback", value])
                .copied()
                .collect();
            match parse(&args).expect("boolish").command {
                Command::Serve(a) => assert_eq!(a.metrics_allow_non_loopback, expect, "{value}"),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn exactly_one_root_source() {
        let both = ["--root-key-file", "r", "--passphrase-file", "p"];
        for command in [
            &["keys", "list", "--keystore", "k"][..],
            &["serve", "--socket", "s", "--keystore", "k"],
        ] {
            let args = std::iter::once("localkms")
                .chain(command.iter().copied())
                .chain(both);
            assert!(
                Cli::try_parse_from(args).is_err(),
                "two root sources are refused by clap: {command:?}"
            );
        }
        let none = RootArgs {
            root_key_file: None,
            passphrase_file: None,
        };
        match none.source() {
            Err(e) => assert!(e.to_string().contains("--root-key-file"), "{e}"),
            Ok(_) => panic!("no root source accepted"),
        }
        let pass = RootArgs {
            root_key_file: None,
            passphrase_file: Some("p".into()),
        };
        assert!(matches!(
            pass.source(),
            Ok(RootKeySource::PassphraseFile(_))
        ));
    }
}
