//! This node's interfaces and their addresses, kept current from rtnetlink
//! notifications: the speaker needs them to choose where to answer
//! ([`crate::election::interfaces`]) and with which MAC and link-local
//! address.
//!
//! On every change the watcher lists links and addresses again instead of
//! patching its copy from the notification: the listing is small, and it
//! cannot drift from the kernel the way a patched copy can (after a lost
//! notification, say). There is no periodic poll.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use nlink::netlink::{Connection, NetworkEvent, OwnedEventStream, Route, RtnetlinkGroup};

use crate::packet::MacAddr;

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its Ethernet address; `None` for links without one (tun, wireguard)
    /// or with another kind (InfiniBand).
    pub mac: Option<MacAddr>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Up with its lower layer up too (IFF_RUNNING): a cable or a veth
    /// peer to talk to. A cut link is up but not running.
    pub running: bool,
    /// Its addresses with their prefixes, sorted.
    pub addrs: Vec<IpNet>,
}

impl Link {
    /// Its IPv6 link-local address, the source for NDP answers.
    pub fn link_local(&self) -> Option<Ipv6Addr> {
        self.addrs.iter().find_map(|net| match net.addr() {
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(a),
            _ => None,
        })
    }
}

/// Every interface of the node at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    pub by_index: BTreeMap<u32, Link>,
}

impl Links {
    pub fn by_name(&self, name: &str) -> Option<&Link> {
        self.by_index.values().find(|l| l.name == name)
    }

    /// (interface name, address) pairs, the shape
    /// [`crate::election::interfaces`] takes.
    pub fn addresses(&self) -> Vec<(String, IpNet)> {
        self.by_index
            .values()
            .flat_map(|l| l.addrs.iter().map(|a| (l.name.clone(), *a)))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] nlink::netlink::Error),
    #[error("the rtnetlink notification stream ended")]
    Closed,
}

/// Lists links and addresses once.
pub async fn snapshot(conn: &Connection<Route>) -> Result<Links, LinksError> {
    let mut by_index: BTreeMap<u32, Link> = conn
        .get_links()
        .await?
        .into_iter()
        .map(|l| {
            let index = l.ifindex();
            let link = Link {
                index,
                name: l.name_or("").to_string(),
                mac: l
                    .address()
                    .and_then(|a| <[u8; 6]>::try_from(a).ok())
                    .map(MacAddr),
                up: l.is_up(),
                running: l.is_up() && l.is_running(),
                addrs: Vec::new(),
            };
            (index, link)
        })
        .collect();
    for a in conn.get_addresses().await? {
        // IFA_LOCAL is the interface's own address on point-to-point links
        // (IFA_ADDRESS is then the peer's); elsewhere only IFA_ADDRESS.
        let Some(addr) = a.primary_address() else {
            continue;
        };
        let (Some(link), Ok(net)) = (
            by_index.get_mut(&a.ifindex()),
            IpNet::new(*addr, a.prefix_len()),
        ) else {
            continue;
        };
        link.addrs.push(net);
    }
    for link in by_index.values_mut() {
        link.addrs.sort();
        link.addrs.dedup();
    }
    Ok(Links { by_index })
}

/// Yields the node's [`Links`] when they change.
///
/// Its sockets belong to the network namespace of the thread that creates
/// it.
pub struct LinkWatch {
    events: OwnedEventStream<Route>,
    query: Connection<Route>,
    /// A change was seen and not yet listed. Kept across calls, so a
    /// `next` cancelled while listing lists again on the next call.
    dirty: bool,
    last: Option<Links>,
}

impl std::fmt::Debug for LinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWatch")
            .field("dirty", &self.dirty)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl LinkWatch {
    /// Subscribes to link and address notifications. Call inside a tokio
    /// runtime.
    pub async fn new() -> Result<Self, LinksError> {
        let events = Connection::<Route>::new()?;
        events.subscribe(&[
            RtnetlinkGroup::Link,
            RtnetlinkGroup::Ipv4Addr,
            RtnetlinkGroup::Ipv6Addr,
        ])?;
        // Listing and listening on separate sockets: replies to a listing
        // never interleave with notifications.
        let query = Connection::<Route>::new()?;
        Ok(LinkWatch {
            events: events.into_events().await,
            query,
            dirty: true,
            last: None,
        })
    }

    /// The first call returns the current links at once; each later call
    /// waits until they differ from what it last returned. Subscribing
    /// before the first listing means no change can fall between the two.
    pub async fn next(&mut self) -> Result<Links, LinksError> {
        loop {
            if !self.dirty {
                self.wait_for_change().await?;
            }
            // One listing for a burst of notifications (a link coming up
            // brings several).
            self.drain_ready()?;
            let links = snapshot(&self.query).await?;
            self.dirty = false;
            // Notifications about what a snapshot does not hold
            // (counters, MTU) change nothing.
            if self.last.as_ref() != Some(&links) {
                self.last = Some(links.clone());
                return Ok(links);
            }
        }
    }

    async fn wait_for_change(&mut self) -> Result<(), LinksError> {
        let event = self.events.next().await;
        self.note(event)
    }

    fn drain_ready(&mut self) -> Result<(), LinksError> {
        while let Some(event) = self.events.next().now_or_never() {
            self.note(event)?;
        }
        Ok(())
    }

    fn note(
        &mut self,
        event: Option<nlink::netlink::Result<NetworkEvent>>,
    ) -> Result<(), LinksError> {
        match event {
            Some(Ok(_)) => self.dirty = true,
            // The socket overflowed and notifications were lost: listing
            // again is exactly the recovery.
            Some(Err(e)) if e.is_no_buffer_space() => self.dirty = true,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(LinksError::Closed),
        }
        Ok(())
    }
}
