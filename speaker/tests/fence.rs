//! The fence: each rule on fixed inputs, then the properties the issue's
//! "no split brain" rests on, over random rankings, views and LAN claim
//! histories: one announcer per IP when views agree, nothing from a
//! minority or from a node that has not listened long enough, idempotent
//! plans, bounded re-assertion, and drains that hand over without a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferrolb_speaker::election::{Ballot, ranking};
use ferrolb_speaker::fence::{
    Changes, Inputs, Lan, Plan, Timings, Why, arp_claim, diff, ndp_claim, plan,
};
use ferrolb_speaker::packet::{ArpFrame, MacAddr, NdpFrame};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);
const DEAD_AFTER: Duration = Duration::from_millis(350);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn mac_of(node: &str) -> MacAddr {
    let b = node.as_bytes();
    MacAddr([0x02, 0, 0, 0, b.len() as u8, *b.last().unwrap_or(&0)])
}

/// Owned inputs for one node's pass.
#[derive(Debug, Clone)]
struct World {
    me: String,
    ballots: BTreeMap<IpAddr, Ballot>,
    alive: BTreeSet<String>,
    members: BTreeSet<String>,
    leaving: BTreeSet<String>,
    last_heard: BTreeMap<String, Instant>,
    listening_since: Instant,
    now: Instant,
    lan: Lan,
    handover: Option<Instant>,
}

impl World {
    /// `me` with every node of `ranking` alive and known, listening long
    /// since, one IP ranked in that order.
    fn new(me: &str, order: &[&str], t0: Instant) -> Self {
        let ranking: Vec<String> = order.iter().map(|s| s.to_string()).collect();
        World {
            me: me.into(),
            ballots: BTreeMap::from([(
                ip("198.18.8.1"),
                Ballot {
                    key: ip("198.18.8.1"),
                    ranking,
                },
            )]),
            alive: set(order),
            members: set(order),
            leaving: BTreeSet::new(),
            last_heard: BTreeMap::new(),
            listening_since: t0,
            now: t0 + Duration::from_secs(10),
            lan: Lan::new(),
            handover: None,
        }
    }

    fn plan(&self) -> Plan {
        plan(&Inputs {
            me: &self.me,
            ballots: &self.ballots,
            alive: &self.alive,
            members: &self.members,
            leaving: &self.leaving,
            last_heard: &self.last_heard,
            listening_since: self.listening_since,
            now: self.now,
            dead_after: DEAD_AFTER,
            lan: &self.lan,
            handover: self.handover,
            timings: Timings::default(),
        })
    }

    fn why(&self) -> Why {
        let p = self.plan();
        let ip = ip("198.18.8.1");
        p.announce
            .get(&ip)
            .or(p.silent.get(&ip))
            .cloned()
            .expect("every ballot gets an answer")
    }

    fn claim(&mut self, by: &str, at: Instant) {
        self.lan
            .observe(ip("198.18.8.1"), mac_of(by), Some(by.to_string()), at);
    }
}

#[test]
fn the_first_alive_candidate_answers() {
    let t0 = Instant::now();
    let mut w = World::new("b", &["a", "b", "c"], t0);
    assert_eq!(w.why(), Why::Outranked { by: "a".into() });
    w.alive.remove("a");
    assert_eq!(w.why(), Why::Elected);
    let w = World::new("z", &["a", "b", "c"], t0);
    assert_eq!(w.why(), Why::NotCandidate);
    // We count as alive even if the set leaves us out.
    let mut w = World::new("a", &["a", "b", "c"], t0);
    w.alive.remove("a");
    assert_eq!(w.why(), Why::Elected);
}

#[test]
fn a_node_listens_one_dead_interval_before_claiming() {
    let t0 = Instant::now();
    let mut w = World::new("a", &["a", "b", "c"], t0);
    w.now = t0 + 100 * MS;
    assert_eq!(
        w.why(),
        Why::Listening {
            remaining: 250 * MS
        }
    );
    w.now = t0 + DEAD_AFTER;
    assert_eq!(w.why(), Why::Elected);
    // The link came back just now.
    w.listening_since = w.now;
    assert!(matches!(w.why(), Why::Listening { .. }));
}

