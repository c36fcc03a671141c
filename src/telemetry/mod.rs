//! Logging setup. Logs carry request uids and key ids only, never key material or plaintext.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sends `tracing` output to stderr as text, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
