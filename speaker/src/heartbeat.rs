//! The heartbeat speakers send each other over UDP, and the guard against
//! replayed ones. Pure: a [`Message`] in, bytes out, and back.
//!
//! Wire format (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, [`VERSION`] |
//! | 1 | state: 0 running, 1 restarting, 2 leaving |
//! | 8 | incarnation |
//! | 8 | seq |
//! | 1 + n | sender: length, then the node name (UTF-8, 1..=253 bytes) |
//! | 2 | number of `heard` entries (≤ [`MAX_HEARD`]) |
//! | each: 1 + n + 4 | node name as above, then ms since the sender heard it |
//! | 16 | HMAC-SHA256(key, every byte before), truncated to its first 16 |
//!
//! Why these choices:
//! - The MAC is checked before a single field is read, in constant time, so
//!   whoever lacks the key can make us do no more work than one HMAC, and
//!   learns nothing from timing. 16 bytes (128 bits) is the usual
//!   truncation for a MAC nobody can try offline: a forger gets one guess
//!   per datagram.
//! - Every speaker holds the same key (one Secret), so the MAC proves "a
//!   speaker sent this", not which one: a compromised speaker can speak for
//!   any node. The Secret is as sensitive as the speakers' own credentials.
//! - [`decode_any`] accepts any of several keys, so the Secret can be
//!   rotated (new key added, speakers restarted, old key removed) without a
//!   window in which half the cluster refuses the other half's heartbeats
//!   and, having no quorum, stops answering.
//! - Node names are Kubernetes object names, at most 253 bytes, so a one-byte
//!   length suffices. 1024 peers and 64 KiB bound what one datagram can make
//!   us allocate; the full-mesh heartbeat is meant for clusters of at most a
//!   few hundred speakers (each sends to every other every interval).
//! - Anything not exactly well-formed is refused: trailing bytes, an empty
//!   or non-UTF-8 name, a count that runs past the end. A speaker of a later
//!   version that needs new fields bumps [`VERSION`]; the error then says
//!   "version", not "bad MAC", so a mixed-version rollout is easy to spot.

use std::collections::{BTreeMap, VecDeque};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The format this module writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the truncated HMAC-SHA256 tag at the end of a datagram.
pub const TAG_LEN: usize = 16;
/// Longest node name (a Kubernetes object name).
pub const MAX_NAME: usize = 253;
/// Most `heard` entries in one message.
pub const MAX_HEARD: usize = 1024;
/// Largest datagram, tag included.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Shortest key [`check_key`] accepts. HMAC takes any length, but a short
/// key can be guessed offline from one captured datagram.
pub const MIN_KEY_LEN: usize = 16;

/// Header bytes before the sender's name: version, state, incarnation, seq.
const FIXED_LEN: usize = 1 + 1 + 8 + 8;

type HmacSha256 = Hmac<Sha256>;

/// What the sender says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Serving normally.
    Running,
    /// This process is stopping and a new one will take its place on the
    /// same node: hold its IPs for a grace period instead of failing over.
    Restarting,
    /// This node is going away (drain, cordon, told to leave): fail over now.
    Leaving,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Running => 0,
            State::Restarting => 1,
            State::Leaving => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(State::Running),
            1 => Some(State::Restarting),
            2 => Some(State::Leaving),
            _ => None,
        }
    }
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sending speaker's node name.
    pub sender: String,
    /// Random per process start, so peers can tell a restarted speaker
    /// from a delayed packet of the old one.
    pub incarnation: u64,
    /// Counts up from 0 within an incarnation.
    pub seq: u64,
    pub state: State,
    /// Peers the sender heard directly, with the milliseconds since it last
    /// did (saturating): lets a receiver that lost the peer's own packets
    /// see that others still hear it.
    pub heard: Vec<(String, u32)>,
}

/// Why a message could not be encoded. Only a bug or a misconfiguration
/// (a node name that Kubernetes would refuse, a cluster far past the
/// heartbeat's design size) gets here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("node name {0:?} is empty or longer than {MAX_NAME} bytes")]
    Name(String),
    #[error("{0} heard peers, at most {MAX_HEARD} fit in a heartbeat")]
    TooManyPeers(usize),
    #[error("the heartbeat would be {0} bytes, more than {MAX_MESSAGE}")]
    TooLarge(usize),
}

