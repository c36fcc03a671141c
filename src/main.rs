//! The `localkms` command: parse the CLI, start logging, dispatch, map errors to exit codes.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use localkms::cli::{Cli, Command, KeysCommand, ServeArgs};
use localkms::keystore::{self, Keystore, RootKey};
use localkms::server::{self, ServeConfig};
use localkms::{client, dev, telemetry, timefmt};
use time::OffsetDateTime;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging();
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Init(args) => {
            let (root, created) = RootKey::load_or_create(&args.root_key_file)?;
            if created {
                println!(
                    "created root key file {} (mode 0600)",
                    args.root_key_file.display()
                );
            }
            let ks = Keystore::new_with_primary(OffsetDateTime::now_utc())?;
            keystore::create(&args.keystore, &root, &ks)?;
            let id = ks.primary().map(|r| r.id.to_string()).unwrap_or_default();
            println!(
                "created keystore {} with primary key {id}",
                args.keystore.display()
            );
            Ok(())
        }
        Command::Keys { command } => keys(command),
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
        Command::Check { socket, timeout } => {
            let rt = runtime()?;
            let report = rt
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
    match command {
        KeysCommand::List {
            keystore: args,
            json,
        } => {
            let root = RootKey::load(&args.root_key_file)?;
            let ks = keystore::load(&args.keystore, &root)?;
            if json {
                let keys: Vec<_> = ks
                    .records()
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id.as_str(),
                            "state": r.state.as_str(),
                            "created_at": timefmt::rfc3339(r.created_at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "keys": keys }));
            } else {
                println!("{:<24} {:<10} CREATED", "ID", "STATE");
                for r in ks.records() {
                    println!(
                        "{:<24} {:<10} {}",
                        r.id,
                        r.state,
                        timefmt::rfc3339(r.created_at)
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Rotate { keystore: args } => {
            let root = RootKey::load(&args.root_key_file)?;
            let id = keystore::update(&args.keystore, &root, |ks| {
                Ok(ks.rotate(OffsetDateTime::now_utc())?)
            })?;
            println!("{id}");
            eprintln!(
                "rotated: {id} is now primary in {}; the previous primary is retired and still decrypts. A running server picks this up within 2 seconds.",
                args.keystore.display()
            );
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = if args.dev {
        let setup = dev::prepare(std::path::Path::new(dev::DEV_DIR))?;
        eprintln!("{}", dev::banner(&setup));
        tracing::warn!(dir = %setup.dir.display(), "DEVELOPMENT MODE: the root key is stored unprotected next to the keystore; not for production");
        let socket = match args.socket {
            Some(s) => server::socket::parse_endpoint(&s)?,
            None => server::socket::Endpoint::Path(setup.socket),
        };
        ServeConfig {
            socket,
            socket_mode: 0o600,
            keystore: setup.keystore,
            root_key_file: setup.root_key_file,
            status_version: args.status_version.into(),
        }
    } else {
        let missing =
            || anyhow::anyhow!("serve needs --socket, --keystore and --root-key-file (or --dev)");
        ServeConfig {
            socket: server::socket::parse_endpoint(&args.socket.ok_or_else(missing)?)?,
            socket_mode: 0o600,
            keystore: args.keystore.ok_or_else(missing)?,
            root_key_file: args.root_key_file.ok_or_else(missing)?,
            status_version: args.status_version.into(),
        }
    };
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
