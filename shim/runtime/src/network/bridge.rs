//! The CLI's default network, docker's bridge in husk's terms: a host
//! bridge `husk0` (10.89.0.1/16) made on first use and removed when no
//! container uses it, a network namespace per container with a veth whose
//! far end sits on the bridge, an address from a file-based allocator, a
//! default route through the bridge, and NAT: masquerade out, DNAT in for
//! published ports (`-p HOST:CONTAINER[/tcp|udp]`) on the host's addresses,
//! and for TCP on 127.0.0.1 a relay in the CLI process that runs the
//! container, as docker's userland proxy does ([`proxy_localhost`]). The container's VM then
//! takes the namespace's veth over exactly as a CRI pod's
//! ([`super::PodNetwork`]), so the CLI and Kubernetes share one path.
//!
//! NAT is one nftables table, `ip husk`, rewritten whole in one `nft -f`
//! transaction from the state files each time a container connects or
//! leaves: no rule can be left behind by a crash between two edits, and
//! removing the table removes all of husk's rules. nftables has no netlink
//! crate as well kept as rtnetlink (the kernel's nf_tables netlink protocol
//! is a bytecode), so this is the one place husk runs a tool: `nft`, whose
//! input is generated from checked values only.
//!
//! Concurrent CLIs serialize on a lock file, held for these few netlink
//! calls and never across a VM boot.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures_util::TryStreamExt;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use super::NetError;

/// The bridge and its network.
pub const BRIDGE: &str = "husk0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 1);
pub const PREFIX: u8 = 16;
/// State: the lock, allocated addresses, published ports, namespaces.
pub const STATE_DIR: &str = "/run/husk-network";
const NFT_TABLE: &str = "husk";

/// A published port: `[IP:]HOST:CONTAINER[/tcp|udp]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// The host address it listens on; all of the host's when `None`.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub udp: bool,
}

impl std::str::FromStr for Publish {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |why: &str| NetError::Invalid(format!("-p {s:?}: {why}"));
        let (ports, proto) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, false),
            Some((p, "udp")) => (p, true),
            Some(_) => return Err(bad("the protocol is tcp or udp")),
            None => (s, false),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (ip, host, container) = match parts.as_slice() {
            [h, c] => (None, *h, *c),
            [ip, h, c] => (
                Some(
                    ip.parse::<Ipv4Addr>()
                        .map_err(|_| bad("not an IPv4 address"))?,
                ),
                *h,
                *c,
            ),
            _ => return Err(bad("expected HOST:CONTAINER[/tcp|udp]")),
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad("ports are 1-65535")),
        };
        Ok(Publish {
            host_ip: ip,
            host_port: port(host)?,
            container_port: port(container)?,
            udp: proto,
        })
    }
}

/// What one container holds on the bridge network.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Endpoint {
    ip: Ipv4Addr,
    host_veth: String,
    ports: Vec<Publish>,
}

fn state() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

/// The namespace file of container `id` (a bind mount of its netns).
pub fn netns_path(id: &str) -> PathBuf {
    state().join("netns").join(id)
}

fn endpoint_path(id: &str) -> PathBuf {
    state().join("endpoints").join(format!("{id}.json"))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |e| NetError::Invalid(format!("{what}: {e}"))
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// The MTU of a container's NIC on the bridge network: a veth's default,
/// which [`connect`] leaves as it is (`husk template build` shapes the
/// CLI's template by it).
pub const MTU: u32 = 1500;

/// The host end of a container's veth: `hv` and 8 hex digits of its id's
/// hash (names are at most 15 bytes).
fn host_veth_name(id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    format!("hv{:08x}", h.finish() as u32)
}

fn endpoints() -> BTreeMap<String, Endpoint> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(state().join("endpoints")) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        if let Ok(ep) = fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Endpoint>(&b).ok())
            .ok_or(())
        {
            out.insert(id.to_string(), ep);
        }
    }
    out
}

/// The lowest free address after the gateway.
fn allocate(taken: &BTreeMap<String, Endpoint>) -> Result<Ipv4Addr, NetError> {
    let base = u32::from(GATEWAY);
    let size = 1u32 << (32 - PREFIX);
    (2..size - 1)
        .map(|n| Ipv4Addr::from((base & !(size - 1)) + n))
        .find(|ip| !taken.values().any(|e| e.ip == *ip))
        .ok_or_else(|| NetError::Invalid(format!("{BRIDGE}: no address left")))
}

