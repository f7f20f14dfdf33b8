//! `ferrolb-speaker`: answers ARP (IPv4) and NDP (IPv6) for the
//! LoadBalancer IPs this node is elected to announce, with sub-second
//! failover between speakers (heartbeats over UDP) and fencing against two
//! nodes answering for one IP (docs/speaker.md).
//!
//! SIGTERM: in a rollout the process restarts (peers keep this node's IPs
//! for the restart grace while the next process starts); on a cordoned
//! node it leaves, handing every IP to the next node first
//! (`--shutdown-mode`).

use std::net::IpAddr;
use std::time::Duration;

use clap::{ArgAction, Parser};
use ferrolb_crds::annotations::DEFAULT_LOAD_BALANCER_CLASS;
use ferrolb_crds::class::ClassFilter;
use ferrolb_crds::{IPAddressPool, L2Advertisement};
use ferrolb_runtime::{CommonArgs, NodeArgs, Runtime, parse_args, ports};
use ferrolb_speaker::links::{LinkWatch, Links};
use ferrolb_speaker::membership::{self, OwnLease};
use ferrolb_speaker::metrics::Metrics;
use ferrolb_speaker::peers::Heartbeats;
use ferrolb_speaker::run::{Caches, Parts, Settings, ShutdownMode, Speaker};
use ferrolb_speaker::{fence, liveness, probe, report};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};

