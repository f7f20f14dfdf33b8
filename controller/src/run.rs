//! The controller's loop: on every cache change (debounced), if leading, run
//! a pass and perform its plan.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrolb_crds::IPAddressPool;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::Store;
use tokio::sync::{Notify, watch};

use crate::allocator::ServiceKey;
use crate::convert;
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

pub struct Caches {
    pub services: Store<Service>,
    pub pools: Store<IPAddressPool>,
    pub namespaces: Store<Namespace>,
}

pub async fn run(
    mut index: Index,
    caches: Caches,
    writer: Writer,
    metrics: Metrics,
    changes: Arc<Notify>,
    mut leading: watch::Receiver<bool>,
) {
    // Nothing is decided before every cache has its first full list: a
    // partial Service list would look like free IPs.
    // These are the only waiters on the stores (see ferrolb_runtime::watch).
    let synced = tokio::try_join!(
        caches.services.wait_until_ready(),
        caches.pools.wait_until_ready(),
        caches.namespaces.wait_until_ready(),
    );
    if synced.is_err() {
        return;
    }
    let mut was_leader = false;
    // After failed writes (e.g. the API server restarting) the pass is
    // retried soon, backing off up to RESYNC.
    let mut retry = RETRY_MIN;
    loop {
        let mut failures = 0;
        let leader = *leading.borrow();
        metrics.leader.set(i64::from(leader));
        if leader != was_leader {
            // A new term starts from the Service statuses, never from what
            // this replica remembered from an older term.
            index.reset();
            was_leader = leader;
        }
        if leader {
            let started = Instant::now();
            let (plan, uids) = pass(&mut index, &caches);
            failures = perform(&mut index, &writer, &metrics, &plan, &uids).await;
            metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.observe_pools(&index.allocator().stats());
            metrics
                .services_allocated
                .set(index.allocator().assignments().len() as i64);
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
            _ = changes.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = leading.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn pass(index: &mut Index, caches: &Caches) -> (Plan, HashMap<ServiceKey, String>) {
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
    let uids = services
        .iter()
        .filter_map(|s| Some((convert::service_key(s), s.metadata.uid.clone()?)))
        .collect();
    let plan = index.pass(&Inputs {
        pools: &pools,
        services: &services,
        namespaces: &namespaces,
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    });
    (plan, uids)
}

/// Performs the plan; returns how many writes failed.
async fn perform(
    index: &mut Index,
    writer: &Writer,
    metrics: &Metrics,
    plan: &Plan,
    uids: &HashMap<ServiceKey, String>,
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
    let failed: Vec<ServiceKey> = futures::stream::iter(plan.services.clone())
        .map(|w| async move {
            match writer.service(&w).await {
                Ok(()) => None,
                Err(error) => {
                    tracing::warn!(service = %w.key, %error, "writing the Service failed; will retry");
                    Some(w.key.clone())
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .filter_map(|k| async move { k })
        .collect()
        .await;
    let mut failures = failed.len();
    for key in &failed {
        metrics.write_errors.inc();
        index.unsettle(key);
    }
    for w in &plan.pools {
        if let Err(error) = writer.pool(w).await {
            failures += 1;
            metrics.write_errors.inc();
            tracing::warn!(pool = %w.name, %error, "writing the pool status failed");
        }
    }
    futures::stream::iter(plan.events.clone())
        .for_each_concurrent(CONCURRENCY, |e| async move {
            tracing::info!(service = %e.service, reason = e.reason, message = %e.message, "event");
            if let Err(error) = writer.event(&e, uids).await {
                tracing::warn!(service = %e.service, %error, "publishing an event failed");
            }
        })
        .await;
    failures
}
