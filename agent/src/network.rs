//! The pod's network inside the guest: each NIC the host attached is found
//! by its MAC (the VMM gave it the MAC of the pod's veth), renamed to the
//! name the pod knows (`eth0`), given its MTU and addresses and brought up;
//! then the routes, on-link ones first so that a gateway is reachable when
//! its route is added; `lo` always comes up. The pod's `net.*` sysctls are
//! written once for the whole guest: every container of the pod shares the
//! guest's network namespace.
//!
//! Netlink through rtnetlink, not `ip`: the guest has no iproute2, and the
//! replies say exactly what failed.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use husk_agent_api::agent::{Interface, Network, Route};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Invalid(String),
    #[error("no NIC with MAC {mac} for {name} (the guest has: {have})")]
    NoNic {
        mac: String,
        name: String,
        have: String,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("sysctl {key}: {source}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// Most NICs, addresses and routes a pod may ask for: bounds on what one
/// request makes the agent do.
const MAX_INTERFACES: usize = 16;
const MAX_ADDRESSES: usize = 64;
const MAX_ROUTES: usize = 256;
const MAX_SYSCTLS: usize = 128;

/// "10.88.0.2/16" -> (address, prefix length), checked for its family.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetError> {
    let bad = || NetError::Invalid(format!("{s:?} is not an address/prefix"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// "aa:bb:cc:dd:ee:ff" -> bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::Invalid(format!("{s:?} is not a MAC address"));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

fn check_ifname(name: &str) -> Result<(), NetError> {
    // IFNAMSIZ is 16 with the NUL; '/' and ':' and spaces are refused by
    // the kernel or break /proc/sys paths.
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "{name:?} is not an interface name"
        )))
    }
}

/// A checked `net.*` sysctl key -> its /proc/sys path.
pub fn sysctl_path(key: &str) -> Result<String, NetError> {
    let parts: Vec<&str> = key.split(['.', '/']).collect();
    let ok = parts.len() >= 2
        && parts[0] == "net"
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        });
    if !ok {
        return Err(NetError::Invalid(format!(
            "sysctl {key:?}: only net.* keys are the pod's"
        )));
    }
    Ok(format!("/proc/sys/{}", parts.join("/")))
}

/// Everything in `net` checked before anything is changed.
pub fn validate(net: &Network, sysctls: &HashMap<String, String>) -> Result<(), NetError> {
    if net.interfaces.len() > MAX_INTERFACES || net.routes.len() > MAX_ROUTES {
        return Err(NetError::Invalid(format!(
            "at most {MAX_INTERFACES} interfaces and {MAX_ROUTES} routes"
        )));
    }
    let mut names = Vec::new();
    for i in &net.interfaces {
        check_ifname(&i.name)?;
        parse_mac(&i.mac)?;
        if !i.template_mac.is_empty() {
            parse_mac(&i.template_mac)?;
        }
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(NetError::Invalid(format!("{}: mtu {}", i.name, i.mtu)));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(NetError::Invalid(format!("{}: too many addresses", i.name)));
        }
        for a in &i.addresses {
            parse_cidr(a)?;
        }
        names.push(i.name.as_str());
    }
    for r in &net.routes {
        route_message(r, 0)?;
        if !names.contains(&r.device.as_str()) {
            return Err(NetError::Invalid(format!(
                "route {} names device {:?}, not one of the pod's",
                r.destination, r.device
            )));
        }
    }
    if sysctls.len() > MAX_SYSCTLS {
        return Err(NetError::Invalid(format!("at most {MAX_SYSCTLS} sysctls")));
    }
    for (k, v) in sysctls {
        sysctl_path(k)?;
        if v.contains('\n') || v.len() > 4096 {
            return Err(NetError::Invalid(format!("sysctl {k}: bad value")));
        }
    }
    Ok(())
}

