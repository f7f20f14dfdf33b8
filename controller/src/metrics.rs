//! The controller's Prometheus metrics (`ferrolb_` prefix from the registry).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::allocator::PoolStats;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub family: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub pool_addresses: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub pool_in_use: Family<PoolLabels, Gauge>,
    pub services_allocated: Gauge,
    pub services_pending: Gauge,
    pub allocation_failures: Family<ReasonLabels, Counter>,
    pub write_errors: Counter,
    pub writes: Counter,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            pool_addresses: Family::default(),
            pool_in_use: Family::default(),
            services_allocated: Gauge::default(),
            services_pending: Gauge::default(),
            allocation_failures: Family::default(),
            write_errors: Counter::default(),
            writes: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            leader: Gauge::default(),
        };
        registry.register(
            "pool_addresses",
            "Addresses a pool can hand out, per family",
            m.pool_addresses.clone(),
        );
        registry.register(
            "pool_addresses_in_use",
            "Addresses of a pool assigned to Services, per family",
            m.pool_in_use.clone(),
        );
        registry.register(
            "services_allocated",
            "LoadBalancer Services holding an IP",
            m.services_allocated.clone(),
        );
        registry.register(
            "services_pending",
            "LoadBalancer Services of this controller's class without an IP",
            m.services_pending.clone(),
        );
        registry.register(
            "allocation_failures",
            "Refusals, by reason, each counted once when it happens",
            m.allocation_failures.clone(),
        );
        registry.register(
            "api_write_errors",
            "Failed writes to the API server",
            m.write_errors.clone(),
        );
        registry.register(
            "api_writes",
            "Writes started against the API server (Service, pool status, Event)",
            m.writes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass over all Services and pools",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads and writes",
            m.leader.clone(),
        );
        m
    }

    pub fn observe_pools(&self, stats: &std::collections::BTreeMap<String, PoolStats>) {
        self.pool_addresses.clear();
        self.pool_in_use.clear();
        for (pool, s) in stats {
            for (i, family) in ["IPv4", "IPv6"].into_iter().enumerate() {
                let labels = PoolLabels {
                    pool: pool.clone(),
                    family: family.to_string(),
                };
                // f64 keeps huge IPv6 pools meaningful (2^64 and beyond).
                self.pool_addresses
                    .get_or_create(&labels)
                    .set(s.capacity[i] as f64);
                self.pool_in_use
                    .get_or_create(&labels)
                    .set(i64::try_from(s.assigned[i]).unwrap_or(i64::MAX));
            }
        }
    }
}
