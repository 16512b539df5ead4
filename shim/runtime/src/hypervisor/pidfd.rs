//! A pidfd: a handle on one process that a recycled pid can never redirect.
//! Signals go through it, and it becomes readable when the process exits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::layout::ProcessId;

#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd for `pid` as it is now.
    pub fn open(pid: i32) -> std::io::Result<Self> {
        if pid <= 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// A pidfd for the process `id` names, only if that pid is still that
    /// process. The pidfd is opened first and the start time checked after:
    /// if it matches, the pidfd holds that very process, reuse or not.
    pub fn open_verified(id: ProcessId) -> Option<Self> {
        let fd = Self::open(id.pid).ok()?;
        id.is_alive().then_some(fd)
    }

    /// Sends `signal`; an exited process is `Ok(false)`.
    pub fn signal(&self, signal: i32) -> std::io::Result<bool> {
        // SAFETY: pidfd_send_signal(fd, sig, NULL info, 0 flags) on our fd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        }
    }

    /// Whether the process has exited (the pidfd polls readable).
    pub fn has_exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd with no timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & libc::POLLIN != 0
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) {
        // SAFETY: the fd is registered only for the life of the AsyncFd
        // made here, which ends within this call, while `self` (its owner)
        // is borrowed: the fd stays open and is not reused meanwhile.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.0.as_raw_fd(),
                tokio::io::Interest::READABLE,
            )
        };
        match registered {
            Ok(afd) => {
                let _ = afd.readable().await;
            }
            // Not pollable through tokio (should not happen): poll slowly.
            Err(_) => {
                while !self.has_exited() {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_one_process_to_its_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        let fd = PidFd::open_verified(id).unwrap();
        assert!(!fd.has_exited());
        assert!(fd.signal(libc::SIGKILL).unwrap());
        fd.exited().await;
        assert!(fd.has_exited());
        child.wait().unwrap();
        // Reaped: the pid may be reused, the pidfd still names the dead one.
        assert!(!fd.signal(libc::SIGKILL).unwrap());
        assert!(PidFd::open_verified(id).is_none());
    }

    #[test]
    fn a_recorded_identity_that_does_not_match_is_refused() {
        let me = ProcessId::current().unwrap();
        let wrong = ProcessId {
            start_time: me.start_time.wrapping_add(7),
            ..me
        };
        assert!(PidFd::open_verified(wrong).is_none());
        assert!(PidFd::open_verified(me).is_some());
    }
}
