//! virtio-fs: arbitrary FUSE requests, each laid out in guest memory as a
//! descriptor chain (split over several buffers, sometimes malformed) and
//! served by an activated `Fs` device over a real share, a directory this
//! process makes once and puts back before every input.
//!
//! After each input: the guest holds no more than the device's limits, and
//! nothing appeared or changed outside the share (a canary directory beside
//! it); every reply the device wrote starts with a header that carries the
//! request's `unique` and the reply's own length.
//!
//! Input (a byte format of its own, so seeds can be written by hand, see
//! `seeds/gen.py`): one setup byte (bit 0: no FUSE INIT first; bits 1-2:
//! cache policy; bit 3: writeback), then records of a 12-byte head and a body:
//!
//! ```text
//! opcode u8 | queue u8 (bit 0: hiprio) | nodeid u8 | fh u8 | uid u8 |
//! len_delta i8 (added to fuse_in_header.len) | reply_len u16 le |
//! split u8 (bits 0-1: readable buffers - 1, bits 2-3: writable buffers - 1,
//!           bits 4-7: 0-9 well formed, 10-15 one of six malformations) |
//! pad u8 | body_len u16 le | body
//! ```
//!
//! Opcodes whose body starts with a file handle get `fh` written there (the
//! fuzzer would rarely guess a live one); FALLOCATE lengths are cut to 1 MiB
//! so that the host's disk is not what gets fuzzed.

#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use husk_vmm::devices::virtio::defs::F_VERSION_1;
use husk_vmm::devices::virtio::fs::{Cache, Fs, FsConfig, FsLimits};
use husk_vmm::devices::virtio::{Activation, Interrupt, VirtioDevice};
use husk_vmm::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory: rings at the bottom, request bytes from `REQ`, replies from
/// `RESP` (at most 64 KiB each).
const MEM_SIZE: usize = 0x40000;
const RINGS: [(u64, u64, u64); 2] = [(0x000, 0x100, 0x200), (0x400, 0x500, 0x600)];
const QUEUE_SIZE: u16 = 16;
const REQ: u64 = 0x1000;
const RESP: u64 = 0x20000;

/// Requests per input, and the body bytes one request may carry.
const MAX_REQUESTS: usize = 64;
const MAX_BODY: usize = 0x4000;

/// Small limits, so the fuzzer reaches them.
const LIMITS: FsLimits = FsLimits {
    inodes: 12,
    handles: 6,
};

// FUSE opcodes and sizes (include/uapi/linux/fuse.h).
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const GETATTR: u8 = 3;
const SETATTR: u8 = 4;
const INIT: u8 = 26;
const FALLOCATE: u8 = 43;
/// Opcodes whose body starts with `fh`: READ, WRITE, RELEASE, FLUSH, FSYNC,
/// READDIR, RELEASEDIR, FSYNCDIR, GETLK/SETLK/SETLKW, FALLOCATE, READDIRPLUS,
/// LSEEK, COPY_FILE_RANGE.
const FH_FIRST: [u8; 15] = [15, 16, 18, 20, 25, 28, 29, 30, 31, 32, 33, 43, 44, 46, 47];

struct Share {
    /// `<scratch>/share`, put back as `fresh` describes before each input.
    root: PathBuf,
    /// `<scratch>/outside/canary`: must never change.
    canary: PathBuf,
    scratch: PathBuf,
}

fn share() -> &'static Share {
    static S: OnceLock<Share> = OnceLock::new();
    S.get_or_init(|| {
        let scratch = std::env::temp_dir().join(format!("husk-fuzz-fs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(scratch.join("outside")).expect("scratch dir");
        let canary = scratch.join("outside/canary");
        fs::write(&canary, b"host data").expect("canary");
        Share {
            root: scratch.join("share"),
            canary,
            scratch,
        }
    })
}

/// The share as every input finds it: files, a directory, symlinks inward,
/// outward and dangling, a FIFO.
fn fresh(root: &Path) {
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(root.join("dir/deeper")).expect("share");
    fs::write(root.join("file"), b"hello world").expect("file");
    fs::write(root.join("dir/inner"), b"inner").expect("inner");
    let _ = std::os::unix::fs::symlink("file", root.join("in"));
    let _ = std::os::unix::fs::symlink("../outside/canary", root.join("out"));
    let _ = std::os::unix::fs::symlink("/nonexistent/x", root.join("dangling"));
    let fifo = std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes())
        .expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
}

