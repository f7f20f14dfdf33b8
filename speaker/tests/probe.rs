//! The RFC 5227 conflict probe on a fake clock: its schedule, conflicts and
//! their backoff, what counts as a conflict, and that only a first
//! announcement can start one.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ferrolb_speaker::packet::{Arp, ArpFrame, ArpOp, MacAddr, NdpFrame};
use ferrolb_speaker::probe::{
    Action, FirstAnnouncement, Probe, Timings, arp_conflict, ndp_conflict,
};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);
const SPEAKER: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
const STRANGER: MacAddr = MacAddr([0x0a, 0, 0, 0, 0, 9]);

fn ip() -> IpAddr {
    "198.18.8.1".parse().unwrap()
}

fn first() -> FirstAnnouncement {
    FirstAnnouncement::check(ip(), None).unwrap()
}

fn speakers() -> BTreeSet<MacAddr> {
    BTreeSet::from([SPEAKER])
}

/// Drives the probe at exactly the times it asks for until it announces
/// or reports a conflict; returns the actions with their times.
fn run(probe: &mut Probe, mut now: Instant, limit: usize) -> Vec<(Instant, Action)> {
    let mut out = Vec::new();
    for _ in 0..limit {
        let a = probe.next(now);
        out.push((now, a));
        match a {
            Action::Wait(until) => {
                assert!(until > now, "a wait must move time forward");
                now = until;
            }
            Action::Announce | Action::Conflict { .. } => break,
            Action::SendProbe => {}
        }
    }
    out
}

#[test]
fn only_an_ip_nobody_announced_yet_can_be_probed() {
    assert!(FirstAnnouncement::check(ip(), None).is_some());
    // Someone announced it before: this is a takeover, no probe.
    assert!(FirstAnnouncement::check(ip(), Some("node-2")).is_none());
    assert_eq!(first().ip(), ip());
}

#[test]
fn the_default_schedule_probes_three_times_then_announces() {
    let t0 = Instant::now();
    let mut p = Probe::new(first(), t0, 42);
    let steps = run(&mut p, t0, 50);
    let sends: Vec<Instant> = steps
        .iter()
        .filter(|(_, a)| *a == Action::SendProbe)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(sends.len(), 3);
    assert!(sends[0] - t0 <= 200 * MS);
    for pair in sends.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((100 * MS..=200 * MS).contains(&gap), "{gap:?}");
    }
    let (announced_at, last) = *steps.last().unwrap();
    assert_eq!(last, Action::Announce);
    assert_eq!(
        announced_at - sends[2],
        200 * MS,
        "announce-wait after the last probe"
    );
    assert!(announced_at - t0 <= 800 * MS, "well under a second");
    assert!(p.is_done());
    // Final: it keeps saying so.
    assert_eq!(p.next(announced_at + 10 * MS), Action::Announce);
}

#[test]
fn early_calls_repeat_the_wait() {
    let t0 = Instant::now();
    let mut p = Probe::new(first(), t0, 7);
    let Action::Wait(until) = p.next(t0) else {
        // A zero start delay sends at once; fine too.
        return;
    };
    assert_eq!(p.next(t0 + MS.min(until - t0) / 2), Action::Wait(until));
    assert_eq!(p.next(until), Action::SendProbe);
}

#[test]
fn the_same_seed_gives_the_same_schedule_and_seeds_differ() {
    let t0 = Instant::now();
    let a = run(&mut Probe::new(first(), t0, 1), t0, 50);
    let b = run(&mut Probe::new(first(), t0, 1), t0, 50);
    assert_eq!(a, b);
    let schedules: BTreeSet<Vec<Duration>> = (0..20u64)
        .map(|seed| {
            run(&mut Probe::new(first(), t0, seed), t0, 50)
                .iter()
                .map(|(t, _)| *t - t0)
                .collect()
        })
        .collect();
    assert!(schedules.len() > 10, "delays are spread");
}