/// The whole `ip husk` table for these endpoints; `None` when there are
/// none (the table goes).
fn nft_ruleset(eps: &BTreeMap<String, Endpoint>) -> Option<String> {
    if eps.is_empty() {
        return None;
    }
    // Loopback destinations are left to the userland proxy
    // ([`proxy_localhost`]): DNAT of a 127.0.0.1 source to the bridge is
    // refused by the kernel's routing unless route_localnet is opened up.
    let mut dnat = String::new();
    for ep in eps.values() {
        for p in &ep.ports {
            let proto = if p.udp { "udp" } else { "tcp" };
            let daddr = match p.host_ip {
                Some(ip) if ip.is_loopback() => continue,
                Some(ip) => format!("ip daddr {ip}"),
                None => "fib daddr type local ip daddr != 127.0.0.0/8".to_string(),
            };
            dnat.push_str(&format!(
                "    {daddr} {proto} dport {} dnat to {}:{}\n",
                p.host_port, ep.ip, p.container_port
            ));
        }
    }
    let subnet = format!(
        "{}/{PREFIX}",
        Ipv4Addr::from(u32::from(GATEWAY) & !((1u32 << (32 - PREFIX)) - 1))
    );
    Some(format!(
        "table ip {NFT_TABLE} {{\n\
         \x20 chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{dnat}  }}\n\
         \x20 chain output {{\n    type nat hook output priority -100; policy accept;\n{dnat}  }}\n\
         \x20 chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {subnet} oifname != \"{BRIDGE}\" masquerade\n  }}\n}}\n"
    ))
}

/// `nft` where Debian and others install it (root's PATH has /usr/sbin,
/// a service's or a test's may not), else whatever PATH finds.
fn nft_binary() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

/// Replaces husk's table in one transaction (or deletes it).
fn apply_nft(eps: &BTreeMap<String, Endpoint>) -> Result<(), NetError> {
    // Declaring the table first makes the delete succeed when it is absent.
    let mut script = format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n");
    if let Some(r) = nft_ruleset(eps) {
        script.push_str(&r);
    }
    let mut child = Command::new(nft_binary())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("running nft (the nftables tool, for the bridge's NAT)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(io("writing to nft"))?;
    let out = child.wait_with_output().map_err(io("waiting for nft"))?;
    if !out.status.success() {
        return Err(NetError::Invalid(format!(
            "nft refused husk's NAT table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(e) => Err(netlink(format!("finding {name}"))(e)),
    }
}

async fn ensure_bridge(h: &Handle) -> Result<u32, NetError> {
    if let Some(i) = link_index(h, BRIDGE).await? {
        return Ok(i);
    }
    h.link()
        .add(LinkBridge::new(BRIDGE).up().build())
        .execute()
        .await
        .map_err(netlink(format!("creating {BRIDGE}")))?;
    let i = link_index(h, BRIDGE)
        .await?
        .ok_or_else(|| NetError::Invalid(format!("{BRIDGE} vanished")))?;
    h.address()
        .add(i, GATEWAY.into(), PREFIX)
        .execute()
        .await
        .map_err(netlink(format!("addressing {BRIDGE}")))?;
    // The containers' traffic is routed through the host.
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io("enabling forwarding"))?;
    tracing::info!(bridge = BRIDGE, gateway = %GATEWAY, "bridge network created");
    Ok(i)
}

/// Makes a network namespace bound at `path` (a thread of its own
/// unshares it; the bind mount keeps it after the thread ends).
fn make_netns(path: &Path) -> Result<File, NetError> {
    File::create(path).map_err(io("creating the netns file"))?;
    let p = path.to_path_buf();
    let made = std::thread::spawn(move || -> Result<(), NetError> {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Invalid(format!("unshare(CLONE_NEWNET): {e}")))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetError::Invalid(format!("binding the netns to {}: {e}", p.display())))
    })
    .join()
    .unwrap_or_else(|_| Err(NetError::Invalid("the netns thread panicked".into())));
    if let Err(e) = made {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    File::open(path).map_err(io("opening the netns"))
}

fn remove_netns(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = fs::remove_file(path);
}

/// Inside the container's namespace: the veth's peer becomes eth0 with
/// its address and a default route through the bridge; lo comes up.
async fn configure_inside(peer: String, ip: Ipv4Addr) -> Result<(), NetError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn = tokio::spawn(conn);
    let r = async {
        let lo = link_index(&h, "lo").await?.unwrap_or(1);
        h.link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(netlink("bringing lo up"))?;
        let i = link_index(&h, &peer)
            .await?
            .ok_or_else(|| NetError::Invalid(format!("{peer} did not arrive")))?;
        h.link()
            .set(LinkUnspec::new_with_index(i).name("eth0").build())
            .execute()
            .await
            .map_err(netlink("naming eth0"))?;
        h.address()
            .add(i, ip.into(), PREFIX)
            .execute()
            .await
            .map_err(netlink("addressing eth0"))?;
        h.link()
            .set(LinkUnspec::new_with_index(i).up().build())
            .execute()
            .await
            .map_err(netlink("bringing eth0 up"))?;
        h.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(GATEWAY)
                    .output_interface(i)
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink("adding the default route"))
    }
    .await;
    conn.abort();
    r
}

