//! What our table of one family holds, kept by owner so that a change to
//! one Service costs work in proportion to that Service, not to the
//! cluster: [`Programmed::update`] renders only the changed Services (before
//! and after), turns the difference into operations, and records the new
//! state. Pure; the sync loop sends the operations and, when the kernel
//! refuses them, calls [`Programmed::forget`] so the next pass rebuilds.
//!
//! Ownership: each frontend (`address . protocol . port`, or a NodePort)
//! belongs to the Service with the lowest key among those that claim it;
//! the others' elements for it wait until it is free. Plain-set members
//! several Services need (ClusterIPs, hairpin pairs) and the pick chains
//! are counted. Affinity sets and chains are named per Service. The
//! scaffold is small and diffed whole.
//!
//! The operations of an update, applied to what [`Programmed::full`]
//! produced before, give exactly what `full` produces for the new state
//! (tests/incremental.rs proves it on random clusters).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::cache::ServiceInputs;
use crate::conntrack::UdpService;
use crate::diff::{self, Op};
use crate::model::{NodeFacts, ServiceKey};
use crate::render::{
    self, Assembly, Config, Elements, Fragment, Front, HealthCheck, Pick, Rendered,
};
use crate::ruleset::{Chain, Data, Family, Ruleset, Set, Value};

/// The facts every Service's rendering shares.
pub struct Context<'a> {
    pub cfg: &'a Config,
    pub node: &'a NodeFacts,
    pub service_cidrs: &'a [IpNet],
}

/// What one update asks of the kernel and of the shell.
#[derive(Debug, Default)]
pub struct Update {
    /// A partial update's operations.
    pub ops: Vec<Op>,
    /// Or a rebuild of the whole table (the first, or after a failure),
    /// rendered while the kernel's transaction is being written.
    pub build: Option<FullBuild>,
    /// Why a rebuild that had to happen for a reason happened (metrics).
    pub reason: Option<&'static str>,
    /// UDP Service ports whose endpoints may have changed, for conntrack
    /// cleanup (every one after a full build).
    pub udp: Vec<UdpService>,
}

#[derive(Debug)]
struct State {
    scaffold: Ruleset,
    services: HashMap<ServiceKey, Arc<ServiceInputs>>,
    /// Claimants of each frontend, lowest key (the owner) first.
    fronts: HashMap<Front, Vec<ServiceKey>>,
    shared: HashMap<(&'static str, IpAddr), u32>,
    picks: HashMap<Pick, u32>,
    health: BTreeMap<ServiceKey, HealthCheck>,
    no_local: HashMap<ServiceKey, (usize, usize)>,
    no_local_total: (usize, usize),
    chains: usize,
    /// Elements per set (their sum is the table's), to keep each under its
    /// capacity.
    counts: HashMap<String, usize>,
}

/// The table of one family, as we last programmed it.
#[derive(Debug)]
pub struct Programmed {
    family: Family,
    state: Option<State>,
}

impl Programmed {
    pub fn new(family: Family) -> Self {
        Self {
            family,
            state: None,
        }
    }

    /// True once a full build was taken and nothing failed since.
    pub fn is_built(&self) -> bool {
        self.state.is_some()
    }

    /// The kernel's state is unknown: the next update rebuilds.
    pub fn forget(&mut self) {
        self.state = None;
    }

    /// The whole table for `all`, replacing whatever the kernel holds: a
    /// stream of operation batches to send in one transaction, then to
    /// [`Programmed::install`] once the kernel took it. Until then this
    /// table is unbuilt.
    pub fn full(
        &mut self,
        ctx: &Context<'_>,
        all: Vec<(ServiceKey, Arc<ServiceInputs>)>,
    ) -> Update {
        self.state = None;
        Update {
            build: Some(FullBuild::new(self.family, ctx, all)),
            ..Default::default()
        }
    }

    /// Takes the state a full build reached (after the kernel took it).
    pub fn install(&mut self, build: FullBuild) {
        self.state = Some(build.state);
    }

