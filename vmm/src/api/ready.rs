//! `--ready-fd N`: tells a parent that the guest is running.
//!
//! The parent passes the write end of a pipe (or any writable fd) as N. Every
//! vCPU thread reports in just before its first KVM_RUN; when the last one has,
//! the event loop writes one byte to N and closes it. A parent that reads the
//! pipe gets the byte once the guest runs, or EOF if husk-vmm died first.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The byte written to the ready fd.
pub const READY_BYTE: u8 = b'R';

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("--ready-fd {0}: stdin, stdout and stderr cannot be the ready fd")]
    Stdio(RawFd),
    #[error("--ready-fd {fd}: not an open file descriptor: {source}")]
    NotOpen {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("ready eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Takes ownership of the inherited fd `fd` (checked to be open, made
/// close-on-exec so nothing husk-vmm might start inherits it).
///
/// Call this once per fd, early, before anything else could own it.
pub fn take_fd(fd: RawFd) -> Result<File, ReadyError> {
    if (0..=2).contains(&fd) {
        return Err(ReadyError::Stdio(fd));
    }
    // SAFETY: F_GETFD/F_SETFD take and return plain ints; an invalid fd yields
    // EBADF, which is checked before the fd is used further.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(ReadyError::NotOpen {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: as above; fd is open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the fd is open (checked above) and was inherited for us to use: the
    // caller hands it over by naming it on the command line, and nothing else in
    // this process opened it, so the File is its only owner.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Counts vCPU threads in and fires the ready fd from the event loop.
pub struct ReadySignal {
    evt: EventFd,
    started: Arc<AtomicUsize>,
    want: usize,
    out: Option<File>,
}

/// The handle a vCPU thread reports through.
#[derive(Clone)]
pub struct VcpuStarted {
    evt: Arc<EventFd>,
    started: Arc<AtomicUsize>,
}

impl VcpuStarted {
    /// Called by a vCPU thread right before its first KVM_RUN.
    pub fn report(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        // A full counter is the only failure, and then the loop is awake anyway.
        let _ = self.evt.write(1);
    }
}

impl ReadySignal {
    /// Waits for `vcpus` threads, then writes to `out` (nothing when `out` is None:
    /// the count is still kept, for logs).
    pub fn new(vcpus: usize, out: Option<File>) -> Result<(Self, VcpuStarted), ReadyError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(ReadyError::EventFd)?;
        let started = Arc::new(AtomicUsize::new(0));
        let handle = VcpuStarted {
            evt: Arc::new(evt.try_clone().map_err(ReadyError::EventFd)?),
            started: started.clone(),
        };
        Ok((
            ReadySignal {
                evt,
                started,
                want: vcpus,
                out,
            },
            handle,
        ))
    }

    /// Whether the byte has been written (or there was no fd to write to and
    /// every vCPU reported).
    pub fn fired(&self) -> bool {
        self.out.is_none() && self.started.load(Ordering::SeqCst) >= self.want
    }

    /// Drains the eventfd and fires once all vCPUs have reported.
    pub fn check(&mut self) {
        let _ = self.evt.read();
        if self.started.load(Ordering::SeqCst) < self.want {
            return;
        }
        let Some(mut out) = self.out.take() else {
            return;
        };
        tracing::info!(vcpus = self.want, "guest running; ready signal sent");
        // The parent may have gone (EPIPE); the VM runs on regardless.
        if let Err(e) = out.write_all(&[READY_BYTE]) {
            tracing::warn!(error = %e, "writing the ready fd failed");
        }
        // Dropping `out` closes it: a parent reading to EOF is not left waiting.
    }
}

impl MutEventSubscriber for ReadySignal {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!(error = ?e, "registering the ready eventfd failed");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        self.check();
        if self.out.is_none() && self.started.load(Ordering::SeqCst) >= self.want {
            let _ = ops.remove(Events::new(&self.evt, EventSet::IN));
        }
    }
}

impl AsRawFd for ReadySignal {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-int array it is given; checked below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn fires_once_after_every_vcpu_then_closes() {
        let (mut r, w) = pipe();
        let w = take_fd(w.into_raw_fd()).unwrap();
        let (mut sig, started) = ReadySignal::new(2, Some(w)).unwrap();
        started.report();
        sig.check();
        assert!(!sig.fired());
        let s2 = started.clone();
        std::thread::spawn(move || s2.report()).join().unwrap();
        sig.check();
        assert!(sig.fired());
        sig.check(); // idempotent
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap(); // EOF: the write end was closed
        assert_eq!(got, [READY_BYTE]);
    }

    #[test]
    fn a_gone_parent_is_not_an_error() {
        let (r, w) = pipe();
        drop(r);
        let (mut sig, started) = ReadySignal::new(1, Some(w)).unwrap();
        started.report();
        sig.check(); // EPIPE (SIGPIPE is ignored by the Rust runtime)
        assert!(sig.fired());
    }

    #[test]
    fn bad_fds_are_refused() {
        assert!(matches!(take_fd(1), Err(ReadyError::Stdio(1))));
        assert!(matches!(take_fd(-1), Err(ReadyError::NotOpen { .. })));
        // A number far above anything open.
        assert!(matches!(take_fd(1 << 20), Err(ReadyError::NotOpen { .. })));
    }
}
