//! Kubernetes' path: containerd 1.6 with its CRI plugin, a CNI bridge
//! network (Debian's containernetworking-plugins in /usr/lib/cni), runtime
//! handlers `husk` and `runc`, and husk-cri standing in for the kubelet,
//! all inside the test host. Husk pods and runc pods share one bridge.

use std::time::Duration;

use husk_tests::scenario;

/// containerd on /tmp/ctrd with CRI, a bridge + host-local network, the
/// busybox image (Cmd sh) and a pause image (Cmd sleep) in `k8s.io`;
/// `K` = husk-cri on that socket. `leaks` counts what a pod could leave.
const PRELUDE: &str = r#"set -u
. tests/scripts/cri-env.sh
"#;

fn run(body: &str, timeout: Duration) -> String {
    scenario::run_script(&format!("{PRELUDE}\n{body}"), timeout)
}

fn assert_all(out: &str, wants: &[&str]) {
    for w in wants {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }
}

/// Two husk pods (two VMs) and a runc pod on one CNI bridge: each husk
/// pod's eth0 has its CNI address and the veth's MAC; pod -> gateway;
/// pod -> pod over TCP, husk <-> runc both ways, host -> pod and
/// pod -> host, 10 MB byte-exact; two containers of a pod over localhost;
/// ExecSync exit codes; ContainerStats; UpdateContainerResources seen in
/// the guest's cgroup; then nothing left: no tap, netns, veth, VM or mount.
#[test]
fn husk_and_runc_pods_share_a_cni_network() {
    let out = run(
        r#"
# A server in each pod: 10 MB of random bytes and their sum, over HTTP.
SERVE='mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=10 2>/dev/null && sha256sum /www/blob | cut -d" " -f1 > /www/sum && exec httpd -f -p 8080 -h /www'
pod() { # NAME HANDLER [RUNP ARGS] -> pod id in $POD, serving container in $SRV
  n=$1; h=$2; shift 2
  POD=$($K runp --name $n --handler $h "$@") || { echo "runp $n failed"; dump; exit 1; }
  SRV=$($K create $POD --name web --image $IMG -- sh -c "$SERVE") && $K start $SRV || { echo "web $n failed"; dump; exit 1; }
}
pod pa husk --sysctl net.ipv4.ip_unprivileged_port_start=81; PA=$POD; SA=$SRV
pod pb husk; PB=$POD; SB=$SRV
pod pr runc; PR=$POD; SR=$SRV
IPA=$($K ip $PA); IPB=$($K ip $PB); IPR=$($K ip $PR)
echo "ips $IPA $IPB $IPR"
sleep 3
# eth0 of a husk pod: the CNI's address, the veth's MAC (seen from the host's side of the netns).
$K exec $SA -- ip -o -4 addr show eth0 | grep -q " $IPA/16 " && echo "pa-eth0-has-its-ip"
$K exec $SB -- ip -o -4 addr show eth0 | grep -q " $IPB/16 " && echo "pb-eth0-has-its-ip"
$K exec $SA -- ip route | sed 's/^/pa route: /'
echo "pa hostname=$($K exec $SA -- hostname) sysctl=$($K exec $SA -- cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
# /etc/hosts and /etc/resolv.conf are the files CRI wrote for the pod.
SBX=$D/root/io.containerd.grpc.v1.cri/sandboxes/$PA
for f in hosts resolv.conf; do
  [ -s $SBX/$f ] && [ "$(sha256sum < $SBX/$f)" = "$($K exec $SA -- sh -c "sha256sum < /etc/$f")" ] && echo "pa-$f-from-cri"
done
# The guest NIC has the veth's MAC; the tap and the redirect sit in the pod's netns.
for ns in $(ls /var/run/netns); do ip -n $ns -o -4 addr show eth0 2>/dev/null | grep -q " $IPA/" && NSA=$ns; done
HM=$(ip -n $NSA -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)
GM=$($K exec $SA -- cat /sys/class/net/eth0/address)
echo "macs host=$HM guest=$GM"
[ -n "$HM" ] && [ "$HM" = "$GM" ] && echo "pa-mac-is-the-veths"
ip -n $NSA -o link show tap0_husk >/dev/null && echo "pa-tap-in-its-netns"
tc -n $NSA filter show dev eth0 ingress | grep -q "mirred (Egress Redirect to device tap0_husk)" && echo "pa-veth-redirects-to-tap"
$K exec $SA -- ping -c 1 -W 5 10.88.0.1 >/dev/null && echo "pa-pings-gateway"
# The pod's host cost is in its cgroup: husk-vmm and the shim run in it.
VMMS=$(pgrep -x husk-vmm | wc -l)
INPOD=0; for v in $(pgrep -x husk-vmm); do grep -q "/k8s.io/" /proc/$v/cgroup && INPOD=$((INPOD + 1)); done
echo "vmms-in-pod-cgroups=$INPOD/$VMMS"
for v in $(pgrep -x husk-vmm); do cat /proc/$v/cgroup; done | sed 's/^/vmm cgroup: /'

get() { # FROM-CONTAINER IP -> "ok" when the blob's sum matches the served sum
  t0=$(date +%s)
  want=$($K exec $1 -- sh -c "timeout 60 wget -q -O - http://$2:8080/sum")
  got=$($K exec $1 -- sh -c "timeout 60 wget -q -O - http://$2:8080/blob | sha256sum | cut -d' ' -f1")
  [ -n "$want" ] && [ "$want" = "$got" ] && echo "ok ($(( $(date +%s) - t0 )) s)" || echo "bad want=$want got=$got"
}
echo "pa->pb $(get $SA $IPB)"
echo "pa->pr $(get $SA $IPR)"
echo "pr->pa $(get $SR $IPA)"
# host -> pod and pod -> host
want=$($K exec $SB -- cat /www/sum)
got=$(timeout 60 busybox wget -q -O - http://$IPB:8080/blob | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] && echo "host->pb ok" || echo "host->pb bad $want $got"
mkdir -p /tmp/www && echo host-says-hi > /tmp/www/hi && busybox httpd -p 10.88.0.1:9090 -h /tmp/www
$K exec $SA -- timeout 60 wget -q -O - http://10.88.0.1:9090/hi | sed 's/^/pa->host: /'
# Two containers of one pod over localhost.
S2=$($K create $PA --name side --image $IMG -- sh -c 'mkdir -p /w && echo from-side > /w/x && exec httpd -f -p 8081 -h /w') && $K start $S2
sleep 2
$K exec $SA -- timeout 60 wget -q -O - http://127.0.0.1:8081/x | sed 's/^/localhost: /'
$K exec $SA -- sh -c 'exit 3'; echo "execsync-code=$?"
$K stats $SA | sed 's/^/stats: /'
$K update $SA --memory 134217728 && echo "update-ok"
# No cgroup namespace on a cgroup v1 host's CRI spec: the container sees
# the guest's whole (v2) hierarchy, its own cgroup at its path there.
$K exec $SA -- sh -c 'cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup | head -1)/memory.max' | sed 's/^/limit: /'
for p in $PA $PB $PR; do $K stopp $p && $K rmp $p || echo "removing $p failed"; done
sleep 2
echo "pod-cgroups-left=$(ls /sys/fs/cgroup/k8s.io 2>/dev/null | grep -c -e $PA -e $PB)"
leaks
dump 30
"#,
        Duration::from_secs(590),
    );
    assert_all(
        &out,
        &[
            "pa-eth0-has-its-ip",
            "pb-eth0-has-its-ip",
            "pa-pings-gateway",
            "pa hostname=pa sysctl=81",
            "pa-hosts-from-cri",
            "pa-resolv.conf-from-cri",
            "vmms-in-pod-cgroups=2/2",
            "pod-cgroups-left=0",
            "pa-mac-is-the-veths",
            "pa-tap-in-its-netns",
            "pa-veth-redirects-to-tap",
            "pa->pb ok (",
            "pa->pr ok (",
            "pr->pa ok (",
            "host->pb ok",
            "pa->host: host-says-hi",
            "localhost: from-side",
            "execsync-code=3",
            "update-ok",
            "limit: 134217728",
            "vmm-left=0",
            "run-husk-left=0",
            "mounts-left=0",
            "netns-left=0",
            "taps-left=0",
            "veths-left=0",
        ],
    );
    let mem: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("stats: memory_working_set_bytes="))
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no stats line in:\n{out}"));
    assert!(mem > 0, "{out}");
}

