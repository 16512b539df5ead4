//! The seam between the vsock device (queues, guest memory) and its host side.

use std::os::fd::AsRawFd;

use super::packet::{Header, TxPacket};

/// The host side of a vsock device. The device moves packets between the
/// guest's queues and this; the backend owns every connection and host socket.
/// Its fd ([`AsRawFd`]) is one event source of the VMM loop; when it fires the
/// device calls [`VsockBackend::notify`].
pub trait VsockBackend: AsRawFd + Send {
    /// The backend's event source fired: look at its host sockets and timers.
    fn notify(&mut self);
    /// One packet from the guest (already parsed and copied out of guest memory).
    fn send_pkt(&mut self, pkt: TxPacket);
    /// The next packet for the guest, with at most `room` data bytes (the RX
    /// buffer's capacity); control packets first.
    fn recv_pkt(&mut self, room: usize) -> Option<(Header, Vec<u8>)>;
    /// Whether [`VsockBackend::recv_pkt`] may have something, so the device
    /// takes an RX buffer only then.
    fn has_pending_rx(&self) -> bool;
    /// The backend takes no more guest packets until the guest takes some of
    /// its replies (a guest flooding requests without RX buffers).
    fn tx_blocked(&self) -> bool;
    /// The device was reset: the guest forgot every connection.
    fn reset(&mut self);
    /// After a round of queue work: re-arm timers and the like.
    fn after_work(&mut self) {}
}