fn check_outside(s: &Share) {
    let mut names: Vec<_> = fs::read_dir(&s.scratch)
        .expect("scratch")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "share"],
        "something was made beside the share"
    );
    let outside: Vec<_> = fs::read_dir(s.scratch.join("outside"))
        .expect("outside")
        .collect();
    assert_eq!(outside.len(), 1, "something was made outside the share");
    assert_eq!(fs::read(&s.canary).expect("canary"), b"host data");
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Fs,
    irq: Arc<Interrupt>,
    /// The next avail index of each queue.
    avail: [u16; 2],
    unique: u64,
}

impl Rig {
    fn activate(&mut self) {
        for (d, a, u) in RINGS {
            let _ = self.mem.write_slice(&[0u8; 0x100], GuestAddress(d));
            let _ = self.mem.write_slice(&[0u8; 0x100], GuestAddress(a));
            let _ = self.mem.write_slice(&[0u8; 0x100], GuestAddress(u));
        }
        self.avail = [0, 0];
        self.irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let queues = RINGS.iter().map(|&r| queue(r)).collect();
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.irq.clone(),
                features: F_VERSION_1,
            })
            .expect("activation");
    }

    /// A device that asked for a reset gets one, as a driver would do it.
    fn recover(&mut self, init: bool) {
        if self.irq.needs_reset() {
            self.dev.reset();
            self.activate();
            if init {
                self.init();
            }
        }
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        body.extend_from_slice(&7u32.to_le_bytes()); // major
        body.extend_from_slice(&33u32.to_le_bytes()); // minor
        body.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_readahead
        body.extend_from_slice(&0x0040_0020u32.to_le_bytes()); // BIG_WRITES | MAX_PAGES
        self.request(&Head::init(), &body);
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let at = RINGS[q].0 + 16 * u64::from(i);
        let _ = self.mem.write_slice(&d, GuestAddress(at));
    }

    /// Lays out one request as a chain, publishes it and lets the device
    /// serve the queue; checks the reply's header.
    fn request(&mut self, h: &Head, body: &[u8]) {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let q = usize::from(h.queue & 1);
        self.unique += 1;
        let len = (IN_HEADER + body.len()) as i64 + i64::from(h.len_delta);
        let mut req = Vec::with_capacity(IN_HEADER + body.len());
        req.extend_from_slice(&(len.clamp(0, u32::MAX.into()) as u32).to_le_bytes());
        req.extend_from_slice(&u32::from(h.opcode).to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&u64::from(h.nodeid).to_le_bytes());
        let id = u32::from(h.uid);
        req.extend_from_slice(&id.to_le_bytes()); // uid
        req.extend_from_slice(&id.to_le_bytes()); // gid
        req.extend_from_slice(&1u32.to_le_bytes()); // pid
        req.extend_from_slice(&0u32.to_le_bytes()); // padding
        req.extend_from_slice(body);
        let _ = self.mem.write_slice(&req, GuestAddress(REQ));
        let _ = self.mem.write_slice(&[0xeeu8; 0x10000], GuestAddress(RESP));

        // Buffers: the request cut into `r` pieces, the reply space into `w`.
        let (r, w) = (
            usize::from(h.split & 3) + 1,
            usize::from((h.split >> 2) & 3) + 1,
        );
        let mut bufs: Vec<(u64, u32, u16)> = Vec::new();
        let cuts = |total: usize, n: usize| -> Vec<(usize, usize)> {
            let step = total / n;
            (0..n)
                .map(|i| {
                    let start = i * step;
                    let end = if i + 1 == n { total } else { start + step };
                    (start, end - start)
                })
                .filter(|&(_, l)| l > 0)
                .collect()
        };
        for (off, l) in cuts(req.len(), r) {
            bufs.push((REQ + off as u64, l as u32, 0));
        }
        for (off, l) in cuts(usize::from(h.reply_len), w) {
            bufs.push((RESP + off as u64, l as u32, WRITE));
        }
        match h.split >> 4 {
            10 => bufs.reverse(),                              // writable first
            11 => bufs.insert(0, (REQ, 0, 0)),                 // a zero-length buffer
            12 => bufs.push((MEM_SIZE as u64 - 8, 64, WRITE)), // past the end of memory
            13 => bufs.push((u64::MAX - 8, 64, WRITE)),        // wrapping
            14 => bufs.insert(0, (REQ, 8 << 20, 0)),           // longer than any request
            _ => {}
        }
        if bufs.is_empty() {
            return;
        }
        let n = bufs.len() as u16;
        for (i, &(addr, l, flags)) in bufs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if i + 1 < n {
                (flags | NEXT, i + 1)
            } else if h.split >> 4 == 15 {
                (flags | NEXT, 0) // a loop back to the head
            } else {
                (flags, 0)
            };
            self.desc(q, i, addr, l, flags, next);
        }
        // Publish head 0 and notify.
        let (_, avail, used) = RINGS[q];
        let slot = u64::from(self.avail[q] % QUEUE_SIZE);
        let _ = self.mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot));
        self.avail[q] = self.avail[q].wrapping_add(1);
        let _ = self.mem.write_obj(self.avail[q], GuestAddress(avail + 2));
        let used_before: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
        self.dev.process_queue(q);
        let used_after: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
        if used_after == used_before {
            return;
        }
        let elem = used + 4 + 8 * u64::from(used_before % QUEUE_SIZE);
        let used_len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap_or(0);
        // The reply is in the writable buffers, in order, when well formed.
        if used_len as usize >= OUT_HEADER && h.split >> 4 < 10 && w == 1 {
            let mut out = [0u8; OUT_HEADER];
            self.mem
                .read_slice(&mut out, GuestAddress(RESP))
                .expect("reply");
            let out_len = u32::from_le_bytes(out[..4].try_into().expect("4"));
            let unique = u64::from_le_bytes(out[8..].try_into().expect("8"));
            assert_eq!(unique, self.unique, "reply to another request");
            assert_eq!(out_len, used_len, "reply header and used length differ");
        }
    }
}

