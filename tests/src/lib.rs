//! Husk's test support: the nested KVM test host and the KVM smoke program.

pub mod kvm_smoke;
pub mod procs;
pub mod registry;
pub mod scenario;
pub mod testhost;
pub mod vm;

use std::path::PathBuf;

/// The workspace's root, for finding built binaries.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
