//! ferrolb-echo: the server every lab pod runs (see `ferrolb_lab::echo`).

use anyhow::Result;
use clap::Parser;
use ferrolb_lab::echo::EchoArgs;

/// Answers TCP (HTTP or not) and UDP with `pod=<name> client=<ip:port>`.
#[derive(Parser, Debug)]
#[command(name = "ferrolb-echo", version)]
struct Cli {
    #[command(flatten)]
    args: EchoArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let EchoArgs { name, tcp, udp } = Cli::parse().args;
    ferrolb_lab::echo::run(name, tcp, udp).await?;
    Ok(())
}
