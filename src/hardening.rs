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
