//! Liveness: unit tests of each rule on a fake clock, and property tests
//! on a small simulated network of speakers (random phases, send jitter,
//! transit delays and loss) for the guarantees the failover relies on.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrolb_speaker::heartbeat::{Message, Replay, State, decode, encode};
use ferrolb_speaker::liveness::{Cause, Liveness, REPORT_HORIZON, Timings, fallback};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn addr(i: usize) -> SocketAddr {
    format!("198.18.0.{}:7472", i + 1).parse().unwrap()
}

fn known(names: &[&str]) -> BTreeMap<String, SocketAddr> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), addr(i)))
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn msg(sender: &str, incarnation: u64, seq: u64, state: State, heard: &[(&str, u32)]) -> Message {
    Message {
        sender: sender.into(),
        incarnation,
        seq,
        state,
        heard: heard.iter().map(|(n, ms)| (n.to_string(), *ms)).collect(),
    }
}

fn running(sender: &str, seq: u64) -> Message {
    msg(sender, 1, seq, State::Running, &[])
}

fn view() -> (Liveness, Instant) {
    (Liveness::new("me", Timings::default()), Instant::now())
}

#[test]
fn defaults_validate_and_bad_timings_do_not() {
    assert!(Timings::default().validate().is_ok());
    let t = Timings::default();
    assert!(
        Timings {
            interval: Duration::ZERO,
            ..t
        }
        .validate()
        .is_err()
    );
    assert!(
        Timings {
            dead_after: 200 * MS,
            ..t
        }
        .validate()
        .is_err(),
        "dead-after of two intervals: one lost heartbeat would be a failover"
    );
    assert!(
        Timings {
            restart_grace: 100 * MS,
            ..t
        }
        .validate()
        .is_err()
    );
}

#[test]
fn a_peer_heard_directly_is_alive_for_dead_after() {
    let (mut v, t0) = view();
    let k = known(&["me", "a"]);
    assert_eq!(v.alive(t0, &k), set(&["me"]), "never heard");
    v.heard(&running("a", 0), addr(1), t0);
    assert_eq!(v.alive(t0 + 100 * MS, &k), set(&["a", "me"]));
    assert_eq!(v.alive(t0 + 200 * MS, &k), set(&["a", "me"]));
    assert_eq!(v.alive(t0 + 300 * MS, &k), set(&["a", "me"]));
    assert_eq!(v.alive(t0 + 349 * MS, &k), set(&["a", "me"]));
    assert_eq!(v.alive(t0 + 350 * MS, &k), set(&["me"]));
    assert_eq!(v.failovers(), 1);
    let deaths = v.take_deaths();
    assert_eq!(deaths.len(), 1);
    assert_eq!(
        (deaths[0].node.as_str(), deaths[0].cause),
        ("a", Cause::Silent)
    );
    assert!(v.take_deaths().is_empty());
    assert_eq!(v.last_address("a"), Some(addr(1)));
}

#[test]
fn only_known_peers_count_and_we_always_do() {
    let (mut v, t0) = view();
    v.heard(&running("stranger", 0), addr(9), t0);
    v.heard(&running("me", 0), addr(0), t0);
    assert_eq!(v.alive(t0, &BTreeMap::new()), set(&["me"]));
    // Known later: what we heard counts from then on.
    assert_eq!(
        v.alive(t0 + 10 * MS, &known(&["stranger"])),
        set(&["me", "stranger"])
    );
}

#[test]
fn others_reports_keep_a_peer_we_cannot_hear_alive() {
    let (mut v, t0) = view();
    let k = known(&["me", "a", "b"]);
    // "a" says it heard "b" 50 ms ago; we never hear "b" ourselves.
    v.heard(&msg("a", 1, 0, State::Running, &[("b", 50)]), addr(1), t0);
    assert_eq!(v.alive(t0, &k), set(&["a", "b", "me"]));
    // Evidence for "b" dates from t0-50ms: it lapses at t0+300ms.
    v.heard(&running("a", 1), addr(1), t0 + 100 * MS);
    v.heard(&running("a", 2), addr(1), t0 + 200 * MS);
    assert_eq!(v.alive(t0 + 299 * MS, &k), set(&["a", "b", "me"]));
    assert_eq!(v.alive(t0 + 300 * MS, &k), set(&["a", "me"]));
    assert!(v.never_heard(&k).is_empty(), "we have word of b");
}

