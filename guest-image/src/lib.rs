//! The Husk guest: its kernel (built from Debian's source, cached by content
//! hash), its initramfs (husk-agent as `/init`) and its command line.

pub mod cache;
pub mod cmdline;
pub mod initramfs;
pub mod kernel;
pub mod qemu;

use std::path::{Path, PathBuf};

/// Where `tools/setup` installs the guest artifacts for everything else to find.
pub const DEFAULT_INSTALL_DIR: &str = "/usr/local/share/husk";

/// The installed guest directory: `$HUSK_GUEST_DIR`, else [`DEFAULT_INSTALL_DIR`].
pub fn install_dir() -> PathBuf {
    std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INSTALL_DIR))
}

/// Builds the standard initramfs: base layout plus `agent` as `/init`.
pub fn agent_initramfs(agent: &Path) -> Result<initramfs::Initramfs, initramfs::InitramfsError> {
    let mut i = initramfs::Initramfs::new();
    i.with_base_layout()?;
    i.file_from("init", agent, 0o755)?;
    Ok(i)
}
