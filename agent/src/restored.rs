//! What a guest restored from a snapshot takes from the host first
//! (`Restored`): its memory is its template's, so its wall clock stopped
//! when the template was snapshotted (kvmclock goes on from there, which
//! keeps CLOCK_MONOTONIC steady but leaves CLOCK_REALTIME behind), and its
//! CRNG's state is the same in every clone of that template, so two clones
//! could hand their containers the same "random" bytes.

use std::os::fd::AsRawFd;

/// The most entropy one call takes (the kernel's pool is 256 bits; more
/// only costs the copy).
pub const MAX_ENTROPY: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RestoredError {
    #[error("setting the clock to {ns} ns: {source}")]
    Clock { ns: u64, source: nix::Error },
    #[error("{0} bytes of entropy: between 32 and {MAX_ENTROPY} are taken")]
    EntropySize(usize),
    #[error("{what}: {source}")]
    Random {
        what: &'static str,
        source: std::io::Error,
    },
}

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])`, and `RNDRESEEDCRNG`,
/// `_IO('R', 0x07)` (include/uapi/linux/random.h).
/// `libc::Ioctl`: an int on musl (the guest's agent), unsigned long on glibc.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203 as libc::Ioctl;
const RNDRESEEDCRNG: libc::Ioctl = 0x5207 as libc::Ioctl;

/// Sets CLOCK_REALTIME to `realtime_ns` since the epoch.
pub fn set_clock(realtime_ns: u64) -> Result<(), RestoredError> {
    let ts = nix::sys::time::TimeSpec::from(std::time::Duration::from_nanos(realtime_ns));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|source| {
        RestoredError::Clock {
            ns: realtime_ns,
            source,
        }
    })
}

/// Credits `entropy` to the input pool and reseeds the CRNG from it at once
/// (without the reseed, the CRNG would take the new input only at its next
/// scheduled reseed, up to a minute later).
pub fn reseed(entropy: &[u8]) -> Result<(), RestoredError> {
    if !(32..=MAX_ENTROPY).contains(&entropy.len()) {
        return Err(RestoredError::EntropySize(entropy.len()));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|source| RestoredError::Random {
            what: "opening /dev/urandom",
            source,
        })?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // The kernel reads buf as u32s: pad to a multiple of 4.
    info.resize(8 + entropy.len().div_ceil(4) * 4, 0);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints then buf_size
    // bytes, all inside `info`, which outlives the call; the result is checked.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r < 0 {
        return Err(RestoredError::Random {
            what: "RNDADDENTROPY",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the result is checked.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if r < 0 {
        return Err(RestoredError::Random {
            what: "RNDRESEEDCRNG",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_outside_its_bounds_is_refused_before_anything() {
        assert!(matches!(
            reseed(&[0; 8]),
            Err(RestoredError::EntropySize(8))
        ));
        assert!(matches!(
            reseed(&[0; MAX_ENTROPY + 1]),
            Err(RestoredError::EntropySize(_))
        ));
    }
}
