//! The virtio-net device: an RX and a TX queue over a [`NetBackend`] (a tap
//! in a VM). It runs on a thread of its own (`vmm.rs` gives each NIC an event
//! loop): queue kicks, the tap and the rate limiter's timer wake it, never a
//! vCPU. Only activation and reset run on the vCPU thread that writes the
//! status register; they set the tap's offloads (TUNSETOFFLOAD), which the
//! vCPU filter allows, so the net thread itself needs no ioctl.
//!
//! The tap is polled only while the guest has given RX buffers: when none
//! are left the tap leaves the epoll set (frames wait in the tap, and the
//! kernel drops past its queue length, as on a wire) until the guest's next
//! RX kick. A broken or inactive device never polls it.

use std::time::Instant;

use event_manager::{EventOps, Events};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::defs::*;
use super::rate_limiter::TokenBucket;
use super::tap::{NetBackend, Tap};
use crate::config::NetConfig;
use crate::devices::virtio::chain::{self, ChainError};
use crate::devices::virtio::defs::F_VERSION_1;
use crate::devices::virtio::state::{ActiveQueues, DeviceState};
use crate::devices::virtio::{ActivateError, Activation, VirtioDevice, EXTRA_EVENT_BASE};

/// Event data of the tap and of the rate limiter's timer.
const EV_TAP: u32 = EXTRA_EVENT_BASE;
const EV_TIMER: u32 = EXTRA_EVENT_BASE + 1;

/// Why processing stopped with the device broken.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("RX chain {head}: {why}")]
    RxChain { head: u16, why: &'static str },
}

/// What the device counted (frames and bytes include the vnet header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the tap that did not fit the guest's buffer.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX chains refused (too short, too long, writable) or that the tap refused.
    pub tx_dropped: u64,
    /// TX frames dropped because they did not come from this NIC's MAC
    /// ([`spoofed`]); also counted in `tx_dropped`.
    pub tx_spoofed: u64,
}

/// Why a frame the guest sends is not its NIC's own, if it is not: its
/// Ethernet source, or an ARP packet's sender hardware address (behind one
/// VLAN tag or none), is not the NIC's MAC. The guest and every container
/// in it are hostile, and Docker's default capabilities include NET_RAW:
/// without this a container could send frames as any other machine on the
/// pod's network, or poison its neighbours' ARP caches with another's
/// address. `frame` starts at the Ethernet header (at least 14 bytes).
pub fn spoofed(frame: &[u8], mac: &[u8; 6]) -> Option<&'static str> {
    if frame.get(6..12) != Some(&mac[..]) {
        return Some("its Ethernet source is not the NIC's MAC");
    }
    let be16 = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (ethertype, payload) = match be16(12) {
        Some(0x8100 | 0x88a8) => (be16(16), 18),
        t => (t, 14),
    };
    const ETH_P_ARP: u16 = 0x0806;
    // The sender hardware address, where hlen says it is 6 bytes long.
    if ethertype == Some(ETH_P_ARP)
        && frame.get(payload + 4) == Some(&6)
        && frame
            .get(payload + 8..payload + 14)
            .is_some_and(|sha| sha != mac)
    {
        return Some("its ARP sender is not the NIC's MAC");
    }
    None
}

/// How one direction's pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Nothing more to do now (empty ring or tap, or waiting on something).
    Done,
    /// Stopped after a batch with work left.
    More,
}

/// virtio-net over a host-side backend.
pub struct Net<B: NetBackend = Tap> {
    backend: B,
    state: DeviceState,
    sizes: [u16; 2],
    features: u64,
    config: [u8; 12],
    rx_limit: Option<TokenBucket>,
    tx_limit: Option<TokenBucket>,
    /// Armed while a limiter holds a direction back (only with a limiter).
    timer: Option<TimerFd>,
    timer_armed: bool,
    rx_throttled: bool,
    tx_throttled: bool,
    /// The guest gave no RX buffer at the last try; cleared by its RX kick.
    rx_no_buffers: bool,
    /// Whether the tap is in the epoll set for input now.
    tap_polled: bool,
    /// The tap reported an error or hang-up (its interface was deleted): it
    /// is out of the epoll set for good.
    tap_gone: bool,
    frame: Vec<u8>,
    stats: NetStats,
}

impl Net<Tap> {
    /// The NIC `cfg` over its tap.
    pub fn new(cfg: &NetConfig, tap: Tap) -> std::io::Result<Self> {
        Self::with_backend(cfg, tap)
    }
}

