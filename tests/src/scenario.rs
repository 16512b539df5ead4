//! Running `husk-scenario` (tests/src/bin/husk-scenario.rs) where VMs can
//! boot: in the test host, or here on hardware KVM.

use std::time::Duration;

use crate::testhost::{self, Spec};
use crate::workspace_root;

/// Runs one scenario and panics with its output unless it succeeds.
pub fn run(scenario: &str, timeout: Duration) -> String {
    let root = workspace_root();
    for built in [
        "target/debug/husk-scenario",
        "target/debug/husk-vmm",
        "target/husk/test-initramfs.cpio",
    ] {
        assert!(
            root.join(built).exists(),
            "{built} is missing: run `make build`"
        );
    }
    let script = format!(
        "cd '{}' || exit 1\nexec ./target/debug/husk-scenario {scenario}\n",
        root.display()
    );
    let o = testhost::run(&Spec::new(script).timeout(timeout))
        .unwrap_or_else(|e| panic!("{scenario}: {e}"));
    assert!(
        o.success(),
        "scenario {scenario} exited {}:\n{}",
        o.status,
        o.output
    );
    o.output
}
