//! The speaker's loop: the thin shell around the pure passes. Every tick
//! (a quarter of the heartbeat interval) it reads what arrived (heartbeats,
//! LAN frames, cache and link changes), asks [`fence::plan`] which IPs this
//! node answers for, gates first announcements behind the conflict probe,
//! tells the interface tasks ([`Announcer`]) what changed, and queues what
//! users should see ([`report`]).
//!
//! Nothing here decides policy: who wins is `election`, who is alive is
//! `liveness`, whether to answer is `fence`, whether an address is taken is
//! `probe`. The loop only moves their inputs and outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrolb_crds::class::ClassFilter;
use ferrolb_crds::{IPAddressPool, L2Advertisement};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::announce::{Announcer, Command, Interface, Seen, Wanted};
use crate::election::{self, Advertisement, Announced, Ballot, NodeFacts};
use crate::fence::{self, Lan, Why};
use crate::heartbeat::{self, Message, State};
use crate::links::Links;
use crate::liveness::{self, Liveness};
use crate::membership::{self, OwnLease};
use crate::metrics::{FamilyLabels, Metrics, ReasonLabels};
use crate::packet::MacAddr;
use crate::peers::{Heartbeats, NodeLock, Received};
use crate::probe::{self, Action, FirstAnnouncement, Probe};
use crate::report::{self, Asked, Report};
use crate::roster::{self, Roster};
use crate::view::{self, NodeStatus, Problem};

/// An IP and the MAC a frame binds it to.
type Held = (IpAddr, MacAddr);

/// What SIGTERM means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShutdownMode {
    /// Leave when this node is cordoned or being deleted (a drain), else
    /// restart (a rollout).
    Auto,
    /// A new process takes over on this node: peers hold its IPs for the
    /// restart grace.
    Restart,
    /// Hand every IP over to the next node, then exit.
    Leave,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub filter: ClassFilter,
    pub liveness: liveness::Timings,
    pub fence: fence::Timings,
    /// Gratuitous refresh after the takeover burst.
    pub periodic: Duration,
    pub port: u16,
    /// Where peers send heartbeats; default: this Node's first InternalIP.
    pub address: Option<IpAddr>,
    pub shutdown_mode: ShutdownMode,
    pub probe: probe::Timings,
    /// Probe first announcements (off: announce at once).
    pub conflict_probe: bool,
}

pub struct Caches {
    pub services: Store<Service>,
    pub pools: Store<IPAddressPool>,
    pub ads: Store<L2Advertisement>,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub leases: Store<Lease>,
    pub secrets: Store<Secret>,
}

/// Everything derived from the caches (recomputed when they change) and
/// the links (when those change).
#[derive(Default)]
struct Derived {
    announced: Vec<Announced>,
    ads: Vec<Advertisement>,
    nodes: BTreeMap<String, NodeStatus>,
    ballots: BTreeMap<IpAddr, Ballot>,
    /// Where this node would answer each IP.
    interfaces: BTreeMap<IpAddr, Vec<Interface>>,
    /// The announcer each IP's Services' condition names.
    announcer: BTreeMap<IpAddr, Option<String>>,
    /// Every MAC of the interfaces this node may answer or heartbeat on.
    own_macs: BTreeSet<MacAddr>,
    /// Interface indexes whose link state matters (see `listening`).
    relevant: BTreeSet<u32>,
}

/// The speaker process.
pub struct Speaker {
    settings: Settings,
    caches: Caches,
    metrics: Metrics,
    reports: mpsc::Sender<Report>,
    own_lease: Arc<OwnLease>,
    heartbeats: Heartbeats,
    received: mpsc::Receiver<Received>,
    keys: watch::Sender<Vec<Vec<u8>>>,
    lan_rx: mpsc::Receiver<Seen>,
    announcer: Announcer,
    links: watch::Receiver<Links>,
    liveness: Liveness,
    roster: Roster,
    lan: Lan,
    incarnation: u64,
    seq: u64,
    state: State,
    listening_since: Instant,
    handover: Option<Instant>,
    lock: Option<NodeLock>,
    derived: Derived,
    last_good_ads: BTreeMap<String, Advertisement>,
    /// IP → the interfaces it is answered on now.
    answering: BTreeMap<IpAddr, Vec<u32>>,
    probes: BTreeMap<IpAddr, Probe>,
    probed: BTreeSet<IpAddr>,
    /// Conflicts found by probes: IP → the other host's MAC.
    conflicted: BTreeMap<IpAddr, MacAddr>,
    /// (IP, MAC) of non-speaker claims already reported, and when.
    reported_claims: BTreeMap<(IpAddr, MacAddr), Instant>,
    fallback: BTreeSet<String>,
    asked: Asked,
    logged: BTreeSet<String>,
    last_beat: Option<Instant>,
    lease_task: Option<JoinHandle<()>>,
    lease_done: Option<(Instant, SocketAddr, BTreeSet<MacAddr>)>,
    ticks: u64,
    /// An interface that matters is not running (see `watch_links`).
    link_down: bool,
    /// The IPs the last plan elected this node for (answered or not).
    elected: BTreeSet<IpAddr>,
}

