//! Who announces: fixed sha256 orders worked out with `sha256sum`, the
//! candidate rules, the grouping of shared and dual-stack IPs, the
//! interface choice, and property tests for the invariants the fencing
//! built on top relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_crds::selector::{Labels, Selector};
use ferrolb_speaker::election::{
    Advertisement, Announced, EXCLUDE_LABEL, NodeFacts, ServiceFacts, ballots, eligible,
    interfaces, keys, ranking, winner,
};
use ipnet::IpNet;
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn select(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        requirements: vec![],
    }
}

fn nodes(list: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, NodeFacts> {
    list.iter()
        .map(|(n, l)| {
            (
                n.to_string(),
                NodeFacts {
                    labels: labels(l),
                    network_unavailable: false,
                },
            )
        })
        .collect()
}

fn ad(pools: &[&str]) -> Advertisement {
    Advertisement {
        name: "ad".into(),
        pools: names(pools),
        ..Default::default()
    }
}

fn svc(name: &str, first_ip: &str) -> ServiceFacts {
    ServiceFacts {
        namespace: "default".into(),
        name: name.into(),
        labels: Labels::new(),
        first_ip: ip(first_ip),
        local: false,
        serving_nodes: BTreeSet::new(),
    }
}

fn announced(addr: &str, pool: &str, services: Vec<ServiceFacts>) -> Announced {
    Announced {
        ip: ip(addr),
        pool: pool.into(),
        services,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- fixed orders ----------------------------------------------------------

/// Each order was computed with `printf 'node-N#KEY' | sha256sum` and the
/// digests sorted by hand, e.g. for 198.18.8.5: node-3 19…, node-4 81…,
/// node-2 9e…, node-1 f0….
#[test]
fn ranking_matches_sha256sum() {
    let four = names(&["node-1", "node-2", "node-3", "node-4"]);
    assert_eq!(
        ranking(ip("198.18.8.5"), &four),
        strings(&["node-3", "node-4", "node-2", "node-1"])
    );
    assert_eq!(
        ranking(ip("198.18.8.6"), &four),
        strings(&["node-4", "node-2", "node-1", "node-3"])
    );
    assert_eq!(
        ranking(ip("2001:db8::8:5"), &four),
        strings(&["node-4", "node-1", "node-3", "node-2"])
    );
}

/// The key is hashed as RFC 5952 text, as Go prints it: the longest run of
/// zero groups, the first of equal runs, is the one compressed.
#[test]
fn ipv6_keys_hash_their_rfc_5952_text() {
    let key = ip("2001:db8:0:0:1:0:0:1");
    assert_eq!(key.to_string(), "2001:db8::1:0:0:1");
    // node-3 80…, node-1 c5…, node-2 d6… for "node-N#2001:db8::1:0:0:1".
    assert_eq!(
        ranking(key, &names(&["node-1", "node-2", "node-3"])),
        strings(&["node-3", "node-1", "node-2"])
    );
}

#[test]
fn winner_is_the_first_live_candidate() {
    let r = strings(&["node-3", "node-4", "node-2", "node-1"]);
    assert_eq!(
        winner(&r, &names(&["node-1", "node-2", "node-3"])),
        Some("node-3")
    );
    assert_eq!(winner(&r, &names(&["node-1", "node-2"])), Some("node-2"));
    assert_eq!(winner(&r, &names(&["node-9"])), None);
    assert_eq!(winner(&[], &names(&["node-1"])), None);
}

// ---- candidates ------------------------------------------------------------

#[test]
fn candidates_follow_node_selectors_exclusions_and_conditions() {
    let mut n = nodes(&[
        ("a", &[("zone", "1")]),
        ("b", &[("zone", "2")]),
        ("c", &[("zone", "1"), (EXCLUDE_LABEL, "")]),
        ("d", &[("zone", "1")]),
    ]);
    n.get_mut("d").unwrap().network_unavailable = true;
    let ip = announced("198.18.8.5", "p", vec![svc("s", "198.18.8.5")]);

    assert_eq!(eligible(&ip, &[ad(&["p"])], &n), names(&["a", "b"]));
    let zone1 = Advertisement {
        node_selectors: vec![select(&[("zone", "1")])],
        ..ad(&["p"])
    };
    assert_eq!(
        eligible(&ip, std::slice::from_ref(&zone1), &n),
        names(&["a"])
    );
    // Selectors of one advertisement are ORed, advertisements too.
    let zone2 = Advertisement {
        node_selectors: vec![select(&[("zone", "9")]), select(&[("zone", "2")])],
        ..ad(&["p"])
    };
    assert_eq!(eligible(&ip, &[zone1, zone2], &n), names(&["a", "b"]));
    // An advertisement for another pool lets nobody announce.
    assert!(eligible(&ip, &[ad(&["other"])], &n).is_empty());
    assert!(eligible(&ip, &[], &n).is_empty());
    // An IP no Service uses.
    assert!(eligible(&announced("198.18.8.5", "p", vec![]), &[ad(&["p"])], &n).is_empty());
}

#[test]
fn service_selectors_must_match_every_service_of_the_ip() {
    let n = nodes(&[("a", &[]), ("b", &[("edge", "yes")])]);
    let mut web = svc("web", "198.18.8.5");
    web.labels = labels(&[("app", "web")]);
    let mut db = svc("db", "198.18.8.5");
    db.labels = labels(&[("app", "db")]);
    let web_on_edge = Advertisement {
        service_selectors: vec![select(&[("app", "web")])],
        node_selectors: vec![select(&[("edge", "yes")])],
        ..ad(&["p"])
    };
    let alone = announced("198.18.8.5", "p", vec![web.clone()]);
    assert_eq!(
        eligible(&alone, std::slice::from_ref(&web_on_edge), &n),
        names(&["b"])
    );
    let shared = announced("198.18.8.5", "p", vec![web, db]);
    assert!(eligible(&shared, std::slice::from_ref(&web_on_edge), &n).is_empty());
    assert_eq!(
        eligible(&shared, &[web_on_edge, ad(&["p"])], &n),
        names(&["a", "b"])
    );
}

#[test]
fn local_traffic_policy_keeps_nodes_with_serving_endpoints() {
    let n = nodes(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let mut s = svc("s", "198.18.8.5");
    s.local = true;
    s.serving_nodes = names(&["b", "c", "elsewhere"]);
    let ip = announced("198.18.8.5", "p", vec![s.clone()]);
    assert_eq!(eligible(&ip, &[ad(&["p"])], &n), names(&["b", "c"]));
    // No serving endpoint anywhere: nothing is announced.
    s.serving_nodes.clear();
    let ip = announced("198.18.8.5", "p", vec![s]);
    assert!(eligible(&ip, &[ad(&["p"])], &n).is_empty());
    // Shared with a Cluster Service: the Local one still decides.
    let mut l = svc("l", "198.18.8.5");
    l.local = true;
    l.serving_nodes = names(&["a"]);
    let ip = announced("198.18.8.5", "p", vec![svc("c", "198.18.8.5"), l]);
    assert_eq!(eligible(&ip, &[ad(&["p"])], &n), names(&["a"]));
}

// ---- keys ------------------------------------------------------------------

#[test]
fn plain_cases_use_metallbs_key() {
    let dual = svc("dual", "2001:db8::8:5");
    let all = vec![
        announced(
            "198.18.8.5",
            "p",
            vec![svc("a", "198.18.8.5"), svc("b", "198.18.8.5")],
        ),
        announced("198.18.8.6", "p", vec![dual.clone()]),
        announced("2001:db8::8:5", "p", vec![dual]),
        announced("198.18.8.7", "p", vec![svc("c", "198.18.8.7")]),
    ];
    let k = keys(&all);
    assert_eq!(k[&ip("198.18.8.5")], ip("198.18.8.5"));
    // Both IPs of a dual-stack Service hash its first IP.
    assert_eq!(k[&ip("198.18.8.6")], ip("2001:db8::8:5"));
    assert_eq!(k[&ip("2001:db8::8:5")], ip("2001:db8::8:5"));
    assert_eq!(k[&ip("198.18.8.7")], ip("198.18.8.7"));
    assert_eq!(k.len(), 4);
}

/// The case MetalLB splits: `dual` (first IP its IPv6 one) shares its IPv4
/// address with `v4`; MetalLB would hash 198.18.8.5 for `v4` and
/// 2001:db8::8:5 for `dual`. One key for the whole chain.
#[test]
fn chained_sharing_gets_one_key() {
    let dual = svc("dual", "2001:db8::8:5");
    let all = vec![
        announced("2001:db8::8:5", "p", vec![dual.clone()]),
        announced("198.18.8.5", "p", vec![svc("v4", "198.18.8.5"), dual]),
        announced("198.18.8.9", "p", vec![svc("other", "198.18.8.9")]),
    ];
    let k = keys(&all);
    assert_eq!(k[&ip("2001:db8::8:5")], ip("198.18.8.5"));
    assert_eq!(k[&ip("198.18.8.5")], ip("198.18.8.5"));
    assert_eq!(k[&ip("198.18.8.9")], ip("198.18.8.9"));
}

#[test]
fn ballots_keep_a_group_on_the_nodes_eligible_for_all_of_it() {
    let n = nodes(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let dual = svc("dual", "2001:db8::8:5");
    let mut v4 = svc("v4", "198.18.8.5");
    v4.local = true;
    v4.serving_nodes = names(&["a", "b"]);
    let all = vec![
        announced("2001:db8::8:5", "p", vec![dual.clone()]),
        announced("198.18.8.5", "p", vec![v4, dual]),
    ];
    let b = ballots(&all, &[ad(&["p"])], &n);
    let v6 = &b[&ip("2001:db8::8:5")];
    let v4 = &b[&ip("198.18.8.5")];
    assert_eq!(v6, v4);
    assert_eq!(v4.key, ip("198.18.8.5"));
    assert_eq!(v4.ranking, ranking(ip("198.18.8.5"), &names(&["a", "b"])));

    // No node can take the whole group: each IP keeps its own candidates
    // rather than going unannounced.
    let only_v6_ad = Advertisement {
        node_selectors: vec![select(&[("v6", "yes")])],
        ..ad(&["p6"])
    };
    let n = nodes(&[("a", &[]), ("b", &[("v6", "yes")])]);
    let dual = svc("dual", "198.18.8.5");
    let all = vec![
        announced("198.18.8.5", "p4", vec![dual.clone()]),
        announced("2001:db8::8:5", "p6", vec![dual]),
    ];
    let mut v4_ad = ad(&["p4"]);
    v4_ad.node_selectors = vec![select(&[("v4", "yes")])];
    let n2 = nodes(&[("a", &[("v4", "yes")]), ("b", &[("v6", "yes")])]);
    let b = ballots(&all, &[v4_ad, only_v6_ad.clone()], &n2);
    assert_eq!(b[&ip("198.18.8.5")].ranking, strings(&["a"]));
    assert_eq!(b[&ip("2001:db8::8:5")].ranking, strings(&["b"]));
    let b = ballots(&all, &[only_v6_ad], &n);
    assert!(b[&ip("198.18.8.5")].ranking.is_empty());
    assert_eq!(b[&ip("2001:db8::8:5")].ranking, strings(&["b"]));
}

// ---- interfaces ------------------------------------------------------------

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn local() -> Vec<(String, IpNet)> {
    vec![
        ("lo".into(), net("127.0.0.1/8")),
        ("eth0".into(), net("192.0.2.10/24")),
        ("eth0".into(), net("2001:db8:1::10/64")),
        ("eth1".into(), net("198.18.8.2/24")),
        ("eth2".into(), net("198.18.8.3/16")),
        ("kube-ipvs0".into(), net("198.18.9.5/32")),
        ("eth3".into(), net("2001:db8:2::10/64")),
    ]
}

#[test]
fn interfaces_named_by_advertisements_win() {
    let mut a = ad(&["p"]);
    a.interfaces = strings(&["eth9", "eth1"]);
    let mut b = ad(&["p"]);
    b.interfaces = strings(&["eth1"]);
    let plain = ad(&["p"]);
    assert_eq!(
        interfaces(ip("198.18.8.5"), &[&a, &b, &plain], &local(), &[]),
        strings(&["eth1", "eth9"])
    );
}

#[test]
fn interfaces_on_link_then_internal_ip_never_all() {
    let plain = ad(&["p"]);
    let internal = [ip("192.0.2.10"), ip("2001:db8:2::10")];
    // On-link on two interfaces.
    assert_eq!(
        interfaces(ip("198.18.8.5"), &[&plain], &local(), &internal),
        strings(&["eth1", "eth2"])
    );
    // A host address is no link (kube-ipvs0); fall back to the interface
    // with the InternalIP of the same family.
    assert_eq!(
        interfaces(ip("198.18.9.5"), &[&plain], &local(), &internal),
        strings(&["eth2"]),
        "198.18.9.5 is inside eth2's /16"
    );
    assert_eq!(
        interfaces(ip("203.0.113.5"), &[&plain], &local(), &internal),
        strings(&["eth0"])
    );
    assert_eq!(
        interfaces(ip("2001:db8:9::5"), &[&plain], &local(), &internal),
        strings(&["eth3"])
    );
    // Only a v4 InternalIP: used for a v6 IP too.
    assert_eq!(
        interfaces(
            ip("2001:db8:9::5"),
            &[&plain],
            &local(),
            &[ip("192.0.2.10")]
        ),
        strings(&["eth0"])
    );
    assert!(interfaces(ip("203.0.113.5"), &[&plain], &local(), &[]).is_empty());
    assert!(interfaces(ip("203.0.113.5"), &[&plain], &local(), &[ip("203.0.113.1")]).is_empty());
}

// ---- properties ------------------------------------------------------------

const NODES: [&str; 6] = ["node-0", "node-1", "node-2", "node-3", "node-4", "node-5"];

fn node_subset() -> impl Strategy<Value = BTreeSet<String>> {
    proptest::bits::u8::masked(0b11_1111).prop_map(|bits| {
        NODES
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, n)| n.to_string())
            .collect()
    })
}

fn any_key() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::from(std::net::Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::from(std::net::Ipv6Addr::from(v))),
    ]
}

/// A random cluster: nodes with labels, advertisements with selectors over
/// a small label space, and Services holding one IPv4 and/or one IPv6
/// address out of four each, so sharing, dual stack and chains are common.
#[derive(Debug, Clone)]
struct Scenario {
    nodes: BTreeMap<String, NodeFacts>,
    ads: Vec<Advertisement>,
    announced: Vec<Announced>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let node = (0u8..3, any::<bool>(), any::<bool>());
    let ad = (
        proptest::sample::subsequence(vec!["p4", "p6", "mix"], 0..=3),
        proptest::option::of(0u8..3),
        proptest::option::of(0u8..2),
    );
    let service = (
        proptest::option::of(0u8..4),
        proptest::option::of(0u8..4),
        any::<bool>(),
        0u8..2,
        any::<bool>(),
        node_subset(),
    );
    (
        proptest::collection::vec(node, 6),
        proptest::collection::vec(ad, 1..4),
        proptest::collection::vec(service, 1..7),
        any::<bool>(),
    )
        .prop_map(|(node_specs, ad_specs, service_specs, mixed_pool)| {
            let nodes = NODES
                .iter()
                .zip(node_specs)
                .map(|(name, (zone, excluded, unavailable))| {
                    let mut l = labels(&[("zone", &zone.to_string())]);
                    if excluded {
                        l.insert(EXCLUDE_LABEL.into(), String::new());
                    }
                    (
                        name.to_string(),
                        NodeFacts {
                            labels: l,
                            network_unavailable: unavailable,
                        },
                    )
                })
                .collect();
            let ads = ad_specs
                .into_iter()
                .enumerate()
                .map(|(i, (pools, zone, app))| Advertisement {
                    name: format!("ad-{i}"),
                    pools: pools.into_iter().map(String::from).collect(),
                    node_selectors: zone
                        .map(|z| vec![select(&[("zone", &z.to_string())])])
                        .unwrap_or_default(),
                    service_selectors: app
                        .map(|a| vec![select(&[("app", &a.to_string())])])
                        .unwrap_or_default(),
                    interfaces: vec![],
                })
                .collect();
            let mut by_ip: BTreeMap<IpAddr, Vec<ServiceFacts>> = BTreeMap::new();
            for (i, (v4, v6, v6_first, app, local, serving)) in
                service_specs.into_iter().enumerate()
            {
                let v4 = v4.map(|n| ip(&format!("198.18.8.{n}")));
                let v6 = v6.map(|n| ip(&format!("2001:db8::8:{n}")));
                let ips: Vec<IpAddr> = match (v4, v6, v6_first) {
                    (Some(a), Some(b), false) => vec![a, b],
                    (Some(a), Some(b), true) => vec![b, a],
                    (Some(a), None, _) | (None, Some(a), _) => vec![a],
                    (None, None, _) => continue,
                };
                let facts = ServiceFacts {
                    namespace: "default".into(),
                    name: format!("svc-{i}"),
                    labels: labels(&[("app", &app.to_string())]),
                    first_ip: ips[0],
                    local,
                    serving_nodes: serving,
                };
                for a in ips {
                    by_ip.entry(a).or_default().push(facts.clone());
                }
            }
            let announced = by_ip
                .into_iter()
                .map(|(a, services)| Announced {
                    ip: a,
                    pool: match (mixed_pool, a.is_ipv4()) {
                        (true, _) => "mix",
                        (false, true) => "p4",
                        (false, false) => "p6",
                    }
                    .into(),
                    services,
                })
                .collect();
            Scenario {
                nodes,
                ads,
                announced,
            }
        })
}

/// The IPs joined to each IP through Services, by a plain fixpoint (not
/// the union-find under test).
fn groups_by_fixpoint(all: &[Announced]) -> Vec<BTreeSet<IpAddr>> {
    let mut sets: Vec<BTreeSet<IpAddr>> = all.iter().map(|a| [a.ip].into()).collect();
    let svc_of =
        |a: &Announced| -> BTreeSet<String> { a.services.iter().map(|s| s.name.clone()).collect() };
    loop {
        let mut changed = false;
        for i in 0..all.len() {
            for j in 0..all.len() {
                let linked = !svc_of(&all[i]).is_disjoint(&svc_of(&all[j]))
                    || !sets[i].is_disjoint(&sets[j]);
                if linked && !sets[j].is_subset(&sets[i]) {
                    let add = sets[j].clone();
                    sets[i].extend(add);
                    changed = true;
                }
            }
        }
        if !changed {
            return sets;
        }
    }
}

proptest! {
    #[test]
    fn ranking_is_a_permutation_of_the_candidates(key in any_key(), set in node_subset()) {
        let r = ranking(key, &set);
        prop_assert_eq!(r.len(), set.len());
        prop_assert_eq!(r.iter().cloned().collect::<BTreeSet<_>>(), set);
    }

    #[test]
    fn exactly_one_winner_among_any_live_set(
        key in any_key(),
        candidates in node_subset(),
        live in node_subset(),
    ) {
        let r = ranking(key, &candidates);
        let live_candidates: BTreeSet<_> = candidates.intersection(&live).cloned().collect();
        // Every node works the winner out on its own; count those that
        // find themselves.
        let claims = NODES.iter().filter(|n| winner(&r, &live) == Some(**n)).count();
        prop_assert_eq!(claims, usize::from(!live_candidates.is_empty()));
        if let Some(w) = winner(&r, &live) {
            prop_assert!(live_candidates.contains(w));
        }
    }

    #[test]
    fn a_non_winner_leaving_moves_nothing(
        key in any_key(),
        candidates in node_subset(),
        live in node_subset(),
        leaving in 0usize..6,
    ) {
        let r = ranking(key, &candidates);
        let before = winner(&r, &live).map(String::from);
        let leaving = NODES[leaving].to_string();
        prop_assume!(before.as_deref() != Some(leaving.as_str()));
        let mut after_live = live.clone();
        after_live.remove(&leaving);
        prop_assert_eq!(winner(&r, &after_live).map(String::from), before);
    }

    #[test]
    fn ballots_never_name_an_ineligible_node(s in scenario()) {
        let b = ballots(&s.announced, &s.ads, &s.nodes);
        for a in &s.announced {
            let own = eligible(a, &s.ads, &s.nodes);
            let ranked: BTreeSet<String> = b[&a.ip].ranking.iter().cloned().collect();
            prop_assert!(ranked.is_subset(&own), "{}: {ranked:?} ⊄ {own:?}", a.ip);
            prop_assert_eq!(ranked.is_empty(), own.is_empty(), "{} lost its candidates", a.ip);
            for svc in a.services.iter().filter(|s| s.local) {
                prop_assert!(own.is_subset(&svc.serving_nodes));
            }
        }
    }

    /// Services sharing an IP, both IPs of a dual-stack Service, and chains
    /// of both, always land on one node whenever one node may announce
    /// them all, whoever is live.
    #[test]
    fn shared_and_dual_stack_ips_share_a_winner(s in scenario(), live in node_subset()) {
        let b = ballots(&s.announced, &s.ads, &s.nodes);
        let k = keys(&s.announced);
        let eligible_of: BTreeMap<IpAddr, BTreeSet<String>> = s
            .announced
            .iter()
            .map(|a| (a.ip, eligible(a, &s.ads, &s.nodes)))
            .collect();
        for group in groups_by_fixpoint(&s.announced) {
            let keys_in_group: BTreeSet<IpAddr> = group.iter().map(|a| k[a]).collect();
            prop_assert_eq!(keys_in_group.len(), 1, "{:?}", group);
            let common = group
                .iter()
                .map(|a| eligible_of[a].clone())
                .reduce(|x, y| x.intersection(&y).cloned().collect())
                .unwrap_or_default();
            if common.is_empty() {
                continue;
            }
            let winners: BTreeSet<Option<&str>> =
                group.iter().map(|a| winner(&b[a].ranking, &live)).collect();
            prop_assert_eq!(winners.len(), 1, "{:?} split: {:?}", group, winners);
        }
    }

    /// Without chains, a group's Services agree on their first IP, and the
    /// key is that IP: MetalLB's choice.
    #[test]
    fn unchained_keys_are_metallbs(s in scenario()) {
        let k = keys(&s.announced);
        for group in groups_by_fixpoint(&s.announced) {
            let firsts: BTreeSet<IpAddr> = s
                .announced
                .iter()
                .filter(|a| group.contains(&a.ip))
                .flat_map(|a| a.services.iter().map(|s| s.first_ip))
                .collect();
            if let [only] = firsts.iter().collect::<Vec<_>>()[..] {
                for a in &group {
                    prop_assert_eq!(k[a], *only);
                }
            }
        }
    }
}
