//! One reconcile pass as a pure function: cached objects in, the writes and
//! Events that bring the cluster in line out. The shell (`run.rs`) performs
//! them; tests call [`Index::pass`] directly.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ferrolb_crds::annotations::IP_ALLOCATED_FROM_POOL;
use ferrolb_crds::{IPAddressPool, IPAddressPoolStatus};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::allocator::{Allocator, Family, Labels, Outcome, Pool, ServiceKey, ServiceRequest};
use crate::convert::{self, ClassFilter};

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
    /// Reasons of allocations refused in this pass (for metrics).
    pub failures: Vec<&'static str>,
}

/// Fields of one Service to change. `None` leaves a field alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceWrite {
    pub key: ServiceKey,
    /// New `status.loadBalancer.ingress` IPs (empty clears it).
    pub ingress: Option<Vec<IpAddr>>,
    /// New `status.conditions` (ours replaced, others kept), if it changes.
    pub conditions: Option<Vec<Condition>>,
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
    pub severity: Severity,
    pub reason: &'static str,
    pub message: String,
}

/// Desired state of the fields FerroLB owns on one Service.
struct Desired {
    ingress: Vec<IpAddr>,
    pool: Option<String>,
    condition: Option<(bool, String, String)>,
}

/// The controller's memory between passes.
pub struct Index {
    filter: ClassFilter,
    allocator: Allocator,
    /// Last valid form of each pool: an invalid edit never takes effect,
    /// so it never takes IPs away.
    good_pools: BTreeMap<String, Pool>,
    invalid_pools: BTreeMap<String, String>,
    /// Request and status IPs each Service had when last settled; a Service
    /// whose inputs did not change is skipped.
    settled: HashMap<ServiceKey, (ServiceRequest, Vec<IpAddr>)>,
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

    /// Forget everything held, e.g. when leadership is lost: the next leader
    /// (maybe us again) rebuilds from Service statuses.
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

        let by_key: HashMap<ServiceKey, &Service> = inputs
            .services
            .iter()
            .map(|s| (convert::service_key(s), s.as_ref()))
            .collect();