    /// A full build's operations, all at once, installed (tests and tools;
    /// the proxy streams them).
    pub fn full_ops(
        &mut self,
        ctx: &Context<'_>,
        all: Vec<(ServiceKey, Arc<ServiceInputs>)>,
    ) -> Vec<Op> {
        let mut build = FullBuild::new(self.family, ctx, all);
        let ops = build.by_ref().flatten().collect();
        self.install(build);
        ops
    }

    /// The operations for `changed` (each Service with what it is now,
    /// `None` when gone) and a possibly new scaffold; a full build (of
    /// `all`) when nothing was built yet or the scaffold changed shape.
    pub fn update(
        &mut self,
        ctx: &Context<'_>,
        changed: &[(ServiceKey, Option<Arc<ServiceInputs>>)],
        all: impl FnOnce() -> Vec<(ServiceKey, Arc<ServiceInputs>)>,
    ) -> Update {
        let family = self.family;
        let mut scaffold = render::scaffold(family, ctx.cfg, ctx.node, ctx.service_cidrs);
        let Some(state) = self.state.as_mut() else {
            return self.full(ctx, all());
        };
        // The sets keep the capacities they were built with.
        for (name, set) in scaffold.sets.iter_mut() {
            set.capacity = match state.scaffold.sets.get(name) {
                Some(old) => old.capacity,
                None => set.sizable().then(|| capacity_for(set.elements.len())),
            };
        }
        let Some(mut ops) = diff::diff(&state.scaffold, &scaffold) else {
            return Update {
                reason: Some("layout-changed"),
                ..self.full(ctx, all())
            };
        };
        state.scaffold = scaffold;
        let mut delta = Delta::default();
        let mut udp = Vec::new();
        for (key, now) in changed {
            let old = state.services.get(key).map(|i| fragment(family, ctx, i));
            let new = now.as_ref().map(|i| fragment(family, ctx, i));
            if old == new && now.is_some() == state.services.contains_key(key) {
                if let Some(i) = now {
                    state.services.insert(key.clone(), i.clone());
                }
                continue;
            }
            let old = old.unwrap_or_default();
            let new = new.unwrap_or_default();
            udp.extend(new.udp.iter().cloned());
            // Frontends first: who owns each before and after.
            let fronts: Vec<Front> = {
                let mut f: Vec<Front> = old
                    .fronts
                    .keys()
                    .chain(new.fronts.keys())
                    .copied()
                    .collect();
                f.sort();
                f.dedup();
                f
            };
            for front in fronts {
                let before_owner = state.owner(&front);
                state.reclaim(key, front, new.fronts.contains_key(&front));
                let after_owner = state.owner(&front);
                let empty = Elements::new();
                let elements_of = |owner: &Option<ServiceKey>, mine: &Fragment| -> Elements {
                    match owner {
                        None => empty.clone(),
                        Some(o) if o == key => mine.fronts.get(&front).cloned().unwrap_or_default(),
                        Some(o) => state
                            .services
                            .get(o)
                            .and_then(|i| fragment(family, ctx, i).fronts.remove(&front))
                            .unwrap_or_default(),
                    }
                };
                if before_owner == after_owner && before_owner.as_ref() != Some(key) {
                    continue;
                }
                let before = elements_of(&before_owner, &old);
                let after = elements_of(&after_owner, &new);
                delta.elements(&before, &after);
            }
            for k in old.shared.difference(&new.shared) {
                if state.release(k) {
                    delta.element(k.0, render::shared_key(k.0, k.1), Some(None), None);
                }
            }
            for k in new.shared.difference(&old.shared) {
                if state.take(k) {
                    delta.element(k.0, render::shared_key(k.0, k.1), None, Some(None));
                }
            }
            for p in old.picks.difference(&new.picks) {
                if state.unpick(*p) {
                    delta.chain(p.name(), Some(p.chain()), None);
                }
            }
            for p in new.picks.difference(&old.picks) {
                if state.pick(*p) {
                    delta.chain(p.name(), None, Some(p.chain()));
                }
            }
            for (name, c) in &old.chains {
                delta.chain(name.clone(), Some(c.clone()), new.chains.get(name).cloned());
            }
            for (name, c) in new
                .chains
                .iter()
                .filter(|(n, _)| !old.chains.contains_key(*n))
            {
                delta.chain(name.clone(), None, Some(c.clone()));
            }
            for (name, s) in &old.sets {
                delta.set(name.clone(), Some(s.clone()), new.sets.get(name).cloned());
            }
            for (name, s) in new.sets.iter().filter(|(n, _)| !old.sets.contains_key(*n)) {
                delta.set(name.clone(), None, Some(s.clone()));
            }
            match new.health {
                Some(h) => state.health.insert(key.clone(), h),
                None => state.health.remove(key),
            };
            state.set_no_local(key, (new.no_local_internal, new.no_local_external));
            match now {
                Some(i) => state.services.insert(key.clone(), i.clone()),
                None => state.services.remove(key),
            };
        }
        let (more, chains) = delta.into_ops();
        state.chains = state.chains.saturating_add_signed(chains);
        ops.extend(more);
        count(&mut state.counts, &ops);
        let full = state.scaffold.sets.iter().any(|(name, set)| {
            set.capacity
                .is_some_and(|c| state.counts.get(name).copied().unwrap_or(0) > c as usize)
        });
        if full {
            // The kernel would refuse the adds: rebuild with room to grow.
            return Update {
                reason: Some("set-full"),
                ..self.full(ctx, all())
            };
        }
        Update {
            ops: diff::ordered(ops),
            build: None,
            reason: None,
            udp,
        }
    }

