//! A pod's network: what the CNI made in the pod's network namespace,
//! carried into the VM.
//!
//! The CNI plugins (through containerd's CRI) give a pod a network
//! namespace with a veth in it that holds the pod's addresses and routes.
//! The VM cannot use a veth, so for each one [`PodNetwork::attach`] makes a
//! tap beside it with the same MTU, puts an ingress qdisc on both and a tc
//! `mirred` redirect each way (what Kata and tc-redirect-tap do): every frame
//! that reaches the veth leaves through the tap to husk-vmm's virtio-net,
//! and every frame the guest sends leaves through the veth. The guest NIC
//! gets the veth's MAC, so CNIs that filter by MAC see the pod they made;
//! the agent gives it the veth's addresses and routes
//! ([`PodNetwork::guest_network`]).
//!
//! The netlink work happens in the pod's namespace on a thread of its own
//! ([`netns`]). Taps are not persistent: husk-vmm holds the only lasting fd,
//! so a tap and its filter go with the VM however it ends. The veth's
//! qdisc (and its filter) goes in [`PodNetwork::detach`], or with the veth
//! when the CNI removes it.

pub mod bridge;
pub mod netns;
pub mod tap;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use husk_agent_client::agent::{Interface, Network, Route};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::hypervisor::NetDevice;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("pod network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tap {name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink: {0}")]
    Socket(#[source] std::io::Error),
    #[error("pod network: {0}")]
    Invalid(String),
}

/// The most NICs a pod gets (one per CNI attachment).
pub const MAX_NICS: usize = 8;
/// ETH_P_ALL in network byte order, as tc's `protocol all` sends it.
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, ffff:.
const INGRESS: u32 = 0xffff_0000;

/// One CNI interface carried into the VM.
#[derive(Debug)]
pub struct Nic {
    /// The veth's name in the pod (`eth0`): the guest NIC gets it too.
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// "10.88.0.2/16".
    pub addresses: Vec<String>,
    pub tap_name: String,
    /// The tap; husk-vmm inherits it.
    pub tap: Arc<OwnedFd>,
    veth_index: u32,
}

/// The pod's NICs and routes, attached to taps in its namespace.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    nics: Vec<Nic>,
    routes: Vec<Route>,
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_kind(l: &LinkMessage) -> Option<&InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The addresses of a link a pod is reached at: global and site scope,
/// not IPv6 link-local (the guest makes its own from the same MAC).
fn pod_addresses(all: &[AddressMessage], index: u32) -> Vec<String> {
    all.iter()
        .filter(|a| a.header.index == index && a.header.scope == AddressScope::Universe)
        .filter_map(|a| {
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            Some(format!("{ip}/{}", a.header.prefix_len))
        })
        .collect()
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A route of the main table through one of the pod's links, as the agent
/// takes it; `None` for what the kernel makes by itself (an address's
/// subnet, IPv6 link-local and multicast) or what the guest cannot have.
fn guest_route(r: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<Route> {
    if r.header.table != RouteMessageBuilder::<Ipv4Addr>::new().build().header.table
        || r.header.protocol == RouteProtocol::Kernel
        || r.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut dest = None;
    let mut gateway = String::new();
    let mut source = String::new();
    let mut oif = None;
    let mut metric = 0;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dest = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g)?.to_string(),
            RouteAttribute::PrefSource(s) => source = route_ip(s)?.to_string(),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let device = names.get(&oif?)?.clone();
    let dest = dest.unwrap_or(
        if r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        },
    );
    let scope = match r.header.scope {
        RouteScope::Universe => 0,
        RouteScope::Link => 253,
        RouteScope::Host => 254,
        _ => return None,
    };
    Some(Route {
        destination: format!("{dest}/{}", r.header.destination_prefix_length),
        gateway,
        device,
        source,
        scope,
        metric,
        ..Default::default()
    })
}

/// On-link routes first: a gateway must be reachable when its route goes in.
fn order_routes(mut routes: Vec<Route>) -> Vec<Route> {
    routes.sort_by_key(|r| !r.gateway.is_empty());
    routes
}

async fn dump_routes(h: &Handle) -> Result<Vec<RouteMessage>, NetError> {
    let mut out: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing IPv4 routes"))?;
    let v6: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing IPv6 routes"))?;
    out.extend(v6);
    Ok(out)
}

