//! The roster of speakers known to the API: Lease conversion, expiry by
//! local observation, the frozen view when our own Lease goes stale, and
//! MAC ownership; a property test against a model.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrolb_speaker::packet::MacAddr;
use ferrolb_speaker::roster::{
    ADDRESS_ANNOTATION, LEASE_DURATION, MACS_ANNOTATION, RecordError, Roster, SpeakerRecord,
    annotations, lease_name, parse_macs,
};
use proptest::prelude::*;

const S: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

fn addr(i: u8) -> SocketAddr {
    format!("198.18.0.{i}:7472").parse().unwrap()
}

fn record(node: &str, i: u8, fingerprint: &str) -> SpeakerRecord {
    SpeakerRecord {
        node: node.into(),
        address: addr(i),
        macs: BTreeSet::from([mac(i)]),
        duration: LEASE_DURATION,
        fingerprint: fingerprint.into(),
    }
}

fn names(roster: &Roster, now: Instant) -> Vec<String> {
    roster.known(now).into_keys().collect()
}

#[test]
fn lease_names_carry_the_node_and_stay_valid() {
    assert_eq!(lease_name("node-1"), "ferrolb-speaker-node-1");
    let a = "a".repeat(250);
    let b = format!("{}b", "a".repeat(249));
    assert!(lease_name(&a).len() <= 253);
    assert!(lease_name(&b).len() <= 253);
    assert_ne!(lease_name(&a), lease_name(&b));
    assert!(lease_name(&a).starts_with("ferrolb-speaker-aaa"));
}

#[test]
fn a_lease_converts_to_a_record() {
    let macs = BTreeSet::from([mac(1), mac(2)]);
    let ann = annotations("198.18.0.1:7472".parse().unwrap(), &macs);
    assert_eq!(ann[MACS_ANNOTATION], "02:00:00:00:00:01,02:00:00:00:00:02");
    let r = SpeakerRecord::from_lease(
        "ferrolb-speaker-node-1",
        Some("node-1"),
        Some(40),
        &ann,
        "2026-12-01T10:00:00.000000Z",
    )
    .unwrap();
    assert_eq!(r.node, "node-1");
    assert_eq!(r.address, addr(1));
    assert_eq!(r.macs, macs);
    assert_eq!(r.duration, 40 * S);

    let v6 = BTreeMap::from([(
        ADDRESS_ANNOTATION.to_string(),
        "[2001:db8::1]:7472".to_string(),
    )]);
    let r = SpeakerRecord::from_lease("ferrolb-speaker-n", Some("n"), None, &v6, "x").unwrap();
    assert_eq!(r.address, "[2001:db8::1]:7472".parse().unwrap());
    assert!(r.macs.is_empty());
    assert_eq!(r.duration, LEASE_DURATION, "missing duration: the default");
    let r = SpeakerRecord::from_lease("ferrolb-speaker-n", Some("n"), Some(0), &v6, "x").unwrap();
    assert_eq!(
        r.duration, LEASE_DURATION,
        "non-positive duration: the default"
    );
}

#[test]
fn bad_leases_are_refused_with_a_reason() {
    let good = annotations(addr(1), &BTreeSet::new());
    let from = |name: &str, holder: Option<&str>, ann: &BTreeMap<String, String>| {
        SpeakerRecord::from_lease(name, holder, Some(40), ann, "x")
    };
    assert_eq!(
        from("ferrolb-speaker-n", None, &good),
        Err(RecordError::NoHolder)
    );
    assert_eq!(
        from("ferrolb-speaker-n", Some(""), &good),
        Err(RecordError::NoHolder)
    );
    assert!(matches!(
        from("ferrolb-speaker-other", Some("n"), &good),
        Err(RecordError::Name { .. })
    ));
    assert_eq!(
        from("ferrolb-speaker-n", Some("n"), &BTreeMap::new()),
        Err(RecordError::NoAddress)
    );
    let bad_addr = BTreeMap::from([(ADDRESS_ANNOTATION.to_string(), "198.18.0.1".to_string())]);
    assert!(matches!(
        from("ferrolb-speaker-n", Some("n"), &bad_addr),
        Err(RecordError::Address(_))
    ));
    let mut bad_mac = good.clone();
    bad_mac.insert(MACS_ANNOTATION.into(), "02:00:00:00:00:01,nope".into());
    assert_eq!(
        from("ferrolb-speaker-n", Some("n"), &bad_mac),
        Err(RecordError::Mac("nope".into()))
    );
}

#[test]
fn mac_lists_tolerate_spaces_and_empty_entries() {
    assert_eq!(
        parse_macs(" 02:00:00:00:00:01 ,, 02:00:00:00:00:02,").unwrap(),
        BTreeSet::from([mac(1), mac(2)])
    );
    assert_eq!(parse_macs("").unwrap(), BTreeSet::new());
}

#[test]
fn expiry_counts_from_when_we_saw_the_record_change() {
    let t0 = Instant::now();
    let mut r = Roster::new("me");
    r.observe([record("me", 0, "m0"), record("a", 1, "a0")], t0);
    assert_eq!(names(&r, t0), ["a", "me"]);
    // Re-reading the same record does not restart its clock.
    r.observe([record("me", 0, "m1"), record("a", 1, "a0")], t0 + 30 * S);
    assert_eq!(names(&r, t0 + 39 * S), ["a", "me"]);
    assert_eq!(
        names(&r, t0 + 40 * S),
        ["a", "me"],
        "lapses after 40 s, not at"
    );
    assert_eq!(names(&r, t0 + 40 * S + MS), ["me"]);
    // A renewal (new fingerprint) brings it back and restarts the clock.
    r.observe([record("me", 0, "m1"), record("a", 1, "a1")], t0 + 41 * S);
    assert_eq!(names(&r, t0 + 41 * S), ["a", "me"]);
    assert_eq!(r.known(t0 + 41 * S)["a"], addr(1));
    // A deleted Lease is gone at once.
    r.observe([record("me", 0, "m1")], t0 + 42 * S);
    assert_eq!(names(&r, t0 + 42 * S), ["me"]);
}

