//! Running `husk-scenario` (tests/src/bin/husk-scenario.rs) and shell
//! scripts where VMs can boot: in the test host, or here on hardware KVM.

use std::time::Duration;

use crate::testhost::{self, Spec};
use crate::workspace_root;

/// Runs one scenario and panics with its output unless it succeeds.
pub fn run(scenario: &str, timeout: Duration) -> String {
    run_script(
        &format!("exec ./target/debug/husk-scenario {scenario}\n"),
        timeout,
    )
}

/// Runs a shell script from the workspace root where VMs boot; panics with
/// its output unless it succeeds.
pub fn run_script(script: &str, timeout: Duration) -> String {
    let root = workspace_root();
    for built in [
        "target/debug/husk-scenario",
        "target/debug/husk-vmm",
        "target/debug/husk",
        "target/husk/test-initramfs.cpio",
    ] {
        assert!(
            root.join(built).exists(),
            "{built} is missing: run `make build`"
        );
    }
    let script = format!("cd '{}' || exit 1\n{script}", root.display());
    let o = testhost::run(&Spec::new(script).timeout(timeout)).unwrap_or_else(|e| panic!("{e}"));
    assert!(o.success(), "exited {}:\n{}", o.status, o.output);
    o.output
}
