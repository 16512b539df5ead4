//! Emulated devices and the buses that route guest MMIO and port I/O to them.

pub mod legacy;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Errors of device setup (guest-driven errors never surface here: devices
/// handle those themselves).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device or is empty")]
    BusOverlap { base: u64, len: u64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no IRQ line left for device {0}")]
    NoIrq(String),
    #[error("virtio-fs: {0}")]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error("virtio-net: {0}")]
    Tap(#[from] crate::devices::virtio::net::TapError),
}

/// A device on a bus. Accesses carry the offset into the device's window; the
/// width is the length of `data` (1, 2, 4 or 8 bytes from a vCPU exit).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between vCPU threads and the event loop.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Locks a mutex, ignoring poisoning: a poisoned lock means another thread
/// panicked, and the VMM is going down anyway; panicking again here would only
/// lose the original reason.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An address space (MMIO or port I/O) of non-overlapping device windows.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), DeviceError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(DeviceError::BusOverlap { base, len });
        };
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_prev {
            return Err(DeviceError::BusOverlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device whose window holds the whole access `[addr, addr + size)`,
    /// and the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((offset, dev))
    }

    /// Routes a read; false when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; false when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x1100, 0x100, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(bus
            .insert(0x10ff, 2, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        assert!(bus
            .insert(0xfff, 2, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        assert!(bus
            .insert(0x5000, 0, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Recorder::default())))
            .is_err());

        let mut d = [0u8; 4];
        assert!(bus.read(0x1010, &mut d));
        assert_eq!(d, [0x10; 4]);
        assert!(bus.write(0x10fc, &[1, 2, 3, 4]));
        assert_eq!(lock(&a).last, Some((0xfc, vec![1, 2, 3, 4])));
        // An access that straddles the end of a window is nobody's.
        assert!(!bus.write(0x11fe, &[1, 2, 3, 4]));
        assert!(!bus.read(0x0fff, &mut d));
        assert!(!bus.read(u64::MAX - 1, &mut d));
    }
}
