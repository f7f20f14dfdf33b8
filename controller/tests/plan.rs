//! Reconcile passes on in-memory objects: the plan a pass produces is
//! applied back to the objects, as the API server would, and the next pass
//! must be quiet.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ferrolb_controller::convert::ClassFilter;
use ferrolb_controller::plan::{Index, Inputs, Plan, SERVICE_CONDITION, Severity};
use ferrolb_crds::annotations::IP_ALLOCATED_FROM_POOL;
use ferrolb_crds::{IPAddressPool, IPAddressPoolSpec};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;

fn pool(name: &str, addresses: &[&str]) -> Arc<IPAddressPool> {
    Arc::new(IPAddressPool::new(
        name,
        IPAddressPoolSpec {
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            service_allocation: None,
        },
    ))
}

fn lb(name: &str, age: i64) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some(name.into()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
            )),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// `status.loadBalancer` holding `ips`.
fn lb_status<T: ToString>(ips: &[T]) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: Some(
            ips.iter()
                .map(|ip| LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn with_status(mut svc: Service, ips: &[&str]) -> Service {
    svc.status = Some(ServiceStatus {
        load_balancer: Some(lb_status(ips)),
        conditions: None,
    });
    svc
}

struct World {
    index: Index,
    pools: Vec<Arc<IPAddressPool>>,
    services: Vec<Service>,
}

impl World {
    fn new(pools: Vec<Arc<IPAddressPool>>, services: Vec<Service>) -> Self {
        let filter = ClassFilter {
            class: "ferrolb.io/lb".into(),
            classless: true,
        };
        Self {
            index: Index::new(filter),
            pools,
            services,
        }
    }

    /// One pass, with its writes applied to the objects.
    fn pass(&mut self) -> Plan {
        let services: Vec<Arc<Service>> = self.services.iter().cloned().map(Arc::new).collect();
        let namespaces = BTreeMap::new();
        let plan = self.index.pass(&Inputs {
            pools: &self.pools,
            services: &services,
            namespaces: &namespaces,
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        });
        for write in &plan.services {
            let svc = self
                .services
                .iter_mut()
                .find(|s| s.metadata.name.as_deref() == Some(write.key.name.as_str()))
                .expect("write for a known service");
            let status = svc.status.get_or_insert_with(Default::default);
            if let Some(ips) = &write.ingress {
                status.load_balancer = Some(lb_status(ips));
            }
            if let Some(ours) = &write.condition {
                // As server-side apply does: only our entry changes.
                let conditions = status.conditions.get_or_insert_with(Vec::new);
                conditions.retain(|c| c.type_ != SERVICE_CONDITION);
                conditions.extend(ours.clone());
            }
            if let Some(value) = &write.pool_annotation {
                let annotations = svc
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default);
                match value {
                    Some(v) => annotations.insert(IP_ALLOCATED_FROM_POOL.into(), v.clone()),
                    None => annotations.remove(IP_ALLOCATED_FROM_POOL),
                };
            }
        }
        for write in &plan.pools {
            let i = self
                .pools
                .iter()
                .position(|p| p.metadata.name.as_deref() == Some(&write.name))
                .unwrap();
            let mut p = (*self.pools[i]).clone();
            p.status = Some(write.status.clone());
            self.pools[i] = Arc::new(p);
        }
        plan
    }

    fn ips(&self, name: &str) -> Vec<IpAddr> {
        let svc = self
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap();
        ferrolb_controller::convert::status_ips(svc)
    }

    fn condition(&self, name: &str) -> Option<(String, String, String)> {
        let svc = self
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap();
        svc.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == SERVICE_CONDITION)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_new_service_gets_an_ip_with_annotation_condition_and_event_then_passes_are_quiet() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    let plan = w.pass();
    assert_eq!(w.ips("web"), vec![ip("198.18.8.0")]);
    assert_eq!(plan.events.len(), 1);
    assert_eq!(
        (plan.events[0].reason, plan.events[0].severity),
        ("IPAllocated", Severity::Normal)
    );
    assert!(plan.events[0].message.contains("198.18.8.0") && plan.events[0].message.contains("p"));
    let svc = &w.services[0];
    assert_eq!(
        svc.metadata.annotations.as_ref().unwrap()[IP_ALLOCATED_FROM_POOL],
        "p"
    );
    assert_eq!(w.condition("web").unwrap().0, "True");
    let status = w.pools[0].status.clone().unwrap();
    assert_eq!((status.assigned_ipv4, status.available_ipv4), (1, 255));
    let again = w.pass();
    assert!(
        again.services.is_empty() && again.events.is_empty() && again.pools.is_empty(),
        "{again:?}"
    );
}

#[test]
fn a_restart_keeps_every_ip_from_status_before_allocating_new_ones() {
    let services = vec![
        lb("new-first-by-age", 0),
        with_status(lb("a", 1), &["198.18.8.0"]),
        with_status(lb("b", 2), &["198.18.8.7"]),
    ];
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], services);
    let plan = w.pass();
    assert_eq!(w.ips("a"), vec![ip("198.18.8.0")]);
    assert_eq!(w.ips("b"), vec![ip("198.18.8.7")]);
    assert_eq!(
        w.ips("new-first-by-age"),
        vec![ip("198.18.8.1")],
        "older IPs were restored first"
    );
    let ingress_writes = plan.services.iter().filter(|s| s.ingress.is_some()).count();
    assert_eq!(ingress_writes, 1, "only the new Service's status changed");
}

