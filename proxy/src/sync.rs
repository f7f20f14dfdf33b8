//! The proxy's loop: on every change of Services, EndpointSlices, the Node
//! or ServiceCIDRs (rate-limited), bring each family's table in line with
//! the caches, sending the kernel only what the changed Services need; then
//! clean stale UDP conntrack entries and bring the health-check servers in
//! line.
//!
//! What the kernel holds is kept in memory ([`Programmed`]): the kernel is
//! never listed on this path. A partial update the kernel refuses is
//! followed at once by a full rebuild, counted in
//! `ferrolb_proxy_full_resyncs_total`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nlink::netlink::{Connection, Netfilter};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::conntrack::{self, UdpService};
use crate::health::{self, ProxierHealth, ServiceHealth};
use crate::metrics::KubeProxyMetrics;
use crate::netlink::Nft;
use crate::programmed::{Context, FullBuild, Programmed, Update};
use crate::render::Config;
use crate::ruleset::Family;

/// kube-proxy's endpoint-change trigger time annotation.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

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

/// The shell around [`Programmed`] and the kernel.
pub struct Proxy {
    settings: Settings,
    cache: Cache,
    nft: Nft,
    conntrack: Option<Connection<Netfilter>>,
    tables: BTreeMap<Family, Programmed>,
    metrics: KubeProxyMetrics,
    health: Arc<ProxierHealth>,
    service_health: ServiceHealth,
    events: ferrolb_runtime::events::EventSink,
    started: SystemTime,
}

