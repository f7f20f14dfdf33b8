//! Which IPs this node answers for now: the speaker's plan, a pure pass
//! like `controller/src/plan.rs`. What this speaker knows goes in
//! ([`Inputs`]); the IPs to answer for, the ones to keep silent with the
//! reason, and the re-assertions to send come out ([`Plan`]); [`diff`]
//! against what the shell answers for now gives the takeovers to start and
//! the announcements to stop.
//!
//! # The rule
//!
//! This node answers for an IP only if all of these hold:
//!
//! - **(a) Elected**: the first alive node of the IP's ranking
//!   (`election::ballots`) is this one, so every higher-ranked candidate
//!   is dead in our view.
//! - **(b) Listened**: at least `dead_after` has passed since
//!   `listening_since` (process start, or our link last coming up). A
//!   node that restarted or reconnected has then had time to hear the
//!   current owner's heartbeats before claiming anything; without it, a
//!   node whose link flaps would claim at once, before learning that
//!   someone ranked higher is alive.
//! - **(c) Quorum**, with 3 or more speakers known to the API: this node
//!   hears a strict majority of them, itself included. A node cut off
//!   alone (its uplink half dead, its heartbeats blocked) stops answering
//!   instead of fighting the real owner. The price: when a majority dies
//!   at once, the survivors answer nothing until the dead speakers' Leases
//!   expire (40 s) and the roster shrinks, and a cluster that loses
//!   quorum for any reason goes dark rather than risk two owners.
//!   **Two-node clusters skip (c)**: one node alone can never be a
//!   majority of two, so a quorum would make any single failure an outage.
//!   They rely on (d) alone, which heals a split within one periodic
//!   announcement but does not prevent it.
//! - **(d) LAN watch**: we listen to gratuitous ARP and unsolicited NA
//!   (any ARP or NA that claims the IP) from MACs that are not ours,
//!   resolved to speakers through the roster's MAC lists.
//!   - A claim from a speaker ranked **higher** than us, made within the
//!     last `claim_memory` (2 s) *and* at a time when that speaker was
//!     already dead in our view (heard last more than `dead_after` before
//!     the claim), silences us at once: it is alive on the LAN where we
//!     cannot hear it, so our view is wrong. The second condition is ours,
//!     beyond the wording: without it the dead owner's last
//!     periodic announcement, sent shortly before it died, would delay
//!     every failover by up to `claim_memory`, far past the 0.4 s target.
//!   - A claim from a speaker ranked **lower**, one not ranked for the IP,
//!     or a host that is no speaker at all, for an IP we answer for: we
//!     re-assert (one gratuitous announcement), at most once per
//!     `defend_interval` (10 s, RFC 5227's DEFEND_INTERVAL) per IP, so two
//!     confused speakers cannot flood the LAN. A non-speaker claim is also
//!     reported as a conflict (the IP belongs to the pool; someone
//!     configured it by hand).
//!   - Claims from speakers that told us they are **leaving** are ignored:
//!     they keep answering during their handover, by design.
//!
//! # Drains: handover
//!
//! A speaker that is leaving (`handover: Some(since)`) keeps answering an
//! IP it owns until it sees another speaker claim it on the LAN (at or
//! after `since`), or `handover_max` (1 s) has passed. Its peers treat it
//! as dead at once, so the new owner announces while the old one still
//! answers: for those few milliseconds two MACs answer, both forwarding to
//! the same Service, which clients tolerate; the alternative, a gap with
//! nobody answering, loses requests. The leaving speaker must send no
//! gratuitous announcements of its own meanwhile (it answers requests
//! only), or it would undo the new owner's.
//!
//! # What this does not cover
//!
//! Two nodes that disagree about who is alive (one hears the owner, the
//! other does not, and both have quorum) can both pass (a)–(c) for as long
//! as the disagreement lasts; (d) ends it at the next claim one of them
//! sees. Indirect liveness (`liveness`) makes such disagreements rare:
//! they need a node heard by nobody in one view and by someone in another.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::election::Ballot;
use crate::packet::{Arp, MacAddr, NdpFrame, NdpMessage};

/// Fence timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long a higher-ranked speaker's claim keeps us silent. Must
    /// exceed the periodic gratuitous announcement interval, or a speaker
    /// we cannot hear is forgotten between two of its announcements.
    pub claim_memory: Duration,
    /// Least time between two re-assertions of one IP.
    pub defend_interval: Duration,
    /// Longest a leaving speaker keeps answering for an IP.
    pub handover_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            claim_memory: Duration::from_secs(2),
            defend_interval: Duration::from_secs(10),
            handover_max: Duration::from_secs(1),
        }
    }
}

/// One claim of an IP seen on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub mac: MacAddr,
    /// The speaker whose Lease lists the MAC (`Roster::owner_of_mac`);
    /// `None`: not a speaker.
    pub claimant: Option<String>,
    pub at: Instant,
}

