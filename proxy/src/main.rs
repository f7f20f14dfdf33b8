//! `ferrolb-proxy`: a kube-proxy replacement. Watches Services,
//! EndpointSlices, its Node and ServiceCIDRs and programs nftables over
//! netlink so ClusterIP, NodePort, LoadBalancer and externalIPs traffic
//! reaches pods, with kube-proxy's behaviour (docs/proxy.md).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ferrolb_proxy::cache::Cache;
use ferrolb_proxy::health::{ProxierHealth, ServiceHealth, serve_proxier};
use ferrolb_proxy::metrics::KubeProxyMetrics;
use ferrolb_proxy::model::NodePortAddresses;
use ferrolb_proxy::netlink::Nft;
use ferrolb_proxy::programmed::{self, Context};
use ferrolb_proxy::render::Config;
use ferrolb_proxy::ruleset::Family;
use ferrolb_proxy::sync::{Proxy, Settings, wait_listed};
use ferrolb_runtime::{CommonArgs, NodeArgs, Runtime, parse_args, ports};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::Api;
use kube::runtime::watcher;

/// Routes Service traffic to pods with nftables (kube-proxy replacement).
#[derive(Debug, Parser)]
#[command(name = "ferrolb-proxy", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    node: NodeArgs,

    /// The cluster's pod CIDRs (both families, comma-separated): traffic
    /// from them is pod traffic (no masquerade to ClusterIPs, the
    /// externalTrafficPolicy Local short-circuit). Without one for a
    /// family, kube-proxy's off-cluster masquerade does not apply to it.
    #[arg(long, env = "FERROLB_CLUSTER_CIDR", value_delimiter = ',')]
    cluster_cidr: Vec<IpNet>,

    /// Node addresses NodePorts answer on: `primary` (the node's first
    /// InternalIP of each family, kube-proxy nftables' default) or CIDRs.
    #[arg(long, default_value = "primary", value_delimiter = ',')]
    nodeport_addresses: Vec<String>,

    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    masquerade_all: bool,

    /// The packet-mark bit that means "masquerade" (kube-proxy: 14).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u32).range(0..32))]
    masquerade_bit: u32,

    /// Syncs run at most this often (after a burst of two).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_sync_period: Duration,

    /// Retry delay after a failed sync; /healthz fails when a change waits
    /// twice this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sync_period: Duration,

    /// kube-proxy's /healthz and /livez.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,

    /// Name of our nftables tables (`ip` and `ip6`).
    #[arg(long, default_value = "ferrolb-proxy")]
    table: String,

    /// Remove everything the proxy installed, and exit.
    #[arg(long)]
    cleanup: bool,

    /// Print the ruleset the proxy would apply (nft syntax), and exit
    /// without touching the kernel.
    #[arg(long)]
    print_ruleset: bool,
}

fn nodeport_addresses(list: &[String]) -> anyhow::Result<NodePortAddresses> {
    if list.iter().any(|s| s == "primary") {
        return Ok(NodePortAddresses::Primary);
    }
    let cidrs = list
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {s:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(NodePortAddresses::Cidrs(cidrs))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(ports::PROXY);
    if args.cleanup {
        ferrolb_runtime::telemetry::init(args.common.log_format);
        let nft = Nft::open()?;
        let errors = Proxy::cleanup(&nft, &args.table).await;
        if !errors.is_empty() {
            anyhow::bail!("cleanup left tables behind: {}", errors.join("; "));
        }
        tracing::info!(table = %args.table, "removed the proxy's tables");
        return Ok(());
    }
    let settings = Settings {
        config: Config {
            table: args.table.clone(),
            masquerade_bit: 1 << args.masquerade_bit,
            masquerade_all: args.masquerade_all,
            cluster_cidrs: args.cluster_cidr.clone(),
            nodeport_addresses: nodeport_addresses(&args.nodeport_addresses)?,
        },
        node_name: args.node.node_name.clone(),
        families: vec![Family::V4, Family::V6],
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
    };
    let mut rt = Runtime::start("proxy", &args.common).await?;
    let client = rt.client.clone();
    let cache = Cache::new(&settings.node_name);
    // Lists stream from the API server's watch cache (WatchList,
    // `sendInitialEvents`): objects arrive one by one and are converted as
    // they come, instead of one large list body decoded at the end (at 10k
    // Services x 10 endpoints the lists took 0.41 s instead of 0.56 s).
    // Where the server refuses, the runtime lists from the watch cache
    // (resourceVersion 0), as kube-proxy's informers do.
    let all = || watcher::Config::default().streaming_lists();
    let own_node = all().fields(&format!("metadata.name={}", settings.node_name));
    let c = cache.clone();
    rt.watch_events(
        Api::<Service>::all(client.clone()),
        all(),
        "services",
        move |e| c.service_event(e),
    );
    let c = cache.clone();
    rt.watch_events(
        Api::<EndpointSlice>::all(client.clone()),
        all(),
        "endpointslices",
        move |e| c.slice_event(e),
    );
    let c = cache.clone();
    rt.watch_events(
        Api::<Node>::all(client.clone()),
        own_node,
        "node",
        move |e| c.node_event(e),
    );
    let c = cache.clone();
    rt.watch_events(
        Api::<ServiceCIDR>::all(client.clone()),
        all(),
        "servicecidrs",
        move |e| c.service_cidr_event(e),
    );

    if args.print_ruleset {
        if !wait_listed(&cache, &rt.changes, &rt.shutdown).await {
            return Ok(());
        }
        let (node, cidrs) = (cache.node(), cache.service_cidrs());
        let ctx = Context {
            cfg: &settings.config,
            node: &node,
            service_cidrs: &cidrs,
        };
        for family in &settings.families {
            let rendered = programmed::assemble(*family, &ctx, cache.all());
            print!("{}", rendered.ruleset.to_nft());
        }
        return Ok(());
    }

    let metrics = KubeProxyMetrics::register(&mut rt.unprefixed, &mut rt.registry);
    let health = ProxierHealth::new(settings.sync_period, metrics.probes());
    let service_health = ServiceHealth::new(health.clone(), rt.shutdown.clone());
    let (_, healthz) = serve_proxier(
        args.healthz_bind_address,
        health.clone(),
        rt.shutdown.clone(),
    )
    .await?;
    rt.spawn(healthz);
    let events = ferrolb_runtime::events::EventSink::new(
        client,
        "ferrolb.io/ferrolb-proxy",
        settings.node_name.clone(),
    );
    let nft = Nft::open()?;
    tracing::info!(node = %settings.node_name, table = %settings.config.table, "programming Service traffic with nftables");
    let proxy = Proxy::new(
        settings,
        cache,
        nft,
        metrics,
        health,
        service_health,
        events,
    );
    let (changes, shutdown) = (rt.changes.clone(), rt.shutdown.clone());
    rt.run(proxy.run(changes, shutdown)).await?;
    Ok(())
}
