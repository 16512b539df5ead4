//! husk-agent: PID 1 of the Husk guest.
//!
//! This first cut does what an init must before anything else: mount the
//! kernel filesystems, report that the guest reached userspace, and reap
//! orphans forever. The ttrpc API over vsock arrives with the agent issue.
//! `husk.exit=poweroff|reboot` on the kernel command line ends the VM right
//! after the report, which is how boot tests and boot benchmarks use it.

use std::io::Write;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{sync, Pid};

/// The line boot tests and benchmarks wait for on the serial console.
const READY_MARKER: &str = "husk-agent: init reached";

fn mount_kernel_filesystems() -> Vec<String> {
    let mut errors = Vec::new();
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags); 4] = [
        ("proc", "/proc", "proc", nodev),
        ("sysfs", "/sys", "sysfs", nodev),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
    ];
    for (src, target, fstype, flags) in table {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, None::<&str>) {
            // EBUSY: already mounted (devtmpfs may be automounted); anything else is real.
            if e != nix::errno::Errno::EBUSY {
                errors.push(format!("mount {target}: {e}"));
            }
        }
    }
    errors
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("<{path}: {e}>"))
}

fn mem_total_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn main() {
    let errors = mount_kernel_filesystems();
    let mut out = std::io::stdout().lock();
    for e in &errors {
        let _ = writeln!(out, "husk-agent: {e}");
    }
    let cmdline = read_trimmed("/proc/cmdline");
    let _ = writeln!(
        out,
        "{READY_MARKER} (agent {}, kernel {}, cpus {}, memory {} KiB)",
        env!("CARGO_PKG_VERSION"),
        read_trimmed("/proc/sys/kernel/osrelease"),
        read_trimmed("/sys/devices/system/cpu/online"),
        mem_total_kib().unwrap_or(0),
    );
    let _ = out.flush();
    drop(out);

    match cmdline_value(&cmdline, "husk.exit").as_deref() {
        Some("poweroff") => {
            sync();
            let _ = reboot(RebootMode::RB_POWER_OFF);
        }
        Some("reboot") => {
            sync();
            let _ = reboot(RebootMode::RB_AUTOBOOT);
        }
        _ => {}
    }

    // An init must never exit (the kernel panics) and must reap every orphan.
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty())) {
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                std::thread::sleep(std::time::Duration::from_secs(3600))
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values_are_found_by_whole_key() {
        let c = "console=ttyS0 husk.exit=reboot husk.exitx=no quiet";
        assert_eq!(cmdline_value(c, "husk.exit").as_deref(), Some("reboot"));
        assert_eq!(cmdline_value(c, "husk.exi"), None);
        assert_eq!(cmdline_value(c, "quiet"), None);
    }
}
