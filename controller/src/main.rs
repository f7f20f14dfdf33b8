//! `ferrolb-controller`: assigns IPs from IPAddressPools to LoadBalancer
//! Services and explains every refusal. Replicas elect a leader; only the
//! leader writes, and it stops before its Lease can be taken.

use std::time::Duration;

use clap::Parser;
use ferrolb_controller::convert::ClassFilter;
use ferrolb_controller::election::{self, Elector, Fence, KubeLeases, Timing};
use ferrolb_controller::metrics::Metrics;
use ferrolb_controller::plan::Index;
use ferrolb_controller::run::{self, Caches};
use ferrolb_controller::write::Writer;
use ferrolb_crds::IPAddressPool;
use ferrolb_crds::annotations::DEFAULT_LOAD_BALANCER_CLASS;
use ferrolb_runtime::{CommonArgs, Runtime, parse_args, ports};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;
use tokio_util::sync::CancellationToken;

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

    /// Name of the leader-election Lease [default: ferrolb-controller-<class>,
    /// so installs serving different classes never share one].
    #[arg(long)]
    leader_election_lease: Option<String>,

    /// How long the Lease stays valid after its holder last renewed it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    leader_election_lease_duration: Duration,

    /// A leader that could not renew for this long stops writing; shorter
    /// than the lease duration.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    leader_election_renew_deadline: Duration,

    /// Time between Lease attempts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    leader_election_retry_period: Duration,

    /// This replica's identity in the Lease (the pod name in a cluster, so a
    /// restarted pod takes its own Lease back at once).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(ports::CONTROLLER);
    let timing = Timing {
        lease: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry: args.leader_election_retry_period,
        ..Timing::default()
    };
    timing
        .validate()
        .map_err(|e| anyhow::anyhow!("leader election flags: {e}"))?;
    let mut rt = Runtime::start("controller", &args.common).await?;
    let client = rt.client.clone();
    let caches = Caches {
        services: rt.watch(Api::<Service>::all(client.clone()), "services"),
        pools: rt.watch(Api::<IPAddressPool>::all(client.clone()), "ipaddresspools"),
        namespaces: rt.watch(Api::<Namespace>::all(client.clone()), "namespaces"),
    };
    let metrics = Metrics::register(&mut rt.registry);
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let lease = args
        .leader_election_lease
        .clone()
        .unwrap_or_else(|| election::lease_name(&args.load_balancer_class));
    let leases = KubeLeases::new(client.clone(), &args.leader_election_namespace, &lease);
    let (elector, term) = Elector::new(leases, &lease, &identity, timing);
    let fence = Fence::new(term, rt.shutdown.clone());
    let stop_campaign = CancellationToken::new();
    let campaign = tokio::spawn(elector.run(stop_campaign.clone()));

    let filter = ClassFilter {
        class: args.load_balancer_class.clone(),
        classless: !args.ignore_classless,
    };
    tracing::info!(class = %filter.class, classless = filter.classless, %identity, %lease, "serving LoadBalancer Services");
    let writer = Writer::new(client, identity);
    let changes = rt.changes.clone();
    let shutdown = rt.shutdown.clone();
    rt.run(async move {
        run::run(
            Index::new(filter),
            caches,
            writer,
            metrics,
            changes,
            fence,
            shutdown,
        )
        .await;
        // No write is in flight any more: now the Lease may go.
        stop_campaign.cancel();
        let _ = campaign.await;
    })
    .await?;
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "controller".into());
    format!("{host}-{}", std::process::id())
}
