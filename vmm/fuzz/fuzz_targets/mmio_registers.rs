//! The virtio-mmio register file: arbitrary sequences of reads and writes of
//! any offset, width and value, queue notifications (processed as the event
//! loop would), and guest memory changes between them, against the transport
//! wrapping the rng or the vsock device. Guest memory starts as the input says.
//!
//! An `Init` op drives the regular driver sequence (with fuzzed queue sizes
//! and addresses) so activated devices are reached quickly; everything else is
//! free-form.

#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::*;
use husk_vmm::devices::virtio::defs::*;
use husk_vmm::devices::virtio::mmio::{regs, MmioTransport};
use husk_vmm::devices::virtio::rng::Rng;
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm::devices::BusDevice;
use husk_vmm::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Ops per input: enough for init plus traffic, bounded so one input is quick.
const MAX_OPS: usize = 256;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A read of `size` bytes (any size, though KVM only produces 1, 2, 4, 8).
    Read {
        offset: u16,
        size: u8,
    },
    Write {
        offset: u16,
        size: u8,
        value: u64,
    },
    /// QueueNotify for `queue`, then the event loop's handling of it.
    Notify {
        queue: u8,
    },
    /// The guest changes its memory (rings and buffers) between accesses.
    Poke {
        addr: u16,
        bytes: [u8; 8],
    },
    /// The driver's regular bring-up, with fuzzed queue sizes and addresses.
    Init {
        sizes: [u8; 3],
        addrs: [[u16; 3]; 3],
        features_ok: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    vsock: bool,
    ops: Vec<Op>,
    memory: Vec<u8>,
}

struct Rig<D: VirtioDevice> {
    t: MmioTransport<D>,
    mem: GuestMemoryMmap,
}

impl<D: VirtioDevice> Rig<D> {
    fn w(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }

    fn init(&mut self, sizes: [u8; 3], addrs: [[u16; 3]; 3], features_ok: bool) {
        use regs::*;
        self.w(STATUS, 0);
        self.w(STATUS, STATUS_ACKNOWLEDGE);
        self.w(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, 0);
        let feat = if features_ok { STATUS_FEATURES_OK } else { 0 };
        self.w(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | feat);
        for (i, (size, a)) in sizes.iter().zip(addrs).enumerate() {
            self.w(QUEUE_SEL, i as u32);
            self.w(QUEUE_NUM, u32::from(queue_size(*size)));
            self.w(QUEUE_DESC_LOW, u32::from(a[0]));
            self.w(QUEUE_DESC_HIGH, 0);
            self.w(QUEUE_DRIVER_LOW, u32::from(a[1]));
            self.w(QUEUE_DRIVER_HIGH, 0);
            self.w(QUEUE_DEVICE_LOW, u32::from(a[2]));
            self.w(QUEUE_DEVICE_HIGH, 0);
            self.w(QUEUE_READY, 1);
        }
        self.w(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | feat | STATUS_DRIVER_OK,
        );
    }

    fn run(&mut self, ops: &[Op]) {
        for op in ops.iter().take(MAX_OPS) {
            match *op {
                Op::Read { offset, size } => {
                    let mut buf = vec![0u8; usize::from(size % 9)];
                    self.t.read(u64::from(offset), &mut buf);
                }
                Op::Write {
                    offset,
                    size,
                    value,
                } => {
                    let bytes = value.to_le_bytes();
                    self.t
                        .write(u64::from(offset), &bytes[..usize::from(size % 9)]);
                }
                Op::Notify { queue } => {
                    self.w(regs::QUEUE_NOTIFY, u32::from(queue));
                    // What the event loop does when a queue eventfd fires.
                    let fired: Vec<usize> = self
                        .t
                        .queue_evts()
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.read().is_ok())
                        .map(|(i, _)| i)
                        .collect();
                    for i in fired {
                        self.t.device_mut().process_queue(i);
                    }
                }
                Op::Poke { addr, bytes } => {
                    let _ = self.mem.write_slice(&bytes, GuestAddress(u64::from(addr)));
                }
                Op::Init {
                    sizes,
                    addrs,
                    features_ok,
                } => self.init(sizes, addrs, features_ok),
            }
        }
    }
}

/// Host entropy stand-in: a fixed pattern, so runs are reproducible.
struct Pattern;
impl std::io::Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        buf.fill(0xa5);
        Ok(buf.len())
    }
}

fuzz_target!(|input: Input| {
    let mem = memory_from(&input.memory);
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    if input.vsock {
        let Ok(dev) = Vsock::new(3, &scratch().socket) else {
            return;
        };
        let t = MmioTransport::new(dev, mem.clone(), irq).expect("transport");
        Rig { t, mem }.run(&input.ops);
        drain_listener();
    } else {
        let dev = Rng::with_source(Box::new(Pattern));
        let t = MmioTransport::new(dev, mem.clone(), irq).expect("transport");
        Rig { t, mem }.run(&input.ops);
    }
});
