//! The allocator against every MetalLB allocation rule, one named case each,
//! plus property tests of its invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_controller::allocator::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(name: &str) -> ServiceRequest {
    ServiceRequest::simple("default", name)
}

fn with_pools(pools: Vec<Pool>) -> Allocator {
    let mut a = Allocator::new();
    a.set_pools(pools);
    a
}

fn got(a: &mut Allocator, s: &ServiceRequest) -> Vec<IpAddr> {
    match a.ensure(s, &[]) {
        Ok(o) => o.assignment().ips.clone(),
        Err(e) => panic!("{}: {e}", s.key),
    }
}

fn refused(a: &mut Allocator, s: &ServiceRequest) -> AllocError {
    match a.ensure(s, &[]) {
        Ok(o) => panic!("{} unexpectedly got {:?}", s.key, o.assignment()),
        Err(e) => e,
    }
}

fn shared(name: &str, key: &str, port: u16) -> ServiceRequest {
    ServiceRequest {
        sharing_key: Some(key.into()),
        ports: vec![Port {
            protocol: "TCP".into(),
            port,
        }],
        ..svc(name)
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn lowest_free_address_first() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.10-198.18.8.12"])]);
    assert_eq!(got(&mut a, &svc("a")), vec![ip("198.18.8.10")]);
    assert_eq!(got(&mut a, &svc("b")), vec![ip("198.18.8.11")]);
    a.release(&svc("a").key);
    assert_eq!(
        got(&mut a, &svc("c")),
        vec![ip("198.18.8.10")],
        "freed IPs are reused lowest first"
    );
}

#[test]
fn addresses_follow_entry_order() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.9.0/31", "198.18.8.0/31"])]);
    let ips: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| got(&mut a, &svc(n))[0])
        .collect();
    assert_eq!(
        ips,
        vec![ip("198.18.9.0"), ip("198.18.9.1"), ip("198.18.8.0")]
    );
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut a = with_pools(vec![Pool {
        avoid_buggy_ips: true,
        ..Pool::new("p", &["198.18.8.255-198.18.9.1"])
    }]);
    assert_eq!(got(&mut a, &svc("a")), vec![ip("198.18.9.1")]);
    assert!(matches!(
        refused(&mut a, &svc("b")),
        AllocError::Exhausted { .. }
    ));
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: vec![ip("198.18.9.0")],
            ..svc("c")
        },
    );
    assert!(matches!(e, AllocError::NotInAnyPool { .. }), "{e}");
}

#[test]
fn pool_exhaustion_says_which_pools() {
    let mut a = with_pools(vec![Pool::new("tiny", &["198.18.8.1/32"])]);
    got(&mut a, &svc("a"));
    let e = refused(&mut a, &svc("b"));
    assert_eq!(e.reason(), "PoolExhausted");
    assert!(e.to_string().contains("tiny"), "{e}");
}

#[test]
fn no_pool_at_all() {
    let mut a = Allocator::new();
    assert_eq!(refused(&mut a, &svc("a")), AllocError::NoPools);
}

#[test]
fn auto_assign_false_only_when_asked() {
    let manual = Pool {
        auto_assign: false,
        ..Pool::new("manual", &["198.18.8.0/24"])
    };
    let mut a = with_pools(vec![manual]);
    assert!(matches!(
        refused(&mut a, &svc("a")),
        AllocError::NoEligiblePool(_)
    ));
    let by_pool = ServiceRequest {
        requested_pool: Some("manual".into()),
        ..svc("b")
    };
    assert_eq!(got(&mut a, &by_pool), vec![ip("198.18.8.0")]);
    let by_ip = ServiceRequest {
        requested_ips: vec![ip("198.18.8.7")],
        ..svc("c")
    };
    assert_eq!(got(&mut a, &by_ip), vec![ip("198.18.8.7")]);
}

