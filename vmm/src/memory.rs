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
        // never unmapped (see above).
        regions.push(unsafe { region_at(addr, len, prot, flags, start) }?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// The guest region at guest address `start` over the host mapping
/// [`addr`, `addr + len`).
///
/// # Safety
/// The range must be a live mapping made with `prot` and `flags` that is
/// never unmapped while the region (or guest memory built from it) lives.
unsafe fn region_at(
    addr: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
    start: u64,
) -> Result<GuestRegionMmap<()>, MemoryError> {
    // SAFETY: the caller's promise above is what build_raw asks for.
    let region = unsafe { MmapRegion::<()>::build_raw(addr, len, prot, flags) }
        .map_err(|e| MemoryError::Region(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(start))
        .ok_or_else(|| MemoryError::Region(format!("region at {start:#x} overflows")))
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

/// Which pages of this process's memory were ever populated, from
/// `/proc/self/pagemap` (opened before the Landlock jail, which would refuse
/// it later). A page of fresh anonymous guest RAM that is neither present
/// nor swapped out was never touched, so it reads as zeros: a snapshot need
/// not read it (reading it would fault it in, a VM exit each in the nested
/// test host). Only true of anonymous RAM: a restored VM's RAM is a file
/// mapping, whose untouched pages hold the file's bytes.
pub struct Populated {
    pagemap: File,
}

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

impl Populated {
    pub fn open() -> std::io::Result<Self> {
        Ok(Populated {
            pagemap: File::open("/proc/self/pagemap")?,
        })
    }

    /// Whether each of the `out.len()` pages from `host_addr` was populated.
    fn read(&self, host_addr: usize, out: &mut [bool]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut raw = vec![0u8; out.len() * 8];
        self.pagemap
            .read_exact_at(&mut raw, (host_addr / PAGE_SIZE) as u64 * 8)?;
        for (o, e) in out.iter_mut().zip(raw.chunks_exact(8)) {
            let e = u64::from_ne_bytes(e.try_into().unwrap_or_default());
            *o = e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0;
        }
        Ok(())
    }
}

const PAGE_SIZE: usize = 4096;

/// Writes guest RAM to `path` (through a temporary file, synced, renamed
/// over), each RAM range after the last as [`layout::ram_ranges`] orders
/// them, so the file is exactly the guest's RAM size. Pages that are all
/// zeros are left as holes: the file is as sparse as the guest's memory is
/// untouched, and a restore reads zeros there as fresh memory would. With
/// `populated` (fresh anonymous RAM only), pages never touched are not even
/// read. The vCPUs must be paused.
pub fn save_memory(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
    populated: Option<&Populated>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemory};
    const CHUNK: usize = 1 << 20;
    static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp)?;
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut present = vec![true; CHUNK / PAGE_SIZE];
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let pages = n.div_ceil(PAGE_SIZE);
            if let Some(p) = populated {
                let host = mem
                    .get_host_address(GuestAddress(start + done))
                    .map_err(std::io::Error::other)?;
                p.read(host as usize, &mut present[..pages])?;
            }
            for (i, _) in present[..pages].iter().enumerate().filter(|(_, p)| **p) {
                let at = i * PAGE_SIZE;
                let page = &mut buf[..PAGE_SIZE.min(n - at)];
                mem.read_slice(page, GuestAddress(start + done + at as u64))
                    .map_err(std::io::Error::other)?;
                // A slice comparison is a memcmp, fast in a debug build too.
                if *page != ZEROS[..page.len()] {
                    file.write_all_at(page, offset + done + at as u64)?;
                }
            }
            done += n as u64;
        }
        offset += len;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Guest RAM of `size` bytes mapped copy-on-write from a file that
/// [`save_memory`] wrote: every VM restored from one file shares its page
/// cache until it writes a page. Each range is placed 2 MiB-aligned, as
/// fresh RAM is. A file of another size is refused.
pub fn restore_memory(path: &std::path::Path, size: u64) -> Result<GuestRam, MemoryError> {
    use std::os::fd::AsRawFd;
    if size < MIN_MEMORY || size & 0xfff != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let map_err = |e: std::io::Error| MemoryError::Region(format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(map_err)?;
    let len = file.metadata().map_err(map_err)?.len();
    if len != size {
        return Err(MemoryError::Region(format!(
            "{}: {len} bytes of memory for a guest of {size}",
            path.display()
        )));
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout::ram_ranges(size) {
        let n = len as usize;
        let addr = reserve_aligned(
            n,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )?;
        // SAFETY: MAP_FIXED over [addr, addr + n), the anonymous reservation
        // made just above and owned by nothing else; the file is open and
        // at least offset + n long (checked above); the result is checked.
        let mapped = unsafe {
            libc::mmap(
                addr.cast(),
                n,
                prot,
                flags | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        // SAFETY: [addr, addr + n) is now the private file mapping made
        // above with these prot and flags; like fresh RAM it is never
        // unmapped.
        regions.push(unsafe { region_at(addr, n, prot, flags, start) }?);
        offset += len;
    }
    Ok(GuestRam {
        memory: GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?,
        memfd: None,
    })
}

/// The end of the RAM region that starts at guest address 0 (the "low" RAM).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemory;
    mem.iter()
        .find(|r| r.start_addr() == GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0)
}

/// Faults in `[start, end)` of guest RAM writable without touching what is
/// there (`MADV_POPULATE_WRITE`, Linux 5.14), 2 MiB at a time from the top
/// down, so that a loader filling the range from the bottom up meets
/// pages already there instead of taking each fault (and, under THP, the
/// clearing of 2 MiB) itself. Safe beside writers: population never changes
/// a byte. Best effort: a range outside RAM, or a kernel without the
/// advice, populates nothing; returns the bytes populated.
pub fn populate_down(mem: &GuestMemoryMmap, start: u64, end: u64) -> u64 {
    use vm_memory::GuestMemory;
    const STEP: u64 = HUGE_PAGE as u64;
    let mut done = 0;
    let mut top = end;
    while top > start {
        let bottom = (top - 1) & !(STEP - 1);
        let bottom = bottom.max(start & !(PAGE_SIZE as u64 - 1));
        let len = (top - bottom) as usize;
        let Ok(slice) = mem.get_slice(GuestAddress(bottom), len) else {
            return done;
        };
        let ptr = slice.ptr_guard_mut().as_ptr();
        // SAFETY: madvise on a range inside guest RAM's own mapping (the
        // slice was bounds-checked above); MADV_POPULATE_WRITE only faults
        // pages in, as a write would, without writing: concurrent loaders
        // see their bytes unchanged.
        let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            return done;
        }
        done += len as u64;
        top = bottom;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn populating_keeps_what_is_written_and_stays_in_ram() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let mem = &ram.memory;
        mem.write_obj(0xabu8, GuestAddress((5 << 20) + 7)).unwrap();
        let done = populate_down(mem, (4 << 20) + 100, 9 << 20);
        // Page-aligned below, to the end above; a kernel without the
        // advice (before 5.14) populates nothing, which is allowed.
        assert!(done == 0 || done == (9 << 20) - (4 << 20), "{done}");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((5 << 20) + 7)).unwrap(),
            0xab
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(6 << 20)).unwrap(), 0);
        // Past RAM: nothing, and no error.
        assert_eq!(populate_down(mem, 70 << 20, 80 << 20), 0);
    }

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

    /// Saved RAM restores byte for byte, copy-on-write: a restored guest's
    /// writes never reach the file, and untouched memory stays a hole.
    #[test]
    fn saved_memory_restores_private_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let size = 64 << 20;
        let ram = create_guest_memory(size).unwrap();
        let marks = [
            (0x1000u64, 0x1111_u64),
            (0x20_0000, 0x2222),
            (size - 8, 0x3333),
        ];
        for (addr, v) in marks {
            ram.memory.write_obj(v, GuestAddress(addr)).unwrap();
        }
        // Through the pagemap: only the touched pages are read.
        save_memory(&ram.memory, &path, Some(&Populated::open().unwrap())).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} blocks: not sparse",
            meta.blocks()
        );

        let a = restore_memory(&path, size).unwrap();
        let b = restore_memory(&path, size).unwrap();
        for (addr, v) in marks {
            assert_eq!(a.memory.read_obj::<u64>(GuestAddress(addr)).unwrap(), v);
        }
        let host = a.memory.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        a.memory
            .write_obj(0xdead_u64, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            b.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0x1111
        );
        let mut head = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&File::open(&path).unwrap(), &mut head, 0x1000)
            .unwrap();
        assert_eq!(u64::from_le_bytes(head), 0x1111, "the file is not written");

        // A restored VM's RAM is saved whole (its untouched pages are the
        // file's): the same bytes come out again.
        let again = dir.path().join("again");
        save_memory(&a.memory, &again, None).unwrap();
        let c = restore_memory(&again, size).unwrap();
        assert_eq!(
            c.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xdead
        );
        for (addr, v) in &marks[1..] {
            assert_eq!(c.memory.read_obj::<u64>(GuestAddress(*addr)).unwrap(), *v);
        }

        // Another size, or a file cut short, is refused.
        assert!(restore_memory(&path, 128 << 20).is_err());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size - 4096)
            .unwrap();
        assert!(restore_memory(&path, size).is_err());
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
