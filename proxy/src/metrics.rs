//! The proxy's metrics: kube-proxy's, under its own names, types, labels and
//! buckets so existing dashboards and alerts keep working, and ours under
//! `ferrolb_proxy_`.
//!
//! kube-proxy's go into the runtime's unprefixed registry; ours into the
//! prefixed one. The sync loop calls the small typed methods below rather
//! than touching metric handles, so a name or label cannot drift by call
//! site.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as Series;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use crate::ruleset::Family;

/// Labelled as Kubernetes spells it (`IPv4`, `IPv6`).
impl EncodeLabelValue for Family {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.label())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    ip_family: Family,
}

// Field order is the exposition's label order; Go's client sorts labels
// by name, so keep these alphabetical.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLocalLabels {
    ip_family: Family,
    traffic_policy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

type Histograms = Series<FamilyLabel, Histogram, fn() -> Histogram>;
type TimeGauge = Gauge<f64, AtomicU64>;

fn sync_histogram() -> Histogram {
    // kube-proxy's: 1 ms doubling 15 times, to 16.384 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's `network_programming_duration_seconds` bounds. Its bucket
/// helper starts the list with a 0, so there is an `le="0"` bucket (which
/// catches trigger times in the future, from clock skew).
pub fn network_programming_buckets() -> Vec<f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

fn network_programming_histogram() -> Histogram {
    Histogram::new(network_programming_buckets())
}

fn transaction_histogram() -> Histogram {
    // 256 B to 1 GiB by fours: one Service's change is a few hundred bytes,
    // a cold start at 10k Services tens of MiB.
    Histogram::new(exponential_buckets(256.0, 4.0, 12))
}

/// `kubeproxy_proxy_healthz_total` / `kubeproxy_proxy_livez_total`, handed
/// to the health server that counts them.
#[derive(Debug, Clone, Default)]
pub struct ProbeCounters {
    healthz: Series<CodeLabel, Counter>,
    livez: Series<CodeLabel, Counter>,
}

impl ProbeCounters {
    pub fn healthz(&self, code: u16) {
        self.healthz.get_or_create(&code_label(code)).inc();
    }

    pub fn livez(&self, code: u16) {
        self.livez.get_or_create(&code_label(code)).inc();
    }
}

fn code_label(code: u16) -> CodeLabel {
    CodeLabel {
        code: match code {
            200 => "200",
            503 => "503",
            // The servers answer only these two; anything else is a bug,
            // still counted rather than lost.
            _ => "other",
        },
    }
}

/// Every metric the proxy exports.
#[derive(Debug, Clone)]
pub struct KubeProxyMetrics {
    sync_duration: Histograms,
    sync_full_duration: Histograms,
    sync_partial_duration: Histograms,
    network_programming: Histograms,
    last_timestamp: Series<FamilyLabel, TimeGauge>,
    last_queued_timestamp: Series<FamilyLabel, TimeGauge>,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    no_local_endpoints: Series<NoLocalLabels, Gauge>,
    nftables_sync_failures: Series<FamilyLabel, Counter>,
    nftables_cleanup_failures: Series<FamilyLabel, Counter>,
    probes: ProbeCounters,
    full_resyncs: Series<ReasonLabel, Counter>,
    ruleset_elements: Series<FamilyLabel, Gauge>,
    ruleset_chains: Series<FamilyLabel, Gauge>,
    transaction_bytes: Histogram,
    conntrack_deleted: Series<FamilyLabel, Counter>,
}

impl KubeProxyMetrics {
    /// Registers kube-proxy's metrics in `unprefixed` (served as named) and
    /// ours in `ours` (which adds `ferrolb_`).
    pub fn register(unprefixed: &mut Registry, ours: &mut Registry) -> Self {
        let m = Self {
            sync_duration: Series::new_with_constructor(sync_histogram),
            sync_full_duration: Series::new_with_constructor(sync_histogram),
            sync_partial_duration: Series::new_with_constructor(sync_histogram),
            network_programming: Series::new_with_constructor(network_programming_histogram),
            last_timestamp: Series::default(),
            last_queued_timestamp: Series::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Series::default(),
            nftables_sync_failures: Series::default(),
            nftables_cleanup_failures: Series::default(),
            probes: ProbeCounters::default(),
            full_resyncs: Series::default(),
            ruleset_elements: Series::default(),
            ruleset_chains: Series::default(),
            transaction_bytes: transaction_histogram(),
            conntrack_deleted: Series::default(),
        };
        // Counters are registered without `_total`: the encoder appends it.
        let u = unprefixed;
        u.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one sync of the proxy rules took, full or partial",
            m.sync_duration.clone(),
        );
        u.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Time one full sync of the proxy rules took",
            m.sync_full_duration.clone(),
        );
        u.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Time one partial sync of the proxy rules took",
            m.sync_partial_duration.clone(),
        );
        u.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from an EndpointSlice's last-change-trigger-time to the sync that programmed it",
            m.network_programming.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync of the proxy rules",
            m.last_timestamp.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "Unix time a sync of the proxy rules was last asked for",
            m.last_queued_timestamp.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlice changes not yet synced",
            m.endpoint_changes_pending.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes seen",
            m.endpoint_changes_total.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Services with changes not yet synced",
            m.service_changes_pending.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service changes seen",
            m.service_changes_total.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy, endpoints elsewhere and none on this node",
            m.no_local_endpoints.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "nftables transactions that failed",
            m.nftables_sync_failures.clone(),
        );
        u.register(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
            "Failed deletions of stale nftables objects",
            m.nftables_cleanup_failures.clone(),
        );
        u.register(
            "kubeproxy_proxy_healthz",
            "Answers of /healthz by status code",
            m.probes.healthz.clone(),
        );
        u.register(
            "kubeproxy_proxy_livez",
            "Answers of /livez by status code",
            m.probes.livez.clone(),
        );
        ours.register(
            "proxy_full_resyncs",
            "Full resyncs of the ruleset, by why one was needed",
            m.full_resyncs.clone(),
        );
        ours.register(
            "proxy_ruleset_elements",
            "Map and set elements in the committed ruleset",
            m.ruleset_elements.clone(),
        );
        ours.register(
            "proxy_ruleset_chains",
            "Chains in the committed ruleset",
            m.ruleset_chains.clone(),
        );
        ours.register(
            "proxy_transaction_bytes",
            "Size of each nftables netlink batch sent",
            m.transaction_bytes.clone(),
        );
        ours.register(
            "proxy_conntrack_deleted",
            "Stale UDP conntrack entries deleted",
            m.conntrack_deleted.clone(),
        );
        m
    }

    /// Creates the zero series of the families this proxy serves, so that
    /// `rate()` and `increase()` see a counter's first increment (a series
    /// that appears at 1 counts as no change).
    pub fn init_families(&self, families: &[Family]) {
        for family in families {
            let l = FamilyLabel { ip_family: *family };
            self.nftables_sync_failures.get_or_create(&l).inc_by(0);
            self.nftables_cleanup_failures.get_or_create(&l).inc_by(0);
            self.conntrack_deleted.get_or_create(&l).inc_by(0);
            self.set_no_local_endpoints(*family, 0, 0);
        }
    }

    /// For the health server, which counts its own answers.
    pub fn probes(&self) -> ProbeCounters {
        self.probes.clone()
    }

    /// One sync attempt of `family`, successful or not.
    pub fn observe_sync(&self, family: Family, full: bool, took: Duration) {
        let l = FamilyLabel { ip_family: family };
        let secs = took.as_secs_f64();
        self.sync_duration.get_or_create(&l).observe(secs);
        let kind = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        kind.get_or_create(&l).observe(secs);
    }

    /// A sync of `family` succeeded at `now`.
    pub fn sync_succeeded(&self, family: Family, now: SystemTime) {
        self.last_timestamp
            .get_or_create(&FamilyLabel { ip_family: family })
            .set(unix_secs(now));
    }

    /// A sync of `family` was asked for at `now` (also once when the sync
    /// loop starts).
    pub fn sync_queued(&self, family: Family, now: SystemTime) {
        self.last_queued_timestamp
            .get_or_create(&FamilyLabel { ip_family: family })
            .set(unix_secs(now));
    }

    /// After a successful sync, once per EndpointSlice add or update it
    /// programmed: `trigger` is the slice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` annotation
    /// (RFC 3339). Unparsable values, and trigger times not after
    /// `started_at` (changes made before this proxy could have seen them),
    /// are ignored.
    pub fn observe_trigger_time(
        &self,
        family: Family,
        started_at: SystemTime,
        trigger: &str,
        now: SystemTime,
    ) {
        let Some(latency) = programming_latency(started_at, trigger, now) else {
            return;
        };
        self.network_programming
            .get_or_create(&FamilyLabel { ip_family: family })
            .observe(latency);
    }

    /// One Service event arrived.
    pub fn service_changed(&self) {
        self.service_changes_total.inc();
    }

    /// One EndpointSlice event of a tracked family arrived.
    pub fn endpoints_changed(&self) {
        self.endpoint_changes_total.inc();
    }

    /// What is waiting for the next sync (0 and 0 right after one).
    pub fn set_pending(&self, endpoint_changes: usize, service_changes: usize) {
        self.endpoint_changes_pending
            .set(saturate(endpoint_changes));
        self.service_changes_pending.set(saturate(service_changes));
    }

    /// Service ports of `family` with iTP (`internal`) or eTP (`external`)
    /// Local, endpoints on other nodes and none here; recomputed per sync.
    pub fn set_no_local_endpoints(&self, family: Family, internal: usize, external: usize) {
        for (policy, n) in [("internal", internal), ("external", external)] {
            self.no_local_endpoints
                .get_or_create(&NoLocalLabels {
                    ip_family: family,
                    traffic_policy: policy,
                })
                .set(saturate(n));
        }
    }

    pub fn nftables_sync_failed(&self, family: Family) {
        self.nftables_sync_failures
            .get_or_create(&FamilyLabel { ip_family: family })
            .inc();
    }

    pub fn nftables_cleanup_failed(&self, family: Family) {
        self.nftables_cleanup_failures
            .get_or_create(&FamilyLabel { ip_family: family })
            .inc();
    }

    /// A full resync happened; `reason` is a short fixed word (`startup`,
    /// `apply-failed`, `node-labels`, ...), never free text, so the label
    /// set stays small.
    pub fn full_resync(&self, reason: &str) {
        self.full_resyncs
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Size of the committed ruleset of `family`.
    pub fn set_ruleset_size(&self, family: Family, chains: usize, elements: usize) {
        let l = FamilyLabel { ip_family: family };
        self.ruleset_chains.get_or_create(&l).set(saturate(chains));
        self.ruleset_elements
            .get_or_create(&l)
            .set(saturate(elements));
    }

    /// One netlink batch of `bytes` was sent.
    pub fn observe_transaction(&self, bytes: usize) {
        self.transaction_bytes.observe(bytes as f64);
    }

    pub fn conntrack_deleted(&self, family: Family, entries: usize) {
        self.conntrack_deleted
            .get_or_create(&FamilyLabel { ip_family: family })
            .inc_by(entries as u64);
    }
}

/// Seconds from `trigger` to `now`, or `None` when `trigger` does not parse
/// or is not after `started_at`. Negative when the apiserver's clock is
/// ahead of ours, as kube-proxy observes it too (into the `le="0"` bucket).
pub fn programming_latency(started_at: SystemTime, trigger: &str, now: SystemTime) -> Option<f64> {
    let trigger: k8s_openapi::jiff::Timestamp = trigger.trim().parse().ok()?;
    let trigger = SystemTime::from(trigger);
    if trigger <= started_at {
        return None;
    }
    Some(match now.duration_since(trigger) {
        Ok(d) => d.as_secs_f64(),
        Err(ahead) => -ahead.duration().as_secs_f64(),
    })
}

fn unix_secs(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

fn saturate(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
