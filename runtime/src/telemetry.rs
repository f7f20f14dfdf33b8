//! Logging setup. `RUST_LOG` overrides the default level (info).

use tracing_subscriber::{EnvFilter, fmt};

use crate::LogFormat;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let builder = fmt().with_env_filter(filter).with_target(true);
    // A second init (tests) is not an error worth stopping for.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
