//! What every FerroLB binary does the same way: flags and environment,
//! logging, the API client, `/metrics` + `/healthz` + `/readyz`, watch caches
//! that gate readiness, and a prompt exit on SIGTERM/SIGINT.
//!
//! A binary builds a [`Runtime`], starts its watches through it, registers its
//! metrics, then calls [`Runtime::run`] with its domain loop.

pub mod cli;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod ports;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod testing;
pub mod watch;

pub use cli::{CommonArgs, DefaultPorts, LogFormat, NodeArgs, parse_args};
pub use health::Readiness;
pub use runtime::Runtime;

/// Errors of the shared plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration (no --kubeconfig, KUBECONFIG or in-cluster service account): {0}"
    )]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("building the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
