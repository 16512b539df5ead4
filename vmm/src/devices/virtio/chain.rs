//! Validating descriptor chains from the guest.
//!
//! virtio-queue walks a chain but ends the walk silently on anything it cannot
//! follow (a loop longer than the queue, a `next` index out of range, an
//! unreadable descriptor). This module turns each of those into an error, and
//! checks what the library does not: every buffer lies inside guest memory, no
//! buffer is empty, readable buffers precede writable ones (virtio 2.7.4.2), and
//! the total length stays within the device's limit.
//!
//! [`validate`] does that once and returns a [`ValidChain`]: the checked
//! buffers copied out of the descriptor table, readable and writable parts
//! apart. Devices read and write guest data through it ([`ChainReader`],
//! [`ChainWriter`]) and never walk the descriptor table again, so a guest that
//! rewrites a descriptor after validation changes nothing the device uses.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::memory::GuestMemoryMmap;

/// A checked buffer: inside guest memory, non-empty, of a known direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the guest receives into it).
    pub write_only: bool,
}

/// How a chain (or the ring around it) was malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("the available ring index moved by more than the queue size")]
    AvailIndex,
    #[error("descriptor chain {head} is empty (head index out of range?)")]
    Empty { head: u16 },
    #[error(
        "descriptor chain {head} does not end (loop, bad next index or unreadable descriptor)"
    )]
    Unterminated { head: u16 },
    #[error("descriptor in chain {head} has length zero")]
    ZeroLength { head: u16 },
    #[error("descriptor in chain {head} at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { head: u16, addr: u64, len: u32 },
    #[error("descriptor chain {head} has a readable buffer after a writable one")]
    ReadAfterWrite { head: u16 },
    #[error("descriptor chain {head} has the wrong direction for this queue")]
    WrongDirection { head: u16 },
    #[error("descriptor chain {head} is longer ({total} bytes) than the device accepts ({max})")]
    TooLong { head: u16, total: u64, max: u64 },
    #[error("writing the used ring failed")]
    UsedRing,
    #[error("descriptor chain {head} holds fewer than the {need} bytes needed")]
    TooShort { head: u16, need: u64 },
    #[error("guest memory access in chain {head} at {addr:#x} failed")]
    Access { head: u16, addr: u64 },
}

/// Pops the next chain, first checking that the driver did not claim more new
/// entries than the ring holds (which would make us re-process old entries).
pub fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, ChainError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| ChainError::AvailIndex)?;
    let pending = avail - Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(ChainError::AvailIndex);
    }
    if pending.0 == 0 {
        return Ok(None);
    }
    let mut iter = queue.iter(mem).map_err(|_| ChainError::AvailIndex)?;
    Ok(iter.next())
}

/// Walks and checks a whole chain; `max_total` bounds the sum of lengths.
pub fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max_total: u64,
) -> Result<Vec<Desc>, ChainError> {
    let head = chain.head_index();
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut last_has_next = false;
    let mut seen_write = false;
    for d in chain {
        last_has_next = d.has_next();
        if d.len() == 0 {
            return Err(ChainError::ZeroLength { head });
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(ChainError::OutOfRange {
                head,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if d.is_write_only() {
            seen_write = true;
        } else if seen_write {
            return Err(ChainError::ReadAfterWrite { head });
        }
        total += u64::from(d.len());
        if total > max_total {
            return Err(ChainError::TooLong {
                head,
                total,
                max: max_total,
            });
        }
        out.push(Desc {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        });
    }
    if out.is_empty() {
        return Err(ChainError::Empty { head });
    }
    if last_has_next {
        return Err(ChainError::Unterminated { head });
    }
    Ok(out)
}

/// A descriptor chain validated once by [`validate`]: its buffers, copied out
/// of the descriptor table, all inside guest memory and non-empty, readable
/// ones first. What the guest writes to its descriptor table afterwards does
/// not reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidChain {
    head: u16,
    /// Every buffer in chain order; `descs[..split]` are readable.
    descs: Vec<Desc>,
    split: usize,
}

impl ValidChain {
    /// The head index (what goes back in the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Every buffer, in chain order.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// The device-readable buffers (the request).
    pub fn readable(&self) -> &[Desc] {
        &self.descs[..self.split]
    }

    /// The device-writable buffers (room for the reply).
    pub fn writable(&self) -> &[Desc] {
        &self.descs[self.split..]
    }

    pub fn readable_len(&self) -> u64 {
        self.readable().iter().map(|d| u64::from(d.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable().iter().map(|d| u64::from(d.len)).sum()
    }

    /// Reads the readable part from its start.
    pub fn reader<'a>(&'a self, mem: &'a GuestMemoryMmap) -> ChainReader<'a> {
        ChainReader {
            mem,
            head: self.head,
            bufs: self.readable(),
            at: 0,
            off: 0,
        }
    }

    /// Writes the writable part from its start.
    pub fn writer<'a>(&'a self, mem: &'a GuestMemoryMmap) -> ChainWriter<'a> {
        ChainWriter {
            mem,
            head: self.head,
            bufs: self.writable(),
            at: 0,
            off: 0,
            written: 0,
        }
    }
}

/// Checks `chain` once (see [`collect`]) and keeps the result.
pub fn validate(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max_total: u64,
) -> Result<ValidChain, ChainError> {
    let head = chain.head_index();
    let descs = collect(chain, mem, max_total)?;
    let split = descs
        .iter()
        .position(|d| d.write_only)
        .unwrap_or(descs.len());
    Ok(ValidChain { head, descs, split })
}

/// Copies guest bytes out of a [`ValidChain`]'s readable buffers, in order.
pub struct ChainReader<'a> {
    mem: &'a GuestMemoryMmap,
    head: u16,
    bufs: &'a [Desc],
    /// The current buffer and the offset in it.
    at: usize,
    off: u32,
}

impl ChainReader<'_> {
    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.bufs
            .iter()
            .skip(self.at)
            .map(|d| u64::from(d.len))
            .sum::<u64>()
            - u64::from(self.off)
    }

    /// Fills `buf`, or fails (having consumed what was there) if the chain
    /// holds fewer bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        while done < buf.len() {
            let Some(d) = self.bufs.get(self.at) else {
                return Err(ChainError::TooShort {
                    head: self.head,
                    need: buf.len() as u64,
                });
            };
            let n = ((d.len - self.off) as usize).min(buf.len() - done);
            let addr = d.addr.unchecked_add(u64::from(self.off));
            self.mem
                .read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| ChainError::Access {
                    head: self.head,
                    addr: addr.0,
                })?;
            done += n;
            self.off += n as u32;
            if self.off == d.len {
                self.at += 1;
                self.off = 0;
            }
        }
        Ok(())
    }
}

