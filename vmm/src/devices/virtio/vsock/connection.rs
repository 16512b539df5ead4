//! One vsock stream's state machine: its host Unix stream, its state, and the
//! credit accounting of virtio 1.2, 5.10.6.3 in both directions. The muxer
//! hands it the guest's packets ([`Connection::on_guest`]) and host readiness,
//! and asks it for packets to send ([`Connection::recv`]); it answers with
//! what the muxer must do ([`Action`]). No guest memory here: its tests use a
//! socket pair.
//!
//! Guest -> host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and `fwd_cnt` =
//! bytes written to the host stream. Bytes the host stream could not take yet
//! wait in `tx_buf`, which an honest guest can never grow past `buf_alloc`; a
//! guest that does is reset.
//! Host -> guest: we send at most `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::defs::*;
use super::packet::{Header, TxPacket};

/// Which directions the guest has shut (its SHUTDOWN flags, cumulative), and
/// whether we passed its end of stream on to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerShut {
    /// The guest will send no more.
    pub send: bool,
    /// The guest will receive no more.
    pub rcv: bool,
    /// The host stream's write side was shut down (after `send`, once every
    /// byte the guest sent before it was written).
    pub host_write_shut: bool,
}

/// Connection state: the one place a stream's phase lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE until
    /// `deadline` (a guest that never answers must not hold the host client
    /// forever).
    LocalInit { deadline: Instant, peer: PeerShut },
    /// Data flows, in each direction until the guest shuts it.
    Established { peer: PeerShut },
    /// The host stream ended; SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed { peer: PeerShut },
}

impl State {
    fn peer(&self) -> PeerShut {
        match *self {
            State::LocalInit { peer, .. }
            | State::Established { peer }
            | State::LocalClosed { peer } => peer,
        }
    }

    fn peer_mut(&mut self) -> &mut PeerShut {
        match self {
            State::LocalInit { peer, .. }
            | State::Established { peer }
            | State::LocalClosed { peer } => peer,
        }
    }
}

/// What the muxer does after a guest packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Queue this control packet for the guest.
    Reply(Header),
    /// Reset the stream: RST to the guest, forget it.
    Reset,
    /// The guest reset it: forget it, no reply.
    Forget,
    /// The guest shut both directions: RST to it now, and write what is still
    /// buffered for the host before closing the host socket.
    Close,
}

/// What [`Connection::recv`] found on the host stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A packet for the guest (data, or SHUTDOWN at the host's end of stream).
    Packet(Header, Vec<u8>),
    /// The host stream has nothing more now (or the guest cannot take it).
    Idle,
    /// The host stream failed: reset.
    Broken,
}

/// The host stream failed (a write error or a zero-length write).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the host stream broke")]
pub struct HostBroken;

/// The guest broke the credit contract.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

/// One vsock stream.
pub struct Connection {
    stream: UnixStream,
    state: State,
    /// Our (host) port and the guest's port.
    local_port: u32,
    peer_port: u32,
    /// Guest -> host bytes waiting for the host stream.
    tx_buf: VecDeque<u8>,
    /// Bytes written to the host stream (wrapping, as on the wire).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host -> guest bytes sent (wrapping).
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host stream may have bytes (edge-triggered epoll said so).
    host_readable: bool,
    /// A credit update is owed to the guest.
    credit_update_due: bool,
    /// The guest opened it (it counts against the guest's budget).
    from_guest: bool,
}

