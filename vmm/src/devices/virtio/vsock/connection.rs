//! One vsock stream: its host Unix stream, its state, and the credit accounting
//! of virtio 1.2, 5.10.6.3 in both directions.
//!
//! Guest -> host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and `fwd_cnt` =
//! bytes written to the host stream. Bytes the host stream could not take yet
//! wait in `tx_buf`, which an honest guest can never grow past `buf_alloc`; a
//! guest that does is reset.
//! Host -> guest: we send at most `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::defs::*;
use super::packet::Header;

/// Connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
    /// The host stream ended; SHUTDOWN sent, waiting for the guest's RST.
    Closing,
}

/// The guest broke the credit contract.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Our (host) port and the guest's port.
    pub local_port: u32,
    pub peer_port: u32,
    /// Guest -> host bytes waiting for the host stream.
    tx_buf: VecDeque<u8>,
    /// Bytes written to the host stream (wrapping, as on the wire).
    pub fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host -> guest bytes sent (wrapping).
    pub rx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The guest will send no more / receive no more.
    pub peer_shut_send: bool,
    pub peer_shut_rcv: bool,
    /// The host stream may have bytes (edge-triggered epoll said so).
    pub host_readable: bool,
    /// A credit update is owed to the guest.
    pub credit_update_due: bool,
    /// Host-initiated connections only: when to give up waiting for the guest's
    /// RESPONSE (a guest that never answers must not hold the host client forever).
    pub connect_deadline: Option<Instant>,
    /// The host stream's write side was shut down (after the guest's SHUTDOWN_SEND
    /// and once everything it sent before was written).
    pub host_write_shut: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
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
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_readable: false,
            credit_update_due: false,
            connect_deadline: None,
            host_write_shut: false,
        }
    }

    /// Every guest packet carries the guest's view of its receive buffer.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
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

    /// Takes guest data for the host stream and writes what the stream accepts.
    pub fn push_tx(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
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
        if self.peer_shut_send && !self.host_write_shut && self.tx_buf.is_empty() {
            self.host_write_shut = true;
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
    use std::io::Read;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (
            Connection::new(a, State::Established, FIRST_HOST_PORT, 1024),
            b,
        )
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
    }
}
