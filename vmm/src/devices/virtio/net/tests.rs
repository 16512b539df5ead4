//! The device over a fake tap, with hand-built (and hostile) chains.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::*;
use super::{Net, NetBackend, NetStats};
use crate::config::NetConfig;
use crate::devices::virtio::chain::test_utils::{desc, memory};
use crate::devices::virtio::defs::F_VERSION_1;
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

/// A tap in memory: frames waiting for the guest, frames the guest sent,
/// every offload setting.
struct FakeTap {
    evt: EventFd,
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    offloads: Vec<u32>,
    refuse_writes: bool,
    fail_reads: bool,
}

impl FakeTap {
    fn new() -> Self {
        FakeTap {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            rx: VecDeque::new(),
            tx: Vec::new(),
            offloads: Vec::new(),
            refuse_writes: false,
            fail_reads: false,
        }
    }
}

impl NetBackend for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.fail_reads {
            return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
        }
        Ok(self.rx.pop_front().map(|f| {
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            n
        }))
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if self.refuse_writes {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.tx.push(frame.to_vec());
        Ok(())
    }
    fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.offloads.push(flags);
        Ok(())
    }
}

const RX_USED: u64 = 0x3000;
const TX_USED: u64 = 0x3800;
const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x40000;
/// Room for a frame over the limit.
const BIG: u64 = 0x80000;

fn nic() -> NetConfig {
    NetConfig {
        fd: 3,
        mac: [0x02, 0, 0, 0, 0, 0x01],
        mtu: None,
        rx_bps: None,
        tx_bps: None,
    }
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: Net<FakeTap>,
    irq: Arc<Interrupt>,
    rx_seen: u16,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with(mem, nic(), all_features())
    }

    fn with(mem: &'a GuestMemoryMmap, cfg: NetConfig, acked: u64) -> Self {
        let mut dev = Net::with_backend(&cfg, FakeTap::new()).unwrap();
        let rx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut rxq: Queue = rx.create_queue().unwrap();
        rxq.set_used_ring_address(Some(RX_USED as u32), Some(0));
        let mut txq: Queue = tx.create_queue().unwrap();
        txq.set_used_ring_address(Some(TX_USED as u32), Some(0));
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![rxq, txq],
            interrupt: irq.clone(),
            features: acked & dev.features(),
        })
        .unwrap();
        Rig {
            mem,
            rx,
            tx,
            dev,
            irq,
            rx_seen: 0,
        }
    }

    /// Publishes one chain (descriptors at table slots from `first`) on `q`.
    fn publish(&self, rx: bool, first: u16, descs: &[virtio_queue::desc::RawDescriptor]) {
        let vq = if rx { &self.rx } else { &self.tx };
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(first + i as u16, *d).unwrap();
        }
        let idx = vq.avail().idx().load();
        vq.avail()
            .ring()
            .ref_at(idx as usize % 16)
            .unwrap()
            .store(first);
        vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Posts `n` RX buffers of `len` bytes each (one descriptor each).
    fn post_rx(&mut self, n: u16, len: u32) {
        for _ in 0..n {
            let idx = self.rx.avail().idx().load();
            let slot = idx % 16;
            let addr = RX_BUFS + u64::from(slot) * 0x1_0000 / 8;
            self.publish(true, slot, &[desc(addr, len, true, None)]);
        }
    }

    /// Sends `frame` (header included) as a two-descriptor TX chain.
    fn guest_send(&mut self, frame: &[u8]) {
        let idx = self.tx.avail().idx().load();
        let slot = (idx % 8) * 2;
        let base = TX_BUFS + u64::from(slot) * 0x1000;
        self.mem.write_slice(frame, GuestAddress(base)).unwrap();
        let split = frame.len().min(VNET_HDR_LEN) as u32;
        if frame.len() as u32 > split {
            self.publish(
                false,
                slot,
                &[
                    desc(base, split, false, Some(slot + 1)),
                    desc(
                        base + u64::from(split),
                        frame.len() as u32 - split,
                        false,
                        None,
                    ),
                ],
            );
        } else {
            self.publish(false, slot, &[desc(base, split, false, None)]);
        }
        self.dev.process_queue(TXQ);
    }

    fn used(&self, rx: bool) -> Vec<(u32, u32)> {
        let at = if rx { RX_USED } else { TX_USED };
        let n: u16 = self.mem.read_obj(GuestAddress(at + 2)).unwrap();
        (0..n)
            .map(|i| {
                let e = at + 4 + 8 * u64::from(i % 16);
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Frames the device put in RX buffers since the last call.
    fn guest_recv(&mut self) -> Vec<Vec<u8>> {
        let used = self.used(true);
        let mut out = Vec::new();
        while usize::from(self.rx_seen) < used.len() {
            let (head, len) = used[usize::from(self.rx_seen)];
            let addr = RX_BUFS + u64::from(head) * 0x1_0000 / 8;
            let mut f = vec![0u8; len as usize];
            self.mem.read_slice(&mut f, GuestAddress(addr)).unwrap();
            out.push(f);
            self.rx_seen += 1;
        }
        out
    }
}

fn all_features() -> u64 {
    F_VERSION_1
        | F_MAC
        | F_STATUS
        | F_MTU
        | F_CSUM
        | F_GUEST_CSUM
        | F_GUEST_TSO4
        | F_GUEST_TSO6
        | F_GUEST_ECN
        | F_HOST_TSO4
        | F_HOST_TSO6
        | F_HOST_ECN
}

/// A frame with a vnet header of `hdr_byte`s (num_buffers garbage) and
/// `len` bytes of a pattern after it.
/// From the NIC's own MAC (bytes 6-11 of the Ethernet header) where it is
/// long enough to have one.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xee; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    if len >= 12 {
        f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&nic().mac);
    }
    f
}

