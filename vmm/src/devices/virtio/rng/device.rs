//! The virtio-rng device state machine.

use std::fs::File;
use std::io::Read;

use crate::devices::virtio::chain::{self, ChainError, ValidChain};
use crate::devices::virtio::defs::{F_VERSION_1, TYPE_RNG};
use crate::devices::virtio::state::DeviceState;
use crate::devices::virtio::{ActivateError, Activation, VirtioDevice};
use crate::memory::GuestMemoryMmap;

/// The request queue's size.
const QUEUE_SIZE: u16 = 256;
/// Most bytes given per request: a guest that posts a huge buffer still gets a
/// bounded amount of host entropy (and the VMM a bounded amount of work).
const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// Chains longer than this (in bytes, summed) are malformed for this device.
const MAX_CHAIN_BYTES: u64 = 1 << 32;

/// virtio-rng.
pub struct Rng {
    source: Box<dyn Read + Send>,
    state: DeviceState,
    sizes: [u16; 1],
}

impl Rng {
    /// A device reading `/dev/urandom`, opened now (before seccomp is applied).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self::with_source(Box::new(File::open("/dev/urandom")?)))
    }

    /// A device reading from `source` (tests use a fixed pattern).
    pub fn with_source(source: Box<dyn Read + Send>) -> Self {
        Rng {
            source,
            state: DeviceState::new(),
            sizes: [QUEUE_SIZE],
        }
    }

    /// Fills one validated request; returns the bytes written.
    fn fill(&mut self, req: &ValidChain, mem: &GuestMemoryMmap) -> Result<u32, ChainError> {
        if !req.readable().is_empty() {
            return Err(ChainError::WrongDirection { head: req.head() });
        }
        let mut w = req.writer(mem);
        let mut budget = MAX_BYTES_PER_REQUEST as usize;
        let mut buf = vec![0u8; 4096];
        while budget > 0 && w.available() > 0 {
            let n = (w.available().min(budget as u64) as usize).min(buf.len());
            if let Err(e) = self.source.read_exact(&mut buf[..n]) {
                // Host entropy is gone: return what we have rather than fake bytes.
                crate::error_limited!(error = %e, "reading host entropy failed");
                break;
            }
            w.write(&buf[..n])?;
            budget -= n;
        }
        Ok(w.written())
    }

    fn process_requests(&mut self) -> Result<(), ChainError> {
        DeviceState::process(
            self,
            |d| &mut d.state,
            |dev, active| {
                let mut used_any = false;
                let (mem, queue) = (&active.mem, &mut active.queues[0]);
                while let Some(c) = chain::pop(queue, mem)? {
                    let req = chain::validate(c, mem, MAX_CHAIN_BYTES)?;
                    let len = dev.fill(&req, mem)?;
                    chain::add_used(queue, mem, req.head(), len)?;
                    used_any = true;
                }
                Ok(used_any)
            },
        )
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state.queue_states()
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.state.activate(a, &[0])
    }

    fn reset(&mut self) {
        self.state.reset();
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 {
            return;
        }
        if let Err(e) = self.process_requests() {
            crate::warn_limited!(error = %e, "virtio-rng: malformed request queue; device needs reset");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::test_utils::*;
    use crate::devices::virtio::Interrupt;
    use std::sync::Arc;
    use virtio_queue::Queue;
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Endless 0x5a bytes.
    struct Pattern;
    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(0x5a);
            Ok(buf.len())
        }
    }

    fn activated(mem: &GuestMemoryMmap, q: Queue) -> (Rng, Arc<Interrupt>) {
        let mut rng = Rng::with_source(Box::new(Pattern));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![q],
            interrupt: irq.clone(),
            features: F_VERSION_1,
        })
        .unwrap();
        (rng, irq)
    }

    fn used_len(rng: &Rng, mem: &GuestMemoryMmap, slot: u64) -> u32 {
        let used = rng.state.active().unwrap().queues[0].used_ring();
        mem.read_obj(GuestAddress(used + 4 + slot * 8 + 4)).unwrap()
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let (vq, q) = queue(&mem);
        publish(
            &vq,
            &[
                desc(0x8000, 100, true, Some(1)),
                desc(0x9000, 28, true, None),
            ],
            &[0],
        );
        let (mut rng, irq) = activated(&mem, q);
        rng.process_queue(0);
        assert_eq!(used_len(&rng, &mem, 0), 128);
        let mut b = [0u8; 100];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a));
        assert_eq!(irq.status() & 1, 1);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn caps_bytes_per_request() {
        let mem = memory();
        let (vq, q) = queue(&mem);
        publish(&vq, &[desc(0x10000, 0x20000, true, None)], &[0]);
        let (mut rng, _irq) = activated(&mem, q);
        rng.process_queue(0);
        assert_eq!(used_len(&rng, &mem, 0), MAX_BYTES_PER_REQUEST);
    }

    fn assert_breaks(descs: &[virtio_queue::desc::RawDescriptor], heads: &[u16]) {
        let mem = memory();
        let (vq, q) = queue(&mem);
        publish(&vq, descs, heads);
        let (mut rng, irq) = activated(&mem, q);
        rng.process_queue(0);
        assert!(irq.needs_reset(), "{descs:?}");
        assert!(rng.state.is_broken());
        // A broken device ignores further notifications until reset.
        rng.process_queue(0);
        rng.reset();
        assert!(!rng.state.is_broken());
    }

    #[test]
    fn malformed_requests_need_reset() {
        // Read-only buffer (wrong direction).
        assert_breaks(&[desc(0x8000, 16, false, None)], &[0]);
        // Zero length.
        assert_breaks(&[desc(0x8000, 0, true, None)], &[0]);
        // Out of range.
        assert_breaks(&[desc(MEM_SIZE as u64, 16, true, None)], &[0]);
        // Loop.
        assert_breaks(
            &[
                desc(0x8000, 16, true, Some(1)),
                desc(0x9000, 16, true, Some(0)),
            ],
            &[0],
        );
        // Head out of range.
        assert_breaks(&[desc(0x8000, 16, true, None)], &[99]);
        // Oversized: 16 descriptors of 4 GiB - 1 each overflow the chain limit.
        let big: Vec<_> = (0..16u16)
            .map(|i| {
                desc(
                    0x8000,
                    u32::MAX,
                    true,
                    if i < 15 { Some(i + 1) } else { None },
                )
            })
            .collect();
        assert_breaks(&big, &[0]);
    }

    #[test]
    fn notifications_before_activation_and_for_other_queues_are_ignored() {
        let mut rng = Rng::with_source(Box::new(Pattern));
        rng.process_queue(0);
        rng.process_queue(7);
        let mem = memory();
        let (_vq, q) = queue(&mem);
        let (mut rng, irq) = activated(&mem, q);
        rng.process_queue(3);
        assert_eq!(irq.status(), 0);
        assert_eq!(rng.state.active().unwrap().queues[0].next_used(), 0);
    }
}