/// Why a datagram is not a heartbeat we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram of {0} bytes is too short for a heartbeat")]
    TooShort(usize),
    #[error("datagram of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("heartbeat version {0}, this speaker reads version {VERSION}")]
    Version(u8),
    #[error("authentication failed (wrong key, or tampered)")]
    BadMac,
    #[error("heartbeat state code {0} is unknown")]
    State(u8),
    #[error("heartbeat field {0} runs past the end")]
    Truncated(&'static str),
    #[error("heartbeat names {0} heard peers, at most {MAX_HEARD} are allowed")]
    TooManyPeers(usize),
    #[error("a node name in the heartbeat is empty, too long or not UTF-8")]
    Name,
    #[error("{0} unexpected bytes after the last field")]
    Trailing(usize),
}

/// Why a key from the Secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat key of {0} bytes is shorter than {MIN_KEY_LEN}")]
pub struct KeyError(pub usize);

/// Refuses keys too short to be safe; the shell checks the Secret with it
/// before starting.
pub fn check_key(key: &[u8]) -> Result<(), KeyError> {
    if key.len() < MIN_KEY_LEN {
        return Err(KeyError(key.len()));
    }
    Ok(())
}

fn mac_for(key: &[u8]) -> HmacSha256 {
    use hmac::digest::KeyInit;
    // HMAC hashes long keys and pads short ones, so no length is invalid:
    // `new_from_slice` fails only for MACs with fixed-size keys. The
    // fallback keeps this total without a panic path.
    <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()))
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), EncodeError> {
    let len = name.len();
    if len == 0 || len > MAX_NAME {
        return Err(EncodeError::Name(name.to_string()));
    }
    // Checked just above: len ≤ 253 fits a byte.
    out.push(len as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// The datagram for `msg`, authenticated with `key`.
pub fn encode(msg: &Message, key: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let count = msg.heard.len();
    if count > MAX_HEARD {
        return Err(EncodeError::TooManyPeers(count));
    }
    let mut out =
        Vec::with_capacity(FIXED_LEN + 1 + msg.sender.len() + 2 + msg.heard.len() * 24 + TAG_LEN);
    out.push(VERSION);
    out.push(msg.state.code());
    out.extend_from_slice(&msg.incarnation.to_be_bytes());
    out.extend_from_slice(&msg.seq.to_be_bytes());
    put_name(&mut out, &msg.sender)?;
    // Checked above: count ≤ 1024 fits u16.
    out.extend_from_slice(&(count as u16).to_be_bytes());
    for (node, ms) in &msg.heard {
        put_name(&mut out, node)?;
        out.extend_from_slice(&ms.to_be_bytes());
    }
    let total = out.len() + TAG_LEN;
    if total > MAX_MESSAGE {
        return Err(EncodeError::TooLarge(total));
    }
    let mut mac = mac_for(key);
    mac.update(&out);
    let tag = mac.finalize().into_bytes();
    out.extend_from_slice(&tag[..TAG_LEN]);
    Ok(out)
}

/// The message in `bytes`, if it carries a valid tag for `key` and is well
/// formed.
pub fn decode(bytes: &[u8], key: &[u8]) -> Result<Message, DecodeError> {
    decode_any(bytes, &[key])
}

/// [`decode`] accepting a tag made with any of `keys` (key rotation). Every
/// key is tried, so the time taken does not tell which one matched.
pub fn decode_any(bytes: &[u8], keys: &[&[u8]]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let Some(body_len) = bytes.len().checked_sub(TAG_LEN).filter(|&n| n > 0) else {
        return Err(DecodeError::TooShort(bytes.len()));
    };
    let (body, tag) = bytes.split_at(body_len);
    let mut valid = false;
    for key in keys {
        let mut mac = mac_for(key);
        mac.update(body);
        valid |= mac.verify_truncated_left(tag).is_ok();
    }
    if !valid {
        // The version byte is not secret; naming it helps during a
        // mixed-version rollout and tells an attacker nothing.
        return Err(match body.first() {
            Some(&v) if v != VERSION => DecodeError::Version(v),
            _ => DecodeError::BadMac,
        });
    }
    parse(body)
}

/// Reads the authenticated body. Every read is bounds-checked.
fn parse(body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { rest: body };
    let version = r.byte("version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let code = r.byte("state")?;
    let state = State::from_code(code).ok_or(DecodeError::State(code))?;
    let incarnation = u64::from_be_bytes(r.array("incarnation")?);
    let seq = u64::from_be_bytes(r.array("seq")?);
    let sender = r.name("sender")?;
    let count = usize::from(u16::from_be_bytes(r.array("heard count")?));
    if count > MAX_HEARD {
        return Err(DecodeError::TooManyPeers(count));
    }
    // Each entry takes at least 1 + 1 + 4 bytes; refusing a count that
    // cannot fit keeps a lying count from sizing our allocation.
    if count.saturating_mul(6) > r.rest.len() {
        return Err(DecodeError::Truncated("heard"));
    }
    let mut heard = Vec::with_capacity(count);
    for _ in 0..count {
        let node = r.name("heard node")?;
        let ms = u32::from_be_bytes(r.array("heard ms")?);
        heard.push((node, ms));
    }
    if !r.rest.is_empty() {
        return Err(DecodeError::Trailing(r.rest.len()));
    }
    Ok(Message {
        sender,
        incarnation,
        seq,
        state,
        heard,
    })
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| DecodeError::Truncated(what))
    }

    fn name(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.byte(what)?);
        if len == 0 || len > MAX_NAME {
            return Err(DecodeError::Name);
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| DecodeError::Name)
    }
}

