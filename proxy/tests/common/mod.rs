//! Builders of Services, EndpointSlices and the node, and a one-call
//! render, shared by the proxy's tests.
#![allow(dead_code)]

use std::collections::BTreeSet;

use ferrolb_proxy::model::{self, NodeFacts, NodePortAddresses, ServicePort};
use ferrolb_proxy::render::{self, Config, Inputs, Rendered};
use ferrolb_proxy::ruleset::Family;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{Value, json};

pub fn config() -> Config {
    Config {
        table: "ferrolb-proxy".into(),
        masquerade_bit: 1 << 14,
        masquerade_all: false,
        cluster_cidrs: vec![
            "198.19.0.0/16".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ],
        nodeport_addresses: NodePortAddresses::Primary,
    }
}

pub fn node() -> NodeFacts {
    NodeFacts {
        name: "node-1".into(),
        zone: None,
        addresses: vec![
            "198.18.0.11".parse().unwrap(),
            "2001:db8::11".parse().unwrap(),
        ],
        pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
    }
}

/// A Service from a JSON spec (and optional status), in namespace `ns`.
pub fn service(ns: &str, name: &str, spec: Value, status: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

/// A ClusterIP Service with one TCP port 80 named "http".
pub fn cluster_ip(name: &str, ip: &str) -> Service {
    service(
        "default",
        name,
        json!({"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}),
        json!({}),
    )
}

/// An endpoint: (address, node, ready, serving, terminating).
pub type Ep<'a> = (&'a str, &'a str, bool, bool, bool);

pub fn ready<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
    (addr, node, true, true, false)
}

/// An EndpointSlice of Service `svc` with one port (name, number, proto).
pub fn slice(
    ns: &str,
    svc: &str,
    family: &str,
    port: (&str, u16, &str),
    eps: &[Ep<'_>],
) -> EndpointSlice {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(addr, node, ready, serving, terminating)| {
            json!({"addresses": [addr], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": format!("{svc}-{}", family.to_lowercase()),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": port.0, "port": port.1, "protocol": port.2}],
    }))
    .unwrap()
}

/// Renders `family` for these objects on `node()` with `config()`.
pub fn render_with(
    cfg: &Config,
    family: Family,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Rendered {
    let ports: Vec<ServicePort> = services.iter().flat_map(model::service_ports).collect();
    let eps = model::endpoints(slices.iter(), family, &node().name);
    let cidrs = vec![
        "198.18.64.0/18".parse().unwrap(),
        "2001:db8:2::/112".parse().unwrap(),
    ];
    render::render(
        family,
        cfg,
        &Inputs {
            ports: &ports,
            endpoints: &eps,
            node: &node(),
            service_cidrs: &cidrs,
        },
    )
}

pub fn render(family: Family, services: &[Service], slices: &[EndpointSlice]) -> Rendered {
    render_with(&config(), family, services, slices)
}

/// A cluster for property tests: per Service (id, extra ports, endpoints,
/// LoadBalancer, eTP Local, affinity, UDP).
pub type World = Vec<(u8, u8, u8, bool, bool, bool, bool)>;

/// A random cluster: Services with 1..4 ports and 0..6 endpoints each,
/// some with policies and affinity.
pub fn world() -> impl Strategy<Value = World> {
    proptest::collection::vec(
        (
            0u8..12,
            0u8..4,
            0u8..7,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        0..12,
    )
}

pub fn objects(
    w: &World,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut seen = BTreeSet::new();
    for (id, ports, eps, lb, local, affinity, udp) in w {
        if !seen.insert(*id) {
            continue;
        }
        let name = format!("s{id}");
        let ip = format!("198.18.64.{}", 10 + id);
        let proto = if *udp { "UDP" } else { "TCP" };
        let port_list: Vec<serde_json::Value> = (0..=*ports)
            .map(|p| json!({"name": format!("p{p}"), "port": 80 + u16::from(p), "protocol": proto, "nodePort": 30000 + u16::from(*id) * 10 + u16::from(p)}))
            .collect();
        let mut spec = json!({"type": if *lb {"LoadBalancer"} else {"NodePort"}, "clusterIP": ip, "clusterIPs": [ip], "ports": port_list});
        if *local {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        if *affinity {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        // Every third Service claims the same external IP: the same
        // frontends, claimed twice.
        if id % 3 == 0 {
            spec["externalIPs"] = json!(["198.18.9.1"]);
        }
        let status = if *lb {
            json!({"loadBalancer": {"ingress": [{"ip": format!("198.18.8.{id}")}]}})
        } else {
            json!({})
        };
        services.push(service("default", &name, spec, status));
        for p in 0..=*ports {
            let endpoints: Vec<(String, &str)> = (0..*eps)
                .map(|e| {
                    (
                        format!("198.19.{}.{}", 1 + e % 2, 10 + e),
                        if e % 2 == 0 { "node-1" } else { "node-2" },
                    )
                })
                .collect();
            let list: Vec<Ep<'_>> = endpoints
                .iter()
                .map(|(a, n)| (a.as_str(), *n, true, true, false))
                .collect();
            let mut s = slice(
                "default",
                &name,
                "IPv4",
                (&format!("p{p}"), 8080 + u16::from(p), proto),
                &list,
            );
            s.metadata.name = Some(format!("{name}-p{p}"));
            slices.push(s);
        }
    }
    (services, slices)
}