    /// The scaffold last built: the definitions of the sets the operations
    /// fill.
    pub fn scaffold(&self) -> Option<&Ruleset> {
        self.state.as_ref().map(|s| &s.scaffold)
    }

    /// Health-check ports and their local endpoints, per Service.
    pub fn health(&self) -> BTreeMap<ServiceKey, HealthCheck> {
        self.state
            .as_ref()
            .map(|s| s.health.clone())
            .unwrap_or_default()
    }

    /// Service ports with a Local policy and endpoints, none of them here:
    /// (internal, external).
    pub fn no_local(&self) -> (usize, usize) {
        self.state.as_ref().map_or((0, 0), |s| s.no_local_total)
    }

    /// (chains, elements) of the table, for the ruleset-size metrics.
    pub fn size(&self) -> (usize, usize) {
        self.state.as_ref().map_or((0, 0), |s| {
            (s.chains + s.scaffold.chains.len(), s.counts.values().sum())
        })
    }

    /// The whole table as a value (for `--print-ruleset` and tests).
    pub fn ruleset(&self, ctx: &Context<'_>) -> Option<Ruleset> {
        let state = self.state.as_ref()?;
        let mut keys: Vec<&ServiceKey> = state.services.keys().collect();
        keys.sort();
        let mut assembly = Assembly::new(state.scaffold.clone());
        for k in keys {
            assembly.add(k, fragment(self.family, ctx, &state.services[k]));
        }
        Some(assembly.finish().ruleset)
    }
}

/// The whole table of `family` for `all`, as a value (`--print-ruleset`).
pub fn assemble(
    family: Family,
    ctx: &Context<'_>,
    all: Vec<(ServiceKey, Arc<ServiceInputs>)>,
) -> Rendered {
    let scaffold = sized_scaffold(family, ctx, &all);
    build(family, ctx, scaffold, all)
}

/// The scaffold for a full build of `all`, each hash set given the
/// capacity its estimated elements call for.
fn sized_scaffold(
    family: Family,
    ctx: &Context<'_>,
    all: &[(ServiceKey, Arc<ServiceInputs>)],
) -> Ruleset {
    let mut scaffold = render::scaffold(family, ctx.cfg, ctx.node, ctx.service_cidrs);
    let estimate = estimate(family, ctx, &scaffold, all);
    for (name, set) in scaffold.sets.iter_mut() {
        if set.sizable() {
            set.capacity = Some(capacity_for(
                estimate.get(name.as_str()).copied().unwrap_or(0),
            ));
        }
    }
    scaffold
}

/// Adds every Service's fragment to `scaffold` in key order.
fn build(
    family: Family,
    ctx: &Context<'_>,
    scaffold: Ruleset,
    mut all: Vec<(ServiceKey, Arc<ServiceInputs>)>,
) -> Rendered {
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut assembly = Assembly::new(scaffold);
    for (key, inputs) in all {
        assembly.add(&key, fragment(family, ctx, &inputs));
    }
    assembly.finish()
}

/// Services rendered per batch of a full build: enough to keep messages
/// full, few enough that a batch's values stay small.
const BUILD_BATCH: usize = 256;

/// A full build, rendered batch by batch as the transaction is written: a
/// cold start at 10k Services never holds the whole ruleset as values,
/// only as the bytes of the transaction. The same operations as
/// [`crate::diff::full`] of [`assemble`], in a different (valid) order.
#[derive(Debug)]
pub struct FullBuild {
    family: Family,
    cfg: Config,
    node: NodeFacts,
    pending: std::vec::IntoIter<(ServiceKey, Arc<ServiceInputs>)>,
    started: bool,
    state: State,
    udp: Vec<UdpService>,
}

impl FullBuild {
    fn new(
        family: Family,
        ctx: &Context<'_>,
        mut all: Vec<(ServiceKey, Arc<ServiceInputs>)>,
    ) -> Self {
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let scaffold = sized_scaffold(family, ctx, &all);
        Self {
            family,
            cfg: ctx.cfg.clone(),
            node: ctx.node.clone(),
            pending: all.into_iter(),
            started: false,
            state: State {
                scaffold,
                services: HashMap::new(),
                fronts: HashMap::new(),
                shared: HashMap::new(),
                picks: HashMap::new(),
                health: BTreeMap::new(),
                no_local: HashMap::new(),
                no_local_total: (0, 0),
                chains: 0,
                counts: HashMap::new(),
            },
            udp: Vec::new(),
        }
    }