#[test]
fn config_space_and_features() {
    let mem = memory();
    let rig = Rig::new(&mem);
    let mut c = [0u8; 12];
    rig.dev.read_config(0, &mut c);
    assert_eq!(&c[..6], &[0x02, 0, 0, 0, 0, 0x01]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), S_LINK_UP);
    assert_eq!(
        rig.dev.features() & F_MTU,
        0,
        "no MTU offered unless configured"
    );
    assert_eq!(rig.dev.features() & (F_MRG_RXBUF | F_GUEST_UFO), 0);
    assert_ne!(rig.dev.features() & F_VERSION_1, 0);
    let dev = Net::with_backend(
        &NetConfig {
            mtu: Some(9000),
            ..nic()
        },
        FakeTap::new(),
    )
    .unwrap();
    dev.read_config(0, &mut c);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    assert_ne!(dev.features() & F_MTU, 0);
    assert_eq!(dev.device_type(), TYPE_NET);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn offloads_are_what_the_guest_acked_and_reset_clears_them() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    assert_eq!(
        rig.dev.backend().offloads,
        vec![TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN]
    );
    rig.dev.reset();
    assert_eq!(rig.dev.backend().offloads.last(), Some(&0));
    let rig = Rig::with(&mem, nic(), F_VERSION_1 | F_MAC | F_GUEST_CSUM);
    assert_eq!(rig.dev.backend().offloads, vec![TUN_F_CSUM]);
    let rig = Rig::with(&mem, nic(), F_VERSION_1 | F_GUEST_TSO4);
    assert_eq!(rig.dev.backend().offloads, vec![0]);
}

#[test]
fn tx_frames_reach_the_tap_byte_exact() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let f1 = frame(60, 1);
    let f2 = frame(9000, 2);
    rig.guest_send(&f1);
    rig.guest_send(&f2);
    assert_eq!(rig.dev.backend().tx, vec![f1.clone(), f2.clone()]);
    assert_eq!(rig.used(false), vec![(0, 0), (2, 0)]);
    assert!(!rig.irq.needs_reset());
    assert_ne!(rig.irq.status() & 1, 0, "used-buffer interrupt");
    let s = rig.dev.stats();
    assert_eq!((s.tx_frames, s.tx_bytes), (2, (f1.len() + f2.len()) as u64));
}

