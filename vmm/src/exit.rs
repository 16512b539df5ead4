//! Why the VM stopped, and how the threads that notice it tell the event loop.
//!
//! vCPU threads, the i8042 reset line, the console watcher and the signal handler
//! all report here; the first reason wins, and the event loop wakes on the eventfd.

use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (i8042 reset, triple fault). Husk VMs do not restart:
    /// a reboot is how the guest shuts down, so this is a clean exit.
    GuestReset,
    /// The guest powered off or halted (seen on its console, as there is no ACPI).
    GuestPowerOff,
    /// The guest kernel panicked (its console said so before the reset).
    GuestPanic,
    /// The host asked us to stop (SIGTERM, SIGINT, control socket).
    Stopped(String),
    /// A vCPU hit a state KVM cannot run (internal error, failed entry).
    VcpuFailed(String),
    /// A VMM bug or host failure.
    Internal(String),
    /// The control socket asked for a snapshot: the vCPUs save their state
    /// and stop, and the VMM writes the snapshot before it exits.
    Snapshot,
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestPowerOff
            | ExitReason::Stopped(_)
            | ExitReason::Snapshot => 0,
            ExitReason::Internal(_) => 1,
            ExitReason::GuestPanic => 2,
            ExitReason::VcpuFailed(_) => 3,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest rebooted (treated as shutdown)"),
            ExitReason::GuestPowerOff => write!(f, "guest powered off"),
            ExitReason::GuestPanic => write!(f, "guest kernel panic"),
            ExitReason::Stopped(why) => write!(f, "stopped by the host: {why}"),
            ExitReason::VcpuFailed(why) => write!(f, "vCPU failed: {why}"),
            ExitReason::Internal(why) => write!(f, "internal error: {why}"),
            ExitReason::Snapshot => write!(f, "stopping for a snapshot"),
        }
    }
}

/// Shared between every thread that can end the VM.
#[derive(Clone)]
pub struct ExitSignal {
    inner: Arc<Inner>,
}

struct Inner {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    panicked: std::sync::atomic::AtomicBool,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            inner: Arc::new(Inner {
                evt: EventFd::new(EFD_NONBLOCK)?,
                reason: Mutex::new(None),
                panicked: false.into(),
            }),
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn exit(&self, reason: ExitReason) {
        {
            let mut r = self
                .inner
                .reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if r.is_none() {
                tracing::info!(%reason, "VM exit requested");
                *r = Some(reason);
            }
        }
        // A full counter (2^64-2 writes) is the only failure; the loop is awake then anyway.
        let _ = self.inner.evt.write(1);
    }

    /// Notes a guest panic; the reset that follows it is then reported as a panic.
    pub fn note_panic(&self) {
        self.inner
            .panicked
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The recorded reason, with a panic seen on the console taking precedence
    /// over the reset that `panic=-1` turns it into.
    pub fn reason(&self) -> Option<ExitReason> {
        let r = self
            .inner
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let panicked = self
            .inner
            .panicked
            .load(std::sync::atomic::Ordering::SeqCst);
        match r {
            Some(ExitReason::GuestReset) | Some(ExitReason::GuestPowerOff) if panicked => {
                Some(ExitReason::GuestPanic)
            }
            other => other,
        }
    }

    /// The eventfd the event loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_panic_overrides_reset() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.exit(ExitReason::GuestReset);
        s.exit(ExitReason::Internal("later".into()));
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        s.note_panic();
        assert_eq!(s.reason(), Some(ExitReason::GuestPanic));
        assert_eq!(s.reason().unwrap().exit_code(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::GuestPowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Stopped("SIGTERM".into()).exit_code(), 0);
        assert_ne!(ExitReason::VcpuFailed("x".into()).exit_code(), 0);
        assert_ne!(ExitReason::Internal("x".into()).exit_code(), 0);
    }
}