async fn add_ingress(h: &Handle, index: u32, what: &str) -> Result<(), NetError> {
    h.qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!("adding an ingress qdisc to {what}")))
}

async fn del_ingress(h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS);
    req.execute().await
}

async fn redirect(h: &Handle, from: u32, to: u32, what: &str) -> Result<(), NetError> {
    h.traffic_filter(from as i32)
        .add()
        .parent(INGRESS)
        .protocol(PROTOCOL_ALL)
        .redirect(to)
        .map_err(netlink(format!("building the redirect {what}")))?
        .execute()
        .await
        .map_err(netlink(format!("redirecting {what}")))
}

/// The pod's links that the VM takes over: not loopback, not a tap or tun
/// (ours, or a CNI's), an Ethernet link with an address of the pod's.
fn pod_links<'a>(links: &'a [LinkMessage], addrs: &[AddressMessage]) -> Vec<&'a LinkMessage> {
    links
        .iter()
        .filter(|l| {
            l.header.link_layer_type == LinkLayerType::Ether
                && !l.header.flags.contains(LinkFlags::Loopback)
                && link_kind(l) != Some(&InfoKind::Tun)
                && !pod_addresses(addrs, l.header.index).is_empty()
        })
        .collect()
}

/// Makes the taps and filters for every pod link; on failure removes what
/// it made (the taps go with their fds).
async fn attach_here(netns: PathBuf) -> Result<PodNetwork, NetError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let conn = tokio::spawn(conn);
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing links"))?;
    let addrs: Vec<AddressMessage> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing addresses"))?;
    // A veth is what a CNI gives a pod; one without an address is a CNI
    // run that did not finish, and a pod started on it would be unreachable.
    if let Some(l) = links.iter().find(|l| {
        link_kind(l) == Some(&InfoKind::Veth) && pod_addresses(&addrs, l.header.index).is_empty()
    }) {
        return Err(NetError::Invalid(format!(
            "{} (a veth) has no address: the pod's CNI setup is not finished",
            link_name(l)
        )));
    }
    let pod = pod_links(&links, &addrs);
    if pod.len() > MAX_NICS {
        return Err(NetError::Invalid(format!(
            "{} interfaces, at most {MAX_NICS}",
            pod.len()
        )));
    }
    let names: BTreeMap<u32, String> = pod.iter().map(|l| (l.header.index, link_name(l))).collect();
    let routes = dump_routes(&h).await?;
    let mut nics: Vec<Nic> = Vec::new();
    let mut ingress: Vec<u32> = Vec::new();
    let made = async {
        for (n, l) in pod.iter().enumerate() {
            let name = link_name(l);
            let mac = l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(b) if b.len() == 6 => Some(mac_string(b)),
                    _ => None,
                })
                .ok_or_else(|| NetError::Invalid(format!("{name} has no MAC")))?;
            let mtu = l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
                .unwrap_or(1500);
            let tap_name = format!("tap{n}_husk");
            let tap = tap::create(&tap_name)?;
            let tap_link: Vec<LinkMessage> = h
                .link()
                .get()
                .match_name(tap_name.clone())
                .execute()
                .try_collect()
                .await
                .map_err(netlink(format!("finding {tap_name}")))?;
            let tap_index = tap_link
                .first()
                .map(|l| l.header.index)
                .ok_or_else(|| NetError::Invalid(format!("{tap_name} vanished")))?;
            h.link()
                .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(netlink(format!("bringing {tap_name} up")))?;
            let veth = l.header.index;
            add_ingress(&h, veth, &name).await?;
            ingress.push(veth);
            add_ingress(&h, tap_index, &tap_name).await?;
            redirect(&h, veth, tap_index, &format!("{name} -> {tap_name}")).await?;
            redirect(&h, tap_index, veth, &format!("{tap_name} -> {name}")).await?;
            nics.push(Nic {
                addresses: pod_addresses(&addrs, veth),
                name,
                mac,
                mtu,
                tap_name,
                tap: Arc::new(tap),
                veth_index: veth,
            });
        }
        Ok::<(), NetError>(())
    }
    .await;
    if let Err(e) = made {
        for i in ingress {
            let _ = del_ingress(&h, i).await;
        }
        conn.abort();
        return Err(e);
    }
    conn.abort();
    let routes = order_routes(
        routes
            .iter()
            .filter_map(|r| guest_route(r, &names))
            .collect(),
    );
    Ok(PodNetwork {
        netns,
        nics,
        routes,
    })
}

