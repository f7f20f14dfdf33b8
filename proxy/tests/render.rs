//! The ruleset per feature, as snapshots of `nft` text (the parts a
//! feature adds to the empty ruleset), plus the properties every render
//! keeps: a diff applied makes the next diff empty, and an update is the
//! same as a rebuild.

mod common;

use common::{World, cluster_ip, node, objects, ready, render, render_with, service, slice, world};
use ferrolb_proxy::diff::{self, Op};
use ferrolb_proxy::ruleset::{Family, Ruleset};
use proptest::prelude::*;
use serde_json::json;

/// The part of `rs` that differs from the ruleset of an empty cluster:
/// sets with elements, and chains that are not the fixed scaffolding.
fn added(rs: &Ruleset) -> String {
    let empty = render(rs.family, &[], &[]).ruleset;
    let mut shown = rs.clone();
    shown
        .sets
        .retain(|name, s| !s.elements.is_empty() || !empty.sets.contains_key(name));
    shown
        .chains
        .retain(|name, c| empty.chains.get(name) != Some(c));
    shown.to_nft()
}

#[test]
fn the_empty_ruleset_is_the_whole_scaffolding() {
    insta::assert_snapshot!("empty_v4", render(Family::V4, &[], &[]).ruleset.to_nft());
}

#[test]
fn cluster_ip_with_endpoints() {
    let svc = cluster_ip("web", "198.18.64.10");
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1"), ready("198.19.2.5", "node-2")],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn no_endpoints_rejects_and_unready_endpoints_are_not_used() {
    let svc = cluster_ip("web", "198.18.64.10");
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[("198.19.1.5", "node-1", false, false, false)],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn nodeport_and_load_balancer_with_cluster_policy() {
    let svc = service(
        "default",
        "web",
        json!({"type": "LoadBalancer", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.18.8.1", "ipMode": "VIP"}, {"ip": "198.18.8.2", "ipMode": "Proxy"}]}}),
    );
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.2.5", "node-2")],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn external_traffic_policy_local() {
    let svc = service(
        "default",
        "web",
        json!({"type": "LoadBalancer", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
               "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.18.8.1"}]}}),
    );
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1"), ready("198.19.2.5", "node-2")],
    );
    let r = render(Family::V4, std::slice::from_ref(&svc), &[eps]);
    insta::assert_snapshot!(added(&r.ruleset));
    let hc = r.health.values().next().copied().expect("a health check");
    assert_eq!((hc.port, hc.local_endpoints), (31000, 1));

    // No local endpoint: outside traffic is dropped, pods and the node
    // still reach the remote one; the health check says 0.
    let remote = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.2.5", "node-2")],
    );
    let r = render(Family::V4, &[svc], &[remote]);
    insta::assert_snapshot!("external_traffic_policy_local_none_here", added(&r.ruleset));
    assert_eq!(r.no_local_external, 1);
    assert_eq!(r.health.values().next().map(|h| h.local_endpoints), Some(0));
}

#[test]
fn internal_traffic_policy_local() {
    let svc = service(
        "default",
        "web",
        json!({"type": "ClusterIP", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
               "internalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
        json!({}),
    );
    let here = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1"), ready("198.19.2.5", "node-2")],
    );
    insta::assert_snapshot!(added(
        &render(Family::V4, std::slice::from_ref(&svc), &[here]).ruleset
    ));
    let elsewhere = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.2.5", "node-2")],
    );
    let r = render(Family::V4, &[svc], &[elsewhere]);
    assert_eq!(r.no_local_internal, 1);
    insta::assert_snapshot!("internal_traffic_policy_local_none_here", added(&r.ruleset));
}