#[test]
fn rx_frames_reach_the_guest_with_one_buffer_each() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let f = frame(1500, 7);
    rig.dev.backend_mut().rx.extend([f.clone(), frame(100, 8)]);
    rig.post_rx(4, 0x2000);
    rig.dev.process_queue(RXQ);
    let got = rig.guest_recv();
    assert_eq!(got.len(), 2);
    // num_buffers is 1 whatever the tap left there.
    assert_eq!(&got[0][NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &[1, 0]);
    assert_eq!(&got[0][..NUM_BUFFERS_OFFSET], &f[..NUM_BUFFERS_OFFSET]);
    assert_eq!(&got[0][VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert!(rig.dev.backend().rx.is_empty());
    // The tap is empty but the guest still has buffers: keep polling it.
    assert!(rig.dev.wants_tap());
}

#[test]
fn without_buffers_frames_stay_in_the_tap_and_polling_stops() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev
        .backend_mut()
        .rx
        .extend([frame(64, 1), frame(64, 2), frame(64, 3)]);
    rig.post_rx(1, 0x1000);
    rig.dev.process_queue(RXQ);
    assert_eq!(rig.guest_recv().len(), 1);
    // No buffer left: the other two wait in the tap, unread, and the tap
    // is no longer wanted in the epoll set.
    assert_eq!(rig.dev.backend().rx.len(), 2);
    assert!(!rig.dev.wants_tap());
    // A tap event meanwhile (as epoll could still deliver) reads nothing.
    rig.dev.pump(true, false);
    assert_eq!(rig.dev.backend().rx.len(), 2);
    // The guest adds buffers and kicks: both arrive.
    rig.post_rx(2, 0x1000);
    rig.dev.process_queue(RXQ);
    assert_eq!(rig.guest_recv().len(), 2);
    assert!(rig.dev.backend().rx.is_empty());
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_reused() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev
        .backend_mut()
        .rx
        .extend([frame(3000, 1), frame(100, 2)]);
    rig.post_rx(1, 1526);
    rig.dev.process_queue(RXQ);
    let got = rig.guest_recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), VNET_HDR_LEN + 100);
    assert_eq!(rig.dev.stats().rx_dropped, 1);
    assert!(!rig.irq.needs_reset());
}

#[test]
fn a_tap_frame_over_the_largest_is_dropped_not_cut() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev
        .backend_mut()
        .rx
        .extend([frame(MAX_FRAME_LEN + 100, 1), frame(MAX_FRAME_LEN, 2)]);
    rig.publish(true, 0, &[desc(BIG, 0x20000, true, None)]);
    rig.publish(true, 1, &[desc(RX_BUFS, 0x100, true, None)]);
    rig.dev.process_queue(RXQ);
    // The first is dropped whole; the largest allowed fits the big buffer.
    let used = rig.used(true);
    assert_eq!(used, vec![(0, (VNET_HDR_LEN + MAX_FRAME_LEN) as u32)]);
    assert_eq!(rig.dev.stats().rx_dropped, 1);
}