/// What the LAN told us: the latest claim of each LB IP per claiming MAC,
/// and when we last re-asserted each IP.
#[derive(Debug, Clone, Default)]
pub struct Lan {
    claims: BTreeMap<IpAddr, BTreeMap<MacAddr, Claim>>,
    defended: BTreeMap<IpAddr, Instant>,
}

impl Lan {
    pub fn new() -> Self {
        Self::default()
    }

    /// A claim of `ip` from `mac`, which is not one of ours. Record only
    /// LB IPs (those with a ballot): other hosts' ARP for their own
    /// addresses is no business of ours.
    pub fn observe(&mut self, ip: IpAddr, mac: MacAddr, claimant: Option<String>, now: Instant) {
        self.claims.entry(ip).or_default().insert(
            mac,
            Claim {
                mac,
                claimant,
                at: now,
            },
        );
    }

    /// The shell re-asserted `ip` (a planned [`Plan::reassert`], or a
    /// takeover burst, which asserts as much).
    pub fn defended(&mut self, ip: IpAddr, now: Instant) {
        self.defended.insert(ip, now);
    }

    pub fn claims(&self, ip: IpAddr) -> impl Iterator<Item = &Claim> {
        self.claims.get(&ip).into_iter().flat_map(|m| m.values())
    }

    /// Drops what no rule looks at any more: claims and defences older
    /// than both `claim_memory` and `defend_interval`.
    pub fn prune(&mut self, now: Instant, timings: &Timings) {
        let keep = timings.claim_memory.max(timings.defend_interval);
        let fresh = |at: &Instant| now.checked_duration_since(*at).is_none_or(|d| d < keep);
        for by_mac in self.claims.values_mut() {
            by_mac.retain(|_, c| fresh(&c.at));
        }
        self.claims.retain(|_, m| !m.is_empty());
        self.defended.retain(|_, at| fresh(at));
    }
}

/// The address and MAC an ARP packet asserts: every ARP packet binds its
/// sender MAC to its sender IP in receivers' caches (RFC 826's merge rule),
/// requests and replies alike, gratuitous or not. Probes (sender IP
/// 0.0.0.0) claim nothing.
pub fn arp_claim(arp: &Arp) -> Option<(IpAddr, MacAddr)> {
    (!arp.sender_ip.is_unspecified()).then_some((IpAddr::V4(arp.sender_ip), arp.sender_mac))
}

/// The address and MAC a neighbour advertisement asserts, solicited or
/// not: its target, with the Target Link-Layer option's MAC, else the
/// Ethernet source. Solicitations claim nothing.
pub fn ndp_claim(frame: &NdpFrame) -> Option<(IpAddr, MacAddr)> {
    match frame.message {
        NdpMessage::Advertisement(a) => Some((
            IpAddr::V6(a.target),
            a.target_ll.unwrap_or(frame.ethernet.source),
        )),
        NdpMessage::Solicitation(_) => None,
    }
}

/// Everything one pass looks at.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub me: &'a str,
    /// `election::ballots`: each IP's ranking of eligible nodes.
    pub ballots: &'a BTreeMap<IpAddr, Ballot>,
    /// Alive in our view (`Liveness::alive`, with the readiness fallback).
    /// We count as alive whether or not the set names us.
    pub alive: &'a BTreeSet<String>,
    /// Speakers known to the API (`Roster::members`), the quorum's base.
    pub members: &'a BTreeSet<String>,
    /// Peers whose last heartbeat said Leaving (`Liveness::leaving`).
    pub leaving: &'a BTreeSet<String>,
    /// When each peer was last heard (`Liveness::last_heard`).
    pub last_heard: &'a BTreeMap<String, Instant>,
    /// Process start, or our link last coming up.
    pub listening_since: Instant,
    pub now: Instant,
    pub dead_after: Duration,
    pub lan: &'a Lan,
    /// `Some(since)` while this speaker is leaving (drain).
    pub handover: Option<Instant>,
    pub timings: Timings,
}

/// Why an IP is answered for, or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// First alive candidate, listened, quorum, no higher claim.
    Elected,
    /// Leaving, and no other speaker has claimed it yet.
    HandingOver,
    /// Not among the IP's candidates.
    NotCandidate,
    /// A higher-ranked candidate is alive.
    Outranked { by: String },
    /// Started (or link came up) too recently.
    Listening { remaining: Duration },
    /// Hearing too few of the known speakers.
    NoQuorum { heard: usize, members: usize },
    /// A higher-ranked speaker claimed it on the LAN although it is
    /// silent to us.
    ClaimedBy { node: String },
    /// Leaving: handed over to `to` (who claimed it), or `None` once
    /// `handover_max` passed without a claim.
    HandedOver { to: Option<String> },
}

/// What this node should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub announce: BTreeMap<IpAddr, Why>,
    pub silent: BTreeMap<IpAddr, Why>,
    /// Send one gratuitous announcement for each, then
    /// [`Lan::defended`].
    pub reassert: Vec<IpAddr>,
    /// Claims of IPs we answer for by hosts that are not speakers, within
    /// `claim_memory`: report them (Event, metric).
    pub conflicts: Vec<(IpAddr, MacAddr)>,
}

