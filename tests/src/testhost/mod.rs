//! The test host: where tests that need a KVM able to boot a stock guest run.
//!
//! On hardware KVM a script runs right here. Elsewhere (KVM-PVM, no KVM) it
//! runs in an L2 VM: QEMU with TCG and `-cpu max` (emulated SVM with nested
//! paging), Debian's cloud kernel with `kvm_amd npt=1`, and this machine's
//! root shared read-only over virtio-fs, so the binaries that `cargo` built
//! run there as they are. See docs/testhost.md for the measured figures.

pub mod assets;
pub mod detect;
pub mod initrd;
pub mod run;

pub use detect::Mode;
pub use run::{expect_success, run, Outcome, RunError, Spec, TRIES, WEDGE_AFTER};
