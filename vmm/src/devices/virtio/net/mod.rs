//! virtio-net in user space (virtio 1.2, section 5.1) over a tap the runtime
//! opened and handed in (`--net fd=N,mac=..`): there is no vhost-net here, so
//! the VMM moves every frame itself, on a thread of its own per NIC.
//!
//! Rooms: [`defs`] (constants from the spec and `if_tun.h`), [`tap`] (the
//! host side, behind [`NetBackend`]), [`rate_limiter`] (a token bucket per
//! direction) and the device (queues, offloads, the tap's epoll interest).
//!
//! Offered: VERSION_1, MAC, STATUS, MTU (when configured), CSUM, HOST_TSO4/6,
//! HOST_ECN (TX frames go to the tap with their header; the kernel checks
//! it), GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN (the tap is told with
//! TUNSETOFFLOAD what the guest acked, at DRIVER_OK). Not offered: MRG_RXBUF,
//! UFO, a control queue, multiqueue.
//!
//! The guest is hostile: ring faults (loops, buffers outside memory, a
//! readable buffer in an RX chain, one shorter than the header) put the
//! device in NEEDS_RESET; a TX chain that is well formed but not a frame
//! (too short, over 64 KiB and headers, with writable buffers) is returned
//! unread and counted, and the link goes on.

pub mod defs;
mod device;
pub mod rate_limiter;
pub mod tap;
#[cfg(test)]
mod tests;

pub use device::{Fault, Net, NetStats};
pub use tap::{NetBackend, Tap, TapError};
