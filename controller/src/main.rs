//! `ferrolb-controller`: watches IPAddressPools and Services and will assign
//! LoadBalancer IPs (issue #4). Until the allocator lands it only keeps its
//! caches warm and says so.

use clap::Parser;
use ferrolb_crds::IPAddressPool;
use ferrolb_runtime::{CommonArgs, DefaultPorts, Runtime, parse_args};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;

/// Assigns external IPs from IPAddressPools to LoadBalancer Services.
#[derive(Debug, Parser)]
#[command(name = "ferrolb-controller", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
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
    let _services = rt.watch(Api::<Service>::all(client.clone()), "services");
    let _pools = rt.watch(Api::<IPAddressPool>::all(client.clone()), "ipaddresspools");
    let _namespaces = rt.watch(Api::<Namespace>::all(client), "namespaces");
    tracing::warn!("IP allocation is not implemented yet: Services keep their current status");
    rt.run(std::future::pending()).await?;
    Ok(())
}
