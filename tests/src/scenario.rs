//! Running `husk-scenario` (tests/src/bin/husk-scenario.rs) and shell
//! scripts where VMs can boot: in the test host, or here on hardware KVM.

use std::time::Duration;

use crate::testhost::{self, Mode, Spec};
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
    let script = format!("cd '{}' || exit 1\n{STEP_PRELUDE}{script}", root.display());
    let spec = Spec::new(script).timeout(timeout);
    let mut o = testhost::run(&spec).unwrap_or_else(|e| panic!("{e}"));
    // In the nested test host about one guest boot in 35 stops mid-boot
    // (docs/testhost.md): a script that failed on a guest that never came
    // up runs once more there, loudly. On hardware KVM it fails at once.
    let hung = |o: &testhost::Outcome| {
        (!o.success() && o.output.contains(BOOT_HANG)) || o.output.contains(STEP_HANG)
    };
    if o.mode != Mode::Direct && hung(&o) {
        eprintln!(
            "[testhost] a guest did not boot, or a bounded step hung, in the nested test host; running the script once more. First output:\n{}",
            o.output
        );
        o = testhost::run(&spec).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(o.success(), "exited {}:\n{}", o.status, o.output);
    assert!(
        !o.output.contains(STEP_HANG),
        "a bounded step hung:\n{}",
        o.output
    );
    o.output
}

/// What `husk_agent_client` says when a guest's agent never answers.
const BOOT_HANG: &str = "did not answer within the boot timeout";

/// What `bounded` prints when its command outlived its limit.
const STEP_HANG: &str = "@@HUSK-STEP-HUNG@@";

/// Shell defined for every script: `bounded SECS CMD...` runs CMD with a
/// deadline. A step that outlives it is killed, and the logs of every VM
/// still in /run/husk (console, VMM, guest) are printed with STEP_HANG, so a
/// hang names its step and shows where the guest stood instead of eating
/// the whole script's deadline. In the nested test host the script then
/// runs once more in a new L2 (the nested stack wedges a guest now and
/// then, docs/testhost.md); on hardware KVM the hang is the test's failure.
const STEP_PRELUDE: &str = r#"husk_dump_vms() {
  ps -eo pid,ppid,stat,etime,comm >&2
  for d in /run/husk/*/; do
    [ -d "$d" ] || continue
    for f in "$d"console.log "$d"vmm.log "$d"guest.log; do
      [ -f "$f" ] && { echo "--- $f" >&2; tail -n 30 "$f" | cut -c1-300 >&2; }
    done
  done
}
bounded() {
  limit=$1; shift
  mark=/tmp/husk-step-hung.$$
  rm -f "$mark"
  # The watcher reports while the step is still stuck, before it is killed
  # (a killed husk may clean up what would show why).
  ( sleep "$limit" & s=$!; trap 'kill $s 2>/dev/null; exit 0' TERM; wait $s
    touch "$mark"; echo "@@HUSK-STEP-HUNG@@ after ${limit}s: $1 $2" >&2; husk_dump_vms ) &
  watcher=$!
  timeout -k 10 $((limit + 5)) "$@"; rc=$?
  kill $watcher 2>/dev/null; wait $watcher 2>/dev/null
  # A hung step reads as timeout's 124, never as a status the step could
  # have had itself (137 is also a SIGKILLed container's).
  [ -e "$mark" ] && { rm -f "$mark"; rc=124; }
  return $rc
}
"#;
