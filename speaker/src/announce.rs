//! The speaker's wire: one task per interface that answers ARP requests and
//! neighbour solicitations for the IPs this node announces there, sends the
//! takeover burst and the periodic gratuitous frames, and reports what it
//! sees others claim (for the LAN watch and the conflict probe).
//!
//! The tasks only do what they are told: which IPs to answer for on which
//! interface comes from the fence plan (`fence.rs`); this module holds no
//! policy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use ferrolb_netraw::{ETHERTYPE_ARP, ETHERTYPE_IPV6, PacketSocket, SolicitedNodeGroups, filters};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::packet::{Arp, ArpFrame, ArpOp, MacAddr, NdpFrame, NdpMessage};

/// When the takeover burst's rounds go out, after the first at once: the
/// spacing lets a client that missed one frame catch the next, and the last
/// lands after Linux's one-second neighbour lock time.
const BURST: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(1200),
];

/// An interface the speaker may answer on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mac: MacAddr,
    /// The source of our neighbour advertisements.
    pub link_local: Option<Ipv6Addr>,
}

/// What an interface task keeps doing until told otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// IPs to answer for (and to send the periodic gratuitous frames of).
    pub ips: BTreeSet<IpAddr>,
    /// Every LB IP some speaker may announce or is probing: frames that
    /// mention one of these (as sender or target) are reported.
    pub watch: BTreeSet<IpAddr>,
}

/// A one-off an interface task performs once, in order. Kept apart from
/// [`Wanted`] so a burst is never lost to a later state update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Takeover: the burst of gratuitous frames (three rounds over 1.2 s).
    Burst(IpAddr),
    /// Defend once: one gratuitous round now.
    Reassert(IpAddr),
    /// One RFC 5227 probe (ARP from 0.0.0.0, or a DAD solicitation).
    Probe(IpAddr),
}

/// A frame seen on the LAN that mentions a watched IP, for the fence's LAN
/// watch and the conflict probe (which decide what it means).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Arp { arp: Arp, interface: String },
    Ndp { frame: NdpFrame, interface: String },
}

/// Counters the tasks update; registered as metrics by `metrics.rs`
/// (clones share their values).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub arp_requests: Counter,
    pub ndp_solicitations: Counter,
    pub replies: Counter,
    pub gratuitous: Counter,
    pub probes: Counter,
    pub malformed: Counter,
    /// Reports dropped because the main loop fell behind.
    pub dropped_reports: Counter,
}

fn bump(c: &Counter) {
    c.inc();
}

struct Task {
    interface: Interface,
    tx: watch::Sender<Wanted>,
    commands: mpsc::UnboundedSender<Command>,
    handle: JoinHandle<()>,
}

/// The interface tasks.
pub struct Announcer {
    tasks: BTreeMap<u32, Task>,
    seen: mpsc::Sender<Seen>,
    periodic: Duration,
    counters: Counters,
}

impl Announcer {
    /// `periodic`: the gap between gratuitous frames after the burst.
    pub fn new(seen: mpsc::Sender<Seen>, periodic: Duration, counters: Counters) -> Self {
        Self {
            tasks: BTreeMap::new(),
            seen,
            periodic,
            counters,
        }
    }

