//! Guest memory, split into regions around the 32-bit MMIO hole.
//!
//! Two backings ([`Backing`]):
//! - **Anonymous** (the default): private anonymous memory, 2 MiB-aligned.
//!   Each first touch of a guest page is a fault that KVM takes on the host
//!   (an EPT/NPT violation, a VM exit); where the host backs the mapping
//!   with transparent huge pages, one fault maps 2 MiB instead of 4 KiB.
//!   Measured in the nested test host: 973 such exits in a boot against
//!   6460 with the memfd (docs/vmm.md, "Boot time"). The host address is
//!   aligned to 2 MiB because KVM maps a huge page into the guest only
//!   when the guest and host addresses agree modulo 2 MiB. The mapping is
//!   not `MADV_HUGEPAGE`-advised: with the usual `defrag=madvise`, advised
//!   faults compact memory synchronously, which made the set-up far
//!   more variable there for no gain in the median; the host's THP policy
//!   decides, as it does for Firecracker.
//! - **Memfd**: one sealed memfd, mapped shared, for work that hands the
//!   same pages to another process. Shared memory (shmem) gets huge pages
//!   only where the host's `shmem_enabled` says so, which by default it
//!   does not. The memfd is sealed against shrinking, because truncating a
//!   mapped file turns guest accesses into SIGBUS in the VMM.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

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
    #[error("reserving {size} bytes of address space for guest memory failed: {source}")]
    Reserve {
        size: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("building a guest memory region failed: {0}")]
    Region(String),
    #[error(
        "guest memory size {0} bytes is not usable (needs a multiple of 4 KiB, at least 32 MiB)"
    )]
    BadSize(u64),
}

/// The smallest guest that the kernel, initramfs and boot tables fit into.
pub const MIN_MEMORY: u64 = 32 << 20;

/// The huge page size that the anonymous backing aligns to.
const HUGE_PAGE: usize = 2 << 20;

/// What guest RAM lives in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory, advised for transparent huge pages.
    #[default]
    Anonymous,
    /// A sealed memfd, mapped shared.
    Memfd,
}

/// Guest memory and, for the memfd backing, the memfd it lives in.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// Kept so the pages can be shared later (snapshots, templates).
    pub memfd: Option<File>,
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

/// Creates `size` bytes of guest RAM laid out by [`layout::ram_ranges`], in
/// the default backing.
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    create_guest_memory_in(size, Backing::default())
}

/// Creates `size` bytes of guest RAM in `backing`.
pub fn create_guest_memory_in(size: u64, backing: Backing) -> Result<GuestRam, MemoryError> {
    if size < MIN_MEMORY || size & 0xfff != 0 {
        return Err(MemoryError::BadSize(size));
    }
    match backing {
        Backing::Anonymous => Ok(GuestRam {
            memory: anonymous_memory(size)?,
            memfd: None,
        }),
        Backing::Memfd => memfd_memory(size),
    }
}

fn memfd_memory(size: u64) -> Result<GuestRam, MemoryError> {
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
    Ok(GuestRam {
        memory,
        memfd: Some(memfd),
    })
}

/// One 2 MiB-aligned private anonymous mapping per RAM range, named
/// `husk-guest-ram` (so that `/proc/PID/smaps` tells guest RAM from the
/// VMM's own memory).
///
/// The mappings are never unmapped: guest RAM lives as long as the process
/// (one VM per process), and vCPU and device threads hold views of it until
/// the process exits, so unmapping it earlier could pull pages from under a
/// thread that is still running.
fn anonymous_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let mut regions = Vec::new();
    for (start, len) in layout::ram_ranges(size) {
        let len = len as usize;
        let addr = reserve_aligned(len, prot, flags)?;
        // SAFETY: [addr, addr + len) is the private anonymous mapping that
        // reserve_aligned just made with exactly these prot and flags; it is
        // never unmapped (see above), so the region stays valid.
        let region = unsafe { MmapRegion::<()>::build_raw(addr, len, prot, flags) }
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| MemoryError::Region(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// Maps `len` bytes at a 2 MiB-aligned address: maps `len + 2 MiB`, then
/// unmaps the unaligned head and the tail.
fn reserve_aligned(len: usize, prot: i32, flags: i32) -> Result<*mut u8, MemoryError> {
    let reserve = |source| MemoryError::Reserve { size: len, source };
    let total = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| reserve(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choice;
    // nothing else in the process is affected. The result is checked.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(reserve(std::io::Error::last_os_error()));
    }
    let base = base as usize;
    let aligned = (base + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let head = aligned - base;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping made above and outside
    // [aligned, aligned + len), which is what we keep; an munmap failure
    // would only leave address space reserved.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: prctl on the mapping we own; a name is only a label, and a
    // kernel without anonymous VMA names (before 5.17, or without
    // CONFIG_ANON_VMA_NAME) leaves the mapping working, so the result is
    // deliberately ignored.
    unsafe {
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
            aligned as libc::c_ulong,
            len as libc::c_ulong,
            c"husk-guest-ram".as_ptr() as libc::c_ulong,
        );
    }
    Ok(aligned as *mut u8)
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
        let ram = create_guest_memory_in(64 << 20, Backing::Memfd).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        assert_eq!(low_ram_end(&ram.memory), 64 << 20);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the memfd: the pages are shared.
        let mut buf = [0u8; 4];
        let memfd = ram.memfd.as_ref().unwrap();
        std::os::unix::fs::FileExt::read_exact_at(memfd, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn memfd_cannot_shrink() {
        let f = create_memfd(1 << 20).unwrap();
        assert!(f.set_len(4096).is_err());
    }

    #[test]
    fn anonymous_ram_is_huge_page_aligned_private_and_named() {
        let ram = create_guest_memory(64 << 20).unwrap();
        assert!(ram.memfd.is_none());
        let host = ram.memory.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "host address {host:#x}");
        ram.memory
            .write_obj(0x1234_5678_u32, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(
            ram.memory.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
            0x1234_5678
        );
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{host:x}-")))
            .expect("the mapping is listed");
        assert!(line.contains("rw-p"), "{line}");
        // Anonymous VMA names need Linux 5.17 and CONFIG_ANON_VMA_NAME.
        if line.contains('[') {
            assert!(line.contains("husk-guest-ram"), "{line}");
        }
    }

    #[test]
    fn big_guest_skips_the_hole() {
        // MAP_NORESERVE: 4 GiB of address space, no memory touched.
        for backing in [Backing::Anonymous, Backing::Memfd] {
            big_guest_skips_the_hole_in(backing);
        }
    }

    fn big_guest_skips_the_hole_in(backing: Backing) {
        let ram = create_guest_memory_in(4 << 30, backing).unwrap();
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
