//! Solicited-node multicast memberships (RFC 4291 §2.7.1).
//!
//! A neighbour solicitation for an LB IP goes to that IP's solicited-node
//! group. The kernel drops frames for groups nobody joined before any
//! socket sees them (the NIC's multicast filter), and MLD-snooping switches
//! forward them only to ports that reported the group. Joining on a plain
//! UDP socket fixes both: the kernel programs the filter and sends the MLD
//! report. The socket is never bound, so it receives and queues nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv6Addr;

use socket2::{Domain, Protocol, Socket, Type};

/// ff02::1:ff00:0/104 with the low 24 bits of `ip`.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// The groups joined for a set of (interface, IP), each joined once while
/// any IP that maps to it is wanted: IPs sharing their low 24 bits share a
/// group. Joining and leaving the same (interface, IP) twice is harmless,
/// so a caller can apply a desired set without counting.
#[derive(Debug, Default)]
pub struct SolicitedNodeGroups {
    /// Each socket holds memberships until the kernel refuses more
    /// (`optmem_max` bounds them per socket); then another is opened.
    sockets: Vec<Socket>,
    /// (ifindex, group) → the IPs wanting it, and the socket holding it.
    joined: BTreeMap<(u32, Ipv6Addr), (BTreeSet<Ipv6Addr>, usize)>,
}

impl SolicitedNodeGroups {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure the solicited-node group of `ip` is joined on `ifindex`.
    pub fn join(&mut self, ifindex: u32, ip: Ipv6Addr) -> io::Result<()> {
        let group = solicited_node(ip);
        if let Some((ips, _)) = self.joined.get_mut(&(ifindex, group)) {
            ips.insert(ip);
            return Ok(());
        }
        let socket = self.join_somewhere(ifindex, group)?;
        self.joined.insert((ifindex, group), ([ip].into(), socket));
        Ok(())
    }

    /// Stops wanting `ip` on `ifindex`; the group is left when no IP wants
    /// it. An error leaving (the interface is gone, which also drops the
    /// membership) is returned, but the group is forgotten either way.
    pub fn leave(&mut self, ifindex: u32, ip: Ipv6Addr) -> io::Result<()> {
        let key = (ifindex, solicited_node(ip));
        let Some((ips, socket)) = self.joined.get_mut(&key) else {
            return Ok(());
        };
        ips.remove(&ip);
        if !ips.is_empty() {
            return Ok(());
        }
        let socket = *socket;
        self.joined.remove(&key);
        match self.sockets.get(socket) {
            Some(s) => s.leave_multicast_v6(&key.1, ifindex),
            None => Ok(()),
        }
    }

    /// Every (ifindex, group) currently joined.
    pub fn groups(&self) -> impl Iterator<Item = (u32, Ipv6Addr)> + '_ {
        self.joined.keys().copied()
    }

    fn join_somewhere(&mut self, ifindex: u32, group: Ipv6Addr) -> io::Result<usize> {
        if let Some(last) = self.sockets.len().checked_sub(1) {
            match self.sockets[last].join_multicast_v6(&group, ifindex) {
                Ok(()) => return Ok(last),
                // Out of per-socket option memory: use a fresh socket.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => return Err(e),
            }
        }
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.join_multicast_v6(&group, ifindex)?;
        self.sockets.push(socket);
        Ok(self.sockets.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solicited_node_takes_the_low_24_bits() {
        let ip: Ipv6Addr = "2001:db8::12:3456:789a".parse().unwrap();
        assert_eq!(
            solicited_node(ip),
            "ff02::1:ff56:789a".parse::<Ipv6Addr>().unwrap()
        );
    }
}