#[test]
fn a_changed_address_counts_as_a_change() {
    let t0 = Instant::now();
    let mut r = Roster::new("me");
    r.observe([record("a", 1, "a0")], t0);
    let mut moved = record("a", 1, "a0");
    moved.address = addr(9);
    r.observe([moved], t0 + 39 * S);
    assert_eq!(r.known(t0 + 50 * S)["a"], addr(9));
}

#[test]
fn a_stale_own_record_freezes_the_roster() {
    let t0 = Instant::now();
    let mut r = Roster::new("me");
    r.observe(
        [
            record("me", 0, "m0"),
            record("a", 1, "a0"),
            record("b", 2, "b0"),
        ],
        t0,
    );
    // Nothing changes any more (we are cut off from the API): our own
    // record goes stale at t0+40 s together with the others, and the
    // roster stays as it was then instead of shrinking to ourselves.
    for t in [39, 40, 41, 100, 10_000] {
        assert_eq!(names(&r, t0 + t * S), ["a", "b", "me"], "t={t}");
    }
    // Whereas with our own record fresh, a peer that stops renewing goes.
    r.observe(
        [
            record("me", 0, "m1"),
            record("a", 1, "a0"),
            record("b", 2, "b0"),
        ],
        t0 + 35 * S,
    );
    assert_eq!(names(&r, t0 + 41 * S), ["me"]);
    // Unless we go stale before it does: then it is judged as of then.
    let mut r = Roster::new("me");
    r.observe([record("me", 0, "m0")], t0);
    r.observe([record("me", 0, "m0"), record("a", 1, "a0")], t0 + 20 * S);
    assert_eq!(names(&r, t0 + 50 * S), ["a", "me"]);
    assert_eq!(names(&r, t0 + 5000 * S), ["a", "me"]);
}

#[test]
fn members_include_us_even_before_our_lease_exists() {
    let t0 = Instant::now();
    let mut r = Roster::new("me");
    assert_eq!(r.members(t0), BTreeSet::from(["me".to_string()]));
    r.observe([record("a", 1, "a0")], t0);
    assert_eq!(
        r.members(t0),
        BTreeSet::from(["a".to_string(), "me".to_string()])
    );
}

#[test]
fn macs_belong_to_their_speaker_even_after_its_lease_lapsed() {
    let t0 = Instant::now();
    let mut r = Roster::new("me");
    let mut shared = record("b", 2, "b0");
    shared.macs.insert(mac(99));
    let mut other = record("c", 3, "c0");
    other.macs.insert(mac(99));
    r.observe([record("a", 1, "a0"), shared, other], t0);
    assert_eq!(r.owner_of_mac(mac(1)), Some("a"));
    assert_eq!(r.owner_of_mac(mac(2)), Some("b"));
    assert_eq!(r.owner_of_mac(mac(99)), None, "listed by two Leases");
    assert_eq!(r.owner_of_mac(mac(50)), None);
    // Long after expiry: "a" is no longer known, but its MAC is still its.
    assert!(!r.known(t0 + 1000 * S).contains_key("a"));
    assert_eq!(r.owner_of_mac(mac(1)), Some("a"));
    assert_eq!(
        r.speaker_macs(),
        BTreeSet::from([mac(1), mac(2), mac(3), mac(99)])
    );
}

proptest! {
    /// Random snapshots over time against a model: per node, the record
    /// and when it last changed; known = changed within its duration of
    /// the reference time, which is now or, once our own record is stale,
    /// the moment it went stale.
    #[test]
    fn known_matches_a_model(steps in prop::collection::vec(
        (1u32..30, prop::collection::vec((0usize..4, 0u8..3, 10u32..60), 0..5)),
        1..25,
    )) {
        let nodes = ["me", "a", "b", "c"];
        let t0 = Instant::now();
        let mut now = t0;
        let mut roster = Roster::new("me");
        let mut model: BTreeMap<String, (SpeakerRecord, Instant)> = BTreeMap::new();
        for (advance, leases) in steps {
            now += advance * S;
            let mut snapshot: BTreeMap<String, SpeakerRecord> = BTreeMap::new();
            for (n, fp, dur) in leases {
                let mut r = record(nodes[n], n as u8, &format!("{fp}"));
                r.duration = dur * S;
                snapshot.insert(r.node.clone(), r);
            }
            roster.observe(snapshot.values().cloned(), now);
            model = snapshot
                .into_iter()
                .map(|(n, r)| {
                    let since = match model.get(&n) {
                        Some((old, since)) if *old == r => *since,
                        _ => now,
                    };
                    (n, (r, since))
                })
                .collect();
            for probe in [now, now + 15 * S, now + 45 * S] {
                let reference = match model.get("me") {
                    Some((r, since)) if probe > *since + r.duration => *since + r.duration,
                    _ => probe,
                };
                let expect: Vec<String> = model
                    .iter()
                    .filter(|(_, (r, since))| reference <= *since + r.duration)
                    .map(|(n, _)| n.clone())
                    .collect();
                prop_assert_eq!(names(&roster, probe), expect);
            }
        }
    }
}