/// The wiring `main` hands over.
pub struct Parts {
    pub settings: Settings,
    pub caches: Caches,
    pub metrics: Metrics,
    pub reports: mpsc::Sender<Report>,
    pub own_lease: OwnLease,
    pub heartbeats: Heartbeats,
    pub received: mpsc::Receiver<Received>,
    pub keys: watch::Sender<Vec<Vec<u8>>>,
    pub lan: (mpsc::Sender<Seen>, mpsc::Receiver<Seen>),
    pub links: watch::Receiver<Links>,
}

impl Speaker {
    pub fn new(p: Parts) -> Self {
        let now = Instant::now();
        let me = p.settings.node.clone();
        let announcer = Announcer::new(p.lan.0, p.settings.periodic, p.metrics.wire.clone());
        Self {
            liveness: Liveness::new(me.clone(), p.settings.liveness),
            roster: Roster::new(me),
            settings: p.settings,
            caches: p.caches,
            metrics: p.metrics,
            reports: p.reports,
            own_lease: Arc::new(p.own_lease),
            heartbeats: p.heartbeats,
            received: p.received,
            keys: p.keys,
            lan_rx: p.lan.1,
            announcer,
            links: p.links,
            lan: Lan::new(),
            incarnation: rand::random(),
            seq: 0,
            state: State::Running,
            listening_since: now,
            handover: None,
            lock: None,
            derived: Derived::default(),
            last_good_ads: BTreeMap::new(),
            answering: BTreeMap::new(),
            probes: BTreeMap::new(),
            probed: BTreeSet::new(),
            conflicted: BTreeMap::new(),
            reported_claims: BTreeMap::new(),
            fallback: BTreeSet::new(),
            asked: Asked::default(),
            logged: BTreeSet::new(),
            last_beat: None,
            lease_task: None,
            lease_done: None,
            ticks: 0,
            link_down: false,
            elected: BTreeSet::new(),
        }
    }

    fn me(&self) -> &str {
        &self.settings.node
    }