#[test]
fn priority_lower_number_first_then_unset_then_no_allocation() {
    let prio = |name: &str, p: Option<i32>, cidr: &str| Pool {
        allocation: Some(Allocation {
            priority: p,
            ..Default::default()
        }),
        ..Pool::new(name, &[cidr])
    };
    let mut a = with_pools(vec![
        Pool::new("a-plain", &["198.18.8.1/32"]),
        prio("b-unset", None, "198.18.8.2/32"),
        prio("c-ten", Some(10), "198.18.8.3/32"),
        prio("d-five", Some(5), "198.18.8.4/32"),
    ]);
    let order: Vec<_> = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|n| got(&mut a, &svc(n))[0])
        .collect();
    assert_eq!(
        order,
        vec![
            ip("198.18.8.4"),
            ip("198.18.8.3"),
            ip("198.18.8.2"),
            ip("198.18.8.1")
        ]
    );
}

#[test]
fn equal_priority_ties_break_by_name_whatever_the_input_order() {
    for pools in [
        vec![
            Pool::new("zeta", &["198.18.9.1/32"]),
            Pool::new("alpha", &["198.18.8.1/32"]),
        ],
        vec![
            Pool::new("alpha", &["198.18.8.1/32"]),
            Pool::new("zeta", &["198.18.9.1/32"]),
        ],
    ] {
        let mut a = with_pools(pools);
        assert_eq!(got(&mut a, &svc("s")), vec![ip("198.18.8.1")]);
    }
}

#[test]
fn namespaces_restrict_a_pool() {
    let team = Pool {
        allocation: Some(Allocation {
            namespaces: vec!["team-a".into()],
            ..Default::default()
        }),
        ..Pool::new("team", &["198.18.8.0/24"])
    };
    let mut a = with_pools(vec![team, Pool::new("shared", &["198.18.9.0/24"])]);
    assert_eq!(
        got(&mut a, &ServiceRequest::simple("team-a", "x")),
        vec![ip("198.18.8.0")]
    );
    assert_eq!(
        got(&mut a, &ServiceRequest::simple("team-b", "y")),
        vec![ip("198.18.9.0")]
    );
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_pool: Some("team".into()),
            ..ServiceRequest::simple("team-b", "z")
        },
    );
    assert_eq!(e.reason(), "PoolNotEligible");
    assert!(e.to_string().contains("team-b"), "{e}");
}

#[test]
fn namespace_selectors_restrict_a_pool() {
    let sel = Selector {
        match_labels: labels(&[("env", "prod")]),
        requirements: vec![],
    };
    let prod = Pool {
        allocation: Some(Allocation {
            namespace_selectors: vec![sel],
            ..Default::default()
        }),
        ..Pool::new("prod", &["198.18.8.0/24"])
    };
    let mut a = with_pools(vec![prod]);
    let in_prod = ServiceRequest {
        namespace_labels: labels(&[("env", "prod")]),
        ..ServiceRequest::simple("p", "s")
    };
    assert_eq!(got(&mut a, &in_prod), vec![ip("198.18.8.0")]);
    let e = refused(&mut a, &ServiceRequest::simple("dev", "s"));
    assert!(
        matches!(e, AllocError::NoEligiblePool(ref why) if why.contains("prod")),
        "{e}"
    );
}

#[test]
fn service_selectors_restrict_a_pool() {
    let sel = Selector {
        match_labels: BTreeMap::new(),
        requirements: vec![Requirement {
            key: "tier".into(),
            operator: Operator::In,
            values: vec!["web".into()],
        }],
    };
    let web = Pool {
        allocation: Some(Allocation {
            service_selectors: vec![sel],
            priority: Some(1),
            ..Default::default()
        }),
        ..Pool::new("web", &["198.18.8.0/24"])
    };
    let mut a = with_pools(vec![web, Pool::new("rest", &["198.18.9.0/24"])]);
    let tier_web = ServiceRequest {
        labels: labels(&[("tier", "web")]),
        ..svc("w")
    };
    assert_eq!(got(&mut a, &tier_web), vec![ip("198.18.8.0")]);
    assert_eq!(got(&mut a, &svc("other")), vec![ip("198.18.9.0")]);
}