fn route_message(
    r: &Route,
    index: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetError> {
    let bad = |what: &str| NetError::Invalid(format!("route {:?}: {what}", r.destination));
    let (dst, prefix) = parse_cidr(&r.destination)?;
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .map_err(|e| bad(&e.to_string()))?
        .output_interface(index)
        .priority(r.metric);
    if !r.gateway.is_empty() {
        let gw: IpAddr = r.gateway.parse().map_err(|_| bad("bad gateway"))?;
        if gw.is_ipv4() != dst.is_ipv4() {
            return Err(bad("gateway of another family"));
        }
        b = b.gateway(gw).map_err(|e| bad(&e.to_string()))?;
    }
    if !r.source.is_empty() {
        let src: IpAddr = r.source.parse().map_err(|_| bad("bad source"))?;
        b = b.pref_source(src).map_err(|e| bad(&e.to_string()))?;
    }
    let scope = match r.scope {
        0 => RouteScope::Universe,
        253 => RouteScope::Link,
        254 => RouteScope::Host,
        s => return Err(bad(&format!("scope {s}"))),
    };
    Ok(b.scope(scope).build())
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// An "already there" answer: adding what exists is not a failure (the
/// kernel adds the on-link route of an address by itself).
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.map(|c| c.get()) == Some(-libc::EEXIST))
}

fn mac_of(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => b.as_slice().try_into().ok(),
        _ => None,
    })
}

fn name_of(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn links(h: &Handle) -> Result<Vec<LinkMessage>, NetError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing links"))
}

async fn bring_up(h: &Handle, index: u32, what: &str) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("bringing {what} up")))
}

async fn configure_interface(
    h: &Handle,
    all: &[LinkMessage],
    i: &Interface,
) -> Result<u32, NetError> {
    let mac = parse_mac(&i.mac)?;
    // A resumed template's NIC still has the template's MAC.
    let (now, now_text) = match i.template_mac.as_str() {
        "" => (mac, &i.mac),
        t => (parse_mac(t)?, &i.template_mac),
    };
    let link = all
        .iter()
        .find(|l| mac_of(l) == Some(now))
        .ok_or_else(|| NetError::NoNic {
            mac: now_text.clone(),
            name: i.name.clone(),
            have: all
                .iter()
                .map(|l| {
                    let m = mac_of(l).map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    });
                    format!("{} {}", name_of(l), m.unwrap_or_default())
                })
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let index = link.header.index;
    // Renaming needs the link down; a freshly probed NIC is.
    let mut set = LinkUnspec::new_with_index(index);
    if name_of(link) != i.name {
        set = set.name(i.name.clone());
    }
    if i.mtu != 0 {
        set = set.mtu(i.mtu);
    }
    if now != mac {
        // The pod's MAC: the veth's, which the host side's frames are
        // addressed to. virtio-net without a control queue takes a new
        // address in the driver alone; the link is down, as set_mac needs.
        set = set.address(mac.to_vec());
    }
    h.link()
        .set(set.build())
        .execute()
        .await
        .map_err(netlink(format!(
            "naming {} and setting its MTU and MAC",
            i.mac
        )))?;
    for a in &i.addresses {
        let (addr, prefix) = parse_cidr(a)?;
        match h.address().add(index, addr, prefix).execute().await {
            Ok(()) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(netlink(format!("adding {a} to {}", i.name))(e)),
        }
    }
    bring_up(h, index, &i.name).await?;
    Ok(index)
}

