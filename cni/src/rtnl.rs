//! [`Links`] over a blocking rtnetlink socket.
//!
//! A plugin invocation is a short, single-threaded program, so a plain
//! socket and one request at a time beat an async runtime on start-up cost.
//! A netlink socket stays bound to the namespace it was created in, which is
//! how one process works on the node and the container side at once.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::link::{format_mac, Link, Links, NetError, VethSpec};

/// An rtnetlink socket in the namespace that was current when it was made.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Self, NetError> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| NetError::new("open rtnetlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| NetError::new("bind rtnetlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetError::new("connect rtnetlink socket", e))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and collects the answers until the ACK or the end
    /// of the dump; a NACK becomes the errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    ));
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(out),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                    _ => {}
                }
            }
        }
    }

    /// Sends `requests` in one datagram and reads every answer: the kernel
    /// handles them in order, and one round trip replaces several. Each
    /// request is ACKed; an EEXIST is fine where the request says so. The
    /// first failure is returned after all answers are read, so the socket
    /// stays in step.
    fn batch(&mut self, requests: Vec<Batched>) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        let first = self.seq.wrapping_add(1);
        let mut buf = Vec::new();
        for request in &requests {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | request.flags;
            header.sequence_number = self.seq;
            let mut packet =
                NetlinkMessage::new(header, NetlinkPayload::from(request.message.clone()));
            packet.finalize();
            let start = buf.len();
            buf.resize(start + packet.buffer_len(), 0);
            packet.serialize(&mut buf[start..]);
        }
        let failed = |e: io::Error| NetError::new("netlink batch", e);
        self.socket.send(&buf, 0).map_err(failed)?;
        let mut out = Vec::new();
        let mut pending = requests.len();
        let mut error: Option<NetError> = None;
        while pending > 0 {
            let (bytes, _) = self.socket.recv_from_full().map_err(failed)?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| {
                        failed(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    )));
                }
                offset += len;
                let index = reply.header.sequence_number.wrapping_sub(first) as usize;
                let Some(request) = requests.get(index) else {
                    continue;
                };
                match reply.payload {
                    NetlinkPayload::Error(err) => {
                        pending -= 1;
                        if let Some(code) = err.code {
                            let errno = -code.get();
                            let tolerated = request.exists_ok && errno == nix::libc::EEXIST;
                            if !tolerated && error.is_none() {
                                error = Some(NetError::new(
                                    request.op.clone(),
                                    io::Error::from_raw_os_error(errno),
                                ));
                            }
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(out),
        }
    }

    fn ack(&mut self, message: RouteNetlinkMessage, flags: u16, op: &str) -> Result<(), NetError> {
        self.request(message, NLM_F_ACK | flags)
            .map(drop)
            .map_err(|e| NetError::new(op, e))
    }

    fn link_message(index: u32) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message
    }
}

/// Traffic counters of one link (`IFLA_STATS64`), for container stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Device name.
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

impl Rtnl {
    /// The counters of every link in the socket's namespace.
    pub fn link_counters(&mut self) -> Result<Vec<LinkCounters>, NetError> {
        self.dump_links("list link counters", counters_from)
    }

    /// Dumps every link, each seen through `view`.
    fn dump_links<T>(&mut self, op: &str, view: fn(&LinkMessage) -> T) -> Result<Vec<T>, NetError> {
        let replies = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|e| NetError::new(op, e))?;
        Ok(replies
            .iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(message) => Some(view(message)),
                _ => None,
            })
            .collect())
    }
}

fn counters_from(message: &LinkMessage) -> LinkCounters {
    let mut counters = LinkCounters::default();
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => counters.name.clone_from(name),
            LinkAttribute::Stats64(stats) => {
                counters.rx_bytes = stats.rx_bytes;
                counters.rx_packets = stats.rx_packets;
                counters.rx_errors = stats.rx_errors;
                counters.rx_dropped = stats.rx_dropped;
                counters.tx_bytes = stats.tx_bytes;
                counters.tx_packets = stats.tx_packets;
                counters.tx_errors = stats.tx_errors;
                counters.tx_dropped = stats.tx_dropped;
            }
            _ => {}
        }
    }
    counters
}

