//! The real [`NetBackend`]: rtnetlink in the network namespace of the thread that opened it,
//! and `/proc/sys` for `promote_secondaries`.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, MulticastGroup, RouteMessageBuilder};

use crate::backend::{CarrierEvents, NetBackend, NetError};
use crate::types::{DefaultRoute, Ipv4Cidr, LinkInfo, MacAddr};

/// Linux's errno values the backend maps to what they mean here.
const EPERM: i32 = 1;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const ENETUNREACH: i32 = 101;
const ESRCH: i32 = 3;
const EOPNOTSUPP: i32 = 95;

/// A netlink route socket and the task that drives it (stopped when this is dropped).
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens a route socket in the calling thread's network namespace. Must be called inside
    /// a tokio runtime.
    pub fn open() -> Result<Netlink, NetError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| NetError::Os {
            what: "opening a netlink route socket".into(),
            reason: e.to_string(),
        })?;
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn os(what: impl Into<String>, err: &rtnetlink::Error) -> NetError {
    let what = what.into();
    match errno(err) {
        Some(EPERM) => NetError::Permission { what },
        Some(code) => NetError::Os {
            what,
            reason: std::io::Error::from_raw_os_error(code).to_string(),
        },
        None => NetError::Os {
            what,
            reason: err.to_string(),
        },
    }
}

fn link_info(message: &LinkMessage) -> LinkInfo {
    let mut name = String::new();
    let mut mac = MacAddr::default();
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(text) => name.clone_from(text),
            LinkAttribute::Address(bytes) => {
                if let Ok(bytes) = <[u8; 6]>::try_from(bytes.as_slice()) {
                    mac = MacAddr(bytes);
                }
            }
            _ => {}
        }
    }
    let flags = message.header.flags;
    LinkInfo {
        index: message.header.index,
        name,
        mac,
        up: flags.contains(LinkFlags::Up),
        carrier: flags.contains(LinkFlags::LowerUp),
    }
}

/// The IPv4 local address and prefix of an address message.
fn ipv4_of(message: &AddressMessage) -> Option<Ipv4Cidr> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS differs only on point-to-point.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    Ipv4Cidr::new(local.or(address)?, message.header.prefix_len)
}

impl Netlink {
    async fn address_messages(&self, link: &LinkInfo) -> Result<Vec<AddressMessage>, NetError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| os(format!("listing the addresses of {}", link.name), &e))
    }

    fn is_default_v4(header: &RouteHeader, attributes: &[RouteAttribute]) -> bool {
        header.destination_prefix_length == 0 && Netlink::is_main_v4(header, attributes)
    }

    /// An IPv4 unicast route of the main table.
    fn is_main_v4(header: &RouteHeader, attributes: &[RouteAttribute]) -> bool {
        let table = attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(table) => Some(*table),
                _ => None,
            })
            .unwrap_or(u32::from(header.table));
        header.address_family == AddressFamily::Inet
            && header.kind == RouteType::Unicast
            && table == u32::from(RouteHeader::RT_TABLE_MAIN)
    }
}

impl NetBackend for Netlink {
    async fn link(&self, name: &str) -> Result<LinkInfo, NetError> {
        let found: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_collect()
            .await;
        match found {
            Ok(messages) => messages
                .first()
                .map(link_info)
                .ok_or_else(|| NetError::NoSuchLink(name.to_owned())),
            Err(err) if errno(&err) == Some(ENODEV) => Err(NetError::NoSuchLink(name.to_owned())),
            Err(err) => Err(os(format!("reading interface {name}"), &err)),
        }
    }

