//! Partial updates against full builds: whatever changes between two
//! random clusters, the operations of one update, played on the table the
//! first cluster's full build made, give exactly the second cluster's full
//! build; and an update with nothing changed sends nothing.

mod common;

use common::{World, config, node, objects, world};
use ferrolb_proxy::cache::Cache;
use ferrolb_proxy::diff::{self, Op};
use ferrolb_proxy::programmed::{self, Context, Programmed};
use ferrolb_proxy::ruleset::{Family, Ruleset};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use proptest::prelude::*;
use serde_json::json;

fn cidrs() -> Vec<ipnet::IpNet> {
    vec![
        "198.18.64.0/18".parse().unwrap(),
        "2001:db8:2::/112".parse().unwrap(),
    ]
}

fn node_object() -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.11"},
                                 {"type": "InternalIP", "address": "2001:db8::11"}]},
    }))
    .unwrap()
}

/// A cache fed `w` through list events, as a proxy starting up sees it.
fn listed(w: &World) -> Cache {
    let cache = Cache::new("node-1");
    let (services, slices) = objects(w);
    cache.service_event(Event::Init);
    for s in services {
        cache.service_event(Event::InitApply(s));
    }
    cache.service_event(Event::InitDone);
    cache.slice_event(Event::Init);
    for s in slices {
        cache.slice_event(Event::InitApply(s));
    }
    cache.slice_event(Event::InitDone);
    cache.node_event(Event::Apply(node_object()));
    cache
}

/// Turns what `cache` holds from `a` into `b` with watch events: objects of
/// `b` applied, those only in `a` deleted.
fn change(cache: &Cache, a: &World, b: &World) {
    let (sa, la) = objects(a);
    let (sb, lb) = objects(b);
    let svc_names: Vec<Option<String>> = sb.iter().map(|s| s.metadata.name.clone()).collect();
    let slice_names: Vec<Option<String>> = lb.iter().map(|s| s.metadata.name.clone()).collect();
    for s in sa
        .into_iter()
        .filter(|s| !svc_names.contains(&s.metadata.name))
    {
        cache.service_event(Event::<Service>::Delete(s));
    }
    for s in la
        .into_iter()
        .filter(|s| !slice_names.contains(&s.metadata.name))
    {
        cache.slice_event(Event::<EndpointSlice>::Delete(s));
    }
    for s in sb {
        cache.service_event(Event::Apply(s));
    }
    for s in lb {
        cache.slice_event(Event::Apply(s));
    }
}

/// What every rendering here shares.
struct Env {
    cfg: ferrolb_proxy::render::Config,
    node: ferrolb_proxy::model::NodeFacts,
    cidrs: Vec<ipnet::IpNet>,
}

impl Env {
    fn new() -> Self {
        Self {
            cfg: config(),
            node: node(),
            cidrs: cidrs(),
        }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            cfg: &self.cfg,
            node: &self.node,
            service_cidrs: &self.cidrs,
        }
    }
}

fn full_table(w: &World) -> Ruleset {
    let env = Env::new();
    programmed::assemble(Family::V4, &env.ctx(), listed(w).all()).ruleset
}

/// `rs` without set capacities: a table keeps the capacities it was built
/// with until it outgrows them, so after an update they can differ from a
/// fresh build's (whose estimate is of the new cluster) while the content
/// is the same.
fn without_capacities(mut rs: Ruleset) -> Ruleset {
    for set in rs.sets.values_mut() {
        set.capacity = None;
    }
    rs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_update_reaches_what_a_full_build_makes(a in world(), b in world()) {
        let env = Env::new();
        let ctx = env.ctx();
        let cache = listed(&a);
        let _ = cache.take();
        let mut table = Programmed::new(Family::V4);
        let first = table.full_ops(&ctx, cache.all());
        let mut live = Ruleset::new(Family::V4, "ferrolb-proxy");
        diff::apply(&mut live, &first);
        prop_assert_eq!(&live, &full_table(&a));

        change(&cache, &a, &b);
        let changes = cache.take();
        let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
        prop_assert!(update.build.is_none());
        prop_assert!(!update.ops.iter().any(|o| matches!(o, Op::ReplaceTable)));
        diff::apply(&mut live, &update.ops);
        prop_assert_eq!(without_capacities(live.clone()), without_capacities(full_table(&b)));
        prop_assert_eq!(Some(live.clone()), table.ruleset(&ctx));
        prop_assert_eq!(table.size().1, live.element_count());

        // Nothing changed: nothing to send.
        change(&cache, &b, &b);
        let again = cache.take();
        let idle = table.update(&ctx, &cache.inputs_of(&again.services), || cache.all());
        prop_assert!(idle.ops.is_empty(), "{:?}", idle.ops);
    }

    #[test]
    fn one_service_more_touches_only_its_own_elements(a in world()) {
        let env = Env::new();
        let ctx = env.ctx();
        let cache = listed(&a);
        let _ = cache.take();
        let mut table = Programmed::new(Family::V4);
        let _ = table.full_ops(&ctx, cache.all());
        let mut more = a.clone();
        more.push((200, 0, 2, false, false, false, false));
        change(&cache, &a, &more);
        // (Objects carry no resource versions here, so every one is
        // re-rendered; only the new Service's differ.)
        let changes = cache.take();
        let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
        prop_assert!(diff::element_changes(&update.ops) <= 12, "{:?}", update.ops);
    }
}

