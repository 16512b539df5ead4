//! Tap devices for husk-vmm's virtio-net.
//!
//! A tap made with `TUNSETIFF` and not made persistent lives as long as an
//! fd to it: husk-vmm inherits one, so the tap (and the tc filters on it)
//! goes with the VM however the VM ends. It is made in the network
//! namespace of the calling thread ([`super::netns::run_in`]).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking),
/// the flags husk-vmm's virtio-net expects.
pub fn create(name: &str) -> Result<OwnedFd, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::Invalid(format!("tap name {name:?}")));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| NetError::Tap {
            name: name.to_string(),
            source: e,
        })?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
    // is laid out as (name, flags, padding to its 40 bytes); `tun` is an
    // open /dev/net/tun fd that outlives the call.
    // `as _`: the request is c_ulong in glibc, c_int in musl.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(NetError::Tap {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(tun.into())
}

/// Taps in a network namespace of their own that nothing else uses: a
/// template's VM has NICs like the pods that will resume it, and nothing
/// of any pod's network ([`crate::template`]). The namespace lives as long
/// as this value holds its fd (a tap's fd alone does not keep it: the
/// kernel unregisters a namespace's devices when its last holder goes), so
/// however a build ends, namespace and taps go with the fds: nothing is
/// left on the host to clean up.
pub struct ScratchTaps {
    _netns: OwnedFd,
    pub taps: Vec<OwnedFd>,
}

/// Makes `count` taps (`husk-tpl<N>`) in a fresh network namespace.
pub async fn scratch(count: usize) -> Result<ScratchTaps, NetError> {
    super::netns::on_own_thread(
        "husk-scratch-net",
        || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::Invalid(format!("unshare(CLONE_NEWNET): {e}")))
        },
        move || async move {
            let netns = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(NetError::Socket)?
                .into();
            let taps = (0..count)
                .map(|i| create(&format!("husk-tpl{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ScratchTaps {
                _netns: netns,
                taps,
            })
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }

    #[test]
    fn a_name_too_long_for_the_kernel_is_refused() {
        assert!(super::create("a-name-of-16-chr").is_err());
        assert!(super::create("").is_err());
    }
}