async fn connect_locked(id: String, ports: Vec<Publish>) -> Result<PathBuf, NetError> {
    let mut eps = endpoints();
    for (other, ep) in &eps {
        for p in &ports {
            if ep
                .ports
                .iter()
                .any(|q| q.host_port == p.host_port && q.udp == p.udp)
            {
                return Err(NetError::Invalid(format!(
                    "port {} is published by container {other} already",
                    p.host_port
                )));
            }
        }
    }
    let ip = allocate(&eps)?;
    let host_veth = host_veth_name(&id);
    let ns_path = netns_path(&id);
    let ep = Endpoint {
        ip,
        host_veth: host_veth.clone(),
        ports,
    };
    // Recorded first: a failure below is undone by disconnect, which reads it.
    fs::write(
        endpoint_path(&id),
        serde_json::to_vec(&ep).map_err(|e| NetError::Invalid(e.to_string()))?,
    )
    .map_err(io("recording the endpoint"))?;
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn = tokio::spawn(conn);
    let r = async {
        let bridge = ensure_bridge(&h).await?;
        let ns = make_netns(&ns_path)?;
        let peer = format!("{host_veth}p");
        h.link()
            .add(LinkVeth::new(&host_veth, &peer).build())
            .execute()
            .await
            .map_err(netlink(format!("creating veth {host_veth}")))?;
        let hi = link_index(&h, &host_veth)
            .await?
            .ok_or_else(|| NetError::Invalid(format!("{host_veth} vanished")))?;
        let pi = link_index(&h, &peer)
            .await?
            .ok_or_else(|| NetError::Invalid(format!("{peer} vanished")))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(hi)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("putting {host_veth} on {BRIDGE}")))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(pi)
                    .setns_by_fd(ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink("moving the veth into the container's netns"))?;
        super::netns::run_in(&ns_path, move || configure_inside(peer, ip)).await?;
        eps.insert(id.clone(), ep.clone());
        apply_nft(&eps)
    }
    .await;
    conn.abort();
    r.map(|()| ns_path)
}

async fn disconnect_locked(id: String) -> Result<(), NetError> {
    let mut eps = endpoints();
    let ep = eps.remove(&id);
    let host_veth = ep
        .as_ref()
        .map(|e| e.host_veth.clone())
        .unwrap_or_else(|| host_veth_name(&id));
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn = tokio::spawn(conn);
    let r = async {
        // Deleting one end deletes both.
        if let Some(i) = link_index(&h, &host_veth).await? {
            h.link()
                .del(i)
                .execute()
                .await
                .map_err(netlink(format!("deleting {host_veth}")))?;
        }
        remove_netns(&netns_path(&id));
        let _ = fs::remove_file(endpoint_path(&id));
        apply_nft(&eps)?;
        if eps.is_empty() {
            if let Some(b) = link_index(&h, BRIDGE).await? {
                h.link()
                    .del(b)
                    .execute()
                    .await
                    .map_err(netlink(format!("deleting {BRIDGE}")))?;
                tracing::info!(
                    bridge = BRIDGE,
                    "bridge network removed (no container uses it)"
                );
            }
        }
        Ok(())
    }
    .await;
    conn.abort();
    r
}