#[test]
fn an_invalid_pool_edit_takes_no_ip_away_and_says_which_entry() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    w.pass();
    w.pools = vec![pool("p", &["198.18.9.0/24", "198.18.9.9-198.18.9.1"])];
    let plan = w.pass();
    assert!(
        plan.services.iter().all(|s| s.ingress.is_none()),
        "{plan:?}"
    );
    assert_eq!(w.ips("web"), vec![ip("198.18.8.0")]);
    let conditions = w.pools[0].status.clone().unwrap().conditions;
    let invalid = conditions
        .iter()
        .find(|c| c.type_ == "Invalid")
        .expect("Invalid condition");
    assert!(
        invalid.message.starts_with("spec.addresses[1]"),
        "{}",
        invalid.message
    );
    let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
}

#[test]
fn exhaustion_is_reported_once_and_a_freed_ip_goes_to_the_waiting_service() {
    let mut w = World::new(
        vec![pool("p", &["198.18.8.1/32"])],
        vec![lb("first", 0), lb("second", 1)],
    );
    let plan = w.pass();
    assert_eq!(w.ips("first"), vec![ip("198.18.8.1")]);
    assert!(w.ips("second").is_empty());
    let failed: Vec<_> = plan
        .events
        .iter()
        .filter(|e| e.reason == "AllocationFailed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].severity, Severity::Warning);
    assert_eq!(w.condition("second").unwrap().1, "PoolExhausted");
    assert_eq!(plan.failures, vec!["PoolExhausted"]);
    assert!(
        w.pass().events.is_empty(),
        "a refusal is not repeated every pass"
    );
    w.services.remove(0);
    w.pass();
    assert_eq!(w.ips("second"), vec![ip("198.18.8.1")]);
}

#[test]
fn other_classes_are_left_alone() {
    let mut other = lb("other", 0);
    other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/lb".into());
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![other]);
    let plan = w.pass();
    assert!(plan.services.is_empty() && plan.events.is_empty());
}

#[test]
fn a_service_that_stops_being_a_load_balancer_is_released_and_cleared() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    w.pass();
    w.services[0].spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let plan = w.pass();
    assert!(w.ips("web").is_empty());
    assert!(plan.events.iter().any(|e| e.reason == "IPReleased"));
    assert!(
        w.services[0]
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .get(IP_ALLOCATED_FROM_POOL)
            .is_none()
    );
    assert!(w.condition("web").is_none());
    assert_eq!(w.pools[0].status.clone().unwrap().assigned, 0);
    assert!(w.pass().services.is_empty(), "and then stays quiet");
}

