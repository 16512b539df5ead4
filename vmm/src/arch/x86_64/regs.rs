//! Boot-time register state: the GDT, the segment and control registers, the
//! identity page tables for the 64-bit entry, the general registers and the FPU.
//!
//! Two entry protocols:
//! - PVH (xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, flat
//!   4 GiB segments, `ebx` = physical address of `hvm_start_info`.
//! - Linux 64-bit boot (Documentation/arch/x86/boot.rst): long mode with an
//!   identity map covering the kernel, `rsi` = the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemoryMmap;

/// Which protocol the vCPU enters the kernel with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    Pvh,
    Linux64,
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 2;

/// Writes failed because the low boot area is not RAM (cannot happen with a valid
/// layout; kept as an error rather than a panic).
#[derive(Debug, thiserror::Error)]
#[error("writing the boot {0} into guest memory failed")]
pub struct BootTableWriteError(pub &'static str);

/// A GDT descriptor from its access/flags word (`flags`: bits 0..7 = access byte,
/// bits 12..15 = AVL/L/DB/G), base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// The boot GDT: null, code, data, TSS.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB
            gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB
            gdt_entry(0x008b, 0, 0x67),    // TSS (a minimal one)
        ],
        BootProtocol::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (L set)
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) the page tables; fills `sregs`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), BootTableWriteError> {
    let gdt = boot_gdt(protocol);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(|_| BootTableWriteError("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(|_| BootTableWriteError("IDT"))?;

    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel's own
/// startup code, which builds real page tables right away.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootTableWriteError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(
        layout::PDPTE_ADDR | PRESENT_RW,
        GuestAddress(layout::PML4_ADDR),
    )
    .map_err(|_| BootTableWriteError("PML4"))?;
    mem.write_obj(
        layout::PDE_ADDR | PRESENT_RW,
        GuestAddress(layout::PDPTE_ADDR),
    )
    .map_err(|_| BootTableWriteError("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | HUGE | PRESENT_RW,
            GuestAddress(layout::PDE_ADDR + i * 8),
        )
        .map_err(|_| BootTableWriteError("page directory"))?;
    }
    Ok(())
}

/// The general registers at the kernel's entry.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    match protocol {
        BootProtocol::Pvh => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: layout::PVH_START_INFO_ADDR,
            ..Default::default()
        },
        BootProtocol::Linux64 => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_ADDR,
            ..Default::default()
        },
    }
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_match_the_architecture() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), 0x0000_8b00_0000_0067);
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0xabcde) >> 56, 0x12);
    }

    #[test]
    fn segments_decode_their_entries() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.l, code.g, code.present, code.s),
            (8, 1, 1, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.selector), (0x67, 0, 0x18));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let based = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0x10), 2);
        assert_eq!(based.base, 0x1234_5678);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let mut s = kvm_sregs::default();
        setup_sregs(&ram.memory, &mut s, BootProtocol::Pvh).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.ds.limit, 0xffff_ffff);
        let gdt1: u64 = ram
            .memory
            .read_obj(GuestAddress(layout::GDT_ADDR + 8))
            .unwrap();
        assert_eq!(gdt1, 0x00cf_9b00_0000_ffff);
        let r = boot_regs(BootProtocol::Pvh, 0x100_0000);
        assert_eq!(
            (r.rip, r.rbx, r.rflags),
            (0x100_0000, layout::PVH_START_INFO_ADDR, 2)
        );
    }

    #[test]
    fn linux64_sregs_enable_long_mode_with_identity_map() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let mut s = kvm_sregs::default();
        setup_sregs(&ram.memory, &mut s, BootProtocol::Linux64).unwrap();
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        let pml4: u64 = ram
            .memory
            .read_obj(GuestAddress(layout::PML4_ADDR))
            .unwrap();
        assert_eq!(pml4, layout::PDPTE_ADDR | 3);
        let pde5: u64 = ram
            .memory
            .read_obj(GuestAddress(layout::PDE_ADDR + 5 * 8))
            .unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
        let r = boot_regs(BootProtocol::Linux64, 0x100_0200);
        assert_eq!(r.rsi, layout::ZERO_PAGE_ADDR);
    }
}