#[test]
fn requested_ip_is_honoured() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let s = ServiceRequest {
        requested_ips: vec![ip("198.18.8.42")],
        ..svc("a")
    };
    assert_eq!(got(&mut a, &s), vec![ip("198.18.8.42")]);
    assert_eq!(a.assignment(&s.key).unwrap().pools, vec!["p".to_string()]);
}

#[test]
fn requested_ip_outside_every_pool_is_refused_not_replaced() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let s = ServiceRequest {
        requested_ips: vec![ip("198.18.10.1")],
        ..svc("a")
    };
    assert_eq!(
        refused(&mut a, &s),
        AllocError::NotInAnyPool {
            ip: ip("198.18.10.1")
        }
    );
    assert!(
        a.assignment(&s.key).is_none(),
        "nothing else was handed out instead"
    );
}

#[test]
fn requested_ip_held_by_another_is_refused_with_the_owner() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    got(
        &mut a,
        &ServiceRequest {
            requested_ips: vec![ip("198.18.8.5")],
            ..svc("first")
        },
    );
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: vec![ip("198.18.8.5")],
            ..svc("second")
        },
    );
    assert!(e.to_string().contains("default/first"), "{e}");
    assert_eq!(e.reason(), "IPInUse");
}

#[test]
fn requested_ip_and_pool_must_agree() {
    let mut a = with_pools(vec![
        Pool::new("p", &["198.18.8.0/24"]),
        Pool::new("q", &["198.18.9.0/24"]),
    ]);
    let s = ServiceRequest {
        requested_ips: vec![ip("198.18.8.5")],
        requested_pool: Some("q".into()),
        ..svc("a")
    };
    assert!(matches!(refused(&mut a, &s), AllocError::NotInPool { .. }));
}

#[test]
fn requested_ip_of_the_wrong_family_is_refused() {
    let mut a = with_pools(vec![Pool::new(
        "p",
        &["198.18.8.0/24", "2001:db8::8:0/112"],
    )]);
    let s = ServiceRequest {
        requested_ips: vec![ip("2001:db8::8:5")],
        ..svc("a")
    };
    assert_eq!(refused(&mut a, &s).reason(), "InvalidRequest");
}

#[test]
fn unknown_requested_pool() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let s = ServiceRequest {
        requested_pool: Some("nope".into()),
        ..svc("a")
    };
    assert_eq!(refused(&mut a, &s), AllocError::UnknownPool("nope".into()));
}

#[test]
fn sharing_same_key_different_ports_share() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let first = got(&mut a, &shared("dns-tcp", "k", 53));
    let second = got(
        &mut a,
        &ServiceRequest {
            ports: vec![Port {
                protocol: "UDP".into(),
                port: 53,
            }],
            ..shared("dns-udp", "k", 0)
        },
    );
    assert_eq!(first, second);
    assert_eq!(a.stats()["p"].assigned[0], 1, "a shared IP counts once");
}

#[test]
fn sharing_refused_on_port_clash() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let first = got(&mut a, &shared("a", "k", 80));
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: first.clone(),
            ..shared("b", "k", 80)
        },
    );
    assert!(
        matches!(
            e,
            AllocError::InUse {
                why: SharingConflict::PortClash(_),
                ..
            }
        ),
        "{e}"
    );
    // Without a requested IP it simply gets another address.
    assert_ne!(got(&mut a, &shared("c", "k", 80)), first);
}

