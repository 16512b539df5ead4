//! The Unix-socket host side of vsock: the listener and its `CONNECT <port>`
//! handshake, guest connections to `<socket>_<port>`, every connection's state
//! machine ([`Connection`]), the deadlines, and the packets waiting for the
//! guest.
//!
//! Host sockets live in the muxer's own epoll set (edge-triggered for
//! connections), whose fd is the device's extra event source. That lets TX
//! processing open connections (guest REQUESTs) without reaching back into the
//! event loop. A timerfd in the same set wakes the muxer for its deadlines:
//! host clients that never finish `CONNECT`, guests that never answer a
//! host-initiated REQUEST, and closed streams still draining to a slow host.
//!
//! Towards the guest: control packets wait in `rx_ctrl` (bounded: the device
//! stops taking TX while it is full), and connections with host data to send
//! wait in `rxq`, so an RX buffer goes to the next connection that has
//! something instead of a scan of every connection.
//!
//! Closing: when the guest shuts a stream down completely, the guest side ends
//! at once (RST), but guest data still buffered for the host is written out
//! first (the stream moves to `draining`), so output the guest sent before it
//! closed is never silently lost.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::backend::VsockBackend;
use super::connection::{Action, Connection, HostBroken, Recv};
use super::defs::*;
use super::packet::{Header, TxPacket};

/// (host port, guest port).
pub type Key = (u32, u32);

/// A host connection that has not finished its `CONNECT <port>\n` line.
pub(super) struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// A stream the guest has closed whose host socket still has guest data to write.
pub(super) struct Draining {
    pub(super) conn: Connection,
    deadline: Instant,
}

const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;

/// The vsock host side on one listening Unix socket.
pub struct UnixMuxer {
    guest_cid: u64,
    socket_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    pub(super) conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    pub(super) pending: HashMap<RawFd, Pending>,
    pub(super) draining: HashMap<RawFd, Draining>,
    /// Wakes the muxer at the earliest deadline (see [`UnixMuxer::rearm_timer`]).
    timer: TimerFd,
    pub(super) timer_deadline: Option<Instant>,
    connect_timeout: Duration,
    drain_timeout: Duration,
    /// Control packets waiting for RX buffers.
    pub(super) rx_ctrl: VecDeque<Header>,
    /// Connections that may have host data for the guest, in the order they
    /// got it; `rxq_set` keeps each in it once. An entry whose connection is
    /// gone is skipped when it comes up.
    rxq: VecDeque<Key>,
    rxq_set: HashSet<Key>,
    next_port: u32,
    /// [`MAX_GUEST_CONNS`] and [`MAX_HOST_CONNS`] (tests use small ones).
    max_guest_conns: usize,
    max_host_conns: usize,
    /// Set while the listener is out of the epoll set after an accept ran
    /// out of descriptors: when it goes back in.
    accept_paused_until: Option<Instant>,
    /// Whether the guest has been told (in the log) that it hit its cap;
    /// once per VM, so a flood of REQUESTs is not a flood of warnings.
    cap_warned: bool,
}

