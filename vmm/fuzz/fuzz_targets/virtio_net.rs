//! Guest virtio-net traffic: arbitrary guest memory as the RX and TX rings
//! and buffers of an activated virtio-net device over an in-memory tap that
//! holds frames for the guest. Checks after each input: every frame handed
//! to the tap is a header and at least an Ethernet header and at most 64 KiB
//! and headers; every frame taken from the tap was delivered or counted
//! dropped; a device that needs a reset no longer wants its tap.
//!
//! Input: [tx queue size, rx queue size, rounds, frames for the guest,
//! frame length / 8, limits (bit 0: RX, bit 1: TX), guest memory...]
//! (see common.rs for the memory layout).

#![no_main]

mod common;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use common::*;
use husk_vmm::config::NetConfig;
use husk_vmm::devices::virtio::defs::F_VERSION_1;
use husk_vmm::devices::virtio::net::defs::{MAX_FRAME_LEN, MIN_FRAME_LEN, RXQ, TXQ, VNET_HDR_LEN};
use husk_vmm::devices::virtio::net::{Net, NetBackend};
use husk_vmm::devices::virtio::{Activation, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct FakeTap {
    evt: EventFd,
    rx: VecDeque<Vec<u8>>,
    taken: u64,
    sent: Vec<usize>,
}

impl NetBackend for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.rx.pop_front().map(|f| {
            self.taken += 1;
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            n
        }))
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.sent.push(frame.len());
        Ok(())
    }
    fn set_offload(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (tx_size, rx_size) = (queue_size(data[0]), queue_size(data[1]));
    let rounds = 1 + data[2] % 4;
    let frames = usize::from(data[3] % 8);
    let frame_len = VNET_HDR_LEN + usize::from(data[4]) * 8;
    let limits = data[5];
    let image = &data[6..];

    let mem = memory_from(image);
    let tap = FakeTap {
        evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        rx: (0..frames).map(|i| vec![i as u8; frame_len]).collect(),
        taken: 0,
        sent: Vec::new(),
    };
    let cfg = NetConfig {
        fd: 3,
        mac: [2, 0, 0, 0, 0, 1],
        mtu: Some(1500),
        rx_bps: (limits & 1 != 0).then_some(1000),
        tx_bps: (limits & 2 != 0).then_some(1000),
    };
    let Ok(mut dev) = Net::with_backend(&cfg, tap) else {
        return;
    };
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let features = dev.features() | F_VERSION_1;
    let activated = dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![
            common::queue(rx_size, RXQ_ADDRS),
            common::queue(tx_size, TXQ_ADDRS),
        ],
        interrupt: irq.clone(),
        features,
    });
    if activated.is_err() {
        return;
    }
    for _ in 0..rounds {
        dev.process_queue(TXQ);
        dev.process_queue(RXQ);
        dev.pump(true, true);
    }
    let s = dev.stats();
    let tap = dev.backend();
    for &n in &tap.sent {
        assert!(
            (VNET_HDR_LEN + MIN_FRAME_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&n),
            "a {n}-byte frame reached the tap"
        );
    }
    assert_eq!(tap.sent.len() as u64, s.tx_frames);
    assert_eq!(
        tap.taken,
        s.rx_frames + s.rx_dropped,
        "a frame was lost uncounted"
    );
    if irq.needs_reset() {
        assert!(!dev.wants_tap(), "a broken device still polls its tap");
    }
    dev.reset();
    assert!(!dev.wants_tap());
});
