//! Kubernetes objects to the election's inputs ([`crate::election`]):
//! which IPs our Services hold and from which pool, what each
//! L2Advertisement covers, and what the election needs of each Node.
//!
//! Converted once at the edge, so the election and the fence stay free of
//! kube types. Every refusal names the object and its field; a refused
//! L2Advertisement keeps its last good form, so fixing a typo in a
//! selector never makes a speaker stop announcing what it announced.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_crds::annotations::IP_ALLOCATED_FROM_POOL;
use ferrolb_crds::class::ClassFilter;
use ferrolb_crds::selector::{Labels, from_label_selectors};
use ferrolb_crds::{IPAddressPool, IpRange, L2Advertisement, parse_addresses};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::election::{Advertisement, Announced, NodeFacts, ServiceFacts};

/// The label EndpointSlices carry naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A problem with one object, for a log line or an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Kind/name` (cluster-scoped) or `Kind/namespace/name`.
    pub object: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// A pool's name, labels and ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFacts {
    pub name: String,
    pub labels: Labels,
    pub ranges: Vec<IpRange>,
}

/// Pools by name; a pool whose addresses do not parse has no ranges (the
/// controller reports it; IPs it handed out earlier keep their annotation).
pub fn pools<'a>(list: impl IntoIterator<Item = &'a IPAddressPool>) -> Vec<PoolFacts> {
    let mut out: Vec<PoolFacts> = list
        .into_iter()
        .filter_map(|p| {
            let name = p.metadata.name.clone()?;
            Some(PoolFacts {
                labels: p.metadata.labels.clone().unwrap_or_default(),
                ranges: parse_addresses(&p.spec.addresses).unwrap_or_default(),
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// L2Advertisements to [`Advertisement`]s: pools named or selected (both
/// lists empty means every pool), selectors parsed. One that does not
/// parse keeps its entry in `last_good`, if any, and is reported;
/// `last_good` is updated with every one that parses and pruned of deleted
/// ones.
pub fn advertisements<'a>(
    list: impl IntoIterator<Item = &'a L2Advertisement>,
    pools: &[PoolFacts],
    last_good: &mut BTreeMap<String, Advertisement>,
) -> (Vec<Advertisement>, Vec<Problem>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut present = BTreeSet::new();
    for ad in list {
        let Some(name) = ad.metadata.name.clone() else {
            continue;
        };
        present.insert(name.clone());
        match advertisement(&name, ad, pools) {
            Ok(a) => {
                last_good.insert(name, a.clone());
                out.push(a);
            }
            Err(message) => {
                let kept = last_good.get(&name).cloned();
                let message = match &kept {
                    Some(_) => format!("{message}; still using its last valid form"),
                    None => format!("{message}; ignored until fixed"),
                };
                problems.push(Problem {
                    object: format!("L2Advertisement/{name}"),
                    message,
                });
                out.extend(kept);
            }
        }
    }
    last_good.retain(|name, _| present.contains(name));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    (out, problems)
}

fn advertisement(
    name: &str,
    ad: &L2Advertisement,
    pools: &[PoolFacts],
) -> Result<Advertisement, String> {
    let spec = &ad.spec;
    let field = |e: ferrolb_crds::selector::FieldError| {
        format!("spec.{}[{}]: {}", e.field, e.index, e.error)
    };
    let pool_selectors =
        from_label_selectors(&spec.ip_address_pool_selectors, "ipAddressPoolSelectors")
            .map_err(field)?;
    let node_selectors =
        from_label_selectors(&spec.node_selectors, "nodeSelectors").map_err(field)?;
    let service_selectors =
        from_label_selectors(&spec.service_selectors, "serviceSelectors").map_err(field)?;
    if let Some((i, _)) = spec
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, n)| n.is_empty() || n.len() > 15 || n.contains('/') || n.contains(' '))
    {
        return Err(format!(
            "spec.interfaces[{i}]: {:?} is not an interface name",
            spec.interfaces[i]
        ));
    }
    let every = spec.ip_address_pools.is_empty() && pool_selectors.is_empty();
    let selected = pools
        .iter()
        .filter(|p| every || pool_selectors.iter().any(|s| s.matches(&p.labels)))
        .map(|p| p.name.clone());
    Ok(Advertisement {
        name: name.to_string(),
        // A named pool that does not exist yet is kept: it covers nothing
        // until it is created, and then it covers at once.
        pools: spec
            .ip_address_pools
            .iter()
            .cloned()
            .chain(selected)
            .collect(),
        node_selectors,
        service_selectors,
        interfaces: spec.interfaces.clone(),
    })
}

/// What the speaker needs of a Node beyond [`NodeFacts`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub facts: NodeFacts,
    /// The `Ready` condition is `True` (the liveness fallback for a peer
    /// whose heartbeats never arrive).
    pub ready: bool,
    /// `spec.unschedulable` (cordoned or draining).
    pub unschedulable: bool,
    pub internal_ips: Vec<IpAddr>,
}

pub fn nodes<'a>(list: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, NodeStatus> {
    list.into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let status = n.status.as_ref();
            let condition = |type_: &str| {
                status
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == type_ && c.status == "True")
            };
            let internal_ips = status
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect();
            Some((
                name,
                NodeStatus {
                    facts: NodeFacts {
                        labels: n.metadata.labels.clone().unwrap_or_default(),
                        network_unavailable: condition("NetworkUnavailable"),
                    },
                    ready: condition("Ready"),
                    unschedulable: n
                        .spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false),
                    internal_ips,
                },
            ))
        })
        .collect()
}