#[test]
fn a_bad_annotation_keeps_the_held_ip_and_says_why() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    w.pass();
    w.services[0]
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("ferrolb.io/loadBalancerIPs".into(), "nope".into());
    let plan = w.pass();
    assert_eq!(w.ips("web"), vec![ip("198.18.8.0")]);
    let (status, reason, message) = w.condition("web").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidRequest")
    );
    assert!(message.contains("ferrolb.io/loadBalancerIPs"), "{message}");
    assert!(plan.events.iter().any(|e| e.reason == "AllocationFailed"));
}

#[test]
fn overlapping_pools_get_an_overlaps_condition_naming_the_other() {
    let mut w = World::new(
        vec![
            pool("a", &["198.18.8.0/24"]),
            pool("b", &["198.18.8.128/25"]),
        ],
        vec![],
    );
    w.pass();
    for (me, other) in [("a", "b"), ("b", "a")] {
        let p = w
            .pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(me))
            .unwrap();
        let c = p
            .status
            .clone()
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Overlaps")
            .expect("Overlaps");
        assert!(c.message.contains(&format!("{other:?}")), "{}", c.message);
    }
}

#[test]
fn a_shrunk_pool_moves_only_the_service_outside_it() {
    let gamma = |addresses: &[&str]| {
        let mut p = (*pool("gamma", addresses)).clone();
        p.spec.service_allocation = Some(ferrolb_crds::ServiceAllocation {
            priority: Some(1),
            namespaces: vec!["default".into()],
            ..Default::default()
        });
        Arc::new(p)
    };
    let mut w = World::new(
        vec![
            pool("alpha", &["198.18.8.0/28"]),
            gamma(&["198.18.11.0/29"]),
        ],
        vec![lb("e1", 0), lb("e2", 1), lb("e3", 2)],
    );
    w.pass();
    assert_eq!(w.ips("e3"), vec![ip("198.18.11.2")]);
    w.pools[1] = gamma(&["198.18.11.0/31", "198.18.11.100/32"]);
    let plan = w.pass();
    assert_eq!(w.ips("e1"), vec![ip("198.18.11.0")]);
    assert_eq!(w.ips("e3"), vec![ip("198.18.11.100")], "{plan:?}");
    assert!(
        plan.events
            .iter()
            .any(|e| e.message.contains("replacing 198.18.11.2")),
        "{:?}",
        plan.events
    );
}

// ---- issue 7 reproductions ----

impl World {
    /// A restart or leader change: a fresh index, the same objects.
    fn restart(&mut self) {
        let filter = ClassFilter {
            class: "ferrolb.io/lb".into(),
            classless: true,
        };
        self.index = Index::new(filter);
    }

    fn annotate(&mut self, name: &str, key: &str, value: &str) {
        let svc = self
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap();
        svc.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
    }
}

