//! Guest vsock traffic: arbitrary guest memory parsed as TX and RX descriptor
//! chains and packets, first through the public parsing API
//! (`chain::pop`/`validate`, `packet::parse_tx`/`rx_capacity`/`write_rx`), then
//! through a whole activated vsock device processing its queues.
//!
//! Input: [tx queue size, rx queue size, rounds, rx payload length / 64,
//! guest memory...] (see common.rs for the memory layout).

#![no_main]

mod common;

use std::sync::Arc;

use common::*;
use husk_vmm::devices::virtio::chain;
use husk_vmm::devices::virtio::defs::F_VERSION_1;
use husk_vmm::devices::virtio::vsock::defs::{EVQ, MAX_PKT_DATA, RXQ, TXQ};
use husk_vmm::devices::virtio::vsock::packet::{self, Header};
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::{Activation, Interrupt, VirtioDevice};
use husk_vmm::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Chains looked at per queue in the direct pass (pop is bounded by the ring
/// anyway; this bounds the work when write_rx rewrites the ring under us).
const MAX_CHAINS: usize = 64;

fn parse_directly(mem: &GuestMemoryMmap, size: u16, addrs: (u64, u64, u64), payload: &[u8]) {
    let mut q = common::queue(size, addrs);
    for _ in 0..MAX_CHAINS {
        let Ok(Some(c)) = chain::pop(&mut q, mem) else {
            return;
        };
        // Validated once, as the device does; the parsers work on that alone.
        let head = c.head_index();
        if let Ok(v) = chain::validate(c, mem, u64::from(MAX_PKT_DATA) + 4096) {
            let _ = packet::parse_tx(mem, &v);
            let _ = packet::rx_capacity(&v);
            let hdr = Header {
                src_cid: 2,
                dst_cid: 3,
                ..Default::default()
            };
            let _ = packet::write_rx(mem, &v, &hdr, payload);
        }
        let _ = chain::add_used(&mut q, mem, head, 0);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (tx_size, rx_size) = (queue_size(data[0]), queue_size(data[1]));
    let rounds = 1 + data[2] % 4;
    let payload = vec![0x5au8; usize::from(data[3]) * 64];
    let image = &data[4..];

    let mem = memory_from(image);
    parse_directly(&mem, tx_size, TXQ_ADDRS, &payload);
    parse_directly(&mem, rx_size, RXQ_ADDRS, &payload);

    // The whole device, on fresh memory with the same bytes.
    let mem = memory_from(image);
    let Ok(mut dev) = Vsock::new(3, &scratch().socket) else {
        return;
    };
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let activated = dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![
            common::queue(rx_size, RXQ_ADDRS),
            common::queue(tx_size, TXQ_ADDRS),
            common::queue(4, EVQ_ADDRS),
        ],
        interrupt: irq,
        features: F_VERSION_1,
    });
    if activated.is_ok() {
        for _ in 0..rounds {
            dev.process_queue(TXQ);
            dev.process_queue(RXQ);
            dev.process_queue(EVQ);
        }
        dev.reset();
    }
    drop(dev);
    drain_listener();
});