/// For each Service (namespace, name), the nodes with an endpoint that
/// takes traffic: ready, or serving while terminating (the data plane's
/// fallback when a node has no ready one, kube-proxy's rule).
pub fn serving_nodes<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.clone(),
            labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned(),
        ) else {
            continue;
        };
        let nodes = out.entry((ns, svc)).or_default();
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if (ready || (serving && terminating))
                && let Some(node) = &ep.node_name
            {
                nodes.insert(node.clone());
            }
        }
    }
    out
}

/// Every IP our Services hold, with its pool and Services.
///
/// The pool is the one the controller recorded in
/// `ferrolb.io/ip-allocated-from-pool` when it contains the IP, else the
/// first pool (by name) that does. An IP in no pool is reported and not
/// announced: answering for an address nobody handed out could steal a
/// host's traffic.
pub fn announced<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    filter: &ClassFilter,
    pools: &[PoolFacts],
    serving: &BTreeMap<(String, String), BTreeSet<String>>,
) -> (Vec<Announced>, Vec<Problem>) {
    let mut by_ip: BTreeMap<IpAddr, Announced> = BTreeMap::new();
    let mut problems = Vec::new();
    for svc in services {
        if !filter.is_ours(svc) {
            continue;
        }
        let (Some(namespace), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
            continue;
        };
        let ips: Vec<IpAddr> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let Some(&first_ip) = ips.first() else {
            continue;
        };
        let recorded = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(IP_ALLOCATED_FROM_POOL));
        let facts = ServiceFacts {
            namespace: namespace.clone(),
            name: name.clone(),
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            first_ip,
            local: svc
                .spec
                .as_ref()
                .and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local"),
            serving_nodes: serving
                .get(&(namespace.clone(), name.clone()))
                .cloned()
                .unwrap_or_default(),
        };
        for ip in ips {
            let Some(pool) = pool_of(ip, recorded.map(String::as_str), pools) else {
                problems.push(Problem {
                    object: format!("Service/{namespace}/{name}"),
                    message: format!(
                        "status.loadBalancer.ingress {ip} is in no IPAddressPool; not announced"
                    ),
                });
                continue;
            };
            let entry = by_ip.entry(ip).or_insert_with(|| Announced {
                ip,
                pool: pool.to_string(),
                services: Vec::new(),
            });
            if !entry
                .services
                .iter()
                .any(|s| s.namespace == facts.namespace && s.name == facts.name)
            {
                entry.services.push(facts.clone());
            }
        }
    }
    (by_ip.into_values().collect(), problems)
}

