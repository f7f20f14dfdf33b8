//! Kubernetes objects converted once, at the edge, into the plain views the
//! proxy's pure core works on: Service ports, their endpoints, and the facts
//! about this node. Which objects count follows kube-proxy (see
//! docs/proxy.md): headless, ExternalName and `service-proxy-name` /
//! `headless`-labelled Services are ignored; endpoints are matched to
//! Service ports by port name and protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::ruleset::{Family, Proto};

pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

pub use ferrolb_crds::class::ServiceKey;

/// One port of a Service: `namespace/name:port-name/protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub service: ServiceKey,
    pub port_name: String,
    pub proto: Proto,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.service,
            self.port_name,
            self.proto.nft()
        )
    }
}

/// What one Service port asks of the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub key: PortKey,
    pub port: u16,
    /// `spec.clusterIPs`, both families.
    pub cluster_ips: Vec<IpAddr>,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose ipMode is VIP (or unset).
    pub lb_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// `externalTrafficPolicy: Local` on a port reachable from outside.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub affinity: Option<u32>,
    /// The Service's health check node port (eTP Local LoadBalancers).
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Reachable through a NodePort, an LB IP or an external IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.lb_ips.is_empty() || !self.external_ips.is_empty()
    }
}

/// Whether kube-proxy would look at this Service at all.
pub fn is_proxied(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    matches!(spec.cluster_ip.as_deref(), Some(ip) if !ip.is_empty() && ip != "None")
}

fn parse_ips(list: Option<&Vec<String>>) -> Vec<IpAddr> {
    list.into_iter()
        .flatten()
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The ports of a Service, or nothing when it is not proxied.
pub fn service_ports(svc: &Service) -> Vec<ServicePort> {
    if !is_proxied(svc) {
        return Vec::new();
    }
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let service = ServiceKey {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
    };
    let mut cluster_ips = parse_ips(spec.cluster_ips.as_ref());
    if cluster_ips.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref().and_then(|s| s.parse().ok())
    {
        cluster_ips.push(ip);
    }
    let lb = spec.type_.as_deref() == Some("LoadBalancer");
    let lb_ips: Vec<IpAddr> = if lb {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect()
    } else {
        Vec::new()
    };
    let source_ranges: Vec<IpNet> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<IpNet>().ok().map(|n| n.trunc()))
        .collect();
    let node_ported = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(10800)
    });
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health = if lb && etp_local {
        spec.health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    } else {
        None
    };
    spec.ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
            let mut sp = ServicePort {
                key: PortKey {
                    service: service.clone(),
                    port_name: p.name.clone().unwrap_or_default(),
                    proto,
                },
                port,
                cluster_ips: cluster_ips.clone(),
                node_port: if node_ported {
                    p.node_port
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| *n != 0)
                } else {
                    None
                },
                external_ips: parse_ips(spec.external_ips.as_ref()),
                lb_ips: lb_ips.clone(),
                source_ranges: source_ranges.clone(),
                external_local: false,
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                affinity,
                health_check_node_port: health,
            };
            sp.external_local = etp_local && sp.externally_accessible();
            Some(sp)
        })
        .collect()
}

/// One endpoint of one Service port, as its EndpointSlice says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Endpoints of one Service by (port name, protocol).
pub type PortEndpoints = BTreeMap<(String, Proto), Vec<Endpoint>>;

/// Endpoints of every Service.
pub type EndpointIndex = BTreeMap<ServiceKey, PortEndpoints>;

/// Collects the endpoints of `family` from the slices, for node `node`.
pub fn endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    family: Family,
    node: &str,
) -> EndpointIndex {
    let mut parts: BTreeMap<ServiceKey, Vec<PortEndpoints>> = BTreeMap::new();
    for slice in slices {
        if let Some((key, eps)) = slice_endpoints(slice, family, node) {
            parts.entry(key).or_default().push(eps);
        }
    }
    parts
        .into_iter()
        .map(|(key, parts)| (key, merge(&parts)))
        .collect()
}

/// What one slice of `family` gives its Service, as seen from node `node`:
/// nothing when it is of the other family, unlabelled, or for a Service
/// kube-proxy ignores.
pub fn slice_endpoints(
    slice: &EndpointSlice,
    family: Family,
    node: &str,
) -> Option<(ServiceKey, PortEndpoints)> {
    let wanted = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    if slice.address_type != wanted {
        return None;
    }
    let labels = slice.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return None;
    }
    let name = labels
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty())?;
    let key = ServiceKey {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        name: name.clone(),
    };
    let mut by_port = PortEndpoints::new();
    for port in slice.ports.iter().flatten() {
        let (Some(port_name), Some(number)) = (port.name.as_ref(), port.port) else {
            continue;
        };
        let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
            continue;
        };
        let Some(proto) = Proto::parse(port.protocol.as_deref().unwrap_or("TCP")) else {
            continue;
        };
        let list = by_port.entry((port_name.clone(), proto)).or_default();
        for ep in &slice.endpoints {
            let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            list.push(Endpoint {
                addr,
                port: number,
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: ep.node_name.as_deref() == Some(node),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            });
        }
    }
    Some((key, by_port))
}

/// The endpoints of one Service from what each of its slices gives, in
/// order: the same address:port listed twice keeps the first entry that is
/// not terminating. Sorted by address and port.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a PortEndpoints>) -> PortEndpoints {
    let mut out = PortEndpoints::new();
    for part in parts {
        for (port, eps) in part {
            let list = out.entry(port.clone()).or_default();
            for new in eps {
                match list
                    .iter_mut()
                    .find(|e| e.addr == new.addr && e.port == new.port)
                {
                    Some(old) if old.terminating && !new.terminating => *old = new.clone(),
                    Some(_) => {}
                    None => list.push(new.clone()),
                }
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by_key(|e| (e.addr, e.port));
    }
    out
}

/// What the proxy knows about its own node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub zone: Option<String>,
    /// InternalIP then ExternalIP addresses, in the Node's order.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeFacts {
    pub fn of(node: &Node) -> Self {
        let status = node.status.as_ref();
        let mut internal = Vec::new();
        let mut external = Vec::new();
        for a in status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            let Ok(ip) = a.address.parse::<IpAddr>() else {
                continue;
            };
            match a.type_.as_str() {
                "InternalIP" => internal.push(ip),
                "ExternalIP" => external.push(ip),
                _ => {}
            }
        }
        internal.extend(external);
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL).cloned()),
            addresses: internal,
            pod_cidrs: node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidrs.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|c| c.parse().ok())
                .collect(),
        }
    }

    /// The node's primary address of `family` (its first InternalIP).
    pub fn primary(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
    }
}

/// Which node addresses NodePorts (and health-check ports) answer on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary address of each family (kube-proxy nftables' default).
    Primary,
    /// Node addresses inside any of these CIDRs.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    pub fn select(&self, node: &NodeFacts, family: Family) -> BTreeSet<IpAddr> {
        match self {
            Self::Primary => node.primary(family).into_iter().collect(),
            Self::Cidrs(cidrs) => node
                .addresses
                .iter()
                .copied()
                .filter(|a| Family::of(a) == family && cidrs.iter().any(|c| c.contains(a)))
                // Localhost NodePorts are not supported (as in kube-proxy's nftables mode).
                .filter(|a| !a.is_loopback())
                .collect(),
        }
    }
}
