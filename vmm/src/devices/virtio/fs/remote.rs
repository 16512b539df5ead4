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
//! One Unix stream socket. The server takes one request at a time and
//! answers in order; the VMM may send the next requests before the answers
//! come (at most [`MAX_IN_FLIGHT`], and at most [`MAX_CHAIN_BYTES`] queued
//! unsent), so the server never waits for the VMM between requests. Each
//! frame starts with a fixed header of little-endian u32s:
//!
//! - request: `kind` ([`KIND_REQUEST`] or [`KIND_DESTROY`]), `readable`,
//!   `writable`, then `readable` bytes: the chain's device-readable part (the
//!   FUSE request), and `writable` is the room for the reply;
//! - reply: `status` ([`STATUS_OK`] or [`STATUS_MALFORMED`]), `len`, then
//!   `len` bytes (at most the request's `writable`): the FUSE reply.
//!
//! The VMM's end never blocks ([`Client`]): its socket is non-blocking and
//! watched by the virtio-fs event loop, so no lock (the device's transport,
//! which a vCPU takes to notify a queue) is ever held across a round trip.
//!
//! The server treats the VMM as it treats the guest: a frame out of bounds
//! ends it (the share is gone for that VM, nothing else), and what it serves
//! is the same jailed passthrough with the same checks. The VMM treats the
//! server's reply as bounded input too: a reply longer than the room asked
//! for is an error, never a write past the chain.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::defs::MAX_CHAIN_BYTES;
use super::device::{Local, RequestError};
use crate::devices::virtio::chain::{self, ChainError, ValidChain};
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

/// Requests the VMM sends before the first of them is answered.
pub const MAX_IN_FLIGHT: usize = 64;

/// A request sent (or queued to send) and not yet answered.
struct Pending {
    /// The driver generation it came from ([`Client::orphan_all`]).
    generation: u64,
    what: Waiting,
}

enum Waiting {
    Request { queue: usize, chain: ValidChain },
    Destroy,
}

/// An answered request of the current driver: `data` goes into `chain`,
/// which goes back on `queue`.
pub(super) struct Completion {
    pub queue: usize,
    pub chain: ValidChain,
    pub data: Vec<u8>,
}

/// The VMM's end: queues requests, sends them as the socket takes them, and
/// hands back answers as they arrive. Never blocks.
pub struct Client {
    /// A non-blocking Unix stream socket, as a `File` so that it is read and
    /// written with `read`/`write` (std's sockets use `recvfrom`/`sendto`).
    sock: File,
    /// Frames queued; `out[sent..]` not yet written.
    out: Vec<u8>,
    sent: usize,
    in_flight: VecDeque<Pending>,
    /// The reply being read: its header, then its bytes (`have` of them).
    reply: Vec<u8>,
    have: usize,
    generation: u64,
    /// The line failed: every later request fails at once with this.
    dead: Option<io::ErrorKind>,
}

impl Client {
    /// Takes the VMM's end of the line; makes it non-blocking.
    pub fn new(sock: UnixStream) -> io::Result<Client> {
        sock.set_nonblocking(true)?;
        Ok(Client {
            sock: File::from(OwnedFd::from(sock)),
            out: Vec::new(),
            sent: 0,
            in_flight: VecDeque::new(),
            reply: Vec::new(),
            have: 0,
            generation: 0,
            dead: None,
        })
    }

    /// The socket, for the event loop (readable and writable, edge-triggered).
    pub(super) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether another request may be queued now.
    pub(super) fn has_room(&self) -> bool {
        self.in_flight.len() < MAX_IN_FLIGHT
            && (self.out.len() - self.sent) as u64 <= MAX_CHAIN_BYTES
    }

    /// Requests of the current driver popped from `queue` and not yet
    /// answered (a snapshot gives them back to the ring).
    pub(super) fn in_flight_on(&self, queue: usize) -> u16 {
        let n = self
            .in_flight
            .iter()
            .filter(|p| {
                p.generation == self.generation
                    && matches!(p.what, Waiting::Request { queue: q, .. } if q == queue)
            })
            .count();
        // At most MAX_IN_FLIGHT.
        n as u16
    }

    fn check_alive(&self) -> io::Result<()> {
        match self.dead {
            Some(kind) => Err(io::Error::new(
                kind,
                "the file-system process's line is down",
            )),
            None => Ok(()),
        }
    }

    /// Queues `c` (popped from `queue`) for the file-system process.
    pub(super) fn submit(
        &mut self,
        queue: usize,
        c: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), RequestError> {
        let chain = chain::validate(c, mem, MAX_CHAIN_BYTES)?;
        let head = chain.head();
        self.check_alive()
            .map_err(|source| RequestError::Remote { head, source })?;
        // Both at most MAX_CHAIN_BYTES (4 MiB): they fit u32 and usize.
        let (readable, writable) = (chain.readable_len() as u32, chain.writable_len() as u32);
        self.compact();
        let at = self.out.len();
        self.out.extend_from_slice(&KIND_REQUEST.to_le_bytes());
        self.out.extend_from_slice(&readable.to_le_bytes());
        self.out.extend_from_slice(&writable.to_le_bytes());
        self.out.resize(at + HEADER + readable as usize, 0);
        if let Err(e) = chain.reader(mem).read_exact(&mut self.out[at + HEADER..]) {
            self.out.truncate(at);
            return Err(e.into());
        }
        self.in_flight.push_back(Pending {
            generation: self.generation,
            what: Waiting::Request { queue, chain },
        });
        Ok(())
    }