#[test]
fn three_or_more_speakers_need_a_strict_majority() {
    let t0 = Instant::now();
    let mut w = World::new("a", &["a", "b", "c"], t0);
    w.alive = set(&["a", "b"]);
    assert_eq!(w.why(), Why::Elected, "2 of 3");
    w.alive = set(&["a"]);
    assert_eq!(
        w.why(),
        Why::NoQuorum {
            heard: 1,
            members: 3
        }
    );
    // Four known, two heard: not a strict majority.
    w.members = set(&["a", "b", "c", "d"]);
    w.alive = set(&["a", "d"]);
    assert_eq!(
        w.why(),
        Why::NoQuorum {
            heard: 2,
            members: 4
        }
    );
    // We count whether or not the roster has our Lease yet.
    w.members = set(&["b", "c"]);
    w.alive = set(&["a", "b"]);
    assert_eq!(w.why(), Why::Elected, "2 of 3, ourselves included");
    w.members = set(&["a", "b", "c", "d"]);
    // Alive nodes the API does not know do not count.
    w.alive = set(&["a", "x", "y"]);
    assert!(matches!(w.why(), Why::NoQuorum { heard: 1, .. }));
}

#[test]
fn two_node_clusters_skip_the_quorum() {
    let t0 = Instant::now();
    let mut w = World::new("b", &["a", "b"], t0);
    w.alive = set(&["b"]);
    assert_eq!(w.why(), Why::Elected);
    // ... and rely on the LAN watch.
    w.claim("a", w.now - 100 * MS);
    assert_eq!(w.why(), Why::ClaimedBy { node: "a".into() });
}

#[test]
fn a_higher_ranked_claim_while_silent_to_us_silences_at_once() {
    let t0 = Instant::now();
    let mut w = World::new("b", &["a", "b", "c"], t0);
    w.alive = set(&["b", "c"]);
    w.last_heard
        .insert("a".into(), w.now - Duration::from_secs(5));
    w.claim("a", w.now - 10 * MS);
    assert_eq!(w.why(), Why::ClaimedBy { node: "a".into() });
    // Remembered for claim_memory (2 s), then forgotten.
    w.now += Duration::from_millis(1989);
    assert_eq!(w.why(), Why::ClaimedBy { node: "a".into() });
    w.now += 2 * MS;
    assert_eq!(w.why(), Why::Elected);
}

#[test]
fn the_dying_owners_last_announcement_does_not_delay_failover() {
    let t0 = Instant::now();
    let mut w = World::new("b", &["a", "b", "c"], t0);
    // "a" announced periodically, then died 50 ms later; we heard it last
    // right before it died and now, 400 ms on, consider it dead.
    let death = w.now - 400 * MS;
    w.claim("a", death - 50 * MS);
    w.last_heard.insert("a".into(), death);
    w.alive = set(&["b", "c"]);
    assert_eq!(w.why(), Why::Elected);
}

#[test]
fn claims_of_lower_ranked_or_leaving_speakers_do_not_silence() {
    let t0 = Instant::now();
    let mut w = World::new("b", &["a", "b", "c"], t0);
    w.alive = set(&["b", "c"]);
    w.claim("c", w.now - 10 * MS);
    assert_eq!(w.why(), Why::Elected);
    let mut w = World::new("b", &["a", "b", "c"], t0);
    w.alive = set(&["b", "c"]);
    w.leaving = set(&["a"]);
    w.claim("a", w.now - 10 * MS);
    assert_eq!(
        w.why(),
        Why::Elected,
        "a hands over: its claims are expected"
    );
}

#[test]
fn lower_ranked_claims_are_answered_at_most_once_per_defend_interval() {
    let t0 = Instant::now();
    let ip = ip("198.18.8.1");
    let mut w = World::new("a", &["a", "b", "c"], t0);
    assert!(w.plan().reassert.is_empty());
    w.claim("b", w.now);
    assert_eq!(w.plan().reassert, [ip]);
    w.lan.defended(ip, w.now);
    assert!(w.plan().reassert.is_empty(), "defended");
    // It keeps claiming: the next answer waits for the defend interval.
    for s in 1..10 {
        w.now += Duration::from_secs(1);
        w.claim("b", w.now);
        assert!(w.plan().reassert.is_empty(), "{s} s after");
    }
    w.now += Duration::from_secs(1);
    assert_eq!(w.plan().reassert, [ip], "10 s after");
    // A claim made before our last defence is old news.
    w.lan.defended(ip, w.now);
    w.now += Duration::from_secs(11);
    assert!(w.plan().reassert.is_empty());
}