    /// Brings the tasks in line with `want` (per interface index);
    /// interfaces missing from it stop answering at once. A task whose
    /// interface changed (renamed, new MAC) or that ended is started anew.
    pub fn set(&mut self, want: BTreeMap<u32, (Interface, Wanted)>) {
        let gone: Vec<u32> = self
            .tasks
            .keys()
            .filter(|i| !want.contains_key(i))
            .copied()
            .collect();
        for index in gone {
            if let Some(t) = self.tasks.remove(&index) {
                t.handle.abort();
            }
        }
        for (index, (interface, wanted)) in want {
            let replace = self
                .tasks
                .get(&index)
                .is_some_and(|t| t.interface != interface || t.handle.is_finished());
            if replace && let Some(t) = self.tasks.remove(&index) {
                t.handle.abort();
            }
            match self.tasks.get(&index) {
                Some(t) => {
                    t.tx.send_if_modified(|w| {
                        let changed = *w != wanted;
                        *w = wanted;
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(wanted);
                    let (commands, queue) = mpsc::unbounded_channel();
                    let handle = tokio::spawn(run(
                        interface.clone(),
                        rx,
                        queue,
                        self.seen.clone(),
                        self.periodic,
                        self.counters.clone(),
                    ));
                    self.tasks.insert(
                        index,
                        Task {
                            interface,
                            tx,
                            commands,
                            handle,
                        },
                    );
                }
            }
        }
    }

    /// Queues a one-off on an interface; false if no task runs there.
    pub fn command(&self, index: u32, command: Command) -> bool {
        self.tasks
            .get(&index)
            .is_some_and(|t| t.commands.send(command).is_ok())
    }

    /// Stops answering everywhere (on shutdown, after the handover).
    pub fn stop(&mut self) {
        for (_, t) in std::mem::take(&mut self.tasks) {
            t.handle.abort();
        }
    }
}

/// One interface: its two packet sockets and the gratuitous schedule.
async fn run(
    interface: Interface,
    mut rx: watch::Receiver<Wanted>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    seen: mpsc::Sender<Seen>,
    periodic: Duration,
    counters: Counters,
) {
    let arp = match PacketSocket::open(interface.index, ETHERTYPE_ARP, &filters::arp()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(interface = %interface.name, %error, "cannot open the ARP socket");
            return;
        }
    };
    let ndp = match PacketSocket::open(
        interface.index,
        ETHERTYPE_IPV6,
        &filters::neighbor_discovery(),
    ) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(interface = %interface.name, %error, "no NDP socket: IPv6 addresses are not answered here");
            None
        }
    };
    let io = Io {
        interface: &interface,
        arp: &arp,
        ndp: ndp.as_ref(),
        counters: &counters,
    };
    let mut groups = SolicitedNodeGroups::new();
    let mut wanted = Wanted::default();
    // Next gratuitous frame per IP, and the burst round due then (0: the
    // periodic refresh).
    let mut schedule: BTreeMap<IpAddr, (Instant, usize)> = BTreeMap::new();
    let mut arp_buf = vec![0u8; 1600];
    let mut ndp_buf = vec![0u8; 1600];
    let mut changed = true;
    loop {
        if changed {
            changed = false;
            let next = rx.borrow_and_update().clone();
            apply_ips(
                &interface,
                &mut groups,
                &mut schedule,
                &wanted,
                &next,
                periodic,
            );
            wanted = next;
        }
        let due = schedule.values().map(|(t, _)| *t).min();
        tokio::select! {
            // State first: a command may be about an IP just added.
            biased;
            r = rx.changed() => {
                if r.is_err() {
                    break;
                }
                changed = true;
            }
            c = commands.recv() => {
                let Some(c) = c else { break };
                if rx.has_changed().unwrap_or(false) {
                    // Apply the newer state before the command, so a burst
                    // for an IP just added is not refused below.
                    let next = rx.borrow_and_update().clone();
                    apply_ips(&interface, &mut groups, &mut schedule, &wanted, &next, periodic);
                    wanted = next;
                }
                match c {
                    Command::Burst(ip) if wanted.ips.contains(&ip) => {
                        io.gratuitous(ip).await;
                        schedule.insert(ip, (Instant::now() + (BURST[1] - BURST[0]), 1));
                    }
                    Command::Reassert(ip) if wanted.ips.contains(&ip) => io.gratuitous(ip).await,
                    Command::Probe(ip) => io.probe(ip).await,
                    _ => {}
                }
            }
            n = arp.recv(&mut arp_buf) => match n {
                Ok(n) => io.on_arp(&arp_buf[..n], &wanted, &seen).await,
                Err(error) => {
                    tracing::warn!(interface = %interface.name, %error, "ARP socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            n = async {
                match &ndp {
                    Some(s) => s.recv(&mut ndp_buf).await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(n) => io.on_ndp(&ndp_buf[..n], &wanted, &seen).await,
                Err(error) => {
                    tracing::warn!(interface = %interface.name, %error, "NDP socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = async {
                match due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                let ready: Vec<IpAddr> = schedule
                    .iter()
                    .filter(|(_, (t, _))| *t <= now)
                    .map(|(ip, _)| *ip)
                    .collect();
                for ip in ready {
                    io.gratuitous(ip).await;
                    if let Some((t, round)) = schedule.get_mut(&ip) {
                        // The rest of the burst, then the periodic refresh.
                        if *round > 0 && *round + 1 < BURST.len() {
                            *t = now + (BURST[*round + 1] - BURST[*round]);
                            *round += 1;
                        } else {
                            *t = now + periodic;
                            *round = 0;
                        }
                    }
                }
            }
        }
    }
    for (index, ip) in groups.groups().collect::<Vec<_>>() {
        let _ = groups.leave(index, ip);
    }
}

/// Joins and leaves solicited-node groups and (un)schedules the periodic
/// refresh for the IPs that differ between `old` and `new`.
fn apply_ips(
    interface: &Interface,
    groups: &mut SolicitedNodeGroups,
    schedule: &mut BTreeMap<IpAddr, (Instant, usize)>,
    old: &Wanted,
    new: &Wanted,
    periodic: Duration,
) {
    let now = Instant::now();
    for ip in new.ips.difference(&old.ips) {
        if let IpAddr::V6(v6) = ip
            && let Err(error) = groups.join(interface.index, *v6)
        {
            tracing::warn!(interface = %interface.name, %ip, %error, "cannot join the solicited-node group");
        }
        schedule.insert(*ip, (now + periodic, 0));
    }
    for ip in old.ips.difference(&new.ips) {
        if let IpAddr::V6(v6) = ip {
            let _ = groups.leave(interface.index, *v6);
        }
        schedule.remove(ip);
    }
}

/// One interface's sockets, for the frame handlers.
struct Io<'a> {
    interface: &'a Interface,
    arp: &'a PacketSocket,
    ndp: Option<&'a PacketSocket>,
    counters: &'a Counters,
}

impl Io<'_> {
    async fn send(&self, sock: &PacketSocket, frame: &[u8], what: &str, ip: IpAddr) -> bool {
        match sock.send(frame).await {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(interface = %self.interface.name, %ip, %error, "{what} not sent");
                false
            }
        }
    }

    /// One gratuitous round: for IPv4 both forms (some clients update only
    /// from requests, others only from replies), for IPv6 an unsolicited NA.
    async fn gratuitous(&self, ip: IpAddr) {
        let mac = self.interface.mac;
        match ip {
            IpAddr::V4(v4) => {
                for frame in [
                    ArpFrame::gratuitous_request(v4, mac),
                    ArpFrame::gratuitous_reply(v4, mac),
                ] {
                    if self
                        .send(self.arp, &frame.to_bytes(), "gratuitous ARP", ip)
                        .await
                    {
                        bump(&self.counters.gratuitous);
                    }
                }
            }
            IpAddr::V6(v6) => {
                let (Some(sock), Some(source)) = (self.ndp, self.interface.link_local) else {
                    return;
                };
                let frame = NdpFrame::unsolicited_advertisement(v6, mac, source);
                if self
                    .send(sock, &frame.to_bytes(), "unsolicited NA", ip)
                    .await
                {
                    bump(&self.counters.gratuitous);
                }
            }
        }
    }

    async fn probe(&self, ip: IpAddr) {
        let mac = self.interface.mac;
        let sent = match ip {
            IpAddr::V4(v4) => {
                let frame = ArpFrame::probe(v4, mac);
                self.send(self.arp, &frame.to_bytes(), "ARP probe", ip)
                    .await
            }
            IpAddr::V6(v6) => match self.ndp {
                Some(sock) => {
                    let frame = NdpFrame::dad_solicitation(v6, mac);
                    self.send(sock, &frame.to_bytes(), "DAD solicitation", ip)
                        .await
                }
                None => false,
            },
        };
        if sent {
            bump(&self.counters.probes);
        }
    }

    fn report(&self, seen: &mpsc::Sender<Seen>, what: Seen) {
        if seen.try_send(what).is_err() {
            bump(&self.counters.dropped_reports);
        }
    }

    async fn on_arp(&self, frame: &[u8], wanted: &Wanted, seen: &mpsc::Sender<Seen>) {
        let Ok(f) = ArpFrame::parse(frame) else {
            bump(&self.counters.malformed);
            return;
        };
        let a = f.arp;
        let mac = self.interface.mac;
        // Never react to ourselves (the socket filter already drops what
        // this host sends; a frame with our source MAC from elsewhere is a
        // loop).
        if a.sender_mac == mac || f.ethernet.source == mac {
            return;
        }
        let (sender, target) = (IpAddr::V4(a.sender_ip), IpAddr::V4(a.target_ip));
        let mentions = |ip: &IpAddr| wanted.watch.contains(ip) || wanted.ips.contains(ip);
        if mentions(&sender) || mentions(&target) {
            self.report(
                seen,
                Seen::Arp {
                    arp: a,
                    interface: self.interface.name.clone(),
                },
            );
        }
        if a.op != ArpOp::Request || !wanted.ips.contains(&target) {
            return;
        }
        bump(&self.counters.arp_requests);
        // A gratuitous request (another host announcing the address) is
        // no question; the fence hears of it through the report above.
        if a.is_gratuitous() {
            return;
        }
        if let Some(reply) = f.reply(mac)
            && self
                .send(self.arp, &reply.to_bytes(), "ARP reply", target)
                .await
        {
            bump(&self.counters.replies);
        }
    }

    async fn on_ndp(&self, frame: &[u8], wanted: &Wanted, seen: &mpsc::Sender<Seen>) {
        let Ok(f) = NdpFrame::parse(frame) else {
            bump(&self.counters.malformed);
            return;
        };
        let mac = self.interface.mac;
        if f.ethernet.source == mac {
            return;
        }
        let ip = match f.message {
            NdpMessage::Advertisement(na) => IpAddr::V6(na.target),
            NdpMessage::Solicitation(ns) => IpAddr::V6(ns.target),
        };
        if wanted.watch.contains(&ip) || wanted.ips.contains(&ip) {
            self.report(
                seen,
                Seen::Ndp {
                    frame: f,
                    interface: self.interface.name.clone(),
                },
            );
        }
        let NdpMessage::Solicitation(_) = f.message else {
            return;
        };
        if !wanted.ips.contains(&ip) {
            return;
        }
        bump(&self.counters.ndp_solicitations);
        let (Some(sock), Some(source)) = (self.ndp, self.interface.link_local) else {
            return;
        };
        // Unicast (NUD) and multicast solicitations alike, and DAD from
        // `::` (we defend our address).
        if let Some(na) = f.advertisement_for(mac, source)
            && self.send(sock, &na.to_bytes(), "NA", ip).await
        {
            bump(&self.counters.replies);
        }
    }
}
