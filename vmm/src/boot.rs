//! Loading the guest kernel, its initramfs and command line, and writing the
//! boot-protocol structures.
//!
//! PVH first: an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note is entered
//! in 32-bit protected mode with `hvm_start_info`, skipping the bzImage
//! decompressor and real-mode setup: the fastest way into the kernel. An ELF
//! without the note is entered at its 64-bit entry with a zero page; a bzImage is
//! the fallback for kernels built only as one.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory, ReadVolatile};

use crate::arch::x86_64::{e820_map, layout, BootProtocol, EntryPoint};
use crate::memory::{low_ram_end, populate_down, GuestMemoryMmap};

/// Magic of `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux boot protocol constants (Documentation/arch/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point is 0x200 past the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel: neither an ELF vmlinux ({elf}) nor a bzImage ({bzimage})")]
    Kernel {
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("loading the ELF kernel: {0}")]
    Elf(linux_loader::loader::Error),
    #[error("the initramfs ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitramfsTooBig {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("reading the initramfs into guest memory: {0}")]
    InitramfsRead(String),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing the command line: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("writing boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    #[error("the guest memory map has {0} entries, more than the boot protocol holds")]
    TooManyE820(usize),
    #[error("the thread loading the kernel and initramfs panicked")]
    LoaderPanicked,
}

/// A kernel in guest memory, and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// First guest address after the kernel image (including its bss).
    pub kernel_end: u64,
    /// bzImage only: the setup header to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Where the initramfs went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    pub addr: u64,
    pub size: u64,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the kernel from an open image: ELF (PVH if it can) first, bzImage
/// otherwise.
pub fn load_kernel_from<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: std::io::Read + ReadVolatile + Seek,
{
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    match Elf::load(mem, None, image, highmem) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
                    protocol: BootProtocol::Pvh,
                    addr: addr.0,
                },
                _ => EntryPoint {
                    protocol: BootProtocol::Linux64,
                    addr: r.kernel_load.0,
                },
            };
            tracing::debug!(?entry, kernel_end = r.kernel_end, "loaded ELF kernel");
            Ok(LoadedKernel {
                entry,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(linux_loader::loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {
            image
                .seek(SeekFrom::Start(0))
                .map_err(|e| BootError::Open {
                    path: "kernel".into(),
                    source: e,
                })?;
            match BzImage::load(mem, None, image, highmem) {
                Ok(r) => {
                    let entry = EntryPoint {
                        protocol: BootProtocol::Linux64,
                        addr: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    };
                    tracing::debug!(?entry, "loaded bzImage kernel");
                    Ok(LoadedKernel {
                        entry,
                        kernel_end: r.kernel_end,
                        setup_header: r.setup_header,
                    })
                }
                Err(bzimage) => Err(BootError::Kernel {
                    elf: linux_loader::loader::Error::Elf(ElfError::InvalidElfMagicNumber),
                    bzimage,
                }),
            }
        }
        Err(e) => Err(BootError::Elf(e)),
    }
}

/// Whether the open kernel image is an ELF file (a `vmlinux`), from its
/// magic; the file is left at its start for the loader.
fn is_elf(f: &mut File, path: &Path) -> Result<bool, BootError> {
    let io = |source| BootError::Open {
        path: path.display().to_string(),
        source,
    };
    let mut magic = [0u8; 4];
    let elf = match std::io::Read::read_exact(f, &mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        // Too short to be either; load_kernel_from says why.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(io(e)),
    };
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(elf)
}

/// Places the initramfs as high in low RAM as it goes (below `max_addr`), page
/// aligned, above the kernel: the kernel's own early allocations grow up from its end.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<Initramfs, BootError> {
    let mut f = open(path)?;
    let size = f
        .metadata()
        .map_err(|source| BootError::Open {
            path: path.display().to_string(),
            source,
        })?
        .len();
    load_initramfs_from(mem, &mut f, size, kernel_end, max_addr)
}