fn pool_of<'p>(ip: IpAddr, recorded: Option<&str>, pools: &'p [PoolFacts]) -> Option<&'p str> {
    let holds = |p: &PoolFacts| p.ranges.iter().any(|r| r.contains(ip));
    if let Some(name) = recorded
        && let Some(p) = pools.iter().find(|p| p.name == name && holds(p))
    {
        return Some(&p.name);
    }
    pools.iter().find(|p| holds(p)).map(|p| p.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_crds::{IPAddressPoolSpec, L2AdvertisementSpec};
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, ObjectMeta,
    };

    fn pool(name: &str, addresses: &[&str], labels: &[(&str, &str)]) -> IPAddressPool {
        let mut p = IPAddressPool::new(
            name,
            IPAddressPoolSpec {
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                auto_assign: true,
                avoid_buggy_ips: false,
                service_allocation: None,
            },
        );
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    fn ad(name: &str, spec: L2AdvertisementSpec) -> L2Advertisement {
        L2Advertisement::new(name, spec)
    }

    fn svc(name: &str, ips: &[&str], annotation: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                annotations: annotation.map(|p| {
                    [(IP_ALLOCATED_FROM_POOL.to_string(), p.to_string())]
                        .into_iter()
                        .collect()
                }),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ips.iter()
                            .map(|ip| LoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
        }
    }

    fn ours() -> ClassFilter {
        ClassFilter {
            class: "ferrolb.io/lb".into(),
            classless: true,
        }
    }

    #[test]
    fn pools_named_or_selected_and_both_empty_means_all() {
        let ps = pools(&[
            pool("a", &["198.18.0.0/28"], &[("tier", "web")]),
            pool("b", &["198.18.1.0/28"], &[]),
        ]);
        let mut last = BTreeMap::new();
        let sel = LabelSelector {
            match_labels: Some([("tier".to_string(), "web".to_string())].into()),
            ..Default::default()
        };
        let (ads, problems) = advertisements(
            &[
                ad("all", L2AdvertisementSpec::default()),
                ad(
                    "named",
                    L2AdvertisementSpec {
                        ip_address_pools: vec!["b".into(), "later".into()],
                        ..Default::default()
                    },
                ),
                ad(
                    "selected",
                    L2AdvertisementSpec {
                        ip_address_pool_selectors: vec![sel],
                        ..Default::default()
                    },
                ),
            ],
            &ps,
            &mut last,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let pools_of = |n: &str| {
            ads.iter()
                .find(|a| a.name == n)
                .map(|a| a.pools.iter().cloned().collect::<Vec<_>>())
        };
        assert_eq!(pools_of("all"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(pools_of("named"), Some(vec!["b".into(), "later".into()]));
        assert_eq!(pools_of("selected"), Some(vec!["a".into()]));
    }

    #[test]
    fn a_broken_advertisement_keeps_its_last_good_form_and_names_the_field() {
        let ps = pools(&[pool("a", &["198.18.0.0/28"], &[])]);
        let mut last = BTreeMap::new();
        let good = ad(
            "l2",
            L2AdvertisementSpec {
                ip_address_pools: vec!["a".into()],
                ..Default::default()
            },
        );
        let (first, _) = advertisements(&[good], &ps, &mut last);
        let broken = ad(
            "l2",
            L2AdvertisementSpec {
                ip_address_pools: vec!["a".into()],
                node_selectors: vec![LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "zone".into(),
                        operator: "Near".into(),
                        values: None,
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let (second, problems) = advertisements(std::slice::from_ref(&broken), &ps, &mut last);
        assert_eq!(second, first, "the last good form stays in force");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].object == "L2Advertisement/l2"
                && problems[0].message.contains("spec.nodeSelectors[0]"),
            "{}",
            problems[0]
        );
        // Never valid: ignored, and said so.
        let mut fresh = BTreeMap::new();
        let (none, problems) = advertisements(&[broken], &ps, &mut fresh);
        assert!(none.is_empty());
        assert!(problems[0].message.contains("ignored"), "{}", problems[0]);
        // Deleted: forgotten.
        let (_, _) = advertisements(&[], &ps, &mut last);
        assert!(last.is_empty());
    }

    #[test]
    fn bad_interface_names_are_refused() {
        let ps = pools(&[]);
        let (ads, problems) = advertisements(
            &[ad(
                "l2",
                L2AdvertisementSpec {
                    interfaces: vec!["eth0".into(), "a-name-far-too-long".into()],
                    ..Default::default()
                },
            )],
            &ps,
            &mut BTreeMap::new(),
        );
        assert!(ads.is_empty());
        assert!(problems[0].message.contains("spec.interfaces[1]"));
    }

    #[test]
    fn ips_get_the_recorded_pool_when_it_holds_them_and_shared_ips_list_both_services() {
        let ps = pools(&[
            pool("a", &["198.18.0.0/24"], &[]),
            pool("b", &["198.18.0.0/28", "2001:db8::/120"], &[]),
        ]);
        let services = [
            svc("one", &["198.18.0.5", "2001:db8::5"], Some("b")),
            svc("two", &["198.18.0.5"], Some("gone")),
            svc("three", &["198.18.9.9"], None),
        ];
        let (all, problems) = announced(&services, &ours(), &ps, &BTreeMap::new());
        let v4 = all
            .iter()
            .find(|a| a.ip.to_string() == "198.18.0.5")
            .unwrap();
        assert_eq!(v4.pool, "b");
        assert_eq!(
            v4.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["one", "two"]
        );
        let v6 = all
            .iter()
            .find(|a| a.ip.to_string() == "2001:db8::5")
            .unwrap();
        assert_eq!(v6.services[0].first_ip.to_string(), "198.18.0.5");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("198.18.9.9"));
        // The annotation naming a pool that does not hold the IP: the first
        // pool that does.
        let (all, _) = announced(
            &[svc("x", &["198.18.0.200"], Some("b"))],
            &ours(),
            &ps,
            &BTreeMap::new(),
        );
        assert_eq!(all[0].pool, "a");
    }

    #[test]
    fn other_classes_are_not_ours() {
        let mut s = svc("x", &["198.18.0.5"], None);
        s.spec.as_mut().unwrap().load_balancer_class = Some("other.io/lb".into());
        let ps = pools(&[pool("a", &["198.18.0.0/24"], &[])]);
        let (all, _) = announced(&[s], &ours(), &ps, &BTreeMap::new());
        assert!(all.is_empty());
    }

    #[test]
    fn serving_nodes_count_ready_and_serving_terminating_endpoints() {
        let ep = |node: &str, ready: bool, serving: bool, terminating: bool| Endpoint {
            addresses: vec!["198.18.128.2".into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            ..Default::default()
        };
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                ep("n1", true, true, false),
                ep("n2", false, true, true),
                ep("n3", false, false, false),
                ep("n4", false, false, true),
            ],
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            ports: None,
        };
        let got = serving_nodes(&[slice]);
        assert_eq!(
            got[&("default".to_string(), "web".to_string())],
            ["n1".to_string(), "n2".to_string()].into()
        );
    }

    #[test]
    fn node_facts_read_conditions_cordon_and_internal_ips() {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus as S};
        let cond = |t: &str, s: &str| NodeCondition {
            type_: t.into(),
            status: s.into(),
            ..Default::default()
        };
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(true),
                ..Default::default()
            }),
            status: Some(S {
                conditions: Some(vec![
                    cond("Ready", "True"),
                    cond("NetworkUnavailable", "False"),
                ]),
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "198.18.0.11".into(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "n1".into(),
                    },
                ]),
                ..Default::default()
            }),
        };
        let got = nodes(&[node]);
        let n = &got["n1"];
        assert!(n.ready && n.unschedulable && !n.facts.network_unavailable);
        assert_eq!(n.internal_ips, ["198.18.0.11".parse::<IpAddr>().unwrap()]);
    }
}
