//! The controller's loop: on every cache change (debounced), if leading, run
//! a pass and perform its plan, each write fenced by the term it was planned
//! in.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use ferrolb_crds::IPAddressPool;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::allocator::ServiceKey;
use crate::election::Fence;
use crate::metrics::{Metrics, ReasonLabels};
use crate::plan::{Index, Inputs, Plan};
use crate::write::Writer;

/// Changes arriving this close together are handled in one pass.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A pass also runs this often without changes, to retry failed writes.
const RESYNC: Duration = Duration::from_secs(30);
/// First retry delay after failed writes.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Writes in flight at once.
const CONCURRENCY: usize = 16;
/// Longest one write may take; a write still running when its term's Lease
/// lapses is abandoned earlier (see [`Fence::permits`]).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Caches {
    pub services: Store<Service>,
    pub pools: Store<IPAddressPool>,
    pub namespaces: Store<Namespace>,
}

/// Runs passes until `shutdown`; returns once no write is in flight, so the
/// caller may then release the Lease.
pub async fn run(
    mut index: Index,
    caches: Caches,
    writer: Writer,
    metrics: Metrics,
    changes: std::sync::Arc<Notify>,
    mut fence: Fence,
    shutdown: CancellationToken,
) {
    // Nothing is decided before every cache has its first full list: a
    // partial Service list would look like free IPs.
    // These are the only waiters on the stores (see ferrolb_runtime::watch).
    let synced = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = async {
            tokio::try_join!(
                caches.services.wait_until_ready(),
                caches.pools.wait_until_ready(),
                caches.namespaces.wait_until_ready(),
            )
        } => r,
    };
    if synced.is_err() {
        return;
    }
    // The term the index was built in: any other term, even one that came
    // and went during a pass, starts again from the Service statuses.
    let mut index_term = None;
    // After failed writes (e.g. the API server restarting) the pass is
    // retried soon, backing off up to RESYNC.
    let mut retry = RETRY_MIN;
    while !shutdown.is_cancelled() {
        let term = fence.current();
        metrics.leader.set(i64::from(term.leading));
        if index_term != Some(term.id) {
            index.reset();
            index_term = Some(term.id);
        }
        let mut failures = 0;
        if term.leading {
            let started = Instant::now();
            let plan = pass(&mut index, &caches);
            failures = perform(&mut index, &writer, &metrics, &plan, &fence, term.id).await;
            metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.observe_pools(&index.allocator().stats());
            metrics
                .services_allocated
                .set(index.allocator().holders() as i64);
            metrics.services_pending.set(plan.pending as i64);
        }
        let wait = if failures > 0 {
            let now = retry;
            retry = (retry * 2).min(RESYNC);
            now
        } else {
            retry = RETRY_MIN;
            RESYNC
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = changes.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = fence.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    metrics.leader.set(0);
}

fn pass(index: &mut Index, caches: &Caches) -> Plan {
    let services = caches.services.state();
    let pools = caches.pools.state();
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = caches
        .namespaces
        .state()
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    index.pass(&Inputs {
        pools: &pools,
        services: &services,
        namespaces: &namespaces,
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    })
}

/// Why a write did not happen.
enum Skipped {
    /// The term ended (or shutdown began) before it could start.
    Fenced,
    Failed(String),
}

/// Runs `write` if the term still permits it, bounded by the time its Lease
/// has left.
async fn fenced<F, T>(fence: &Fence, term: u64, metrics: &Metrics, write: F) -> Result<T, Skipped>
where
    F: Future<Output = Result<T, kube::Error>>,
{
    let Some(left) = fence.permits(term) else {
        return Err(Skipped::Fenced);
    };
    metrics.writes.inc();
    let limit = left.min(WRITE_TIMEOUT);
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Skipped::Failed(e.to_string())),
        Err(_) => Err(Skipped::Failed(format!("no answer within {limit:?}"))),
    }
}

/// Performs the plan; returns how many writes failed. Each write first
/// checks that `term` is still current and fresh; once it is not, the
/// remaining writes are skipped (the next term starts from scratch).
async fn perform(
    index: &mut Index,
    writer: &Writer,
    metrics: &Metrics,
    plan: &Plan,
    fence: &Fence,
    term: u64,
) -> usize {
    for reason in &plan.failures {
        metrics
            .allocation_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
    // Owned items keep the futures free of borrowed-argument lifetimes,
    // which the Send check on the spawned loop cannot see through.
    let results: Vec<(ServiceKey, Result<(), Skipped>)> =
        futures::stream::iter(plan.services.clone())
            .map(|w| async move {
                let r = fenced(fence, term, metrics, writer.service(&w)).await;
                (w.key, r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let mut failures = 0;
    for (key, result) in results {
        match result {
            Ok(()) => {}
            Err(Skipped::Fenced) => index.unsettle(&key),
            Err(Skipped::Failed(error)) => {
                tracing::warn!(service = %key, %error, "writing the Service failed; will retry");
                failures += 1;
                metrics.write_errors.inc();
                index.unsettle(&key);
            }
        }
    }
    for w in &plan.pools {
        match fenced(fence, term, metrics, writer.pool(w)).await {
            Ok(()) | Err(Skipped::Fenced) => {}
            Err(Skipped::Failed(error)) => {
                failures += 1;
                metrics.write_errors.inc();
                tracing::warn!(pool = %w.name, %error, "writing the pool status failed");
            }
        }
    }
    futures::stream::iter(plan.events.clone())
        .for_each_concurrent(CONCURRENCY, |e| async move {
            tracing::info!(service = %e.service, reason = e.reason, message = %e.message, "event");
            if let Err(Skipped::Failed(error)) =
                fenced(fence, term, metrics, writer.event(&e)).await
            {
                tracing::warn!(service = %e.service, %error, "publishing an event failed");
            }
        })
        .await;
    failures
}
