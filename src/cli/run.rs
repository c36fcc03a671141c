//! What each subcommand does: resolve its arguments into the library's types once, run it,
//! and print its answer through [`super::output`].

use std::path::Path;

use anyhow::{anyhow, Context};

use super::admin::{self, KeyChange};
use super::args::{
    Cli, Command, DoctorArgs, KeysCommand, KeystoreArgs, KeystoreCommand, NodesAction,
    RecoveryCommand, RootArgs, RootKeyCommand, ScanArgs, ServeArgs, UpgradeCommand,
};
use super::dev;
use super::output as cli_output;
use super::recovery;
use crate::client;
use crate::keystore::{KeystoreLocation, RootKeySource};
use crate::server::{self, ServeConfig};
use crate::telemetry;

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
    Ok(root.source()?)
}

fn opened(args: &KeystoreArgs) -> anyhow::Result<admin::Opened> {
    Ok(admin::Opened::open(
        &location(&args.keystore)?,
        &source(&args.root)?,
        &args.etcd.tls(),
    )?)
}

fn print(p: admin::Printed) -> anyhow::Result<()> {
    Ok(cli_output::emit(
        &p.stdout,
        &p.stderr,
        p.committed.as_deref(),
    )?)
}

fn println_out(text: String) -> anyhow::Result<()> {
    Ok(cli_output::emit(&format!("{text}\n"), "", None)?)
}

/// Runs the command `cli` names. Errors carry what the operator needs (the file, what to do);
/// an [`OutputError::AfterCommit`] inside one means the change was committed.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Init(args) => {
            let loc = location(&args.keystore)?;
            let src = source(&args.root)?;
            print(runtime()?.block_on(admin::init(&loc, &src, &args.etcd.tls()))?)
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
                KeystoreCommand::Export {
                    keystore: args,
                    to,
                    out,
                    force,
                } => {
                    let to =
                        recovery::recipients(&to.recipient, to.backup_passphrase_file.as_deref())?;
                    rt.block_on(recovery::export(&opened(&args)?, &to, &out, force))?
                }
                KeystoreCommand::Import {
                    input,
                    with,
                    keystore: args,
                    merge,
                    allow_different_keystore,
                } => {
                    let with = recovery::opener(
                        with.identity.as_deref(),
                        with.backup_passphrase_file.as_deref(),
                    )?;
                    rt.block_on(recovery::import(recovery::ImportRequest {
                        input: &input,
                        with: &with,
                        location: &location(&args.keystore)?,
                        source: &source(&args.root)?,
                        tls: &args.etcd.tls(),
                        merge,
                        allow_different_keystore,
                    }))?
                }
                KeystoreCommand::VerifyBackup {
                    input,
                    with,
                    keystore: args,
                } => {
                    let with = recovery::opener(
                        with.identity.as_deref(),
                        with.backup_passphrase_file.as_deref(),
                    )?;
                    rt.block_on(recovery::verify_backup(&opened(&args)?, &input, &with))?
                }
            };
            print(printed)
        }
        Command::Nodes {
            action: Some(NodesAction::Forget),
            node: Some(node),
            keystore,
            ..
        } => print(runtime()?.block_on(super::upgrade::forget(&opened(&keystore)?, &node))?),
        Command::Nodes {
            keystore: args,
            json,
            ..
        } => print(runtime()?.block_on(admin::nodes_list(&opened(&args)?, json))?),
        Command::Upgrade { command } => print(match command {
            UpgradeCommand::Status { keystore, json } => {
                runtime()?.block_on(super::upgrade::status(&opened(&keystore)?, json))?
            }
            UpgradeCommand::Finalize { keystore } => {
                runtime()?.block_on(super::upgrade::finalize(&opened(&keystore)?))?
            }
        }),
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
            print(runtime()?.block_on(admin::root_key_rotate(&opened(&args)?, &new_source))?)
        }
        Command::Scan(args) => scan(args),
        Command::Doctor(args) => doctor(args),
        Command::Completions { shell } => Ok(cli_output::emit(
            &super::docs::completions(shell),
            "",
            None,
        )?),
        Command::Man { command } => Ok(cli_output::emit(&super::docs::man(&command)?, "", None)?),
        Command::Recovery { command } => print(match command {
            RecoveryCommand::Keygen { out } => recovery::keygen(&out)?,
            RecoveryCommand::Split {
                identity,
                shares,
                threshold,
                out_dir,
            } => recovery::split(&identity, shares, threshold, &out_dir)?,
            RecoveryCommand::Combine { out, shares } => recovery::combine(&out, &shares)?,
        }),
        Command::Status {
            socket,
            json,
            timeout,
        } => {
            let report = runtime()?
                .block_on(async {
                    tokio::time::timeout(timeout, client::status(&socket.socket)).await
                })
                .map_err(|_| client::ClientError::Timeout(socket.socket.clone().into()))??;
            println_out(if json {
                serde_json::to_string(&report)?
            } else {
                format!(
                    "version: {}\nhealthz: {}\nkey_id:  {}",
                    report.version, report.healthz, report.key_id
                )
            })
        }
        Command::Bench(args) => {
            let opts = client::BenchOptions {
                endpoint: args.socket.socket.clone(),
                api: args.api,
                op: args.op,
                concurrency: args.concurrency,
                connections: args.connections,
                duration: args.duration.unwrap_or(std::time::Duration::from_secs(10)),
                requests: args.requests,
                plaintext_size: args.plaintext_size,
                progress: true,
                server_pid: args.server_pid,
            };
            if let Some(other) = args.compare {
                let a = client::BenchOptions {
                    progress: false,
                    ..opts
                };
                let b = client::BenchOptions {
                    endpoint: other,
                    server_pid: args.compare_pid,
                    ..a.clone()
                };
                let cmp = runtime()?.block_on(client::bench::compare(a, b, args.rounds))?;
                return println_out(if args.json {
                    serde_json::to_string(&cmp)?
                } else {
                    cmp.text()
                });
            }
            let report = runtime()?.block_on(client::bench(opts))?;
            println_out(if args.json {
                serde_json::to_string(&report)?
            } else {
                report.text()
            })
        }
        Command::Check { socket, timeout } => {
            let report = runtime()?
                .block_on(async {
                    tokio::time::timeout(timeout, client::check(&socket.socket)).await
                })
                .map_err(|_| client::ClientError::Timeout(socket.socket.clone().into()))??;
            println_out(format!(
                "ok: {} answered Status (version {}, key_id {}), Encrypt ({} bytes) and Decrypt",
                socket.socket, report.status.version, report.status.key_id, report.ciphertext_len
            ))
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
        KeysCommand::Promote { id, keystore: args } => rt.block_on(admin::keys_change(
            &opened(&args)?,
            &KeyChange::Promote,
            &id,
        ))?,
        KeysCommand::Disable { id, keystore: args } => rt.block_on(admin::keys_change(
            &opened(&args)?,
            &KeyChange::Disable,
            &id,
        ))?,
        KeysCommand::Enable { id, keystore: args } => {
            rt.block_on(admin::keys_change(&opened(&args)?, &KeyChange::Enable, &id))?
        }
        KeysCommand::Destroy {
            id,
            keystore: args,
            min_retired_age,
            force,
            scan_report,
            max_scan_age,
        } => rt.block_on(admin::keys_change(
            &opened(&args)?,
            &KeyChange::Destroy {
                force,
                min_retired_age,
                scan_report,
                max_scan_age,
            },
            &id,
        ))?,
    };
    print(printed)
}

