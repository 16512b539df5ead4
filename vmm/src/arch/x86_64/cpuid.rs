//! CPUID for the guest: KVM's supported set, filtered, with our topology and the
//! KVM paravirt leaves.
//!
//! Topology: one socket, one thread per core, `vcpus` cores; APIC ID = vCPU index.
//! That is what the MP table says too, and it keeps the guest's scheduler from
//! pairing "siblings" that are really independent host threads.
//!
//! The filtering is a pure function over the entries so it can be tested without KVM.

use kvm_bindings::kvm_cpuid_entry2;

/// The hypervisor-present bit (leaf 1 ECX bit 31): tells the guest to look at 0x4000_0000.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// TSC-deadline timer mode (leaf 1 ECX bit 24): KVM emulates it but leaves it to the VMM.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Hyper-threading / multi-core present (leaf 1 EDX bit 28).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Energy performance bias (leaf 6 ECX bit 3): an MSR KVM does not emulate.
const LEAF6_ECX_EPB: u32 = 1 << 3;
/// AMD topology extensions (0x8000_0001 ECX bit 22): hidden, so the guest uses leaf 0xB-style data.
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
/// AMD "core multi-processing legacy mode" (0x8000_0001 ECX bit 1).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The KVM paravirt signature leaf and its "KVMKVMKVM\0\0\0" signature.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// What the filter needs to know about the VM and the host's KVM.
#[derive(Clone, Copy, Debug)]
pub struct CpuidParams {
    /// This vCPU's index (= its APIC ID).
    pub cpu_index: u8,
    /// Number of vCPUs in the VM.
    pub cpu_count: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER.
    pub tsc_deadline: bool,
}

fn vendor_is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    // "AuthenticAMD" / "HygonGenuine": EBX of leaf 0.
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == 0x6874_7541 || e.ebx == 0x6f67_7948)
}

/// Bits needed to hold `n` distinct IDs (x2APIC ID shift for a topology level).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Filters KVM's supported CPUID for one vCPU. Entries may be added (the KVM
/// signature leaf when the host's set lacks it), so this takes a `Vec`.
pub fn filter(entries: &mut Vec<kvm_cpuid_entry2>, p: CpuidParams) {
    let count = u32::from(p.cpu_count.max(1));
    let apic_id = u32::from(p.cpu_index);
    let amd = vendor_is_amd(entries);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH size / 8.
                e.ebx = (apic_id << 24) | (count.min(255) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if p.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if !amd => {
                // Deterministic cache parameters: EAX [31:26] cores per package - 1,
                // [25:14] threads sharing this cache - 1. L1/L2 are per core, L3 shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax &= 0x3fff;
                e.eax |= ((count - 1).min(63) << 26) | ((sharing & 0xfff) << 14);
            }
            0x6 => e.ecx &= !LEAF6_ECX_EPB,
            0xa => {
                // Architectural PMU: hidden; the guest has no business programming host counters.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (`count` cores).
                let (shift, logical, level_type) = match e.index {
                    0 => (0, 1, LEVEL_TYPE_SMT),
                    1 => (id_bits(count), count, LEVEL_TYPE_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0x8000_0001 if amd => {
                e.ecx &= !EXT1_ECX_TOPOEXT;
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if amd => {
                // ECX [7:0] cores - 1, [15:12] APIC ID bits for the core number.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | ((count - 1) & 0xff);
            }
            KVM_CPUID_SIGNATURE => {
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
            }
            _ => {}
        }
    }
    // AMD topology-extension leaves describe a layout we just hid.
    if amd {
        entries.retain(|e| e.function != 0x8000_001e);
    }
    if !entries.iter().any(|e| e.function == KVM_CPUID_SIGNATURE) {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        let mut l0 = entry(0, 0);
        l0.ebx = 0x756e_6547; // "Genu"
        let mut l4_1 = entry(4, 0);
        l4_1.eax = (1 << 5) | 0x1; // L1 data
        let mut l4_3 = entry(4, 3);
        l4_3.eax = (3 << 5) | 0x3; // L3 unified
        let mut l6 = entry(6, 0);
        l6.ecx = LEAF6_ECX_EPB | 1;
        let mut la = entry(0xa, 0);
        la.eax = 0x0704_0102;
        vec![
            l0,
            entry(1, 0),
            l4_1,
            l4_3,
            l6,
            la,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn topology_for_four_vcpus() {
        let mut v = intel();
        filter(
            &mut v,
            CpuidParams {
                cpu_index: 2,
                cpu_count: 4,
                tsc_deadline: true,
            },
        );
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let smt = find(&v, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 2)
        );
        let core = find(&v, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.ecx & 0xff),
            (2, 4, LEVEL_TYPE_CORE, 1)
        );
        let end = find(&v, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));

        assert_eq!(find(&v, 4, 0).eax >> 26, 3);
        assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&v, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&v, 4, 3).eax & 0x3fff, (3 << 5) | 0x3);
        assert_eq!(find(&v, 6, 0).ecx, 1);
        assert_eq!(find(&v, 0xa, 0).eax, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_gets_kvm_signature() {
        let mut v = intel();
        filter(
            &mut v,
            CpuidParams {
                cpu_index: 0,
                cpu_count: 1,
                tsc_deadline: false,
            },
        );
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let sig = find(&v, KVM_CPUID_SIGNATURE, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
    }

    #[test]
    fn amd_hides_topoext() {
        let mut l0 = entry(0, 0);
        l0.ebx = 0x6874_7541;
        let mut e1 = entry(0x8000_0001, 0);
        e1.ecx = EXT1_ECX_TOPOEXT;
        let mut v = vec![l0, e1, entry(0x8000_0008, 0), entry(0x8000_001e, 0)];
        filter(
            &mut v,
            CpuidParams {
                cpu_index: 0,
                cpu_count: 3,
                tsc_deadline: false,
            },
        );
        let e1 = find(&v, 0x8000_0001, 0);
        assert_eq!(e1.ecx & EXT1_ECX_TOPOEXT, 0);
        assert_ne!(e1.ecx & EXT1_ECX_CMP_LEGACY, 0);
        let e8 = find(&v, 0x8000_0008, 0);
        assert_eq!(e8.ecx & 0xff, 2);
        assert_eq!((e8.ecx >> 12) & 0xf, 2);
        assert!(!v.iter().any(|e| e.function == 0x8000_001e));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)],
            [0, 1, 2, 2, 3]
        );
    }
}
