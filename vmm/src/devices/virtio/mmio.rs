//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! Register accesses below 0x100 must be aligned 32-bit accesses; anything else
//! reads as zero and is dropped on write. Configuration space (0x100 and up) is
//! the device's and takes any width.
//!
//! In a VM, QueueNotify writes never get here: KVM signals the queue's eventfd
//! directly (ioeventfd). The register handler signals the same eventfd, so the
//! device behaves the same when nothing intercepts the write (tests, or a host
//! KVM without ioeventfd).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::*;
use super::{Activation, Interrupt, VirtioDevice};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

/// Register offsets (4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "HUSK" is not registered anywhere; drivers ignore it.
pub const HUSK_VENDOR_ID: u32 = 0x4b53_5548;

/// One queue in a snapshot: virtio-queue's `QueueState`, which has no
/// serde form of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A device's transport in a snapshot: the registers the driver wrote and
/// each queue as the device had walked it. Device-internal state is not
/// kept: a snapshot is taken with nothing in flight (the guest paused, each
/// device's lock held), and what a device had on the host (vsock
/// connections, the share's open files) does not survive into a new process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot has a device of type {snapshot} where this VM has type {this}")]
    DeviceType { snapshot: u32, this: u32 },
    #[error("device type {device}: the snapshot has {snapshot} queues, the device {this}")]
    QueueCount {
        device: u32,
        snapshot: usize,
        this: usize,
    },
    #[error("device type {device}: queue {index}: {problem}")]
    Queue {
        device: u32,
        index: usize,
        problem: String,
    },
    #[error("device type {device}: the snapshot's features {features:#x} are not all offered")]
    Features { device: u32, features: u64 },
    #[error("device type {device}: activation from the snapshot failed")]
    Activation { device: u32 },
}

/// A transport behind a lock, whatever its device: what a snapshot needs of
/// every device on the bus.
pub trait SnapshotTransport: Send {
    fn save_state(&self) -> TransportSnapshot;
    fn restore_state(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError>;
}

impl<D: VirtioDevice> SnapshotTransport for MmioTransport<D> {
    fn save_state(&self) -> TransportSnapshot {
        MmioTransport::save_state(self)
    }