/// Announces LoadBalancer IPs on the local network (ARP/NDP).
#[derive(Debug, Parser)]
#[command(name = "ferrolb-speaker", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    node: NodeArgs,

    /// spec.loadBalancerClass whose Services are announced (the
    /// controller's).
    #[arg(long, env = "FERROLB_LOAD_BALANCER_CLASS", default_value = DEFAULT_LOAD_BALANCER_CLASS)]
    load_balancer_class: String,

    /// Leave Services without spec.loadBalancerClass to another
    /// implementation.
    #[arg(long, env = "FERROLB_IGNORE_CLASSLESS")]
    ignore_classless: bool,

    /// Namespace of the speakers' Leases and of the heartbeat Secret (the
    /// chart's release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferrolb-system")]
    namespace: String,

    /// Secret whose `key` entry signs heartbeats (every entry is accepted,
    /// for rotation); at least 16 bytes.
    #[arg(
        long,
        env = "FERROLB_HEARTBEAT_SECRET",
        default_value = "ferrolb-speaker-heartbeat"
    )]
    heartbeat_secret: String,

    /// UDP port of the heartbeats.
    #[arg(long, env = "FERROLB_HEARTBEAT_PORT", default_value_t = ports::SPEAKER_HEARTBEAT)]
    heartbeat_port: u16,

    /// Address peers send heartbeats to [default: this Node's first
    /// InternalIP].
    #[arg(long, env = "FERROLB_HEARTBEAT_ADDRESS")]
    heartbeat_address: Option<IpAddr>,

    /// Time between two heartbeats to every peer.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,

    /// A peer not heard for this long is dead (more than two intervals).
    #[arg(long, default_value = "350ms", value_parser = humantime::parse_duration)]
    dead_after: Duration,

    /// How long peers keep the IPs of a speaker that said it is
    /// restarting.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    restart_grace: Duration,

    /// Time between gratuitous ARP / unsolicited NA refreshes after the
    /// takeover burst.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    gratuitous_interval: Duration,

    /// What SIGTERM means: auto (leave when the node is cordoned, else
    /// restart), restart, or leave.
    #[arg(long, value_enum, default_value = "auto")]
    shutdown_mode: ShutdownMode,

    /// Probe an IP (RFC 5227 ARP probe, DAD for IPv6) before its first
    /// announcement, and refuse it when another host answers.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    conflict_probe: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(ports::SPEAKER);
    let timings = liveness::Timings {
        interval: args.heartbeat_interval,
        dead_after: args.dead_after,
        restart_grace: args.restart_grace,
    };
    timings
        .validate()
        .map_err(|e| anyhow::anyhow!("--heartbeat-interval/--dead-after/--restart-grace: {e}"))?;
    if args.gratuitous_interval < Duration::from_millis(500) {
        anyhow::bail!("--gratuitous-interval must be at least 500ms");
    }
    let fence_timings = fence::Timings {
        // A claim must be remembered past the next periodic refresh of
        // whoever made it (fence.rs).
        claim_memory: args.gratuitous_interval * 2,
        ..fence::Timings::default()
    };
    let settings = Settings {
        node: args.node.node_name.clone(),
        filter: ClassFilter {
            class: args.load_balancer_class.clone(),
            classless: !args.ignore_classless,
        },
        liveness: timings,
        fence: fence_timings,
        periodic: args.gratuitous_interval,
        port: args.heartbeat_port,
        address: args.heartbeat_address,
        shutdown_mode: args.shutdown_mode,
        probe: probe::Timings::default(),
        conflict_probe: args.conflict_probe,
    };

    let mut rt = Runtime::start("speaker", &args.common).await?;
    let client = rt.client.clone();
    let ns = args.namespace.as_str();
    let caches = Caches {
        services: rt.watch(Api::<Service>::all(client.clone()), "services"),
        pools: rt.watch(Api::<IPAddressPool>::all(client.clone()), "ipaddresspools"),
        ads: rt.watch(
            Api::<L2Advertisement>::all(client.clone()),
            "l2advertisements",
        ),
        nodes: rt.watch(Api::<Node>::all(client.clone()), "nodes"),
        slices: rt.watch(Api::<EndpointSlice>::all(client.clone()), "endpointslices"),
        leases: rt.watch_with(
            Api::<Lease>::namespaced(client.clone(), ns),
            watcher::Config::default().labels(membership::LABEL_SELECTOR),
            "leases",
        ),
        secrets: rt.watch_with(
            Api::<Secret>::namespaced(client.clone(), ns),
            watcher::Config::default().fields(&format!("metadata.name={}", args.heartbeat_secret)),
            "heartbeat secret",
        ),
    };
    let metrics = Metrics::register(&mut rt.registry);

    let heartbeats = Heartbeats::bind(args.heartbeat_port).map_err(|e| {
        anyhow::anyhow!(
            "binding the heartbeat port {} (UDP): {e}",
            args.heartbeat_port
        )
    })?;
    let (keys, keys_rx) = watch::channel(Vec::new());
    let (received_tx, received) = mpsc::channel(4096);
    let counted = metrics.clone();
    rt.spawn(heartbeats.clone().receive(keys_rx, received_tx, move |r| {
        counted.rejected(r.reason());
        tracing::debug!(?r, "heartbeat refused");
    }));

    let (links_tx, links) = watch::channel(Links::default());
    rt.spawn(watch_links(links_tx));

    let (reports, reports_rx) = mpsc::channel(4096);
    rt.spawn(report::run(
        client.clone(),
        settings.node.clone(),
        reports_rx,
    ));

    let own_lease = OwnLease::new(Api::namespaced(client, ns), &settings.node);
    tracing::info!(
        node = %settings.node,
        class = %settings.filter.class,
        port = settings.port,
        interval = ?timings.interval,
        dead_after = ?timings.dead_after,
        "announcing LoadBalancer IPs with ARP and NDP"
    );
    let speaker = Speaker::new(Parts {
        settings,
        caches,
        metrics,
        reports,
        own_lease,
        heartbeats,
        received,
        keys,
        lan: mpsc::channel(4096),
        links,
    });
    let (changes, shutdown) = (rt.changes.clone(), rt.shutdown.clone());
    rt.run(speaker.run(changes, shutdown)).await?;
    Ok(())
}

/// Keeps `tx` current with this node's links; a failed watch is opened
/// again after a second (the last snapshot stays in force meanwhile).
async fn watch_links(tx: watch::Sender<Links>) {
    loop {
        match LinkWatch::new().await {
            Ok(mut w) => loop {
                match w.next().await {
                    Ok(links) => {
                        tx.send_replace(links);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "link watch failed; opening it again");
                        break;
                    }
                }
            },
            Err(error) => tracing::warn!(%error, "cannot watch this node's links"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
