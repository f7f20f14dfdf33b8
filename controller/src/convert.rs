//! Kubernetes objects to allocator input. Every refusal names the object's
//! field, so the message can go straight into a condition or an Event.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_crds::annotations::{
    ADDRESS_POOL_ALIASES, ALLOW_SHARED_IP_ALIASES, IP_ALLOCATED_FROM_POOL,
    LOAD_BALANCER_IPS_ALIASES,
};
use ferrolb_crds::{IPAddressPool, parse_addresses};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};

use crate::plan::SERVICE_CONDITION;

use crate::allocator::{
    Allocation, Family, FamilyPolicy, Labels, Pool, Port, Selector, ServiceKey, ServiceRequest,
};

pub use ferrolb_crds::class::ClassFilter;

/// One Service as a reconcile pass sees it, converted once at the edge: who
/// it is, what it asks for, and what its status and annotation hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub key: ServiceKey,
    pub uid: Option<String>,
    pub created: Option<Time>,
    /// `type: LoadBalancer` of this controller's class.
    pub ours: bool,
    pub load_balancer: bool,
    /// What it asks for. When part of the Service cannot be understood
    /// (`problem`), that part is left out, so the IPs it already holds can
    /// still be kept and reserved.
    pub request: ServiceRequest,
    /// Why the Service's request is invalid, naming the field.
    pub problem: Option<String>,
    /// The IPs `status.loadBalancer.ingress` holds (hostnames ignored).
    pub status_ips: Vec<IpAddr>,
    /// `ferrolb.io/ip-allocated-from-pool`.
    pub pool_annotation: Option<String>,
    /// Our condition, as the status holds it.
    pub condition: Option<Condition>,
}

impl ServiceView {
    pub fn new(svc: &Service, namespace_labels: &Labels, filter: &ClassFilter) -> Self {
        let status_ips = status_ips(svc);
        let (request, problem) = service_request(svc, namespace_labels, &status_ips);
        Self {
            key: ServiceKey::of(svc),
            uid: svc.metadata.uid.clone(),
            created: svc.metadata.creation_timestamp.clone(),
            ours: filter.is_ours(svc),
            load_balancer: svc.spec.as_ref().and_then(|s| s.type_.as_deref())
                == Some("LoadBalancer"),
            request,
            problem,
            status_ips,
            pool_annotation: svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IP_ALLOCATED_FROM_POOL).cloned()),
            condition: svc
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == SERVICE_CONDITION).cloned()),
        }
    }
}

/// The IPs `status.loadBalancer.ingress` holds (hostnames ignored).
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the allocator's view of a Service we serve, and the first problem
/// found in it. A part that cannot be understood is left out of the
/// request: unknown `spec.ipFamilies` fall back to the families the status
/// holds; unparsable requested IPs are dropped.
pub fn service_request(
    svc: &Service,
    namespace_labels: &Labels,
    status_ips: &[IpAddr],
) -> (ServiceRequest, Option<String>) {
    let spec = svc.spec.clone().unwrap_or_default();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let mut problem: Option<String> = None;
    let mut note = |p: String| {
        problem.get_or_insert(p);
    };

    let parsed: Result<Vec<Family>, String> = match spec.ip_families.as_deref() {
        Some(list) if !list.is_empty() => list
            .iter()
            .map(|f| match f.as_str() {
                "IPv4" => Ok(Family::V4),
                "IPv6" => Ok(Family::V6),
                other => Err(format!("spec.ipFamilies: unknown family {other:?}")),
            })
            .collect(),
        // Older API servers may omit it; the cluster default is IPv4.
        _ => Ok(vec![Family::V4]),
    };
    let families = parsed.unwrap_or_else(|e| {
        note(e);
        let mut held: Vec<Family> = Vec::new();
        for f in status_ips.iter().map(|ip| Family::of(*ip)) {
            if !held.contains(&f) {
                held.push(f);
            }
        }
        if held.is_empty() {
            vec![Family::V4]
        } else {
            held
        }
    });
    let policy = match spec.ip_family_policy.as_deref() {
        Some("PreferDualStack") => FamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => FamilyPolicy::RequireDualStack,
        _ => FamilyPolicy::SingleStack,
    };

    let requested_ips = requested_ips(&annotations, spec.load_balancer_ip.as_deref())
        .unwrap_or_else(|e| {
            note(e);
            Vec::new()
        });

    let ports = spec
        .ports
        .unwrap_or_default()
        .iter()
        .map(|p| Port {
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port: u16::try_from(p.port).unwrap_or(0),
        })
        .collect();
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let backend_key = if local {
        spec.selector
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        String::new()
    };

    let request = ServiceRequest {
        key: ServiceKey::of(svc),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
        families,
        policy,
        ports,
        sharing_key: ALLOW_SHARED_IP_ALIASES
            .lookup(&annotations)
            .map(|(_, v)| v.to_string()),
        backend_key,
        requested_ips,
        requested_pool: ADDRESS_POOL_ALIASES
            .lookup(&annotations)
            .map(|(_, v)| v.to_string()),
    };
    (request, problem)
}