impl<B: NetBackend> Net<B> {
    pub fn with_backend(cfg: &NetConfig, backend: B) -> std::io::Result<Self> {
        let mut features = F_VERSION_1
            | F_MAC
            | F_STATUS
            | F_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN;
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&cfg.mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        // max_virtqueue_pairs: one (only read with MQ, which is not offered).
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        if let Some(mtu) = cfg.mtu {
            features |= F_MTU;
            config[10..12].copy_from_slice(&mtu.to_le_bytes());
        }
        let rx_limit = cfg.rx_bps.map(TokenBucket::new);
        let tx_limit = cfg.tx_bps.map(TokenBucket::new);
        // Made here, before seccomp: the net thread only re-arms it.
        let timer = if rx_limit.is_some() || tx_limit.is_some() {
            Some(TimerFd::new().map_err(std::io::Error::from)?)
        } else {
            None
        };
        Ok(Net {
            backend,
            state: DeviceState::new(),
            sizes: [QUEUE_SIZE; 2],
            features,
            config,
            rx_limit,
            tx_limit,
            timer,
            timer_armed: false,
            rx_throttled: false,
            tx_throttled: false,
            rx_no_buffers: false,
            tap_polled: false,
            tap_gone: false,
            // One byte over the largest frame: a read that fills it was cut
            // short by the buffer and is dropped, never delivered truncated.
            frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            stats: NetStats::default(),
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the tap should be polled: the device runs, the guest has
    /// buffers, no limiter holds RX back.
    pub fn wants_tap(&self) -> bool {
        self.state.is_active()
            && !self.state.is_broken()
            && !self.rx_no_buffers
            && !self.rx_throttled
            && !self.tap_gone
    }

    /// Whether the tap is in the epoll set for input (tests and fuzzing).
    pub fn tap_polled(&self) -> bool {
        self.tap_polled
    }

    /// Fills guest RX buffers with frames from the tap.
    fn rx(&mut self, a: &mut ActiveQueues) -> Result<Pass, Fault> {
        for _ in 0..BATCH {
            if let Some(l) = &mut self.rx_limit {
                if l.wait(Instant::now()).is_some() {
                    self.rx_throttled = true;
                    return Ok(Pass::Done);
                }
            }
            let Some(c) = chain::pop(&mut a.queues[RXQ], &a.mem)? else {
                self.rx_no_buffers = true;
                return Ok(Pass::Done);
            };
            let c = chain::validate(c, &a.mem, MAX_RX_CHAIN)?;
            if !c.readable().is_empty() {
                return Err(Fault::RxChain {
                    head: c.head(),
                    why: "device-readable buffer in an RX chain",
                });
            }
            if c.writable_len() < VNET_HDR_LEN as u64 {
                return Err(Fault::RxChain {
                    head: c.head(),
                    why: "shorter than the virtio-net header",
                });
            }
            let n = match self.backend.read_frame(&mut self.frame) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    // Nothing waits: the buffer stays the guest's for the next frame.
                    a.queues[RXQ].go_to_previous_position();
                    return Ok(Pass::Done);
                }
                Err(e) => {
                    // Not "nothing waits": the tap is broken (detached from
                    // its interface). Polled on, it would stay readable and
                    // fail again at once, so the NIC goes down.
                    a.queues[RXQ].go_to_previous_position();
                    self.tap_gone = true;
                    tracing::warn!(error = %e, "virtio-net: reading the tap failed; the NIC is down");
                    return Ok(Pass::Done);
                }
            };
            if n < VNET_HDR_LEN || n >= self.frame.len() || n as u64 > c.writable_len() {
                // Too big for what the guest gave (or no header): dropped, as a
                // NIC drops what its ring cannot hold; the buffer is reused.
                a.queues[RXQ].go_to_previous_position();
                self.stats.rx_dropped += 1;
                crate::warn_limited!(
                    frame = n,
                    buffer = c.writable_len(),
                    "virtio-net: a frame does not fit the guest's RX buffer; dropped"
                );
                continue;
            }
            // Without MRG_RXBUF every frame takes one buffer (virtio 5.1.6.3.1).
            self.frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&1u16.to_le_bytes());
            let mut w = c.writer(&a.mem);
            w.write(&self.frame[..n])?;
            chain::add_used(&mut a.queues[RXQ], &a.mem, c.head(), n as u32)?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += n as u64;
            if let Some(l) = &mut self.rx_limit {
                l.consume(n as u64);
            }
        }
        Ok(Pass::More)
    }

