//! Local APIC setup: LINT0 as ExtINT (the legacy PIC's output) and LINT1 as NMI,
//! the wiring a PC BIOS leaves and the MP table describes.

use kvm_bindings::kvm_lapic_state;

/// LVT register offsets in the APIC page (Intel SDM vol. 3, table 11-1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery modes, bits 8..10 of an LVT entry.
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Rewrites LINT0/LINT1 in a LAPIC state read from KVM.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = get_reg(lapic, APIC_LVT_LINT0);
    set_reg(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = get_reg(lapic, APIC_LVT_LINT1);
    set_reg(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_are_set_and_other_bits_kept() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT_LINT0, 0x0001_0000 | 0x300); // masked, old mode 3
        set_reg(&mut l, APIC_LVT_LINT1, 0x0001_0000);
        set_lint(&mut l);
        assert_eq!(get_reg(&l, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(get_reg(&l, APIC_LVT_LINT1), 0x0001_0400);
    }
}