/// IPs asked for by annotation (ours first, then MetalLB's) or by
/// `spec.loadBalancerIP`; asking both ways is an error.
fn requested_ips(
    annotations: &BTreeMap<String, String>,
    spec_ip: Option<&str>,
) -> Result<Vec<IpAddr>, String> {
    let spec_ip = spec_ip.filter(|s| !s.is_empty());
    if let Some((name, value)) = LOAD_BALANCER_IPS_ALIASES.lookup(annotations) {
        if spec_ip.is_some() {
            return Err(format!(
                "both spec.loadBalancerIP and annotation {name} ask for IPs; use only the annotation"
            ));
        }
        return value
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|part| {
                part.parse()
                    .map_err(|_| format!("annotation {name}: {part:?} is not an IP address"))
            })
            .collect();
    }
    match spec_ip {
        Some(ip) => ip
            .parse()
            .map(|ip| vec![ip])
            .map_err(|_| format!("spec.loadBalancerIP: {ip:?} is not an IP address")),
        None => Ok(Vec::new()),
    }
}

/// Builds the allocator's view of a pool; the error names the bad field.
pub fn pool(obj: &IPAddressPool) -> Result<Pool, String> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ranges = parse_addresses(&obj.spec.addresses).map_err(|e| e.to_string())?;
    let allocation = match &obj.spec.service_allocation {
        None => None,
        Some(sa) => Some(Allocation {
            priority: sa.priority,
            namespaces: sa.namespaces.clone(),
            namespace_selectors: selectors(
                &sa.namespace_selectors,
                "spec.serviceAllocation.namespaceSelectors",
            )?,
            service_selectors: selectors(
                &sa.service_selectors,
                "spec.serviceAllocation.serviceSelectors",
            )?,
        }),
    };
    Ok(Pool {
        name,
        ranges,
        auto_assign: obj.spec.auto_assign,
        avoid_buggy_ips: obj.spec.avoid_buggy_ips,
        allocation,
    })
}

fn selectors(list: &[LabelSelector], field: &str) -> Result<Vec<Selector>, String> {
    ferrolb_crds::selector::from_label_selectors(list, field).map_err(|e| e.to_string())
}