        // Services we hold that are gone or no longer ours.
        let held: Vec<ServiceKey> = self.allocator.assignments().into_keys().collect();
        for key in held {
            if !by_key.contains_key(&key) {
                self.forget(&key);
            }
        }
        // Held, or carrying our marks (e.g. after a restart), but not ours.
        let filter = self.filter.clone();
        for svc in inputs.services.iter().filter(|s| !filter.is_ours(s)) {
            let key = convert::service_key(svc);
            let marked = svc
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(IP_ALLOCATED_FROM_POOL));
            if marked || self.allocator.assignment(&key).is_some() {
                self.forget(&key);
                self.release_foreign(svc, &mut plan, inputs.now.clone());
            }
        }

        let mut ours: Vec<&Service> = inputs
            .services
            .iter()
            .map(|s| s.as_ref())
            .filter(|s| self.filter.is_ours(s))
            .collect();
        // First come, first served; the key makes ties deterministic.
        ours.sort_by_key(|s| {
            (
                s.metadata.creation_timestamp.clone(),
                convert::service_key(s),
            )
        });
        let requests: Vec<(&Service, Result<ServiceRequest, String>)> = ours
            .into_iter()
            .map(|s| {
                let ns = s.metadata.namespace.as_deref().unwrap_or_default();
                let labels = inputs.namespaces.get(ns).cloned().unwrap_or_default();
                (s, convert::service_request(s, &labels))
            })
            .collect();

        // Restore every IP a status already holds before allocating anything,
        // so a restart or leader change never moves an IP.
        for (svc, req) in &requests {
            if let Ok(req) = req {
                let ips = convert::status_ips(svc);
                if !ips.is_empty() && self.allocator.assignment(&req.key).is_none() {
                    let _ = self.allocator.restore(req, &ips);
                }
            }
        }

        for (svc, req) in requests {
            let key = convert::service_key(svc);
            let status_ips = convert::status_ips(svc);
            let desired = match req {
                Err(message) => {
                    plan.failures.push("InvalidRequest");
                    self.report(
                        &mut plan,
                        &key,
                        Severity::Warning,
                        "AllocationFailed",
                        &message,
                    );
                    // A typo in an annotation must not cost a working IP.
                    let held = self.allocator.assignment(&key);
                    Desired {
                        ingress: held.as_ref().map(|a| a.ips.clone()).unwrap_or_default(),
                        pool: held.map(|a| a.pool_names().join(",")),
                        condition: Some((false, "InvalidRequest".into(), message)),
                    }
                }
                Ok(req) => {
                    let unchanged = self.settled.get(&key)
                        == Some(&(req.clone(), status_ips.clone()))
                        && self.allocator.assignment(&key).is_some();
                    if unchanged {
                        continue;
                    }
                    let desired = self.ensure(&req, &status_ips, &mut plan);
                    if !desired.ingress.is_empty() {
                        self.settled
                            .insert(key.clone(), (req, desired.ingress.clone()));
                    } else {
                        self.settled.remove(&key);
                    }
                    desired
                }
            };
            if let Some(write) = service_write(svc, &desired, inputs.now.clone()) {
                plan.services.push(write);
            }
        }

        self.pool_statuses(inputs, &mut plan);
        plan
    }

    fn ensure(&mut self, req: &ServiceRequest, status_ips: &[IpAddr], plan: &mut Plan) -> Desired {
        match self.allocator.ensure(req, status_ips) {
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
                    self.report(plan, &req.key, Severity::Normal, "IPAllocated", &text);
                } else {
                    // Quietly settled; forget an older refusal so a future
                    // one is reported again.
                    self.reported
                        .insert(req.key.clone(), format!("IPAllocated:{message}"));
                }
                Desired {
                    ingress: asg.ips,
                    pool: Some(pools),
                    condition: Some((true, "Allocated".into(), message)),
                }
            }
            Err(e) => {
                plan.failures.push(e.reason());
                let mut message = e.to_string();
                if !status_ips.is_empty() {
                    let old = ip_list(status_ips);
                    message.push_str(&format!(" (released {old})"));
                }
                self.report(
                    plan,
                    &req.key,
                    Severity::Warning,
                    "AllocationFailed",
                    &message,
                );
                Desired {
                    ingress: Vec::new(),
                    pool: None,
                    condition: Some((false, e.reason().into(), message)),
                }
            }
        }
    }

    fn report(
        &mut self,
        plan: &mut Plan,
        key: &ServiceKey,
        severity: Severity,
        reason: &'static str,
        message: &str,
    ) {
        let fingerprint = format!("{reason}:{message}");
        if self.reported.get(key) == Some(&fingerprint) {
            return;
        }
        self.reported.insert(key.clone(), fingerprint);
        plan.events.push(EventPlan {
            service: key.clone(),
            severity,
            reason,
            message: message.to_string(),
        });
    }

    fn forget(&mut self, key: &ServiceKey) {
        self.allocator.release(key);
        self.settled.remove(key);
        self.reported.remove(key);
    }

    /// A Service that stopped being ours: drop our annotation and
    /// condition; clear the ingress only if it is no LoadBalancer any more
    /// (with another class, another controller owns the status).
    fn release_foreign(&mut self, svc: &Service, plan: &mut Plan, now: Time) {
        let key = convert::service_key(svc);
        let still_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        let ips = convert::status_ips(svc);
        let write = ServiceWrite {
            key: key.clone(),
            ingress: (!still_lb && !ips.is_empty()).then(Vec::new),
            conditions: replaced_conditions(svc, None, now),
            pool_annotation: Some(None),
        };
        if !ips.is_empty() {
            let list = ip_list(&ips);
            plan.events.push(EventPlan {
                service: key,
                severity: Severity::Normal,
                reason: "IPReleased",
                message: format!("Released {list}: the Service is no longer a LoadBalancer of this controller's class"),
            });
        }
        plan.services.push(write);
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
            let mut conditions = Vec::new();
            let invalid = self.invalid_pools.get(&name);
            let in_effect = self.good_pools.contains_key(&name);
            let overlaps: Vec<String> = self
                .allocator
                .overlaps()
                .iter()
                .filter(|o| o.pool == name)
                .map(|o| format!("IPAddressPool {:?} ({})", o.other, o.range))
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
                &old.conditions,
                "Ready",
                ready,
                reason,
                &message,
                &inputs.now,
            ));
            if let Some(why) = invalid {
                conditions.push(condition(
                    &old.conditions,
                    "Invalid",
                    true,
                    "InvalidSpec",
                    why,
                    &inputs.now,
                ));
            }
            if !overlaps.is_empty() {
                let message = format!(
                    "shares addresses with {}; new allocations skip the shared addresses",
                    overlaps.join(", ")
                );
                conditions.push(condition(
                    &old.conditions,
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

/// The write needed to move `svc` to `desired`, if any.
fn service_write(svc: &Service, desired: &Desired, now: Time) -> Option<ServiceWrite> {
    let current_ips = convert::status_ips(svc);
    let current_pool = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IP_ALLOCATED_FROM_POOL).cloned());
    let write = ServiceWrite {
        key: convert::service_key(svc),
        ingress: (current_ips != desired.ingress).then(|| desired.ingress.clone()),
        conditions: replaced_conditions(svc, desired.condition.as_ref(), now),
        pool_annotation: (current_pool != desired.pool).then(|| desired.pool.clone()),
    };
    let noop =
        write.ingress.is_none() && write.conditions.is_none() && write.pool_annotation.is_none();
    (!noop).then_some(write)
}

/// The Service's conditions with ours set to `wanted` (or removed); `None`
/// when nothing would change.
fn replaced_conditions(
    svc: &Service,
    wanted: Option<&(bool, String, String)>,
    now: Time,
) -> Option<Vec<Condition>> {
    let current = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut next: Vec<Condition> = current
        .iter()
        .filter(|c| c.type_ != SERVICE_CONDITION)
        .cloned()
        .collect();
    if let Some((ok, reason, message)) = wanted {
        next.push(condition(
            &current,
            SERVICE_CONDITION,
            *ok,
            reason,
            message,
            &now,
        ));
    }
    (next != current).then_some(next)
}

/// A condition that keeps its transition time while its status holds.
fn condition(
    existing: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
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
