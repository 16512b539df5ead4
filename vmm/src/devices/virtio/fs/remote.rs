//! virtio-fs with the file system in another process.
//!
//! husk-vmm maps guest memory, emulates devices and runs the vCPUs; a bug
//! there is the guest's way onto the host. The passthrough needs rights no
//! such process should hold: it creates files as any guest user (setresuid,
//! CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD) inside the
//! share. So a VMM with a share starts a second process of its own binary
//! (`husk-vmm --serve-fs`, named `husk-vmm-fs`) that keeps those rights and
//! serves the share, and then gives up its own: another uid, no capabilities.
//! The file-system process never sees guest memory, KVM or a socket but the
//! one it was born with; the VMM never sees a file of the share.
//!
//! Not vhost-user: a vhost-user back end maps guest memory itself, so guest
//! memory would have to be shared memory, where a restored template maps its
//! snapshot copy-on-write (MAP_PRIVATE) and a second process could not see
//! the clone's pages. Here the VMM copies each request out of the guest and
//! each reply back in (requests are at most [`MAX_CHAIN_BYTES`] together),
//! and the server knows nothing of the guest's memory layout.
//!
//! # The line
//!
//! One Unix stream socket, one request at a time, in order. Each frame
//! starts with a fixed header of little-endian u32s:
//!
//! - request: `kind` ([`KIND_REQUEST`] or [`KIND_DESTROY`]), `readable`,
//!   `writable`, then `readable` bytes: the chain's device-readable part (the
//!   FUSE request), and `writable` is the room for the reply;
//! - reply: `status` ([`STATUS_OK`] or [`STATUS_MALFORMED`]), `len`, then
//!   `len` bytes (at most the request's `writable`): the FUSE reply.
//!
//! The server treats the VMM as it treats the guest: a frame out of bounds
//! ends it (the share is gone for that VM, nothing else), and what it serves
//! is the same jailed passthrough with the same checks. The VMM treats the
//! server's reply as bounded input too: a reply longer than the room asked
//! for is an error, never a write past the chain.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::defs::MAX_CHAIN_BYTES;
use super::device::{Local, RequestError};
use crate::devices::virtio::chain::{self, ChainError};
use crate::memory::GuestMemoryMmap;

/// A FUSE request and the room for its reply.
pub const KIND_REQUEST: u32 = 1;
/// The driver reset the device: drop what its predecessor held.
pub const KIND_DESTROY: u32 = 2;
/// The reply follows.
pub const STATUS_OK: u32 = 0;
/// The request could not be served (the in-process device would have
/// marked itself broken).
pub const STATUS_MALFORMED: u32 = 1;

const HEADER: usize = 12;
const REPLY_HEADER: usize = 8;

/// The VMM's end: forwards each request and waits for its reply.
pub struct Client {
    /// A Unix stream socket, as a `File` so that it is read and written
    /// with `read`/`write` (std's sockets use `recvfrom`, which the
    /// file-system process's seccomp filter does not allow).
    sock: File,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(sock: File) -> Client {
        Client {
            sock,
            buf: Vec::new(),
        }
    }