#[test]
fn reports_count_only_from_directly_alive_reporters() {
    let (mut v, t0) = view();
    let k = known(&["me", "a", "b"]);
    v.heard(&msg("a", 1, 0, State::Running, &[("b", 0)]), addr(1), t0);
    // 340 ms later the report is still young enough, but "a" itself is
    // heard for the last time at t0: at t0+350ms both go.
    assert_eq!(v.alive(t0 + 340 * MS, &k), set(&["a", "b", "me"]));
    assert_eq!(v.alive(t0 + 350 * MS, &k), set(&["me"]));
    // A report about ourselves, or the sender itself, is ignored.
    let (mut v, t0) = view();
    v.heard(
        &msg("a", 1, 0, State::Running, &[("a", 0), ("me", 0)]),
        addr(1),
        t0,
    );
    assert_eq!(v.alive(t0 + 360 * MS, &k), set(&["me"]));
}

#[test]
fn a_leaving_peer_is_dead_at_once_whatever_others_say() {
    let (mut v, t0) = view();
    let k = known(&["me", "a", "b"]);
    v.heard(&running("a", 0), addr(1), t0);
    v.heard(&msg("b", 1, 0, State::Running, &[("a", 0)]), addr(2), t0);
    assert_eq!(v.alive(t0, &k), set(&["a", "b", "me"]));
    v.heard(&msg("a", 1, 1, State::Leaving, &[]), addr(1), t0 + 10 * MS);
    v.heard(
        &msg("b", 1, 1, State::Running, &[("a", 0)]),
        addr(2),
        t0 + 10 * MS,
    );
    assert_eq!(v.alive(t0 + 10 * MS, &k), set(&["b", "me"]));
    assert_eq!(v.take_deaths()[0].cause, Cause::Left);
    assert_eq!(v.leaving(), set(&["a"]));
    // We do not report a leaving peer to others.
    assert_eq!(
        v.report(t0 + 20 * MS),
        vec![("b".to_string(), 10)],
        "only b"
    );
    // It changed its mind (uncordoned): alive again.
    v.heard(&running("a", 2), addr(1), t0 + 30 * MS);
    assert_eq!(v.alive(t0 + 30 * MS, &k), set(&["a", "b", "me"]));
    assert_eq!(
        v.take_false_failovers(),
        0,
        "it told us: not a false failover"
    );
}

#[test]
fn restarting_holds_for_the_grace_from_the_first_notice() {
    let (mut v, t0) = view();
    let k = known(&["me", "a"]);
    v.heard(&running("a", 0), addr(1), t0);
    v.heard(
        &msg("a", 1, 1, State::Restarting, &[]),
        addr(1),
        t0 + 100 * MS,
    );
    // Repeated notices do not extend the grace.
    v.heard(
        &msg("a", 1, 2, State::Restarting, &[]),
        addr(1),
        t0 + 5000 * MS,
    );
    let grace_end = t0 + 100 * MS + Timings::default().restart_grace;
    for t in [200, 1000, 5000, 9000] {
        assert!(v.alive(t0 + t * MS, &k).contains("a"), "t={t}");
    }
    assert!(v.alive(grace_end - MS, &k).contains("a"));
    assert!(!v.alive(grace_end, &k).contains("a"));
    assert_eq!(v.take_deaths()[0].cause, Cause::RestartExpired);
    // The new process, late, brings it back.
    v.heard(
        &msg("a", 2, 0, State::Running, &[]),
        addr(1),
        grace_end + MS,
    );
    assert!(v.alive(grace_end + MS, &k).contains("a"));
}

#[test]
fn a_restarted_process_resumes_within_the_grace() {
    let (mut v, t0) = view();
    let k = known(&["me", "a"]);
    v.heard(&msg("a", 1, 7, State::Restarting, &[]), addr(1), t0);
    assert!(v.alive(t0 + 2000 * MS, &k).contains("a"));
    v.heard(
        &msg("a", 2, 0, State::Running, &[]),
        addr(1),
        t0 + 3000 * MS,
    );
    // Now ordinary rules: alive while heard.
    assert!(v.alive(t0 + 3300 * MS, &k).contains("a"));
    assert!(!v.alive(t0 + 3350 * MS, &k).contains("a"));
    assert_eq!(v.take_deaths()[0].cause, Cause::Silent);
}