#[test]
fn foreign_hosts_are_defended_against_and_reported() {
    let t0 = Instant::now();
    let ip = ip("198.18.8.1");
    let mut w = World::new("a", &["a", "b"], t0);
    let stranger = MacAddr([0x0a, 0, 0, 0, 0, 1]);
    w.lan.observe(ip, stranger, None, w.now - 5 * MS);
    let p = w.plan();
    assert_eq!(p.reassert, [ip]);
    assert_eq!(p.conflicts, [(ip, stranger)]);
    assert_eq!(p.announce[&ip], Why::Elected);
    // A speaker that is not ranked for this IP is answered, not reported.
    let mut w = World::new("a", &["a", "b"], t0);
    w.claim("other", w.now);
    let p = w.plan();
    assert_eq!(p.reassert, [ip]);
    assert!(p.conflicts.is_empty());
}

#[test]
fn a_leaving_speaker_answers_until_the_new_owner_claims() {
    let t0 = Instant::now();
    let ip = ip("198.18.8.1");
    let mut w = World::new("a", &["a", "b", "c"], t0);
    let since = w.now;
    w.handover = Some(since);
    // A claim from before the drain began does not count.
    w.claim("b", since - 10 * MS);
    assert_eq!(w.why(), Why::HandingOver);
    assert!(w.plan().reassert.is_empty(), "never fight the successor");
    w.now += 20 * MS;
    w.claim("b", w.now);
    assert_eq!(
        w.why(),
        Why::HandedOver {
            to: Some("b".into())
        }
    );
    assert!(w.plan().announce.is_empty());
    // Nobody claims: it stops after handover_max anyway.
    let mut w = World::new("a", &["a", "b", "c"], t0);
    w.handover = Some(w.now);
    w.now += 999 * MS;
    assert!(w.plan().announce.contains_key(&ip));
    w.now += MS;
    assert_eq!(w.why(), Why::HandedOver { to: None });
}

#[test]
fn diff_starts_and_stops() {
    let t0 = Instant::now();
    let mut w = World::new("a", &["a", "b"], t0);
    w.ballots.insert(
        ip("2001:db8::8:1"),
        Ballot {
            key: ip("198.18.8.1"),
            ranking: vec!["a".into(), "b".into()],
        },
    );
    let p = w.plan();
    let previous = BTreeSet::from([ip("198.18.8.9")]);
    assert_eq!(
        diff(&previous, &p),
        Changes {
            start: vec![ip("198.18.8.1"), ip("2001:db8::8:1")],
            stop: vec![ip("198.18.8.9")],
        }
    );
    let now: BTreeSet<IpAddr> = p.announce.keys().copied().collect();
    assert!(diff(&now, &p).is_empty());
}

#[test]
fn claims_are_read_from_arp_and_na_frames() {
    let own = MacAddr([0x02, 0, 0, 0, 0, 7]);
    let g = ArpFrame::gratuitous_request("198.18.8.1".parse().unwrap(), own);
    assert_eq!(arp_claim(&g.arp), Some((ip("198.18.8.1"), own)));
    let probe = ArpFrame::probe("198.18.8.1".parse().unwrap(), own);
    assert_eq!(arp_claim(&probe.arp), None, "a probe claims nothing");
    let na = NdpFrame::unsolicited_advertisement(
        "2001:db8::8:1".parse().unwrap(),
        own,
        "fe80::7".parse().unwrap(),
    );
    assert_eq!(ndp_claim(&na), Some((ip("2001:db8::8:1"), own)));
    let dad = NdpFrame::dad_solicitation("2001:db8::8:1".parse().unwrap(), own);
    assert_eq!(ndp_claim(&dad), None);
}

#[test]
fn lan_memory_is_pruned() {
    let t0 = Instant::now();
    let ip = ip("198.18.8.1");
    let mut lan = Lan::new();
    lan.observe(ip, mac_of("b"), Some("b".into()), t0);
    lan.defended(ip, t0);
    lan.prune(t0 + Duration::from_secs(9), &Timings::default());
    assert_eq!(lan.claims(ip).count(), 1);
    lan.prune(t0 + Duration::from_secs(10), &Timings::default());
    assert_eq!(lan.claims(ip).count(), 0);
}

// ---------------------------------------------------------------------
// Properties.

fn node_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