impl UnixMuxer {
    /// Listens on `socket_path` (replacing a stale socket file) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, socket_path: &Path) -> std::io::Result<Self> {
        match std::fs::remove_file(socket_path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(socket_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        watch_listener(&epoll, &listener)?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        Ok(UnixMuxer {
            guest_cid,
            socket_path: socket_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            draining: HashMap::new(),
            timer,
            timer_deadline: None,
            connect_timeout: CONNECT_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
            rx_ctrl: VecDeque::new(),
            rxq: VecDeque::new(),
            rxq_set: HashSet::new(),
            next_port: FIRST_HOST_PORT,
            max_guest_conns: MAX_GUEST_CONNS,
            max_host_conns: MAX_HOST_CONNS,
            accept_paused_until: None,
            cap_warned: false,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Overrides [`CONNECT_TIMEOUT`] and [`DRAIN_TIMEOUT`] (tests use short ones).
    pub fn set_timeouts(&mut self, connect: Duration, drain: Duration) {
        self.connect_timeout = connect;
        self.drain_timeout = drain;
    }

    /// Overrides [`MAX_GUEST_CONNS`] and [`MAX_HOST_CONNS`].
    pub fn set_limits(&mut self, guest: usize, host: usize) {
        self.max_guest_conns = guest;
        self.max_host_conns = host;
    }

    /// Streams the guest opened that still hold a host socket.
    fn guest_conns(&self) -> usize {
        let live = self.conns.values().filter(|c| c.from_guest()).count();
        let closing = self.draining.values().filter(|d| d.conn.from_guest());
        live + closing.count()
    }

    /// Host clients that hold a socket: waiting for their line, or streams.
    fn host_conns(&self) -> usize {
        let live = self.conns.values().filter(|c| !c.from_guest()).count();
        let closing = self.draining.values().filter(|d| !d.conn.from_guest());
        self.pending.len() + live + closing.count()
    }

    fn watch(&self, fd: RawFd, events: EventSet) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        ) {
            crate::warn_limited!(error = %e, "vsock: watching a host socket failed");
        }
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn add_conn(&mut self, conn: Connection) {
        let fd = conn.stream().as_raw_fd();
        let key = (conn.local_port(), conn.peer_port());
        self.watch(
            fd,
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
        );
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
    }

    fn remove_conn(&mut self, key: Key) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream().as_raw_fd();
        self.unwatch(fd);
        self.by_fd.remove(&fd);
        Some(conn)
    }

    /// Puts `key` on the RX queue if it has data for the guest now.
    fn note_rx(&mut self, key: Key) {
        let ready = self.conns.get(&key).is_some_and(Connection::wants_rx);
        if ready && self.rxq_set.insert(key) {
            self.rxq.push_back(key);
        }
    }

    /// Resets `key` towards the guest and forgets it.
    fn reset_conn(&mut self, key: Key) {
        if let Some(mut c) = self.remove_conn(key) {
            let h = c.header(self.guest_cid, OP_RST, 0);
            self.rx_ctrl.push_back(h);
        }
    }

    /// Ends `key` towards the guest with a RST (the answer to its full
    /// SHUTDOWN), and keeps the host socket only until the guest data buffered
    /// for it is written, then closes it after a write-side shutdown.
    fn close_conn(&mut self, key: Key) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        let fd = c.stream().as_raw_fd();
        self.by_fd.remove(&fd);
        let h = c.header(self.guest_cid, OP_RST, 0);
        self.rx_ctrl.push_back(h);
        if c.close() {
            // Stays in the epoll set; EPOLLOUT continues the flush.
            crate::debug_limited!(
                ?key,
                pending = c.tx_pending(),
                "vsock: draining a closed stream"
            );
            let deadline = Instant::now() + self.drain_timeout;
            self.draining.insert(fd, Draining { conn: c, deadline });
            return;
        }
        self.unwatch(fd);
    }

    /// The host socket of a closed stream can take more.
    fn drain(&mut self, fd: RawFd) {
        let Some(d) = self.draining.get_mut(&fd) else {
            return;
        };
        let ok = d.conn.flush_tx();
        if ok && d.conn.tx_pending() > 0 {
            return;
        }
        if let Some(mut d) = self.draining.remove(&fd) {
            if !ok {
                tracing::debug!(
                    lost = d.conn.tx_pending(),
                    "vsock: host went away while a closed stream drained"
                );
            }
            d.conn.shut_host_write_if_done();
            self.unwatch(fd);
        }
    }

    /// The earliest deadline of anything waiting.
    fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|p| p.deadline);
        let connects = self.conns.values().filter_map(Connection::connect_deadline);
        let drains = self.draining.values().map(|d| d.deadline);
        let accept = self.accept_paused_until;
        pending.chain(connects).chain(drains).chain(accept).min()
    }

    /// Points the timerfd at the earliest deadline (or disarms it). Setting a
    /// timerfd also resets its expiration count (timerfd_create(2)), so the
    /// level-triggered epoll entry goes quiet without a read that could block.
    pub(super) fn rearm_timer(&mut self) {
        let next = self.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        let r = match next {
            // A zero duration would disarm; a deadline already past fires in 1 ms.
            Some(at) => {
                let d = at.saturating_duration_since(Instant::now());
                self.timer.reset(d.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.timer_deadline = next,
            Err(e) => crate::error_limited!(error = %e, "vsock: setting the deadline timer failed"),
        }
    }

    /// Ends everything whose deadline is at or before `now`.
    pub(super) fn expire(&mut self, now: Instant) {
        self.timer_deadline = None; // the timer fired (or is about to be re-set)
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.accept_paused_until = None;
            if let Err(e) = watch_listener(&self.epoll, &self.listener) {
                crate::error_limited!(error = %e, "vsock: watching the listener again failed");
            }
        }
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            tracing::debug!("vsock: host client did not finish CONNECT in time");
            self.unwatch(fd);
            self.pending.remove(&fd);
        }
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connect_deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            crate::warn_limited!(
                guest_port = key.1,
                "vsock: the guest did not answer a host connection in time; closing it"
            );
            // If the REQUEST never left (no RX buffers), it is withdrawn; else
            // the RST tells the guest to forget a late half-open connection.
            let before = self.rx_ctrl.len();
            self.rx_ctrl
                .retain(|h| (h.src_port, h.dst_port) != (key.0, key.1));
            if self.rx_ctrl.len() == before {
                self.reset_conn(key);
            } else {
                self.remove_conn(key);
            }
        }
        let stale: Vec<RawFd> = self
            .draining
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some(d) = self.draining.remove(&fd) {
                crate::warn_limited!(
                    lost = d.conn.tx_pending(),
                    "vsock: host did not read a closed stream's data in time; dropped"
                );
                self.unwatch(fd);
            }
        }
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|(local, _)| *local == p) {
                return p;
            }
        }
    }

    /// Handles one packet from the guest.
    fn on_tx(&mut self, pkt: TxPacket) {
        let h = pkt.hdr;
        // Anything not addressed from our guest to the host is dropped: the guest
        // cannot speak for other CIDs.
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            crate::debug_limited!(?h, "vsock: packet with foreign CIDs dropped");
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.rx_ctrl.push_back(h.rst_reply());
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                self.reset_conn(key);
                return;
            }
            if self.guest_conns() >= self.max_guest_conns {
                if !self.cap_warned {
                    self.cap_warned = true;
                    tracing::warn!(
                        cap = self.max_guest_conns,
                        "vsock: the guest holds its most connections; further REQUESTs get RST"
                    );
                }
                self.rx_ctrl.push_back(h.rst_reply());
                return;
            }
            self.connect_to_host(h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.rx_ctrl.push_back(h.rst_reply());
            }
            return;
        };
        match conn.on_guest(self.guest_cid, &pkt) {
            Action::Nothing => {}
            Action::Reply(h) => self.rx_ctrl.push_back(h),
            Action::Reset => return self.reset_conn(key),
            Action::Forget => {
                self.remove_conn(key);
                return;
            }
            Action::Close => return self.close_conn(key),
        }
        // The packet may have brought credit, or established the stream.
        self.note_rx(key);
    }

    /// A guest connection to port P goes to `<socket>_P`.
    fn connect_to_host(&mut self, h: Header) {
        let mut path = self.socket_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut conn = Connection::peer(stream, &h);
                let resp = conn.header(self.guest_cid, OP_RESPONSE, 0);
                self.add_conn(conn);
                self.rx_ctrl.push_back(resp);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // The listener is not accepting: refusing now keeps the event
                // loop (and every other device on it) running.
                crate::warn_limited!(
                    port = h.dst_port,
                    "vsock: host listener's backlog is full; RST"
                );
                self.rx_ctrl.push_back(h.rst_reply());
            }
            Err(e) => {
                crate::debug_limited!(port = h.dst_port, error = %e, "vsock: no host listener; RST");
                self.rx_ctrl.push_back(h.rst_reply());
            }
        }
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.host_conns() >= self.max_host_conns {
                        // Closed at once: the client sees EOF, the backlog drains.
                        tracing::debug!("vsock: host clients at their cap; one closed");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.watch(fd, EventSet::IN | EventSet::READ_HANG_UP);
                    self.pending.insert(
                        fd,
                        Pending {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + self.connect_timeout,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    crate::warn_limited!(error = %e, "vsock: out of descriptors; accepting again shortly");
                    self.unwatch(self.listener.as_raw_fd());
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    self.rearm_timer();
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so that no stream data
    /// after it is consumed before the guest accepts.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    break std::str::from_utf8(&p.line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|n| n.trim().parse::<u32>().ok());
                }
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // EOF, error, or a line too long: drop the client.
                _ => break None,
            }
        };
        self.unwatch(fd);
        let Some(pending) = self.pending.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            tracing::debug!("vsock: bad CONNECT line from a host client");
            return;
        };
        let local = self.alloc_port();
        let deadline = Instant::now() + self.connect_timeout;
        let mut conn = Connection::local(pending.stream, local, port, deadline);
        let req = conn.header(self.guest_cid, OP_REQUEST, 0);
        self.add_conn(conn);
        self.rx_ctrl.push_back(req);
    }

    /// Host sockets that are ready.
    fn poll_host(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == LISTENER_TOKEN {
                    self.accept_host();
                    continue;
                }
                if token == TIMER_TOKEN {
                    self.expire(Instant::now());
                    continue;
                }
                let fd = token as RawFd;
                if self.pending.contains_key(&fd) {
                    self.read_connect_line(fd);
                    continue;
                }
                if self.draining.contains_key(&fd) {
                    self.drain(fd);
                    continue;
                }
                let Some(key) = self.by_fd.get(&fd).copied() else {
                    continue;
                };
                let set = ev.event_set();
                let Some(c) = self.conns.get_mut(&key) else {
                    continue;
                };
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                    c.set_host_readable();
                }
                if set.contains(EventSet::OUT) {
                    match c.on_host_writable(self.guest_cid) {
                        Ok(Some(h)) => self.rx_ctrl.push_back(h),
                        Ok(None) => {}
                        Err(HostBroken) => {
                            self.reset_conn(key);
                            continue;
                        }
                    }
                }
                self.note_rx(key);
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// The next host->guest data packet that fits `room` bytes, if any.
    fn next_data(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        while let Some(key) = self.rxq.pop_front() {
            self.rxq_set.remove(&key);
            let Some(c) = self.conns.get_mut(&key) else {
                continue; // gone since it was queued
            };
            match c.recv(self.guest_cid, room) {
                Recv::Packet(h, data) => {
                    // More may follow (edge-triggered: read until it would
                    // block); behind the others, so streams take turns.
                    self.note_rx(key);
                    return Some((h, data));
                }
                // Nothing now; host readiness or guest credit puts it back.
                Recv::Idle => {}
                Recv::Broken => {
                    self.reset_conn(key);
                    return self.rx_ctrl.pop_front().map(|h| (h, Vec::new()));
                }
            }
        }
        None
    }
}