    /// Sends the guest's TX frames to the tap.
    fn tx(&mut self, a: &mut ActiveQueues) -> Result<Pass, Fault> {
        for _ in 0..BATCH {
            if let Some(l) = &mut self.tx_limit {
                if l.wait(Instant::now()).is_some() {
                    self.tx_throttled = true;
                    return Ok(Pass::Done);
                }
            }
            let Some(c) = chain::pop(&mut a.queues[TXQ], &a.mem)? else {
                return Ok(Pass::Done);
            };
            let head = c.head_index();
            let c = match chain::validate(c, &a.mem, (VNET_HDR_LEN + MAX_FRAME_LEN) as u64) {
                Ok(c) => c,
                Err(ChainError::TooLong { total, .. }) => {
                    self.drop_tx(a, head, "longer than 64 KiB and headers", total)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let len = c.readable_len();
            if !c.writable().is_empty() {
                self.drop_tx(a, head, "device-writable buffer in a TX chain", len)?;
                continue;
            }
            if len < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
                self.drop_tx(
                    a,
                    head,
                    "shorter than the header and an Ethernet header",
                    len,
                )?;
                continue;
            }
            let len = len as usize;
            c.reader(&a.mem).read_exact(&mut self.frame[..len])?;
            chain::add_used(&mut a.queues[TXQ], &a.mem, head, 0)?;
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&self.config[..6]);
            if let Some(why) = spoofed(&self.frame[VNET_HDR_LEN..len], &mac) {
                self.stats.tx_dropped += 1;
                self.stats.tx_spoofed += 1;
                crate::warn_limited!(len, "virtio-net: a TX frame dropped: {why}");
                // Spent from the guest's budget all the same.
                if let Some(l) = &mut self.tx_limit {
                    l.consume(len as u64);
                }
                continue;
            }
            match self.backend.write_frame(&self.frame[..len]) {
                Ok(()) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += len as u64;
                }
                Err(e) => {
                    // The tap refused it (its link down, a header the kernel
                    // rejects): lost, as on a wire.
                    self.stats.tx_dropped += 1;
                    crate::warn_limited!(error = %e, "virtio-net: the tap refused a TX frame");
                }
            }
            if let Some(l) = &mut self.tx_limit {
                l.consume(len as u64);
            }
        }
        Ok(Pass::More)
    }

    fn drop_tx(
        &mut self,
        a: &mut ActiveQueues,
        head: u16,
        why: &'static str,
        len: u64,
    ) -> Result<(), Fault> {
        self.stats.tx_dropped += 1;
        crate::warn_limited!(head, len, "virtio-net: TX chain dropped: {why}");
        chain::add_used(&mut a.queues[TXQ], &a.mem, head, 0)?;
        Ok(())
    }

    /// Runs the directions asked for until each is done, the guest getting
    /// an interrupt after each round that used buffers.
    pub fn pump(&mut self, mut rx: bool, mut tx: bool) {
        let r = DeviceState::process(
            self,
            |d| &mut d.state,
            |s, a| {
                let mut any = false;
                while rx || tx {
                    let (u0, u1) = (used_idx(a, TXQ), used_idx(a, RXQ));
                    if tx {
                        tx = s.tx(a)? == Pass::More;
                    }
                    if rx {
                        rx = s.rx(a)? == Pass::More;
                    }
                    let used = used_idx(a, TXQ) != u0 || used_idx(a, RXQ) != u1;
                    if used && (rx || tx) {
                        // More rounds follow: let the guest start on these.
                        a.interrupt.signal_used_queue();
                    } else {
                        any |= used;
                    }
                }
                Ok::<_, Fault>(any)
            },
        );
        if let Err(e) = r {
            crate::warn_limited!(error = %e, "virtio-net: malformed ring; device needs reset");
        }
    }

    /// Puts the tap in or out of the epoll set and arms the limiter's timer,
    /// to match the state the last pass left.
    fn sync_events(&mut self, ops: &mut EventOps) {
        if self.tap_gone && self.tap_polled {
            let fd = self.backend.as_raw_fd();
            let _ = ops.remove(Events::with_data_raw(fd, EV_TAP, EventSet::empty()));
            self.tap_polled = false;
        }
        let want = self.wants_tap();
        if want != self.tap_polled && !self.tap_gone {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            let fd = self.backend.as_raw_fd();
            match ops.modify(Events::with_data_raw(fd, EV_TAP, set)) {
                Ok(()) => self.tap_polled = want,
                Err(e) => {
                    tracing::error!(error = ?e, "virtio-net: changing the tap's epoll interest failed")
                }
            }
        }
        if (self.rx_throttled || self.tx_throttled) && !self.timer_armed {
            let now = Instant::now();
            let wait = [
                self.rx_throttled
                    .then(|| self.rx_limit.as_mut().and_then(|l| l.wait(now)))
                    .flatten(),
                self.tx_throttled
                    .then(|| self.tx_limit.as_mut().and_then(|l| l.wait(now)))
                    .flatten(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(std::time::Duration::from_micros(100));
            if let Some(t) = &mut self.timer {
                match t.reset(wait, None) {
                    Ok(()) => self.timer_armed = true,
                    Err(e) => {
                        tracing::error!(error = %e, "virtio-net: arming the rate limiter's timer failed")
                    }
                }
            }
        }
    }

    /// The tap became readable (or reported an error).
    pub fn on_tap(&mut self, events: EventSet, ops: &mut EventOps) {
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // The interface was deleted under us: level-triggered, this would
            // fire forever. The NIC carries nothing from now on.
            let fd = self.backend.as_raw_fd();
            if !self.tap_gone {
                let _ = ops.remove(Events::with_data_raw(fd, EV_TAP, EventSet::empty()));
                tracing::warn!("virtio-net: the tap reported an error or hang-up; the NIC is down");
            }
            self.tap_gone = true;
            self.tap_polled = false;
            return;
        }
        self.pump(true, false);
        self.sync_events(ops);
    }

    /// The rate limiter's timer fired.
    pub fn on_timer(&mut self, ops: &mut EventOps) {
        if let Some(t) = &mut self.timer {
            let _ = t.wait();
        }
        self.timer_armed = false;
        let (rx, tx) = (self.rx_throttled, self.tx_throttled);
        self.rx_throttled = false;
        self.tx_throttled = false;
        self.pump(rx, tx);
        self.sync_events(ops);
    }

    /// A queue kick, on the net thread.
    pub fn on_queue(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            RXQ => {
                // New buffers: try the tap at once (what waits there raised
                // no new event while it was out of the set).
                self.rx_no_buffers = false;
                if !self.rx_throttled && !self.tap_gone {
                    self.pump(true, false);
                }
            }
            TXQ if !self.tx_throttled => self.pump(false, true),
            _ => {}
        }
        self.sync_events(ops);
    }
}

