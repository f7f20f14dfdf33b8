//! Every binary's default listen ports, in one place: the binaries, the
//! lab and the chart use the same numbers, so a clash between two
//! components on one host network shows up in the lab too.

use crate::DefaultPorts;

pub const CONTROLLER: DefaultPorts = DefaultPorts {
    metrics: 7472,
    health: 7473,
};

pub const SPEAKER: DefaultPorts = DefaultPorts {
    metrics: 7474,
    health: 7475,
};

/// The speakers' heartbeats (UDP), between MetalLB's memberlist (7946)
/// and our HTTP ports, so both can run on one node during a migration.
pub const SPEAKER_HEARTBEAT: u16 = 7476;

/// Metrics on kube-proxy's port, so existing scrape configs keep working;
/// kube-proxy's `/healthz` and `/livez` are on 10256 (`--healthz-bind-address`).
pub const PROXY: DefaultPorts = DefaultPorts {
    metrics: 10249,
    health: 7477,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_node_components_never_share_a_port() {
        let mut seen = std::collections::BTreeSet::new();
        for p in [CONTROLLER, SPEAKER, PROXY] {
            assert!(seen.insert(p.metrics) && seen.insert(p.health), "{p:?}");
        }
        assert!(seen.insert(SPEAKER_HEARTBEAT));
    }
}
