//! The vsock device: its three queues and guest memory, generic over the host
//! side ([`VsockBackend`]; [`UnixMuxer`] in a VM). The device validates each
//! chain once, parses TX packets into owned values for the backend, and fills
//! RX buffers with what the backend has for the guest.

use std::path::Path;
use std::time::Duration;

use event_manager::{EventOps, Events};
use virtio_queue::QueueOwnedT;
use vmm_sys_util::epoll::EventSet;

use super::backend::VsockBackend;
use super::defs::*;
use super::muxer::UnixMuxer;
use super::packet;
use crate::devices::virtio::chain::{self, ChainError};
use crate::devices::virtio::defs::{F_VERSION_1, TYPE_VSOCK};
use crate::devices::virtio::state::{ActiveQueues, DeviceState};
use crate::devices::virtio::{ActivateError, Activation, VirtioDevice, EXTRA_EVENT_BASE};

/// Why processing stopped with the device broken.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Packet(#[from] packet::ParseError),
}

/// virtio-vsock over a host-side backend.
pub struct Vsock<B: VsockBackend = UnixMuxer> {
    pub(super) backend: B,
    state: DeviceState,
    sizes: [u16; 3],
    config: [u8; 8],
    /// A transport reset was sent and the driver has not yet handed its
    /// event buffer back. Until it does, nothing goes to the guest: a
    /// connection request that reached it before it handled the reset
    /// would be accepted, then dropped by the reset without a word to the
    /// host, which would wait on it for nothing.
    reset_pending: bool,
}

