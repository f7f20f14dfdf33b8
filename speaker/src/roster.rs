//! The speakers the Kubernetes API knows about. Each speaker keeps one
//! Lease, `ferrolb-speaker-<node>`, with its node name as holderIdentity and
//! two annotations: where it receives heartbeats ([`ADDRESS_ANNOTATION`])
//! and the MACs of its interfaces ([`MACS_ANNOTATION`]). It renews it every
//! [`RENEW_EVERY`] with a duration of [`LEASE_DURATION`].
//!
//! The roster answers "whom should I heartbeat, and how many speakers does
//! a quorum count" ([`Roster::known`]) and "is this MAC a speaker's"
//! ([`Roster::owner_of_mac`]). It is a plain struct fed snapshots of the
//! Leases, converted once at the edge into [`SpeakerRecord`]s.
//!
//! Expiry follows `controller/src/election.rs`: a record counts while it
//! *changed* within its duration, as timed by our own clock when we saw
//! the change, never by the writer's renewTime, so clock skew between nodes
//! can neither keep a dead speaker nor drop a live one.
//!
//! One refinement, because the fence counts a quorum against this roster:
//! judging peers' records fresh or stale only makes sense while our own
//! view of the API is current. When our *own* record has gone stale too
//! (we cannot renew, or our watch is stuck), every peer's record would
//! soon look stale as well, the roster would shrink to ourselves, and a
//! node cut off from everything would regain "quorum" after one lease
//! duration and answer beside the real owner. So peers are judged against
//! the moment our own record went stale, not against `now`: an isolated
//! node keeps the roster it last saw. While our record is fresh, a speaker
//! that stops renewing drops out after its duration, which is how a
//! cluster that lost a majority of its nodes at once recovers (see
//! `fence`).
//!
//! MAC ownership does not expire: a node whose Lease lapsed still owns its
//! NICs, and its gratuitous ARP after a partition must still be seen as a
//! speaker's, not as a foreign host's. Records leave only when their Lease
//! is deleted (give each Lease an ownerReference to its Node).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::packet::MacAddr;

/// Lease names are this plus the node name.
pub const LEASE_PREFIX: &str = "ferrolb-speaker-";
/// `<ip>:<port>` (`[v6]:port` for IPv6) where the speaker takes heartbeats.
pub const ADDRESS_ANNOTATION: &str = "ferrolb.io/heartbeat-address";
/// Comma-separated MACs of the speaker's interfaces.
pub const MACS_ANNOTATION: &str = "ferrolb.io/macs";
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Four renewals: one slow API call or a missed renewal does not make a
/// speaker unknown.
pub const LEASE_DURATION: Duration = Duration::from_secs(40);

/// The Lease name for `node`. Object names are at most 253 bytes; a node
/// name too long to take the prefix is shortened and made unique again
/// with a hash (holderIdentity still carries the full name).
pub fn lease_name(node: &str) -> String {
    let full = format!("{LEASE_PREFIX}{node}");
    if full.len() <= 253 {
        return full;
    }
    let digest = Sha256::digest(node.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = 253 - 1 - hash.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", full[..cut].trim_end_matches(['-', '.']))
}

/// The annotations a speaker writes on its own Lease.
pub fn annotations(address: SocketAddr, macs: &BTreeSet<MacAddr>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ADDRESS_ANNOTATION.to_string(), address.to_string()),
        (MACS_ANNOTATION.to_string(), format_macs(macs)),
    ])
}

pub fn format_macs(macs: &BTreeSet<MacAddr>) -> String {
    macs.iter()
        .map(MacAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`MACS_ANNOTATION`]: comma-separated, spaces around entries
/// allowed, empty entries skipped.
pub fn parse_macs(text: &str) -> Result<BTreeSet<MacAddr>, RecordError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| RecordError::Mac(s.to_string())))
        .collect()
}

/// One speaker's Lease, as the roster needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerRecord {
    pub node: String,
    pub address: SocketAddr,
    pub macs: BTreeSet<MacAddr>,
    /// `leaseDurationSeconds`.
    pub duration: Duration,
    /// Anything that changes on every renewal (the renewTime text, or the
    /// resourceVersion): the roster only compares it.
    pub fingerprint: String,
}

/// Why a Lease is not a usable speaker record; the shell logs it and skips
/// the Lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the Lease has no holderIdentity")]
    NoHolder,
    #[error("Lease {name} should be named {expected} for holder {holder}")]
    Name {
        name: String,
        expected: String,
        holder: String,
    },
    #[error("annotation {ADDRESS_ANNOTATION} is missing")]
    NoAddress,
    #[error("annotation {ADDRESS_ANNOTATION} is not an ip:port: {0:?}")]
    Address(String),
    #[error("annotation {MACS_ANNOTATION} has a bad MAC: {0:?}")]
    Mac(String),
}

