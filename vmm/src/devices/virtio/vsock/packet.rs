//! Packets: guest TX chains parsed (with virtio-vsock) into a typed, owned
//! [`TxPacket`] once; RX headers built from a typed [`Header`].

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;

use super::defs::*;
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

/// Parses a TX chain (already validated by `chain::collect`).
pub fn parse_tx(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, ParseError> {
    let pkt = VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA)
        .map_err(|e| ParseError(format!("{e:?}")))?;
    let hdr = Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    let mut data = Vec::new();
    if hdr.op == OP_RW && hdr.len > 0 {
        let slice = pkt
            .data_slice()
            .ok_or_else(|| ParseError("RW packet without data".into()))?;
        // virtio-vsock bounded the slice by the header's len, itself at most MAX_PKT_DATA.
        data = vec![0u8; hdr.len as usize];
        slice
            .read_slice(&mut data, 0)
            .map_err(|e| ParseError(format!("reading packet data: {e}")))?;
    }
    Ok(TxPacket { hdr, data })
}

/// Writes `hdr` and `data` into an RX chain; returns the used length.
/// `data` must fit the chain's data buffer (the caller sized it with [`rx_capacity`]).
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<&GuestMemoryMmap>,
    hdr: &Header,
    data: &[u8],
) -> Result<u32, ParseError> {
    let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
        .map_err(|e| ParseError(format!("{e:?}")))?;
    let mut hdr = *hdr;
    hdr.len = data.len() as u32;
    pkt.header_slice()
        .write_slice(&hdr.to_bytes(), 0)
        .map_err(|e| ParseError(format!("writing header: {e}")))?;
    if !data.is_empty() {
        let slice = pkt
            .data_slice()
            .ok_or_else(|| ParseError("RX chain without data buffer".into()))?;
        if slice.len() < data.len() {
            return Err(ParseError("RX data buffer too small".into()));
        }
        slice
            .write_slice(data, 0)
            .map_err(|e| ParseError(format!("writing data: {e}")))?;
    }
    Ok(PKT_HEADER_SIZE as u32 + data.len() as u32)
}

/// How many payload bytes an RX chain can take.
pub fn rx_capacity(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Result<usize, ParseError> {
    let mut c = chain.clone();
    let pkt = VsockPacket::from_rx_virtq_chain(mem, &mut c, MAX_PKT_DATA)
        .map_err(|e| ParseError(format!("{e:?}")))?;
    Ok(pkt.data_slice().map_or(0, |s| s.len()))
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
