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
run() { ./target/debug/husk run --rootfs /tmp/rootfs "$@"; }
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
