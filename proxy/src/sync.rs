//! The proxy's loop: on every change of Services, EndpointSlices, the Node
//! or ServiceCIDRs (rate-limited), render the ruleset of each family, send
//! the kernel only the difference from what it holds, then clean stale UDP
//! conntrack entries and bring the health-check servers in line.
//!
//! The committed rulesets are kept in memory: the kernel is never listed on
//! this path. A partial update the kernel refuses is followed at once by a
//! full rebuild, counted in `ferrolb_proxy_full_resyncs_total`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use nlink::netlink::{Connection, Netfilter};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conntrack;
use crate::diff;
use crate::health::{self, ProxierHealth, ServiceHealth};
use crate::metrics::KubeProxyMetrics;
use crate::model::{self, NodeFacts, ServicePort};
use crate::netlink::Nft;
use crate::render::{self, Config, Inputs, Rendered};
use crate::ruleset::{Family, Ruleset};

/// kube-proxy's endpoint-change trigger time annotation.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub struct Caches {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// Only our own Node.
    pub nodes: Store<Node>,
    pub service_cidrs: Store<ServiceCIDR>,
}

/// What the loop needs besides the caches.
pub struct Settings {
    pub config: Config,
    pub node_name: String,
    pub families: Vec<Family>,
    /// `--min-sync-period`: syncs never run closer than this, after a
    /// burst of two.
    pub min_sync_period: Duration,
    /// `--sync-period`: the retry delay after a failed sync.
    pub sync_period: Duration,
}

/// A token bucket of two: kube-proxy's bounded-frequency runner.
#[derive(Debug, Clone)]
pub struct Limiter {
    interval: Duration,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    const BURST: f64 = 2.0;

    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            tokens: Self::BURST,
            last: now,
        }
    }

    /// How long to wait before the next sync may run; takes a token when
    /// it may run now.
    pub fn wait(&mut self, now: Instant) -> Duration {
        if self.interval.is_zero() {
            return Duration::ZERO;
        }
        let earned =
            now.saturating_duration_since(self.last).as_secs_f64() / self.interval.as_secs_f64();
        self.tokens = (self.tokens + earned).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            self.interval.mul_f64(1.0 - self.tokens)
        }
    }
}

