//! The guest kernel command line defaults: the VMM decides them, because each
//! one follows from the machine it builds (an 8250 console, no PCI, no ACPI, the
//! i8042 reset line as the end of the VM, KVM's clock). No `i8042.*` options:
//! the VMM's i8042 reads as "no controller" at the driver's first flush, so
//! there is nothing left for them to skip (`devices/legacy/i8042.rs`).
//!
//! Each part is here for a reason that a later reader must be able to see. The
//! final command line is [`VmConfig::cmdline`](crate::config::VmConfig::cmdline)
//! (or [`default_cmdline`]), then `extra_cmdline`, then the device announcements
//! (`virtio_mmio.device=...`), which `boot::build_cmdline` appends.

/// `(parameter, why)` for every default.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("console=ttyS0", "the 8250 serial port is the guest's log; the VMM writes it to a file"),
    ("quiet", "every console byte is a trapped port write; a chatty boot costs milliseconds (seconds when nested)"),
    ("reboot=k", "reboot through the i8042 reset line, which the VMM sees as the end of the VM"),
    ("panic=-1", "reboot at once on a panic, so a dead guest ends its VMM instead of hanging"),
    ("pci=off", "all devices are virtio-mmio; skip probing a bus that does not exist"),
    ("nomodules", "the kernel has none; refuse to look for them"),
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

/// `base` followed by `extra` (when given and not blank), one space between.
pub fn with_extra(base: &str, extra: Option<&str>) -> String {
    match extra.map(str::trim) {
        Some(e) if !e.is_empty() => {
            if base.trim().is_empty() {
                e.to_string()
            } else {
                format!("{} {e}", base.trim_end())
            }
        }
        _ => base.to_string(),
    }
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

    #[test]
    fn extra_goes_after_the_base() {
        assert_eq!(with_extra("a b", Some("c=1")), "a b c=1");
        assert_eq!(with_extra("a b ", Some(" c=1 ")), "a b c=1");
        assert_eq!(with_extra("a b", None), "a b");
        assert_eq!(with_extra("a b", Some("  ")), "a b");
        assert_eq!(with_extra("", Some("c")), "c");
    }
}
