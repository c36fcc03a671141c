//! Logging, metrics and the HTTP endpoints that expose them. Logs carry request uids and key
//! ids only, never key material or plaintext.

pub mod http;
pub mod metrics;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::fmt::MakeWriter;
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

/// Log lines that could not be written (stderr closed, a full disk, a log collector gone):
/// exported as `localkms_log_write_errors_total`, so a broken log pipe is visible without
/// ever stopping the server.
static LOG_WRITE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// How many log writes have failed since start.
pub fn log_write_errors() -> u64 {
    LOG_WRITE_ERRORS.load(Ordering::Relaxed)
}

/// stderr for log lines, where a failed write drops the line and counts it instead of
/// returning an error (which `tracing-subscriber` would report by printing to the very stderr
/// that just failed, and panic).
#[derive(Clone, Copy, Debug, Default)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().lock().write_all(buf).is_err() {
            LOG_WRITE_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

/// Writes `text` to stderr for a person to read; a closed or full stderr is ignored (there is
/// nowhere left to report it) but counted like a failed log line.
pub fn eprint_lossy(text: &str) {
    let mut err = std::io::stderr().lock();
    if err
        .write_all(text.as_bytes())
        .and_then(|()| err.flush())
        .is_err()
    {
        LOG_WRITE_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
#[error("--log-level {0:?} is not a log level (error, warn, info, debug, trace) or a filter such as `localkms=debug,h2=info`")]
pub struct BadLogLevel(pub String);

/// The filter directives `--log-level` stands for: a plain level applies to localkms while its
/// dependencies stay at `warn`; a full filter is taken as written.
pub fn log_directives(level: &str) -> Result<String, BadLogLevel> {
    let directives = if level.contains('=') || level.contains(',') {
        level.to_owned()
    } else {
        match level.to_ascii_lowercase().as_str() {
            // The HTTP/2 library logs one warning per misbehaving connection (a rapid-reset
            // client gets one each time it reconnects), which a client could use to flood the
            // log: it is kept to errors unless a filter asks for more (`h2=warn`).
            "error" | "warn" | "info" | "debug" | "trace" | "off" => {
                format!("warn,h2=error,localkms={}", level.to_ascii_lowercase())
            }
            _ => return Err(BadLogLevel(level.to_owned())),
        }
    };
    EnvFilter::try_new(&directives).map_err(|_| BadLogLevel(level.to_owned()))?;
    Ok(directives)
}

/// Sends `tracing` output to stderr. `RUST_LOG` wins when set; otherwise `level` (already
/// checked by [`log_directives`]) applies.
pub fn init_logging(format: LogFormat, level: &str) {
    let directives =
        log_directives(level).unwrap_or_else(|_| "warn,h2=error,localkms=info".to_owned());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LossyStderr)
        .log_internal_errors(false)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked() {
        assert_eq!(
            log_directives("debug").expect("debug"),
            "warn,h2=error,localkms=debug"
        );
        assert_eq!(
            log_directives("localkms=debug,h2=info").expect("filter"),
            "localkms=debug,h2=info"
        );
        let err = log_directives("bogus").expect_err("bogus");
        assert!(err.to_string().contains("\"bogus\""), "{err}");
    }
}
