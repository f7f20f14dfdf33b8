//! What the allocator knows about a Service: plain data the reconciler
//! extracts from the `v1.Service`.

use std::fmt;
use std::net::IpAddr;

use super::selector::Labels;

pub use ferrolb_crds::class::ServiceKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// One port a Service exposes; two Services sharing an IP may not both use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    pub protocol: String,
    pub port: u16,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// Everything allocation depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRequest {
    pub key: ServiceKey,
    pub labels: Labels,
    pub namespace_labels: Labels,
    /// `spec.ipFamilies`: primary first; never empty.
    pub families: Vec<Family>,
    pub policy: FamilyPolicy,
    pub ports: Vec<Port>,
    /// The `allow-shared-ip` key, if the Service may share.
    pub sharing_key: Option<String>,
    /// Empty for `externalTrafficPolicy: Cluster`; the pod selector for
    /// `Local`, since sharers must then land on the same nodes.
    pub backend_key: String,
    /// IPs asked for by annotation or `spec.loadBalancerIP`.
    pub requested_ips: Vec<IpAddr>,
    /// Pool asked for by annotation.
    pub requested_pool: Option<String>,
}

impl ServiceRequest {
    /// A plain single-stack IPv4 Service on TCP/80; tests adjust from here.
    pub fn simple(namespace: &str, name: &str) -> Self {
        Self {
            key: ServiceKey::new(namespace, name),
            labels: Labels::new(),
            namespace_labels: Labels::new(),
            families: vec![Family::V4],
            policy: FamilyPolicy::SingleStack,
            ports: vec![Port {
                protocol: "TCP".into(),
                port: 80,
            }],
            sharing_key: None,
            backend_key: String::new(),
            requested_ips: Vec::new(),
            requested_pool: None,
        }
    }

    /// The families this Service must get, in order. Prefer-dual-stack may
    /// settle for the first of them.
    pub fn wanted_families(&self) -> Vec<Family> {
        match self.policy {
            FamilyPolicy::SingleStack => self.families.iter().take(1).copied().collect(),
            _ => self.families.clone(),
        }
    }
}