    async fn set_link_up(&self, link: &LinkInfo) -> Result<(), NetError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|e| os(format!("setting {} up", link.name), &e))
    }

    async fn addresses(&self, link: &LinkInfo) -> Result<Vec<Ipv4Cidr>, NetError> {
        let messages = self.address_messages(link).await?;
        Ok(messages.iter().filter_map(ipv4_of).collect())
    }

    async fn add_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(link.index, IpAddr::V4(addr.addr), addr.prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(EEXIST) => Ok(()),
            Err(err) => Err(os(format!("adding {addr} to {}", link.name), &err)),
        }
    }

    async fn delete_address(&self, link: &LinkInfo, addr: Ipv4Cidr) -> Result<(), NetError> {
        let messages = self.address_messages(link).await?;
        let Some(message) = messages.into_iter().find(|m| ipv4_of(m) == Some(addr)) else {
            return Ok(());
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(EADDRNOTAVAIL) => Ok(()),
            Err(err) => Err(os(format!("removing {addr} from {}", link.name), &err)),
        }
    }

    async fn default_route(&self) -> Result<Option<DefaultRoute>, NetError> {
        // Route dumps ignore filters without strict checking: filter here.
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| os("listing routes", &e))?;
        Ok(routes.iter().find_map(|route| {
            if !Netlink::is_default_v4(&route.header, &route.attributes) {
                return None;
            }
            let gateway = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            let link = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            })?;
            Some(DefaultRoute { gateway, link })
        }))
    }

    async fn replace_default_route(
        &self,
        link: &LinkInfo,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        // Any other default route (another gateway or interface) goes first, so exactly one
        // is left.
        if let Some(old) = self.default_route().await?
            && old
                != (DefaultRoute {
                    gateway,
                    link: link.index,
                })
        {
            let message = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(old.gateway)
                .output_interface(old.link)
                .build();
            match self.handle.route().del(message).execute().await {
                Ok(()) => {}
                Err(err) if errno(&err) == Some(ESRCH) => {}
                Err(err) => {
                    return Err(os(format!("removing the route via {}", old.gateway), &err));
                }
            }
        }
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(link.index)
            .build();
        match self.handle.route().add(message).replace().execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(ENETUNREACH) => Err(NetError::Unreachable {
                gateway,
                link: link.name.clone(),
            }),
            Err(err) => Err(os(
                format!("setting the default route via {gateway} on {}", link.name),
                &err,
            )),
        }
    }

    async fn carrier_events(&self, link: &LinkInfo) -> Result<CarrierEvents, NetError> {
        let (connection, _, mut messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(|e| {
                NetError::Os {
                    what: "listening for link changes".into(),
                    reason: e.to_string(),
                }
            })?;
        let connection = tokio::spawn(connection);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (index, mut carrier) = (link.index, link.carrier);
        let reader = tokio::spawn(async move {
            while let Some((message, _)) = messages.next().await {
                let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(update)) =
                    message.payload
                else {
                    continue;
                };
                if update.header.index != index {
                    continue;
                }
                let now = update.header.flags.contains(LinkFlags::LowerUp);
                if now != carrier {
                    carrier = now;
                    if tx.send(now).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(CarrierEvents::new(rx, vec![connection, reader]))
    }

    async fn promote_secondaries(&self, link: &LinkInfo) -> Result<bool, NetError> {
        let path = promote_path(link);
        let text = std::fs::read_to_string(&path).map_err(|e| NetError::Os {
            what: format!("reading {path}"),
            reason: e.to_string(),
        })?;
        Ok(text.trim() != "0")
    }

    async fn set_promote_secondaries(&self, link: &LinkInfo, on: bool) -> Result<(), NetError> {
        let path = promote_path(link);
        std::fs::write(&path, if on { "1\n" } else { "0\n" }).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                NetError::Permission { what: path.clone() }
            } else {
                NetError::Os {
                    what: format!("writing {path}"),
                    reason: e.to_string(),
                }
            }
        })
    }
}

fn promote_path(link: &LinkInfo) -> String {
    format!("/proc/sys/net/ipv4/conf/{}/promote_secondaries", link.name)
}

/// Links and routes beyond a takeover's needs, for the VPN's tunnel interfaces.
impl Netlink {
    /// Creates a kernel WireGuard interface called `name`. Fails with
    /// [`NetError::Unsupported`] when the kernel has no WireGuard module.
    pub async fn add_wireguard_link(&self, name: &str) -> Result<(), NetError> {
        match self
            .handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(EOPNOTSUPP) => Err(NetError::Unsupported {
                what: format!("creating WireGuard interface {name}"),
                reason: "this kernel has no WireGuard module".into(),
            }),
            Err(err) => Err(os(format!("creating WireGuard interface {name}"), &err)),
        }
    }

    /// Deletes `link` (no error if it is already gone).
    pub async fn delete_link(&self, link: &LinkInfo) -> Result<(), NetError> {
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(ENODEV) => Ok(()),
            Err(err) => Err(os(format!("deleting interface {}", link.name), &err)),
        }
    }

    /// Routes `destination` straight out of `link` (no gateway: a point-to-point tunnel),
    /// with `source` as the address new connections start from; replaces any route to the
    /// same destination in the main table.
    pub async fn replace_link_route(
        &self,
        destination: Ipv4Cidr,
        link: &LinkInfo,
        source: Option<Ipv4Addr>,
    ) -> Result<(), NetError> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix)
            .output_interface(link.index)
            .scope(RouteScope::Link);
        if let Some(source) = source {
            builder = builder.pref_source(source);
        }
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(|e| os(format!("routing {destination} through {}", link.name), &e))
    }

    /// Removes the route to `destination` through the interface numbered `link` (no error
    /// if there is none).
    pub async fn delete_link_route(
        &self,
        destination: Ipv4Cidr,
        link: u32,
    ) -> Result<(), NetError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix)
            .output_interface(link)
            .build();
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(ESRCH) => Ok(()),
            Err(err) => Err(os(format!("removing the route to {destination}"), &err)),
        }
    }
}