fn restricted(name: &str, addresses: &[&str], namespaces: &[&str]) -> Arc<IPAddressPool> {
    let mut p = (*pool(name, addresses)).clone();
    p.spec.service_allocation = Some(ferrolb_crds::ServiceAllocation {
        priority: Some(1),
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    Arc::new(p)
}

#[test]
fn a_bad_annotation_keeps_the_held_ip_across_a_restart_and_it_stays_reserved() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    w.pass();
    w.annotate("web", "ferrolb.io/loadBalancerIPs", "nope");
    w.pass();
    w.restart();
    let mut thief = lb("thief", 1);
    thief
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("ferrolb.io/loadBalancerIPs".into(), "198.18.8.0".into());
    w.services.push(thief);
    w.pass();
    assert_eq!(
        w.ips("web"),
        vec![ip("198.18.8.0")],
        "the restart took the IP away"
    );
    assert!(
        w.ips("thief").is_empty(),
        "the held IP was handed to another Service"
    );
    assert_eq!(w.condition("thief").unwrap().1, "IPInUse");
    assert_eq!(w.condition("web").unwrap().1, "InvalidRequest");
}

#[test]
fn a_refusal_is_counted_once_not_every_pass() {
    let mut w = World::new(
        vec![pool("p", &["198.18.8.1/32"])],
        vec![lb("first", 0), lb("second", 1)],
    );
    let first = w.pass();
    assert_eq!(first.failures, vec!["PoolExhausted"]);
    assert_eq!(first.pending, 1, "one Service waits for an IP");
    let second = w.pass();
    assert!(
        second.failures.is_empty(),
        "counted again on the second pass"
    );
    assert_eq!(second.pending, 1, "and still waits");
    assert!(w.pass().failures.is_empty());
    w.services.remove(0);
    assert_eq!(
        w.pass().pending,
        0,
        "the freed IP went to the waiting Service"
    );
}

#[test]
fn a_service_its_pool_no_longer_admits_moves_to_one_that_does() {
    let mut w = World::new(
        vec![
            restricted("team", &["198.18.10.0/29"], &["default"]),
            pool("shared", &["198.18.8.0/24"]),
        ],
        vec![lb("web", 0)],
    );
    w.pass();
    assert_eq!(w.ips("web"), vec![ip("198.18.10.0")]);
    w.pools[0] = restricted("team", &["198.18.10.0/29"], &["elsewhere"]);
    let plan = w.pass();
    assert_eq!(w.ips("web"), vec![ip("198.18.8.0")], "{plan:?}");
    assert!(
        plan.events.iter().any(|e| e.reason == "IPAllocated"
            && e.message.contains("replacing 198.18.10.0")
            && e.message.contains("does not serve")),
        "{:?}",
        plan.events
    );
}

#[test]
fn a_service_no_pool_admits_keeps_its_ip_and_says_so_also_after_a_restart() {
    let mut w = World::new(
        vec![restricted("team", &["198.18.10.0/29"], &["default"])],
        vec![lb("web", 0)],
    );
    w.pass();
    w.pools[0] = restricted("team", &["198.18.10.0/29"], &["elsewhere"]);
    let plan = w.pass();
    assert_eq!(
        w.ips("web"),
        vec![ip("198.18.10.0")],
        "a label edit caused an outage"
    );
    let (status, reason, message) = w.condition("web").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "PoolNotEligible")
    );
    assert!(message.contains("team"), "{message}");
    assert!(
        plan.events
            .iter()
            .any(|e| e.severity == Severity::Warning && e.message.contains("team")),
        "{:?}",
        plan.events
    );
    w.restart();
    w.pass();
    assert_eq!(w.ips("web"), vec![ip("198.18.10.0")]);
}

#[test]
fn an_edit_of_our_condition_or_annotation_is_repaired() {
    let mut w = World::new(vec![pool("p", &["198.18.8.0/24"])], vec![lb("web", 0)]);
    w.pass();
    let svc = &mut w.services[0];
    for c in svc.status.as_mut().unwrap().conditions.as_mut().unwrap() {
        if c.type_ == SERVICE_CONDITION {
            c.status = "False".into();
            c.reason = "Tampered".into();
        }
    }
    svc.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(IP_ALLOCATED_FROM_POOL.into(), "elsewhere".into());
    let plan = w.pass();
    assert_eq!(plan.services.len(), 1, "{plan:?}");
    assert_eq!(w.condition("web").unwrap().1, "Allocated");
    assert_eq!(
        w.services[0].metadata.annotations.as_ref().unwrap()[IP_ALLOCATED_FROM_POOL],
        "p"
    );
    assert!(w.pass().services.is_empty(), "and then stays quiet");
}
