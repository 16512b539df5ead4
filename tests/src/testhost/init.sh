#!/bin/sh
# PID 1 of the Husk test host (L2). It loads the modules that give this
# kernel virtio-fs and KVM, mounts the host's root (read-only, over
# virtio-fs), builds a root from it with writable tmpfs and overlay layers,
# and runs the harness's script there. The script's output goes to ttyS1,
# its exit status follows as a marker line, then the VM powers off.
export PATH=/bin
OUT=/dev/ttyS1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stty -F $OUT raw -echo 2>/dev/null
echo "@@HUSK-TESTHOST-UP@@" > $OUT
R=/newroot
# A heartbeat on the console: the harness tells an L2 that has wedged
# whole (no beat) from a script that is merely slow or stuck (beats go on).
# The harness's own test stops it by creating /run/husk-testhost-nobeat.
(while [ ! -e $R/run/husk-testhost-nobeat ]; do
    echo "@@HUSK-TESTHOST-BEAT@@" > /dev/ttyS0
    sleep 5
done) &

finish() {
    echo "@@HUSK-TESTHOST-EXIT=$1@@" > $OUT
    sync
    poweroff -f
}
fail() {
    echo "testhost-init: $*" > $OUT
    finish 255
}

SCRIPT=
BINDS=
TEMPLATES=0
for p in $(cat /proc/cmdline); do
    case $p in
        husk_testhost.script=*) SCRIPT=${p#*=} ;;
        husk_testhost.binds=*) BINDS=${p#*=} ;;
        husk_testhost.templates=*) TEMPLATES=${p#*=} ;;
    esac
done
[ -n "$SCRIPT" ] || fail "no husk_testhost.script= on the command line"

while read -r mod params; do
    insmod /modules/$mod $params || fail "insmod $mod $params"
done < /modules/load

mkdir -p /host /rw /newroot
mount -t virtiofs -o ro hostroot /host || fail "mounting the host root over virtio-fs"
mount -t tmpfs -o mode=0755 tmpfs /rw
mount -t tmpfs -o mode=0755 tmpfs $R

# The host's top-level symlinks (merged /usr) as they are.
for e in /host/*; do
    n=${e#/host/}
    [ -L "$e" ] && ln -s "$(readlink "$e")" "$R/$n"
done
# Read-only views of what tests read: binaries, the checkout, caches.
for d in usr opt srv home work mnt; do
    [ -d /host/$d ] && [ ! -L /host/$d ] || continue
    mkdir -p $R/$d
    mount --bind /host/$d $R/$d && mount -o remount,bind,ro $R/$d || fail "bind $d"
done
# Writable layers over the host's /etc, /var and /root: tests may write
# config and state there; nothing reaches the host.
for d in etc var root; do
    mkdir -p /rw/$d/upper /rw/$d/work $R/$d
    mount -t overlay overlay -o lowerdir=/host/$d,upperdir=/rw/$d/upper,workdir=/rw/$d/work $R/$d \
        || fail "overlay on /$d"
done
# The runtime's VM templates, shared with the next test hosts (writable:
# the one host directory an L2 writes to; see docs/testhost.md).
if [ "$TEMPLATES" = 1 ]; then
    mkdir -p $R/var/lib/husk/templates
    mount -t virtiofs templates $R/var/lib/husk/templates || fail "mounting the shared templates"
fi
mkdir -p $R/proc $R/sys $R/dev $R/tmp $R/run
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp

# Host directories the script needs that the layers above hide (a checkout
# under /tmp, say), read-only at the same paths.
OLDIFS=$IFS
IFS=,
for b in $BINDS; do
    mkdir -p "$R$b" && mount --bind "/host$b" "$R$b" && mount -o remount,bind,ro "$R$b" \
        || fail "bind $b"
done
IFS=$OLDIFS

cp "/host$SCRIPT" $R/run/husk-testhost.sh || fail "copying $SCRIPT"
# Tests that must tell the nested test host from hardware KVM look here.
export HUSK_IN_TESTHOST=1
# Not a plain chroot: in a mount namespace of its own, $R is moved onto /,
# so the script's root is its namespace's root, as on a real host (the
# kernel refuses a user namespace to a chrooted process, and husk-vmm
# makes one for its jail). PID 1 keeps the initramfs for poweroff.
unshare -m --propagation private sh -c "cd $R && mount --move . / && exec chroot . /bin/sh /run/husk-testhost.sh" \
    < /dev/null > $OUT 2>&1
finish $?
