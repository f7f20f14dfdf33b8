//! Stale UDP conntrack cleanup, run after each successful sync.
//!
//! UDP has no teardown, so a conntrack entry that DNATed a client to a pod
//! which has since gone keeps sending that client's packets into the void
//! until the entry times out — for a client that keeps sending, never. The
//! same holds for an entry made while the Service had no usable endpoint
//! (the packet was not DNATed at all). kube-proxy's newest form reconciles
//! instead of reacting to events: after every sync it lists the UDP entries
//! and deletes each one that is addressed to a Service but whose reply does
//! not come from one of that Service's serving endpoints. We do the same.
//!
//! [`stale`] is the pure decision; [`cleanup`] dumps, decides and deletes
//! over ctnetlink.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use nlink::netlink::netfilter::{ConntrackEntry, ConntrackFilter, IpProtocol};
use nlink::netlink::types::AddressFamily;
use nlink::netlink::{Connection, Netfilter};

use crate::ruleset::Family;

/// What went wrong talking to ctnetlink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing the {family} conntrack table: {source}")]
    Dump {
        family: Family,
        #[source]
        source: nlink::netlink::Error,
    },
    #[error("deleting a stale {family} conntrack entry after {deleted} others: {source}")]
    Delete {
        family: Family,
        deleted: usize,
        #[source]
        source: nlink::netlink::Error,
    },
}

impl Error {
    /// A short, stable name for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Dump { .. } => "dump",
            Error::Delete { .. } => "delete",
        }
    }
}

/// Layer-4 protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Other(u8),
}

impl Proto {
    fn from_number(n: u8) -> Self {
        match n {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            132 => Proto::Sctp,
            n => Proto::Other(n),
        }
    }
}

/// The parts of a conntrack entry the decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub proto: Proto,
    /// Original direction: who sent the first packet, and where to.
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    /// Reply direction source: the backend that answers (after DNAT), or
    /// the original destination itself when nothing was translated.
    pub reply_src: SocketAddr,
}

/// One UDP service port of one IP family, as the sync loop knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UdpService {
    /// ClusterIP, LoadBalancer ingress IPs and externalIPs of this family.
    pub ips: Vec<IpAddr>,
    /// The service port those addresses listen on.
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoints whose `serving` condition holds (ready or not, terminating
    /// or not, local or not): flows to any of them are left alone, so a
    /// policy or topology change does not cut existing flows — as with TCP.
    pub serving: BTreeSet<SocketAddr>,
}

/// The entries to delete: UDP flows addressed to a Service (one of its IPs
/// at its port, or its NodePort at any address) whose reply does not come
/// from one of its serving endpoints. Services without a serving endpoint
/// are left alone: there is nothing better to send their clients to.
pub fn stale(entries: &[Flow], services: &[UdpService]) -> Vec<Flow> {
    let index = Index::new(services);
    entries
        .iter()
        .filter(|f| index.is_stale(f))
        .copied()
        .collect()
}

/// Lookups by frontend, built once per run so that deciding is linear in
/// the number of entries, not entries × services.
struct Index<'a> {
    by_addr: HashMap<SocketAddr, Vec<&'a BTreeSet<SocketAddr>>>,
    by_node_port: HashMap<u16, Vec<&'a BTreeSet<SocketAddr>>>,
}

impl<'a> Index<'a> {
    fn new(services: &'a [UdpService]) -> Self {
        let mut by_addr: HashMap<_, Vec<_>> = HashMap::new();
        let mut by_node_port: HashMap<_, Vec<_>> = HashMap::new();
        for svc in services.iter().filter(|s| !s.serving.is_empty()) {
            for ip in &svc.ips {
                by_addr
                    .entry(SocketAddr::new(*ip, svc.port))
                    .or_default()
                    .push(&svc.serving);
            }
            if let Some(np) = svc.node_port.filter(|p| *p != 0) {
                by_node_port.entry(np).or_default().push(&svc.serving);
            }
        }
        Self {
            by_addr,
            by_node_port,
        }
    }

    fn is_stale(&self, flow: &Flow) -> bool {
        if flow.proto != Proto::Udp {
            return false;
        }
        // Two services claiming one frontend is a caller bug; treating a
        // backend of either as good deletes less, which is the safe side.
        let not_serving =
            |sets: &Vec<&BTreeSet<SocketAddr>>| !sets.iter().any(|s| s.contains(&flow.reply_src));
        self.by_addr.get(&flow.orig_dst).is_some_and(not_serving)
            || self
                .by_node_port
                .get(&flow.orig_dst.port())
                .is_some_and(not_serving)
    }
}

/// Deletes the stale UDP entries of `family` (see [`stale`]) and returns
/// how many went. `services` should hold that family's UDP service ports
/// only; addresses of the other family simply match nothing.
///
/// An entry that expires or is replaced between the dump and its delete
/// is not counted and is no error.
pub async fn cleanup(
    conn: &Connection<Netfilter>,
    family: Family,
    services: &[UdpService],
) -> Result<usize, Error> {
    let index = Index::new(services);
    if index.by_addr.is_empty() && index.by_node_port.is_empty() {
        // Nothing can be stale, so skip the dump: on a node with a big
        // conntrack table and no UDP Services that is most of the cost.
        return Ok(0);
    }
    let filter = ConntrackFilter::new()
        .family(match family {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        })
        .proto(IpProtocol::Udp);
    let entries = conn
        .get_conntrack_matching(&filter)
        .await
        .map_err(|source| Error::Dump { family, source })?;
    let mut deleted = 0;
    for entry in entries {
        let Some(flow) = flow_of(&entry) else {
            continue;
        };
        if !index.is_stale(&flow) {
            continue;
        }
        match conn.del_conntrack_entry(&entry).await {
            Ok(()) => deleted += 1,
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(Error::Delete {
                    family,
                    deleted,
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

/// The decision's view of a kernel entry; `None` for one without the
/// addresses and ports a UDP entry always has.
pub fn flow_of(entry: &ConntrackEntry) -> Option<Flow> {
    let addr = |ip: Option<IpAddr>, port: Option<u16>| Some(SocketAddr::new(ip?, port?));
    Some(Flow {
        proto: Proto::from_number(entry.proto.number()),
        orig_src: addr(entry.orig.src_ip, entry.orig.src_port)?,
        orig_dst: addr(entry.orig.dst_ip, entry.orig.dst_port)?,
        reply_src: addr(entry.reply.src_ip, entry.reply.src_port)?,
    })
}
