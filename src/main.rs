//! The `localkms` command: parse the CLI, start logging, dispatch, map errors to exit codes.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Parser;
use localkms::cli::{
    Cli, Command, KeysCommand, KeystoreArgs, KeystoreCommand, RootArgs, RootKeyCommand, ServeArgs,
};
use localkms::keystore::{KeystoreLocation, RootKeySource};
use localkms::server::{self, ServeConfig};
use localkms::{admin, client, dev, telemetry};

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

fn location(s: &str) -> anyhow::Result<KeystoreLocation> {
    Ok(KeystoreLocation::parse(s)?)
}

fn source(root: &RootArgs) -> anyhow::Result<RootKeySource> {
    root.source()
        .ok_or_else(|| anyhow!("pass --root-key-file or --passphrase-file"))
}

fn opened(args: &KeystoreArgs) -> anyhow::Result<admin::Opened> {
    Ok(admin::Opened::open(
        &location(&args.keystore)?,
        &source(&args.root)?,
        &args.etcd.tls(),
    )?)
}

fn print(p: admin::Printed) {
    print!("{}", p.stdout);
    if !p.stderr.is_empty() {
        eprintln!("{}", p.stderr);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Init(args) => {
            let loc = location(&args.keystore)?;
            let src = source(&args.root)?;
            print(runtime()?.block_on(admin::init(&loc, &src, &args.etcd.tls()))?);
            Ok(())
        }
        Command::Keys { command } => keys(command),
        Command::Keystore { command } => {
            let rt = runtime()?;
            let printed = match command {
                KeystoreCommand::Verify { keystore: args } => {
                    rt.block_on(admin::keystore_verify(&opened(&args)?))?
                }
                KeystoreCommand::Copy {
                    from,
                    to,
                    root,
                    etcd,
                } => rt.block_on(admin::keystore_copy(
                    &location(&from)?,
                    &location(&to)?,
                    &source(&root)?,
                    &etcd.tls(),
                ))?,
            };
            print(printed);
            Ok(())
        }
        Command::Nodes {
            keystore: args,
            json,
        } => {
            print(runtime()?.block_on(admin::nodes_list(&opened(&args)?, json))?);
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
            let new_source = match (new_root_key_file, new_passphrase_file) {
                (Some(p), _) => RootKeySource::KeyFile(p),
                (None, Some(p)) => RootKeySource::PassphraseFile(p),
                (None, None) => {
                    return Err(anyhow!("pass --new-root-key-file or --new-passphrase-file"))
                }
            };
            print(runtime()?.block_on(admin::root_key_rotate(&opened(&args)?, &new_source))?);
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

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    let printed = match command {
        KeysCommand::List {
            keystore: args,
            json,
        } => rt.block_on(admin::keys_list(&opened(&args)?, json))?,
        KeysCommand::History {
            keystore: args,
            json,
        } => rt.block_on(admin::keys_history(&opened(&args)?, json))?,
        KeysCommand::Rotate {
            keystore: args,
            stage,
            timeout,
        } => rt.block_on(admin::keys_rotate(&opened(&args)?, stage, timeout))?,
        KeysCommand::Promote { id, keystore: args } => {
            rt.block_on(admin::keys_change(&opened(&args)?, "promote", &id, false))?
        }
        KeysCommand::Disable { id, keystore: args } => {
            rt.block_on(admin::keys_change(&opened(&args)?, "disable", &id, false))?
        }
        KeysCommand::Enable { id, keystore: args } => {
            rt.block_on(admin::keys_change(&opened(&args)?, "enable", &id, false))?
        }
        KeysCommand::Destroy {
            id,
            keystore: args,
            force,
        } => rt.block_on(admin::keys_change(&opened(&args)?, "destroy", &id, force))?,
    };
    print(printed);
    Ok(())
}

fn limits(args: &ServeArgs) -> server::Limits {
    server::Limits {
        accept: server::AcceptPolicy {
            allow_uids: args.allow_uid.clone(),
            allow_gids: args.allow_gid.clone(),
            max_connections: args.max_connections,
            handshake_timeout: args.handshake_timeout,
            idle_timeout: args.idle_timeout,
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
    let node_name = args
        .node_name
        .clone()
        .unwrap_or_else(|| localkms::keystore::Actor::current().host);
    let etcd_tls = args.etcd.tls();
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
            keystore: KeystoreLocation::File(setup.keystore),
            etcd_tls,
            cache_dir: args.cache_dir,
            node_name,
            node_ttl: args.node_ttl,
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
            keystore: location(&args.keystore.ok_or_else(missing)?)?,
            etcd_tls,
            cache_dir: args.cache_dir,
            node_name,
            node_ttl: args.node_ttl,
            root,
            status_version: args.status_version.into(),
            rotate_after: args.rotate_after,
            limits,
            metrics_addr: args.metrics_addr,
            metrics_allow_non_loopback: args.metrics_allow_non_loopback,
            insecure_skip_file_checks: args.insecure_skip_file_checks,
        }
    };
    let rt = runtime()?;
    if args_check_config {
        println!("{}", rt.block_on(server::check_config(&config))?);
        return Ok(());
    }
    rt.block_on(server::serve(config, shutdown_signal()))?;
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
