//! `ferrolb-proxy`: will program nftables so ClusterIP, NodePort,
//! LoadBalancer and externalIPs traffic reaches pods (a later issue). Until
//! then it only keeps its caches warm and says so.

use clap::Parser;
use ferrolb_runtime::{CommonArgs, NodeArgs, Runtime, parse_args, ports};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;

/// Routes Service traffic to pods with nftables (kube-proxy replacement).
#[derive(Debug, Parser)]
#[command(name = "ferrolb-proxy", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    node: NodeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse_args(ports::PROXY);
    let mut rt = Runtime::start("proxy", &args.common).await?;
    let client = rt.client.clone();
    let _services = rt.watch(Api::<Service>::all(client.clone()), "services");
    let _slices = rt.watch(Api::<EndpointSlice>::all(client), "endpointslices");
    tracing::warn!(
        node = %args.node.node_name,
        "nftables programming is not implemented yet: this proxy routes nothing"
    );
    let shutdown = rt.shutdown.clone();
    rt.run(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