#[test]
fn a_shared_frontend_passes_to_the_next_claimant_when_its_owner_goes() {
    let env = Env::new();
    let ctx = env.ctx();
    // s0 and s3 both claim 198.18.9.1:80; s0 (the lower key) owns it.
    let both: World = vec![
        (0, 0, 1, false, false, false, false),
        (3, 0, 2, false, false, false, false),
    ];
    let only: World = vec![(3, 0, 2, false, false, false, false)];
    let cache = listed(&both);
    let _ = cache.take();
    let mut table = Programmed::new(Family::V4);
    let first = table.full_ops(&ctx, cache.all());
    let mut live = Ruleset::new(Family::V4, "ferrolb-proxy");
    diff::apply(&mut live, &first);
    let text = live.to_nft();
    assert!(
        text.contains("198.18.9.1 . tcp . 80 : goto pick-1"),
        "{text}"
    );

    change(&cache, &both, &only);
    let changes = cache.take();
    let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
    diff::apply(&mut live, &update.ops);
    let text = live.to_nft();
    assert!(
        text.contains("198.18.9.1 . tcp . 80 : goto pick-2"),
        "{text}"
    );
    assert_eq!(
        without_capacities(live),
        without_capacities(full_table(&only))
    );
}

#[test]
fn capacities_double_what_a_set_holds_above_a_floor() {
    assert_eq!(programmed::capacity_for(0), 1024);
    assert_eq!(programmed::capacity_for(512), 1024);
    assert_eq!(programmed::capacity_for(513), 2048);
    assert_eq!(programmed::capacity_for(100_000), 262_144);
    assert_eq!(programmed::capacity_for(usize::MAX), 1 << 31);
}

/// The kernel refuses an add past a set's capacity, so an update that
/// would pass one rebuilds the table with room, and the next is partial.
#[test]
fn a_set_that_would_pass_its_capacity_is_rebuilt_larger() {
    let env = Env::new();
    let ctx = env.ctx();
    // Four ports of six endpoints each: 24 `endpoints` elements a Service
    // (ids not divisible by 3 claim no shared external IP).
    let cluster = |n: u8| -> World {
        (1..=n)
            .filter(|id| id % 3 != 0)
            .map(|id| (id, 3, 6, false, false, false, false))
            .collect()
    };
    let (small, big) = (cluster(20), cluster(100));
    let cache = listed(&small);
    let _ = cache.take();
    let mut table = Programmed::new(Family::V4);
    let _ = table.full_ops(&ctx, cache.all());
    let capacity = |t: &Programmed| t.ruleset(&ctx).unwrap().sets["endpoints"].capacity;
    assert_eq!(capacity(&table), Some(1024));

    change(&cache, &small, &big);
    let changes = cache.take();
    let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
    assert_eq!(update.reason, Some("set-full"));
    let mut build = update.build.expect("a rebuild");
    let ops: Vec<Op> = build.by_ref().flatten().collect();
    table.install(build);
    let mut live = Ruleset::new(Family::V4, "ferrolb-proxy");
    diff::apply(&mut live, &ops);
    assert_eq!(live, full_table(&big));
    let held = live.sets["endpoints"].elements.len();
    assert!(held > 1024, "{held} endpoints elements");
    assert_eq!(capacity(&table), Some(programmed::capacity_for(held)));

    change(&cache, &big, &small);
    let changes = cache.take();
    let update = table.update(&ctx, &cache.inputs_of(&changes.services), || cache.all());
    assert!(update.build.is_none(), "{:?}", update.reason);
    diff::apply(&mut live, &update.ops);
    assert_eq!(
        without_capacities(live),
        without_capacities(full_table(&small))
    );
}
