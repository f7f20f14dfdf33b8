//! Which endpoints one Service port uses from this node, as kube-proxy
//! decides it: topology hints narrow the cluster-wide set, local policies
//! use only this node's endpoints, and serving-but-terminating endpoints
//! are used only when no ready one exists.

use std::net::SocketAddr;

use crate::model::{Endpoint, NodeFacts, ServicePort};

/// The endpoints a Service port may send to from this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selected {
    /// For `Cluster` policies (and the pod/host short-circuit of eTP Local).
    pub cluster: Vec<SocketAddr>,
    /// This node's, for `Local` policies.
    pub local: Vec<SocketAddr>,
    /// Some endpoint anywhere can take traffic (ready, or serving while
    /// terminating): without one, traffic is rejected.
    pub any: bool,
    /// Ready endpoints on this node (the health check's `localEndpoints`,
    /// counted by distinct address).
    pub local_ready: usize,
}

/// Selects the endpoints of `port` from `eps` for `node`.
pub fn select(port: &ServicePort, eps: &[Endpoint], node: &NodeFacts) -> Selected {
    let uses_cluster = !port.internal_local || port.externally_accessible();
    let uses_local = port.internal_local || port.external_local;
    let addr = |e: &Endpoint| SocketAddr::new(e.addr, e.port);

    let mut out = Selected::default();
    if uses_cluster {
        let ready: Vec<&Endpoint> = eps.iter().filter(|e| e.ready).collect();
        let by_node = !ready.is_empty()
            && ready.iter().all(|e| !e.node_hints.is_empty())
            && ready.iter().any(|e| e.node_hints.contains(&node.name));
        let by_zone = !by_node
            && node.zone.is_some()
            && !ready.is_empty()
            && ready.iter().all(|e| !e.zone_hints.is_empty())
            && ready
                .iter()
                .any(|e| node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)));
        out.cluster = ready
            .iter()
            .filter(|e| {
                if by_node {
                    e.node_hints.contains(&node.name)
                } else if by_zone {
                    node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z))
                } else {
                    true
                }
            })
            .map(|e| addr(e))
            .collect();
        if out.cluster.is_empty() {
            // No ready endpoint: fall back to serving terminating ones,
            // topology ignored.
            out.cluster = eps
                .iter()
                .filter(|e| e.serving && e.terminating)
                .map(addr)
                .collect();
        }
    }
    if uses_local {
        let local: Vec<&Endpoint> = eps.iter().filter(|e| e.local).collect();
        out.local = local.iter().filter(|e| e.ready).map(|e| addr(e)).collect();
        if out.local.is_empty() {
            out.local = local
                .iter()
                .filter(|e| e.serving && e.terminating)
                .map(|e| addr(e))
                .collect();
        }
    }
    out.any = !out.cluster.is_empty()
        || (uses_local && eps.iter().any(|e| e.ready || (e.serving && e.terminating)));
    let mut local_ready: Vec<_> = eps
        .iter()
        .filter(|e| e.local && e.ready)
        .map(|e| e.addr)
        .collect();
    local_ready.sort();
    local_ready.dedup();
    out.local_ready = local_ready.len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortKey, ServiceKey};
    use crate::ruleset::Proto;

    fn port(internal_local: bool, external_local: bool) -> ServicePort {
        ServicePort {
            key: PortKey {
                service: ServiceKey {
                    namespace: "ns".into(),
                    name: "svc".into(),
                },
                port_name: String::new(),
                proto: Proto::Tcp,
            },
            port: 80,
            cluster_ips: vec!["198.18.64.10".parse().unwrap()],
            node_port: external_local.then_some(30080),
            external_ips: vec![],
            lb_ips: vec![],
            source_ranges: vec![],
            external_local,
            internal_local,
            affinity: None,
            health_check_node_port: None,
        }
    }

    fn ep(last: u8, ready: bool, terminating: bool, local: bool) -> Endpoint {
        Endpoint {
            addr: format!("198.19.1.{last}").parse().unwrap(),
            port: 8080,
            ready,
            serving: ready || terminating,
            terminating,
            local,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn node() -> NodeFacts {
        NodeFacts {
            name: "node-1".into(),
            zone: Some("a".into()),
            ..Default::default()
        }
    }

    fn last(addrs: &[SocketAddr]) -> Vec<u8> {
        addrs
            .iter()
            .map(|a| match a.ip() {
                std::net::IpAddr::V4(v) => v.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn ready_endpoints_only_and_terminating_as_fallback() {
        let eps = [ep(2, true, false, false), ep(3, false, true, true)];
        let s = select(&port(false, false), &eps, &node());
        assert_eq!(last(&s.cluster), [2]);
        assert!(s.any);
        let eps = [ep(2, false, false, false), ep(3, false, true, true)];
        let s = select(&port(false, false), &eps, &node());
        assert_eq!(
            last(&s.cluster),
            [3],
            "serving+terminating when none is ready"
        );
        let eps = [ep(2, false, false, false)];
        let s = select(&port(false, false), &eps, &node());
        assert!(
            s.cluster.is_empty() && !s.any,
            "unready and not terminating: reject"
        );
    }

    #[test]
    fn local_policies_use_this_nodes_endpoints_with_their_own_fallback() {
        let eps = [
            ep(2, true, false, false),
            ep(3, false, true, true),
            ep(4, true, false, true),
        ];
        let s = select(&port(true, false), &eps, &node());
        assert_eq!(last(&s.local), [4]);
        assert!(s.cluster.is_empty(), "iTP Local alone uses no cluster set");
        let eps = [ep(2, true, false, false), ep(3, false, true, true)];
        let s = select(&port(false, true), &eps, &node());
        assert_eq!(last(&s.local), [3], "local serving+terminating fallback");
        assert_eq!(
            last(&s.cluster),
            [2],
            "eTP Local still needs the cluster set"
        );
        assert_eq!(
            s.local_ready, 0,
            "terminating endpoints are not counted by the health check"
        );
        let eps = [ep(2, true, false, false)];
        let s = select(&port(true, false), &eps, &node());
        assert!(
            s.local.is_empty() && s.any,
            "endpoints elsewhere only: drop, not reject"
        );
    }

    #[test]
    fn hints_narrow_the_cluster_set_only_when_every_ready_endpoint_has_them() {
        let mut a = ep(2, true, false, false);
        a.zone_hints = vec!["a".into()];
        let mut b = ep(3, true, false, false);
        b.zone_hints = vec!["b".into()];
        let s = select(&port(false, false), &[a.clone(), b.clone()], &node());
        assert_eq!(last(&s.cluster), [2]);
        let c = ep(4, true, false, false);
        let s = select(&port(false, false), &[a.clone(), b.clone(), c], &node());
        assert_eq!(
            last(&s.cluster),
            [2, 3, 4],
            "one endpoint without hints: ignore hints"
        );
        b.zone_hints = vec!["b".into()];
        a.zone_hints = vec!["b".into()];
        let s = select(&port(false, false), &[a.clone(), b.clone()], &node());
        assert_eq!(
            last(&s.cluster),
            [2, 3],
            "no hint for our zone: ignore hints"
        );
        a.node_hints = vec!["node-1".into()];
        b.node_hints = vec!["node-2".into()];
        let s = select(&port(false, false), &[a, b], &node());
        assert_eq!(last(&s.cluster), [2], "node hints win over zone hints");
    }
}