impl Connection {
    fn with_state(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: false,
            credit_update_due: false,
            from_guest: false,
        }
    }

    /// A host client's stream after its `CONNECT <peer_port>` line: the
    /// REQUEST goes out (see [`Connection::header`]) and the guest has until
    /// `deadline` to answer.
    pub fn local(stream: UnixStream, local_port: u32, peer_port: u32, deadline: Instant) -> Self {
        let state = State::LocalInit {
            deadline,
            peer: PeerShut::default(),
        };
        Self::with_state(stream, state, local_port, peer_port)
    }

    /// A guest REQUEST `req` accepted on the host stream: established at once.
    pub fn peer(stream: UnixStream, req: &Header) -> Self {
        let state = State::Established {
            peer: PeerShut::default(),
        };
        let mut c = Self::with_state(stream, state, req.dst_port, req.src_port);
        c.from_guest = true;
        c.update_peer_credit(req);
        c
    }

    /// Whether the guest opened it (a REQUEST) rather than a host client.
    pub fn from_guest(&self) -> bool {
        self.from_guest
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// When a host-initiated stream gives up on the guest's RESPONSE.
    pub fn connect_deadline(&self) -> Option<Instant> {
        match self.state {
            State::LocalInit { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    pub fn host_write_shut(&self) -> bool {
        self.state.peer().host_write_shut
    }

    /// Every guest packet carries the guest's view of its receive buffer.
    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Bytes the guest can take right now.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest reporting more forwarded than we sent gets no credit at all.
        self.peer_buf_alloc
            .saturating_sub(in_flight)
            .min(self.peer_buf_alloc)
    }

    /// A header from us to the guest for this connection, carrying our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The state machine's guest side: one packet from the guest for this stream.
    pub fn on_guest(&mut self, guest_cid: u64, pkt: &TxPacket) -> Action {
        let h = &pkt.hdr;
        self.update_peer_credit(h);
        match (h.op, self.state) {
            (OP_RESPONSE, State::LocalInit { peer, .. }) => {
                self.state = State::Established { peer };
                let line = format!("OK {}\n", self.local_port);
                // The host client waits for this line; a short write on a fresh
                // stream means it is gone.
                if self.stream.write_all(line.as_bytes()).is_err() {
                    return Action::Reset;
                }
                Action::Nothing
            }
            (OP_RW, State::Established { peer }) => {
                if peer.send || self.push_tx(&pkt.data).is_err() {
                    crate::debug_limited!(
                        port = self.local_port,
                        "vsock: guest overran its credit (or sent after SHUTDOWN)"
                    );
                    return Action::Reset;
                }
                if self.credit_update_due {
                    return Action::Reply(self.header(guest_cid, OP_CREDIT_UPDATE, 0));
                }
                Action::Nothing
            }
            (OP_CREDIT_UPDATE, _) => Action::Nothing,
            (OP_CREDIT_REQUEST, _) => Action::Reply(self.header(guest_cid, OP_CREDIT_UPDATE, 0)),
            (OP_SHUTDOWN, _) => {
                let peer = self.state.peer_mut();
                peer.send |= h.flags & SHUTDOWN_SEND != 0;
                peer.rcv |= h.flags & SHUTDOWN_RCV != 0;
                if peer.send && peer.rcv {
                    // The guest is closing: it is done at once (RST), while
                    // what it sent before still goes to the host.
                    return Action::Close;
                }
                self.shut_host_write_if_done();
                Action::Nothing
            }
            (OP_RST, _) => Action::Forget,
            _ => Action::Reset,
        }
    }

    /// The host stream has bytes (epoll said so; edge-triggered, so they are
    /// read until it would block).
    pub fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// Whether [`Connection::recv`] may have a data packet for the guest now.
    pub fn wants_rx(&self) -> bool {
        self.host_readable
            && matches!(self.state, State::Established { peer } if !peer.rcv)
            && self.peer_free() > 0
    }

    /// The next host -> guest packet of at most `room` data bytes.
    pub fn recv(&mut self, guest_cid: u64, room: usize) -> Recv {
        if !self.wants_rx() {
            return Recv::Idle;
        }
        let n = (self.peer_free() as usize)
            .min(room)
            .min(MAX_PKT_DATA as usize);
        if n == 0 {
            return Recv::Idle;
        }
        let mut buf = vec![0u8; n];
        loop {
            return match self.stream.read(&mut buf) {
                Ok(0) => {
                    // Host closed: tell the guest; it answers with RST.
                    self.host_readable = false;
                    self.state = State::LocalClosed {
                        peer: self.state.peer(),
                    };
                    let h = self.header(guest_cid, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    Recv::Packet(h, Vec::new())
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    let h = self.header(guest_cid, OP_RW, 0);
                    Recv::Packet(h, buf)
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    Recv::Idle
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => Recv::Broken,
            };
        }
    }

    /// The host stream can take more: writes what waits for it. Returns a
    /// credit update owed to the guest, or `Err` when the host stream broke.
    pub fn on_host_writable(&mut self, guest_cid: u64) -> Result<Option<Header>, HostBroken> {
        if self.tx_buf.is_empty() {
            return Ok(None);
        }
        if !self.flush_tx() {
            return Err(HostBroken);
        }
        self.shut_host_write_if_done();
        Ok(self
            .credit_update_due
            .then(|| self.header(guest_cid, OP_CREDIT_UPDATE, 0)))
    }

    /// After the guest's full SHUTDOWN: writes what it can of the guest's data.
    /// True when some is left for later (the stream then drains).
    pub fn close(&mut self) -> bool {
        self.state.peer_mut().send = true;
        if self.flush_tx() && self.tx_pending() > 0 {
            return true;
        }
        self.shut_host_write_if_done();
        false
    }

    /// Takes guest data for the host stream and writes what the stream accepts.
    fn push_tx(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        if self.tx_buf.len() + data.len() > CONN_BUF_SIZE as usize {
            return Err(CreditViolation);
        }
        self.tx_buf.extend(data);
        self.flush_tx();
        Ok(())
    }

    /// Writes buffered guest data to the host stream until it would block.
    /// Returns false when the host stream is broken.
    pub fn flush_tx(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        true
    }

    pub fn tx_pending(&self) -> usize {
        self.tx_buf.len()
    }

    /// After the guest's SHUTDOWN_SEND, passes the end of stream on to the host
    /// (shutdown of the write side) once every byte sent before it is written, so
    /// the host reader sees EOF exactly after the last byte. Idempotent.
    pub fn shut_host_write_if_done(&mut self) {
        let empty = self.tx_buf.is_empty();
        let peer = self.state.peer_mut();
        if peer.send && !peer.host_write_shut && empty {
            peer.host_write_shut = true;
            if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
                // The host is gone already; the next read or write reports it.
                tracing::debug!(error = %e, "vsock: shutting down the host write side");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let state = State::Established {
            peer: PeerShut::default(),
        };
        (Connection::with_state(a, state, FIRST_HOST_PORT, 1024), b)
    }

    fn pkt(op: u16, flags: u32, data: &[u8]) -> TxPacket {
        TxPacket {
            hdr: Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: 1024,
                dst_port: FIRST_HOST_PORT,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    #[test]
    fn credit_towards_the_guest() {
        let (mut c, _b) = pair();
        assert_eq!(c.peer_free(), 0);
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Default::default()
        });
        assert_eq!(c.peer_free(), 1000);
        c.rx_cnt = 600;
        assert_eq!(c.peer_free(), 400);
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 600,
            ..Default::default()
        });
        assert_eq!(c.peer_free(), 1000);
        // Wrapping counters.
        c.rx_cnt = 5;
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: u32::MAX - 4,
            ..Default::default()
        });
        assert_eq!(c.peer_free(), 990);
        // A lying guest (fwd_cnt ahead of what we sent) gets nothing.
        c.rx_cnt = 0;
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 10,
            ..Default::default()
        });
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn guest_data_reaches_the_stream_and_counts() {
        let (mut c, mut b) = pair();
        c.push_tx(b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(c.fwd_cnt, 5);
        assert!(!c.credit_update_due);
        c.push_tx(&vec![0u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        // The peer is not reading, so some of it may wait in tx_buf.
        let mut sink = vec![0u8; CONN_BUF_SIZE as usize];
        let mut got = 0;
        b.set_nonblocking(true).unwrap();
        while got < CREDIT_UPDATE_THRESHOLD as usize {
            c.flush_tx();
            if let Ok(n) = b.read(&mut sink) {
                got += n;
            }
        }
        c.flush_tx();
        assert!(c.credit_update_due);
        let h = c.header(3, OP_CREDIT_UPDATE, 0);
        assert_eq!(h.fwd_cnt, c.fwd_cnt);
        assert!(!c.credit_update_due);
    }

    #[test]
    fn overrunning_the_advertised_buffer_is_a_violation() {
        let (mut c, _b) = pair();
        // Fill the socket buffer and ours; the peer never reads.
        let chunk = vec![0u8; MAX_PKT_DATA as usize];
        let mut violated = false;
        for _ in 0..1000 {
            if c.push_tx(&chunk).is_err() {
                violated = true;
                break;
            }
        }
        assert!(violated);
        assert!(c.tx_pending() <= CONN_BUF_SIZE as usize);
        // Through the state machine: the overrun resets the stream.
        assert_eq!(c.on_guest(3, &pkt(OP_RW, 0, &chunk)), Action::Reset);
    }

    #[test]
    fn host_initiated_handshake() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = Connection::local(a, FIRST_HOST_PORT, 1024, deadline);
        assert_eq!(c.connect_deadline(), Some(deadline));
        // Data before the RESPONSE breaks the protocol.
        let (a2, _b2) = UnixStream::pair().unwrap();
        let mut early = Connection::local(a2, FIRST_HOST_PORT + 1, 1024, deadline);
        assert_eq!(early.on_guest(3, &pkt(OP_RW, 0, b"x")), Action::Reset);
        // The RESPONSE establishes it and tells the host client its port.
        assert_eq!(c.on_guest(3, &pkt(OP_RESPONSE, 0, &[])), Action::Nothing);
        assert!(matches!(c.state(), State::Established { .. }));
        assert_eq!(c.connect_deadline(), None);
        let mut line = [0u8; 14];
        b.read_exact(&mut line).unwrap();
        assert_eq!(&line, format!("OK {FIRST_HOST_PORT}\n").as_bytes());
        // A second RESPONSE is a protocol error.
        assert_eq!(c.on_guest(3, &pkt(OP_RESPONSE, 0, &[])), Action::Reset);
    }

    #[test]
    fn guest_shutdowns_and_resets() {
        let (mut c, mut b) = pair();
        assert_eq!(
            c.on_guest(3, &pkt(OP_SHUTDOWN, SHUTDOWN_SEND, &[])),
            Action::Nothing
        );
        // Nothing was buffered: the host sees EOF at once.
        assert!(c.host_write_shut());
        let mut v = Vec::new();
        b.read_to_end(&mut v).unwrap();
        // Data after SHUTDOWN_SEND breaks the contract.
        assert_eq!(c.on_guest(3, &pkt(OP_RW, 0, b"x")), Action::Reset);
        // The other half too: the stream closes.
        assert_eq!(
            c.on_guest(3, &pkt(OP_SHUTDOWN, SHUTDOWN_RCV, &[])),
            Action::Close
        );
        assert_eq!(c.on_guest(3, &pkt(OP_RST, 0, &[])), Action::Forget);
        assert!(matches!(
            c.on_guest(3, &pkt(OP_CREDIT_REQUEST, 0, &[])),
            Action::Reply(Header {
                op: OP_CREDIT_UPDATE,
                ..
            })
        ));
        assert_eq!(c.on_guest(3, &pkt(99, 0, &[])), Action::Reset);
    }

    #[test]
    fn host_data_goes_out_within_credit_then_eof_is_a_shutdown() {
        let (mut c, mut b) = pair();
        b.write_all(b"0123456789").unwrap();
        c.set_host_readable();
        // No credit yet: nothing to send.
        assert!(!c.wants_rx());
        assert_eq!(c.recv(3, 4096), Recv::Idle);
        c.update_peer_credit(&Header {
            buf_alloc: 4,
            ..Default::default()
        });
        assert!(c.wants_rx());
        let Recv::Packet(h, d) = c.recv(3, 4096) else {
            panic!("a packet");
        };
        assert_eq!((h.op, d.as_slice()), (OP_RW, &b"0123"[..]));
        assert!(!c.wants_rx(), "credit used up");
        c.update_peer_credit(&Header {
            buf_alloc: 64,
            fwd_cnt: 4,
            ..Default::default()
        });
        let Recv::Packet(_, d) = c.recv(3, 2) else {
            panic!("a packet");
        };
        assert_eq!(d, b"45", "bounded by the RX buffer's room");
        drop(b);
        let Recv::Packet(_, d) = c.recv(3, 4096) else {
            panic!("a packet");
        };
        assert_eq!(d, b"6789");
        let Recv::Packet(h, _) = c.recv(3, 4096) else {
            panic!("a packet");
        };
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        assert!(matches!(c.state(), State::LocalClosed { .. }));
        assert!(!c.wants_rx());
    }

    #[test]
    fn a_guest_that_shut_receiving_gets_no_data() {
        let (mut c, mut b) = pair();
        c.update_peer_credit(&Header {
            buf_alloc: 64,
            ..Default::default()
        });
        b.write_all(b"x").unwrap();
        c.set_host_readable();
        assert!(c.wants_rx());
        let mut p = pkt(OP_SHUTDOWN, SHUTDOWN_RCV, &[]);
        p.hdr.buf_alloc = 64;
        assert_eq!(c.on_guest(3, &p), Action::Nothing);
        assert!(!c.wants_rx());
    }
}
