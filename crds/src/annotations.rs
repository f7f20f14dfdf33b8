//! Annotation names FerroLB reads on Services, ours first and then the
//! MetalLB spellings we accept so that migrating is a find-and-replace.

/// Comma-separated IPs the Service asks for (at most one per family).
pub const LOAD_BALANCER_IPS: &str = "ferrolb.io/loadBalancerIPs";
/// Name of the pool the Service wants its IP from.
pub const ADDRESS_POOL: &str = "ferrolb.io/address-pool";
/// Sharing key: Services with the same key may share an IP.
pub const ALLOW_SHARED_IP: &str = "ferrolb.io/allow-shared-ip";
/// Written by the controller: the pool the Service's IP came from.
pub const IP_ALLOCATED_FROM_POOL: &str = "ferrolb.io/ip-allocated-from-pool";

/// `spec.loadBalancerClass` a FerroLB controller serves unless told otherwise.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "ferrolb.io/lb";

/// MetalLB's current spellings, accepted for migration.
pub mod metallb {
    pub const LOAD_BALANCER_IPS: &str = "metallb.io/loadBalancerIPs";
    pub const ADDRESS_POOL: &str = "metallb.io/address-pool";
    pub const ALLOW_SHARED_IP: &str = "metallb.io/allow-shared-ip";
}

/// MetalLB's older `metallb.universe.tf` spellings, accepted for migration.
pub mod metallb_legacy {
    pub const LOAD_BALANCER_IPS: &str = "metallb.universe.tf/loadBalancerIPs";
    pub const ADDRESS_POOL: &str = "metallb.universe.tf/address-pool";
    pub const ALLOW_SHARED_IP: &str = "metallb.universe.tf/allow-shared-ip";
}

/// Every accepted spelling of one Service annotation, in the order they are
/// consulted: ours wins over MetalLB's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aliases(pub [&'static str; 3]);

pub const LOAD_BALANCER_IPS_ALIASES: Aliases = Aliases([
    LOAD_BALANCER_IPS,
    metallb::LOAD_BALANCER_IPS,
    metallb_legacy::LOAD_BALANCER_IPS,
]);
pub const ADDRESS_POOL_ALIASES: Aliases = Aliases([
    ADDRESS_POOL,
    metallb::ADDRESS_POOL,
    metallb_legacy::ADDRESS_POOL,
]);
pub const ALLOW_SHARED_IP_ALIASES: Aliases = Aliases([
    ALLOW_SHARED_IP,
    metallb::ALLOW_SHARED_IP,
    metallb_legacy::ALLOW_SHARED_IP,
]);

impl Aliases {
    /// The first spelling present in `annotations`, with its value.
    pub fn lookup<'a>(
        &self,
        annotations: &'a std::collections::BTreeMap<String, String>,
    ) -> Option<(&'static str, &'a str)> {
        self.0
            .iter()
            .find_map(|name| annotations.get(*name).map(|v| (*name, v.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ours_wins_over_metallb() {
        let mut a = BTreeMap::new();
        a.insert(metallb_legacy::ADDRESS_POOL.to_string(), "old".to_string());
        assert_eq!(
            ADDRESS_POOL_ALIASES.lookup(&a),
            Some((metallb_legacy::ADDRESS_POOL, "old"))
        );
        a.insert(metallb::ADDRESS_POOL.to_string(), "mid".to_string());
        assert_eq!(
            ADDRESS_POOL_ALIASES.lookup(&a),
            Some((metallb::ADDRESS_POOL, "mid"))
        );
        a.insert(ADDRESS_POOL.to_string(), "ours".to_string());
        assert_eq!(
            ADDRESS_POOL_ALIASES.lookup(&a),
            Some((ADDRESS_POOL, "ours"))
        );
    }

    #[test]
    fn absent_annotation_is_none() {
        assert_eq!(LOAD_BALANCER_IPS_ALIASES.lookup(&BTreeMap::new()), None);
    }
}
