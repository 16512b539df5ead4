//! husk-agent in a real VM, through the host client: the API, reconnects,
//! and an agent that never comes up.

use std::time::Duration;

use husk_tests::scenario;

/// Check 100 times and 16 at once; GetGuestDetails matches the VM's vCPUs
/// and memory; Shutdown ends husk-vmm with 0 and removes the runtime dir.
#[test]
fn api_answers_and_shutdown_ends_the_vm() {
    let out = scenario::run("api", Duration::from_secs(300));
    assert_eq!(
        out.matches("shutdown -> exit status: 0").count(),
        2,
        "{out}"
    );
}

/// A connection cut mid-call is a transport error; the next call reconnects.
#[test]
fn a_cut_connection_is_reported_and_the_next_call_reconnects() {
    let out = scenario::run("reconnect", Duration::from_secs(300));
    assert!(out.contains("next call reconnected"), "{out}");
}

/// No agent (a wrong init): a boot-timeout error quoting the guest console,
/// within the timeout, with nothing left behind. A guest that resets before
/// its agent answers fails the boot at once, its error naming the reset and
/// quoting the console.
#[test]
fn an_agent_that_never_comes_up_is_a_boot_timeout() {
    let out = scenario::run("boot-timeout", Duration::from_secs(300));
    assert!(out.contains("boot-timeout: after"), "{out}");
    assert!(out.contains("boot-reset: failed after"), "{out}");
}

/// The CLI: `husk vm boot` prints what the guest sees and shuts it down;
/// `--keep` leaves it running until `husk vm stop`.
#[test]
fn husk_vm_boot_and_keep() {
    let out = scenario::run_script(
        "set -e\n\
         ./target/debug/husk vm boot --cpus 2 --memory 256\n\
         ./target/debug/husk vm boot --keep > /tmp/keep.txt\n\
         cat /tmp/keep.txt\n\
         id=$(sed -n 's/^vm: *//p' /tmp/keep.txt)\n\
         test -d /run/husk/$id\n\
         ./target/debug/husk vm stop $id\n\
         test ! -e /run/husk/$id && echo cleaned\n",
        Duration::from_secs(300),
    );
    assert!(out.contains("cpus:      2 (0-1)"), "{out}");
    assert!(out.contains("stopped:   husk-vmm exit status: 0"), "{out}");
    assert!(out.contains("stop with: husk vm stop"), "{out}");
    assert!(out.contains("cleaned"), "{out}");
}

/// Containers through the agent API: shared network and IPC namespaces,
/// 200 orphans reaped, an OOM event, stats/update/pause/resume, device
/// nodes and rules (and their update), malformed
/// specs, and no way out of the root from inside.
#[test]
fn containers_in_one_sandbox() {
    let out = scenario::run("containers", Duration::from_secs(500));
    for want in [
        "share net and ipc",
        "200 orphans reaped",
        "OOM event for \"oom\"",
        "kill all -> 137",
        "malformed specs refused",
        "device rules replaced by an update",
        "stay in the container's root",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

/// Templates (issue #14): the first sandbox that asks builds the template
/// (a VM booted to its agent and snapshotted) and is resumed from it; two
/// more are resumed from it at once. Each clone's containers see the host's
/// clock (within 2 s) and their own hostname, UUID and random bytes; a
/// damaged template is refused by husk-vmm, removed, and its sandbox boots
/// cold; a changed kernel gets a template of its own.
#[test]
fn templates_resume_clones_with_their_own_clock_randomness_and_names() {
    let out = scenario::run("template", Duration::from_secs(500));
    assert!(out.contains("template: a cold boot took"), "{out}");
    assert!(
        out.contains("template: ten clones at once, all answering"),
        "{out}"
    );
}
