//! The ruleset this node needs, as a pure function of the Service ports,
//! their endpoints and the node: [`render`] returns one [`Ruleset`] per
//! family plus what the shell needs besides (health-check ports, counts).
//!
//! The layout is flat: the per-packet cost and the transaction size of a
//! change do not grow with the number of Services.
//!
//! - `dispatch` maps `address . protocol . port` (and `dispatch-np` maps
//!   `protocol . port` on NodePort addresses) to `goto pick-N`, where N is
//!   the number of endpoints; `pick-N` is one rule,
//!   `dnat to <same key> . numgen random mod N map @endpoints`, shared by
//!   every Service with N endpoints. `dispatch-inside` holds the few
//!   frontends that behave differently for pods and the node itself
//!   (externalTrafficPolicy Local: inside traffic short-circuits to every
//!   endpoint).
//! - Masquerade is a bit of the packet mark set from set lookups and
//!   cleared where it is acted on, so other users of the mark keep theirs.
//! - Filter chains reject frontends without endpoints, unknown ports of
//!   allocated ClusterIPs and unallocated Service-CIDR addresses, and drop
//!   sources outside `loadBalancerSourceRanges`.
//! - Session affinity is the one per-Service structure (a chain per Service
//!   port, a timed set per endpoint), built only for Services that ask.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::conntrack::UdpService;
use crate::endpoints::{Selected, select};
use crate::model::{
    EndpointIndex, NodeFacts, NodePortAddresses, PortEndpoints, PortKey, ServiceKey, ServicePort,
};
use crate::ruleset::{
    Base, Chain, ChainType, Data, Expr, Family, Field, Hook, Proto, Rule, Ruleset, Set, SetData,
    Stmt, Value, Verdict,
};

/// Priority of the filter chains: before DNAT (kube-proxy's `dstnat - 10`).
pub const FILTER_PRIORITY: i32 = -110;
/// The output chain that sees packets after DNAT (`dstnat + 10`).
pub const FILTER_POST_DNAT_PRIORITY: i32 = -90;
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;

/// How the proxy is configured (flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub table: String,
    /// The mark bit meaning "masquerade this flow" (kube-proxy: 1 << 14).
    pub masquerade_bit: u32,
    /// SNAT all ClusterIP traffic.
    pub masquerade_all: bool,
    /// Pod CIDRs of the cluster: traffic from them is "from a pod".
    pub cluster_cidrs: Vec<IpNet>,
    pub nodeport_addresses: NodePortAddresses,
}

/// What a render reads.
pub struct Inputs<'a> {
    pub ports: &'a [ServicePort],
    /// Endpoints of this family.
    pub endpoints: &'a EndpointIndex,
    pub node: &'a NodeFacts,
    /// ServiceCIDRs of the cluster (both families; filtered here).
    pub service_cidrs: &'a [IpNet],
}

/// A health-check node port and the ready local endpoints behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub local_endpoints: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub ruleset: Ruleset,
    pub health: BTreeMap<ServiceKey, HealthCheck>,
    /// Service ports with a Local policy that have endpoints, but none here.
    pub no_local_internal: usize,
    pub no_local_external: usize,
    /// UDP Service ports, for stale conntrack cleanup.
    pub udp: Vec<UdpService>,
}

/// Where a frontend sends new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Endpoints {
        eps: Vec<SocketAddr>,
        affinity: Option<u32>,
    },
    /// Endpoints exist, but none this policy may use from here.
    Drop,
    /// No endpoint at all.
    Reject,
}

/// When a frontend's connections are masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Masq {
    Always,
    /// ClusterIP traffic from outside the pod network.
    FromOutside,
    /// eTP Local traffic from the node itself.
    FromHost,
}

/// `address . protocol . port`, or a NodePort's `protocol . port`: what a
/// client connects to. One Service owns each frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Front {
    Addr(IpAddr, Proto, u16),
    NodePort(Proto, u16),
}

impl Front {
    fn key(&self) -> Vec<Value> {
        match *self {
            Front::Addr(a, p, port) => vec![Value::Addr(a), Value::Proto(p), Value::Port(port)],
            Front::NodePort(p, port) => vec![Value::Proto(p), Value::Port(port)],
        }
    }

    fn np(&self) -> bool {
        matches!(self, Front::NodePort(..))
    }
}

