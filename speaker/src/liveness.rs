//! Which speakers are alive in this speaker's view, from the heartbeats it
//! receives. Pure: every call takes `now`, nothing reads a clock.
//!
//! Rules, and why:
//! - **Direct**: a peer heard within `dead_after` is alive. 350 ms is three
//!   and a half 100 ms intervals: three heartbeats in a row must be lost,
//!   which a healthy LAN does not do, and failover stays under 0.4 s.
//! - **Indirect**: every heartbeat lists how long ago its sender last heard
//!   each peer. A peer reported heard within `dead_after` by a peer that is
//!   itself directly alive is alive. So loss on one direction of one link
//!   (a flaky NIC queue, an asymmetric firewall rule) does not make a
//!   healthy node look dead while anyone else still hears it. Evidence is
//!   one hop only: a peer that nobody hears directly is dead.
//! - **Restarting**: the process is being replaced on a healthy node, whose
//!   data plane keeps forwarding. It stays alive until `restart_grace` after
//!   its first Restarting message, then is dead unless it is heard again
//!   (any message of a new incarnation, or a Running one of the same). The
//!   grace is counted from the first such message, not the last, so a
//!   process stuck in shutdown cannot hold its IPs forever. Reports by
//!   others do not end the grace early or extend it (they cannot tell the
//!   old process from the new): a restarted node that we hear only through
//!   others, never directly, is dead to us once the grace is over.
//! - **Leaving**: dead at once, whatever else says it is alive; its drain
//!   handover is the fence's business.
//! - **Stalls**: if this speaker itself was not scheduled for a while (a
//!   busy CI machine, a long GC-like pause of the runtime), the heartbeats
//!   of live peers sit unread in the socket buffer and everyone looks
//!   silent. When two evaluations are more than two intervals apart, the
//!   first one after the gap declares nobody dead; the next (one interval
//!   later, after the shell has drained the socket) decides. Deaths are
//!   deferred once only, so a node that is always late still fails over.
//!   This costs at most one interval of detection, and only after a stall.
//! - A message is counted once it has passed `heartbeat::decode` and
//!   `heartbeat::Replay`. Where it came from (`from`) is kept for logs but
//!   not checked against the roster: a multi-homed node may send from any
//!   of its addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::heartbeat::{MAX_HEARD, Message, State};

/// Heartbeat timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How often each speaker sends a heartbeat to every other.
    pub interval: Duration,
    /// A peer not heard for this long is dead.
    pub dead_after: Duration,
    /// How long a Restarting peer keeps its IPs.
    pub restart_grace: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(350),
            restart_grace: Duration::from_secs(10),
        }
    }
}

/// Timings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    #[error("the heartbeat interval must be positive")]
    Interval,
    #[error("dead-after ({dead_after:?}) must exceed two heartbeat intervals ({interval:?})")]
    DeadAfter {
        dead_after: Duration,
        interval: Duration,
    },
    #[error("the restart grace ({0:?}) must be at least dead-after")]
    Grace(Duration),
}

impl Timings {
    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.interval.is_zero() {
            return Err(TimingsError::Interval);
        }
        // With less than two intervals, one lost heartbeat is a failover.
        if self.dead_after <= self.interval * 2 {
            return Err(TimingsError::DeadAfter {
                dead_after: self.dead_after,
                interval: self.interval,
            });
        }
        if self.restart_grace < self.dead_after {
            return Err(TimingsError::Grace(self.restart_grace));
        }
        Ok(())
    }
}

/// Peers heard longer ago than this are left out of our reports: receivers
/// ignore evidence older than their `dead_after` anyway, and the datagram
/// stays small.
pub const REPORT_HORIZON: Duration = Duration::from_secs(10);

/// Peers neither known nor heard for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Why a peer went from alive to dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Not heard (directly or through others) within dead-after.
    Silent,
    /// It said it was leaving.
    Left,
    /// It said it was restarting and did not come back within the grace.
    RestartExpired,
}

/// One alive → dead transition, for events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub node: String,
    pub cause: Cause,
}

#[derive(Debug, Clone)]
struct Peer {
    last_direct: Instant,
    from: SocketAddr,
    incarnation: u64,
    seq: u64,
    state: State,
    /// When this incarnation entered `state` (the Restarting grace runs
    /// from here).
    state_since: Instant,
    /// Set when we declared it dead for silence: its incarnation and seq
    /// then, to spot a false failover when it turns out to have kept
    /// sending.
    declared_dead: Option<(u64, u64)>,
}

/// This speaker's view of who is alive.
#[derive(Debug, Clone)]
pub struct Liveness {
    me: String,
    timings: Timings,
    peers: BTreeMap<String, Peer>,
    /// target → reporter → when the reporter last heard the target, on our
    /// clock.
    indirect: BTreeMap<String, BTreeMap<String, Instant>>,
    /// Peers someone reported heard within dead-after of the report: word
    /// that they were alive while we listened (a stale report is not).
    vouched: BTreeSet<String>,
    /// The last evaluation's answer.
    alive: BTreeSet<String>,
    last_eval: Option<Instant>,
    deferred: bool,
    failovers: u64,
    false_failovers: u64,
    deaths: Vec<Death>,
}