/// Writes the pod's sysctls (checked by [`validate`]).
pub fn apply_sysctls(sysctls: &HashMap<String, String>) -> Result<(), NetError> {
    let mut keys: Vec<_> = sysctls.keys().collect();
    keys.sort();
    for k in keys {
        let path = sysctl_path(k)?;
        std::fs::write(&path, &sysctls[k]).map_err(|source| NetError::Sysctl {
            key: k.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Set once [`loopback_up`] has brought `lo` up.
static LOOPBACK_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Brings `lo` up ahead of any pod (every pod has it, as every container
/// of docker's has with `--network none`): done at start, a VM template
/// holds it, and a pod without NICs then needs no netlink at all.
pub async fn loopback_up() -> Result<(), NetError> {
    configure_all(&Network::default()).await?;
    LOOPBACK_UP.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Brings `lo` up and the pod's NICs, addresses and routes (checked by
/// [`validate`] first); nothing when there are none and `lo` is up.
pub async fn configure(net: &Network) -> Result<(), NetError> {
    if net.interfaces.is_empty()
        && net.routes.is_empty()
        && LOOPBACK_UP.load(std::sync::atomic::Ordering::SeqCst)
    {
        return Ok(());
    }
    configure_all(net).await
}

async fn configure_all(net: &Network) -> Result<(), NetError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn = tokio::spawn(conn);
    let result = async {
        let all = links(&h).await?;
        if let Some(lo) = all.iter().find(|l| name_of(l) == "lo") {
            bring_up(&h, lo.header.index, "lo").await?;
        }
        let mut index = HashMap::new();
        for i in &net.interfaces {
            let n = configure_interface(&h, &all, i).await?;
            index.insert(i.name.as_str(), n);
            tracing::info!(name = %i.name, mac = %i.mac, mtu = i.mtu, addresses = ?i.addresses, "NIC up");
        }
        for r in &net.routes {
            let idx = index.get(r.device.as_str()).copied().unwrap_or(0);
            let msg = route_message(r, idx)?;
            match h.route().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(e) => {
                    return Err(netlink(format!(
                        "adding route {} via {:?} dev {}",
                        r.destination, r.gateway, r.device
                    ))(e))
                }
            }
        }
        Ok(())
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_macs_are_checked() {
        assert_eq!(
            parse_cidr("10.88.0.2/16").unwrap(),
            ("10.88.0.2".parse().unwrap(), 16)
        );
        assert!(parse_cidr("fd00::2/64").is_ok());
        for bad in ["10.0.0.1", "10.0.0.1/33", "fd00::1/129", "x/1", "10.0.0.1/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("02:aa:0b:00:00:01").unwrap()[1], 0xaa);
        for bad in [
            "02:aa:0b:00:00",
            "02:aa:0b:00:00:01:02",
            "2:aa:0b:00:00:01",
            "zz:aa:0b:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_net_sysctls_reach_proc() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_unprivileged_port_start").unwrap(),
            "/proc/sys/net/ipv4/ip_unprivileged_port_start"
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0/rp_filter").unwrap(),
            "/proc/sys/net/ipv4/conf/eth0/rp_filter"
        );
        for bad in [
            "kernel.shmmax",
            "net",
            "net..x",
            "net.ipv4/../../kernel/x",
            "net.a b",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }

    fn iface() -> Interface {
        Interface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec!["10.88.0.2/16".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_request_is_checked_whole() {
        let route = |dest: &str, gw: &str, dev: &str| Route {
            destination: dest.into(),
            gateway: gw.into(),
            device: dev.into(),
            ..Default::default()
        };
        let ok = Network {
            interfaces: vec![iface()],
            routes: vec![route("0.0.0.0/0", "10.88.0.1", "eth0")],
            ..Default::default()
        };
        assert!(validate(&ok, &HashMap::new()).is_ok());
        let mut bad = ok.clone();
        bad.routes = vec![route("0.0.0.0/0", "10.88.0.1", "eth1")];
        assert!(validate(&bad, &HashMap::new()).is_err());
        bad.routes = vec![route("0.0.0.0/0", "fd00::1", "eth0")];
        assert!(validate(&bad, &HashMap::new()).is_err());
        let mut bad = ok.clone();
        bad.interfaces[0].name = "eth0/../x".into();
        assert!(validate(&bad, &HashMap::new()).is_err());
        let mut bad = ok.clone();
        bad.interfaces[0].mtu = 10;
        assert!(validate(&bad, &HashMap::new()).is_err());
        // A clone's NIC is named by its template's MAC, checked as strictly.
        let mut clone = ok.clone();
        clone.interfaces[0].template_mac = "02:68:75:73:6b:00".into();
        assert!(validate(&clone, &HashMap::new()).is_ok());
        clone.interfaces[0].template_mac = "02:68:75:73:6b".into();
        assert!(validate(&clone, &HashMap::new()).is_err());
        let sys = HashMap::from([("kernel.panic".to_string(), "1".to_string())]);
        assert!(validate(&ok, &sys).is_err());
    }
}