/// Copies bytes into a [`ValidChain`]'s writable buffers, in order.
pub struct ChainWriter<'a> {
    mem: &'a GuestMemoryMmap,
    head: u16,
    bufs: &'a [Desc],
    at: usize,
    off: u32,
    written: u32,
}

impl ChainWriter<'_> {
    /// Room left.
    pub fn available(&self) -> u64 {
        self.bufs
            .iter()
            .skip(self.at)
            .map(|d| u64::from(d.len))
            .sum::<u64>()
            - u64::from(self.off)
    }

    /// Bytes written so far (the used length).
    pub fn written(&self) -> u32 {
        self.written
    }

    /// Writes as much of `data` as fits; returns how much that was.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while done < data.len() {
            let Some(d) = self.bufs.get(self.at) else {
                break;
            };
            let n = ((d.len - self.off) as usize).min(data.len() - done);
            let addr = d.addr.unchecked_add(u64::from(self.off));
            self.mem
                .write_slice(&data[done..done + n], addr)
                .map_err(|_| ChainError::Access {
                    head: self.head,
                    addr: addr.0,
                })?;
            done += n;
            self.off += n as u32;
            // A chain is bounded by its device's limit, far below u32::MAX.
            self.written = self.written.saturating_add(n as u32);
            if self.off == d.len {
                self.at += 1;
                self.off = 0;
            }
        }
        Ok(done)
    }
}

/// Returns a chain to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), ChainError> {
    queue
        .add_used(mem, head, len)
        .map_err(|_| ChainError::UsedRing)
}

/// Test helpers: guest memory with a queue and hand-built chains.
#[cfg(test)]
pub mod test_utils {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    use crate::memory::GuestMemoryMmap;

