//! IP address management for LoadBalancer Services, with MetalLB's rules and
//! no I/O: the reconciler feeds it pools and Services and writes back what it
//! decides.
//!
//! Memory and time depend on the number of assignments and pool entries,
//! never on pool size: used addresses are kept as merged runs and the lowest
//! free address is found by hopping over runs.

pub mod error;
pub mod pool;
pub mod request;
pub mod selector;
mod used;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

pub use error::{AllocError, SharingConflict};
pub use pool::{Allocation, Pool};
pub use request::{Family, FamilyPolicy, Port, ServiceKey, ServiceRequest};
pub use selector::{Labels, Operator, Requirement, Selector};

use ferrolb_crds::addresses::from_u128;
use pool::{is_buggy, number};
use used::RunSet;

/// The IPs a Service holds and the pool each came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub ips: Vec<IpAddr>,
    pub pools: Vec<String>,
}

impl Assignment {
    /// Distinct pool names, in IP order: the `ip-allocated-from-pool` value.
    pub fn pool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in &self.pools {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
        names
    }
}

/// What [`Allocator::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The Service keeps the IPs it had.
    Unchanged(Assignment),
    /// The Service got new IPs; `replaced` says why its previous ones (if
    /// any) could not stay.
    Allocated {
        assignment: Assignment,
        previous: Vec<IpAddr>,
        replaced: Option<AllocError>,
    },
    /// The Service keeps what it holds although its pool no longer serves
    /// it (`why`), because no pool that serves it can take it now.
    Kept {
        assignment: Assignment,
        why: AllocError,
    },
}

impl Outcome {
    pub fn assignment(&self) -> &Assignment {
        match self {
            Self::Unchanged(a)
            | Self::Allocated { assignment: a, .. }
            | Self::Kept { assignment: a, .. } => a,
        }
    }
}

/// What [`Allocator::restore`] kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub assignment: Assignment,
    /// Set when the pool holding the IPs no longer admits the Service.
    pub not_admitted: Option<AllocError>,
}

/// Per-pool counts for the pool status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Distinct IPs assigned from this pool, by family (IPv4, IPv6).
    pub assigned: [u128; 2],
    /// Addresses the pool owns and may hand out, by family.
    pub capacity: [u128; 2],
    /// Of those, the ones nobody uses.
    pub free: [u128; 2],
}

impl PoolStats {
    pub fn available(&self, family: Family) -> u128 {
        self.free[family.index()]
    }
}

/// Two pools claiming the same addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub pool: String,
    pub other: String,
    pub range: String,
    /// The pool the shared addresses belong to (the first in order).
    pub owner: String,
}

#[derive(Debug, Clone)]
struct Holder {
    ips: Vec<IpAddr>,
    sharing_key: Option<String>,
    backend_key: String,
    ports: Vec<Port>,
}

#[derive(Debug, Clone, Default)]
struct IpUse {
    /// The pool the IP counts against; `None` once no pool contains it.
    pool: Option<String>,
    users: BTreeSet<ServiceKey>,
}

#[derive(Debug, Default)]
pub struct Allocator {
    /// In allocation order (see [`Pool::order`]).
    pools: Vec<Pool>,
    /// Per pool, per family: sorted, merged runs it shares with a pool that
    /// comes earlier in order, which owns them. New allocations from this
    /// pool skip them, so no address is handed out or counted by two pools.
    contested: HashMap<String, [Vec<(u128, u128)>; 2]>,
    overlaps: Vec<Overlap>,
    used: [RunSet; 2],
    ips: HashMap<IpAddr, IpUse>,
    holders: HashMap<ServiceKey, Holder>,
    /// Sharing key -> IPs whose users carry it.
    by_key: HashMap<String, BTreeSet<IpAddr>>,
}