/// Waits until every watch feeding `cache` has listed once; false on
/// shutdown.
pub async fn wait_listed(cache: &Cache, changes: &Notify, shutdown: &CancellationToken) -> bool {
    while !cache.listed() {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = changes.notified() => {}
            // A notification can land between the check and the wait.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    true
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        cache: Cache,
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
        let tables = settings
            .families
            .iter()
            .map(|f| (*f, Programmed::new(*f)))
            .collect();
        Self {
            settings,
            cache,
            nft,
            conntrack,
            tables,
            metrics,
            health,
            service_health,
            events,
            started: SystemTime::now(),
        }
    }

    /// Syncs until `shutdown`. Nothing is programmed before every cache
    /// holds its first full list (a partial list would drop live Services).
    pub async fn run(mut self, changes: Arc<Notify>, shutdown: CancellationToken) {
        if !wait_listed(&self.cache, &changes, &shutdown).await {
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
            let retry_at = (!ok).then(|| tokio::time::Instant::now() + self.settings.sync_period);
            // Wait for work: a wake-up with nothing to program spends no
            // sync of the rate limit's burst.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = changes.notified() => {
                        if self.cache.has_pending() {
                            break;
                        }
                    }
                    _ = async {
                        match retry_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => break,
                }
            }
        }
    }

    /// One pass over every family; true when the kernel took everything.
    pub async fn sync(&mut self) -> bool {
        let started = Instant::now();
        let changes = self.cache.take();
        for _ in 0..changes.service_changes {
            self.metrics.service_changed();
        }
        for _ in 0..changes.slice_changes {
            self.metrics.endpoints_changed();
        }
        self.metrics
            .set_pending(changes.slice_changes, changes.service_changes);
        if let Some(eligible) = self.cache.node_eligible() {
            self.health.set_node_eligible(eligible);
        }
        let node = self.cache.node();
        let cidrs = self.cache.service_cidrs();
        if changes.node_changed {
            for table in self.tables.values_mut() {
                if table.is_built() {
                    self.metrics.full_resync("node-changed");
                }
                table.forget();
            }
        }
        // Only a table already built updates Service by Service; the
        // others build from everything.
        let changed = if self.tables.values().any(|t| t.is_built()) {
            self.cache.inputs_of(&changes.services)
        } else {
            Vec::new()
        };
        let shared = started.elapsed();

        let mut ok = true;
        let families = self.settings.families.clone();
        let cfg = self.settings.config.clone();
        let everything = std::cell::OnceCell::new();
        for family in families {
            let family_started = Instant::now();
            let ctx = Context {
                cfg: &cfg,
                node: &node,
                service_cidrs: &cidrs,
            };
            let Some(table) = self.tables.get_mut(&family) else {
                continue;
            };
            let cache = &self.cache;
            // Both families' full builds read the same list: make it once.
            let update = table.update(&ctx, &changed, || {
                everything.get_or_init(|| cache.all()).clone()
            });
            let planned = family_started.elapsed();
            if let Some(reason) = update.reason {
                self.metrics.full_resync(reason);
            }
            match self.program(family, &ctx, update).await {
                Some((full, udp)) => {
                    let took = shared + family_started.elapsed();
                    if full {
                        let (chains, elements) =
                            self.tables.get(&family).map_or((0, 0), |t| t.size());
                        tracing::info!(
                            family = family.label(),
                            chains,
                            elements,
                            caches_ms = shared.as_millis() as u64,
                            render_ms = planned.as_millis() as u64,
                            kernel_ms = (took - shared - planned).as_millis() as u64,
                            "table built"
                        );
                    }
                    self.metrics.observe_sync(family, full, took);
                    self.clean_conntrack(family, &udp).await;
                }
                None => ok = false,
            }
        }
        let mut wanted_health = BTreeMap::new();
        for table in self.tables.values() {
            for (key, hc) in table.health() {
                let entry = wanted_health.entry(key).or_insert(health::Wanted {
                    port: hc.port,
                    local_endpoints: 0,
                });
                entry.local_endpoints = entry.local_endpoints.max(hc.local_endpoints);
            }
        }
        if ok {
            let now = SystemTime::now();
            for (family, trigger) in &changes.triggers {
                self.metrics
                    .observe_trigger_time(*family, self.started, trigger, now);
            }
            let (slices, services) = self.cache.pending();
            self.metrics.set_pending(slices, services);
        } else {
            self.cache.restore(changes);
        }
        let listen: Vec<IpAddr> = self
            .settings
            .families
            .iter()
            .flat_map(|f| self.settings.config.nodeport_addresses.select(&node, *f))
            .collect();
        let failed = self.service_health.sync(wanted_health, &listen).await;
        for (key, error) in failed {
            self.warn_health_check(&key, &error).await;
        }
        ok
    }

    /// Sends `update` to the kernel; on success whether it was a full build
    /// and the UDP Services to clean conntrack for.
    async fn program(
        &mut self,
        family: Family,
        ctx: &Context<'_>,
        update: Update,
    ) -> Option<(bool, Vec<UdpService>)> {
        let Update {
            ops,
            build,
            mut udp,
            ..
        } = update;
        let table = self.tables.get_mut(&family)?;
        let mut full = build.is_some();
        let mut result = match build {
            Some(build) => Self::build(&self.nft, table, build, &mut udp).await,
            None => match table.scaffold() {
                _ if ops.is_empty() => Ok(()),
                Some(shapes) => self.nft.commit(shapes, &ops).await,
                None => Ok(()),
            },
        };
        if let Err(error) = &result
            && !full
        {
            // The kernel and our memory disagree: rebuild the table whole.
            tracing::warn!(family = family.label(), %error, ops = ops.len(), "partial update refused; rebuilding the table");
            self.metrics.nftables_sync_failed(family);
            self.metrics.full_resync("partial-update-failed");
            full = true;
            result = match table.full(ctx, self.cache.all()).build {
                Some(build) => Self::build(&self.nft, table, build, &mut udp).await,
                None => Ok(()),
            };
        }
        match result {
            Ok(()) => {
                let (internal, external) = table.no_local();
                self.metrics
                    .set_no_local_endpoints(family, internal, external);
                let (chains, elements) = table.size();
                self.metrics.set_ruleset_size(family, chains, elements);
                self.metrics.sync_succeeded(family, SystemTime::now());
                self.health.updated(family);
                if !ops.is_empty() {
                    tracing::debug!(
                        family = family.label(),
                        full,
                        elements = crate::diff::element_changes(&ops),
                        "synced"
                    );
                }
                Some((full, udp))
            }
            Err(error) => {
                tracing::error!(family = family.label(), %error, "the kernel refused the ruleset; retrying after the sync period");
                self.metrics.nftables_sync_failed(family);
                // Unknown state: the next attempt rebuilds.
                table.forget();
                None
            }
        }
    }

    /// Sends a full build as one transaction; the table takes its state
    /// only when the kernel took it.
    async fn build(
        nft: &Nft,
        table: &mut Programmed,
        mut build: FullBuild,
        udp: &mut Vec<UdpService>,
    ) -> Result<(), crate::netlink::NetlinkError> {
        let shapes = build.scaffold().clone();
        nft.commit_batches(&shapes, build.by_ref()).await?;
        *udp = build.take_udp();
        table.install(build);
        Ok(())
    }

    async fn clean_conntrack(&self, family: Family, udp: &[UdpService]) {
        let Some(conn) = &self.conntrack else { return };
        if udp.is_empty() {
            return;
        }
        match conntrack::cleanup(conn, family, udp).await {
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

    async fn warn_health_check(&self, key: &health::ServiceKey, error: &str) {
        let uid = self.cache.uid(key);
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
