//! Packets: guest TX chains, validated once (`chain::validate`), parsed into a
//! typed, owned [`TxPacket`]; RX packets written into a validated chain from a
//! typed [`Header`]. Only the validated buffers are used: the descriptor table
//! is never read again. The buffer layout rules are virtio-vsock's (0.11),
//! which parsed these chains before and which the Linux driver follows.

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Address, Bytes, GuestAddress};

use super::defs::*;
use crate::devices::virtio::chain::ValidChain;
use crate::memory::GuestMemoryMmap;

/// A packet header (struct virtio_vsock_hdr), host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The 44-byte little-endian wire form.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reset that answers `self` (ports and CIDs swapped).
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }
}

/// A packet from the guest, copied out of guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub data: Vec<u8>,
}

/// Why a TX chain could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("malformed vsock TX packet: {0}")]
pub struct ParseError(pub String);

/// The header size on the wire (struct virtio_vsock_hdr).
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

impl Header {
    /// Reads the 44-byte little-endian wire form.
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Header {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

fn read(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ParseError> {
    mem.read_slice(buf, addr)
        .map_err(|e| ParseError(format!("reading guest memory: {e}")))
}

/// Parses a TX chain validated by `chain::validate`, with the buffer layout
/// the Linux driver (and virtio-vsock's `from_tx_virtq_chain`) uses: the
/// header at the start of the first, readable, buffer; the data after it when
/// that is the only buffer, else at the start of the second.
pub fn parse_tx(mem: &GuestMemoryMmap, chain: &ValidChain) -> Result<TxPacket, ParseError> {
    let descs = chain.descs();
    let first = descs
        .first()
        .ok_or_else(|| ParseError("empty chain".into()))?;
    if first.write_only {
        return Err(ParseError("TX header in a write-only buffer".into()));
    }
    if (first.len as usize) < PKT_HEADER_SIZE {
        return Err(ParseError("TX header buffer too small".into()));
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    read(mem, first.addr, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len == 0 {
        return Ok(TxPacket {
            hdr,
            data: Vec::new(),
        });
    }
    if hdr.len > MAX_PKT_DATA {
        return Err(ParseError(format!("header len {} too large", hdr.len)));
    }
    // Where the data lies (checked for every packet with a length, as before;
    // copied only for RW, the one op that carries data).
    let at = if descs.len() == 1 && first.len - PKT_HEADER_SIZE as u32 >= hdr.len {
        // `validate` checked the whole buffer is inside guest memory.
        first.addr.unchecked_add(PKT_HEADER_SIZE as u64)
    } else {
        let data = descs
            .get(1)
            .ok_or_else(|| ParseError("TX chain too short for its data".into()))?;
        if data.write_only {
            return Err(ParseError("TX data in a write-only buffer".into()));
        }
        if data.len < hdr.len {
            return Err(ParseError("TX data buffer too small".into()));
        }
        data.addr
    };
    let mut data = Vec::new();
    if hdr.op == OP_RW {
        data = vec![0u8; hdr.len as usize];
        read(mem, at, &mut data)?;
    }
    Ok(TxPacket { hdr, data })
}

/// Where a guest RX chain takes a packet (the layout of virtio-vsock's
/// `from_rx_virtq_chain`): the header at the start of the first, writable,
/// buffer; the data after it when that is the only buffer, else the whole
/// second buffer.
#[derive(Clone, Copy, Debug)]
pub struct RxBuffer {
    header: GuestAddress,
    data: GuestAddress,
    capacity: u32,
}

impl RxBuffer {
    pub fn new(chain: &ValidChain) -> Result<RxBuffer, ParseError> {
        let descs = chain.descs();
        let first = descs
            .first()
            .ok_or_else(|| ParseError("empty chain".into()))?;
        if !first.write_only {
            return Err(ParseError("RX header in a read-only buffer".into()));
        }
        if (first.len as usize) < PKT_HEADER_SIZE {
            return Err(ParseError("RX header buffer too small".into()));
        }
        let (data, capacity) = if descs.len() == 1 && first.len as usize > PKT_HEADER_SIZE {
            (
                first.addr.unchecked_add(PKT_HEADER_SIZE as u64),
                first.len - PKT_HEADER_SIZE as u32,
            )
        } else {
            let d = descs
                .get(1)
                .ok_or_else(|| ParseError("RX chain without data buffer".into()))?;
            if !d.write_only {
                return Err(ParseError("RX data in a read-only buffer".into()));
            }
            if d.len > MAX_PKT_DATA {
                return Err(ParseError("RX data buffer too long".into()));
            }
            (d.addr, d.len)
        };
        Ok(RxBuffer {
            header: first.addr,
            data,
            capacity,
        })
    }

    /// How many payload bytes it takes.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Writes `hdr` (with `len` set to the data's) and `data`; returns the used
    /// length. `data` must fit [`RxBuffer::capacity`].
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        data: &[u8],
    ) -> Result<u32, ParseError> {
        if data.len() > self.capacity() {
            return Err(ParseError("RX data buffer too small".into()));
        }
        let mut hdr = *hdr;
        hdr.len = data.len() as u32;
        mem.write_slice(&hdr.to_bytes(), self.header)
            .map_err(|e| ParseError(format!("writing header: {e}")))?;
        if !data.is_empty() {
            mem.write_slice(data, self.data)
                .map_err(|e| ParseError(format!("writing data: {e}")))?;
        }
        Ok(PKT_HEADER_SIZE as u32 + data.len() as u32)
    }
}

/// How many payload bytes an RX chain can take.
pub fn rx_capacity(chain: &ValidChain) -> Result<usize, ParseError> {
    Ok(RxBuffer::new(chain)?.capacity())
}

/// Writes `hdr` and `data` into an RX chain; returns the used length.
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: &ValidChain,
    hdr: &Header,
    data: &[u8],
) -> Result<u32, ParseError> {
    RxBuffer::new(chain)?.write(mem, hdr, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_wire_layout() {
        let h = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), OP_RW);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 7);
        let r = h.rst_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op),
            (3, 2, 1024, 0x1122_3344, OP_RST)
        );
    }
}
