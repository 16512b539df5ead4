//! What both targets share: guest memory filled from the input, queues placed
//! in it, and a scratch directory for the vsock device's host sockets.

#![allow(dead_code)] // each target uses a subset

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_vmm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Two regions with a hole between them, so descriptors that straddle the hole
/// or run off the end are reachable: [0, 4 KiB) and [8 KiB, 12 KiB).
pub const REGION_A: (u64, usize) = (0, 0x1000);
pub const REGION_B: (u64, usize) = (0x2000, 0x1000);

/// Where the rings sit in region A (a 16-entry split ring needs 256 bytes of
/// descriptors, 38 of avail ring and 134 of used ring). The rest of region A and
/// all of region B hold whatever the input says: packets, or more ring.
pub const TXQ_ADDRS: (u64, u64, u64) = (0x000, 0x100, 0x200);
pub const RXQ_ADDRS: (u64, u64, u64) = (0x300, 0x400, 0x500);
pub const EVQ_ADDRS: (u64, u64, u64) = (0x600, 0x700, 0x800);

/// Guest memory whose bytes are `data` (region A first), zero past its end.
pub fn memory_from(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
    ])
    .expect("mapping fuzz guest memory");
    let (a, b) = data.split_at(data.len().min(REGION_A.1));
    mem.write_slice(a, GuestAddress(REGION_A.0))
        .expect("region A");
    let b = &b[..b.len().min(REGION_B.1)];
    mem.write_slice(b, GuestAddress(REGION_B.0))
        .expect("region B");
    mem
}

/// A ready queue at `addrs` (descriptors, avail, used) with `size` entries
/// (sizes that are not a power of two up to 16 leave it at 16, as on the bus).
pub fn queue(size: u16, addrs: (u64, u64, u64)) -> Queue {
    let mut q = Queue::new(16).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(addrs.0 as u32), Some((addrs.0 >> 32) as u32));
    q.set_avail_ring_address(Some(addrs.1 as u32), Some((addrs.1 >> 32) as u32));
    q.set_used_ring_address(Some(addrs.2 as u32), Some((addrs.2 >> 32) as u32));
    q.set_ready(true);
    q
}

/// A queue size from one input byte: 1, 2, 4, 8 or 16, or an invalid 0/3.
pub fn queue_size(b: u8) -> u16 {
    match b % 7 {
        5 => 0,
        6 => 3,
        n => 1 << n,
    }
}

/// The guest port that has a host listener (`<socket>_1024`), so the fuzzer
/// can reach established streams, not only RSTs.
pub const LISTENING_PORT: u32 = 1024;

pub struct Scratch {
    pub socket: PathBuf,
    pub listener: UnixListener,
}

/// The per-process scratch directory, its vsock socket path and the listener
/// on `<socket>_1024`.
pub fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let socket = dir.join("v.sock");
        let mut p = socket.clone().into_os_string();
        p.push(format!("_{LISTENING_PORT}"));
        let listener = UnixListener::bind(&p).expect("port listener");
        listener.set_nonblocking(true).expect("nonblocking");
        Scratch { socket, listener }
    })
}

/// Accepts and closes every connection the device made, so the listener's
/// backlog never fills (a full backlog would block the device's connect).
pub fn drain_listener() {
    while scratch().listener.accept().is_ok() {}
}
