//! husk-vmm boots the Husk guest under real KVM (the test host, or this
//! machine on hardware KVM). Each test is one scenario of husk-scenario.

use std::time::Duration;

use husk_tests::scenario;

/// 1, 2 and 4 vCPUs with 128 MiB to 2 GiB (PVH vmlinux) and a bzImage: the
/// guest sees what was configured, and its poweroff ends husk-vmm with 0.
#[test]
fn boots_with_the_configured_cpus_and_memory() {
    let out = scenario::run("vmm-boot", Duration::from_secs(500));
    assert_eq!(out.matches("exit 0 after").count(), 4, "{out}");
}

/// A guest kernel panic ends husk-vmm with status 2 and keeps the console.
#[test]
fn a_guest_panic_ends_the_vmm_with_its_console_kept() {
    let out = scenario::run("vmm-panic", Duration::from_secs(300));
    assert!(out.contains("exit status: 2"), "{out}");
}

/// vsock: a guest-initiated stream reaches `<socket>_5001`; 50 concurrent
/// host streams of 1 MiB each are echoed byte-exact; SIGTERM stops it with 0.
#[test]
fn vsock_streams_both_ways() {
    let out = scenario::run("vmm-vsock", Duration::from_secs(500));
    assert!(
        out.contains("50 streams x 1024 KiB echoed byte-exact"),
        "{out}"
    );
    assert!(out.contains("SIGTERM -> exit status: 0"), "{out}");
}

/// The shim's control interface: the ready byte on `--ready-fd`, ping, info,
/// garbage refused with the connection kept, shutdown -> exit 0, sockets removed.
#[test]
fn control_socket_and_ready_signal() {
    let out = scenario::run("vmm-control", Duration::from_secs(300));
    assert!(out.contains("vmm-control: ready byte 'R'"), "{out}");
    assert!(
        out.contains("shutdown -> exit status: 0; sockets removed"),
        "{out}"
    );
}

/// virtio-fs: a host directory shared into the guest; reads and writes both
/// ways; a host-made symlink to /etc means the guest's /etc, not the host's.
#[test]
fn virtio_fs_shares_a_host_directory() {
    let out = scenario::run("vmm-fs", Duration::from_secs(300));
    assert!(
        out.contains("vmm-fs: guest read the share, its write landed on the host"),
        "{out}"
    );
}

/// virtio-net: a tap in the test host (10.0.2.1/24) handed to husk-vmm as
/// `--net fd=3,mac=..,mtu=1500`; the guest configures eth0 (10.0.2.2, the
/// MAC and MTU as given) and exchanges 10 MiB each way with a TCP server on
/// the host, byte-exact; ICMP echo reaches it; then 2 MB/s limits each way
/// hold. The figures are in the output.
#[test]
fn vmm_net_carries_tcp_both_ways_byte_exact() {
    let out = scenario::run("vmm-net", Duration::from_secs(500));
    assert!(out.contains("MiB each way byte-exact"), "{out}");
    assert!(out.contains("vmm-net: ICMP echo"), "{out}");
    assert!(out.contains("vmm-net: rate limit"), "{out}");
}

/// Snapshot and restore (issue #14): a VM snapshotted through its control
/// socket; two clones restored from it at once keep its memory and running
/// threads and talk over vsock; restores into another memory size, kernel
/// or command line, from a corrupt state file or a truncated memory file,
/// are refused with the reason, leaving no sockets.
#[test]
fn a_snapshot_restores_into_running_clones_and_misfits_are_refused() {
    let out = scenario::run("vmm-snapshot", Duration::from_secs(500));
    assert!(
        out.contains("vmm-snapshot: round trip, two clones, refusals: ok"),
        "{out}"
    );
}