/// Set and chain names; one place, so rules and elements agree.
mod names {
    pub const DISPATCH: &str = "dispatch";
    pub const DISPATCH_NP: &str = "dispatch-np";
    pub const DISPATCH_INSIDE: &str = "dispatch-inside";
    pub const DISPATCH_NP_INSIDE: &str = "dispatch-np-inside";
    pub const ENDPOINTS: &str = "endpoints";
    pub const ENDPOINTS_NP: &str = "endpoints-np";
    pub const ENDPOINTS_INSIDE: &str = "endpoints-inside";
    pub const ENDPOINTS_NP_INSIDE: &str = "endpoints-np-inside";
    pub const MASQ_ALWAYS: &str = "masq-always";
    pub const MASQ_ALWAYS_NP: &str = "masq-always-np";
    pub const MASQ_OUTSIDE: &str = "masq-outside";
    pub const MASQ_HOST: &str = "masq-host";
    pub const MASQ_HOST_NP: &str = "masq-host-np";
    pub const NO_ENDPOINTS: &str = "no-endpoints";
    pub const NO_ENDPOINTS_NP: &str = "no-endpoints-np";
    pub const CLUSTER_IPS: &str = "cluster-ips";
    pub const SERVICE_CIDRS: &str = "service-cidrs";
    pub const CLUSTER_CIDRS: &str = "cluster-cidrs";
    pub const NODEPORT_IPS: &str = "nodeport-ips";
    pub const LB_RANGED: &str = "lb-ranged";
    pub const LB_SOURCES: &str = "lb-sources";
    pub const HAIRPIN: &str = "hairpin";
    pub const SERVICES: &str = "services";
}

/// Which endpoint map a target's slots live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Table {
    Main,
    Inside,
}

fn endpoint_map(np: bool, table: Table) -> &'static str {
    match (np, table) {
        (false, Table::Main) => names::ENDPOINTS,
        (true, Table::Main) => names::ENDPOINTS_NP,
        (false, Table::Inside) => names::ENDPOINTS_INSIDE,
        (true, Table::Inside) => names::ENDPOINTS_NP_INSIDE,
    }
}

fn pick_chain(np: bool, table: Table, n: usize) -> String {
    let what = match (np, table) {
        (false, Table::Main) => "",
        (true, Table::Main) => "-np",
        (false, Table::Inside) => "-inside",
        (true, Table::Inside) => "-np-inside",
    };
    format!("pick{what}-{n}")
}

/// A pick chain, `dnat to <key> . numgen random mod n map @<endpoints>`:
/// one rule shared by every frontend with `n` endpoints in that map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pick {
    np: bool,
    table: Table,
    n: usize,
}

impl Pick {
    pub fn name(&self) -> String {
        pick_chain(self.np, self.table, self.n)
    }

    pub fn chain(&self) -> Chain {
        let mut keys = if self.np {
            vec![Expr::L4Proto, Expr::Dport]
        } else {
            vec![Expr::Daddr, Expr::L4Proto, Expr::Dport]
        };
        keys.push(Expr::Random(self.n as u32));
        Chain {
            base: None,
            rules: vec![Rule(vec![Stmt::DnatMap {
                keys,
                map: endpoint_map(self.np, self.table).into(),
            }])],
        }
    }
}

/// A short name that stays the same for the same thing across syncs.
fn stable_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What one Service adds to the ruleset of one family. Frontends are kept
/// apart because two Services may claim the same one (the same external IP
/// and port, say): only its owner's elements go in. Plain-set members that
/// several Services may need (ClusterIPs, hairpin pairs) are counted, not
/// owned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub fronts: BTreeMap<Front, Elements>,
    /// `(set, address)`: see [`shared_key`].
    pub shared: BTreeSet<(&'static str, IpAddr)>,
    /// Session-affinity sets and chains, named for this Service alone.
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
    pub picks: BTreeSet<Pick>,
    pub health: Option<HealthCheck>,
    pub no_local_internal: usize,
    pub no_local_external: usize,
    pub udp: Vec<UdpService>,
}