#[test]
fn false_failovers_are_those_that_kept_sending() {
    let k = known(&["me", "a"]);
    let dead_and_back = |again: Message| {
        let (mut v, t0) = view();
        v.heard(&running("a", 10), addr(1), t0);
        for t in [0, 100, 200, 300] {
            v.alive(t0 + t * MS, &k);
        }
        assert!(!v.alive(t0 + 400 * MS, &k).contains("a"));
        v.heard(&again, addr(1), t0 + 500 * MS);
        assert!(v.alive(t0 + 500 * MS, &k).contains("a"));
        v.take_false_failovers()
    };
    // Seqs 11..14 were sent and lost: it was alive all along.
    assert_eq!(dead_and_back(running("a", 15)), 1);
    // It paused and resumed (its next seq): a real outage of the process.
    assert_eq!(dead_and_back(running("a", 11)), 0);
    // A new process: it had died.
    assert_eq!(dead_and_back(msg("a", 2, 100, State::Running, &[])), 0);
    // Counted once, then reset.
    let (mut v, t0) = view();
    v.heard(&running("a", 1), addr(1), t0);
    for t in [0, 100, 200, 300, 400] {
        v.alive(t0 + t * MS, &k);
    }
    v.heard(&running("a", 9), addr(1), t0 + 500 * MS);
    v.heard(&running("a", 10), addr(1), t0 + 600 * MS);
    assert_eq!(v.take_false_failovers(), 1);
    assert_eq!(v.take_false_failovers(), 0);
}

#[test]
fn a_stall_of_our_own_defers_deaths_once() {
    let (mut v, t0) = view();
    let k = known(&["me", "a"]);
    v.heard(&running("a", 0), addr(1), t0);
    assert!(v.alive(t0, &k).contains("a"));
    // We were not scheduled for a second: "a"'s heartbeats wait unread.
    assert!(v.alive(t0 + 1000 * MS, &k).contains("a"), "deferred");
    v.heard(&running("a", 10), addr(1), t0 + 1010 * MS);
    assert!(v.alive(t0 + 1100 * MS, &k).contains("a"));
    assert_eq!(v.failovers(), 0);
    // A peer that really stopped dies at the next evaluation.
    assert!(v.alive(t0 + 2200 * MS, &k).contains("a"), "deferred once");
    assert!(!v.alive(t0 + 2300 * MS, &k).contains("a"));
    // And a node that is always late still fails over (deferred once only).
    let (mut v, t0) = view();
    v.heard(&running("a", 0), addr(1), t0);
    v.alive(t0, &k);
    assert!(v.alive(t0 + 1000 * MS, &k).contains("a"));
    assert!(!v.alive(t0 + 2000 * MS, &k).contains("a"));
    // What a peer told us is not deferred: Leaving stays immediate.
    let (mut v, t0) = view();
    v.heard(&running("a", 0), addr(1), t0);
    v.alive(t0, &k);
    v.heard(&msg("a", 1, 1, State::Leaving, &[]), addr(1), t0 + 10 * MS);
    assert!(!v.alive(t0 + 1000 * MS, &k).contains("a"));
}

#[test]
fn reports_round_up_and_stop_at_the_horizon() {
    let (mut v, t0) = view();
    v.heard(&running("a", 0), addr(1), t0);
    v.heard(&running("b", 0), addr(2), t0 + 5 * MS);
    let at = t0 + 100 * MS + Duration::from_micros(1);
    assert_eq!(
        v.report(at),
        vec![("a".to_string(), 101), ("b".to_string(), 96)]
    );
    assert_eq!(
        v.report(t0 + REPORT_HORIZON + 2 * MS),
        vec![("b".to_string(), 9997)]
    );
}

#[test]
fn never_heard_peers_fall_back_to_node_readiness() {
    let (mut v, t0) = view();
    let k = known(&["me", "a", "b", "c", "d"]);
    v.heard(&msg("a", 1, 0, State::Running, &[("b", 10)]), addr(1), t0);
    let never = v.never_heard(&k);
    assert_eq!(never, set(&["c", "d"]));
    let ready = BTreeMap::from([("c".to_string(), true), ("d".to_string(), false)]);
    assert_eq!(fallback(&k, &never, &ready), set(&["c"]));
    assert_eq!(fallback(&k, &never, &BTreeMap::new()), set(&[]));
    // Not known any more: no fallback either.
    assert_eq!(fallback(&known(&["me"]), &never, &ready), set(&[]));
}

