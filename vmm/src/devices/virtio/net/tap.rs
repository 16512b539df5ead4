//! The host side of a NIC: a tap fd the runtime opened and handed in
//! (`--net fd=N,...`), behind [`NetBackend`] so the device can be tested and
//! fuzzed without one.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::defs::{TUNGETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ, VNET_HDR_LEN};

/// What the device needs from the host side of a NIC. Frames carry the
/// 12-byte virtio-net header in front, both ways.
pub trait NetBackend: Send {
    /// The fd the net thread polls for frames to read.
    fn as_raw_fd(&self) -> RawFd;
    /// One frame into `buf`; `Ok(None)` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// One whole frame out.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The offloads (`TUN_F_*`) the guest can take on RX.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("fd {fd} is not open: {source}")]
    NotOpen {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is not a tap (TUNGETIFF: {source})")]
    NotTun {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} ({name}) has flags {flags:#x}; a tap with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR is needed")]
    Flags { fd: RawFd, name: String, flags: u16 },
    #[error("fd {fd} ({name}): {what}: {source}")]
    Setup {
        fd: RawFd,
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A tap fd, non-blocking, with a 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// `struct ifreq`: the name, then the flags (a short) in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Takes the inherited `fd` (named on the command line) and checks it:
    /// see [`Tap::new`]. Call once per fd, before anything else could own it.
    pub fn from_inherited(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD takes and returns a plain int; a closed fd gives
        // EBADF, checked before the fd is owned.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotOpen {
                fd,
                source: if fd < 3 {
                    io::Error::other("stdin, stdout and stderr are not taps")
                } else {
                    io::Error::last_os_error()
                },
            });
        }
        // SAFETY: the fd is open (checked above) and was inherited for this
        // process to use: the runtime hands it over by naming it in `--net`,
        // config validation made every named fd distinct, and nothing else
        // here opened it, so this OwnedFd is its only owner.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Tap::new(owned)
    }

    /// Checks that `fd` is a tap as the runtime promised and prepares it:
    /// `O_NONBLOCK`, a 12-byte vnet header, offloads off until the guest
    /// says what it takes.
    pub fn new(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes at most a `struct ifreq` (40 bytes) into
        // `req`, which is that size and lives across the call; on a non-tun
        // fd it fails with EBADFD/ENOTTY/EINVAL, which is checked.
        let r = unsafe { libc::ioctl(raw, TUNGETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::NotTun {
                fd: raw,
                source: io::Error::last_os_error(),
            });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let flags = req.flags as u16;
        let need = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        if flags & need != need {
            return Err(TapError::Flags {
                fd: raw,
                name,
                flags,
            });
        }
        let setup = |what, r: libc::c_int| {
            if r < 0 {
                Err(TapError::Setup {
                    fd: raw,
                    name: name.clone(),
                    what,
                    source: io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        // SAFETY: F_GETFL/F_SETFL/F_SETFD take and return plain ints on an fd we own.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            setup("F_GETFL", fl)?;
            setup(
                "O_NONBLOCK",
                libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK),
            )?;
            setup(
                "FD_CLOEXEC",
                libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC),
            )?;
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr` for the duration of the call.
        setup("TUNSETVNETHDRSZ", unsafe {
            libc::ioctl(raw, TUNSETVNETHDRSZ as _, &hdr as *const libc::c_int)
        })?;
        let mut tap = Tap { fd, name };
        tap.set_offload(0).map_err(|source| TapError::Setup {
            fd: raw,
            name: tap.name.clone(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface's name on the host (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: read(2) into `buf`, which is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: write(2) from `frame`, valid for `frame.len()` bytes.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags as the ioctl's integer
        // argument (not a pointer); nothing is read or written in memory.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::defs::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
    use super::*;
    use std::os::fd::FromRawFd;

    /// A new tap with `flags`, or None where this process may not make one.
    pub(in crate::devices::virtio::net) fn make_tap(flags: libc::c_int) -> Option<OwnedFd> {
        // SAFETY: open(2) of a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; 16],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..9].copy_from_slice(b"husktest%");
        req.name[9..11].copy_from_slice(b"d\0");
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is.
        let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut req as *mut IfReq) };
        (r == 0).then_some(owned)
    }

    #[test]
    fn a_real_tap_is_checked_and_made_non_blocking() {
        let need = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let Some(fd) = make_tap(need) else {
            eprintln!("skipped: no CAP_NET_ADMIN or /dev/net/tun here");
            return;
        };
        let mut tap = Tap::new(fd).unwrap();
        assert!(tap.name().starts_with("husktest"), "{}", tap.name());
        let mut buf = [0u8; 128];
        // Non-blocking: nothing waits, and the read says so at once.
        assert!(tap.read_frame(&mut buf).unwrap().is_none());
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // Without IFF_VNET_HDR (or as a tun) it is refused.
        for flags in [
            libc::IFF_TAP | libc::IFF_NO_PI,
            libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        ] {
            let fd = make_tap(flags).unwrap();
            assert!(matches!(Tap::new(fd), Err(TapError::Flags { .. })));
        }
    }

    #[test]
    fn what_is_not_a_tap_is_refused() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(Tap::new(r), Err(TapError::NotTun { .. })));
        assert!(matches!(
            Tap::from_inherited(1),
            Err(TapError::NotOpen { fd: 1, .. })
        ));
        assert!(matches!(
            Tap::from_inherited(100_000),
            Err(TapError::NotOpen { .. })
        ));
    }
}