#[test]
fn bad_tx_chains_are_dropped_and_the_link_goes_on() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    // Only a header, then a header and 13 bytes (less than an Ethernet header).
    rig.guest_send(&frame(0, 0));
    rig.guest_send(&frame(13, 0));
    // A TX chain with a device-writable buffer.
    rig.publish(
        false,
        4,
        &[
            desc(TX_BUFS, 12, false, Some(5)),
            desc(TX_BUFS + 0x100, 100, true, None),
        ],
    );
    rig.dev.process_queue(TXQ);
    // Over 64 KiB and headers: two descriptors of 40000 bytes.
    rig.publish(
        false,
        6,
        &[
            desc(BIG, 40000, false, Some(7)),
            desc(BIG + 40000, 40000, false, None),
        ],
    );
    rig.dev.process_queue(TXQ);
    assert!(rig.dev.backend().tx.is_empty());
    assert_eq!(rig.dev.stats().tx_dropped, 4);
    assert_eq!(rig.used(false).len(), 4, "every dropped chain is returned");
    assert!(rig.used(false).iter().all(|&(_, len)| len == 0));
    assert!(!rig.irq.needs_reset());
    // The largest frame allowed still goes.
    let max = frame(MAX_FRAME_LEN, 3);
    mem.write_slice(&max, GuestAddress(BIG)).unwrap();
    rig.publish(false, 8, &[desc(BIG, max.len() as u32, false, None)]);
    rig.dev.process_queue(TXQ);
    assert_eq!(rig.dev.backend().tx, vec![max]);
}

#[test]
fn a_tap_that_refuses_a_frame_costs_that_frame_only() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.backend_mut().refuse_writes = true;
    rig.guest_send(&frame(60, 1));
    rig.dev.backend_mut().refuse_writes = false;
    rig.guest_send(&frame(60, 2));
    assert_eq!(rig.dev.backend().tx, vec![frame(60, 2)]);
    assert_eq!(
        rig.dev.stats(),
        NetStats {
            tx_frames: 1,
            tx_bytes: 72,
            tx_dropped: 1,
            tx_spoofed: 0,
            ..Default::default()
        }
    );
}

/// Ring faults: each breaks the device (NEEDS_RESET), which then touches
/// nothing (and stops polling the tap) until the driver resets it.
#[test]
fn malformed_chains_need_reset() {
    type Case = (&'static str, bool, Vec<virtio_queue::desc::RawDescriptor>);
    let cases: Vec<Case> = vec![
        (
            "tx loop",
            false,
            vec![
                desc(TX_BUFS, 12, false, Some(1)),
                desc(TX_BUFS + 0x100, 60, false, Some(0)),
            ],
        ),
        (
            "tx outside memory",
            false,
            vec![desc(0xff_fff0, 100, false, None)],
        ),
        (
            "tx length overflowing",
            false,
            vec![desc(TX_BUFS, u32::MAX, false, None)],
        ),
        ("tx zero length", false, vec![desc(TX_BUFS, 0, false, None)]),
        (
            "tx readable after writable",
            false,
            vec![
                desc(TX_BUFS, 12, true, Some(1)),
                desc(TX_BUFS + 0x100, 60, false, None),
            ],
        ),
        (
            "tx next out of the table",
            false,
            vec![desc(TX_BUFS, 12, false, Some(300))],
        ),
        (
            "rx readable buffer",
            true,
            vec![desc(RX_BUFS, 2000, false, None)],
        ),
        (
            "rx shorter than the header",
            true,
            vec![desc(RX_BUFS, 11, true, None)],
        ),
        (
            "rx loop",
            true,
            vec![
                desc(RX_BUFS, 12, true, Some(1)),
                desc(RX_BUFS + 0x100, 2000, true, Some(0)),
            ],
        ),
        (
            "rx outside memory",
            true,
            vec![desc(u64::MAX - 8, 2000, true, None)],
        ),
    ];
    for (what, rx, descs) in cases {
        let mem = memory();
        let mut rig = Rig::new(&mem);
        rig.dev.backend_mut().rx.push_back(frame(64, 1));
        rig.publish(rx, 0, &descs);
        rig.dev.process_queue(if rx { RXQ } else { TXQ });
        assert!(rig.irq.needs_reset(), "{what}");
        assert!(
            !rig.dev.wants_tap(),
            "{what}: a broken device polls its tap"
        );
        assert!(rig.dev.backend().tx.is_empty(), "{what}");
        assert_eq!(rig.dev.backend().rx.len(), 1, "{what}: the frame was taken");
        // Broken: a good chain afterwards is left alone.
        rig.guest_send(&frame(60, 1));
        assert!(rig.dev.backend().tx.is_empty(), "{what}");
        rig.dev.reset();
        assert!(!rig.dev.wants_tap(), "{what}");
    }
}

#[test]
fn an_avail_index_jump_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.tx.avail().idx().store(40);
    rig.dev.process_queue(TXQ);
    assert!(rig.irq.needs_reset());
}

