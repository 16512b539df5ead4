//! Ending the guest: stop every process, sync, power off.

use std::time::{Duration, Instant};

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sync, Pid};

use crate::reaper::Reaper;

/// User-space processes other than ourselves (kernel threads have no cmdline).
fn others() -> usize {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
                })
                .count()
        })
        .unwrap_or(0)
}

/// SIGTERM to everything, up to `grace` for it to go, then SIGKILL.
/// Only meaningful as PID 1: `kill(-1)` spares the caller and no one else.
pub fn stop_all_processes(reaper: &Reaper, grace: Duration) {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        reaper.reap();
        if others() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(
        left = others(),
        "processes outlived the grace period; killing"
    );
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let end = Instant::now() + Duration::from_secs(2);
    while others() > 0 && Instant::now() < end {
        reaper.reap();
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Syncs and powers off; returns only if the kernel refused.
pub fn power_off() -> nix::Error {
    sync();
    // husk-vmm sees the kernel's "reboot: Power down" on the console (there
    // is no ACPI) and exits 0.
    match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
