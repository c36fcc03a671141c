//! Logging, metrics and the HTTP endpoints that expose them. Logs carry request uids and key
//! ids only, never key material or plaintext.

pub mod http;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends `tracing` output to stderr. `RUST_LOG` wins when set; otherwise a plain `level`
/// (`debug`, `info`, …) applies to localkms while its dependencies stay at `warn`, and a full
/// filter (`localkms=debug,h2=info`) is taken as written.
pub fn init_logging(format: LogFormat, level: &str) {
    let directives = if level.contains('=') || level.contains(',') {
        level.to_owned()
    } else {
        format!("warn,localkms={level}")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