#[test]
fn a_foreign_answer_is_a_conflict_then_backs_off_and_retries() {
    let t0 = Instant::now();
    let mut p = Probe::new(first(), t0, 3);
    let steps = run(&mut p, t0, 3);
    let now = steps.last().unwrap().0 + 10 * MS;
    // Another speaker's MAC is left to the fence.
    p.observed(SPEAKER, &speakers(), now);
    assert!(!matches!(p.next(now), Action::Conflict { .. }));
    p.observed(STRANGER, &speakers(), now);
    assert_eq!(p.next(now), Action::Conflict { mac: STRANGER });
    assert_eq!(p.conflicts(), 1);
    assert_eq!(p.next(now), Action::Wait(now + Duration::from_secs(5)));
    // More claims while backing off change nothing.
    p.observed(STRANGER, &speakers(), now + Duration::from_secs(1));
    assert_eq!(
        p.next(now + Duration::from_secs(2)),
        Action::Wait(now + Duration::from_secs(5))
    );
    assert_eq!(p.conflicts(), 1);
    // After the backoff, probing starts over; a clean run announces.
    let steps = run(&mut p, now + Duration::from_secs(5), 50);
    assert_eq!(
        steps
            .iter()
            .filter(|(_, a)| *a == Action::SendProbe)
            .count(),
        3
    );
    assert_eq!(steps.last().unwrap().1, Action::Announce);
    // Once announced, the probe is over: the fence handles claims.
    p.observed(STRANGER, &speakers(), now + Duration::from_secs(9));
    assert_eq!(p.next(now + Duration::from_secs(9)), Action::Announce);
}

#[test]
fn a_conflict_in_the_announce_wait_still_counts() {
    let t0 = Instant::now();
    let mut p = Probe::new(first(), t0, 5);
    let steps = run(&mut p, t0, 50);
    let (at, last) = *steps.last().unwrap();
    assert_eq!(last, Action::Announce);
    // Replay, but with a reply arriving just before the end of the wait.
    let mut p = Probe::new(first(), t0, 5);
    let mut now = t0;
    let mut sent = 0;
    loop {
        match p.next(now) {
            Action::Wait(u) => now = u,
            Action::SendProbe => sent += 1,
            other => panic!("unexpected {other:?}"),
        }
        if sent == 3 {
            break;
        }
    }
    p.observed(STRANGER, &speakers(), at - MS);
    assert_eq!(p.next(at), Action::Conflict { mac: STRANGER });
}

#[test]
fn backoff_doubles_to_five_minutes_with_the_rfc_floor_after_ten() {
    let t = Timings::default();
    let secs: Vec<u64> = (1..=12).map(|k| t.backoff(k).as_secs()).collect();
    assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300, 300, 300]);
    assert_eq!(t.backoff(u32::MAX).as_secs(), 300);
    // With a fast backoff configured, RATE_LIMIT_INTERVAL still holds
    // after MAX_CONFLICTS.
    let fast = Timings {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(2),
        ..t
    };
    assert_eq!(fast.backoff(9), Duration::from_secs(2));
    assert_eq!(fast.backoff(10), Duration::from_secs(60));
}