/// What to change to go from the IPs answered for now to the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Start answering; send the takeover burst.
    pub start: Vec<IpAddr>,
    /// Stop answering (and stop any burst still going).
    pub stop: Vec<IpAddr>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.start.is_empty() && self.stop.is_empty()
    }
}

pub fn diff(previous: &BTreeSet<IpAddr>, plan: &Plan) -> Changes {
    Changes {
        start: plan
            .announce
            .keys()
            .filter(|ip| !previous.contains(ip))
            .copied()
            .collect(),
        stop: previous
            .iter()
            .filter(|ip| !plan.announce.contains_key(ip))
            .copied()
            .collect(),
    }
}

fn age(now: Instant, at: Instant) -> Duration {
    now.checked_duration_since(at).unwrap_or_default()
}

/// The pass.
pub fn plan(i: &Inputs) -> Plan {
    let mut out = Plan::default();
    let listened = age(i.now, i.listening_since);
    // We are a member whether or not the roster has our Lease yet.
    let me_extra = usize::from(!i.members.contains(i.me));
    let heard = i
        .members
        .iter()
        .filter(|m| *m != i.me && i.alive.contains(*m))
        .count()
        + 1;
    let members = i.members.len() + me_extra;
    let quorum = members < 3 || 2 * heard > members;

    for (ip, ballot) in i.ballots {
        let why = decide(i, *ip, ballot, listened, quorum, heard, members);
        match why {
            Why::HandingOver => {
                // No re-assertion while handing over: it would undo the
                // new owner's takeover.
                out.announce.insert(*ip, why);
            }
            Why::Elected => {
                let (reassert, conflicts) = defend(i, *ip, ballot);
                if reassert {
                    out.reassert.push(*ip);
                }
                out.conflicts
                    .extend(conflicts.into_iter().map(|mac| (*ip, mac)));
                out.announce.insert(*ip, why);
            }
            _ => {
                out.silent.insert(*ip, why);
            }
        }
    }
    out
}

fn decide(
    i: &Inputs,
    ip: IpAddr,
    ballot: &Ballot,
    listened: Duration,
    quorum: bool,
    heard: usize,
    members: usize,
) -> Why {
    let Some(my_rank) = ballot.ranking.iter().position(|n| n == i.me) else {
        return Why::NotCandidate;
    };
    // (a)
    if let Some(by) = ballot.ranking[..my_rank]
        .iter()
        .find(|n| i.alive.contains(*n))
    {
        return Why::Outranked { by: by.clone() };
    }
    // (b)
    if listened < i.dead_after {
        return Why::Listening {
            remaining: i.dead_after - listened,
        };
    }
    // (c)
    if !quorum {
        return Why::NoQuorum { heard, members };
    }
    // (d), higher-ranked claims
    let higher = &ballot.ranking[..my_rank];
    for claim in i.lan.claims(ip) {
        let Some(node) = &claim.claimant else {
            continue;
        };
        if !higher.contains(node) || i.leaving.contains(node) {
            continue;
        }
        let recent = age(i.now, claim.at) < i.timings.claim_memory;
        let while_silent = i
            .last_heard
            .get(node)
            .is_none_or(|heard| age(claim.at, *heard) > i.dead_after);
        if recent && while_silent {
            return Why::ClaimedBy { node: node.clone() };
        }
    }
    // Handover when leaving.
    if let Some(since) = i.handover {
        let taken = i.lan.claims(ip).find_map(|c| {
            c.claimant
                .as_ref()
                .filter(|n| *n != i.me && c.at >= since)
                .cloned()
        });
        if let Some(to) = taken {
            return Why::HandedOver { to: Some(to) };
        }
        if age(i.now, since) >= i.timings.handover_max {
            return Why::HandedOver { to: None };
        }
        return Why::HandingOver;
    }
    Why::Elected
}

/// For an IP we answer for: whether to re-assert it now, and the foreign
/// MACs claiming it.
fn defend(i: &Inputs, ip: IpAddr, ballot: &Ballot) -> (bool, Vec<MacAddr>) {
    let my_rank = ballot.ranking.iter().position(|n| n == i.me);
    let higher = |node: &str| {
        let rank = ballot.ranking.iter().position(|n| n == node);
        matches!((rank, my_rank), (Some(r), Some(m)) if r < m)
    };
    let last = i.lan.defended.get(&ip).copied();
    let mut pending = false;
    let mut conflicts = Vec::new();
    for claim in i.lan.claims(ip) {
        match &claim.claimant {
            Some(n) if n == i.me || i.leaving.contains(n) || higher(n) => continue,
            Some(_) => {}
            None => {
                if age(i.now, claim.at) < i.timings.claim_memory {
                    conflicts.push(claim.mac);
                }
            }
        }
        let news = last.is_none_or(|d| claim.at > d);
        if news && age(i.now, claim.at) < i.timings.defend_interval {
            pending = true;
        }
    }
    let allowed = last.is_none_or(|d| age(i.now, d) >= i.timings.defend_interval);
    (pending && allowed, conflicts)
}