impl AsRawFd for UnixMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockBackend for UnixMuxer {
    fn notify(&mut self) {
        self.poll_host();
    }

    fn send_pkt(&mut self, pkt: TxPacket) {
        self.on_tx(pkt);
    }

    fn recv_pkt(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        match self.rx_ctrl.pop_front() {
            Some(h) => Some((h, Vec::new())),
            None => self.next_data(room),
        }
    }

    fn has_pending_rx(&self) -> bool {
        !self.rx_ctrl.is_empty() || !self.rxq.is_empty()
    }

    fn tx_blocked(&self) -> bool {
        self.rx_ctrl.len() >= MAX_PENDING_CTRL
    }

    fn reset(&mut self) {
        // The guest forgot every connection; so do we (closing the host streams).
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        // Draining streams belong to connections the guest already closed: a
        // device reset is no reason to drop the data they still hold for the
        // host, so they keep draining (under their deadline).
        self.rx_ctrl.clear();
        self.rxq.clear();
        self.rxq_set.clear();
    }

    fn after_work(&mut self) {
        self.rearm_timer();
    }
}

/// Puts the listener in the muxer's epoll set (level-triggered: every
/// waiting client is seen until accepted).
fn watch_listener(epoll: &Epoll, listener: &UnixListener) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    )
}

