//! One reconcile pass as a pure function: cached objects in, the writes and
//! Events that bring the cluster in line out. The shell (`run.rs`) performs
//! them; tests call [`Index::pass`] directly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferrolb_crds::{IPAddressPool, IPAddressPoolStatus};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::allocator::{Allocator, Family, Labels, Outcome, Pool, ServiceKey, ServiceRequest};
use crate::convert::{self, ClassFilter, ServiceView};

/// Condition type FerroLB sets on Services it serves.
pub const SERVICE_CONDITION: &str = "ferrolb.io/IPAllocated";

/// The objects a pass reads, as the watch caches hold them.
pub struct Inputs<'a> {
    pub pools: &'a [Arc<IPAddressPool>],
    pub services: &'a [Arc<Service>],
    /// Namespace name -> labels.
    pub namespaces: &'a BTreeMap<String, Labels>,
    pub now: Time,
}

/// What one pass wants done.
#[derive(Debug, Default)]
pub struct Plan {
    pub services: Vec<ServiceWrite>,
    pub pools: Vec<PoolWrite>,
    pub events: Vec<EventPlan>,
    /// Refusals first reported in this pass (for metrics): a refusal that
    /// persists is counted once, when it happens.
    pub failures: Vec<&'static str>,
    /// Our Services without any IP once this plan is applied.
    pub pending: usize,
}