/// Elements of named sets: `(set, key) -> data`.
pub type Elements = BTreeMap<(&'static str, Vec<Value>), Option<Data>>;

/// Renders the ruleset of `family`: the scaffold, then every Service's
/// fragment in key order (the first to claim a frontend owns it).
pub fn render(family: Family, cfg: &Config, inputs: &Inputs<'_>) -> Rendered {
    let mut by_service: BTreeMap<&ServiceKey, Vec<&ServicePort>> = BTreeMap::new();
    for sp in inputs.ports {
        by_service.entry(&sp.key.service).or_default().push(sp);
    }
    let mut all = Assembly::new(scaffold(family, cfg, inputs.node, inputs.service_cidrs));
    for (key, ports) in by_service {
        let eps = inputs.endpoints.get(key);
        all.add(key, service(family, cfg, inputs.node, ports, eps));
    }
    all.finish()
}

/// What one Service adds to `family`'s ruleset, from its ports and their
/// endpoints.
pub fn service<'p>(
    family: Family,
    cfg: &Config,
    node: &NodeFacts,
    ports: impl IntoIterator<Item = &'p ServicePort>,
    endpoints: Option<&PortEndpoints>,
) -> Fragment {
    let mut b = ServiceBuilder {
        family,
        cfg,
        node_ip: node.primary(family),
        frag: Fragment::default(),
    };
    let no_eps = Vec::new();
    for sp in ports {
        let Some(cluster_ip) = sp
            .cluster_ips
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
        else {
            continue;
        };
        let eps = endpoints
            .and_then(|p| p.get(&(sp.key.port_name.clone(), sp.key.proto)))
            .unwrap_or(&no_eps);
        let sel = select(sp, eps, node);
        if sp.internal_local && sel.local.is_empty() && sel.any {
            b.frag.no_local_internal += 1;
        }
        if sp.external_local && sel.local.is_empty() && sel.any {
            b.frag.no_local_external += 1;
        }
        if let Some(port) = sp.health_check_node_port {
            let h = b.frag.health.get_or_insert(HealthCheck {
                port,
                local_endpoints: 0,
            });
            h.local_endpoints += sel.local_ready;
        }
        b.port(sp, cluster_ip, &sel);
        if sp.key.proto == Proto::Udp {
            let mut ips = vec![cluster_ip];
            ips.extend(
                sp.lb_ips
                    .iter()
                    .chain(&sp.external_ips)
                    .filter(|a| Family::of(a) == family),
            );
            b.frag.udp.push(UdpService {
                ips,
                port: sp.port,
                node_port: sp.node_port,
                serving: eps
                    .iter()
                    .filter(|e| e.serving)
                    .map(|e| SocketAddr::new(e.addr, e.port))
                    .collect(),
            });
        }
    }
    let mut frag = b.frag;
    for elements in frag.fronts.values_mut() {
        let sources: Vec<Vec<Value>> = elements
            .keys()
            .filter(|(set, _)| *set == names::LB_SOURCES)
            .map(|(_, k)| k.clone())
            .collect();
        elements.retain(|(set, k), _| *set != names::LB_SOURCES || !is_covered(k, &sources));
    }
    frag
}

/// Everything that belongs to no Service: the sets' definitions, the node's
/// and the cluster's addresses, and the chains that use the sets.
pub fn scaffold(
    family: Family,
    cfg: &Config,
    node: &NodeFacts,
    service_cidrs: &[IpNet],
) -> Ruleset {
    let mut s = Scaffold::new(family, cfg);
    s.node(node, &cfg.nodeport_addresses);
    s.cidrs(service_cidrs);
    s.finish()
}

/// Fragments added to a scaffold, in Service key order.
pub struct Assembly {
    rendered: Rendered,
    claimed: HashSet<Front>,
    picks: BTreeSet<Pick>,
}

impl Assembly {
    pub fn new(scaffold: Ruleset) -> Self {
        Self {
            rendered: Rendered {
                ruleset: scaffold,
                health: BTreeMap::new(),
                no_local_internal: 0,
                no_local_external: 0,
                udp: Vec::new(),
            },
            claimed: HashSet::new(),
            picks: BTreeSet::new(),
        }
    }

    /// Adds `frag` of Service `key`; frontends already claimed by a Service
    /// added before are left to it.
    pub fn add(&mut self, key: &ServiceKey, frag: Fragment) {
        let r = &mut self.rendered;
        for (front, elements) in frag.fronts {
            if !self.claimed.insert(front) {
                continue;
            }
            for ((set, k), data) in elements {
                if let Some(s) = r.ruleset.sets.get_mut(set) {
                    s.elements.insert(k, data);
                }
            }
        }
        for (set, ip) in frag.shared {
            if let Some(s) = r.ruleset.sets.get_mut(set) {
                s.elements.insert(shared_key(set, ip), None);
            }
        }
        r.ruleset.sets.extend(frag.sets);
        r.ruleset.chains.extend(frag.chains);
        self.picks.extend(frag.picks);
        if let Some(h) = frag.health {
            r.health.insert(key.clone(), h);
        }
        r.no_local_internal += frag.no_local_internal;
        r.no_local_external += frag.no_local_external;
        r.udp.extend(frag.udp);
    }