/// Pod network namespaces that are not right, through `ctr run --with-ns`
/// (the path CRI would pass): a missing one, a veth without an address, a
/// tap name already taken: each a clear error with no VM, tap or qdisc
/// left. A namespace made by hand as a CNI would works; no namespace gives
/// a VM with no NIC (`lo`, and the guest kernel's idle `sit0`).
#[test]
fn bad_pod_networks_are_refused_whole() {
    let out = run(
        r#"
N="$C run --rm --runtime io.containerd.husk.v2"
$N --with-ns network:/var/run/netns/nope $IMG bad1 true 2>&1 | sed 's/^/missing: /'
ip netns add noaddr && ip link add eth0 netns noaddr type veth peer name vx-noaddr
$N --with-ns network:/var/run/netns/noaddr $IMG bad2 true 2>&1 | sed 's/^/noaddr: /'
# Two pod links; the second's tap name is taken (by a bridge), so the
# first link's tap and qdisc, already made, must go again.
ip netns add taken && ip link add eth0 netns taken type veth peer name vx-taken
ip link add eth1 netns taken type veth peer name vx-taken1
ip -n taken addr add 10.99.0.2/24 dev eth0 && ip -n taken link set eth0 up
ip -n taken addr add 10.98.0.2/24 dev eth1 && ip -n taken link set eth1 up
ip link add tap1_husk netns taken type bridge
$N --with-ns network:/var/run/netns/taken $IMG bad3 true 2>&1 | sed 's/^/taken: /'
echo "taken-ingress-left=$(tc -n taken qdisc show | grep -c ingress)"
echo "taken-taps-left=$(ip -n taken -o link show | grep -c tap0_husk)"
ip netns add good && ip link add eth0 netns good type veth peer name vx-good
ip addr add 10.99.1.1/24 dev vx-good && ip link set vx-good up
ip -n good addr add 10.99.1.2/24 dev eth0 && ip -n good link set eth0 up && ip -n good route add default via 10.99.1.1
# A second attachment, as a second CNI network would add.
ip link add net1 netns good type veth peer name vx-good1
ip addr add 10.97.0.1/24 dev vx-good1 && ip link set vx-good1 up
ip -n good addr add 10.97.0.2/24 dev net1 && ip -n good link set net1 up
$N --with-ns network:/var/run/netns/good $IMG ok1 sh -c 'ip -o -4 addr show eth0; ip -o -4 addr show net1; ping -c 1 -W 5 10.99.1.1 >/dev/null && echo pinged-the-host; ping -c 1 -W 5 10.97.0.1 >/dev/null && echo pinged-over-net1; ip route' 2>&1 | sed 's/^/good: /'
echo "good-taps-left=$(ip -n good -o link show | grep -c _husk)"
$N $IMG lo1 ls /sys/class/net 2>&1 | sed 's/^/none: /'
for n in noaddr taken good; do ip netns del $n; done
sleep 1
leaks
dump 20
"#,
        Duration::from_secs(400),
    );
    assert_all(
        &out,
        &[
            "pod network namespace /var/run/netns/nope: No such file or directory",
            "noaddr: ctr: failed to create shim task: pod network: eth0 (a veth) has no address",
            "taken: ctr: failed to create shim task: tap tap1_husk:",
            "taken-ingress-left=0",
            "taken-taps-left=0",
            "good: 2: eth0    inet 10.99.1.2/24",
            "good: pinged-the-host",
            "net1    inet 10.97.0.2/24",
            "good: pinged-over-net1",
            "good: default via 10.99.1.1 dev eth0",
            "good-taps-left=0",
            "none: lo",
            "vmm-left=0",
            "run-husk-left=0",
            "mounts-left=0",
        ],
    );
    assert!(!out.contains("none: eth0"), "{out}");
}