/// Runs `f` on a thread of its own holding the network's lock.
async fn locked<T, F, Fut>(f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    let lock = || {
        for d in ["endpoints", "netns"] {
            fs::create_dir_all(state().join(d)).map_err(io("creating the network's state"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state().join("lock"))
            .map_err(io("opening the network's lock"))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| NetError::Invalid(format!("locking the network: {e}")))
    };
    super::netns::on_own_thread("husk-bridge", lock, f).await
}

/// Connects container `id` to the bridge network with `ports` published;
/// returns its namespace for [`super::PodNetwork::attach`]. On failure
/// nothing of it is left.
pub async fn connect(id: &str, ports: Vec<Publish>) -> Result<PathBuf, NetError> {
    let owned = id.to_string();
    // A record a crashed CLI left for this id goes first.
    disconnect(id).await?;
    match locked(move || connect_locked(owned, ports)).await {
        Ok(p) => Ok(p),
        Err(e) => {
            if let Err(e2) = disconnect(id).await {
                tracing::warn!(container = id, error = %e2, "undoing a failed network connect");
            }
            Err(e)
        }
    }
}

/// Removes what [`connect`] made for `id` (nothing when it made nothing);
/// the bridge and the NAT table go with the last container.
pub async fn disconnect(id: &str) -> Result<(), NetError> {
    let owned = id.to_string();
    if !endpoint_path(id).exists() && !netns_path(id).exists() {
        return Ok(());
    }
    locked(move || disconnect_locked(owned)).await
}

/// The address container `id` has on the bridge, if connected.
pub fn address_of(id: &str) -> Option<Ipv4Addr> {
    fs::read(endpoint_path(id))
        .ok()
        .and_then(|b| serde_json::from_slice::<Endpoint>(&b).ok())
        .map(|e| e.ip)
}

/// Most connections one published port relays at once.
pub const PROXY_MAX_CONNECTIONS: usize = 256;

/// docker's userland proxy, for the published TCP ports reached on
/// 127.0.0.1 (which NAT cannot send to the bridge): listens there and
/// relays each connection to the container. Runs until the returned task
/// is aborted (the container's end). A port already taken on loopback is
/// logged and skipped: the host's addresses still reach the container.
pub fn proxy_localhost(id: &str, ports: &[Publish]) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(ip) = address_of(id) else {
        return Vec::new();
    };
    let mut tasks = Vec::new();
    for p in ports.iter().filter(|p| !p.udp) {
        if p.host_ip.is_some_and(|h| !h.is_loopback()) {
            continue;
        }
        let listen = (p.host_ip.unwrap_or(Ipv4Addr::LOCALHOST), p.host_port);
        let target = (ip, p.container_port);
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let l = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(container = %id, port = listen.1, error = %e, "no loopback proxy for a published port");
                    return;
                }
            };
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(PROXY_MAX_CONNECTIONS));
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let Ok((mut inbound, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_parse_as_docker_writes_them() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.udp, p.host_ip),
            (8080, 80, false, None)
        );
        let p: Publish = "127.0.0.1:5353:53/udp".parse().unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert!(p.udp);
        for bad in [
            "80",
            "0:80",
            "8080:70000",
            "8080:80/sctp",
            "x:1:2",
            "a:b",
            "1:2:3:4",
        ] {
            assert!(bad.parse::<Publish>().is_err(), "{bad}");
        }
    }

    fn ep(ip: [u8; 4], ports: &[&str]) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            host_veth: "hv0".into(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn addresses_are_the_lowest_free() {
        let mut eps = BTreeMap::new();
        assert_eq!(allocate(&eps).unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        eps.insert("a".into(), ep([10, 89, 0, 2], &[]));
        eps.insert("b".into(), ep([10, 89, 0, 4], &[]));
        assert_eq!(allocate(&eps).unwrap(), Ipv4Addr::new(10, 89, 0, 3));
    }

    #[test]
    fn the_nat_table_has_each_published_port_and_goes_with_the_last() {
        let mut eps = BTreeMap::new();
        assert!(nft_ruleset(&eps).is_none());
        eps.insert(
            "a".into(),
            ep([10, 89, 0, 2], &["8080:80", "127.0.0.1:5353:53/udp"]),
        );
        let r = nft_ruleset(&eps).unwrap();
        assert!(
            r.contains(
                "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 dnat to 10.89.0.2:80"
            ),
            "{r}"
        );
        assert!(!r.contains("5353"), "loopback is the proxy's: {r}");
        assert!(
            r.contains("ip saddr 10.89.0.0/16 oifname != \"husk0\" masquerade"),
            "{r}"
        );
    }

    #[test]
    fn host_veth_names_fit_ifnamsiz() {
        let n = host_veth_name("a-very-long-container-name-indeed");
        // Its peer is the name and a "p" until it becomes eth0.
        assert!(format!("{n}p").len() <= 15, "{n}");
    }
}
