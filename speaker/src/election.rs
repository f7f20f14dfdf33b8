//! Which node announces each LoadBalancer IP: plain functions over typed
//! views of Nodes, L2Advertisements and Services, with no kube types and no
//! I/O. Every speaker evaluates them on the same inputs and reaches the
//! same answer without talking to the others; liveness (who is up) is the
//! only input that differs, and [`winner`] takes it last.
//!
//! The order is MetalLB's: candidates sorted by `sha256(node + "#" + key)`
//! ascending, compared as bytes. The first live candidate announces. A node
//! that leaves or joins below the winner therefore moves nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_crds::selector::{Labels, Selector};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

/// Nodes with this label never announce (any value; MetalLB and the
/// Kubernetes service controller check only the key).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// What the election needs to know about a Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub labels: Labels,
    /// The `NetworkUnavailable` condition is `True`.
    pub network_unavailable: bool,
}

/// An L2Advertisement, with its pool references already resolved to names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    pub name: String,
    /// The pools it covers.
    pub pools: BTreeSet<String>,
    /// Nodes that may announce; empty means every node.
    pub node_selectors: Vec<Selector>,
    /// Services covered; empty means every Service.
    pub service_selectors: Vec<Selector>,
    /// Interfaces to answer on; empty means "work it out" ([`interfaces`]).
    pub interfaces: Vec<String>,
}

impl Advertisement {
    /// Whether this advertisement lets `labels`' node announce (any of
    /// the node selectors matches; none means all nodes).
    pub fn selects_node(&self, labels: &Labels) -> bool {
        any_or_empty(&self.node_selectors, labels)
    }

    /// Whether this advertisement covers the IP: its pool, and every
    /// Service using it. Requiring every Service keeps one advertisement's
    /// service selectors from letting a node announce an IP on behalf of a
    /// Service that the advertisement excludes.
    pub fn covers(&self, ip: &Announced) -> bool {
        self.pools.contains(&ip.pool)
            && ip
                .services
                .iter()
                .all(|s| any_or_empty(&self.service_selectors, &s.labels))
    }
}

fn any_or_empty(selectors: &[Selector], labels: &Labels) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))
}

/// A Service using an announced IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Its first `status.loadBalancer.ingress` IP: what MetalLB hashes.
    pub first_ip: IpAddr,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    /// Nodes with a serving endpoint of this Service.
    pub serving_nodes: BTreeSet<String>,
}

/// An IP some Service holds, the pool it came from, and every Service
/// using it (more than one when the IP is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub ip: IpAddr,
    pub pool: String,
    pub services: Vec<ServiceFacts>,
}