    pub const MEM_SIZE: usize = 0x10_0000;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A descriptor: (address, length, device-writable, next index or None).
    pub fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = 0;
        if write {
            flags |= VRING_DESC_F_WRITE;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT;
        }
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            flags as u16,
            next.unwrap_or(0),
        ))
    }

    /// Places `descs` at table index 0.. and publishes `heads` in the avail ring.
    pub fn publish(
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        descs: &[RawDescriptor],
        heads: &[u16],
    ) {
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        let start = vq.avail().idx().load();
        for (i, h) in heads.iter().enumerate() {
            vq.avail()
                .ring()
                .ref_at((start as usize + i) % 16)
                .unwrap()
                .store(u16::to_le(*h));
        }
        vq.avail()
            .idx()
            .store(u16::to_le(start.wrapping_add(heads.len() as u16)));
    }

    /// A 16-entry queue in `mem`, ready, as the driver would configure it.
    pub fn queue<'a>(mem: &'a GuestMemoryMmap) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let q: Queue = vq.create_queue().unwrap();
        (vq, q)
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;

    fn first(
        descs: &[virtio_queue::desc::RawDescriptor],
        max: u64,
    ) -> Result<Vec<Desc>, ChainError> {
        let mem = memory();
        let (vq, mut q) = queue(&mem);
        publish(&vq, descs, &[0]);
        let c = pop(&mut q, &mem)?.expect("a chain");
        collect(c, &mem, max)
    }

    #[test]
    fn good_chain() {
        let v = first(
            &[
                desc(0x8000, 16, false, Some(1)),
                desc(0x9000, 64, true, None),
            ],
            1 << 20,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert!(!v[0].write_only && v[1].write_only);
    }

    #[test]
    fn zero_length() {
        let e = first(&[desc(0x8000, 0, true, None)], 1 << 20).unwrap_err();
        assert_eq!(e, ChainError::ZeroLength { head: 0 });
    }

    #[test]
    fn out_of_range() {
        let e = first(&[desc(MEM_SIZE as u64 - 8, 16, true, None)], 1 << 20).unwrap_err();
        assert!(matches!(e, ChainError::OutOfRange { .. }));
        let e = first(&[desc(u64::MAX - 4, 16, true, None)], 1 << 20).unwrap_err();
        assert!(matches!(e, ChainError::OutOfRange { .. }));
    }

    #[test]
    fn looping_chain() {
        let e = first(
            &[
                desc(0x8000, 8, false, Some(1)),
                desc(0x9000, 8, false, Some(0)),
            ],
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(e, ChainError::Unterminated { head: 0 });
        // A self-loop too.
        let e = first(&[desc(0x8000, 8, false, Some(0))], 1 << 20).unwrap_err();
        assert_eq!(e, ChainError::Unterminated { head: 0 });
    }

    #[test]
    fn next_index_out_of_range() {
        let e = first(&[desc(0x8000, 8, false, Some(200))], 1 << 20).unwrap_err();
        assert_eq!(e, ChainError::Unterminated { head: 0 });
    }

    #[test]
    fn head_index_out_of_range() {
        let mem = memory();
        let (vq, mut q) = queue(&mem);
        publish(&vq, &[desc(0x8000, 8, true, None)], &[40]);
        let c = pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(
            collect(c, &mem, 1 << 20).unwrap_err(),
            ChainError::Empty { head: 40 }
        );
    }

    #[test]
    fn read_after_write() {
        let e = first(
            &[desc(0x8000, 8, true, Some(1)), desc(0x9000, 8, false, None)],
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(e, ChainError::ReadAfterWrite { head: 0 });
    }

    #[test]
    fn oversized() {
        let e = first(
            &[
                desc(0x8000, 0x8000, true, Some(1)),
                desc(0x10000, 0x8000, true, None),
            ],
            0xffff,
        )
        .unwrap_err();
        assert!(matches!(e, ChainError::TooLong { .. }));
    }

    #[test]
    fn avail_index_jump_is_refused() {
        let mem = memory();
        let (vq, mut q) = queue(&mem);
        vq.avail().idx().store(u16::to_le(17));
        assert_eq!(pop(&mut q, &mem).unwrap_err(), ChainError::AvailIndex);
    }

    #[test]
    fn a_valid_chain_is_split_and_owns_its_buffers() {
        let mem = memory();
        let (vq, mut q) = queue(&mem);
        publish(
            &vq,
            &[
                desc(0x8000, 3, false, Some(1)),
                desc(0x9000, 5, false, Some(2)),
                desc(0xa000, 4, true, Some(3)),
                desc(0xb000, 4, true, None),
            ],
            &[0],
        );
        mem.write_slice(b"abc", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x9000)).unwrap();
        let c = pop(&mut q, &mem).unwrap().unwrap();
        let v = validate(c, &mem, 1 << 20).unwrap();
        assert_eq!((v.readable().len(), v.writable().len()), (2, 2));
        assert_eq!((v.readable_len(), v.writable_len()), (8, 8));
        // The guest rewrites its table after validation: nothing changes.
        vq.desc_table()
            .store(2, desc(0x100, 0x8000, true, None))
            .unwrap();
        let mut r = v.reader(&mem);
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abcdef");
        assert_eq!(r.remaining(), 2);
        assert!(matches!(
            r.read_exact(&mut buf),
            Err(ChainError::TooShort { .. })
        ));
        let mut w = v.writer(&mem);
        assert_eq!(w.write(b"0123456789").unwrap(), 8);
        assert_eq!((w.written(), w.available()), (8, 0));
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(&got, b"0123");
        mem.read_slice(&mut got, GuestAddress(0xb000)).unwrap();
        assert_eq!(&got, b"4567");
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, [0; 4], "the rewritten descriptor is never used");
    }

    #[test]
    fn empty_ring_pops_nothing() {
        let mem = memory();
        let (_vq, mut q) = queue(&mem);
        assert!(pop(&mut q, &mem).unwrap().is_none());
    }
}
