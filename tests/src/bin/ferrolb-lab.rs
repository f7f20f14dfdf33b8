//! ferrolb-lab: a real Kubernetes control plane with nodes, pods and a client
//! as network namespaces. See `ferrolb-lab --help` and shared/LAB.md.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ferrolb_lab::addresses::IpFamily;
use ferrolb_lab::commands;
use ferrolb_lab::names::{Component, Prefix, Target, parse_node};
use ferrolb_lab::state::{ProxyMode, StateDir, UpOptions};

#[derive(Parser, Debug)]
#[command(
    name = "ferrolb-lab",
    version,
    about = "The FerroLB lab: a real cluster in network namespaces"
)]
struct Cli {
    /// Prefix of every namespace, link and process of this lab (1-8 of a-z0-9).
    #[arg(long, global = true, env = "FERROLB_LAB_PREFIX", default_value = "flb")]
    prefix: Prefix,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct UpArgs {
    /// Number of nodes (1-9).
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    #[arg(long, value_enum, default_value = "ipv4")]
    ip_family: IpFamily,
    /// Data plane in the node namespaces.
    #[arg(long, value_enum, default_value = "ferrolb")]
    proxy: ProxyMode,
    /// Run none of FerroLB's components.
    #[arg(long)]
    no_ferrolb: bool,
}

impl UpArgs {
    fn options(&self) -> UpOptions {
        UpOptions {
            nodes: self.nodes,
            ip_family: self.ip_family,
            proxy: self.proxy,
            ferrolb: !self.no_ferrolb,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the lab in the background; prints `export KUBECONFIG=...` last.
    Up(UpArgs),
    /// Remove everything the lab created.
    Down,
    /// Namespaces, processes and their health.
    Status,
    /// Run a command in `client`, `node-N` or `pod/NAMESPACE/NAME`.
    Exec {
        target: Target,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// SIGKILL a component (controller, speaker[@node-N], proxy[@node-N],
    /// kube-proxy[@node-N], ...) or a pod's container (pod/NAMESPACE/NAME).
    Kill { what: String },
    /// SIGTERM a component and wait for it to exit (a graceful stop).
    Stop { component: Component },
    /// Start a component again.
    Start { component: Component },
    /// Roll a component as a DaemonSet with maxSurge 1 does: start the new
    /// process, wait until it is ready, then SIGTERM the old one (each node
    /// in turn for `speaker` or `proxy`).
    Restart { component: Component },
    /// Stop kube-apiserver and start it again; prints how long it took.
    RestartApiserver,
    /// Cut or restore a node's LAN link.
    Link {
        node: String,
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// Print a component's log (component[@node-N], supervisor, or pod/NS/NAME).
    Logs {
        component: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Up, a pool, a Deployment and a LoadBalancer Service, then curl it.
    Demo(UpArgs),
    /// (internal) the echo server, for when ferrolb-echo is not built.
    #[command(hide = true)]
    Echo(ferrolb_lab::echo::EchoArgs),
    /// (internal) client-side probes of the speaker tests and benchmark.
    #[command(hide = true, subcommand)]
    L2(L2),
    /// (internal) the background process behind `up`.
    #[command(hide = true)]
    Supervise,
}

/// The probes of `ferrolb_lab::l2probe`; each prints JSON.
#[derive(Subcommand, Debug)]
enum L2 {
    /// Ask who has IP on the LAN every interval; list who answered.
    Watch {
        ip: std::net::IpAddr,
        #[arg(long, default_value = "eth0")]
        interface: String,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        /// End early once this long has passed and ...
        #[arg(long, requires = "calm_ms")]
        min_ms: Option<u64>,
        /// ... the answers have come from one MAC for this long.
        #[arg(long, requires = "min_ms")]
        calm_ms: Option<u64>,
    },
    /// Ms until this namespace's neighbour entry for IP leaves MAC.
    NeighChange {
        ip: std::net::IpAddr,
        from: String,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// A UDP datagram to ADDR every interval; which pod answered each.
    Udp {
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 10)]
        every_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 250)]
        wait_ms: u64,
    },
    /// RATE TCP requests per second to ADDR, each a new connection.
    Steady {
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 50)]
        rate: u32,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

async fn l2(what: L2) -> Result<()> {
    use ferrolb_lab::l2probe;
    use std::time::Duration;
    let ms = Duration::from_millis;
    let json = match what {
        L2::Watch {
            ip,
            interface,
            interval_ms,
            duration_ms,
            min_ms,
            calm_ms,
        } => {
            let settle = min_ms.zip(calm_ms).map(|(m, c)| (ms(m), ms(c)));
            serde_json::to_string(
                &l2probe::neighbour_watch_until(
                    &interface,
                    ip,
                    ms(interval_ms),
                    ms(duration_ms),
                    settle,
                )
                .await?,
            )?
        }
        L2::NeighChange {
            ip,
            from,
            timeout_ms,
        } => serde_json::to_string(&l2probe::neighbour_change(ip, &from, ms(timeout_ms))?)?,
        L2::Udp {
            to,
            every_ms,
            duration_ms,
            wait_ms,
        } => serde_json::to_string(
            &l2probe::udp_probe(to, ms(every_ms), ms(duration_ms), ms(wait_ms)).await?,
        )?,
        L2::Steady {
            to,
            rate,
            duration_ms,
            timeout_ms,
        } => serde_json::to_string(
            &l2probe::steady(to, rate, ms(duration_ms), ms(timeout_ms)).await?,
        )?,
    };
    println!("{json}");
    Ok(())
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let prefix = cli.prefix;
    match cli.command {
        Cmd::Up(a) => {
            let kubeconfig = commands::up(&prefix, &a.options()).await?;
            println!("export KUBECONFIG={}", kubeconfig.display());
        }
        Cmd::Down => commands::down(&prefix)?,
        Cmd::Status => commands::status(&prefix)?,
        Cmd::Exec { target, cmd } => {
            let code = commands::exec(&prefix, &target, &cmd)?;
            std::process::exit(code);
        }
        Cmd::Kill { what } => match what.parse::<Target>() {
            Ok(Target::Pod { namespace, name }) => commands::kill_pod(&prefix, &namespace, &name)?,
            _ => {
                let component: Component = what.parse()?;
                commands::controllable(&component)?;
                commands::kill(&prefix, &component)?;
            }
        },
        Cmd::Stop { component } => {
            commands::controllable(&component)?;
            println!("{}", commands::stop(&prefix, &component)?);
        }
        Cmd::Start { component } => {
            commands::controllable(&component)?;
            println!(
                "{}",
                commands::request(&StateDir::new(&prefix), &format!("start {component}"))?
            );
        }
        Cmd::Restart { component } => {
            commands::controllable(&component)?;
            println!(
                "{}",
                commands::request(&StateDir::new(&prefix), &format!("restart {component}"))?
            );
        }
        Cmd::RestartApiserver => println!(
            "{}",
            commands::request(&StateDir::new(&prefix), "restart-apiserver")?
        ),
        Cmd::Link { node, state } => {
            let n = parse_node(&node)?;
            println!(
                "{}",
                commands::request(&StateDir::new(&prefix), &format!("link node-{n} {state}"))?
            );
        }
        Cmd::Logs { component, follow } => commands::logs(&prefix, &component, follow)?,
        Cmd::Demo(a) => ferrolb_lab::demo::run(&prefix, &a.options()).await?,
        Cmd::Echo(a) => ferrolb_lab::echo::run(a.name, a.tcp, a.udp).await?,
        Cmd::L2(what) => l2(what).await?,
        Cmd::Supervise => {
            init_tracing();
            ferrolb_lab::supervisor::run(prefix).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_contract_parses() {
        let c = Cli::try_parse_from([
            "ferrolb-lab",
            "up",
            "--nodes",
            "2",
            "--ip-family",
            "dual",
            "--proxy",
            "kube-proxy",
            "--no-ferrolb",
        ])
        .unwrap();
        let Cmd::Up(a) = c.command else {
            panic!("not up")
        };
        assert_eq!(
            a.options(),
            UpOptions {
                nodes: 2,
                ip_family: IpFamily::Dual,
                proxy: ProxyMode::KubeProxy,
                ferrolb: false
            }
        );
        let c = Cli::try_parse_from([
            "ferrolb-lab",
            "exec",
            "pod/default/web-1",
            "--",
            "curl",
            "-s",
            "x",
        ])
        .unwrap();
        let Cmd::Exec { target, cmd } = c.command else {
            panic!("not exec")
        };
        assert_eq!(target, "pod/default/web-1".parse().unwrap());
        assert_eq!(cmd, ["curl", "-s", "x"]);
        assert!(Cli::try_parse_from(["ferrolb-lab", "kill", "speaker@node-2"]).is_ok());
        assert!(Cli::try_parse_from(["ferrolb-lab", "link", "node-1", "sideways"]).is_err());
        assert!(Cli::try_parse_from(["ferrolb-lab", "--prefix", "BAD", "down"]).is_err());
        let c = Cli::try_parse_from(["ferrolb-lab", "--prefix", "flbt", "demo"]).unwrap();
        assert_eq!(c.prefix.as_str(), "flbt");
    }
}
