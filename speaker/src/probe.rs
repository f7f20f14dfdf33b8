//! The RFC 5227 conflict probe, as a state machine with no clock and no
//! socket: the shell calls [`Probe::next`] with the time and does what it
//! says (send an ARP probe, or for IPv6 a DAD solicitation from `::`; wait;
//! announce; report a conflict), and feeds it what it sees on the LAN with
//! [`Probe::observed`].
//!
//! # Only for a first announcement
//!
//! An IP is probed only when it is announced for the first time anywhere
//! in the cluster: no Service condition names an announcer yet. A takeover
//! must never wait for a probe (the old owner's MAC would answer it, and a
//! failover would take seconds). The API enforces that: [`Probe::new`]
//! takes a [`FirstAnnouncement`], which [`FirstAnnouncement::check`] only
//! gives for an IP without a recorded announcer. Nothing on the takeover
//! path (`fence::Changes::start` for an IP someone announced before) can
//! build one.
//!
//! # Timings, and why they differ from the RFC's
//!
//! RFC 5227 waits a random 0–1 s (PROBE_WAIT), sends 3 probes (PROBE_NUM)
//! 1–2 s apart (PROBE_MIN/MAX), then listens 2 s more (ANNOUNCE_WAIT):
//! about 4–7 s, sized for hosts booting together after a power cut and for
//! slow, sleeping stacks. For an LB the defaults are shorter:
//! - start delay 0–200 ms: the random start only spreads out probes that
//!   would otherwise go out at the same instant (a controller assigning
//!   hundreds of IPs at start-up); 200 ms spreads them enough, while a
//!   new Service becomes reachable in under a second instead of five;
//! - spacing 100–200 ms and 200 ms of listening after the last probe: a
//!   host that holds the address answers an ARP request within
//!   milliseconds; three chances spread over half a second still catch one
//!   lost frame. The cost: a host that answers only after seconds (asleep,
//!   behind a slow proxy-ARP) is missed; operators with such hosts can set
//!   the RFC values.
//!
//! After a conflict the IP is probed again after 5 s, doubling up to 5 min
//! (the address is someone else's until a human acts; probing it every
//! second would be noise on their LAN). RFC 5227's MAX_CONFLICTS and
//! RATE_LIMIT_INTERVAL (after 10 conflicts, at most one attempt per 60 s)
//! hold as a floor under the backoff, which matters only if the backoff is
//! configured below it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::packet::{Arp, MacAddr, NdpFrame, NdpMessage};

/// Probe timings (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Random start delay is drawn from `0..=probe_wait`.
    pub probe_wait: Duration,
    pub probe_num: u32,
    /// Spacing between probes is drawn from `probe_min..=probe_max`.
    pub probe_min: Duration,
    pub probe_max: Duration,
    /// Listening after the last probe.
    pub announce_wait: Duration,
    pub max_conflicts: u32,
    pub rate_limit_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            probe_wait: Duration::from_millis(200),
            probe_num: 3,
            probe_min: Duration::from_millis(100),
            probe_max: Duration::from_millis(200),
            announce_wait: Duration::from_millis(200),
            max_conflicts: 10,
            rate_limit_interval: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl Timings {
    /// RFC 5227's own constants.
    pub fn rfc5227() -> Self {
        Self {
            probe_wait: Duration::from_secs(1),
            probe_min: Duration::from_secs(1),
            probe_max: Duration::from_secs(2),
            announce_wait: Duration::from_secs(2),
            ..Self::default()
        }
    }

    /// How long to wait before probing again after the `conflicts`-th
    /// conflict (1-based).
    pub fn backoff(&self, conflicts: u32) -> Duration {
        let doublings = conflicts.saturating_sub(1).min(32);
        let delay = self
            .backoff_initial
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max);
        if conflicts >= self.max_conflicts {
            delay.max(self.rate_limit_interval)
        } else {
            delay
        }
    }
}

/// Proof that `ip` has never been announced by any speaker: the only way
/// to start a [`Probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstAnnouncement {
    ip: IpAddr,
}