    /// Serves one chain through the file-system process; returns the bytes
    /// written into the chain.
    pub(super) fn handle(
        &mut self,
        c: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, RequestError> {
        let req = chain::validate(c, mem, MAX_CHAIN_BYTES)?;
        let head = req.head();
        // Both at most MAX_CHAIN_BYTES (4 MiB): they fit u32 and usize.
        let (readable, writable) = (req.readable_len() as u32, req.writable_len() as u32);
        let remote = |source: io::Error| RequestError::Remote { head, source };

        self.buf.clear();
        self.buf.resize(HEADER + readable as usize, 0);
        self.buf[0..4].copy_from_slice(&KIND_REQUEST.to_le_bytes());
        self.buf[4..8].copy_from_slice(&readable.to_le_bytes());
        self.buf[8..12].copy_from_slice(&writable.to_le_bytes());
        req.reader(mem).read_exact(&mut self.buf[HEADER..])?;
        self.sock.write_all(&self.buf).map_err(remote)?;

        let (status, len) = read_reply_header(&mut self.sock).map_err(remote)?;
        if status != STATUS_OK {
            return Err(RequestError::RemoteRefused { head });
        }
        if len > writable {
            return Err(remote(io::Error::other(format!(
                "a reply of {len} bytes for {writable} bytes of room"
            ))));
        }
        self.buf.clear();
        self.buf.resize(len as usize, 0);
        self.sock.read_exact(&mut self.buf).map_err(remote)?;
        let written = req.writer(mem).write(&self.buf)?;
        Ok(written as u32)
    }

    /// Another handle on the same line (tests).
    #[cfg(test)]
    pub(super) fn try_clone(&self) -> io::Result<Client> {
        Ok(Client::new(self.sock.try_clone()?))
    }

    /// Asks the server to drop what the previous driver held.
    pub(super) fn destroy(&mut self) -> io::Result<()> {
        let mut frame = [0u8; HEADER];
        frame[0..4].copy_from_slice(&KIND_DESTROY.to_le_bytes());
        self.sock.write_all(&frame)?;
        match read_reply_header(&mut self.sock)? {
            (STATUS_OK, 0) => Ok(()),
            (status, len) => Err(io::Error::other(format!(
                "destroy answered with status {status} and {len} bytes"
            ))),
        }
    }
}

fn read_reply_header(sock: &mut File) -> io::Result<(u32, u32)> {
    let mut h = [0u8; REPLY_HEADER];
    sock.read_exact(&mut h)?;
    Ok((le32(&h[0..4]), le32(&h[4..8])))
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// Why the server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the VMM's socket: {0}")]
    Io(#[from] io::Error),
    #[error("a frame of kind {0}")]
    Kind(u32),
    #[error("a request of {readable} + {writable} bytes (at most {MAX_CHAIN_BYTES} together, at least one readable)")]
    Size { readable: u32, writable: u32 },
    #[error("the request buffer: {0}")]
    Buffer(String),
}

/// Where the server lays out one request in its private "guest" memory:
/// the descriptor table, the rings, then the request and reply bytes.
const QUEUE_SIZE: u16 = 4;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DATA: u64 = 0x1_0000;

/// Serves FUSE requests from `sock` with `fs` until the VMM closes it (Ok)
/// or sends what no VMM of ours sends (an error; the caller exits).
///
/// fuse-backend-rs reads requests and writes replies through a virtio
/// descriptor chain, so each request is placed in a small private memory of
/// this process as a two-descriptor chain on a private queue, and served by
/// the very code the in-process device uses ([`Local::handle`]).
pub fn serve(mut sock: File, fs: &Local) -> Result<(), ServeError> {
    let size = DATA + MAX_CHAIN_BYTES;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|e| ServeError::Buffer(e.to_string()))?;
    let mut queue = Queue::new(QUEUE_SIZE).map_err(|e| ServeError::Buffer(format!("{e:?}")))?;
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let mut avail_idx: u16 = 0;
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        match sock.read_exact(&mut h) {
            Ok(()) => {}
            // The VMM is gone: so is the guest.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let (kind, readable, writable) = (le32(&h[0..4]), le32(&h[4..8]), le32(&h[8..12]));
        match kind {
            KIND_DESTROY => {
                fs.destroy();
                reply(&mut sock, STATUS_OK, &[])?;
                continue;
            }
            KIND_REQUEST => {}
            other => return Err(ServeError::Kind(other)),
        }
        if readable == 0 || u64::from(readable) + u64::from(writable) > MAX_CHAIN_BYTES {
            return Err(ServeError::Size { readable, writable });
        }
        buf.clear();
        buf.resize(readable as usize, 0);
        sock.read_exact(&mut buf)?;
        let reply_at = DATA + u64::from(readable);
        mem.write_slice(&buf, GuestAddress(DATA))
            .map_err(|e| ServeError::Buffer(e.to_string()))?;
        publish(&mem, avail_idx, readable, reply_at, writable)?;
        avail_idx = avail_idx.wrapping_add(1);

        let served = match chain::pop(&mut queue, &mem) {
            Ok(Some(c)) => fs.handle(c, &mem),
            Ok(None) => Err(RequestError::Chain(ChainError::AvailIndex)),
            Err(e) => Err(RequestError::Chain(e)),
        };
        // Keep the private queue's books whatever happened to the request.
        let used = *served.as_ref().unwrap_or(&0);
        chain::add_used(&mut queue, &mem, 0, used)
            .map_err(|e| ServeError::Buffer(e.to_string()))?;
        match served {
            Ok(n) => {
                buf.clear();
                buf.resize(n.min(writable) as usize, 0);
                mem.read_slice(&mut buf, GuestAddress(reply_at))
                    .map_err(|e| ServeError::Buffer(e.to_string()))?;
                reply(&mut sock, STATUS_OK, &buf)?;
            }
            Err(e) => {
                crate::warn_limited!(error = %e, "virtio-fs: malformed request from the VMM");
                reply(&mut sock, STATUS_MALFORMED, &[])?;
            }
        }
    }
}

/// Places the request (and the room for its reply, if any) as the chain at
/// head 0 and makes it the next available entry.
fn publish(
    mem: &GuestMemoryMmap,
    idx: u16,
    readable: u32,
    reply_at: u64,
    writable: u32,
) -> Result<(), ServeError> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let descs = if writable > 0 {
        vec![
            SplitDescriptor::new(DATA, readable, NEXT, 1),
            SplitDescriptor::new(reply_at, writable, WRITE, 0),
        ]
    } else {
        vec![SplitDescriptor::new(DATA, readable, 0, 0)]
    };
    let put = |r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|e| ServeError::Buffer(e.to_string()))
    };
    for (i, d) in descs.into_iter().enumerate() {
        put(mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(DESC_TABLE + 16 * i as u64),
        ))?;
    }
    // avail ring: flags, idx, ring[QUEUE_SIZE]; the entry, then the index.
    let slot = AVAIL_RING + 4 + 2 * u64::from(idx % QUEUE_SIZE);
    put(mem.write_obj(0u16.to_le(), GuestAddress(slot)))?;
    std::sync::atomic::fence(Ordering::Release);
    put(mem.write_obj(idx.wrapping_add(1).to_le(), GuestAddress(AVAIL_RING + 2)))?;
    Ok(())
}

fn reply(sock: &mut File, status: u32, data: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(REPLY_HEADER + data.len());
    frame.extend_from_slice(&status.to_le_bytes());
    // At most MAX_CHAIN_BYTES.
    frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
    frame.extend_from_slice(data);
    sock.write_all(&frame)
}