    /// The definitions of the sets the batches fill.
    pub fn scaffold(&self) -> &Ruleset {
        &self.state.scaffold
    }

    /// Every UDP Service port, for conntrack cleanup after the build.
    pub fn take_udp(&mut self) -> Vec<UdpService> {
        std::mem::take(&mut self.udp)
    }
}

impl Iterator for FullBuild {
    type Item = Vec<Op>;

    fn next(&mut self) -> Option<Vec<Op>> {
        if !self.started {
            self.started = true;
            let ops = diff::full(&self.state.scaffold);
            count(&mut self.state.counts, &ops);
            return Some(ops);
        }
        let ctx = Context {
            cfg: &self.cfg,
            node: &self.node,
            service_cidrs: &[],
        };
        let mut ops = Vec::new();
        let mut elements: BTreeMap<&'static str, Vec<Element>> = BTreeMap::new();
        let mut any = false;
        for (key, inputs) in self.pending.by_ref().take(BUILD_BATCH) {
            any = true;
            let frag = fragment(self.family, &ctx, &inputs);
            let s = &mut self.state;
            for (name, set) in &frag.sets {
                ops.push(Op::AddSet {
                    name: name.clone(),
                    set: set.clone(),
                });
            }
            let mut chains: Vec<(String, Chain)> = frag
                .chains
                .iter()
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect();
            for p in &frag.picks {
                if s.pick(*p) {
                    chains.push((p.name(), p.chain()));
                }
            }
            s.chains += chains.len();
            for (name, chain) in chains {
                diff::create_chain(name, chain, &mut ops);
            }
            for (front, members) in &frag.fronts {
                let first = s.owner(front).is_none();
                s.reclaim(&key, *front, true);
                if first {
                    for ((set, k), data) in members {
                        elements
                            .entry(set)
                            .or_default()
                            .push((k.clone(), data.clone()));
                    }
                }
            }
            for m in &frag.shared {
                if s.take(m) {
                    elements
                        .entry(m.0)
                        .or_default()
                        .push((render::shared_key(m.0, m.1), None));
                }
            }
            if let Some(h) = frag.health {
                s.health.insert(key.clone(), h);
            }
            s.set_no_local(&key, (frag.no_local_internal, frag.no_local_external));
            self.udp.extend(frag.udp);
            s.services.insert(key, inputs);
        }
        if !any {
            return None;
        }
        for (set, elements) in elements {
            *self.state.counts.entry(set.into()).or_default() += elements.len();
            ops.push(Op::AddElements {
                set: set.into(),
                elements,
            });
        }
        // Chains before the rules that jump to them.
        Some(diff::ordered(ops))
    }
}

/// The capacity a set of `n` elements is created with: room to double
/// before a rebuild must make it larger, and never below a floor that
/// keeps small sets from rebuilding on their first few changes. (The
/// kernel's fixed hash gives each slot of capacity a bucket head: 2^18,
/// a 10k x 10 endpoint map, costs 4 MiB.)
pub fn capacity_for(n: usize) -> u32 {
    const FLOOR: usize = 1024;
    let c = n.saturating_mul(2).max(FLOOR).checked_next_power_of_two();
    c.and_then(|c| u32::try_from(c).ok()).unwrap_or(1 << 31)
}

/// Elements per set a full build of `all` will hold, at most: every
/// Service's own, as if no frontend or shared member were claimed twice.
fn estimate(
    family: Family,
    ctx: &Context<'_>,
    scaffold: &Ruleset,
    all: &[(ServiceKey, Arc<ServiceInputs>)],
) -> HashMap<String, usize> {
    let mut n: HashMap<String, usize> = scaffold
        .sets
        .iter()
        .map(|(name, set)| (name.clone(), set.elements.len()))
        .collect();
    for (_, inputs) in all {
        let frag = fragment(family, ctx, inputs);
        for members in frag.fronts.values() {
            for (set, _) in members.keys() {
                *n.entry((*set).into()).or_default() += 1;
            }
        }
        for (set, _) in &frag.shared {
            *n.entry((*set).into()).or_default() += 1;
        }
    }
    n
}

/// Plays the element operations of `ops` on per-set counts.
fn count(counts: &mut HashMap<String, usize>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::AddElements { set, elements } => {
                *counts.entry(set.clone()).or_default() += elements.len();
            }
            Op::DeleteElements { set, keys } => {
                let c = counts.entry(set.clone()).or_default();
                *c = c.saturating_sub(keys.len());
            }
            Op::DeleteSet(set) | Op::AddSet { name: set, .. } => {
                counts.remove(set);
            }
            _ => {}
        }
    }
}