impl FirstAnnouncement {
    /// `announcer`: the node the IP's Service condition names as its
    /// announcer, if any. Some announcer means this is a takeover: no
    /// probe.
    pub fn check(ip: IpAddr, announcer: Option<&str>) -> Option<Self> {
        announcer.is_none().then_some(Self { ip })
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// What the shell should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send one probe now (ARP with sender IP 0.0.0.0, or NS from `::`).
    SendProbe,
    /// Nothing to do before this time; call [`Probe::next`] then (or when
    /// a frame arrives).
    Wait(Instant),
    /// No conflict: start announcing (the takeover burst). Final.
    Announce,
    /// Another host holds the IP: report it (Event `IPConflict`, Service
    /// condition), announce nothing. Given once per conflict; the probe
    /// then waits out the backoff and starts over.
    Conflict { mac: MacAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `sent` probes sent so far; the next is due at `at`.
    Probing {
        sent: u32,
        at: Instant,
    },
    /// All probes sent; listening until `until`.
    Settling {
        until: Instant,
    },
    /// After a conflict, until `until`.
    Backoff {
        until: Instant,
    },
    Done,
}

/// One IP's probe.
#[derive(Debug, Clone)]
pub struct Probe {
    ip: IpAddr,
    timings: Timings,
    rng: u64,
    phase: Phase,
    conflicts: u32,
    report: Option<MacAddr>,
}

impl Probe {
    /// A probe for `first.ip()` starting at `now`, with default timings.
    /// `rng_seed` drives the random delays (tests pass a fixed one; the
    /// shell a random one, so speakers do not probe in lockstep).
    pub fn new(first: FirstAnnouncement, now: Instant, rng_seed: u64) -> Self {
        Self::with_timings(first, now, rng_seed, Timings::default())
    }

    pub fn with_timings(
        first: FirstAnnouncement,
        now: Instant,
        rng_seed: u64,
        timings: Timings,
    ) -> Self {
        let mut probe = Self {
            ip: first.ip,
            timings,
            rng: rng_seed,
            phase: Phase::Done,
            conflicts: 0,
            report: None,
        };
        probe.phase = probe.start(now);
        probe
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Conflicts seen so far.
    pub fn conflicts(&self) -> u32 {
        self.conflicts
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn start(&mut self, now: Instant) -> Phase {
        let delay = self.uniform(Duration::ZERO, self.timings.probe_wait);
        Phase::Probing {
            sent: 0,
            at: now + delay,
        }
    }

    /// splitmix64: the delays need spread, not secrecy, and a seeded
    /// generator keeps the state machine deterministic under test.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos();
        let span = u64::try_from(span).unwrap_or(u64::MAX);
        let offset = match span.checked_add(1) {
            Some(n) => self.random() % n,
            None => self.random(),
        };
        lo + Duration::from_nanos(offset)
    }

    /// What to do at `now`.
    pub fn next(&mut self, now: Instant) -> Action {
        if let Some(mac) = self.report.take() {
            return Action::Conflict { mac };
        }
        match self.phase {
            Phase::Probing { sent, at } => {
                if now < at {
                    return Action::Wait(at);
                }
                let sent = sent + 1;
                self.phase = if sent >= self.timings.probe_num {
                    Phase::Settling {
                        until: now + self.timings.announce_wait,
                    }
                } else {
                    let gap = self.uniform(self.timings.probe_min, self.timings.probe_max);
                    Phase::Probing {
                        sent,
                        at: now + gap,
                    }
                };
                Action::SendProbe
            }
            Phase::Settling { until } => {
                if now < until {
                    return Action::Wait(until);
                }
                self.phase = Phase::Done;
                Action::Announce
            }
            Phase::Backoff { until } => {
                if now < until {
                    return Action::Wait(until);
                }
                self.phase = self.start(now);
                self.next(now)
            }
            Phase::Done => Action::Announce,
        }
    }

    /// A frame from `mac` that conflicts with the IP ([`arp_conflict`],
    /// [`ndp_conflict`]). While probing, one from a MAC that is not a
    /// speaker's (`speaker_macs`, from the roster; ours are in it) is a
    /// conflict. Speakers are left to the fence: two speakers probing the
    /// same new IP at once is a disagreement about the winner, not a
    /// foreign host.
    pub fn observed(&mut self, mac: MacAddr, speaker_macs: &BTreeSet<MacAddr>, now: Instant) {
        let probing = matches!(self.phase, Phase::Probing { .. } | Phase::Settling { .. });
        if !probing || speaker_macs.contains(&mac) {
            return;
        }
        self.conflicts = self.conflicts.saturating_add(1);
        self.report = Some(mac);
        self.phase = Phase::Backoff {
            until: now + self.timings.backoff(self.conflicts),
        };
    }
}

/// The sender MAC if `arp` conflicts with probing `ip` (RFC 5227 §2.1.1):
/// it claims `ip` (sender IP = `ip`), or it is another host's probe for
/// `ip` (sender IP 0.0.0.0, target `ip`).
pub fn arp_conflict(arp: &Arp, ip: Ipv4Addr) -> Option<MacAddr> {
    let claims = arp.sender_ip == ip;
    let probes = arp.is_probe() && arp.target_ip == ip;
    (claims || probes).then_some(arp.sender_mac)
}

/// The sender MAC if `frame` conflicts with probing `ip` (RFC 4862 §5.4.3
/// and §5.4.4): an advertisement for `ip`, or another host's duplicate
/// address detection for it (a solicitation from `::`).
pub fn ndp_conflict(frame: &NdpFrame, ip: Ipv6Addr) -> Option<MacAddr> {
    match frame.message {
        NdpMessage::Advertisement(a) if a.target == ip => {
            Some(a.target_ll.unwrap_or(frame.ethernet.source))
        }
        NdpMessage::Solicitation(s) if s.target == ip && frame.source.is_unspecified() => {
            Some(frame.ethernet.source)
        }
        _ => None,
    }
}
