//! The guest-physical address map. Every fixed address the VMM writes to lives here,
//! so overlaps can be checked in one place (see the tests).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info        0x0000_6040  PVH module list (initramfs)
//! 0x0000_7000  PVH memory map / zero page (bzImage boot_params)
//! 0x0000_8ff0  boot stack (64-bit Linux boot)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  MP table (last KiB of base memory, where Linux scans for it)
//! 0x0010_0000  high memory: the kernel loads at or above this
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// Boot GDT and IDT.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;

/// PVH boot structures (xen/include/public/arch-x86/hvm/start_info.h).
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;

/// Linux boot protocol zero page (Documentation/arch/x86/boot.rst).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;

/// Initial stack for the 64-bit Linux entry; PVH sets up its own.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for the 64-bit Linux entry.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;

/// Kernel command line and its size limit (x86 COMMAND_LINE_SIZE, with the NUL).
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// MP table: the MP spec has the OS scan the last KiB of base memory.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of base ("conventional") memory; 0xa0000..0x100000 is the legacy VGA/BIOS hole.
pub const BASE_MEMORY_END: u64 = 0xa0000;

/// Where high memory (and the kernel) starts.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: no RAM between these addresses.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// virtio-mmio device windows: 4 KiB each, from here up.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// The in-kernel IOAPIC and LAPIC (architectural defaults).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// KVM needs three pages for the TSS of real-mode emulation on Intel; in the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// IRQ lines (IOAPIC pins = GSIs with the in-kernel irqchip's default routing).
pub const IRQ_COM1: u32 = 4;
pub const IRQ_VIRTIO_FIRST: u32 = 5;
/// The IOAPIC has 24 pins.
pub const IRQ_MAX: u32 = 23;

/// The legacy I/O ports the VMM emulates.
pub const PORT_COM1: u16 = 0x3f8;
pub const PORT_COM1_LEN: u16 = 8;
pub const PORT_I8042: u16 = 0x60;
/// 0x60 (data) .. 0x64 (command): vm-superio's i8042 takes offsets 0 and 4.
pub const PORT_I8042_LEN: u16 = 5;

/// The guest RAM ranges for `size` bytes of memory, skipping the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The guest-physical address of virtio-mmio device `index`.
pub fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_memory_structures_do_not_overlap() {
        // (start, len) of every fixed structure below 1 MiB.
        let mut v = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (PVH_START_INFO_ADDR, 0x40),
            (PVH_MODLIST_ADDR, 0x40),
            (PVH_MEMMAP_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPTE_ADDR, 0x1000),
            (PDE_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_ADDR, BASE_MEMORY_END - MPTABLE_ADDR),
        ];
        v.sort();
        for w in v.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const { assert!(BOOT_STACK_POINTER < PML4_ADDR && BOOT_STACK_POINTER > PVH_MEMMAP_ADDR) };
        assert!(v.last().map(|l| l.0 + l.1).unwrap() <= HIGH_MEMORY_START);
    }

    #[test]
    fn ram_skips_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn devices_sit_in_the_hole() {
        let last = virtio_mmio_addr(IRQ_MAX - IRQ_VIRTIO_FIRST) + VIRTIO_MMIO_SIZE;
        const { assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START) };
        assert!(last <= u64::from(IOAPIC_ADDR));
        assert!(
            KVM_TSS_ADDR + 3 * 4096 <= u64::from(IOAPIC_ADDR)
                || KVM_TSS_ADDR > u64::from(APIC_ADDR)
        );
    }
}
