//! The speaker's Prometheus metrics, all `ferrolb_speaker_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::announce::Counters;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub wire: Counters,
    pub announced: Family<FamilyLabels, Gauge>,
    pub peers_known: Gauge,
    pub peers_alive: Gauge,
    pub peers_fallback: Gauge,
    pub failovers: Counter,
    pub false_failovers: Counter,
    pub conflicts: Counter,
    pub takeovers: Counter,
    pub releases: Counter,
    pub reasserts: Counter,
    pub heartbeats_sent: Counter,
    pub heartbeats_received: Counter,
    pub heartbeats_rejected: Family<ReasonLabels, Counter>,
    pub quorum: Gauge,
    pub active: Gauge,
}

impl Metrics {
    pub fn register(root: &mut Registry) -> Self {
        let m = Self::default();
        let r = root.sub_registry_with_prefix("speaker");
        let w = &m.wire;
        r.register(
            "announced_ips",
            "IPs this node answers ARP/NDP for, per family",
            m.announced.clone(),
        );
        r.register(
            "arp_requests",
            "ARP requests seen for IPs this node announces",
            w.arp_requests.clone(),
        );
        r.register(
            "ndp_solicitations",
            "Neighbour solicitations seen for IPs this node announces",
            w.ndp_solicitations.clone(),
        );
        r.register(
            "replies",
            "ARP replies and neighbour advertisements sent in answer",
            w.replies.clone(),
        );
        r.register(
            "gratuitous",
            "Gratuitous ARP and unsolicited neighbour advertisements sent",
            w.gratuitous.clone(),
        );
        r.register(
            "probes",
            "Conflict probes sent (ARP probes, DAD solicitations)",
            w.probes.clone(),
        );
        r.register(
            "malformed_frames",
            "ARP/NDP frames that did not parse (and were ignored)",
            w.malformed.clone(),
        );
        r.register(
            "dropped_lan_reports",
            "LAN observations dropped because the main loop fell behind",
            w.dropped_reports.clone(),
        );
        r.register(
            "peers_known",
            "Speakers known to the API (their Leases), this one included",
            m.peers_known.clone(),
        );
        r.register(
            "peers_alive",
            "Speakers alive in this speaker's view, this one included",
            m.peers_alive.clone(),
        );
        r.register(
            "peers_fallback",
            "Peers never heard by heartbeat, judged by their Node's Ready condition instead",
            m.peers_fallback.clone(),
        );
        r.register(
            "failovers",
            "Peers this speaker saw go from alive to dead",
            m.failovers.clone(),
        );
        r.register(
            "false_failovers",
            "Peers declared dead that turned out to have kept sending heartbeats",
            m.false_failovers.clone(),
        );
        r.register(
            "conflicts",
            "IP conflicts: a host that is no speaker holds an IP we would announce",
            m.conflicts.clone(),
        );
        r.register(
            "takeovers",
            "IPs this node started answering for",
            m.takeovers.clone(),
        );
        r.register(
            "releases",
            "IPs this node stopped answering for",
            m.releases.clone(),
        );
        r.register(
            "reasserts",
            "Defences of an IP after another host claimed it",
            m.reasserts.clone(),
        );
        r.register(
            "heartbeats_sent",
            "Heartbeat datagrams sent",
            m.heartbeats_sent.clone(),
        );
        r.register(
            "heartbeats_received",
            "Heartbeats accepted",
            m.heartbeats_received.clone(),
        );
        r.register(
            "heartbeats_rejected",
            "Heartbeat datagrams refused, by reason",
            m.heartbeats_rejected.clone(),
        );
        r.register(
            "quorum",
            "1 while this speaker hears a majority of the known speakers (or fewer than 3 exist)",
            m.quorum.clone(),
        );
        r.register(
            "active",
            "1 while this process acts for its node (0: a newer process waits for the older to exit)",
            m.active.clone(),
        );
        m
    }
}