    fn restore_state(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError> {
        MmioTransport::restore_state(self, s)
    }
}

/// One virtio device as seen through its MMIO window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; `irq` is the eventfd that raises its interrupt line.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let mut queue_evts = Vec::with_capacity(sizes.len());
        let mut queues = Vec::with_capacity(sizes.len());
        for max in sizes {
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
            // Queue::new fails only for a max size that is zero, over 32768 or not a
            // power of two: a bug in the device, reported as an I/O error here.
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e}")))?,
            );
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_evts,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The per-queue notification eventfds (for KVM_IOEVENTFD and the event loop).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The transport and its device's queues, for a snapshot (the vCPUs
    /// paused, the device not processing: the caller holds its lock).
    pub fn save_state(&self) -> TransportSnapshot {
        // An active device has walked its rings past what the transport's
        // copies say; its own view is the truth.
        let live = self.device.queue_states();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                live.as_ref()
                    .and_then(|l| l.get(i).copied())
                    .unwrap_or_else(|| q.state())
                    .into()
            })
            .collect();
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues,
        }
    }

    /// Puts a fresh transport in the state `s` saved, activating the
    /// device when the driver had, as if it had just written DRIVER_OK.
    /// Everything the snapshot says is checked against this device first:
    /// a state file is checksummed, not trusted to fit.
    pub fn restore_state(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError> {
        let device = self.device.device_type();
        if s.device_type != device {
            return Err(RestoreError::DeviceType {
                snapshot: s.device_type,
                this: device,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                device,
                snapshot: s.queues.len(),
                this: self.queues.len(),
            });
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(RestoreError::Features {
                device,
                features: s.driver_features,
            });
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, (q, ours)) in s.queues.iter().zip(&self.queues).enumerate() {
            let bad = |problem: String| RestoreError::Queue {
                device,
                index,
                problem,
            };
            if q.max_size != ours.max_size() {
                return Err(bad(format!(
                    "maximum size {} where the device has {}",
                    q.max_size,
                    ours.max_size()
                )));
            }
            let queue = Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(bad("outside guest memory".into()));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.driver_features = s.driver_features;
        self.status = s.status & !STATUS_NEEDS_RESET;
        self.activated = false;
        self.interrupt.clear();
        if s.needs_reset {
            // The driver resets it when it sees the bit, as it would have.
            self.interrupt.set_needs_reset();
            return Ok(());
        }
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0 {
            self.activate();
            if !self.activated {
                return Err(RestoreError::Activation { device });
            }
            self.device.restored();
        }
        // Interrupts the guest had not acknowledged yet stay pending.
        self.interrupt.restore_status(s.interrupt_status);
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only before DRIVER_OK, and only while the
    /// selected queue is not live (4.2.3.2).
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
            && self
                .queues
                .get(self.queue_select as usize)
                .is_some_and(|q| !q.ready())
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.clear();
    }

    fn features_ok(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::warn_limited!(queue = i, "driver set up a queue outside guest memory");
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            // The device gets its own copy; ours stays for register reads.
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(_) => {
                    self.interrupt.set_needs_reset();
                    crate::warn_limited!(queue = i, "queue state not usable");
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::warn_limited!(error = %e, "virtio device activation failed");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added by the driver (a reset clears them).
        if value & self.status != self.status {
            crate::debug_limited!(
                old = self.status,
                new = value,
                "driver cleared status bits without reset"
            );
            return;
        }
        let mut new = value & !STATUS_NEEDS_RESET;
        let added = new & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_ok() {
            // The driver re-reads the status and sees FEATURES_OK missing (3.1.1).
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            new &= !STATUS_DRIVER_OK;
        }
        let start = new & STATUS_DRIVER_OK != 0 && !self.activated && new & STATUS_FAILED == 0;
        self.status = new;
        if start {
            self.activate();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        use regs::*;
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => HUSK_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),

            STATUS => self.status(),
            // No shared memory regions: length and base read as all ones (4.2.2).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            // The configuration never changes under the driver.
            CONFIG_GENERATION => 0,
            _ => {
                crate::debug_limited!(
                    offset,
                    "read of a write-only or unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        use regs::*;
        let cfg = self.queue_config_allowed();
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_select = v,
            DRIVER_FEATURES_SEL => self.driver_features_select = v,
            DRIVER_FEATURES => {
                // Features are negotiable only between DRIVER and FEATURES_OK.
                if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_select = v,
            QUEUE_NUM if cfg => {
                if let Some(q) = self.selected_queue() {
                    // Sizes that are not a power of two up to the maximum are refused
                    // by virtio-queue and leave the size unchanged.
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            QUEUE_READY
                if self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0 =>
            {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_DESC_LOW if cfg => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH if cfg => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            QUEUE_DRIVER_LOW if cfg => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            QUEUE_DRIVER_HIGH if cfg => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            QUEUE_DEVICE_LOW if cfg => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            QUEUE_DEVICE_HIGH if cfg => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.write_status(v),
            SHM_SEL => {}
            _ => crate::debug_limited!(offset, value = v, "ignored virtio-mmio register write"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            crate::debug_limited!(offset, size = data.len(), "bad virtio-mmio register read");
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            // Config writes are only meaningful once the driver knows the device.
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - regs::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::debug_limited!(offset, size = data.len(), "bad virtio-mmio register write");
            return;
        };
        if offset & 3 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::regs::*;
    use super::*;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;

    /// A device that records what the transport does to it.
    struct Dummy {
        sizes: Vec<u16>,
        features: u64,
        activated: Option<(usize, u64)>,
        resets: u32,
        notified: Vec<usize>,
        config: [u8; 8],
        fail_activate: bool,
        live: Option<Vec<QueueState>>,
        restored: u32,
    }

    impl Dummy {
        fn new() -> Self {
            Dummy {
                sizes: vec![16, 32],
                features: F_VERSION_1 | 1,
                activated: None,
                resets: 0,
                notified: Vec::new(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                fail_activate: false,
                live: None,
                restored: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("no".into()));
            }
            self.activated = Some((a.queues.len(), a.features));
            self.live = Some(a.queues.iter().map(|q| q.state()).collect());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn process_queue(&mut self, index: usize) {
            self.notified.push(index);
        }
        fn queue_states(&self) -> Option<Vec<QueueState>> {
            self.live.clone()
        }
        fn restored(&mut self) {
            self.restored += 1;
        }
    }

    fn transport() -> MmioTransport<Dummy> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        MmioTransport::new(Dummy::new(), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
    }

    fn r(t: &mut MmioTransport<Dummy>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport<Dummy>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport the way Linux's virtio_mmio does, up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport<Dummy>) {
        w(t, STATUS, STATUS_ACKNOWLEDGE);
        w(t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, 1); // VERSION_1
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, 1);
        w(
            t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport<Dummy>, sel: u32, size: u32, base: u32) {
        w(t, QUEUE_SEL, sel);
        w(t, QUEUE_NUM, size);
        w(t, QUEUE_DESC_LOW, base);
        w(t, QUEUE_DESC_HIGH, 0);
        w(t, QUEUE_DRIVER_LOW, base + 0x1000);
        w(t, QUEUE_DRIVER_HIGH, 0);
        w(t, QUEUE_DEVICE_LOW, base + 0x2000);
        w(t, QUEUE_DEVICE_HIGH, 0);
        w(t, QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(r(&mut t, MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VERSION), 2);
        assert_eq!(r(&mut t, DEVICE_ID), 42);
        assert_eq!(r(&mut t, VENDOR_ID), HUSK_VENDOR_ID);
        assert_eq!(r(&mut t, CONFIG_GENERATION), 0);
        assert_eq!(r(&mut t, SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, SHM_LEN_HIGH), u32::MAX);
        assert_eq!(r(&mut t, SHM_BASE_LOW), u32::MAX);
        assert_eq!(r(&mut t, SHM_BASE_HIGH), u32::MAX);
        w(&mut t, SHM_SEL, 3);
    }

    #[test]
    fn device_features_by_page() {
        let mut t = transport();
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1);
        w(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1);
        w(&mut t, DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_negotiation_activates_with_queues() {
        let mut t = transport();
        negotiate(&mut t);
        assert_eq!(r(&mut t, STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        w(&mut t, QUEUE_SEL, 0);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 16);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 32, 0x2_0000);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
        w(&mut t, STATUS, ALL_OK);
        assert_eq!(r(&mut t, STATUS), ALL_OK);
        assert_eq!(t.device().activated, Some((2, F_VERSION_1 | 1)));
        // Queue registers are frozen once live.
        w(&mut t, QUEUE_SEL, 0);
        w(&mut t, QUEUE_READY, 0);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
    }

    #[test]
    fn a_live_transport_moves_to_a_fresh_one_through_its_snapshot() {
        let mut t = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 32, 0x2_0000);
        w(&mut t, STATUS, ALL_OK);
        // The device has walked queue 1 further than the transport knows.
        if let Some(live) = t.device_mut().live.as_mut() {
            live[1].next_avail = 7;
            live[1].next_used = 5;
        }
        t.interrupt().signal_used_queue();
        let saved = t.save_state();
        assert_eq!(
            (saved.queues[1].next_avail, saved.queues[1].next_used),
            (7, 5)
        );
        let json = serde_json::to_string(&saved).unwrap();
        let saved: TransportSnapshot = serde_json::from_str(&json).unwrap();

        let mut fresh = transport();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(r(&mut fresh, STATUS), ALL_OK);
        assert_eq!(fresh.device().activated, Some((2, F_VERSION_1 | 1)));
        assert_eq!(fresh.device().restored, 1);
        let live = fresh.device().live.clone().unwrap();
        assert_eq!(
            (live[1].next_avail, live[1].next_used, live[1].size),
            (7, 5, 32)
        );
        assert_eq!(live[0].desc_table, 0x1_0000);
        // The pending interrupt is pending again, on the line too.
        assert_eq!(r(&mut fresh, INTERRUPT_STATUS), INT_VRING);
        assert_eq!(fresh.interrupt().eventfd().read().unwrap(), 1);
        assert_eq!(fresh.save_state(), saved);

        // A state that does not fit this device is refused whole.
        let mut other = saved.clone();
        other.device_type = 19;
        assert!(matches!(
            transport().restore_state(&other),
            Err(RestoreError::DeviceType { .. })
        ));
        let mut other = saved.clone();
        other.queues.pop();
        assert!(matches!(
            transport().restore_state(&other),
            Err(RestoreError::QueueCount { .. })
        ));
        let mut other = saved.clone();
        other.queues[0].desc_table = 0xffff_0000;
        let mut t = transport();
        assert!(matches!(
            t.restore_state(&other),
            Err(RestoreError::Queue { index: 0, .. })
        ));
        assert_eq!(t.device().activated, None);
        let mut other = saved.clone();
        other.driver_features |= 1 << 40;
        assert!(matches!(
            transport().restore_state(&other),
            Err(RestoreError::Features { .. })
        ));
        // A driver that had not finished set-up is not activated.
        let mut t = transport();
        negotiate(&mut t);
        let mut fresh = transport();
        fresh.restore_state(&t.save_state()).unwrap();
        assert_eq!(fresh.device().activated, None);
        assert_eq!(
            r(&mut fresh, STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
    }

    #[test]
    fn unoffered_or_missing_version_features_are_refused() {
        let mut t = transport();
        w(&mut t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, DRIVER_FEATURES, 1);
        // No VERSION_1: legacy drivers are not supported.
        w(
            &mut t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, STATUS) & STATUS_FEATURES_OK, 0);

        let mut t = transport();
        w(&mut t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(
            &mut t,
            DRIVER_FEATURES,
            ((F_VERSION_1 | F_IN_ORDER) >> 32) as u32,
        );
        w(
            &mut t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, STATUS) & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not start the device.
        w(
            &mut t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(t.device().activated.is_none());
    }

    #[test]
    fn features_are_frozen_after_features_ok() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, DRIVER_FEATURES_SEL, 0);
        w(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, STATUS, ALL_OK);
        assert_eq!(t.device().activated.unwrap().1, F_VERSION_1 | 1);
        // And before DRIVER is set.
        let mut t = transport();
        w(&mut t, DRIVER_FEATURES, 1);
        assert_eq!(t.driver_features, 0);
    }

    #[test]
    fn queue_setup_needs_features_ok_and_valid_values() {
        let mut t = transport();
        // Before FEATURES_OK: ignored.
        w(&mut t, QUEUE_SEL, 0);
        w(&mut t, QUEUE_READY, 1);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
        negotiate(&mut t);
        // Bad sizes: not a power of two, over the maximum, zero.
        for bad in [3, 64, 0, 0x1_0000] {
            w(&mut t, QUEUE_NUM, bad);
            assert_eq!(t.queues[0].size(), 16, "size {bad}");
        }
        w(&mut t, QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), 8);
        // Misaligned descriptor table is refused by virtio-queue.
        w(&mut t, QUEUE_DESC_LOW, 0x1_0001);
        assert_eq!(t.queues[0].desc_table(), 0);
        // Out-of-range selector: reads zero, writes go nowhere.
        w(&mut t, QUEUE_SEL, 99);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 0);
        w(&mut t, QUEUE_NUM, 8);
        w(&mut t, QUEUE_READY, 1);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
    }

    #[test]
    fn queue_outside_memory_sets_needs_reset() {
        let mut t = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x20_0000); // past the 1 MiB of memory
        w(&mut t, STATUS, ALL_OK);
        assert!(t.device().activated.is_none());
        assert_ne!(r(&mut t, STATUS) & STATUS_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, INTERRUPT_STATUS) & INT_CONFIG, 0);
        // Reset recovers.
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let mut t = transport();
        t.device_mut().fail_activate = true;
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, STATUS, ALL_OK);
        assert_ne!(r(&mut t, STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        // The driver cannot set NEEDS_RESET itself.
        w(
            &mut t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_NEEDS_RESET,
        );
        assert_eq!(r(&mut t, STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_resets_device_and_queues() {
        let mut t = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        w(&mut t, STATUS, ALL_OK);
        w(&mut t, STATUS, 0);
        assert_eq!(t.device().resets, 1);
        assert!(t.device().activated.is_none());
        assert!(!t.queues[0].ready());
        assert_eq!(t.queues[0].size(), 16);
        // And it can be brought up again.
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, STATUS, ALL_OK);
        assert!(t.device().activated.is_some());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut t = transport();
        t.interrupt().signal_used_queue();
        t.interrupt().signal_config();
        assert_eq!(r(&mut t, INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        w(&mut t, INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), INT_CONFIG);
        w(&mut t, INTERRUPT_ACK, 0xffff_ffff);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let mut t = transport();
        w(&mut t, QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err()); // nothing pending
        w(&mut t, QUEUE_NOTIFY, 5); // no such queue: ignored
    }

    #[test]
    fn bad_sizes_and_offsets() {
        let mut t = transport();
        // Narrow and wide reads of registers read zero.
        let mut b1 = [0xaau8; 1];
        t.read(MAGIC_VALUE, &mut b1);
        assert_eq!(b1, [0]);
        let mut b8 = [0xaau8; 8];
        t.read(MAGIC_VALUE, &mut b8);
        assert_eq!(b8, [0; 8]);
        // Misaligned.
        let mut b4 = [0xaau8; 4];
        t.read(MAGIC_VALUE + 2, &mut b4);
        assert_eq!(b4, [0; 4]);
        // Write-only and unknown registers read zero.
        for off in [QUEUE_NOTIFY, INTERRUPT_ACK, 0x018, 0x0c0, 0x0f8] {
            assert_eq!(r(&mut t, off), 0, "offset {off:#x}");
        }
        // Narrow / misaligned status writes are dropped.
        t.write(STATUS, &[1]);
        t.write(STATUS + 1, &[1, 0, 0, 0]);
        t.write(STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r(&mut t, STATUS), 0);
        // Writes to read-only and unknown registers change nothing.
        w(&mut t, MAGIC_VALUE, 0);
        w(&mut t, 0x0c0, 5);
        assert_eq!(r(&mut t, MAGIC_VALUE), MMIO_MAGIC);
    }

    #[test]
    fn config_space_any_width_and_bounded() {
        let mut t = transport();
        let mut d = [0u8; 2];
        t.read(CONFIG + 1, &mut d);
        assert_eq!(d, [2, 3]);
        let mut d = [0xffu8; 4];
        t.read(CONFIG + 6, &mut d);
        assert_eq!(d, [7, 8, 0, 0]);
        t.read(CONFIG + 0xe00, &mut d);
        assert_eq!(d, [0; 4]);
        // Writes before DRIVER are ignored; after, they reach the device.
        t.write(CONFIG, &[9]);
        assert_eq!(t.device().config[0], 1);
        w(&mut t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        t.write(CONFIG, &[9]);
        assert_eq!(t.device().config[0], 9);
    }
}