impl SpeakerRecord {
    /// The record in a Lease named `name` with these fields. A missing or
    /// non-positive duration means [`LEASE_DURATION`].
    pub fn from_lease(
        name: &str,
        holder: Option<&str>,
        duration_seconds: Option<i32>,
        annotations: &BTreeMap<String, String>,
        fingerprint: impl Into<String>,
    ) -> Result<Self, RecordError> {
        let node = holder
            .filter(|h| !h.is_empty())
            .ok_or(RecordError::NoHolder)?;
        // A Lease that is not the holder's own (copied, or hand-made) would
        // let one node appear twice.
        let expected = lease_name(node);
        if name != expected {
            return Err(RecordError::Name {
                name: name.to_string(),
                expected,
                holder: node.to_string(),
            });
        }
        let text = annotations
            .get(ADDRESS_ANNOTATION)
            .ok_or(RecordError::NoAddress)?;
        let address = text
            .trim()
            .parse()
            .map_err(|_| RecordError::Address(text.clone()))?;
        let macs = match annotations.get(MACS_ANNOTATION) {
            Some(t) => parse_macs(t)?,
            None => BTreeSet::new(),
        };
        let duration = match duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(u64::from(s.unsigned_abs())),
            _ => LEASE_DURATION,
        };
        Ok(SpeakerRecord {
            node: node.to_string(),
            address,
            macs,
            duration,
            fingerprint: fingerprint.into(),
        })
    }
}

/// The speakers known to the API, as this speaker sees them.
#[derive(Debug, Clone)]
pub struct Roster {
    me: String,
    /// Each record and when we saw it change.
    records: BTreeMap<String, (SpeakerRecord, Instant)>,
}

impl Roster {
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            records: BTreeMap::new(),
        }
    }

    /// Takes the current set of Lease records (the whole watch cache). A
    /// record's clock restarts only when it differs from the one seen
    /// before; records not in `current` are forgotten (their Lease was
    /// deleted). For two records naming one node the last one wins.
    pub fn observe(&mut self, current: impl IntoIterator<Item = SpeakerRecord>, now: Instant) {
        let mut next = BTreeMap::new();
        for record in current {
            let since = match self.records.get(&record.node) {
                Some((seen, since)) if *seen == record => *since,
                _ => now,
            };
            next.insert(record.node.clone(), (record, since));
        }
        self.records = next;
    }

    /// The time peers' records are judged against: `now`, unless our own
    /// record has gone stale, then the moment it did (see the module doc).
    fn reference(&self, now: Instant) -> Instant {
        match self.records.get(&self.me) {
            Some((own, since)) => now.min(*since + own.duration),
            None => now,
        }
    }

    fn fresh(&self, now: Instant) -> impl Iterator<Item = &SpeakerRecord> {
        let reference = self.reference(now);
        self.records
            .values()
            // Inclusive: at the moment our own record went stale, records
            // that lapse at that same moment still count.
            .filter(move |(r, since)| reference <= *since + r.duration)
            .map(|(r, _)| r)
    }

    /// Known speakers (ourselves included when our Lease is in the cache)
    /// and their heartbeat addresses.
    pub fn known(&self, now: Instant) -> BTreeMap<String, SocketAddr> {
        self.fresh(now)
            .map(|r| (r.node.clone(), r.address))
            .collect()
    }

    /// The names of [`Self::known`] plus ourselves: the speakers a quorum
    /// is counted among.
    pub fn members(&self, now: Instant) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.fresh(now).map(|r| r.node.clone()).collect();
        names.insert(self.me.clone());
        names
    }

    /// The speaker whose Lease lists `mac`, expired or not. `None` when no
    /// Lease lists it, or more than one does (a virtual MAC shared between
    /// nodes identifies nobody).
    pub fn owner_of_mac(&self, mac: MacAddr) -> Option<&str> {
        let mut owners = self
            .records
            .values()
            .filter(|(r, _)| r.macs.contains(&mac))
            .map(|(r, _)| r.node.as_str());
        let first = owners.next()?;
        owners.next().is_none().then_some(first)
    }

    /// Every MAC of every speaker in the cache: what the conflict probe
    /// treats as "ours".
    pub fn speaker_macs(&self) -> BTreeSet<MacAddr> {
        self.records
            .values()
            .flat_map(|(r, _)| r.macs.iter().copied())
            .collect()
    }
}
