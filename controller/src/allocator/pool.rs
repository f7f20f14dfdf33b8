//! A pool as the allocator sees it: parsed ranges, flags, who may use it.

use std::cmp::Ordering;
use std::net::IpAddr;

use ferrolb_crds::IpRange;
use ferrolb_crds::addresses::to_u128;

use super::request::{Family, ServiceRequest};
use super::selector::Selector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// In `spec.addresses` order, which is the order addresses are handed out.
    pub ranges: Vec<IpRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    pub allocation: Option<Allocation>,
}

/// `spec.serviceAllocation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub priority: Option<i32>,
    pub namespaces: Vec<String>,
    pub namespace_selectors: Vec<Selector>,
    pub service_selectors: Vec<Selector>,
}

impl Pool {
    /// A plain auto-assigning pool; tests adjust from here.
    pub fn new(name: &str, addresses: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            ranges: addresses
                .iter()
                .map(|a| {
                    a.parse()
                        .unwrap_or_else(|e| panic!("test pool {name}: {e}"))
                })
                .collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            allocation: None,
        }
    }

    /// Whether the pool may hand out `ip`: inside a range, and not a .0/.255
    /// address when the pool avoids those.
    pub fn contains(&self, ip: IpAddr) -> bool {
        !(self.avoid_buggy_ips && is_buggy(ip)) && self.ranges.iter().any(|r| r.contains(ip))
    }

    pub fn has_family(&self, family: Family) -> bool {
        self.ranges.iter().any(|r| Family::of(r.start()) == family)
    }

    /// Addresses of `family` the pool can hand out (saturating).
    pub fn capacity(&self, family: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|r| Family::of(r.start()) == family)
            .map(|r| {
                let (s, e) = r.bounds();
                let buggy = if self.avoid_buggy_ips && r.is_ipv4() {
                    count_residue(s, e, 0) + count_residue(s, e, 255)
                } else {
                    0
                };
                r.len() - buggy
            })
            .fold(0u128, u128::saturating_add)
    }

    /// The order pools are tried in: pools with a serviceAllocation before
    /// those without; among them a set priority (> 0, MetalLB's meaning of
    /// "set") before none, lower first; ties by name so the choice never
    /// depends on timing.
    pub fn order(&self, other: &Pool) -> Ordering {
        self.order_key().cmp(&other.order_key())
    }

    fn order_key(&self) -> (bool, bool, i32, &str) {
        let priority = self
            .allocation
            .as_ref()
            .and_then(|a| a.priority)
            .filter(|p| *p > 0);
        (
            self.allocation.is_none(),
            priority.is_none(),
            priority.unwrap_or(0),
            &self.name,
        )
    }

    /// `Ok` when the Service may use this pool, else why not.
    pub fn admits(&self, svc: &ServiceRequest) -> Result<(), String> {
        let Some(a) = &self.allocation else {
            return Ok(());
        };
        let restricts_namespace = !a.namespaces.is_empty() || !a.namespace_selectors.is_empty();
        if restricts_namespace
            && !a.namespaces.contains(&svc.key.namespace)
            && !a
                .namespace_selectors
                .iter()
                .any(|s| s.matches(&svc.namespace_labels))
        {
            return Err(format!(
                "namespace {:?} is not in its serviceAllocation.namespaces or namespaceSelectors",
                svc.key.namespace
            ));
        }
        if !a.service_selectors.is_empty()
            && !a.service_selectors.iter().any(|s| s.matches(&svc.labels))
        {
            return Err(
                "the Service's labels match none of its serviceAllocation.serviceSelectors"
                    .to_string(),
            );
        }
        Ok(())
    }
}

/// Addresses ending in .0 or .255 confuse the smurf protection of some old
/// routers; MetalLB's `avoidBuggyIPs` skips them. IPv6 is never affected.
pub fn is_buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if matches!(a.octets()[3], 0 | 255))
}

/// How many x in [start, end] have x % 256 == residue.
pub(crate) fn count_residue(start: u128, end: u128, residue: u128) -> u128 {
    let upto = |n: u128| {
        if n < residue {
            0
        } else {
            (n - residue) / 256 + 1
        }
    };
    upto(end) - start.checked_sub(1).map_or(0, upto)
}

/// Number form of an address, for range arithmetic.
pub fn number(ip: IpAddr) -> u128 {
    to_u128(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_counts_without_enumerating() {
        let mut p = Pool::new("p", &["10.0.0.0/8", "2001:db8::/64", "198.18.8.0/24"]);
        assert_eq!(p.capacity(Family::V4), (1 << 24) + 256);
        assert_eq!(p.capacity(Family::V6), 1 << 64);
        p.avoid_buggy_ips = true;
        assert_eq!(p.capacity(Family::V4), (1 << 24) + 256 - 2 * 65536 - 2);
        let small = Pool {
            avoid_buggy_ips: true,
            ..Pool::new("s", &["198.18.8.250-198.18.9.4"])
        };
        // .250-.254 and .1-.4 remain; .255 and .0 are skipped.
        assert_eq!(small.capacity(Family::V4), 9);
    }

    #[test]
    fn buggy_addresses_are_not_contained_when_avoided() {
        let mut p = Pool::new("p", &["198.18.8.0/24"]);
        assert!(p.contains("198.18.8.0".parse().unwrap()));
        p.avoid_buggy_ips = true;
        assert!(!p.contains("198.18.8.0".parse().unwrap()));
        assert!(!p.contains("198.18.8.255".parse().unwrap()));
        assert!(p.contains("198.18.8.1".parse().unwrap()));
    }
}