    /// Runs until `shutdown`, then restarts or leaves (module doc of
    /// `main.rs`) and returns.
    pub async fn run(mut self, changes: Arc<Notify>, shutdown: CancellationToken) {
        // Nothing is decided from half-filled caches (a missing Secret, no
        // Leases yet): wait until every watch has listed once.
        let c = &self.caches;
        let ready = async {
            let _ = tokio::join!(
                c.services.wait_until_ready(),
                c.pools.wait_until_ready(),
                c.ads.wait_until_ready(),
                c.nodes.wait_until_ready(),
                c.slices.wait_until_ready(),
                c.leases.wait_until_ready(),
                c.secrets.wait_until_ready(),
            );
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        self.listening_since = Instant::now();
        let tick = (self.settings.liveness.interval / 4).max(Duration::from_millis(10));
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = changes.notified() => { dirty = true; continue; }
                _ = timer.tick() => {}
            }
            let links_changed = self.links.has_changed().unwrap_or(false);
            if links_changed {
                self.links.borrow_and_update();
            }
            self.tick(dirty, links_changed);
            dirty = false;
        }
        self.shut_down().await;
    }

    /// One pass.
    fn tick(&mut self, dirty: bool, links_changed: bool) {
        let now = Instant::now();
        self.ticks += 1;
        if dirty {
            self.refresh_keys();
            let (records, bad) =
                membership::records(self.caches.leases.state().iter().map(|l| &**l));
            for (name, e) in bad {
                self.log_once(format!("Lease/{name}: {e}"));
            }
            self.roster.observe(records, now);
        }
        if dirty || links_changed {
            self.derive();
        }
        self.take_lock();
        while let Ok(r) = self.received.try_recv() {
            self.metrics.heartbeats_received.inc();
            self.liveness.heard(&r.message, r.from, r.at);
        }
        self.read_lan(now);
        self.follow_own_node(now);

        let known = self.roster.known(now);
        if self.lock.is_some() {
            self.watch_links(now);
        }
        let alive = if self.link_down {
            // Cut off: silence from everyone is no news about them. Judging
            // would declare every peer dead and count each as a false
            // failover once the link is back.
            BTreeSet::from([self.settings.node.clone()])
        } else {
            let mut alive = self.liveness.alive(now, &known);
            self.count_liveness(now, &known, &mut alive);
            alive
        };
        if self.lock.is_none() {
            // Passive: a process of this node that started earlier still
            // acts for it (module doc of `peers.rs`).
            self.metrics.active.set(0);
            self.listening_since = now;
            return;
        }
        self.metrics.active.set(1);

        let members = self.roster.members(now);
        let leaving = self.liveness.leaving();
        let last_heard = self.liveness.last_heard();
        let plan = fence::plan(&fence::Inputs {
            me: &self.settings.node,
            ballots: &self.derived.ballots,
            alive: &alive,
            members: &members,
            leaving: &leaving,
            last_heard: &last_heard,
            listening_since: self.listening_since,
            now,
            dead_after: self.settings.liveness.dead_after,
            lan: &self.lan,
            handover: self.handover,
            timings: self.settings.fence,
        });
        let heard = members
            .iter()
            .filter(|m| *m == self.me() || alive.contains(*m))
            .count();
        self.metrics
            .quorum
            .set(i64::from(members.len() < 3 || 2 * heard > members.len()));
        self.elected = plan.announce.keys().copied().collect();
        let target = self.gate(&plan, now);
        self.apply(&plan, target, now);
        self.beat(now, &known);
        self.renew_lease(now);
        if self.ticks.is_multiple_of(10) {
            self.conditions(&alive, &members);
        }
        self.lan.prune(now, &self.settings.fence);
    }

    fn log_once(&mut self, line: String) {
        if self.logged.insert(line.clone()) {
            tracing::warn!("{line}");
        }
    }

    /// Heartbeat keys from the Secret: entry `key` signs, every entry is
    /// accepted (rotation: add the new key under another name, roll, then
    /// move it to `key`).
    fn refresh_keys(&mut self) {
        let mut keys: Vec<(bool, String, Vec<u8>)> = Vec::new();
        for secret in self.caches.secrets.state() {
            for (name, value) in secret.data.iter().flatten() {
                match heartbeat::check_key(&value.0) {
                    Ok(()) => keys.push((name != "key", name.clone(), value.0.clone())),
                    Err(e) => {
                        let secret = secret.metadata.name.clone().unwrap_or_default();
                        self.log_once(format!("Secret/{secret}: data.{name}: {e}; not used"));
                    }
                }
            }
        }
        keys.sort();
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|(_, _, k)| k).collect();
        if keys.is_empty() {
            self.log_once(
                "no usable heartbeat key (Secret missing or empty): heartbeats are neither sent nor accepted; peers are judged by their Node's Ready condition".into(),
            );
        }
        self.keys.send_if_modified(|k| {
            let changed = *k != keys;
            *k = keys;
            changed
        });
    }

    fn derive(&mut self) {
        let pools = view::pools(self.caches.pools.state().iter().map(|p| &**p));
        let ads_state = self.caches.ads.state();
        let (ads, problems) = view::advertisements(
            ads_state.iter().map(|a| &**a),
            &pools,
            &mut self.last_good_ads,
        );
        let slices = self.caches.slices.state();
        let serving = view::serving_nodes(slices.iter().map(|s| &**s));
        let services = self.caches.services.state();
        let (announced, more) = view::announced(
            services.iter().map(|s| &**s),
            &self.settings.filter,
            &pools,
            &serving,
        );
        for p in problems.iter().chain(&more) {
            self.log_problem(p);
        }
        let nodes = view::nodes(self.caches.nodes.state().iter().map(|n| &**n));
        let facts: BTreeMap<String, NodeFacts> = nodes
            .iter()
            .map(|(n, s)| (n.clone(), s.facts.clone()))
            .collect();
        let ballots = election::ballots(&announced, &ads, &facts);

        let mut announcer = BTreeMap::new();
        for a in &announced {
            let named = a.services.iter().find_map(|s| {
                services
                    .iter()
                    .find(|svc| {
                        svc.metadata.namespace.as_deref() == Some(&s.namespace)
                            && svc.metadata.name.as_deref() == Some(&s.name)
                    })
                    .and_then(|svc| report::announcer_of(svc))
            });
            announcer.insert(a.ip, named);
        }

        let links = self.links.borrow().clone();
        let me = nodes.get(self.me()).cloned().unwrap_or_default();
        let local = links.addresses();
        let mut interfaces = BTreeMap::new();
        let mut relevant = BTreeSet::new();
        for a in &announced {
            let mine: Vec<&Advertisement> = ads
                .iter()
                .filter(|ad| ad.covers(a) && ad.selects_node(&me.facts.labels))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let names = election::interfaces(a.ip, &mine, &local, &me.internal_ips);
            let found: Vec<Interface> = names
                .iter()
                .filter_map(|name| {
                    let link = links.by_name(name)?;
                    Some(Interface {
                        index: link.index,
                        name: link.name.clone(),
                        mac: link.mac?,
                        link_local: link.link_local(),
                    })
                })
                .collect();
            if found.is_empty() && !names.is_empty() {
                self.log_once(format!(
                    "{}: interface(s) {} named for it do not exist here or have no MAC",
                    a.ip,
                    names.join(", ")
                ));
            }
            relevant.extend(found.iter().map(|i| i.index));
            interfaces.insert(a.ip, found);
        }
        if let Some(addr) = self.heartbeat_ip(&me) {
            relevant.extend(
                links
                    .by_index
                    .values()
                    .filter(|l| l.addrs.iter().any(|n| n.addr() == addr))
                    .map(|l| l.index),
            );
        }
        let own_macs = relevant
            .iter()
            .filter_map(|i| links.by_index.get(i).and_then(|l| l.mac))
            .collect();
        self.derived = Derived {
            announced,
            ads,
            nodes,
            ballots,
            interfaces,
            announcer,
            own_macs,
            relevant,
        };
    }

    fn log_problem(&mut self, p: &Problem) {
        self.log_once(p.to_string());
    }

    fn heartbeat_ip(&self, me: &NodeStatus) -> Option<IpAddr> {
        self.settings.address.or_else(|| {
            me.internal_ips
                .iter()
                .find(|a| a.is_ipv4())
                .or(me.internal_ips.first())
                .copied()
        })
    }

    fn take_lock(&mut self) {
        if self.lock.is_some() {
            return;
        }
        match NodeLock::try_take(self.settings.port) {
            Ok(Some(lock)) => {
                if self.ticks > 1 {
                    tracing::info!(
                        "the previous speaker process of this node exited: acting for the node now"
                    );
                }
                self.lock = Some(lock);
                self.listening_since = Instant::now();
            }
            Ok(None) => {
                if self.ticks == 1 {
                    tracing::info!(
                        "another speaker process acts for this node (a rollout): waiting for it to exit"
                    );
                }
            }
            Err(error) => {
                // Without the lock there is no telling; acting is what a
                // lone process must do.
                tracing::warn!(%error, "cannot take the node lock; acting without it");
                self.lock = None;
                if let Ok(Some(lock)) = NodeLock::try_take(self.settings.port) {
                    self.lock = Some(lock);
                }
            }
        }
    }

    /// LAN frames: claims for the fence, conflicts for the probes.
    fn read_lan(&mut self, now: Instant) {
        let speaker_macs: BTreeSet<MacAddr> = self
            .roster
            .speaker_macs()
            .into_iter()
            .chain(self.derived.own_macs.iter().copied())
            .collect();
        while let Ok(seen) = self.lan_rx.try_recv() {
            let (claim, conflicts): (Option<Held>, Vec<Held>) = match &seen {
                Seen::Arp { arp, .. } => (
                    fence::arp_claim(arp),
                    self.probes
                        .keys()
                        .filter_map(|ip| match ip {
                            IpAddr::V4(v4) => probe::arp_conflict(arp, *v4).map(|m| (*ip, m)),
                            IpAddr::V6(_) => None,
                        })
                        .collect(),
                ),
                Seen::Ndp { frame, .. } => (
                    fence::ndp_claim(frame),
                    self.probes
                        .keys()
                        .filter_map(|ip| match ip {
                            IpAddr::V6(v6) => probe::ndp_conflict(frame, *v6).map(|m| (*ip, m)),
                            IpAddr::V4(_) => None,
                        })
                        .collect(),
                ),
            };
            if let Some((ip, mac)) = claim
                && self.derived.ballots.contains_key(&ip)
                && !self.derived.own_macs.contains(&mac)
            {
                let claimant = self.roster.owner_of_mac(mac).map(str::to_string);
                self.lan.observe(ip, mac, claimant, now);
            }
            for (ip, mac) in conflicts {
                if let Some(p) = self.probes.get_mut(&ip) {
                    p.observed(mac, &speaker_macs, now);
                }
            }
        }
    }

    /// Cordoned (a drain) in `auto` mode: leave, handing IPs over, until
    /// uncordoned.
    fn follow_own_node(&mut self, now: Instant) {
        if self.settings.shutdown_mode != ShutdownMode::Auto || self.state == State::Restarting {
            return;
        }
        let cordoned = self
            .derived
            .nodes
            .get(self.me())
            .is_some_and(|n| n.unschedulable);
        match (cordoned, self.handover) {
            (true, None) => {
                tracing::info!("this node is cordoned: handing its IPs over");
                self.state = State::Leaving;
                self.handover = Some(now);
                self.last_beat = None;
            }
            (false, Some(_)) if self.state == State::Leaving => {
                tracing::info!("this node is schedulable again: announcing as before");
                self.state = State::Running;
                self.handover = None;
                self.last_beat = None;
            }
            _ => {}
        }
    }

    /// Liveness bookkeeping: the Node-readiness fallback for peers never
    /// heard, deaths and false failovers.
    fn count_liveness(
        &mut self,
        now: Instant,
        known: &BTreeMap<String, SocketAddr>,
        alive: &mut BTreeSet<String>,
    ) {
        let never = self.liveness.never_heard(known);
        let ready: BTreeMap<String, bool> = self
            .derived
            .nodes
            .iter()
            .map(|(n, s)| (n.clone(), s.ready))
            .collect();
        let fallback = liveness::fallback(known, &never, &ready);
        // Just started (or resumed): give peers a few heartbeats' time
        // before saying they are never heard. They count as alive by
        // their Node meanwhile, which is the safe side.
        let settled = now.saturating_duration_since(self.listening_since)
            >= (self.settings.liveness.dead_after * 4).max(Duration::from_secs(2));
        if !settled {
            alive.extend(fallback);
            return;
        }
        for node in fallback.difference(&self.fallback) {
            tracing::warn!(peer = %node, "no heartbeat ever heard from this speaker (port blocked, wrong key?): judging it by its Node's Ready condition");
            self.send(Report::node_event(
                node,
                true,
                "HeartbeatsNotHeard",
                format!(
                    "speaker on {} hears no heartbeat from {node} (UDP port {} blocked, or a different key?): judging {node} by its Node's Ready condition, so failover takes the Node's timeout instead of a second",
                    self.settings.node, self.settings.port
                ),
            ));
        }
        self.fallback = fallback.clone();
        alive.extend(fallback);
        self.metrics.peers_fallback.set(self.fallback.len() as i64);
        self.metrics.peers_known.set(known.len() as i64);
        self.metrics.peers_alive.set(alive.len() as i64);
        for death in self.liveness.take_deaths() {
            self.metrics.failovers.inc();
            tracing::info!(peer = %death.node, cause = ?death.cause, "peer is dead in this speaker's view");
        }
        let falsely = self.liveness.take_false_failovers();
        if falsely > 0 {
            self.metrics.false_failovers.inc_by(falsely);
            tracing::warn!(
                count = falsely,
                "a peer declared dead had kept sending heartbeats (false failover)"
            );
        }
    }

    /// The listening rule's clock: restarts while an interface that
    /// matters is not running, so a node whose link was cut listens for a
    /// full dead interval after it comes back before claiming anything.
    fn watch_links(&mut self, now: Instant) {
        let links = self.links.borrow();
        let down = self
            .derived
            .relevant
            .iter()
            .any(|i| links.by_index.get(i).is_none_or(|l| !l.running));
        drop(links);
        if down {
            self.listening_since = now;
        }
        if down != self.link_down {
            if down {
                tracing::warn!(
                    "a link this node announces or heartbeats on is down: silent until it has been back for a dead interval"
                );
            } else {
                tracing::info!("links back up: listening before claiming anything");
            }
        }
        self.link_down = down;
    }

    /// The IPs to answer for: the plan's, minus first announcements still
    /// probing or in conflict, minus IPs without an interface here; while
    /// leaving, never one not answered already.
    fn gate(&mut self, plan: &fence::Plan, now: Instant) -> BTreeSet<IpAddr> {
        self.probes.retain(|ip, _| plan.announce.contains_key(ip));
        self.probed.retain(|ip| plan.announce.contains_key(ip));
        self.conflicted
            .retain(|ip, _| plan.announce.contains_key(ip));
        let mut target = BTreeSet::new();
        for ip in plan.announce.keys() {
            let has_interface = self
                .derived
                .interfaces
                .get(ip)
                .is_some_and(|v| !v.is_empty());
            if !has_interface {
                continue;
            }
            if self.answering.contains_key(ip) {
                target.insert(*ip);
                continue;
            }
            if self.handover.is_some() {
                continue;
            }
            let recorded = self.derived.announcer.get(ip).cloned().flatten();
            let first = FirstAnnouncement::check(*ip, recorded.as_deref());
            match first {
                Some(first) if self.settings.conflict_probe && !self.probed.contains(ip) => {
                    let timings = self.settings.probe;
                    self.probes.entry(*ip).or_insert_with(|| {
                        Probe::with_timings(first, now, rand::random(), timings)
                    });
                }
                _ => {
                    target.insert(*ip);
                }
            }
        }
        self.drive_probes(now, &mut target);
        target
    }

    fn drive_probes(&mut self, now: Instant, target: &mut BTreeSet<IpAddr>) {
        let ips: Vec<IpAddr> = self.probes.keys().copied().collect();
        for ip in ips {
            // A few steps at most: SendProbe is followed by a Wait.
            for _ in 0..4 {
                let Some(p) = self.probes.get_mut(&ip) else {
                    break;
                };
                match p.next(now) {
                    Action::SendProbe => {
                        for i in self.derived.interfaces.get(&ip).into_iter().flatten() {
                            self.announcer.command(i.index, Command::Probe(ip));
                        }
                    }
                    Action::Wait(_) => break,
                    Action::Announce => {
                        self.probes.remove(&ip);
                        self.probed.insert(ip);
                        self.conflicted.remove(&ip);
                        target.insert(ip);
                        break;
                    }
                    Action::Conflict { mac } => {
                        self.metrics.conflicts.inc();
                        self.conflicted.insert(ip, mac);
                        let again = self.settings.probe.backoff(p.conflicts());
                        tracing::warn!(%ip, %mac, "another host holds this IP: not announcing it");
                        let note = format!(
                            "{ip} is already in use on the LAN by {mac}, which is not a FerroLB speaker: not announced; probing again in {}",
                            humantime::format_duration(again)
                        );
                        self.event_for_ip(ip, true, "IPConflict", &note);
                        break;
                    }
                }
            }
        }
    }

    /// Moves the interface tasks to `target` and reports what changed.
    fn apply(&mut self, plan: &fence::Plan, target: BTreeSet<IpAddr>, now: Instant) {
        let previous: BTreeSet<IpAddr> = self.answering.keys().copied().collect();
        let probing: BTreeSet<IpAddr> = self.probes.keys().copied().collect();
        let watch: BTreeSet<IpAddr> = self.derived.ballots.keys().copied().collect();
        // Every interface this node may answer an IP on keeps a task, even
        // one answering nothing: the LAN watch must go on hearing a silent
        // owner's claims while we defer to it, or we would forget them after
        // claim_memory, answer again and be silenced by its next periodic
        // announcement, two MACs for a while every few seconds.
        let mut want: BTreeMap<u32, (Interface, Wanted)> = self
            .derived
            .interfaces
            .values()
            .flatten()
            .map(|i| {
                let wanted = Wanted {
                    ips: BTreeSet::new(),
                    watch: watch.clone(),
                };
                (i.index, (i.clone(), wanted))
            })
            .collect();
        let mut answering = BTreeMap::new();
        for ip in target.iter().chain(&probing) {
            for i in self.derived.interfaces.get(ip).into_iter().flatten() {
                let entry = want.entry(i.index).or_insert_with(|| {
                    (
                        i.clone(),
                        Wanted {
                            ips: BTreeSet::new(),
                            watch: watch.clone(),
                        },
                    )
                });
                if target.contains(ip) {
                    entry.1.ips.insert(*ip);
                    answering.entry(*ip).or_insert_with(Vec::new).push(i.index);
                }
            }
        }
        self.announcer.set(want);
        let started: Vec<IpAddr> = target.difference(&previous).copied().collect();
        let stopped: Vec<IpAddr> = previous.difference(&target).copied().collect();
        for ip in &started {
            for index in answering.get(ip).into_iter().flatten() {
                self.announcer.command(*index, Command::Burst(*ip));
            }
            self.lan.defended(*ip, now);
            self.metrics.takeovers.inc();
        }
        for ip in &plan.reassert {
            for index in answering.get(ip).into_iter().flatten() {
                self.announcer.command(*index, Command::Reassert(*ip));
            }
            self.lan.defended(*ip, now);
            self.metrics.reasserts.inc();
            tracing::info!(%ip, "another host claimed an IP this node announces: defending it");
        }
        for (ip, mac) in &plan.conflicts {
            let fresh = self
                .reported_claims
                .get(&(*ip, *mac))
                .is_none_or(|at| now.duration_since(*at) > Duration::from_secs(60));
            if fresh {
                self.reported_claims.insert((*ip, *mac), now);
                self.metrics.conflicts.inc();
                let note = format!(
                    "{mac}, which is not a FerroLB speaker, claims {ip} on the LAN while {} announces it; defending at most every {}",
                    self.settings.node,
                    humantime::format_duration(self.settings.fence.defend_interval)
                );
                self.event_for_ip(*ip, true, "IPConflict", &note);
            }
        }
        self.reported_claims
            .retain(|_, at| now.duration_since(*at) < Duration::from_secs(120));
        let names = |ip: &IpAddr, map: &BTreeMap<IpAddr, Vec<Interface>>| {
            map.get(ip)
                .map(|v| {
                    v.iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        for ip in &started {
            let from = self
                .derived
                .announcer
                .get(ip)
                .cloned()
                .flatten()
                .filter(|n| n != self.me());
            let why = match &from {
                Some(old) => format!(" (took over from {old})"),
                None => String::new(),
            };
            let note = format!(
                "{} announces {ip} on {}{why}",
                self.settings.node,
                names(ip, &self.derived.interfaces)
            );
            tracing::info!(%ip, interfaces = %names(ip, &self.derived.interfaces), "announcing");
            self.event_for_ip(*ip, false, "Announcing", &note);
        }
        for ip in &stopped {
            self.metrics.releases.inc();
            let why = match plan.silent.get(ip) {
                Some(w) => describe(w),
                None if self.derived.ballots.contains_key(ip) => {
                    "no interface to answer on".to_string()
                }
                None => "the IP is no longer assigned".to_string(),
            };
            tracing::info!(%ip, reason = %why, "stopped announcing");
            if self.derived.ballots.contains_key(ip) {
                let note = format!("{} stopped announcing {ip}: {why}", self.settings.node);
                self.event_for_ip(*ip, false, "StoppedAnnouncing", &note);
            }
        }
        self.answering = answering;
        let mut v4 = 0;
        let mut v6 = 0;
        for ip in self.answering.keys() {
            if ip.is_ipv4() {
                v4 += 1;
            } else {
                v6 += 1;
            }
        }
        for (family, n) in [("IPv4", v4), ("IPv6", v6)] {
            self.metrics
                .announced
                .get_or_create(&FamilyLabels {
                    family: family.into(),
                })
                .set(n);
        }
    }

    fn event_for_ip(&self, ip: IpAddr, warning: bool, reason: &'static str, note: &str) {
        let Some(a) = self.derived.announced.iter().find(|a| a.ip == ip) else {
            return;
        };
        for s in &a.services {
            self.send(Report::service_event(
                &s.namespace,
                &s.name,
                warning,
                reason,
                note.to_string(),
            ));
        }
    }

    fn send(&self, r: Report) {
        if self.reports.try_send(r).is_err() {
            tracing::debug!("report queue full: dropping one");
        }
    }

    /// Sends a heartbeat to every known peer once per interval.
    fn beat(&mut self, now: Instant, known: &BTreeMap<String, SocketAddr>) {
        let due = self
            .last_beat
            .is_none_or(|t| now.duration_since(t) >= self.settings.liveness.interval);
        if !due {
            return;
        }
        self.last_beat = Some(now);
        self.send_heartbeat(now, known);
    }

    fn send_heartbeat(&mut self, now: Instant, known: &BTreeMap<String, SocketAddr>) {
        // Nothing gets through a dead link. Not counting the heartbeats we
        // cannot send keeps our sequence contiguous, so peers that declared
        // us dead meanwhile do not count a false failover: we were cut off,
        // they were right.
        if self.link_down {
            return;
        }
        let key = self.keys.borrow().first().cloned();
        let Some(key) = key else { return };
        self.seq += 1;
        let msg = Message {
            sender: self.settings.node.clone(),
            incarnation: self.incarnation,
            seq: self.seq,
            state: self.state,
            heard: self.liveness.report(now),
        };
        let bytes = match heartbeat::encode(&msg, &key) {
            Ok(b) => b,
            Err(e) => {
                self.log_once(format!("cannot encode a heartbeat: {e}"));
                return;
            }
        };
        let peers: Vec<SocketAddr> = known
            .iter()
            .filter(|(n, _)| *n != self.me())
            .map(|(_, a)| *a)
            .collect();
        let failed = self.heartbeats.send_all(&bytes, peers.iter().copied());
        self.metrics
            .heartbeats_sent
            .inc_by((peers.len() - failed) as u64);
    }

    /// Creates or renews our Lease every `RENEW_EVERY`, and at once when our
    /// address or MACs change. The write runs in the background.
    fn renew_lease(&mut self, now: Instant) {
        if self.lease_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let me = self
            .derived
            .nodes
            .get(self.me())
            .cloned()
            .unwrap_or_default();
        let Some(ip) = self.heartbeat_ip(&me) else {
            return;
        };
        let address = SocketAddr::new(ip, self.settings.port);
        let macs = self.derived.own_macs.clone();
        let due = match &self.lease_done {
            None => true,
            Some((at, a, m)) => {
                *a != address || *m != macs || now.duration_since(*at) >= roster::RENEW_EVERY
            }
        };
        if !due {
            return;
        }
        let uid = self
            .caches
            .nodes
            .state()
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.me()))
            .and_then(|n| n.metadata.uid.clone());
        let lease = self.own_lease.clone();
        self.lease_done = Some((now, address, macs.clone()));
        self.lease_task = Some(tokio::spawn(async move {
            if let Err(error) = lease.renew(address, &macs, uid.as_deref()).await {
                tracing::warn!(lease = %lease.name(), %error, "cannot renew this speaker's Lease");
            }
        }));
    }

    /// The `ferrolb.io/Announced` condition of the Services this speaker is
    /// responsible for: those whose first IP it announces (True, naming it),
    /// those whose IP a probe found taken (False, IPConflict), and, from
    /// the lowest-named live speaker, those nobody can announce (False).
    fn conditions(&mut self, alive: &BTreeSet<String>, members: &BTreeSet<String>) {
        let reporter = members
            .iter()
            .find(|m| *m == self.me() || alive.contains(*m))
            .is_some_and(|m| m == self.me());
        let services = self.caches.services.state();
        let mut wanted: BTreeMap<(String, String), report::Wanted> = BTreeMap::new();
        for a in &self.derived.announced {
            for s in &a.services {
                let key = (s.namespace.clone(), s.name.clone());
                if a.ip == s.first_ip && self.answering.contains_key(&a.ip) {
                    // Every IP of this Service we answer, and where.
                    let mut ips = Vec::new();
                    let mut ifaces = BTreeSet::new();
                    for b in &self.derived.announced {
                        if b.services
                            .iter()
                            .any(|t| t.namespace == s.namespace && t.name == s.name)
                            && self.answering.contains_key(&b.ip)
                        {
                            ips.push(b.ip.to_string());
                            for i in self.derived.interfaces.get(&b.ip).into_iter().flatten() {
                                ifaces.insert(i.name.clone());
                            }
                        }
                    }
                    wanted.insert(
                        key,
                        report::Wanted {
                            status: true,
                            reason: "Announcing",
                            message: report::announcing_message(
                                self.me(),
                                &ips,
                                &ifaces.into_iter().collect::<Vec<_>>(),
                            ),
                        },
                    );
                } else if a.ip == s.first_ip
                    && self.elected.contains(&a.ip)
                    && self
                        .derived
                        .interfaces
                        .get(&a.ip)
                        .is_none_or(|v| v.is_empty())
                {
                    wanted.insert(
                        key,
                        report::Wanted {
                            status: false,
                            reason: "NoInterface",
                            message: format!(
                                "{} is elected to announce {} but has no interface for it (the L2Advertisement names one this node lacks, or none is on-link)",
                                self.me(),
                                a.ip
                            ),
                        },
                    );
                } else if let Some(mac) = self.conflicted.get(&a.ip) {
                    wanted.entry(key).or_insert_with(|| report::Wanted {
                        status: false,
                        reason: "IPConflict",
                        message: format!(
                            "{} is in use on the LAN by {mac}, which is not a FerroLB speaker: not announced",
                            a.ip
                        ),
                    });
                } else if reporter && a.ip == s.first_ip {
                    let Some(ballot) = self.derived.ballots.get(&a.ip) else {
                        continue;
                    };
                    let message = if ballot.ranking.is_empty() {
                        let facts: BTreeMap<String, NodeFacts> = self
                            .derived
                            .nodes
                            .iter()
                            .map(|(n, st)| (n.clone(), st.facts.clone()))
                            .collect();
                        format!(
                            "no node may announce {}: {}",
                            a.ip,
                            election::why_no_candidate(a, &self.derived.ads, &facts)
                        )
                    } else if !ballot.ranking.iter().any(|n| alive.contains(n)) {
                        format!(
                            "no speaker that may announce {} is alive (candidates: {})",
                            a.ip,
                            ballot.ranking.join(", ")
                        )
                    } else {
                        continue;
                    };
                    wanted.insert(
                        key,
                        report::Wanted {
                            status: false,
                            reason: "NoEligibleNode",
                            message,
                        },
                    );
                }
            }
        }
        for ((namespace, name), w) in wanted {
            let svc = services.iter().find(|svc| {
                svc.metadata.namespace.as_deref() == Some(&namespace)
                    && svc.metadata.name.as_deref() == Some(&name)
            });
            let Some(svc) = svc else { continue };
            let current = report::condition_of(svc);
            if self
                .asked
                .should_write((namespace.clone(), name.clone()), &w, current)
            {
                self.send(Report::Condition {
                    namespace,
                    name,
                    generation: svc.metadata.generation,
                    wanted: w,
                });
            }
        }
    }

    /// SIGTERM: restart (peers hold our IPs for the grace) or leave (hand
    /// them over first).
    async fn shut_down(&mut self) {
        let cordoned = self
            .derived
            .nodes
            .get(self.me())
            .is_none_or(|n| n.unschedulable);
        let leave = match self.settings.shutdown_mode {
            ShutdownMode::Leave => true,
            ShutdownMode::Restart => false,
            ShutdownMode::Auto => cordoned,
        };
        if self.lock.is_none() {
            // Passive: nothing announced, nothing to hand over.
            return;
        }
        let known = self.roster.known(Instant::now());
        if leave {
            tracing::info!("leaving: handing this node's IPs over");
            self.state = State::Leaving;
            self.handover.get_or_insert_with(Instant::now);
            let bound = self.settings.fence.handover_max + Duration::from_millis(500);
            let started = Instant::now();
            let tick = (self.settings.liveness.interval / 4).max(Duration::from_millis(10));
            self.last_beat = None;
            while started.elapsed() < bound && !self.answering.is_empty() {
                self.tick(false, false);
                tokio::time::sleep(tick).await;
            }
            self.announcer.stop();
            match tokio::time::timeout(Duration::from_secs(3), self.own_lease.delete()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "cannot delete this speaker's Lease"),
                Err(_) => tracing::warn!("deleting this speaker's Lease timed out"),
            }
        } else {
            tracing::info!("restarting: peers keep this node's IPs for the restart grace");
            self.state = State::Restarting;
            // Three, an interval apart in time: one lost datagram does
            // not turn a restart into a failover.
            for _ in 0..3 {
                self.send_heartbeat(Instant::now(), &known);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            self.announcer.stop();
        }
    }
}

/// A fence reason in words, for the "stopped announcing" Event.
fn describe(why: &Why) -> String {
    match why {
        Why::Elected | Why::HandingOver => "still elected".into(),
        Why::NotCandidate => "this node may no longer announce it".into(),
        Why::Outranked { by } => format!("{by} is alive and ranks first"),
        Why::Listening { .. } => "this node's link came back; listening before claiming".into(),
        Why::NoQuorum { heard, members } => {
            format!("this node hears only {heard} of {members} speakers (no quorum)")
        }
        Why::ClaimedBy { node } => {
            format!("{node} claims it on the LAN although its heartbeats do not reach this node")
        }
        Why::HandedOver { to: Some(to) } => format!("handed over to {to} (this node is leaving)"),
        Why::HandedOver { to: None } => "this node is leaving".into(),
    }
}

impl Metrics {
    /// Counts a refused heartbeat datagram.
    pub fn rejected(&self, reason: &str) {
        self.heartbeats_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}
