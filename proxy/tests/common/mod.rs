//! Builders of Services, EndpointSlices and the node, and a one-call
//! render, shared by the proxy's tests.
#![allow(dead_code)]

use ferrolb_proxy::model::{self, NodeFacts, NodePortAddresses, ServicePort};
use ferrolb_proxy::render::{self, Config, Inputs, Rendered};
use ferrolb_proxy::ruleset::Family;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