#[test]
fn the_tx_limit_holds_chains_back_until_the_bucket_refills() {
    let mem = memory();
    let mut rig = Rig::with(
        &mem,
        NetConfig {
            tx_bps: Some(1000),
            ..nic()
        },
        all_features(),
    );
    // The bucket starts with one largest frame's worth.
    rig.guest_send(&frame(MAX_FRAME_LEN / 2, 1));
    rig.guest_send(&frame(MAX_FRAME_LEN / 2, 2));
    rig.guest_send(&frame(60, 3));
    rig.guest_send(&frame(60, 4));
    let sent = rig.dev.backend().tx.len();
    assert!(
        (2..=3).contains(&sent),
        "{sent} frames passed a 1000 B/s limit"
    );
    assert_eq!(
        rig.used(false).len(),
        sent,
        "held-back chains stay in the ring"
    );
}

#[test]
fn the_rx_limit_stops_polling_the_tap() {
    let mem = memory();
    let mut rig = Rig::with(
        &mem,
        NetConfig {
            rx_bps: Some(1000),
            ..nic()
        },
        all_features(),
    );
    for i in 0..4 {
        rig.dev.backend_mut().rx.push_back(frame(40000, i));
    }
    rig.post_rx(4, 0xa000);
    rig.dev.process_queue(RXQ);
    let got = rig.guest_recv().len();
    assert!((1..=2).contains(&got), "{got}");
    assert!(!rig.dev.wants_tap(), "throttled RX still polls the tap");
    assert_eq!(rig.dev.backend().rx.len(), 4 - got);
}

#[test]
fn a_tap_that_fails_to_read_takes_the_nic_down_not_the_loop() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.backend_mut().fail_reads = true;
    rig.post_rx(2, 0x800);
    rig.dev.process_queue(RXQ);
    assert!(!rig.dev.wants_tap());
    assert!(rig.used(true).is_empty(), "the buffer stays the guest's");
    assert!(!rig.irq.needs_reset());
    // TX still runs (the tap may still take frames).
    rig.guest_send(&frame(60, 1));
    assert_eq!(rig.dev.backend().tx.len(), 1);
}

#[test]
fn an_inactive_device_does_nothing() {
    let mut dev = Net::with_backend(&nic(), FakeTap::new()).unwrap();
    dev.backend_mut().rx.push_back(frame(64, 1));
    dev.process_queue(RXQ);
    dev.process_queue(TXQ);
    dev.pump(true, true);
    assert!(!dev.wants_tap());
    assert_eq!(dev.backend().rx.len(), 1);
}

