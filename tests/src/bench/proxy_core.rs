//! The proxy's core alone, in this process: `n` Services of `endpoints`
//! endpoints fed to its cache as watch events, one full build committed
//! into a throwaway network namespace, then one Service more. Prints time
//! and RSS after each step, to see where a full sync's time and memory go
//! without an API server in between (root).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use ferrolb_proxy::cache::Cache;
use ferrolb_proxy::model::{NodeFacts, NodePortAddresses};
use ferrolb_proxy::netlink::Nft;
use ferrolb_proxy::programmed::{Context, Programmed};
use ferrolb_proxy::render::Config;
use ferrolb_proxy::ruleset::Family;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use serde_json::json;

use super::say;

fn rss_mib() -> f64 {
    super::rss_kib("self").unwrap_or(0) as f64 / 1024.0
}

fn service(i: usize) -> Service {
    let ip =
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 64, 100)) + i as u32);
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}"), "resourceVersion": "1", "uid": format!("u{i}")},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }))
    .unwrap_or_default()
}

fn slice(i: usize, endpoints: usize) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|j| json!({"addresses": [format!("198.19.{}.{}", (i * endpoints + j) / 250 % 250, 1 + (i * endpoints + j) % 250)],
                        "nodeName": "node-1", "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-1"), "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap_or_default()
}

pub fn run(n: usize, endpoints: usize) -> Result<()> {
    let ns = format!("flbcore-{}", std::process::id());
    let out = Command::new("ip").args(["netns", "add", &ns]).output()?;
    ensure!(
        out.status.success(),
        "ip netns add {ns} (root needed): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = run_in(&ns, n, endpoints);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    result
}

fn run_in(ns: &str, n: usize, endpoints: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nft = {
        let _in = rt.enter();
        Nft::open_in(std::path::Path::new(&format!("/run/netns/{ns}"))).context("netlink")?
    };
    let cfg = Config {
        table: "ferrolb-proxy".into(),
        masquerade_bit: 1 << 14,
        masquerade_all: false,
        cluster_cidrs: vec!["198.19.0.0/16".parse()?],
        nodeport_addresses: NodePortAddresses::Primary,
    };
    let node = NodeFacts {
        name: "node-1".into(),
        addresses: vec!["198.18.0.11".parse()?],
        ..Default::default()
    };
    let cidrs = vec!["198.18.64.0/18".parse()?];
    let ctx = Context {
        cfg: &cfg,
        node: &node,
        service_cidrs: &cidrs,
    };
    let mut rows: Vec<(String, f64, f64)> = vec![("start".into(), 0.0, rss_mib())];
    let cache = Cache::new("node-1");
    let t = Instant::now();
    cache.service_event(Event::Init);
    for i in 0..n {
        cache.service_event(Event::InitApply(service(i)));
    }
    cache.service_event(Event::InitDone);
    cache.slice_event(Event::Init);
    for i in 0..n {
        cache.slice_event(Event::InitApply(slice(i, endpoints)));
    }
    cache.slice_event(Event::InitDone);
    let _ = cache.take();
    rows.push((
        "cache filled (objects made and converted)".into(),
        t.elapsed().as_secs_f64() * 1e3,
        rss_mib(),
    ));

    let t = Instant::now();
    let mut table = Programmed::new(Family::V4);
    let mut build = table
        .full(&ctx, cache.all())
        .build
        .context("a full build")?;
    let shapes = build.scaffold().clone();
    rt.block_on(nft.commit_batches(&shapes, build.by_ref()))?;
    table.install(build);
    rows.push((
        "full build rendered and committed (one transaction)".into(),
        t.elapsed().as_secs_f64() * 1e3,
        rss_mib(),
    ));
    // What the lab bench's "is it programmed yet" probe costs on a table
    // this size (it runs `nft get element` in a loop).
    let last = std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(198, 18, 64, 100)) + (n - 1) as u32,
    );
    let t = Instant::now();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "get",
            "element",
            "ip",
            "ferrolb-proxy",
            "dispatch",
        ])
        .arg(format!("{{ {last} . tcp . 80 }}"))
        .output()?;
    ensure!(
        out.status.success(),
        "nft get element: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rows.push((
        "`nft get element` of one frontend (the lab bench's probe)".into(),
        t.elapsed().as_secs_f64() * 1e3,
        rss_mib(),
    ));
    let shapes = table.scaffold().context("built")?.clone();
    let t = Instant::now();
    cache.service_event(Event::Apply(service(n)));
    cache.slice_event(Event::Apply(slice(n, endpoints)));
    let changes = cache.take();
    let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
    let planned = t.elapsed();
    rt.block_on(nft.commit(&shapes, &update.ops))?;
    rows.push((
        format!(
            "one Service more: planned in {:.2} ms, then committed",
            planned.as_secs_f64() * 1e3
        ),
        t.elapsed().as_secs_f64() * 1e3,
        rss_mib(),
    ));

    let (chains, elements) = table.size();
    say(&format!(
        "{n} Services x {endpoints} endpoints: {chains} chains, {elements} elements"
    ));
    println!(
        "\nProxy core, in process ({n} Services x {endpoints} endpoints; ferrolb-bench proxy-core)"
    );
    println!("| step | took | RSS after |");
    println!("|---|---:|---:|");
    for (what, ms, rss) in rows {
        println!("| {what} | {ms:.1} ms | {rss:.1} MiB |");
    }
    Ok(())
}