#[test]
fn terminating_endpoints_are_a_fallback() {
    let svc = cluster_ip("web", "198.18.64.10");
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[
            ("198.19.1.5", "node-1", false, true, true),
            ("198.19.2.5", "node-2", false, false, true),
        ],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn session_affinity_client_ip() {
    let svc = service(
        "default",
        "web",
        json!({"type": "NodePort", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
               "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        json!({}),
    );
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1"), ready("198.19.2.5", "node-2")],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn load_balancer_source_ranges_guard_only_lb_ips() {
    let svc = service(
        "default",
        "web",
        json!({"type": "LoadBalancer", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10"],
               "loadBalancerSourceRanges": ["198.18.0.100/32", " 10.0.0.0/8", "2001:db8::/64"],
               "externalIPs": ["198.18.9.9"],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.18.8.1"}]}}),
    );
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1")],
    );
    insta::assert_snapshot!(added(&render(Family::V4, &[svc], &[eps]).ruleset));
}

#[test]
fn multiple_ports_udp_and_sctp_and_named_target_ports() {
    let svc = service(
        "default",
        "dns",
        json!({"type": "ClusterIP", "clusterIP": "198.18.64.53", "clusterIPs": ["198.18.64.53"],
               "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                         {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
                         {"name": "sig", "port": 3868, "protocol": "SCTP"}]}),
        json!({}),
    );
    let slices = [
        slice(
            "default",
            "dns",
            "IPv4",
            ("dns", 5353, "UDP"),
            &[ready("198.19.1.7", "node-1")],
        ),
        slice(
            "default",
            "dns",
            "IPv4",
            ("dns-tcp", 5354, "TCP"),
            &[ready("198.19.1.7", "node-1")],
        ),
    ];
    let r = render(Family::V4, &[svc], &slices);
    insta::assert_snapshot!(added(&r.ruleset));
    assert_eq!(r.udp.len(), 1, "one UDP port for conntrack cleanup");
}

#[test]
fn dual_stack_renders_each_family_in_its_table() {
    let svc = service(
        "default",
        "web",
        json!({"type": "ClusterIP", "clusterIP": "198.18.64.10", "clusterIPs": ["198.18.64.10", "2001:db8:2::10"],
               "ipFamilies": ["IPv4", "IPv6"],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
        json!({}),
    );
    let slices = [
        slice(
            "default",
            "web",
            "IPv4",
            ("http", 8080, "TCP"),
            &[ready("198.19.1.5", "node-1")],
        ),
        slice(
            "default",
            "web",
            "IPv6",
            ("http", 8080, "TCP"),
            &[ready("2001:db8:1:1::5", "node-1")],
        ),
    ];
    let v6 = render(Family::V6, std::slice::from_ref(&svc), &slices).ruleset;
    insta::assert_snapshot!(added(&v6));
    let v4 = render(Family::V4, &[svc], &slices).ruleset;
    assert!(
        !v4.to_nft().contains("2001:db8"),
        "no IPv6 in the IPv4 table"
    );
}

#[test]
fn services_kube_proxy_ignores_add_nothing() {
    let empty = render(Family::V4, &[], &[]).ruleset;
    let headless = service(
        "default",
        "h",
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        json!({}),
    );
    let external = service(
        "default",
        "e",
        json!({"type": "ExternalName", "externalName": "example.com", "clusterIP": "198.18.64.9", "ports": [{"port": 80}]}),
        json!({}),
    );
    let mut labelled = cluster_ip("l", "198.18.64.11");
    labelled.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_string(),
            "other".to_string(),
        )]
        .into(),
    );
    let mut marked = cluster_ip("m", "198.18.64.12");
    marked.metadata.labels =
        Some([("service.kubernetes.io/headless".to_string(), String::new())].into());
    let r = render(Family::V4, &[headless, external, labelled, marked], &[]);
    assert_eq!(r.ruleset, empty);
}

#[test]
fn masquerade_all_masquerades_cluster_ips_from_pods_too() {
    let mut cfg = common::config();
    cfg.masquerade_all = true;
    let svc = cluster_ip("web", "198.18.64.10");
    let eps = slice(
        "default",
        "web",
        "IPv4",
        ("http", 8080, "TCP"),
        &[ready("198.19.1.5", "node-1")],
    );
    let rs = render_with(&cfg, Family::V4, &[svc], &[eps]).ruleset;
    let always = &rs.sets["masq-always"].elements;
    assert_eq!(always.len(), 1);
    assert!(rs.sets["masq-outside"].elements.is_empty());
}

#[test]
fn the_mark_bit_leaves_other_bits_alone() {
    let mut cfg = common::config();
    cfg.masquerade_bit = 1 << 3;
    let text = render_with(&cfg, Family::V4, &[], &[]).ruleset.to_nft();
    assert!(
        text.contains("meta mark set meta mark | 0x00000008"),
        "{text}"
    );
    assert!(
        text.contains("meta mark set meta mark ^ 0x00000008"),
        "{text}"
    );
}

// ---- properties: diff and apply ----

fn rendered(w: &World) -> Ruleset {
    let (services, slices) = objects(w);
    render(Family::V4, &services, &slices).ruleset
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn an_applied_diff_reaches_the_desired_ruleset_and_the_next_diff_is_empty(a in world(), b in world()) {
        let old = rendered(&a);
        let new = rendered(&b);
        let mut live = Ruleset::new(Family::V4, "ferrolb-proxy");
        diff::apply(&mut live, &diff::full(&old));
        prop_assert_eq!(&live, &old, "a full build reproduces the ruleset");
        let ops = diff::diff(&old, &new).expect("the layout never changes shape");
        diff::apply(&mut live, &ops);
        prop_assert_eq!(&live, &new);
        prop_assert_eq!(diff::diff(&live, &new), Some(Vec::new()));
    }

    #[test]
    fn a_partial_update_touches_only_what_changed(a in world()) {
        let base = rendered(&a);
        prop_assert_eq!(diff::diff(&base, &base), Some(Vec::new()));
        // One more Service: no flush of a chain that existed, no table replace.
        let mut more = a.clone();
        more.push((200, 0, 2, false, false, false, false));
        let grown = rendered(&more);
        let ops = diff::diff(&base, &grown).expect("partial");
        prop_assert!(!ops.iter().any(|o| matches!(o, Op::ReplaceTable)));
        prop_assert!(!ops.iter().any(|o| matches!(o, Op::FlushChain(c) if base.chains.contains_key(c))), "{:?}", ops);
        prop_assert!(diff::element_changes(&ops) <= 12, "{:?}", ops);
    }

    #[test]
    fn renders_are_deterministic(a in world()) {
        prop_assert_eq!(rendered(&a), rendered(&a));
    }
}

#[test]
fn node_addresses_pick_the_primary_per_family() {
    let n = node();
    use ferrolb_proxy::model::NodePortAddresses;
    assert_eq!(
        NodePortAddresses::Primary
            .select(&n, Family::V6)
            .into_iter()
            .collect::<Vec<_>>(),
        vec!["2001:db8::11".parse::<std::net::IpAddr>().unwrap()]
    );
    let cidrs = NodePortAddresses::Cidrs(vec!["198.18.0.0/20".parse().unwrap()]);
    assert_eq!(cidrs.select(&n, Family::V4).len(), 1);
    assert!(cidrs.select(&n, Family::V6).is_empty());
}