    pub fn finish(mut self) -> Rendered {
        for pick in self.picks {
            self.rendered
                .ruleset
                .chains
                .insert(pick.name(), pick.chain());
        }
        self.rendered
    }
}

/// The element a shared member stands for: a ClusterIP, or an endpoint's
/// hairpin pair (itself to itself). Kept as one address, since there can
/// be one per endpoint in the cluster.
pub fn shared_key(set: &str, ip: IpAddr) -> Vec<Value> {
    if set == names::HAIRPIN {
        vec![Value::Addr(ip), Value::Addr(ip)]
    } else {
        vec![Value::Addr(ip)]
    }
}

/// Whether an interval-set key is contained in another of `keys` with the
/// same leading fields: interval sets refuse overlapping elements, so only
/// the outermost prefixes stay.
fn is_covered(k: &[Value], keys: &[Vec<Value>]) -> bool {
    let Some((Value::Prefix(p), head)) = k.split_last() else {
        return false;
    };
    keys.iter().any(|o| match o.split_last() {
        Some((Value::Prefix(q), h)) => h == head && q != p && q.contains(p),
        _ => false,
    })
}

/// Builds one Service's fragment.
struct ServiceBuilder<'a> {
    family: Family,
    cfg: &'a Config,
    /// This node's primary address of the family.
    node_ip: Option<IpAddr>,
    frag: Fragment,
}