fn used_idx(a: &ActiveQueues, q: usize) -> u16 {
    a.queues[q].next_used()
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state.queue_states()
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let offloads = tap_offloads(a.features & self.features);
        // On the vCPU thread that wrote DRIVER_OK (its filter allows ioctl).
        // Failing to set what the guest acked would hand it frames it cannot
        // take, so the device does not start.
        self.backend.set_offload(offloads).map_err(|e| {
            ActivateError::Device(format!("virtio-net: TUNSETOFFLOAD {offloads:#x}: {e}"))
        })?;
        self.state.activate(a, &[RXQ, TXQ])?;
        // No pump here: the driver kicks RX once it has posted buffers, and
        // that kick reaches the net thread.
        self.rx_no_buffers = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        // The next driver says again what it takes; until then, nothing.
        if let Err(e) = self.backend.set_offload(0) {
            crate::warn_limited!(error = %e, "virtio-net: clearing the tap's offloads failed");
        }
        // The tap stays in the epoll set until its next event finds the device
        // inactive (epoll_ctl is the net thread's business).
    }

    fn process_queue(&mut self, index: usize) {
        // Without the event loop's ops (tests): the work, no epoll changes.
        match index {
            RXQ => {
                self.rx_no_buffers = false;
                self.pump(true, false);
            }
            TXQ => self.pump(false, true),
            _ => {}
        }
    }

    fn process_queue_event(&mut self, index: usize, ops: &mut EventOps) {
        self.on_queue(index, ops);
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        // The tap starts out of the set: nothing to fill before the guest
        // gives buffers (its first RX kick).
        let fd = self.backend.as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, EV_TAP, EventSet::empty())) {
            tracing::error!(error = ?e, "virtio-net: registering the tap failed");
        }
        if let Some(t) = &self.timer {
            use std::os::fd::AsRawFd;
            if let Err(e) = ops.add(Events::with_data_raw(t.as_raw_fd(), EV_TIMER, EventSet::IN)) {
                tracing::error!(error = ?e, "virtio-net: registering the rate limiter's timer failed");
            }
        }
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_TAP => self.on_tap(events.event_set(), ops),
            EV_TIMER => self.on_timer(ops),
            _ => {}
        }
    }
}