impl Allocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the pool set. Assignments are never dropped here: each IP is
    /// relabelled to a pool that still contains it. Returns the Services
    /// holding an IP that no pool contains any more, for the caller to
    /// re-run [`Allocator::ensure`] on.
    pub fn set_pools(&mut self, mut pools: Vec<Pool>) -> Vec<ServiceKey> {
        pools.sort_by(|a, b| a.order(b));
        self.pools = pools;
        self.compute_overlaps();
        let mut orphans = BTreeSet::new();
        for (ip, usage) in self.ips.iter_mut() {
            let still = usage
                .pool
                .as_ref()
                .and_then(|name| self.pools.iter().find(|p| &p.name == name))
                .is_some_and(|p| p.contains(*ip));
            if !still {
                usage.pool = self
                    .pools
                    .iter()
                    .find(|p| p.contains(*ip))
                    .map(|p| p.name.clone());
            }
            if usage.pool.is_none() {
                orphans.extend(usage.users.iter().cloned());
            }
        }
        orphans.into_iter().collect()
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Every pair of pools that share addresses, each pair reported from
    /// both sides.
    pub fn overlaps(&self) -> &[Overlap] {
        &self.overlaps
    }

    /// Finds every pair of pools sharing addresses. A shared address belongs
    /// to the pool that comes first in allocation order: only it hands the
    /// address out and counts it, so `status.available*` counts it once.
    fn compute_overlaps(&mut self) {
        self.contested.clear();
        self.overlaps.clear();
        for (i, p) in self.pools.iter().enumerate() {
            let mut runs: [Vec<(u128, u128)>; 2] = Default::default();
            for (j, q) in self.pools.iter().enumerate().filter(|(j, _)| *j != i) {
                for r in &p.ranges {
                    for s in q.ranges.iter().filter(|s| r.overlaps(s)) {
                        let (a, b) = (r.bounds(), s.bounds());
                        let shared = (a.0.max(b.0), a.1.min(b.1));
                        if j < i {
                            runs[Family::of(r.start()).index()].push(shared);
                        }
                        let start = from_u128(r.is_ipv4(), shared.0);
                        let end = from_u128(r.is_ipv4(), shared.1);
                        if let (Some(start), Some(end)) = (start, end) {
                            self.overlaps.push(Overlap {
                                pool: p.name.clone(),
                                other: q.name.clone(),
                                range: format!("{start}-{end}"),
                                owner: if j < i {
                                    q.name.clone()
                                } else {
                                    p.name.clone()
                                },
                            });
                        }
                    }
                }
            }
            for family in &mut runs {
                *family = merge(std::mem::take(family));
            }
            self.contested.insert(p.name.clone(), runs);
        }
    }

    /// The addresses `pool` owns, per family, as disjoint sorted runs: its
    /// ranges merged, minus what an earlier pool owns.
    fn owned(&self, pool: &Pool) -> [Vec<(u128, u128)>; 2] {
        let mut out: [Vec<(u128, u128)>; 2] = Default::default();
        for family in [Family::V4, Family::V6] {
            let ranges = merge(
                pool.ranges
                    .iter()
                    .filter(|r| Family::of(r.start()) == family)
                    .map(|r| r.bounds())
                    .collect(),
            );
            let contested = self
                .contested
                .get(&pool.name)
                .map(|c| c[family.index()].as_slice())
                .unwrap_or_default();
            out[family.index()] = subtract(&ranges, contested);
        }
        out
    }

    /// The IPs `key` holds.
    pub fn assignment(&self, key: &ServiceKey) -> Option<Assignment> {
        let holder = self.holders.get(key)?;
        Some(Assignment {
            ips: holder.ips.clone(),
            pools: holder
                .ips
                .iter()
                .map(|ip| {
                    self.ips
                        .get(ip)
                        .and_then(|u| u.pool.clone())
                        .unwrap_or_default()
                })
                .collect(),
        })
    }

    /// Runs of used addresses held in memory, plus assignments: what the
    /// allocator's memory grows with (never the pools' size).
    pub fn footprint(&self) -> (usize, usize) {
        (self.used.iter().map(RunSet::runs).sum(), self.holders.len())
    }

    /// Distinct IPs in use, all families.
    pub fn used_ips(&self) -> u128 {
        self.used.iter().map(RunSet::len).sum()
    }

    /// Every assignment, for status writing and tests.
    pub fn assignments(&self) -> BTreeMap<ServiceKey, Assignment> {
        self.holders
            .keys()
            .filter_map(|k| Some((k.clone(), self.assignment(k)?)))
            .collect()
    }

    /// Counts for every pool. Each address counts in one pool only: an
    /// assigned IP against the pool it was handed out from, a free one in
    /// the pool that owns it (see [`Allocator::overlaps`]).
    pub fn stats(&self) -> BTreeMap<String, PoolStats> {
        let mut out: BTreeMap<String, PoolStats> = BTreeMap::new();
        for p in &self.pools {
            let owned = self.owned(p);
            let mut stats = PoolStats::default();
            for family in [Family::V4, Family::V6] {
                let i = family.index();
                let v4 = family == Family::V4;
                let skip_buggy = p.avoid_buggy_ips && v4;
                for &(s, e) in &owned[i] {
                    let len = (e - s).saturating_add(1);
                    let buggy = if skip_buggy { buggy_count(s, e) } else { 0 };
                    let (mut used, mut used_buggy) = (0u128, 0u128);
                    for (rs, re) in self.used[i].runs_within(s, e) {
                        used += re - rs + 1;
                        if skip_buggy {
                            used_buggy += buggy_count(rs, re);
                        }
                    }
                    stats.capacity[i] = stats.capacity[i].saturating_add(len - buggy);
                    stats.free[i] = stats.free[i].saturating_add(len - buggy - (used - used_buggy));
                }
            }
            out.insert(p.name.clone(), stats);
        }
        for (ip, usage) in &self.ips {
            if let Some(stats) = usage.pool.as_ref().and_then(|p| out.get_mut(p)) {
                stats.assigned[Family::of(*ip).index()] += 1;
            }
        }
        out
    }

    /// Keys of every Service holding IPs.
    pub fn held_keys(&self) -> Vec<ServiceKey> {
        self.holders.keys().cloned().collect()
    }

    /// Number of Services holding IPs (cheap, for metrics).
    pub fn holders(&self) -> usize {
        self.holders.len()
    }

    /// Brings `svc` to a valid assignment, keeping what it holds (or, after a
    /// restart, what its status says it holds) whenever that is still
    /// allowed, so IPs never move without a reason.
    ///
    /// When the pool an IP came from no longer serves the Service (its
    /// `serviceAllocation` narrowed, or Service or Namespace labels changed),
    /// the Service moves to a pool that serves it; while none can, it keeps
    /// what it holds ([`Outcome::Kept`]), so a label edit never causes an
    /// outage.
    pub fn ensure(
        &mut self,
        svc: &ServiceRequest,
        status_ips: &[IpAddr],
    ) -> Result<Outcome, AllocError> {
        let previous = self
            .holders
            .get(&svc.key)
            .map(|h| h.ips.clone())
            .unwrap_or_else(|| status_ips.to_vec());

        if !svc.requested_ips.is_empty() {
            let same = sorted(&previous) == sorted(&svc.requested_ips);
            self.release(&svc.key);
            return match self.assign_requested(svc) {
                Ok(assignment) if same => Ok(Outcome::Unchanged(assignment)),
                Ok(assignment) => Ok(Outcome::Allocated {
                    assignment,
                    previous,
                    replaced: None,
                }),
                // The requested IP cannot move elsewhere; keep it and say why.
                Err(why @ AllocError::PoolNotEligible { .. }) if same => {
                    match self.restore(svc, &previous) {
                        Ok(r) => Ok(Outcome::Kept {
                            assignment: r.assignment,
                            why,
                        }),
                        Err(_) => Err(why),
                    }
                }
                Err(e) => Err(e),
            };
        }

        let mut replaced = None;
        if !previous.is_empty() {
            match self.restore(svc, &previous) {
                Ok(Restored {
                    assignment,
                    not_admitted: None,
                }) => return Ok(Outcome::Unchanged(assignment)),
                Ok(Restored {
                    assignment,
                    not_admitted: Some(why),
                }) => {
                    // The old IPs stay reserved while a new home is sought;
                    // `commit` frees them only once that succeeded.
                    if svc.requested_pool.is_none()
                        && let Ok(moved) = self.allocate(svc)
                    {
                        return Ok(Outcome::Allocated {
                            assignment: moved,
                            previous,
                            replaced: Some(why),
                        });
                    }
                    return Ok(Outcome::Kept { assignment, why });
                }
                Err(why) => replaced = Some(why),
            }
        }
        self.release(&svc.key);
        let assignment = match &svc.requested_pool {
            Some(pool) => self.allocate_from_pool(svc, pool)?,
            None => self.allocate(svc)?,
        };
        Ok(Outcome::Allocated {
            assignment,
            previous,
            replaced,
        })
    }

    /// Frees everything `key` holds; returns what it held.
    pub fn release(&mut self, key: &ServiceKey) -> Option<Vec<IpAddr>> {
        let holder = self.holders.remove(key)?;
        for ip in &holder.ips {
            let Some(usage) = self.ips.get_mut(ip) else {
                continue;
            };
            usage.users.remove(key);
            if usage.users.is_empty() {
                self.ips.remove(ip);
                self.used[Family::of(*ip).index()].remove(number(*ip));
                if let Some(k) = &holder.sharing_key
                    && let Some(set) = self.by_key.get_mut(k)
                {
                    set.remove(ip);
                    if set.is_empty() {
                        self.by_key.remove(k);
                    }
                }
            }
        }
        Some(holder.ips)
    }

    /// Keeps `ips` for `svc` if they still fit: the families it wants, all
    /// in one pool (the requested one, if any), shareable. Used to restore
    /// what Service statuses hold before anything new is allocated, so it
    /// does not refuse a pool that no longer admits the Service: it reports
    /// that in [`Restored::not_admitted`] for [`Allocator::ensure`] to act on.
    pub fn restore(
        &mut self,
        svc: &ServiceRequest,
        ips: &[IpAddr],
    ) -> Result<Restored, AllocError> {
        let families: BTreeSet<Family> = ips.iter().map(|ip| Family::of(*ip)).collect();
        let wanted: BTreeSet<Family> = svc.wanted_families().into_iter().collect();
        let fits = !ips.is_empty()
            && families.len() == ips.len()
            && match svc.policy {
                // MetalLB keeps either family (or both) for PreferDualStack.
                FamilyPolicy::PreferDualStack => families.is_subset(&wanted),
                _ => families == wanted,
            };
        if !fits {
            return Err(AllocError::InvalidRequest(format!(
                "the Service now wants {} addresses",
                svc.wanted_families()
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        let pool = match &svc.requested_pool {
            Some(name) => {
                let pool = self.pool(name);
                match ips
                    .iter()
                    .find(|ip| !pool.is_some_and(|p| p.contains(**ip)))
                {
                    Some(ip) => {
                        return Err(AllocError::NotInPool {
                            ip: *ip,
                            pool: name.clone(),
                        });
                    }
                    None => pool.map(|p| p.name.clone()).unwrap_or_default(),
                }
            }
            None => self.home_pool(svc, ips)?,
        };
        for ip in ips {
            self.check_sharing(svc, *ip)?;
        }
        let not_admitted = self
            .pool(&pool)
            .and_then(|p| p.admits(svc).err())
            .map(|why| AllocError::PoolNotEligible {
                pool: pool.clone(),
                why,
            });
        let placed = ips.iter().map(|ip| (*ip, pool.clone())).collect();
        Ok(Restored {
            assignment: self.commit(svc, placed),
            not_admitted,
        })
    }

    /// The one pool `ips` (all of them) belong to: the pool they already
    /// count against if it still contains them all and admits the Service,
    /// else the first containing pool that admits it, else the pool they
    /// count against, else the first that contains them.
    fn home_pool(&self, svc: &ServiceRequest, ips: &[IpAddr]) -> Result<String, AllocError> {
        let contains_all = |p: &&Pool| ips.iter().all(|ip| p.contains(*ip));
        let containing: Vec<&Pool> = self.pools.iter().filter(contains_all).collect();
        let current = ips
            .first()
            .and_then(|ip| self.ips.get(ip))
            .and_then(|u| u.pool.as_deref())
            .and_then(|name| containing.iter().find(|p| p.name == name).copied());
        let admits = |p: &Pool| p.admits(svc).is_ok();
        let chosen = current
            .filter(|p| admits(p))
            .or_else(|| containing.iter().find(|p| admits(p)).copied())
            .or(current)
            .or_else(|| containing.first().copied());
        match chosen {
            Some(p) => Ok(p.name.clone()),
            None => Err(self.why_not_one_pool(ips)),
        }
    }

    /// Why no single pool contains all of `ips`.
    fn why_not_one_pool(&self, ips: &[IpAddr]) -> AllocError {
        match ips
            .iter()
            .find(|ip| !self.pools.iter().any(|p| p.contains(**ip)))
        {
            Some(ip) => AllocError::NotInAnyPool { ip: *ip },
            None => AllocError::SplitPools {
                ips: ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            },
        }
    }

    fn assign_requested(&mut self, svc: &ServiceRequest) -> Result<Assignment, AllocError> {
        let ips = &svc.requested_ips;
        let wanted = svc.wanted_families();
        let mut seen = BTreeSet::new();
        for ip in ips {
            let family = Family::of(*ip);
            if !wanted.contains(&family) {
                return Err(AllocError::InvalidRequest(format!(
                    "{ip} is {family} but the Service's ipFamilies/ipFamilyPolicy allow only {}",
                    wanted
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if !seen.insert(family) {
                return Err(AllocError::InvalidRequest(format!(
                    "at most one {family} address may be requested"
                )));
            }
        }
        if svc.policy == FamilyPolicy::RequireDualStack && seen.len() < wanted.len() {
            return Err(AllocError::InvalidRequest(
                "RequireDualStack needs one IPv4 and one IPv6 address in the request".into(),
            ));
        }
        // As in MetalLB, every requested IP comes from one pool.
        let pool = match &svc.requested_pool {
            Some(name) => {
                let pool = self
                    .pool(name)
                    .ok_or_else(|| AllocError::UnknownPool(name.clone()))?;
                if let Some(ip) = ips.iter().find(|ip| !pool.contains(**ip)) {
                    return Err(AllocError::NotInPool {
                        ip: *ip,
                        pool: name.clone(),
                    });
                }
                pool
            }
            None => {
                let containing: Vec<&Pool> = self
                    .pools
                    .iter()
                    .filter(|p| ips.iter().all(|ip| p.contains(*ip)))
                    .collect();
                let first = containing
                    .first()
                    .copied()
                    .ok_or_else(|| self.why_not_one_pool(ips))?;
                containing
                    .iter()
                    .find(|p| p.admits(svc).is_ok())
                    .copied()
                    .unwrap_or(first)
            }
        };
        pool.admits(svc)
            .map_err(|why| AllocError::PoolNotEligible {
                pool: pool.name.clone(),
                why,
            })?;
        let name = pool.name.clone();
        for ip in ips {
            self.check_sharing(svc, *ip)?;
        }
        let placed = ips.iter().map(|ip| (*ip, name.clone())).collect();
        Ok(self.commit(svc, placed))
    }

    fn allocate_from_pool(
        &mut self,
        svc: &ServiceRequest,
        name: &str,
    ) -> Result<Assignment, AllocError> {
        let pool = self
            .pool(name)
            .ok_or_else(|| AllocError::UnknownPool(name.to_string()))?;
        pool.admits(svc)
            .map_err(|why| AllocError::PoolNotEligible {
                pool: name.to_string(),
                why,
            })?;
        let mut offered = false;
        for families in self.family_choices(svc) {
            if !families.iter().all(|f| pool.has_family(*f)) {
                continue;
            }
            offered = true;
            if let Some(ips) = self.pick(pool, svc, &families) {
                let placed = ips.into_iter().map(|ip| (ip, name.to_string())).collect();
                return Ok(self.commit(svc, placed));
            }
        }
        if !offered {
            let wanted = svc.wanted_families();
            let missing = wanted
                .iter()
                .find(|f| !pool.has_family(**f))
                .or(wanted.first())
                .copied()
                .unwrap_or(Family::V4);
            return Err(AllocError::PoolLacksFamily {
                pool: name.to_string(),
                family: missing,
            });
        }
        Err(AllocError::Exhausted {
            families: family_words(&svc.wanted_families()),
            pools: format!("IPAddressPool {name:?}"),
        })
    }

    /// Auto-allocation, tier by tier as MetalLB does: pools with a
    /// `serviceAllocation` that admit the Service first, then the
    /// unrestricted ones; within a tier every family choice is tried over
    /// all its pools before the next (fewer families) choice.
    fn allocate(&mut self, svc: &ServiceRequest) -> Result<Assignment, AllocError> {
        if self.pools.is_empty() {
            return Err(AllocError::NoPools);
        }
        let eligible: Vec<&Pool> = self
            .pools
            .iter()
            .filter(|p| p.auto_assign && p.admits(svc).is_ok())
            .collect();
        if eligible.is_empty() {
            let why: Vec<String> = self
                .pools
                .iter()
                .map(|p| match p.admits(svc) {
                    Err(why) => format!("{}: {why}", p.name),
                    Ok(()) => format!("{}: autoAssign is false", p.name),
                })
                .collect();
            return Err(AllocError::NoEligiblePool(why.join("; ")));
        }
        let choices = self.family_choices(svc);
        let tiers: [Vec<&Pool>; 2] = [
            eligible
                .iter()
                .filter(|p| p.allocation.is_some())
                .copied()
                .collect(),
            eligible
                .iter()
                .filter(|p| p.allocation.is_none())
                .copied()
                .collect(),
        ];
        for tier in &tiers {
            for families in &choices {
                for pool in tier {
                    if let Some(ips) = self.pick(pool, svc, families) {
                        let placed = ips.into_iter().map(|ip| (ip, pool.name.clone())).collect();
                        return Ok(self.commit(svc, placed));
                    }
                }
            }
        }
        Err(AllocError::Exhausted {
            families: family_words(&svc.wanted_families()),
            pools: format!(
                "IPAddressPools {}",
                eligible
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// Family sets to try in order: everything wanted, then (prefer-dual
    /// only) the primary family alone, then the secondary alone.
    fn family_choices(&self, svc: &ServiceRequest) -> Vec<Vec<Family>> {
        let wanted = svc.wanted_families();
        let mut choices = vec![wanted.clone()];
        if svc.policy == FamilyPolicy::PreferDualStack && wanted.len() > 1 {
            choices.extend(wanted.iter().map(|f| vec![*f]));
        }
        choices
    }

    /// One address per family from `pool`, or `None` if it cannot.
    fn pick(&self, pool: &Pool, svc: &ServiceRequest, families: &[Family]) -> Option<Vec<IpAddr>> {
        families
            .iter()
            .map(|f| {
                let shared = self.lowest_shareable(pool, svc, *f);
                let free = self.lowest_free(pool, *f);
                match (shared, free) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .collect()
    }

    /// The lowest IP of `pool` already used under the Service's sharing key
    /// that it may join.
    fn lowest_shareable(
        &self,
        pool: &Pool,
        svc: &ServiceRequest,
        family: Family,
    ) -> Option<IpAddr> {
        let key = svc.sharing_key.as_ref()?;
        self.by_key.get(key)?.iter().copied().find(|ip| {
            Family::of(*ip) == family
                && self.ips.get(ip).and_then(|u| u.pool.as_deref()) == Some(pool.name.as_str())
                && self.check_sharing(svc, *ip).is_ok()
        })
    }

    /// The lowest address of `pool` (in `spec.addresses` order) that nobody
    /// uses, no other pool claims, and that is not a skipped .0/.255.
    fn lowest_free(&self, pool: &Pool, family: Family) -> Option<IpAddr> {
        let used = &self.used[family.index()];
        let contested = self.contested.get(&pool.name).map(|c| &c[family.index()]);
        for range in pool
            .ranges
            .iter()
            .filter(|r| Family::of(r.start()) == family)
        {
            let (mut v, end) = range.bounds();
            while v <= end {
                let skip_to = if let Some((_, run_end)) = used.run_containing(v) {
                    run_end.checked_add(1)
                } else if let Some(run_end) = contested.and_then(|c| run_ending_after(c, v)) {
                    run_end.checked_add(1)
                } else {
                    let ip = from_u128(range.is_ipv4(), v)?;
                    if !(pool.avoid_buggy_ips && is_buggy(ip)) {
                        return Some(ip);
                    }
                    v.checked_add(1)
                };
                match skip_to {
                    Some(next) => v = next,
                    None => break,
                }
            }
        }
        None
    }

    /// `Ok` if `svc` may use `ip` next to the Services already on it.
    fn check_sharing(&self, svc: &ServiceRequest, ip: IpAddr) -> Result<(), AllocError> {
        let Some(usage) = self.ips.get(&ip) else {
            return Ok(());
        };
        for owner in usage.users.iter().filter(|u| **u != svc.key) {
            let Some(holder) = self.holders.get(owner) else {
                continue;
            };
            let conflict = match (&holder.sharing_key, &svc.sharing_key) {
                (None, _) => Some(SharingConflict::OwnerDoesNotShare),
                (_, None) => Some(SharingConflict::RequesterDoesNotShare),
                (Some(o), Some(r)) if o != r => Some(SharingConflict::DifferentKey {
                    owner: o.clone(),
                    requester: r.clone(),
                }),
                _ if holder.backend_key != svc.backend_key => {
                    Some(SharingConflict::DifferentBackend)
                }
                _ => svc
                    .ports
                    .iter()
                    .find(|p| holder.ports.contains(p))
                    .map(|p| SharingConflict::PortClash(p.clone())),
            };
            if let Some(why) = conflict {
                return Err(AllocError::InUse {
                    ip,
                    owner: owner.clone(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// Records `placed` as what `svc` holds, replacing what it held before.
    fn commit(&mut self, svc: &ServiceRequest, placed: Vec<(IpAddr, String)>) -> Assignment {
        self.release(&svc.key);
        for (ip, pool) in &placed {
            self.used[Family::of(*ip).index()].insert(number(*ip));
            let usage = self.ips.entry(*ip).or_default();
            if usage.pool.is_none() || usage.users.is_empty() {
                usage.pool = Some(pool.clone());
            }
            usage.users.insert(svc.key.clone());
            if let Some(k) = &svc.sharing_key {
                self.by_key.entry(k.clone()).or_default().insert(*ip);
            }
        }
        let ips: Vec<IpAddr> = placed.iter().map(|(ip, _)| *ip).collect();
        self.holders.insert(
            svc.key.clone(),
            Holder {
                ips: ips.clone(),
                sharing_key: svc.sharing_key.clone(),
                backend_key: svc.backend_key.clone(),
                ports: svc.ports.clone(),
            },
        );
        self.assignment(&svc.key).unwrap_or(Assignment {
            ips,
            pools: Vec::new(),
        })
    }
}

/// End of the run in sorted, disjoint `runs` that contains `v`.
fn run_ending_after(runs: &[(u128, u128)], v: u128) -> Option<u128> {
    let i = runs.partition_point(|(s, _)| *s <= v);
    runs[..i].last().filter(|(_, e)| *e >= v).map(|(_, e)| *e)
}

/// Sorts and merges overlapping or touching runs.
fn merge(mut runs: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    runs.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `runs` minus `minus`; both sorted and disjoint.
fn subtract(runs: &[(u128, u128)], minus: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(s, e) in runs {
        let mut start = s;
        let mut done = false;
        for &(ms, me) in minus.iter().filter(|(ms, me)| *me >= s && *ms <= e) {
            if ms > start {
                out.push((start, ms - 1));
            }
            match me.checked_add(1) {
                Some(next) if next <= e => start = start.max(next),
                _ => {
                    done = true;
                    break;
                }
            }
        }
        if !done && start <= e {
            out.push((start, e));
        }
    }
    out
}

/// Addresses ending in .0 or .255 among the IPv4 numbers in `[s, e]`.
fn buggy_count(s: u128, e: u128) -> u128 {
    pool::count_residue(s, e, 0) + pool::count_residue(s, e, 255)
}

fn sorted(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = ips.to_vec();
    v.sort();
    v
}

fn family_words(families: &[Family]) -> String {
    families
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("+")
}