impl Vsock<UnixMuxer> {
    /// Listens on `socket_path` (replacing a stale socket file) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, socket_path: &Path) -> std::io::Result<Self> {
        Ok(Self::with_backend(
            guest_cid,
            UnixMuxer::new(guest_cid, socket_path)?,
        ))
    }

    pub fn socket_path(&self) -> &Path {
        self.backend.socket_path()
    }

    /// Overrides [`CONNECT_TIMEOUT`] and [`DRAIN_TIMEOUT`] (tests use short ones).
    pub fn set_timeouts(&mut self, connect: Duration, drain: Duration) {
        self.backend.set_timeouts(connect, drain);
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// The device for the guest `guest_cid` with `backend` as its host side.
    pub fn with_backend(guest_cid: u64, backend: B) -> Self {
        Vsock {
            backend,
            state: DeviceState::new(),
            sizes: [QUEUE_SIZE; 3],
            config: guest_cid.to_le_bytes(),
            reset_pending: false,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Fills guest RX buffers with what the backend has (control packets first).
    fn fill_rx(&mut self, a: &mut ActiveQueues) -> Result<bool, Fault> {
        let mut used = false;
        if self.reset_pending {
            return Ok(false);
        }
        loop {
            if !self.backend.has_pending_rx() {
                return Ok(used);
            }
            let Some(c) = chain::pop(&mut a.queues[RXQ], &a.mem)? else {
                return Ok(used);
            };
            let c = chain::validate(c, &a.mem, u64::from(MAX_PKT_DATA) + 4096)?;
            let buf = packet::RxBuffer::new(&c)?;
            let Some((hdr, data)) = self.backend.recv_pkt(buf.capacity()) else {
                // Nothing could be sent after all (no credit): give the buffer back.
                a.queues[RXQ].go_to_previous_position();
                return Ok(used);
            };
            let len = buf.write(&a.mem, &hdr, &data)?;
            chain::add_used(&mut a.queues[RXQ], &a.mem, c.head(), len)?;
            used = true;
        }
    }

    /// Handles guest TX packets; returns (any used, held back by a full control queue).
    fn process_tx(&mut self, a: &mut ActiveQueues) -> Result<(bool, bool), Fault> {
        let mut used = false;
        loop {
            if self.backend.tx_blocked() {
                return Ok((used, true));
            }
            let Some(c) = chain::pop(&mut a.queues[TXQ], &a.mem)? else {
                return Ok((used, false));
            };
            let c = chain::validate(c, &a.mem, u64::from(MAX_PKT_DATA) + 4096)?;
            let pkt = packet::parse_tx(&a.mem, &c)?;
            chain::add_used(&mut a.queues[TXQ], &a.mem, c.head(), 0)?;
            used = true;
            self.backend.send_pkt(pkt);
        }
    }

    fn pump(&mut self) {
        let r = DeviceState::process(
            self,
            |d| &mut d.state,
            |s, a| {
                let mut any = false;
                for _ in 0..MAX_PUMP_ROUNDS {
                    let (tx, held_back) = s.process_tx(a)?;
                    let rx = s.fill_rx(a)?;
                    any |= tx || rx;
                    // Only RX progress can release held-back TX work.
                    if !(held_back && rx) {
                        break;
                    }
                }
                Ok::<_, Fault>(any)
            },
        );
        if let Err(e) = r {
            crate::warn_limited!(error = %e, "virtio-vsock: malformed ring; device needs reset");
        }
    }

    /// Tells the driver its transport was reset: one event in the event
    /// queue, if the driver has posted a buffer for it (Linux posts all of
    /// them at probe).
    fn send_transport_reset(&mut self) {
        let mut sent = false;
        let r = DeviceState::process(
            self,
            |d| &mut d.state,
            |_, a| {
                let Some(c) = chain::pop(&mut a.queues[EVQ], &a.mem)? else {
                    return Ok::<_, Fault>(false);
                };
                let c = chain::validate(c, &a.mem, 4096)?;
                let mut w = c.writer(&a.mem);
                w.write(&EVENT_TRANSPORT_RESET.to_le_bytes())?;
                let len = w.written();
                chain::add_used(&mut a.queues[EVQ], &a.mem, c.head(), len)?;
                sent = true;
                Ok(true)
            },
        );
        match r {
            Err(e) => {
                crate::warn_limited!(error = %e, "virtio-vsock: malformed event ring; device needs reset")
            }
            Ok(()) if sent => {
                self.reset_pending = true;
                tracing::debug!("virtio-vsock: transport reset sent to the guest");
            }
            Ok(()) => tracing::debug!("virtio-vsock: no event buffer for a transport reset"),
        }
    }

    /// The backend's event source fired.
    fn on_backend_event(&mut self) {
        self.backend.notify();
        self.pump();
        self.backend.after_work();
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state.queue_states()
    }

    fn restored(&mut self) {
        // The guest's connections were to a host side that no longer
        // exists; the reset makes it drop them (listeners stay) and pick up
        // this VM's CID from the configuration.
        self.send_transport_reset();
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        // The event queue carries only transport-reset events (after a
        // restore, if the driver set it up); it need not be ready.
        self.state.activate(a, &[RXQ, TXQ])?;
        // No pump here: activation runs on the vCPU thread that wrote
        // DRIVER_OK, whose seccomp filter has no socket or epoll calls. The
        // driver kicks its RX queue as soon as it has posted buffers, and
        // that kick reaches `process_queue` on the event loop thread.
        Ok(())
    }

    fn reset(&mut self) {
        self.backend.reset();
        self.state.reset();
        self.reset_pending = false;
    }

    fn process_queue(&mut self, index: usize) {
        // The event queue carries only device->driver transport-reset events,
        // sent once after a restore; its buffers stay with us until then.
        if index == EVQ && self.reset_pending {
            // Linux handles the event, then gives the buffer back and kicks:
            // the reset is done, and what waited can go.
            self.reset_pending = false;
            tracing::debug!("virtio-vsock: the guest handled the transport reset");
        }
        if index == RXQ || index == TXQ || index == EVQ {
            self.pump();
            self.backend.after_work();
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        let fd = self.backend.as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, EXTRA_EVENT_BASE, EventSet::IN)) {
            tracing::error!(error = ?e, "vsock: registering the host socket set failed");
        }
    }

    fn process_event(&mut self, _events: Events, _ops: &mut EventOps) {
        self.on_backend_event();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::test_utils::{desc, memory};
    use crate::devices::virtio::vsock::muxer::connect_nonblocking;
    use crate::devices::virtio::vsock::packet::{Header, TxPacket};
    use crate::devices::virtio::Interrupt;
    use crate::memory::GuestMemoryMmap;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Instant;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const CID: u64 = 3;
    const RX_BUFS: u64 = 0x40000;
    const TX_BUFS: u64 = 0x80000;
    /// The used rings live apart from the mock's layout: virtio-queue 0.17's
    /// MockSplitQueue puts the used ring `len` bytes (not `2 * len + 4`) after
    /// the avail ring's entries, so with 16 entries the device's used-index
    /// writes land on avail entries 8 and 9 once a test wraps the ring.
    const RX_USED: u64 = 0x3000;
    const TX_USED: u64 = 0x3800;

    /// The used index and element `slot` of the used ring at `addr`.
    fn used_idx(mem: &GuestMemoryMmap, addr: u64) -> u16 {
        mem.read_obj(GuestAddress(addr + 2)).unwrap()
    }

    fn used_elem(mem: &GuestMemoryMmap, addr: u64, slot: u16) -> (u32, u32) {
        let at = addr + 4 + 8 * u64::from(slot % 16);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    struct Rig<'a, B: VsockBackend = UnixMuxer> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        dev: Vsock<B>,
        irq: Arc<Interrupt>,
        rx_seen: u16,
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.sock");
            let dev = Vsock::new(CID, &path).unwrap();
            Rig::with_device(mem, dev, dir, path)
        }
    }

    impl<'a, B: VsockBackend> Rig<'a, B> {
        fn with_device(
            mem: &'a GuestMemoryMmap,
            mut dev: Vsock<B>,
            dir: tempfile::TempDir,
            path: PathBuf,
        ) -> Self {
            let rx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
            let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
            let ev = Queue::new(16).unwrap();
            let mut rxq: Queue = rx.create_queue().unwrap();
            rxq.set_used_ring_address(Some(RX_USED as u32), Some(0));
            let mut txq: Queue = tx.create_queue().unwrap();
            txq.set_used_ring_address(Some(TX_USED as u32), Some(0));
            dev.activate(Activation {
                mem: mem.clone(),
                queues: vec![rxq, txq, ev],
                interrupt: irq.clone(),
                features: F_VERSION_1,
            })
            .unwrap();
            Rig {
                mem,
                rx,
                tx,
                dev,
                irq,
                rx_seen: 0,
                _dir: dir,
                path,
            }
        }

        /// Keeps 8 RX chains (44-byte header + 4 KiB data) posted, as the guest driver does.
        fn post_rx(&mut self) {
            loop {
                let idx = self.rx.avail().idx().load();
                // A buffer is reposted only once `guest_recv` has read it, as a
                // driver does; reposting on the device's used index alone would
                // let the device overwrite packets the test has not seen.
                if idx.wrapping_sub(self.rx_seen) >= 8 {
                    break;
                }
                let i = idx % 8;
                let base = RX_BUFS + u64::from(i) * 0x2000;
                self.rx
                    .desc_table()
                    .store(2 * i, desc(base, 44, true, Some(2 * i + 1)))
                    .unwrap();
                self.rx
                    .desc_table()
                    .store(2 * i + 1, desc(base + 0x100, 0x1000, true, None))
                    .unwrap();
                self.rx
                    .avail()
                    .ring()
                    .ref_at(idx as usize % 16)
                    .unwrap()
                    .store(2 * i);
                self.rx.avail().idx().store(idx.wrapping_add(1));
            }
            self.dev.process_queue(RXQ);
        }

        /// Sends one packet from the guest.
        fn guest_send(&mut self, h: Header, data: &[u8]) {
            let slot = self.tx.avail().idx().load();
            let d = (slot % 8) * 2;
            let base = TX_BUFS + u64::from(d) * 0x1000;
            let mut h = h;
            h.len = data.len() as u32;
            self.mem
                .write_slice(&h.to_bytes(), GuestAddress(base))
                .unwrap();
            if data.is_empty() {
                self.tx
                    .desc_table()
                    .store(d, desc(base, 44, false, None))
                    .unwrap();
            } else {
                self.mem
                    .write_slice(data, GuestAddress(base + 0x100))
                    .unwrap();
                self.tx
                    .desc_table()
                    .store(d, desc(base, 44, false, Some(d + 1)))
                    .unwrap();
                self.tx
                    .desc_table()
                    .store(d + 1, desc(base + 0x100, data.len() as u32, false, None))
                    .unwrap();
            }
            self.tx
                .avail()
                .ring()
                .ref_at(slot as usize % 16)
                .unwrap()
                .store(d);
            self.tx.avail().idx().store(slot.wrapping_add(1));
            self.dev.process_queue(TXQ);
        }

        /// Packets the device put in RX buffers since the last call.
        fn guest_recv(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let used = used_idx(self.mem, RX_USED);
            while self.rx_seen != used {
                let (head, len) = used_elem(self.mem, RX_USED, self.rx_seen);
                let (head, len) = (u64::from(head), len as usize);
                let base = RX_BUFS + (head / 2) * 0x2000;
                let mut hb = [0u8; 44];
                self.mem.read_slice(&mut hb, GuestAddress(base)).unwrap();
                let h = parse_header(&hb);
                let mut data = vec![0u8; len - 44];
                self.mem
                    .read_slice(&mut data, GuestAddress(base + 0x100))
                    .unwrap();
                out.push((h, data));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }

        /// What the event loop does when the device's epoll set fires.
        fn host_events(&mut self) {
            self.dev.on_backend_event();
        }

        /// A guest connection to `<socket>_<port>`, accepted on the host.
        fn guest_connect(&mut self, guest_port: u32, port: u32) -> UnixStream {
            let mut p = self.path.clone().into_os_string();
            p.push(format!("_{port}"));
            let l = UnixListener::bind(&p).unwrap();
            self.post_rx();
            self.guest_send(guest_hdr(OP_REQUEST, guest_port, port), &[]);
            let (host, _) = l.accept().unwrap();
            assert_eq!(self.guest_recv()[0].0.op, OP_RESPONSE);
            host
        }

        /// A host connection the guest has been asked for: (host stream, REQUEST).
        fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
            let mut host = UnixStream::connect(&self.path).unwrap();
            self.post_rx();
            host.write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            self.host_events();
            self.host_events();
            let r = self.guest_recv();
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].0.op, OP_REQUEST);
            (host, r[0].0)
        }

        /// Runs host events until `done` or 10 s pass.
        fn host_events_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) {
            let end = Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(Instant::now() < end, "timed out");
                self.host_events();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Reads `stream` to EOF on a thread (the host side of a test connection).
    fn read_to_eof(mut stream: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut v = Vec::new();
            stream.read_to_end(&mut v).unwrap();
            v
        })
    }

    /// `len` bytes of a pattern that shows misordering and loss.
    fn pattern(seed: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8 ^ (i >> 12) as u8
            })
            .collect()
    }

    fn parse_header(b: &[u8; 44]) -> Header {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Header {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn config_space_holds_the_cid() {
        let mem = memory();
        let rig = Rig::new(&mem);
        let mut d = [0u8; 8];
        rig.dev.read_config(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), CID);
        assert_eq!(rig.dev.socket_path(), rig.path);
    }

    #[test]
    fn request_to_unknown_port_gets_rst() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.post_rx();
        rig.guest_send(guest_hdr(OP_REQUEST, 5000, 4321), &[]);
        let p = rig.guest_recv();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].0.op, p[0].0.src_port, p[0].0.dst_port),
            (OP_RST, 4321, 5000)
        );
        // RW for a connection that does not exist: RST too.
        rig.guest_send(guest_hdr(OP_RW, 5000, 4321), b"x");
        assert_eq!(rig.guest_recv()[0].0.op, OP_RST);
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn a_host_listener_with_a_full_backlog_gets_rst_without_blocking() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag};
        use nix::sys::socket::{SockType, UnixAddr};
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let mut p = rig.path.clone().into_os_string();
        p.push("_1234");
        // A listener that never accepts, with room for one pending connection
        // (Linux lets backlog + 1 wait), taken by a first client.
        let l = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(Path::new(&p)).unwrap()).unwrap();
        listen(&l, Backlog::new(0).unwrap()).unwrap();
        let _first = connect_nonblocking(Path::new(&p)).unwrap();
        // A blocking connect would park the event loop here for good.
        let started = Instant::now();
        rig.post_rx();
        rig.guest_send(guest_hdr(OP_REQUEST, 7000, 1234), &[]);
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0.op, r[0].0.dst_port), (OP_RST, 7000));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn guest_connects_to_socket_port_and_data_flows_both_ways() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let mut p = rig.path.clone().into_os_string();
        p.push("_1234");
        let l = UnixListener::bind(&p).unwrap();
        rig.post_rx();
        rig.guest_send(guest_hdr(OP_REQUEST, 7000, 1234), &[]);
        let (mut host, _) = l.accept().unwrap();
        let r = rig.guest_recv();
        assert_eq!(r[0].0.op, OP_RESPONSE);
        assert_eq!(r[0].0.buf_alloc, CONN_BUF_SIZE);

        rig.guest_send(guest_hdr(OP_RW, 7000, 1234), b"ping");
        let mut b = [0u8; 4];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");

        host.write_all(b"pong").unwrap();
        rig.host_events();
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0.op, r[0].1.as_slice()), (OP_RW, &b"pong"[..]));

        // Host closes: the guest is told with SHUTDOWN; its RST ends it.
        drop(host);
        rig.host_events();
        let r = rig.guest_recv();
        assert_eq!(
            (r[0].0.op, r[0].0.flags),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        rig.guest_send(guest_hdr(OP_RST, 7000, 1234), &[]);
        assert!(rig.dev.backend.conns.is_empty());
    }

    /// After a restore the guest is told its transport was reset (one event,
    /// id 0), and nothing reaches it until it has handed the event buffer
    /// back: a request it took before handling the reset would be dropped
    /// by the reset with the host left waiting.
    #[test]
    fn a_restored_device_resets_the_transport_and_holds_rx_until_handled() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0xc000), 16);
        const EV_BUF: u64 = 0x9_0000;
        const EV_USED: u64 = 0x3c00;
        ev.desc_table()
            .store(0, desc(EV_BUF, 4, true, None))
            .unwrap();
        ev.avail().ring().ref_at(0).unwrap().store(0);
        ev.avail().idx().store(1);
        mem.write_obj(0xffff_ffff_u32, GuestAddress(EV_BUF))
            .unwrap();
        let mut evq: Queue = ev.create_queue().unwrap();
        evq.set_used_ring_address(Some(EV_USED as u32), Some(0));
        let mut rxq: Queue = rig.rx.create_queue().unwrap();
        rxq.set_used_ring_address(Some(RX_USED as u32), Some(0));
        let mut txq: Queue = rig.tx.create_queue().unwrap();
        txq.set_used_ring_address(Some(TX_USED as u32), Some(0));
        rig.dev
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![rxq, txq, evq],
                interrupt: rig.irq.clone(),
                features: F_VERSION_1,
            })
            .unwrap();

        rig.dev.restored();
        assert_eq!(used_idx(&mem, EV_USED), 1);
        assert_eq!(used_elem(&mem, EV_USED, 0), (0, 4));
        let id: u32 = mem.read_obj(GuestAddress(EV_BUF)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        assert_eq!(rig.irq.status(), crate::devices::virtio::defs::INT_VRING);

        // A host connection waits while the reset is being handled...
        let mut host = UnixStream::connect(&rig.path).unwrap();
        rig.post_rx();
        host.write_all(b"CONNECT 1024\n").unwrap();
        rig.host_events();
        rig.host_events();
        assert!(
            rig.guest_recv().is_empty(),
            "delivered before the reset was handled"
        );
        // ...and goes once the driver gives the event buffer back.
        rig.dev.process_queue(EVQ);
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0.op, r[0].0.dst_port), (OP_REQUEST, 1024));
    }

    #[test]
    fn host_connect_handshake() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.post_rx();
        let mut host = UnixStream::connect(&rig.path).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        rig.host_events();
        rig.host_events();
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        let req = r[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
        assert!(req.src_port >= FIRST_HOST_PORT);
        rig.guest_send(guest_hdr(OP_RESPONSE, 1024, req.src_port), &[]);
        let mut line = [0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        // Data from the host is limited by the guest's credit.
        let mut h = guest_hdr(OP_CREDIT_UPDATE, 1024, req.src_port);
        h.buf_alloc = 3;
        rig.guest_send(h, &[]);
        host.write_all(b"abcdef").unwrap();
        rig.host_events();
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, b"abc");
        // More credit releases the rest.
        let mut h = guest_hdr(OP_CREDIT_UPDATE, 1024, req.src_port);
        h.buf_alloc = 3;
        h.fwd_cnt = 3;
        rig.guest_send(h, &[]);
        assert_eq!(rig.guest_recv()[0].1, b"def");
    }

    #[test]
    fn bad_connect_lines_are_dropped() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.post_rx();
        for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'C'; 100]] {
            let mut host = UnixStream::connect(&rig.path).unwrap();
            host.write_all(line).unwrap();
            rig.host_events();
            rig.host_events();
            let mut b = [0u8; 8];
            host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            assert_eq!(host.read(&mut b).unwrap_or(0), 0, "{line:?}");
        }
        assert!(rig.guest_recv().is_empty());
        assert!(rig.dev.backend.pending.is_empty());
    }

    #[test]
    fn foreign_cids_are_ignored() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.post_rx();
        let mut h = guest_hdr(OP_REQUEST, 1, 2);
        h.src_cid = 99;
        rig.guest_send(h, &[]);
        assert!(rig.guest_recv().is_empty());
    }

    #[test]
    fn many_concurrent_streams() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let mut p = rig.path.clone().into_os_string();
        p.push("_9");
        let l = UnixListener::bind(&p).unwrap();
        let mut hosts = Vec::new();
        for port in 0..20u32 {
            rig.post_rx();
            rig.guest_send(guest_hdr(OP_REQUEST, 10_000 + port, 9), &[]);
            hosts.push(l.accept().unwrap().0);
            rig.guest_recv();
        }
        for port in 0..20u32 {
            rig.guest_send(guest_hdr(OP_RW, 10_000 + port, 9), &port.to_le_bytes());
        }
        for (port, h) in hosts.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            h.read_exact(&mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), port as u32);
        }
        assert_eq!(rig.dev.backend.conns.len(), 20);
    }

    #[test]
    fn malformed_tx_chains_need_reset() {
        type Setup = Box<dyn Fn(&MockSplitQueue<GuestMemoryMmap>)>;
        let cases: Vec<Setup> = vec![
            // Header descriptor too short.
            Box::new(|tx| {
                tx.desc_table()
                    .store(0, desc(TX_BUFS, 8, false, None))
                    .unwrap()
            }),
            // Wrong direction (device-writable TX buffer).
            Box::new(|tx| {
                tx.desc_table()
                    .store(0, desc(TX_BUFS, 44, true, None))
                    .unwrap()
            }),
            // Out of range.
            Box::new(|tx| {
                tx.desc_table()
                    .store(0, desc(1 << 40, 44, false, None))
                    .unwrap()
            }),
            // Zero length.
            Box::new(|tx| {
                tx.desc_table()
                    .store(0, desc(TX_BUFS, 0, false, None))
                    .unwrap()
            }),
            // Loop.
            Box::new(|tx| {
                tx.desc_table()
                    .store(0, desc(TX_BUFS, 44, false, Some(0)))
                    .unwrap()
            }),
        ];
        for (i, setup) in cases.iter().enumerate() {
            let mem = memory();
            let mut rig = Rig::new(&mem);
            setup(&rig.tx);
            rig.tx.avail().ring().ref_at(0).unwrap().store(0);
            rig.tx.avail().idx().store(1);
            rig.dev.process_queue(TXQ);
            assert!(rig.irq.needs_reset(), "case {i}");
            // Broken: further work is refused until reset.
            rig.dev.process_queue(TXQ);
            rig.dev.reset();
            assert!(!rig.dev.state.is_broken());
        }
    }

    #[test]
    fn oversized_rw_needs_reset() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        // Header claims more than MAX_PKT_DATA.
        let mut h = guest_hdr(OP_RW, 1, 2);
        h.len = MAX_PKT_DATA + 1;
        mem.write_slice(&h.to_bytes(), GuestAddress(TX_BUFS))
            .unwrap();
        rig.tx
            .desc_table()
            .store(0, desc(TX_BUFS, 44, false, Some(1)))
            .unwrap();
        rig.tx
            .desc_table()
            .store(1, desc(TX_BUFS + 0x100, 0x1000, false, None))
            .unwrap();
        rig.tx.avail().ring().ref_at(0).unwrap().store(0);
        rig.tx.avail().idx().store(1);
        rig.dev.process_queue(TXQ);
        assert!(rig.irq.needs_reset());
    }

    #[test]
    fn malformed_rx_chain_needs_reset() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        // A read-only RX buffer, then something to send.
        rig.rx
            .desc_table()
            .store(0, desc(RX_BUFS, 0x1000, false, None))
            .unwrap();
        rig.rx.avail().ring().ref_at(0).unwrap().store(0);
        rig.rx.avail().idx().store(1);
        rig.guest_send(guest_hdr(OP_REQUEST, 5000, 4321), &[]);
        assert!(rig.irq.needs_reset());
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn host_connect_times_out_when_the_guest_never_answers() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.set_timeouts(SHORT, DRAIN_TIMEOUT);
        rig.post_rx();
        let (mut host, req) = rig.host_connect(1024);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The guest stays silent; the timer (through the device's epoll set) fires.
        std::thread::sleep(SHORT * 2);
        rig.host_events();
        assert!(rig.dev.backend.conns.is_empty());
        let mut b = [0u8; 8];
        assert_eq!(host.read(&mut b).unwrap(), 0, "host client closed, no OK");
        // The guest is told to forget the half-open connection.
        let r = rig.guest_recv();
        assert_eq!(
            (r[0].0.op, r[0].0.src_port, r[0].0.dst_port),
            (OP_RST, req.src_port, 1024)
        );
        // A late RESPONSE is answered with RST, not an OK to a closed client.
        rig.guest_send(guest_hdr(OP_RESPONSE, 1024, req.src_port), &[]);
        assert_eq!(rig.guest_recv()[0].0.op, OP_RST);
        assert!(rig.dev.backend.timer_deadline.is_none());
    }

    #[test]
    fn an_answered_connect_does_not_time_out() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.set_timeouts(SHORT, DRAIN_TIMEOUT);
        rig.post_rx();
        let (_host, req) = rig.host_connect(1024);
        rig.guest_send(guest_hdr(OP_RESPONSE, 1024, req.src_port), &[]);
        assert!(
            rig.dev.backend.timer_deadline.is_none(),
            "nothing left to wait for"
        );
        rig.dev
            .backend
            .expire(Instant::now() + Duration::from_secs(3600));
        assert_eq!(rig.dev.backend.conns.len(), 1);
    }

    #[test]
    fn connect_timeout_withdraws_a_request_never_delivered() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.set_timeouts(SHORT, DRAIN_TIMEOUT);
        // No RX buffers: the REQUEST waits in the control queue.
        let mut host = UnixStream::connect(&rig.path).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        rig.host_events();
        rig.host_events();
        assert_eq!(rig.dev.backend.rx_ctrl.len(), 1);
        rig.dev.backend.expire(Instant::now() + SHORT);
        assert!(rig.dev.backend.conns.is_empty());
        assert!(
            rig.dev.backend.rx_ctrl.is_empty(),
            "neither REQUEST nor RST"
        );
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn host_client_that_never_sends_connect_times_out() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.set_timeouts(SHORT, DRAIN_TIMEOUT);
        let mut host = UnixStream::connect(&rig.path).unwrap();
        host.write_all(b"CONN").unwrap();
        rig.host_events();
        assert_eq!(rig.dev.backend.pending.len(), 1);
        std::thread::sleep(SHORT * 2);
        rig.host_events();
        assert!(rig.dev.backend.pending.is_empty());
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    }

    /// Sends `data` from the guest in 4 KiB packets.
    fn guest_send_all(rig: &mut Rig<'_>, guest_port: u32, port: u32, data: &[u8]) {
        for chunk in data.chunks(4096) {
            rig.guest_send(guest_hdr(OP_RW, guest_port, port), chunk);
        }
    }

    #[test]
    fn guest_close_flushes_buffered_data_before_the_host_socket_closes() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let host = rig.guest_connect(7000, 77);
        // A full advertised buffer: more than the host socket takes unread.
        let data = pattern(1, CONN_BUF_SIZE as usize);
        guest_send_all(&mut rig, 7000, 77, &data);
        let key = (77, 7000);
        assert!(
            rig.dev.backend.conns[&key].tx_pending() > 0,
            "test needs buffered data"
        );
        rig.guest_recv();
        // The guest closes: it is answered at once, the data is not dropped.
        let mut h = guest_hdr(OP_SHUTDOWN, 7000, 77);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        rig.guest_send(h, &[]);
        let r = rig.guest_recv();
        assert_eq!(r.last().unwrap().0.op, OP_RST);
        assert!(rig.dev.backend.conns.is_empty());
        assert_eq!(rig.dev.backend.draining.len(), 1);
        let reader = read_to_eof(host);
        rig.host_events_until(|r| r.dev.backend.draining.is_empty());
        assert!(reader.join().unwrap() == data, "byte-exact, then EOF");
        // The port pair is free again at once.
        rig.guest_connect(7000, 78);
    }

    #[test]
    fn guest_close_with_nothing_buffered_closes_at_once() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let host = rig.guest_connect(7000, 77);
        guest_send_all(&mut rig, 7000, 77, b"bye");
        let mut h = guest_hdr(OP_SHUTDOWN, 7000, 77);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        rig.guest_send(h, &[]);
        assert!(rig.dev.backend.draining.is_empty() && rig.dev.backend.conns.is_empty());
        assert_eq!(read_to_eof(host).join().unwrap(), b"bye");
    }

    #[test]
    fn draining_is_bounded_by_its_deadline() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.set_timeouts(CONNECT_TIMEOUT, SHORT);
        let _host = rig.guest_connect(7000, 77);
        guest_send_all(&mut rig, 7000, 77, &pattern(2, CONN_BUF_SIZE as usize));
        let mut h = guest_hdr(OP_SHUTDOWN, 7000, 77);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        rig.guest_send(h, &[]);
        assert_eq!(rig.dev.backend.draining.len(), 1);
        // The host never reads.
        rig.host_events_until(|r| r.dev.backend.draining.is_empty());
        assert!(rig.dev.backend.timer_deadline.is_none());
    }

    #[test]
    fn guest_send_shutdown_shuts_the_host_write_side_after_the_data() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let host = rig.guest_connect(7000, 77);
        let data = pattern(3, CONN_BUF_SIZE as usize);
        guest_send_all(&mut rig, 7000, 77, &data);
        let mut h = guest_hdr(OP_SHUTDOWN, 7000, 77);
        h.flags = SHUTDOWN_SEND;
        rig.guest_send(h, &[]);
        let key = (77, 7000);
        assert!(
            !rig.dev.backend.conns[&key].host_write_shut(),
            "data still buffered"
        );
        let mut writer = host.try_clone().unwrap();
        let reader = read_to_eof(host);
        rig.host_events_until(|r| r.dev.backend.conns[&key].host_write_shut());
        assert!(reader.join().unwrap() == data, "byte-exact, then EOF");
        // The other direction still works: the guest only stopped sending.
        writer.write_all(b"reply").unwrap();
        rig.post_rx();
        rig.host_events();
        let r = rig.guest_recv();
        let rw: Vec<_> = r.iter().filter(|p| p.0.op == OP_RW).collect();
        assert_eq!(rw.len(), 1, "{r:?}");
        assert_eq!(rw[0].1, b"reply");
        // More data after SHUTDOWN_SEND breaks the contract: RST.
        rig.guest_send(guest_hdr(OP_RW, 7000, 77), b"x");
        assert_eq!(rig.guest_recv().last().unwrap().0.op, OP_RST);
        assert!(rig.dev.backend.conns.is_empty());
    }

    #[test]
    fn a_guest_that_never_receives_cannot_grow_the_control_queue() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        // No RX buffers; every REQUEST to an unknown port wants a RST back.
        for i in 0..MAX_PENDING_CTRL as u32 + 5 {
            rig.guest_send(guest_hdr(OP_REQUEST, 5000 + i, 4321), &[]);
        }
        assert_eq!(rig.dev.backend.rx_ctrl.len(), MAX_PENDING_CTRL);
        assert!(!rig.irq.needs_reset());
        // Posting RX buffers lets replies out and the held-back TX in.
        rig.post_rx();
        let r = rig.guest_recv();
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|p| p.0.op == OP_RST));
        assert_eq!(rig.dev.backend.rx_ctrl.len(), MAX_PENDING_CTRL - 8 + 5);
        assert_eq!(used_idx(&mem, TX_USED), MAX_PENDING_CTRL as u16 + 5);
        assert!(!rig.irq.needs_reset());
    }

    const STREAMS: u32 = 50;
    const STREAM_BYTES: usize = 1 << 20;
    const CHUNK: usize = 4096;

    #[test]
    fn fifty_host_streams_of_a_mebibyte_reach_the_guest_byte_exact() {
        // What the guest advertises per stream, and how often it says it consumed.
        const GUEST_BUF: u32 = 256 * 1024;
        const GUEST_UPDATE: u32 = 64 * 1024;
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.post_rx();
        let mut writers = Vec::new();
        let mut hosts = Vec::new();
        let mut streams: HashMap<u32, (usize, Vec<u8>, u32, bool)> = HashMap::new();
        for i in 0..STREAMS {
            let (host, req) = rig.host_connect(1024);
            let mut resp = guest_hdr(OP_RESPONSE, 1024, req.src_port);
            resp.buf_alloc = GUEST_BUF;
            rig.guest_send(resp, &[]);
            streams.insert(req.src_port, (i as usize, Vec::new(), 0, false));
            hosts.push(host);
        }
        // All connected first (so the handshakes see only their own packets),
        // then every host client writes at once.
        for (i, mut host) in hosts.into_iter().enumerate() {
            writers.push(std::thread::spawn(move || {
                // A client reads its "OK <port>" first; closing with it unread
                // would be an abort (ECONNRESET), which the guest sees as RST.
                let mut ok = [0u8; 1];
                while ok[0] != b'\n' {
                    host.read_exact(&mut ok).unwrap();
                }
                host.write_all(&pattern(i as u32, STREAM_BYTES)).unwrap();
                // Dropped: the guest sees SHUTDOWN after the last byte.
            }));
        }
        let end = Instant::now() + Duration::from_secs(120);
        while streams.values().any(|s| !s.3) {
            assert!(Instant::now() < end, "timed out");
            rig.host_events();
            rig.post_rx();
            for (h, data) in rig.guest_recv() {
                let Some(s) = streams.get_mut(&h.src_port) else {
                    panic!("packet for an unknown stream: {h:?}");
                };
                match h.op {
                    OP_RW => {
                        assert!(!s.3, "data after SHUTDOWN");
                        s.1.extend_from_slice(&data);
                        let consumed = s.1.len() as u32;
                        if consumed - s.2 >= GUEST_UPDATE {
                            s.2 = consumed;
                            let mut u = guest_hdr(OP_CREDIT_UPDATE, 1024, h.src_port);
                            u.buf_alloc = GUEST_BUF;
                            u.fwd_cnt = consumed;
                            rig.guest_send(u, &[]);
                        }
                    }
                    OP_SHUTDOWN => {
                        s.3 = true;
                        rig.guest_send(guest_hdr(OP_RST, 1024, h.src_port), &[]);
                    }
                    OP_CREDIT_UPDATE => {}
                    op => panic!("unexpected op {op} on {h:?}"),
                }
            }
            if streams.values().all(|s| !s.3) {
                std::thread::yield_now();
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        for (i, data, _, _) in streams.into_values() {
            assert_eq!(data.len(), STREAM_BYTES, "stream {i}");
            assert!(
                data == pattern(i as u32, STREAM_BYTES),
                "stream {i} corrupted"
            );
        }
        assert!(rig.dev.backend.conns.is_empty());
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn fifty_guest_streams_of_a_mebibyte_reach_the_host_byte_exact() {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        let mut p = rig.path.clone().into_os_string();
        p.push("_77");
        let l = UnixListener::bind(&p).unwrap();
        rig.post_rx();
        let mut readers = Vec::new();
        for i in 0..STREAMS {
            rig.guest_send(guest_hdr(OP_REQUEST, 20_000 + i, 77), &[]);
            readers.push(read_to_eof(l.accept().unwrap().0));
        }
        let data: Vec<Vec<u8>> = (0..STREAMS)
            .map(|i| pattern(100 + i, STREAM_BYTES))
            .collect();
        // Per stream: bytes sent, and the device's credit (buf_alloc, fwd_cnt).
        let mut sent = vec![0usize; STREAMS as usize];
        let mut credit = vec![(0u32, 0u32); STREAMS as usize];
        let end = Instant::now() + Duration::from_secs(120);
        while sent.iter().any(|n| *n < STREAM_BYTES) {
            assert!(Instant::now() < end, "timed out");
            rig.post_rx();
            rig.host_events();
            for (h, _) in rig.guest_recv() {
                let i = (h.dst_port - 20_000) as usize;
                assert!(h.op != OP_RST, "stream {i} reset: {h:?}");
                credit[i] = (h.buf_alloc, h.fwd_cnt);
            }
            // Round robin, within the credit the device granted (as Linux does).
            for i in 0..STREAMS as usize {
                let (buf_alloc, fwd_cnt) = credit[i];
                let in_flight = (sent[i] as u32).wrapping_sub(fwd_cnt);
                let n = CHUNK.min(STREAM_BYTES - sent[i]);
                if n == 0 || in_flight as usize + n > buf_alloc as usize {
                    continue;
                }
                let port = 20_000 + i as u32;
                rig.guest_send(guest_hdr(OP_RW, port, 77), &data[i][sent[i]..sent[i] + n]);
                sent[i] += n;
            }
        }
        for i in 0..STREAMS {
            let mut h = guest_hdr(OP_SHUTDOWN, 20_000 + i, 77);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            rig.guest_send(h, &[]);
        }
        rig.host_events_until(|r| r.dev.backend.draining.is_empty());
        for (i, r) in readers.into_iter().enumerate() {
            let got = r.join().unwrap();
            assert_eq!(got.len(), STREAM_BYTES, "stream {i}");
            assert!(got == data[i], "stream {i} corrupted");
        }
        assert!(rig.dev.backend.conns.is_empty());
        assert!(!rig.irq.needs_reset());
    }

    /// A backend that records what the guest sent and hands out canned packets.
    struct Fake {
        evt: EventFd,
        sent: Vec<TxPacket>,
        to_guest: std::collections::VecDeque<(Header, Vec<u8>)>,
        resets: u32,
    }

    impl AsRawFd for Fake {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.evt.as_raw_fd()
        }
    }

    impl VsockBackend for Fake {
        fn notify(&mut self) {}
        fn send_pkt(&mut self, pkt: TxPacket) {
            self.sent.push(pkt);
        }
        fn recv_pkt(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
            let (h, mut d) = self.to_guest.pop_front()?;
            d.truncate(room);
            Some((h, d))
        }
        fn has_pending_rx(&self) -> bool {
            !self.to_guest.is_empty()
        }
        fn tx_blocked(&self) -> bool {
            false
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    #[test]
    fn the_device_moves_packets_between_the_queues_and_any_backend() {
        let mem = memory();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unused");
        let fake = Fake {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            sent: Vec::new(),
            to_guest: [(guest_hdr(OP_RW, 1, 2), b"to the guest".to_vec())].into(),
            resets: 0,
        };
        let mut rig = Rig::with_device(&mem, Vsock::with_backend(CID, fake), dir, path);
        rig.guest_send(guest_hdr(OP_RW, 5, 6), b"from the guest");
        let sent = &rig.dev.backend().sent;
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].hdr.src_port, sent[0].data.as_slice()),
            (5, &b"from the guest"[..])
        );
        rig.post_rx();
        let r = rig.guest_recv();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, b"to the guest");
        assert_eq!(r[0].0.len, 12);
        rig.dev.reset();
        assert_eq!(rig.dev.backend().resets, 1);
    }
}