fn queue((d, a, u): (u64, u64, u64)) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(d as u32), Some(0));
    q.set_avail_ring_address(Some(a as u32), Some(0));
    q.set_used_ring_address(Some(u as u32), Some(0));
    q.set_ready(true);
    q
}

struct Head {
    opcode: u8,
    queue: u8,
    nodeid: u8,
    fh: u8,
    uid: u8,
    len_delta: i8,
    reply_len: u16,
    split: u8,
    body_len: u16,
}

impl Head {
    const LEN: usize = 12;

    fn parse(b: &[u8]) -> Head {
        Head {
            opcode: b[0],
            queue: b[1],
            nodeid: b[2],
            fh: b[3],
            uid: b[4],
            len_delta: b[5] as i8,
            reply_len: u16::from_le_bytes([b[6], b[7]]),
            split: b[8],
            body_len: u16::from_le_bytes([b[10], b[11]]),
        }
    }

    fn init() -> Head {
        Head {
            opcode: INIT,
            queue: 1,
            nodeid: 0,
            fh: 0,
            uid: 0,
            len_delta: 0,
            reply_len: 0x1000,
            split: 0,
            body_len: 16,
        }
    }
}

/// What the harness fixes in a body: a live handle where one goes, a
/// FALLOCATE that cannot fill the disk.
fn patch(h: &Head, body: &mut [u8]) {
    let fh = u64::from(h.fh).to_le_bytes();
    let at = match h.opcode {
        GETATTR | SETATTR => Some(8),
        op if FH_FIRST.contains(&op) => Some(0),
        _ => None,
    };
    if let Some(at) = at {
        if let Some(b) = body.get_mut(at..at + 8) {
            b.copy_from_slice(&fh);
        }
    }
    if h.opcode == FALLOCATE {
        // struct fuse_fallocate_in: fh, offset, length, mode.
        if let Some(b) = body.get_mut(16..24) {
            let len = u64::from_le_bytes(b.try_into().expect("8")).min(1 << 20);
            b.copy_from_slice(&len.to_le_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let s = share();
    fresh(&s.root);
    let cache = match (setup >> 1) & 3 {
        0 => Cache::Never,
        1 => Cache::Auto,
        _ => Cache::Always,
    };
    let cfg = FsConfig {
        cache,
        writeback: setup & 8 != 0,
        limits: Some(LIMITS),
    };
    let dev = Fs::new("fuzz", &s.root, cfg).expect("device");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let mut rig = Rig {
        mem,
        dev,
        irq: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))),
        avail: [0, 0],
        unique: 0,
    };
    rig.activate();
    let init = setup & 1 == 0;
    if init {
        rig.init();
    }
    for _ in 0..MAX_REQUESTS {
        if rest.len() < Head::LEN {
            break;
        }
        let h = Head::parse(&rest[..Head::LEN]);
        rest = &rest[Head::LEN..];
        let n = usize::from(h.body_len).min(rest.len()).min(MAX_BODY);
        let mut body = rest[..n].to_vec();
        rest = &rest[n..];
        patch(&h, &mut body);
        rig.request(&h, &body);
        // The device serves the share in process here: its books are its own.
        let (inodes, handles) = rig.dev.held().expect("an in-process share");
        assert!(inodes <= LIMITS.inodes && handles <= LIMITS.handles);
        rig.recover(init);
    }
    drop(rig);
    check_outside(s);
});
