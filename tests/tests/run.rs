//! `husk run`: a command as a container in its own micro-VM, through the
//! whole stack (husk-vmm, virtio-fs share, husk-agent, vsock stdio). The
//! busybox rootfs is the test image (tools/build-guest makes it).

use std::time::Duration;

use husk_tests::scenario;

/// Exit codes (0, 1, 3, 137 from a SIGKILLed child), stdout and stderr apart, env,
/// cwd and user, a read-only rootfs, a 10 MB burst arriving byte-exact.
#[test]
fn husk_run_containers() {
    let out = scenario::run_script(
        r#"set -u
export RUST_LOG=warn
cp -a target/husk/busybox-rootfs /tmp/rootfs
run() { bounded 150 ./target/debug/husk run --rootfs /tmp/rootfs "$@"; }
run -- true; echo "code true=$?"
run -- false; echo "code false=$?"
run -- sh -c 'echo out; echo err >&2; exit 3' 2>/tmp/err; echo "code three=$?"; echo "stderr=$(cat /tmp/err)"
run -- sh -c 'sleep 30 & kill -9 $!; wait $!'; echo "code killed=$?"
run -e GREETING=hi -w /tmp -u 65534:65534 -- sh -c 'echo "env=$GREETING cwd=$(pwd) uid=$(id -u) gid=$(id -g)"'
run --read-only -- sh -c 'touch /x 2>/dev/null && echo rootfs=writable || echo rootfs=read-only'
run -- sh -c 'head -c 10000000 /dev/zero | tr "\0" x' | wc -c | sed 's/^/burst=/'
ls /run/husk | wc -l | sed 's/^/left=/'
"#,
        Duration::from_secs(500),
    );
    for want in [
        "code true=0",
        "code false=1",
        "out\n",
        "code three=3",
        "stderr=err",
        "code killed=137",
        "env=hi cwd=/tmp uid=65534 gid=65534",
        "rootfs=read-only",
        "burst=10000000",
        "left=0",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

/// The rest of the CLI: a volume seen on both sides, writes to the rootfs
/// kept in the VM's own layer (the host directory untouched), stdin piped through,
/// a memory limit (OOM -> 137 and a notice), a pids limit, `run -d` +
/// `exec` + `ps` + `rm`, a terminal session with a resize (driven through
/// a pty), and the state of a `husk` killed with SIGKILL cleaned by the
/// next call.
#[test]
fn husk_cli_volumes_stdin_limits_exec_tty_cleanup() {
    let out = scenario::run_script(
        r#"set -u
export RUST_LOG=warn
cp -a target/husk/busybox-rootfs /tmp/rootfs
mkdir -p /tmp/vol && echo from-host > /tmp/vol/in
H=./target/debug/husk
B="bounded 150 $H"
$B run --rootfs /tmp/rootfs -v /tmp/vol:/data -v /tmp/vol:/ro:ro -- sh -c 'cat /data/in; echo from-guest > /data/out; touch /ro/x 2>/dev/null || echo ro-refused'
echo "host sees: $(cat /tmp/vol/out)"
$B run --rootfs /tmp/rootfs -- sh -c 'echo layered > /etc/new && cat /etc/new'
test -e /tmp/rootfs/etc/new && echo rootfs=changed || echo rootfs=untouched
$B run --rootfs /tmp/rootfs -- sh -c 'grep CapEff /proc/self/status' | sed 's/\t/ /g' 
cp target/x86_64-unknown-linux-musl/release/husk-test-init /tmp/rootfs/bin/ 2>/dev/null || cp target/x86_64-unknown-linux-gnu/release/husk-test-init /tmp/rootfs/bin/
$B run --rootfs /tmp/rootfs -- husk-test-init vsock-probe
$B run --rootfs /tmp/rootfs -- sh -c 'mknod /dev/ttyS0 c 4 64 && echo made-node; (echo "reboot: Power down" > /dev/ttyS0) 2>/dev/null; echo "forge=$?"; echo x > /dev/null && echo devnull-ok; sleep 3; echo still-running'
echo piped-input | $B run -i --rootfs /tmp/rootfs -- sh -c 'read x; echo "stdin=$x"'
$B run --rootfs /tmp/rootfs --memory-limit 32m -- sh -c 'x=$(head -c 200000000 /dev/zero | tr "\0" a); echo survived' 2>/tmp/oom.err; echo "code oom=$?"; grep -o 'OOM' /tmp/oom.err | head -1 | sed 's/^/notice=/'
$B run --rootfs /tmp/rootfs --pids-limit 8 -- sh -c '(for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2 & done) 2>/tmp/forks; sleep 3; echo "refused=$(grep -c "can.t fork" /tmp/forks)"' 
mkdir -p /tmp/vol/sub && mount -t tmpfs -o size=1m clitest /tmp/vol/sub
$H run -d --name bg --rootfs /tmp/rootfs -v /tmp/vol:/ro:ro -- sleep 1000
grep ' /run/husk/[^ ]*/shared/[^ ]*/sub ' /proc/$(pgrep -n husk-vmm)/mountinfo | awk '{print "cli-ro-sub " $6}'
$H ps | grep '^bg ' | awk '{print "ps=" $1 "," $3}'
$B exec bg -- sh -c 'echo exec-ran; exit 5'; echo "code exec=$?"
echo via-exec-stdin | $B exec -i bg -- cat
$H rm bg 2>&1 | grep -o 'is running' | sed 's/^/rm=/'
$H rm -f bg >/dev/null; echo "code rm=$?"
umount /tmp/vol/sub
python3 tests/scripts/tty-session.py $H run -t -i --rootfs /tmp/rootfs -- sh | tail -1
$H run --name killed --rootfs /tmp/rootfs -- sleep 100 & sleep 12; kill -9 $!; sleep 1
$H ps >/dev/null
ls /run/husk | wc -l | sed 's/^/left=/'
pgrep -c husk-vmm | sed 's/^/vmms=/'
"#,
        Duration::from_secs(580),
    );
    for want in [
        "from-host\n",
        "ro-refused",
        "host sees: from-guest",
        "layered\n",
        "rootfs=untouched",
        // Docker's default capability set, nothing more.
        "CapEff: 00000000a80425fb",
        // No AF_VSOCK for a container: EAFNOSUPPORT (97).
        "vsock-probe: 97",
        // CAP_MKNOD makes a node, but /dev is nodev: the console line
        // husk-vmm would take for the kernel's power-down is never written.
        "made-node\nforge=1\ndevnull-ok\nstill-running",
        "stdin=piped-input",
        "code oom=137",
        "notice=OOM",
        "ps=bg,running",
        // A read-only volume's submount, in husk-vmm's own namespace.
        "cli-ro-sub ro,nosuid,nodev",
        "exec-ran",
        "code exec=5",
        "via-exec-stdin",
        "rm=is running",
        "code rm=0",
        "tty-session: exit 7",
        "left=0",
        "vmms=0",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // The pids limit (8) refused some of the 10 background jobs.
    let refused: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("refused="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refused= line in:\n{out}"));
    assert!(refused > 0, "pids limit 8, yet all 10 jobs started:\n{out}");
}