/// What `inputs` add to `family`'s table.
fn fragment(family: Family, ctx: &Context<'_>, inputs: &ServiceInputs) -> Fragment {
    render::service(
        family,
        ctx.cfg,
        ctx.node,
        &inputs.ports,
        Some(inputs.endpoints(family)),
    )
}

impl State {
    fn owner(&self, front: &Front) -> Option<ServiceKey> {
        self.fronts.get(front).and_then(|c| c.first().cloned())
    }

    /// `key` claims `front` (or stops claiming it).
    fn reclaim(&mut self, key: &ServiceKey, front: Front, claims: bool) {
        let list = self.fronts.entry(front).or_default();
        match (list.binary_search(key), claims) {
            (Err(at), true) => list.insert(at, key.clone()),
            (Ok(at), false) => {
                list.remove(at);
            }
            _ => {}
        }
        if list.is_empty() {
            self.fronts.remove(&front);
        }
    }

    /// One more user; true when it is the first.
    fn take(&mut self, k: &(&'static str, IpAddr)) -> bool {
        let n = self.shared.entry(*k).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// One user fewer; true when it was the last.
    fn release(&mut self, k: &(&'static str, IpAddr)) -> bool {
        match self.shared.get_mut(k) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.shared.remove(k);
                true
            }
            None => false,
        }
    }

    fn pick(&mut self, p: Pick) -> bool {
        let n = self.picks.entry(p).or_insert(0);
        *n += 1;
        *n == 1
    }

    fn unpick(&mut self, p: Pick) -> bool {
        match self.picks.get_mut(&p) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.picks.remove(&p);
                true
            }
            None => false,
        }
    }

    fn set_no_local(&mut self, key: &ServiceKey, now: (usize, usize)) {
        let before = if now == (0, 0) {
            self.no_local.remove(key)
        } else {
            self.no_local.insert(key.clone(), now)
        }
        .unwrap_or((0, 0));
        // The total includes `before`: it cannot go below zero.
        let t = &mut self.no_local_total;
        t.0 = t.0 + now.0 - before.0;
        t.1 = t.1 + now.1 - before.1;
    }
}

