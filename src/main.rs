//! The `localkms` command: parse the CLI, start logging, dispatch, map errors to exit codes.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Parser;
use localkms::cli::{
    Cli, Command, KeysCommand, KeystoreArgs, KeystoreCommand, RootKeyCommand, ServeArgs,
};
use localkms::keystore::{self, Actor, Keystore, RootKeyProvider, RootKeySource};
use localkms::server::{self, ServeConfig};
use localkms::{admin, client, dev, telemetry, usage};
use time::OffsetDateTime;

fn main() -> std::process::ExitCode {
    // Before any key is read: no core dumps, not dumpable.
    let hardening = localkms::hardening::harden_process();
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, &cli.log_level);
    localkms::hardening::report(&hardening);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localkms: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn open(args: &KeystoreArgs) -> anyhow::Result<RootKeyProvider> {
    let source = args
        .root
        .source()
        .ok_or_else(|| anyhow!("pass --root-key-file or --passphrase-file"))?;
    Ok(RootKeyProvider::open(&source)?)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Init(args) => init(&args),
        Command::Keys { command } => keys(command),
        Command::Keystore {
            command: KeystoreCommand::Verify { keystore: args },
        } => {
            let ks = keystore::load(&args.keystore, &open(&args)?)?;
            print!("{}", admin::verify_report(&args.keystore, &ks));
            Ok(())
        }
        Command::RootKey {
            command:
                RootKeyCommand::Rotate {
                    keystore: args,
                    new_root_key_file,
                    new_passphrase_file,
                },
        } => {
            let old = open(&args)?;
            let new_source = match (new_root_key_file, new_passphrase_file) {
                (Some(p), _) => RootKeySource::KeyFile(p),
                (None, Some(p)) => RootKeySource::PassphraseFile(p),
                (None, None) => {
                    return Err(anyhow!("pass --new-root-key-file or --new-passphrase-file"))
                }
            };
            let (new, created) = RootKeyProvider::open_or_create(&new_source)?;
            if created {
                println!(
                    "created root key file {} (mode 0600)",
                    new_source.path().display()
                );
            }
            keystore::reseal(&args.keystore, &old, &new, |ks| {
                ks.record_root_key_rotation(now(), &Actor::current())
            })?;
            println!(
                "re-sealed {} under {}; the old root key no longer opens it. Restart or SIGHUP running servers with the new root key.",
                args.keystore.display(),
                new_source.path().display()
            );
            Ok(())
        }
        Command::Status { socket, json } => {
            let report = runtime()?.block_on(client::status(&socket.socket))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "version: {}\nhealthz: {}\nkey_id:  {}",
                    report.version, report.healthz, report.key_id
                );
            }
            Ok(())
        }
        Command::Bench(args) => {
            let opts = client::BenchOptions {
                endpoint: args.socket.socket.clone(),
                api: args.api,
                op: args.op,
                concurrency: args.concurrency,
                connections: args.connections,
                duration: args.duration.unwrap_or(Duration::from_secs(10)),
                requests: args.requests,
                plaintext_size: args.plaintext_size,
                progress: true,
            };
            let report = runtime()?.block_on(client::bench(opts))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.text());
            }
            Ok(())
        }
        Command::Check { socket, timeout } => {
            let report = runtime()?
                .block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(timeout),
                        client::check(&socket.socket),
                    )
                    .await
                })
                .map_err(|_| client::ClientError::Timeout(socket.socket.clone().into()))??;
            println!(
                "ok: {} answered Status (version {}, key_id {}), Encrypt ({} bytes) and Decrypt",
                socket.socket, report.status.version, report.status.key_id, report.ciphertext_len
            );
            Ok(())
        }
    }
}

fn init(args: &KeystoreArgs) -> anyhow::Result<()> {
    let source = args
        .root
        .source()
        .ok_or_else(|| anyhow!("pass --root-key-file or --passphrase-file"))?;
    if args.keystore.exists() {
        return Err(keystore::KeystoreError::AlreadyExists(args.keystore.clone()).into());
    }
    let (root, created) = RootKeyProvider::open_or_create(&source)?;
    if created {
        println!(
            "created root key file {} (mode 0600)",
            source.path().display()
        );
    }
    let ks = Keystore::new_with_primary(now(), root.new_kdf()?, &Actor::current())?;
    keystore::create(&args.keystore, &root, &ks)?;
    let id = ks.primary().map(|r| r.id.to_string()).unwrap_or_default();
    println!(
        "created keystore {} with primary key {id}",
        args.keystore.display()
    );
    Ok(())
}

