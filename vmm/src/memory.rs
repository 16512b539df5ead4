//! Guest memory: one memfd, mapped shared, split into regions around the 32-bit
//! MMIO hole.
//!
//! A memfd rather than anonymous memory so that later snapshot and VM-template
//! work can hand the same pages to another process (or map them copy-on-write);
//! it is sealed against shrinking, because truncating a mapped file turns guest
//! accesses into SIGBUS in the VMM.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// The guest memory type used across the VMM (no dirty bitmap yet).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors from building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the memfd to {size} bytes failed: {source}")]
    SetLen {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing the memfd failed: {0}")]
    Seal(#[source] std::io::Error),
    #[error("mapping guest memory failed: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error(
        "guest memory size {0} bytes is not usable (needs a multiple of 4 KiB, at least 32 MiB)"
    )]
    BadSize(u64),
}

/// The smallest guest that the kernel, initramfs and boot tables fit into.
pub const MIN_MEMORY: u64 = 32 << 20;

/// Guest memory and the memfd it lives in.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// Kept so the pages can be shared later (snapshots, templates).
    pub memfd: File,
}

/// Creates a sealed memfd of `size` bytes.
pub fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a NUL-terminated literal and the flags are constants; the
    // return value is checked before use.
    let fd = unsafe { libc::memfd_create(c"husk-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::SetLen { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with constant arguments.
    let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Creates `size` bytes of guest RAM laid out by [`layout::ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    if size < MIN_MEMORY || size & 0xfff != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let memfd = create_memfd(size)?;
    let mut ranges = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in layout::ram_ranges(size) {
        let f = memfd.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(f, file_offset)),
        ));
        file_offset += len;
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    Ok(GuestRam { memory, memfd })
}

/// The end of the RAM region that starts at guest address 0 (the "low" RAM).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemory;
    mem.iter()
        .find(|r| r.start_addr() == GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn small_guest_is_one_region_backed_by_the_memfd() {
        let ram = create_guest_memory(64 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        assert_eq!(low_ram_end(&ram.memory), 64 << 20);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the memfd: the pages are shared.
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&ram.memfd, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn memfd_cannot_shrink() {
        let f = create_memfd(1 << 20).unwrap();
        assert!(f.set_len(4096).is_err());
    }

    #[test]
    fn big_guest_skips_the_hole() {
        // MAP_NORESERVE: 4 GiB of address space, no memory touched.
        let ram = create_guest_memory(4 << 30).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        assert!(!ram
            .memory
            .address_in_range(GuestAddress(layout::MMIO_HOLE_START)));
        assert!(ram.memory.address_in_range(GuestAddress(1 << 32)));
        assert_eq!(low_ram_end(&ram.memory), layout::MMIO_HOLE_START);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            create_guest_memory((64 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
    }
}