impl ServiceBuilder<'_> {
    fn add(&mut self, front: Front, set: &'static str, key: Vec<Value>, data: Option<Data>) {
        self.frag
            .fronts
            .entry(front)
            .or_default()
            .insert((set, key), data);
    }

    fn share(&mut self, set: &'static str, ip: IpAddr) {
        self.frag.shared.insert((set, ip));
    }

    fn port(&mut self, sp: &ServicePort, cluster_ip: IpAddr, sel: &Selected) {
        let f = self.family;
        self.share(names::CLUSTER_IPS, cluster_ip);
        for ep in sel.cluster.iter().chain(&sel.local) {
            self.share(names::HAIRPIN, ep.ip());
        }
        let endpoints = |eps: &[SocketAddr]| Target::Endpoints {
            eps: eps.to_vec(),
            affinity: sp.affinity,
        };
        let policy = |local: bool| -> Target {
            let chosen = if local { &sel.local } else { &sel.cluster };
            if !chosen.is_empty() {
                endpoints(chosen)
            } else if local && sel.any {
                Target::Drop
            } else {
                Target::Reject
            }
        };
        let internal = policy(sp.internal_local);
        let external = policy(sp.external_local);
        // Pods and the node reach external frontends as if from outside and
        // back: every endpoint, never only this node's (kube-proxy's
        // short-circuit).
        let inside = policy(false);

        // The ClusterIP behaves the same for every source.
        let masq = if self.cfg.masquerade_all {
            Masq::Always
        } else {
            Masq::FromOutside
        };
        let front = Front::Addr(cluster_ip, sp.key.proto, sp.port);
        self.front(&sp.key, front, &internal, &internal, masq);

        let external_masq = if sp.external_local {
            Masq::FromHost
        } else {
            Masq::Always
        };
        let lb: BTreeSet<IpAddr> = sp
            .lb_ips
            .iter()
            .copied()
            .filter(|a| Family::of(a) == f)
            .collect();
        let externals: BTreeSet<IpAddr> = lb
            .iter()
            .copied()
            .chain(
                sp.external_ips
                    .iter()
                    .copied()
                    .filter(|a| Family::of(a) == f),
            )
            .collect();
        for addr in externals {
            let front = Front::Addr(addr, sp.key.proto, sp.port);
            self.front(&sp.key, front, &external, &inside, external_masq);
        }
        if let Some(np) = sp.node_port {
            let front = Front::NodePort(sp.key.proto, np);
            self.front(&sp.key, front, &external, &inside, external_masq);
        }
        // Source ranges guard the LB IPs only (never NodePorts, ClusterIPs or
        // external IPs), each frontend its own Service's ranges; ranges only
        // of the other family filter nothing.
        let ranges: Vec<IpNet> = sp
            .source_ranges
            .iter()
            .copied()
            .filter(|r| Family::of(&r.addr()) == f)
            .collect();
        if !ranges.is_empty() {
            for addr in &lb {
                let front = Front::Addr(*addr, sp.key.proto, sp.port);
                self.add(front, names::LB_RANGED, front.key(), None);
                let source = |r: IpNet| {
                    let mut k = front.key();
                    k.push(Value::Prefix(r));
                    k
                };
                for r in &ranges {
                    self.add(front, names::LB_SOURCES, source(*r), None);
                }
                // A node inside the ranges reaches the LB IP with the LB
                // IP itself as source (the address may be local here).
                if self
                    .node_ip
                    .is_some_and(|n| ranges.iter().any(|r| r.contains(&n)))
                {
                    let own = IpNet::from(*addr);
                    self.add(front, names::LB_SOURCES, source(own), None);
                }
            }
        }
    }

    /// Records one frontend: `main` for traffic from anywhere, `inside` for
    /// traffic from pods and this node when it differs.
    fn front(&mut self, key: &PortKey, front: Front, main: &Target, inside: &Target, masq: Masq) {
        let np = front.np();
        let (dispatch, dispatch_inside) = if np {
            (names::DISPATCH_NP, names::DISPATCH_NP_INSIDE)
        } else {
            (names::DISPATCH, names::DISPATCH_INSIDE)
        };
        match main {
            Target::Reject => {
                let set = if np {
                    names::NO_ENDPOINTS_NP
                } else {
                    names::NO_ENDPOINTS
                };
                self.add(front, set, front.key(), None);
            }
            Target::Drop => {
                self.add(
                    front,
                    dispatch,
                    front.key(),
                    Some(Data::Verdict(Verdict::Drop)),
                );
            }
            Target::Endpoints { eps, affinity } => {
                let verdict = self.target(key, front, Table::Main, eps, *affinity);
                self.add(front, dispatch, front.key(), Some(Data::Verdict(verdict)));
            }
        }
        if inside != main
            && let Target::Endpoints { eps, affinity } = inside
        {
            let verdict = self.target(key, front, Table::Inside, eps, *affinity);
            self.add(
                front,
                dispatch_inside,
                front.key(),
                Some(Data::Verdict(verdict)),
            );
        }
        // Only frontends that DNAT may carry the masquerade bit: a marked
        // packet that is dropped or rejected must never be SNATed instead.
        let main_dnats = matches!(main, Target::Endpoints { .. });
        let inside_dnats = matches!(inside, Target::Endpoints { .. });
        match masq {
            Masq::Always if main_dnats => {
                let set = if np {
                    names::MASQ_ALWAYS_NP
                } else {
                    names::MASQ_ALWAYS
                };
                self.add(front, set, front.key(), None);
            }
            Masq::FromOutside if main_dnats && !np => {
                self.add(front, names::MASQ_OUTSIDE, front.key(), None);
            }
            Masq::FromHost if inside_dnats => {
                let set = if np {
                    names::MASQ_HOST_NP
                } else {
                    names::MASQ_HOST
                };
                self.add(front, set, front.key(), None);
            }
            _ => {}
        }
    }

    /// Where a frontend with endpoints `eps` jumps, adding its slots.
    fn target(
        &mut self,
        key: &PortKey,
        front: Front,
        table: Table,
        eps: &[SocketAddr],
        affinity: Option<u32>,
    ) -> Verdict {
        if let Some(timeout) = affinity {
            return Verdict::Goto(self.affinity(key, table, eps, timeout));
        }
        let np = front.np();
        let map = endpoint_map(np, table);
        for (slot, ep) in eps.iter().enumerate() {
            let mut k = front.key();
            k.push(Value::Slot(slot as u32));
            self.add(
                front,
                map,
                k,
                Some(Data::Values(vec![
                    Value::Addr(ep.ip()),
                    Value::Port(ep.port()),
                ])),
            );
        }
        let pick = Pick {
            np,
            table,
            n: eps.len(),
        };
        self.frag.picks.insert(pick);
        Verdict::Goto(pick.name())
    }

    /// The chains and timed sets of one Service port with ClientIP
    /// affinity: a client that opened a connection to an endpoint within
    /// the timeout goes back to it (and renews its entry); others pick
    /// uniformly (a cascade of `numgen` draws,
    /// 1/N, 1/(N-1), ..., needs no anonymous set).
    fn affinity(
        &mut self,
        key: &PortKey,
        table: Table,
        eps: &[SocketAddr],
        timeout: u32,
    ) -> String {
        let which = match table {
            Table::Main => "main",
            Table::Inside => "inside",
        };
        // The timeout is part of the name: a new timeout is a new set, never
        // a set whose definition changes under its users.
        let id = stable_id(&[
            &key.service.namespace,
            &key.service.name,
            &key.port_name,
            key.proto.nft(),
            which,
            &timeout.to_string(),
        ]);
        let chain = format!("affinity-{id}");
        if self.frag.chains.contains_key(&chain) {
            return chain;
        }
        let mut rules = Vec::new();
        let mut picks = Vec::new();
        for ep in eps {
            let eid = stable_id(&[&id, &ep.to_string()]);
            let set = format!("affinity-{id}-{eid}");
            let ep_chain = format!("affinity-{id}-{eid}");
            self.frag
                .sets
                .insert(set.clone(), Set::dynamic(vec![Field::Addr], timeout));
            // Back to the endpoint's chain, which renews the client's
            // entry: the timeout runs from its last new connection, not
            // its first (kube-proxy's rule).
            rules.push(Rule(vec![
                Stmt::InSet {
                    keys: vec![Expr::Saddr],
                    set: set.clone(),
                    negate: false,
                },
                Stmt::Goto(ep_chain.clone()),
            ]));
            self.frag.chains.insert(
                ep_chain.clone(),
                Chain {
                    base: None,
                    rules: vec![
                        Rule(vec![Stmt::UpdateSaddr { set }]),
                        Rule(vec![
                            Stmt::L4Proto(key.proto),
                            Stmt::Dnat {
                                addr: ep.ip(),
                                port: ep.port(),
                            },
                        ]),
                    ],
                },
            );
            picks.push(ep_chain);
        }
        let n = picks.len() as u32;
        for (i, ep_chain) in picks.into_iter().enumerate() {
            let left = n - i as u32;
            let mut stmts = Vec::new();
            if left > 1 {
                stmts.push(Stmt::RandomIs {
                    modulus: left,
                    value: 0,
                });
            }
            stmts.push(Stmt::Goto(ep_chain));
            rules.push(Rule(stmts));
        }
        self.frag
            .chains
            .insert(chain.clone(), Chain { base: None, rules });
        chain
    }
}

