//! `ferrolb-controller`: assigns IPs from IPAddressPools to LoadBalancer
//! Services and explains every refusal. Replicas elect a leader; only the
//! leader writes.

use clap::Parser;
use ferrolb_controller::convert::ClassFilter;
use ferrolb_controller::election::Elector;
use ferrolb_controller::metrics::Metrics;
use ferrolb_controller::plan::Index;
use ferrolb_controller::run::{self, Caches};
use ferrolb_controller::write::Writer;
use ferrolb_crds::IPAddressPool;
use ferrolb_crds::annotations::DEFAULT_LOAD_BALANCER_CLASS;
use ferrolb_runtime::{CommonArgs, DefaultPorts, Runtime, parse_args};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;
use tokio::sync::watch;

/// Assigns external IPs from IPAddressPools to LoadBalancer Services.
#[derive(Debug, Parser)]
#[command(name = "ferrolb-controller", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// spec.loadBalancerClass this controller serves.
    #[arg(long, env = "FERROLB_LOAD_BALANCER_CLASS", default_value = DEFAULT_LOAD_BALANCER_CLASS)]
    load_balancer_class: String,

    /// Leave Services without spec.loadBalancerClass to another controller.
    #[arg(long, env = "FERROLB_IGNORE_CLASSLESS")]
    ignore_classless: bool,

    /// Namespace of the leader-election Lease (the chart's release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferrolb-system")]
    leader_election_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ferrolb-controller")]
    leader_election_lease: String,

    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

const PORTS: DefaultPorts = DefaultPorts {
    metrics: 7472,
    health: 7473,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(PORTS);
    let mut rt = Runtime::start("controller", &args.common).await?;
    let client = rt.client.clone();
    let caches = Caches {
        services: rt.watch(Api::<Service>::all(client.clone()), "services"),
        pools: rt.watch(Api::<IPAddressPool>::all(client.clone()), "ipaddresspools"),
        namespaces: rt.watch(Api::<Namespace>::all(client.clone()), "namespaces"),
    };
    let metrics = Metrics::register(&mut rt.registry);
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let (leading_tx, leading) = watch::channel(false);
    let elector = Elector::new(
        client.clone(),
        &args.leader_election_namespace,
        &args.leader_election_lease,
        identity.clone(),
    );
    let shutdown = rt.shutdown.clone();
    rt.spawn(elector.run(leading_tx, shutdown));

    let filter = ClassFilter {
        class: args.load_balancer_class.clone(),
        classless: !args.ignore_classless,
    };
    tracing::info!(class = %filter.class, classless = filter.classless, %identity, "serving LoadBalancer Services");
    let writer = Writer::new(client, identity);
    let changes = rt.changes.clone();
    rt.run(run::run(
        Index::new(filter),
        caches,
        writer,
        metrics,
        changes,
        leading,
    ))
    .await?;
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "controller".into());
    format!("{host}-{}", std::process::id())
}
