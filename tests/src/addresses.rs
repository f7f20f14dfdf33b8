//! The lab's address plan (LAB.md): benchmarking and documentation ranges only.
//!
//! Pure functions, so the plan is unit-tested without touching the kernel.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Nodes sit on 198.18.0.11-.19, so a lab has at most nine of them.
pub const MAX_NODES: u8 = 9;
pub const LAN_V4_PREFIX_LEN: u8 = 20;
pub const LAN_V6_PREFIX_LEN: u8 = 64;
pub const APISERVER_PORT: u16 = 6443;
pub const NODE_PORT_RANGE: &str = "30000-32767";
pub const SERVICE_CIDR_V4: &str = "198.18.64.0/18";
pub const SERVICE_CIDR_V6: &str = "2001:db8:2::/112";
/// The pool the demo hands to the controller.
pub const DEMO_POOL_V4: &str = "198.18.8.0/24";
/// All pod CIDRs together, for kube-proxy's --cluster-cidr.
pub const CLUSTER_POD_CIDR_V4: &str = "198.19.0.0/16";
pub const CLUSTER_POD_CIDR_V6: &str = "2001:db8:1::/48";

/// Which address families the lab wires up.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Dual,
}

impl IpFamily {
    pub fn has_v6(self) -> bool {
        self == IpFamily::Dual
    }
}

pub fn control_plane_v4() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 1)
}

pub fn control_plane_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
}

/// LAN address of node `n` (1-based): 198.18.0.11 for node-1.
pub fn node_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + n)
}

/// LAN IPv6 of node `n`: 2001:db8::11 for node-1, mirroring the IPv4 plan.
pub fn node_v6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + u16::from(n))
}

pub fn client_v4() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 100)
}

pub fn client_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100)
}

pub fn pod_cidr_v4(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 19, n, 0), 24).expect("24 is a valid IPv4 prefix length")
}

pub fn pod_cidr_v6(n: u8) -> Ipv6Net {
    Ipv6Net::new(
        Ipv6Addr::new(0x2001, 0xdb8, 1, u16::from(n), 0, 0, 0, 0),
        64,
    )
    .expect("64 is a valid IPv6 prefix length")
}

/// The pod CIDRs of node `n` for the family, IPv4 first (the Node's primary family).
pub fn pod_cidrs(n: u8, family: IpFamily) -> Vec<IpNet> {
    let mut cidrs = vec![IpNet::V4(pod_cidr_v4(n))];
    if family.has_v6() {
        cidrs.push(IpNet::V6(pod_cidr_v6(n)));
    }
    cidrs
}

/// The address every pod on node `n` uses as its gateway; it lives on the
/// node namespace's loopback so ARP from any pod veth is answered.
pub fn pod_gateway_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, n, 1)
}

/// Pods route IPv6 via this link-local address on the node side of their veth.
pub fn pod_gateway_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)
}

/// The pod addresses for host index `idx` (2..=254) of node `n`.
pub fn pod_ips(n: u8, idx: u8, family: IpFamily) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::new(198, 19, n, idx))];
    if family.has_v6() {
        ips.push(IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            1,
            u16::from(n),
            0,
            0,
            0,
            u16::from(idx),
        )));
    }
    ips
}

/// The node's LAN addresses for the family, IPv4 first.
pub fn node_ips(n: u8, family: IpFamily) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(node_v4(n))];
    if family.has_v6() {
        ips.push(IpAddr::V6(node_v6(n)));
    }
    ips
}

pub fn service_cidrs(family: IpFamily) -> String {
    if family.has_v6() {
        format!("{SERVICE_CIDR_V4},{SERVICE_CIDR_V6}")
    } else {
        SERVICE_CIDR_V4.to_string()
    }
}

/// The `kubernetes` Service's ClusterIP (first address of the range); it must
/// be in the API server's serving certificate.
pub fn kubernetes_service_v4() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 64, 1)
}

pub fn kubernetes_service_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)
}

/// Hands out host indices of one node's pod CIDR. .0 is the network, .1 the
/// gateway and .255 broadcast, so pods get .2-.254.
#[derive(Debug, Default)]
pub struct PodIpAllocator {
    used: BTreeSet<u8>,
}

impl PodIpAllocator {
    pub const FIRST: u8 = 2;
    pub const LAST: u8 = 254;

    /// The lowest free index, or None when the node is full.
    pub fn allocate(&mut self) -> Option<u8> {
        let idx = (Self::FIRST..=Self::LAST).find(|i| !self.used.contains(i))?;
        self.used.insert(idx);
        Some(idx)
    }

    pub fn release(&mut self, idx: u8) {
        self.used.remove(&idx);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_lab_md() {
        assert_eq!(node_v4(1).to_string(), "198.18.0.11");
        assert_eq!(node_v4(MAX_NODES).to_string(), "198.18.0.19");
        assert_eq!(node_v6(1).to_string(), "2001:db8::11");
        assert_eq!(client_v4().to_string(), "198.18.0.100");
        assert_eq!(client_v6().to_string(), "2001:db8::100");
        assert_eq!(pod_cidr_v4(2).to_string(), "198.19.2.0/24");
        assert_eq!(pod_cidr_v6(3).to_string(), "2001:db8:1:3::/64");
        assert_eq!(pod_gateway_v4(1).to_string(), "198.19.1.1");
        assert_eq!(
            service_cidrs(IpFamily::Dual),
            "198.18.64.0/18,2001:db8:2::/112"
        );
        assert_eq!(service_cidrs(IpFamily::Ipv4), "198.18.64.0/18");
    }

    #[test]
    fn everything_stays_in_documentation_ranges() {
        let v4: Ipv4Net = "198.18.0.0/15".parse().unwrap();
        let v6: Ipv6Net = "2001:db8::/32".parse().unwrap();
        let lan: Ipv4Net = "198.18.0.0/20".parse().unwrap();
        for n in 1..=MAX_NODES {
            assert!(lan.contains(&node_v4(n)));
            for ip in pod_ips(n, 254, IpFamily::Dual) {
                match ip {
                    IpAddr::V4(a) => assert!(v4.contains(&a) && pod_cidr_v4(n).contains(&a)),
                    IpAddr::V6(a) => assert!(v6.contains(&a) && pod_cidr_v6(n).contains(&a)),
                }
            }
            assert!(v6.contains(&node_v6(n)));
        }
        assert!(lan.contains(&client_v4()) && lan.contains(&control_plane_v4()));
        let svc: Ipv4Net = SERVICE_CIDR_V4.parse().unwrap();
        assert!(svc.contains(&kubernetes_service_v4()));
        assert!(
            !lan.contains(&svc.network()),
            "ClusterIPs must not overlap the LAN"
        );
    }

    #[test]
    fn pod_cidrs_are_primary_v4_first() {
        let cidrs = pod_cidrs(1, IpFamily::Dual);
        assert_eq!(cidrs.len(), 2);
        assert!(matches!(cidrs[0], IpNet::V4(_)));
        assert_eq!(pod_cidrs(1, IpFamily::Ipv4).len(), 1);
    }

    #[test]
    fn allocator_reuses_lowest_and_stops_when_full() {
        let mut a = PodIpAllocator::default();
        assert_eq!(a.allocate(), Some(2));
        assert_eq!(a.allocate(), Some(3));
        a.release(2);
        assert_eq!(a.allocate(), Some(2));
        while a.allocate().is_some() {}
        assert_eq!(a.in_use(), 253);
        a.release(100);
        assert_eq!(a.allocate(), Some(100));
        assert_eq!(a.allocate(), None);
    }
}