impl PodNetwork {
    /// Carries the pod's links in `netns` into taps (see the module
    /// docs). A namespace with no such link gives a pod with only `lo`.
    pub async fn attach(netns: &Path) -> Result<PodNetwork, NetError> {
        let path = netns.to_path_buf();
        let pod = netns::run_in(netns, move || attach_here(path)).await?;
        for n in &pod.nics {
            tracing::info!(
                netns = %pod.netns.display(), veth = %n.name, tap = %n.tap_name,
                mac = %n.mac, mtu = n.mtu, addresses = ?n.addresses, "pod NIC attached"
            );
        }
        Ok(pod)
    }

    pub fn nics(&self) -> &[Nic] {
        &self.nics
    }

    /// What husk-vmm makes of the taps.
    pub fn devices(&self) -> Vec<NetDevice> {
        self.nics
            .iter()
            .map(|n| NetDevice {
                tap: n.tap.clone(),
                mac: n.mac.clone(),
                mtu: n.mtu,
            })
            .collect()
    }

    /// What the agent makes of them in the guest.
    pub fn guest_network(&self) -> Network {
        Network {
            interfaces: self
                .nics
                .iter()
                .map(|n| Interface {
                    name: n.name.clone(),
                    mac: n.mac.clone(),
                    mtu: n.mtu,
                    addresses: n.addresses.clone(),
                    ..Default::default()
                })
                .collect(),
            routes: self.routes.clone(),
            ..Default::default()
        }
    }

    /// Removes the veths' ingress qdiscs (and with them the redirects) and
    /// this process's tap fds; husk-vmm's fds keep the taps until it ends.
    /// A namespace or veth the CNI removed first is not an error.
    pub async fn detach(self) {
        let veths: Vec<u32> = self.nics.iter().map(|n| n.veth_index).collect();
        drop(self.nics);
        if veths.is_empty() {
            return;
        }
        let r = netns::run_in(&self.netns, move || async move {
            let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
            let conn = tokio::spawn(conn);
            for v in veths {
                if let Err(e) = del_ingress(&h, v).await {
                    tracing::debug!(veth = v, error = %e, "ingress qdisc already gone");
                }
            }
            conn.abort();
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::debug!(netns = %self.netns.display(), error = %e, "pod network already gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dest: &str, gw: &str) -> Route {
        Route {
            destination: dest.into(),
            gateway: gw.into(),
            device: "eth0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn on_link_routes_come_before_gateways() {
        let r = order_routes(vec![
            route("0.0.0.0/0", "10.88.0.1"),
            route("10.1.0.0/16", ""),
            route("10.2.0.0/16", "10.1.0.1"),
            route("10.3.0.0/16", ""),
        ]);
        let order: Vec<_> = r.iter().map(|r| r.destination.as_str()).collect();
        assert_eq!(
            order,
            ["10.1.0.0/16", "10.3.0.0/16", "0.0.0.0/0", "10.2.0.0/16"]
        );
    }

    #[test]
    fn the_kernels_own_routes_stay_with_the_kernel() {
        let names = BTreeMap::from([(2, "eth0".to_string())]);
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(Ipv4Addr::new(10, 88, 0, 1))
            .output_interface(2)
            .build();
        let r = guest_route(&default, &names).unwrap();
        assert_eq!(r.destination, "0.0.0.0/0");
        assert_eq!(r.gateway, "10.88.0.1");
        assert_eq!(r.device, "eth0");
        let mut subnet = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 88, 0, 0), 16)
            .output_interface(2)
            .build();
        subnet.header.protocol = RouteProtocol::Kernel;
        assert!(guest_route(&subnet, &names).is_none());
        let elsewhere = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(Ipv4Addr::new(10, 0, 0, 1))
            .output_interface(7)
            .build();
        assert!(guest_route(&elsewhere, &names).is_none());
    }

    #[test]
    fn tc_protocol_all_is_in_network_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }
}
