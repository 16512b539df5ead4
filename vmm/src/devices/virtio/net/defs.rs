//! Constants of virtio-net (virtio 1.2, section 5.1) and the tap interface
//! (`linux/if_tun.h`), named where they come from.

/// Device ID (virtio 1.2, 5 Device Types).
pub const TYPE_NET: u32 = 1;

/// Queue indices: one RX/TX pair, no control queue (5.1.2).
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
/// Entries per queue: 256 keeps a 64 KiB RX buffer per entry within what a
/// guest posts at once, and matches what Linux sizes its rings to by default.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_GUEST_UFO: u64 = 1 << 10;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

/// `status` in the config space (5.1.4): the link is up.
pub const S_LINK_UP: u16 = 1;

/// The header in front of every frame both ways when VERSION_1 is
/// negotiated (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers. The tap is told the same size (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;
/// Where `num_buffers` sits in it.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// The largest frame either way, header not counted: a 64 KiB GSO packet
/// (Linux's `GSO_LEGACY_MAX_SIZE`) plus an Ethernet header with one VLAN
/// tag. A TX chain carrying more is dropped; RX never reads more.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;
/// The shortest TX frame passed on: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// The most bytes an RX chain may offer. Linux's "big packets" buffers (no
/// MRG_RXBUF, GSO negotiated) are `MAX_SKB_FRAGS + 1` pages and a header;
/// this leaves room for kernels built with more fragments while bounding
/// the walk.
pub const MAX_RX_CHAIN: u64 = 256 << 10;

/// Chains handled per queue per wake-up before the other direction gets a
/// turn (and the guest an interrupt), so neither starves the other.
pub const BATCH: usize = 64;

/// `linux/if_tun.h` request codes and offload flags (libc names them too;
/// they are repeated here with their values so the seccomp rule and the
/// calls cannot disagree).
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
pub const TUNGETIFF: u64 = 0x8004_54d2;
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// What the tap should hand the guest given the features it accepted: the
/// guest's RX offloads, in the tap's words. TSO needs checksum offload
/// (virtio 5.1.3.1), so without GUEST_CSUM nothing is turned on.
pub fn tap_offloads(acked: u64) -> u32 {
    if acked & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if acked & F_GUEST_TSO4 != 0 {
        f |= TUN_F_TSO4;
    }
    if acked & F_GUEST_TSO6 != 0 {
        f |= TUN_F_TSO6;
    }
    if acked & F_GUEST_ECN != 0 && acked & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
        f |= TUN_F_TSO_ECN;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_codes_match_libc() {
        assert_eq!(TUNSETOFFLOAD as libc::Ioctl, libc::TUNSETOFFLOAD);
        assert_eq!(TUNGETIFF as libc::Ioctl, libc::TUNGETIFF);
        assert_eq!(TUNSETVNETHDRSZ as libc::Ioctl, libc::TUNSETVNETHDRSZ);
        assert_eq!(TUN_F_CSUM, libc::TUN_F_CSUM);
        assert_eq!(TUN_F_TSO4, libc::TUN_F_TSO4);
        assert_eq!(TUN_F_TSO6, libc::TUN_F_TSO6);
        assert_eq!(TUN_F_TSO_ECN, libc::TUN_F_TSO_ECN);
    }

    #[test]
    fn offloads_follow_what_the_guest_acked() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(F_GUEST_TSO4 | F_GUEST_TSO6),
            0,
            "TSO without CSUM"
        );
        assert_eq!(tap_offloads(F_GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(tap_offloads(F_GUEST_CSUM | F_GUEST_ECN), TUN_F_CSUM);
        // Host-side (TX) features change nothing the tap hands us.
        assert_eq!(tap_offloads(F_CSUM | F_HOST_TSO4), 0);
    }
}