fn scan(args: ScanArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let tls = args.etcd.tls();
    let keystore = match &args.keystore {
        None => None,
        Some(k) => {
            let o = admin::Opened::open(&location(k)?, &source(&args.root)?, &tls)?;
            Some(rt.block_on(o.store.load(&o.root))?)
        }
    };
    let mut endpoints = Vec::new();
    for e in &args.etcd_endpoints {
        let hostport = e
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        if hostport.is_empty() || !hostport.contains(':') {
            return Err(anyhow!(
                "--etcd-endpoints {e:?}: write https://HOST:PORT (or HOST:PORT), comma-separated"
            ));
        }
        endpoints.push(hostport.to_owned());
    }
    let e = &args.etcd;
    if e.etcd_cacert.is_none() && e.etcd_cert.is_none() && e.etcd_key.is_none() && !e.etcd_insecure
    {
        return Err(anyhow!(
            "refusing to read etcd at {} without TLS: every stored object would cross the network in clear. Pass --etcd-cacert, --etcd-cert and --etcd-key (kubeadm: /etc/kubernetes/pki/etcd/ca.crt, /etc/kubernetes/pki/apiserver-etcd-client.crt and .key), or --etcd-insecure for an etcd on this host's loopback",
            endpoints.join(",")
        ));
    }
    let target = crate::keystore::EtcdTarget {
        endpoints,
        prefix: String::new(),
    };
    let etcd = crate::keystore::backend::etcd::Etcd::connect(&target, &tls)?;
    let report = rt.block_on(crate::scan::scan(crate::scan::ScanRequest {
        etcd: &etcd,
        prefix: &args.prefix,
        provider: args.provider.as_deref(),
        keystore: keystore.as_ref(),
        page: i64::try_from(args.page_size).unwrap_or(i64::MAX),
        progress: !args.json,
    }))?;
    println_out(if args.json {
        serde_json::to_string_pretty(&report)?
    } else {
        report.text()
    })?;
    let referenced: Vec<String> = args
        .fail_on_key
        .iter()
        .filter_map(|id| {
            let n = report.references(id.as_str());
            (n > 0).then(|| format!("{id} is still used by {n} object(s)"))
        })
        .collect();
    if referenced.is_empty() {
        Ok(())
    } else {
        Err(crate::scan::StillReferenced(referenced.join("; ")).into())
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let keystore = match &args.keystore {
        Some(k) => Some((location(k)?, source(&args.root)?, args.etcd.tls())),
        None => None,
    };
    // kubeadm's paths, when they are there and nothing else was said.
    let default_if_present = |given: Option<std::path::PathBuf>, path: &str| {
        given.or_else(|| Some(std::path::PathBuf::from(path)).filter(|p| p.exists()))
    };
    let req = crate::doctor::DoctorRequest {
        encryption_config: default_if_present(
            args.encryption_config,
            "/etc/kubernetes/enc/encryption-config.yaml",
        ),
        apiserver_manifest: default_if_present(
            args.apiserver_manifest,
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
        ),
        socket: args.socket,
        keystore,
        rotate_after: args.rotate_after,
        backup_dir: args.backup_dir,
        scan_report: args.scan_report,
    };
    let checks = runtime()?.block_on(crate::doctor::run(&req));
    if checks
        .iter()
        .all(|c| matches!(c, crate::doctor::Check::Skip(_)))
    {
        return Err(anyhow!("nothing to check: pass --encryption-config, --apiserver-manifest, --socket or --keystore (kubeadm's /etc/kubernetes/enc/encryption-config.yaml and /etc/kubernetes/manifests/kube-apiserver.yaml are used when present)"));
    }
    let failed = checks.iter().filter(|c| !c.ok()).count();
    let mut text: String = checks.iter().map(|c| c.line() + "\n").collect();
    text.push_str(&format!(
        "\n{} check(s), {failed} failed\n",
        checks
            .iter()
            .filter(|c| !matches!(c, crate::doctor::Check::Skip(_)))
            .count()
    ));
    cli_output::emit(&text, "", None)?;
    if failed > 0 {
        return Err(anyhow!(
            "{failed} check(s) failed; each ✗ above says how to fix it"
        ));
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
            idle_timeout: args.idle_timeout,
        },
        max_in_flight: args.max_in_flight,
        max_in_flight_share: args.max_in_flight_share,
        request_timeout: args.request_timeout,
        ..server::Limits::default()
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let socket_group = args
        .socket_group
        .as_deref()
        .map(super::args::resolve_group)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let node_name = args
        .node_name
        .clone()
        .unwrap_or_else(|| crate::keystore::Actor::current().host);
    let (socket, keystore, root) = if args.dev {
        let setup = dev::prepare(Path::new(dev::DEV_DIR))?;
        let socket = match &args.socket {
            Some(s) => server::socket::parse_endpoint(s)?,
            None => server::socket::Endpoint::Path(setup.socket.clone()),
        };
        // The warning goes to stderr; the configuration to paste goes to stdout, so
        // `serve --dev > enc.yaml` captures exactly it.
        telemetry::eprint_lossy(&dev::banner(&setup));
        tracing::warn!(dir = %setup.dir.display(), "DEVELOPMENT MODE: the root key is stored unprotected next to the keystore; not for production");
        if let Err(e) = cli_output::write_stdout(&dev::encryption_config(&socket.uri())) {
            tracing::warn!(error = %e, "could not print the EncryptionConfiguration to stdout");
        }
        (
            socket,
            KeystoreLocation::file(setup.keystore),
            RootKeySource::KeyFile(setup.root_key_file),
        )
    } else {
        let root = source(&args.root)?;
        let missing = || anyhow!("serve needs --socket and --keystore (or --dev)");
        (
            server::socket::parse_endpoint(args.socket.as_deref().ok_or_else(missing)?)?,
            location(args.keystore.as_deref().ok_or_else(missing)?)?,
            root,
        )
    };
    let config = ServeConfig {
        socket,
        socket_mode: args.socket_mode,
        socket_group,
        allow_world: args.allow_world,
        allow_rollback: args.allow_rollback,
        require_mlock: args.require_mlock,
        keystore,
        etcd_tls: args.etcd.tls(),
        cache_dir: args.cache_dir.clone(),
        node_name,
        node_ttl: args.node_ttl,
        root,
        status_version: args.status_version.into(),
        rotate_after: args.rotate_after,
        limits: limits(&args),
        metrics_addr: args.metrics_addr,
        metrics_allow_non_loopback: args.metrics_allow_non_loopback,
        insecure_skip_file_checks: args.insecure_skip_file_checks,
        refuse_legacy_envelopes: args.refuse_legacy_envelopes,
        backup: match &args.backup_dir {
            None => None,
            Some(dir) => {
                if args.backup_recipient.is_empty() && args.backup_passphrase_file.is_none() {
                    return Err(anyhow!("--backup-dir {} needs --backup-recipient age1… (from `localkms recovery keygen`) or --backup-passphrase-file: backups are always encrypted", dir.display()));
                }
                Some(crate::recovery::backup::BackupConfig {
                    dir: dir.clone(),
                    recipients: recovery::recipients(
                        &args.backup_recipient,
                        args.backup_passphrase_file.as_deref(),
                    )?,
                    keep: args.backup_keep,
                })
            }
        },
    };
    let rt = runtime()?;
    if args.check_config {
        return println_out(rt.block_on(server::check_config(&config))?);
    }
    let result = rt.block_on(server::serve(config, shutdown_signal()));
    // A blocking read stuck on a hung file must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(result?)
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
