//! The Intel MultiProcessor Specification 1.4 table: how an SMP guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! The table is built as bytes (little-endian, packed, as the spec lays it out)
//! rather than through `#[repr(C)]` structs, so no `unsafe` is needed to write it.
//!
//! Layout: floating pointer (16 B) | config table header (44 B) | one processor
//! entry per vCPU (20 B) | ISA bus (8 B) | IOAPIC (8 B) | one I/O interrupt entry
//! per IOAPIC pin (8 B) | LINT0 ExtINT and LINT1 NMI (8 B each).

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemoryMmap;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC_REV: u8 = 4; // MP spec 1.4
const MPC_OEM: &[u8; 8] = b"HUSK    ";
const MPC_PRODUCT: &[u8; 12] = b"MICROVM     ";
/// An integrated-APIC version (0x1x); KVM's LAPIC reports 0x14.
const APIC_VERSION: u8 = 0x14;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU | APIC feature flags for processor entries.
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURES: u32 = (1 << 9) | 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity/trigger "conforms to the bus": edge, active high on ISA.
const IRQ_FLAGS_DEFAULT: u16 = 0;

/// The most vCPUs the table can describe: APIC IDs are 8 bits and the IOAPIC
/// takes the ID after the last CPU.
pub const MAX_CPUS: u8 = 254;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (1..={MAX_CPUS})")]
    BadCpuCount(u8),
    #[error("the MP table does not fit below the end of base memory ({0} bytes)")]
    TooBig(usize),
    #[error("writing the MP table into guest memory failed")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the whole MP table as it should appear at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::BadCpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;
    let table_addr = base + 16;

    // Entries after the 44-byte header.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, matching KVM's default GSI routing.
    for irq in 0..=layout::IRQ_MAX as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of the bootstrap CPU: ExtINT (the PIC); LINT1 of every CPU (0xff): NMI.
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0u8, 0u8), (INT_TYPE_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, dest, lint]);
        count += 1;
    }

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(MPC_OEM);
    table.extend_from_slice(MPC_PRODUCT);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&layout::APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(table.len(), 44);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(MPC_SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a config table is present
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` at [`layout::MPTABLE_ADDR`].
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(layout::MPTABLE_ADDR, num_cpus)?;
    if layout::MPTABLE_ADDR + bytes.len() as u64 > layout::BASE_MEMORY_END {
        return Err(MptableError::TooBig(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_ADDR))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 2, 4, 16] {
            let t = build(layout::MPTABLE_ADDR, cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, layout::MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 2 + 24 + 2);
            // The first processor entry is the enabled bootstrap processor.
            assert_eq!(&table[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        }
    }

    #[test]
    fn fits_below_base_memory_end_for_max_cpus() {
        let t = build(layout::MPTABLE_ADDR, MAX_CPUS).unwrap();
        // 254 CPUs: 16 + 44 + 254*20 + ... > 1 KiB; the VMM limits vCPUs well below.
        assert!(t.len() > 1024);
        let t = build(layout::MPTABLE_ADDR, 32).unwrap();
        assert!(layout::MPTABLE_ADDR + t.len() as u64 <= layout::BASE_MEMORY_END);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert_eq!(build(0, 0), Err(MptableError::BadCpuCount(0)));
        assert_eq!(build(0, 255), Err(MptableError::BadCpuCount(255)));
    }
}