/// [`load_initramfs`] from an open file of `size` bytes.
pub fn load_initramfs_from<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    f: &mut F,
    size: u64,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<Initramfs, BootError> {
    let mut limit = low_ram_end(mem);
    if let Some(max) = max_addr {
        limit = limit.min(max.saturating_add(1));
    }
    let too_big = BootError::InitramfsTooBig {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end || addr < layout::HIGH_MEMORY_START {
        return Err(BootError::InitramfsTooBig {
            size,
            kernel_end,
            limit,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), f, size as usize)
        .map_err(|e| BootError::InitramfsRead(e.to_string()))?;
    Ok(Initramfs { addr, size })
}

/// The guest command line: `base`, then one `virtio_mmio.device=4K@0x<addr>:<irq>`
/// per device.
pub fn build_cmdline(base: &str, devices: &[(u64, u32)]) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(layout::CMDLINE_MAX_SIZE)?;
    if !base.trim().is_empty() {
        c.insert_str(base.trim())?;
    }
    for (addr, irq) in devices {
        c.add_virtio_mmio_device(layout::VIRTIO_MMIO_SIZE, GuestAddress(*addr), *irq, None)?;
    }
    Ok(c)
}

/// Writes the command line and the boot-protocol structures for `kernel`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initramfs: Option<Initramfs>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(BootError::CmdlineLoad)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    let e820 = e820_map(mem);
    match kernel.entry.protocol {
        BootProtocol::Pvh => write_pvh(mem, &e820, initramfs),
        BootProtocol::Linux64 => write_zero_page(mem, kernel, &e820, cmdline_len, initramfs),
    }
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initramfs: Option<Initramfs>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO_ADDR));
    if let Some(i) = initramfs {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_ADDR;
        params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    e820: &[(u64, u64, u32)],
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
) -> Result<(), BootError> {
    let mut bp = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        bp.hdr = hdr;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    bp.hdr.header = KERNEL_HDR_MAGIC;
    bp.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    bp.hdr.cmdline_size = cmdline_len as u32;
    bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(i) = initramfs {
        bp.hdr.ramdisk_image = i.addr as u32;
        bp.hdr.ramdisk_size = i.size as u32;
    }
    if e820.len() > bp.e820_table.len() {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (slot, (addr, size, type_)) in bp.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
        };
    }
    bp.e820_entries = e820.len() as u8;
    let params = BootParams::new(&bp, GuestAddress(layout::ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

/// Largest address the initramfs may end at, from a bzImage's header.
pub fn initrd_addr_max(kernel: &LoadedKernel) -> Option<u64> {
    kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
}

/// Guest memory a Linux boot touches before its init runs besides the
/// kernel and initramfs (read from husk-vmm's page map at the init of a
/// 6.1 guest, 256 MiB): its early allocations just below the initramfs
/// (memblock allocates top-down), the first pages after the kernel's
/// image (bss and brk), and low memory. Faulted in by the loaders while the
/// VM is set up on the host's other CPU, instead of one 2 MiB fault at a
/// time on the boot vCPU's path; pages the guest would touch anyway, so no
/// memory is spent that the boot would not spend.
const EARLY_BELOW_INITRAMFS: u64 = 6 << 20;
const EARLY_ABOVE_KERNEL: u64 = 2 << 20;
const EARLY_LOW: (u64, u64) = (0, 6 << 20);

/// The kernel and initramfs in guest memory: what [`load`] leaves for
/// [`finish`], which needs the command line (and so the devices).
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    kernel: LoadedKernel,
    initramfs: Option<Initramfs>,
}

/// Everything [`crate::vmm`] needs to start the boot vCPU.
pub fn prepare(
    mem: &GuestMemoryMmap,
    kernel_path: &Path,
    initramfs_path: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<EntryPoint, BootError> {
    finish(mem, &load(mem, kernel_path, initramfs_path)?, cmdline)
}

/// Loads the kernel and the initramfs into guest memory. Needs nothing of
/// the VM but its RAM, so it can run while KVM and the devices are set up.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel_path: &Path,
    initramfs_path: Option<&Path>,
) -> Result<Loaded, BootError> {
    let mut image = open(kernel_path)?;
    let (kernel, initramfs) = match initramfs_path {
        // An ELF kernel sets no ceiling for the initramfs (only a bzImage's
        // header does), so its place is known before the kernel is loaded
        // and the two load at once. Writing fresh guest memory is most of
        // the VMM's start-up in the nested test host (a first touch there
        // can stall for hundreds of milliseconds, and under THP each one
        // clears 2 MiB); two threads overlap it, and a third faults the
        // kernel's pages in from the top while the loader fills them from
        // the bottom.
        Some(p) if is_elf(&mut image, kernel_path)? => std::thread::scope(|s| {
            let i = s.spawn(|| {
                let i = load_initramfs(mem, p, 0, None)?;
                populate_down(mem, i.addr.saturating_sub(EARLY_BELOW_INITRAMFS), i.addr);
                Ok::<_, BootError>(i)
            });
            if let Some((lo, hi)) = elf_load_span(&image) {
                s.spawn(move || {
                    populate_down(mem, lo, hi.saturating_add(EARLY_ABOVE_KERNEL));
                    populate_down(mem, EARLY_LOW.0, EARLY_LOW.1);
                });
            }
            let k = load_kernel_from(mem, &mut image);
            let i = i.join().map_err(|_| {
                BootError::InitramfsRead("the initramfs loader thread panicked".into())
            })?;
            let (k, i) = (k?, i?);
            if i.addr < k.kernel_end {
                return Err(BootError::InitramfsTooBig {
                    size: i.size,
                    kernel_end: k.kernel_end,
                    limit: i.addr + i.size,
                });
            }
            Ok((k, Some(i)))
        })?,
        Some(p) => {
            let k = load_kernel_from(mem, &mut image)?;
            let i = load_initramfs(mem, p, k.kernel_end, initrd_addr_max(&k))?;
            (k, Some(i))
        }
        None => (load_kernel_from(mem, &mut image)?, None),
    };
    Ok(Loaded { kernel, initramfs })
}

/// Writes the boot parameters for a loaded kernel and says where to enter it.
pub fn finish(
    mem: &GuestMemoryMmap,
    loaded: &Loaded,
    cmdline: &Cmdline,
) -> Result<EntryPoint, BootError> {
    let Loaded { kernel, initramfs } = *loaded;
    write_boot_params(mem, &kernel, cmdline, initramfs)?;
    // Memory sanity: the entry must be guest RAM, or the vCPU faults on its first fetch.
    if !mem.address_in_range(GuestAddress(kernel.entry.addr)) {
        return Err(BootError::Elf(
            linux_loader::loader::Error::InvalidKernelStartAddress,
        ));
    }
    Ok(kernel.entry)
}

/// The guest range `[lowest, highest)` an ELF64 kernel's file-backed
/// `PT_LOAD` segments fill, from its program headers: only a hint of which
/// pages to fault in early (linux-loader validates and loads; this reads
/// the few header fields it needs at fixed offsets rather than a second
/// ELF parser). None when the headers are not what a vmlinux has.
fn elf_load_span(f: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    const PT_LOAD: u32 = 1;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0).ok()?;
    // ELFCLASS64, little-endian.
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let (phoff, entsize, num) = (u64_at(&eh, 32)?, u16_at(&eh, 54)?, u16_at(&eh, 56)?);
    if entsize < 56 || num == 0 || num > 64 {
        return None;
    }
    let mut ph = vec![0u8; usize::from(entsize) * usize::from(num)];
    f.read_exact_at(&mut ph, phoff).ok()?;
    let mut span: Option<(u64, u64)> = None;
    for h in ph.chunks_exact(usize::from(entsize)) {
        let (kind, paddr, filesz) = (u32_at(h, 0)?, u64_at(h, 24)?, u64_at(h, 32)?);
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        let end = paddr.checked_add(filesz)?;
        span = Some(match span {
            None => (paddr, end),
            Some((lo, hi)) => (lo.min(paddr), hi.max(end)),
        });
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Cursor;
    use vm_memory::Bytes;

    /// A minimal ELF64 kernel: one PT_LOAD at `paddr` with `code`, and optionally
    /// a PT_NOTE holding a Xen PHYS32_ENTRY note pointing at `pvh_entry`.
    fn tiny_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let ph_off = 64u64;
        let note_off = ph_off + 56 * u64::from(phnum);
        let mut note = Vec::new();
        if let Some(e) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&e.to_le_bytes());
        }
        let code_off = note_off + note.len() as u64;
        let mut v = Vec::new();
        v.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        v.extend_from_slice(&ph_off.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        v.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v.extend_from_slice(&phnum.to_le_bytes());
        v.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        assert_eq!(v.len(), 64);
        let phdr = |v: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
            v.extend_from_slice(&ty.to_le_bytes());
            v.extend_from_slice(&5u32.to_le_bytes()); // R+X
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&addr.to_le_bytes()); // vaddr
            v.extend_from_slice(&addr.to_le_bytes()); // paddr
            v.extend_from_slice(&size.to_le_bytes()); // filesz
            v.extend_from_slice(&size.to_le_bytes()); // memsz
            v.extend_from_slice(&4u64.to_le_bytes());
        };
        phdr(&mut v, 1, code_off, paddr, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(&mut v, 4, note_off, 0, note.len() as u64);
        }
        v.extend_from_slice(&note);
        v.extend_from_slice(code);
        v
    }

    #[test]
    fn elf_with_pvh_note_boots_through_pvh() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let img = tiny_elf(0x100_0000, &[0xf4; 16], Some(0x100_0008));
        let k = load_kernel_from(&ram.memory, &mut Cursor::new(img)).unwrap();
        assert_eq!(
            k.entry,
            EntryPoint {
                protocol: BootProtocol::Pvh,
                addr: 0x100_0008
            }
        );
        assert_eq!(k.kernel_end, 0x100_0010);
        let b: u8 = ram.memory.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn the_elf_load_span_is_read_from_the_program_headers() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &tiny_elf(0x100_0000, &[0xf4; 16], None)).unwrap();
        assert_eq!(elf_load_span(&f), Some((0x100_0000, 0x100_0010)));
        let mut g = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut g, b"\x7fELF but nothing after").unwrap();
        assert_eq!(elf_load_span(&g), None);
    }

    #[test]
    fn kernel_and_initramfs_load_together_and_finish_with_the_cmdline() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
        std::fs::write(&k, tiny_elf(0x100_0000, &[0xf4; 16], Some(0x100_0008))).unwrap();
        std::fs::write(&i, [0x5a; 5000]).unwrap();
        let loaded = load(&ram.memory, &k, Some(&i)).unwrap();
        let cmdline = build_cmdline("console=ttyS0", &[]).unwrap();
        let entry = finish(&ram.memory, &loaded, &cmdline).unwrap();
        assert_eq!(entry.addr, 0x100_0008);
        let b: u8 = ram.memory.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(b, 0xf4);
        let initrd = loaded.initramfs.unwrap();
        assert_eq!(initrd.size, 5000);
        let b: u8 = ram
            .memory
            .read_obj(GuestAddress(initrd.addr + 4999))
            .unwrap();
        assert_eq!(b, 0x5a);
    }

    #[test]
    fn elf_without_note_boots_64bit() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let img = tiny_elf(0x100_0000, &[0x90; 8], None);
        let k = load_kernel_from(&ram.memory, &mut Cursor::new(img)).unwrap();
        assert_eq!(
            k.entry,
            EntryPoint {
                protocol: BootProtocol::Linux64,
                addr: 0x100_0000
            }
        );
    }

    #[test]
    fn garbage_is_rejected_as_both_formats() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let err = load_kernel_from(&ram.memory, &mut Cursor::new(vec![0u8; 8192])).unwrap_err();
        assert!(matches!(err, BootError::Kernel { .. }), "{err}");
    }

    #[test]
    fn elf_loading_outside_memory_fails_cleanly() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let img = tiny_elf(0x1_0000_0000, &[0x90; 8], None);
        assert!(load_kernel_from(&ram.memory, &mut Cursor::new(img)).is_err());
    }

    #[test]
    fn cmdline_announces_virtio_mmio_devices() {
        let c =
            build_cmdline("console=ttyS0 quiet", &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram_page_aligned() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let data = vec![0xabu8; 10_000];
        let i = load_initramfs_from(
            &ram.memory,
            &mut Cursor::new(data.clone()),
            10_000,
            0x200_0000,
            None,
        )
        .unwrap();
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 64 << 20);
        assert!(i.addr + i.size > (64 << 20) - 4096 * 4);
        let mut back = vec![0u8; 10_000];
        ram.memory
            .read_slice(&mut back, GuestAddress(i.addr))
            .unwrap();
        assert_eq!(back, data);
        // A bzImage limit below the top of RAM is honoured.
        let i = load_initramfs_from(
            &ram.memory,
            &mut Cursor::new(data),
            10_000,
            0x200_0000,
            Some(0x2ff_ffff),
        )
        .unwrap();
        assert!(i.addr + i.size <= 0x300_0000);
    }

    #[test]
    fn initramfs_overlapping_the_kernel_is_refused() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let size = 20 << 20;
        let err = load_initramfs_from(
            &ram.memory,
            &mut Cursor::new(vec![0u8; size]),
            size as u64,
            0x100_0000,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooBig { .. }));
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_memmap_and_module() {
        let ram = create_guest_memory(128 << 20).unwrap();
        let k = LoadedKernel {
            entry: EntryPoint {
                protocol: BootProtocol::Pvh,
                addr: 0x100_0000,
            },
            kernel_end: 0x200_0000,
            setup_header: None,
        };
        let c = build_cmdline("console=ttyS0", &[]).unwrap();
        let initrd = Initramfs {
            addr: 0x700_0000,
            size: 0x1000,
        };
        write_boot_params(&ram.memory, &k, &c, Some(initrd)).unwrap();
        let si: hvm_start_info = ram
            .memory
            .read_obj(GuestAddress(layout::PVH_START_INFO_ADDR))
            .unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.cmdline_paddr, layout::CMDLINE_ADDR);
        assert_eq!(
            (si.nr_modules, si.modlist_paddr),
            (1, layout::PVH_MODLIST_ADDR)
        );
        assert_eq!(si.memmap_entries, 3);
        let m: hvm_modlist_entry = ram
            .memory
            .read_obj(GuestAddress(layout::PVH_MODLIST_ADDR))
            .unwrap();
        assert_eq!((m.paddr, m.size), (0x700_0000, 0x1000));
        let e: hvm_memmap_table_entry = ram
            .memory
            .read_obj(GuestAddress(layout::PVH_MEMMAP_ADDR + 48))
            .unwrap();
        assert_eq!((e.addr, e.type_), (layout::HIGH_MEMORY_START, 1));
        let mut cl = [0u8; 14];
        ram.memory
            .read_slice(&mut cl, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }

    #[test]
    fn zero_page_has_e820_and_ramdisk() {
        let ram = create_guest_memory(128 << 20).unwrap();
        let k = LoadedKernel {
            entry: EntryPoint {
                protocol: BootProtocol::Linux64,
                addr: 0x100_0200,
            },
            kernel_end: 0x200_0000,
            setup_header: Some(setup_header::default()),
        };
        let c = build_cmdline("console=ttyS0", &[(0xd000_0000, 5)]).unwrap();
        write_boot_params(
            &ram.memory,
            &k,
            &c,
            Some(Initramfs {
                addr: 0x700_0000,
                size: 42,
            }),
        )
        .unwrap();
        let bp: boot_params = ram
            .memory
            .read_obj(GuestAddress(layout::ZERO_PAGE_ADDR))
            .unwrap();
        assert_eq!(bp.e820_entries, 3);
        let (h_magic, h_flag, ptr, rd) = (
            bp.hdr.header,
            bp.hdr.boot_flag,
            bp.hdr.cmd_line_ptr,
            bp.hdr.ramdisk_image,
        );
        assert_eq!(
            (h_magic, h_flag),
            (KERNEL_HDR_MAGIC, KERNEL_BOOT_FLAG_MAGIC)
        );
        assert_eq!(ptr as u64, layout::CMDLINE_ADDR);
        assert_eq!(rd, 0x700_0000);
    }
}