#[test]
fn a_stale_report_is_no_word_of_life() {
    // A speaker started after "b" fell silent to everyone (its heartbeat
    // port blocked) still hears "a" report "b" for a while: heard 1.2 s
    // ago. That says nothing of "b" being alive while we listened, so "b"
    // is still judged by its Node, like any peer we never heard; were it
    // declared dead instead, we would fight "b" for its IPs while speakers
    // that never heard of it defer to it.
    let (mut v, t0) = view();
    let k = known(&["me", "a", "b"]);
    v.heard(&msg("a", 1, 0, State::Running, &[("b", 1200)]), addr(1), t0);
    assert_eq!(v.never_heard(&k), set(&["b"]));
    // A fresh report is word of life.
    v.heard(
        &msg("a", 1, 1, State::Running, &[("b", 20)]),
        addr(1),
        t0 + 100 * MS,
    );
    assert!(v.never_heard(&k).is_empty());
}

#[test]
fn last_heard_takes_the_latest_of_direct_and_reported() {
    let (mut v, t0) = view();
    v.heard(&running("a", 0), addr(1), t0);
    v.heard(
        &msg("b", 1, 0, State::Running, &[("a", 0), ("c", 30)]),
        addr(2),
        t0 + 50 * MS,
    );
    let last = v.last_heard();
    assert_eq!(last["a"], t0 + 50 * MS);
    assert_eq!(last["b"], t0 + 50 * MS);
    assert_eq!(last["c"], t0 + 20 * MS);
}

#[test]
fn decoded_heartbeats_flow_through_the_replay_guard_into_the_view() {
    let key = [9u8; 32];
    let (mut v, t0) = view();
    let mut replay = Replay::new();
    let k = known(&["me", "a"]);
    let mut deliver = |m: &Message, t: Instant, v: &mut Liveness| {
        let got = decode(&encode(m, &key).unwrap(), &key).unwrap();
        if replay.accept(&got).is_ok() {
            v.heard(&got, addr(1), t);
        }
    };
    deliver(&running("a", 5), t0, &mut v);
    // A replayed old heartbeat, later, does not keep "a" alive.
    deliver(&running("a", 5), t0 + 300 * MS, &mut v);
    deliver(&running("a", 4), t0 + 340 * MS, &mut v);
    assert!(!v.alive(t0 + 360 * MS, &k).contains("a"));
}

// ---------------------------------------------------------------------
// A simulated network of speakers.

/// A small deterministic generator for the simulation's delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Debug, Clone)]
struct Net {
    n: usize,
    seed: u64,
    /// Extra delay on each tick, 0..=jitter µs.
    jitter_us: u64,
    /// Transit of each datagram, 0..=transit µs.
    transit_us: u64,
    end_us: u64,
    /// (from, to, loss probability) on one directed link.
    lossy: Option<(usize, usize, f64)>,
    /// This node stops sending (and evaluating) from this time.
    stop: Option<(usize, u64)>,
    /// From this time this node's heartbeats carry this state.
    say: Option<(usize, u64, State)>,
    /// A new process of this node starts at this time (Running).
    restart: Option<(usize, u64)>,
    timings: Timings,
}

