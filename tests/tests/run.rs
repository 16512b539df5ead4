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
# A setuid file made on a volume (a host directory) is not setuid on the host.
$B run --rootfs /tmp/rootfs -v /tmp/vol:/data -- sh -c 'cp /bin/busybox /data/sx && chmod 6755 /data/sx; stat -c "guest-mode=%a" /data/sx'
stat -c "host-mode=%a" /tmp/vol/sx
$B run --rootfs /tmp/rootfs -- sh -c 'echo layered > /etc/new && cat /etc/new'
test -e /tmp/rootfs/etc/new && echo rootfs=changed || echo rootfs=untouched
$B run --rootfs /tmp/rootfs -- sh -c 'grep CapEff /proc/self/status' | sed 's/\t/ /g' 
cp target/x86_64-unknown-linux-musl/release/husk-test-init /tmp/rootfs/bin/ 2>/dev/null || cp target/x86_64-unknown-linux-gnu/release/husk-test-init /tmp/rootfs/bin/
$B run --rootfs /tmp/rootfs -- husk-test-init vsock-probe
$B run --rootfs /tmp/rootfs -- sh -c 'mknod /dev/ttyS0 c 4 64 2>/dev/null && echo made-node || echo ttyS0-refused; mknod /dev/kmsg c 1 11 2>/dev/null || echo kmsg-refused; mknod /dev/null2 c 1 3 && echo null-node-made; (echo "reboot: Power down" > /dev/ttyS0) 2>/dev/null; test -c /dev/ttyS0 || echo no-console-node; echo x > /dev/null && echo devnull-ok; sleep 3; echo still-running'
echo piped-input | $B run -i --rootfs /tmp/rootfs -- sh -c 'read x; echo "stdin=$x"'
$B run --rootfs /tmp/rootfs --memory-limit 32m -- sh -c 'x=$(head -c 200000000 /dev/zero | tr "\0" a); echo survived' 2>/tmp/oom.err; echo "code oom=$?"; grep -o 'OOM' /tmp/oom.err | head -1 | sed 's/^/notice=/'
$B run --rootfs /tmp/rootfs --pids-limit 8 -- sh -c '(for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2 & done) 2>/tmp/forks; sleep 3; echo "refused=$(grep -c "can.t fork" /tmp/forks)"' 
mkdir -p /tmp/vol/sub && mount -t tmpfs -o size=1m clitest /tmp/vol/sub
$H run -d --name bg --rootfs /tmp/rootfs -v /tmp/vol:/ro:ro -- sleep 1000
grep ' /run/husk/[^ ]*/shared/[^ ]*/sub ' /proc/$(pgrep -n -x husk-vmm-fs)/mountinfo | awk '{print "cli-ro-sub " $6}'
$H ps | grep ' bg$' | grep -q ' Up ' && echo ps=bg,running
sed -n 's#.*:/husk/#vmm-cgroup=/husk/#p' /proc/$(pgrep -n -x husk-vmm)/cgroup | sort -u
cat /sys/fs/cgroup/husk/bg/memory.max /sys/fs/cgroup/memory/husk/bg/memory.limit_in_bytes 2>/dev/null | sed 's/^/cg-mem=/'
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
find /sys/fs/cgroup -mindepth 2 -maxdepth 3 -type d -path '*/husk/*' | sed 's/^/cgroup-left: /'
find /sys/fs/cgroup -mindepth 2 -maxdepth 3 -type d -path '*/husk/*' | wc -l | sed 's/^/cgroups-left=/'
"#,
        Duration::from_secs(580),
    );
    for want in [
        "from-host\n",
        "ro-refused",
        "host sees: from-guest",
        // setuid and setgid cleared on a host directory, for both sides.
        "guest-mode=755\nhost-mode=755\n",
        "layered\n",
        "rootfs=untouched",
        // Docker's default capability set, nothing more.
        "CapEff: 00000000a80425fb",
        // No AF_VSOCK for a container: EAFNOSUPPORT (97).
        "vsock-probe: 97",
        // CAP_MKNOD makes a node, but /dev is nodev: the console line
        // husk-vmm would take for the kernel's power-down is never written.
        "ttyS0-refused\nkmsg-refused\nnull-node-made\nno-console-node\ndevnull-ok\nstill-running",
        "stdin=piped-input",
        "code oom=137",
        "notice=OOM",
        "ps=bg,running",
        // Its VM runs in a cgroup of its own, limited to guest RAM (256
        // MiB) and husk's overhead (256 MiB).
        "vmm-cgroup=/husk/bg\n",
        "cg-mem=536870912\n",
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
        "cgroups-left=0",
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

/// `husk run IMAGE` from a real registry on loopback in the test host: the
/// pull on first use, the image config (Cmd, Env, WorkingDir, User by name),
/// whiteouts and opaque directories as docker shows them, the container's
/// own writable layer (not seen by the next container), `--read-only`,
/// 127/126 for a command not found / not executable; docker's lifecycle:
/// a kept container in `ps -a`, `logs`, `inspect`; `run -d`, `stop` (the
/// TERM reaches it), `start` (its writable layer kept), `rm` refused while
/// it runs; `rmi` refused while a container uses the image, and nothing
/// left after `rm` and `rmi`.
#[test]
fn husk_run_images_from_a_registry() {
    let out = scenario::run_script(
        r#"set -u
export RUST_LOG=warn
export HUSK_CONFIG=/tmp/husk.toml
echo 'storage_root = "/tmp/store"' > $HUSK_CONFIG
sh tests/scripts/test-image.sh /tmp/oci
# The test host's init leaves lo down; the registry listens on it.
ip link set lo up
mkdir -p /tmp/reg
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /tmp/reg/data\nhttp:\n  addr: 127.0.0.1:5000\n' > /tmp/reg/config.yml
docker-registry serve /tmp/reg/config.yml >/tmp/reg/log 2>&1 &
REG=$!
for i in $(seq 50); do skopeo copy --quiet --dest-tls-verify=false oci:/tmp/oci:bb docker://127.0.0.1:5000/bb:latest 2>/dev/null && break; sleep 0.3; done
I=127.0.0.1:5000/bb
H=./target/debug/husk
B="bounded 150 $H"
$B run --rm $I 2>/tmp/pull.err; echo "code default=$?"
grep -o "Unable to find image '$I' locally" /tmp/pull.err | sed 's/^/pull-note=/'
$B run --rm $I sh -c 'test -e /etc/gone || echo whiteout-hides; echo "opq=$(ls /opq | tr "\n" " ")"; echo "opaque=$(ls /opaque | tr "\n" " ")"; cat /etc/motd; echo written > /data/new; cat /data/new; stat -c "suid=%a" /bin/suid; cp /bin/busybox /bin/made-suid && chmod 4755 /bin/made-suid && stat -c "made-suid=%a" /bin/made-suid'
$B run --rm $I sh -c 'test -e /data/new && echo leaked || echo fresh-layer'
$B run --rm -u app $I sh -c 'echo "user=$(id -u):$(id -g) home=$(pwd)"'
$B run --rm -u app:group7 $I id -g | sed 's/^/group=/'
$B run --rm -e GREETING=override $I; echo "code env=$?"
# --entrypoint replaces the image's command (its CMD would echo "hi from").
$B run --rm --entrypoint /bin/cat --hostname web1 $I /proc/sys/kernel/hostname | sed 's/^/entrypoint-hostname=/'
$B run --rm $I no-such-command 2>/dev/null; echo "code missing=$?"
$B run --rm $I /etc/motd 2>/tmp/noexec.err; echo "code noexec=$?"
grep -c '^husk: exec: "/etc/motd": permission denied$' /tmp/noexec.err | sed 's/^/noexec-msg=/'
# Anything but docker's words is shown, so a failure says what it was.
grep -v 'husk: exec: "/etc/motd": permission denied' /tmp/noexec.err | sed 's/^/noexec-err=/'
# --read-only: the guest's remount, and once the container has started the
# image's overlay in husk-vmm's namespace (what virtio-fs serves) is
# read-only on the host too.
rootfs_mount() { awk '$5 ~ /\/rootfs$/ {for (i = 7; i <= NF; i++) if ($i == "-") t = $(i + 1); split($6, o, ","); print t " " o[1]}' /proc/$1/mountinfo 2>/dev/null; }
$B run --rm --read-only $I sh -c 'touch /x 2>/dev/null && echo rootfs=writable || echo rootfs=read-only; sleep 8' &
RO=$!
# The share's mounts are the file-system process's (husk-vmm has a root of its own).
for i in $(seq 80); do F=$(pgrep -x husk-vmm-fs | head -1); [ -n "$F" ] && rootfs_mount $F | grep -q ' ro$' && break; sleep 0.5; done
echo "ro-rootfs-mount=$(rootfs_mount $F)"
wait $RO
$B run --name kept $I sh -c 'echo kept-output; echo kept-err >&2; exit 4' 2>/dev/null; echo "code kept=$?"
$H ps -a | grep ' kept$' | grep -o 'Exited (4)' | sed 's/^/ps-a=/'
$H logs kept 2>/dev/null | sed 's/^/logs=/'
$H logs kept 2>&1 >/dev/null | sed 's/^/logs-err=/'
$H logs -t kept 2>/dev/null | grep -c 'Z kept-output$' | sed 's/^/logs-ts=/'
$H system df | awk 'NR>1 {print "df=" $1 " " $2 " " $3}'
$H inspect kept | grep -o '"ExitCode": 4' | sed 's/^/inspect=/'
$H rm kept >/dev/null; echo "code rm-kept=$?"
$H run -d --name img1 $I sh -c 'echo started; echo persisted > /data/p; trap "echo got-term; exit 0" TERM; while true; do sleep 1; done' >/dev/null
sleep 3
$H logs img1 | head -1 | sed 's/^/logs-d=/'
$H ps | grep -c ' img1$' | sed 's/^/ps-running=/'
# husk-vmm's confinement, on every thread: an unprivileged user of its
# own (uid and gid from husk's range, no groups) with no capability, no new
# privileges, a seccomp filter; no core dumps.
V=$(pgrep -x husk-vmm | head -1)
echo "rw-rootfs-mount=$(rootfs_mount $(pgrep -x husk-vmm-fs -P $V))"
for t in /proc/$V/task/*; do grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' $t/status; done | sort -u | tr '\t' ' ' | sed 's/^/vmm-/'
for t in /proc/$V/task/*; do awk '/^(Uid|Gid):/ {print $1 " " ($2 >= 1073741824 && $2 < 1090519040 && $2 == $3 && $3 == $4 && $4 == $5 ? "unprivileged" : $2)}' $t/status; done | sort -u | sed 's/^/vmm-/'
awk '/^Groups:/ {print "vmm-groups=" NF - 1}' /proc/$V/status
# Its root is a jail of its own: its sandbox directory and nothing else.
echo "vmm-root=$(ls /proc/$V/root | tr '\n' ' ')"
echo "vmm-root-sandboxes=$(ls /proc/$V/root/run/husk | wc -l)"
[ -e /proc/$V/root/etc/passwd ] || echo "vmm-no-etc"
touch /proc/$V/root/run/x 2>/dev/null || echo "vmm-root-read-only"
# The share is served by its file-system process: root with only the
# virtio-fs capabilities, its own seccomp filter, one thread, and neither
# KVM nor a tap among its descriptors.
F=$(pgrep -x husk-vmm-fs -P $V)
for t in /proc/$F/task/*; do grep -E '^(Uid|CapEff|Seccomp|NoNewPrivs):' $t/status; done | sort -u | tr '\t' ' ' | sed 's/^/fs-/'
echo "fs-threads=$(ls /proc/$F/task | wc -l)"
echo "fs-kvm-tun=$(ls -l /proc/$F/fd | grep -cE 'kvm|tun')"
awk '/Max core file size/ {print "vmm-core=" $5 "/" $6}' /proc/$V/limits
awk '/Max open files/ {print "vmm-nofile=" $4 "/" $5} /Max file size/ {print "vmm-fsize=" $4 "/" $5}' /proc/$V/limits
# Its own network, IPC and UTS namespaces; its Landlock jail, as its control
# socket reports it, matches what this kernel has.
tr '\0' '\n' < /proc/$V/environ | grep -cvE '^(HUSK_VMM_LOG|RUST_BACKTRACE)=' | sed 's/^/vmm-foreign-env=/'
for n in net ipc uts mnt user; do [ "$(readlink /proc/$V/ns/$n)" != "$(readlink /proc/self/ns/$n)" ] && echo "vmm-own-$n"; done
A=$(ls /run/husk/*/api.sock | head -1)
python3 -c 'import socket,sys,json; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"{\"op\":\"info\"}\n"); print("vmm-jail=" + json.loads(s.makefile().readline())["jail"])' "$A"
python3 -c 'import ctypes; n=ctypes.CDLL(None).syscall(444, None, 0, 1); print("host-jail=" + ("landlock-abi-%d" % n if n > 0 else "unsupported"))'
$H rmi $I 2>&1 | grep -o 'used by a container' | sed 's/^/rmi=/'
bounded 60 $H stop -t 30 img1 >/dev/null; echo "code stop=$?"
$H ps | grep -c ' img1$' | sed 's/^/ps-after-stop=/'
$H ps -a | grep ' img1$' | grep -o 'Exited (0)' | sed 's/^/stopped=/'
$H logs --tail 1 img1 | sed 's/^/logs-end=/'
$H start img1 >/dev/null; echo "code start=$?"
sleep 3
$B exec img1 cat /data/p | sed 's/^/layer-kept=/'
$H rm img1 2>&1 | grep -o 'is running' | sed 's/^/rm=/'
$H kill -s bogus img1 2>&1 | grep -o 'is not a signal' | sed 's/^/kill-bad=/'
$H kill img1 >/dev/null; echo "code kill=$?"
bounded 60 $H wait img1 | sed 's/^/wait=/'
$H kill img1 2>&1 | grep -o 'is not running' | sed 's/^/kill-stopped=/'
$H rm img1 >/dev/null; echo "code rm=$?"
echo "containers=$(ls /tmp/store/containers | wc -l)"
$H rmi $I >/dev/null; echo "code rmi=$?"
echo "layers=$(ls /tmp/store/layers/sha256 | wc -l) blobs=$(ls /tmp/store/blobs/sha256 | wc -l)"
ls /run/husk | wc -l | sed 's/^/left=/'
pgrep -c husk-vmm | sed 's/^/vmms=/'
grep -c ' /tmp/store' /proc/mounts | sed 's/^/store-mounts=/'
kill $REG
"#,
        Duration::from_secs(580),
    );
    for want in [
        "hi from image hello in /data\ncode default=0",
        "pull-note=Unable to find image",
        "whiteout-hides",
        "opq=new \n",
        "opaque=kept \n",
        "hello-from-image",
        "written\n",
        "suid=4755",
        // Made in the container's writable layer (an overlay): kept.
        "made-suid=4755",
        "fresh-layer",
        "user=1000:1001 home=/data",
        "group=7",
        "hi from image override in /data\ncode env=0",
        "code missing=127",
        "code noexec=126",
        "entrypoint-hostname=web1\n",
        "kill-bad=is not a signal",
        "code kill=0",
        "wait=137\n",
        "kill-stopped=is not running",
        "noexec-msg=1",
        "rootfs=read-only",
        "ro-rootfs-mount=overlay ro\n",
        "rw-rootfs-mount=overlay rw\n",
        "code kept=4",
        "ps-a=Exited (4)",
        "logs=kept-output\n",
        "logs-err=kept-err\n",
        "logs-ts=1\n",
        "df=Images 1 1\n",
        "df=Containers 1 0\n",
        "inspect=\"ExitCode\": 4",
        "code rm-kept=0",
        "logs-d=started",
        "ps-running=1",
        "vmm-CapEff: 0000000000000000\n",
        "vmm-Uid: unprivileged\n",
        "vmm-Gid: unprivileged\n",
        "vmm-groups=0\n",
        "fs-Uid: 0 0 0 0\n",
        "fs-CapEff: 00000000080000db\n",
        "fs-Seccomp: 2\n",
        "fs-NoNewPrivs: 1\n",
        "fs-threads=1\n",
        "fs-kvm-tun=0\n",
        "vmm-CapBnd: 0000000000000000\n",
        "vmm-root=run \n",
        "vmm-root-sandboxes=1\n",
        "vmm-no-etc\n",
        "vmm-root-read-only\n",
        "vmm-own-mnt\n",
        "vmm-own-user\n",
        "vmm-NoNewPrivs: 1\n",
        "vmm-Seccomp: 2\n",
        "vmm-core=0/0\n",
        "vmm-nofile=4096/4096\n",
        // The console's 16 MiB or twice the log's 16 MiB, and 1 MiB more.
        "vmm-fsize=34603008/34603008\n",
        "vmm-foreign-env=0\n",
        "vmm-own-net\n",
        "vmm-own-ipc\n",
        "vmm-own-uts\n",
        "rmi=used by a container",
        "code stop=0",
        "ps-after-stop=0",
        "stopped=Exited (0)",
        "logs-end=got-term",
        "code start=0",
        "layer-kept=persisted",
        "rm=is running",
        "code rm=0",
        "containers=0",
        "code rmi=0",
        "layers=0 blobs=0",
        "left=0",
        "vmms=0",
        "store-mounts=0",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("logs=kept-err"), "stderr kept apart:\n{out}");
    assert!(
        !out.contains("vmm-Seccomp: 0"),
        "every husk-vmm thread has a filter:\n{out}"
    );
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_string()
    };
    assert_eq!(
        line("vmm-jail="),
        line("host-jail="),
        "husk-vmm is in the Landlock jail this kernel offers:\n{out}"
    );
    assert_eq!(
        out.matches("vmm-CapEff").count(),
        1,
        "one capability set on every thread:\n{out}"
    );
    assert_eq!(
        out.matches("vmm-Uid").count(),
        1,
        "one user on every thread:\n{out}"
    );
}