    /// Queues a request to drop what the previous driver held.
    pub(super) fn submit_destroy(&mut self) -> io::Result<()> {
        self.check_alive()?;
        self.compact();
        self.out.extend_from_slice(&KIND_DESTROY.to_le_bytes());
        self.out.extend_from_slice(&[0u8; 8]);
        self.in_flight.push_back(Pending {
            generation: self.generation,
            what: Waiting::Destroy,
        });
        Ok(())
    }

    /// The driver reset the device: what its requests get back is dropped.
    /// They are still served (a frame cannot be taken back once partly
    /// sent), before the DESTROY the next driver's first request brings.
    pub(super) fn orphan_all(&mut self) {
        self.generation += 1;
    }

    /// Drops the part of `out` already written, once it is most of it.
    fn compact(&mut self) {
        if self.sent > 0 && self.sent * 2 >= self.out.len() {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.dead = Some(e.kind());
        e
    }

    /// Writes queued frames until the socket would block.
    /// Nothing when the line is down (the next request finds out).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if self.dead.is_some() {
            return Ok(());
        }
        while self.sent < self.out.len() {
            match self.sock.write(&self.out[self.sent..]) {
                Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        Ok(())
    }

    /// Reads answers until the socket would block; returns those for the
    /// current driver's requests, in order.
    pub(super) fn receive(&mut self) -> Result<Vec<Completion>, RequestError> {
        let mut done = Vec::new();
        if self.dead.is_some() {
            return Ok(done);
        }
        loop {
            // How much of the current reply is still to come.
            let need = if self.have < REPLY_HEADER {
                REPLY_HEADER
            } else {
                REPLY_HEADER + le32(&self.reply[4..8]) as usize
            };
            if self.have == need {
                if let Some(c) = self.complete()? {
                    done.push(c);
                }
                continue;
            }
            self.reply.resize(need, 0);
            match self.sock.read(&mut self.reply[self.have..need]) {
                Ok(0) => {
                    let e = self.fail(io::ErrorKind::UnexpectedEof.into());
                    return Err(self.remote_error(e));
                }
                Ok(n) => {
                    self.have += n;
                    if self.have == REPLY_HEADER {
                        self.check_reply_header()?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = self.fail(e);
                    return Err(self.remote_error(e));
                }
            }
        }
    }

    fn remote_error(&self, source: io::Error) -> RequestError {
        let head = match self.in_flight.front() {
            Some(Pending {
                what: Waiting::Request { chain, .. },
                ..
            }) => chain.head(),
            _ => 0,
        };
        RequestError::Remote { head, source }
    }

    /// A reply header just arrived: it must answer something, and fit the
    /// room that request gave (the server is bounded input too).
    fn check_reply_header(&mut self) -> Result<(), RequestError> {
        let len = le32(&self.reply[4..8]);
        let room = match self.in_flight.front() {
            None => None,
            Some(Pending {
                what: Waiting::Destroy,
                ..
            }) => Some(0),
            Some(Pending {
                what: Waiting::Request { chain, .. },
                ..
            }) => Some(chain.writable_len()),
        };
        let why = match room {
            None => format!("a reply of {len} bytes with nothing asked"),
            Some(room) if u64::from(len) > room => {
                format!("a reply of {len} bytes for {room} bytes of room")
            }
            Some(_) => return Ok(()),
        };
        let e = self.fail(io::Error::other(why));
        Err(self.remote_error(e))
    }

    /// The reply in `self.reply` is whole: it answers the oldest request.
    fn complete(&mut self) -> Result<Option<Completion>, RequestError> {
        let status = le32(&self.reply[0..4]);
        let Some(p) = self.in_flight.pop_front() else {
            // check_reply_header saw to it.
            return Ok(None);
        };
        let mut data = std::mem::take(&mut self.reply);
        data.drain(..REPLY_HEADER);
        self.have = 0;
        if p.generation != self.generation {
            return Ok(None);
        }
        match p.what {
            Waiting::Destroy if status == STATUS_OK => Ok(None),
            Waiting::Destroy => Err(RequestError::Remote {
                head: 0,
                source: io::Error::other(format!("destroy answered with status {status}")),
            }),
            Waiting::Request { chain, .. } if status != STATUS_OK => {
                Err(RequestError::RemoteRefused { head: chain.head() })
            }
            Waiting::Request { queue, chain } => Ok(Some(Completion { queue, chain, data })),
        }
    }
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