/// One request of a [`Rtnl::batch`].
struct Batched {
    message: RouteNetlinkMessage,
    flags: u16,
    op: String,
    exists_ok: bool,
}

fn route_message(index: u32, dst: IpNet, gw: Option<IpAddr>) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = family(dst.addr());
    message.header.destination_prefix_length = dst.prefix_len();
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Boot;
    message.header.kind = RouteType::Unicast;
    message.header.scope = if gw.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if dst.prefix_len() > 0 {
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                dst.network(),
            )));
    }
    if let Some(gw) = gw {
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    message.attributes.push(RouteAttribute::Oif(index));
    message
}

fn route_op(index: u32, dst: IpNet, gw: Option<IpAddr>) -> String {
    format!(
        "add route {dst}{} via link {index}",
        gw.map(|g| format!(" via {g}")).unwrap_or_default()
    )
}

fn link_from(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: String::new(),
        master: None,
        alias: None,
        kind: None,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(bytes) => link.mac = format_mac(bytes),
            LinkAttribute::Controller(index) => link.master = Some(*index),
            LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn address_message(index: u32, address: IpNet) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = family(address.addr());
    message.header.prefix_len = address.prefix_len();
    message.header.index = index;
    // IFA_LOCAL is the interface's own address, IFA_ADDRESS the peer's
    // (the same on broadcast links); the kernel wants both for IPv4.
    message
        .attributes
        .push(AddressAttribute::Local(address.addr()));
    message
        .attributes
        .push(AddressAttribute::Address(address.addr()));
    message
}

fn exists_ok(result: Result<(), NetError>) -> Result<(), NetError> {
    match result {
        Err(err) if err.errno() == Some(nix::libc::EEXIST) => Ok(()),
        other => other,
    }
}

