//! virtio devices on the virtio-mmio transport, with rings handled by virtio-queue.
//!
//! - [`mmio`]: the transport: register file, feature negotiation, queue setup,
//!   device status and interrupt status (virtio 1.2, section 4.2).
//! - [`chain`]: the one place where descriptor chains from the guest are
//!   validated; devices only see checked [`chain::Desc`] lists.
//! - [`state`]: the life cycle every device shares (inactive, active, broken).
//! - [`rng`], [`vsock`], [`fs`], [`net`]: the devices.
//!
//! A device that finds a malformed ring calls [`Interrupt::set_needs_reset`]: the
//! transport then reports `DEVICE_NEEDS_RESET` in the status register and the
//! device stops touching its queues until the driver resets it.

pub mod chain;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod state;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// Constants from the virtio 1.2 specification.
pub mod defs {
    /// Device IDs (5 Device Types).
    pub const TYPE_RNG: u32 = 4;
    pub const TYPE_VSOCK: u32 = 19;

    /// Device status bits (2.1).
    pub const STATUS_ACKNOWLEDGE: u32 = 1;
    pub const STATUS_DRIVER: u32 = 2;
    pub const STATUS_DRIVER_OK: u32 = 4;
    pub const STATUS_FEATURES_OK: u32 = 8;
    pub const STATUS_NEEDS_RESET: u32 = 64;
    pub const STATUS_FAILED: u32 = 128;

    /// Feature bits (6 Reserved Feature Bits).
    pub const F_VERSION_1: u64 = 1 << 32;
    /// Buffers are used in the order they were made available... not offered; listed
    /// so tests can check that unoffered features are refused.
    pub const F_IN_ORDER: u64 = 1 << 35;

    /// Interrupt status bits (4.2.2).
    pub const INT_VRING: u32 = 1;
    pub const INT_CONFIG: u32 = 2;
}

/// The interrupt line of one device and its interrupt-status register.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// An irqfd in a VM; any eventfd in tests.
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            crate::warn_limited!(error = %e, "raising a virtio interrupt failed");
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(defs::INT_VRING);
    }

    /// Tells the driver that the configuration (or the device status) changed.
    pub fn signal_config(&self) {
        self.raise(defs::INT_CONFIG);
    }

    /// Puts the device into the `DEVICE_NEEDS_RESET` state (virtio 2.1.2).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Raises again the interrupts a snapshot had pending, so the guest
    /// sees them on its next look (an edge on the line included: a level it
    /// was about to take must not be lost across the restore).
    pub fn restore_status(&self, bits: u32) {
        // Only the two bits the transport defines, whatever the file says.
        let bits = bits & (defs::INT_VRING | defs::INT_CONFIG);
        if bits != 0 {
            self.raise(bits);
        }
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd (to register as an irqfd).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// One per queue the device declared, as the driver configured them.
    pub queues: Vec<Queue>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or lies outside guest memory")]
    BadQueue(usize),
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind the [`mmio::MmioTransport`].
pub trait VirtioDevice: Send {
    /// virtio device ID (`defs::TYPE_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features offered to the driver (must include `F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns to the pre-activation state (status register written with 0).
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// The same, from the event loop, for a device that changes its epoll
    /// interest in response (virtio-net resumes polling its tap).
    fn process_queue_event(&mut self, index: usize, _ops: &mut EventOps) {
        self.process_queue(index);
    }
    /// Registers event sources beyond the queue notifications (data >= [`EXTRA_EVENT_BASE`]).
    fn init_events(&mut self, _ops: &mut EventOps) {}
    /// One of the extra event sources fired.
    fn process_event(&mut self, _events: Events, _ops: &mut EventOps) {}
    /// The device's own view of its queues while active (how far it has
    /// walked each ring), for a snapshot. The transport's copies hold only
    /// what the driver configured.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
    /// The device was activated from a snapshot's state in a new husk-vmm:
    /// whatever it had on the host side is gone (vsock tells the guest so).
    fn restored(&mut self) {}
}

/// Event data values below this are queue indices.
pub const EXTRA_EVENT_BASE: u32 = 0x100;

/// Copies `bytes` of config-space `data` from `config` at `offset`, zero outside.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_reset_signals_config_once() {
        let i = Interrupt::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        i.set_needs_reset();
        i.set_needs_reset();
        assert!(i.needs_reset());
        assert_eq!(i.status(), defs::INT_CONFIG);
        assert_eq!(i.eventfd().read().unwrap(), 1);
        i.signal_used_queue();
        i.ack(defs::INT_CONFIG);
        assert_eq!(i.status(), defs::INT_VRING);
        i.clear();
        assert!(!i.needs_reset());
    }

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