/// Connects to a Unix socket without waiting: a listener whose backlog is
/// full answers EAGAIN at once instead of parking the event loop, which
/// `UnixStream::connect` (always blocking) would do.
pub(super) fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const CID: u64 = 3;

    fn guest(op: u16, src_port: u32, dst_port: u32, buf_alloc: u32) -> TxPacket {
        TxPacket {
            hdr: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                type_: TYPE_STREAM,
                op,
                buf_alloc,
                ..Default::default()
            },
            data: Vec::new(),
        }
    }

    /// A muxer with `n` guest connections to `<socket>_77` (guest ports
    /// 1000..), their host ends, and the listener.
    fn muxer_with(n: u32) -> (tempfile::TempDir, UnixMuxer, Vec<UnixStream>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = UnixMuxer::new(CID, &path).unwrap();
        let mut p = path.into_os_string();
        p.push("_77");
        let l = UnixListener::bind(&p).unwrap();
        let mut hosts = Vec::new();
        for i in 0..n {
            m.send_pkt(guest(OP_REQUEST, 1000 + i, 77, 4096));
            let (h, _) = m.recv_pkt(4096).unwrap();
            assert_eq!((h.op, h.dst_port), (OP_RESPONSE, 1000 + i));
            hosts.push(l.accept().unwrap().0);
        }
        (dir, m, hosts)
    }

    #[test]
    fn only_connections_with_data_are_queued_for_rx() {
        let (_dir, mut m, mut hosts) = muxer_with(20);
        m.notify();
        assert!(!m.has_pending_rx());
        hosts[7].write_all(b"seven").unwrap();
        hosts[13].write_all(b"thirteen").unwrap();
        m.notify();
        // Two of twenty are queued: an RX buffer never scans the others.
        assert_eq!(m.rxq.len(), 2);
        let mut got = Vec::new();
        while let Some((h, d)) = m.recv_pkt(4096) {
            got.push((h.dst_port, d));
        }
        got.sort();
        assert_eq!(
            got,
            vec![(1007, b"seven".to_vec()), (1013, b"thirteen".to_vec())]
        );
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn a_stream_without_credit_waits_off_the_queue_until_credit_comes() {
        let (_dir, mut m, mut hosts) = muxer_with(1);
        // The guest takes 4 bytes, then has no room.
        m.send_pkt(guest(OP_CREDIT_UPDATE, 1000, 77, 4));
        hosts[0].write_all(b"abcdefgh").unwrap();
        m.notify();
        let (_, d) = m.recv_pkt(4096).unwrap();
        assert_eq!(d, b"abcd");
        assert!(m.recv_pkt(4096).is_none());
        assert!(!m.has_pending_rx(), "no credit: off the queue");
        // The guest's credit update puts it back.
        let mut u = guest(OP_CREDIT_UPDATE, 1000, 77, 4);
        u.hdr.fwd_cnt = 4;
        m.send_pkt(u);
        assert!(m.has_pending_rx());
        assert_eq!(m.recv_pkt(4096).unwrap().1, b"efgh");
    }

    #[test]
    fn control_replies_go_before_data_and_bound_tx() {
        let (_dir, mut m, mut hosts) = muxer_with(1);
        hosts[0].write_all(b"data").unwrap();
        m.notify();
        m.send_pkt(guest(OP_CREDIT_REQUEST, 1000, 77, 4096));
        assert_eq!(m.recv_pkt(4096).unwrap().0.op, OP_CREDIT_UPDATE);
        assert_eq!(m.recv_pkt(4096).unwrap().0.op, OP_RW);
        for i in 0..MAX_PENDING_CTRL as u32 {
            assert!(!m.tx_blocked());
            m.send_pkt(guest(OP_REQUEST, 5000 + i, 4321, 0)); // nobody listens: RST
        }
        assert!(m.tx_blocked());
        m.reset();
        assert!(!m.tx_blocked() && !m.has_pending_rx() && m.conns.is_empty());
    }

    #[test]
    fn guest_connections_past_the_cap_are_refused_and_the_host_side_still_connects() {
        let (_dir, mut m, mut hosts) = muxer_with(0);
        m.set_limits(3, 2);
        let mut p = m.socket_path().to_path_buf().into_os_string();
        p.push("_78");
        let l = UnixListener::bind(&p).unwrap();
        let mut ops = Vec::new();
        for i in 0..6 {
            m.send_pkt(guest(OP_REQUEST, 2000 + i, 78, 4096));
            ops.push(m.recv_pkt(4096).unwrap().0.op);
            if ops[i as usize] == OP_RESPONSE {
                hosts.push(l.accept().unwrap().0);
            }
        }
        let want = [
            OP_RESPONSE,
            OP_RESPONSE,
            OP_RESPONSE,
            OP_RST,
            OP_RST,
            OP_RST,
        ];
        assert_eq!(ops, want);
        assert_eq!(m.conns.len(), 3);
        // One guest stream ends: its place is free again.
        m.send_pkt(guest(OP_RST, 2000, 78, 4096));
        m.send_pkt(guest(OP_REQUEST, 2010, 78, 4096));
        assert_eq!(m.recv_pkt(4096).unwrap().0.op, OP_RESPONSE);
        // The host's budget is its own: a client still reaches the guest.
        let mut c = UnixStream::connect(m.socket_path()).unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        m.notify(); // accepts
        m.notify(); // reads the line
        let (h, _) = m.recv_pkt(4096).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_REQUEST, 1024));
    }

    #[test]
    fn host_clients_past_the_cap_are_closed_not_left_in_the_backlog() {
        let (_dir, mut m, _hosts) = muxer_with(0);
        m.set_limits(3, 2);
        let clients: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(m.socket_path()).unwrap())
            .collect();
        m.notify();
        assert_eq!(m.pending.len(), 2);
        // The two past the cap were accepted and closed: EOF, and nothing
        // is left for the listener to report.
        for mut c in clients.into_iter().skip(2) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).unwrap(), 0);
        }
        let mut events = vec![EpollEvent::default(); 8];
        let n = m.epoll.wait(0, &mut events).unwrap();
        assert!(
            events[..n].iter().all(|e| e.data() != LISTENER_TOKEN),
            "the listener is still readable"
        );
    }
}
