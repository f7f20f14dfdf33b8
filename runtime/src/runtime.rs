//! [`Runtime`]: the process skeleton every binary shares.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Endpoints};
use crate::{CommonArgs, Error, Readiness, Result, shutdown, telemetry};

/// Client, readiness, metrics and background tasks of one process.
pub struct Runtime {
    pub component: &'static str,
    pub client: Client,
    pub readiness: Readiness,
    pub registry: Registry,
    /// For metrics whose names are fixed elsewhere (kube-proxy's): served
    /// as registered, without the `ferrolb_` prefix.
    pub unprefixed: Registry,
    pub shutdown: CancellationToken,
    /// Poked on every change any watch cache sees; a loop that reacts to
    /// changes awaits `changes.notified()` (a poke while nobody waits is
    /// kept, so none is lost).
    pub changes: Arc<tokio::sync::Notify>,
    pub(crate) tasks: JoinSet<()>,
    pub(crate) args: CommonArgs,
}

impl Runtime {
    /// Sets up logging, the API client and signal handling.
    pub async fn start(component: &'static str, args: &CommonArgs) -> Result<Self> {
        telemetry::init(args.log_format);
        let client = connect(args).await?;
        let shutdown = shutdown::on_signal().map_err(|source| Error::Bind {
            what: "signal handlers",
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        tracing::info!(component, version = env!("CARGO_PKG_VERSION"), "starting");
        Ok(Self {
            component,
            client,
            readiness: Readiness::default(),
            registry: crate::metrics::registry(component),
            unprefixed: Registry::default(),
            shutdown,
            changes: Arc::new(tokio::sync::Notify::new()),
            tasks: JoinSet::new(),
            args: args.clone(),
        })
    }

    /// Runs `task` in the background until shutdown.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Serves metrics and health, runs `work` and the background tasks, and
    /// returns once a signal arrives or `work` ends.
    pub async fn run(mut self, work: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let state = Arc::new(http::State {
            registry: std::mem::take(&mut self.registry),
            unprefixed: std::mem::take(&mut self.unprefixed),
            readiness: self.readiness.clone(),
        });
        let (metrics, health) = (self.args.metrics_addr, self.args.health_addr);
        if metrics == health {
            let both = Endpoints {
                metrics: true,
                health: true,
            };
            let server = http::bind(metrics, both, state, self.shutdown.clone()).await?;
            self.tasks.spawn(server);
        } else {
            let only_metrics = Endpoints {
                metrics: true,
                health: false,
            };
            let only_health = Endpoints {
                metrics: false,
                health: true,
            };
            let m = http::bind(metrics, only_metrics, state.clone(), self.shutdown.clone()).await?;
            let h = http::bind(health, only_health, state, self.shutdown.clone()).await?;
            self.tasks.spawn(m);
            self.tasks.spawn(h);
        }
        let work = self.tasks.spawn(work).id();
        let shutdown = self.shutdown.clone();
        let finished = tokio::select! {
            _ = shutdown.cancelled() => false,
            // Only the main work ending stops the process; a background task
            // ending (e.g. a watch stream closed by the server) is logged by
            // its own wrapper.
            _ = until_done(&mut self.tasks, work) => true,
        };
        if finished {
            tracing::info!(component = self.component, "main loop ended");
            shutdown.cancel();
        } else {
            // The work saw the cancellation: give it a bounded time to
            // finish or hand over what it owns (the Lease, announced IPs).
            let bound = self.args.shutdown_timeout;
            let started = std::time::Instant::now();
            match tokio::time::timeout(bound, until_done(&mut self.tasks, work)).await {
                Ok(()) => tracing::info!(
                    component = self.component,
                    took_ms = started.elapsed().as_millis() as u64,
                    "finished its work"
                ),
                Err(_) => tracing::warn!(
                    component = self.component,
                    timeout = ?bound,
                    "work did not finish within the shutdown timeout; stopping anyway"
                ),
            }
        }
        // Watches and servers have nothing to hand over.
        self.tasks.shutdown().await;
        tracing::info!(component = self.component, "stopped");
        Ok(())
    }
}

/// Joins tasks until the one with `id` has ended.
async fn until_done(tasks: &mut JoinSet<()>, id: tokio::task::Id) {
    while let Some(done) = tasks.join_next_with_id().await {
        match done {
            Ok((done, ())) if done == id => return,
            Err(e) if e.id() == id => return,
            _ => {}
        }
    }
}

async fn connect(args: &CommonArgs) -> Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(Error::InferConfig)?,
    };
    tracing::info!(server = %config.cluster_url, "API server");
    Client::try_from(config).map_err(Error::Client)
}
