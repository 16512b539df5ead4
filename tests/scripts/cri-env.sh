#!/bin/sh
# Sourced by the CRI tests (tests/tests/cri.rs) and tools/bench-cri, in the
# test host: containerd on /tmp/ctrd with its CRI plugin, runtime handlers
# husk and runc, a CNI bridge + host-local network (Debian's plugins in
# /usr/lib/cni), the busybox image (Cmd sh) and a pause image (Cmd sleep) in
# k8s.io. Sets C (ctr), K (husk-cri), IMG; defines dump and leaks.
set -u
export PATH="$PWD/target/debug:$PATH:/usr/sbin:/sbin"
export RUST_LOG=${RUST_LOG:-info}
for f in target/debug/containerd-shim-husk-v2 target/debug/husk-cri target/husk/busybox-rootfs; do
  [ -e "$f" ] || { echo "missing $f"; exit 1; }
done
# bridge, veth, tun, sch_ingress, cls_u32 and act_mirred: the test host loads them at boot.
D=/tmp/ctrd
mkdir -p $D/cni $D/ipam /var/run/netns
cat > $D/cni/10-husk.conflist <<CNI
{"cniVersion": "0.4.0", "name": "husk-test", "plugins": [
  {"type": "bridge", "bridge": "cni-husk0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$D/ipam"}}]}
CNI
cat > $D/config.toml <<CFG
version = 2
root = "$D/root"
state = "$D/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$D/c.sock"
[ttrpc]
  address = "$D/c.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.local/pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni"
CFG
containerd --config $D/config.toml >>$D/log 2>&1 &
for i in $(seq 200); do [ -S $D/c.sock ] && ctr -a $D/c.sock version >/dev/null 2>&1 && break; sleep 0.1; done
C="ctr -a $D/c.sock -n k8s.io"
K="husk-cri --socket $D/c.sock"
IMG=husk.local/busybox:latest
tools/shim-oci-image target/husk/busybox-rootfs /tmp/img.tar $IMG
tools/shim-oci-image target/husk/busybox-rootfs /tmp/pause.tar husk.local/pause:latest '["sleep", "2147483647"]'
$C images import /tmp/img.tar >/dev/null && $C images import /tmp/pause.tar >/dev/null || { echo "import failed"; tail -50 $D/log; exit 1; }
dump() {
  # What ended a VM or a shim early, from the whole run (the tail below may
  # have scrolled past it), then the log's tail.
  echo "--- husk warnings, errors and VM ends"
  # A VM that ended unasked is followed by its VMM's and console's last
  # lines, indented with "  | " (the sandbox's directory and logs are gone).
  # Warnings first: a CI record keeps an output's head and tail, and the
  # routine ends of many execs must not push out the one that matters.
  grep -E ' (WARN|ERROR) |OOM|seccomp|^  \| ' $D/log | grep -v 'level=' | tail -n 60
  echo "--- VM and process ends"
  grep -E 'VM stopped|husk-vmm exited|process exited' $D/log | grep -v 'level=' | tail -n 30
  echo "--- containerd log"; grep -v 'level=debug' $D/log | tail -n ${1:-60}
}
leaks() {
  echo "vmm-left=$(pgrep -c husk-vmm)"
  echo "run-husk-left=$(ls /run/husk 2>/dev/null | wc -l)"
  echo "mounts-left=$(grep -c /run/husk /proc/mounts)"
  echo "netns-left=$(ls /var/run/netns | wc -l)"
  echo "taps-left=$(ip -o link show | grep -c _husk)"
  echo "veths-left=$(ip -o link show type veth | wc -l)"
  echo "shims-left=$(pgrep -c -f containerd-shim-husk-v2)"
}
