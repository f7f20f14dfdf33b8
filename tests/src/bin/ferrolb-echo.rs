//! ferrolb-echo: the server every lab pod runs (see `ferrolb_lab::echo`).

use anyhow::{Context, Result};
use clap::Parser;

/// Answers TCP (HTTP or not) and UDP with `pod=<name> client=<ip:port>`.
#[derive(Parser, Debug)]
#[command(name = "ferrolb-echo", version)]
struct Args {
    /// Pod name to report.
    #[arg(long, env = "POD_NAME")]
    name: String,
    /// TCP port to listen on (repeatable).
    #[arg(long)]
    tcp: Vec<u16>,
    /// UDP port to listen on (repeatable).
    #[arg(long)]
    udp: Vec<u16>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut tasks = tokio::task::JoinSet::new();
    for port in args.tcp {
        let name = args.name.clone();
        tasks.spawn(async move {
            ferrolb_lab::echo::serve_tcp(name, port)
                .await
                .with_context(|| format!("tcp port {port}"))
        });
    }
    for port in args.udp {
        let name = args.name.clone();
        tasks.spawn(async move {
            ferrolb_lab::echo::serve_udp(name, port)
                .await
                .with_context(|| format!("udp port {port}"))
        });
    }
    eprintln!("ferrolb-echo: serving as pod {}", args.name);
    match tasks.join_next().await {
        // A pod without ports still "runs", like a container that only sleeps.
        None => std::future::pending::<Result<()>>().await,
        Some(r) => r.context("listener task")?,
    }
}
