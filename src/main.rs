//! The `localkms` command: parse the CLI, start logging, dispatch, map errors to exit codes.

use clap::Parser;
use localkms::cli::output::{
    error_line, OutputError, EXIT_BACKUP_BEHIND, EXIT_COMMITTED_OUTPUT_FAILED, EXIT_KEY_REFERENCED,
};
use localkms::cli::recovery::RecoveryError;
use localkms::cli::{hardening, Cli};
use localkms::telemetry::{self, LogFormat};

/// Freed memory is wiped: request plaintexts pass through buffers of tonic, h2 and prost
/// that would otherwise keep them after the call (see `crypto::WipeOnFree`).
#[global_allocator]
static ALLOCATOR: localkms::crypto::WipeOnFree = localkms::crypto::WipeOnFree;

fn main() -> std::process::ExitCode {
    // Before anything is opened: a closed stdin/stdout/stderr must not be reused by a file.
    hardening::ensure_std_fds();
    // Before any key is read: no core dumps, not dumpable.
    let hardened = hardening::harden_process();
    let cli = Cli::parse();
    let format = cli.log_format;
    telemetry::init_logging(format, &cli.log_level);
    hardening::report(&hardened);
    match localkms::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let line = error_line(&e);
            match format {
                LogFormat::Json => tracing::error!(error = %line, "localkms: fatal error"),
                LogFormat::Text => telemetry::eprint_lossy(&format!("localkms: error: {line}\n")),
            }
            match e.downcast_ref::<OutputError>() {
                Some(OutputError::AfterCommit { .. }) => {
                    std::process::ExitCode::from(EXIT_COMMITTED_OUTPUT_FAILED)
                }
                _ if e
                    .downcast_ref::<localkms::scan::StillReferenced>()
                    .is_some() =>
                {
                    std::process::ExitCode::from(EXIT_KEY_REFERENCED)
                }
                _ if matches!(
                    e.downcast_ref::<RecoveryError>(),
                    Some(RecoveryError::Behind(_))
                ) =>
                {
                    std::process::ExitCode::from(EXIT_BACKUP_BEHIND)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
