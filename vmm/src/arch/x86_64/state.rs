//! The state KVM holds for a VM and its vCPUs, read out and written back:
//! the first part of snapshot and restore (issue #14). Everything here is
//! KVM's own structures, kept as KVM returns them (kvm-bindings derives
//! their serde forms), so a restore hands back exactly what was read.
//!
//! Order matters on restore, for reasons in the kernel's KVM code:
//! - CPUID first: KVM checks later state (XSAVE features, MSRs) against it.
//! - `mp_state` before the registers, since setting it can reset the vCPU's
//!   pending INIT/SIPI handling.
//! - XSAVE after the special registers (CR4.OSXSAVE decides what loads).
//! - the LAPIC before the MSRs: MSR_IA32_APICBASE and the TSC-deadline
//!   timer act on it.
//! - among the MSRs, the TSC before the TSC deadline, which KVM arms
//!   relative to the TSC (and would otherwise fire at once or never).
//! - vCPU events last: they hold pending exceptions and NMIs that the
//!   writes above could otherwise clear.
//!
//! The VM's state is the in-kernel irqchip (the two PICs and the IOAPIC),
//! the PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSR indices that need an order of their own (msr-index.h).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM took {set} of {wanted} MSRs back (MSR {index:#x} refused)")]
    Msrs {
        set: usize,
        wanted: usize,
        index: u32,
    },
    #[error("{0}")]
    Invalid(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU's state. (kvm_xsave and kvm_irqchip are neither Clone nor
/// PartialEq: their serde form is the state's identity.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// In the order they are written back ([`restore_order`]).
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
}

/// The VM-wide state of the in-kernel devices and clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs worth saving: those KVM lists as its own, each of which it
/// can read back on this host (probed once per VMM, on `vcpu`).
pub fn saved_msr_indices(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut readable = Vec::new();
    for &index in list.as_slice() {
        // One at a time: a batch stops at the first MSR this host refuses.
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        if vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))? == 1 {
            readable.push(index);
        }
    }
    Ok(restore_order(readable))
}

/// `indices` in the order KVM must see them written: the TSC deadline
/// after the TSC, everything else as listed.
pub fn restore_order(mut indices: Vec<u32>) -> Vec<u32> {
    let late = |i: &u32| *i == MSR_IA32_TSC_DEADLINE;
    let early = |i: &u32| *i == MSR_IA32_TSC;
    indices.sort_by_key(|i| (!early(i), late(i)));
    indices
}

/// Reads a vCPU's state; `msr_indices` from [`saved_msr_indices`]. The
/// vCPU must not be running (its thread paused out of KVM_RUN).
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut batch = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid(format!("MSRs: {e:?}")))?;
        let read = vcpu.get_msrs(&mut batch).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read != chunk.len() {
            return Err(StateError::Msrs {
                set: read,
                wanted: chunk.len(),
                index: chunk.get(read).copied().unwrap_or_default(),
            });
        }
        msrs.extend_from_slice(batch.as_slice());
    }
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        msrs,
        mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        debug_regs: vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        vcpu_events: vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes a vCPU's state back, in the order the module's comment gives,
/// into a fresh vCPU of a VM restored with [`restore_vm`].
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: a kvm_xsave that KVM_GET_XSAVE filled for a vCPU with this
    // CPUID: its size is the legacy 4 KiB area KVM_SET_XSAVE reads, and no
    // feature beyond it (AMX) is enabled by this VMM's CPUID.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let batch =
            Msrs::from_entries(chunk).map_err(|e| StateError::Invalid(format!("MSRs: {e:?}")))?;
        let set = vcpu.set_msrs(&batch).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(StateError::Msrs {
                set,
                wanted: chunk.len(),
                index: chunk.get(set).map(|e| e.index).unwrap_or_default(),
            });
        }
    }
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Reads the VM's in-kernel device state and clock (vCPUs paused).
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Writes the VM's state back into a VM set up as a fresh one is
/// (`setup_vm`: irqchip and PIT created), before its vCPUs are restored.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // The guest's clock goes on from where it stopped; the flags KVM
    // reported (TSC_STABLE, HOST_TSC) are not ones it takes back.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_goes_first_and_its_deadline_last() {
        let order = restore_order(vec![
            0x174,
            MSR_IA32_TSC_DEADLINE,
            0x1a0,
            MSR_IA32_TSC,
            0x175,
        ]);
        assert_eq!(
            order,
            [MSR_IA32_TSC, 0x174, 0x1a0, 0x175, MSR_IA32_TSC_DEADLINE]
        );
    }

    /// A VM set up as husk-vmm sets one up, with one vCPU in its boot
    /// state: what is read is what a second VM takes back, and reads back
    /// the same, through serde (the snapshot file's form) on the way.
    #[test]
    fn state_read_from_one_vm_is_what_another_takes_back() {
        let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
        let make = || {
            let vm = kvm.create_vm().expect("KVM_CREATE_VM");
            super::super::setup_vm(&vm).expect("irqchip and PIT");
            let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
            let cpuid = super::super::supported_cpuid(&kvm).expect("CPUID");
            vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
            (vm, vcpu)
        };
        let (vm1, vcpu1) = make();
        let mut regs = vcpu1.get_regs().unwrap();
        (regs.rip, regs.rsi, regs.rflags) = (0x100_0000, 0x7000, 0x2);
        vcpu1.set_regs(&regs).unwrap();
        vcpu1.set_msrs(&super::super::msr::boot_msrs()).unwrap();
        let indices = saved_msr_indices(&kvm, &vcpu1).unwrap();
        assert!(indices.contains(&MSR_IA32_TSC), "{indices:x?}");
        let (vcpu_state, vm_state) = (save_vcpu(&vcpu1, &indices).unwrap(), save_vm(&vm1).unwrap());
        let json = serde_json::to_vec(&(&vcpu_state, &vm_state)).unwrap();
        let (vcpu_state, vm_state): (VcpuState, VmState) = serde_json::from_slice(&json).unwrap();

        let (vm2, vcpu2) = make();
        restore_vm(&vm2, &vm_state).unwrap();
        restore_vcpu(&vcpu2, &vcpu_state).unwrap();
        let again = save_vcpu(&vcpu2, &indices).unwrap();
        assert_eq!(again.regs, vcpu_state.regs);
        assert_eq!(again.sregs, vcpu_state.sregs);
        assert_eq!(again.lapic, vcpu_state.lapic);
        assert_eq!(again.xcrs, vcpu_state.xcrs);
        let msr = |s: &VcpuState, i: u32| s.msrs.iter().find(|e| e.index == i).map(|e| e.data);
        for (index, _) in super::super::msr::boot_msr_values() {
            if index != MSR_IA32_TSC && msr(&vcpu_state, index).is_some() {
                assert_eq!(
                    msr(&again, index),
                    msr(&vcpu_state, index),
                    "MSR {index:#x}"
                );
            }
        }
        let vm_again = save_vm(&vm2).unwrap();
        let form = |c: &kvm_irqchip| serde_json::to_string(c).unwrap();
        assert_eq!(form(&vm_again.ioapic), form(&vm_state.ioapic));
        assert_eq!(form(&vm_again.pic_master), form(&vm_state.pic_master));

        // A state that does not fit is refused, never half taken.
        let (mut bad, _): (VcpuState, VmState) = serde_json::from_slice(&json).unwrap();
        bad.cpuid.clear();
        bad.cpuid
            .resize(KVM_MAX_CPUID_ENTRIES + 1, Default::default());
        assert!(restore_vcpu(&vcpu2, &bad).is_err());
    }
}