/// Builds the scaffold.
struct Scaffold<'a> {
    family: Family,
    cfg: &'a Config,
    rs: Ruleset,
    has_cluster_cidrs: bool,
}

impl<'a> Scaffold<'a> {
    fn new(family: Family, cfg: &'a Config) -> Self {
        let mut rs = Ruleset::new(family, &cfg.table);
        let addr_key = vec![Field::Addr, Field::Proto, Field::Port];
        let np_key = vec![Field::Proto, Field::Port];
        let slot = |mut k: Vec<Field>| {
            k.push(Field::Slot);
            k
        };
        let ep_data = SetData::Fields(vec![Field::Addr, Field::Port]);
        for (name, key) in [
            (names::DISPATCH, &addr_key),
            (names::DISPATCH_INSIDE, &addr_key),
            (names::DISPATCH_NP, &np_key),
            (names::DISPATCH_NP_INSIDE, &np_key),
        ] {
            rs.sets
                .insert(name.into(), Set::map(key.clone(), SetData::Verdict));
        }
        for (name, key) in [
            (names::ENDPOINTS, &addr_key),
            (names::ENDPOINTS_INSIDE, &addr_key),
            (names::ENDPOINTS_NP, &np_key),
            (names::ENDPOINTS_NP_INSIDE, &np_key),
        ] {
            rs.sets
                .insert(name.into(), Set::map(slot(key.clone()), ep_data.clone()));
        }
        for name in [
            names::MASQ_ALWAYS,
            names::MASQ_OUTSIDE,
            names::MASQ_HOST,
            names::NO_ENDPOINTS,
            names::LB_RANGED,
        ] {
            rs.sets.insert(name.into(), Set::plain(addr_key.clone()));
        }
        for name in [
            names::MASQ_ALWAYS_NP,
            names::MASQ_HOST_NP,
            names::NO_ENDPOINTS_NP,
        ] {
            rs.sets.insert(name.into(), Set::plain(np_key.clone()));
        }
        for name in [names::CLUSTER_IPS, names::NODEPORT_IPS] {
            rs.sets.insert(name.into(), Set::plain(vec![Field::Addr]));
        }
        for name in [names::SERVICE_CIDRS, names::CLUSTER_CIDRS] {
            rs.sets
                .insert(name.into(), Set::intervals(vec![Field::Addr]));
        }
        rs.sets.insert(
            names::LB_SOURCES.into(),
            Set::intervals(vec![Field::Addr, Field::Proto, Field::Port, Field::Addr]),
        );
        rs.sets.insert(
            names::HAIRPIN.into(),
            Set::plain(vec![Field::Addr, Field::Addr]),
        );
        let cidrs: Vec<IpNet> = cfg
            .cluster_cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
            .copied()
            .collect();
        for c in &cidrs {
            rs.sets
                .get_mut(names::CLUSTER_CIDRS)
                .map(|s| s.elements.insert(vec![Value::Prefix(*c)], None));
        }
        Self {
            family,
            cfg,
            rs,
            has_cluster_cidrs: !cidrs.is_empty(),
        }
    }