impl Links for Rtnl {
    fn link(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        // With NLM_F_ACK the reply is followed by an ACK, which ends the read.
        match self.request(RouteNetlinkMessage::GetLink(message), NLM_F_ACK) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(link_from(m)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::new(format!("look up link {name}"), e)),
        }
    }

    fn links(&mut self) -> Result<Vec<Link>, NetError> {
        self.dump_links("list links", link_from)
    }

    fn create_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<bool, NetError> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        if let Some(mtu) = mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        message
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match self.ack(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("create bridge {name}"),
        ) {
            Ok(()) => Ok(true),
            Err(err) if err.errno() == Some(nix::libc::EEXIST) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn set_up(&mut self, index: u32, promisc: Option<bool>) -> Result<(), NetError> {
        let mut message = Self::link_message(index);
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        if let Some(on) = promisc {
            message.header.change_mask |= LinkFlags::Promisc;
            if on {
                message.header.flags |= LinkFlags::Promisc;
            }
        }
        self.ack(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("set link {index} up"),
        )
    }

    fn set_down_and_rename(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let mut message = Self::link_message(index);
        message.header.change_mask = LinkFlags::Up;
        self.ack(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("set link {index} down"),
        )?;
        let mut message = Self::link_message(index);
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        self.ack(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("rename link {index} to {name}"),
        )
    }

    fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<Link, NetError> {
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(spec.peer_name.to_owned()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(spec.peer_netns.as_raw_fd()));
        if let Some(mtu) = spec.mtu {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = spec.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message
            .attributes
            .push(LinkAttribute::IfName(spec.host_name.to_owned()));
        if let Some(mtu) = spec.mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        message
            .attributes
            .push(LinkAttribute::Controller(spec.master));
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        // The kernel ignores IFLA_IFALIAS when creating a link, so the alias
        // is set by name once the create succeeded (never on a link that
        // happened to exist), and the new link read back in that same
        // round trip.
        let by_name = || {
            let mut message = LinkMessage::default();
            message
                .attributes
                .push(LinkAttribute::IfName(spec.host_name.to_owned()));
            message
        };
        let mut alias = by_name();
        alias
            .attributes
            .push(LinkAttribute::IfAlias(spec.alias.to_owned()));
        self.ack(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!(
                "create veth {} (peer {} in the container)",
                spec.host_name, spec.peer_name
            ),
        )?;
        let replies = self.batch(vec![
            Batched {
                message: RouteNetlinkMessage::SetLink(alias),
                flags: 0,
                op: format!("set alias of {}", spec.host_name),
                exists_ok: false,
            },
            Batched {
                message: RouteNetlinkMessage::GetLink(by_name()),
                flags: 0,
                op: format!("look up link {}", spec.host_name),
                exists_ok: false,
            },
        ])?;
        replies
            .iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(link_from(m)),
                _ => None,
            })
            .ok_or_else(|| {
                NetError::new(
                    format!("look up link {}", spec.host_name),
                    io::Error::from_raw_os_error(nix::libc::ENODEV),
                )
            })
    }

    fn set_hairpin(&mut self, index: u32) -> Result<(), NetError> {
        let mut message = Self::link_message(index);
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )])),
        ]));
        self.ack(
            RouteNetlinkMessage::NewLink(message),
            0,
            &format!("set hairpin mode on link {index}"),
        )
    }

    fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        self.ack(
            RouteNetlinkMessage::DelLink(Self::link_message(index)),
            0,
            &format!("delete link {index}"),
        )
    }

    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetError> {
        let replies = self
            .request(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|e| NetError::new(format!("list addresses of link {index}"), e))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(message) = reply else {
                continue;
            };
            if message.header.index != index {
                continue;
            }
            let ip = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(net) = ip.and_then(|ip| IpNet::new(ip, message.header.prefix_len).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    fn add_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError> {
        let mut message = address_message(index, address);
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        exists_ok(self.ack(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {address} to link {index}"),
        ))
    }

    fn delete_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError> {
        self.ack(
            RouteNetlinkMessage::DelAddress(address_message(index, address)),
            0,
            &format!("delete address {address} from link {index}"),
        )
    }

    fn routes(&mut self, index: u32) -> Result<Vec<(IpNet, Option<IpAddr>)>, NetError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let replies = self
                .request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)
                .map_err(|e| NetError::new(format!("list routes of link {index}"), e))?;
            for reply in replies {
                let RouteNetlinkMessage::NewRoute(message) = reply else {
                    continue;
                };
                if message.header.table != RouteHeader::RT_TABLE_MAIN {
                    continue;
                }
                let mut oif = None;
                let mut dst = None;
                let mut gw = None;
                for attribute in &message.attributes {
                    match attribute {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(a) => dst = route_ip(a),
                        RouteAttribute::Gateway(a) => gw = route_ip(a),
                        _ => {}
                    }
                }
                if oif != Some(index) {
                    continue;
                }
                let unspecified = match family {
                    AddressFamily::Inet => IpAddr::from([0u8; 4]),
                    _ => IpAddr::from([0u16; 8]),
                };
                let dst = dst.unwrap_or(unspecified);
                if let Ok(net) = IpNet::new(dst, message.header.destination_prefix_length) {
                    out.push((net, gw));
                }
            }
        }
        Ok(out)
    }

    fn add_route(&mut self, index: u32, dst: IpNet, gw: Option<IpAddr>) -> Result<(), NetError> {
        exists_ok(self.ack(
            RouteNetlinkMessage::NewRoute(route_message(index, dst, gw)),
            NLM_F_CREATE | NLM_F_EXCL,
            &route_op(index, dst, gw),
        ))
    }

    fn bring_up(
        &mut self,
        index: u32,
        addresses: &[IpNet],
        routes: &[(IpNet, Option<IpAddr>)],
    ) -> Result<(), NetError> {
        let mut requests = Vec::new();
        for address in addresses {
            let mut message = address_message(index, *address);
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            requests.push(Batched {
                message: RouteNetlinkMessage::NewAddress(message),
                flags: NLM_F_CREATE | NLM_F_EXCL,
                op: format!("add address {address} to link {index}"),
                exists_ok: true,
            });
        }
        let mut up = Self::link_message(index);
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        requests.push(Batched {
            message: RouteNetlinkMessage::SetLink(up),
            flags: 0,
            op: format!("set link {index} up"),
            exists_ok: false,
        });
        for (dst, gw) in routes {
            requests.push(Batched {
                message: RouteNetlinkMessage::NewRoute(route_message(index, *dst, *gw)),
                flags: NLM_F_CREATE | NLM_F_EXCL,
                op: route_op(index, *dst, *gw),
                exists_ok: true,
            });
        }
        self.batch(requests).map(drop)
    }
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}