/// Random ballots: each IP gets a random subset of the nodes as
/// candidates, ranked as the election ranks them.
fn ballots_strategy(n: usize) -> impl Strategy<Value = BTreeMap<IpAddr, Ballot>> {
    prop::collection::vec(prop::collection::vec(any::<bool>(), n), 1..6).prop_map(move |ips| {
        let names = node_names(n);
        ips.into_iter()
            .enumerate()
            .map(|(i, pick)| {
                let ip: IpAddr = format!("198.18.8.{}", i + 1).parse().unwrap();
                let eligible: BTreeSet<String> = names
                    .iter()
                    .zip(pick)
                    .filter(|(_, p)| *p)
                    .map(|(n, _)| n.clone())
                    .collect();
                (
                    ip,
                    Ballot {
                        key: ip,
                        ranking: ranking(ip, &eligible),
                    },
                )
            })
            .collect()
    })
}

/// A random claim history: (IP index, claimant index or a foreign host,
/// ms before now).
fn claims_strategy(n: usize) -> impl Strategy<Value = Vec<(usize, Option<usize>, u64)>> {
    prop::collection::vec(
        (0usize..6, prop::option::weighted(0.8, 0..n), 0u64..5_000),
        0..8,
    )
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    ballots: BTreeMap<IpAddr, Ballot>,
    claims: Vec<(usize, Option<usize>, u64)>,
    heard_ago: Vec<u64>,
    leaving: Vec<bool>,
    listened_ms: Vec<u64>,
    mask: Vec<bool>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=7).prop_flat_map(|n| {
        (
            ballots_strategy(n),
            claims_strategy(n),
            prop::collection::vec(0u64..3_000, n),
            prop::collection::vec(prop::bool::weighted(0.1), n),
            prop::collection::vec(0u64..1_000, n),
            prop::collection::vec(any::<bool>(), n),
        )
            .prop_map(
                move |(ballots, claims, heard_ago, leaving, listened_ms, mask)| Case {
                    n,
                    ballots,
                    claims,
                    heard_ago,
                    leaving,
                    listened_ms,
                    mask,
                },
            )
    })
}

impl Case {
    /// Node `me`'s inputs, with `alive` as its view.
    fn world(&self, me: usize, alive: &BTreeSet<String>, t0: Instant) -> World {
        let names = node_names(self.n);
        let now = t0 + Duration::from_secs(100);
        let mut lan = Lan::new();
        let ips: Vec<IpAddr> = self.ballots.keys().copied().collect();
        for (i, by, ago) in &self.claims {
            let Some(ip) = ips.get(i % ips.len()) else {
                continue;
            };
            let at = now - Duration::from_millis(*ago);
            match by {
                Some(b) if *b == me => {}
                Some(b) => lan.observe(*ip, mac_of(&names[*b]), Some(names[*b].clone()), at),
                None => lan.observe(*ip, MacAddr([0x0a, 0, 0, 0, 0, 1]), None, at),
            }
        }
        World {
            me: names[me].clone(),
            ballots: self.ballots.clone(),
            alive: alive.clone(),
            members: names.iter().cloned().collect(),
            leaving: names
                .iter()
                .zip(&self.leaving)
                .filter(|(_, l)| **l)
                .map(|(n, _)| n.clone())
                .collect(),
            last_heard: names
                .iter()
                .zip(&self.heard_ago)
                .map(|(n, ago)| (n.clone(), now - Duration::from_millis(*ago)))
                .collect(),
            listening_since: now - Duration::from_millis(self.listened_ms[me]) - DEAD_AFTER,
            now,
            lan,
            handover: None,
        }
    }
}