/// A `metav1.LabelSelector` as plain data; the error is a field suffix.
pub fn selector(sel: &LabelSelector) -> Result<Selector, String> {
    ferrolb_crds::selector::from_label_selector(sel).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    /// The request, or the problem found in it.
    fn parse(svc: &Service) -> Result<ServiceRequest, String> {
        match service_request(svc, &Labels::new(), &[]) {
            (r, None) => Ok(r),
            (_, Some(p)) => Err(p),
        }
    }

    fn lb(annotations: &[(&str, &str)], spec: ServiceSpec) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("web".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..spec
            }),
            status: None,
        }
    }

    #[test]
    fn class_filter() {
        let ours = ClassFilter {
            class: "ferrolb.io/lb".into(),
            classless: true,
        };
        let mut svc = lb(&[], ServiceSpec::default());
        assert!(ours.is_ours(&svc));
        assert!(
            !ClassFilter {
                classless: false,
                ..ours.clone()
            }
            .is_ours(&svc)
        );
        svc.spec.as_mut().unwrap().load_balancer_class = Some("other.io/lb".into());
        assert!(!ours.is_ours(&svc));
        svc.spec.as_mut().unwrap().load_balancer_class = Some("ferrolb.io/lb".into());
        assert!(ours.is_ours(&svc));
        svc.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(!ours.is_ours(&svc));
    }

    #[test]
    fn our_annotations_win_and_metallb_ones_are_read() {
        let svc = lb(
            &[
                ("metallb.universe.tf/address-pool", "old"),
                ("metallb.io/allow-shared-ip", "k"),
            ],
            ServiceSpec::default(),
        );
        let r = parse(&svc).unwrap();
        assert_eq!(r.requested_pool.as_deref(), Some("old"));
        assert_eq!(r.sharing_key.as_deref(), Some("k"));
        let svc = lb(
            &[
                ("metallb.io/address-pool", "theirs"),
                ("ferrolb.io/address-pool", "ours"),
            ],
            ServiceSpec::default(),
        );
        assert_eq!(parse(&svc).unwrap().requested_pool.as_deref(), Some("ours"));
    }

    #[test]
    fn requested_ips_both_ways_is_an_error_naming_both() {
        let svc = lb(
            &[("ferrolb.io/loadBalancerIPs", "198.18.8.1")],
            ServiceSpec {
                load_balancer_ip: Some("198.18.8.2".into()),
                ..Default::default()
            },
        );
        let e = parse(&svc).unwrap_err();
        assert!(
            e.contains("spec.loadBalancerIP") && e.contains("ferrolb.io/loadBalancerIPs"),
            "{e}"
        );
    }

    #[test]
    fn requested_ips_parse_and_bad_ones_name_the_annotation() {
        let svc = lb(
            &[("metallb.io/loadBalancerIPs", "198.18.8.1, 2001:db8::8:1")],
            ServiceSpec::default(),
        );
        assert_eq!(parse(&svc).unwrap().requested_ips.len(), 2);
        let svc = lb(
            &[("ferrolb.io/loadBalancerIPs", "198.18.8.x")],
            ServiceSpec::default(),
        );
        let e = parse(&svc).unwrap_err();
        assert!(
            e.contains("ferrolb.io/loadBalancerIPs") && e.contains("198.18.8.x"),
            "{e}"
        );
        let svc = lb(
            &[],
            ServiceSpec {
                load_balancer_ip: Some("198.18.8.3".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            parse(&svc).unwrap().requested_ips,
            vec!["198.18.8.3".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn local_policy_makes_the_selector_the_backend_key() {
        let spec = ServiceSpec {
            external_traffic_policy: Some("Local".into()),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 443,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ip_families: Some(vec!["IPv6".into(), "IPv4".into()]),
            ip_family_policy: Some("RequireDualStack".into()),
            ..Default::default()
        };
        let r = parse(&lb(&[], spec)).unwrap();
        assert_eq!(r.backend_key, "app=web");
        assert_eq!(r.families, vec![Family::V6, Family::V4]);
        assert_eq!(r.policy, FamilyPolicy::RequireDualStack);
        assert_eq!(
            r.ports,
            vec![Port {
                protocol: "TCP".into(),
                port: 443
            }]
        );
    }

    #[test]
    fn pool_errors_name_the_field() {
        let mut p = IPAddressPool::new(
            "p",
            ferrolb_crds::IPAddressPoolSpec {
                addresses: vec!["198.18.8.0/24".into(), "bad".into()],
                auto_assign: true,
                avoid_buggy_ips: false,
                service_allocation: None,
            },
        );
        assert!(pool(&p).unwrap_err().starts_with("spec.addresses[1]"));
        p.spec.addresses.pop();
        p.spec.service_allocation = Some(ferrolb_crds::ServiceAllocation {
            service_selectors: vec![LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "a".into(),
                        operator: "Maybe".into(),
                        values: None,
                    },
                ]),
                match_labels: None,
            }],
            ..Default::default()
        });
        let e = pool(&p).unwrap_err();
        assert_eq!(
            e,
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].operator: unknown operator \"Maybe\""
        );
    }
}