#[test]
fn sharing_refused_on_different_key() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let first = got(&mut a, &shared("a", "k1", 80));
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: first,
            ..shared("b", "k2", 81)
        },
    );
    assert!(
        matches!(
            e,
            AllocError::InUse {
                why: SharingConflict::DifferentKey { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn sharing_refused_when_either_side_has_no_key() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let plain = got(&mut a, &svc("plain"));
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: plain,
            ..shared("b", "k", 81)
        },
    );
    assert!(
        matches!(
            e,
            AllocError::InUse {
                why: SharingConflict::OwnerDoesNotShare,
                ..
            }
        ),
        "{e}"
    );
    let keyed = got(&mut a, &shared("keyed", "k", 80));
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: keyed,
            ports: vec![Port {
                protocol: "TCP".into(),
                port: 81,
            }],
            ..svc("c")
        },
    );
    assert!(
        matches!(
            e,
            AllocError::InUse {
                why: SharingConflict::RequesterDoesNotShare,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn sharing_with_local_policy_needs_the_same_selector() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let local = |name: &str, port: u16, backend: &str| ServiceRequest {
        backend_key: backend.into(),
        ..shared(name, "k", port)
    };
    let first = got(&mut a, &local("a", 80, "app=web"));
    assert_eq!(got(&mut a, &local("b", 81, "app=web")), first);
    let e = refused(
        &mut a,
        &ServiceRequest {
            requested_ips: first,
            ..local("c", 82, "app=db")
        },
    );
    assert!(
        matches!(
            e,
            AllocError::InUse {
                why: SharingConflict::DifferentBackend,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn sole_user_may_change_its_key_in_place() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    let before = got(&mut a, &shared("a", "old", 80));
    let after = a.ensure(&shared("a", "new", 80), &[]).unwrap();
    assert!(matches!(after, Outcome::Unchanged(_)), "{after:?}");
    assert_eq!(after.assignment().ips, before);
    // The new key is in force: a sharer with the new key joins it.
    assert_eq!(got(&mut a, &shared("b", "new", 81)), before);
}

#[test]
fn dual_stack_gets_one_ip_per_family_from_one_pool() {
    let mut a = with_pools(vec![
        Pool::new("a-v4only", &["198.18.9.0/24"]),
        Pool::new("b-dual", &["198.18.8.0/24", "2001:db8::8:0/112"]),
    ]);
    let dual = ServiceRequest {
        families: vec![Family::V6, Family::V4],
        policy: FamilyPolicy::RequireDualStack,
        ..svc("d")
    };
    let ips = got(&mut a, &dual);
    assert_eq!(
        ips,
        vec![ip("2001:db8::8:0"), ip("198.18.8.0")],
        "primary family first, same pool"
    );
    assert_eq!(
        a.assignment(&dual.key).unwrap().pool_names(),
        vec!["b-dual".to_string()]
    );
}

#[test]
fn require_dual_stack_fails_without_a_dual_pool_and_prefer_falls_back() {
    let mut a = with_pools(vec![Pool::new("v4", &["198.18.8.0/24"])]);
    let both = vec![Family::V4, Family::V6];
    let req = ServiceRequest {
        families: both.clone(),
        policy: FamilyPolicy::RequireDualStack,
        ..svc("r")
    };
    assert_eq!(refused(&mut a, &req).reason(), "PoolExhausted");
    let pref = ServiceRequest {
        families: both,
        policy: FamilyPolicy::PreferDualStack,
        ..svc("p")
    };
    assert_eq!(got(&mut a, &pref), vec![ip("198.18.8.0")]);
}

#[test]
fn single_stack_gets_its_primary_family() {
    let mut a = with_pools(vec![Pool::new(
        "p",
        &["198.18.8.0/24", "2001:db8::8:0/112"],
    )]);
    let v6 = ServiceRequest {
        families: vec![Family::V6],
        ..svc("s")
    };
    assert_eq!(got(&mut a, &v6), vec![ip("2001:db8::8:0")]);
}

#[test]
fn status_ips_are_kept_after_a_restart() {
    let pools = vec![Pool::new("p", &["198.18.8.0/24"])];
    let mut a = with_pools(pools);
    // The Service's status says .77; a fresh allocator must keep it.
    let out = a.ensure(&svc("a"), &[ip("198.18.8.77")]).unwrap();
    assert_eq!(
        out,
        Outcome::Unchanged(Assignment {
            ips: vec![ip("198.18.8.77")],
            pools: vec!["p".into()]
        })
    );
    assert_eq!(got(&mut a, &svc("b")), vec![ip("198.18.8.0")]);
}

#[test]
fn shrunk_pool_keeps_ips_it_still_contains_and_moves_the_rest() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/30"])]);
    let ips: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| got(&mut a, &svc(n))[0])
        .collect();
    let orphans = a.set_pools(vec![Pool::new("p", &["198.18.8.0/31", "198.18.9.0/24"])]);
    assert_eq!(orphans, vec![svc("c").key]);
    assert!(matches!(
        a.ensure(&svc("a"), &[]).unwrap(),
        Outcome::Unchanged(_)
    ));
    match a.ensure(&svc("c"), &[]).unwrap() {
        Outcome::Allocated {
            assignment,
            previous,
            replaced,
        } => {
            assert_eq!(previous, vec![ips[2]]);
            assert_eq!(assignment.ips, vec![ip("198.18.9.0")]);
            assert!(matches!(replaced, Some(AllocError::NotInAnyPool { .. })));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn renamed_pool_relabels_without_moving_ips() {
    let mut a = with_pools(vec![Pool::new("old", &["198.18.8.0/24"])]);
    let before = got(&mut a, &svc("a"));
    let orphans = a.set_pools(vec![Pool::new("new", &["198.18.8.0/24"])]);
    assert!(orphans.is_empty());
    let after = a.ensure(&svc("a"), &[]).unwrap();
    assert_eq!(
        after,
        Outcome::Unchanged(Assignment {
            ips: before,
            pools: vec!["new".into()]
        })
    );
}

#[test]
fn deleted_pool_leaves_services_waiting_with_a_reason() {
    let mut a = with_pools(vec![Pool::new("p", &["198.18.8.0/24"])]);
    got(&mut a, &svc("a"));
    assert_eq!(a.set_pools(vec![]), vec![svc("a").key]);
    assert_eq!(refused(&mut a, &svc("a")), AllocError::NoPools);
    assert!(a.assignment(&svc("a").key).is_none());
}

#[test]
fn overlapping_addresses_belong_to_the_first_pool_in_order() {
    let mut a = with_pools(vec![Pool::new("a", &["198.18.8.0/24"])]);
    let held = got(&mut a, &svc("holder"));
    assert_eq!(held, vec![ip("198.18.8.0")]);
    a.set_pools(vec![
        Pool::new("a", &["198.18.8.0/24"]),
        Pool::new("b", &["198.18.8.0/30"]),
    ]);
    let pairs: Vec<_> = a
        .overlaps()
        .iter()
        .map(|o| (o.pool.as_str(), o.other.as_str(), o.owner.as_str()))
        .collect();
    assert!(
        pairs.contains(&("a", "b", "a")) && pairs.contains(&("b", "a", "a")),
        "{pairs:?}"
    );
    assert!(
        matches!(
            a.ensure(&svc("holder"), &[]).unwrap(),
            Outcome::Unchanged(_)
        ),
        "never taken away"
    );
    assert_eq!(
        got(&mut a, &svc("new")),
        vec![ip("198.18.8.1")],
        "the first pool hands out what it shares"
    );
    let from_b = ServiceRequest {
        requested_pool: Some("b".into()),
        ..svc("from-b")
    };
    assert_eq!(refused(&mut a, &from_b).reason(), "PoolExhausted");
    let stats = a.stats();
    assert_eq!(stats["b"].capacity[0], 0, "b owns none of its addresses");
    assert_eq!(stats["a"].available(Family::V4), 254);
}

#[test]
fn a_slash_eight_costs_what_a_slash_thirty_costs() {
    let mut big = with_pools(vec![Pool::new("big", &["10.0.0.0/8", "2001:db8::/64"])]);
    for i in 0..1000 {
        got(&mut big, &svc(&format!("s{i}")));
    }
    assert_eq!(
        big.footprint(),
        (1, 1000),
        "1000 contiguous IPs are one run"
    );
    assert_eq!(big.stats()["big"].available(Family::V4), (1 << 24) - 1000);
    assert_eq!(big.stats()["big"].available(Family::V6), 1 << 64);
}

// ---- properties ----

use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Ensure {
        svc: usize,
        key: Option<u8>,
        port: u16,
        want_ip: Option<u8>,
    },
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..12, proptest::option::of(0u8..2), 79u16..82, proptest::option::of(0u8..8))
            .prop_map(|(svc, key, port, want_ip)| Op::Ensure { svc, key, port, want_ip }),
        1 => (0usize..12).prop_map(Op::Release),
    ]
}

fn request(i: usize, key: Option<u8>, port: u16, want_ip: Option<u8>) -> ServiceRequest {
    ServiceRequest {
        sharing_key: key.map(|k| format!("k{k}")),
        ports: vec![Port {
            protocol: "TCP".into(),
            port,
        }],
        requested_ips: want_ip
            .map(|o| ip(&format!("198.18.8.{o}")))
            .into_iter()
            .collect(),
        ..svc(&format!("s{i}"))
    }
}

fn test_pools() -> Vec<Pool> {
    vec![
        Pool::new("a", &["198.18.8.0/29"]),
        Pool {
            avoid_buggy_ips: true,
            ..Pool::new("b", &["198.18.8.4-198.18.8.9"])
        },
    ]
}

fn run(ops: &[Op]) -> (Allocator, BTreeMap<ServiceKey, ServiceRequest>) {
    let mut a = with_pools(test_pools());
    let mut live = BTreeMap::new();
    for op in ops {
        match op {
            Op::Ensure {
                svc,
                key,
                port,
                want_ip,
            } => {
                let s = request(*svc, *key, *port, *want_ip);
                if a.ensure(&s, &[]).is_ok() {
                    live.insert(s.key.clone(), s);
                } else {
                    live.remove(&s.key);
                }
            }
            Op::Release(i) => {
                a.release(&svc(&format!("s{i}")).key);
                live.remove(&svc(&format!("s{i}")).key);
            }
        }
    }
    (a, live)
}

proptest! {
    #[test]
    fn never_the_same_ip_to_incompatible_services(ops in proptest::collection::vec(op(), 1..60)) {
        let (a, live) = run(&ops);
        let all = a.assignments();
        let mut by_ip: BTreeMap<IpAddr, Vec<&ServiceRequest>> = BTreeMap::new();
        for (key, asg) in &all {
            let req = live.get(key).expect("every holder succeeded its last ensure");
            for ip in &asg.ips {
                by_ip.entry(*ip).or_default().push(req);
            }
        }
        for (ip, users) in by_ip {
            if users.len() > 1 {
                let keys: BTreeSet<_> = users.iter().map(|u| u.sharing_key.clone()).collect();
                prop_assert!(keys.len() == 1 && !keys.contains(&None), "{ip}: {users:?}");
                let ports: Vec<_> = users.iter().flat_map(|u| u.ports.clone()).collect();
                let distinct: BTreeSet<_> = ports.iter().collect();
                prop_assert_eq!(ports.len(), distinct.len(), "port clash on {}", ip);
            }
            prop_assert!(test_pools().iter().any(|p| p.contains(ip)), "{ip} is in a pool");
        }
    }

    #[test]
    fn a_restart_restores_every_assignment_unchanged(ops in proptest::collection::vec(op(), 1..60)) {
        // What a new term does (plan.rs): restore every status, then ensure
        // each Service; nothing may move.
        let (a, live) = run(&ops);
        let before = a.assignments();
        let mut restarted = with_pools(test_pools());
        for (k, asg) in &before {
            prop_assert!(restarted.restore(&live[k], &asg.ips).is_ok(), "{k} not restored");
        }
        for (k, asg) in &before {
            let outcome = restarted.ensure(&live[k], &asg.ips);
            prop_assert!(matches!(outcome, Ok(Outcome::Unchanged(_))), "{k}: {outcome:?}");
        }
        prop_assert_eq!(restarted.assignments(), before);
        prop_assert_eq!(restarted.stats(), a.stats());
    }

    #[test]
    fn allocation_is_deterministic(ops in proptest::collection::vec(op(), 1..60)) {
        let (a, _) = run(&ops);
        let (b, _) = run(&ops);
        prop_assert_eq!(a.assignments(), b.assignments());
    }

    #[test]
    fn pool_input_order_does_not_matter(ops in proptest::collection::vec(op(), 1..40)) {
        let (a, _) = run(&ops);
        let mut b = with_pools(test_pools().into_iter().rev().collect());
        for op in &ops {
            match op {
                Op::Ensure { svc, key, port, want_ip } => { let _ = b.ensure(&request(*svc, *key, *port, *want_ip), &[]); }
                Op::Release(i) => { b.release(&svc(&format!("s{i}")).key); }
            }
        }
        prop_assert_eq!(a.assignments(), b.assignments());
    }
}

// ---- issue 7 reproductions ----

#[test]
fn prefer_dual_stack_falls_back_to_the_secondary_family() {
    let mut a = with_pools(vec![Pool::new("v6", &["2001:db8::8:0/112"])]);
    let pref = ServiceRequest {
        families: vec![Family::V4, Family::V6],
        policy: FamilyPolicy::PreferDualStack,
        ..svc("p")
    };
    assert_eq!(got(&mut a, &pref), vec![ip("2001:db8::8:0")]);
}

#[test]
fn a_requested_dual_stack_pair_must_come_from_one_pool() {
    let mut a = with_pools(vec![
        Pool::new("a-v4", &["198.18.8.0/24"]),
        Pool::new("b-v6", &["2001:db8::8:0/112"]),
    ]);
    let pair = ServiceRequest {
        families: vec![Family::V4, Family::V6],
        policy: FamilyPolicy::RequireDualStack,
        requested_ips: vec![ip("198.18.8.5"), ip("2001:db8::8:5")],
        ..svc("d")
    };
    assert_eq!(refused(&mut a, &pair).reason(), "NotInOnePool");
}

#[test]
fn overlapping_addresses_are_counted_once_in_available() {
    let mut a = with_pools(vec![
        Pool::new("a", &["198.18.8.0/24"]),
        Pool::new("b", &["198.18.8.0/30"]),
    ]);
    let stats = a.stats();
    let total: u128 = stats.values().map(|s| s.available(Family::V4)).sum();
    assert_eq!(total, 256, "{stats:?}");
    got(&mut a, &svc("x"));
    let total: u128 = a.stats().values().map(|s| s.available(Family::V4)).sum();
    assert_eq!(total, 255);
}

#[test]
fn restricted_pools_are_tried_for_every_family_choice_before_unrestricted_ones() {
    let mut pinned = Pool::new("pinned-v4", &["198.18.10.0/29"]);
    pinned.allocation = Some(Allocation {
        priority: Some(1),
        namespaces: vec!["default".into()],
        ..Default::default()
    });
    let mut a = with_pools(vec![
        pinned,
        Pool::new("open-dual", &["198.18.8.0/24", "2001:db8::8:0/112"]),
    ]);
    let pref = ServiceRequest {
        families: vec![Family::V4, Family::V6],
        policy: FamilyPolicy::PreferDualStack,
        ..svc("p")
    };
    assert_eq!(got(&mut a, &pref), vec![ip("198.18.10.0")]);
}
