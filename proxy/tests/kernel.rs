//! Every rendered ruleset is accepted by the kernel, and its `nft` text by
//! `nft -c`: full builds and partial updates are committed over netlink
//! into a throwaway network namespace, and what `nft list` shows there
//! holds the elements we rendered. Needs root (CI runs as root); without
//! it the test fails saying why, unless FERROLB_SKIP_LAB=1 is set.

mod common;

use std::process::Command;

use common::{cluster_ip, ready, render, service, slice};
use ferrolb_proxy::cache::Cache;
use ferrolb_proxy::diff;
use ferrolb_proxy::netlink::Nft;
use ferrolb_proxy::programmed::{Context, Programmed};
use ferrolb_proxy::ruleset::{Family, Ruleset};
use kube::runtime::watcher::Event;
use proptest::prelude::*;
use serde_json::json;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Self> {
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        if !root {
            if std::env::var("FERROLB_SKIP_LAB").as_deref() == Ok("1") {
                eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): not root");
                return None;
            }
            panic!(
                "this test programs nftables in a network namespace and must run as root; set FERROLB_SKIP_LAB=1 to skip it"
            );
        }
        let name = format!("flbk-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self(name))
    }

    fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.0).into()
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().expect("nft output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The fixtures of the snapshot tests, in one cluster.
fn features() -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let services = vec![
        cluster_ip("web", "198.18.64.10"),
        cluster_ip("empty", "198.18.64.11"),
        service(
            "default",
            "lb",
            json!({"type": "LoadBalancer", "clusterIP": "198.18.64.12", "clusterIPs": ["198.18.64.12"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
            "loadBalancerSourceRanges": ["198.18.0.0/20"], "externalIPs": ["198.18.9.9"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
            json!({"loadBalancer": {"ingress": [{"ip": "198.18.8.1"}]}}),
        ),
        service(
            "default",
            "aff",
            json!({"type": "NodePort", "clusterIP": "198.18.64.13", "clusterIPs": ["198.18.64.13"],
            "sessionAffinity": "ClientIP", "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                                                     {"name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30054}]}),
            json!({}),
        ),
    ];
    let slices = vec![
        slice(
            "default",
            "web",
            "IPv4",
            ("http", 8080, "TCP"),
            &[ready("198.19.1.5", "node-1"), ready("198.19.2.5", "node-2")],
        ),
        slice(
            "default",
            "lb",
            "IPv4",
            ("http", 8080, "TCP"),
            &[ready("198.19.1.6", "node-1"), ready("198.19.2.6", "node-2")],
        ),
        slice(
            "default",
            "aff",
            "IPv4",
            ("dns", 53, "UDP"),
            &[ready("198.19.1.7", "node-1"), ready("198.19.2.7", "node-2")],
        ),
    ];
    (services, slices)
}

/// Elements `nft -j list table` shows, summed over sets and maps.
fn listed_elements(ns: &Netns, family: &str) -> usize {
    let (ok, text) = ns.nft(&["-j", "list", "table", family, "ferrolb-proxy"], None);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("nft json");
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set").or_else(|| o.get("map")))
        .map(|s| s["elem"].as_array().map_or(0, |e| e.len()))
        .sum()
}

#[test]
fn the_kernel_and_nft_accept_every_feature_in_both_families() {
    let Some(ns) = Netns::new("feat") else { return };
    let rt = runtime();
    let _in = rt.enter();
    let nft = Nft::open_in(&ns.path()).expect("netlink");
    let (services, slices) = features();
    for family in [Family::V4, Family::V6] {
        let rs = render(family, &services, &slices).ruleset;
        // Checked against an empty namespace: nft checks a file against the
        // tables already there.
        let (ok, text) = ns.nft(&["-c", "-f", "-"], Some(&rs.to_nft()));
        assert!(ok, "nft -c refused our text:\n{text}\n{rs}");
        rt.block_on(nft.commit(&rs, &diff::full(&rs)))
            .unwrap_or_else(|e| panic!("{family:?}: {e}\n{rs}"));
        let fam = family.nft();
        assert_eq!(listed_elements(&ns, fam), rs.element_count(), "{rs}");
    }
    // The same ruleset again replaces the table atomically.
    let rs = render(Family::V4, &services, &slices).ruleset;
    rt.block_on(nft.commit(&rs, &diff::full(&rs)))
        .expect("replace");
    // And --cleanup removes it.
    assert!(
        rt.block_on(nft.remove_table(Family::V4, &rs.table))
            .expect("remove")
    );
    let (ok, _) = ns.nft(&["list", "table", "ip", "ferrolb-proxy"], None);
    assert!(!ok, "the table is gone");
}

#[test]
fn a_refused_transaction_changes_nothing() {
    let Some(ns) = Netns::new("atomic") else {
        return;
    };
    let rt = runtime();
    let _in = rt.enter();
    let nft = Nft::open_in(&ns.path()).expect("netlink");
    let (services, slices) = features();
    let rs = render(Family::V4, &services, &slices).ruleset;
    rt.block_on(nft.commit(&rs, &diff::full(&rs)))
        .expect("full");
    let before = ns.nft(&["list", "table", "ip", "ferrolb-proxy"], None).1;
    // A valid element change followed by an element for a set that does
    // not exist: the kernel must refuse the whole batch.
    let ops = vec![
        diff::Op::DeleteElements {
            set: "cluster-ips".into(),
            keys: vec![vec![ferrolb_proxy::ruleset::Value::Addr(
                "198.18.64.10".parse().unwrap(),
            )]],
        },
        diff::Op::AddElements {
            set: "no-such-set".into(),
            elements: vec![(vec![ferrolb_proxy::ruleset::Value::Port(1)], None)],
        },
    ];
    assert!(rt.block_on(nft.commit(&rs, &ops)).is_err());
    let after = ns.nft(&["list", "table", "ip", "ferrolb-proxy"], None).1;
    assert_eq!(before, after, "half a transaction took effect");
}

fn world() -> impl Strategy<Value = Vec<(u8, u8, bool, bool)>> {
    proptest::collection::vec((0u8..20, 0u8..5, any::<bool>(), any::<bool>()), 0..15)
}

fn cluster(w: &[(u8, u8, bool, bool)]) -> Ruleset {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (id, eps, lb, affinity) in w {
        if !seen.insert(*id) {
            continue;
        }
        let name = format!("s{id}");
        let ip = format!("198.18.64.{}", 20 + id);
        let mut spec = json!({"type": if *lb {"LoadBalancer"} else {"ClusterIP"}, "clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30100 + u16::from(*id)}]});
        if *affinity {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        let status = json!({"loadBalancer": {"ingress": [{"ip": format!("198.18.8.{id}")}]}});
        services.push(service("default", &name, spec, status));
        let addrs: Vec<String> = (0..*eps)
            .map(|e| format!("198.19.{}.{}", 1 + e % 2, 10 + e))
            .collect();
        let list: Vec<common::Ep<'_>> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    a.as_str(),
                    if i % 2 == 0 { "node-1" } else { "node-2" },
                    true,
                    true,
                    false,
                )
            })
            .collect();
        slices.push(slice("default", &name, "IPv4", ("p", 8080, "TCP"), &list));
    }
    render(Family::V4, &services, &slices).ruleset
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random sequences of clusters, each reached from the last by a
    /// partial update committed to the kernel: every update is accepted and
    /// leaves exactly the rendered elements.
    #[test]
    fn partial_updates_are_accepted_by_the_kernel(steps in proptest::collection::vec(world(), 1..5)) {
        let Some(ns) = Netns::new("prop") else { return Ok(()) };
        let rt = runtime();
        let _in = rt.enter();
        let nft = Nft::open_in(&ns.path()).expect("netlink");
        let mut committed: Option<Ruleset> = None;
        for w in &steps {
            let rs = cluster(w);
            let ops = match &committed {
                Some(old) => diff::diff(old, &rs).expect("partial"),
                None => diff::full(&rs),
            };
            let result = rt.block_on(nft.commit(&rs, &ops));
            prop_assert!(result.is_ok(), "{:?}\n{:?}", result, ops);
            prop_assert_eq!(listed_elements(&ns, "ip"), rs.element_count());
            committed = Some(rs);
        }
    }

    /// The same through the proxy's own path: a cache fed watch events and
    /// the per-Service updates of [`Programmed`], committed step by step.
    #[test]
    fn per_service_updates_are_accepted_by_the_kernel(steps in proptest::collection::vec(common::world(), 1..5)) {
        let Some(ns) = Netns::new("upd") else { return Ok(()) };
        let rt = runtime();
        let _in = rt.enter();
        let nft = Nft::open_in(&ns.path()).expect("netlink");
        let cfg = common::config();
        let node = common::node();
        let cidrs: Vec<ipnet::IpNet> = vec!["198.18.64.0/18".parse().unwrap()];
        let ctx = Context { cfg: &cfg, node: &node, service_cidrs: &cidrs };
        let cache = Cache::new("node-1");
        for e in [Event::Init, Event::InitDone] {
            cache.service_event(e);
        }
        let mut table = Programmed::new(Family::V4);
        let mut before: common::World = Vec::new();
        for w in &steps {
            let (old_services, old_slices) = common::objects(&before);
            let (services, slices) = common::objects(w);
            for s in old_services {
                if !services.iter().any(|n| n.metadata.name == s.metadata.name) {
                    cache.service_event(Event::Delete(s));
                }
            }
            for s in old_slices {
                if !slices.iter().any(|n| n.metadata.name == s.metadata.name) {
                    cache.slice_event(Event::Delete(s));
                }
            }
            for s in services {
                cache.service_event(Event::Apply(s));
            }
            for s in slices {
                cache.slice_event(Event::Apply(s));
            }
            let changes = cache.take();
            let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
            let result = match update.build {
                Some(mut build) => {
                    let shapes = build.scaffold().clone();
                    let r = rt.block_on(nft.commit_batches(&shapes, build.by_ref()));
                    table.install(build);
                    r
                }
                None => {
                    let shapes = table.scaffold().expect("built").clone();
                    rt.block_on(nft.commit(&shapes, &update.ops))
                }
            };
            prop_assert!(result.is_ok(), "{:?}\n{:?}", result, update.ops);
            prop_assert_eq!(listed_elements(&ns, "ip"), table.size().1);
            before = w.clone();
        }
    }
}