proptest! {
    /// Nodes that see the same alive set never both answer for an IP,
    /// whatever the LAN told each of them.
    #[test]
    fn agreeing_views_elect_at_most_one(c in case()) {
        let t0 = Instant::now();
        let names = node_names(c.n);
        let alive: BTreeSet<String> = names.iter().zip(&c.mask).filter(|(_, m)| **m).map(|(n, _)| n.clone()).collect();
        let mut announcers: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for me in (0..c.n).filter(|i| alive.contains(&names[*i])) {
            for ip in c.world(me, &alive, t0).plan().announce.keys() {
                announcers.entry(*ip).or_default().push(names[me].clone());
            }
        }
        for (ip, who) in announcers {
            prop_assert!(who.len() <= 1, "{ip}: {who:?}");
        }
    }

    /// A partition: with 3+ speakers, every node on a side holding at most
    /// half of them answers for nothing, whatever subset of its side it
    /// hears; and across the whole cluster, if the majority side agrees on
    /// its view, no IP has two announcers.
    #[test]
    fn a_minority_answers_for_nothing(c in case(), views in prop::collection::vec(prop::collection::vec(any::<bool>(), 7), 7)) {
        prop_assume!(c.n >= 3);
        let t0 = Instant::now();
        let names = node_names(c.n);
        let side: Vec<usize> = (0..c.n).filter(|i| c.mask[*i]).collect();
        let other: Vec<usize> = (0..c.n).filter(|i| !c.mask[*i]).collect();
        let (minority, majority) = if side.len() * 2 <= c.n { (side, other) } else { (other, side) };
        for &me in &minority {
            // Any view within its side, disagreeing between nodes.
            let alive: BTreeSet<String> = minority.iter().filter(|j| views[me][**j] || **j == me).map(|j| names[*j].clone()).collect();
            let p = c.world(me, &alive, t0).plan();
            prop_assert!(p.announce.is_empty(), "{} announced {:?}", names[me], p.announce);
        }
        let agreed: BTreeSet<String> = majority.iter().map(|j| names[*j].clone()).collect();
        let mut announcers: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for &me in &majority {
            for ip in c.world(me, &agreed, t0).plan().announce.keys() {
                *announcers.entry(*ip).or_default() += 1;
            }
        }
        prop_assert!(announcers.values().all(|n| *n <= 1));
    }

    /// A node that just started, or whose link just came back, answers for
    /// nothing before it has listened for dead-after.
    #[test]
    fn nothing_before_listening_for_dead_after(c in case(), me_pick: prop::sample::Index, listened in 0u64..350) {
        let t0 = Instant::now();
        let names = node_names(c.n);
        let me = me_pick.index(c.n);
        let mut w = c.world(me, &names.iter().cloned().collect(), t0);
        w.alive = BTreeSet::from([names[me].clone()]);
        w.members = w.alive.clone();
        w.listening_since = w.now - Duration::from_millis(listened);
        prop_assert!(w.plan().announce.is_empty());
        // ... and once it has, what it answers for only depends on the rest.
        w.listening_since = w.now - DEAD_AFTER;
        let p = w.plan();
        for (ip, b) in &c.ballots {
            if b.ranking.first() == Some(&names[me]) && c.claims.is_empty() {
                prop_assert!(p.announce.contains_key(ip));
            }
        }
    }

    /// Applying a plan (answering for what it says, recording the
    /// re-assertions it asked for) and planning again gives no changes.
    #[test]
    fn plans_are_idempotent(c in case(), me_pick: prop::sample::Index) {
        let t0 = Instant::now();
        let names = node_names(c.n);
        let me = me_pick.index(c.n);
        let alive: BTreeSet<String> = names.iter().zip(&c.mask).filter(|(_, m)| **m).map(|(n, _)| n.clone()).collect();
        let mut w = c.world(me, &alive, t0);
        let first = w.plan();
        let applied: BTreeSet<IpAddr> = first.announce.keys().copied().collect();
        for ip in &first.reassert {
            w.lan.defended(*ip, w.now);
        }
        let second = w.plan();
        prop_assert!(diff(&applied, &second).is_empty());
        prop_assert!(second.reassert.is_empty());
        prop_assert_eq!(&first.announce, &second.announce);
        prop_assert_eq!(&first.silent, &second.silent);
        // Every ballot is answered exactly once, one way or the other.
        prop_assert_eq!(second.announce.len() + second.silent.len(), c.ballots.len());
    }

    /// Whoever answers for an IP has no recent claim of it from a
    /// higher-ranked, non-leaving speaker made while that speaker was
    /// silent to it.
    #[test]
    fn no_answer_against_a_live_higher_claim(c in case()) {
        let t0 = Instant::now();
        let names = node_names(c.n);
        let alive: BTreeSet<String> = names.iter().zip(&c.mask).filter(|(_, m)| **m).map(|(n, _)| n.clone()).collect();
        for (me, my_name) in names.iter().enumerate() {
            let w = c.world(me, &alive, t0);
            for ip in w.plan().announce.keys() {
                let rank = &w.ballots[ip].ranking;
                let mine = rank.iter().position(|n| n == my_name).unwrap();
                for claim in w.lan.claims(*ip) {
                    let Some(by) = &claim.claimant else { continue };
                    let higher = rank[..mine].contains(by);
                    let recent = w.now.duration_since(claim.at) < Timings::default().claim_memory;
                    let silent = claim.at.saturating_duration_since(w.last_heard[by]) > DEAD_AFTER;
                    prop_assert!(!(higher && recent && silent && !w.leaving.contains(by)));
                }
            }
        }
    }

    /// Over a minute of a lower-ranked speaker claiming at random times,
    /// the owner re-asserts at most once per 10 s, and answers each claim
    /// within 10 s.
    #[test]
    fn reassertion_is_rate_limited(claim_times in prop::collection::btree_set((0u64..6_000).prop_map(|t| t * 10), 1..40)) {
        let t0 = Instant::now();
        let ip = ip("198.18.8.1");
        let mut w = World::new("a", &["a", "b"], t0);
        let start = w.now;
        let mut sent: Vec<u64> = Vec::new();
        for ms in (0..70_000).step_by(10) {
            w.now = start + Duration::from_millis(ms);
            if claim_times.contains(&ms) {
                w.claim("b", w.now);
            }
            if w.plan().reassert.contains(&ip) {
                w.lan.defended(ip, w.now);
                sent.push(ms);
            }
        }
        prop_assert!(sent.windows(2).all(|p| p[1] - p[0] >= 10_000), "{sent:?}");
        for c in claim_times.iter().filter(|c| **c < 60_000) {
            prop_assert!(sent.iter().any(|s| *s >= *c && *s <= c + 10_000), "claim at {c} unanswered: {sent:?}");
        }
    }

    /// A drain, stepped every 10 ms: the leaving owner and its successor
    /// between them always answer (no gap), and they overlap only until the
    /// successor's claim reaches the old owner, never past handover_max.
    #[test]
    fn drains_hand_over_without_a_gap(n in 2usize..=5, seed_ip in 1u8..250, transit_ms in 0u64..30, successor_lag_ms in 0u64..2_000) {
        let t0 = Instant::now();
        let names = node_names(n);
        let ip: IpAddr = format!("198.18.8.{seed_ip}").parse().unwrap();
        let ranking = ranking(ip, &names.iter().cloned().collect());
        let old = ranking[0].clone();
        let new = ranking[1].clone();
        let all: BTreeSet<String> = names.iter().cloned().collect();
        let base = |me: &str| {
            let mut w = World::new(me, &[], t0);
            w.ballots = BTreeMap::from([(ip, Ballot { key: ip, ranking: ranking.clone() })]);
            w.alive = all.clone();
            w.members = all.clone();
            w
        };
        let mut old_w = base(&old);
        let mut new_w = base(&new);
        let since = old_w.now;
        old_w.handover = Some(since);
        // The successor learns of the drain `successor_lag` later (its
        // heartbeats arrive late, or it was busy).
        let learns = since + Duration::from_millis(successor_lag_ms);
        let mut new_started: Option<Instant> = None;
        let mut old_stopped: Option<Instant> = None;
        for step in 0..300u64 {
            let now = since + Duration::from_millis(step * 10);
            old_w.now = now;
            new_w.now = now;
            if now >= learns {
                new_w.alive.remove(&old);
                new_w.leaving.insert(old.clone());
            }
            let new_on = new_w.plan().announce.contains_key(&ip);
            if new_on && new_started.is_none() {
                new_started = Some(now);
            }
            // Its takeover burst reaches the old owner after transit.
            if let Some(s) = new_started {
                let arrives = s + Duration::from_millis(transit_ms);
                if now >= arrives && old_w.lan.claims(ip).next().is_none() {
                    old_w.lan.observe(ip, mac_of(&new), Some(new.clone()), arrives);
                }
            }
            let old_on = old_w.plan().announce.contains_key(&ip);
            if !old_on && old_stopped.is_none() {
                old_stopped = Some(now);
            }
            let handover_ended = now >= since + Timings::default().handover_max;
            prop_assert!(old_on || new_on || handover_ended, "nobody answers at {step}");
            if old_on && new_on {
                let claim_seen = new_started.unwrap() + Duration::from_millis(transit_ms);
                prop_assert!(now < claim_seen + 10 * MS && now < since + Timings::default().handover_max);
            }
        }
        let stopped = old_stopped.expect("the old owner stops");
        prop_assert!(stopped <= since + Timings::default().handover_max);
        if successor_lag_ms + transit_ms + 10 < 1000 {
            prop_assert!(new_started.is_some_and(|s| s <= stopped), "the new owner announces first");
        }
    }
}