/// The nodes that may announce `ip`:
/// - selected by the node selectors of an advertisement that covers it
///   ([`Advertisement::covers`]);
/// - without `NetworkUnavailable` and without [`EXCLUDE_LABEL`];
/// - if any Service using it has `externalTrafficPolicy: Local`, with a
///   serving endpoint of every such Service, since traffic reaching a node
///   without one is dropped. None such means announce nothing.
///
/// An IP no Service uses has no candidates.
pub fn eligible(
    ip: &Announced,
    ads: &[Advertisement],
    nodes: &BTreeMap<String, NodeFacts>,
) -> BTreeSet<String> {
    if ip.services.is_empty() {
        return BTreeSet::new();
    }
    let covering: Vec<&Advertisement> = ads.iter().filter(|a| a.covers(ip)).collect();
    nodes
        .iter()
        .filter(|(_, n)| !n.network_unavailable && !n.labels.contains_key(EXCLUDE_LABEL))
        .filter(|(_, n)| covering.iter().any(|a| a.selects_node(&n.labels)))
        .filter(|(name, _)| {
            ip.services
                .iter()
                .filter(|s| s.local)
                .all(|s| s.serving_nodes.contains(*name))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Why [`eligible`] is empty for `ip`, in words for a Service condition:
/// the first rule that leaves no node.
pub fn why_no_candidate(
    ip: &Announced,
    ads: &[Advertisement],
    nodes: &BTreeMap<String, NodeFacts>,
) -> String {
    let covering: Vec<&Advertisement> = ads.iter().filter(|a| a.covers(ip)).collect();
    if covering.is_empty() {
        return format!(
            "no L2Advertisement covers pool {} for this Service (check ipAddressPools, ipAddressPoolSelectors and serviceSelectors)",
            ip.pool
        );
    }
    let names = covering
        .iter()
        .map(|a| a.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let selected: Vec<&String> = nodes
        .iter()
        .filter(|(_, n)| covering.iter().any(|a| a.selects_node(&n.labels)))
        .map(|(name, _)| name)
        .collect();
    if selected.is_empty() {
        return format!("no node matches the nodeSelectors of L2Advertisement {names}");
    }
    let usable: Vec<&String> = selected
        .iter()
        .copied()
        .filter(|name| {
            nodes
                .get(*name)
                .is_some_and(|n| !n.network_unavailable && !n.labels.contains_key(EXCLUDE_LABEL))
        })
        .collect();
    if usable.is_empty() {
        return format!(
            "every node L2Advertisement {names} selects is labelled {EXCLUDE_LABEL} or has NetworkUnavailable"
        );
    }
    "externalTrafficPolicy is Local and no selected node has a ready endpoint of the Service"
        .to_string()
}

/// The IP whose text each announced IP is hashed with.
///
/// MetalLB hashes a Service's first IP and announces all of its IPs from
/// the winner, so Services sharing an IP, and the two IPs of a dual-stack
/// Service, land together. That breaks when they chain: a dual-stack
/// Service whose first IP is its IPv6 one, sharing its IPv4 address with
/// an IPv4-only Service, gets that IPv4 address hashed two ways. Here IPs
/// connected through Services form one group, and every IP of a group uses
/// the lowest `first_ip` among the group's Services (`IpAddr` order: IPv4
/// before IPv6). Without chaining a group's Services all have the same
/// first IP, so the key is exactly MetalLB's. An IP no Service uses is
/// its own key.
pub fn keys(all: &[Announced]) -> BTreeMap<IpAddr, IpAddr> {
    let groups = groups(all);
    let mut lowest: BTreeMap<usize, IpAddr> = BTreeMap::new();
    for (i, a) in all.iter().enumerate() {
        for s in &a.services {
            lowest
                .entry(groups[i])
                .and_modify(|k| *k = (*k).min(s.first_ip))
                .or_insert(s.first_ip);
        }
    }
    all.iter()
        .enumerate()
        .map(|(i, a)| (a.ip, lowest.get(&groups[i]).copied().unwrap_or(a.ip)))
        .collect()
}

/// For each entry of `all`, a representative of the set of entries joined
/// to it through Services (same namespace and name). Union-find.
fn groups(all: &[Announced]) -> Vec<usize> {
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut parent: Vec<usize> = (0..all.len()).collect();
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, a) in all.iter().enumerate() {
        for s in &a.services {
            let first = *seen.entry((&s.namespace, &s.name)).or_insert(i);
            let (x, y) = (root(&mut parent, first), root(&mut parent, i));
            parent[x.max(y)] = x.min(y);
        }
    }
    (0..all.len()).map(|i| root(&mut parent, i)).collect()
}

/// `eligible` sorted by `sha256(node + "#" + key)`, smallest first, bytes
/// compared as unsigned (MetalLB's order). `key` is printed as Go prints
/// IPs: dotted quad, or RFC 5952 text, which Rust's `Ipv6Addr` Display
/// also gives.
pub fn ranking(key: IpAddr, eligible: &BTreeSet<String>) -> Vec<String> {
    let mut ranked: Vec<([u8; 32], &String)> = eligible
        .iter()
        .map(|node| {
            let digest: [u8; 32] = Sha256::digest(format!("{node}#{key}")).into();
            (digest, node)
        })
        .collect();
    // Names break ties, so the order is total even for a sha256 collision.
    ranked.sort();
    ranked.into_iter().map(|(_, node)| node.clone()).collect()
}

/// The node that announces: the first of `ranking` that is live.
pub fn winner<'a>(ranking: &'a [String], live: &BTreeSet<String>) -> Option<&'a str> {
    ranking
        .iter()
        .find(|n| live.contains(n.as_str()))
        .map(String::as_str)
}

/// How one IP is to be elected: the key it is hashed with and its ranked
/// candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub key: IpAddr,
    pub ranking: Vec<String>,
}