#[test]
fn repeated_conflicts_follow_the_backoff() {
    let t0 = Instant::now();
    let mut p = Probe::new(first(), t0, 11);
    let mut now = t0;
    for k in 1..=8u32 {
        // Let it send its first probe, then a stranger answers.
        loop {
            match p.next(now) {
                Action::Wait(u) => now = u,
                Action::SendProbe => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        now += MS;
        p.observed(STRANGER, &speakers(), now);
        assert_eq!(p.next(now), Action::Conflict { mac: STRANGER });
        assert_eq!(
            p.next(now),
            Action::Wait(now + Timings::default().backoff(k))
        );
    }
    assert_eq!(p.conflicts(), 8);
}

#[test]
fn rfc_timings_are_available() {
    let t0 = Instant::now();
    let mut p = Probe::with_timings(first(), t0, 9, Timings::rfc5227());
    let steps = run(&mut p, t0, 50);
    let total = steps.last().unwrap().0 - t0;
    assert!(
        total >= Duration::from_secs(4) && total <= Duration::from_secs(7),
        "{total:?}"
    );
}

#[test]
fn what_conflicts_with_an_arp_probe() {
    let v4: Ipv4Addr = "198.18.8.1".parse().unwrap();
    let client: Ipv4Addr = "198.18.0.50".parse().unwrap();
    let arp = |op, sender_ip, target_ip| Arp {
        op,
        sender_mac: STRANGER,
        sender_ip,
        target_mac: MacAddr::ZERO,
        target_ip,
    };
    // Someone holding it: an answer, or a gratuitous announcement.
    assert_eq!(
        arp_conflict(&arp(ArpOp::Reply, v4, client), v4),
        Some(STRANGER)
    );
    assert_eq!(
        arp_conflict(&ArpFrame::gratuitous_request(v4, STRANGER).arp, v4),
        Some(STRANGER)
    );
    // Someone else probing for it at the same time.
    assert_eq!(
        arp_conflict(&ArpFrame::probe(v4, STRANGER).arp, v4),
        Some(STRANGER)
    );
    // A client asking for it is no conflict, nor is traffic about others.
    assert_eq!(arp_conflict(&arp(ArpOp::Request, client, v4), v4), None);
    assert_eq!(
        arp_conflict(&ArpFrame::probe(client, STRANGER).arp, v4),
        None
    );
}

#[test]
fn what_conflicts_with_duplicate_address_detection() {
    let v6: Ipv6Addr = "2001:db8::8:1".parse().unwrap();
    let ll: Ipv6Addr = "fe80::9".parse().unwrap();
    let na = NdpFrame::unsolicited_advertisement(v6, STRANGER, ll);
    assert_eq!(ndp_conflict(&na, v6), Some(STRANGER));
    let dad = NdpFrame::dad_solicitation(v6, STRANGER);
    assert_eq!(ndp_conflict(&dad, v6), Some(STRANGER));
    let other: Ipv6Addr = "2001:db8::8:2".parse().unwrap();
    assert_eq!(ndp_conflict(&na, other), None);
    assert_eq!(
        ndp_conflict(&NdpFrame::dad_solicitation(other, STRANGER), v6),
        None
    );
}

proptest! {
    /// Any seed and any timings: exactly `probe_num` probes with spacing
    /// in range after a start delay in range, then Announce.
    #[test]
    fn the_schedule_keeps_to_its_bounds(
        seed: u64,
        wait_ms in 0u64..2_000,
        min_ms in 1u64..1_000,
        extra_ms in 0u64..1_000,
        announce_ms in 0u64..2_000,
        num in 1u32..6,
    ) {
        let timings = Timings {
            probe_wait: Duration::from_millis(wait_ms),
            probe_num: num,
            probe_min: Duration::from_millis(min_ms),
            probe_max: Duration::from_millis(min_ms + extra_ms),
            announce_wait: Duration::from_millis(announce_ms),
            ..Timings::default()
        };
        let t0 = Instant::now();
        let mut p = Probe::with_timings(first(), t0, seed, timings);
        let mut now = t0;
        let mut sends = Vec::new();
        let end = loop {
            match p.next(now) {
                Action::Wait(u) => { prop_assert!(u > now); now = u; }
                Action::SendProbe => sends.push(now),
                Action::Announce => break now,
                Action::Conflict { .. } => prop_assert!(false, "no conflict was observed"),
            }
            prop_assert!(sends.len() <= num as usize);
        };
        prop_assert_eq!(sends.len(), num as usize);
        prop_assert!(sends[0] - t0 <= timings.probe_wait);
        for pair in sends.windows(2) {
            let gap = pair[1] - pair[0];
            prop_assert!(gap >= timings.probe_min && gap <= timings.probe_max);
        }
        prop_assert_eq!(end - *sends.last().unwrap(), timings.announce_wait);
    }

    /// A foreign claim at any moment before Announce is reported exactly
    /// once, and nothing is announced before the backoff has passed.
    #[test]
    fn a_conflict_always_blocks_the_announcement(seed: u64, after_steps in 0usize..8) {
        let t0 = Instant::now();
        let mut p = Probe::new(first(), t0, seed);
        let mut now = t0;
        for _ in 0..after_steps {
            match p.next(now) {
                Action::Wait(u) => now = u,
                Action::SendProbe => {}
                Action::Announce => return Ok(()),
                Action::Conflict { .. } => prop_assert!(false),
            }
        }
        if p.is_done() { return Ok(()); }
        p.observed(STRANGER, &speakers(), now);
        prop_assert_eq!(p.next(now), Action::Conflict { mac: STRANGER });
        let retry = now + Timings::default().backoff(1);
        let mut t = now;
        while t < retry {
            let a = p.next(t);
            prop_assert_eq!(a, Action::Wait(retry));
            t += Duration::from_millis(700);
        }
    }
}