/// One evaluation by one node.
struct Eval<'a> {
    node: usize,
    t_us: u64,
    alive: &'a BTreeSet<String>,
    view: &'a Liveness,
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn simulate(net: &Net, mut check: impl FnMut(Eval<'_>)) {
    enum Event {
        Tick(usize),
        Deliver(usize, Message),
    }
    let t0 = Instant::now();
    let at = |us: u64| t0 + Duration::from_micros(us);
    let interval_us = net.timings.interval.as_micros() as u64;
    let mut rng = Rng(net.seed);
    let names: Vec<String> = (0..net.n).map(node_name).collect();
    let known: BTreeMap<String, SocketAddr> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), addr(i)))
        .collect();
    let mut views: Vec<Liveness> = names
        .iter()
        .map(|n| Liveness::new(n.clone(), net.timings))
        .collect();
    let mut seq = vec![0u64; net.n];
    let mut incarnation: Vec<u64> = (0..net.n as u64).map(|i| 1000 + i).collect();
    let mut restarted = vec![false; net.n];
    let mut queue: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut events: BTreeMap<u64, Event> = BTreeMap::new();
    let mut id = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64)>>,
                    events: &mut BTreeMap<u64, Event>,
                    t: u64,
                    e: Event| {
        id += 1;
        events.insert(id, e);
        queue.push(Reverse((t, id)));
    };
    for i in 0..net.n {
        let phase = rng.below(interval_us);
        push(&mut queue, &mut events, phase, Event::Tick(i));
    }
    while let Some(Reverse((t, id))) = queue.pop() {
        if t > net.end_us {
            break;
        }
        let Some(event) = events.remove(&id) else {
            continue;
        };
        match event {
            Event::Deliver(to, m) => views[to].heard(&m, addr(0), at(t)),
            Event::Tick(i) => {
                let next = t + interval_us + rng.below(net.jitter_us + 1);
                push(&mut queue, &mut events, next, Event::Tick(i));
                if let Some((r, from)) = net.restart
                    && r == i
                    && t >= from
                    && !restarted[i]
                {
                    restarted[i] = true;
                    views[i] = Liveness::new(names[i].clone(), net.timings);
                    incarnation[i] += 1_000_000;
                    seq[i] = 0;
                }
                let stopped =
                    net.stop.is_some_and(|(s, from)| s == i && t >= from) && !restarted[i];
                if stopped {
                    continue;
                }
                let alive = views[i].alive(at(t), &known);
                check(Eval {
                    node: i,
                    t_us: t,
                    alive: &alive,
                    view: &views[i],
                });
                let state = match net.say {
                    Some((s, from, state)) if s == i && t >= from && !restarted[i] => state,
                    _ => State::Running,
                };
                let m = Message {
                    sender: names[i].clone(),
                    incarnation: incarnation[i],
                    seq: seq[i],
                    state,
                    heard: views[i].report(at(t)),
                };
                seq[i] += 1;
                for j in (0..net.n).filter(|j| *j != i) {
                    if let Some((f, to, p)) = net.lossy
                        && (f, to) == (i, j)
                        && rng.chance(p)
                    {
                        continue;
                    }
                    let arrive = t + rng.below(net.transit_us + 1);
                    push(
                        &mut queue,
                        &mut events,
                        arrive,
                        Event::Deliver(j, m.clone()),
                    );
                }
            }
        }
    }
}

fn net(n: usize, seed: u64, jitter_us: u64, transit_us: u64) -> Net {
    Net {
        n,
        seed,
        jitter_us,
        transit_us,
        end_us: 4_000_000,
        lossy: None,
        stop: None,
        say: None,
        restart: None,
        timings: Timings::default(),
    }
}

const WARMUP_US: u64 = 500_000;

#[test]
fn the_simulation_converges_on_a_healthy_network() {
    let everyone: BTreeSet<String> = (0..4).map(node_name).collect();
    let mut evals = 0;
    simulate(&net(4, 1, 10_000, 5_000), |e| {
        if e.t_us >= WARMUP_US {
            assert_eq!(e.alive, &everyone, "node {} at {} µs", e.node, e.t_us);
            evals += 1;
        }
        assert_eq!(e.view.failovers(), 0);
    });
    assert!(evals > 100);
}

#[test]
fn a_stopped_peer_is_dead_within_dead_after_plus_one_interval() {
    // No jitter, no transit: the bound is exact.
    let stop_us = 2_000_000;
    let bound = stop_us + 450_000;
    let mut n = net(4, 7, 0, 0);
    n.stop = Some((0, stop_us));
    simulate(&n, |e| {
        let sees = e.alive.contains("n0");
        if e.t_us >= WARMUP_US && e.t_us < stop_us {
            assert!(sees, "n{} lost n0 early at {} µs", e.node, e.t_us);
        }
        if e.t_us >= bound {
            assert!(!sees, "n{} still sees n0 at {} µs", e.node, e.t_us);
        }
    });
}