/// How many retired incarnations per sender [`Replay`] remembers.
pub const RETIRED_INCARNATIONS: usize = 8;

/// Accepts each sender's messages only in order: within an incarnation a
/// seq must exceed the last accepted one; a new incarnation (a restarted
/// process) starts afresh.
///
/// Incarnations are random, so "newer" cannot be a comparison between two
/// of them. Instead an incarnation, once replaced, is retired and never
/// accepted again: a captured message of an old process cannot be replayed
/// to make a dead node look alive or to fake a Leaving, and an attacker
/// cannot alternate two captured incarnations to reset the seq check.
/// The cost: when an old and a new process of one node overlap (a surge
/// rollout), the old one's messages are refused from the new one's first
/// accepted message on, which is what the peers want anyway.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    senders: BTreeMap<String, Sender>,
}

#[derive(Debug, Clone)]
struct Sender {
    incarnation: u64,
    seq: u64,
    retired: VecDeque<u64>,
}

/// Why [`Replay::accept`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Replayed {
    #[error("seq {seq} is not after {last}, the last accepted of this incarnation")]
    Old { seq: u64, last: u64 },
    #[error("incarnation {0:#x} was replaced by a newer process")]
    Retired(u64),
}

impl Replay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `msg` and remembers it as its sender's latest, or refuses it
    /// and changes nothing. Call only with messages that passed [`decode`].
    pub fn accept(&mut self, msg: &Message) -> Result<(), Replayed> {
        let Some(s) = self.senders.get_mut(&msg.sender) else {
            self.senders.insert(
                msg.sender.clone(),
                Sender {
                    incarnation: msg.incarnation,
                    seq: msg.seq,
                    retired: VecDeque::new(),
                },
            );
            return Ok(());
        };
        if msg.incarnation == s.incarnation {
            if msg.seq <= s.seq {
                return Err(Replayed::Old {
                    seq: msg.seq,
                    last: s.seq,
                });
            }
            s.seq = msg.seq;
            return Ok(());
        }
        if s.retired.contains(&msg.incarnation) {
            return Err(Replayed::Retired(msg.incarnation));
        }
        if s.retired.len() == RETIRED_INCARNATIONS {
            s.retired.pop_front();
        }
        s.retired.push_back(s.incarnation);
        s.incarnation = msg.incarnation;
        s.seq = msg.seq;
        Ok(())
    }

    /// Forgets a sender (its Lease is gone), so the table does not grow
    /// with every node that ever existed.
    pub fn forget(&mut self, sender: &str) {
        self.senders.remove(sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_length_is_checked() {
        assert_eq!(check_key(b"short"), Err(KeyError(5)));
        assert!(check_key(&[7u8; 32]).is_ok());
    }

    #[test]
    fn replay_retires_replaced_incarnations() {
        let m = |inc, seq| Message {
            sender: "a".into(),
            incarnation: inc,
            seq,
            state: State::Running,
            heard: vec![],
        };
        let mut r = Replay::new();
        assert!(r.accept(&m(1, 5)).is_ok());
        assert_eq!(r.accept(&m(1, 5)), Err(Replayed::Old { seq: 5, last: 5 }));
        assert!(r.accept(&m(2, 0)).is_ok());
        assert_eq!(r.accept(&m(1, 6)), Err(Replayed::Retired(1)));
        r.forget("a");
        assert!(r.accept(&m(1, 6)).is_ok());
    }
}
