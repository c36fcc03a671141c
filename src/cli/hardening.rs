//! Process hardening applied before any key is loaded: no core dumps, not dumpable.

/// What [`harden_process`] managed to do; failures are warnings, not fatal, because some
/// sandboxes forbid these calls and the plugin must still run there.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// RLIMIT_CORE is 0.
    pub core_dumps_off: bool,
    /// PR_SET_DUMPABLE is 0 (no core dumps, no ptrace attach by same-uid processes).
    pub not_dumpable: bool,
}

/// Sets RLIMIT_CORE to 0 and marks the process not dumpable.
pub fn harden_process() -> Hardening {
    let core_dumps_off = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .is_ok();
    let not_dumpable =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .is_ok();
    Hardening {
        core_dumps_off,
        not_dumpable,
    }
}

/// Makes sure file descriptors 0, 1 and 2 are open, pointing a closed one at `/dev/null`.
/// Started with stderr closed (`2>&-`), the process would otherwise hand fd 2 to the first
/// file or socket it opens, and every log line would be written into it.
pub fn ensure_std_fds() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    // open() returns the lowest free descriptor: each /dev/null opened below 3 fills a hole
    // and is kept open for good; the first one at 3 or above means there are no holes.
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            Ok(f) if f.as_raw_fd() <= 2 => {
                let _ = f.into_raw_fd();
            }
            _ => break,
        }
    }
}

/// Logs what hardening could not be applied.
pub fn report(h: &Hardening) {
    if !h.core_dumps_off {
        tracing::warn!(
            "cannot set RLIMIT_CORE to 0: a crash could write key material to a core file"
        );
    }
    if !h.not_dumpable {
        tracing::warn!("cannot mark the process non-dumpable (PR_SET_DUMPABLE)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_applies() {
        let h = harden_process();
        assert!(h.core_dumps_off);
        assert!(h.not_dumpable);
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(limit.current, Some(0));
        assert_eq!(
            rustix::process::dumpable_behavior().ok(),
            Some(rustix::process::DumpableBehavior::NotDumpable)
        );
    }
}
