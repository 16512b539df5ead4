//! Booting the guest image under QEMU, independently of husk-vmm: the TCG
//! boot check in the tests and the initramfs benchmark use this one recipe.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::cmdline;

/// `qemu-system-x86_64` with nothing but what we add: no default devices,
/// no user config, no display, and a guest reset ends QEMU.
pub fn base_command() -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    c
}

/// A `qemu-system-x86_64` command booting `kernel` + `initrd` on the
/// `microvm` machine, the serial console on stdout. `accel` is `tcg` or
/// `kvm`. The i8042 is added because `microvm` has none by default and the
/// guest reboots through it (`reboot=k`); with `-no-reboot` that ends QEMU.
pub fn microvm_command(
    kernel: &Path,
    initrd: &Path,
    accel: &str,
    cpus: u32,
    mem_mib: u32,
    extra_cmdline: &str,
) -> Command {
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let append = format!("{} {extra_cmdline}", cmdline::default_cmdline());
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-machine",
        &format!("microvm,accel={accel}"),
        "-device",
        "i8042",
    ])
    .args([
        "-cpu",
        cpu,
        "-smp",
        &cpus.to_string(),
        "-m",
        &format!("{mem_mib}M"),
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", append.trim_end(), "-serial", "stdio"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    c
}
