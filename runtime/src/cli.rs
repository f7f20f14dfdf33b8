//! Flags every binary shares. Each flag can also come from the environment,
//! which is how the Helm chart configures the pods.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags shared by the controller, the speaker and the proxy.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Kubeconfig file to use; without it the client is configured from
    /// KUBECONFIG, ~/.kube/config or the in-cluster service account.
    #[arg(long, env = "FERROLB_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "FERROLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address serving Prometheus metrics at /metrics.
    #[arg(long, env = "FERROLB_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,

    /// Address serving /healthz and /readyz; may equal --metrics-addr.
    #[arg(long, env = "FERROLB_HEALTH_ADDR")]
    pub health_addr: SocketAddr,

    /// Longest graceful shutdown after SIGTERM: the time a component has to
    /// finish or hand over what it owns before it exits anyway. Keep it well
    /// under the pod's terminationGracePeriodSeconds (30 s by default).
    #[arg(long, env = "FERROLB_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: std::time::Duration,
}

/// Flags of the per-node components (speaker, proxy).
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Name of the Node this process runs on (the chart sets it from the
    /// downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
}

/// Default listen addresses of one binary. Components sharing a host network
/// (speaker, proxy) must not collide, so each binary brings its own.
#[derive(Debug, Clone, Copy)]
pub struct DefaultPorts {
    pub metrics: u16,
    pub health: u16,
}

/// Parses the process arguments into `T`, with `ports` as the defaults of
/// `--metrics-addr` and `--health-addr`.
pub fn parse_args<T: CommandFactory + FromArgMatches>(ports: DefaultPorts) -> T {
    parse_args_from(ports, std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// Like [`parse_args`] over an explicit argument list; errors instead of
/// exiting, for tests.
pub fn parse_args_from<T, I, S>(ports: DefaultPorts, args: I) -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let metrics = format!("0.0.0.0:{}", ports.metrics);
    let health = format!("0.0.0.0:{}", ports.health);
    let mut matches = T::command()
        .mut_arg("metrics_addr", |a| a.default_value(metrics).required(false))
        .mut_arg("health_addr", |a| a.default_value(health).required(false))
        .try_get_matches_from(args)?;
    T::from_arg_matches_mut(&mut matches)
}