    fn add(&mut self, set: &str, key: Vec<Value>) {
        if let Some(s) = self.rs.sets.get_mut(set) {
            s.elements.insert(key, None);
        }
    }

    fn node(&mut self, node: &NodeFacts, which: &NodePortAddresses) {
        for a in which.select(node, self.family) {
            self.add(names::NODEPORT_IPS, vec![Value::Addr(a)]);
        }
    }

    fn cidrs(&mut self, service_cidrs: &[IpNet]) {
        let family = self.family;
        for c in service_cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
        {
            self.add(names::SERVICE_CIDRS, vec![Value::Prefix(c.trunc())]);
        }
    }

    fn finish(mut self) -> Ruleset {
        for set in self.rs.sets.values_mut().filter(|s| s.interval) {
            let keys: Vec<Vec<Value>> = set.elements.keys().cloned().collect();
            set.elements.retain(|k, _| !is_covered(k, &keys));
        }
        let bit = self.cfg.masquerade_bit;
        let addr_key = vec![Expr::Daddr, Expr::L4Proto, Expr::Dport];
        let np_key = vec![Expr::L4Proto, Expr::Dport];
        let in_set = |keys: &[Expr], set: &str| Stmt::InSet {
            keys: keys.to_vec(),
            set: set.into(),
            negate: false,
        };
        let on_nodeport_ips = || in_set(&[Expr::Daddr], names::NODEPORT_IPS);
        let from_pods = || in_set(&[Expr::Saddr], names::CLUSTER_CIDRS);
        let from_host = || Stmt::FibLocal { saddr: true };

        // Masquerade marks first, then dispatch: inside sources (pods, the
        // node) to their own table of exceptions, then everyone.
        let mut services = vec![
            Rule(vec![
                in_set(&addr_key, names::MASQ_ALWAYS),
                Stmt::MarkSet(bit),
            ]),
            Rule(vec![
                on_nodeport_ips(),
                in_set(&np_key, names::MASQ_ALWAYS_NP),
                Stmt::MarkSet(bit),
            ]),
        ];
        if self.has_cluster_cidrs {
            services.push(Rule(vec![
                Stmt::InSet {
                    keys: vec![Expr::Saddr],
                    set: names::CLUSTER_CIDRS.into(),
                    negate: true,
                },
                in_set(&addr_key, names::MASQ_OUTSIDE),
                Stmt::MarkSet(bit),
            ]));
        }
        services.push(Rule(vec![
            from_host(),
            in_set(&addr_key, names::MASQ_HOST),
            Stmt::MarkSet(bit),
        ]));
        services.push(Rule(vec![
            from_host(),
            on_nodeport_ips(),
            in_set(&np_key, names::MASQ_HOST_NP),
            Stmt::MarkSet(bit),
        ]));
        let inside_sources: Vec<Stmt> = if self.has_cluster_cidrs {
            vec![from_pods(), from_host()]
        } else {
            vec![from_host()]
        };
        for src in &inside_sources {
            services.push(Rule(vec![
                src.clone(),
                Stmt::Vmap {
                    keys: addr_key.clone(),
                    map: names::DISPATCH_INSIDE.into(),
                },
            ]));
        }
        services.push(Rule(vec![Stmt::Vmap {
            keys: addr_key.clone(),
            map: names::DISPATCH.into(),
        }]));
        for src in &inside_sources {
            services.push(Rule(vec![
                on_nodeport_ips(),
                src.clone(),
                Stmt::Vmap {
                    keys: np_key.clone(),
                    map: names::DISPATCH_NP_INSIDE.into(),
                },
            ]));
        }
        services.push(Rule(vec![
            on_nodeport_ips(),
            Stmt::Vmap {
                keys: np_key.clone(),
                map: names::DISPATCH_NP.into(),
            },
        ]));
        self.chain(names::SERVICES, None, services);

        let nat = |hook| Base {
            kind: ChainType::Nat,
            hook,
            priority: if hook == Hook::Postrouting {
                SRCNAT
            } else {
                DSTNAT
            },
        };
        let filter = |hook, priority| Base {
            kind: ChainType::Filter,
            hook,
            priority,
        };
        let jump = || vec![Rule(vec![Stmt::Jump(names::SERVICES.into())])];
        self.chain("nat-prerouting", Some(nat(Hook::Prerouting)), jump());
        self.chain("nat-output", Some(nat(Hook::Output)), jump());
        self.chain(
            "nat-postrouting",
            Some(nat(Hook::Postrouting)),
            vec![
                Rule(vec![
                    Stmt::MarkHas(bit),
                    Stmt::MarkClear(bit),
                    Stmt::MasqueradeFullyRandom,
                ]),
                Rule(vec![
                    Stmt::CtDnat,
                    in_set(&[Expr::Saddr, Expr::Daddr], names::HAIRPIN),
                    Stmt::MasqueradeFullyRandom,
                ]),
            ],
        );

        let source_ranges = Rule(vec![
            Stmt::CtNew,
            in_set(&addr_key, names::LB_RANGED),
            Stmt::InSet {
                keys: vec![Expr::Daddr, Expr::L4Proto, Expr::Dport, Expr::Saddr],
                set: names::LB_SOURCES.into(),
                negate: true,
            },
            Stmt::Drop,
        ]);
        let no_endpoints = Rule(vec![
            Stmt::CtNew,
            in_set(&addr_key, names::NO_ENDPOINTS),
            Stmt::Reject,
        ]);
        let no_endpoints_np = Rule(vec![
            Stmt::CtNew,
            on_nodeport_ips(),
            in_set(&np_key, names::NO_ENDPOINTS_NP),
            Stmt::Reject,
        ]);
        let unknown_port = Rule(vec![
            Stmt::CtNew,
            in_set(&[Expr::Daddr], names::CLUSTER_IPS),
            Stmt::Reject,
        ]);
        let unallocated = Rule(vec![
            Stmt::CtNew,
            in_set(&[Expr::Daddr], names::SERVICE_CIDRS),
            Stmt::Drop,
        ]);
        self.chain(
            "filter-prerouting",
            Some(filter(Hook::Prerouting, FILTER_PRIORITY)),
            vec![source_ranges.clone()],
        );
        self.chain(
            "filter-input",
            Some(filter(Hook::Input, FILTER_PRIORITY)),
            vec![no_endpoints.clone(), no_endpoints_np.clone()],
        );
        // Forward sees packets after DNAT: what still heads for a ClusterIP
        // found no Service port there.
        self.chain(
            "filter-forward",
            Some(filter(Hook::Forward, FILTER_PRIORITY)),
            vec![
                no_endpoints.clone(),
                unknown_port.clone(),
                unallocated.clone(),
            ],
        );
        self.chain(
            "filter-output",
            Some(filter(Hook::Output, FILTER_PRIORITY)),
            vec![source_ranges, no_endpoints, no_endpoints_np],
        );
        self.chain(
            "filter-output-post-dnat",
            Some(filter(Hook::Output, FILTER_POST_DNAT_PRIORITY)),
            vec![unknown_port, unallocated],
        );
        self.rs
    }

    fn chain(&mut self, name: &str, base: Option<Base>, rules: Vec<Rule>) {
        self.rs.chains.insert(name.into(), Chain { base, rules });
    }
}
