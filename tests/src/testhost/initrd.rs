//! The test host's initramfs: static busybox, the L2 modules, and `init.sh`.

use std::path::Path;

use anyhow::{Context, Result};
use husk_guest_image::initramfs::Initramfs;

use super::assets::Assets;

/// PID 1 of the test host; see the script's header.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Debian's busybox-static; a static binary, so it needs nothing else.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets `init.sh` uses; each becomes a `/bin` link to busybox.
const APPLETS: &[&str] = &[
    "sh", "mount", "stty", "cat", "echo", "insmod", "mkdir", "ln", "readlink", "cp", "chroot",
    "sync", "poweroff", "sleep", "unshare",
];

pub fn build(assets: &Assets) -> Result<Vec<u8>> {
    let busybox = Path::new(BUSYBOX);
    // busybox(1) from the `busybox` package is dynamic: insist on the static one.
    let head =
        std::fs::read(busybox).with_context(|| format!("{BUSYBOX}: install busybox-static"))?;
    let mut i = Initramfs::new();
    i.with_base_layout()?;
    i.file("bin/busybox", 0o755, head)?;
    for a in APPLETS {
        i.symlink(&format!("bin/{a}"), "busybox")?;
    }
    i.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec())?;
    let mut load = String::new();
    for (m, params) in assets.load_order()? {
        i.file_from(&format!("modules/{m}"), &assets.entry.path(&m), 0o644)?;
        load.push_str(&format!("{m} {params}\n"));
    }
    i.file("modules/load", 0o644, load.into_bytes())?;
    Ok(i.to_bytes(false)?)
}