fn lossy_case() -> impl Strategy<Value = (usize, u64, u64, u64, usize, usize, f64)> {
    (3usize..=6, any::<u64>(), 0u64..=10_000, 0u64..=5_000)
        .prop_flat_map(|(n, seed, jitter, transit)| {
            (
                Just(n),
                Just(seed),
                Just(jitter),
                Just(transit),
                0..n,
                1..n,
                prop_oneof![Just(1.0), 0.0f64..1.0],
            )
        })
        .prop_map(|(n, seed, jitter, transit, from, shift, p)| {
            (n, seed, jitter, transit, from, (from + shift) % n, p)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Loss on one direction of one link only (up to all of it): no node
    /// ever declares any peer dead, since a third node hears it.
    #[test]
    fn one_way_loss_never_kills_a_peer((n, seed, jitter, transit, from, to, p) in lossy_case()) {
        let mut net = net(n, seed, jitter, transit);
        net.lossy = Some((from, to, p));
        let everyone: BTreeSet<String> = (0..n).map(node_name).collect();
        let mut ok = true;
        simulate(&net, |e| {
            ok &= e.view.failovers() == 0;
            ok &= e.t_us < WARMUP_US || e.alive == &everyone;
        });
        prop_assert!(ok, "a peer was declared dead");
    }

    /// All messages of a peer stop: every other node declares it dead
    /// within dead-after plus one interval, plus what jitter and transit
    /// add (a report relayed by a third node arrives one transit later).
    #[test]
    fn a_silent_peer_dies_in_time(n in 3usize..=6, seed: u64, jitter in 0u64..=10_000, transit in 0u64..=5_000, victim_pick: prop::sample::Index, stop in 1_000_000u64..2_500_000) {
        let victim = victim_pick.index(n);
        let mut net = net(n, seed, jitter, transit);
        net.stop = Some((victim, stop));
        let name = node_name(victim);
        let bound = stop + 350_000 + 100_000 + jitter + 2 * transit;
        let mut late = None;
        let mut early = None;
        simulate(&net, |e| {
            let sees = e.alive.contains(&name);
            if e.t_us >= bound && sees { late.get_or_insert((e.node, e.t_us)); }
            if e.t_us >= WARMUP_US && e.t_us < stop && !sees { early.get_or_insert((e.node, e.t_us)); }
        });
        prop_assert_eq!(late, None, "still alive after the bound");
        prop_assert_eq!(early, None, "dead before it stopped");
    }

    /// Leaving is immediate: from its first Leaving heartbeat on, a node is
    /// dead at every evaluation one transit after it was sent.
    #[test]
    fn leaving_is_immediate(n in 3usize..=5, seed: u64, transit in 0u64..=5_000, who: prop::sample::Index, from in 1_000_000u64..2_000_000) {
        let leaver = who.index(n);
        let mut net = net(n, seed, 0, transit);
        net.say = Some((leaver, from, State::Leaving));
        net.end_us = 3_000_000;
        let name = node_name(leaver);
        // The first Leaving heartbeat goes out at the leaver's first tick
        // at or after `from`, within one interval.
        let bound = from + 100_000 + transit;
        let mut wrong = None;
        simulate(&net, |e| {
            if e.node != leaver && e.t_us >= bound && e.alive.contains(&name) {
                wrong.get_or_insert((e.node, e.t_us));
            }
        });
        prop_assert_eq!(wrong, None);
    }

    /// Restarting holds a silent node for the grace, and not longer; a new
    /// process that comes back within the grace is never declared dead.
    #[test]
    fn restarting_holds_for_the_grace(n in 3usize..=5, seed: u64, grace_ms in 500u64..1500, comes_back: bool, back_after_ms in 100u64..400) {
        let mut net = net(n, seed, 0, 0);
        net.timings.restart_grace = Duration::from_millis(grace_ms);
        let notice = 1_000_000;
        // One Restarting heartbeat (the tick at or after `notice`), then
        // silence: stop just after it.
        net.say = Some((0, notice, State::Restarting));
        net.stop = Some((0, notice + 100_001));
        if comes_back {
            net.restart = Some((0, notice + back_after_ms * 1000));
        }
        net.end_us = notice + grace_ms * 1000 + 800_000;
        // The notice is sent within one interval of `notice` and we
        // evaluate at least once per interval: dead by `end` at the latest.
        let end = notice + 100_000 + grace_ms * 1000 + 100_000;
        let mut ok = true;
        simulate(&net, |e| {
            if e.node == 0 || e.t_us < WARMUP_US {
                return;
            }
            let sees = e.alive.contains("n0");
            if comes_back || e.t_us < notice + grace_ms * 1000 {
                ok &= sees;
            } else if e.t_us >= end {
                ok &= !sees;
            }
        });
        prop_assert!(ok);
    }
}

#[test]
fn the_restart_property_holds_for_fixed_cases() {
    // A restart that never comes back: dead after the grace.
    let mut n = net(3, 3, 0, 0);
    n.timings.restart_grace = Duration::from_millis(800);
    n.say = Some((0, 1_000_000, State::Restarting));
    n.stop = Some((0, 1_100_001));
    n.end_us = 2_500_000;
    let mut seen_dead_at = None;
    simulate(&n, |e| {
        if e.node != 0 && !e.alive.contains("n0") && e.t_us > WARMUP_US {
            seen_dead_at.get_or_insert(e.t_us);
        }
    });
    let t = seen_dead_at.expect("declared dead after the grace");
    assert!((1_800_000..=2_000_000).contains(&t), "{t}");
}
