//! x86_64: the VM-wide setup (irqchip, PIT, TSS) and the per-vCPU boot state
//! (CPUID, MSRs, registers, FPU, LAPIC), plus the e820 map and MP table.
//!
//! Interrupt controller: the in-kernel irqchip (KVM_CREATE_IRQCHIP: PIC, IOAPIC
//! and LAPICs in the host kernel) with the in-kernel PIT. A split irqchip would
//! move the IOAPIC and PIC into this process, which costs a user-space exit per
//! EOI and adds code we would have to harden; the in-kernel one gives irqfd
//! delivery straight to an IOAPIC pin with no VMM involvement, which is what the
//! virtio-mmio devices need. The PIT is there because Linux calibrates against it
//! when the TSC frequency is not enumerated.

pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod state;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemory, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
pub use regs::BootProtocol;

/// Errors of the x86_64 VM and vCPU setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    #[error("CPUID has too many entries for KVM: {0}")]
    CpuidTooBig(usize),
    #[error(transparent)]
    BootTables(#[from] regs::BootTableWriteError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

/// VM-wide setup, before any vCPU is created.
pub fn setup_vm(vm: &VmFd) -> Result<(), ArchError> {
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The dummy speaker port keeps port 0x61 in the kernel too.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// KVM's supported CPUID, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, ArchError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub protocol: BootProtocol,
    pub addr: u64,
}

/// Sets the boot state of vCPU `index`. Only vCPU 0 gets registers: with the
/// in-kernel LAPIC the others wait for INIT/SIPI from the guest, which resets them.
pub fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    supported: &CpuId,
    index: u8,
    count: u8,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), ArchError> {
    let mut entries = supported.as_slice().to_vec();
    cpuid::filter(
        &mut entries,
        cpuid::CpuidParams {
            cpu_index: index,
            cpu_count: count,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        },
    );
    let cpuid = CpuId::from_entries(&entries).map_err(|_| ArchError::CpuidTooBig(entries.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    let msrs = msr::boot_msrs();
    let wanted = msrs.as_slice().len();
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != wanted {
        return Err(ArchError::Msrs { set, wanted });
    }

    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    interrupts::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

    if index == 0 {
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        regs::setup_sregs(mem, &mut sregs, entry.protocol)?;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::boot_regs(entry.protocol, entry.addr))
            .map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry: (address, size, type).
pub type E820Entry = (u64, u64, u32);

/// The guest's memory map: base memory up to the MP table, the MP table reserved,
/// the 640 KiB..1 MiB legacy hole left out, then RAM.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        if start == 0 {
            map.push((0, layout::MPTABLE_ADDR, E820_RAM));
            map.push((
                layout::MPTABLE_ADDR,
                layout::BASE_MEMORY_END - layout::MPTABLE_ADDR,
                E820_RESERVED,
            ));
            if end > layout::HIGH_MEMORY_START {
                map.push((
                    layout::HIGH_MEMORY_START,
                    end - layout::HIGH_MEMORY_START,
                    E820_RAM,
                ));
            }
        } else {
            map.push((start, region.len(), E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn e820_for_small_and_large_guests() {
        let small = create_guest_memory(128 << 20).unwrap();
        assert_eq!(
            e820_map(&small.memory),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
        let big = create_guest_memory(5 << 30).unwrap();
        let m = e820_map(&big.memory);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[3],
            (1 << 32, (5 << 30) - layout::MMIO_HOLE_START, E820_RAM)
        );
    }
    // Whether KVM accepts this vCPU state is proven by booting real guests
    // with 1, 2 and 4 vCPUs: tests/tests/vmm.rs, in the test host.
}
