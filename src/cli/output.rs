//! How CLI commands write their answers: stdout and stderr may be closed pipes or full disks
//! (`| head -1`, `>/dev/full`), and a command that already committed a keystore change must
//! say so, not panic, when its answer cannot be written.

use std::io::Write;

/// Exit code of `scan --fail-on-key` when an object still depends on one of the keys, so a
/// script can chain `scan … --fail-on-key OLD && keys destroy OLD`.
pub const EXIT_KEY_REFERENCED: u8 = 3;

/// Exit code for "the change was committed, but its output could not be written": the
/// keystore holds the change (see `localkms keys history`); only the printout is lost.
pub const EXIT_COMMITTED_OUTPUT_FAILED: u8 = 4;

/// Exit code of `keystore verify-backup` when the backup opens and matches but lacks keys made
/// after it: "make a new backup", as opposed to 1, "this backup is broken".
pub const EXIT_BACKUP_BEHIND: u8 = 5;

/// An answer that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Nothing had changed; only the answer is lost.
    #[error("cannot write the output to stdout: {0}")]
    Failed(#[source] std::io::Error),
    /// The change is committed; only the answer is lost.
    #[error("{what} was committed, but its output could not be written to stdout ({source}); it need not be redone (`localkms keys history` lists keystore changes)")]
    AfterCommit {
        /// What was committed.
        what: String,
        /// Why writing failed.
        #[source]
        source: std::io::Error,
    },
}

/// Writes `text` to stdout and flushes it.
pub fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Prints a command's answer: the commit line (if any) to stderr first, then stdout, then the
/// hints to stderr. A stderr failure is ignored; a stdout failure is returned, marked as
/// after-commit when something was committed.
pub fn emit(stdout: &str, stderr: &str, committed: Option<&str>) -> Result<(), OutputError> {
    if let Some(what) = committed {
        crate::telemetry::eprint_lossy(&format!("localkms: committed: {what}\n"));
    }
    if let Err(source) = write_stdout(stdout) {
        return Err(match committed {
            Some(what) => OutputError::AfterCommit {
                what: what.to_owned(),
                source,
            },
            None => OutputError::Failed(source),
        });
    }
    if !stderr.is_empty() {
        crate::telemetry::eprint_lossy(&format!("{stderr}\n"));
    }
    Ok(())
}

/// The error chain as one line, leaving out causes whose text the message already contains
/// (so the OS error is not said twice).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_not_repeated() {
        let os = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = anyhow::Error::new(OutputError::Failed(os));
        let line = error_line(&err);
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&err), "outer: inner");
    }
}
