//! The CLI's network, docker's default bridge in husk's terms, in the test
//! host: `husk run` containers on `husk0` with NAT, `-p` publishing, and
//! `--network none`; nothing left after `husk rm`.

use std::time::Duration;

use husk_tests::scenario;

/// `-p 8080:80` reached from the host (the bridge address and 127.0.0.1);
/// egress to the host's bridge-side address, and NAT to a network that has
/// no route back to the containers; `--network none` has no NIC; bad
/// flags refused before anything is made; after `husk rm` no bridge, NAT
/// table, veth, namespace or VM is left.
#[test]
fn husk_run_gets_a_bridge_network_and_publishes_ports() {
    let out = scenario::run_script(
        r#"set -u
export PATH="$PWD/target/debug:$PATH:/usr/sbin:/sbin"
R=target/husk/busybox-rootfs
# The test host's init leaves lo down.
ip link set lo up
leaks() {
  echo "vmm-left=$(pgrep -c husk-vmm)"
  echo "bridge-left=$(ip -o link show husk0 2>/dev/null | wc -l)"
  echo "nat-left=$(nft list tables | grep -c 'ip husk')"
  echo "veths-left=$(ip -o link show | grep -c ': hv')"
  echo "netns-left=$(ls /run/husk-network/netns 2>/dev/null | wc -l)"
  echo "run-husk-left=$(ls /run/husk 2>/dev/null | wc -l)"
}
husk run -d --name web -p 8080:80 --rootfs $R sh -c 'mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www' || { echo "run -d failed"; exit 1; }
husk ps | sed 's/^/ps: /'
husk inspect web | grep -E '"IPAddress"|8080' | sed 's/^/inspect: /'
sleep 2
echo "bridge: $(timeout 20 busybox wget -q -O - http://10.89.0.1:8080/)"
echo "localhost: $(timeout 20 busybox wget -q -O - http://127.0.0.1:8080/)"
mkdir -p /tmp/www && echo host-hi > /tmp/www/hi && busybox httpd -p 10.89.0.1:9090 -h /tmp/www
husk run --rm --rootfs $R timeout 20 wget -q -O - http://10.89.0.1:9090/hi 2>&1 | sed 's/^/egress: /'
# A network outside with no route back to 10.89/16: only NAT gets a reply.
ip netns add ext && ip link add ve-h type veth peer name eth0 netns ext
ip addr add 192.168.77.1/24 dev ve-h && ip link set ve-h up
ip -n ext addr add 192.168.77.2/24 dev eth0 && ip -n ext link set eth0 up && ip -n ext link set lo up
ip netns exec ext busybox httpd -p 192.168.77.2:9091 -h /tmp/www
husk run --rm --rootfs $R timeout 20 wget -q -O - http://192.168.77.2:9091/hi 2>&1 | sed 's/^/nat: /'
husk run --rm --network none --rootfs $R ls /sys/class/net 2>&1 | sed 's/^/none: /'
# Runs resume templates (one per shape: a NIC or none); a clone's NIC has
# the pod's MAC, not its template's.
husk run --rm --rootfs $R cat /sys/class/net/eth0/address 2>&1 | sed 's/^/mac: /'
# (Test hosts share templates: others' may be listed too.)
husk template ls | sed 's/^/tpl: /'
husk template ls | awk '$2 == 1 && $3 == "256MiB" && $4 == "yes" && $NF == "ok" {print "tpl-shape nics=" $5}' | sort -u
# A guest sends only as its NIC: a container with NET_ADMIN that gives
# eth0 another MAC gets no frame onto the bridge under it (husk0 never
# learns it, the ping gets no answer); back under its own, it pings.
husk run -d --name spoof --cap-add NET_ADMIN --rootfs $R sh -c 'M=$(cat /sys/class/net/eth0/address); ip link set eth0 address 02:00:00:00:00:99 && ping -c 2 -W 2 10.89.0.1 >/dev/null 2>&1; echo "spoof-ping=$?"; ip link set eth0 address $M && ping -c 1 -W 5 10.89.0.1 >/dev/null 2>&1; echo "own-ping=$?"; echo done; exec sleep 60' >/dev/null || echo "spoof run failed"
for i in $(seq 120); do husk logs spoof 2>/dev/null | grep -q done && break; sleep 0.5; done
husk logs spoof 2>&1 | sed 's/^/spoof: /'
echo "fdb-spoofed=$(bridge fdb show br husk0 | grep -ci 02:00:00:00:00:99)"
husk rm -f spoof >/dev/null
husk run --rm --cap-add NET_WIZARD --rootfs $R true 2>&1 | sed 's/^/badcap: /'
husk run --rm --network none -p 80:80 --rootfs $R true 2>&1 | sed 's/^/bad1: /'
husk run --rm -p 99999:80 --rootfs $R true 2>&1 | sed 's/^/bad2: /'
husk run --rm -p 8080:81 --rootfs $R true 2>&1 | sed 's/^/taken: /'
husk rm -f web >/dev/null
ip netns del ext
sleep 1
leaks
"#,
        Duration::from_secs(500),
    );
    for want in [
        "ps: ",
        "0.0.0.0:8080->80/tcp",
        "\"IPAddress\": \"10.89.0.2\"",
        "bridge: hello-from-web",
        "localhost: hello-from-web",
        "egress: host-hi",
        "nat: host-hi",
        "none: lo",
        "tpl-shape nics=0",
        "tpl-shape nics=1",
        "spoof: spoof-ping=1",
        "spoof: own-ping=0",
        "fdb-spoofed=0",
        "badcap: husk: --cap-add \"NET_WIZARD\": not a Linux capability",
        "bad1: husk: -p needs a network: not with --network none",
        "-p \"99999:80\": ports are 1-65535",
        "taken: ",
        "port 8080 is published by container web already",
        "vmm-left=0",
        "bridge-left=0",
        "nat-left=0",
        "veths-left=0",
        "netns-left=0",
        "run-husk-left=0",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("none: eth0"), "{out}");
    let mac = out
        .lines()
        .find_map(|l| l.strip_prefix("mac: "))
        .unwrap_or_else(|| panic!("no guest MAC in:\n{out}"));
    assert!(
        mac.len() == 17 && !mac.starts_with("02:68:75:73:6b"),
        "a clone kept its template's MAC {mac:?}:\n{out}"
    );
}