/// Fields of one Service to change. `None` leaves a field alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceWrite {
    pub key: ServiceKey,
    /// New `status.loadBalancer.ingress` IPs (empty clears it).
    pub ingress: Option<Vec<IpAddr>>,
    /// Our condition in `status.conditions`; `Some(None)` removes it. Only
    /// ours is written, so other controllers' conditions are never touched.
    pub condition: Option<Option<Condition>>,
    /// New value of the pool annotation; `Some(None)` removes it.
    pub pool_annotation: Option<Option<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolWrite {
    pub name: String,
    pub status: IPAddressPoolStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPlan {
    pub service: ServiceKey,
    pub uid: Option<String>,
    pub severity: Severity,
    pub reason: &'static str,
    pub message: String,
}

/// Desired state of the fields FerroLB owns on one Service.
struct Desired {
    ingress: Vec<IpAddr>,
    pool: Option<String>,
    condition: Option<(bool, &'static str, String)>,
}

/// A Service as it was left by a pass that had nothing more to do for it.
#[derive(Debug, Clone, PartialEq)]
struct Settled {
    request: ServiceRequest,
    ingress: Vec<IpAddr>,
    pool: Option<String>,
    /// Status, reason and message of our condition.
    condition: Option<(String, String, String)>,
}

impl Settled {
    fn new(request: &ServiceRequest, desired: &Desired) -> Self {
        Self {
            request: request.clone(),
            ingress: desired.ingress.clone(),
            pool: desired.pool.clone(),
            condition: desired.condition.as_ref().map(|(ok, reason, message)| {
                let status = if *ok { "True" } else { "False" };
                (status.to_string(), reason.to_string(), message.clone())
            }),
        }
    }

    /// Does `v` still ask for and show what this records?
    fn matches(&self, v: &ServiceView) -> bool {
        let shown = v
            .condition
            .as_ref()
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        self.request == v.request
            && self.ingress == v.status_ips
            && self.pool == v.pool_annotation
            && self.condition == shown
    }
}

/// The controller's memory between passes.
pub struct Index {
    filter: ClassFilter,
    allocator: Allocator,
    /// Last valid form of each pool: an invalid edit never takes effect,
    /// so it never takes IPs away.
    good_pools: BTreeMap<String, Pool>,
    invalid_pools: BTreeMap<String, String>,
    /// What each settled Service asked for and should show; a Service whose
    /// request and fields still match is skipped. Our fields are part of it,
    /// so an edit of them by someone else is repaired.
    settled: HashMap<ServiceKey, Settled>,
    /// Last event per Service, so a refusal is reported once, not per pass.
    reported: HashMap<ServiceKey, String>,
}

impl Index {
    pub fn new(filter: ClassFilter) -> Self {
        Self {
            filter,
            allocator: Allocator::new(),
            good_pools: BTreeMap::new(),
            invalid_pools: BTreeMap::new(),
            settled: HashMap::new(),
            reported: HashMap::new(),
        }
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Forget everything held, e.g. when a term ends: the next term (maybe
    /// ours again) rebuilds from Service statuses.
    pub fn reset(&mut self) {
        *self = Self::new(self.filter.clone());
    }

    /// Look at `key` again next pass (its write failed).
    pub fn unsettle(&mut self, key: &ServiceKey) {
        self.settled.remove(key);
    }

    pub fn pass(&mut self, inputs: &Inputs<'_>) -> Plan {
        let mut plan = Plan::default();
        self.update_pools(inputs.pools);

        let no_labels = Labels::new();
        let views: Vec<ServiceView> = inputs
            .services
            .iter()
            .map(|s| {
                let ns = s.metadata.namespace.as_deref().unwrap_or_default();
                let labels = inputs.namespaces.get(ns).unwrap_or(&no_labels);
                ServiceView::new(s, labels, &self.filter)
            })
            .collect();

        // Services we hold that are gone.
        let present: HashSet<&ServiceKey> = views.iter().map(|v| &v.key).collect();
        for key in self.allocator.held_keys() {
            if !present.contains(&key) {
                self.forget(&key);
            }
        }
        // Held, or carrying our marks (e.g. after a restart), but not ours.
        for v in views.iter().filter(|v| !v.ours) {
            let marked = v.pool_annotation.is_some() || v.condition.is_some();
            if marked || self.allocator.assignment(&v.key).is_some() {
                self.forget(&v.key);
                self.release_foreign(v, &mut plan);
            }
        }

        let mut ours: Vec<&ServiceView> = views.iter().filter(|v| v.ours).collect();
        // First come, first served; the key makes ties deterministic.
        ours.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));

        // Restore every IP a status already holds before allocating anything,
        // so a restart or leader change never moves an IP. A Service whose
        // request is invalid is restored from what it holds too: its IPs
        // stay assigned and reserved.
        for v in &ours {
            if !v.status_ips.is_empty() && self.allocator.assignment(&v.key).is_none() {
                let _ = self.allocator.restore(&v.request, &v.status_ips);
            }
        }

        for v in ours {
            let desired = match &v.problem {
                Some(message) => {
                    if self.report(&mut plan, v, Severity::Warning, "AllocationFailed", message) {
                        plan.failures.push("InvalidRequest");
                    }
                    // A typo in an annotation must not cost a working IP.
                    let held = self.allocator.assignment(&v.key);
                    Desired {
                        ingress: held.as_ref().map(|a| a.ips.clone()).unwrap_or_default(),
                        pool: held.map(|a| a.pool_names().join(",")),
                        condition: Some((false, "InvalidRequest", message.clone())),
                    }
                }
                None => {
                    let unchanged = self.settled.get(&v.key).is_some_and(|s| s.matches(v))
                        && self.allocator.assignment(&v.key).is_some();
                    if unchanged {
                        continue;
                    }
                    let (desired, settle) = self.ensure(v, &mut plan);
                    if settle {
                        self.settled
                            .insert(v.key.clone(), Settled::new(&v.request, &desired));
                    } else {
                        self.settled.remove(&v.key);
                    }
                    desired
                }
            };
            if desired.ingress.is_empty() {
                plan.pending += 1;
            }
            if let Some(write) = service_write(v, &desired, &inputs.now) {
                plan.services.push(write);
            }
        }

        self.pool_statuses(inputs, &mut plan);
        plan
    }

    /// Runs the allocator for `v`; returns what the Service should show and
    /// whether that is settled (nothing to retry until its inputs change).
    fn ensure(&mut self, v: &ServiceView, plan: &mut Plan) -> (Desired, bool) {
        match self.allocator.ensure(&v.request, &v.status_ips) {
            Ok(Outcome::Kept { assignment, why }) => {
                let ips = ip_list(&assignment.ips);
                let pools = assignment.pool_names().join(",");
                let pinned =
                    !v.request.requested_ips.is_empty() || v.request.requested_pool.is_some();
                let message = if pinned {
                    format!(
                        "Kept {ips} although {why}; it was requested, so it stays until the request or the pool changes"
                    )
                } else {
                    format!(
                        "Kept {ips} although {why}; it moves as soon as a pool that serves this Service has a free address"
                    )
                };
                if self.report(plan, v, Severity::Warning, "PoolNotEligible", &message) {
                    plan.failures.push(why.reason());
                }
                let desired = Desired {
                    ingress: assignment.ips,
                    pool: Some(pools),
                    condition: Some((true, why.reason(), message)),
                };
                // Not settled: every pass looks for a pool that serves it.
                (desired, false)
            }
            Ok(outcome) => {
                let asg = outcome.assignment().clone();
                let pools = asg.pool_names().join(",");
                let ips = ip_list(&asg.ips);
                let message = format!("{ips} from IPAddressPool {pools}");
                if let Outcome::Allocated {
                    previous, replaced, ..
                } = &outcome
                {
                    let mut text = format!("Assigned {message}");
                    if let Some(why) = replaced {
                        let old = ip_list(previous);
                        text.push_str(&format!(" (replacing {old}: {why})"));
                    }
                    self.report(plan, v, Severity::Normal, "IPAllocated", &text);
                } else {
                    // Quietly settled; forget an older refusal so a future
                    // one is reported again.
                    self.reported
                        .insert(v.key.clone(), format!("IPAllocated:{message}"));
                }
                let desired = Desired {
                    ingress: asg.ips,
                    pool: Some(pools),
                    condition: Some((true, "Allocated", message)),
                };
                (desired, true)
            }
            Err(e) => {
                let mut message = e.to_string();
                if !v.status_ips.is_empty() {
                    let old = ip_list(&v.status_ips);
                    message.push_str(&format!(" (released {old})"));
                }
                if self.report(plan, v, Severity::Warning, "AllocationFailed", &message) {
                    plan.failures.push(e.reason());
                }
                let desired = Desired {
                    ingress: Vec::new(),
                    pool: None,
                    condition: Some((false, e.reason(), message)),
                };
                (desired, false)
            }
        }
    }

    /// Queues an Event unless the same one was the last reported for this
    /// Service; returns whether it was queued.
    fn report(
        &mut self,
        plan: &mut Plan,
        v: &ServiceView,
        severity: Severity,
        reason: &'static str,
        message: &str,
    ) -> bool {
        let fingerprint = format!("{reason}:{message}");
        if self.reported.get(&v.key) == Some(&fingerprint) {
            return false;
        }
        self.reported.insert(v.key.clone(), fingerprint);
        plan.events.push(EventPlan {
            service: v.key.clone(),
            uid: v.uid.clone(),
            severity,
            reason,
            message: message.to_string(),
        });
        true
    }

    fn forget(&mut self, key: &ServiceKey) {
        self.allocator.release(key);
        self.settled.remove(key);
        self.reported.remove(key);
    }

    /// A Service that stopped being ours: drop our annotation and
    /// condition; clear the ingress only if it is no LoadBalancer any more
    /// (with another class, another controller owns the status).
    fn release_foreign(&mut self, v: &ServiceView, plan: &mut Plan) {
        let write = ServiceWrite {
            key: v.key.clone(),
            ingress: (!v.load_balancer && !v.status_ips.is_empty()).then(Vec::new),
            condition: v.condition.is_some().then_some(None),
            pool_annotation: v.pool_annotation.is_some().then_some(None),
        };
        if !v.status_ips.is_empty() {
            let list = ip_list(&v.status_ips);
            plan.events.push(EventPlan {
                service: v.key.clone(),
                uid: v.uid.clone(),
                severity: Severity::Normal,
                reason: "IPReleased",
                message: format!("Released {list}: the Service is no longer a LoadBalancer of this controller's class"),
            });
        }
        if write.ingress.is_some() || write.condition.is_some() || write.pool_annotation.is_some() {
            plan.services.push(write);
        }
    }

    fn update_pools(&mut self, objects: &[Arc<IPAddressPool>]) {
        let mut present = Vec::new();
        for obj in objects {
            let name = obj.metadata.name.clone().unwrap_or_default();
            match convert::pool(obj) {
                Ok(pool) => {
                    self.good_pools.insert(name.clone(), pool);
                    self.invalid_pools.remove(&name);
                }
                Err(why) => {
                    self.invalid_pools.insert(name.clone(), why);
                }
            }
            present.push(name);
        }
        self.good_pools.retain(|name, _| present.contains(name));
        self.invalid_pools.retain(|name, _| present.contains(name));
        let mut current: Vec<&Pool> = self.allocator.pools().iter().collect();
        current.sort_by(|a, b| a.name.cmp(&b.name));
        let wanted: Vec<&Pool> = self.good_pools.values().collect();
        if current != wanted {
            self.allocator
                .set_pools(self.good_pools.values().cloned().collect());
            // Every Service must be looked at again: its IP may have moved
            // pools or left all of them.
            self.settled.clear();
        }
    }

    fn pool_statuses(&self, inputs: &Inputs<'_>, plan: &mut Plan) {
        let stats = self.allocator.stats();
        for obj in inputs.pools {
            let name = obj.metadata.name.clone().unwrap_or_default();
            let s = stats.get(&name).copied().unwrap_or_default();
            let clamp = |v: u128| i64::try_from(v).unwrap_or(i64::MAX);
            let old = obj.status.clone().unwrap_or_default();
            let previous = |t: &str| old.conditions.iter().find(|c| c.type_ == t);
            let mut conditions = Vec::new();
            let invalid = self.invalid_pools.get(&name);
            let in_effect = self.good_pools.contains_key(&name);
            let overlaps: Vec<String> = self
                .allocator
                .overlaps()
                .iter()
                .filter(|o| o.pool == name)
                .map(|o| {
                    format!(
                        "IPAddressPool {:?} ({}, handed out by {:?})",
                        o.other, o.range, o.owner
                    )
                })
                .collect();
            let (ready, reason, message) = match (invalid, in_effect) {
                (Some(why), true) => (
                    false,
                    "InvalidSpec",
                    format!("{why}; the last valid spec stays in effect"),
                ),
                (Some(why), false) => {
                    (false, "InvalidSpec", format!("{why}; the pool is not used"))
                }
                (None, _) => (true, "Ready", "addresses are being assigned".to_string()),
            };
            conditions.push(condition(
                previous("Ready"),
                "Ready",
                ready,
                reason,
                &message,
                &inputs.now,
            ));
            if let Some(why) = invalid {
                conditions.push(condition(
                    previous("Invalid"),
                    "Invalid",
                    true,
                    "InvalidSpec",
                    why,
                    &inputs.now,
                ));
            }
            if !overlaps.is_empty() {
                let message = format!(
                    "shares addresses with {}; a shared address is handed out and counted only by the pool that comes first in allocation order",
                    overlaps.join(", ")
                );
                conditions.push(condition(
                    previous("Overlaps"),
                    "Overlaps",
                    true,
                    "Overlap",
                    &message,
                    &inputs.now,
                ));
            }
            let status = IPAddressPoolStatus {
                assigned_ipv4: clamp(s.assigned[0]),
                assigned_ipv6: clamp(s.assigned[1]),
                available_ipv4: clamp(s.available(Family::V4)),
                available_ipv6: clamp(s.available(Family::V6)),
                assigned: clamp(s.assigned[0] + s.assigned[1]),
                available: clamp(
                    s.available(Family::V4)
                        .saturating_add(s.available(Family::V6)),
                ),
                conditions,
            };
            if status != old {
                plan.pools.push(PoolWrite { name, status });
            }
        }
    }
}

/// The write needed to move `v` to `desired`, if any.
fn service_write(v: &ServiceView, desired: &Desired, now: &Time) -> Option<ServiceWrite> {
    let wanted = desired.condition.as_ref().map(|(ok, reason, message)| {
        condition(
            v.condition.as_ref(),
            SERVICE_CONDITION,
            *ok,
            reason,
            message,
            now,
        )
    });
    let condition = match (&v.condition, wanted) {
        (None, None) => None,
        (Some(_), None) => Some(None),
        (current, Some(new)) => (current.as_ref() != Some(&new)).then_some(Some(new)),
    };
    let write = ServiceWrite {
        key: v.key.clone(),
        ingress: (v.status_ips != desired.ingress).then(|| desired.ingress.clone()),
        condition,
        pool_annotation: (v.pool_annotation != desired.pool).then(|| desired.pool.clone()),
    };
    let noop =
        write.ingress.is_none() && write.condition.is_none() && write.pool_annotation.is_none();
    (!noop).then_some(write)
}

/// A condition that keeps its transition time while its status holds.
fn condition(
    previous: Option<&Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.chars().take(32768).collect(),
        last_transition_time: since,
        observed_generation: None,
    }
}

/// "198.18.8.1, 2001:db8::8:1", for messages.
fn ip_list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
