//! The guest kernel command line for the QEMU boot check ([`crate::qemu`]) and
//! `husk-guest-image cmdline`.
//!
//! husk-vmm owns the defaults it boots with (`husk_vmm::cmdline`, which decides
//! them from the machine it builds; callers add theirs with
//! `VmConfig::extra_cmdline`). This table mirrors them for a guest booted by
//! QEMU's `microvm`, which is the same machine as far as these parameters go,
//! and stays for callers that still build a whole command line themselves.
//! Each part is here for a reason that a later reader must be able to see;
//! VMMs add their own parts (devices, `virtio_mmio.device=`) after these.

/// `(parameter, why)` for every default.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("console=ttyS0", "the 8250 serial port is the guest's log; the VMM writes it to a file"),
    ("quiet", "every console byte is a trapped port write; a chatty boot costs milliseconds (seconds when nested)"),
    ("reboot=k", "reboot through the i8042 reset line, which the VMM sees as the end of the VM"),
    ("panic=-1", "reboot at once on a panic, so a dead guest ends its VMM instead of hanging"),
    ("pci=off", "all devices are virtio-mmio; skip probing a bus that does not exist"),
    ("nomodules", "the kernel has none; refuse to look for them"),
    ("i8042.noaux", "no mouse port to probe"),
    ("i8042.nomux", "no multiplexer to probe"),
    ("i8042.dumbkbd", "do not wait on a keyboard that is not there"),
    ("tsc=reliable", "KVM's TSC is stable; skip the clocksource watchdog's calibration"),
    ("rdinit=/init", "PID 1 is husk-agent at /init in the initramfs"),
];

/// The default command line as one string.
pub fn default_cmdline() -> String {
    DEFAULTS
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_unique_and_fit_the_boot_protocol() {
        let line = default_cmdline();
        // x86 boot protocol: COMMAND_LINE_SIZE is 2048 with the terminator; leave room for devices.
        assert!(line.len() < 512, "{line}");
        let mut keys: Vec<_> = DEFAULTS
            .iter()
            .map(|(p, _)| p.split('=').next().unwrap())
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), DEFAULTS.len());
        assert!(DEFAULTS.iter().all(|(_, why)| !why.is_empty()));
    }
}
