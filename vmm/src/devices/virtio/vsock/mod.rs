//! virtio-vsock in user space (virtio 1.2, section 5.10), mediating between
//! AF_VSOCK streams in the guest and AF_UNIX streams on the host. There is no
//! vhost-vsock here: the VMM moves every byte itself.
//!
//! Host side (the convention Firecracker established, which the shim speaks):
//! - one listening Unix socket per VM; a host process connects, writes
//!   `CONNECT <port>\n`, and once the guest accepts reads `OK <hostport>\n`
//!   before the stream carries data;
//! - a guest connection to port P is connected to the Unix socket `<socket>_P`;
//!   if nothing listens there the guest gets a RST.
//!
//! Rooms (Firecracker's shape): [`defs`] (constants from the spec),
//! [`packet`] (TX packets parsed from a validated chain, RX packets written into
//! one), [`device`] (the queues, generic over a [`VsockBackend`]),
//! [`backend`] (that trait), [`muxer`] (the Unix-socket host side: listener,
//! handshakes, deadlines, the RX queue of connections with data) and
//! [`connection`] (one stream's state machine and credit accounting).

pub mod backend;
pub mod connection;
pub mod defs;
mod device;
pub mod muxer;
pub mod packet;

pub use backend::VsockBackend;
pub use device::Vsock;
pub use muxer::UnixMuxer;