/// [`eligible`], [`keys`] and [`ranking`] for every announced IP at once,
/// keeping each group of [`keys`] on one node: an IP's candidates are
/// narrowed to the nodes eligible for every IP of its group, unless no node
/// is, in which case each IP keeps its own (announcing every IP matters
/// more than keeping them together). With the same candidates and the same
/// key the IPs of a group share their ranking, hence their winner.
pub fn ballots(
    all: &[Announced],
    ads: &[Advertisement],
    nodes: &BTreeMap<String, NodeFacts>,
) -> BTreeMap<IpAddr, Ballot> {
    let keys = keys(all);
    let groups = groups(all);
    let own: Vec<BTreeSet<String>> = all.iter().map(|a| eligible(a, ads, nodes)).collect();
    let mut shared: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (i, set) in own.iter().enumerate() {
        shared
            .entry(groups[i])
            .and_modify(|s| s.retain(|n| set.contains(n)))
            .or_insert_with(|| set.clone());
    }
    all.iter()
        .zip(own)
        .enumerate()
        .map(|(i, (a, own))| {
            let key = keys.get(&a.ip).copied().unwrap_or(a.ip);
            let candidates = match shared.get(&groups[i]) {
                Some(s) if !s.is_empty() => s,
                _ => &own,
            };
            (
                a.ip,
                Ballot {
                    key,
                    ranking: ranking(key, candidates),
                },
            )
        })
        .collect()
}

/// The interfaces this node answers for `ip` on, given the advertisements
/// that cover the IP and select this node (API.md):
/// 1. the interfaces those advertisements name, if any names one;
/// 2. else every interface with a local address whose prefix contains
///    `ip` (the IP is on-link there);
/// 3. else the interface holding one of the node's InternalIPs, preferring
///    one of `ip`'s family.
///
/// Never every interface: answering on a NIC the client is not on is how
/// MetalLB ends up announcing on the wrong network. Host addresses (/32,
/// /128) are no link: kube-proxy's IPVS mode puts LB IPs on `kube-ipvs0`
/// that way, and answering there would be wrong. Names are sorted and
/// unique; an empty result means there is nowhere to answer.
pub fn interfaces(
    ip: IpAddr,
    ads: &[&Advertisement],
    local: &[(String, IpNet)],
    internal_ips: &[IpAddr],
) -> Vec<String> {
    let named: BTreeSet<&String> = ads.iter().flat_map(|a| &a.interfaces).collect();
    if !named.is_empty() {
        return named.into_iter().cloned().collect();
    }
    let on_link: BTreeSet<&String> = local
        .iter()
        .filter(|(_, net)| net.prefix_len() < net.max_prefix_len() && net.contains(&ip))
        .map(|(name, _)| name)
        .collect();
    if !on_link.is_empty() {
        return on_link.into_iter().cloned().collect();
    }
    let holding = |want: &dyn Fn(&IpAddr) -> bool| -> BTreeSet<&String> {
        local
            .iter()
            .filter(|(_, net)| internal_ips.contains(&net.addr()) && want(&net.addr()))
            .map(|(name, _)| name)
            .collect()
    };
    let same_family = holding(&|a| a.is_ipv4() == ip.is_ipv4());
    let chosen = if same_family.is_empty() {
        holding(&|_| true)
    } else {
        same_family
    };
    chosen.into_iter().cloned().collect()
}