/// On a real tap and a real epoll loop: frames wait in the tap while the
/// guest has no RX buffers, and the loop does not wake for them (no spin);
/// each RX kick with new buffers delivers what fits. Skipped where this
/// process may not make a tap.
#[test]
fn a_real_tap_is_not_polled_while_the_guest_has_no_buffers() {
    use std::sync::Mutex;

    use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
    use vmm_sys_util::epoll::EventSet;

    use super::Tap;

    let need = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let Some(fd) = super::tap::tests::make_tap(need) else {
        eprintln!("skipped: no CAP_NET_ADMIN or /dev/net/tun here");
        return;
    };
    let tap = Tap::new(fd).unwrap();
    let name = tap.name().to_string();
    // The interface up, and a packet socket that sends frames out of it
    // (which the tap's reader receives).
    // SAFETY: socket(2) with constant arguments; checked.
    let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0, "{}", std::io::Error::last_os_error());
    // No IPv6 on it: the kernel's own solicitations would mix with ours.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write one
    // 40-byte `struct ifreq`, which `req` is.
    let index = unsafe {
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS as _, req.as_mut_ptr()), 0);
        req[16] |= libc::IFF_UP as u8;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS as _, req.as_mut_ptr()), 0);
        assert_eq!(libc::ioctl(s, libc::SIOCGIFINDEX as _, req.as_mut_ptr()), 0);
        i32::from_ne_bytes([req[16], req[17], req[18], req[19]])
    };
    let send = |seed: u8| {
        let mut f = [0u8; 60];
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
        f[14..].fill(seed);
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index;
        to.sll_halen = 6;
        // SAFETY: sendto(2) from `f` to `to`, both valid for the call.
        let n = unsafe {
            libc::sendto(
                s,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, 60, "{}", std::io::Error::last_os_error());
    };

    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut rxq: Queue = rx.create_queue().unwrap();
    rxq.set_used_ring_address(Some(RX_USED as u32), Some(0));
    let mut txq: Queue = tx.create_queue().unwrap();
    txq.set_used_ring_address(Some(TX_USED as u32), Some(0));
    let mut dev = Net::new(&nic(), tap).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![rxq, txq],
        interrupt: irq,
        features: all_features(),
    })
    .unwrap();

    /// The device and an eventfd that stands for the guest's RX kick.
    struct Sub {
        dev: Net,
        kick: EventFd,
    }
    impl MutEventSubscriber for Sub {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
            self.dev.init_events(ops);
        }
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            if events.fd() == self.kick.as_raw_fd() {
                let _ = self.kick.read();
                self.dev.process_queue_event(RXQ, ops);
            } else {
                self.dev.process_event(events, ops);
            }
        }
    }
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let sub = Arc::new(Mutex::new(Sub {
        dev,
        kick: kick.try_clone().unwrap(),
    }));
    let mut em: EventManager<Arc<Mutex<Sub>>> = EventManager::new().unwrap();
    em.add_subscriber(sub.clone());
    let settle = |em: &mut EventManager<Arc<Mutex<Sub>>>| {
        // Dispatches over ~300 ms; a tap polled while it cannot be read
        // would wake the loop at once, every time.
        (0..10)
            .map(|_| em.run_with_timeout(30).unwrap())
            .sum::<usize>()
    };
    let used = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(RX_USED + 2)).unwrap();

    for seed in 1..=3 {
        send(seed);
    }
    // The driver kicks with nothing posted: the tap stays out of the set.
    kick.write(1).unwrap();
    assert_eq!(settle(&mut em), 1, "only the kick was dispatched");
    assert!(!sub.lock().unwrap().dev.tap_polled());
    assert_eq!(used(&mem), 0);

    // Two buffers: two frames arrive, the third waits in the tap, unpolled.
    for i in 0..2u16 {
        rx.desc_table()
            .store(i, desc(RX_BUFS + u64::from(i) * 0x800, 0x800, true, None))
            .unwrap();
        rx.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
    }
    rx.avail().idx().store(2);
    kick.write(1).unwrap();
    let n = settle(&mut em);
    assert_eq!(used(&mem), 2);
    assert!(n <= 3, "{n} dispatches for one kick and two frames");
    assert!(!sub.lock().unwrap().dev.tap_polled());
    let mut f = [0u8; 72];
    mem.read_slice(&mut f, GuestAddress(RX_BUFS)).unwrap();
    // A plain frame: no offload flags, no GSO; num_buffers 1; then the frame.
    assert_eq!(&f[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(
        &f[VNET_HDR_LEN..VNET_HDR_LEN + 6],
        &[0x02, 0, 0, 0, 0, 0x01]
    );
    assert_eq!(f[VNET_HDR_LEN + 20], 1);

    // One more buffer: the frame that waited arrives.
    rx.desc_table()
        .store(2, desc(RX_BUFS + 0x1000, 0x800, true, None))
        .unwrap();
    rx.avail().ring().ref_at(2).unwrap().store(2);
    rx.avail().idx().store(3);
    kick.write(1).unwrap();
    settle(&mut em);
    assert_eq!(used(&mem), 3);
    mem.read_slice(&mut f, GuestAddress(RX_BUFS + 0x1000))
        .unwrap();
    assert_eq!(f[VNET_HDR_LEN + 20], 3);
    // The interface deleted under the VM: the tap reports an error once and
    // leaves the set, rather than waking the loop without end.
    let deleted = std::process::Command::new("ip")
        .args(["link", "del", &name])
        .status()
        .is_ok_and(|s| s.success());
    if deleted {
        let n = settle(&mut em);
        assert!(n <= 1, "{n} dispatches after the interface went away");
        assert_eq!(settle(&mut em), 0);
        assert!(!sub.lock().unwrap().dev.wants_tap());
    }
    // SAFETY: closing the packet socket made above.
    unsafe { libc::close(s) };
}

#[test]
fn frames_not_from_the_nics_mac_are_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let mac = nic().mac;
    let other = [0x02, 0, 0, 0, 0, 0x99];
    let eth = |src: [u8; 6], ethertype: &[u8], payload: &[u8]| {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend([0xff; 6]);
        f.extend(src);
        f.extend(ethertype);
        f.extend(payload);
        f.resize(f.len().max(VNET_HDR_LEN + 60), 0);
        f
    };
    // An ARP request: Ethernet, IPv4, hlen 6, plen 4, op 1, then the sender.
    let arp = |sender: [u8; 6]| {
        let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
        p.extend(sender);
        p.extend([10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
        p
    };
    let own_ip = eth(mac, &[0x08, 0x00], &[0x45; 40]);
    let own_arp = eth(mac, &[0x08, 0x06], &arp(mac));
    let own_vlan_arp = eth(mac, &[0x81, 0x00, 0x00, 0x05, 0x08, 0x06], &arp(mac));
    let forged_source = eth(other, &[0x08, 0x00], &[0x45; 40]);
    let forged_arp = eth(mac, &[0x08, 0x06], &arp(other));
    let forged_vlan_arp = eth(mac, &[0x81, 0x00, 0x00, 0x05, 0x08, 0x06], &arp(other));
    for f in [
        &own_ip,
        &forged_source,
        &own_arp,
        &forged_arp,
        &own_vlan_arp,
        &forged_vlan_arp,
    ] {
        rig.guest_send(f);
    }
    assert_eq!(
        rig.dev.backend().tx,
        vec![own_ip, own_arp, own_vlan_arp],
        "only the NIC's own frames reach the tap"
    );
    let st = rig.dev.stats();
    assert_eq!((st.tx_spoofed, st.tx_dropped, st.tx_frames), (3, 3, 3));
    // Every chain went back to the guest: it is not stalled by a drop.
    assert_eq!(rig.used(false).len(), 6);
    // And the device goes on.
    rig.guest_send(&frame(60, 9));
    assert_eq!(rig.dev.stats().tx_frames, 4);
}

#[test]
fn the_spoof_check_reads_only_what_the_frame_has() {
    let mac = nic().mac;
    let mut f = vec![0xffu8; 6];
    f.extend(mac);
    f.extend([0x08, 0x06]);
    // An ARP header cut short: nothing to check beyond the Ethernet source.
    assert_eq!(super::device::spoofed(&f, &mac), None);
    f.extend([0, 1, 8, 0, 6, 4, 0, 1, 0x02]);
    assert_eq!(super::device::spoofed(&f, &mac), None);
    // A VLAN tag with nothing behind it.
    let mut v = vec![0xffu8; 6];
    v.extend(mac);
    v.extend([0x81, 0x00]);
    assert_eq!(super::device::spoofed(&v, &mac), None);
    v[6] ^= 1;
    assert!(super::device::spoofed(&v, &mac).is_some());
}