fn read_usage(keystore: &Path) -> anyhow::Result<usage::UsageFile> {
    Ok(usage::read_usage(&usage::usage_path(keystore))?)
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let actor = Actor::current();
    match command {
        KeysCommand::List {
            keystore: args,
            json,
        } => {
            let ks = keystore::load(&args.keystore, &open(&args)?)?;
            let listing = admin::list(&ks, &read_usage(&args.keystore)?);
            if json {
                println!("{}", serde_json::json!({ "keys": listing }));
            } else {
                print!("{}", admin::list_table(&listing));
            }
        }
        KeysCommand::History {
            keystore: args,
            json,
        } => {
            let ks = keystore::load(&args.keystore, &open(&args)?)?;
            let history = admin::history(ks.history());
            if json {
                println!("{}", serde_json::json!({ "history": history }));
            } else {
                print!("{}", admin::history_table(&history));
            }
        }
        KeysCommand::Rotate {
            keystore: args,
            stage,
        } => {
            let root = open(&args)?;
            let id = keystore::update(&args.keystore, &root, |ks| {
                Ok(if stage {
                    ks.stage(now(), &actor)?
                } else {
                    ks.rotate(now(), &actor)?
                })
            })?;
            println!("{id}");
            if stage {
                eprintln!(
                    "staged {id} in {}: it decrypts but does not encrypt. Copy the keystore to every node, check each with `localkms keystore verify`, then `localkms keys promote {id}`.",
                    args.keystore.display()
                );
            } else {
                eprintln!(
                    "rotated: {id} is now primary in {}; the previous primary is retired and still decrypts. A running server picks this up within 2 seconds.",
                    args.keystore.display()
                );
            }
        }
        KeysCommand::Promote { id, keystore: args } => {
            keystore::update(&args.keystore, &open(&args)?, |ks| {
                Ok(ks.promote(&id, now(), &actor)?)
            })?;
            println!(
                "promoted {id} to primary; the previous primary is retired and still decrypts"
            );
        }
        KeysCommand::Disable { id, keystore: args } => {
            keystore::update(&args.keystore, &open(&args)?, |ks| {
                Ok(ks.disable(&id, now(), &actor)?)
            })?;
            println!("disabled {id}: decrypts under it now fail with FailedPrecondition; `localkms keys enable {id}` undoes this");
        }
        KeysCommand::Enable { id, keystore: args } => {
            keystore::update(&args.keystore, &open(&args)?, |ks| {
                Ok(ks.enable(&id, now(), &actor)?)
            })?;
            println!("enabled {id}");
        }
        KeysCommand::Destroy {
            id,
            keystore: args,
            force,
        } => {
            let last = read_usage(&args.keystore)?
                .keys
                .get(&id)
                .and_then(|u| u.last_decrypt_unix);
            keystore::update(&args.keystore, &open(&args)?, |ks| {
                Ok(ks.destroy(&id, now(), &actor, last, force)?)
            })?;
            println!("destroyed {id}: its material is wiped; a tombstone keeps the id so errors can say what happened");
        }
    }
    Ok(())
}

fn limits(args: &ServeArgs) -> server::Limits {
    server::Limits {
        accept: server::AcceptPolicy {
            allow_uids: args.allow_uid.clone(),
            allow_gids: args.allow_gid.clone(),
            max_connections: args.max_connections,
            handshake_timeout: args.handshake_timeout,
        },
        max_in_flight: args.max_in_flight,
        request_timeout: args.request_timeout,
        ..server::Limits::default()
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args_check_config = args.check_config;
    let limits = limits(&args);
    let socket_group = args
        .socket_group
        .as_deref()
        .map(localkms::cli::resolve_group)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let config = if args.dev {
        let setup = dev::prepare(Path::new(dev::DEV_DIR))?;
        eprintln!("{}", dev::banner(&setup));
        tracing::warn!(dir = %setup.dir.display(), "DEVELOPMENT MODE: the root key is stored unprotected next to the keystore; not for production");
        let socket = match args.socket {
            Some(s) => server::socket::parse_endpoint(&s)?,
            None => server::socket::Endpoint::Path(setup.socket),
        };
        ServeConfig {
            socket,
            socket_mode: args.socket_mode,
            socket_group,
            keystore: setup.keystore,
            root: RootKeySource::KeyFile(setup.root_key_file),
            status_version: args.status_version.into(),
            rotate_after: args.rotate_after,
            limits,
            metrics_addr: args.metrics_addr,
            metrics_allow_non_loopback: args.metrics_allow_non_loopback,
            insecure_skip_file_checks: args.insecure_skip_file_checks,
        }
    } else {
        let root = match (args.root_key_file, args.passphrase_file) {
            (Some(p), _) => RootKeySource::KeyFile(p),
            (None, Some(p)) => RootKeySource::PassphraseFile(p),
            (None, None) => {
                return Err(anyhow!(
                    "serve needs --root-key-file or --passphrase-file (or --dev)"
                ))
            }
        };
        let missing = || anyhow!("serve needs --socket and --keystore (or --dev)");
        ServeConfig {
            socket: server::socket::parse_endpoint(&args.socket.ok_or_else(missing)?)?,
            socket_mode: args.socket_mode,
            socket_group,
            keystore: args.keystore.ok_or_else(missing)?,
            root,
            status_version: args.status_version.into(),
            rotate_after: args.rotate_after,
            limits,
            metrics_addr: args.metrics_addr,
            metrics_allow_non_loopback: args.metrics_allow_non_loopback,
            insecure_skip_file_checks: args.insecure_skip_file_checks,
        }
    };
    if args_check_config {
        println!("{}", server::check_config(&config)?);
        return Ok(());
    }
    runtime()?.block_on(server::serve(config, shutdown_signal()))?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