/// The shell around [`render`], [`diff`] and the kernel.
pub struct Proxy {
    settings: Settings,
    caches: Caches,
    nft: Nft,
    conntrack: Option<Connection<Netfilter>>,
    committed: BTreeMap<Family, Ruleset>,
    metrics: KubeProxyMetrics,
    health: Arc<ProxierHealth>,
    service_health: ServiceHealth,
    events: ferrolb_runtime::events::EventSink,
    /// Resource versions of the slices and Services seen by the last sync,
    /// to count changes and observe programming latency once each.
    seen_slices: HashMap<String, String>,
    seen_services: HashMap<String, String>,
    started: SystemTime,
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        caches: Caches,
        nft: Nft,
        metrics: KubeProxyMetrics,
        health: Arc<ProxierHealth>,
        service_health: ServiceHealth,
        events: ferrolb_runtime::events::EventSink,
    ) -> Self {
        let conntrack = match Connection::<Netfilter>::new() {
            Ok(c) => Some(c),
            Err(error) => {
                tracing::warn!(%error, "no conntrack netlink socket: stale UDP entries will not be cleaned");
                None
            }
        };
        Self {
            settings,
            caches,
            nft,
            conntrack,
            committed: BTreeMap::new(),
            metrics,
            health,
            service_health,
            events,
            seen_slices: HashMap::new(),
            seen_services: HashMap::new(),
            started: SystemTime::now(),
        }
    }

    /// Syncs until `shutdown`. Nothing is programmed before every cache
    /// holds its first full list (a partial list would drop live Services).
    pub async fn run(mut self, changes: Arc<Notify>, shutdown: CancellationToken) {
        let synced = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = async {
                tokio::try_join!(
                    self.caches.services.wait_until_ready(),
                    self.caches.slices.wait_until_ready(),
                    self.caches.nodes.wait_until_ready(),
                    self.caches.service_cidrs.wait_until_ready(),
                )
            } => r,
        };
        if synced.is_err() {
            return;
        }
        for f in &self.settings.families {
            self.health.updated(*f);
        }
        let mut limiter = Limiter::new(self.settings.min_sync_period, Instant::now());
        loop {
            for f in &self.settings.families {
                self.health.queued(*f);
                self.metrics.sync_queued(*f, SystemTime::now());
            }
            let wait = limiter.wait(Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let _ = limiter.wait(Instant::now());
            }
            let ok = self.sync().await;
            let retry_after = (!ok).then_some(self.settings.sync_period);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.notified() => {}
                _ = async {
                    match retry_after {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    fn node(&self) -> NodeFacts {
        let (facts, node) = node_facts(&self.caches, &self.settings.node_name);
        if let Some(n) = &node {
            self.health.set_node_eligible(health::node_eligible(n));
        }
        facts
    }

    /// One pass over every family; true when the kernel took everything.
    pub async fn sync(&mut self) -> bool {
        let services = self.caches.services.state();
        let slices = self.caches.slices.state();
        let node = self.node();
        self.count_changes(&services, &slices);
        let rendered = render_all(&self.settings, &self.caches, &node);

        let mut ok = true;
        let mut wanted_health = BTreeMap::new();
        for (family, rendered) in &rendered {
            for (key, hc) in &rendered.health {
                let entry = wanted_health.entry(key.clone()).or_insert(health::Wanted {
                    port: hc.port,
                    local_endpoints: 0,
                });
                entry.local_endpoints = entry.local_endpoints.max(hc.local_endpoints);
            }
            if !self.program(*family, rendered).await {
                ok = false;
                continue;
            }
            self.clean_conntrack(*family, rendered).await;
        }
        if ok {
            self.observe_programming(&slices);
        }
        let listen: Vec<IpAddr> = self
            .settings
            .families
            .iter()
            .flat_map(|f| self.settings.config.nodeport_addresses.select(&node, *f))
            .collect();
        let failed = self.service_health.sync(wanted_health, &listen).await;
        for (key, error) in failed {
            self.warn_health_check(&services, &key, &error).await;
        }
        ok
    }

    /// Brings the kernel's table of `family` to `rendered`; true on success.
    async fn program(&mut self, family: Family, rendered: &Rendered) -> bool {
        let desired = &rendered.ruleset;
        let started = Instant::now();
        let (ops, full) = match self
            .committed
            .get(&family)
            .map(|old| diff::diff(old, desired))
        {
            Some(Some(ops)) => (ops, false),
            Some(None) => {
                self.metrics.full_resync("layout-changed");
                (diff::full(desired), true)
            }
            None => (diff::full(desired), true),
        };
        let mut result = if ops.is_empty() {
            Ok(())
        } else {
            self.nft.commit(desired, &ops).await
        };
        if let Err(error) = &result
            && !full
        {
            // The kernel and our memory disagree: rebuild the table whole.
            tracing::warn!(family = family.label(), %error, ops = ops.len(), "partial update refused; rebuilding the table");
            self.metrics.nftables_sync_failed(family);
            self.metrics.full_resync("partial-update-failed");
            result = self.nft.commit(desired, &diff::full(desired)).await;
        }
        let took = started.elapsed();
        match result {
            Ok(()) => {
                self.metrics.observe_sync(family, full, took);
                self.metrics.sync_succeeded(family, SystemTime::now());
                self.metrics.set_no_local_endpoints(
                    family,
                    rendered.no_local_internal,
                    rendered.no_local_external,
                );
                self.metrics.set_ruleset_size(
                    family,
                    desired.chains.len(),
                    desired.element_count(),
                );
                self.health.updated(family);
                if !ops.is_empty() {
                    tracing::debug!(
                        family = family.label(),
                        full,
                        elements = diff::element_changes(&ops),
                        took_us = took.as_micros() as u64,
                        "synced"
                    );
                }
                self.committed.insert(family, desired.clone());
                true
            }
            Err(error) => {
                tracing::error!(family = family.label(), %error, "the kernel refused the ruleset; retrying after the sync period");
                self.metrics.nftables_sync_failed(family);
                // Unknown state: the next attempt rebuilds.
                self.committed.remove(&family);
                false
            }
        }
    }

    async fn clean_conntrack(&self, family: Family, rendered: &Rendered) {
        let Some(conn) = &self.conntrack else { return };
        match conntrack::cleanup(conn, family, &rendered.udp).await {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.conntrack_deleted(family, n);
                tracing::debug!(
                    family = family.label(),
                    deleted = n,
                    "stale UDP conntrack entries removed"
                );
            }
            Err(error) => tracing::warn!(%error, "conntrack cleanup failed"),
        }
    }

    /// Counts Service and EndpointSlice changes since the last sync.
    fn count_changes(&mut self, services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) {
        let changed = |seen: &HashMap<String, String>, uid: Option<String>, rv: Option<String>| {
            uid.is_some_and(|u| seen.get(&u) != rv.as_ref())
        };
        let svc_changes = services
            .iter()
            .filter(|s| changed(&self.seen_services, s.uid(), s.resource_version()))
            .count();
        let slice_changes = slices
            .iter()
            .filter(|s| changed(&self.seen_slices, s.uid(), s.resource_version()))
            .count();
        for _ in 0..svc_changes {
            self.metrics.service_changed();
        }
        for _ in 0..slice_changes {
            self.metrics.endpoints_changed();
        }
        self.metrics.set_pending(slice_changes, svc_changes);
        self.seen_services = services
            .iter()
            .filter_map(|s| Some((s.uid()?, s.resource_version().unwrap_or_default())))
            .collect();
    }

    /// After a successful sync: how long each changed slice took from its
    /// trigger time to the kernel.
    fn observe_programming(&mut self, slices: &[Arc<EndpointSlice>]) {
        let now = SystemTime::now();
        let mut seen = HashMap::with_capacity(slices.len());
        for s in slices {
            let (Some(uid), rv) = (s.uid(), s.resource_version().unwrap_or_default()) else {
                continue;
            };
            if self.seen_slices.get(&uid) != Some(&rv)
                && let Some(trigger) = s.annotations().get(TRIGGER_TIME)
            {
                let family = match s.address_type.as_str() {
                    "IPv6" => Family::V6,
                    _ => Family::V4,
                };
                self.metrics
                    .observe_trigger_time(family, self.started, trigger, now);
            }
            seen.insert(uid, rv);
        }
        self.seen_slices = seen;
        self.metrics.set_pending(0, 0);
    }

    async fn warn_health_check(
        &self,
        services: &[Arc<Service>],
        key: &health::ServiceKey,
        error: &str,
    ) {
        let uid = services
            .iter()
            .find(|s| s.namespace().as_deref() == Some(&key.namespace) && s.name_any() == key.name)
            .and_then(|s| s.uid());
        let regarding = ferrolb_runtime::events::service_ref(&key.namespace, &key.name, uid);
        let note = format!(
            "could not start the health check server on node {}: {error}",
            self.settings.node_name
        );
        if let Err(e) = self
            .events
            .publish(&ferrolb_runtime::events::EventData {
                regarding,
                type_: ferrolb_runtime::events::EventType::Warning,
                reason: "FailedToStartServiceHealthcheck",
                action: "Listen",
                note: &note,
            })
            .await
        {
            tracing::warn!(service = %key, error = %e, "publishing an event failed");
        }
    }

    /// The rulesets the kernel holds now (for `--print-ruleset` and tests).
    pub fn committed(&self) -> &BTreeMap<Family, Ruleset> {
        &self.committed
    }

    /// Removes our tables (on `--cleanup`).
    pub async fn cleanup(nft: &Nft, table: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for family in [Family::V4, Family::V6] {
            if let Err(e) = nft.remove_table(family, table).await {
                errors.push(format!("{}: {e}", family.label()));
            }
        }
        errors
    }
}

/// The ruleset of every family for what the caches hold now.
pub fn render_all(
    settings: &Settings,
    caches: &Caches,
    node: &NodeFacts,
) -> Vec<(Family, Rendered)> {
    let services = caches.services.state();
    let slices = caches.slices.state();
    let ports: Vec<ServicePort> = services
        .iter()
        .flat_map(|s| model::service_ports(s))
        .collect();
    let cidrs: Vec<IpNet> = caches
        .service_cidrs
        .state()
        .iter()
        .flat_map(|c| {
            c.spec
                .as_ref()
                .and_then(|s| s.cidrs.clone())
                .unwrap_or_default()
        })
        .filter_map(|c| c.parse().ok())
        .collect();
    settings
        .families
        .iter()
        .map(|family| {
            let eps = model::endpoints(slices.iter().map(|s| s.as_ref()), *family, &node.name);
            let rendered = render::render(
                *family,
                &settings.config,
                &Inputs {
                    ports: &ports,
                    endpoints: &eps,
                    node,
                    service_cidrs: &cidrs,
                },
            );
            (*family, rendered)
        })
        .collect()
}

/// Our Node's facts from the cache (just the name until it is there).
pub fn node_facts(caches: &Caches, name: &str) -> (NodeFacts, Option<Arc<Node>>) {
    let node = caches
        .nodes
        .state()
        .into_iter()
        .find(|n| n.name_any() == name);
    let facts = node
        .as_deref()
        .map(NodeFacts::of)
        .unwrap_or_else(|| NodeFacts {
            name: name.to_string(),
            ..Default::default()
        });
    (facts, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_a_burst_of_two_then_one_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Limiter::new(s, t0);
        assert_eq!(l.wait(t0), Duration::ZERO);
        assert_eq!(l.wait(t0), Duration::ZERO);
        assert_eq!(l.wait(t0), s, "third in a burst waits an interval");
        let later = t0 + s;
        assert_eq!(l.wait(later), Duration::ZERO, "a token came back");
        assert!(l.wait(later) > Duration::ZERO);
        let mut free = Limiter::new(Duration::ZERO, t0);
        for _ in 0..10 {
            assert_eq!(free.wait(t0), Duration::ZERO);
        }
    }
}
