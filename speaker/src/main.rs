//! `ferrolb-speaker`: will answer ARP/NDP for assigned LoadBalancer IPs from
//! exactly one eligible node each (a later issue). Until then it only keeps
//! its caches warm and says so.

use clap::Parser;
use ferrolb_crds::{IPAddressPool, L2Advertisement};
use ferrolb_runtime::{CommonArgs, NodeArgs, Runtime, parse_args, ports};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;

/// Announces LoadBalancer IPs on the local network (ARP/NDP).
#[derive(Debug, Parser)]
#[command(name = "ferrolb-speaker", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    node: NodeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(ports::SPEAKER);
    let mut rt = Runtime::start("speaker", &args.common).await?;
    let client = rt.client.clone();
    let _services = rt.watch(Api::<Service>::all(client.clone()), "services");
    let _pools = rt.watch(Api::<IPAddressPool>::all(client.clone()), "ipaddresspools");
    let _adverts = rt.watch(
        Api::<L2Advertisement>::all(client.clone()),
        "l2advertisements",
    );
    let _nodes = rt.watch(Api::<Node>::all(client), "nodes");
    tracing::warn!(
        node = %args.node.node_name,
        "ARP/NDP announcement is not implemented yet: this speaker announces nothing"
    );
    let shutdown = rt.shutdown.clone();
    rt.run(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