impl Liveness {
    pub fn new(me: impl Into<String>, timings: Timings) -> Self {
        Self {
            me: me.into(),
            timings,
            peers: BTreeMap::new(),
            indirect: BTreeMap::new(),
            vouched: BTreeSet::new(),
            alive: BTreeSet::new(),
            last_eval: None,
            deferred: false,
            failovers: 0,
            false_failovers: 0,
            deaths: Vec::new(),
        }
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// A heartbeat received at `now` from `from`, already decoded and
    /// accepted by the replay guard. Our own (looped back, or from another
    /// process of this node during a rollout) are ignored.
    pub fn heard(&mut self, msg: &Message, from: SocketAddr, now: Instant) {
        if msg.sender == self.me {
            return;
        }
        match self.peers.get_mut(&msg.sender) {
            Some(p) => {
                if let Some((incarnation, seq)) = p.declared_dead.take() {
                    // Heartbeats numbered between the last one we had and
                    // this one were sent while we thought it dead: it was
                    // alive and we lost them. A peer that merely paused
                    // resumes at the next seq.
                    if msg.incarnation == incarnation && msg.seq > seq.saturating_add(1) {
                        self.false_failovers += 1;
                    }
                }
                if p.incarnation != msg.incarnation || p.state != msg.state {
                    p.state_since = now;
                }
                p.last_direct = now;
                p.from = from;
                p.incarnation = msg.incarnation;
                p.seq = msg.seq;
                p.state = msg.state;
            }
            None => {
                self.peers.insert(
                    msg.sender.clone(),
                    Peer {
                        last_direct: now,
                        from,
                        incarnation: msg.incarnation,
                        seq: msg.seq,
                        state: msg.state,
                        state_since: now,
                        declared_dead: None,
                    },
                );
            }
        }
        for (node, ms) in &msg.heard {
            if *node == msg.sender || *node == self.me {
                continue;
            }
            // A time before our clock's origin is older than any window.
            let age = Duration::from_millis(u64::from(*ms));
            let Some(at) = now.checked_sub(age) else {
                continue;
            };
            if age < self.timings.dead_after {
                self.vouched.insert(node.clone());
            }
            let seen = self
                .indirect
                .entry(node.clone())
                .or_default()
                .entry(msg.sender.clone())
                .or_insert(at);
            *seen = (*seen).max(at);
        }
    }

    /// Heard directly within dead-after and not leaving: whose reports count.
    fn directly_alive(&self, node: &str, now: Instant) -> bool {
        self.peers.get(node).is_some_and(|p| {
            p.state != State::Leaving && within(p.last_direct, now, self.timings.dead_after)
        })
    }

    fn reported_alive(&self, node: &str, now: Instant) -> bool {
        self.indirect.get(node).is_some_and(|reports| {
            reports.iter().any(|(reporter, at)| {
                within(*at, now, self.timings.dead_after) && self.directly_alive(reporter, now)
            })
        })
    }

    /// Whether `node` is alive by the rules of the module doc, and if not,
    /// why.
    fn judge(&self, node: &str, now: Instant) -> Result<(), Cause> {
        match self.peers.get(node).map(|p| (p.state, p.state_since)) {
            Some((State::Leaving, _)) => Err(Cause::Left),
            Some((State::Restarting, since)) => {
                if within(since, now, self.timings.restart_grace) {
                    Ok(())
                } else {
                    Err(Cause::RestartExpired)
                }
            }
            _ if self.directly_alive(node, now) || self.reported_alive(node, now) => Ok(()),
            _ => Err(Cause::Silent),
        }
    }

    /// The alive speakers among `known` (the roster), ourselves always
    /// included. Call it once per heartbeat interval, after reading every
    /// datagram waiting in the socket: it also counts transitions (see
    /// [`Self::failovers`], [`Self::take_deaths`]).
    pub fn alive(
        &mut self,
        now: Instant,
        known: &BTreeMap<String, SocketAddr>,
    ) -> BTreeSet<String> {
        let mut alive: BTreeSet<String> = known
            .keys()
            .filter(|n| **n != self.me && self.judge(n, now).is_ok())
            .cloned()
            .collect();
        alive.insert(self.me.clone());

        let stalled = self.last_eval.is_some_and(|t| {
            now.checked_duration_since(t)
                .is_some_and(|gap| gap > self.timings.interval * 2)
        });
        if stalled && !self.deferred {
            // Keep everyone who was alive, is still known and merely went
            // quiet: their heartbeats may be waiting in our socket. What a
            // peer told us (leaving, restart grace over) still applies.
            let quiet: Vec<String> = self
                .alive
                .iter()
                .filter(|n| known.contains_key(*n))
                .filter(|n| self.judge(n, now) == Err(Cause::Silent))
                .cloned()
                .collect();
            alive.extend(quiet);
            self.deferred = true;
        } else {
            self.deferred = false;
        }

        let gone: Vec<String> = self
            .alive
            .iter()
            .filter(|n| !alive.contains(*n) && known.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            let cause = self.judge(&node, now).err().unwrap_or(Cause::Silent);
            self.failovers += 1;
            if cause == Cause::Silent
                && let Some(p) = self.peers.get_mut(&node)
            {
                p.declared_dead = Some((p.incarnation, p.seq));
            }
            self.deaths.push(Death { node, cause });
        }

        self.forget_stale(now, known);
        self.alive = alive.clone();
        self.last_eval = Some(now);
        alive
    }

    fn forget_stale(&mut self, now: Instant, known: &BTreeMap<String, SocketAddr>) {
        let old = |at: Instant| !within(at, now, FORGET_AFTER);
        let stale: Vec<String> = self
            .peers
            .iter()
            .filter(|(n, p)| !known.contains_key(*n) && old(p.last_direct))
            .map(|(n, _)| n.clone())
            .collect();
        for n in &stale {
            self.peers.remove(n);
        }
        self.indirect.retain(|target, reports| {
            reports.retain(|_, at| !old(*at));
            !reports.is_empty() || known.contains_key(target)
        });
        let indirect = &self.indirect;
        self.vouched
            .retain(|n| known.contains_key(n) || indirect.contains_key(n));
    }

    /// What our next heartbeat says we heard: every peer heard directly
    /// within [`REPORT_HORIZON`], except those that said they are leaving
    /// (reporting them would only keep them alive elsewhere). Milliseconds
    /// are rounded up, so a receiver never thinks a peer was heard later
    /// than it was. Sorted by name; past [`MAX_HEARD`] the freshest win.
    pub fn report(&self, now: Instant) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.state != State::Leaving)
            .filter_map(|(n, p)| {
                let elapsed = now
                    .checked_duration_since(p.last_direct)
                    .unwrap_or_default();
                (elapsed < REPORT_HORIZON).then(|| (n.clone(), ceil_ms(elapsed)))
            })
            .collect();
        if out.len() > MAX_HEARD {
            out.sort_by_key(|(n, ms)| (*ms, n.clone()));
            out.truncate(MAX_HEARD);
            out.sort();
        }
        out
    }

    /// Known peers we have no word of life at all, neither from them nor
    /// from anyone else (their heartbeat port is blocked, say); a report
    /// already older than dead-after when it came does not count. The
    /// shell falls back to their Node's Ready condition ([`fallback`]) and
    /// reports it.
    pub fn never_heard(&self, known: &BTreeMap<String, SocketAddr>) -> BTreeSet<String> {
        known
            .keys()
            .filter(|n| **n != self.me)
            .filter(|n| !self.peers.contains_key(*n) && !self.vouched.contains(*n))
            .cloned()
            .collect()
    }

    /// Peers whose last heartbeat said Leaving: the fence disregards their
    /// LAN claims while they hand over.
    pub fn leaving(&self) -> BTreeSet<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.state == State::Leaving)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// For every peer we have word of, the latest time it was heard,
    /// directly or by anyone's report. The fence uses it to tell a claim
    /// on the LAN made while a peer was silent to us (news: it is alive
    /// where we cannot hear it) from one it made before falling silent.
    pub fn last_heard(&self) -> BTreeMap<String, Instant> {
        let mut out: BTreeMap<String, Instant> = self
            .peers
            .iter()
            .map(|(n, p)| (n.clone(), p.last_direct))
            .collect();
        for (target, reports) in &self.indirect {
            if let Some(latest) = reports.values().max() {
                let at = out.entry(target.clone()).or_insert(*latest);
                *at = (*at).max(*latest);
            }
        }
        out
    }

    /// The address `node`'s last heartbeat came from, for logs.
    pub fn last_address(&self, node: &str) -> Option<SocketAddr> {
        self.peers.get(node).map(|p| p.from)
    }

    /// Alive → dead transitions of known peers so far (all causes).
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The transitions since the last call, with their causes.
    pub fn take_deaths(&mut self) -> Vec<Death> {
        std::mem::take(&mut self.deaths)
    }

    /// False failovers since the last call: peers declared dead for silence
    /// that later turned out to have kept sending under the same
    /// incarnation.
    pub fn take_false_failovers(&mut self) -> u64 {
        std::mem::take(&mut self.false_failovers)
    }
}

/// The peers of `never_heard` (among `known`) whose Node is Ready: alive by
/// the API's word instead of ours, so a blocked heartbeat port degrades to
/// Node-readiness failover instead of "announce nothing".
pub fn fallback(
    known: &BTreeMap<String, SocketAddr>,
    never_heard: &BTreeSet<String>,
    node_ready: &BTreeMap<String, bool>,
) -> BTreeSet<String> {
    never_heard
        .iter()
        .filter(|n| known.contains_key(*n) && node_ready.get(*n).copied().unwrap_or(false))
        .cloned()
        .collect()
}

/// `at` lies less than `window` before `now` (or after it).
fn within(at: Instant, now: Instant, window: Duration) -> bool {
    now.checked_duration_since(at)
        .is_none_or(|elapsed| elapsed < window)
}

fn ceil_ms(d: Duration) -> u32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX)
}