/// An element of one of our sets: `(set, key)`.
type Member = (&'static str, Vec<Value>);
/// Whether an element is there, and with what data.
type Presence = Option<Option<Data>>;
/// A key and its data.
type Element = (Vec<Value>, Option<Data>);

/// Net changes of one update: what each touched element, chain and set was
/// before the update (first sight) and is after it (last sight).
#[derive(Debug, Default)]
struct Delta {
    elements: HashMap<Member, (Presence, Presence)>,
    chains: HashMap<String, (Option<Chain>, Option<Chain>)>,
    sets: HashMap<String, (Option<Set>, Option<Set>)>,
}

impl Delta {
    fn element(&mut self, set: &'static str, key: Vec<Value>, before: Presence, after: Presence) {
        self.elements
            .entry((set, key))
            .and_modify(|e| e.1 = after.clone())
            .or_insert((before, after));
    }

    fn elements(&mut self, before: &Elements, after: &Elements) {
        for ((set, k), d) in before {
            let now = after.get(&(*set, k.clone()));
            if now != Some(d) {
                self.element(set, k.clone(), Some(d.clone()), now.cloned());
            }
        }
        for ((set, k), d) in after {
            if !before.contains_key(&(*set, k.clone())) {
                self.element(set, k.clone(), None, Some(d.clone()));
            }
        }
    }

    fn chain(&mut self, name: String, before: Option<Chain>, after: Option<Chain>) {
        self.chains
            .entry(name)
            .and_modify(|e| e.1 = after.clone())
            .or_insert((before, after));
    }

    fn set(&mut self, name: String, before: Option<Set>, after: Option<Set>) {
        self.sets
            .entry(name)
            .and_modify(|e| e.1 = after.clone())
            .or_insert((before, after));
    }

    /// The operations, and the change in the number of chains (elements
    /// are counted from the operations, per set).
    fn into_ops(self) -> (Vec<Op>, isize) {
        let mut ops = Vec::new();
        let mut sets: Vec<_> = self.sets.into_iter().filter(|(_, (b, a))| b != a).collect();
        sets.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, (before, after)) in &sets {
            match (before, after) {
                (None, Some(set)) => ops.push(Op::AddSet {
                    name: name.clone(),
                    set: set.clone(),
                }),
                (Some(_), None) => ops.push(Op::DeleteSet(name.clone())),
                // Names carry what defines a set: the same name is the same set.
                _ => {}
            }
        }
        let mut chains: Vec<_> = self
            .chains
            .into_iter()
            .filter(|(_, (b, a))| b != a)
            .collect();
        chains.sort_by(|a, b| a.0.cmp(&b.0));
        let mut chain_delta = 0isize;
        for (name, (before, after)) in chains {
            match (before, after) {
                (None, Some(c)) => {
                    chain_delta += 1;
                    diff::create_chain(name, c, &mut ops);
                }
                (Some(_), Some(c)) => {
                    ops.push(Op::FlushChain(name.clone()));
                    ops.extend(c.rules.into_iter().map(|rule| Op::AddRule {
                        chain: name.clone(),
                        rule,
                    }));
                }
                (Some(_), None) => {
                    chain_delta -= 1;
                    ops.push(Op::FlushChain(name.clone()));
                    ops.push(Op::DeleteChain(name));
                }
                (None, None) => {}
            }
        }
        let mut gone: BTreeMap<&'static str, Vec<Vec<Value>>> = BTreeMap::new();
        let mut added: BTreeMap<&'static str, Vec<Element>> = BTreeMap::new();
        for ((set, key), (before, after)) in self.elements {
            if before == after {
                continue;
            }
            if before.is_some() {
                gone.entry(set).or_default().push(key.clone());
            }
            if let Some(data) = after {
                added.entry(set).or_default().push((key, data));
            }
        }
        for (set, mut keys) in gone {
            keys.sort();
            ops.push(Op::DeleteElements {
                set: set.into(),
                keys,
            });
        }
        for (set, mut elements) in added {
            elements.sort();
            ops.push(Op::AddElements {
                set: set.into(),
                elements,
            });
        }
        (ops, chain_delta)
    }
}
